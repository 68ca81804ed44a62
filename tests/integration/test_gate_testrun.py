"""The egress gate program run by the real kernel (BPF_PROG_TEST_RUN) on thousands of generated
segments, compared byte for byte with the reference model in gatepackets.py."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import bpfbuild
from kernel.bpf import layout
from kernel.bpf.layout import Flow, flow_key
from kernel.libbpf import BpfObject
from kernel.seq import after
from ops import capture
from tests.integration.gatepackets import (
    ACK,
    FIN,
    MASK,
    PSH,
    RST,
    SYN,
    TC_ACT_OK,
    TC_ACT_SHOT,
    UNSPEC,
    FlowConfig,
    FlowId,
    GateModel,
    Segment,
    build_frame,
    parse_frame,
    syn_ingress,
    tcp_checksum_valid,
    walk_options,
)

GUARDED_PORT = 8443
PACKETS_PER_SEED = 2500


@pytest.fixture(scope="module")
def gate_object() -> Iterator[BpfObject]:
    with BpfObject(bpfbuild.object_bytes("gate"), "gate") as obj:
        yield obj


def _reset(gate: BpfObject) -> None:
    """Every map emptied; duplicate clamped ACKs always "recent" (the model drops every one)."""
    for name in ("gate_flows", "gate_states", "guarded_ports"):
        m = gate.map(name)
        for key in list(m.keys()):
            m.delete(key)
    _set_holdoff(gate, 1 << 62)


@pytest.fixture
def gate(gate_object: BpfObject) -> BpfObject:
    """The module's loaded gate, reset: no test sees another's flows, states or counters, so
    one failing test leaves nothing behind for the next."""
    _reset(gate_object)
    return gate_object


def _flow(fid: FlowId) -> Flow:
    return Flow.of((fid[0], fid[1]), (fid[2], fid[3]))


def _set_config(gate: BpfObject, fid: FlowId, cfg: FlowConfig) -> None:
    value = layout.new("struct gate_config", committed_seq=cfg.committed, rcv_wscale=cfg.wscale,
                       flags=cfg.flags)
    gate.map("gate_flows").update(flow_key(_flow(fid)), layout.to_bytes(value))


def _options(rng: random.Random, syn: bool, ts: tuple[int, int] | None) -> bytes:
    parts: list[bytes] = []
    if syn:
        parts.append(struct.pack("!BBH", 2, 4, 1460))
        parts.append(b"\x01" + struct.pack("!BBB", 3, 3, rng.randint(0, 16)))
    sackperm = syn and rng.random() < 0.7
    if ts is not None:
        # Linux puts SACK-permitted in the two bytes before the timestamp, else after two NOPs
        parts.append((b"\x04\x02" if sackperm else b"\x01\x01")
                     + struct.pack("!BBII", 8, 10, *ts))
    elif sackperm:
        parts.insert(rng.randint(0, len(parts)), b"\x01\x01\x04\x02")
    room = 40 - sum(len(p) for p in parts)
    blocks = rng.randint(0, min(4, (room - 4) // 8)) if not syn else 0
    if blocks:
        body = b"".join(struct.pack("!II", rng.getrandbits(32), rng.getrandbits(32))
                        for _ in range(blocks))
        sack = struct.pack("!BB", 5, 2 + 8 * blocks) + body
        parts.insert(rng.randint(0, len(parts)), (b"\x01\x01" if rng.random() < 0.7 else b"")
                     + sack)
    opts = b"".join(parts)
    pad = -len(opts) % 4
    if pad:
        opts += b"\0" * pad if rng.random() < 0.5 else b"\x01" * pad
    return opts


def _flags(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.78:
        return ACK | (PSH if rng.random() < 0.3 else 0)
    if r < 0.85:
        return FIN | ACK
    if r < 0.88:
        return RST
    if r < 0.91:
        return RST | ACK
    if r < 0.95:
        return SYN | ACK
    return 0


def _addresses(rng: random.Random, version: int) -> tuple[str, str]:
    if version == 4:
        return f"10.{rng.randint(0, 3)}.0.10", f"10.77.1.{rng.randint(2, 5)}"
    return f"fd77:2::{rng.randint(1, 4):x}", f"fd77:1::{rng.randint(2, 5):x}"


def _scenario(rng: random.Random) -> Iterator[tuple[str, object]]:
    """Yield ("config", (fid, cfg)) map writes and ("segment", seg) packets."""
    flows: list[FlowId] = []
    kernel_ack: dict[FlowId, int] = {}
    tsval: dict[FlowId, int] = {}
    seq: dict[FlowId, int] = {}
    for i in range(16):
        version = 4 if i % 2 else 6
        src, dst = _addresses(rng, version)
        sport = GUARDED_PORT if i % 5 == 4 else rng.randint(1024, 65535)
        fid = (src, sport, dst, rng.randint(1024, 65535))
        flows.append(fid)
        base = rng.choice([rng.getrandbits(32), MASK - rng.randint(0, 100_000)])
        kernel_ack[fid] = base
        tsval[fid] = rng.getrandbits(32)
        seq[fid] = rng.getrandbits(32)
        if i % 4 != 3:  # three in four flows are in the map
            flags = 1 if i % 7 else rng.choice([2, 3, 0])
            committed = (base - rng.randint(0, 300_000)) & MASK
            yield "config", (fid, FlowConfig(committed, rng.randint(0, 14), flags))
    last: dict[FlowId, Segment] = {}
    for _ in range(PACKETS_PER_SEED):
        fid = rng.choice(flows)
        r = rng.random()
        if r > 0.93 and fid in last:  # the kernel repeats a pure ACK (duplicate on the wire)
            prev = last[fid]
            yield "segment", Segment(prev.src, prev.dst, prev.sport, prev.dport, prev.seq,
                                     prev.ack, ACK, prev.window, prev.options)
            continue
        if r > 0.88 and fid in last:  # its ack moves on, its right edge does not
            prev = last[fid]
            kernel_ack[fid] = (kernel_ack[fid] + rng.randint(1, 3000)) & MASK
            yield "segment", Segment(prev.src, prev.dst, prev.sport, prev.dport, prev.seq,
                                     kernel_ack[fid], ACK, 0, prev.options)
            continue
        if r < 0.03:
            committed = (kernel_ack[fid] - rng.randint(0, 50_000)) & MASK
            yield "config", (fid, FlowConfig(committed, rng.randint(0, 14),
                                             rng.choice([1, 1, 1, 3, 0])))
            continue
        kernel_ack[fid] = (kernel_ack[fid] + rng.randint(0, 20_000)) & MASK
        tsval[fid] = (tsval[fid] + rng.randint(-3, 40)) & MASK
        flags = _flags(rng)
        syn = bool(flags & SYN)
        ts = (tsval[fid], rng.getrandbits(32)) if rng.random() < 0.85 else None
        payload = b"" if syn or rng.random() < 0.4 else rng.randbytes(rng.randint(1, 300))
        ip_options = b"\x01\x01\x01\x00" if fid[0].count(".") and rng.random() < 0.05 else b""
        seq[fid] = (seq[fid] + rng.randint(0, 3000)) & MASK
        last[fid] = Segment(fid[0], fid[2], fid[1], fid[3], seq[fid], kernel_ack[fid], flags,
                            rng.randint(0, 65535), _options(rng, syn, ts), payload, ip_options)
        yield "segment", last[fid]


def _has_option(seg: Segment, kind: int) -> bool:
    return any(k == kind for _, k, _ in walk_options(seg.options))


def _spec_breaches(seg: Segment, out: bytes, cfg: FlowConfig | None) -> list[str]:
    """What the gate's output breaks of the issue's rules, checked without the model: a guarded
    flow's segment leaves with no ack after the committed sequence, no SACK block and a right
    edge not before the kernel's (unless the window is capped)."""
    if cfg is None or cfg.flags != 1:
        return []
    got = capture.parse_frame(out)
    assert got is not None, "the gate's output is no TCP frame"
    ack, window, options = got.ack, got.window, got.options
    breaches = []
    if any(kind == 5 for _, kind, _ in walk_options(options)):
        breaches.append("SACK block left")
    if seg.flags & ACK and after(ack, cfg.committed):
        breaches.append(f"ack {ack} after committed {cfg.committed}")
    if seg.flags & ACK and not seg.flags & SYN and window != 0xFFFF:
        edge_in = (seg.ack + (seg.window << cfg.wscale)) & MASK
        edge_out = (ack + (window << cfg.wscale)) & MASK
        if after(edge_in, edge_out):
            breaches.append(f"right edge {edge_out} before the kernel's {edge_in}")
    return breaches


