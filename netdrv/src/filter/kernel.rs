//! VLAN filtering by the kernel bridge (`vlan_filtering 1`), for kernels built with
//! `CONFIG_BRIDGE_VLAN_FILTERING` (most distribution kernels; not this project's CI kernel, so its
//! tests run inside a guest, see `netdrv/tests/kernel_filter.rs`).
//!
//! - Bridges get `vlan_filtering 1` and `default_pvid 0` ([`VlanFilter::prepare_bridge`] when
//!   netdrv creates one, and again at every [`VlanFilter::set_port`] for bridges made earlier):
//!   a port that joins has no VLAN, so the bridge drops everything from and to it (fail
//!   closed), as the eBPF filter does for a port without configuration.
//! - An access port of VLAN `v` is an untagged member with pvid `v` and nothing else (`bridge
//!   vlan add dev P vid v pvid untagged`); changing the VLAN first removes the old one, so a
//!   port is never in two VLANs. Tagged frames from a port are dropped by the bridge (no member
//!   VLAN matches) and by the program.
//! - Port security and the counters stay with the eBPF programs of [`EbpfFilter`], in a mode
//!   where they push and pop no tags (`PORT_F_BRIDGE_VLAN`): there is one port-security
//!   implementation. The programs go on a port before its VLAN does, and the VLAN comes off
//!   before they do, so no frame passes unchecked. `drop_vlan` counts only what the programs
//!   drop (tagged frames from the port); frames the bridge drops for their VLAN are not
//!   counted.
//!
//! Netlink: `RTM_NEWLINK` with the bridge's `IFLA_BR_VLAN_FILTERING`/`IFLA_BR_VLAN_DEFAULT_PVID`;
//! `RTM_SETLINK`/`RTM_DELLINK` of family `AF_BRIDGE` with `IFLA_AF_SPEC`/`IFLA_BRIDGE_VLAN_INFO`
//! for port VLANs; an `AF_BRIDGE` dump with `RTEXT_FILTER_BRVLAN` to read them (what `bridge
//! vlan show` sends).

use std::collections::BTreeSet;
use std::io;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use tracing::{debug, info};

use super::ebpf::tc::{
    attrs, put_attr, u32_at, TcSocket, IFINFOMSG, IFLA_IFNAME, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_EXCL, RTM_GETLINK, RTM_NEWLINK,
};
use super::ebpf::EbpfFilter;
use super::{FilterKind, PortCounters, PortFilter, VlanFilter};
use crate::error::{Error, Result};
use crate::netns::Netns;

const RTM_DELLINK: u16 = 17;
const RTM_SETLINK: u16 = 19;
const AF_BRIDGE: u8 = 7;
const NLA_F_NESTED: u16 = 0x8000;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_AF_SPEC: u16 = 26;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_BR_VLAN_FILTERING: u16 = 7;
const IFLA_BR_VLAN_DEFAULT_PVID: u16 = 39;
const IFLA_BRIDGE_VLAN_INFO: u16 = 2;
const RTEXT_FILTER_BRVLAN: u32 = 1 << 1;

/// `BRIDGE_VLAN_INFO_PVID`: untagged frames entering the port get this VLAN.
pub const VLAN_PVID: u16 = 1 << 1;
/// `BRIDGE_VLAN_INFO_UNTAGGED`: frames of this VLAN leave the port untagged.
pub const VLAN_UNTAGGED: u16 = 1 << 2;

fn netlink_err(what: impl Into<String>, e: &io::Error) -> Error {
    Error::Netlink {
        op: "bridge vlan:",
        what: what.into(),
        reason: e.to_string(),
    }
}

fn ifinfomsg(family: u8, ifindex: u32) -> Vec<u8> {
    let mut b = vec![0u8; IFINFOMSG];
    b[0] = family;
    b[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    b
}

fn nested(buf: &mut Vec<u8>, kind: u16, inner: &[u8]) {
    put_attr(buf, kind | NLA_F_NESTED, inner);
}

/// `IFLA_LINKINFO` of a bridge with VLAN filtering on and no default pvid.
fn vlan_bridge_linkinfo() -> Vec<u8> {
    let mut data = Vec::new();
    put_attr(&mut data, IFLA_BR_VLAN_FILTERING, &[1]);
    put_attr(&mut data, IFLA_BR_VLAN_DEFAULT_PVID, &0u16.to_ne_bytes());
    let mut info = Vec::new();
    put_attr(&mut info, IFLA_INFO_KIND, b"bridge\0");
    nested(&mut info, IFLA_INFO_DATA, &data);
    info
}

/// `IFLA_AF_SPEC` naming one VLAN of a port.
fn vlan_spec(vid: u16, flags: u16) -> Vec<u8> {
    let mut info = flags.to_ne_bytes().to_vec();
    info.extend_from_slice(&vid.to_ne_bytes());
    let mut spec = Vec::new();
    put_attr(&mut spec, IFLA_BRIDGE_VLAN_INFO, &info);
    spec
}

/// The attribute `kind` among `buf`'s.
fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, d)| d)
}

