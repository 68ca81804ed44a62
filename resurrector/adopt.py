"""The standby application's side of a fail-over: adopt the connections the resurrector
restored, each with its application state and stream positions (resurrector/handover.py).

    for conn in adopt("/run/tcpcp/handover.sock"):       # blocks for the next connection
        conn.sock, conn.state, conn.consumed, conn.produced, conn.skip
        ...resume the application's work on conn.sock...

    async for conn in adopt_async(path): ...             # the same, for asyncio
    for conn in inherited(): ...                          # started by `resurrector --exec`

consumed: the inbound position the socket reads on from; produced: the outbound position of
the next byte it writes (a regenerable application writes its content from there); skip: what
the peer already had beyond the checkpoint (informational: produced counts it). A frame that
does not fit raises HandoverError naming what was expected, its descriptor closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from resurrector.handover import (
    HEAD,
    LEN,
    MAX_STATE,
    HandoverError,
    decode_header,
    parse_header,
)
from resurrector.listenfds import FIRST_FD, FRAMES_ENV

DEFAULT_HANDOVER = Path("/run/tcpcp/handover.sock")


@dataclass(frozen=True, slots=True)
class Adopted:
    sock: socket.socket
    conn: str
    origin: str
    epoch: int
    consumed: int
    produced: int
    skip: int
    contract: str
    state: bytes


def _recv_exact(s: socket.socket, n: int, fds: list[int]) -> bytes:
    data = b""
    while len(data) < n:
        chunk, got, _, _ = socket.recv_fds(s, n - len(data), 4)
        if not chunk:
            raise EOFError(f"the resurrector closed the hand-over after {len(data)} of {n} "
                           "bytes")
        fds += got
        data += chunk
    return data


def receive(s: socket.socket) -> Adopted | None:
    """The next handed-over connection; None when the resurrector closed between frames."""
    fds: list[int] = []
    try:
        first, got, _, _ = socket.recv_fds(s, HEAD.size, 4)
        if not first:
            return None
        fds += got
        head = first + _recv_exact(s, HEAD.size - len(first), fds)
        raw = _recv_exact(s, decode_header(head), fds)
        (n,) = LEN.unpack(_recv_exact(s, LEN.size, fds))
        if n > MAX_STATE:
            raise HandoverError(f"expected a state of at most {MAX_STATE} bytes, got {n}")
        handed = parse_header(raw, _recv_exact(s, n, fds))
        if len(fds) != 1:
            raise HandoverError(f"expected 1 descriptor with the frame, got {len(fds)}")
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    sock = socket.socket(fileno=fds[0])
    return Adopted(sock, handed.conn, handed.origin, handed.epoch, handed.consumed,
                   handed.produced, handed.skip, handed.contract, handed.state)


def adopt(path: str | Path = DEFAULT_HANDOVER) -> Iterator[Adopted]:
    """Every connection the resurrector hands over, as they come (until it closes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        while (got := receive(s)) is not None:
            yield got


def inherited(environ: dict[str, str] | None = None) -> list[Adopted]:
    """The connections a resurrector started this process with (`resurrector --exec`, the
    systemd LISTEN_FDS convention: resurrector/listenfds.py); [] when it was not. The
    variables are removed, as sd_listen_fds(1) does, so a child does not take them for its own.
    HandoverError names what was expected when they do not fit."""
    env = os.environ if environ is None else environ
    if "LISTEN_FDS" not in env:
        return []
    try:
        pid, count = int(env["LISTEN_PID"]), int(env["LISTEN_FDS"])
        frames_fd = int(env[FRAMES_ENV])
    except (KeyError, ValueError) as exc:
        raise HandoverError(f"expected LISTEN_PID, LISTEN_FDS and {FRAMES_ENV} as integers, "
                            f"got {exc}") from None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", FRAMES_ENV):
        env.pop(name, None)
    if pid != os.getpid():
        raise HandoverError(f"expected LISTEN_PID {os.getpid()} (this process), got {pid}")
    if not 0 <= count <= 1 << 20 or frames_fd != FIRST_FD + count:
        raise HandoverError(f"expected {FRAMES_ENV} = {FIRST_FD} + LISTEN_FDS, got "
                            f"{frames_fd} with LISTEN_FDS {count}")
    out: list[Adopted] = []
    with open(frames_fd, "rb", closefd=True) as frames:
        for i in range(count):
            fd = FIRST_FD + i
            sock = socket.socket(fileno=fd)
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                       socket.AF_INET6):
                sock.detach()
                raise HandoverError(f"expected a TCP socket on descriptor {fd}, got "
                                    f"{sock.family.name} {sock.type.name}")
            head = frames.read(HEAD.size)
            if len(head) != HEAD.size:
                raise HandoverError(f"expected {count} hand-over frames on {FRAMES_ENV}, "
                                    f"got {i}")
            raw = frames.read(decode_header(head))
            size = frames.read(LEN.size)
            if len(size) != LEN.size:
                raise HandoverError(f"expected {count} whole hand-over frames on "
                                    f"{FRAMES_ENV}, frame {i} is cut short")
            (n,) = LEN.unpack(size)
            if n > MAX_STATE:
                raise HandoverError(f"expected a state of at most {MAX_STATE} bytes, got {n}")
            handed = parse_header(raw, frames.read(n))
            out.append(Adopted(sock, handed.conn, handed.origin, handed.epoch, handed.consumed,
                               handed.produced, handed.skip, handed.contract, handed.state))
    return out


async def adopt_async(path: str | Path = DEFAULT_HANDOVER) -> AsyncIterator[Adopted]:
    """adopt() for asyncio: each receive runs in a worker thread."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await asyncio.to_thread(s.connect, str(path))
        while (got := await asyncio.to_thread(receive, s)) is not None:
            yield got
    finally:
        s.close()
