// SPDX-License-Identifier: MIT OR GPL-2.0
/*
 * VLAN filtering and port security on the ports of a tenant bridge (a Linux bridge without
 * vlan_filtering). Every port is an access port of one VLAN; frames carry the 802.1Q tag only
 * inside the bridge.
 *
 *   port_ingress  TC ingress of a port: frames from the VM (or uplink) into the bridge.
 *                 Unknown port -> drop. Tagged frame -> drop (drop_vlan). Port security when
 *                 configured (drop_security). Then push the port's tag and pass (tx_*).
 *   port_egress   TC egress of a port: frames from the bridge to the VM (or uplink).
 *                 Unknown port -> drop. Untagged, or tag of another VLAN -> drop (drop_vlan),
 *                 except untagged ARP replies: frames from the bridge are always tagged, so
 *                 an untagged one was sent on the port by the bridge itself, and the bridge
 *                 sends ARP replies only where it answers for a neighbour (neigh_suppress,
 *                 EVPN's ARP suppression). Pop the tag and pass (rx_*).
 *
 * With PORT_F_BRIDGE_VLAN in a port's flags the bridge does the VLAN part (kernels with bridge
 * VLAN filtering): ingress drops tagged frames and applies port security but pushes no tag;
 * egress drops tagged frames and pops nothing.
 *
 * Maps, keyed by the port's ifindex (one set of maps per network namespace, so keys do not
 * collide):
 *   port_cfg       hash   ifindex -> struct port_cfg        (written by netdrv)
 *   port_counters  percpu ifindex -> struct port_counters   (created zeroed by netdrv)
 *
 * The layouts are mirrored in netdrv/src/filter/ebpf/layout.rs: change both together.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "port_filter.h"

/* TC verdicts. With TCX, TC_ACT_UNSPEC is TCX_NEXT: run the next program, or pass if none. */
#define TC_ACT_UNSPEC (-1)
#define TC_ACT_SHOT 2

#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define ETH_P_IPV6 0x86DD
#define IPPROTO_UDP 17
#define ETH_HLEN 14

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PORT_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, struct port_cfg);
} port_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, PORT_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, struct port_counters);
} port_counters SEC(".maps");

struct eth {
	__u8 dst[6];
	__u8 src[6];
	__be16 proto;
} __attribute__((packed));

/* ARP for IPv4 over Ethernet. */
struct arp4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
} __attribute__((packed));

/* The first 20 bytes of an IPv4 header. */
struct ip4 {
	__u8 ver_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__be16 check;
	__u32 saddr;
	__u32 daddr;
} __attribute__((packed));

/* The first 24 bytes of an IPv6 header: up to the source address. */
struct ip6 {
	__be32 ver_tc_flow;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u32 saddr[4];
} __attribute__((packed));

struct udp_ports {
	__be16 source;
	__be16 dest;
} __attribute__((packed));

