/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * tap_parse.h - the few packet fields the pre-filter needs (L4 protocol,
 * ports, addresses), read with bpf_skb_load_bytes so that non-linear and
 * GSO skbs parse as well as linear ones. Nothing here trusts the packet:
 * every read is bounds-checked by the helper, and a packet that does not
 * parse is simply "not IP" for the rules.
 */
#ifndef TAPESTRY_TAP_PARSE_H
#define TAPESTRY_TAP_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct tap_pkt {
	__u8 is_ip;     /* IPv4 or IPv6 header parsed */
	__u8 has_ports; /* ports valid (TCP/UDP/SCTP, first fragment) */
	__u8 proto;     /* L4 protocol (IPv6: after extension headers) */
	__u8 _pad;
	__u16 sport, dport; /* host byte order */
	__u8 saddr[16];     /* IPv4-mapped for IPv4 */
	__u8 daddr[16];
};

static __always_inline int tap_l4_has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

static __always_inline void tap_map_v4(__u8 *dst, __u32 addr_be)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &addr_be, 4);
}

static __always_inline void tap_load_ports(struct __sk_buff *skb, __u32 off, struct tap_pkt *p)
{
	__be16 ports[2];

	if (!tap_l4_has_ports(p->proto))
		return;
	if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
		return;
	p->sport = bpf_ntohs(ports[0]);
	p->dport = bpf_ntohs(ports[1]);
	p->has_ports = 1;
}

/* IPv6 extension headers we step over to find the L4 protocol. */
#define TAP_IPV6_MAX_EXT 4

static __always_inline void tap_parse(struct __sk_buff *skb, struct tap_pkt *p)
{
	__u32 off = ETH_HLEN;
	__be16 proto;

	if (bpf_skb_load_bytes(skb, 12, &proto, sizeof(proto)) < 0)
		return;
	/* One or two VLAN tags carried in the frame (not offloaded). */
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if (bpf_skb_load_bytes(skb, off + 2, &proto, sizeof(proto)) < 0)
			return;
		off += 4;
	}

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
			return;
		p->is_ip = 1;
		p->proto = ip.protocol;
		tap_map_v4(p->saddr, ip.saddr);
		tap_map_v4(p->daddr, ip.daddr);
		/* Non-first fragments carry no L4 header. */
		if (ip.frag_off & bpf_htons(0x1fff))
			return;
		tap_load_ports(skb, off + ip.ihl * 4, p);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		__u8 nexthdr;

		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return;
		p->is_ip = 1;
		__builtin_memcpy(p->saddr, &ip6.saddr, 16);
		__builtin_memcpy(p->daddr, &ip6.daddr, 16);
		nexthdr = ip6.nexthdr;
		off += sizeof(ip6);
#pragma unroll
		for (int i = 0; i < TAP_IPV6_MAX_EXT; i++) {
			__u8 ext[2]; /* next header, length in 8-octet units - 1 */

			if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING &&
			    nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_FRAGMENT)
				break;
			if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
				return;
			if (nexthdr == IPPROTO_FRAGMENT) {
				__be16 frag;

				if (bpf_skb_load_bytes(skb, off + 2, &frag, sizeof(frag)) < 0)
					return;
				p->proto = ext[0];
				if (frag & bpf_htons(0xfff8))
					return; /* not the first fragment: no ports */
				nexthdr = ext[0];
				off += 8;
				continue;
			}
			nexthdr = ext[0];
			off += (ext[1] + 1) * 8;
		}
		p->proto = nexthdr;
		tap_load_ports(skb, off, p);
	}
}

#endif
