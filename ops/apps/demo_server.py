"""The demo application for connection passing: a counting-byte echo and an HTTP file server.

A peer that sends the counting stream (byte i is i mod 251) gets every byte echoed back; the
server checks the stream it receives, so a byte lost or repeated in either direction shows.
`GET /<size>[/<rate>] HTTP/1.1` answers a body of <size> counting bytes, paced to <rate> bytes
per second if given (regenerable output: the state is the position in the response);
`PUT /<name>` with a Content-Length takes an upload of the counting stream and answers
"<bytes received> <stream errors>". One process per host:

    python -m ops.apps.demo_server --name origin --keys keys.json --accept-from standby \\
        --listen 10.77.9.1 --listen fd77:9::1 --port 8080 \\
        --receive-on 10.77.2.10 --receive-port 7070 --serve 10.77.9.1 --serve fd77:9::1 \\
        --control /run/tcpcp-demo-origin.sock

Passed connections arrive on --receive-on:--receive-port only (never on all addresses), signed
with the key ring of --keys by an origin named in --accept-from; each is received in a worker
thread, so a slow or hostile sender never holds the service loop. The control socket (unix,
mode 0600, clients checked by SO_PEERCRED against --allow-uid, one JSON object per line of at
most 64 KiB) takes:

    {"cmd": "status"}       connections by kind, stream errors, buffers locked, refusals
    {"cmd": "pass", "to": "HOST:PORT", "to_name": "standby", "count": N}

A pass answers {"event": "restored", "flows": [...]} once the destination holds the restored
connections, and waits for {"cmd": "switched"} (the operator moved exactly those flows' traffic)
or {"cmd": "abort"}; it may ask {"event": "switch_back", "flows": [...]} (answer
{"cmd": "switched_back"}) for connections the destination could not activate. The final line
says how each connection ended: passed, resumed here, or closed with a reason. See ops/passcli.py.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import queue
import resource
import selectors
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from checkpointer.pass_out import Faults, Party, PassResult, pass_out
from kernel import repair
from kernel.errors import KernelError
from kernel.ici import Family, Identity
from kernel.isolation import FlowIsolation, GateIsolation, Isolation, flow_of
from kernel.pass_states import Ending, Step
from kernel.sanity import RestorePolicy
from kernel.transfer import Acceptance, Limits, TransferError
from resurrector.receive import ReceiveFaults, Receiver
from store.signing import KeyRing, load_keyring

log = structlog.get_logger(component="tcpcp.demo")

T = TypeVar("T")
_CYCLE = bytes(range(251)) * 300
MAX_CONTROL_LINE = 64 << 10
CONTROL_TIMEOUT_S = 10.0
MAX_CONTROL_CLIENTS = 8
MAX_TRANSFERS = 4
_UCRED = struct.Struct("3i")
SO_BUF_LOCK = 72
"""Linux >= 5.14: which socket buffer sizes the application fixed (autotuning off for them)."""


class ControlError(ValueError):
    """A control request that does not fit; the message says what was expected."""


def counting(offset: int, n: int) -> bytes:
    """n bytes of the counting stream from position offset (byte i is i mod 251)."""
    out = bytearray()
    while len(out) < n:
        start = (offset + len(out)) % 251
        out += _CYCLE[start : start + min(n - len(out), len(_CYCLE) - 251)]
    return bytes(out)


def http_header(size: int) -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nContent-Type: application/octet-stream"
            f"\r\nConnection: close\r\n\r\n").encode()


def http_response(size: int, pos: int, n: int) -> bytes:
    """Bytes pos..pos+n of the response to GET /<size> (header, then the counting body)."""
    head = http_header(size)
    end = min(len(head) + size, pos + n)
    out = head[pos:end] if pos < len(head) else b""
    body_from = max(pos, len(head)) - len(head)
    return out + counting(body_from, end - len(head) - body_from) if end > len(head) else out


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value.strip())
    return 0


def upload_reply(received: int, errors: int) -> bytes:
    """The answer to an upload: what arrived and how many reads broke the counting stream."""
    body = f"{received} {errors}\n".encode()
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode() + body


_KINDS = ("new", "echo", "http", "upload")
_MAX_INBUF = 8 << 10
_MAX_PENDING = 4 << 20


@dataclass(slots=True)
class AppState:
    """What the application knows about one connection; travels with its ICI when passed."""

    kind: str = "new"        # new | echo | http | upload
    inbuf: bytes = b""       # request bytes not yet understood
    in_offset: int = 0       # echo, upload: stream bytes received and checked
    pending: bytes = b""     # echo: received, not yet handed to the kernel
    size: int = 0            # http: body size; upload: Content-Length
    rate: int = 0            # http: bytes per second the server paces itself to (0: no pacing)
    pos: int = 0             # http, upload: response bytes handed to the kernel
    errors: int = 0          # inbound bytes that broke the counting stream

    def encode(self) -> bytes:
        return json.dumps({
            "kind": self.kind, "inbuf": base64.b64encode(self.inbuf).decode(),
            "in_offset": self.in_offset, "pending": base64.b64encode(self.pending).decode(),
            "size": self.size, "rate": self.rate, "pos": self.pos, "errors": self.errors,
        }).encode()

    @classmethod
    def decode(cls, raw: bytes) -> AppState:
        """Strict inverse of encode(): ValueError naming the field that does not fit."""
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"application state: expected a JSON object, got {raw[:60]!r}"
                             ) from exc
        if not isinstance(d, dict):
            raise ValueError(f"application state: expected a JSON object, got {type(d).__name__}")
        if d.get("kind") not in _KINDS:
            raise ValueError(f"application state kind: expected one of {_KINDS}, "
                             f"got {d.get('kind')!r}")
        ints = {}
        for name in ("in_offset", "size", "rate", "pos", "errors"):
            v = d.get(name)
            if type(v) is not int or not 0 <= v < 1 << 62:
                raise ValueError(f"application state {name}: expected a non-negative integer, "
                                 f"got {v!r}")
            ints[name] = v
        blobs = {}
        for name, cap in (("inbuf", _MAX_INBUF), ("pending", _MAX_PENDING)):
            v = d.get(name)
            try:
                blobs[name] = base64.b64decode(v, validate=True) if isinstance(v, str) else None
            except ValueError:
                blobs[name] = None
            if blobs[name] is None or len(blobs[name] or b"") > cap:
                raise ValueError(f"application state {name}: expected base64 of at most {cap} "
                                 f"bytes, got {str(v)[:40]!r}")
        return cls(d["kind"], blobs["inbuf"] or b"", ints["in_offset"], blobs["pending"] or b"",
                   ints["size"], ints["rate"], ints["pos"], ints["errors"])


@dataclass(slots=True)
class Conn:
    sock: socket.socket
    state: AppState = field(default_factory=AppState)
    closing: bool = False
    paced_at: float = 0.0    # when the pacing budget was last computed


def flow_json(f: Identity) -> dict[str, object]:
    return {"family": int(f.family), "local": str(f.local_ip), "local_port": f.local_port,
            "peer": str(f.peer_ip), "peer_port": f.peer_port}


def flow_from_json(d: dict[str, Any]) -> Identity:
    import ipaddress

    fam = Family(int(d["family"]))
    return Identity(fam, ipaddress.ip_address(d["local"]).packed, int(d["local_port"]),
                    ipaddress.ip_address(d["peer"]).packed, int(d["peer_port"]))


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              _UCRED.size))
    return int(uid)


def bind_control(path: str) -> socket.socket:
    """A listening unix socket at path, mode 0600. An existing path is replaced only when it is
    a stale socket of this user (nobody listening); anything else is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ControlError(f"control path {path}: exists and is not a socket owned by uid "
                               f"{os.geteuid()}; refusing to replace it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
            else:
                raise ControlError(f"control path {path}: another server listens on it")
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        ctl.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    ctl.listen(16)
    ctl.setblocking(False)
    return ctl


def read_line(sock: socket.socket, deadline: float, limit: int = MAX_CONTROL_LINE) -> bytes:
    """One line of at most `limit` bytes before `deadline` (monotonic); ControlError otherwise."""
    buf = bytearray()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ControlError(f"expected a line within {CONTROL_TIMEOUT_S:g} s, got "
                               f"{len(buf)} bytes")
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        if not chunk:
            raise ControlError(f"client closed after {len(buf)} bytes of a line")
        buf += chunk
        if len(buf) > limit and b"\n" not in buf[:limit + 1]:
            raise ControlError(f"expected a line of at most {limit} bytes")
    line, _, _ = bytes(buf).partition(b"\n")
    return line


def parse_request(line: bytes, allow_faults: bool) -> dict[str, Any]:
    """Validate one control request; ControlError says what was expected."""
    try:
        cmd = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError(f"expected a JSON object, got {line[:80]!r}") from None
    if not isinstance(cmd, dict):
        raise ControlError(f"expected a JSON object, got {type(cmd).__name__}")
    name = cmd.get("cmd")
    if name == "status":
        return cmd
    if name == "fault":
        if not allow_faults:
            raise ControlError("fault injection is off (start the server with --allow-faults)")
        rf = cmd.get("receive")
        if not isinstance(rf, dict) or rf.get("step") not in ("restore", "activate", "no_done") \
                or type(rf.get("index", 0)) is not int:
            raise ControlError('fault: expected {"receive": {"step": "restore"|"activate"|'
                               '"no_done", "index": N}}')
        return cmd
    if name != "pass":
        raise ControlError(f'expected "cmd" status, pass or fault, got {name!r}')
    to = cmd.get("to")
    host, sep, port = to.rpartition(":") if isinstance(to, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ControlError(f'pass: expected "to" as HOST:PORT with a port 1..65535, got {to!r}')
    to_name = cmd.get("to_name")
    if not isinstance(to_name, str) or not 0 < len(to_name.encode()) <= 255:
        raise ControlError(f'pass: expected "to_name", the destination\'s name, got {to_name!r}')
    count = cmd.get("count", 0)
    if type(count) is not int or count < 0:
        raise ControlError(f'pass: expected "count" as an integer >= 0, got {count!r}')
    fault = cmd.get("fault")
    if fault is not None:
        if not allow_faults:
            raise ControlError("fault injection is off (start the server with --allow-faults)")
        steps = {s.value for s in Step}
        if not isinstance(fault, dict) or fault.get("step") not in steps \
                or type(fault.get("after", 0)) is not int:
            raise ControlError(f'pass: expected "fault" as {{"step": one of {sorted(steps)}, '
                               '"after": N}')
    return cmd


class OperatorSwitch:
    """The pass's traffic switch, done by the operator on the control connection."""

    def __init__(self, client: socket.socket, timeout_s: float) -> None:
        self.client, self.timeout_s = client, timeout_s

    def _ask(self, event: str, flows: Sequence[Identity], answer: str) -> None:
        self.client.sendall(json.dumps({"event": event, "flows": [flow_json(f) for f in flows]})
                            .encode() + b"\n")
        line = read_line(self.client, time.monotonic() + self.timeout_s)
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or reply.get("cmd") != answer:
            raise ControlError(f"expected {{\"cmd\": \"{answer}\"}} from the operator, "
                               f"got {line[:200]!r}")

    def move(self, flows: Sequence[Identity]) -> None:
        self._ask("restored", flows, "switched")

    def back(self, flows: Sequence[Identity]) -> None:
        self._ask("switch_back", flows, "switched_back")


class DemoServer:
    """Single-threaded selector loop for the service; passes and transfers in worker threads,
    which reach the loop's state only through call() (run on the loop, result handed back)."""

    def __init__(self, listen: Sequence[str], port: int, control: str, *, name: str,
                 keyring: KeyRing, receiver: Receiver | None, receive_on: tuple[str, int] | None,
                 isolation: FlowIsolation, epoch: int = 0, allow_uids: Sequence[int] = (),
                 allow_faults: bool = False, pass_timeout_s: float = 60.0) -> None:
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self.name, self.keyring, self.epoch = name, keyring, epoch
        self.receiver = receiver
        self.isolation = isolation
        self.allow_uids = {0, os.geteuid(), *allow_uids}
        self.allow_faults = allow_faults
        self.pass_timeout_s = pass_timeout_s
        self.errors_closed = 0
        self.served = 0
        self.refused_requests = 0
        self.transfers_refused = 0
        self._receive_fault: ReceiveFaults | None = None
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._calls = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._run_calls)
        self._control_slots = threading.BoundedSemaphore(MAX_CONTROL_CLIENTS)
        self._transfer_slots = threading.BoundedSemaphore(MAX_TRANSFERS)
        for addr in listen:
            self._listen(addr, port, self._accept)
        if receive_on is not None:
            self._listen(receive_on[0], receive_on[1], self._receive, freebind=False)
        ctl = bind_control(control)
        self._control_ino = os.stat(control).st_ino
        self.sel.register(ctl, selectors.EVENT_READ, self._control)
        self.control_path = control

    def _listen(self, addr: str, port: int, handler: Callable[[socket.socket], None], *,
                freebind: bool = True) -> None:
        af = socket.AF_INET6 if ":" in addr else socket.AF_INET
        ls = socket.socket(af, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if freebind and af == socket.AF_INET:  # the service address may come with a switch
            ls.setsockopt(socket.IPPROTO_IP, repair.IP_FREEBIND, 1)
        elif freebind:
            ls.setsockopt(socket.IPPROTO_IPV6, repair.IPV6_FREEBIND, 1)
        ls.bind((addr, port))
        ls.listen(4096)
        ls.setblocking(False)
        self.sel.register(ls, selectors.EVENT_READ, handler)

    # ---------------------------------------------------------- calls from worker threads
    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run fn on the loop (from a worker thread) and return its result."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((fn, fut))
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")
        return fut.result(timeout)

    def _run_calls(self, _: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    # ---------------------------------------------------------- connections
    def _adopt(self, sock: socket.socket, state: AppState) -> None:
        sock.setblocking(False)
        conn = Conn(sock, state, paced_at=time.monotonic())
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._io)

    def _accept(self, ls: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            for _ in range(256):
                sock, _ = ls.accept()
                self._adopt(sock, AppState())

    def _close(self, conn: Conn) -> None:
        self.sel.unregister(conn.sock)
        del self.conns[conn.sock.fileno()]
        self.errors_closed += conn.state.errors
        conn.sock.close()

    def _io(self, sock: socket.socket, mask: int = selectors.EVENT_READ) -> None:
        conn = self.conns[sock.fileno()]
        st = conn.state
        try:
            if mask & selectors.EVENT_READ and len(st.pending) < (1 << 20):
                data = sock.recv(65536)
                if not data:
                    self._close(conn)
                    return
                self._consume(conn, data)
            self._flush(conn)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            log.warning("conn_error", conn=_name(sock), error=str(exc))
            self._close(conn)

    def _consume(self, conn: Conn, data: bytes) -> None:
        st = conn.state
        if st.kind == "new":
            st.inbuf += data
            method = next((m for m in (b"GET ", b"PUT ") if st.inbuf.startswith(m[: len(
                st.inbuf)])), None)
            if method is not None:
                head, sep, rest = st.inbuf.partition(b"\r\n\r\n")
                if not sep:
                    if len(st.inbuf) > _MAX_INBUF:
                        raise OSError("request header too long")
                    return
                target = head.split(b" ", 2)[1].strip(b"/") if b" " in head else b""
                st.inbuf = b""
                self.served += 1
                if method == b"GET ":
                    size, _, rate = target.partition(b"/")
                    st.kind = "http"
                    st.size = int(size) if size.isdigit() else 0
                    st.rate = int(rate) if rate.isdigit() else 0
                    conn.paced_at = time.monotonic()
                    return
                st.kind, st.size = "upload", _content_length(head)
                data = rest
            else:
                st.kind, data, st.inbuf = "echo", st.inbuf, b""
        if st.kind in ("echo", "upload"):
            if st.kind == "upload":
                data = data[: max(0, st.size - st.in_offset)]
            if data != counting(st.in_offset, len(data)):
                st.errors += 1
                log.error("stream_broken", conn=_name(conn.sock), at=st.in_offset, n=len(data))
            st.in_offset += len(data)
            if st.kind == "echo":
                st.pending += data

    def _flush(self, conn: Conn) -> None:
        st, sock = conn.state, conn.sock
        with contextlib.suppress(BlockingIOError, InterruptedError):
            if st.kind == "echo":
                while st.pending:
                    st.pending = st.pending[sock.send(st.pending):]
            elif st.kind == "upload" and st.in_offset >= st.size:
                reply = upload_reply(st.in_offset, st.errors)
                while st.pos < len(reply):
                    st.pos += sock.send(reply[st.pos:])
                if not conn.closing:
                    conn.closing = True
                    sock.shutdown(socket.SHUT_WR)
            elif st.kind == "http":
                total = len(http_header(st.size)) + st.size
                budget = total
                if st.rate:
                    now = time.monotonic()
                    budget = min(int((now - conn.paced_at) * st.rate), st.rate // 10)
                    conn.paced_at = now if budget > 0 else conn.paced_at
                end = min(total, st.pos + budget)
                while st.pos < end:
                    st.pos += sock.send(http_response(st.size, st.pos, min(1 << 16, end - st.pos)))
                if st.pos == total and not conn.closing:
                    conn.closing = True
                    sock.shutdown(socket.SHUT_WR)
        want = selectors.EVENT_READ
        if st.pending or (st.kind == "http" and not conn.closing and not st.rate) or (
                st.kind == "upload" and st.in_offset >= st.size and not conn.closing):
            want |= selectors.EVENT_WRITE
        self.sel.modify(sock, want, self._io)

    # ---------------------------------------------------------- receiving passed connections
    def _receive(self, ls: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            ctl, addr = ls.accept()
            if not self._transfer_slots.acquire(blocking=False):
                self.transfers_refused += 1
                log.warning("transfer_refused", sender=str(addr),
                            reason=f"more than {MAX_TRANSFERS} transfers at once")
                ctl.close()
                return
            fault, self._receive_fault = self._receive_fault, None
            threading.Thread(target=self._receive_in_thread, args=(ctl, addr, fault),
                             name="transfer", daemon=True).start()

    def _receive_in_thread(self, ctl: socket.socket, addr: object,
                           fault: ReceiveFaults | None) -> None:
        try:
            def adopt(live: list[tuple[socket.socket, bytes]]) -> None:
                decoded = [(s, AppState.decode(raw)) for s, raw in live]  # checked at restore

                def on_loop() -> None:
                    for sock, state in decoded:
                        self._adopt(sock, state)

                self.call(on_loop)

            with ctl:
                assert self.receiver is not None
                self.receiver.serve(ctl, faults=fault, adopt=adopt)
        except (TransferError, OSError, KernelError) as exc:
            self.transfers_refused += 1
            log.warning("transfer_refused", sender=str(addr), error=str(exc))
        finally:
            self._transfer_slots.release()

    # ---------------------------------------------------------- control
    def _control(self, ls: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            client, _ = ls.accept()
            try:
                uid = peer_uid(client)
            except OSError:
                uid = -1
            if uid not in self.allow_uids:
                self.refused_requests += 1
                log.warning("control_refused", uid=uid, allowed=sorted(self.allow_uids))
                with contextlib.suppress(OSError):
                    client.setblocking(True)
                    client.settimeout(1)
                    client.sendall(json.dumps({"event": "error", "error": f"uid {uid} may not "
                                               "use this control socket"}).encode() + b"\n")
                client.close()
                return
            if not self._control_slots.acquire(blocking=False):
                self.refused_requests += 1
                client.close()
                return
            threading.Thread(target=self._control_in_thread, args=(client,), name="control",
                             daemon=True).start()

    def _control_in_thread(self, client: socket.socket) -> None:
        try:
            with client:
                client.setblocking(True)
                try:
                    cmd = parse_request(read_line(client, time.monotonic() + CONTROL_TIMEOUT_S),
                                        self.allow_faults)
                    if cmd["cmd"] == "status":
                        reply = self.call(self._status)
                    elif cmd["cmd"] == "fault":
                        rf = cmd["receive"]
                        self._receive_fault = ReceiveFaults(rf["step"], rf.get("index", 0))
                        reply = {"event": "armed"}
                    else:
                        reply = self._pass(cmd, client)
                except ControlError as exc:
                    self.refused_requests += 1
                    log.warning("control_request_refused", error=str(exc))
                    reply = {"event": "error", "error": str(exc)}
                with contextlib.suppress(OSError):
                    client.settimeout(CONTROL_TIMEOUT_S)
                    client.sendall(json.dumps(reply).encode() + b"\n")
        except Exception as exc:  # never let a control client take the server down
            log.error("control_failed", error=str(exc))
        finally:
            self._control_slots.release()

    def _detach(self, count: int) -> list[Conn]:
        chosen = list(self.conns.values())[: count or None]  # half-closed ones too
        for conn in chosen:
            self.sel.unregister(conn.sock)
            del self.conns[conn.sock.fileno()]
            conn.sock.setblocking(True)
        return chosen

    def _pass(self, cmd: dict[str, Any], client: socket.socket) -> dict[str, object]:
        host, _, port = str(cmd["to"]).rpartition(":")
        fault = cmd.get("fault")
        faults = Faults(Step(fault["step"]), fault.get("after", 0)) if fault else None
        chosen = self.call(lambda: self._detach(int(cmd.get("count") or 0)))
        by_sock = {c.sock: c for c in chosen}
        result: PassResult
        try:
            result, kept = pass_out(
                [(c.sock, c.state.encode()) for c in chosen], (host.strip("[]"), int(port)),
                Party(self.name, cmd["to_name"], self.epoch), self.keyring, self.isolation,
                OperatorSwitch(client, self.pass_timeout_s),
                limits=Limits(max_items=max(len(chosen), 1)), timeout_s=self.pass_timeout_s,
                faults=faults)
        except BaseException:
            # pass_out reports failures in its result; this is a bug: keep what is still ours
            log.exception("pass_crashed")
            def keep() -> None:
                for c in chosen:
                    if c.sock.fileno() >= 0:
                        self._adopt(c.sock, c.state)

            self.call(keep)
            raise

        def readopt() -> None:
            for sock, _ in kept:
                conn = by_sock[sock]
                self._adopt(sock, conn.state)

        self.call(readopt)
        ended = {e.value: [[str(f), end.reason] for f, end in result.ends if end.ending is e]
                 for e in (Ending.RESUMED, Ending.CLOSED)}
        return {"event": "failed" if result.error else "passed", "error": result.error,
                "passed": result.count(Ending.PASSED), "resumed": ended["resumed"],
                "closed": ended["closed"],
                "timings_us": {k: round(v) for k, v in result.timings_us.items()}}

    def _status(self) -> dict[str, object]:
        kinds: dict[str, int] = {}
        locked = 0
        for c in self.conns.values():
            kinds[c.state.kind] = kinds.get(c.state.kind, 0) + 1
            with contextlib.suppress(OSError):
                locked += bool(c.sock.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK))
        return {"event": "status", "conns": len(self.conns), "kinds": kinds,
                "errors": self.errors_closed + sum(c.state.errors for c in self.conns.values()),
                "served": self.served, "buffers_locked": locked,
                "refused_requests": self.refused_requests,
                "transfers_refused": self.transfers_refused}

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        log.info("demo_up", control=self.control_path, name=self.name)
        try:
            while stop is None or not stop.is_set():
                paced = [c for c in self.conns.values() if c.state.rate and not c.closing]
                for c in paced:
                    try:
                        self._flush(c)
                    except OSError as exc:
                        log.warning("conn_error", conn=_name(c.sock), error=str(exc))
                        self._close(c)
                for key, mask in self.sel.select(timeout=0.01 if paced else 0.2):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if key.data != self._io:
                        key.data(sock)
                    elif sock.fileno() in self.conns:  # not closed by an earlier event
                        self._io(sock, mask)
        finally:
            self.isolation.close()
            with contextlib.suppress(OSError):
                if os.stat(self.control_path).st_ino == self._control_ino:
                    os.unlink(self.control_path)


def _name(sock: socket.socket) -> str:
    try:
        return str(flow_of(sock))
    except (OSError, ValueError):
        return f"fd {sock.fileno()}"


class EchoPeers:
    """The peer side of the echo demo: many connections sending the counting stream and
    checking that exactly the same bytes come back, in order, once. Run in a thread."""

    def __init__(self, socks: Sequence[socket.socket], chunk: int = 1000,
                 interval_s: float = 0.005, window: int = 1 << 16) -> None:
        self.socks = list(socks)
        self.sent = [0] * len(socks)
        self.received = [0] * len(socks)
        self.errors: dict[int, str] = {}
        self.chunk, self.interval_s, self.window = chunk, interval_s, window
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-peers", daemon=True)
        self._drained = threading.Event()

    def __enter__(self) -> EchoPeers:
        for s in self.socks:
            s.setblocking(False)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=60)

    def finish(self, timeout_s: float = 30.0) -> bool:
        """Stop sending, wait until every echo is back; True when all are complete."""
        self.stop.set()
        self._thread.join(timeout=timeout_s)
        return self._drained.is_set()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for i, s in enumerate(self.socks):
            sel.register(s, selectors.EVENT_READ, i)
        next_send = time.monotonic()
        deadline = None
        while True:
            now = time.monotonic()
            if self.stop.is_set():
                deadline = deadline or now + 30.0
                if all(r == t for r, t in zip(self.received, self.sent, strict=True)) \
                        or now > deadline:
                    break
            elif now >= next_send:
                next_send = now + self.interval_s
                for i, s in enumerate(self.socks):
                    if i in self.errors or self.sent[i] - self.received[i] > self.window:
                        continue
                    with contextlib.suppress(BlockingIOError):
                        self.sent[i] += s.send(counting(self.sent[i], self.chunk))
            for key, _ in sel.select(timeout=self.interval_s):
                i = key.data
                try:
                    data = self.socks[i].recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self.errors[i] = f"recv failed: {exc}"
                    sel.unregister(self.socks[i])
                    continue
                if not data:
                    self.errors[i] = f"closed by the server after {self.received[i]} bytes"
                    sel.unregister(self.socks[i])
                elif data != counting(self.received[i], len(data)):
                    self.errors[i] = f"echo differs from what was sent at {self.received[i]}"
                    sel.unregister(self.socks[i])
                else:
                    self.received[i] += len(data)
        if all(r == t for r, t in zip(self.received, self.sent, strict=True)):
            self._drained.set()
        sel.close()


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(hard, 65536)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def kernel_queue_maxima(floor: int = 16 << 20) -> tuple[int, int]:
    """(send, receive): the most this network namespace's kernel lets a socket queue
    (tcp_wmem and tcp_rmem maxima), at least floor."""
    def top(name: str) -> int:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])

    return max(top("tcp_wmem"), floor), max(top("tcp_rmem"), floor)


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected ADDRESS:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="demo_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True,
                   help="this host's name in passing (signed into every batch it sends or takes)")
    p.add_argument("--keys", required=True,
                   help="signing key file (the store's key ring JSON): batches and reports are "
                   "signed and checked with it")
    p.add_argument("--accept-from", action="append", default=[], metavar="NAME",
                   help="origin whose passed connections this host accepts (repeatable; none: "
                   "this host receives nothing)")
    p.add_argument("--epoch", type=int, default=0,
                   help="the epoch this host passes under (its lease's fencing token)")
    p.add_argument("--listen", action="append", required=True,
                   help="service address to listen on (repeatable)")
    p.add_argument("--port", type=int, default=8080, help="service port")
    p.add_argument("--receive-on", type=_hostport, metavar="ADDRESS:PORT",
                   help="where passed connections arrive: this host's own address (never all "
                   "addresses)")
    p.add_argument("--control", required=True, help="unix socket path for tcpcp pass (mode 0600)")
    p.add_argument("--allow-uid", action="append", type=int, default=[],
                   help="uid besides root and this process's that may use the control socket")
    p.add_argument("--serve", action="append", default=[],
                   help="local address this host may restore connections for (repeatable)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="largest send or receive queue a restored connection may carry, in bytes "
                   "(default: what this kernel lets a socket queue, tcp_wmem and tcp_rmem's "
                   "maxima, at least 16 MiB: a slow reader's connection stays passable)")
    p.add_argument("--max-transfer", type=int, default=256 << 20,
                   help="largest batch of passed connections this host reads, in bytes")
    p.add_argument("--isolation", choices=("gate", "nft"), default="gate",
                   help="how passed flows are isolated: the ACK gate's freeze plus the ingress "
                   "quarantine on eth0 (default), or nftables drops (no BPF needed)")
    p.add_argument("--transfer-timeout", type=float, default=10.0,
                   help="seconds a sender has for each frame of a pass (plus 1 s per MiB)")
    p.add_argument("--allow-faults", action="store_true",
                   help="accept fault-injection requests on the control socket (tests only)")
    return p


def main(args: argparse.Namespace) -> int:
    raise_fd_limit()
    keyring = load_keyring(args.keys)
    policy = RestorePolicy.serving(*args.serve)
    send_max, recv_max = kernel_queue_maxima()
    policy = dataclasses.replace(policy, max_send_queue=args.max_queue or send_max,
                                 max_recv_queue=args.max_queue or recv_max)
    isolation: FlowIsolation = (GateIsolation("eth0") if args.isolation == "gate"
                                else Isolation(table=f"tcpcp_demo_{os.getpid()}"))
    receiver = None
    if args.accept_from:
        receiver = Receiver(Acceptance(args.name, frozenset(args.accept_from)), keyring, policy,
                            isolation=isolation, accept_state=AppState.decode,
                            limits=Limits.for_policy(policy, max_frame=args.max_transfer),
                            timeout_s=args.transfer_timeout)
    server = DemoServer(args.listen, args.port, args.control, name=args.name, keyring=keyring,
                        receiver=receiver, receive_on=args.receive_on, isolation=isolation,
                        epoch=args.epoch, allow_uids=args.allow_uid,
                        allow_faults=args.allow_faults)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.serve_forever(stop)
    return 0


if __name__ == "__main__":
    from ops import logs

    logs.configure()
    raise SystemExit(main(build_parser().parse_args()))
