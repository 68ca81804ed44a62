"""The lab's drop filters: tiny tc BPF programs assembled here, loaded with bpf(2).

The lab cuts hosts off (crash) and partitions them at the gateway, outside the host, so the
host's own TCP stack never sees an error. The kernels we run on lack `act_gact` and
`cls_matchall`, so a tc "drop" is a classic-BPF-free, direct-action eBPF program: either
"drop everything" or "drop IPv4/IPv6 packets whose source (or destination) is one of these
addresses". The programs are a handful of instructions, so they are assembled in Python
(`drop_all`, `drop_addresses`) rather than compiled, and attached by the caller with pyroute2.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# eBPF encoding (include/uapi/linux/bpf.h, bpf_common.h)
_BPF_LD, _BPF_LDX, _BPF_ALU64, _BPF_JMP, _BPF_JMP32 = 0x00, 0x01, 0x07, 0x05, 0x06
_BPF_W, _BPF_H = 0x00, 0x08
_BPF_ABS, _BPF_MEM = 0x20, 0x60
_BPF_K, _BPF_X = 0x00, 0x08
_BPF_MOV, _BPF_JEQ, _BPF_JNE, _BPF_EXIT, _BPF_JA = 0xB0, 0x10, 0x50, 0x90, 0x00

TC_ACT_OK = 0
TC_ACT_SHOT = 2
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_ETH_HLEN = 14

_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SCHED_CLS = 3


class LabFilterError(OSError):
    """The kernel refused a lab drop program."""


@dataclass(frozen=True, slots=True)
class Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, self.off, self.imm)


def _mov_imm(dst: int, imm: int) -> Insn:
    return Insn(_BPF_ALU64 | _BPF_MOV | _BPF_K, dst=dst, imm=imm)


def _mov_reg(dst: int, src: int) -> Insn:
    return Insn(_BPF_ALU64 | _BPF_MOV | _BPF_X, dst=dst, src=src)


def _ld_abs(size: int, offset: int) -> Insn:
    """r0 = ntoh(*(size *)(skb->data + offset)); out of bounds ends the program with r0 = 0."""
    return Insn(_BPF_LD | size | _BPF_ABS, imm=offset)


def _jeq32(imm: int, off: int) -> Insn:
    imm = imm - (1 << 32) if imm >= 1 << 31 else imm
    return Insn(_BPF_JMP32 | _BPF_JEQ | _BPF_K, dst=0, off=off, imm=imm)


def _ja(off: int) -> Insn:
    return Insn(_BPF_JMP | _BPF_JA, off=off)


def _exit() -> Insn:
    return Insn(_BPF_JMP | _BPF_EXIT)


def drop_all() -> list[Insn]:
    """A program that drops every frame."""
    return [_mov_imm(0, TC_ACT_SHOT), _exit()]


def _jne32(imm: int, off: int) -> Insn:
    imm = imm - (1 << 32) if imm >= 1 << 31 else imm
    return Insn(_BPF_JMP32 | _BPF_JNE | _BPF_K, dst=0, off=off, imm=imm)


def _address_block(offset: int, packed: bytes, to_drop_after_block: int) -> list[Insn]:
    """Words equal to `packed` at `offset` -> jump to drop; any mismatch -> next block."""
    words = struct.unpack(f"!{len(packed) // 4}I", packed)
    length = 2 * len(words) + 1
    block: list[Insn] = []
    for i, word in enumerate(words):
        block.append(_ld_abs(_BPF_W, offset + 4 * i))
        block.append(_jne32(word, length - 2 * i - 2))
    block.append(_ja(to_drop_after_block))
    return block


def _section(packed_addresses: Sequence[bytes], offset: int) -> list[Insn]:
    """Address blocks, then "pass" and "drop" exits."""
    if not packed_addresses:
        return [_mov_imm(0, TC_ACT_OK), _exit()]
    lengths = [2 * (len(p) // 4) + 1 for p in packed_addresses]
    out: list[Insn] = []
    for i, packed in enumerate(packed_addresses):
        later = sum(lengths[i + 1 :])
        out += _address_block(offset, packed, later + 2)
    return [*out, _mov_imm(0, TC_ACT_OK), _exit(), _mov_imm(0, TC_ACT_SHOT), _exit()]


def drop_addresses(addresses: Iterable[str], *, match: str) -> list[Insn]:
    """Drop IPv4/IPv6 packets whose `match` ("src" or "dst") address is one of `addresses`."""
    if match not in ("src", "dst"):
        raise ValueError(f"match must be 'src' or 'dst', got {match!r}")
    parsed = [ipaddress.ip_address(a) for a in addresses]
    sec4 = _section([a.packed for a in parsed if a.version == 4],
                    _ETH_HLEN + (12 if match == "src" else 16))
    sec6 = _section([a.packed for a in parsed if a.version == 6],
                    _ETH_HLEN + (8 if match == "src" else 24))
    prog = [_mov_reg(6, 1), _ld_abs(_BPF_H, 12)]
    prog.append(_jeq32(_ETH_P_IP, 3))  # -> sec4 at index 6
    prog.append(_jeq32(_ETH_P_IPV6, 2 + len(sec4)))  # -> sec6
    prog += [_mov_imm(0, TC_ACT_OK), _exit()]
    return prog + sec4 + sec6


def load(program: Sequence[Insn], name: str = "tcpcp_lab") -> int:
    """Load a SCHED_CLS program; returns its file descriptor (caller closes it)."""
    code = b"".join(i.encode() for i in program)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack(
        "<IIQQIIQI I 16s",
        _BPF_PROG_TYPE_SCHED_CLS,
        len(program),
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        1,
        len(log),
        ctypes.addressof(log),
        0,  # kern_version
        0,  # prog_flags
        name.encode()[:15],
    )
    buf = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, buf, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise LabFilterError(
            err, f"bpf(PROG_LOAD) refused the lab filter {name}: {os.strerror(err)}\n"
            + log.value.decode(errors="replace")
        )
    return int(fd)
