//! VLAN filtering and port security with eBPF TC programs (`bpf/port_filter.c`), for kernels
//! without bridge VLAN filtering.
//!
//! Two programs per bridge port, attached as direct-action `bpf` filters of the port's `clsact`
//! qdisc (netlink TC, as `tc filter add dev X ingress prio 1 handle 1 bpf da`): `port_ingress`
//! (frames from the VM into the bridge: drop tagged frames, port security, push the port's tag)
//! and `port_egress` (frames from the bridge to the VM: drop frames of other VLANs, pop the
//! tag). See the C source for the exact rules. Netlink TC rather than TCX links: attaching a
//! TCX link waits for an RCU grace period under rtnl (~15 ms per port, ~23 ms to detach),
//! a netlink filter costs well under a millisecond.
//!
//! # Maps (one set per [`EbpfFilter`], i.e. per host namespace; keyed by ifindex)
//! - `port_cfg`: hash, `u32` ifindex -> `struct port_cfg` (VLAN, port security lists), 4096
//!   entries. A port without an entry drops everything in both directions (fail closed).
//! - `port_counters`: per-CPU hash, `u32` ifindex -> six `u64` counters, summed when read.
//!
//! # Pins (under `pin_dir`, e.g. `/sys/fs/bpf/vpcd/<instance>`)
//! ```text
//! pin_dir/port_cfg, pin_dir/port_counters      the maps
//! pin_dir/port_ingress, pin_dir/port_egress    the programs
//! ```
//! The filters belong to the devices: they stay when the [`EbpfFilter`] is dropped or the
//! process is killed, and traffic keeps being filtered with the last configuration. They go
//! with the device when it is deleted.
//!
//! # Filters
//! Ours are at priority [`tc::PRIO`] (consulted first), handle [`tc::HANDLE`], protocol all, in
//! both directions, named after the program. Attaching adds the clsact qdisc if needed, then
//! egress, then ingress. Removing deletes ingress, then egress, then the qdisc unless other
//! filters remain on it.
//!
//! # Takeover
//! [`EbpfFilter::open`] on a `pin_dir` that holds pins reuses the pinned maps (configuration
//! and counters survive), loads the programs of this binary, re-pins them, and replaces the
//! program of every filter of ours on the configured ports (same priority and handle: cls_bpf
//! swaps the program atomically, no moment without a filter). The old programs are freed once
//! no filter uses them. Ports whose device is gone are pruned (see below). Then
//! [`VlanFilter::set_port`] on an attached port only rewrites its configuration, and
//! [`VlanFilter::ports`] lists the ports from the map. One `EbpfFilter` at a time may own a
//! `pin_dir`. TCX link pins left by an earlier version (`pin_dir/links/<ifindex>-<dir>`) are
//! migrated: the port gets its netlink filters, then the links are unpinned (detached).
//!
//! # Stale ports
//! When a port's device is deleted, the kernel deletes its filters but the map keeps its
//! configuration and counters. [`EbpfFilter::prune`] (also run by `open` and `ports`) forgets
//! every configured port whose ifindex no longer exists. A configured port whose device exists
//! without our filters is kept (and listed), so that reconciliation calls `set_port` (which
//! attaches) or `remove_port`. (Ifindexes are allocated cyclically, so a deleted port's index is
//! not reused by a new device in practice.)
//!
//! All netlink requests go through one socket opened inside the host namespace
//! ([`Netns::run`]); pins live in the global bpffs (`setns` does not change the mount
//! namespace), mounted at `/sys/fs/bpf` if needed.

mod layout;
mod sys;
pub(crate) mod tc;

pub use layout::eui64_link_local;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap, PerCpuValues};
use aya::programs::links::{LinkError, PinnedLink};
use aya::programs::{ProgramFd, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};

use self::layout::{CfgBytes, CounterWords};
use self::tc::{Hook, SetMode, TcSocket};
use super::{FilterKind, PortCounters, PortFilter, VlanFilter};
use crate::error::{Error, Result};
use crate::netns::Netns;

/// The object compiled from `bpf/port_filter.c` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/port_filter.o"));

const MAP_CFG: &str = "port_cfg";
const MAP_COUNTERS: &str = "port_counters";
/// TCX link pins of earlier versions, migrated by [`EbpfFilter::open`].
const LINKS_DIR: &str = "links";

