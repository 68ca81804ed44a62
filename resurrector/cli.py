"""`resurrector`: the standby watchdog that takes over an origin's connections when it dies.

Not built yet: this entry point only explains itself until the resurrector issue lands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PLACEHOLDER = ("resurrector is not implemented yet: this command is a placeholder that prints "
               "its help. The kernel (ICI, ACK gate) and store parts are being built first.")


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="resurrector",
        description="tcpcp resurrector: on a standby host, watches the origin's lease; when it "
        "expires, fences the origin, takes over its traffic, restores every connection from the "
        "last checkpoint and hands them to the standby application. " + PLACEHOLDER)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    print("\n" + PLACEHOLDER, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
