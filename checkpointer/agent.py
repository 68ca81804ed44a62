"""The checkpointer agent: serves the local API, turns commits into durable checkpoints and then
into ACKs, checkpoints every guarded connection periodically, and fences its host through the
lease. The daemon (checkpointer/daemon.py) builds one from its configuration.

    agent = Agent(store, gate, settings, metrics=m, freezer=f)
    agent.start(lease_epoch=lambda: keeper.epoch)      # listens on settings.socket_path
    ...
    agent.stop()                                        # SIGTERM: no ACK is ever released

Threads: one accepting clients, one per client (its requests, in order), one committer, one
periodic checkpointer. A commit travels

    client thread: check the request  ->  commit queue  ->  committer: every commit waiting is
    taken at once (group commit): one pipelined put_many / put_many_with_output round trip,
    durability awaited once  ->  per commit: gate.commit (the forced ACK leaves)  ->  COMMITTED

so commits of many connections share one store round trip, and a commit is answered only once
the checkpoint is durable, the gate has moved, and the ACK has left. A refused commit changes
nothing: neither the record, nor the gate, nor the connection's positions.

What a checkpoint holds and why it needs no repair mode: checkpointer/snapshot.py. The
registration dump is the one moment the socket is in repair mode, while its application waits
for the REGISTERED reply.

Every listener is hostile-input-proof: SO_PEERCRED against the allowed uids/gids, frames bounded
and read before a deadline (checkpointer/fdpass.py), every request checked before it touches a
socket, a refused request answered with an ERROR naming what was expected while every other
client goes on. A client that disconnects keeps its connections guarded (their ACKs held at the
last commit) until it registers them again or they close.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import os
import queue
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from checkpointer import api, fdpass, snapshot
from checkpointer.api import ApiError, Contract, Direction, ErrorCode
from checkpointer.metrics import CheckpointerMetrics
from checkpointer.snapshot import SnapshotError, Template
from kernel import codec, repair
from kernel.errors import KernelError
from kernel.gatebackend import Gate
from kernel.ici import Identity, TcpState
from kernel.isolation import flow_of
from store.client import CheckpointStore
from store.errors import StaleEpoch, StoreError, WriteRefused
from store.record import Checkpoint

log = structlog.get_logger(component="tcpcp.checkpointer.agent")

SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
TCP_TIMESTAMP = 24
MAX_GROUP = 512
"""Commits taken into one store round trip at most."""
REPLY_DEADLINE_S = 2.0
ENDED = frozenset({TcpState.CLOSE, TcpState.TIME_WAIT})
REFRESH_S = 30.0
"""An idle connection (positions unchanged) is checkpointed again after this long only: its
timestamp clock runs at a known rate, so the last checkpoint's estimate stays right."""


class Freezer(Protocol):
    """Silences guarded flows (self-fencing) and lets them speak again."""

    def freeze(self, conns: Sequence[socket.socket]) -> None: ...
    def thaw(self, conns: Sequence[socket.socket]) -> None: ...


@dataclass(frozen=True, slots=True)
class Settings:
    origin: str
    socket_path: Path
    guarded: fdpass.Guarded
    allowed_uids: frozenset[int]
    allowed_gids: frozenset[int]
    checkpoint_period_s: float = 1.0
    limits: api.Limits = field(default_factory=api.Limits)
    max_clients: int = 256
    request_deadline_s: float = 5.0


@dataclass(eq=False)
class Conn:
    """A guarded connection. Positions and state: those of its last durable checkpoint."""

    id: int
    owner: int                     # the client session that registered it
    sock: socket.socket            # the agent's own descriptor for it
    name: str                      # the record's connection name (its 4-tuple)
    identity: Identity
    contract: Contract
    template: Template
    consumed: int
    produced: int
    state: bytes
    version: int = 0
    peer_fin: bool = False
    our_fin: bool = False
    bytes_acked_anchor: int = 0    # tcpi_bytes_acked at registration
    acked_position_anchor: int = 0  # the outbound position of snd_una at registration
    trimmed: int = 0
    closed: bool = False
    log: Any = None

    def next_version(self) -> int:
        self.version = max(self.version + 1, time.time_ns())
        return self.version


