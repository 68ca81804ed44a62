"""Checkpoint store: puts/s and put latency p50/p99 by record size, without and with WAIT 1.

Starts its own redis-server on 127.0.0.1 (temporary directory, free port) unless --url is
given; the no-durability runs go to it alone, then a replica is attached for the WAIT 1 runs.
For each record size (encoded, signed record bytes) it measures:
  single  one put() at a time, each waiting for its reply (and WAIT) before the next: the
          latency a checkpoint commit sees;
  batch   put_many() of --batch records in one round trip (one FCALL per 64 records, one
          WAIT for the whole set): the rate of bulk checkpoints.
Baselines, measured in the same run against the same server, say where a single put's time
goes: a redis-py PING loop (the round-trip floor for any one-at-a-time client), a redis-py loop
of raw `FCALL tcpcp_put` with a pre-encoded 1 KiB record (the library and redis-py without the
store's Python: no encoding, signing or checks), and `redis-benchmark -t set -d 1024 -P 1 -c 1`
(the C client's floor) when installed. Every figure is the best of --rounds interleaved rounds
(the machine is shared). Writes bench/store.json; keys puts_per_s_<size>, put_p50_us_<size>,
put_p99_us_<size> (single, no durability), the same with suffix _wait1,
batch_puts_per_s_<size>[_wait1], ping_per_s, raw_fcall_per_s_1k, redis_benchmark_set_per_s_1k,
put_vs_ping_<size> and put_vs_raw_fcall_1k (ratios), loadavg_1m (at the start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
import structlog

from store.client import CheckpointStore
from store.config import Durability, StoreConfig
from store.keys import OriginKeys
from store.record import Checkpoint, encode
from store.signing import KeyRing

log = structlog.get_logger(component="tcpcp.ops.bench.store")

SIZES = {"256": 256, "1k": 1024, "4k": 4096, "64k": 65536}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="use this Redis (no replica: WAIT 1 runs are skipped; "
                        "no redis-benchmark baseline)")
    parser.add_argument("--puts", type=int, default=5000,
                        help="single puts per size and durability (64k: a fifth of it)")
    parser.add_argument("--batch", type=int, default=1000, help="records per put_many call")
    parser.add_argument("--batches", type=int, default=10, help="put_many calls per run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; each figure is the best round")
    parser.add_argument("--output", type=Path, default=Path("bench/store.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _redis(replicaof: int | None = None) -> Iterator[int]:
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="tcpcp-bench-redis-")
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
            "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0",
            "--logfile", os.path.join(workdir, "redis.log")]
    if replicaof is not None:
        argv += ["--replicaof", "127.0.0.1", str(replicaof)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                break
            time.sleep(0.025)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_replica(port: int) -> None:
    admin = redis.Redis(port=port)
    for _ in range(400):
        admin.set("bench-probe", 1)
        if int(admin.wait(1, 50)) >= 1:
            return
    raise RuntimeError("replica never acknowledged writes")


def _checkpoint(keys: KeyRing, size: int, conn: str, epoch: int, version: int) -> Checkpoint:
    base = Checkpoint(origin="bench", conn=conn, epoch=epoch, version=version, time_ns=0,
                      inbound_consumed=0, outbound_produced=0, ici=b"i" * 96, app_state=b"",
                      send_queue=b"")
    pad = max(0, size - len(encode(base, keys)))
    return Checkpoint(origin="bench", conn=conn, epoch=epoch, version=version,
                      time_ns=time.time_ns(), inbound_consumed=version, outbound_produced=version,
                      ici=b"i" * 96, app_state=b"a" * (pad // 2),
                      send_queue=b"q" * (pad - pad // 2))


def _percentile(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def _measure(store: CheckpointStore, keys: KeyRing, size: int, puts: int, batch: int,
             batches: int) -> dict[str, float]:
    epoch = store.state("bench").epoch
    conns = [f"10.77.1.2:{40000 + i}>10.77.9.1:80" for i in range(100)]
    version = int(time.time_ns())  # above anything stored by an earlier run
    records = [_checkpoint(keys, size, conns[i % 100], epoch, version + i) for i in range(puts)]
    latencies: list[int] = []
    started = time.perf_counter_ns()
    for cp in records:
        t = time.perf_counter_ns()
        store.put(cp)
        latencies.append(time.perf_counter_ns() - t)
    single_s = (time.perf_counter_ns() - started) / 1e9
    version += puts
    bulk = [[_checkpoint(keys, size, f"b{i}", epoch, version + b) for i in range(batch)]
            for b in range(batches)]
    started = time.perf_counter_ns()
    for group in bulk:
        outcomes = store.put_many(group)
        assert all(o.error is None for o in outcomes), outcomes[0]
    batch_s = (time.perf_counter_ns() - started) / 1e9
    store.delete("bench", epoch, conns + [f"b{i}" for i in range(batch)])
    return {"puts_per_s": round(puts / single_s), "put_p50_us": _percentile(latencies, 0.50),
            "put_p99_us": _percentile(latencies, 0.99), "put_mean_us":
            round(statistics.fmean(latencies) / 1000, 1),
            "batch_puts_per_s": round(batch * batches / batch_s)}


def _ping_rate(url: str, n: int) -> float:
    """Round trips per second to the same server: the ceiling for one-at-a-time puts."""
    client = redis.Redis.from_url(url)
    started = time.perf_counter()
    for _ in range(n):
        client.execute_command("PING")
    return n / (time.perf_counter() - started)


def _raw_fcall_rate(url: str, keys: KeyRing, epoch: int, n: int) -> float:
    """`FCALL tcpcp_put` of one pre-encoded 1 KiB record per round trip, straight from redis-py:
    the library's cost without the store's Python (encoding, signing, checks, translation)."""
    client = redis.Redis.from_url(url)
    record = encode(_checkpoint(keys, 1024, "raw", epoch, 1), keys)
    origin_keys = OriginKeys("bench").all()
    version = time.time_ns()
    started = time.perf_counter()
    for i in range(n):
        reply = client.execute_command("FCALL", "tcpcp_put", 4, *origin_keys, epoch, 1_000_000,
                                       len(record), f"raw{i % 100}", version + i, record)
    elapsed = time.perf_counter() - started
    assert reply == [b"OK"], reply
    client.execute_command("FCALL", "tcpcp_delete", 4, *origin_keys, epoch,
                           *[f"raw{i}" for i in range(100)])
    return n / elapsed


def _redis_benchmark_rate(port: int, n: int) -> float | None:
    """SET of 1 KiB values, one client, no pipelining, by redis-benchmark (C): None if absent."""
    tool = shutil.which("redis-benchmark")
    if tool is None:
        return None
    out = subprocess.run([tool, "-h", "127.0.0.1", "-p", str(port), "-t", "set", "-d", "1024",
                          "-P", "1", "-c", "1", "-n", str(n), "--csv"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    for line in out.splitlines():  # "SET","37764.35",... (the header line starts with "test")
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] == "SET":
            return float(cells[1])
    raise RuntimeError(f"redis-benchmark printed no SET figure: {out!r}")


def _rounded(key: str, value: float) -> float:
    if key.startswith("put_vs"):
        return round(value, 3)
    return round(value, 1) if "_us" in key else round(value)


def _best(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the best round: highest rate, lowest latency."""
    best: dict[str, float] = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        best[key] = min(values) if "_us" in key else max(values)
    return best


