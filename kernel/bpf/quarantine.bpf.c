// SPDX-License-Identifier: GPL-2.0
/* Quarantine, tc ingress on the standby: a segment of a flow in quarantine_flows is recorded
 * (the peer's seq, end seq, ack, window, TSval, TSecr, flags) and dropped, so the standby's
 * kernel never answers it with a RST while the flow's socket does not exist yet. */
#include <linux/pkt_cls.h>

#include "tcp_parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct quarantine_obs);
} quarantine_flows SEC(".maps");

SEC("tc")
int quarantine_ingress(struct __sk_buff *skb)
{
	struct tcp_pkt p = {};
	struct flow_key key = {};
	struct opt_walk *w;
	struct quarantine_obs *obs;

	/* not ours: the next filter decides (another quarantine, a gate), else the packet passes */
	if (parse_tcp(skb, &p))
		return TC_ACT_UNSPEC;
	flow_key_of(&p, 0, &key);
	obs = bpf_map_lookup_elem(&quarantine_flows, &key);
	if (!obs)
		return TC_ACT_UNSPEC;
	w = walker();
	if (w && load_tcp_header(skb, &p, w) == 0) {
		walk_options(w);
		if (w->ts_off) {
			obs->tsval = buf_be32(w->buf, w->ts_off + 2);
			obs->tsecr = buf_be32(w->buf, w->ts_off + 6);
			obs->has_ts = 1;
		}
	}
	obs->seq = p.seq;
	obs->end_seq = p.seq + p.payload_len + !!(p.flags & TCPF_SYN) + !!(p.flags & TCPF_FIN);
	obs->ack = p.ack;
	obs->window = p.window;
	obs->tcp_flags = p.flags;
	__sync_fetch_and_add(&obs->packets, 1);
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
