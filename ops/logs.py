"""structlog configuration, done once per process by every tcpcp entry point.

JSON lines when stderr is not a terminal (or when asked), readable console output otherwise.
Environment: TCPCP_LOG_FORMAT=json|console|auto, TCPCP_LOG_LEVEL=debug|info|warning|error.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(fmt: str | None = None, level: str | None = None) -> None:
    """Configure structlog for this process; later calls replace the earlier setting."""
    fmt = (fmt or os.environ.get("TCPCP_LOG_FORMAT") or "auto").lower()
    level_name = (level or os.environ.get("TCPCP_LOG_LEVEL") or "info").lower()
    if level_name not in _LEVELS:
        raise ValueError(f"log level must be one of {sorted(_LEVELS)}, got {level_name!r}")
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format must be auto, json or console, got {fmt!r}")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level_name]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_: object) -> structlog.PrintLogger:
    """A logger writing to whatever sys.stderr is when the line is logged (not when logging was
    configured): a stream replaced and closed meanwhile (a test's captured stderr) is never
    written to."""
    return structlog.PrintLogger(sys.stderr)

