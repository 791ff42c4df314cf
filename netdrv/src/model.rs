//! The desired state of one host's tenant networks, as netdrv needs it: which tenants have
//! ports here, their subnets (VLAN, VNI) and ports. vpcd derives it from its store.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::filter::PortSecurity;
use crate::ipam::Mac;

/// VxLAN overhead: outer Ethernet 14 + IPv4 20 + UDP 8 + VxLAN 8.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The VxLAN UDP port (IANA).
pub const VXLAN_PORT: u16 = 4789;

/// The host's underlay: where its VTEPs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Underlay {
    pub local: Ipv4Addr,
    pub mtu: u32,
}

/// Everything netdrv makes on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNet {
    /// Link-name prefix (see `names`).
    pub prefix: String,
    /// The vpcd instance id, written into each link's alias.
    pub owner: String,
    /// None: a host without VxLAN (ports of a tenant reach each other on this host only).
    pub underlay: Option<Underlay>,
    /// Peer VTEPs: every local VNI floods to each (head-end replication).
    pub peers: Vec<Ipv4Addr>,
    pub tenants: Vec<TenantNet>,
    /// Remote MACs installed statically: (VNI, MAC, VTEP). Installed on the VNI's VxLAN device
    /// while it exists.
    #[serde(default)]
    pub remote_macs: Vec<(u32, Mac, Ipv4Addr)>,
    /// Routers' legs onto the external network.
    #[serde(default)]
    pub externals: Vec<ExternalLeg>,
    /// Flood entries per VNI besides `peers`: (VNI, VTEP), learned from EVPN type-3 routes.
    #[serde(default)]
    pub floods: Vec<(u32, Ipv4Addr)>,
    /// Whether the tenant bridges learn source MACs on their VxLAN ports. Off when a control
    /// plane (EVPN) installs every remote MAC: nothing arriving over the wire moves an entry.
    #[serde(default = "learning_default")]
    pub vxlan_port_learning: bool,
    /// Neighbours the tenant bridges answer ARP for, (VNI, IPv4, MAC): remote ports learned
    /// from EVPN. Answered only from ports whose MAC is behind a VxLAN port that does not learn.
    #[serde(default)]
    pub neighbours: Vec<(u32, Ipv4Addr, Mac)>,
}

fn learning_default() -> bool {
    true
}

/// A router's leg onto the external network: a veth `<prefix>e<tenant>` whose host end is a
/// port of the external bridge (not vpcd's) and whose other end is `ifname` in `netns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalLeg {
    pub tenant: u32,
    /// The host bridge of the external network.
    pub bridge: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub mac: Mac,
}

impl HostNet {
    /// MTU of ports and VxLAN devices: underlay MTU - 50, or 1500 without an underlay.
    pub fn port_mtu(&self) -> u32 {
        self.underlay.map_or(1500, |u| u.mtu - VXLAN_OVERHEAD)
    }
}

/// One tenant's part on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantNet {
    /// Numeric id, used in the bridge name.
    pub id: u32,
    pub subnets: Vec<SubnetNet>,
    pub ports: Vec<PortNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetNet {
    pub name: String,
    /// Host-local tag on the tenant bridge.
    pub vlan: u16,
    pub vni: u32,
}

/// A port: a VM NIC (tap) or a namespace's interface (veth).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortNet {
    pub id: u32,
    /// Name of the subnet (in the same tenant).
    pub subnet: String,
    pub kind: PortKind,
    pub mac: Mac,
    /// Port security; None when switched off.
    pub security: Option<PortSecurity>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortKind {
    /// A tap for a VM; QEMU opens it by name.
    Tap,
    /// A veth whose other end lives in `netns` as `ifname`, with the port's MAC and address.
    Veth {
        netns: PathBuf,
        ifname: String,
        address: Option<(Ipv4Addr, u8)>,
    },
}
