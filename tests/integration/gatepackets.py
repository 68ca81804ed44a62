"""Test helpers for the gate's BPF_PROG_TEST_RUN tests: build Ethernet/IPv4/IPv6/TCP frames, check
TCP checksums by recomputation, and a pure-Python reference model of the egress gate's rewrite
written from DESIGN.md section 4 (independent of the C code)."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from ops import capture

MASK = 0xFFFFFFFF
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
TC_ACT_OK, TC_ACT_SHOT = 0, 2
ETH_LEN = 14


def before(a: int, b: int) -> bool:
    d = (a - b) & MASK
    return d >= 1 << 31


def after(a: int, b: int) -> bool:
    return before(b, a)


@dataclass(frozen=True, slots=True)
class Segment:
    """One TCP segment as the test generates it; options are raw bytes (padded to 4)."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: bytes = b""
    payload: bytes = b""
    ip_options: bytes = b""

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.src).version


def checksum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header(version: int, src: bytes, dst: bytes, length: int) -> bytes:
    if version == 4:
        return src + dst + struct.pack("!BBH", 0, 6, length)
    return src + dst + struct.pack("!IxxxB", length, 6)


def build_frame(s: Segment) -> bytes:
    """Ethernet frame carrying s with a correct TCP checksum."""
    doff = (20 + len(s.options)) // 4
    assert (20 + len(s.options)) % 4 == 0 and doff <= 15
    tcp = struct.pack("!HHIIBBHHH", s.sport, s.dport, s.seq, s.ack, doff << 4, s.flags,
                      s.window, 0, 0) + s.options + s.payload
    src = ipaddress.ip_address(s.src).packed
    dst = ipaddress.ip_address(s.dst).packed
    csum = 0xFFFF - checksum16(pseudo_header(s.version, src, dst, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    if s.version == 4:
        ihl = 5 + len(s.ip_options) // 4
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(tcp), 1, 0x4000, 64, 6,
                         0, src, dst) + s.ip_options
        ip = ip[:10] + struct.pack("!H", 0xFFFF - checksum16(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(tcp), 6, 64, src, dst)
        ethertype = 0x86DD
    return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + struct.pack("!H", ethertype) + ip + tcp


@dataclass(frozen=True, slots=True)
class Parsed:
    """Where the TCP header starts and the IP packet ends in a frame built by build_frame (for
    byte-exact comparisons that skip the checksum; reading fields: ops.capture.parse_frame)."""

    l4: int
    end: int


def parse_frame(frame: bytes) -> Parsed:
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0800:
        total = struct.unpack_from("!H", frame, ETH_LEN + 2)[0]
        return Parsed(ETH_LEN + (frame[ETH_LEN] & 0xF) * 4, ETH_LEN + total)
    plen = struct.unpack_from("!H", frame, ETH_LEN + 4)[0]
    return Parsed(ETH_LEN + 40, ETH_LEN + 40 + plen)


def tcp_checksum_valid(frame: bytes) -> bool:
    """Recompute the TCP checksum over pseudo-header and segment (ops.capture's verdict)."""
    seg = capture.parse_frame(frame)
    assert seg is not None and seg.checksum_ok is not None, "expected a whole TCP frame"
    return seg.checksum_ok


def walk_options(opts: bytes) -> list[tuple[int, int, int]]:
    """(offset, kind, length) of each option, NOP and EOL as length 1; stops at EOL."""
    found = []
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            found.append((i, 0, 1))
            break
        if kind == 1:
            found.append((i, 1, 1))
            i += 1
            continue
        length = opts[i + 1]
        found.append((i, kind, length))
        i += length
    return found


@dataclass
class FlowConfig:
    committed: int
    wscale: int
    flags: int  # 1 guarded, 2 frozen


@dataclass
class FlowState:
    snd_nxt: int
    kernel_ack: int
    rcv_edge: int
    ack_sent: int
    tsval: int
    tsecr: int
    has_ts: int
    rcv_wscale: int
    packets: int = 0
    acks_clamped: int = 0
    sack_stripped: int = 0
    windows_capped: int = 0
    frozen_dropped: int = 0
    tsvals_raised: int = 0
    dupacks_dropped: int = 0
    last_sent_ns: int = -1  # not modelled (a clock)
    kernel_edge: int = 0
    kernel_dupacks: int = 0


FlowId = tuple[str, int, str, int]


@dataclass
class GateModel:
    """What the egress gate must do, packet by packet, with its per-flow state."""

    flows: dict[FlowId, FlowConfig] = field(default_factory=dict)
    states: dict[FlowId, FlowState] = field(default_factory=dict)
    guarded_ports: set[int] = field(default_factory=set)

    def run(self, s: Segment) -> tuple[int, Segment]:
        """The verdict and the segment that must leave (equal to s when untouched)."""
        fid = (s.src, s.sport, s.dst, s.dport)
        opts = walk_options(s.options)
        cfg = self.flows.get(fid)
        if cfg is None:
            if s.flags & (SYN | ACK) != SYN | ACK or s.sport not in self.guarded_ports:
                return TC_ACT_OK, s
            ws = next((s.options[o + 2] for o, k, n in opts if k == 3 and n == 3), 0)
            cfg = FlowConfig(s.ack, min(ws, 14), 1)
            self.flows[fid] = cfg
            self.states.pop(fid, None)
        st = self.states.get(fid)
        if cfg.flags & 2:
            if st is not None:
                st.frozen_dropped += 1
            return TC_ACT_SHOT, s
        if not cfg.flags & 1:
            return TC_ACT_OK, s
        ws = min(cfg.wscale, 14)
        shift = 0 if s.flags & SYN else ws
        ts = next((o for o, k, n in opts if k == 8 and n == 10), None)
        tsval_in = int.from_bytes(s.options[ts + 2:ts + 6], "big") if ts is not None else 0
        tsecr_in = int.from_bytes(s.options[ts + 6:ts + 10], "big") if ts is not None else 0
        end_seq = (s.seq + len(s.payload) + bool(s.flags & SYN) + bool(s.flags & FIN)) & MASK
        edge = (s.ack + (s.window << shift)) & MASK
        fresh = st is None
        if st is None:
            st = FlowState(end_seq, s.ack, edge,
                           cfg.committed if after(s.ack, cfg.committed) else s.ack,
                           tsval_in, tsecr_in, int(ts is not None), ws, kernel_edge=edge)
            self.states[fid] = st
        old_edge, old_ack = st.rcv_edge, st.ack_sent
        old_kernel_ack, old_kernel_edge, old_snd_nxt = st.kernel_ack, st.kernel_edge, st.snd_nxt
        ack_out, win_out, clamped, capped = s.ack, s.window, False, False
        scaled_ack = bool(s.flags & ACK) and not s.flags & SYN
        if s.flags & ACK:
            # the right edge never moves back: behind the kernel's nor behind one already sent
            target = edge
            if scaled_ack:
                st.rcv_edge = target = seq_max(st.rcv_edge, edge)
            if after(s.ack, cfg.committed):
                ack_out, clamped = cfg.committed, True
            span = (target - ack_out) & MASK if after(target, ack_out) else 0
            need = -(-span // (1 << shift))
            capped = need > 0xFFFF
            win_out = min(need, 0xFFFF)
            if scaled_ack:
                st.rcv_edge = seq_max(st.rcv_edge, (ack_out + (win_out << shift)) & MASK)
        # a clamped pure ACK repeating what the wire already carries is dropped (never a probe:
        # keepalives and zero-window probes carry a sequence before the highest one sent)
        dup = (not fresh and clamped and not s.flags & (SYN | FIN | RST) and not s.payload
               and ack_out == old_ack and (ack_out + (win_out << shift)) & MASK == old_edge
               and not before(s.seq, old_snd_nxt))
        st.snd_nxt = seq_max(st.snd_nxt, end_seq)
        if s.flags & ACK:
            # the kernel's own duplicate ACKs since its ack last moved (forced ACKs replay them)
            if after(s.ack, old_kernel_ack):
                st.kernel_dupacks = 0
            elif (not fresh and s.ack == old_kernel_ack and edge == old_kernel_edge
                  and not s.payload and not s.flags & (SYN | FIN | RST)):
                st.kernel_dupacks += 1
            if scaled_ack:
                st.kernel_edge = edge
            st.kernel_ack = seq_max(st.kernel_ack, s.ack)
            st.ack_sent = seq_max(st.ack_sent, ack_out)
        tsval_out = tsval_in
        if ts is not None:
            if not st.has_ts:
                st.tsval, st.tsecr, st.has_ts = tsval_in, tsecr_in, 1
            st.tsval = seq_max(st.tsval, tsval_in)
            st.tsecr = seq_max(st.tsecr, tsecr_in)
            tsval_out = st.tsval
        sack = any(k == 5 for _, k, _ in opts)
        raised = tsval_out != tsval_in
        st.packets += 1
        st.acks_clamped += clamped
        st.windows_capped += capped
        st.sack_stripped += sack
        st.tsvals_raised += raised
        st.dupacks_dropped += dup
        if dup:
            return TC_ACT_SHOT, s
        new_opts = bytearray(s.options)
        for o, k, n in opts:
            # SACK blocks go on every segment; SACK-permitted on the SYN-ACK (per-flow SACK off)
            if k == 5 or (k == 4 and n == 2 and s.flags & (SYN | ACK) == SYN | ACK):
                new_opts[o:o + n] = b"\x01" * n
        if ts is not None:
            new_opts[ts + 2:ts + 6] = tsval_out.to_bytes(4, "big")
        return TC_ACT_OK, Segment(s.src, s.dst, s.sport, s.dport, s.seq, ack_out, s.flags,
                                  win_out, bytes(new_opts), s.payload, s.ip_options)


def seq_max(current: int, v: int) -> int:
    return v if after(v, current) else current


UNSPEC = 0xFFFFFFFF  # TC_ACT_UNSPEC (-1) as BPF_PROG_TEST_RUN reports it


def syn_ingress(s: Segment, guarded_ports: set[int]) -> Segment:
    """What the ingress program must hand on (always with TC_ACT_UNSPEC): a SYN without ACK or
    RST to a guarded port loses its SACK-permitted option; everything else passes untouched."""
    if s.flags & (SYN | ACK | RST) != SYN or s.dport not in guarded_ports:
        return s
    new_opts = bytearray(s.options)
    for o, k, n in walk_options(s.options):
        if k == 4 and n == 2:
            new_opts[o:o + 2] = b"\x01\x01"
    return Segment(s.src, s.dst, s.sport, s.dport, s.seq, s.ack, s.flags, s.window,
                   bytes(new_opts), s.payload, s.ip_options)
