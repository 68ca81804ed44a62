"""The kernel structures tcpcp's TCP_REPAIR calls exchange, declared once for cffi (ABI mode).

Layouts from include/uapi/linux/tcp.h. tcp_info is declared only as far as tcpcp reads it
(through tcpi_segs_in: bytes acked and received, segments, retransmits for the lab tests);
its wscale byte holds two 4-bit fields (snd in the low nibble
on little-endian builds), kept as a plain byte here and split in kernel.repair.
"""

from __future__ import annotations

import cffi

ffi = cffi.FFI()
ffi.cdef(
    """
    struct tcp_repair_opt {
        uint32_t opt_code;
        uint32_t opt_val;
    };

    struct tcp_repair_window {
        uint32_t snd_wl1;
        uint32_t snd_wnd;
        uint32_t max_window;
        uint32_t rcv_wnd;
        uint32_t rcv_wup;
    };

    struct tcp_info_prefix {
        uint8_t  tcpi_state;
        uint8_t  tcpi_ca_state;
        uint8_t  tcpi_retransmits;
        uint8_t  tcpi_probes;
        uint8_t  tcpi_backoff;
        uint8_t  tcpi_options;
        uint8_t  tcpi_wscales;
        uint8_t  tcpi_flags;
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
