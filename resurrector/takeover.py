"""Taking an origin's traffic over, by strategy (the issue's three; netlink through pyroute2):

    AddressTakeover("eth0", ["10.0.0.80", "fd00::80"])  # the default: the service addresses
        # added here and announced (gratuitous ARP, unsolicited neighbour advertisement)
    CommandTakeover("switch-traffic --to standby")       # the paper's gateway route switch, or
        # per-connection policy rules: an operator hook; it gets the origin and the flows as
        # JSON on stdin ({"origin": ..., "flows": ["10.0.0.80:80>10.0.0.9:5555", ...]}) and
        # must exit 0 within its timeout

Each is called once the flows are quarantined here (resurrector/resurrect.py): the service
address is never bound, nor the traffic moved, before the quarantine is in place.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import socket
import subprocess
from collections.abc import Sequence

import structlog
from pyroute2 import IPRoute

from kernel import announce

log = structlog.get_logger(component="tcpcp.resurrector.takeover")


class TakeoverError(RuntimeError):
    """The traffic could not be moved here; the message says what failed."""


class AddressTakeover:
    """Keeps its netlink socket open between failovers (opening one costs tens of ms, which a
    failover would wait for): close() it when done."""

    def __init__(self, ifname: str, addresses: Sequence[str], prefixlen4: int = 32,
                 prefixlen6: int = 128) -> None:
        self.ifname = ifname
        self.addresses = [ipaddress.ip_address(a) for a in addresses]
        self.prefixlen4, self.prefixlen6 = prefixlen4, prefixlen6
        self._ip: IPRoute | None = None

    def _netlink(self) -> IPRoute:
        if self._ip is None:
            self._ip = IPRoute()
        return self._ip

    def open(self) -> AddressTakeover:
        """Open the netlink socket now rather than at the first failover."""
        self._netlink()
        return self

    def close(self) -> None:
        if self._ip is not None:
            self._ip.close()
            self._ip = None

    def __call__(self, origin: str, flows: Sequence[str]) -> None:
        ip = self._netlink()
        found = ip.link_lookup(ifname=self.ifname)
        if not found:
            raise TakeoverError(f"expected interface {self.ifname} here, got none")
        idx = found[0]
        mac = ip.get_links(idx)[0].get_attr("IFLA_ADDRESS")
        for a in self.addresses:
            v6 = a.version == 6
            try:
                ip.addr("add", index=idx, address=str(a),
                        prefixlen=self.prefixlen6 if v6 else self.prefixlen4,
                        family=socket.AF_INET6 if v6 else socket.AF_INET,
                        **({"flags": 0x02} if v6 else {}))  # IFA_F_NODAD
            except Exception as exc:  # pyroute2's NetlinkError: EEXIST is fine
                if getattr(exc, "code", None) != 17:
                    raise TakeoverError(f"adding {a} to {self.ifname}: {exc}") from exc
        for a in self.addresses:
            (announce.send_na if a.version == 6 else announce.send_garp)(self.ifname, mac,
                                                                           str(a))
        log.info("addresses_taken_over", origin=origin, ifname=self.ifname,
                 addresses=[str(a) for a in self.addresses])


class CommandTakeover:
    def __init__(self, command: str, timeout_s: float = 10.0) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise TakeoverError("expected a takeover command, got an empty one")
        self.timeout_s = timeout_s

    def __call__(self, origin: str, flows: Sequence[str]) -> None:
        doc = json.dumps({"origin": origin, "flows": list(flows)})
        try:
            done = subprocess.run(self.argv, input=doc, text=True, capture_output=True,
                                  timeout=self.timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TakeoverError(f"takeover command {self.argv[0]}: {exc}") from exc
        if done.returncode != 0:
            raise TakeoverError(f"takeover command {shlex.join(self.argv)} exited "
                                f"{done.returncode}: {done.stderr.strip()[-500:]}")
        log.info("traffic_taken_over", origin=origin, command=self.argv[0], flows=len(flows))
