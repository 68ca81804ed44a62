"""A key-value server speaking a subset of RESP2 (ops/apps/resp.py), its connections guarded by
the checkpointer agent with the LOGGED outbound contract: every reply is checkpointed before it
is written, so a peer never holds a byte a standby could not re-send.

    python -m ops.apps.kvserver --listen 127.0.0.1:6379 --checkpointer /run/tcpcp/checkpointer.sock
    python -m ops.apps.kvserver --listen 127.0.0.1:6379 --no-checkpointer   # the baseline
    redis-cli -p 6379 INCR x;  redis-benchmark -p 6379 -t set,get,incr -q
    redis.Redis(port=6379, protocol=2)    # HELLO is refused (NOPROTO) as by Redis 5: RESP2

One thread per connection, one key space shared by all (a lock). A connection thread reads what
is available, parses the complete commands (pipelining), executes them, then

    g.commit(state, consumed=<stream bytes of the commands parsed>, produced=g.produced + len(out),
             outbound=out)

and only then writes `out`. A batch is cut so that its replies fit one commit (half the agent's
max_outbound; a single larger reply is answered with an error instead).

The state a connection commits (resp.ConnectionState) is the snapshot of the whole key space at
that commit (resp.KvState: generation, keys sorted) and, rarely, the start of a command still
arriving: it goes into the state and counts as consumed (PENDING_HELD), because the ACK gate
holds every byte not consumed and a peer stops sending once about a congestion window is held
(DESIGN.md section 4), and because the library anchors a new registration on what was read.

Writes and their commit are one step under the key-space lock: a batch that changed the key
space keeps the lock until its commit is durable (and undoes its writes if the commit is
refused), so every snapshot any connection commits holds only writes already committed, with
the commands that made them, by their own connection. A batch that only read commits after
releasing it (the agent groups such commits of many connections in one store round trip).
Mutations are therefore serialized at the pace of commits; fine for a demo.

How a standby resumes the server: of all its connections' checkpoints it takes the key space of
the state with the highest generation (the newest; equal generations hold equal key spaces),
and for each connection feeds the state's pending bytes to a fresh RequestParser before what the
peer re-sends from `consumed` on; replies the peer has not received are re-sent from the
checkpoint's outbound log by the resurrector, never regenerated.

Bounds: a state must fit the agent's max_state (client.limits.max_state, 256 KiB by default): a
quarter of it is kept for a command's pending bytes (so a command, and a value, is at most that),
the rest bounds the key-space snapshot; --max-keys bounds the keys. A write past either bound is
answered `-ERR tcpcp key space full` and not applied.

The peer's FIN (recv returns b""): commit end_of_stream at the stream's end (an incomplete
command is dropped), close the guarded connection, close the socket. QUIT and protocol errors
are answered, then the server shuts down its side and waits briefly for the peer's FIN. SIGTERM
or SIGINT stops accepting, closes every connection and exits 0; exit 1 when the checkpointer
agent went away (no connection can be guarded any more), 2 when it cannot be reached at start.

The threaded server shell (Server: accept loop, connection threads, stop; ServerConnection:
guard, read, end, close; run(): the command line's common part) serves ops/apps/fileserver.py
too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from checkpointer.api import ApiError, Contract, Direction, Limits
from checkpointer.client import Checkpointer, CheckpointerUnavailable, Guarded, default_socket
from ops import logs
from ops.apps import resp
from ops.apps.resp import ConnectionState, KvState, ProtocolError, RequestParser
from resurrector.adopt import adopt

log = structlog.get_logger(component="tcpcp.ops.apps.kvserver")

RECV_SIZE = 256 << 10
POLL_MS = 500
PENDING_HELD = 0
"""An incomplete command longer than this is committed in the state (counted as consumed). 0:
always, so `consumed` is every byte read, which the library needs when it registers the
connection again after the agent restarted (checkpointer/client.py, Guarded.commit), and the
gate never holds a command's start (a 50 kB SET must be able to finish arriving)."""
LINGER_S = 2.0
"""How long a connection the server ends waits for the peer's FIN."""
STOP_JOIN_S = 5.0


