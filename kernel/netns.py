"""Enter a named network namespace (/var/run/netns/NAME, as `ip netns` makes them) from the
current thread with setns(2): sockets the thread creates inside stay in that namespace.

    with entered("lab-origin"):
        sock = socket.socket(...)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at fd."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"expected setns into a network namespace, got {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """The current thread runs inside namespace name until the block ends (None: stay)."""
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path(name), os.O_RDONLY)
        try:
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)
