//! VLAN filtering and port security with eBPF TC programs (`bpf/port_filter.c`), for kernels
//! without bridge VLAN filtering.
//!
//! Two programs per bridge port, attached with TCX links: `port_ingress` (frames from the VM
//! into the bridge: drop tagged frames, port security, push the port's tag) and `port_egress`
//! (frames from the bridge to the VM: drop frames of other VLANs, pop the tag). See the C
//! source for the exact rules.
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
//! pin_dir/links/<ifindex>-ingress              one TCX link per port and direction
//! pin_dir/links/<ifindex>-egress
//! ```
//! Pinned links stay attached when the [`EbpfFilter`] is dropped or the process is killed:
//! traffic keeps being filtered with the last configuration.
//!
//! # Takeover
//! [`EbpfFilter::open`] on a `pin_dir` that holds pins reuses the pinned maps (configuration
//! and counters survive), loads the programs of this binary, re-pins them, and switches every
//! pinned link to them atomically (`BPF_LINK_UPDATE`, no moment without a filter). Links of
//! ports whose device is gone are pruned (see below). Then [`VlanFilter::set_port`] on an
//! attached port only rewrites its configuration, and [`VlanFilter::ports`] lists the ports
//! from the map. One `EbpfFilter` at a time may own a `pin_dir`.
//!
//! # Stale pins
//! When a port's device is deleted, the kernel detaches its TCX links but the pins keep the
//! link objects (reporting ifindex 0). [`EbpfFilter::prune`] (also run by `open` and `ports`)
//! forgets every port with such a link: configuration, counters and link pins. A configured
//! port with a missing link pin is kept (and listed), so that reconciliation calls `set_port`
//! (which attaches what is missing) or `remove_port`.
//!
//! All attaching happens inside the host namespace ([`Netns::run`]); pins live in the global
//! bpffs (`setns` does not change the mount namespace), mounted at `/sys/fs/bpf` if needed.

mod layout;
mod sys;

pub use layout::eui64_link_local;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap, PerCpuValues};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, MultiProgLink, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};

use self::layout::{CfgBytes, CounterWords};
use self::sys::LinkTarget;
use super::{FilterKind, PortCounters, PortFilter, VlanFilter};
use crate::error::{Error, Result};
use crate::netns::Netns;

/// The object compiled from `bpf/port_filter.c` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/port_filter.o"));

const MAP_CFG: &str = "port_cfg";
const MAP_COUNTERS: &str = "port_counters";
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

    fn name(self) -> &'static str {
        match self {
            Dir::Ingress => "ingress",
            Dir::Egress => "egress",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Dir::Ingress => "port_ingress",
            Dir::Egress => "port_egress",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Dir::Ingress => TcAttachType::Ingress,
            Dir::Egress => TcAttachType::Egress,
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

    fn link(&self, ifindex: u32, d: Dir) -> PathBuf {
        self.links_dir().join(link_file_name(ifindex, d))
    }

    /// The link pins present: (ifindex, direction, path). Unknown names are skipped.
    fn links(&self) -> Result<Vec<(u32, Dir, PathBuf)>> {
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
                Some((ifindex, d)) => links.push((ifindex, d, entry.path())),
                None => debug!(file = ?entry.path(), "not a link pin, skipped"),
            }
        }
        links.sort();
        Ok(links)
    }
}

fn link_file_name(ifindex: u32, d: Dir) -> String {
    format!("{ifindex}-{}", d.name())
}

fn parse_link_file_name(name: &str) -> Option<(u32, Dir)> {
    let (ifindex, d) = name.split_once('-')?;
    let d = match d {
        "ingress" => Dir::Ingress,
        "egress" => Dir::Egress,
        _ => return None,
    };
    Some((ifindex.parse().ok()?, d))
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

/// Opens the TCX link pinned at `path`; `Ok(None)` if there is no pin.
fn open_link(path: &Path) -> Result<Option<SchedClassifierLink>> {
    let what = || format!("open link pin {}", path.display());
    let pinned = match PinnedLink::from_pin(path) {
        Ok(p) => p,
        Err(LinkError::SyscallError(e)) if is_not_found(&e.io_error) => return Ok(None),
        Err(e) => return Err(bpf_err(what(), &e)),
    };
    let link =
        SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| bpf_err(what(), &e))?;
    Ok(Some(link))
}

