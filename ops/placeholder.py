"""Entry points of parts not built yet: they explain what they will do and say so plainly."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def run(prog: str, purpose: str, argv: Sequence[str] | None = None) -> int:
    """Print `prog`'s help (what it will do), say it is a placeholder, exit 2."""
    note = (f"{prog} is not implemented yet: this command is a placeholder that prints its help. "
            "The kernel (ICI, ACK gate) and store parts are built; this one is next.")
    parser = argparse.ArgumentParser(prog=prog, description=f"{purpose} {note}")
    parser.parse_args(argv)
    parser.print_help()
    print("\n" + note, file=sys.stderr)
    return 2