# ------------------------------------------------------------------ the threaded server shell
# (ops/apps/fileserver.py serves on it too)

class Server:
    """The accept loop and the connections' threads; subclasses say what a connection is."""

    def __init__(self, listener: socket.socket, checkpointer: Checkpointer | None, *,
                 max_connections: int = 1024,
                 logger: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self.listener = listener
        self.checkpointer = checkpointer
        self.limits = checkpointer.limits if checkpointer is not None else Limits()
        """The agent's limits (the defaults without one, so the baseline is bounded alike)."""
        self.log = logger or log
        self.stopping = threading.Event()
        self.lost: ApiError | None = None
        self.max_connections = max_connections
        self._connections: dict[int, ServerConnection] = {}
        self._connections_lock = threading.Lock()
        self._ids = 0

    def connection(self, sock: socket.socket, conn_id: int) -> ServerConnection:
        raise NotImplementedError

    def serve(self) -> int:
        """Accept until stop(); 0 on a clean stop, 1 when the checkpointer went away."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        self.listener.setblocking(False)
        while not self.stopping.is_set():
            if not poller.poll(POLL_MS):
                continue
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                continue
            except OSError as exc:   # out of descriptors: let connections end first
                self.log.warning("accept_failed", error=str(exc))
                time.sleep(0.1)
                continue
            self._start(sock, peer)
        self.listener.close()
        with self._connections_lock:
            running = list(self._connections.values())
        for conn in running:
            conn.wake()
        self._join_all()
        return 1 if self.lost is not None else 0

    def stop(self) -> None:
        """Stop accepting and end every connection (safe in a signal handler: serve() does the
        rest within POLL_MS)."""
        self.stopping.set()

    def checkpointer_lost(self, exc: ApiError) -> None:
        if self.lost is None:
            self.lost = exc
            self.log.error("checkpointer_lost", error=str(exc))
        self.stop()

    def forget(self, conn: ServerConnection) -> None:
        with self._connections_lock:
            self._connections.pop(conn.id, None)

    def _start(self, sock: socket.socket, peer: object) -> None:
        sock.setblocking(True)
        with self._connections_lock:
            if len(self._connections) >= self.max_connections:
                self.log.warning("connection_refused", peer=str(peer), reason="max_connections",
                                 max_connections=self.max_connections)
                sock.close()
                return
            self._ids += 1
            conn = self.connection(sock, self._ids)
            self._connections[conn.id] = conn
        threading.Thread(target=conn.run, name=f"conn-{conn.id}", daemon=True).start()

    def _join_all(self) -> None:
        """Let the connections end; after STOP_JOIN_S, interrupt those still writing to a peer
        that does not read, and give them a second to close."""
        if self._wait_connections(STOP_JOIN_S):
            return
        with self._connections_lock:
            stuck = list(self._connections.values())
        for conn in stuck:
            conn.interrupt()
        self.log.warning("connections_interrupted", count=len(stuck))
        self._wait_connections(1.0)

    def _wait_connections(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            with self._connections_lock:
                if not self._connections:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


class ServerConnection:
    """One connection's thread: guard it, serve it, end it. Subclasses give the contract, the
    state to register and to commit the end of stream with, and serve()."""

    contract = Contract.LOGGED

    def __init__(self, server: Server, sock: socket.socket, conn_id: int) -> None:
        self.server, self.sock, self.id = server, sock, conn_id
        self.guarded: Guarded | None = None
        self.received = 0
        """Stream bytes read from the peer."""
        self.produced = 0
        """Stream bytes written to the peer."""
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        try:
            name = f"{_address(sock.getpeername())}>{_address(sock.getsockname())}"
        except OSError:
            name = f"conn{conn_id}"
        self.log = server.log.bind(conn=name)

    def state(self) -> bytes:
        """The state to register the connection with and to commit its end with."""
        raise NotImplementedError

    def serve(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            cp = self.server.checkpointer
            if cp is not None:
                self.guarded = cp.guard(self.sock, contract=self.contract, state=self.state())
            self.log.debug("connection_opened", guarded=self.guarded is not None)
            self.serve()
        except CheckpointerUnavailable as exc:
            self.server.checkpointer_lost(exc)
            self.abort("checkpointer_lost")
        except ApiError as exc:
            self.log.warning("commit_refused", error=str(exc))
            self.abort("commit_refused")
        except OSError as exc:
            self.log.info("connection_failed", error=str(exc))
            self.abort("socket_error")
        except Exception:
            self.log.exception("connection_crashed")
            self.abort("internal_error")
        finally:
            self.server.forget(self)

    def wake(self) -> None:
        """Make a recv() blocked on this connection return (the server stops)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def interrupt(self) -> None:
        """Make a blocked sendall() fail (the server stops, the peer does not read)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.produced += len(data)

    # -------------------------------------------------------------- reading
    def recv(self) -> bytes | None:
        """What the peer sent (b"" at its FIN), or None when the server stops (stop() wakes a
        blocked recv by shutting down reading: b"" then is no FIN)."""
        if self.server.stopping.is_set():
            return None
        data = self.sock.recv(RECV_SIZE)
        if not data and self.server.stopping.is_set():
            return None
        self.received += len(data)
        return data

    def drain(self) -> bool:
        """Read and drop until the peer's FIN (True) or LINGER_S (False)."""
        deadline = time.monotonic() + LINGER_S
        try:
            while (left := deadline - time.monotonic()) > 0:
                if self.poller.poll(int(left * 1000) + 1):
                    data = self.sock.recv(RECV_SIZE)
                    if not data:            # a FIN, unless stop() shut down reading
                        return not self.server.stopping.is_set()
                    self.received += len(data)
        except OSError:
            pass
        return False

    # -------------------------------------------------------------- endings
    def peer_closed(self) -> None:
        """The peer's FIN: commit it at the stream's end (whatever was not used is dropped),
        then close."""
        self._commit_end()
        self.close("peer_closed")

    def end(self, reason: str) -> None:
        """The server ends the connection: commit what it wrote last (regenerable output is
        written before its commit), shut down writing, wait a little for the peer's FIN,
        commit it, close."""
        g = self.guarded
        if g is not None:
            if g.produced != self.produced:
                g.commit(self.state(), consumed=g.consumed, produced=self.produced)
            g.end_of_stream(Direction.OUTBOUND, self.produced)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        if self.drain():
            self._commit_end()
        self.close(reason)

    def abort(self, reason: str) -> None:
        try:
            self.close(reason)
        except (ApiError, OSError) as exc:
            self.log.info("close_failed", error=str(exc))
            self.sock.close()

    def close(self, reason: str) -> None:
        g, self.guarded = self.guarded, None
        try:
            if g is not None:
                g.close()
        finally:
            self.sock.close()
            self.log.debug("connection_closed", reason=reason, received=self.received,
                           produced=self.produced)

    def _commit_end(self) -> None:
        g = self.guarded
        if g is not None:
            g.commit(self.state(), consumed=self.received, produced=self.produced,
                     end_of_stream=True,
                     outbound=b"" if self.contract is Contract.LOGGED else None)


# ------------------------------------------------------------------ the key-value server

class KvServer(Server):
    """The shared key space and its lock; one KvConnection per client."""

    def __init__(self, listener: socket.socket, checkpointer: Checkpointer | None, *,
                 max_keys: int = 100_000, max_connections: int = 1024) -> None:
        super().__init__(listener, checkpointer, max_connections=max_connections)
        pending = self.limits.max_state // 4
        command = pending - resp.MAX_HEADER_LINE    # an incomplete one: + a partial header
        self.request_limits = resp.Limits(max_bulk=command, max_command=command,
                                          max_inline=min(64 << 10, pending))
        self.kv = KvState(max_bytes=self.limits.max_state - pending
                          - resp.CONNECTION_STATE_OVERHEAD, max_keys=max_keys)
        self.batch_bytes = self.limits.max_outbound // 2
        """A batch stops once its replies reach this; with one reply of at most as much more,
        a commit's outbound stays within max_outbound."""
        self.lock = threading.Lock()

    def connection(self, sock: socket.socket, conn_id: int) -> KvConnection:
        return KvConnection(self, sock, conn_id)


class KvConnection(ServerConnection):
    """One client: read, parse, execute, commit, write."""

    contract = Contract.LOGGED
    server: KvServer

    def __init__(self, server: KvServer, sock: socket.socket, conn_id: int) -> None:
        super().__init__(server, sock, conn_id)
        self.parser = RequestParser(server.request_limits)

    def state(self) -> bytes:
        with self.server.lock:
            return ConnectionState(self.server.kv.snapshot()).encode()

    def serve(self) -> None:
        while True:
            data = self.recv()
            if data is None:
                self.abort("server_stopping")
                return
            if not data:
                self.peer_closed()
                return
            self.parser.feed(data)
            while True:
                out, more, ending = self._batch()
                if out:
                    self.send(out)
                if ending is not None:
                    self.end(ending)
                    return
                if not more:
                    break

    def _batch(self) -> tuple[bytes, bool, str | None]:
        """Execute the buffered commands up to what one commit carries and commit them; the
        replies to write, whether commands are left, and why the connection ends (or None)."""
        server, kv, g = self.server, self.server.kv, self.guarded
        out = bytearray()
        more, ending = False, None
        server.lock.acquire()
        locked = True
        try:
            if g is not None:
                kv.savepoint()
            generation = kv.generation
            try:
                for command in self.parser:
                    reply = kv.execute(command)
                    if len(reply) > server.batch_bytes:
                        reply = resp.error(f"ERR tcpcp reply of {len(reply)} bytes is over the "
                                           f"{server.batch_bytes} one commit may carry")
                    out += reply
                    if resp.closes_connection(command):
                        ending = "quit"
                        break
                    if len(out) >= server.batch_bytes:
                        more = True
                        break
            except ProtocolError as exc:
                out += resp.error(f"ERR Protocol error: {exc}")
                ending = "protocol_error"
                self.log.info("protocol_error", error=str(exc))
            if g is None:
                return bytes(out), more, ending
            consumed, pending = self._position(ending, more)
            if not out and consumed == g.consumed:
                kv.release()
                return b"", more, ending
            state = ConnectionState(kv.snapshot(), pending).encode()
            if kv.generation == generation:     # read only: commit without holding the lock
                kv.release()
                server.lock.release()
                locked = False
            try:
                g.commit(state, consumed=consumed, produced=self.produced + len(out),
                         outbound=bytes(out))
            except BaseException:
                if locked:
                    kv.rollback()
                raise
            if locked:
                kv.release()
            return bytes(out), more, ending
        finally:
            if locked:
                server.lock.release()

    def _position(self, ending: str | None, more: bool) -> tuple[int, bytes]:
        """The consumed position of this commit and the pending bytes its state carries."""
        if ending == "protocol_error":
            return self.received, b""          # the rest is dropped with the connection
        pending = self.parser.pending
        if ending is None and not more and len(pending) > PENDING_HELD:
            return self.parser.consumed + len(pending), pending
        return self.parser.consumed, b""


# ------------------------------------------------------------------ command line

def _address(sockaddr: object) -> str:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host = str(sockaddr[0])
        return f"[{host}]:{sockaddr[1]}" if ":" in host else f"{host}:{sockaddr[1]}"
    return str(sockaddr)


def listen(address: str, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket on HOST:PORT ([v6]:PORT; an empty host means every IPv4 address,
    port 0 a free port)."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected ADDRESS:PORT, got {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def add_server_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--listen", metavar="ADDR:PORT",
                        help="address to listen on, e.g. 127.0.0.1:6379 or [::1]:6379 "
                        "(port 0: a free port, logged at start); required to serve")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--checkpointer", type=Path, metavar="SOCKET_PATH",
                       help=f"the checkpointer agent's unix socket (default: "
                       f"$TCPCP_CHECKPOINTER_SOCKET, else {default_socket()})")
    where.add_argument("--no-checkpointer", action="store_true",
                       help="serve without the agent: nothing is guarded or committed "
                       "(the baseline for benchmarks)")
    parser.add_argument("--name", default=name,
                        help=f"this client's name in the agent's logs (default {name})")
    parser.add_argument("--max-connections", type=int, default=1024,
                        help="connections served at once; more are closed at accept "
                        "(default 1024)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ops.apps.kvserver",
        description="A key-value server speaking a subset of the Redis protocol (RESP2: PING "
        "ECHO GET SET INCR INCRBY DECR DECRBY DEL EXISTS DBSIZE, and what redis-cli and "
        "redis-benchmark send at start-up), its connections guarded by the tcpcp checkpointer "
        "agent with logged output: each batch of replies is committed with the whole key space "
        "before it is written. Logs: TCPCP_LOG_FORMAT=json|console, TCPCP_LOG_LEVEL.",
        epilog="Exit status: 0 after SIGTERM or SIGINT, 1 when the agent went away, 2 when it "
        "cannot be reached at start or the address cannot be listened on.")
    add_server_arguments(parser, "kvserver")
    parser.add_argument("--max-keys", type=int, default=100_000,
                        help="keys the key space may hold (default 100000); its snapshot is "
                        "also bounded by the agent's max_state")
    return parser


