"""Handing resurrected connections to the standby application over a unix socket: one frame per
connection, its descriptor attached (SCM_RIGHTS). Both ends: the resurrector serves
(HandoverServer), the application adopts (resurrector/adopt.py).

    frame = magic "TCPH" | version u8 (1) | header u32 len + JSON | state u32 len + bytes
    header = {"conn": "10.0.0.1:80>10.0.0.9:5555", "origin": ..., "epoch": ..., "consumed": n,
              "produced": n, "skip": n, "contract": "regenerable" | "logged"}

consumed: the inbound stream position the restored socket reads on from (the checkpoint's);
produced: the outbound position its next written byte has; skip: for a regenerable application,
bytes of output the peer already has beyond the checkpoint (write from produced on, which
already counts them). Bounded: a header of at most MAX_HEADER bytes, a state of at most
MAX_STATE; anything else is refused by the reader with HandoverError naming what was expected.

The server checks each adopter's SO_PEERCRED against the allowed uids/gids, then hands it every
connection waiting and every later one; a connection whose hand-over fails (the adopter went
away) waits for the next adopter. Nothing is handed over twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import stat
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(component="tcpcp.resurrector.handover")

MAGIC = b"TCPH"
VERSION = 1
MAX_HEADER = 64 << 10
MAX_STATE = 1 << 20
HEAD = struct.Struct("!4sBI")
LEN = struct.Struct("!I")
_UCRED = struct.Struct("iII")


class HandoverError(ValueError):
    """A hand-over frame that does not fit, or a refused adopter."""


@dataclass(frozen=True, slots=True)
class Handed:
    """One connection as it is handed over (the socket travels beside it)."""

    conn: str
    origin: str
    epoch: int
    consumed: int
    produced: int
    skip: int
    contract: str
    state: bytes

    def header(self) -> dict[str, Any]:
        return {"conn": self.conn, "origin": self.origin, "epoch": self.epoch,
                "consumed": self.consumed, "produced": self.produced, "skip": self.skip,
                "contract": self.contract}


def encode(h: Handed) -> bytes:
    head = json.dumps(h.header(), sort_keys=True).encode()
    if len(head) > MAX_HEADER or len(h.state) > MAX_STATE:
        raise HandoverError(f"expected a header of at most {MAX_HEADER} and a state of at most "
                            f"{MAX_STATE} bytes, got {len(head)} and {len(h.state)}")
    return HEAD.pack(MAGIC, VERSION, len(head)) + head + LEN.pack(len(h.state)) + h.state


def decode_header(head: bytes) -> int:
    """The header's length, from the frame's first HEAD.size bytes."""
    magic, version, n = HEAD.unpack(head)
    if magic != MAGIC:
        raise HandoverError(f"expected magic {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise HandoverError(f"expected hand-over version {VERSION}, got {version}")
    if n > MAX_HEADER:
        raise HandoverError(f"expected a header of at most {MAX_HEADER} bytes, got {n}")
    return int(n)


def parse_header(raw: bytes, state: bytes) -> Handed:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise HandoverError(f"expected a JSON header, got {exc}") from None
    want = {"conn": str, "origin": str, "epoch": int, "consumed": int, "produced": int,
            "skip": int, "contract": str}
    if not isinstance(doc, dict) or set(doc) != set(want):
        raise HandoverError(f"expected a header with {sorted(want)}, got "
                            f"{sorted(doc) if isinstance(doc, dict) else type(doc).__name__}")
    for key, kind in want.items():
        if not isinstance(doc[key], kind) or isinstance(doc[key], bool) or \
                (kind is int and doc[key] < 0):
            what = "a non-negative integer" if kind is int else "a string"
            raise HandoverError(f"header {key}: expected {what}, got {doc[key]!r}")
    if doc["contract"] not in ("regenerable", "logged"):
        raise HandoverError(f"header contract: expected regenerable or logged, got "
                            f"{doc['contract']!r}")
    return Handed(state=state, **doc)


class HandoverServer:
    """The resurrector's end: queues resurrected connections and hands each to one adopter."""

    def __init__(self, path: Path, *, uids: Iterable[int] = (0,), gids: Iterable[int] = ()
                 ) -> None:
        self.path = path
        self.uids, self.gids = frozenset(uids), frozenset(gids)
        self._waiting: queue.Queue[tuple[Handed, socket.socket]] = queue.Queue()
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self.handed = 0

    def start(self) -> HandoverServer:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(self.path))
        os.chmod(self.path, 0o666)
        srv.listen(16)
        srv.settimeout(0.5)
        self._server = srv
        threading.Thread(target=self._accept, daemon=True, name="handover-accept").start()
        return self

    def offer(self, handed: Handed, sock: socket.socket) -> None:
        """Queue a connection for the next adopter (the server owns sock from now on)."""
        self._waiting.put((handed, sock))

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True,
                             name="handover-adopter").start()

    def _serve(self, client: socket.socket) -> None:
        pid, uid, gid = _UCRED.unpack(client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        _UCRED.size))
        if uid not in self.uids and gid not in self.gids:
            log.warning("adopter_refused", pid=pid, uid=uid, gid=gid)
            client.close()
            return
        log.info("adopter_connected", pid=pid, uid=uid)
        client.settimeout(5)
        try:
            while not self._stop.is_set():
                try:
                    handed, sock = self._waiting.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    frame = encode(handed)
                    sent = socket.send_fds(client, [frame], [sock.fileno()])
                    if sent < len(frame):
                        client.sendall(frame[sent:])
                except OSError as exc:
                    log.warning("handover_failed", conn=handed.conn, error=str(exc))
                    self._waiting.put((handed, sock))  # for the next adopter
                    return
                sock.close()  # the adopter has its own descriptor now
                self.handed += 1
                log.info("connection_handed_over", conn=handed.conn, pid=pid)
        finally:
            client.close()
