/* Map layouts shared by the BPF programs and Python (kernel/bpf/layout.py parses this file with
 * cffi, so it holds only struct declarations and integer #defines, one per line). */
#ifndef TCPCP_GATE_H
#define TCPCP_GATE_H

/* gate_config.flags, written by userspace */
#define GATE_GUARDED 1
#define GATE_FROZEN 2

#define FLOW_FAMILY_V4 4
#define FLOW_FAMILY_V6 6

/* A connection seen from the local (origin or standby) side. Addresses and ports are in network
 * byte order; an IPv4 address lives in the first word, the other three words are zero. */
struct flow_key {
	__u32 local_addr[4];
	__u32 remote_addr[4];
	__u16 local_port;
	__u16 remote_port;
	__u32 family;
};

/* Map gate_flows: what userspace allows the flow to acknowledge. BPF writes it once, when a
 * guarded listening port answers a SYN (committed_seq = the SYN-ACK's ack). */
struct gate_config {
	__u32 committed_seq;
	__u32 rcv_wscale;
	__u32 flags;
	__u32 reserved;
};

/* Map gate_states: what the gate saw and did, written by BPF only (host byte order). The
 * sequence fields only move forward (mod 2^32), so a forced ACK built from them never goes back. */
struct gate_state {
	__u32 snd_nxt;
	__u32 kernel_ack;
	__u32 rcv_edge;
	__u32 ack_sent;
	__u32 tsval;
	__u32 tsecr;
	__u32 has_ts;
	__u32 rcv_wscale;
	__u64 packets;
	__u64 acks_clamped;
	__u64 sack_stripped;
	__u64 windows_capped;
	__u64 frozen_dropped;
	__u64 tsvals_raised;
	__u64 dupacks_dropped;
	__u64 last_sent_ns; /* bpf_ktime_get_ns() when a segment of the flow last left */
	__u32 kernel_edge; /* the right edge of the kernel's latest ACK (before the gate) */
	__u32 kernel_dupacks; /* the kernel's pure ACKs repeating its ack and edge since its ack
			       * last moved: duplicate ACKs (out-of-order data), whether the gate let
			       * them out clamped, dropped them or not */
};

/* Map gate_settings (one entry), written by userspace: a clamped duplicate ACK is dropped only
 * within dup_holdoff_ns of the flow's last segment on the wire (0: never dropped). */
struct gate_settings {
	__u64 dup_holdoff_ns;
};

/* Map guarded_ports: key = local port (host byte order); a SYN-ACK leaving such a port creates
 * the flow's gate_flows entry. */
struct listen_value {
	__u32 enabled;
};

/* Map quarantine_flows: the peer's latest segment of a quarantined flow (host byte order). */
struct quarantine_obs {
	__u32 seq;
	__u32 end_seq;
	__u32 ack;
	__u32 window;
	__u32 tsval;
	__u32 tsecr;
	__u32 tcp_flags;
	__u32 has_ts;
	__u64 packets;
};

#endif
