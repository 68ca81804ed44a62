"""Property tests of the passing wire format (kernel/transfer.py): signed frames, bounded reads,
replay and staleness refused, answers tied to their batch, reports checked for coverage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel import transfer
from kernel.sanity import RestorePolicy
from kernel.transfer import (
    Acceptance,
    Envelope,
    Frame,
    Item,
    Kind,
    Limits,
    Outcome,
    ReplayGuard,
    TransferError,
)
from store.signing import KeyRing

RING = KeyRing("k1", {"k1": b"a" * 32, "k2": b"b" * 32})
OTHER = KeyRing("k1", {"k1": b"c" * 32})
LIMITS = Limits(max_items=50, max_ici=4096, max_app_state=4096, max_frame=1 << 20)
NOW = 1_700_000_000_000

names = st.text("abcxyz-0é€", min_size=1, max_size=12)
envelopes = st.builds(Envelope, st.just("k1"), names, names, st.integers(0, 2**64 - 1),
                      st.binary(min_size=16, max_size=16).filter(bool) | st.just(b"n" * 16),
                      st.integers(0, 2**64 - 1))
items = st.lists(st.builds(Item, st.binary(max_size=64), st.binary(max_size=32)), max_size=4)
outcomes = st.builds(Outcome, st.lists(st.integers(0, 2**32 - 1), max_size=6).map(tuple),
                     st.lists(st.tuples(st.integers(0, 2**32 - 1), st.text("ab é", max_size=10)),
                              max_size=4).map(tuple))


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from(Kind))
    env = draw(envelopes)
    if kind is Kind.BATCH:
        return Frame(kind, env, tuple(draw(items)))
    if kind in (Kind.REPORT, Kind.DONE):
        return Frame(kind, env, outcome=draw(outcomes))
    if kind is Kind.ABORT:
        return Frame(kind, env, reason=draw(st.text("ab é", max_size=20)))
    return Frame(kind, env)


def decode(raw: bytes, expect: Kind | tuple[Kind, ...] = tuple(Kind),
           ring: KeyRing = RING) -> Frame:
    kind, length = transfer.read_header(raw[: transfer.HEADER.size], LIMITS, expect)
    rest = raw[transfer.HEADER.size :]
    if len(rest) != length:
        raise TransferError(f"expected {length} bytes after the header, got {len(rest)}")
    return transfer.open_frame(kind, raw[: transfer.HEADER.size], rest, ring, LIMITS)


@given(frames())
def test_every_frame_decodes_to_itself(frame: Frame) -> None:
    assert decode(transfer.encode(frame, RING)) == frame


@given(frames(), st.data())
def test_a_changed_byte_is_refused(frame: Frame, data: st.DataObject) -> None:
    raw = bytearray(transfer.encode(frame, RING))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(TransferError):
        decode(bytes(raw))


@given(frames(), st.data())
def test_a_truncated_frame_is_refused(frame: Frame, data: st.DataObject) -> None:
    raw = transfer.encode(frame, RING)
    with pytest.raises(TransferError):
        decode(raw[: data.draw(st.integers(0, len(raw) - 1))])


@given(frames())
def test_a_frame_signed_with_another_key_ring_is_refused_as_forged(frame: Frame) -> None:
    with pytest.raises(TransferError, match="bad signature"):
        decode(transfer.encode(frame, OTHER))


@given(st.binary(max_size=600))
def test_random_bytes_raise_only_the_transfer_error(data: bytes) -> None:
    with pytest.raises(TransferError):
        decode(data)


def test_an_unknown_key_id_is_named() -> None:
    env = Envelope("k9", "origin", "standby", 1, b"n" * 16, NOW)
    ring = KeyRing("k9", {"k9": b"z" * 32})
    with pytest.raises(TransferError, match=r"'k9'.*does not hold"):
        decode(transfer.encode(Frame(Kind.ACTIVATE, env), ring))


def test_an_oversized_announcement_is_refused_before_the_body_is_read() -> None:
    head = transfer.HEADER.pack(transfer.MAGIC, transfer.VERSION, Kind.BATCH, 0, 1 << 30)
    with pytest.raises(TransferError, match=r"at most \d+ bytes, announced 1073741824"):
        transfer.read_header(head, LIMITS, Kind.BATCH)


def test_a_frame_of_the_wrong_kind_is_refused_naming_both() -> None:
    env = Envelope("k1", "origin", "standby", 1, b"n" * 16, NOW)
    raw = transfer.encode(Frame(Kind.DONE, env, outcome=Outcome((0,))), RING)
    with pytest.raises(TransferError, match="expected ACTIVATE/ABORT, got kind DONE"):
        decode(raw, (Kind.ACTIVATE, Kind.ABORT))


def test_item_sizes_are_capped_by_the_limits() -> None:
    env = Envelope("k1", "origin", "standby", 1, b"n" * 16, NOW)
    raw = transfer.encode(Frame(Kind.BATCH, env, (Item(b"x" * 5000),)), RING)
    with pytest.raises(TransferError, match="ICI of 5000 bytes, at most 4096"):
        decode(raw)


@given(st.integers(1 << 10, 1 << 26), st.integers(1 << 10, 1 << 26))
def test_limits_follow_the_restore_policy(send_q: int, recv_q: int) -> None:
    policy = RestorePolicy(frozenset(), send_q, recv_q)
    lim = Limits.for_policy(policy, max_items=10, max_frame=1 << 40)
    assert lim.max_ici == send_q + recv_q + transfer.ICI_OVERHEAD
    assert lim.max_frame <= 1024 + 10 * (lim.max_ici + lim.max_app_state + 8)
    assert lim.max_frame >= lim.max_ici + lim.max_app_state


def guard() -> ReplayGuard:
    return ReplayGuard(Acceptance("standby", frozenset({"origin"}), max_skew_ms=1000))


def env(**kw: object) -> Envelope:
    base: dict[str, object] = {"key_id": "k1", "origin": "origin", "destination": "standby",
                               "epoch": 5, "nonce": b"n" * 16, "sent_at_ms": NOW}
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_a_replayed_batch_is_refused() -> None:
    g = guard()
    g.check_batch(env(), NOW)
    with pytest.raises(TransferError, match="replay"):
        g.check_batch(env(), NOW + 10)


def test_a_batch_for_another_destination_or_from_an_unknown_origin_is_refused() -> None:
    with pytest.raises(TransferError, match="destination 'elsewhere'"):
        guard().check_batch(env(destination="elsewhere"), NOW)
    with pytest.raises(TransferError, match="origin 'mallory'"):
        guard().check_batch(env(origin="mallory"), NOW)


def test_a_stale_batch_is_refused_by_its_timestamp_and_by_its_epoch() -> None:
    with pytest.raises(TransferError, match="stale or replayed"):
        guard().check_batch(env(sent_at_ms=NOW - 5000), NOW)
    g = guard()
    g.check_batch(env(epoch=7, nonce=b"a" * 16), NOW)
    with pytest.raises(TransferError, match="epoch 6, expected at least 7"):
        g.check_batch(env(epoch=6, nonce=b"b" * 16), NOW)


@given(st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=30, unique=True))
def test_nonces_are_forgotten_only_once_their_timestamps_would_refuse_them(
        nonces: list[bytes]) -> None:
    g = guard()
    for i, n in enumerate(nonces):
        g.check_batch(env(nonce=n, sent_at_ms=NOW + i), NOW + i)
    for n in nonces:  # still within the window: every one is a replay
        with pytest.raises(TransferError):
            g.check_batch(env(nonce=n, sent_at_ms=NOW + 500), NOW + 500)


def test_an_answer_of_another_pass_is_refused() -> None:
    mine = env()
    ok = Frame(Kind.REPORT, mine.reply(NOW + 1), outcome=Outcome((0,)))
    transfer.check_answer(ok, mine)
    other = Frame(Kind.REPORT, env(nonce=b"x" * 16), outcome=Outcome((0,)))
    with pytest.raises(TransferError, match="another pass"):
        transfer.check_answer(other, mine)


@given(st.integers(0, 20), st.data())
def test_coverage_holds_exactly_for_a_partition_of_the_indices(n: int,
                                                               data: st.DataObject) -> None:
    idx = list(range(n))
    ok = data.draw(st.lists(st.sampled_from(idx), unique=True) if idx else st.just([]))
    failed = [(i, "no") for i in idx if i not in ok]
    transfer.check_coverage(Outcome(tuple(ok), tuple(failed)), n, "report")
    broken = data.draw(st.sampled_from(["drop", "dup", "extra"]))
    if broken == "drop" and n:
        bad = Outcome(tuple(ok[1:]) if ok else (), tuple(failed[1:]) if not ok else tuple(failed))
    elif broken == "dup" and n:
        bad = Outcome((*ok, idx[0]), tuple(failed))
    else:
        bad = Outcome((*ok, n + data.draw(st.integers(0, 5))), tuple(failed))
    with pytest.raises(TransferError, match="exactly once"):
        transfer.check_coverage(bad, n, "report")
