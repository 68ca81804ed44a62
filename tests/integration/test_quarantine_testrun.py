"""The quarantine program run by the real kernel (BPF_PROG_TEST_RUN) on generated segments: a
quarantined flow's segments are dropped and the latest one recorded exactly; others are left to
the next filter (TC_ACT_UNSPEC: several quarantines share an interface), byte-identical."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest

from kernel import bpfbuild
from kernel.bpf import layout
from kernel.bpf.layout import Flow, flow_key
from kernel.libbpf import BpfObject
from tests.integration.gatepackets import (
    ACK,
    FIN,
    PSH,
    SYN,
    TC_ACT_SHOT,
    Segment,
    build_frame,
)

TC_ACT_UNSPEC = 0xFFFFFFFF  # -1, as BPF_PROG_TEST_RUN's u32 retval


@pytest.fixture(scope="module")
def quarantine_object() -> Iterator[BpfObject]:
    with BpfObject(bpfbuild.object_bytes("quarantine"), "quarantine") as obj:
        yield obj


@pytest.fixture
def quarantine(quarantine_object: BpfObject) -> BpfObject:
    """The module's loaded program with no flow quarantined: a failed test leaves no record
    (and no packet count) behind for the next."""
    flows = quarantine_object.map("quarantine_flows")
    for key in list(flows.keys()):
        flows.delete(key)
    return quarantine_object


def _segment(rng: random.Random, src: str, sport: int, dst: str, dport: int) -> Segment:
    opts = b""
    if rng.random() < 0.8:
        opts = b"\x01\x01" + struct.pack("!BBII", 8, 10, rng.getrandbits(32), rng.getrandbits(32))
    if rng.random() < 0.3:
        opts += b"\x01\x01\x05\x0a" + rng.randbytes(8)
    flags = rng.choice([ACK, ACK | PSH, ACK | FIN, SYN])
    return Segment(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), flags,
                   rng.randint(0, 65535), opts, rng.randbytes(rng.randint(0, 200)))


@pytest.mark.parametrize("version", [4, 6])
def test_quarantined_flow_is_dropped_and_its_latest_segment_recorded(
        quarantine: BpfObject, version: int) -> None:
    rng = random.Random(version)
    flows_map = quarantine.map("quarantine_flows")
    local, peer = ("10.77.9.1", "10.77.1.2") if version == 4 else ("fd77:9::1", "fd77:1::2")
    held = Flow.of((local, 80), (peer, 40000))
    flows_map.update(flow_key(held), layout.to_bytes(layout.new("struct quarantine_obs")))
    try:
        dropped = 0
        for _ in range(1000):
            quarantined = rng.random() < 0.5
            sport = 40000 if quarantined else rng.choice([40001, 39999])
            seg = _segment(rng, peer, sport, local, 80)
            frame = build_frame(seg)
            got = quarantine.test_run("quarantine_ingress", frame)
            if not quarantined:
                # not its own: left to the next filter (TC_ACT_UNSPEC), byte-identical
                assert (got.retval, got.data) == (TC_ACT_UNSPEC, frame)
                continue
            dropped += 1
            assert got.retval == TC_ACT_SHOT
            raw = flows_map.lookup(flow_key(held))
            assert raw is not None
            o = layout.from_bytes("struct quarantine_obs", raw)
            end = seg.seq + len(seg.payload) + bool(seg.flags & SYN) + bool(seg.flags & FIN)
            assert (o.seq, o.end_seq, o.ack, o.window, o.tcp_flags, o.packets) == (
                seg.seq, end & 0xFFFFFFFF, seg.ack, seg.window, seg.flags, dropped)
            if seg.options[:4] == b"\x01\x01\x08\x0a":
                assert (o.tsval, o.tsecr) == struct.unpack("!II", seg.options[4:12])
        assert dropped > 400
    finally:
        flows_map.delete(flow_key(held))