/// Where `link` is attached.
fn link_target(link: &SchedClassifierLink, path: &Path) -> Result<LinkTarget> {
    let what = || format!("inspect link {}", path.display());
    let fd = MultiProgLink::fd(link).map_err(|e| bpf_err(what(), &e))?;
    sys::tcx_link_target(fd).map_err(|e| bpf_err(what(), &e))
}

/// Removes the link pin at `path` and detaches the link at once (our descriptor is the last
/// reference once the pin is gone, and closing it frees the link synchronously). No pin: Ok.
fn unpin_link(path: &Path) -> Result<()> {
    let what = || format!("unpin link {}", path.display());
    match PinnedLink::from_pin(path) {
        Ok(pinned) => {
            let fd_link = pinned.unpin().map_err(|e| bpf_err(what(), &e))?;
            drop(fd_link);
            Ok(())
        }
        Err(LinkError::SyscallError(e)) if is_not_found(&e.io_error) => Ok(()),
        // Not a link we can open: remove the file all the same.
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

/// Runs inside the host namespace: attaches the pinned program `prog_pin` to `ifname` in
/// direction `d`, checks that the device is `ifindex`, and pins the link at `link_pin`.
fn attach_in_netns(
    prog_pin: &Path,
    ifname: &str,
    d: Dir,
    ifindex: u32,
    link_pin: &Path,
) -> Result<()> {
    let what = || format!("attach {} to {ifname}", d.program());
    let mut prog = SchedClassifier::from_pin(prog_pin).map_err(|e| bpf_err(what(), &e))?;
    // First in the TCX chain: no other program can pass a frame before ours saw it.
    let id = prog
        .attach_with_options(
            ifname,
            d.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(|e| bpf_err(what(), &e))?;
    let link = prog.take_link(id).map_err(|e| bpf_err(what(), &e))?;
    // Dropping `link` before it is pinned detaches it again.
    match link_target(&link, link_pin)? {
        LinkTarget::Attached(i) if i == ifindex => {}
        LinkTarget::Attached(i) => {
            return Err(Error::Invalid(format!(
                "port {ifname}: its ifindex is {i}, not {ifindex}"
            )))
        }
        LinkTarget::Detached => {
            return Err(Error::NotFound(format!(
                "port {ifname} (ifindex {ifindex})"
            )))
        }
    }
    let fd_link = FdLink::try_from(link).map_err(|e| bpf_err(what(), &e))?;
    fd_link
        .pin(link_pin)
        .map_err(|e| bpf_err(format!("pin link {}", link_pin.display()), &e))?;
    Ok(())
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

/// The maps, behind the filter's lock.
struct State {
    cfg: HashMap<MapData, u32, CfgBytes>,
    counters: PerCpuHashMap<MapData, u32, CounterWords>,
    /// Set by [`EbpfFilter::remove_all`]: the pins are gone, nothing more can be attached.
    removed: bool,
}

/// VLAN filtering and port security with the TC programs of `bpf/port_filter.c` (see the
/// module documentation for maps, pins and takeover).
pub struct EbpfFilter {
    netns: Netns,
    pins: Pins,
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
    /// Checks that this host can run the filter: a kernel with TCX (6.6 or later) that accepts
    /// the programs. Loads them without pinning or attaching anything; for the start-up probe
    /// that chooses the [`VlanFilter`] implementation.
    pub fn probe() -> Result<()> {
        let kernel =
            aya::util::KernelVersion::current().map_err(|e| bpf_err("probe kernel version", &e))?;
        if kernel < aya::util::KernelVersion::new(6, 6, 0) {
            return Err(Error::Bpf {
                what: "probe".into(),
                reason: format!("kernel {kernel:?} has no TCX links (6.6 or later needed)"),
            });
        }
        let mut bpf = Ebpf::load(OBJECT).map_err(|e| bpf_err("load port_filter.o", &e))?;
        for d in Dir::ATTACH_ORDER {
            load_program(&mut bpf, d)?;
        }
        Ok(())
    }

    /// Opens the filter of the host namespace `netns`, with its pins under `pin_dir`: creates
    /// maps and programs, or takes over what an earlier `EbpfFilter` (of this or another
    /// process) pinned there. Mounts bpffs at /sys/fs/bpf if it is not mounted.
    pub fn open(netns: &Netns, pin_dir: &Path) -> Result<EbpfFilter> {
        sys::ensure_bpffs()?;
        let pins = Pins {
            dir: pin_dir.to_owned(),
        };
        fs::create_dir_all(pins.links_dir())
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

        for d in Dir::ATTACH_ORDER {
            let prog = load_program(&mut bpf, d)?;
            // Pin beside (bpffs names may not contain dots), then rename over the old pin: the
            // program pin is never missing.
            let pin = pins.program(d);
            let tmp = pins.dir.join(format!("{}_new", d.program()));
            let what = || format!("pin program {}", pin.display());
            let _ = fs::remove_file(&tmp);
            prog.pin(&tmp).map_err(|e| bpf_err(what(), &e))?;
            fs::rename(&tmp, &pin).map_err(|e| bpf_err(what(), &e))?;
        }

        let filter = EbpfFilter {
            netns: netns.clone(),
            pins,
            state: Mutex::new(State {
                cfg,
                counters,
                removed: false,
            }),
        };
        let (adopted, stale) = filter.adopt_links(&mut bpf)?;
        let mut st = filter.lock()?;
        for ifindex in &stale {
            filter.forget(&mut st, *ifindex)?;
        }
        drop(st);
        info!(
            pin_dir = %filter.pins.dir.display(),
            links = adopted,
            pruned = ?stale,
            "eBPF port filter open"
        );
        Ok(filter)
    }

    /// Switches every live pinned link to the programs just loaded in `bpf`. Returns how many
    /// links were switched and the ports with a link whose device is gone.
    fn adopt_links(&self, bpf: &mut Ebpf) -> Result<(usize, BTreeSet<u32>)> {
        let mut adopted = 0;
        let mut stale = BTreeSet::new();
        for (ifindex, d, path) in self.pins.links()? {
            let Some(link) = open_link(&path)? else {
                continue;
            };
            match link_target(&link, &path)? {
                LinkTarget::Attached(i) if i == ifindex => {
                    let what = || format!("update link {}", path.display());
                    let prog = program_mut(bpf, d)?;
                    let id = prog.attach_to_link(link).map_err(|e| bpf_err(what(), &e))?;
                    // Closes our descriptor; the pin keeps the link attached.
                    drop(prog.take_link(id).map_err(|e| bpf_err(what(), &e))?);
                    adopted += 1;
                }
                target => {
                    debug!(pin = %path.display(), ?target, "stale link");
                    stale.insert(ifindex);
                }
            }
        }
        Ok((adopted, stale))
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

    /// Forgets every port with a pinned link whose device is gone (the kernel detached the
    /// link when the device was deleted): its configuration, counters and link pins. Returns
    /// the ifindexes forgotten. Also run by [`EbpfFilter::open`] and [`VlanFilter::ports`].
    pub fn prune(&self) -> Result<Vec<u32>> {
        let mut st = self.lock()?;
        self.prune_locked(&mut st)
    }

    fn prune_locked(&self, st: &mut State) -> Result<Vec<u32>> {
        let mut stale = BTreeSet::new();
        for (ifindex, _, path) in self.pins.links()? {
            if stale.contains(&ifindex) {
                continue;
            }
            let target = match open_link(&path)? {
                Some(link) => link_target(&link, &path)?,
                None => continue,
            };
            if target != LinkTarget::Attached(ifindex) {
                stale.insert(ifindex);
            }
        }
        for ifindex in &stale {
            info!(port = ifindex, "device gone, forgetting port");
            self.forget(st, *ifindex)?;
        }
        Ok(stale.into_iter().collect())
    }

    /// Detaches every port, removes all pins and the pin directory. The filter is unusable
    /// afterwards (its maps and programs are freed once it is dropped). Best effort: keeps
    /// going and reports every failure.
    pub fn remove_all(&self) -> Result<()> {
        let mut st = self.lock_any()?;
        st.removed = true;
        let mut errors = Vec::new();
        let mut links = self.pins.links().unwrap_or_else(|e| {
            errors.push(e);
            Vec::new()
        });
        // Ingress before egress on each port (see Dir::ATTACH_ORDER).
        links.sort_by_key(|(ifindex, d, _)| (*ifindex, *d));
        for (_, _, path) in links {
            if let Err(e) = unpin_link(&path) {
                errors.push(e);
            }
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
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Many(errors)),
        }
    }

    /// Detaches port `ifindex` (ingress first) and deletes its configuration and counters.
    fn forget(&self, st: &mut State, ifindex: u32) -> Result<()> {
        let mut errors = Vec::new();
        for d in Dir::ATTACH_ORDER.iter().rev() {
            if let Err(e) = unpin_link(&self.pins.link(ifindex, *d)) {
                errors.push(e);
            }
        }
        if let Err(e) = remove_map_key(&mut st.cfg, ifindex, HashMap::remove) {
            errors.push(bpf_err(format!("delete config of port {ifindex}"), &e));
        }
        if let Err(e) = remove_map_key(&mut st.counters, ifindex, PerCpuHashMap::remove) {
            errors.push(bpf_err(format!("delete counters of port {ifindex}"), &e));
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Many(errors)),
        }
    }

    /// Attaches what is missing of port `ifindex` (`ifname`): a pinned, live link per
    /// direction. A pinned link of a gone device with the same ifindex is replaced.
    fn attach(&self, ifindex: u32, ifname: &str) -> Result<()> {
        for d in Dir::ATTACH_ORDER {
            let link_pin = self.pins.link(ifindex, d);
            if let Some(link) = open_link(&link_pin)? {
                match link_target(&link, &link_pin)? {
                    LinkTarget::Attached(i) if i == ifindex => continue,
                    target => {
                        debug!(pin = %link_pin.display(), ?target, "replacing stale link");
                        drop(link);
                        unpin_link(&link_pin)?;
                    }
                }
            }
            let prog_pin = self.pins.program(d);
            let name = ifname.to_owned();
            self.netns
                .run(move || attach_in_netns(&prog_pin, &name, d, ifindex, &link_pin))??;
            debug!(port = ifindex, ifname, dir = d.name(), "attached");
        }
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
        let value = layout::encode(ifindex, ifname, cfg)?;
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
        if let Err(e) = self.attach(ifindex, ifname) {
            if old.is_none() {
                if let Err(undo) = self.forget(&mut st, ifindex) {
                    warn!(port = ifindex, error = %undo, "undoing a failed set_port");
                }
            }
            return Err(e);
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
        let mut ports = st
            .cfg
            .keys()
            .collect::<Result<Vec<u32>, MapError>>()
            .map_err(|e| bpf_err("list ports", &e))?;
        ports.sort_unstable();
        Ok(ports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_file_names_round_trip() {
        for d in [Dir::Ingress, Dir::Egress] {
            assert_eq!(parse_link_file_name(&link_file_name(17, d)), Some((17, d)));
        }
        assert_eq!(parse_link_file_name("17-sideways"), None);
        assert_eq!(parse_link_file_name("port_ingress_new"), None);
    }
}
