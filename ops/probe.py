"""Small reachability helpers for the lab: TCP listeners that say which host answered.

Used by the lab's own tests, by `tcpcp lab status --reach` and by the demo.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading

from ops import netns
from ops.lab import Lab


class NameServer:
    """A TCP listener in a lab host (IPv4 and IPv6) that answers every connection with its
    host name, then closes. Runs in threads of the calling process."""

    def __init__(self, lab: Lab, host: str, port: int) -> None:
        self.lab, self.host, self.port = lab, host, port
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()

    def __enter__(self) -> NameServer:
        for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = self.lab.call(self.host, _listener, family, any_addr, self.port)
            self._socks.append(s)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()
        return self

    def _serve(self, s: socket.socket) -> None:
        s.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except (TimeoutError, OSError):
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(self.host.encode())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for s in self._socks:
            s.close()


def _listener(family: int, address: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((address, port))
    s.listen(64)
    return s


UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
"""The errors that mean "nothing answers there": refused (no listener), no route or no neighbour.
A timeout means the same (packets dropped on the way). Any other error is a fault of the test or
the lab and is raised."""


def ask_name(address: str, port: int, timeout: float = 2.0) -> str | None:
    """Connect from the calling thread's namespace; the answering host's name, or None when
    nothing answers (refused, unreachable, timed out)."""
    netns.assert_inside_lab()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((address, port))
        except TimeoutError:
            return None
        except OSError as exc:
            if exc.errno in UNREACHABLE_ERRNOS:
                return None
            raise
        data = b""
        while chunk := s.recv(64):
            data += chunk
        return data.decode()  # empty: something answered that is no NameServer


def reachable(lab: Lab, src: str, address: str, port: int, timeout: float = 5.0) -> str | None:
    """Which host answers `address:port` as seen from lab host `src` (None: unreachable).
    timeout bounds a connection that gets no answer at all: a check expecting silence (a
    partition) passes a short one; the default leaves a loaded machine time to answer."""
    return lab.call(src, ask_name, address, port, timeout)


# ---------------------------------------------------------------------- captures
# The capture is ops.capture.Capture: Capture.in_lab(lab, host, interface, bpf_filter) and its
# segments(). What follows keeps the old names (ops/demo.py) working on top of it.

_FLAG_LETTERS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "."), (0x20, "U"),
                 (0x40, "E"), (0x80, "W"))