/// The VLANs (vid, flags) in the `IFLA_AF_SPEC` of a bridge port's link message.
fn parse_port_vlans(link_attrs: &[u8]) -> Vec<(u16, u16)> {
    let Some(spec) = attr(link_attrs, IFLA_AF_SPEC) else {
        return Vec::new();
    };
    attrs(spec)
        .filter(|(k, d)| *k == IFLA_BRIDGE_VLAN_INFO && d.len() >= 4)
        .map(|(_, d)| {
            (
                u16::from_ne_bytes([d[2], d[3]]),
                u16::from_ne_bytes([d[0], d[1]]),
            )
        })
        .collect()
}

/// Bridge-port and bridge requests on one netlink socket of the host namespace.
#[derive(Debug)]
struct Bridges {
    nl: TcSocket,
    /// Bridges seen with VLAN filtering on and no default pvid.
    prepared: BTreeSet<u32>,
}

impl Bridges {
    /// The master of `ifindex` (`None` if it has none); `ENODEV` if there is no such device.
    fn master(&mut self, ifindex: u32) -> io::Result<Option<u32>> {
        let replies = self.nl.request(RTM_GETLINK, 0, &ifinfomsg(0, ifindex))?;
        Ok(replies
            .iter()
            .filter(|(k, p)| *k == RTM_NEWLINK && p.len() >= IFINFOMSG)
            .find_map(|(_, p)| attr(&p[IFINFOMSG..], IFLA_MASTER).and_then(|d| u32_at(d, 0))))
    }

    /// Whether bridge `ifindex` filters VLANs (`None`: the kernel does not report it).
    fn vlan_filtering(&mut self, ifindex: u32) -> io::Result<Option<bool>> {
        let replies = self.nl.request(RTM_GETLINK, 0, &ifinfomsg(0, ifindex))?;
        Ok(replies
            .iter()
            .filter(|(k, p)| *k == RTM_NEWLINK && p.len() >= IFINFOMSG)
            .find_map(|(_, p)| {
                let info = attr(&p[IFINFOMSG..], IFLA_LINKINFO)?;
                let data = attr(info, IFLA_INFO_DATA)?;
                attr(data, IFLA_BR_VLAN_FILTERING).and_then(|d| d.first().map(|b| *b != 0))
            }))
    }

    /// Turns VLAN filtering on and the default pvid off on bridge `ifindex`, once per bridge.
    fn prepare(&mut self, ifindex: u32, name: &str) -> Result<()> {
        if self.prepared.contains(&ifindex) {
            return Ok(());
        }
        let what = || format!("VLAN filtering on bridge {name} (ifindex {ifindex})");
        let mut body = ifinfomsg(0, ifindex);
        nested(&mut body, IFLA_LINKINFO, &vlan_bridge_linkinfo());
        self.nl
            .request(RTM_NEWLINK, 0, &body)
            .map_err(|e| netlink_err(what(), &e))?;
        self.prepared.insert(ifindex);
        info!(bridge = name, "bridge VLAN filtering on");
        Ok(())
    }

    /// The VLANs of bridge port `ifindex`: (vid, flags), empty for a device that is gone or in
    /// no bridge.
    fn port_vlans(&mut self, ifindex: u32) -> io::Result<Vec<(u16, u16)>> {
        let mut body = ifinfomsg(AF_BRIDGE, 0);
        put_attr(&mut body, IFLA_EXT_MASK, &RTEXT_FILTER_BRVLAN.to_ne_bytes());
        let replies = self.nl.request(RTM_GETLINK, NLM_F_DUMP, &body)?;
        Ok(replies
            .iter()
            .filter(|(k, p)| *k == RTM_NEWLINK && p.len() >= IFINFOMSG)
            .filter(|(_, p)| u32_at(p, 4) == Some(ifindex))
            .flat_map(|(_, p)| parse_port_vlans(&p[IFINFOMSG..]))
            .collect())
    }

