"""`tcpcp inspect` against a real redis-server: verified records shown, refused ones explained."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from store.client import CheckpointStore
from store.config import StoreConfig
from store.keys import OriginKeys
from store.record import Checkpoint, encode
from store.signing import KeyRing, new_secret_hex, parse_keyring
from tests.integration.store_support import LocalRedis, new_keyring, redis_server  # noqa: F401


def cp(origin: str, conn: str, epoch: int) -> Checkpoint:
    return Checkpoint(origin=origin, conn=conn, epoch=epoch, version=3, time_ns=time.time_ns(),
                      inbound_consumed=11, outbound_produced=22, ici=b"i" * 40,
                      app_state=b"a" * 5, send_queue=b"q" * 7)


def tcpcp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", "--log-level", "warning", *args],
                          capture_output=True, text=True, timeout=60)


def test_inspect_shows_verified_records_and_says_why_others_are_refused(
        redis_server: LocalRedis, tmp_path: Path) -> None:  # noqa: F811
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"sign_with": "k1", "keys": {"k1": new_secret_hex()}}))
    key_file.chmod(0o600)
    keys: KeyRing = parse_keyring(key_file.read_text())
    with CheckpointStore.connect(StoreConfig.standalone(redis_server.url), keys) as store:
        epoch = store.lease_acquire("origin-a", "origin-a", ttl_ms=60_000)
        store.put(cp("origin-a", "good", epoch))
        epoch_b = store.lease_acquire("origin-b", "origin-b", ttl_ms=60_000)
        store.put(cp("origin-b", "other", epoch_b))
    forged = encode(cp("origin-a", "forged", epoch), new_keyring())
    redis_server.admin().hset(OriginKeys("origin-a").records, "forged", forged)
    redis_server.admin().hset(OriginKeys("origin-a").records, "cut",
                              encode(cp("origin-a", "cut", epoch), keys)[:30])

    result = tcpcp("inspect", "--url", redis_server.url, "--keys", str(key_file), "--json",
                   "origin-a")
    assert result.returncode == 1, result.stderr
    (origin,) = json.loads(result.stdout)["origins"]
    assert (origin["origin"], origin["owner"], origin["lease_holder"]) == (
        "origin-a", "origin-a", "origin-a")
    records = {r["conn"]: r for r in origin["records"]}
    assert records["good"]["status"] == "ok"
    assert (records["good"]["version"], records["good"]["send_queue_bytes"]) == (3, 7)
    assert records["forged"]["status"] == "refused"
    assert records["forged"]["error"] == "RecordBadSignature"
    assert records["cut"]["error"] == "RecordTruncated" and "record ends" in records["cut"][
        "reason"]

    table = tcpcp("inspect", "--url", redis_server.url, "--keys", str(key_file))
    assert table.returncode == 1
    assert "origin origin-b" in table.stdout and "origin origin-a" in table.stdout
    assert "REFUSED RecordBadSignature" in table.stdout

    only_good = tcpcp("inspect", "--url", redis_server.url, "--keys", str(key_file), "origin-b")
    assert only_good.returncode == 0 and "other" in only_good.stdout


def test_inspect_without_a_key_file_fails_with_a_clear_message(
        redis_server: LocalRedis) -> None:  # noqa: F811
    result = tcpcp("inspect", "--url", redis_server.url)
    assert result.returncode == 2 and "signing-key file" in result.stderr
