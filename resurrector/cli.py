"""`resurrector`: the standby watchdog that takes over an origin's connections when it dies.

Not built yet: this entry point only explains itself until the resurrector issue lands.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ops import placeholder

PURPOSE = ("tcpcp resurrector: on a standby host, watches the origin's lease; when it expires, "
           "fences the origin, takes over its traffic, restores every connection from the last "
           "checkpoint and hands them to the standby application.")


def main(argv: Sequence[str] | None = None) -> int:
    return placeholder.run("resurrector", PURPOSE, argv)


if __name__ == "__main__":
    sys.exit(main())
