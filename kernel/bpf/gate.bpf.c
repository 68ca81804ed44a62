// SPDX-License-Identifier: GPL-2.0
/* The ACK gate, tc egress on the origin: a guarded flow never acknowledges more than userspace
 * has committed.
 *
 * For every outgoing segment of a flow in gate_flows:
 *   - frozen flow: drop the segment;
 *   - ack after the committed sequence: ack := committed;
 *   - window: enlarged so the right edge (ack + window << wscale) never moves back, neither
 *     behind the kernel's edge for this segment nor behind an edge already sent (rounded up,
 *     capped at 65535, caps counted);
 *   - SACK and D-SACK blocks become NOPs;
 *   - a clamped pure ACK repeating the ack and right edge already sent is dropped;
 *   - TSval never goes below one already sent for the flow (forced ACKs and the kernel's own
 *     ACKs may leave from different CPUs);
 *   - the TCP checksum is corrected with bpf_l4_csum_replace, which updates a full checksum and
 *     leaves a checksum-partial one to the device.
 * gate_states records, per flow, what a forced ACK needs: the highest sequence sent, the
 * kernel's ack, the farthest right edge advertised, the highest TSval and TSecr, plus counters.
 * A SYN-ACK leaving a port in guarded_ports creates the flow's entry: committed = its ack.
 *
 * SACK is switched off per flow, not per namespace: since the gate strips SACK blocks, a peer
 * that negotiated SACK would never see one and recover every loss by its retransmission timer.
 * gate_syn_ingress turns the SACK-permitted option of a SYN arriving at a guarded port into NOPs,
 * so the local kernel does not negotiate SACK either (its own loss recovery then counts duplicate
 * ACKs, as the peer's does); gate_egress does the same to the SYN-ACK of every guarded flow, so
 * the peer never believes SACK was negotiated even if the SYN reached the kernel untouched. */
#include <linux/pkt_cls.h>

#include "tcp_parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct gate_config);
} gate_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct gate_state);
} gate_states SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct listen_value);
} guarded_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gate_settings);
} gate_settings SEC(".maps");

#define MAX_WSCALE 14

/* Raise *field to v if v is after it (mod 2^32); return the value the field holds afterwards. */
static __always_inline __u32 seq_max(__u32 *field, __u32 v)
{
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u32 old = *(volatile __u32 *)field;

		if (!after(v, old))
			return old;
		if (__sync_val_compare_and_swap(field, old, v) == old)
			return v;
	}
	return v;
}

static __always_inline struct gate_config *entry_from_syn_ack(struct flow_key *key,
							      struct tcp_pkt *p,
							      struct opt_walk *w)
{
	struct gate_config nc = {};

	nc.committed_seq = p->ack;
	nc.rcv_wscale = w->wscale == 0xff ? 0 : w->wscale;
	if (nc.rcv_wscale > MAX_WSCALE)
		nc.rcv_wscale = MAX_WSCALE;
	nc.flags = GATE_GUARDED;
	bpf_map_update_elem(&gate_flows, key, &nc, BPF_ANY);
	bpf_map_delete_elem(&gate_states, key);
	return bpf_map_lookup_elem(&gate_flows, key);
}

