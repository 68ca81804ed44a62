"""`checkpointer`: the sidecar agent that checkpoints guarded connections into Redis and holds
their ACKs until the application commits (checkpointer/daemon.py; `checkpointer --help`)."""

from __future__ import annotations

import sys

from checkpointer.daemon import main

if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main"]
