"""`checkpointer`: the sidecar agent that checkpoints guarded connections into Redis.

Not built yet: this entry point only explains itself until the checkpointer issue lands.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ops import placeholder

PURPOSE = ("tcpcp checkpointer: runs as a sidecar next to a server, checkpoints the kernel state "
           "(ICI) of every guarded TCP connection with the application's state into Redis, and "
           "holds ACKs until the application commits.")


def main(argv: Sequence[str] | None = None) -> int:
    return placeholder.run("checkpointer", PURPOSE, argv)


if __name__ == "__main__":
    sys.exit(main())
