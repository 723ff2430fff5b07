/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * tap.bpf.c - Tapestry's TC tap.
 *
 * Two classifiers, tapestry_ing (ingress) and tapestry_egr (egress),
 * attached by tap-agent to each tapped interface. The "tapestry_" prefix is
 * how the agent recognises (and removes) programs left by an earlier run.
 * For every packet they decide which policies want it (pre-filter from
 * maps), copy a header plus up to snaplen bytes into one
 * ring buffer, and count what they did. They never change or drop traffic:
 * both always return TC_ACT_UNSPEC (TCX_NEXT), so the next program runs.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "tap_abi.h"
#include "tap_parse.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * Submit with a wake-up only once this many bytes wait in the ring; the
 * agent also drains on a short timer, so a quiet ring is never stuck.
 * Set by the agent at load time (.rodata).
 */
const volatile __u32 tap_wakeup_bytes = 256 * 1024;

/*
 * tap_ifaces: ifindex -> struct tap_iface.
 * Written by the agent when it attaches to or detaches from an interface;
 * an interface missing here is passed through without being counted.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct tap_iface);
} tap_ifaces SEC(".maps");

/*
 * tap_rules: the single entry holds every kernel rule (struct tap_rules).
 * One lookup per packet; rules are indexed by bit position in the masks.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tap_rules);
} tap_rules SEC(".maps");

/*
 * tap_cidrs: CIDR -> bitmask of the rules whose CIDR list contains it.
 * The agent stores, for each prefix, the union of the bits of all rules
 * with a CIDR containing that prefix, so the longest match alone answers
 * "which rules does this address satisfy".
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tap_cidr_key);
	__type(value, __u64);
} tap_cidrs SEC(".maps");

/*
 * tap_ring: records (struct tap_record + packet bytes) for the agent.
 * Size set by the agent at load time (--ring-size).
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 * 1024 * 1024);
} tap_ring SEC(".maps");

/* tap_counters: per-CPU counters indexed by enum tap_counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TAP_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tap_counters SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&tap_counters, &idx);

	if (v)
		*v += 1; /* per-CPU: no atomics needed */
}

/* Rules of rule_mask that this packet satisfies, as a policy bitmask. */
static __always_inline __u64 eval_rules(struct __sk_buff *skb, __u64 rule_mask, __u8 dir)
{
	struct tap_pkt pkt = {};
	struct tap_cidr_key key = {};
	__u64 cidr_rules = 0, policies = 0;
	struct tap_rules *rules;
	__u32 zero = 0;
	__u64 *bits;

	rules = bpf_map_lookup_elem(&tap_rules, &zero);
	if (!rules)
		return 0;

	tap_parse(skb, &pkt);
	if (pkt.is_ip) {
		key.prefixlen = 128;
		__builtin_memcpy(key.addr, pkt.saddr, 16);
		bits = bpf_map_lookup_elem(&tap_cidrs, &key);
		if (bits)
			cidr_rules |= *bits;
		__builtin_memcpy(key.addr, pkt.daddr, 16);
		bits = bpf_map_lookup_elem(&tap_cidrs, &key);
		if (bits)
			cidr_rules |= *bits;
	}

	for (__u32 i = 0; i < TAP_MAX_RULES; i++) {
		struct tap_rule *r;

		if ((rule_mask >> i) == 0)
			break;
		if (!((rule_mask >> i) & 1))
			continue;
		r = &rules->rules[i];
		if (!(r->dir_mask & (1 << (dir - 1))))
			continue;
		if (r->flags & (TAP_RULE_PROTO | TAP_RULE_PORTS | TAP_RULE_CIDR)) {
			if (!pkt.is_ip)
				continue;
		}
		if ((r->flags & TAP_RULE_PROTO) && r->proto != pkt.proto)
			continue;
		if (r->flags & TAP_RULE_PORTS) {
			if (!pkt.has_ports)
				continue;
			if (!((pkt.sport >= r->port_lo && pkt.sport <= r->port_hi) ||
			      (pkt.dport >= r->port_lo && pkt.dport <= r->port_hi)))
				continue;
		}
		if ((r->flags & TAP_RULE_CIDR) && !((cidr_rules >> i) & 1))
			continue;
		policies |= 1ULL << (r->policy & (TAP_MAX_POLICIES - 1));
	}
	return policies;
}

/*
 * Reserve a record whose data area is exactly SIZE bytes (the verifier needs
 * a constant reservation), copy cap_len <= SIZE bytes of the packet into it
 * and submit. One instance per bucket keeps small packets from occupying
 * 64 KiB of ring each.
 */
static __always_inline __u64 wakeup_flags(void)
{
	return bpf_ringbuf_query(&tap_ring, BPF_RB_AVAIL_DATA) >= tap_wakeup_bytes
		       ? BPF_RB_FORCE_WAKEUP
		       : BPF_RB_NO_WAKEUP;
}

