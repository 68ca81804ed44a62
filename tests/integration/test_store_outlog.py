"""Output logs (logged output) against a real redis-server: contiguous fenced appends, trims,
verified reads, limits, a record and its bytes in one step, deletion, durability (WAIT)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from store.client import CheckpointStore
from store.config import Durability, StoreConfig
from store.errors import (
    DurabilityError,
    NotOwner,
    OutputNotHeld,
    OutputOffsetRefused,
    OutputTooLarge,
    RecordBadSignature,
    RecordCorrupt,
    RecordForeign,
    StaleEpoch,
    TooManyRecords,
    VersionNotNewer,
)
from store.keys import OriginKeys
from store.limits import Limits
from store.outlog import OutputRange, encode_output
from store.record import Checkpoint
from store.signing import KeyRing
from tests.integration.store_support import (  # noqa: F401  (fixtures)
    LocalRedis,
    keyring,
    new_keyring,
    redis_server,
    replicas_acknowledging,
    running,
    wait_for,
)

ORIGIN = "origin-a"
CONN = "10.77.1.2:40000>10.77.9.1:80"
KEYS = OriginKeys(ORIGIN)


def cp(conn: str = CONN, *, epoch: int, version: int, produced: int = 0) -> Checkpoint:
    return Checkpoint(origin=ORIGIN, conn=conn, epoch=epoch, version=version,
                      time_ns=time.time_ns(), inbound_consumed=version, outbound_produced=produced,
                      ici=b"ici", app_state=b"state-%d" % version, send_queue=b"")


@pytest.fixture
def store(redis_server: LocalRedis, keyring: KeyRing) -> Iterator[CheckpointStore]:  # noqa: F811
    with CheckpointStore.connect(StoreConfig.standalone(redis_server.url), keyring) as s:
        yield s


@pytest.fixture
def epoch(store: CheckpointStore) -> int:
    return store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=60_000)


def test_appends_read_back_from_any_offset_they_hold(store: CheckpointStore, epoch: int) -> None:
    assert store.output_bounds(ORIGIN, CONN) is None
    store.append_output(ORIGIN, CONN, epoch, 5000, b"HTTP/1.1 200 OK\r\n")  # starts anywhere
    store.append_output(ORIGIN, CONN, epoch, 5017, b"Content-Length: 5\r\n\r\n")
    store.append_output(ORIGIN, CONN, epoch, 5038, b"hello")
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    bounds = store.output_bounds(ORIGIN, CONN)
    assert bounds is not None and (bounds.start, bounds.end) == (5000, 5043)
    for offset in range(5000, 5044):
        assert store.read_output(ORIGIN, CONN, offset) == whole[offset - 5000:]
    for outside in (4999, 5044, 0, 2**64 - 1):
        with pytest.raises(OutputNotHeld):
            store.read_output(ORIGIN, CONN, outside)
    with pytest.raises(OutputNotHeld, match="no log"):
        store.read_output(ORIGIN, "other", 0)


def test_offsets_beyond_2_53_are_exact_up_to_the_last_u64(store: CheckpointStore,
                                                          epoch: int) -> None:
    # the library never passes an offset through a Lua number (a double)
    base = 2**64 - 1 - 31
    store.append_output(ORIGIN, CONN, epoch, base, b"a" * 10)
    store.append_output(ORIGIN, CONN, epoch, base + 10, b"b" * 20)
    with pytest.raises(OutputOffsetRefused):
        store.append_output(ORIGIN, CONN, epoch, base + 29, b"c")
    assert store.trim_output(ORIGIN, CONN, epoch, base + 15) == base + 15
    assert store.read_output(ORIGIN, CONN, base + 15) == b"b" * 15
    assert store.trim_output(ORIGIN, CONN, epoch, base + 30) == base + 30
    assert store.read_output(ORIGIN, CONN, base + 30) == b""
    store.append_output(ORIGIN, CONN, epoch, base + 30, b"z")  # ends at 2**64-1
    assert store.read_output(ORIGIN, CONN, base + 30) == b"z"
    bounds = store.output_bounds(ORIGIN, CONN)
    assert bounds is not None and bounds.end == 2**64 - 1


def test_appends_must_be_contiguous_and_an_exact_duplicate_is_idempotent(
        store: CheckpointStore, epoch: int) -> None:
    store.append_output(ORIGIN, CONN, epoch, 0, b"abc")
    store.append_output(ORIGIN, CONN, epoch, 3, b"def")
    with pytest.raises(OutputOffsetRefused, match="at 6, got offset 7 \\(a gap") as info:
        store.append_output(ORIGIN, CONN, epoch, 7, b"x")
    assert (info.value.given, info.value.end) == (7, 6)
    for offset, data in ((5, b"fg"), (3, b"deX"), (3, b"de"), (2, b"cdef"), (0, b"abcdef")):
        with pytest.raises(OutputOffsetRefused, match="an overlap"):
            store.append_output(ORIGIN, CONN, epoch, offset, data)
    store.append_output(ORIGIN, CONN, epoch, 3, b"def")  # the retry of a stored append
    (again,) = store.append_many([OutputRange(ORIGIN, CONN, epoch, 0, b"abc")])
    assert again.error is None and again.duplicate
    store.append_output(ORIGIN, CONN, epoch, 6, b"")  # nothing to log: a no-op at the end
    with pytest.raises(OutputOffsetRefused):
        store.append_output(ORIGIN, CONN, epoch, 9, b"")
    assert store.read_output(ORIGIN, CONN, 0) == b"abcdef"
    assert store.client_for(ORIGIN).xlen(KEYS.output(CONN)) == 2


def test_writes_with_a_stale_epoch_are_refused_after_a_claim_and_the_claimer_continues(
        store: CheckpointStore, epoch: int) -> None:
    store.append_output(ORIGIN, CONN, epoch, 0, b"before ")
    store.lease_release(ORIGIN, ORIGIN, epoch)
    new_epoch = store.claim(ORIGIN, "standby-1", seen_epoch=epoch, ttl_ms=60_000)
    with pytest.raises(StaleEpoch, match=f"current epoch {new_epoch}, got {epoch}"):
        store.append_output(ORIGIN, CONN, epoch, 7, b"late bytes of the fenced origin")
    with pytest.raises(StaleEpoch):
        store.append_many([OutputRange(ORIGIN, f"c{i}", epoch, 0, b"x") for i in range(3)])
    with pytest.raises(StaleEpoch):
        store.put_with_output(cp(epoch=epoch, version=1), 7, b"late")
    with pytest.raises(StaleEpoch):
        store.trim_output(ORIGIN, CONN, epoch, 7)
    with pytest.raises(StaleEpoch):
        store.delete(ORIGIN, epoch, [CONN])
    assert store.read_output(ORIGIN, CONN, 0) == b"before "
    assert store.connections(ORIGIN) == {}
    store.append_output(ORIGIN, CONN, new_epoch, 7, b"after")  # entries of two epochs
    assert store.read_output(ORIGIN, CONN, 0) == b"before after"


def test_writes_to_an_origin_nobody_has_leased_are_refused(store: CheckpointStore) -> None:
    with pytest.raises(NotOwner):
        store.append_output(ORIGIN, CONN, 0, 0, b"x")
    assert store.output_bounds(ORIGIN, CONN) is None


def test_trim_drops_what_the_peer_acknowledged_and_never_goes_backwards(
        store: CheckpointStore, epoch: int) -> None:
    for i in range(5):
        store.append_output(ORIGIN, CONN, epoch, 100 + 10 * i, bytes([65 + i]) * 10)
    stream = KEYS.output(CONN)
    admin = store.client_for(ORIGIN)
    assert store.trim_output(ORIGIN, CONN, epoch, 125) == 125  # two whole, one partial
    assert admin.xlen(stream) == 3
    assert store.read_output(ORIGIN, CONN, 125) == b"CCCCCDDDDDDDDDDEEEEEEEEEE"
    with pytest.raises(OutputNotHeld, match="trimmed"):
        store.read_output(ORIGIN, CONN, 124)
    assert store.trim_output(ORIGIN, CONN, epoch, 110) == 125  # backwards: a no-op
    assert store.trim_output(ORIGIN, CONN, epoch, 125) == 125
    assert store.trim_output(ORIGIN, CONN, epoch, 130) == 130
    assert admin.xlen(stream) == 2
    with pytest.raises(OutputOffsetRefused, match="at most at the log's end 150, got 151"):
        store.trim_output(ORIGIN, CONN, epoch, 151)
    assert store.trim_output(ORIGIN, CONN, epoch, 150) == 150
    assert not admin.exists(stream)
    bounds = store.output_bounds(ORIGIN, CONN)
    assert bounds is not None and (bounds.start, bounds.end) == (150, 150)
    with pytest.raises(OutputOffsetRefused, match="at 150"):
        store.append_output(ORIGIN, CONN, epoch, 0, b"a restart from 0")
    store.append_output(ORIGIN, CONN, epoch, 150, b"next")
    assert store.read_output(ORIGIN, CONN, 150) == b"next"
    assert store.trim_output(ORIGIN, "no-log", epoch, 10) is None


def test_log_holds_no_more_than_its_limits_and_trimming_makes_room(
        redis_server: LocalRedis, keyring: KeyRing) -> None:  # noqa: F811
    limits = Limits(max_output_append=100, max_output_held=250, max_output_entries=3,
                    max_records_per_origin=2)
    with CheckpointStore.connect(StoreConfig.standalone(redis_server.url, limits=limits),
                                 keyring) as store:
        epoch = store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=60_000)
        with pytest.raises(OutputTooLarge, match="max_output_append = 100 bytes, got 101"):
            store.append_output(ORIGIN, CONN, epoch, 0, b"x" * 101)
        store.append_output(ORIGIN, CONN, epoch, 0, b"x" * 100)
        store.append_output(ORIGIN, CONN, epoch, 100, b"x" * 100)
        with pytest.raises(OutputTooLarge, match="max_output_held = 250 bytes, holds 200") as info:
            store.append_output(ORIGIN, CONN, epoch, 200, b"y" * 51)
        assert (info.value.limit, info.value.size, info.value.maximum) == \
            ("max_output_held", 251, 250)
        store.append_output(ORIGIN, CONN, epoch, 200, b"y" * 50)
        store.trim_output(ORIGIN, CONN, epoch, 150)  # the first append goes, the second stays
        store.append_output(ORIGIN, CONN, epoch, 250, b"z" * 10)  # room again: holds 160
        with pytest.raises(OutputTooLarge, match="max_output_entries = 3 appends") as info:
            store.append_output(ORIGIN, CONN, epoch, 260, b"w")
        assert info.value.limit == "max_output_entries"
        store.append_output(ORIGIN, "c2", epoch, 0, b"second log")
        with pytest.raises(TooManyRecords, match="at most 2 output logs"):
            store.append_output(ORIGIN, "c3", epoch, 0, b"third log")
        store.delete(ORIGIN, epoch, ["c2"])
        store.append_output(ORIGIN, "c3", epoch, 0, b"third log")
        assert store.read_output(ORIGIN, CONN, 150) == b"x" * 50 + b"y" * 50 + b"z" * 10


def test_append_many_pipelines_many_connections_and_reports_each_refusal(
        store: CheckpointStore, epoch: int) -> None:
    store.append_output(ORIGIN, "c5", epoch, 0, b"already")
    ranges = [OutputRange(ORIGIN, f"c{i}", epoch, 0, b"bytes of c%d" % i) for i in range(40)]
    ranges += [OutputRange(ORIGIN, "c1", epoch, 11, b"+more"),  # extends an append before it
               OutputRange(ORIGIN, "c2", epoch, 99, b"gap")]
    outcomes = store.append_many(ranges, batch=7)
    refused = {(o.conn, o.offset): o.error for o in outcomes if o.error is not None}
    assert set(refused) == {("c5", 0), ("c2", 99)}
    assert all(isinstance(e, OutputOffsetRefused) for e in refused.values())
    assert store.read_output(ORIGIN, "c1", 0) == b"bytes of c1+more"
    assert store.read_output(ORIGIN, "c39", 0) == b"bytes of c39"
    assert store.read_output(ORIGIN, "c5", 0) == b"already"
    with pytest.raises(Exception, match="one origin and epoch"):
        store.append_many([OutputRange(ORIGIN, "c1", epoch, 16, b"x"),
                           OutputRange("origin-b", "c1", epoch, 0, b"x")])


def test_put_with_output_stores_the_record_and_its_bytes_together_or_neither(
        store: CheckpointStore, epoch: int) -> None:
    store.put_with_output(cp(epoch=epoch, version=1, produced=5), 0, b"hello")
    got = store.get(ORIGIN, CONN)
    assert got is not None and got.version == 1
    assert store.read_output(ORIGIN, CONN, 0) == b"hello"
    with pytest.raises(VersionNotNewer):  # a refused record leaves no log bytes
        store.put_with_output(cp(epoch=epoch, version=1, produced=11), 5, b" world")
    assert store.read_output(ORIGIN, CONN, 0) == b"hello"
    with pytest.raises(OutputOffsetRefused):  # a refused append leaves the record as it was
        store.put_with_output(cp(epoch=epoch, version=2, produced=11), 6, b"world")
    got = store.get(ORIGIN, CONN)
    assert got is not None and got.version == 1
    store.put_with_output(cp(epoch=epoch, version=2, produced=11), 5, b" world")
    store.put_with_output(cp(epoch=epoch, version=3, produced=11), 5, b" world")  # retried
    store.put_with_output(cp(epoch=epoch, version=4, produced=11), 11, b"")  # record only
    got = store.get(ORIGIN, CONN)
    assert got is not None and got.version == 4
    assert store.read_output(ORIGIN, CONN, 0) == b"hello world"
    outcomes = store.put_many_with_output(
        [(cp(f"b{i}", epoch=epoch, version=1), 0, b"b%d" % i) for i in range(20)]
        + [(cp("b3", epoch=epoch, version=2), 5, b"gap"),
           (cp("b4", epoch=epoch, version=1), 2, b"!"),
           (cp("b5", epoch=epoch, version=2), 2, b"!")], batch=6)
    errors = {(o.conn, o.version): type(o.error).__name__ for o in outcomes
              if o.error is not None}
    assert errors == {("b3", 2): "OutputOffsetRefused", ("b4", 1): "VersionNotNewer"}
    assert store.read_output(ORIGIN, "b5", 0) == b"b5!"
    assert store.read_output(ORIGIN, "b4", 0) == b"b4"
    assert store.connections(ORIGIN)["b3"] == 1 and store.connections(ORIGIN)["b5"] == 2


def test_deleting_a_record_removes_its_output_log_in_the_same_step(
        store: CheckpointStore, epoch: int) -> None:
    for conn in ("keep", "gone", "[fd77:1::2]:4>[fd77:9::1]:80"):
        store.put_with_output(cp(conn, epoch=epoch, version=1), 0, b"bytes of " + conn.encode())
    store.append_output(ORIGIN, "log-only", epoch, 0, b"no record")
    assert store.delete(ORIGIN, epoch, ["gone", "[fd77:1::2]:4>[fd77:9::1]:80", "log-only"]) == 2
    admin = store.client_for(ORIGIN)
    assert sorted(admin.hkeys(KEYS.output_positions)) == [b"keep"]
    assert sorted(k for k in admin.keys("tcpcp:*:out:*")) == [KEYS.output("keep").encode()]
    for conn in ("gone", "log-only"):
        with pytest.raises(OutputNotHeld):
            store.read_output(ORIGIN, conn, 0)
    store.append_output(ORIGIN, "gone", epoch, 0, b"a new connection, same name")
    assert store.read_output(ORIGIN, "gone", 0) == b"a new connection, same name"
    assert store.origins() == [ORIGIN]


def test_forged_corrupt_copied_and_replayed_entries_are_refused_on_read(
        store: CheckpointStore, epoch: int, keyring: KeyRing) -> None:  # noqa: F811
    admin = store.client_for(ORIGIN)

    def plant(conn: str, entries: list[tuple[int, bytes]]) -> None:
        store.append_output(ORIGIN, conn, epoch, 0, b"0123456789")
        end = 10
        for offset, entry in entries:
            admin.xadd(KEYS.output(conn), {"b": entry}, id=f"{offset}-1")
            end = offset + 10
        admin.hset(KEYS.output_positions, conn, f"0 0 {end}")

    def entry(conn: str, offset: int, keys: KeyRing = keyring, data: bytes = b"abcdefghij",
              origin: str = ORIGIN) -> bytes:
        return encode_output(OutputRange(origin, conn, epoch, offset, data), keys)

    flipped = bytearray(entry("flipped", 10))
    flipped[-40] ^= 1
    plant("flipped", [(10, bytes(flipped))])
    plant("forged", [(10, entry("forged", 10, new_keyring()))])
    plant("copied", [(10, entry("elsewhere", 10))])
    plant("foreign", [(10, entry("foreign", 10, origin="origin-b"))])
    plant("replayed", [(10, entry("replayed", 20))])
    plant("gap", [(20, entry("gap", 20))])
    for conn, error in (("flipped", RecordBadSignature), ("forged", RecordBadSignature),
                        ("copied", RecordForeign), ("foreign", RecordForeign),
                        ("replayed", RecordForeign), ("gap", RecordCorrupt)):
        with pytest.raises(error):
            store.read_output(ORIGIN, conn, 0)
    plant("good", [(10, entry("good", 10))])
    assert store.read_output(ORIGIN, "good", 5) == b"56789abcdefghij"


def test_appends_are_durable_at_wait_1_and_refused_as_not_durable_without_the_replica(
        keyring: KeyRing) -> None:  # noqa: F811
    primary = LocalRedis()
    with running(primary):
        replica = LocalRedis({"replicaof": f"127.0.0.1 {primary.port}"})
        with running(replica):
            replicas_acknowledging(primary, 1)
            config = StoreConfig.standalone(primary.url, durability=Durability.parse("wait:1:300"))
            with CheckpointStore.connect(config, keyring) as store:
                epoch = store.lease_acquire(ORIGIN, ORIGIN, ttl_ms=60_000)
                store.append_output(ORIGIN, CONN, epoch, 0, b"durable")
                store.put_with_output(cp(epoch=epoch, version=1), 7, b" too")
                # WAIT returned: the replica holds both, whatever happens to the primary now
                assert replica.admin().xlen(KEYS.output(CONN)) == 2
                assert replica.admin().hget(KEYS.versions, CONN) == b"1"
                replica.stop()
                with pytest.raises(DurabilityError, match=r"needed 1 replica\(s\) within 300 ms"):
                    store.append_output(ORIGIN, CONN, epoch, 11, b" lost?")
                with pytest.raises(DurabilityError):  # the retry of it awaits WAIT again
                    store.append_output(ORIGIN, CONN, epoch, 11, b" lost?")
                with pytest.raises(DurabilityError):
                    store.put_with_output(cp(epoch=epoch, version=2), 17, b"!")
                with pytest.raises(DurabilityError):
                    store.append_many([OutputRange(ORIGIN, f"c{i}", epoch, 0, b"x")
                                       for i in range(5)])
                assert store.trim_output(ORIGIN, CONN, epoch, 3) == 3  # trims never wait


def test_logged_connections_are_listed_in_one_scan_and_leave_with_their_record(
        store: CheckpointStore, epoch: int) -> None:
    assert store.logged_connections(ORIGIN) == set()
    for i in range(3):
        store.append_output(ORIGIN, f"{CONN}-{i}", epoch, 0, b"x")
    assert store.logged_connections(ORIGIN) == {f"{CONN}-{i}" for i in range(3)}
    assert {c for c in store.logged_connections(ORIGIN)
            if store.output_bounds(ORIGIN, c) is not None} == store.logged_connections(ORIGIN)
    store.delete(ORIGIN, epoch, [f"{CONN}-1"])
    assert store.logged_connections(ORIGIN) == {f"{CONN}-0", f"{CONN}-2"}