/// The default parent of the per-instance pin directories.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/vpcd";

/// A traffic direction of a port, seen from the port's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    Ingress,
    Egress,
}

impl Dir {
    /// Attach order: egress first, so that frames never leave a half-attached port tagged.
    /// Detach order is the reverse.
    const ATTACH_ORDER: [Dir; 2] = [Dir::Egress, Dir::Ingress];

    fn index(self) -> usize {
        match self {
            Dir::Ingress => 0,
            Dir::Egress => 1,
        }
    }

    fn program(self) -> &'static str {
        match self {
            Dir::Ingress => "port_ingress",
            Dir::Egress => "port_egress",
        }
    }

    fn hook(self) -> Hook {
        match self {
            Dir::Ingress => Hook::Ingress,
            Dir::Egress => Hook::Egress,
        }
    }
}

/// The pin layout under one pin directory.
#[derive(Debug, Clone)]
struct Pins {
    dir: PathBuf,
}

impl Pins {
    fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn program(&self, d: Dir) -> PathBuf {
        self.dir.join(d.program())
    }

    fn links_dir(&self) -> PathBuf {
        self.dir.join(LINKS_DIR)
    }

    /// The TCX link pins of an earlier version: (ifindex, path). Unknown names are skipped.
    fn old_links(&self) -> Result<Vec<(u32, PathBuf)>> {
        let dir = self.links_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(bpf_err(format!("read {}", dir.display()), &e)),
        };
        let mut links = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| bpf_err(format!("read {}", dir.display()), &e))?;
            let name = entry.file_name();
            match name.to_str().and_then(parse_link_file_name) {
                Some(ifindex) => links.push((ifindex, entry.path())),
                None => debug!(file = ?entry.path(), "not a link pin, skipped"),
            }
        }
        links.sort();
        Ok(links)
    }
}

/// The ifindex of an old TCX link pin name, `<ifindex>-ingress` or `<ifindex>-egress`.
fn parse_link_file_name(name: &str) -> Option<u32> {
    let (ifindex, d) = name.split_once('-')?;
    if d != "ingress" && d != "egress" {
        return None;
    }
    ifindex.parse().ok()
}

/// An error of a BPF step, with the whole source chain as the reason.
fn bpf_err(what: impl Into<String>, e: &(dyn std::error::Error + 'static)) -> Error {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !reason.contains(&s_text) {
            reason.push_str(": ");
            reason.push_str(&s_text);
        }
        source = s.source();
    }
    Error::Bpf {
        what: what.into(),
        reason,
    }
}

fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Removes the (old TCX) link pin at `path`, which detaches the link. No pin: Ok.
fn unpin_link(path: &Path) -> Result<()> {
    let what = || format!("unpin link {}", path.display());
    match PinnedLink::from_pin(path) {
        Ok(pinned) => {
            let fd_link = pinned.unpin().map_err(|e| bpf_err(what(), &e))?;
            drop(fd_link);
            Ok(())
        }
        Err(LinkError::SyscallError(e)) if is_not_found(&e.io_error) => Ok(()),
        Err(e) => {
            warn!(pin = %path.display(), error = %e, "cannot open link pin, removing it");
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(bpf_err(what(), &e)),
            }
        }
    }
}

fn remove_map_key<M>(
    map: &mut M,
    key: u32,
    remove: fn(&mut M, &u32) -> Result<(), MapError>,
) -> io::Result<()> {
    match remove(map, &key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if is_not_found(&e.io_error) => Ok(()),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

fn many(mut errors: Vec<Error>) -> Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(Error::Many(errors)),
    }
}

/// The maps, the netlink socket and what is attached, behind the filter's lock.
struct State {
    cfg: HashMap<MapData, u32, CfgBytes>,
    counters: PerCpuHashMap<MapData, u32, CounterWords>,
    /// Netlink, in the host namespace.
    tc: TcSocket,
    /// The programs of this filter, by [`Dir::index`] (also pinned).
    progs: [ProgramFd; 2],
    /// The ports that have our filters with these programs: `set_port` only writes their
    /// configuration.
    attached: BTreeSet<u32>,
    /// Set by [`EbpfFilter::remove_all`]: the pins are gone, nothing more can be attached.
    removed: bool,
}

