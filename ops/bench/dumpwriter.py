"""Is a TCP_REPAIR dump safe beside an application that writes? The measurement behind
checkpointer/snapshot.py's choice of checkpoints without repair mode.

One connection over a veth pair (MTU 1500); a writer thread sends 4 KiB at a time as fast as it
can, the peer reads everything, and for --seconds the main thread dumps the writer's socket
with kernel.repair.dump every 5 ms. Then the same without dumps, as the baseline. Counted: the
send() errors the writer saw, the dumps that failed, and whether the peer got every byte the
writer was told were sent (a stall: the peer got nothing for 3 s while the writer was blocked).
Writes bench/dumpwriter.json.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from kernel import repair
from ops.kernel.guestnet import VethPair

log = structlog.get_logger(component="tcpcp.bench.dumpwriter")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=2.0, help="how long to dump (2)")
    parser.add_argument("--runs", type=int, default=3, help="runs with dumps (3)")
    parser.add_argument("--output", type=Path, default=Path("bench/dumpwriter.json"))


def _one(seconds: float, dump: bool) -> dict[str, Any]:
    with VethPair() as pair:
        server, client = pair.connect(4)
        stop = threading.Event()
        sent, errors = [0], dict[str, int]()
        got, stalled = [0], [False]

        def writer() -> None:
            buf = b"w" * 4096
            server.setblocking(False)
            while not stop.is_set():
                if not select.select([], [server], [], 0.2)[1]:
                    continue
                try:
                    sent[0] += server.send(buf)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    errors[f"send {name}"] = errors.get(f"send {name}", 0) + 1

        def reader() -> None:
            client.settimeout(3)
            try:
                while data := client.recv(65536):
                    got[0] += len(data)
            except TimeoutError:
                stalled[0] = got[0] < sent[0]

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        dumps, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            if dump:
                try:
                    repair.dump(server)
                    dumps += 1
                except repair.RepairError as exc:
                    key = f"dump {exc}".split(":")[0]
                    errors[key] = errors.get(key, 0) + 1
            time.sleep(0.005)
        stop.set()
        threads[0].join()
        threads[1].join()
        server.close()
        client.close()
    return {"dumps": dumps, "bytes_sent": sent[0], "bytes_received": got[0],
            "bytes_missing": sent[0] - got[0], "stalled": stalled[0], "errors": errors}


def run(args: argparse.Namespace) -> int:
    baseline = _one(args.seconds, dump=False)
    log.info("baseline", **baseline)
    runs = []
    for i in range(args.runs):
        r = _one(args.seconds, dump=True)
        log.info("with_dumps", run=i + 1, **r)
        runs.append(r)
    disturbed = sum(1 for r in runs if r["errors"] or r["stalled"] or r["bytes_missing"])
    results = {"baseline": baseline, "with_dumps": runs, "runs_disturbed": disturbed,
               "runs": args.runs}
    print(f"baseline (no dump): {baseline['bytes_sent'] / args.seconds / 1e6:.0f} MB/s, "
          f"errors {baseline['errors'] or 'none'}")
    for i, r in enumerate(runs, 1):
        print(f"run {i}: {r['dumps']} dumps; writer errors/dump failures {r['errors'] or 'none'};"
              f" missing {r['bytes_missing']} bytes; stalled {r['stalled']}")
    print(f"{disturbed} of {args.runs} runs with dumps disturbed the writer")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0