def _without_checksum(frame: bytes) -> bytes:
    p = parse_frame(frame)
    return frame[:p.l4 + 16] + frame[p.l4 + 18:]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_gate_rewrites_exactly_as_the_reference_model(gate: BpfObject, seed: int) -> None:
    rng = random.Random(seed)
    model = GateModel(guarded_ports={GUARDED_PORT})
    states_map = gate.map("gate_states")
    ports_map = gate.map("guarded_ports")
    ports_map.update(struct.pack("=I", GUARDED_PORT), struct.pack("=I", 1))
    rewritten = untouched = sackperm_stripped = checked = 0
    for kind, item in _scenario(rng):
        if kind == "config":
            fid, cfg = cast(tuple[FlowId, FlowConfig], item)
            model.flows[fid] = cfg
            _set_config(gate, fid, cfg)
            continue
        assert isinstance(item, Segment)
        frame = build_frame(item)
        verdict, expected_seg = model.run(item)
        got = gate.test_run("gate_egress", frame)
        assert got.retval == verdict, f"verdict for {item}"
        if verdict != TC_ACT_OK:
            continue
        fid = (item.src, item.sport, item.dst, item.dport)
        assert _spec_breaches(item, got.data, model.flows.get(fid)) == [], item
        checked += model.flows.get(fid, FlowConfig(0, 0, 0)).flags == 1
        if expected_seg == item:
            assert got.data == frame, f"untouched segment changed: {item}"
            untouched += 1
            continue
        expected = build_frame(expected_seg)
        assert _without_checksum(got.data) == _without_checksum(expected), (
            f"input {item}\nexpected {expected_seg}")
        assert tcp_checksum_valid(got.data), f"bad checksum after rewriting {item}"
        rewritten += 1
        sackperm_stripped += _has_option(item, 4) and not _has_option(expected_seg, 4)
    assert rewritten > 500 and untouched > 300 and sackperm_stripped > 5 and checked > 1000
    assert sum(f.dupacks_dropped for f in model.states.values()) > 10
    for fid, want in model.states.items():
        raw = states_map.lookup(flow_key(_flow(fid)))
        assert raw is not None, f"no gate_states entry for {fid}"
        got_state = layout.from_bytes("struct gate_state", raw)
        for name in want.__dataclass_fields__:
            if name != "last_sent_ns":
                assert getattr(got_state, name) == getattr(want, name), f"{fid} {name}"