impl State {
    /// Puts our filters on port `ifindex` (qdisc, egress, ingress), replacing whatever sits at
    /// our place.
    fn attach(&mut self, ifindex: u32) -> io::Result<()> {
        self.tc.add_clsact(ifindex)?;
        for d in Dir::ATTACH_ORDER {
            let fd = self.progs[d.index()].as_fd().as_raw_fd();
            self.tc
                .set_filter(ifindex, d.hook(), fd, d.program(), SetMode::Ensure)?;
        }
        Ok(())
    }

    /// Deletes our filters from port `ifindex` (ingress, egress), and its clsact qdisc if no
    /// other filters are on it. A device that is gone is fine.
    fn detach(&mut self, ifindex: u32) -> io::Result<()> {
        self.attached.remove(&ifindex);
        for d in Dir::ATTACH_ORDER.iter().rev() {
            match self.tc.del_filter(ifindex, d.hook()) {
                Ok(_) => {}
                Err(e) if tc::is_no_device(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if !self.tc.has_other_filters(ifindex)? {
            self.tc.del_clsact(ifindex)?;
        }
        Ok(())
    }

    fn configured(&self) -> Result<Vec<u32>> {
        let mut ports = self
            .cfg
            .keys()
            .collect::<Result<Vec<u32>, MapError>>()
            .map_err(|e| bpf_err("list ports", &e))?;
        ports.sort_unstable();
        Ok(ports)
    }
}

/// VLAN filtering and port security with the TC programs of `bpf/port_filter.c` (see the
/// module documentation for maps, pins, filters and takeover).
pub struct EbpfFilter {
    netns: Netns,
    pins: Pins,
    /// `layout::F_*` bits written with every port's configuration.
    flags: u8,
    state: Mutex<State>,
}

impl std::fmt::Debug for EbpfFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfFilter")
            .field("netns", &self.netns.path())
            .field("pin_dir", &self.pins.dir)
            .finish_non_exhaustive()
    }
}

impl EbpfFilter {
    /// Checks that this host can run the filter: a kernel that accepts the programs (clsact
    /// and direct-action `bpf` filters exist since Linux 4.5). Loads them without pinning or
    /// attaching anything; for the start-up probe that chooses the [`VlanFilter`]
    /// implementation.
    pub fn probe() -> Result<()> {
        let mut bpf = Ebpf::load(OBJECT).map_err(|e| bpf_err("load port_filter.o", &e))?;
        for d in Dir::ATTACH_ORDER {
            load_program(&mut bpf, d)?;
        }
        Ok(())
    }

    /// Opens the filter of the host namespace `netns`, with its pins under `pin_dir`: creates
    /// maps and programs, or takes over what an earlier `EbpfFilter` (of this or another
    /// process) pinned there and attached. Mounts bpffs at /sys/fs/bpf if it is not mounted.
    pub fn open(netns: &Netns, pin_dir: &Path) -> Result<EbpfFilter> {
        EbpfFilter::open_with_flags(netns, pin_dir, 0)
    }

    /// Like [`EbpfFilter::open`], for ports of bridges that filter VLANs themselves: the
    /// programs apply port security and count, and leave the tags to the bridge (used by
    /// [`super::kernel::KernelFilter`]).
    pub(crate) fn open_for_bridge_vlans(netns: &Netns, pin_dir: &Path) -> Result<EbpfFilter> {
        EbpfFilter::open_with_flags(netns, pin_dir, layout::F_BRIDGE_VLAN)
    }