@dataclass(eq=False)
class _Work:
    """One commit (or a periodic refresh when request is None) for the committer."""

    conn: Conn
    request: api.Commit | None
    reply: Callable[[api.Reply], None] | None
    started: float = field(default_factory=time.perf_counter)


class Agent:
    def __init__(self, store: CheckpointStore, gate: Gate, settings: Settings, *,
                 metrics: CheckpointerMetrics, freezer: Freezer,
                 epoch: Callable[[], int | None], held: Callable[[], bool]) -> None:
        self.store = store
        self.gate = gate
        self.settings = settings
        self.metrics = metrics
        self.freezer = freezer
        self._epoch = epoch
        self._held = held
        self._conns: dict[int, Conn] = {}
        self._by_name: dict[str, Conn] = {}
        self._registered: collections.Counter[int] = collections.Counter()  # per client
        self._listeners: dict[int, tuple[int, socket.socket]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sessions = itertools.count(1)
        self._work: queue.Queue[_Work | None] = queue.Queue()
        self._stopping = threading.Event()
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._clients: set[socket.socket] = set()
        self._frozen = False
        self.log = log.bind(origin=settings.origin)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> Agent:
        self._server = _listen_unix(self.settings.socket_path)
        for name, target in (("accept", self._accept_loop), ("commit", self._commit_loop),
                             ("periodic", self._periodic_loop)):
            t = threading.Thread(target=target, name=f"agent-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.log.info("agent_listening", socket=str(self.settings.socket_path),
                      backend=self.gate.backend.value)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving; commits already queued are finished (or refused), none is left
        half-done. The gate keeps every flow at its last commit: no ACK is released."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(OSError):
                self.settings.socket_path.unlink()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        self._work.put(None)
        for t in self._threads:
            t.join(timeout_s)
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            c.sock.close()
        self.log.info("agent_stopped", connections=len(conns))

    @property
    def connections(self) -> list[Conn]:
        with self._lock:
            return [c for c in self._conns.values() if not c.closed]

    # ------------------------------------------------------------------ fencing
    def freeze_all(self) -> None:
        """Self-fencing: silence every guarded flow (the lease may expire elsewhere)."""
        self._frozen = True
        socks = [c.sock for c in self.connections]
        self.freezer.freeze(socks)
        self.log.critical("flows_frozen", connections=len(socks),
                          reason="the lease could not be renewed in time")

    def thaw_all(self) -> None:
        socks = [c.sock for c in self.connections]
        self.freezer.thaw(socks)
        self._frozen = False
        self.log.warning("flows_thawed", connections=len(socks))

    # ------------------------------------------------------------------ clients
    def _accept_loop(self) -> None:
        server = self._server
        assert server is not None
        while not self._stopping.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            with self._lock:
                too_many = len(self._clients) >= self.settings.max_clients
                if not too_many:
                    self._clients.add(client)
            if too_many:
                self._refuse_early(client, ApiError(ErrorCode.TOO_MANY_CONNECTIONS,
                                                    f"expected at most "
                                                    f"{self.settings.max_clients} clients at "
                                                    "once"))
                continue
            threading.Thread(target=self._session, args=(client,), daemon=True,
                             name="agent-client").start()

    def _refuse_early(self, client: socket.socket, exc: ApiError) -> None:
        self.metrics.refused.labels(reason=exc.code.name.lower()).inc()
        with contextlib.suppress(ApiError, OSError):
            fdpass.send_frame(client, api.encode(api.Error.of(exc), 0, api.HELLO_VERSION),
                              deadline=time.monotonic() + 0.5)
        client.close()

    def _session(self, client: socket.socket) -> None:
        session = next(self._sessions)
        send_lock = threading.Lock()
        version: int | None = None
        slog = self.log.bind(client=session)
        try:
            peer = fdpass.peer_credentials(client)
            slog = slog.bind(pid=peer.pid, uid=peer.uid)
            fdpass.authorise(peer, self.settings.allowed_uids, self.settings.allowed_gids)
        except ApiError as exc:
            slog.warning("client_refused", error=str(exc))
            with self._lock:
                self._clients.discard(client)
            self._refuse_early(client, exc)
            return

        def send(reply: api.Reply, request_id: int) -> None:
            frame = api.encode(reply, request_id, version or api.HELLO_VERSION)
            with send_lock:
                fdpass.send_frame(client, frame, deadline=time.monotonic() + REPLY_DEADLINE_S)

        def answer(reply: api.Reply, request_id: int) -> None:
            try:
                send(reply, request_id)
            except ApiError as exc:
                slog.warning("reply_lost", error=str(exc))
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)

        try:
            while not self._stopping.is_set():
                try:
                    got = self._next_request(client, version)
                except ApiError as exc:
                    self._refused(slog, exc)
                    if exc.code not in (ErrorCode.DISCONNECTED, ErrorCode.DEADLINE):
                        answer(api.Error.of(exc), exc.request_id or 0)
                    return  # the stream is out of step: close it
                if got is None:
                    return
                refusal: api.Error | None = None
                try:
                    if isinstance(got.request, api.Hello):
                        if version is not None:
                            raise ApiError(ErrorCode.UNKNOWN_KIND, "expected one HELLO per "
                                           "connection, got a second", got.request_id)
                        version = api.negotiate(got.request.versions)
                        slog = slog.bind(name=got.request.client)
                        answer(api.HelloOk(version, self.settings.limits), got.request_id)
                        continue
                    self._handle(session, got, slog, _bound(answer, got.request_id))
                except ApiError as exc:
                    self._refused(slog, exc)
                    refusal = api.Error.of(exc)
                except Exception as exc:  # a bug must not take the agent down
                    slog.exception("request_failed", kind=type(got.request).__name__)
                    refusal = api.Error(ErrorCode.INTERNAL, f"the agent failed on "
                                        f"{type(got.request).__name__}: {exc}"[:900])
                finally:
                    # the client's descriptors are closed before it hears the answer: once it
                    # has it, the agent holds nothing of a refused socket (its port is free)
                    for fd in got.fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                if refusal is not None:
                    answer(refusal, got.request_id)
        finally:
            with self._lock:
                self._clients.discard(client)
                orphans = [c for c in self._conns.values() if c.owner == session]
                for c in orphans:
                    c.closed = True
                    self._conns.pop(c.id, None)
                    if self._by_name.get(c.name) is c:
                        del self._by_name[c.name]
                lost = [lid for lid, (owner, _) in self._listeners.items() if owner == session]
                listeners = [self._listeners.pop(lid)[1] for lid in lost]
                self._registered.pop(session, None)
                self.metrics.guarded_connections.set(len(self._conns))
            for c in orphans:
                c.sock.close()  # the application's descriptor keeps the connection open
            for lst in listeners:
                lst.close()
            client.close()
            slog.info("client_gone", connections_left_gated=len(orphans))

    def _next_request(self, client: socket.socket, version: int | None) -> fdpass.Incoming | None:
        # wait for the first byte without a deadline (an idle client is fine), then the whole
        # frame must arrive before the request deadline
        while not self._stopping.is_set():
            client.settimeout(0.5)
            try:
                peek = client.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                continue
            except OSError:
                return None
            if not peek:
                return None
            break
        else:
            return None
        return fdpass.recv_request(client, self.settings.limits, version=version,
                                   deadline=time.monotonic() + self.settings.request_deadline_s)

    def _refused(self, slog: Any, exc: ApiError) -> None:
        self.metrics.refused.labels(reason=exc.code.name.lower()).inc()
        slog.warning("request_refused", code=exc.code.name, error=exc.message)

    # ------------------------------------------------------------------ requests
    def _handle(self, session: int, got: fdpass.Incoming, slog: Any,
                answer: Callable[[api.Reply], None]) -> None:
        req = got.request
        if isinstance(req, api.RegisterConnection):
            conn = self._register(session, got.fds[0], req, slog)
            answer(api.Registered(conn.id))
        elif isinstance(req, api.RegisterListener):
            answer(api.Registered(self._register_listener(session, got.fds[0], req, slog)))
        elif isinstance(req, api.Commit):
            conn = self._owned(session, req.conn_id, "COMMIT")
            self._check_commit(conn, req)
            self._work.put(_Work(conn, req, answer))
        elif isinstance(req, api.EndOfStream):
            conn = self._owned(session, req.conn_id, "END_OF_STREAM")
            if req.direction is Direction.OUTBOUND:
                if req.position < conn.produced:
                    raise ApiError(ErrorCode.BAD_POSITION, f"END_OF_STREAM outbound: expected "
                                   f"at least produced {conn.produced}, got {req.position}")
                conn.our_fin = True
                self._work.put(_Work(conn, None, None))   # checkpoint it at once
                answer(api.Done(conn.id))
            else:
                raise ApiError(ErrorCode.BAD_POSITION, "END_OF_STREAM inbound: expected a "
                               "COMMIT with end_of_stream (the peer's FIN is committed like "
                               "its bytes)")
        elif isinstance(req, api.Close):
            if req.conn_id in self._listeners:
                owner, lst = self._listeners[req.conn_id]
                if owner != session:
                    raise ApiError(ErrorCode.UNKNOWN_CONNECTION, f"CLOSE: id {req.conn_id} "
                                   "was not issued to this client")
                del self._listeners[req.conn_id]
                self._registered[session] -= 1
                lst.close()
            else:
                self._close(self._owned(session, req.conn_id, "CLOSE"), "application closed")
            answer(api.Done(req.conn_id))
        else:
            raise ApiError(ErrorCode.UNKNOWN_KIND, f"expected a request, got "
                           f"{type(req).__name__}")

    def _owned(self, session: int, conn_id: int, what: str) -> Conn:
        with self._lock:
            conn = self._conns.get(conn_id)
        if conn is None or conn.closed:
            raise ApiError(ErrorCode.UNKNOWN_CONNECTION, f"{what}: expected a connection id "
                           f"this agent issued and that is still open, got {conn_id}")
        if conn.owner != session:
            raise ApiError(ErrorCode.UNKNOWN_CONNECTION, f"{what}: id {conn_id} was not issued "
                           "to this client")
        return conn

    def _count(self, session: int) -> int:
        """Connections and listeners this client has registered (api.Limits.max_connections
        is per client)."""
        return self._registered[session]

    def _register_listener(self, session: int, fd: int, req: api.RegisterListener,
                           slog: Any) -> int:
        tcp = fdpass.check_descriptor(fd, self.settings.guarded,
                                      frozenset({TcpState.LISTEN}))
        with self._lock:
            if self._count(session) >= self.settings.limits.max_connections:
                raise ApiError(ErrorCode.TOO_MANY_CONNECTIONS, f"expected at most "
                               f"{self.settings.limits.max_connections} registrations")
        lst = socket.socket(fileno=os.dup(fd))
        try:
            self.gate.guard_listen(lst)
        except (KernelError, OSError) as exc:
            lst.close()
            raise ApiError(ErrorCode.INTERNAL, f"guarding listener {tcp}: {exc}") from None
        lid = next(self._ids)
        with self._lock:
            self._listeners[lid] = (session, lst)
            self._registered[session] += 1
        slog.info("listener_guarded", id=lid, local=f"{tcp.local[0]}:{tcp.local[1]}",
                  contract=req.contract.name)
        return lid

    def _register(self, session: int, fd: int, req: api.RegisterConnection,
                  slog: Any) -> Conn:
        fdpass.check_descriptor(fd, self.settings.guarded, frozenset({TcpState.ESTABLISHED}))
        if len(req.state) > self.settings.limits.max_state:
            raise ApiError(ErrorCode.TOO_LARGE, f"REGISTER_CONNECTION state: expected at most "
                           f"{self.settings.limits.max_state} bytes, got {len(req.state)}")
        epoch = self._writable_epoch("REGISTER_CONNECTION")
        with self._lock:
            if self._count(session) >= self.settings.limits.max_connections:
                raise ApiError(ErrorCode.TOO_MANY_CONNECTIONS, f"expected at most "
                               f"{self.settings.limits.max_connections} registrations")
        sock = socket.socket(fileno=os.dup(fd))
        try:
            identity = flow_of(sock)
            name = str(identity)
            with self._lock:
                other = self._by_name.get(name)
                if other is not None and not other.closed:
                    # the same connection again: its client went away (agent restarted or
                    # the application reconnected); the new registration replaces it
                    other.closed = True
                    self._conns.pop(other.id, None)
                    self._registered[other.owner] -= 1
                    other.sock.close()
            try:
                dumped = repair.dump(sock)
                template = Template.of(dumped, req.consumed, req.produced)
            except (KernelError, SnapshotError) as exc:
                raise ApiError(ErrorCode.BAD_STATE, f"REGISTER_CONNECTION {name}: expected a "
                               f"dumpable ESTABLISHED connection, got: {exc}") from None
            info = repair.tcp_info(sock)
            outq = _ioctl_int(sock, SIOCOUTQ)
            conn = Conn(next(self._ids), session, sock, name, identity, req.contract, template,
                        req.consumed, req.produced, req.state,
                        bytes_acked_anchor=int(info.tcpi_bytes_acked),
                        acked_position_anchor=max(0, req.produced - outq))
            conn.trimmed = conn.acked_position_anchor
            conn.log = slog.bind(conn=name, id=conn.id)
            seq = snapshot.commit_seq(template, req.consumed, False)
            cp = self._checkpoint(conn, epoch, req.consumed, req.produced, req.state)
            if req.contract is Contract.LOGGED:
                (outcome,) = self.store.put_many_with_output([(cp, req.produced, b"")])
            else:
                (outcome,) = self.store.put_many([cp])
            if outcome.error is not None:
                raise outcome.error
            if self.gate.committed_seq(sock) is None:
                self.gate.guard(sock, seq)
            else:
                self.gate.commit(sock, seq)
            if self._frozen:
                self.freezer.freeze([sock])
        except StaleEpoch as exc:
            sock.close()
            raise ApiError(ErrorCode.UNAVAILABLE, f"REGISTER_CONNECTION: the origin was taken "
                           f"over ({exc})") from None
        except StoreError as exc:
            sock.close()
            raise ApiError(ErrorCode.UNAVAILABLE, f"REGISTER_CONNECTION: the store refused or "
                           f"is unreachable: {exc}") from None
        except (KernelError, OSError) as exc:
            sock.close()
            raise ApiError(ErrorCode.INTERNAL, f"REGISTER_CONNECTION: {exc}") from None
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._conns[conn.id] = conn
            self._by_name[conn.name] = conn
            self._registered[session] += 1
            self.metrics.guarded_connections.set(len(self._conns))
        conn.log.info("connection_guarded", contract=req.contract.name,
                      consumed=req.consumed, produced=req.produced, commit_seq=seq)
        return conn

    def _writable_epoch(self, what: str) -> int:
        epoch = self._epoch()
        if epoch is None or not self._held():
            raise ApiError(ErrorCode.UNAVAILABLE, f"{what}: expected the origin's lease held, "
                           "got it not held (store unreachable or the origin fenced)")
        return epoch

    def _check_commit(self, conn: Conn, req: api.Commit) -> None:
        lim = self.settings.limits
        if len(req.state) > lim.max_state:
            raise ApiError(ErrorCode.TOO_LARGE, f"COMMIT state: expected at most "
                           f"{lim.max_state} bytes, got {len(req.state)}")
        if conn.peer_fin:
            raise ApiError(ErrorCode.BAD_POSITION, "COMMIT: the end of stream is already "
                           "committed; expected CLOSE")
        if conn.contract is Contract.LOGGED:
            if req.outbound is None:
                raise ApiError(ErrorCode.WRONG_CONTRACT, "COMMIT: expected outbound bytes "
                               "(logged contract), got none")
        elif req.outbound is not None:
            raise ApiError(ErrorCode.WRONG_CONTRACT, "COMMIT: expected no outbound bytes "
                           "(regenerable contract), got some")
        try:
            conn.template.rcv_seq(req.consumed)
            conn.template.snd_seq(req.produced)
        except SnapshotError as exc:
            raise ApiError(ErrorCode.BAD_POSITION, f"COMMIT: {exc}") from None

    # ------------------------------------------------------------------ commits
    def _checkpoint(self, conn: Conn, epoch: int, consumed: int, produced: int, state: bytes,
                    peer_fin: bool = False) -> Checkpoint:
        tsval = conn.sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP)
        ici = snapshot.checkpoint_ici(conn.template, consumed=consumed, produced=produced,
                                      peer_fin=peer_fin, our_fin=conn.our_fin, tsval=tsval,
                                      read_at_ms=time.time_ns() // 1_000_000)
        return Checkpoint(self.settings.origin, conn.name, epoch, conn.next_version(),
                          time.time_ns(), consumed, produced, codec.encode(ici), state, b"")

    def _commit_loop(self) -> None:
        while True:
            first = self._work.get()
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    group.append(self._work.get_nowait())
                except queue.Empty:
                    break
            stop = any(w is None for w in group)
            work = [w for w in group if w is not None]
            if work:
                try:
                    self._commit_group(work)
                except Exception as exc:  # never leave a client waiting
                    self.log.exception("commit_group_failed")
                    for w in work:
                        self._reply(w, api.Error(ErrorCode.INTERNAL,
                                                 f"the agent failed committing: {exc}"[:900]))
            if stop:
                return

    def _reply(self, w: _Work, reply: api.Reply) -> None:
        if w.reply is not None:
            w.reply(reply)

    def _commit_group(self, work: list[_Work]) -> None:
        epoch = self._epoch()
        if epoch is None or not self._held() or self._frozen:
            for w in work:
                self._reply(w, api.Error(ErrorCode.UNAVAILABLE, "COMMIT: expected the origin's "
                                         "lease held, got it lost (store unreachable, flows "
                                         "frozen, or the origin taken over)"))
            return
        plain: list[tuple[_Work, Checkpoint]] = []
        logged: list[tuple[_Work, Checkpoint, int, bytes]] = []
        for w in work:
            c = w.conn
            if c.closed:
                self._reply(w, api.Error(ErrorCode.UNKNOWN_CONNECTION, f"COMMIT: connection "
                                         f"{c.id} was closed"))
                continue
            r = w.request
            consumed = c.consumed if r is None else r.consumed
            produced = c.produced if r is None else r.produced
            state = c.state if r is None else r.state
            peer_fin = c.peer_fin or (r is not None and r.end_of_stream)
            try:
                cp = self._checkpoint(c, epoch, consumed, produced, state, peer_fin)
            except (OSError, SnapshotError, KernelError) as exc:
                self._reply(w, api.Error(ErrorCode.BAD_POSITION if isinstance(
                    exc, SnapshotError) else ErrorCode.INTERNAL, f"COMMIT: {exc}"))
                continue
            if c.contract is Contract.LOGGED and r is not None and r.outbound is not None:
                logged.append((w, cp, produced - len(r.outbound), r.outbound))
            else:
                plain.append((w, cp))
        outcomes: list[tuple[_Work, Checkpoint, BaseException | None]] = []
        try:
            if plain:
                got = self.store.put_many([cp for _, cp in plain])
                outcomes += [(w, cp, o.error) for (w, cp), o in zip(plain, got, strict=True)]
            if logged:
                got = self.store.put_many_with_output([(cp, off, data)
                                                       for _, cp, off, data in logged])
                outcomes += [(w, cp, o.error) for (w, cp, _, _), o in
                             zip(logged, got, strict=True)]
        except StaleEpoch as exc:
            self.log.critical("origin_taken_over", error=str(exc))
            for w in work:
                self._reply(w, api.Error(ErrorCode.UNAVAILABLE, f"COMMIT: the origin was taken "
                                         f"over ({exc})"))
            return
        except StoreError as exc:
            done = {id(w) for w, _, _ in outcomes}
            for w in work:
                if id(w) not in done:
                    self._reply(w, api.Error(ErrorCode.UNAVAILABLE, f"COMMIT: the store "
                                             f"refused or is unreachable: {exc}"))
        for w, cp, error in outcomes:
            self._apply(w, cp, error)

    def _apply(self, w: _Work, cp: Checkpoint, error: BaseException | None) -> None:
        c, r = w.conn, w.request
        if error is not None:
            c.log.warning("commit_refused", error=str(error))
            code = ErrorCode.UNAVAILABLE if isinstance(error, (StoreError, WriteRefused)) \
                else ErrorCode.INTERNAL
            self._reply(w, api.Error(code, f"COMMIT: the store refused it: {error}"[:900]))
            return
        peer_fin = c.peer_fin or (r is not None and r.end_of_stream)
        seq = snapshot.commit_seq(c.template, cp.inbound_consumed, peer_fin)
        try:
            if not c.closed:
                self.gate.commit(c.sock, seq)
        except (KernelError, OSError) as exc:
            c.log.error("gate_commit_failed", error=str(exc), seq=seq)
            self._reply(w, api.Error(ErrorCode.INTERNAL, f"COMMIT: durable, but the gate did "
                                     f"not move: {exc}"[:900]))
            return
        c.log.debug("committed", seq=seq, consumed=cp.inbound_consumed,
                    produced=cp.outbound_produced, version=cp.version, periodic=r is None)
        c.consumed, c.produced, c.state, c.peer_fin = (cp.inbound_consumed,
                                                       cp.outbound_produced, cp.app_state,
                                                       peer_fin)
        if r is None:
            self.metrics.checkpoints.inc()
            return
        self.metrics.commits.inc()
        self.metrics.commit_latency.observe(time.perf_counter() - w.started)
        self._reply(w, api.Committed(c.id, c.consumed, c.produced))

    # ------------------------------------------------------------------ periodic work
    def _periodic_loop(self) -> None:
        period = self.settings.checkpoint_period_s
        while not self._stopping.wait(period):
            try:
                self._periodic()
            except Exception:
                self.log.exception("periodic_failed")

    def _periodic(self) -> None:
        held = 0
        epoch = self._epoch()
        for c in self.connections:
            try:
                info = repair.tcp_info(c.sock)
            except OSError:
                self._close(c, "socket gone")
                continue
            st = TcpState(info.tcpi_state)
            if st in ENDED or (st is TcpState.CLOSE_WAIT and c.peer_fin and c.our_fin):
                self._close(c, f"connection ended ({st.name})", gone=st is TcpState.CLOSE)
                continue
            if c.contract is Contract.LOGGED and epoch is not None:
                acked = c.acked_position_anchor + int(info.tcpi_bytes_acked) \
                    - c.bytes_acked_anchor
                if acked > c.trimmed:
                    with contextlib.suppress(StoreError):
                        self.store.trim_output(self.settings.origin, c.name, epoch,
                                               min(acked, c.produced))
                        c.trimmed = acked
            held += _unread_bytes(c.sock)
            if time.time_ns() - c.version > REFRESH_S * 1e9:
                self._work.put(_Work(c, None, None))
        self.metrics.gate_held_bytes.set(held)

    def _close(self, c: Conn, reason: str, gone: bool = False) -> None:
        """Stop guarding c: its record and output log deleted, its gate entry dropped when
        nothing is left to hold (the stream committed to its FIN, or the socket closed: a RST
        or both FINs done), the agent's descriptor closed."""
        with self._lock:
            if c.closed:
                return
            c.closed = True
            self._conns.pop(c.id, None)
            self._registered[c.owner] -= 1
            if self._by_name.get(c.name) is c:
                del self._by_name[c.name]
            self.metrics.guarded_connections.set(len(self._conns))
        epoch = self._epoch()
        if epoch is not None:
            try:
                self.store.delete(self.settings.origin, epoch, [c.name])
            except StoreError as exc:
                c.log.warning("record_not_deleted", error=str(exc))
        if c.peer_fin or gone:
            with contextlib.suppress(KernelError, OSError):
                self.gate.forget(c.sock)
        c.sock.close()
        c.log.info("connection_closed", reason=reason)


def _bound(answer: Callable[[api.Reply, int], None],
           request_id: int) -> Callable[[api.Reply], None]:
    return lambda reply: answer(reply, request_id)


def _unread_bytes(sock: socket.socket) -> int:
    """Bytes received and not yet read by the application (SIOCINQ): held by the gate at
    least until the application reads and commits them."""
    try:
        return _ioctl_int(sock, SIOCINQ)
    except OSError:
        return 0


def _ioctl_int(sock: socket.socket, request: int) -> int:
    raw = fcntl.ioctl(sock.fileno(), request, b"\0" * 4)
    return int(struct.unpack("i", raw)[0])


def _listen_unix(path: Path) -> socket.socket:
    """The local API's socket: its directory made if missing (0755), a stale socket file
    replaced, the socket itself 0666 (who may talk is decided by SO_PEERCRED)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)
        sock.listen(128)
        sock.settimeout(0.5)
    except BaseException:
        sock.close()
        raise
    return sock
