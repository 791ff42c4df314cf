//! VLAN filtering and port security on tenant bridge ports, behind one trait.
//!
//! Each bridge port is either a VM/namespace port (a tap or veth) or the uplink of a subnet (its
//! VxLAN device); both are access ports of one VLAN. Frames carry the subnet's tag only inside the
//! bridge: added when they enter from a port, checked and removed when they leave through one.
//! A port without configuration drops everything (fail closed).
//!
//! Implementations: [`kernel::KernelFilter`] (the bridge's own VLAN filtering, where the kernel
//! has it, with port security by the eBPF programs) and [`ebpf::EbpfFilter`] (TC programs from
//! `bpf/` do everything, for kernels without bridge VLAN filtering, as on this project's CI).
//! Chosen at start-up by [`probe`] or configuration; [`open`] opens either.

pub mod ebpf;
pub mod kernel;

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// What a port may send (port security). Frames from the port are checked against it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSecurity {
    /// Source MACs allowed: the port's MAC plus allowed address pairs.
    pub macs: Vec<[u8; 6]>,
    /// IPv4 sources allowed (DHCP discovery from 0.0.0.0 is always allowed).
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 sources allowed, besides the link-local addresses derived from `macs` (EUI-64) and
    /// the unspecified address for duplicate address detection.
    pub ipv6: Vec<Ipv6Addr>,
}

/// The configuration of one bridge port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortFilter {
    /// The access VLAN, 1..=4094 (host-local).
    pub vlan: u16,
    /// `Some` for a VM port with port security on; `None` for uplinks and ports with it off.
    pub security: Option<PortSecurity>,
}

impl PortFilter {
    /// Checks what every implementation needs (a VLAN in 1..=4094), naming the port.
    pub(crate) fn check(&self, ifindex: u32, ifname: &str) -> Result<()> {
        if !(1..=4094).contains(&self.vlan) {
            return Err(crate::Error::Invalid(format!(
                "port {ifname} (ifindex {ifindex}): VLAN {} is not in 1..=4094",
                self.vlan
            )));
        }
        Ok(())
    }
}

/// Per-port counters, in the direction of the VM: `rx` is what the port received from the
/// bridge (to the VM), `tx` what it sent into the bridge (from the VM).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames dropped because their VLAN is not the port's (or they carried a tag of their own).
    pub drop_vlan: u64,
    /// Frames from the port dropped by port security.
    pub drop_security: u64,
}

/// Which implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterKind {
    /// The bridge filters VLANs (`vlan_filtering 1`); eBPF does port security.
    Kernel,
    /// eBPF programs tag, filter and secure; the bridge knows nothing of VLANs.
    Ebpf,
}

impl std::fmt::Display for FilterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FilterKind::Kernel => "kernel",
            FilterKind::Ebpf => "ebpf",
        })
    }
}

/// Chooses the implementation for this kernel: the bridge's VLAN filtering where it has it,
/// eBPF otherwise. Both need the eBPF programs to load (port security), which is checked too.
pub fn probe() -> Result<FilterKind> {
    ebpf::EbpfFilter::probe()?;
    Ok(if kernel::KernelFilter::probe()? {
        FilterKind::Kernel
    } else {
        FilterKind::Ebpf
    })
}

/// Checks that `kind` works on this kernel (for a kind forced by configuration).
pub fn check(kind: FilterKind) -> Result<()> {
    ebpf::EbpfFilter::probe()?;
    if kind == FilterKind::Kernel && !kernel::KernelFilter::probe()? {
        return Err(crate::Error::Invalid(
            "VLAN filter kernel: this kernel's bridges have no VLAN filtering \
             (CONFIG_BRIDGE_VLAN_FILTERING); use ebpf or auto"
                .into(),
        ));
    }
    Ok(())
}

/// Opens the implementation `kind` for the host namespace `netns`, pinning under `pin_dir`.
pub fn open(
    kind: FilterKind,
    netns: &crate::Netns,
    pin_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn VlanFilter>> {
    Ok(match kind {
        FilterKind::Kernel => std::sync::Arc::new(kernel::KernelFilter::open(netns, pin_dir)?),
        FilterKind::Ebpf => std::sync::Arc::new(ebpf::EbpfFilter::open(netns, pin_dir)?),
    })
}

/// VLAN filtering and port security for the bridge ports of one host (one network namespace).
pub trait VlanFilter: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> FilterKind;

    /// Readies a bridge that netdrv just created for ports (before any joins it).
    fn prepare_bridge(&self, _ifindex: u32, _ifname: &str) -> Result<()> {
        Ok(())
    }

    /// Attaches to the port `ifindex` (named `ifname`) if not yet attached and writes its
    /// configuration; traffic follows the new configuration at once.
    fn set_port(&self, ifindex: u32, ifname: &str, cfg: &PortFilter) -> Result<()>;

    /// Detaches from the port and forgets it. Unknown ports are fine (idempotent).
    fn remove_port(&self, ifindex: u32) -> Result<()>;

    fn counters(&self, ifindex: u32) -> Result<PortCounters>;

    /// The ports configured now (for reconciliation).
    fn ports(&self) -> Result<Vec<u32>>;
}
