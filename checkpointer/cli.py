"""`checkpointer`: the sidecar agent that checkpoints guarded connections into Redis.

Not built yet: this entry point only explains itself until the checkpointer issue lands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PURPOSE = ("tcpcp checkpointer: runs as a sidecar next to a server, checkpoints the kernel state "
           "(ICI) of every guarded TCP connection with the application's state into Redis, and "
           "holds ACKs until the application commits.")


NOTE = ("checkpointer is not implemented yet: this command is a placeholder that prints its "
        "help. "
        "The kernel (ICI, ACK gate, passing) and store parts are built; this one is next.")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the help (what it will do), say it is a placeholder, exit 2."""
    parser = argparse.ArgumentParser(prog="checkpointer", description=f"{PURPOSE} {NOTE}")
    parser.parse_args(argv)
    parser.print_help()
    print("\n" + NOTE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