    fn add_vlan(&mut self, ifindex: u32, vid: u16, flags: u16) -> io::Result<()> {
        let mut body = ifinfomsg(AF_BRIDGE, ifindex);
        nested(&mut body, IFLA_AF_SPEC, &vlan_spec(vid, flags));
        self.nl.request(RTM_SETLINK, 0, &body).map(drop)
    }

    fn del_vlan(&mut self, ifindex: u32, vid: u16) -> io::Result<()> {
        let mut body = ifinfomsg(AF_BRIDGE, ifindex);
        nested(&mut body, IFLA_AF_SPEC, &vlan_spec(vid, 0));
        match self.nl.request(RTM_DELLINK, 0, &body) {
            Ok(_) => Ok(()),
            // Not a member (any more), or the device is gone.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EINVAL)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Makes `ifindex` an untagged pvid member of `vid` and of nothing else: the others go
    /// first.
    fn set_access(&mut self, ifindex: u32, vid: u16) -> io::Result<()> {
        let want = VLAN_PVID | VLAN_UNTAGGED;
        let mut have = false;
        for (v, flags) in self.port_vlans(ifindex)? {
            if v == vid && flags & want == want {
                have = true;
            } else {
                self.del_vlan(ifindex, v)?;
            }
        }
        if !have {
            self.add_vlan(ifindex, vid, want)?;
        }
        Ok(())
    }

    /// Removes every VLAN of `ifindex` (a device that is gone has none).
    fn clear(&mut self, ifindex: u32) -> io::Result<()> {
        for (v, _) in self.port_vlans(ifindex)? {
            self.del_vlan(ifindex, v)?;
        }
        Ok(())
    }
}

/// Kernel bridge VLAN filtering with eBPF port security; see the module documentation.
#[derive(Debug)]
pub struct KernelFilter {
    ebpf: EbpfFilter,
    bridges: Mutex<Bridges>,
}

impl KernelFilter {
    /// Whether this kernel's bridges filter VLANs: makes a bridge with `vlan_filtering 1` in a
    /// throw-away network namespace (gone with the probing thread) and reads it back.
    pub fn probe() -> Result<bool> {
        let probe = || -> io::Result<bool> {
            // SAFETY: unshare affects only this thread, which exits right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let nl = TcSocket::open()?;
            let mut b = Bridges {
                nl,
                prepared: BTreeSet::new(),
            };
            let mut body = ifinfomsg(0, 0);
            put_attr(&mut body, IFLA_IFNAME, b"vpcdprobe\0");
            nested(&mut body, IFLA_LINKINFO, &vlan_bridge_linkinfo());
            match b.nl.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &body) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(false),
                Err(e) => return Err(e),
            }
            let index =
                b.nl.link_indexes()?
                    .into_iter()
                    .find(|i| matches!(b.nl.link_name(*i), Ok(Some(n)) if n == "vpcdprobe"))
                    .ok_or_else(|| io::Error::other("probe bridge not found"))?;
            Ok(b.vlan_filtering(index)? == Some(true))
        };
        std::thread::spawn(probe)
            .join()
            .map_err(|_| Error::Invalid("bridge VLAN filtering probe panicked".into()))?
            .map_err(|e| netlink_err("probe bridge VLAN filtering", &e))
    }

    /// Opens the filter of host namespace `netns`; the eBPF part pins under `pin_dir` (see
    /// [`EbpfFilter::open`] for takeover).
    pub fn open(netns: &Netns, pin_dir: &Path) -> Result<KernelFilter> {
        let ebpf = EbpfFilter::open_for_bridge_vlans(netns, pin_dir)?;
        let nl = netns
            .run(TcSocket::open)?
            .map_err(|e| netlink_err("open netlink in the host namespace", &e))?;
        Ok(KernelFilter {
            ebpf,
            bridges: Mutex::new(Bridges {
                nl,
                prepared: BTreeSet::new(),
            }),
        })
    }

    /// The eBPF part (port security, counters, pins).
    pub fn ebpf(&self) -> &EbpfFilter {
        &self.ebpf
    }

    /// The VLANs of port `ifindex` in its bridge: (vid, `VLAN_*` flags).
    pub fn port_vlans(&self, ifindex: u32) -> Result<Vec<(u16, u16)>> {
        self.lock()
            .port_vlans(ifindex)
            .map_err(|e| netlink_err(format!("read VLANs of port {ifindex}"), &e))
    }

