"""`resurrector`: the standby watchdog that takes over an origin's connections when it dies.

Not built yet: this entry point only explains itself until the resurrector issue lands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PURPOSE = ("tcpcp resurrector: on a standby host, watches the origin's lease; when it expires, "
           "fences the origin, takes over its traffic, restores every connection from the last "
           "checkpoint and hands them to the standby application.")


NOTE = ("resurrector is not implemented yet: this command is a placeholder that prints its "
        "help. "
        "The kernel (ICI, ACK gate, passing) and store parts are built; this one is next.")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the help (what it will do), say it is a placeholder, exit 2."""
    parser = argparse.ArgumentParser(prog="resurrector", description=f"{PURPOSE} {NOTE}")
    parser.parse_args(argv)
    parser.print_help()
    print("\n" + NOTE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
