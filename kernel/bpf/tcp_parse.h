/* Parsing of Ethernet/IPv4/IPv6/TCP for the tc programs: locate the TCP header, build the flow
 * key, copy the TCP header with its options into a stack buffer and walk the options with
 * bpf_loop (one byte or one option per iteration; nested loops exceed the verifier's budget). */
#ifndef TCPCP_TCP_PARSE_H
#define TCPCP_TCP_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "gate.h"

#define TCP_HDR_MAX 60
#define TCP_BUF 64 /* power of two: indices are masked with TCP_BUF - 1 */
#define TCP_OPT_EOL 0
#define TCP_OPT_NOP 1
#define TCP_OPT_WS 3
#define TCP_OPT_SACK_PERM 4
#define TCP_OPT_SACK 5
#define TCP_OPT_TS 8

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* Where the TCP header is and what it carries, in host byte order. */
struct tcp_pkt {
	__u32 l4_off;
	__u32 hdr_len;
	__u32 payload_len;
	__u32 seq;
	__u32 ack;
	__u32 window;
	__u32 flags;
	__u16 src_port; /* network order */
	__u16 dst_port; /* network order */
	__u32 family;
	__u32 src_addr[4];
	__u32 dst_addr[4];
};

/* The option walker's state, kept in a per-CPU map (values the verifier does not track as
 * constants, so the bpf_loop callback's states converge); buf holds the TCP header (bytes past
 * hdr_len stay zero), old an untouched copy for the checksum difference. */
struct opt_walk {
	__u8 buf[TCP_BUF];
	__u8 old[TCP_BUF];
	__u32 pos;
	__u32 end;
	__u32 nop_left;
	__u32 ts_off; /* 0: no timestamp option */
	__u32 wscale; /* 0xff: no window-scale option */
	__u32 sack_found;
	__u32 strip_sack;
	__u32 sackperm_found;
	__u32 strip_sackperm; /* NOP the SACK-permitted option (SYN and SYN-ACK only) */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct opt_walk);
} walk_scratch SEC(".maps");

/* This CPU's walker, cleared (tc programs run with migration and bottom halves disabled). */
static __always_inline struct opt_walk *walker(void)
{
	__u32 zero = 0;
	struct opt_walk *w = bpf_map_lookup_elem(&walk_scratch, &zero);

	if (w)
		__builtin_memset(w, 0, sizeof(*w));
	return w;
}

static __always_inline int before(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

static __always_inline int after(__u32 a, __u32 b)
{
	return before(b, a);
}

/* Fill *p from the packet; return 0 when it is a TCP segment we can handle. */
static __always_inline int parse_tcp(struct __sk_buff *skb, struct tcp_pkt *p)
{
	__u32 l3 = ETH_HLEN;
	__u32 l4, ip_end;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)))
			return -1;
		if (ip.protocol != IPPROTO_TCP || ip.ihl < 5)
			return -1;
		if (ip.frag_off & bpf_htons(0x3fff)) /* MF or fragment offset */
			return -1;
		p->family = FLOW_FAMILY_V4;
		p->src_addr[0] = ip.saddr;
		p->dst_addr[0] = ip.daddr;
		l4 = l3 + ip.ihl * 4;
		/* IP length, not skb->len: received frames may carry Ethernet padding; 0 = BIG TCP */
		ip_end = ip.tot_len ? l3 + bpf_ntohs(ip.tot_len) : skb->len;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, l3, &ip6, sizeof(ip6)))
			return -1;
		if (ip6.nexthdr != IPPROTO_TCP)
			return -1;
		p->family = FLOW_FAMILY_V6;
		__builtin_memcpy(p->src_addr, &ip6.saddr, 16);
		__builtin_memcpy(p->dst_addr, &ip6.daddr, 16);
		l4 = l3 + sizeof(ip6);
		ip_end = ip6.payload_len ? l4 + bpf_ntohs(ip6.payload_len) : skb->len;
	} else {
		return -1;
	}

	struct tcphdr th;

	if (bpf_skb_load_bytes(skb, l4, &th, sizeof(th)))
		return -1;
	if (th.doff < 5)
		return -1;
	p->l4_off = l4;
	p->hdr_len = th.doff * 4;
	if (ip_end > skb->len || ip_end < l4 + p->hdr_len)
		return -1;
	p->payload_len = ip_end - l4 - p->hdr_len;
	p->seq = bpf_ntohl(th.seq);
	p->ack = bpf_ntohl(th.ack_seq);
	p->window = bpf_ntohs(th.window);
	p->flags = ((__u8 *)&th)[13];
	p->src_port = th.source;
	p->dst_port = th.dest;
	return 0;
}