    fn lock(&self) -> MutexGuard<'_, Bridges> {
        self.bridges.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VlanFilter for KernelFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Kernel
    }

    fn prepare_bridge(&self, ifindex: u32, ifname: &str) -> Result<()> {
        self.lock().prepare(ifindex, ifname)
    }

    fn set_port(&self, ifindex: u32, ifname: &str, cfg: &PortFilter) -> Result<()> {
        cfg.check(ifindex, ifname)?;
        let port = || format!("port {ifname} (ifindex {ifindex})");
        let mut br = self.lock();
        let master = match br.master(ifindex) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Error::Invalid(format!("{}: not in a bridge", port()))),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                return Err(Error::NotFound(port()))
            }
            Err(e) => return Err(netlink_err(format!("read {}", port()), &e)),
        };
        let master_name = br
            .nl
            .link_name(master)
            .ok()
            .flatten()
            .unwrap_or_else(|| master.to_string());
        br.prepare(master, &master_name)?;
        // Port security first: from the moment the port has a VLAN, its frames are checked.
        let was_configured = self.ebpf.port(ifindex)?.is_some();
        self.ebpf.set_port(ifindex, ifname, cfg)?;
        if let Err(e) = br.set_access(ifindex, cfg.vlan) {
            if !was_configured {
                // Leave nothing: the port stays without VLAN and without programs.
                let _ = br.clear(ifindex);
                let _ = self.ebpf.remove_port(ifindex);
            }
            return Err(netlink_err(
                format!("set VLAN {} on {}", cfg.vlan, port()),
                &e,
            ));
        }
        debug!(port = ifindex, ifname, vlan = cfg.vlan, "bridge VLAN set");
        Ok(())
    }

    fn remove_port(&self, ifindex: u32) -> Result<()> {
        // The VLAN first: the port passes nothing from here on, checked or not.
        self.lock()
            .clear(ifindex)
            .map_err(|e| netlink_err(format!("remove VLANs of port {ifindex}"), &e))?;
        self.ebpf.remove_port(ifindex)
    }

    fn counters(&self, ifindex: u32) -> Result<PortCounters> {
        self.ebpf.counters(ifindex)
    }

    fn ports(&self) -> Result<Vec<u32>> {
        self.ebpf.ports()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_info_is_flags_then_vid() {
        let spec = vlan_spec(42, VLAN_PVID | VLAN_UNTAGGED);
        // One attribute: len 8, type 2, flags 6, vid 42.
        assert_eq!(spec.len(), 8);
        assert_eq!(u16::from_ne_bytes([spec[0], spec[1]]), 8);
        assert_eq!(
            u16::from_ne_bytes([spec[2], spec[3]]),
            IFLA_BRIDGE_VLAN_INFO
        );
        assert_eq!(u16::from_ne_bytes([spec[4], spec[5]]), 6);
        assert_eq!(u16::from_ne_bytes([spec[6], spec[7]]), 42);
    }

    #[test]
    fn port_vlans_are_read_from_the_af_spec() {
        let mut inner = Vec::new();
        let info = |flags: u16, vid: u16| [flags.to_ne_bytes(), vid.to_ne_bytes()].concat();
        put_attr(&mut inner, IFLA_BRIDGE_VLAN_INFO, &info(6, 10));
        put_attr(&mut inner, 0, &[0, 0]); // IFLA_BRIDGE_FLAGS: skipped
        put_attr(&mut inner, IFLA_BRIDGE_VLAN_INFO, &info(0, 20));
        let mut link = Vec::new();
        put_attr(&mut link, IFLA_IFNAME, b"t0\0");
        nested(&mut link, IFLA_AF_SPEC, &inner);
        assert_eq!(parse_port_vlans(&link), vec![(10, 6), (20, 0)]);
        assert_eq!(parse_port_vlans(&[]), vec![]);
    }

    #[test]
    fn bridge_linkinfo_turns_filtering_on_and_the_default_pvid_off() {
        let info = vlan_bridge_linkinfo();
        assert_eq!(attr(&info, IFLA_INFO_KIND), Some(&b"bridge\0"[..]));
        let data = attr(&info, IFLA_INFO_DATA).expect("data");
        assert_eq!(attr(data, IFLA_BR_VLAN_FILTERING), Some(&[1u8][..]));
        assert_eq!(attr(data, IFLA_BR_VLAN_DEFAULT_PVID), Some(&[0u8, 0][..]));
    }
}