SEC("tc")
int gate_egress(struct __sk_buff *skb)
{
	struct tcp_pkt p = {};
	struct flow_key key = {};
	struct opt_walk *w;
	struct gate_config *cfg;
	struct gate_state *st;

	if (parse_tcp(skb, &p))
		return TC_ACT_OK;
	flow_key_of(&p, 1, &key);

	cfg = bpf_map_lookup_elem(&gate_flows, &key);
	if (!cfg && (p.flags & (TCPF_SYN | TCPF_ACK)) != (TCPF_SYN | TCPF_ACK))
		return TC_ACT_OK;
	w = walker();
	if (!w || load_tcp_header(skb, &p, w))
		return cfg ? TC_ACT_SHOT : TC_ACT_OK;
	w->strip_sack = 1;
	w->strip_sackperm = (p.flags & (TCPF_SYN | TCPF_ACK)) == (TCPF_SYN | TCPF_ACK);
	walk_options(w);
	if (!cfg) {
		if (!bpf_map_lookup_elem(&guarded_ports, &(__u32){bpf_ntohs(p.src_port)}))
			return TC_ACT_OK;
		cfg = entry_from_syn_ack(&key, &p, w);
		if (!cfg)
			return TC_ACT_SHOT; /* map full: refuse rather than run unguarded */
	}

	st = bpf_map_lookup_elem(&gate_states, &key);
	if (cfg->flags & GATE_FROZEN) {
		if (st)
			__sync_fetch_and_add(&st->frozen_dropped, 1);
		return TC_ACT_SHOT;
	}
	if (!(cfg->flags & GATE_GUARDED))
		return TC_ACT_OK;

	__u32 committed = *(volatile __u32 *)&cfg->committed_seq;
	__u32 ws = cfg->rcv_wscale;
	__u32 shift, ack_out = p.ack, win_out = p.window;
	int clamped = 0, capped = 0, raised = 0;

	if (ws > MAX_WSCALE)
		ws = MAX_WSCALE;
	shift = (p.flags & TCPF_SYN) ? 0 : ws; /* windows in SYN segments are never scaled */

	__u32 has_ts = w->ts_off != 0;
	__u32 tsval_in = has_ts ? buf_be32(w->buf, w->ts_off + 2) : 0;
	__u32 tsecr_in = has_ts ? buf_be32(w->buf, w->ts_off + 6) : 0;
	__u32 tsval_out = tsval_in;
	__u32 end_seq = p.seq + p.payload_len + !!(p.flags & TCPF_SYN) + !!(p.flags & TCPF_FIN);
	__u32 edge_in = p.ack + (p.window << shift);
	__u32 scaled_ack = (p.flags & TCPF_ACK) && !(p.flags & TCPF_SYN);
	__u32 old_edge = 0, old_ack = 0, old_kernel_ack = 0, old_kernel_edge = 0, old_snd_nxt = 0;
	int fresh = 0, dup;

	if (!st) {
		struct gate_state ns = {};

		ns.snd_nxt = end_seq;
		ns.kernel_ack = p.ack;
		ns.rcv_edge = edge_in;
		ns.ack_sent = after(p.ack, committed) ? committed : p.ack;
		ns.tsval = tsval_in;
		ns.tsecr = tsecr_in;
		ns.has_ts = has_ts;
		ns.rcv_wscale = ws;
		ns.kernel_edge = edge_in;
		bpf_map_update_elem(&gate_states, &key, &ns, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&gate_states, &key);
		fresh = 1;
	}
	if (st) {
		old_edge = *(volatile __u32 *)&st->rcv_edge;
		old_ack = *(volatile __u32 *)&st->ack_sent;
		old_kernel_ack = *(volatile __u32 *)&st->kernel_ack;
		old_kernel_edge = *(volatile __u32 *)&st->kernel_edge;
		old_snd_nxt = *(volatile __u32 *)&st->snd_nxt;
	}

	if (p.flags & TCPF_ACK) {
		/* the right edge to advertise: the kernel's, or a farther one already on the wire */
		__u32 target = (st && scaled_ack) ? seq_max(&st->rcv_edge, edge_in) : edge_in;
		__u64 span, nw;

		if (after(p.ack, committed)) {
			ack_out = committed;
			clamped = 1;
		}
		span = after(target, ack_out) ? (__u64)(target - ack_out) : 0;
		nw = (span + (1ULL << shift) - 1) >> shift;
		if (nw > 0xffff) {
			nw = 0xffff;
			capped = 1;
		}
		win_out = nw;
		if (st && scaled_ack)
			seq_max(&st->rcv_edge, ack_out + (win_out << shift));
	}

	/* A clamped pure ACK that repeats the ack and right edge already on the wire tells the peer
	 * nothing but "duplicate": it would count it towards fast retransmit and raise its
	 * reordering estimate, until real losses wait for its retransmission timer. Drop it, unless
	 * the flow has been quiet for dup_holdoff_ns: then it answers a keepalive or window probe.
	 * A keepalive or zero-window probe of our own (sequence before the highest one sent: the
	 * kernel's ACKs carry snd_nxt, its probes snd_una - 1) always leaves. */
	__u64 now = bpf_ktime_get_ns();

	dup = st && !fresh && clamped && !(p.flags & (TCPF_SYN | TCPF_FIN | TCPF_RST)) &&
	      p.payload_len == 0 && ack_out == old_ack && !before(p.seq, old_snd_nxt) &&
	      (__u32)(ack_out + (win_out << shift)) == old_edge;
	if (dup) {
		__u32 zero = 0;
		struct gate_settings *set = bpf_map_lookup_elem(&gate_settings, &zero);

		if (!set || now - st->last_sent_ns >= set->dup_holdoff_ns)
			dup = 0;
	}

	if (st) {
		seq_max(&st->snd_nxt, end_seq);
		if (p.flags & TCPF_ACK) {
			/* the kernel's duplicate ACKs since its ack last moved: once a commit reaches
			 * that ack, userspace repeats them (the peer's fast retransmit needs them) */
			if (after(p.ack, old_kernel_ack))
				st->kernel_dupacks = 0;
			else if (!fresh && p.ack == old_kernel_ack && edge_in == old_kernel_edge &&
				 p.payload_len == 0 && !(p.flags & (TCPF_SYN | TCPF_FIN | TCPF_RST)))
				__sync_fetch_and_add(&st->kernel_dupacks, 1);
			if (scaled_ack)
				st->kernel_edge = edge_in;
			seq_max(&st->kernel_ack, p.ack);
			seq_max(&st->ack_sent, ack_out);
		}
		if (has_ts) {
			if (!st->has_ts) {
				st->tsval = tsval_in;
				st->tsecr = tsecr_in;
				st->has_ts = 1;
			}
			tsval_out = seq_max(&st->tsval, tsval_in);
			seq_max(&st->tsecr, tsecr_in);
			raised = tsval_out != tsval_in;
		}
		__sync_fetch_and_add(&st->packets, 1);
		if (clamped)
			__sync_fetch_and_add(&st->acks_clamped, 1);
		if (capped)
			__sync_fetch_and_add(&st->windows_capped, 1);
		if (w->sack_found)
			__sync_fetch_and_add(&st->sack_stripped, 1);
		if (raised)
			__sync_fetch_and_add(&st->tsvals_raised, 1);
		if (dup)
			__sync_fetch_and_add(&st->dupacks_dropped, 1);
	}
	if (dup)
		return TC_ACT_SHOT;
	if (st)
		st->last_sent_ns = now;

	int moved = ack_out != p.ack || win_out != p.window;
	int stripped = w->sack_found || (w->strip_sackperm && w->sackperm_found);

	if (!moved && !raised && !stripped)
		return TC_ACT_OK;
	if (moved) {
		buf_put_be32(w->buf, 8, ack_out);
		w->buf[14] = win_out >> 8;
		w->buf[15] = win_out;
	}
	if (raised)
		buf_put_be32(w->buf, w->ts_off + 2, tsval_out);
	__s64 diff = bpf_csum_diff((__be32 *)w->old, TCP_HDR_MAX, (__be32 *)w->buf, TCP_HDR_MAX, 0);
	__u32 len = p.hdr_len;

	if (diff < 0 || len < 20 || len > TCP_HDR_MAX)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, p.l4_off, w->buf, len, 0))
		return TC_ACT_SHOT;
	if (bpf_l4_csum_replace(skb, p.l4_off + 16, 0, diff, 0))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

