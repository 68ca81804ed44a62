"""`tcpcp lab ...`: bring the network-namespace lab up and down, inspect it, run commands in
its hosts and inject failures from the shell.

    tcpcp lab up [--prefix P] [--stores N]      build a lab that stays until `down`
    tcpcp lab status [--json] [--reach]         hosts, addresses, service owner, failures
    tcpcp lab exec HOST -- CMD ARGS...          run a command inside a host
    tcpcp lab crash HOST | partition HOST OTHER... | heal | switch HOST [--address]
    tcpcp lab down                              remove it (and its processes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ops import netns
from ops.lab import Lab, LabError, list_labs, remove_prefix, sweep_stale

DEFAULT_PREFIX = os.environ.get("TCPCP_LAB_PREFIX", "tcpcp-lab")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lab", help="the network-namespace lab (peer, gw, origin, standby, store hosts)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", default=DEFAULT_PREFIX,
                   help=f"namespace name prefix (default {DEFAULT_PREFIX}; env TCPCP_LAB_PREFIX)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    up = verbs.add_parser("up", help="build the lab; it stays until `tcpcp lab down`")
    up.add_argument("--stores", type=int, default=3, choices=(1, 2, 3),
                    help="number of store hosts (default 3)")
    up.set_defaults(func=_up)
    verbs.add_parser("down", help="remove the lab and kill its processes").set_defaults(func=_down)
    st = verbs.add_parser("status", help="hosts, addresses, service owner, cuts and partitions")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--reach", action="store_true",
                    help="also test which host reaches which over IPv4 and IPv6")
    st.set_defaults(func=_status)
    verbs.add_parser("list", help="every lab on this machine").set_defaults(func=_list)
    ex = verbs.add_parser("exec", help="run a command inside a lab host")
    ex.add_argument("host")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    ex.set_defaults(func=_exec)
    cr = verbs.add_parser("crash", help="cut a host off at the gateway, then SIGKILL its processes")
    cr.add_argument("host")
    cr.set_defaults(func=_crash)
    pa = verbs.add_parser("partition",
                          help="drop IP traffic between HOST and OTHERS at the gateway")
    pa.add_argument("host")
    pa.add_argument("others", nargs="+")
    pa.set_defaults(func=_partition)
    verbs.add_parser("heal", help="remove every cut and partition").set_defaults(func=_heal)
    sw = verbs.add_parser("switch", help="move the service address's traffic to HOST")
    sw.add_argument("host")
    sw.add_argument("--address", action="store_true",
                    help="move the address itself and announce it (gratuitous ARP / NA) "
                         "instead of switching the gateway route")
    sw.set_defaults(func=_switch)


def _up(args: argparse.Namespace) -> int:
    sweep_stale()
    lab = Lab(args.prefix, stores=args.stores, owned=False)
    lab.up()
    print(f"lab {lab.prefix} is up: hosts {', '.join(lab.hosts)}; service "
          f"{lab.service(4)} / {lab.service(6)} on origin. `tcpcp lab down` removes it.")
    return 0


def _down(args: argparse.Namespace) -> int:
    removed = remove_prefix(args.prefix)
    print(f"lab {args.prefix}: removed {len(removed)} namespaces")
    return 0


def _attach(args: argparse.Namespace) -> Lab:
    return Lab.attach(args.prefix)


def _status(args: argparse.Namespace) -> int:
    lab = _attach(args)
    status: dict[str, Any] = lab.status()
    if args.reach:
        from ops.demo import reach_matrix

        status["reach"] = reach_matrix(lab)
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"lab {status['prefix']}")
    for name, h in status["hosts"].items():
        state = "up" if h["up"] else "MISSING"
        print(f"  {name:8} {h['netns']:24} {h['v4']:12} {h['v6']:12} {state:7} "
              f"{h['processes']} processes")
    svc = status["service"]
    print(f"  service {svc['v4']} {svc['v6']} -> {svc['owner']} (by {svc['mode']})")
    print(f"  cut: {', '.join(status['cut']) or 'none'}; partitions: "
          f"{status['partitions'] or 'none'}")
    if args.reach:
        from ops.demo import print_matrix

        print_matrix(status["reach"])
    return 0


def _list(args: argparse.Namespace) -> int:
    for prefix in list_labs():
        print(prefix)
    return 0


def _exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise SystemExit("tcpcp lab exec: give a command after --, "
                         "e.g. tcpcp lab exec peer -- ss -tn")
    lab = _attach(args)
    argv = netns.command(lab.netns(args.host), cmd)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def _crash(args: argparse.Namespace) -> int:
    killed = _attach(args).crash(args.host)
    print(f"{args.host} cut off at the gateway; killed {len(killed)} processes")
    return 0


def _partition(args: argparse.Namespace) -> int:
    _attach(args).partition(args.host, args.others)
    print(f"{args.host} partitioned from {', '.join(args.others)}")
    return 0


def _heal(args: argparse.Namespace) -> int:
    _attach(args).heal()
    print("every cut and partition removed")
    return 0


def _switch(args: argparse.Namespace) -> int:
    lab = _attach(args)
    try:
        if args.address:
            lab.move_address(args.host)
        else:
            lab.switch_route(args.host)
    except LabError as exc:
        raise SystemExit(f"tcpcp lab switch: {exc}") from None
    print(f"service now served by {args.host}")
    return 0
