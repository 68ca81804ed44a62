"""`tcpcp pass` (move live connections of a demo server to another host) and `tcpcp demo-server`.

    tcpcp pass --control /run/tcpcp-demo-origin.sock --to 10.77.2.11:7070 \\
               --lab PREFIX --from-host origin --to-host standby

asks the origin's demo server to isolate, dump and send its connections to the destination's
receiver. Once they are restored there, this command moves exactly those connections' traffic
(per-connection policy rules on the lab's gateway, or --switch-cmd), and the origin has them
activated. Connections the destination refused, and every connection the pass did not choose,
keep their traffic on the origin: nothing is left where no socket answers for it.

Why per connection and not the whole service address (the paper's route switch): a route
switch also moves connections the pass does not take (closing ones, ones still in the accept
queue, new ones arriving meanwhile, ones the destination refused), and the destination answers
those with RST. The route switch stays the tool of a fail-over, where the whole host is gone.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import structlog

from kernel.ici import Identity
from ops.apps import demo_server
from ops.apps.demo_server import flow_from_json, flow_json

log = structlog.get_logger(component="tcpcp.pass")


class Switch(Protocol):
    def move(self, flows: Sequence[Identity]) -> None: ...

    def back(self, flows: Sequence[Identity]) -> None: ...


class LabSwitch:
    """Moves flows between two lab hosts with per-connection rules on the lab's gateway."""

    def __init__(self, lab: Any, from_host: str, to_host: str) -> None:
        self.lab, self.from_host, self.to_host = lab, from_host, to_host

    def move(self, flows: Sequence[Identity]) -> None:
        self.lab.switch_flows(flows, self.to_host)
        log.info("traffic_switched", to=self.to_host, flows=len(flows))

    def back(self, flows: Sequence[Identity]) -> None:
        self.lab.switch_flows(flows, self.from_host)
        log.info("traffic_switched_back", to=self.from_host, flows=len(flows))


class CommandSwitch:
    """Runs `CMD move` or `CMD back` with the flows as JSON on standard input."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def _run(self, verb: str, flows: Sequence[Identity]) -> None:
        done = subprocess.run(f"{self.cmd} {verb}", shell=True, check=False, text=True,
                              input=json.dumps([flow_json(f) for f in flows]))
        if done.returncode != 0:
            raise RuntimeError(f"--switch-cmd {verb}: expected exit status 0, got "
                               f"{done.returncode}")

    def move(self, flows: Sequence[Identity]) -> None:
        self._run("move", flows)

    def back(self, flows: Sequence[Identity]) -> None:
        self._run("back", flows)


def _lines(sock: socket.socket) -> Iterator[dict[str, Any]]:
    for line in sock.makefile("rb"):
        yield json.loads(line)


def pass_connections(control: str, to: str, to_name: str, switch: Switch, *, count: int = 0,
                     timeout: float = 120.0, fault: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Drive one pass through a demo server's control socket, moving traffic with switch.

    Returns the server's final report: {"event": "passed" | "failed", "passed": n,
    "resumed": [[flow, reason]...], "closed": [[flow, reason]...], "timings_us": {...},
    "error": ...}. A switch that fails is answered with abort: the origin undoes the pass."""
    request: dict[str, Any] = {"cmd": "pass", "to": to, "to_name": to_name, "count": count}
    if fault:
        request["fault"] = fault
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ctl:
        ctl.settimeout(timeout)
        ctl.connect(control)
        ctl.sendall(json.dumps(request).encode() + b"\n")
        for msg in _lines(ctl):
            event = msg.get("event")
            if event not in ("restored", "switch_back"):
                return msg
            flows = [flow_from_json(f) for f in msg.get("flows", [])]
            try:
                (switch.move if event == "restored" else switch.back)(flows)
            except Exception as exc:
                log.error("traffic_switch_failed", event=event, error=str(exc))
                ctl.sendall(json.dumps({"cmd": "abort", "error": str(exc)}).encode() + b"\n")
                continue
            answer = "switched" if event == "restored" else "switched_back"
            ctl.sendall(json.dumps({"cmd": answer}).encode() + b"\n")
    return {"event": "failed", "error": "control socket closed without an answer"}


def request(control: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request on a demo server's control socket and its one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ctl:
        ctl.settimeout(timeout)
        ctl.connect(control)
        ctl.sendall(json.dumps(body).encode() + b"\n")
        return dict(json.loads(ctl.makefile("rb").readline()))


def run_pass(args: argparse.Namespace) -> int:
    switch: Switch
    if args.switch_cmd:
        switch = CommandSwitch(args.switch_cmd)
    else:
        from ops.lab import Lab

        switch = LabSwitch(Lab.attach(args.lab), args.from_host, args.to_host)
    report = pass_connections(args.control, args.to, args.to_name or args.to_host, switch,
                              count=args.count, timeout=args.timeout)
    print(json.dumps(report))
    if report.get("event") != "passed":
        return 2
    return 1 if report.get("resumed") or report.get("closed") else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "pass",
        help="pass live TCP connections of a demo server to another host",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--control", required=True, help="the origin demo server's control socket")
    p.add_argument("--to", help="destination receiver ADDRESS:PORT (e.g. 10.77.2.11:7070)")
    p.add_argument("--to-name", help="the destination's name (its --name; default --to-host)")
    p.add_argument("--count", type=int, default=0, help="pass only this many (default: all)")
    p.add_argument("--lab", help="lab prefix whose gateway moves the traffic (tcpcp lab up)")
    p.add_argument("--from-host", default="origin",
                   help="lab host the connections leave (traffic returns there if the "
                   "destination cannot activate them)")
    p.add_argument("--to-host", help="lab host the connections go to")
    p.add_argument("--switch-cmd", help="instead of the lab: shell command run as `CMD move` or "
                   "`CMD back` with the flows as a JSON list on standard input; it must move "
                   "exactly those connections' traffic and exit 0")
    p.add_argument("--status", action="store_true", help="only print the server's status")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for answers")
    p.set_defaults(func=lambda a: _status(a) if a.status else _checked_pass(p, a))

    d = sub.add_parser(
        "demo-server",
        help="run the passing demo server (counting echo + HTTP) in this namespace",
        description=demo_server.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo_server.build_parser(d)
    d.set_defaults(func=demo_server.main)


def _status(args: argparse.Namespace) -> int:
    print(json.dumps(request(args.control, {"cmd": "status"}, args.timeout)))
    return 0


def _checked_pass(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.to:
        p.error("--to ADDRESS:PORT is required to pass connections")
    if not args.switch_cmd and not (args.lab and args.to_host):
        p.error("expected --lab PREFIX with --to-host HOST, or --switch-cmd, to move the "
                "passed connections' traffic")
    if not (args.to_name or args.to_host):
        p.error("--to-name NAME (the destination's --name) is required with --switch-cmd")
    return run_pass(args)


if __name__ == "__main__":
    from ops import cli

    sys.exit(cli.main(["pass", *sys.argv[1:]]))
