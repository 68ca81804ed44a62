"""The application library: how a server hands its connections to the checkpointer agent and
commits, sync and asyncio (DESIGN.md sections 4 and 5; the frames are checkpointer/api.py).

    with Checkpointer("/run/tcpcp/checkpointer.sock", name="fileserver") as cp:
        cp.guard_listener(listener)                  # its connections are gated from SYN-ACK
        conn, _ = listener.accept()
        g = cp.guard(conn, contract=Contract.REGENERABLE, state=b"...")
        data = conn.recv(65536)                      # the application consumes ...
        g.commit(b"new state", consumed=g.consumed + len(data), produced=g.produced)
        # ... only now may the kernel acknowledge those bytes; the checkpoint is durable

    async with AsyncCheckpointer(path) as cp:        # the same calls, awaited
        g = await cp.guard(conn, contract=Contract.LOGGED)
        await g.commit(state, consumed=n, produced=g.produced + len(out), outbound=out)
        conn.sendall(out)                            # logged: written only once committed

A commit returns once three things hold: the checkpoint is durable at the agent's configured
level, the gate has moved to `consumed`, and the ACK carrying it has left. It raises
CommitRefused (an ApiError) when the agent refuses it; the connection's positions then stay what
they were.

Outbound contracts (DESIGN.md section 5): REGENERABLE, the state maps stream positions to content
and `produced` is the count written to the socket; LOGGED, each commit carries the outbound bytes
produced since the last one (`outbound`, ending at `produced`), checkpointed before the
application writes them.

One Checkpointer is thread-safe and keeps many requests in flight: the agent groups commits of
many connections into one store round trip, so share one client between the threads of a
server. The asyncio client is the same client, its replies delivered as awaitables.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import structlog

from checkpointer import api, fdpass
from checkpointer.api import ApiError, Contract, Direction, ErrorCode

log = structlog.get_logger(component="tcpcp.checkpointer.client")

DEFAULT_SOCKET = Path("/run/tcpcp/checkpointer.sock")
SOCKET_ENV = "TCPCP_CHECKPOINTER_SOCKET"
R = TypeVar("R")


class CheckpointerUnavailable(ApiError):
    """The agent cannot be reached, or went away with requests in flight."""


def default_socket() -> Path:
    """TCPCP_CHECKPOINTER_SOCKET, else the daemon's default socket path."""
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


@dataclass(slots=True)
class Guarded:
    """A connection the agent guards. consumed/produced: the positions of its last commit."""

    client: Checkpointer
    sock: socket.socket
    id: int
    contract: Contract
    consumed: int
    produced: int
    state: bytes = field(default=b"", repr=False)

    def commit(self, state: bytes, *, consumed: int, produced: int | None = None,
               end_of_stream: bool = False, outbound: bytes | None = None) -> None:
        """Make (state, consumed, produced) the connection's durable checkpoint; see
        Checkpointer.commit.

        When the agent went away (restarted, or killed and restarted) the client connects
        again and registers the connection anew at this commit's positions, which is why
        `consumed` must count every byte read from the socket (keep a partial request in the
        state) and `produced` every byte written: the new registration anchors the stream
        positions on the socket's kernel state."""
        produced = self.produced if produced is None else produced
        try:
            got = self.client.commit(self.id, state, consumed=consumed, produced=produced,
                                     end_of_stream=end_of_stream, outbound=outbound)
        except ApiError as exc:
            if not self.client.recoverable(exc) or end_of_stream:
                raise
            self._register_again(state, consumed, produced, outbound)
            return
        self.consumed, self.produced, self.state = got.consumed, got.produced, state

    def _register_again(self, state: bytes, consumed: int, produced: int,
                        outbound: bytes | None) -> None:
        self.client.reconnect()
        before = produced - len(outbound or b"")
        fresh = self.client.guard(self.sock, contract=self.contract, consumed=consumed,
                                  produced=before, state=state)
        self.id = fresh.id
        self.consumed, self.produced, self.state = consumed, before, state
        if outbound:
            got = self.client.commit(self.id, state, consumed=consumed, produced=produced,
                                     outbound=outbound)
            self.produced = got.produced
        log.info("connection_registered_again", id=self.id, consumed=consumed,
                 produced=produced)

    def end_of_stream(self, direction: Direction, position: int) -> None:
        self.client.end_of_stream(self.id, direction, position)

    def close(self) -> None:
        """Tell the agent the application is done with it (the socket stays the caller's)."""
        self.client.close_connection(self.id)