def test_flow_not_in_the_map_passes_byte_identical(gate: BpfObject) -> None:
    rng = random.Random(99)
    for _ in range(500):
        version = rng.choice([4, 6])
        src, dst = _addresses(rng, version)
        ts = (rng.getrandbits(32), rng.getrandbits(32))
        seg = Segment(src, dst, rng.randint(1, 65535), rng.randint(1, 65535),
                      rng.getrandbits(32), rng.getrandbits(32), _flags(rng),
                      rng.randint(0, 65535), _options(rng, False, ts), rng.randbytes(40))
        frame = build_frame(seg)
        got = gate.test_run("gate_egress", frame)
        assert (got.retval, got.data) == (TC_ACT_OK, frame)


segments = st.builds(
    lambda version, seq, ack, committed_back, window, ws, flags, ts, blocks, payload: (
        Segment(*(("10.77.9.1", "10.77.1.2") if version == 4 else ("fd77:9::1", "fd77:1::2")),
                80, 40000, seq, ack, flags, window,
                _hyp_options(ts, blocks), payload),
        FlowConfig((ack - committed_back) & MASK, ws, 1)),
    st.sampled_from([4, 6]), st.integers(0, MASK), st.integers(0, MASK),
    st.integers(-70_000, 1 << 20), st.integers(0, 65535), st.integers(0, 14),
    st.sampled_from([ACK, ACK | PSH, ACK | FIN, RST, RST | ACK, SYN | ACK, 0]),
    st.one_of(st.none(), st.tuples(st.integers(0, MASK), st.integers(0, MASK))),
    st.integers(0, 4), st.binary(max_size=64))


def _hyp_options(ts: tuple[int, int] | None, blocks: int) -> bytes:
    """Timestamps and 0-4 SACK blocks; blocks == 4 without room for them: SACK-permitted."""
    opts = b"" if ts is None else b"\x01\x01" + struct.pack("!BBII", 8, 10, *ts)
    if blocks == 4 and ts is not None:
        return b"\x01\x01\x04\x02" + opts
    blocks = min(blocks, 3 if ts else 4)
    if blocks:
        opts += b"\x01\x01" + struct.pack("!BB", 5, 2 + 8 * blocks) + bytes(range(8 * blocks))
    return opts


@settings(max_examples=400, deadline=None)
@given(segments)
def test_single_segment_of_a_fresh_flow_matches_the_model(
        gate_object: BpfObject, case: tuple[Segment, FlowConfig]) -> None:
    gate = gate_object  # reset per example (a function-scoped fixture would not be)
    seg, cfg = case
    _reset(gate)
    fid = (seg.src, seg.sport, seg.dst, seg.dport)
    _set_config(gate, fid, cfg)
    model = GateModel(flows={fid: cfg})
    verdict, expected = model.run(seg)
    got = gate.test_run("gate_egress", build_frame(seg))
    assert got.retval == verdict
    assert _without_checksum(got.data) == _without_checksum(build_frame(expected))
    assert tcp_checksum_valid(got.data)
    assert verdict != TC_ACT_OK or _spec_breaches(seg, got.data, cfg) == []


