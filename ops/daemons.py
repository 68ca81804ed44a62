"""The two daemons' command lines: configuration errors reported, logs configured (ops/logs.py),
SIGTERM/SIGINT turned into a clean stop. The daemons themselves are checkpointer/daemon.py and
resurrector/daemon.py; `checkpointer` and `resurrector` (pyproject's scripts) land here."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

import structlog

from checkpointer import config as checkpointer_config
from checkpointer import daemon as checkpointer_daemon
from ops import logs
from resurrector import daemon as resurrector_daemon
from store.errors import StoreError

log = structlog.get_logger(component="tcpcp.ops.daemons")


def checkpointer(argv: Sequence[str] | None = None) -> int:
    try:
        config = checkpointer_config.load_config(argv, os.environ)
    except checkpointer_config.ConfigError as exc:
        print(f"checkpointer: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_format, config.log_level)
    try:
        return checkpointer_daemon.run(config)
    except (OSError, StoreError) as exc:
        log.error("checkpointer_failed", error=str(exc))
        return 1


def resurrector(argv: Sequence[str] | None = None) -> int:
    args = resurrector_daemon.load(argv, os.environ)
    logs.configure(args.log_format, args.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        return resurrector_daemon.run(args, stop)
    except (OSError, StoreError) as exc:
        log.error("resurrector_failed", error=str(exc))
        return 1