def _run_all(url: str, port: int | None, keys: KeyRing, args: argparse.Namespace,
             durability: Durability, suffix: str, results: dict[str, float]) -> None:
    config = StoreConfig.standalone(url, durability=durability)
    with CheckpointStore.connect(config, keys) as store:
        epoch = store.lease_acquire("bench", "bench", ttl_ms=600_000)
        rounds: list[dict[str, float]] = []
        for _ in range(args.rounds):
            r: dict[str, float] = {"ping_per_s": _ping_rate(url, args.puts)}
            if not suffix:
                r["raw_fcall_per_s_1k"] = _raw_fcall_rate(url, keys, epoch, args.puts)
                rb = _redis_benchmark_rate(port, args.puts * 4) if port is not None else None
                if rb is not None:
                    r["redis_benchmark_set_per_s_1k"] = rb
            for name, size in SIZES.items():
                puts = args.puts if size < 65536 else max(100, args.puts // 5)
                batch = args.batch if size < 65536 else max(10, args.batch // 10)
                m = _measure(store, keys, size, puts, batch, args.batches)
                r.update({f"{key}_{name}": value for key, value in m.items()})
            rounds.append(r)
        best = _best(rounds)
        ping = best["ping_per_s"]
        print(f"durability {durability}: baseline {ping:.0f} PING round trips/s (redis-py, "
              f"one client, same server)")
        if "raw_fcall_per_s_1k" in best:
            best["put_vs_raw_fcall_1k"] = round(best["puts_per_s_1k"]
                                                / best["raw_fcall_per_s_1k"], 3)
            print(f"  raw FCALL tcpcp_put 1 KiB from redis-py: {best['raw_fcall_per_s_1k']:.0f}/s;"
                  f" redis-benchmark SET 1 KiB -P 1 -c 1: "
                  f"{best.get('redis_benchmark_set_per_s_1k', float('nan')):.0f}/s")
        for name in SIZES:
            best[f"put_vs_ping_{name}"] = round(best[f"puts_per_s_{name}"] / ping, 3)
            batch = args.batch if SIZES[name] < 65536 else max(10, args.batch // 10)
            print(f"  {name:>4} B single: {best[f'puts_per_s_{name}']:>7.0f} puts/s  "
                  f"p50 {best[f'put_p50_us_{name}']:>7.1f} us  "
                  f"p99 {best[f'put_p99_us_{name}']:>7.1f} us   batch of {batch}: "
                  f"{best[f'batch_puts_per_s_{name}']:>7.0f} puts/s")
        for key, value in best.items():
            results[f"{key}{suffix}"] = _rounded(key, value)


def run(args: argparse.Namespace) -> int:
    keys = KeyRing(sign_with="bench", keys={"bench": os.urandom(32)})
    results: dict[str, float] = {"loadavg_1m": os.getloadavg()[0]}
    print(f"load average (1 min) at start: {results['loadavg_1m']:.2f} on "
          f"{os.cpu_count()} CPUs")
    if args.url:
        _run_all(args.url, None, keys, args, Durability(), "", results)
    else:
        with _redis() as primary:
            url = f"redis://127.0.0.1:{primary}"
            _run_all(url, primary, keys, args, Durability(), "", results)  # no replica to feed
            with _redis(replicaof=primary):
                _wait_replica(primary)
                _run_all(url, primary, keys, args, Durability.parse("wait:1:1000"), "_wait1",
                         results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.output}")
    return 0
