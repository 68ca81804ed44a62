"""`tcpcp pass` (move live connections of a demo server to another host) and `tcpcp demo-server`.

    tcpcp pass --control /run/tcpcp-demo-origin.sock --to 10.77.2.11:7070 \\
               --lab PREFIX --switch-to standby

asks the origin's demo server to isolate, dump and send its connections to the destination's
receiver; once they are restored there it moves the traffic (the lab gateway's route, the
paper's step 8) and tells the origin to have them activated.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from kernel import demo_server
from kernel.passing import PassingError

log = structlog.get_logger("tcpcp.pass")


def _lines(sock: socket.socket) -> Iterator[dict[str, Any]]:
    for line in sock.makefile("rb"):
        yield json.loads(line)


def pass_connections(control: str, to: str, switch: Callable[[], None], *, count: int = 0,
                     timeout: float = 120.0) -> dict[str, Any]:
    """Drive one pass through a demo server's control socket; switch() is step 8 (with a
    count, it must move only the connections passed: the others stay on the origin).

    Returns the server's final report ({"event": "passed", "passed": n, "refused": [...],
    "timings_us": {...}} or {"event": "failed", "error": ...}); when switch() fails, the
    origin is told to take its connections back and the failure is reported the same way
    ({"event": "failed", "error": ..., "origin": the origin's own report})."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ctl:
        ctl.settimeout(timeout)
        ctl.connect(control)
        ctl.sendall(json.dumps({"cmd": "pass", "to": to, "count": count}).encode() + b"\n")
        lines = _lines(ctl)
        for msg in lines:
            if msg.get("event") != "restored":
                return msg
            try:
                switch()
            except BaseException as exc:
                ctl.sendall(json.dumps({"cmd": "abort"}).encode() + b"\n")  # origin resumes
                if not isinstance(exc, Exception):
                    raise
                return {"event": "failed", "error": f"traffic switch failed: {exc}",
                        "origin": next(lines, {})}
            ctl.sendall(json.dumps({"cmd": "switched"}).encode() + b"\n")
    return {"event": "failed", "error": "control socket closed without an answer"}


def run_pass(args: argparse.Namespace) -> int:
    def switch() -> None:
        if args.switch_cmd:
            done = subprocess.run(args.switch_cmd, shell=True, check=False)
            if done.returncode != 0:
                raise PassingError(f"--switch-cmd: expected exit status 0, got "
                                   f"{done.returncode}")
            log.info("traffic_switched", cmd=args.switch_cmd)
        if args.lab and args.switch_to:
            from ops.lab import Lab

            Lab.attach(args.lab).switch_route(args.switch_to)
            log.info("traffic_switched", to=args.switch_to)

    report = pass_connections(args.control, args.to, switch, count=args.count,
                              timeout=args.timeout)
    print(json.dumps(report))
    if report.get("event") != "passed":
        return 2
    return 1 if report.get("refused") else 0


def run_status(args: argparse.Namespace) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ctl:
        ctl.settimeout(args.timeout)
        ctl.connect(args.control)
        ctl.sendall(b'{"cmd": "status"}\n')
        print(ctl.makefile("rb").readline().decode().strip())
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "pass",
        help="pass live TCP connections of a demo server to another host",
        description="Planned connection passing (the paper's ten steps): the origin's demo "
        "server isolates its connections, dumps them with TCP_REPAIR and sends them to the "
        "destination's receiver, which restores them silently; this command then moves the "
        "traffic (the lab gateway's route) and the destination activates them.",
    )
    p.add_argument("--control", required=True, help="the origin demo server's control socket")
    p.add_argument("--to", help="destination receiver HOST:PORT (e.g. 10.77.2.11:7070)")
    p.add_argument("--count", type=int, default=0,
                   help="pass only this many (default: all); needs a --switch-cmd that moves "
                   "just those connections")
    p.add_argument("--lab", help="lab prefix whose gateway route to switch (tcpcp lab up)")
    p.add_argument("--switch-to", help="lab host to route the service address to")
    p.add_argument("--switch-cmd", help="shell command that moves the traffic (step 8), run "
                   "once everything is restored and before activation")
    p.add_argument("--status", action="store_true", help="only print the server's status")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for answers")
    p.set_defaults(func=lambda a: run_status(a) if a.status else _checked_pass(p, a))

    d = sub.add_parser(
        "demo-server",
        help="run the passing demo server (counting echo + HTTP) in this namespace",
        description=demo_server.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo_server.build_parser(d)
    d.set_defaults(func=demo_server.main)


def _checked_pass(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.to:
        p.error("--to HOST:PORT is required to pass connections")
    if args.count and args.switch_to:
        p.error("--count with --switch-to: expected all connections to move, since the route "
                "switch sends every connection of the service address to the destination (the "
                "ones left behind would be reset there); use --switch-cmd that moves only those")
    return run_pass(args)


if __name__ == "__main__":
    from ops import cli

    sys.exit(cli.main(["pass", *sys.argv[1:]]))
