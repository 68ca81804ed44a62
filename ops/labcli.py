"""`tcpcp lab ...`: bring the network-namespace lab up and down, inspect it, run commands in
its hosts and inject failures from the shell.

    tcpcp lab up [--prefix P] [--stores N]      build a lab that stays until `down`
    tcpcp lab status [--json] [--reach]         hosts, addresses, service owner, failures
    tcpcp lab exec HOST -- CMD ARGS...          run a command inside a host
    tcpcp lab crash HOST | reboot HOST | partition HOST OTHER... | heal | switch HOST [--address]
    tcpcp lab switch-flow --to HOST FLOW...     move single connections (policy rules)
    tcpcp lab unswitch-flow FLOW... | --all     send them back along the main route
    tcpcp lab flows [--json]                    the connections switched, by host
    tcpcp lab down                              remove it (and its processes)

A FLOW is PEER_IP:PORT>SERVICE_IP:PORT, IPv6 in brackets: 10.77.1.2:40000>10.77.9.1:8080 or
'[fd77:1::2]:40000>[fd77:9::1]:8080' (quote it: > redirects in a shell).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ops import netns
from ops.lab import FlowSwitch, Lab, LabError, list_labs, remove_prefix, sweep_stale

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
    rb = verbs.add_parser("reboot", help="bring a crashed host back as freshly booted (no "
                          "socket, gate or route of its old life), then lift its cut")
    rb.add_argument("host")
    rb.set_defaults(func=_reboot)
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
    sf = verbs.add_parser(
        "switch-flow", help="move single connections to HOST by policy rules on the gateway",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Move single TCP connections of the service address to HOST, leaving every "
                    "other one where it is.\n\n"
                    "On the gateway, one policy rule per connection (TCP, peer address and port, "
                    "service address\nand port) looks up HOST's own routing table, which sends "
                    "the service address to HOST.\nEvery other connection, and every new one, "
                    "keeps following the main route (`tcpcp lab switch`\nmoves that). A "
                    "connection switched to another host before moves to HOST without a gap.\n"
                    "HOST is given the service address if it lacks it.\n\n"
                    "FLOW is PEER_IP:PORT>SERVICE_IP:PORT, IPv6 in brackets, quoted for the "
                    "shell:\n  tcpcp lab switch-flow --to standby '10.77.1.2:40000>10.77.9.1:8080'"
                    "\n  tcpcp lab switch-flow --to standby '[fd77:1::2]:40000>[fd77:9::1]:8080'")
    sf.add_argument("--to", required=True, metavar="HOST",
                    help="the server host that gets the connections (standby, origin, store...)")
    sf.add_argument("flows", nargs="+", metavar="FLOW", help="PEER_IP:PORT>SERVICE_IP:PORT")
    sf.set_defaults(func=_switch_flow)
    uf = verbs.add_parser(
        "unswitch-flow", help="remove connections' policy rules: back along the main route",
        description="Remove the policy rules `switch-flow` added for these connections (or for "
                    "every connection with --all): their packets follow the gateway's main route "
                    "again.")
    uf.add_argument("flows", nargs="*", metavar="FLOW", help="PEER_IP:PORT>SERVICE_IP:PORT")
    uf.add_argument("--all", action="store_true", help="every switched connection")
    uf.set_defaults(func=_unswitch_flow)
    fl = verbs.add_parser("flows", help="the connections switched by switch-flow, by host")
    fl.add_argument("--json", action="store_true", help="machine-readable output")
    fl.set_defaults(func=_flows)


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
    switched = status["switched_flows"]
    print("  switched connections: " + (", ".join(f"{n} to {h}" for h, n in switched.items())
                                        or "none"))
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


def _reboot(args: argparse.Namespace) -> int:
    _attach(args).reboot(args.host)
    print(f"{args.host} rebooted and back on the network")
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


def _parse_flows(verb: str, texts: list[str]) -> list[FlowSwitch]:
    try:
        return [FlowSwitch.parse(t) for t in texts]
    except LabError as exc:
        raise SystemExit(f"tcpcp lab {verb}: {exc}") from None


def _switch_flow(args: argparse.Namespace) -> int:
    flows = _parse_flows("switch-flow", args.flows)
    try:
        added = _attach(args).switch_flows(flows, args.to)
    except LabError as exc:
        raise SystemExit(f"tcpcp lab switch-flow: {exc}") from None
    print(f"{len(flows)} connections switched to {args.to} ({added} rules added)")
    return 0


def _unswitch_flow(args: argparse.Namespace) -> int:
    if bool(args.flows) == args.all:
        raise SystemExit("tcpcp lab unswitch-flow: give connections or --all (not both)")
    flows = None if args.all else _parse_flows("unswitch-flow", args.flows)
    try:
        removed = _attach(args).unswitch_flows(flows)
    except LabError as exc:
        raise SystemExit(f"tcpcp lab unswitch-flow: {exc}") from None
    print(f"{len(removed)} connections back on the main route")
    for flow in removed:
        print(f"  {flow}")
    return 0


def _flows(args: argparse.Namespace) -> int:
    switched = _attach(args).switched_flows()
    if args.json:
        print(json.dumps({h: [str(f) for f in fs] for h, fs in switched.items()}, indent=1))
        return 0
    for host, flows in switched.items():
        print(f"{host}: {len(flows)}")
        for flow in flows:
            print(f"  {flow}")
    if not switched:
        print("no switched connections")
    return 0
