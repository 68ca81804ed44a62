"""`checkpointer`: the sidecar agent that checkpoints guarded connections into Redis.

Not built yet: this entry point only explains itself until the checkpointer issue lands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PLACEHOLDER = ("checkpointer is not implemented yet: this command is a placeholder that prints "
               "its help. The kernel (ICI, ACK gate) and store parts are being built first.")


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="checkpointer",
        description="tcpcp checkpointer: runs as a sidecar next to a server, checkpoints the "
        "kernel state (ICI) of every guarded TCP connection with the application's state into "
        "Redis, and holds ACKs until the application commits. " + PLACEHOLDER)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    print("\n" + PLACEHOLDER, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
