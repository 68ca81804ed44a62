"""The kernel package's exception hierarchy: every error kernel/ raises derives from KernelError."""

from __future__ import annotations


class KernelError(Exception):
    """Base of every error raised by tcpcp's kernel layer."""
