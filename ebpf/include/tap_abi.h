/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * tap_abi.h - the contract between the TC tap programs and tap-agent.
 *
 * Every struct here is read or written by tap-agent through aya; the Rust
 * mirror lives in tap-agent/src/abi.rs and must keep the same layout (the
 * agent has unit tests that pin the sizes). Change both or neither.
 */
#ifndef TAPESTRY_TAP_ABI_H
#define TAPESTRY_TAP_ABI_H

#include <linux/types.h>

/* At most 64 policies and 64 kernel rules: both are u64 bitmasks. */
#define TAP_MAX_POLICIES 64
#define TAP_MAX_RULES 64

/* Direction values, as in tapestry.tap.v1.Direction. */
#define TAP_DIR_INGRESS 1
#define TAP_DIR_EGRESS 2

/* Record format version, bumped on any change to struct tap_record. */
#define TAP_RECORD_VERSION 1

/*
 * One ring buffer record: this header, then cap_len bytes of the packet
 * starting at its Ethernet header. The reservation may be larger than
 * sizeof(header) + cap_len (sizes are bucketed); the tail is padding.
 */
struct tap_record {
	__u64 ts_ns;       /* CLOCK_BOOTTIME ns; the agent converts to wall clock */
	__u64 policy_mask; /* bit i: policy i wanted this packet */
	__u32 ifindex;     /* interface the packet crossed */
	__u32 wire_len;    /* skb->len: bytes on the wire (GSO: the whole super-packet) */
	__u32 cap_len;     /* bytes that follow this header */
	__u8 direction;    /* TAP_DIR_* */
	__u8 version;      /* TAP_RECORD_VERSION */
	__u16 _pad;
};

/* Value of map tap_ifaces (key: ifindex). */
struct tap_iface {
	__u64 policy_mask;    /* policies that tap this interface */
	__u64 always_mask[2]; /* [dir-1]: policies that want every packet that way */
	__u64 rule_mask;      /* kernel rules (tap_rules.rules[i]) to evaluate */
	__u32 snaplen;        /* bytes to copy per packet (0 = count only) */
	__u32 _pad;
};

/* Rule flags. A rule matches when every field it has matches. */
#define TAP_RULE_PROTO (1 << 0) /* proto must equal the L4 protocol */
#define TAP_RULE_PORTS (1 << 1) /* src or dst port within [port_lo, port_hi] */
#define TAP_RULE_CIDR (1 << 2)  /* src or dst address in one of its CIDRs (tap_cidrs) */

struct tap_rule {
	__u8 policy;   /* policy index this rule belongs to */
	__u8 proto;    /* IPPROTO_* when TAP_RULE_PROTO */
	__u8 dir_mask; /* bit (dir-1): directions the rule applies to */
	__u8 flags;    /* TAP_RULE_* */
	__u16 port_lo; /* host byte order, inclusive */
	__u16 port_hi;
};

/* The single value of map tap_rules. */
struct tap_rules {
	struct tap_rule rules[TAP_MAX_RULES];
};

/* Key of map tap_cidrs: IPv4 is stored IPv4-mapped (::ffff:a.b.c.d, prefix + 96). */
struct tap_cidr_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Indexes of the per-CPU counter array tap_counters. */
enum tap_counter {
	TAP_CNT_SEEN = 0,      /* packets on tapped interfaces */
	TAP_CNT_MATCHED,       /* ... that some policy wanted */
	TAP_CNT_CAPTURED,      /* ... written to the ring buffer */
	TAP_CNT_RINGBUF_FULL,  /* ... lost because the ring was full */
	TAP_CNT_TRUNCATED,     /* captured shorter than snaplen (larger than the biggest bucket) */
	TAP_CNT_LOAD_ERROR,    /* bpf_skb_load_bytes failed (record discarded) */
	TAP_CNT_MAX,
};

#endif
