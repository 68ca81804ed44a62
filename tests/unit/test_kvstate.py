"""Property tests of the key-value server's command executor and its snapshot (ops/apps/resp.py
KvState): counters count as Redis counts, a snapshot restores the same key space and is the same
bytes whatever order the writes came in, the bounds hold after any sequence of commands, a
rollback undoes exactly the writes since the savepoint, and the commands redis-cli and
redis-benchmark send at start-up get replies they accept."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ops.apps import resp
from ops.apps.resp import ConnectionState, KvState, SnapshotError

keys = st.binary(min_size=1, max_size=6)
values = st.binary(max_size=24)
INT64 = (-(1 << 63), (1 << 63) - 1)
writes = st.one_of(
    st.tuples(st.just(b"SET"), keys, values),
    st.tuples(st.just(b"SET"), keys, values, st.sampled_from([b"NX", b"XX", b"GET"])),
    st.tuples(st.just(b"DEL"), keys),
    st.tuples(st.just(b"DEL"), keys, keys),
    st.tuples(st.just(b"INCR"), keys),
    st.tuples(st.just(b"DECRBY"), keys, st.integers(-1000, 1000).map(lambda n: b"%d" % n)),
)


def run(state: KvState, *commands: resp.Command) -> list[bytes]:
    return [state.execute(c) for c in commands]


@given(st.lists(st.tuples(st.sampled_from([b"INCR", b"DECR", b"INCRBY", b"DECRBY"]),
                          st.integers(-(1 << 62), 1 << 62)), max_size=40),
       st.integers(*INT64))
def test_counters_count_and_refuse_to_overflow(ops: list[tuple[bytes, int]], start: int) -> None:
    state = KvState()
    assert state.execute((b"SET", b"n", b"%d" % start)) == resp.OK
    total = start
    for name, step in ops:
        delta = {b"INCR": 1, b"DECR": -1, b"INCRBY": step, b"DECRBY": -step}[name]
        command = (name, b"n") if name in (b"INCR", b"DECR") else (name, b"n", b"%d" % step)
        reply = state.execute(command)
        if INT64[0] <= total + delta <= INT64[1]:
            total += delta
            assert reply == resp.integer(total)
        else:
            assert reply.startswith(b"-ERR") and b"overflow" in reply
        assert state.execute((b"GET", b"n")) == resp.bulk(b"%d" % total)


def test_counters_start_from_zero_and_refuse_what_is_not_an_integer() -> None:
    state = KvState()
    assert run(state, (b"INCR", b"a"), (b"DECR", b"b"), (b"INCRBY", b"c", b"5")) == \
        [resp.integer(1), resp.integer(-1), resp.integer(5)]
    for value in (b"x", b"", b" 1", b"01", b"+1", b"-0", b"9223372036854775808"):
        state.execute((b"SET", b"v", value))
        assert state.execute((b"INCR", b"v")) == \
            resp.error("ERR value is not an integer or out of range")
    assert state.execute((b"INCRBY", b"a", b"1.5")).startswith(b"-ERR value is not an integer")
    assert state.execute((b"DECRBY", b"a", b"-9223372036854775808")).startswith(b"-ERR decr")


@given(st.lists(writes, max_size=40))
def test_a_snapshot_restores_the_same_key_space(commands: list[resp.Command]) -> None:
    state = KvState()
    run(state, *commands)
    blob = state.snapshot()
    back = KvState.restore(blob)
    assert back.data == state.data and back.generation == state.generation
    assert back.snapshot() == blob and back.size == state.size == len(blob)


@given(st.dictionaries(keys, values, max_size=20), st.randoms())
def test_a_snapshot_is_the_same_bytes_whatever_order_the_writes_came_in(
        data: dict[bytes, bytes], rnd: random.Random) -> None:
    items = list(data.items())
    a, b = KvState(), KvState()
    run(a, *((b"SET", k, v) for k, v in items))
    rnd.shuffle(items)
    run(b, *((b"SET", k, v) for k, v in items))
    assert a.snapshot() == b.snapshot()


@given(st.lists(writes, max_size=60), st.integers(16, 400), st.integers(0, 12))
def test_the_bounds_hold_after_any_commands(commands: list[resp.Command], max_bytes: int,
                                            max_keys: int) -> None:
    state = KvState(max_bytes=max_bytes, max_keys=max_keys)
    for command in commands:
        before = state.snapshot()
        reply = state.execute(command)
        if b"key space full" in reply:
            assert state.snapshot() == before
        assert len(state.snapshot()) == state.size <= max_bytes
        assert len(state.data) <= max_keys
    KvState.restore(state.snapshot(), max_bytes=max_bytes, max_keys=max_keys)


def test_a_write_past_the_bounds_is_answered_with_an_error() -> None:
    state = KvState(max_bytes=40, max_keys=1)
    assert state.execute((b"SET", b"a", b"1")) == resp.OK
    assert state.execute((b"SET", b"b", b"1")).startswith(b"-ERR tcpcp key space full: 1 keys")
    assert state.execute((b"SET", b"a", b"x" * 30)).startswith(
        b"-ERR tcpcp key space full: a snapshot of")
    assert state.execute((b"GET", b"a")) == resp.bulk(b"1")


@given(st.lists(writes, max_size=20), st.lists(writes, max_size=20))
def test_a_rollback_undoes_exactly_the_writes_since_the_savepoint(
        first: list[resp.Command], then: list[resp.Command]) -> None:
    state = KvState()
    run(state, *first)
    before, generation, data = state.snapshot(), state.generation, dict(state.data)
    state.savepoint()
    run(state, *then)
    state.rollback()
    assert state.snapshot() == before and state.generation == generation
    assert state.data == data and state.size == len(before)


def test_release_keeps_the_writes_and_generation_counts_them() -> None:
    state = KvState()
    state.savepoint()
    run(state, (b"SET", b"a", b"1"), (b"SET", b"a", b"1", b"NX"), (b"DEL", b"zz"),
        (b"INCR", b"a"))
    state.release()
    assert state.generation == 2 and state.data == {b"a": b"2"}
    with pytest.raises(RuntimeError, match="without a savepoint"):
        state.rollback()


@given(st.binary(max_size=200))
def test_restoring_garbage_raises_snapshot_error_and_nothing_else(blob: bytes) -> None:
    with contextlib.suppress(SnapshotError):
        KvState.restore(blob)
    with contextlib.suppress(SnapshotError):
        ConnectionState.decode(blob)


@given(st.lists(writes, min_size=1, max_size=10), st.data())
def test_a_corrupted_snapshot_is_refused_or_restores_a_valid_key_space(
        commands: list[resp.Command], data: st.DataObject) -> None:
    state = KvState()
    run(state, *commands)
    blob = bytearray(state.snapshot())
    blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    try:
        back = KvState.restore(bytes(blob))
    except SnapshotError:
        return
    assert back.snapshot() == bytes(blob)


def test_unsorted_or_duplicate_keys_are_refused() -> None:
    a = KvState()
    run(a, (b"SET", b"a", b"1"), (b"SET", b"b", b"2"))
    blob = a.snapshot()
    swapped = blob[:16] + blob[16 + 10:] + blob[16:16 + 10]
    with pytest.raises(SnapshotError, match="expected key 1 after"):
        KvState.restore(swapped)
    with pytest.raises(SnapshotError, match="at most 10 bytes"):
        KvState.restore(blob, max_bytes=10)
    with pytest.raises(SnapshotError, match="at most 1 keys"):
        KvState.restore(blob, max_keys=1)


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_a_connection_state_round_trips(snapshot: bytes, pending: bytes) -> None:
    state = ConnectionState(snapshot, pending)
    blob = state.encode()
    assert ConnectionState.decode(blob) == state
    assert len(blob) == resp.CONNECTION_STATE_OVERHEAD + len(snapshot) + len(pending)


def test_set_conditions_and_options() -> None:
    state = KvState()
    assert run(state, (b"SET", b"k", b"1", b"XX"), (b"SET", b"k", b"1", b"NX"),
               (b"SET", b"k", b"2", b"NX"), (b"SET", b"k", b"3", b"xx", b"GET"),
               (b"SET", b"k", b"4", b"EX", b"10"), (b"GET", b"k")) == \
        [resp.NULL_BULK, resp.OK, resp.NULL_BULK, resp.bulk(b"1"), resp.OK, resp.bulk(b"4")]
    assert run(state, (b"SET", b"k", b"5", b"NX", b"XX"), (b"SET", b"k", b"5", b"EX"),
               (b"SET", b"k", b"5", b"PX", b"0"), (b"SET", b"k", b"5", b"EX", b"x"),
               (b"SET", b"k", b"5", b"BOGUS")) == \
        [resp.error("ERR syntax error"), resp.error("ERR syntax error"),
         resp.error("ERR invalid expire time in 'set' command"),
         resp.error("ERR value is not an integer or out of range"),
         resp.error("ERR syntax error")]
    assert state.execute((b"GET", b"k")) == resp.bulk(b"4")


def test_keys_commands() -> None:
    state = KvState()
    run(state, (b"SET", b"a", b"1"), (b"SET", b"b", b"2"))
    assert run(state, (b"EXISTS", b"a", b"a", b"zz"), (b"DEL", b"a", b"zz", b"a"),
               (b"EXISTS", b"a"), (b"DBSIZE",), (b"get", b"b")) == \
        [resp.integer(2), resp.integer(1), resp.integer(0), resp.integer(1), resp.bulk(b"2")]
    assert run(state, (b"PING",), (b"PING", b"hi"), (b"ECHO", b"x\r\ny")) == \
        [resp.PONG, resp.bulk(b"hi"), resp.bulk(b"x\r\ny")]


def test_what_redis_cli_and_redis_benchmark_send_at_start_up() -> None:
    state = KvState()
    assert state.execute((b"COMMAND",)) == resp.EMPTY_ARRAY
    assert state.execute((b"COMMAND", b"DOCS")) == resp.EMPTY_ARRAY
    assert state.execute((b"COMMAND", b"COUNT")) == resp.integer(0)
    assert state.execute((b"CONFIG", b"GET", b"save")) == \
        resp.array([resp.bulk(b"save"), resp.bulk(b"")])
    assert state.execute((b"CONFIG", b"GET", b"appendonly")) == \
        resp.array([resp.bulk(b"appendonly"), resp.bulk(b"no")])
    assert state.execute((b"CONFIG", b"GET", b"nosuch")) == resp.EMPTY_ARRAY
    assert state.execute((b"HELLO", b"3")).startswith(b"-NOPROTO ")
    assert state.execute((b"CLIENT", b"SETNAME", b"x")) == resp.OK
    assert state.execute((b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py")) == resp.OK
    assert state.execute((b"SELECT", b"0")) == resp.OK
    assert state.execute((b"SELECT", b"1")) == resp.error("ERR DB index is out of range")
    info = state.execute((b"INFO",))
    assert info.startswith(b"$") and b"redis_version:" in info
    assert state.execute((b"QUIT",)) == resp.OK


def test_unknown_commands_and_wrong_arity_are_answered_as_redis_does() -> None:
    state = KvState()
    assert state.execute((b"FLY", b"a", b"b")) == \
        resp.error("ERR unknown command 'FLY', with args beginning with: 'a' 'b'")
    assert state.execute((b"GET",)) == \
        resp.error("ERR wrong number of arguments for 'get' command")
    assert state.execute((b"CLIENT", b"KILL")).startswith(b"-ERR unknown subcommand")
    assert state.execute(()) == b""


@given(st.lists(st.lists(st.binary(max_size=8), min_size=1, max_size=5).map(tuple),
                max_size=30))
def test_any_command_gets_one_reply_and_never_raises(commands: list[resp.Command]) -> None:
    state = KvState(max_bytes=200, max_keys=5)
    for command in commands:
        reply = state.execute(command)
        assert reply[:1] in (b"+", b"-", b":", b"$", b"*") and reply.endswith(b"\r\n")