class Checkpointer:
    """A connection to the agent's local API; thread-safe, many requests in flight."""

    def __init__(self, path: str | Path | None = None, *, name: str = "",
                 timeout_s: float = 10.0, reconnect_s: float = 120.0) -> None:
        """timeout_s: for one request; reconnect_s: how long a commit waits for an agent that
        went away to come back (a restarted agent loads its gate and takes its lease back:
        seconds on a loaded host) before it raises."""
        self.path = Path(path) if path is not None else default_socket()
        self.name = name or f"pid{os.getpid()}"
        self.timeout_s = timeout_s
        self.reconnect_s = reconnect_s
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._pending: dict[int, concurrent.futures.Future[api.Reply]] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._reader: threading.Thread | None = None
        self._closed = threading.Event()
        self._broken: ApiError | None = None
        self._reconnect_lock = threading.Lock()
        self.version = api.VERSION
        self.limits = api.Limits()

    # -------------------------------------------------------------- lifecycle
    def connect(self) -> Checkpointer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout_s)
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise CheckpointerUnavailable(ErrorCode.UNAVAILABLE, f"expected the checkpointer "
                                          f"agent on {self.path}, got {exc.strerror or exc}") \
                from None
        self._sock = sock
        deadline = time.monotonic() + self.timeout_s
        fdpass.send_frame(sock, api.encode(api.Hello(api.SUPPORTED_VERSIONS, self.name[:200]),
                                           0, api.HELLO_VERSION), deadline=deadline)
        got = fdpass.recv_frame(sock, self.limits, version=None, deadline=deadline,
                                expect=api.REPLIES)
        if got is None:
            self.close()
            raise CheckpointerUnavailable(ErrorCode.DISCONNECTED, "expected HELLO_OK, the agent "
                                          "closed the connection")
        reply = api.decode_reply(got.header, got.body, self.limits)
        if isinstance(reply, api.Error):
            self.close()
            raise reply.exception()
        if not isinstance(reply, api.HelloOk):
            self.close()
            raise ApiError(ErrorCode.UNKNOWN_KIND, f"expected HELLO_OK, got "
                           f"{api.kind_of(reply).name}")
        self.version, self.limits = reply.version, reply.limits
        self._reader = threading.Thread(target=self._read_replies, args=(sock, self._closed),
                                        daemon=True, name="tcpcp-client-replies")
        self._reader.start()
        return self

    def recoverable(self, exc: ApiError) -> bool:
        """Whether exc means the agent went away (or forgot this client's ids): a new
        connection and registration can go on."""
        return exc.code in (ErrorCode.DISCONNECTED, ErrorCode.UNKNOWN_CONNECTION,
                            ErrorCode.DEADLINE) or isinstance(exc, CheckpointerUnavailable)

    def reconnect(self, timeout_s: float | None = None) -> None:
        """Connect again after the agent went away, retrying until timeout_s (default: the
        client's reconnect_s). Requests in flight on the old connection have failed already. One
        thread reconnects; the others wait for it and reuse its connection."""
        with self._reconnect_lock:
            if self._sock is not None and self._broken is None:
                return  # another thread reconnected meanwhile
            deadline = time.monotonic() + (timeout_s or self.reconnect_s)
            while True:
                self._drop()
                self._broken = None
                self._closed = threading.Event()
                try:
                    self.connect()
                    log.info("checkpointer_reconnected", path=str(self.path))
                    return
                except ApiError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)

    def _drop(self) -> None:
        self._closed.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2)
        self._reader = None

    def close(self) -> None:
        self._closed.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._fail_all(CheckpointerUnavailable(ErrorCode.DISCONNECTED,
                                               "the client was closed with the request in "
                                               "flight"))

    def __enter__(self) -> Checkpointer:
        return self.connect()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -------------------------------------------------------------- calls
    def guard_listener(self, listener: socket.socket,
                       contract: Contract = Contract.REGENERABLE) -> int:
        """Every connection listener accepts from now on is gated from its SYN-ACK; returns
        the listener's id. Register each accepted connection with guard()."""
        reply = self._call(api.RegisterListener(contract), (listener.fileno(),))
        assert isinstance(reply, api.Registered)
        return reply.conn_id

    def guard(self, sock: socket.socket, *, contract: Contract = Contract.REGENERABLE,
              consumed: int = 0, produced: int = 0, state: bytes = b"") -> Guarded:
        """Hand a connected socket to the agent at these positions: from now on the kernel
        acknowledges only what a commit covers. Call it before reading, or say how much was
        read (consumed) and written (produced); nobody may write the socket during the call."""
        return self.guard_future(sock, contract=contract, consumed=consumed,
                                 produced=produced, state=state).result()

    def guard_future(self, sock: socket.socket, *, contract: Contract = Contract.REGENERABLE,
                     consumed: int = 0, produced: int = 0, state: bytes = b""
                     ) -> concurrent.futures.Future[Guarded]:
        request = api.RegisterConnection(consumed, produced, contract, state)
        done: concurrent.futures.Future[Guarded] = concurrent.futures.Future()

        def registered(reply: api.Reply) -> Guarded:
            assert isinstance(reply, api.Registered)
            return Guarded(self, sock, reply.conn_id, contract, consumed, produced, state)
        _chain(self._send(request, (sock.fileno(),)), done, registered)
        return done

    def commit(self, conn_id: int, state: bytes, *, consumed: int, produced: int,
               end_of_stream: bool = False, outbound: bytes | None = None) -> api.Committed:
        """Make (state, consumed, produced) connection conn_id's durable checkpoint, then move
        its gate to `consumed` (+1 with end_of_stream: the peer's FIN); returns once the ACK has
        left. outbound: with the logged contract, the bytes produced since the last commit."""
        return self.commit_future(conn_id, state, consumed=consumed, produced=produced,
                                  end_of_stream=end_of_stream, outbound=outbound).result()

    def commit_future(self, conn_id: int, state: bytes, *, consumed: int, produced: int,
                      end_of_stream: bool = False, outbound: bytes | None = None
                      ) -> concurrent.futures.Future[api.Committed]:
        request = api.Commit(conn_id, state, consumed, produced, end_of_stream, outbound)
        done: concurrent.futures.Future[api.Committed] = concurrent.futures.Future()

        def committed(reply: api.Reply) -> api.Committed:
            assert isinstance(reply, api.Committed)
            return reply
        _chain(self._send(request), done, committed)
        return done

    def end_of_stream(self, conn_id: int, direction: Direction, position: int) -> None:
        self._call(api.EndOfStream(conn_id, direction, position))

    def close_connection(self, conn_id: int) -> None:
        """The agent stops guarding conn_id and removes its checkpoint."""
        self._call(api.Close(conn_id))

    # -------------------------------------------------------------- plumbing
    def _call(self, request: api.Request, fds: tuple[int, ...] = ()) -> api.Reply:
        return self._send(request, fds).result()

    def _send(self, request: api.Request, fds: tuple[int, ...] = ()
              ) -> concurrent.futures.Future[api.Reply]:
        future: concurrent.futures.Future[api.Reply] = concurrent.futures.Future()
        if self._broken is not None:
            future.set_exception(self._broken)
            return future
        sock = self._sock
        if sock is None:
            future.set_exception(CheckpointerUnavailable(ErrorCode.DISCONNECTED,
                                                         "expected a connected client; call "
                                                         "connect() first"))
            return future
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        frame = api.encode(request, request_id, self.version, self.limits)
        with self._pending_lock:
            self._pending[request_id] = future
        try:
            with self._send_lock:
                fdpass.send_frame(sock, frame, fds, deadline=time.monotonic() + self.timeout_s)
        except ApiError as exc:
            with self._pending_lock:
                self._pending.pop(request_id, None)
            self._break(exc)
            future.set_exception(exc)
        return future

    def _read_replies(self, sock: socket.socket, closed: threading.Event) -> None:
        try:
            poller = select.poll()  # not select(): a server may hold descriptors past 1024
            poller.register(sock, select.POLLIN)
            while not closed.is_set():
                if not poller.poll(500):
                    continue
                got = fdpass.recv_frame(sock, self.limits, version=self.version,
                                        deadline=time.monotonic() + self.timeout_s,
                                        expect=api.REPLIES)
                if got is None:
                    raise CheckpointerUnavailable(ErrorCode.DISCONNECTED,
                                                  "the agent closed the connection")
                reply = api.decode_reply(got.header, got.body, self.limits)
                with self._pending_lock:
                    future = self._pending.pop(got.header.request_id, None)
                if future is None:
                    log.warning("reply_unexpected", request_id=got.header.request_id,
                                kind=got.header.kind.name)
                    continue
                if isinstance(reply, api.Error):
                    future.set_exception(reply.exception(got.header.request_id))
                else:
                    future.set_result(reply)
        except ApiError as exc:
            if not closed.is_set():
                self._break(exc)
        except (OSError, ValueError) as exc:
            if not closed.is_set():
                self._break(CheckpointerUnavailable(ErrorCode.DISCONNECTED,
                                                    f"reading the agent's replies failed: {exc}"))

    def _break(self, exc: ApiError) -> None:
        if self._broken is None:
            self._broken = exc
            log.error("checkpointer_connection_lost", path=str(self.path), error=str(exc))
        self._fail_all(exc)

    def _fail_all(self, exc: ApiError) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)