def _set_holdoff(gate: BpfObject, ns: int) -> None:
    value = layout.new("struct gate_settings", dup_holdoff_ns=ns)
    gate.map("gate_settings").update(struct.pack("=I", 0), layout.to_bytes(value))


def test_duplicate_clamped_ack_is_dropped_only_within_the_holdoff(gate: BpfObject) -> None:
    fid = ("10.77.9.1", 80, "10.77.1.2", 40000)
    opts = b"\x01\x01" + struct.pack("!BBII", 8, 10, 7, 9)
    ack = Segment(fid[0], fid[2], fid[1], fid[3], 1000, 50_000, ACK, 100, opts)
    # the kernel's ack moves on, its right edge (ack + window << 7) stays: clamped, a duplicate
    moved_on = Segment(fid[0], fid[2], fid[1], fid[3], 1000, 51_280, ACK, 90, opts)
    try:
        for holdoff, second in ((0, TC_ACT_OK), (1 << 62, TC_ACT_SHOT)):
            _reset(gate)
            _set_holdoff(gate, holdoff)
            _set_config(gate, fid, FlowConfig(40_000, 7, 1))
            first = gate.test_run("gate_egress", build_frame(ack))
            again = gate.test_run("gate_egress", build_frame(moved_on))
            assert (first.retval, again.retval) == (TC_ACT_OK, second)
    finally:
        _set_holdoff(gate, 1 << 62)


def test_keepalive_or_window_probe_leaves_clamped_even_within_the_holdoff(
        gate: BpfObject) -> None:
    """A probe (sequence snd_una - 1, before the highest sent) repeating the clamped ack and
    edge is not a duplicate ACK to drop: it leaves, clamped, with a right checksum."""
    fid = ("10.77.9.1", 80, "10.77.1.2", 40002)
    opts = b"\x01\x01" + struct.pack("!BBII", 8, 10, 7, 9)
    ack = Segment(fid[0], fid[2], fid[1], fid[3], 1000, 50_000, ACK, 100, opts)
    probe = Segment(fid[0], fid[2], fid[1], fid[3], 999, 50_000, ACK, 100, opts)
    _set_config(gate, fid, FlowConfig(40_000, 7, 1))
    runs = [gate.test_run("gate_egress", build_frame(seg)) for seg in (ack, ack, probe, probe)]
    assert [r.retval for r in runs] == [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_OK, TC_ACT_OK]
    for r in runs[2:]:
        assert struct.unpack_from("!I", r.data, 14 + 20 + 8)[0] == 40_000
        assert tcp_checksum_valid(r.data)


def _syn_scenario(rng: random.Random) -> Iterator[Segment]:
    for _ in range(1500):
        version = rng.choice([4, 6])
        peer, local = _addresses(rng, version)[::-1]
        flags = rng.choice([SYN, SYN, SYN, SYN | ACK, ACK, SYN | RST, SYN | FIN])
        ts = (rng.getrandbits(32), 0) if rng.random() < 0.8 else None
        yield Segment(peer, local, rng.randint(1024, 65535),
                      rng.choice([GUARDED_PORT, GUARDED_PORT, rng.randint(1, 65535)]),
                      rng.getrandbits(32), 0 if flags == SYN else rng.getrandbits(32), flags,
                      rng.randint(0, 65535), _options(rng, bool(flags & SYN), ts),
                      rng.randbytes(rng.randint(0, 40)) if rng.random() < 0.1 else b"")


def test_syn_to_a_guarded_port_loses_sack_permitted_and_every_other_packet_passes_untouched(
        gate: BpfObject) -> None:
    rng = random.Random(7)
    ports_map = gate.map("guarded_ports")
    ports_map.update(struct.pack("=I", GUARDED_PORT), struct.pack("=I", 1))
    stripped = untouched = 0
    for seg in _syn_scenario(rng):
        frame = build_frame(seg)
        expected = syn_ingress(seg, {GUARDED_PORT})
        got = gate.test_run("gate_syn_ingress", frame)
        assert got.retval == UNSPEC, f"verdict for {seg}"
        if expected == seg:
            assert got.data == frame, f"untouched segment changed: {seg}"
            untouched += 1
            continue
        assert _without_checksum(got.data) == _without_checksum(build_frame(expected)), seg
        assert tcp_checksum_valid(got.data), f"bad checksum after rewriting {seg}"
        assert not _has_option(expected, 4)
        stripped += 1
    assert stripped > 100 and untouched > 500
