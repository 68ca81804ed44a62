"""Kernel structures the lab and guest tests read, declared once for cffi (ABI mode), so no
field is read at a hand-counted offset.

struct tcp_info (include/uapi/linux/tcp.h) is declared up to tcpi_segs_in; the kernel fills
what the caller's buffer holds. kernel/_repair_cdef.py declares the prefix kernel/repair.py
needs; this is the longer view the tests need (bytes acknowledged and received, retransmits).
"""

from __future__ import annotations

import socket
from typing import Any

import cffi

ffi = cffi.FFI()
ffi.cdef(
    """
    struct tcp_info {
        uint8_t  tcpi_state;
        uint8_t  tcpi_ca_state;
        uint8_t  tcpi_retransmits;
        uint8_t  tcpi_probes;
        uint8_t  tcpi_backoff;
        uint8_t  tcpi_options;
        uint8_t  tcpi_wscales;          /* snd_wscale : 4, rcv_wscale : 4 */
        uint8_t  tcpi_flags;            /* delivery_rate_app_limited : 1, ... */

        uint32_t tcpi_rto;
        uint32_t tcpi_ato;
        uint32_t tcpi_snd_mss;
        uint32_t tcpi_rcv_mss;

        uint32_t tcpi_unacked;
        uint32_t tcpi_sacked;
        uint32_t tcpi_lost;
        uint32_t tcpi_retrans;
        uint32_t tcpi_fackets;

        uint32_t tcpi_last_data_sent;
        uint32_t tcpi_last_ack_sent;
        uint32_t tcpi_last_data_recv;
        uint32_t tcpi_last_ack_recv;

        uint32_t tcpi_pmtu;
        uint32_t tcpi_rcv_ssthresh;
        uint32_t tcpi_rtt;
        uint32_t tcpi_rttvar;
        uint32_t tcpi_snd_ssthresh;
        uint32_t tcpi_snd_cwnd;
        uint32_t tcpi_advmss;
        uint32_t tcpi_reordering;

        uint32_t tcpi_rcv_rtt;
        uint32_t tcpi_rcv_space;

        uint32_t tcpi_total_retrans;

        uint64_t tcpi_pacing_rate;
        uint64_t tcpi_max_pacing_rate;
        uint64_t tcpi_bytes_acked;
        uint64_t tcpi_bytes_received;
        uint32_t tcpi_segs_out;
        uint32_t tcpi_segs_in;
    };
    """
)

_TCP_INFO_SIZE = ffi.sizeof("struct tcp_info")


def tcp_info(sock: socket.socket) -> Any:
    """The socket's struct tcp_info (a cffi struct: info.tcpi_bytes_acked, info.tcpi_state)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    if len(raw) < _TCP_INFO_SIZE:
        raise OSError(f"expected {_TCP_INFO_SIZE} bytes of tcp_info, the kernel gave {len(raw)}")
    info = ffi.new("struct tcp_info *")
    ffi.memmove(info, raw, _TCP_INFO_SIZE)
    return info
