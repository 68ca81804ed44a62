"""The demo application for connection passing: a counting-byte echo and an HTTP file server.

A peer that sends the counting stream (byte i is i mod 251) gets every byte echoed back; the
server checks the stream it receives, so a byte lost or repeated in either direction shows.
`GET /<size> HTTP/1.1` answers a body of <size> counting bytes (regenerable output: the state
is the position in the response). One process per host:

    python -m kernel.demo_server --listen 10.77.9.1 --listen fd77:9::1 --port 8080 \\
        --receive-port 7070 --control /run/tcpcp-demo-origin.sock --serve 10.77.9.1 ...

The control socket (unix, JSON lines) takes {"cmd": "status"} and {"cmd": "pass", "to":
"HOST:PORT", "count": N}; a pass reports {"event": "restored"} and waits for
{"cmd": "switched"} (the operator moves the traffic) before activation. See kernel/passcli.py.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from kernel import passing, repair
from kernel.errors import KernelError
from kernel.sanity import RestorePolicy

log = structlog.get_logger("tcpcp.demo")

_CYCLE = bytes(range(251)) * 300


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


@dataclass(slots=True)
class AppState:
    """What the application knows about one connection; travels with its ICI when passed."""

    kind: str = "new"        # new | echo | http
    inbuf: bytes = b""       # request bytes not yet understood
    in_offset: int = 0       # echo: stream bytes received and checked
    pending: bytes = b""     # echo: received, not yet handed to the kernel
    size: int = 0            # http: body size
    rate: int = 0            # http: bytes per second the server paces itself to (0: no pacing)
    pos: int = 0             # http: response bytes handed to the kernel
    errors: int = 0          # inbound bytes that broke the counting stream

    def encode(self) -> bytes:
        return json.dumps({
            "kind": self.kind, "inbuf": base64.b64encode(self.inbuf).decode(),
            "in_offset": self.in_offset, "pending": base64.b64encode(self.pending).decode(),
            "size": self.size, "rate": self.rate, "pos": self.pos, "errors": self.errors,
        }).encode()

    @classmethod
    def decode(cls, raw: bytes) -> AppState:
        d = json.loads(raw)
        return cls(d["kind"], base64.b64decode(d["inbuf"]), d["in_offset"],
                   base64.b64decode(d["pending"]), d["size"], d["rate"], d["pos"], d["errors"])


@dataclass(slots=True)
class Conn:
    sock: socket.socket
    state: AppState = field(default_factory=AppState)
    closing: bool = False
    paced_at: float = 0.0    # when the pacing budget was last computed


class DemoServer:
    """Single-threaded selector loop: service listeners, transfer receiver, control socket."""

    def __init__(self, listen: Sequence[str], port: int, receive_port: int, control: str,
                 policy: RestorePolicy, isolation: str = "gate") -> None:
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self.policy = policy
        self.isolation: passing.FlowIsolation = (
            passing.GateIsolation("eth0") if isolation == "gate"
            else passing.Isolation(table=f"tcpcp_demo_{os.getpid()}"))
        self.errors_closed = 0
        self.served = 0
        for addr in listen:
            self._listen(addr, port, self._accept)
        self._listen("::", receive_port, self._receive)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.bind(control)
        ctl.listen()
        self.sel.register(ctl, selectors.EVENT_READ, self._control)
        self.control_path = control

    def _listen(self, addr: str, port: int,
                handler: Callable[[socket.socket], None]) -> None:
        af = socket.AF_INET6 if ":" in addr else socket.AF_INET
        ls = socket.socket(af, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if af == socket.AF_INET:  # the service address may come with a switch, later
            ls.setsockopt(socket.IPPROTO_IP, repair.IP_FREEBIND, 1)
        else:
            ls.setsockopt(socket.IPPROTO_IPV6, repair.IPV6_FREEBIND, 1)
        ls.bind((addr, port))
        ls.listen(4096)
        ls.setblocking(False)
        self.sel.register(ls, selectors.EVENT_READ, handler)

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
            log.warning("conn_error", error=str(exc))
            self._close(conn)

    def _consume(self, conn: Conn, data: bytes) -> None:
        st = conn.state
        if st.kind == "new":
            st.inbuf += data
            if st.inbuf.startswith(b"GET "[: len(st.inbuf)]):
                if b"\r\n\r\n" not in st.inbuf:
                    return
                size, _, rate = st.inbuf.split(b" ", 2)[1].strip(b"/").partition(b"/")
                st.kind, st.size, st.rate, st.inbuf = "http", int(size or 0), int(rate or 0), b""
                conn.paced_at = time.monotonic()
                self.served += 1
                return
            st.kind, data, st.inbuf = "echo", st.inbuf, b""
        if st.kind == "echo":
            if data != counting(st.in_offset, len(data)):
                st.errors += 1
                log.error("stream_broken", at=st.in_offset, n=len(data))
            st.in_offset += len(data)
            st.pending += data

    def _flush(self, conn: Conn) -> None:
        st, sock = conn.state, conn.sock
        with contextlib.suppress(BlockingIOError, InterruptedError):
            if st.kind == "echo":
                while st.pending:
                    st.pending = st.pending[sock.send(st.pending):]
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
        if st.pending or (st.kind == "http" and not conn.closing and not st.rate):
            want |= selectors.EVENT_WRITE
        self.sel.modify(sock, want, self._io)

    # ---------------------------------------------------------- passing
    def _receive(self, ls: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            ctl, _ = ls.accept()
            with ctl:
                ctl.setblocking(True)
                ctl.settimeout(60)
                try:
                    live = passing.receive(ctl, self.policy, isolation=self.isolation)
                except (KernelError, OSError) as exc:
                    log.error("receive_failed", error=str(exc))
                    return
                for sock, raw in live:
                    self._adopt(sock, AppState.decode(raw))

    def _pass(self, cmd: dict[str, Any], client: socket.socket) -> dict[str, object]:
        host, _, port = str(cmd["to"]).rpartition(":")
        count = int(cmd.get("count") or 0)
        live = [c for c in self.conns.values() if not c.closing]  # FIN sent: not ESTABLISHED
        chosen = live[: count or None]
        for conn in chosen:
            self.sel.unregister(conn.sock)
            del self.conns[conn.sock.fileno()]
            conn.sock.setblocking(True)

        def switch() -> None:
            client.sendall(json.dumps({"event": "restored"}).encode() + b"\n")
            reply = client.makefile("rb").readline()
            if json.loads(reply or b"{}").get("cmd") != "switched":
                raise passing.PassingError(f"expected switched from the operator, got {reply!r}")

        try:
            result, kept = passing.pass_out(
                [(c.sock, c.state.encode()) for c in chosen], (host.strip("[]"), int(port)),
                self.isolation, switch)
        except Exception as exc:
            log.error("pass_failed", error=str(exc))
            if isinstance(exc, passing.PassingError) and exc.resumed:
                for c in chosen:
                    self._adopt(c.sock, c.state)
            return {"event": "failed", "error": str(exc)}
        for sock, raw in kept:
            self._adopt(sock, AppState.decode(raw))
        return {"event": "passed", "passed": len(result.passed),
                "refused": [[str(f), r] for f, r in result.resumed],
                "timings_us": {k: round(v) for k, v in result.timings_us.items()}}

    def _status(self) -> dict[str, object]:
        kinds: dict[str, int] = {}
        for c in self.conns.values():
            kinds[c.state.kind] = kinds.get(c.state.kind, 0) + 1
        return {"event": "status", "conns": len(self.conns), "kinds": kinds,
                "errors": self.errors_closed + sum(c.state.errors for c in self.conns.values()),
                "served": self.served}

    def _control(self, ls: socket.socket) -> None:
        client, _ = ls.accept()
        with client:
            client.settimeout(120)
            line = client.makefile("rb").readline()
            try:
                cmd = json.loads(line)
                if cmd.get("cmd") == "pass":
                    reply = self._pass(cmd, client)
                elif cmd.get("cmd") == "status":
                    reply = self._status()
                else:
                    reply = {"event": "error", "error": f"unknown command {cmd!r}"}
            except (ValueError, KeyError) as exc:
                reply = {"event": "error", "error": f"bad control line {line!r}: {exc}"}
            with contextlib.suppress(OSError):
                client.sendall(json.dumps(reply).encode() + b"\n")

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        log.info("demo_up", control=self.control_path)
        try:
            while stop is None or not stop.is_set():
                paced = [c for c in self.conns.values() if c.state.rate and not c.closing]
                for c in paced:
                    try:
                        self._flush(c)
                    except OSError as exc:
                        log.warning("conn_error", error=str(exc))
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.control_path)


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


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="demo_server", description=__doc__.splitlines()[0])
    p.add_argument("--listen", action="append", required=True,
                   help="service address to listen on (repeatable)")
    p.add_argument("--port", type=int, default=8080, help="service port")
    p.add_argument("--receive-port", type=int, default=7070,
                   help="TCP port on which passed connections arrive")
    p.add_argument("--control", required=True, help="unix socket path for tcpcp pass")
    p.add_argument("--serve", action="append", default=[],
                   help="local address this host may restore connections for (repeatable)")
    p.add_argument("--isolation", choices=("gate", "nft"), default="gate",
                   help="how passed flows are isolated: the ACK gate's freeze plus the ingress "
                   "quarantine on eth0 (default), or nftables drops (no BPF needed)")
    return p


def main(args: argparse.Namespace) -> int:
    raise_fd_limit()
    DemoServer(args.listen, args.port, args.receive_port, args.control,
               RestorePolicy.serving(*args.serve), args.isolation).serve_forever()
    return 0


if __name__ == "__main__":
    from ops import logs

    logs.configure()
    raise SystemExit(main(build_parser().parse_args()))