static __always_inline void count_drop_vlan(struct port_counters *cnt)
{
	if (cnt)
		cnt->drop_vlan++;
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

static __always_inline int mac_allowed(const struct port_cfg *cfg, const __u8 *mac)
{
	for (int i = 0; i < PORT_MAX_MACS; i++) {
		if (i >= cfg->n_macs)
			break;
		if (mac_eq(cfg->macs[i], mac))
			return 1;
	}
	return 0;
}

/* addr in network byte order, as it is in the packet and in port_cfg.ipv4. */
static __always_inline int ipv4_allowed(const struct port_cfg *cfg, __u32 addr)
{
	for (int i = 0; i < PORT_MAX_IPV4; i++) {
		if (i >= cfg->n_ipv4)
			break;
		if (cfg->ipv4[i] == addr)
			return 1;
	}
	return 0;
}

/* fe80::/64 with the modified EUI-64 interface identifier of one of the port's MACs. */
static __always_inline int ipv6_is_eui64_link_local(const struct port_cfg *cfg, const __u32 *a)
{
	const __u8 *b = (const __u8 *)a;

	if (!(b[0] == 0xfe && b[1] == 0x80 && b[2] == 0 && b[3] == 0 && a[1] == 0))
		return 0;
	if (!(b[11] == 0xff && b[12] == 0xfe))
		return 0;
	for (int i = 0; i < PORT_MAX_MACS; i++) {
		if (i >= cfg->n_macs)
			break;
		const __u8 *m = cfg->macs[i];
		if (b[8] == (m[0] ^ 0x02) && b[9] == m[1] && b[10] == m[2] && b[13] == m[3] &&
		    b[14] == m[4] && b[15] == m[5])
			return 1;
	}
	return 0;
}

static __always_inline int ipv6_allowed(const struct port_cfg *cfg, const __u32 *a)
{
	/* The unspecified address: duplicate address detection, MLD before an address exists. */
	if ((a[0] | a[1] | a[2] | a[3]) == 0)
		return 1;
	for (int i = 0; i < PORT_MAX_IPV6; i++) {
		if (i >= cfg->n_ipv6)
			break;
		const __u32 *c = cfg->ipv6[i];
		if (c[0] == a[0] && c[1] == a[1] && c[2] == a[2] && c[3] == a[3])
			return 1;
	}
	return ipv6_is_eui64_link_local(cfg, a);
}

static __always_inline int ipv4_frame_allowed(struct __sk_buff *skb, const struct port_cfg *cfg)
{
	struct ip4 ip;
	struct udp_ports udp;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return 0;
	if ((ip.ver_ihl >> 4) != 4 || (ip.ver_ihl & 0x0f) < 5)
		return 0;
	if (ipv4_allowed(cfg, ip.saddr))
		return 1;
	/* DHCP discovery/request before the VM has an address: 0.0.0.0, UDP 68 -> 67. */
	if (ip.saddr != 0 || ip.protocol != IPPROTO_UDP)
		return 0;
	if (ip.frag_off & bpf_htons(0x3fff))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + (ip.ver_ihl & 0x0f) * 4, &udp, sizeof(udp)) < 0)
		return 0;
	return udp.source == bpf_htons(68) && udp.dest == bpf_htons(67);
}

static __always_inline int arp_frame_allowed(struct __sk_buff *skb, const struct port_cfg *cfg,
					     const struct eth *eth)
{
	struct arp4 arp;
	__u32 spa;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &arp, sizeof(arp)) < 0)
		return 0;
	if (arp.htype != bpf_htons(1) || arp.ptype != bpf_htons(ETH_P_IP) || arp.hlen != 6 ||
	    arp.plen != 4)
		return 0;
	if (!mac_eq(arp.sha, eth->src))
		return 0;
	__builtin_memcpy(&spa, arp.spa, sizeof(spa));
	/* 0.0.0.0: an ARP probe (address conflict detection). */
	return spa == 0 || ipv4_allowed(cfg, spa);
}

static __always_inline int ipv6_frame_allowed(struct __sk_buff *skb, const struct port_cfg *cfg)
{
	struct ip6 ip;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return 0;
	if ((bpf_ntohl(ip.ver_tc_flow) >> 28) != 6)
		return 0;
	return ipv6_allowed(cfg, ip.saddr);
}

/* Port security: may this port send this frame? */
static __always_inline int frame_allowed(struct __sk_buff *skb, const struct port_cfg *cfg,
					 const struct eth *eth)
{
	if (!mac_allowed(cfg, eth->src))
		return 0;
	switch (eth->proto) {
	case bpf_htons(ETH_P_IP):
		return ipv4_frame_allowed(skb, cfg);
	case bpf_htons(ETH_P_ARP):
		return arp_frame_allowed(skb, cfg, eth);
	case bpf_htons(ETH_P_IPV6):
		return ipv6_frame_allowed(skb, cfg);
	default:
		return 0;
	}
}

