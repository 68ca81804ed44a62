"""An upload sink that commits every read through the checkpointer agent: the smallest guarded
application, for the crash tests and the failover benchmark.

    python -m ops.apps.sink --listen 0.0.0.0:5001 --checkpointer /run/tcpcp/checkpointer.sock

Each connection: read up to --chunk bytes, commit (state: {"n": bytes read so far}, consumed = n),
think --think-ms, again; at the end of stream commit it (consumed n, end_of_stream), answer one
byte b"k", close through the agent. Nothing is written before the end, so output is trivially
regenerable. A standby resumes a connection from its checkpoint with finish(): it reads on from
position n and answers the same byte; `--adopt HANDOVER_SOCKET` does that for every connection
the resurrector hands over. With `--checkpointer` too (the standby's checkpointer, run with
--standby), each adopted connection is guarded there and committed as on the origin, so a
failure of the standby (a fail back) is survived as well.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

import structlog

from checkpointer.api import ApiError, ErrorCode
from checkpointer.client import Checkpointer, Guarded
from ops import logs
from resurrector.adopt import adopt, inherited

log = structlog.get_logger(component="tcpcp.ops.apps.sink")


def state(n: int, end: bool = False) -> bytes:
    return json.dumps({"n": n, **({"end": True} if end else {})}).encode()


def _commit(g: Guarded, n: int, end: bool = False) -> None:
    """Commit, waiting out UNAVAILABLE (the agent fenced: store unreachable) for up to 60 s."""
    deadline = time.monotonic() + 60
    while True:
        try:
            g.commit(state(n, end), consumed=n, end_of_stream=end)
            return
        except ApiError as exc:
            if exc.code is not ErrorCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def serve_one(cp: Checkpointer, conn: socket.socket, chunk: int, think_s: float,
              on_data: Callable[[bytes], None] | None = None, start: int = 0) -> int:
    """Guard conn (`start` bytes of it consumed already: an adopted connection), read and commit
    it to its end, answer b"k", close; the total of bytes consumed."""
    g = cp.guard(conn, consumed=start, state=state(start))
    n = start
    while True:
        data = conn.recv(chunk)
        if not data:
            _commit(g, n, end=True)
            break
        n += len(data)
        if on_data is not None:
            on_data(data)
        _commit(g, n)
        if think_s:
            time.sleep(think_s)
    conn.sendall(b"k")
    g.close()
    conn.close()
    return n


def finish(sock: socket.socket, on_data: Callable[[bytes], None] | None = None) -> int:
    """The standby's side: read a resurrected connection to its end, answer b"k", close; the
    bytes read here."""
    n = 0
    while data := sock.recv(1 << 20):
        n += len(data)
        if on_data is not None:
            on_data(data)
    sock.sendall(b"k")
    sock.close()
    return n


def _finish_logged(sock: socket.socket, conn: str, consumed: int,
                   cp: Checkpointer | None = None, chunk: int = 65536,
                   think_s: float = 0.0) -> None:
    if cp is None:
        n = finish(sock)
    else:  # guarded here too: a failure of this host is survived as the origin's was
        n = serve_one(cp, sock, chunk, think_s, start=consumed) - consumed
    log.info("finished", conn=conn, consumed=consumed, read_here=n, total=consumed + n,
             guarded=cp is not None)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.apps.sink", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--listen", metavar="ADDR:PORT", help="serve uploads here")
    p.add_argument("--checkpointer", metavar="SOCKET_PATH", help="the agent's socket (with "
                   "--adopt: the standby's checkpointer, which guards the adopted connections)")
    p.add_argument("--adopt", metavar="HANDOVER_SOCKET",
                   help="instead: the standby's side, finish every connection the resurrector "
                   "hands over on this socket")
    p.add_argument("--adopt-inherited", action="store_true",
                   help="instead: finish the connections this process was started with by "
                   "`resurrector --exec` (LISTEN_FDS), then exit")
    p.add_argument("--chunk", type=int, default=65536, help="bytes read at most per commit")
    p.add_argument("--think-ms", type=float, default=0.0, help="work after each commit")
    args = p.parse_args(argv)
    logs.configure()  # TCPCP_LOG_FORMAT / TCPCP_LOG_LEVEL
    if args.adopt_inherited:
        adopted_now = inherited()
        log.info("adopting_inherited", connections=len(adopted_now))
        threads = [threading.Thread(target=_finish_logged, args=(
            a.sock, a.conn, a.consumed, None, args.chunk, args.think_ms / 1000))
            for a in adopted_now]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return 0
    if args.adopt:
        log.info("adopting", handover=args.adopt, checkpointer=args.checkpointer)
        standby = None
        if args.checkpointer:  # the standby's checkpointer: it may still be waiting for its
            standby = Checkpointer(args.checkpointer, name="sink")  # lease; connect on use
        for adopted in adopt(args.adopt):
            log.info("adopted", conn=adopted.conn, consumed=adopted.consumed)
            if standby is not None:
                standby.reconnect(120)  # returns at once when connected
            threading.Thread(target=_finish_logged, daemon=True,
                             args=(adopted.sock, adopted.conn, adopted.consumed, standby,
                                   args.chunk, args.think_ms / 1000)).start()
        return 0
    if not (args.listen and args.checkpointer):
        p.error("expected --listen and --checkpointer (or --adopt)")
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    lst = socket.create_server((host, int(port)),
                               family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    with Checkpointer(args.checkpointer, name="sink") as cp:
        cp.guard_listener(lst)
        log.info("listening", address=args.listen)
        while True:
            conn, _ = lst.accept()
            threading.Thread(target=serve_one, args=(cp, conn, args.chunk, args.think_ms / 1000),
                             daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
