"""`ops/demo`: tcpcp's main job, shown on the built-in lab.

Today this is the lab only: it builds the lab, starts a real Redis in the store host, shows
which host reaches which over IPv4 and IPv6 and who answers the service address before and
after a traffic switch, then removes everything. Checkpointing and failover join the demo as
their issues land.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ops import logs
from ops.lab import Lab, lab
from ops.probe import NameServer, reachable
from ops.redislab import RedisServer

PORT = 7999


def reach_matrix(the_lab: Lab) -> dict[str, dict[str, str]]:
    """For each (source, destination) host pair: '46' when reachable over both families."""
    servers = [NameServer(the_lab, h, PORT) for h in the_lab.hosts]
    for s in servers:
        s.__enter__()
    try:
        out: dict[str, dict[str, str]] = {}
        for src in the_lab.hosts:
            out[src] = {}
            for dst in the_lab.hosts:
                if src == dst:
                    continue
                ok = "".join(str(f) for f in (4, 6)
                             if reachable(the_lab, src, the_lab.addr(dst, f), PORT, 0.5) == dst)
                out[src][dst] = ok or "-"
        return out
    finally:
        for s in servers:
            s.__exit__(None, None, None)


def print_matrix(matrix: dict[str, dict[str, str]]) -> None:
    hosts = list(matrix)
    print("reachability (4 = IPv4, 6 = IPv6):")
    print("  from\\to  " + "".join(f"{h:>9}" for h in hosts))
    for src in hosts:
        print(f"  {src:8} " + "".join(f"{matrix[src].get(dst, '·'):>9}" for dst in hosts))


def _step(n: int, text: str) -> float:
    print(f"[{n}] {text}", flush=True)
    return time.monotonic()


def run_lab_demo(stores: int) -> int:
    t0 = _step(1, "building the lab (network namespaces, veth, bridge; pyroute2)")
    with lab(stores=stores) as the_lab:
        print(f"    lab {the_lab.prefix}: {', '.join(the_lab.hosts)} "
              f"in {time.monotonic() - t0:.2f}s")
        _step(2, "starting a real redis-server in the store host")
        srv = RedisServer(the_lab, "store", 6379).start()
        try:
            def ping_from(host: str) -> Any:
                c = srv.client()
                try:
                    return c.ping()
                finally:
                    c.close()

            for host in ("origin", "standby"):
                answer = "PONG" if the_lab.call(host, ping_from, host) else "no answer"
                print(f"    PING from {host} to {srv.url}: {answer}")
            _step(3, "who reaches whom")
            matrix = reach_matrix(the_lab)
            print_matrix(matrix)
            bad = [(s, d) for s, row in matrix.items() for d, v in row.items() if v != "46"]
            _step(4, "who answers the service address, before and after each switch")
            answers = []
            with NameServer(the_lab, "origin", PORT + 1), NameServer(the_lab, "standby", PORT + 1):
                for label, action in (
                    ("at start", None),
                    ("after gateway route switch to standby",
                     lambda: the_lab.switch_route("standby")),
                    ("after address move (GARP/NA) to origin",
                     lambda: the_lab.move_address("origin")),
                ):
                    if action is not None:
                        action()
                    who = [reachable(the_lab, "peer", the_lab.service(f), PORT + 1) for f in (4, 6)]
                    answers.append(who)
                    print(f"    {label:42} v4 -> {who[0]}, v6 -> {who[1]}")
        finally:
            srv.stop()
        _step(5, "removing the lab")
    print("This demo shows the lab only: checkpointing, the ACK gate and failover are not in it "
          "yet.")
    expected = [["origin", "origin"], ["standby", "standby"], ["origin", "origin"]]
    if bad or answers != expected:
        print(f"demo FAILED: unreachable pairs {bad}, service answers {answers}", file=sys.stderr)
        return 1
    print("demo OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ops/demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", type=int, default=1, choices=(1, 2, 3),
                        help="number of store hosts (default 1)")
    parser.add_argument("--log-format", default=None, choices=("auto", "json", "console"))
    args = parser.parse_args(argv)
    logs.configure(fmt=args.log_format, level="warning")
    return run_lab_demo(args.stores)


if __name__ == "__main__":
    sys.exit(main())