SEC("classifier")
int port_ingress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct port_cfg *cfg = bpf_map_lookup_elem(&port_cfg, &ifindex);
	struct port_counters *cnt;
	struct eth eth;
	__u32 len;

	if (!cfg)
		return TC_ACT_SHOT;
	cnt = bpf_map_lookup_elem(&port_counters, &ifindex);

	/* A frame that carries a tag of its own (offloaded or in the packet) never enters. */
	if (skb->vlan_present) {
		count_drop_vlan(cnt);
		return TC_ACT_SHOT;
	}
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0) {
		count_drop_vlan(cnt);
		return TC_ACT_SHOT;
	}
	if (eth.proto == bpf_htons(ETH_P_8021Q) || eth.proto == bpf_htons(ETH_P_8021AD)) {
		count_drop_vlan(cnt);
		return TC_ACT_SHOT;
	}

	if (cfg->security && !frame_allowed(skb, cfg, &eth)) {
		if (cnt)
			cnt->drop_security++;
		return TC_ACT_SHOT;
	}

	len = skb->len;
	if (!(cfg->flags & PORT_F_BRIDGE_VLAN) &&
	    bpf_skb_vlan_push(skb, bpf_htons(ETH_P_8021Q), cfg->vlan) < 0) {
		count_drop_vlan(cnt);
		return TC_ACT_SHOT;
	}
	if (cnt) {
		cnt->tx_packets++;
		cnt->tx_bytes += len;
	}
	return TC_ACT_UNSPEC;
}

/* An IPv4-over-Ethernet ARP reply (the frame's type already checked). */
static __always_inline int is_arp_reply(struct __sk_buff *skb)
{
	struct arp4 arp;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &arp, sizeof(arp)) < 0)
		return 0;
	return arp.htype == bpf_htons(1) && arp.ptype == bpf_htons(ETH_P_IP) && arp.hlen == 6 &&
	       arp.plen == 4 && arp.op == bpf_htons(2);
}

SEC("classifier")
int port_egress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct port_cfg *cfg = bpf_map_lookup_elem(&port_cfg, &ifindex);
	struct port_counters *cnt;
	__u16 vid;

	if (!cfg)
		return TC_ACT_SHOT;
	cnt = bpf_map_lookup_elem(&port_counters, &ifindex);

	if (cfg->flags & PORT_F_BRIDGE_VLAN) {
		/* The bridge sent it as an untagged member of the port's VLAN. */
		if (skb->vlan_present) {
			count_drop_vlan(cnt);
			return TC_ACT_SHOT;
		}
		goto pass;
	}
	if (skb->vlan_present) {
		vid = skb->vlan_tci & 0x0fff;
	} else {
		/* Not offloaded: the tag, if any, is in the packet. */
		struct {
			__be16 proto;
			__be16 tci;
		} __attribute__((packed)) tag;

		if (bpf_skb_load_bytes(skb, 12, &tag, sizeof(tag)) < 0) {
			count_drop_vlan(cnt);
			return TC_ACT_SHOT;
		}
		if (tag.proto == bpf_htons(ETH_P_ARP) && is_arp_reply(skb))
			goto pass;
		if (tag.proto != bpf_htons(ETH_P_8021Q)) {
			count_drop_vlan(cnt);
			return TC_ACT_SHOT;
		}
		vid = bpf_ntohs(tag.tci) & 0x0fff;
	}
	if (vid != cfg->vlan) {
		count_drop_vlan(cnt);
		return TC_ACT_SHOT;
	}
	if (bpf_skb_vlan_pop(skb) < 0) {
		count_drop_vlan(cnt);
		return TC_ACT_SHOT;
	}
	/* skb_vlan_pop moves an inner tag into the offload slot: a second tag never leaves. */
	if (skb->vlan_present) {
		count_drop_vlan(cnt);
		return TC_ACT_SHOT;
	}
pass:
	if (cnt) {
		cnt->rx_packets++;
		cnt->rx_bytes += skb->len;
	}
	return TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "Dual MIT/GPL";