def run(args: argparse.Namespace, contract: Contract,
        make: Callable[[socket.socket, Checkpointer | None], Server],
        logger: structlog.typing.FilteringBoundLogger = log) -> int:
    """Listen, reach the agent (unless --no-checkpointer) and guard the listener, serve until
    SIGTERM or SIGINT; the exit status."""
    logs.configure()
    if not args.listen:
        logger.error("listen_missing", expected="--listen ADDR:PORT")
        return 2
    try:
        listener = listen(args.listen)
    except (ValueError, OSError) as exc:
        logger.error("listen_failed", address=args.listen, error=str(exc))
        return 2
    checkpointer = None
    if not args.no_checkpointer:
        checkpointer = Checkpointer(args.checkpointer, name=args.name)
        try:
            checkpointer.connect()
            checkpointer.guard_listener(listener, contract)
        except ApiError as exc:
            logger.error("checkpointer_unavailable", path=str(checkpointer.path),
                         error=str(exc))
            checkpointer.close()
            listener.close()
            return 2
    server = make(listener, checkpointer)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    server.log.info("listening", address=_address(listener.getsockname()),
                    checkpointer=None if checkpointer is None else str(checkpointer.path),
                    limits=dataclasses.asdict(server.limits))
    try:
        status = server.serve()
    finally:
        if checkpointer is not None:
            checkpointer.close()
    server.log.info("stopped", status=status)
    return status