    fn open_with_flags(netns: &Netns, pin_dir: &Path, flags: u8) -> Result<EbpfFilter> {
        sys::ensure_bpffs()?;
        let pins = Pins {
            dir: pin_dir.to_owned(),
        };
        fs::create_dir_all(&pins.dir)
            .map_err(|e| bpf_err(format!("create pin dir {}", pin_dir.display()), &e))?;

        let mut bpf = EbpfLoader::new()
            .map_pin_path(MAP_CFG, pins.map(MAP_CFG))
            .map_pin_path(MAP_COUNTERS, pins.map(MAP_COUNTERS))
            .load(OBJECT)
            .map_err(|e| bpf_err("load port_filter.o", &e))?;
        // Typed maps check key and value sizes: pins of an incompatible layout are refused.
        let layout_err = |name: &str, e: &MapError| {
            bpf_err(
                format!("map {}", pins.map(name).display()),
                &io::Error::other(format!(
                    "{e} (pinned by an incompatible version? remove the pin dir)"
                )),
            )
        };
        let take = |bpf: &mut Ebpf, name: &str| {
            bpf.take_map(name).ok_or_else(|| Error::Bpf {
                what: format!("map {name}"),
                reason: "not in port_filter.o".into(),
            })
        };
        let cfg =
            HashMap::try_from(take(&mut bpf, MAP_CFG)?).map_err(|e| layout_err(MAP_CFG, &e))?;
        let counters = PerCpuHashMap::try_from(take(&mut bpf, MAP_COUNTERS)?)
            .map_err(|e| layout_err(MAP_COUNTERS, &e))?;

        let mut progs = Vec::new();
        for d in [Dir::Ingress, Dir::Egress] {
            let prog = load_program(&mut bpf, d)?;
            // Pin beside (bpffs names may not contain dots), then rename over the old pin: the
            // program pin is never missing.
            let pin = pins.program(d);
            let tmp = pins.dir.join(format!("{}_new", d.program()));
            let what = || format!("pin program {}", pin.display());
            let _ = fs::remove_file(&tmp);
            prog.pin(&tmp).map_err(|e| bpf_err(what(), &e))?;
            fs::rename(&tmp, &pin).map_err(|e| bpf_err(what(), &e))?;
            let fd = prog
                .fd()
                .map_err(|e| bpf_err(what(), &e))?
                .try_clone()
                .map_err(|e| bpf_err(what(), &e))?;
            progs.push(fd);
        }
        let progs: [ProgramFd; 2] = progs.try_into().expect("two programs");

        let tc = netns
            .run(TcSocket::open)?
            .map_err(|e| bpf_err("open netlink in the host namespace", &e))?;
        let filter = EbpfFilter {
            netns: netns.clone(),
            pins,
            flags,
            state: Mutex::new(State {
                cfg,
                counters,
                tc,
                progs,
                attached: BTreeSet::new(),
                removed: false,
            }),
        };
        let mut st = filter.lock()?;
        let stale = filter.prune_locked(&mut st)?;
        let adopted = filter.adopt(&mut st)?;
        drop(st);
        info!(
            pin_dir = %filter.pins.dir.display(),
            ports = adopted,
            pruned = ?stale,
            "eBPF port filter open"
        );
        Ok(filter)
    }

    /// Switches the filters of ours on the configured ports to the programs of this filter
    /// (replace: no moment without a filter), and migrates old TCX link pins. Returns how many
    /// ports were taken over.
    fn adopt(&self, st: &mut State) -> Result<usize> {
        let old_links = self.pins.old_links()?;
        for port in st.configured()? {
            let what = || format!("take over port {port}");
            let mut found = false;
            for d in Dir::ATTACH_ORDER {
                let current = st
                    .tc
                    .get_filter(port, d.hook())
                    .map_err(|e| bpf_err(what(), &e))?;
                match current {
                    Some(f) if f.name == d.program() => {
                        let fd = st.progs[d.index()].as_fd().as_raw_fd();
                        st.tc
                            .set_filter(port, d.hook(), fd, d.program(), SetMode::Replace)
                            .map_err(|e| bpf_err(what(), &e))?;
                        found = true;
                    }
                    Some(f) => {
                        warn!(port, filter = %f.name, "a foreign filter sits at our place")
                    }
                    None => {}
                }
            }
            // TCX links of an earlier version run before netlink filters: the frames of this
            // port are dropped (tagged twice, or untagged) from the attach to the unpin.
            let links: Vec<&PathBuf> = old_links
                .iter()
                .filter(|(i, _)| *i == port)
                .map(|(_, path)| path)
                .collect();
            if !links.is_empty() {
                st.attach(port).map_err(|e| bpf_err(what(), &e))?;
                for path in links {
                    unpin_link(path)?;
                }
                found = true;
            }
            if found {
                st.attached.insert(port);
            } else {
                debug!(port, "configured port without our filters");
            }
        }
        // The remaining old links are of gone or unconfigured ports.
        for (_, path) in &old_links {
            unpin_link(path)?;
        }
        match fs::remove_dir(self.pins.links_dir()) {
            Ok(()) => info!("migrated TCX link pins to netlink filters"),
            Err(e) if is_not_found(&e) => {}
            Err(e) => warn!(error = %e, "cannot remove the old links directory"),
        }
        Ok(st.attached.len())
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }

