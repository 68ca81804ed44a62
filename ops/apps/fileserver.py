"""An HTTP/1.1 file server over one directory (ops/apps/httpwire.py on the wire), its
connections guarded by the checkpointer agent with the REGENERABLE outbound contract: what it
writes is a function of the state it committed, so a standby regenerates from any position.

    python -m ops.apps.fileserver --listen 127.0.0.1:8080 --root /srv/files \\
        --checkpointer /run/tcpcp/checkpointer.sock
    python -m ops.apps.fileserver --listen 127.0.0.1:8080 --root /srv/files --no-checkpointer
    curl -T big.bin http://127.0.0.1:8080/;  curl -o copy.bin http://127.0.0.1:8080/big.bin

GET and HEAD /<name> serve a regular file of --root (Range: bytes=N-, N-M and -S give 206; one
range only, others are ignored). PUT /<name> stores an upload of Content-Length bytes
(`Expect: 100-continue`, as curl -T sends it, is answered first; chunked uploads get 411) into a
partial file `.tcpcp-<token>.partial` of --root, renamed into place once complete; 201. Names are
one path segment without a leading dot. Requests follow one another on a kept-alive connection.

Commits (stream positions: consumed = request bytes used, produced = bytes written):
- a request head parsed: consumed moves past it, the state describes the response about to be
  written at `at` = produced;
- GET: after each MiB written (socket.sendfile) and at the end, state offset updated;
- PUT: after each piece of the body read, written and flushed (fsynced with --fsync) to the
  partial file, consumed moves past it and the state's received with it; once complete, one
  more commit (stored: true) before the rename and the 201.

The state is JSON (keys sorted, no blanks). Every state has method (null before the first
request), path (the request target), at (the stream position of the response's first byte),
head (the bytes written from `at` on before any file content: a response head, or a whole small
response, as a latin-1 string) and close (the server closes after it). A GET or HEAD adds file
(the name in --root), size and mtime_ns (the file as served), first and length (the file
bytes that follow the head) and offset (the file offset of the byte at the commit's produced
position). A PUT adds file, partial, body_at (the inbound position of the body's first byte),
length, received (bytes of the body in the partial file) and stored.

How a standby maps the peer's position back to content: the resurrector learns P, the outbound
position the peer has received up to (P >= the checkpoint's produced), and the checkpoint's
state. With h = at + len(head):
- P < h: write head[P - at:], then the file from offset `first`;
- P >= h (GET): write the file from offset first + (P - h), which is offset + (P - produced),
  up to first + length; the file must still have that size and mtime_ns (--root on storage the
  standby shares, or a copy of it), else it closes the connection;
- PUT, stored false: truncate `partial` to `received` (bytes written after the commit are
  re-sent by the peer, whose ACKs were held), write what the peer lacks of the 100 Continue,
  and go on reading at body_at + received = consumed (the partial file must be on storage the
  standby shares); stored true: rename `partial` into place if it is still there, then answer
  as above.
An idle connection's state is its last response's; P at its end means nothing is left to write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import stat
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog

from checkpointer.api import Contract
from checkpointer.client import Checkpointer
from ops import logs
from ops.apps import httpwire
from ops.apps.httpwire import HttpError, Request, file_name, parse_head, parse_range
from ops.apps.kvserver import Server, ServerConnection, add_server_arguments, run
from resurrector.adopt import Adopted, adopt

log = structlog.get_logger(component="tcpcp.ops.apps.fileserver")

COMMIT_EVERY = 1 << 20
"""A GET commits after at most this many bytes written."""
DEFAULT_MAX_UPLOAD = 1 << 30


class FileServer(Server):
    """The directory served; one FileConnection per client."""

    def __init__(self, listener: socket.socket, checkpointer: Checkpointer | None, root: Path, *,
                 fsync: bool = False, max_upload: int = DEFAULT_MAX_UPLOAD,
                 max_connections: int = 1024) -> None:
        super().__init__(listener, checkpointer, max_connections=max_connections, logger=log)
        self.root, self.fsync, self.max_upload = root, fsync, max_upload

    def connection(self, sock: socket.socket, conn_id: int) -> FileConnection:
        return FileConnection(self, sock, conn_id)


class FileConnection(ServerConnection):
    """One client: requests one after another, each answered in full before the next is read."""

    contract = Contract.REGENERABLE
    server: FileServer

    def __init__(self, server: FileServer, sock: socket.socket, conn_id: int) -> None:
        super().__init__(server, sock, conn_id)
        self.buf = bytearray()
        """Bytes read and not used yet: the stream from `used` on."""
        self.current: dict[str, Any] = {"method": None, "path": None, "at": 0, "head": "",
                                        "close": False}

    @property
    def used(self) -> int:
        """The inbound position of the first byte not used yet."""
        return self.received - len(self.buf)

    def state(self) -> bytes:
        return json.dumps(self.current, sort_keys=True, separators=(",", ":")).encode()

    def commit(self, consumed: int) -> None:
        g = self.guarded
        if g is not None:
            g.commit(self.state(), consumed=consumed, produced=self.produced)

    # -------------------------------------------------------------- a standby's resume
    adopted: Adopted | None = None

    def _resume(self, a: Adopted) -> bool:
        """Go on with the response a resurrected connection was in (see the module docstring:
        the peer is at a.produced); False when it cannot be regenerated (closed)."""
        self.current = json.loads(a.state)
        self.received, self.produced = a.consumed, a.produced
        c = self.current
        if c.get("method") == "PUT" and not c.get("stored"):
            return self._resume_upload()
        if c.get("method") == "PUT":  # stored: the partial file was renamed (or is still to be)
            partial = self.server.root / c["partial"]
            if partial.exists():
                with _storing(f"rename the upload to {c['file']!r}"):
                    os.replace(partial, self.server.root / c["file"])
            head = c["head"].encode("latin-1")
            if self.produced < c["at"] + len(head):
                self.send(head[self.produced - c["at"]:])
            return self._kept()
        if c.get("method") not in ("GET", "HEAD") or "file" not in c:
            return True  # between requests: read the next one
        head = c["head"].encode("latin-1")
        at, first, length = c["at"], c["first"], c["length"]
        h = at + len(head)
        if self.produced < h:
            self.send(head[self.produced - at:])
        done = self.produced - h
        path = self.server.root / c["file"]
        try:
            f = open(path, "rb")  # noqa: SIM115  (closed below)
        except OSError:
            self.abort("file_gone")
            return False
        with f:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != (c["size"], c["mtime_ns"]):
                self.log.warning("resume_refused", reason="the file changed", file=c["file"])
                self.abort("file_changed")
                return False
            while done < length:
                n = self.sock.sendfile(f, first + done, min(COMMIT_EVERY, length - done))
                if n == 0:
                    self.abort("file_changed")
                    return False
                self.produced += n
                done += n
        self.log.info("response_resumed", file=c["file"], from_offset=first + a.produced - h
                      if a.produced >= h else first, sent=done)
        if c.get("close"):
            self.end("closed_after_response")
            return False
        return True

    # -------------------------------------------------------------- requests
    def serve(self) -> None:
        if self.adopted is not None and not self._resume(self.adopted):
            return
        while True:
            request = self._read_head()
            if request is None:
                return
            close = not request.keep_alive
            try:
                if request.method in ("GET", "HEAD") and not _has_body(request):
                    keep = self._get(request, close)
                elif request.method in ("GET", "HEAD"):
                    raise HttpError(400, f"expected a {request.method} without a body, got one")
                elif request.method == "PUT":
                    keep = self._put(request, close)
                else:
                    raise HttpError(405, f"expected GET, HEAD or PUT, got {request.method}",
                                    (("Allow", "GET, HEAD, PUT"),))
            except HttpError as exc:
                keep = self._refuse(request, exc)
            if keep is None:
                return
            if not keep or self.server.stopping.is_set():
                self.end("closed_after_response")
                return

    def _read_head(self) -> Request | None:
        """The next request head, moved out of buf; None when the connection is over."""
        while True:
            try:
                got = parse_head(self.buf)
            except HttpError as exc:
                self.log.info("bad_request", status=exc.status, error=str(exc))
                self._refuse(None, exc)
                self.end("bad_request")
                return None
            if got is not None:
                request, length = got
                del self.buf[:length]
                return request
            data = self.recv()
            if data is None:
                self.abort("server_stopping")
                return None
            if not data:
                self.peer_closed()
                return None
            self.buf += data

    def _respond(self, request: Request | None, response: bytes, consumed: int, close: bool,
                 **fields: Any) -> None:
        """Commit, then write, a response held in memory."""
        self.current = {"method": request.method if request else None,
                        "path": request.target if request else None, "at": self.produced,
                        "head": response.decode("latin-1"), "close": close, **fields}
        self.commit(consumed)
        self.send(response)

    def _refuse(self, request: Request | None, exc: HttpError) -> bool:
        """Answer an error. A bad head, or a request whose body was not read, ends the
        connection: everything read so far counts as consumed (it is dropped)."""
        close = request is None or _has_body(request) or not request.keep_alive
        body = f"{exc}\n".encode()
        self._respond(request, httpwire.simple_response(exc.status, body, close=close,
                                                        headers=exc.headers),
                      self.received if close else self.used, close)
        if close:
            self.buf.clear()
        return not close

    # -------------------------------------------------------------- GET, HEAD
    def _stat(self, request: Request) -> tuple[str, os.stat_result]:
        name = file_name(request.target)
        try:
            st = os.stat(self.server.root / name, follow_symlinks=False)
        except OSError:
            raise HttpError(404, f"expected a file {name!r} in the served directory, got "
                            f"none") from None
        if not stat.S_ISREG(st.st_mode):
            raise HttpError(404, f"expected a regular file {name!r}, got another kind")
        return name, st

    def _get(self, request: Request, close: bool) -> bool | None:
        name, _ = self._stat(request)
        try:
            fd = os.open(self.server.root / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise HttpError(404, f"expected a readable file {name!r}, got none") from None
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise HttpError(404, f"expected a regular file {name!r}, got another kind")
            size = st.st_size
            value = request.header("range")
            got = parse_range(value, size) if value is not None else None
            first, end = got or (0, size)
            fields = [("Content-Type", "application/octet-stream"),
                      ("Content-Length", str(end - first)), ("Accept-Ranges", "bytes")]
            if got is not None:
                fields.append(("Content-Range", f"bytes {first}-{end - 1}/{size}"))
            if close:
                fields.append(("Connection", "close"))
            head = httpwire.response_head(206 if got else 200, fields)
            length = 0 if request.method == "HEAD" else end - first
            self.current = {"method": request.method, "path": request.target, "file": name,
                            "at": self.produced, "head": head.decode("latin-1"),
                            "first": first, "length": length, "offset": first, "size": size,
                            "mtime_ns": st.st_mtime_ns, "close": close}
            self.commit(self.used)
            self.send(head)
            sent = 0
            while sent < length:
                if self.server.stopping.is_set():
                    self.abort("server_stopping")
                    return None
                n = self.sock.sendfile(f, first + sent, min(COMMIT_EVERY, length - sent))
                self.produced += n
                sent += n
                if n == 0:
                    self.log.warning("file_shrank", file=name, expected=length, sent=sent)
                    self.abort("file_changed")
                    return None
                self.current["offset"] = first + sent
                self.commit(self.used)
            if length == 0:
                self.commit(self.used)
        return not close

    # -------------------------------------------------------------- PUT
    def _put(self, request: Request, close: bool) -> bool | None:
        name = file_name(request.target)
        if request.header("transfer-encoding") is not None:
            raise HttpError(411, "expected a Content-Length, got a Transfer-Encoding (chunked "
                            "uploads are not supported)")
        length = request.content_length
        if length is None:
            raise HttpError(411, "expected a Content-Length, got none")
        if length > self.server.max_upload:
            raise HttpError(413, f"expected an upload of at most {self.server.max_upload} "
                            f"bytes, got a Content-Length of {length}")
        expect = request.tokens("expect")
        if expect and expect != ["100-continue"]:
            raise HttpError(417, f"expected no Expect or 100-continue, got {expect}")
        target = self.server.root / name
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.stat(target, follow_symlinks=False).st_mode):
                raise HttpError(409, f"expected {name!r} to be a regular file or absent, got "
                                f"another kind")
        partial = f".tcpcp-{secrets.token_hex(8)}.partial"
        path = self.server.root / partial
        with _storing("create a partial file"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644)
        stored = False
        try:
            with open(fd, "wb") as f:
                keep = self._receive(request, close, name, partial, length, f)
            if keep is not None:
                with _storing(f"rename the upload to {name!r}"):
                    os.replace(path, target)
                stored = True
                self.send(self.current["head"].encode("latin-1"))
            return keep
        finally:
            if not stored:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _receive(self, request: Request, close: bool, name: str, partial: str, length: int,
                 f: Any) -> bool | None:
        """The body into f, committed piece by piece, then the 201 committed (the caller
        renames and writes it); None if the connection ended first."""
        proceed = httpwire.CONTINUE if request.expect_continue and length else b""
        self.current = {"method": "PUT", "path": request.target, "file": name,
                        "partial": partial, "body_at": self.used, "length": length,
                        "received": 0, "at": self.produced, "head": proceed.decode("latin-1"),
                        "close": close, "stored": False}
        self.commit(self.used)
        if proceed:
            self.send(proceed)
        return self._body(f)

    def _body(self, f: Any) -> bool | None:
        """The rest of the upload self.current describes (from its `received` on) into f, each
        piece committed, then the 201 committed; None if the connection ended first."""
        c = self.current
        name, length, received = c["file"], c["length"], c["received"]
        while received < length:
            if not self.buf:
                data = self.recv()
                if data is None:
                    self.abort("server_stopping")
                    return None
                if not data:
                    self.log.info("upload_cut_short", file=name, expected=length,
                                  received=received)
                    self.peer_closed()
                    return None
                self.buf += data
            piece = bytes(self.buf[:length - received])
            with _storing("write the upload"):
                f.write(piece)
                f.flush()
                if self.server.fsync:
                    os.fsync(f.fileno())
            del self.buf[:len(piece)]
            received += len(piece)
            c["received"] = received
            self.commit(self.used)
        body = f"stored {c['path']}: {length} bytes\n".encode()
        response = httpwire.simple_response(
            201, body, close=c["close"], headers=[("Location", c["path"].split("?", 1)[0])])
        c.update(at=self.produced, head=response.decode("latin-1"), stored=True)
        self.commit(self.used)
        return not c["close"]

    def _kept(self) -> bool:
        """After a resumed response: go on reading requests, unless it closes the connection."""
        if self.current.get("close"):
            self.end("closed_after_response")
            return False
        return True

    def _resume_upload(self) -> bool:
        """Go on with an upload a resurrected connection was in: the partial file cut back to
        what the checkpoint says was received (later bytes were never acknowledged: the peer
        sends them again), the rest read from the socket, then stored and answered as on the
        origin. False when it cannot go on (closed)."""
        c = self.current
        head = c["head"].encode("latin-1")
        if self.produced < c["at"] + len(head):  # the peer lacks (part of) the 100 Continue
            self.send(head[self.produced - c["at"]:])
        path = self.server.root / c["partial"]
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            self.log.warning("resume_refused", reason=f"the partial upload is gone: {exc}",
                             file=c["file"])
            self.abort("partial_gone")
            return False
        stored = False
        try:
            with open(fd, "wb") as f:
                f.truncate(c["received"])
                f.seek(c["received"])
                self.log.info("upload_resumed", file=c["file"], from_offset=c["received"],
                              length=c["length"])
                keep = self._body(f)
            if keep is None:
                return False
            with _storing(f"rename the upload to {c['file']!r}"):
                os.replace(path, self.server.root / c["file"])
            stored = True
            self.send(c["head"].encode("latin-1"))
            return self._kept()
        except HttpError as exc:
            return self._refuse(None, exc)
        finally:
            if not stored:
                with contextlib.suppress(OSError):
                    os.unlink(path)


@contextlib.contextmanager
def _storing(what: str) -> Iterator[None]:
    """File-system errors while storing an upload become a 500 for the client."""
    try:
        yield
    except OSError as exc:
        log.warning("store_failed", action=what, error=str(exc))
        raise HttpError(500, f"expected to {what}, got {exc.strerror or exc}") from None


def _has_body(request: Request) -> bool:
    return bool(request.content_length) or request.header("transfer-encoding") is not None


# ------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ops.apps.fileserver",
        description="An HTTP/1.1 file server over one directory: GET/HEAD /<name> (with "
        "Range: bytes=N-), PUT /<name> (what curl -T sends, Expect: 100-continue included), "
        "keep-alive. Its connections are guarded by the tcpcp checkpointer agent with "
        "regenerable output: the committed state maps stream positions to file offsets (see "
        "the module's docstring). Logs: TCPCP_LOG_FORMAT=json|console, TCPCP_LOG_LEVEL.",
        epilog="Exit status: 0 after SIGTERM or SIGINT, 1 when the agent went away, 2 when it "
        "cannot be reached at start or the address cannot be listened on.")
    add_server_arguments(parser, "fileserver")
    parser.add_argument("--root", type=Path, required=True, metavar="DIR",
                        help="the directory served and written (uploads land in partial files "
                        ".tcpcp-*.partial there first)")
    parser.add_argument("--fsync", action="store_true",
                        help="fsync each piece of an upload before committing it (default: "
                        "written and flushed only)")
    parser.add_argument("--max-upload", type=int, default=DEFAULT_MAX_UPLOAD, metavar="BYTES",
                        help=f"largest upload accepted (default {DEFAULT_MAX_UPLOAD})")
    parser.add_argument("--adopt", metavar="HANDOVER_SOCKET",
                        help="instead of listening: the standby's side, go on with every "
                        "connection the resurrector hands over on this socket (responses "
                        "regenerated from the committed state, uploads in progress continued "
                        "in their partial files; then served unguarded)")
    return parser


def adopt_all(handover: str, root: Path) -> int:
    """The standby's side: go on with every connection the resurrector hands over (unguarded:
    this example has no checkpointer of its own on the standby), until it closes."""
    logs.configure()
    # the accept loop is never run: an unbound socket stands for the listener
    server = FileServer(socket.socket(), None, root)
    log.info("adopting", handover=handover)
    for n, a in enumerate(adopt(handover)):
        conn = server.connection(a.sock, n)
        conn.adopted = a
        log.info("adopted", conn=a.conn, consumed=a.consumed, produced=a.produced)
        threading.Thread(target=conn.run, daemon=True, name=f"adopted-{n}").start()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root: expected a directory, got {str(args.root)!r}")
    if args.adopt:
        return adopt_all(args.adopt, args.root.resolve())
    return run(args, Contract.REGENERABLE, lambda listener, cp: FileServer(
        listener, cp, args.root.resolve(), fsync=args.fsync, max_upload=args.max_upload,
        max_connections=args.max_connections), log)


if __name__ == "__main__":
    sys.exit(main())