def adopt_all(handover: str, max_keys: int) -> int:
    """The standby's side: go on with every connection the resurrector hands over (unguarded:
    this example has no checkpointer of its own on the standby). The key space is the newest
    of the adopted states (highest generation); the replies the peer had not received were
    re-queued by the resurrector from the output log, so each connection reads on at its
    committed position. Connections are served as they arrive: one adopted after another has
    written would bring an older key space only if its generation were higher, which a
    snapshot taken before those writes cannot have."""
    logs.configure()
    # the accept loop is never run: an unbound socket stands for the listener
    server = KvServer(socket.socket(), None, max_keys=max_keys)
    log.info("adopting", handover=handover)
    for n, a in enumerate(adopt(handover)):
        state = ConnectionState.decode(a.state)
        kv = KvState.restore(state.snapshot, max_bytes=server.kv.max_bytes, max_keys=max_keys)
        with server.lock:
            if kv.generation > server.kv.generation:
                server.kv = kv
        conn = server.connection(a.sock, n)
        conn.received, conn.produced = a.consumed, a.produced
        conn.parser.feed(state.pending)
        log.info("adopted", conn=a.conn, consumed=a.consumed, produced=a.produced,
                 generation=kv.generation)
        threading.Thread(target=conn.run, daemon=True, name=f"adopted-{n}").start()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--adopt", metavar="HANDOVER_SOCKET",
                        help="instead of listening: the standby's side, go on with every "
                        "connection the resurrector hands over on this socket")
    args = parser.parse_args(argv)
    if args.adopt:
        return adopt_all(args.adopt, args.max_keys)
    return run(args, Contract.LOGGED, lambda listener, cp: KvServer(
        listener, cp, max_keys=args.max_keys, max_connections=args.max_connections))


if __name__ == "__main__":
    sys.exit(main())