def _chain(source: concurrent.futures.Future[api.Reply], target: concurrent.futures.Future[R],
           convert: Callable[[api.Reply], R]) -> None:
    def done(f: concurrent.futures.Future[api.Reply]) -> None:
        exc = f.exception()
        if exc is not None:
            target.set_exception(exc)
            return
        try:
            target.set_result(convert(f.result()))
        except BaseException as err:  # a reply of the wrong kind
            target.set_exception(err)
    source.add_done_callback(done)


# ------------------------------------------------------------------ asyncio

@dataclass(slots=True)
class AsyncGuarded:
    """Guarded, for asyncio: the same positions, awaited calls."""

    inner: Guarded

    @property
    def sock(self) -> socket.socket:
        return self.inner.sock

    @property
    def id(self) -> int:
        return self.inner.id

    @property
    def consumed(self) -> int:
        return self.inner.consumed

    @property
    def produced(self) -> int:
        return self.inner.produced

    async def commit(self, state: bytes, *, consumed: int, produced: int | None = None,
                     end_of_stream: bool = False, outbound: bytes | None = None) -> None:
        g = self.inner
        got = await asyncio.wrap_future(g.client.commit_future(
            g.id, state, consumed=consumed, produced=g.produced if produced is None else produced,
            end_of_stream=end_of_stream, outbound=outbound))
        g.consumed, g.produced, g.state = got.consumed, got.produced, state

    async def close(self) -> None:
        await asyncio.wrap_future(self.inner.client._send(api.Close(self.inner.id)))


class AsyncCheckpointer:
    """Checkpointer for asyncio code: the calls are coroutines; replies arrive on the client's
    reader thread and resolve the awaited futures (no thread per call)."""

    def __init__(self, path: str | Path | None = None, *, name: str = "",
                 timeout_s: float = 10.0) -> None:
        self.client = Checkpointer(path, name=name, timeout_s=timeout_s)

    async def __aenter__(self) -> AsyncCheckpointer:
        await asyncio.to_thread(self.client.connect)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.close()

    async def guard_listener(self, listener: socket.socket,
                             contract: Contract = Contract.REGENERABLE) -> int:
        reply = await asyncio.wrap_future(self.client._send(api.RegisterListener(contract),
                                                            (listener.fileno(),)))
        assert isinstance(reply, api.Registered)
        return reply.conn_id

    async def guard(self, sock: socket.socket, *, contract: Contract = Contract.REGENERABLE,
                    consumed: int = 0, produced: int = 0, state: bytes = b"") -> AsyncGuarded:
        g = await asyncio.wrap_future(self.client.guard_future(
            sock, contract=contract, consumed=consumed, produced=produced, state=state))
        return AsyncGuarded(g)