    /// The configuration of port `ifindex`, if it has one.
    pub fn port(&self, ifindex: u32) -> Result<Option<PortFilter>> {
        let st = self.lock()?;
        match st.cfg.get(&ifindex, 0) {
            Ok(b) => Ok(Some(layout::decode(&b))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(bpf_err(format!("read config of port {ifindex}"), &e)),
        }
    }

    /// Forgets every configured port whose device is gone (the kernel deleted its filters with
    /// it): its configuration and counters. Returns the ifindexes forgotten. Also run by
    /// [`EbpfFilter::open`] and [`VlanFilter::ports`].
    pub fn prune(&self) -> Result<Vec<u32>> {
        let mut st = self.lock()?;
        self.prune_locked(&mut st)
    }

    fn prune_locked(&self, st: &mut State) -> Result<Vec<u32>> {
        let present = st
            .tc
            .link_indexes()
            .map_err(|e| bpf_err("list devices", &e))?;
        st.attached.retain(|i| present.contains(i));
        let stale: Vec<u32> = st
            .configured()?
            .into_iter()
            .filter(|i| !present.contains(i))
            .collect();
        for ifindex in &stale {
            info!(port = ifindex, "device gone, forgetting port");
            self.forget(st, *ifindex)?;
        }
        Ok(stale)
    }

    /// Detaches every port, removes all pins and the pin directory. The filter is unusable
    /// afterwards (its maps and programs are freed once it is dropped). Best effort: keeps
    /// going and reports every failure.
    pub fn remove_all(&self) -> Result<()> {
        let mut st = self.lock_any()?;
        st.removed = true;
        let mut errors = Vec::new();
        let mut ports: BTreeSet<u32> = st.attached.clone();
        match st.configured() {
            Ok(c) => ports.extend(c),
            Err(e) => errors.push(e),
        }
        for port in ports {
            if let Err(e) = st.detach(port) {
                errors.push(bpf_err(format!("detach port {port}"), &e));
            }
        }
        match self.pins.old_links() {
            Ok(links) => {
                for (_, path) in links {
                    if let Err(e) = unpin_link(&path) {
                        errors.push(e);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        match fs::remove_dir_all(&self.pins.dir) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => errors.push(bpf_err(
                format!("remove pin dir {}", self.pins.dir.display()),
                &e,
            )),
        }
        info!(pin_dir = %self.pins.dir.display(), "eBPF port filter removed");
        many(errors)
    }

    /// Detaches port `ifindex` and deletes its configuration and counters.
    fn forget(&self, st: &mut State, ifindex: u32) -> Result<()> {
        let mut errors = Vec::new();
        if let Err(e) = st.detach(ifindex) {
            errors.push(bpf_err(format!("detach port {ifindex}"), &e));
        }
        if let Err(e) = remove_map_key(&mut st.cfg, ifindex, HashMap::remove) {
            errors.push(bpf_err(format!("delete config of port {ifindex}"), &e));
        }
        if let Err(e) = remove_map_key(&mut st.counters, ifindex, PerCpuHashMap::remove) {
            errors.push(bpf_err(format!("delete counters of port {ifindex}"), &e));
        }
        many(errors)
    }

    /// Attaches our filters to port `ifindex`, after checking that it is the device `ifname`.
    fn attach(&self, st: &mut State, ifindex: u32, ifname: &str) -> Result<()> {
        let what = || format!("attach to port {ifname} (ifindex {ifindex})");
        match st.tc.link_name(ifindex).map_err(|e| bpf_err(what(), &e))? {
            Some(name) if name == ifname => {}
            Some(name) => {
                return Err(Error::Invalid(format!(
                    "port {ifname}: ifindex {ifindex} is {name}"
                )))
            }
            None => {
                return Err(Error::NotFound(format!(
                    "port {ifname} (ifindex {ifindex})"
                )))
            }
        }
        st.attach(ifindex).map_err(|e| bpf_err(what(), &e))?;
        st.attached.insert(ifindex);
        debug!(port = ifindex, ifname, "attached");
        Ok(())
    }

    /// The state, unless [`EbpfFilter::remove_all`] ran.
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.lock_any()?;
        if st.removed {
            return Err(Error::Bpf {
                what: format!("filter {}", self.pins.dir.display()),
                reason: "removed".into(),
            });
        }
        Ok(st)
    }

    fn lock_any(&self) -> Result<MutexGuard<'_, State>> {
        // A panic while holding the lock leaves the maps as consistent as the kernel has them.
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn program_mut(bpf: &mut Ebpf, d: Dir) -> Result<&mut SchedClassifier> {
    let prog = bpf.program_mut(d.program()).ok_or_else(|| Error::Bpf {
        what: format!("program {}", d.program()),
        reason: "not in port_filter.o".into(),
    })?;
    prog.try_into()
        .map_err(|e| bpf_err(format!("program {}", d.program()), &e))
}

/// Loads (verifies) the program of direction `d` into the kernel.
fn load_program(bpf: &mut Ebpf, d: Dir) -> Result<&mut SchedClassifier> {
    let prog = program_mut(bpf, d)?;
    prog.load()
        .map_err(|e| bpf_err(format!("load program {}", d.program()), &e))?;
    Ok(prog)
}

impl VlanFilter for EbpfFilter {
    fn kind(&self) -> FilterKind {
        FilterKind::Ebpf
    }

    fn set_port(&self, ifindex: u32, ifname: &str, cfg: &PortFilter) -> Result<()> {
        let value = layout::encode(ifindex, ifname, cfg, self.flags)?;
        let mut st = self.lock()?;
        let old = match st.cfg.get(&ifindex, 0) {
            Ok(old) => Some(old),
            Err(MapError::KeyNotFound) => None,
            Err(e) => return Err(bpf_err(format!("read config of port {ifname}"), &e)),
        };
        match st.counters.get(&ifindex, 0) {
            Ok(_) => {}
            Err(MapError::KeyNotFound) => {
                let what = || format!("create counters of port {ifname}");
                let n = aya::util::nr_cpus().map_err(|(_, e)| bpf_err(what(), &e))?;
                let zeros =
                    PerCpuValues::try_from(vec![[0u64; 6]; n]).map_err(|e| bpf_err(what(), &e))?;
                st.counters
                    .insert(ifindex, zeros, 0)
                    .map_err(|e| bpf_err(what(), &e))?;
            }
            Err(e) => return Err(bpf_err(format!("read counters of port {ifname}"), &e)),
        }
        // Configuration first: the programs find it from their first frame on.
        let changed = old != Some(value);
        if changed {
            st.cfg
                .insert(ifindex, value, 0)
                .map_err(|e| bpf_err(format!("write config of port {ifname}"), &e))?;
        }
        if !st.attached.contains(&ifindex) {
            if let Err(e) = self.attach(&mut st, ifindex, ifname) {
                if old.is_none() {
                    if let Err(undo) = self.forget(&mut st, ifindex) {
                        warn!(port = ifindex, error = %undo, "undoing a failed set_port");
                    }
                }
                return Err(e);
            }
        }
        if changed {
            info!(
                port = ifindex,
                ifname,
                vlan = cfg.vlan,
                security = cfg.security.is_some(),
                "port filter set"
            );
        } else {
            debug!(port = ifindex, ifname, "port filter unchanged");
        }
        Ok(())
    }

    fn remove_port(&self, ifindex: u32) -> Result<()> {
        let mut st = self.lock()?;
        self.forget(&mut st, ifindex)?;
        debug!(port = ifindex, "port filter removed");
        Ok(())
    }

    fn counters(&self, ifindex: u32) -> Result<PortCounters> {
        let st = self.lock()?;
        match st.counters.get(&ifindex, 0) {
            Ok(values) => Ok(layout::sum_counters(values.iter())),
            Err(MapError::KeyNotFound) => Err(Error::NotFound(format!("port {ifindex}"))),
            Err(e) => Err(bpf_err(format!("read counters of port {ifindex}"), &e)),
        }
    }

    /// The configured ports, after [`EbpfFilter::prune`] forgot those whose device is gone.
    fn ports(&self) -> Result<Vec<u32>> {
        let mut st = self.lock()?;
        self.prune_locked(&mut st)?;
        st.configured()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_link_file_names_give_the_ifindex() {
        assert_eq!(parse_link_file_name("17-ingress"), Some(17));
        assert_eq!(parse_link_file_name("17-egress"), Some(17));
        assert_eq!(parse_link_file_name("17-sideways"), None);
        assert_eq!(parse_link_file_name("port_ingress_new"), None);
    }
}