/* tc ingress: a SYN arriving at a guarded port loses its SACK-permitted option (NOPs, checksum
 * corrected), so neither end of the guarded connection negotiates SACK. Every packet goes on to
 * the next filter (TC_ACT_UNSPEC): this program never drops and never decides for others. */
SEC("tc")
int gate_syn_ingress(struct __sk_buff *skb)
{
	struct tcp_pkt p = {};
	struct opt_walk *w;

	if (parse_tcp(skb, &p))
		return TC_ACT_UNSPEC;
	if ((p.flags & (TCPF_SYN | TCPF_ACK | TCPF_RST)) != TCPF_SYN)
		return TC_ACT_UNSPEC;
	if (!bpf_map_lookup_elem(&guarded_ports, &(__u32){bpf_ntohs(p.dst_port)}))
		return TC_ACT_UNSPEC;
	w = walker();
	if (!w || load_tcp_header(skb, &p, w))
		return TC_ACT_UNSPEC;
	w->strip_sackperm = 1;
	walk_options(w);
	if (!w->sackperm_found)
		return TC_ACT_UNSPEC;

	__s64 diff = bpf_csum_diff((__be32 *)w->old, TCP_HDR_MAX, (__be32 *)w->buf, TCP_HDR_MAX, 0);
	__u32 len = p.hdr_len;

	/* a SYN we cannot rewrite reaches the kernel as it came: the SYN-ACK is still rewritten */
	if (diff < 0 || len < 20 || len > TCP_HDR_MAX)
		return TC_ACT_UNSPEC;
	if (bpf_skb_store_bytes(skb, p.l4_off, w->buf, len, 0))
		return TC_ACT_UNSPEC;
	bpf_l4_csum_replace(skb, p.l4_off + 16, 0, diff, 0);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "GPL";
