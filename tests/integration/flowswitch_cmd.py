"""A `tcpcp pass --switch-cmd` for the lab, as an operator would write one: `python -m
tests.integration.flowswitch_cmd PREFIX FROM TO move|back` reads the flows (JSON) on stdin and
moves exactly those connections' traffic at the lab's gateway."""

from __future__ import annotations

import json
import sys

from ops.apps.demo_server import flow_from_json
from ops.lab import Lab


def main(argv: list[str]) -> int:
    prefix, from_host, to_host, verb = argv
    flows = [flow_from_json(f) for f in json.load(sys.stdin)]
    Lab.attach(prefix).switch_flows(flows, to_host if verb == "move" else from_host)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
