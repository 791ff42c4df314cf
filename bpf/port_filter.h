/* SPDX-License-Identifier: MIT OR GPL-2.0 */
/*
 * Map value layouts of port_filter.c. Mirrored, byte for byte, by
 * netdrv/src/filter/ebpf/layout.rs (which checks the sizes at load time).
 */
#ifndef VPCD_PORT_FILTER_H
#define VPCD_PORT_FILTER_H

#include <linux/types.h>

#define PORT_MAX_ENTRIES 4096
#define PORT_MAX_MACS 8
#define PORT_MAX_IPV4 16
#define PORT_MAX_IPV6 16

/* The bridge filters VLANs itself (vlan_filtering, the port an untagged pvid member of `vlan`):
 * the programs neither push nor pop tags, they only apply port security and count. */
#define PORT_F_BRIDGE_VLAN 0x01

/* The configuration of one port. Addresses in network byte order. */
struct port_cfg {
	__u16 vlan;      /* access VLAN, 1..=4094 (host byte order) */
	__u8 security;   /* 1: port security on (the lists below apply) */
	__u8 n_macs;     /* used entries of macs */
	__u8 n_ipv4;     /* used entries of ipv4 */
	__u8 n_ipv6;     /* used entries of ipv6 */
	__u8 flags;      /* PORT_F_* */
	__u8 pad;
	__u8 macs[PORT_MAX_MACS][6];
	__u32 ipv4[PORT_MAX_IPV4];
	__u32 ipv6[PORT_MAX_IPV6][4];
};

/* Per port and CPU. rx: from the bridge to the VM (egress); tx: from the VM (ingress). */
struct port_counters {
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 drop_vlan;
	__u64 drop_security;
};

_Static_assert(sizeof(struct port_cfg) == 376, "port_cfg layout changed: update layout.rs");
_Static_assert(sizeof(struct port_counters) == 48, "port_counters layout changed");

#endif
