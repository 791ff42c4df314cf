//! netdrv: tenant networks on one host. Namespace-aware netlink (`rtnetlink`), tenant bridges,
//! VxLAN VTEPs, taps and veths, VLAN filtering and port security (eBPF from `bpf/`).

pub mod bgp;
pub mod dhcp;
mod error;
pub mod filter;
mod host;
pub mod ipam;
mod link;
pub mod model;
pub mod names;
pub mod netns;
pub mod nftgen;
pub mod plan;
mod tap;

pub use error::{Error, Result};
pub use host::NetHost;
pub use link::Netlink;
pub use netns::Netns;