/* Copy the TCP header and options (hdr_len bytes, 20..60) into w->buf. */
/* The map key of a parsed segment's flow; the local end is the source on egress, the
 * destination on ingress. */
static __always_inline void flow_key_of(const struct tcp_pkt *p, int egress,
					struct flow_key *key)
{
	__builtin_memcpy(key->local_addr, egress ? p->src_addr : p->dst_addr, 16);
	__builtin_memcpy(key->remote_addr, egress ? p->dst_addr : p->src_addr, 16);
	key->local_port = egress ? p->src_port : p->dst_port;
	key->remote_port = egress ? p->dst_port : p->src_port;
	key->family = p->family;
}

static __always_inline int load_tcp_header(struct __sk_buff *skb, struct tcp_pkt *p,
					   struct opt_walk *w)
{
	__u32 len = p->hdr_len;

	if (len < 20 || len > TCP_HDR_MAX)
		return -1;
	if (bpf_skb_load_bytes(skb, p->l4_off, w->buf, len))
		return -1;
	__builtin_memcpy(w->old, w->buf, TCP_BUF);
	w->pos = 20;
	w->end = len;
	w->ts_off = 0;
	w->wscale = 0xff;
	return 0;
}

/* One step of the option walk: one byte while NOP-ing a SACK option, else one option. */
static long opt_step(__u32 index, void *ctx)
{
	__u32 zero = 0;
	struct opt_walk *w = bpf_map_lookup_elem(&walk_scratch, &zero);

	if (!w)
		return 1;
	__u32 pos = w->pos;
	__u32 end = w->end;
	__u32 kind, len;


	if (pos >= end || pos >= TCP_HDR_MAX)
		return 1;
	if (w->nop_left) {
		w->buf[pos & (TCP_BUF - 1)] = TCP_OPT_NOP;
		w->nop_left--;
		w->pos = pos + 1;
		return 0;
	}
	kind = w->buf[pos & (TCP_BUF - 1)];
	if (kind == TCP_OPT_EOL)
		return 1;
	if (kind == TCP_OPT_NOP) {
		w->pos = pos + 1;
		return 0;
	}
	if (pos + 1 >= end)
		return 1;
	len = w->buf[(pos + 1) & (TCP_BUF - 1)];
	if (len < 2 || pos + len > end)
		return 1;
	if (kind == TCP_OPT_SACK) {
		w->sack_found = 1;
		if (w->strip_sack) {
			/* NOP this byte now, the other len - 1 in the next iterations: every
			 * iteration consumes a byte, so 40 iterations cover 40 option bytes */
			w->buf[pos & (TCP_BUF - 1)] = TCP_OPT_NOP;
			w->nop_left = len - 1;
			w->pos = pos + 1;
			return 0;
		}
	} else if (kind == TCP_OPT_SACK_PERM && len == 2) {
		w->sackperm_found = 1;
		if (w->strip_sackperm) {
			w->buf[pos & (TCP_BUF - 1)] = TCP_OPT_NOP;
			w->buf[(pos + 1) & (TCP_BUF - 1)] = TCP_OPT_NOP;
		}
	} else if (kind == TCP_OPT_TS && len == 10) {
		w->ts_off = pos;
	} else if (kind == TCP_OPT_WS && len == 3) {
		w->wscale = w->buf[(pos + 2) & (TCP_BUF - 1)];
	}
	w->pos = pos + len;
	return 0;
}

static __always_inline void walk_options(struct opt_walk *w)
{
	bpf_loop(TCP_HDR_MAX - 20, opt_step, NULL, 0);
}

static __always_inline __u32 buf_be32(const __u8 *buf, __u32 off)
{
	return ((__u32)buf[off & (TCP_BUF - 1)] << 24) | ((__u32)buf[(off + 1) & (TCP_BUF - 1)] << 16) |
	       ((__u32)buf[(off + 2) & (TCP_BUF - 1)] << 8) | (__u32)buf[(off + 3) & (TCP_BUF - 1)];
}

static __always_inline void buf_put_be32(__u8 *buf, __u32 off, __u32 v)
{
	buf[off & (TCP_BUF - 1)] = v >> 24;
	buf[(off + 1) & (TCP_BUF - 1)] = v >> 16;
	buf[(off + 2) & (TCP_BUF - 1)] = v >> 8;
	buf[(off + 3) & (TCP_BUF - 1)] = v;
}

#endif