/*
 * Reserve a record whose data area is exactly SIZE bytes (the verifier needs
 * a constant reservation), copy 1 <= cap_len <= SIZE bytes of the packet into
 * it and submit. One instance per bucket keeps small packets from occupying
 * 64 KiB of ring each. Returns the counter to bump.
 */
#define TAP_EMIT_BUCKET(SIZE)                                                          \
	static __noinline int emit_##SIZE(struct __sk_buff *skb, struct tap_record *h) \
	{                                                                              \
		struct tap_record *rec;                                                \
		__u64 len = h->cap_len;                                                \
                                                                                       \
		if (len > SIZE)                                                        \
			len = SIZE;                                                    \
		barrier_var(len); /* keep the bound on the register the verifier sees */ \
		if (len == 0)                                                          \
			return TAP_CNT_LOAD_ERROR;                                     \
		rec = bpf_ringbuf_reserve(&tap_ring, sizeof(*rec) + SIZE, 0);           \
		if (!rec)                                                              \
			return TAP_CNT_RINGBUF_FULL;                                   \
		*rec = *h;                                                             \
		rec->cap_len = len;                                                    \
		if (bpf_skb_load_bytes(skb, 0, (void *)(rec + 1), len) < 0) {          \
			bpf_ringbuf_discard(rec, BPF_RB_NO_WAKEUP);                    \
			return TAP_CNT_LOAD_ERROR;                                     \
		}                                                                      \
		bpf_ringbuf_submit(rec, wakeup_flags());                               \
		return TAP_CNT_CAPTURED;                                               \
	}

/* snaplen 0: the header alone (the packet is counted and timed, not copied). */
static __noinline int emit_header(struct tap_record *h)
{
	struct tap_record *rec = bpf_ringbuf_reserve(&tap_ring, sizeof(*rec), 0);

	if (!rec)
		return TAP_CNT_RINGBUF_FULL;
	*rec = *h;
	bpf_ringbuf_submit(rec, wakeup_flags());
	return TAP_CNT_CAPTURED;
}

/* Largest bucket: a 64 KiB GSO super-packet with its L2 header, rounded up. */
#define TAP_MAX_CAPTURE 65792

TAP_EMIT_BUCKET(128)
TAP_EMIT_BUCKET(256)
TAP_EMIT_BUCKET(512)
TAP_EMIT_BUCKET(1024)
TAP_EMIT_BUCKET(1536)
TAP_EMIT_BUCKET(2048)
TAP_EMIT_BUCKET(4096)
TAP_EMIT_BUCKET(8192)
TAP_EMIT_BUCKET(16384)
TAP_EMIT_BUCKET(32768)
TAP_EMIT_BUCKET(65792)

static __always_inline int emit(struct __sk_buff *skb, struct tap_record *h)
{
	__u32 n = h->cap_len;

	if (n == 0)
		return emit_header(h);
	if (n <= 128)
		return emit_128(skb, h);
	if (n <= 256)
		return emit_256(skb, h);
	if (n <= 512)
		return emit_512(skb, h);
	if (n <= 1024)
		return emit_1024(skb, h);
	if (n <= 1536)
		return emit_1536(skb, h);
	if (n <= 2048)
		return emit_2048(skb, h);
	if (n <= 4096)
		return emit_4096(skb, h);
	if (n <= 8192)
		return emit_8192(skb, h);
	if (n <= 16384)
		return emit_16384(skb, h);
	if (n <= 32768)
		return emit_32768(skb, h);
	return emit_65792(skb, h);
}

static __always_inline int tap(struct __sk_buff *skb, __u8 dir)
{
	struct tap_record h = {};
	struct tap_iface *cfg;
	__u32 ifindex = skb->ifindex;
	__u64 policies;
	int res;

	cfg = bpf_map_lookup_elem(&tap_ifaces, &ifindex);
	if (!cfg)
		return TC_ACT_UNSPEC;
	count(TAP_CNT_SEEN);

	policies = cfg->always_mask[dir - 1];
	if (cfg->rule_mask)
		policies |= eval_rules(skb, cfg->rule_mask, dir);
	policies &= cfg->policy_mask;
	if (!policies)
		return TC_ACT_UNSPEC;
	count(TAP_CNT_MATCHED);

	h.ts_ns = bpf_ktime_get_boot_ns();
	h.policy_mask = policies;
	h.ifindex = ifindex;
	h.wire_len = skb->len;
	h.cap_len = skb->len < cfg->snaplen ? skb->len : cfg->snaplen;
	h.direction = dir;
	h.version = TAP_RECORD_VERSION;
	if (h.cap_len > TAP_MAX_CAPTURE) {
		h.cap_len = TAP_MAX_CAPTURE;
		count(TAP_CNT_TRUNCATED);
	}

	res = emit(skb, &h);
	count(res);
	return TC_ACT_UNSPEC;
}

SEC("classifier")
int tapestry_ing(struct __sk_buff *skb)
{
	return tap(skb, TAP_DIR_INGRESS);
}

SEC("classifier")
int tapestry_egr(struct __sk_buff *skb)
{
	return tap(skb, TAP_DIR_EGRESS);
}
