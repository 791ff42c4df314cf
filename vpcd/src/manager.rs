//! The manager: vpcd's transport-agnostic API. It keeps the desired state in the store, drives
//! the VM backends, follows their events and reconciles both at start-up. The D-Bus adapter
//! (`dbus/`) is a thin layer over it.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypervisor::{
    Accel, BackendKind, HostLimits, LibvirtBackend, QmpBackend, VmBackend, VmConfig, VmEvent,
    VmSpec, VmState,
};
use tokio::sync::broadcast;

use crate::config::{AccelChoice, BackendChoice, Config};
use crate::error::{Error, Result};
use crate::network::state::{AllowedPair, PortDevice, PortRequest};
use crate::network::{NetConfig, NetManager};
use crate::store::{Phase, Store, VmRecord};

/// What changed, for the API layer to turn into signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerEvent {
    Defined(String),
    Undefined(String),
    /// The VM's devices changed (a disk attached or detached).
    Changed(String),
    State(VmEvent),
}

/// How long an undefine or a detach waits for the storage cluster to forget a domain's use of
/// a volume before it goes on without (the stale attachment is released later).
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn bounded(release: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(RELEASE_WAIT, release)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Timeout(format!(
                "no answer within {} s",
                RELEASE_WAIT.as_secs()
            )))
        })
}

/// A domain that has a volume as a disk ([`Manager::volume_user`]).
#[derive(Debug)]
struct VolumeUser {
    domain: String,
    /// Its target (`vdb`), or `disks[N]` of a definition not prepared yet.
    disk: String,
    readonly: bool,
}

/// A VM as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    pub uuid: String,
    pub state: VmState,
    pub backend: BackendKind,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// (target, source file) per disk, in order.
    pub disks: Vec<(String, String)>,
    pub console_log: String,
    pub spec_toml: String,
    pub nics: Vec<NicInfo>,
}

/// A VM NIC as clients see it (`vpcctl domiflist`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicInfo {
    pub tap: String,
    pub network: String,
    pub subnet: String,
    pub mac: String,
    pub ip: String,
    pub port: u32,
}

/// Facts about this host for clients.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub instance_id: String,
    pub default_backend: BackendKind,
    pub backends: Vec<BackendKind>,
    pub accel: Accel,
}

/// The manager of one vpcd instance.
pub struct Manager {
    cfg: Config,
    store: Arc<Store>,
    /// Tenant networks; None when they could not be set up on this host (the reason is logged
    /// and returned by every network call).
    net: std::result::Result<NetManager, String>,
    limits: HostLimits,
    host: HostInfo,
    libvirt: Option<Arc<LibvirtBackend>>,
    qmp: Arc<QmpBackend>,
    states: Mutex<HashMap<String, VmState>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    events: broadcast::Sender<ManagerEvent>,
    /// The FRR supervisor of the management role.
    _frr: Option<tokio::task::JoinHandle<()>>,
    /// The storage node of the storage role.
    storage: Option<crate::storage::Storage>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// Opens the store, probes the accelerator, connects the backends and reconciles.
    pub async fn open(cfg: Config) -> anyhow::Result<Arc<Manager>> {
        std::fs::create_dir_all(cfg.state_dir.join("vms"))?;
        let store = Arc::new(Store::open(&cfg.state_dir.join("vpcd.redb"))?);
        let instance_id = store.instance_id()?;
        let qemu = cfg.qemu.to_string_lossy().into_owned();
        let accel = match cfg.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => {
                let q = qemu.clone();
                tokio::task::spawn_blocking(move || hypervisor::accel::detect(&q)).await?
            }
        };
        let libvirt = match cfg.backend {
            BackendChoice::Qmp => None,
            BackendChoice::Libvirt => {
                Some(LibvirtBackend::connect(&cfg.libvirt_uri, &instance_id).await?)
            }
            BackendChoice::Auto => {
                match LibvirtBackend::connect(&cfg.libvirt_uri, &instance_id).await {
                    Ok(b) => Some(b),
                    Err(e) => {
                        tracing::warn!("libvirt not used: {e}");
                        None
                    }
                }
            }
        };
        let default_backend = if libvirt.is_some() {
            BackendKind::Libvirt
        } else {
            BackendKind::Qmp
        };
        let mut backends = vec![BackendKind::Qmp];
        if libvirt.is_some() {
            backends.insert(0, BackendKind::Libvirt);
        }
        tracing::info!(%default_backend, accel = accel.as_str(), instance_id, "vpcd starting");
        let netns_path = (!cfg.netns.is_empty()).then(|| PathBuf::from(&cfg.netns));
        let net = Self::open_net(&cfg, &store, &instance_id).await;
        if let Err(e) = &net {
            tracing::error!("tenant networks unavailable: {e}");
        }
        let frr = match cfg.frr().map_err(anyhow::Error::msg)? {
            Some(f) => {
                let netns = if cfg.netns.is_empty() {
                    netdrv::Netns::current()?
                } else {
                    netdrv::Netns::open(std::path::Path::new(&cfg.netns))?
                };
                Some(crate::frr::run(f, netns)?)
            }
            None => None,
        };
        let storage = match cfg.storage().map_err(anyhow::Error::msg)? {
            Some(s) => Some(crate::storage::Storage::start(&s).await?),
            None => None,
        };
        let (events, _) = broadcast::channel(1024);
        let manager = Arc::new(Manager {
            net,
            limits: HostLimits::probe(),
            host: HostInfo {
                instance_id,
                default_backend,
                backends,
                accel,
            },
            qmp: QmpBackend::new(&qemu, netns_path),
            libvirt,
            store,
            cfg,
            states: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            events,
            _frr: frr,
            storage,
        });
        manager.follow_events();
        manager.reconcile().await?;
        manager.follow_evpn();
        Ok(manager)
    }

    async fn open_net(
        cfg: &Config,
        store: &Arc<Store>,
        instance_id: &str,
    ) -> std::result::Result<NetManager, String> {
        let netns = if cfg.netns.is_empty() {
            netdrv::Netns::current()
        } else {
            netdrv::Netns::open(std::path::Path::new(&cfg.netns))
        }
        .map_err(|e| e.to_string())?;
        let underlay = if cfg.underlay_ip.is_empty() {
            None
        } else {
            Some(netdrv::model::Underlay {
                local: cfg
                    .underlay_ip
                    .parse()
                    .map_err(|_| "bad underlay_ip".to_string())?,
                mtu: cfg.underlay_mtu,
            })
        };
        let net_cfg = NetConfig {
            netns,
            prefix: cfg.link_prefix.clone(),
            owner: instance_id.to_string(),
            underlay,
            peers: cfg.peers.iter().filter_map(|p| p.parse().ok()).collect(),
            pin_dir: cfg.bpf_dir.join(instance_id),
            filter: match cfg.vlan_filter.as_str() {
                "kernel" => Some(netdrv::filter::FilterKind::Kernel),
                "ebpf" => Some(netdrv::filter::FilterKind::Ebpf),
                _ => None,
            },
            external: cfg.external()?,
            dhcp: crate::network::DhcpSettings {
                dns: cfg
                    .dns_servers
                    .iter()
                    .filter_map(|d| d.parse().ok())
                    .collect(),
                domain: Some(cfg.dns_domain.clone()).filter(|d| !d.is_empty()),
                lease_secs: cfg.dhcp_lease_secs,
            },
            route_role: cfg.roles.iter().any(|r| r == "route"),
            evpn: cfg.evpn()?,
        };
        NetManager::open(store.clone(), net_cfg)
            .await
            .map_err(|e| e.to_string())
    }

    /// The tenant networks of this host.
    /// Points the VM's volume disks at this host's NBD socket; each volume must be one this
    /// host holds.
    async fn resolve_volumes(&self, config: &mut hypervisor::VmConfig) -> Result<()> {
        let domain = config.name().to_string();
        for disk in &mut config.disks {
            self.resolve_volume(&domain, disk).await?;
        }
        Ok(())
    }

    /// Points a volume disk of `domain` at this host's NBD socket (other disks are left as
    /// they are). A volume is one domain's writable disk at a time (nothing coordinates two
    /// guests writing one block device); domains may share it read-only.
    async fn resolve_volume(
        &self,
        domain: &str,
        disk: &mut hypervisor::ResolvedDisk,
    ) -> Result<()> {
        let Some(nbd) = &mut disk.nbd else {
            return Ok(());
        };
        if let Some(user) = self.volume_user(&nbd.export, Some(domain))? {
            if !(disk.readonly && user.readonly) {
                return Err(Error::InvalidState(format!(
                    "disk {}: volume {}: domain {} has it as disk {}{}",
                    disk.target,
                    nbd.export,
                    user.domain,
                    user.disk,
                    if user.readonly {
                        " (read-only: so must this one be)"
                    } else {
                        ""
                    }
                )));
            }
        }
        let storage = self.storage().map_err(|_| {
            Error::InvalidArgument(format!(
                "disk {}: volume {}: this host does not have the storage role, nor \
                 storage_members to use the cluster's volumes through",
                disk.target, nbd.export
            ))
        })?;
        // Across hosts: the volume's leader decides.
        nbd.volume_id = Self::claim_disk(storage, domain, &disk.target, disk.readonly, nbd)
            .await
            .map_err(|e| match e {
                Error::InvalidState(m) => Error::InvalidState(format!("disk {}: {m}", disk.target)),
                e => e,
            })?;
        nbd.socket = storage.socket().to_owned();
        Ok(())
    }

    /// Records that `domain` has the volume of `nbd` as disk `target`, and returns the
    /// volume's id: refused (`InvalidState`) if it is not the volume the disk was given
    /// (`nbd.volume_id`; 0: any), or if another domain has it
    /// ([`crate::storage::Storage::attach`]).
    async fn claim_disk(
        storage: &crate::storage::Storage,
        domain: &str,
        target: &str,
        readonly: bool,
        nbd: &hypervisor::NbdDisk,
    ) -> Result<u64> {
        let id = storage.info(&nbd.export).await?.id;
        if nbd.volume_id != 0 && id != nbd.volume_id {
            return Err(Error::InvalidState(format!(
                "volume {} is not the one it was given: that was deleted and another made under \
                 its name; detach the disk and attach the volume again to use the new one",
                nbd.export
            )));
        }
        storage
            .attach(&nbd.export, domain, target, readonly)
            .await?;
        Ok(id)
    }

    /// Forgets that domain `domain` has the volume of `disk` as that disk, if it is a volume
    /// (best effort, as [`Manager::release_volumes`]).
    async fn release_disk(&self, domain: &str, disk: &hypervisor::ResolvedDisk) {
        let (Some(nbd), Ok(storage)) = (&disk.nbd, self.storage()) else {
            return;
        };
        let me = storage.node_id();
        let detach = storage.detach(&nbd.export, me, domain, Some(&disk.target));
        if let Err(e) = bounded(detach).await {
            tracing::warn!(vm = %domain, volume = %nbd.export, "not released: {e}");
        }
    }

    /// The volumes domain `rec` has as disks (in its definition or attached).
    fn volumes_of(rec: &VmRecord) -> std::collections::BTreeSet<String> {
        let in_spec = rec.spec.disks.iter().filter_map(|d| d.volume.clone());
        let in_config = rec
            .config
            .iter()
            .flat_map(|c| &c.disks)
            .filter_map(|d| Some(d.nbd.as_ref()?.export.clone()));
        in_spec.chain(in_config).collect()
    }

    /// Forgets, on each of its volumes, that domain `rec` has it (best effort: what is left is
    /// released by [`Manager::release_stale_claims`] later).
    async fn release_volumes(&self, rec: &VmRecord) {
        let Ok(storage) = self.storage() else {
            return;
        };
        let name = &rec.spec.name;
        let releases = Self::volumes_of(rec).into_iter().map(|volume| async move {
            let detach = storage.detach(&volume, storage.node_id(), name, None);
            if let Err(e) = bounded(detach).await {
                tracing::warn!(vm = %name, volume, "not released: {e}");
            }
        });
        futures::future::join_all(releases).await;
    }

    /// Records again that domain `rec` has the volumes of its disks (they may have been
    /// released meanwhile, or the domain defined before uses were recorded): before it starts,
    /// so that it does not start with a volume another domain has.
    async fn claim_volumes(&self, rec: &VmRecord) -> Result<()> {
        let disks = Self::config_of(rec)?.disks.iter();
        for (disk, nbd) in disks.filter_map(|d| Some((d, d.nbd.as_ref()?))) {
            let storage = self.storage()?;
            let claimed =
                Self::claim_disk(storage, &rec.spec.name, &disk.target, disk.readonly, nbd);
            claimed.await.map_err(|e| {
                let m = format!("domain {}: disk {}: {e}", rec.spec.name, disk.target);
                match e {
                    Error::InvalidState(_) | Error::NotFound(_) => Error::InvalidState(m),
                    Error::InvalidArgument(_) => Error::InvalidArgument(m),
                    Error::Unavailable(_) | Error::Timeout(_) => Error::Unavailable(format!(
                        "{m} (its use of the volume could not be recorded: try again once the \
                         volume's nodes answer)"
                    )),
                    Error::AlreadyExists(_) | Error::Failed(_) => Error::Failed(m),
                }
            })?;
        }
        Ok(())
    }

    /// Forgets the attachments that name this host's storage node and a domain that does not
    /// have the volume: none of that name, or one that does not run and has no such disk (a
    /// running one may still have it plugged: an unplug the guest has not done yet, or a
    /// crash between recording a detach and unplugging). What a crash between attaching a
    /// volume and recording the domain leaves, or a release while the cluster did not
    /// answer. `volumes`: the cluster's volumes as last listed (those without a leader are
    /// left for later); each attachment is checked again under its domain's lock.
    pub async fn release_stale_claims(&self, volumes: &[crate::storage::VolumeInfo]) {
        let Ok(storage) = self.storage() else {
            return;
        };
        let me = storage.node_id();
        for v in volumes.iter().filter(|v| v.leader != 0) {
            for a in v.attachments.iter().filter(|a| a.node == me) {
                let lock = self.lock_for(&a.domain);
                // (A domain busy with something else is looked at next time.)
                let Ok(_guard) = lock.try_lock() else {
                    continue;
                };
                let keep = match self.store.get(&a.domain) {
                    Ok(Some(rec)) if Self::volumes_of(&rec).contains(&v.name) => true,
                    // One being unplugged: while its domain runs, or that cannot be told
                    // (asked of its backend, not the last state seen), the guest may have it.
                    // Any other the guest never had (a crash or a timeout between recording
                    // the use and the domain's record).
                    Ok(Some(rec)) if rec.unplugging.contains(&(a.disk.clone(), v.name.clone())) => {
                        self.may_run(&rec).await
                    }
                    Ok(_) => false,
                    Err(_) => true,
                };
                if keep {
                    continue;
                }
                tracing::info!(volume = %v.name, domain = %a.domain, "releasing a stale attachment");
                let detach = storage.detach(&v.name, me, &a.domain, Some(&a.disk));
                if let Err(e) = bounded(detach).await {
                    tracing::warn!(volume = %v.name, domain = %a.domain, "not released: {e}");
                }
            }
        }
    }

    /// Forgets that domain `domain` on storage node `node` has volume `name`: for a host that
    /// is gone, or a domain it no longer runs. A domain of this host that has the volume keeps
    /// it (detach the disk, or undefine the domain). Node 0: this host's.
    pub async fn release_volume(&self, name: &str, node: u64, domain: &str) -> Result<()> {
        let storage = self.storage()?;
        let node = if node == 0 { storage.node_id() } else { node };
        let lock = self.lock_for(domain);
        // (This host's domain is looked at under its lock, so that it is not defined meanwhile.)
        let _guard = if node == storage.node_id() {
            let guard = lock.lock().await;
            if let Some(rec) = self.store.get(domain)? {
                if Self::volumes_of(&rec).contains(name) {
                    return Err(Error::InvalidState(format!(
                        "volume {name}: domain {domain} of this host has it; detach the disk or \
                         undefine the domain instead"
                    )));
                }
            }
            Some(guard)
        } else {
            None
        };
        storage.detach(name, node, domain, None).await
    }

    /// Deletes volume `name` on all its nodes, unless a domain of this host has it as a disk
    /// (its guest would lose the disk under it, and a new volume of the name would later be
    /// plugged in its place): `InvalidState` naming the domain and the disk then; the same for
    /// a domain of another host (the volume's leader knows). Without `force`, also refused
    /// (`Unavailable`) when that cannot be told: no leader of the volume answers.
    pub async fn delete_volume(&self, name: &str, force: bool) -> Result<()> {
        let storage = self.storage()?;
        if let Some(user) = self.volume_user(name, None)? {
            return Err(Error::InvalidState(format!(
                "volume {name}: domain {} has it as disk {}; detach it or undefine the domain \
                 first",
                user.domain, user.disk
            )));
        }
        storage.delete(name, force).await
    }

    /// A domain of this host, other than `except`, that has volume `name` as a disk (by its
    /// definition or by what is attached), if one does.
    fn volume_user(&self, name: &str, except: Option<&str>) -> Result<Option<VolumeUser>> {
        for rec in self.store.all()? {
            if except == Some(rec.spec.name.as_str()) {
                continue;
            }
            let in_spec = rec.spec.disks.iter().enumerate().find_map(|(i, d)| {
                (d.volume.as_deref() == Some(name)).then(|| (format!("disks[{i}]"), d.readonly))
            });
            let in_config = rec.config.iter().flat_map(|c| &c.disks).find_map(|d| {
                let nbd = d.nbd.as_ref()?;
                (nbd.export == name).then(|| (d.target.clone(), d.readonly))
            });
            if let Some((disk, readonly)) = in_config.or(in_spec) {
                return Ok(Some(VolumeUser {
                    domain: rec.spec.name,
                    disk,
                    readonly,
                }));
            }
        }
        Ok(None)
    }

    /// The storage node, if this host has the storage role or is a client of the cluster.
    pub fn storage(&self) -> Result<&crate::storage::Storage> {
        self.storage.as_ref().ok_or_else(|| {
            Error::InvalidState(
                "this host does not have the storage role (roles in vpcd.toml), nor \
                 storage_members to use the cluster's volumes through"
                    .into(),
            )
        })
    }

    pub fn net(&self) -> Result<&NetManager> {
        self.net
            .as_ref()
            .map_err(|e| Error::Unavailable(format!("tenant networks are unavailable: {e}")))
    }

    pub fn host(&self) -> &HostInfo {
        &self.host
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ManagerEvent> {
        self.events.subscribe()
    }

    pub fn default_shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.shutdown_timeout_secs)
    }

    fn backend(&self, kind: BackendKind) -> Result<Arc<dyn VmBackend>> {
        match kind {
            BackendKind::Qmp => Ok(Arc::new(self.qmp.clone())),
            BackendKind::Libvirt => match &self.libvirt {
                Some(b) => Ok(Arc::new(b.clone())),
                None => Err(Error::Unavailable(format!(
                    "libvirt backend not available (libvirt at {} did not answer when vpcd started, or backend = \"qmp\")",
                    self.cfg.libvirt_uri
                ))),
            },
        }
    }

    /// Applies what EVPN learns: on each change (and when routes of a session that stayed
    /// down expire, checked every second) the tenant networks are reconciled.
    fn follow_evpn(self: &Arc<Self>) {
        let Ok(net) = self.net() else { return };
        let Some(mut dirty) = net.take_evpn_dirty() else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                let changed = tokio::select! {
                    d = dirty.recv() => {
                        if d.is_none() {
                            break;
                        }
                        // Take a burst of updates together.
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        while dirty.try_recv().is_ok() {}
                        true
                    }
                    _ = tick.tick() => {
                        let Some(m) = weak.upgrade() else { break };
                        m.net().ok().and_then(|n| n.evpn().map(|e| e.sweep())).unwrap_or(false)
                    }
                };
                if changed {
                    let Some(m) = weak.upgrade() else { break };
                    if let Ok(net) = m.net() {
                        if let Err(e) = net.reconcile().await {
                            tracing::warn!("applying EVPN routes: {e}");
                        }
                    }
                }
            }
        });
    }

    /// Forwards backend events to subscribers and keeps the state cache current.
    fn follow_events(self: &Arc<Self>) {
        let mut receivers = vec![self.qmp.subscribe()];
        if let Some(l) = &self.libvirt {
            receivers.push(l.subscribe());
        }
        for mut rx in receivers {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(ev) => {
                            let Some(m) = weak.upgrade() else { break };
                            m.note_state(&ev.name, ev.state, &ev.reason);
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
            });
        }
    }

    /// Records a VM's state; broadcasts it when it changed (or when the reason says something
    /// happened without a state change, such as a reset).
    fn note_state(&self, name: &str, state: VmState, reason: &str) {
        let changed = {
            let mut states = self.states.lock().unwrap();
            match states.get_mut(name) {
                Some(s) => {
                    let changed = *s != state;
                    *s = state;
                    changed
                }
                None => return,
            }
        };
        if changed || reason == "reset" || reason == "rebooted" {
            let _ = self.events.send(ManagerEvent::State(VmEvent {
                name: name.to_string(),
                state,
                reason: reason.to_string(),
            }));
        }
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("vms").join(name)
    }

    fn record(&self, name: &str) -> Result<VmRecord> {
        match self.store.get(name)? {
            Some(r) if r.phase == Phase::Defined => Ok(r),
            _ => Err(Error::NotFound(format!("domain {name}"))),
        }
    }

    fn config_of(rec: &VmRecord) -> Result<&VmConfig> {
        rec.config
            .as_ref()
            .ok_or_else(|| Error::Failed(format!("domain {}: record has no config", rec.spec.name)))
    }

    /// Defines a VM from a TOML spec. `backend` = None picks the default.
    #[tracing::instrument(skip_all, fields(vm))]
    pub async fn define(&self, spec_toml: &str, backend: Option<BackendKind>) -> Result<VmInfo> {
        let spec = VmSpec::from_toml(spec_toml)?;
        tracing::Span::current().record("vm", spec.name.as_str());
        spec.validate(self.limits)?;
        let kind = backend.unwrap_or(self.host.default_backend);
        let be = self.backend(kind)?;
        let lock = self.lock_for(&spec.name);
        let _guard = lock.lock().await;
        let mut rec = VmRecord {
            spec: spec.clone(),
            uuid: uuid::Uuid::new_v4(),
            backend: kind,
            phase: Phase::Defining,
            config: None,
            unplugging: Vec::new(),
        };
        if !self.store.insert_new(&rec)? {
            return Err(Error::AlreadyExists(format!("domain {}", spec.name)));
        }
        let dir = self.vm_dir(&spec.name);
        // A directory without a record is a leftover of an earlier, failed define.
        let _ = hypervisor::remove_files(&dir);
        let prepared = {
            let (spec, dir, uuid, accel) = (spec.clone(), dir.clone(), rec.uuid, self.host.accel);
            tokio::task::spawn_blocking(move || hypervisor::prepare(&spec, &dir, uuid, accel))
                .await
                .map_err(|e| Error::Failed(e.to_string()))?
        };
        let mut config = match prepared {
            Ok(c) => c,
            Err(e) => {
                self.roll_back_define(&rec, false).await;
                return Err(e.into());
            }
        };
        if let Err(e) = self.resolve_volumes(&mut config).await {
            self.roll_back_define(&rec, false).await;
            return Err(e);
        }
        if !spec.nics.is_empty() {
            match self.create_nics(&spec).await {
                Ok(nics) => config.nics = nics,
                Err(e) => {
                    self.roll_back_define(&rec, false).await;
                    return Err(e);
                }
            }
        }
        if let Err(e) = be.define(&config).await {
            let foreign = matches!(e, hypervisor::Error::AlreadyExists(_));
            self.roll_back_define(&rec, !foreign).await;
            return Err(e.into());
        }
        rec.config = Some(config);
        rec.phase = Phase::Defined;
        self.store.put(&rec)?;
        self.states
            .lock()
            .unwrap()
            .insert(spec.name.clone(), VmState::ShutOff);
        tracing::info!(backend = %kind, "defined");
        let _ = self.events.send(ManagerEvent::Defined(spec.name.clone()));
        self.info_of(&rec, VmState::ShutOff)
    }

    /// Makes the ports of a VM's NICs (taps on their tenant bridges), all or none.
    async fn create_nics(&self, spec: &VmSpec) -> Result<Vec<hypervisor::ResolvedNic>> {
        let net = self.net()?;
        let mut reqs = Vec::new();
        for (i, nic) in spec.nics.iter().enumerate() {
            let bad = |what: &str, v: &str, e: netdrv::Error| {
                Error::InvalidArgument(format!("domain {}: nics[{i}].{what} {v:?}: {e}", spec.name))
            };
            let parse_ip = |v: &str| {
                v.parse::<std::net::Ipv4Addr>().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "domain {}: nics[{i}]: {v:?} is not an IPv4 address",
                        spec.name
                    ))
                })
            };
            let mut pairs = Vec::new();
            for pair in &nic.allowed_address_pairs {
                pairs.push(AllowedPair {
                    mac: pair
                        .mac
                        .as_deref()
                        .map(|m| m.parse().map_err(|e| bad("mac", m, e)))
                        .transpose()?,
                    ip: pair.ip.as_deref().map(parse_ip).transpose()?,
                });
            }
            reqs.push(PortRequest {
                network: nic.network.clone(),
                subnet: nic.subnet.clone(),
                device: Some(PortDevice::Tap),
                mac: nic
                    .mac
                    .as_deref()
                    .map(|m| m.parse().map_err(|e| bad("mac", m, e)))
                    .transpose()?,
                ip: nic.ip.as_deref().map(parse_ip).transpose()?,
                port_security: nic.port_security,
                allowed_pairs: pairs,
                vm: Some(spec.name.clone()),
            });
        }
        let ports = net.create_ports(&reqs).await?;
        Ok(ports
            .iter()
            .map(|p| hypervisor::ResolvedNic {
                tap: net.device_name(p),
                mac: p.mac.to_string(),
            })
            .collect())
    }

    /// Undoes a define that did not finish: backend definition, ports, files, record.
    async fn roll_back_define(&self, rec: &VmRecord, undefine_backend: bool) {
        let name = &rec.spec.name;
        if !rec.spec.nics.is_empty() {
            if let Ok(net) = self.net() {
                if let Err(e) = net.delete_vm_ports(name).await {
                    tracing::warn!(vm = %name, "roll back define: {e}");
                }
            }
        }
        if undefine_backend {
            if let Ok(be) = self.backend(rec.backend) {
                if let Err(e) = be.undefine(name).await {
                    tracing::warn!(vm = %name, "roll back define: {e}");
                }
            }
        }
        self.release_volumes(rec).await;
        if let Err(e) = hypervisor::remove_files(&self.vm_dir(name)) {
            tracing::warn!(vm = %name, "roll back define: {e}");
        }
        if let Err(e) = self.store.delete(name) {
            tracing::warn!(vm = %name, "roll back define: {e}");
        }
    }

    /// Defines and starts a VM; if it cannot start, it is undefined again.
    pub async fn create(&self, spec_toml: &str, backend: Option<BackendKind>) -> Result<VmInfo> {
        let info = self.define(spec_toml, backend).await?;
        if let Err(e) = self.start(&info.name).await {
            let _ = self.destroy(&info.name).await;
            if let Err(u) = self.undefine(&info.name).await {
                tracing::warn!(vm = %info.name, "undefine after failed start: {u}");
            }
            return Err(e);
        }
        self.info(&info.name).await
    }

    #[tracing::instrument(skip(self))]
    pub async fn start(&self, name: &str) -> Result<()> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        // (Read under the lock: a disk detached meanwhile is not claimed again.)
        let mut rec = self.record(name)?;
        self.forget_unplugged(&mut rec).await?;
        self.claim_volumes(&rec).await?;
        self.backend(rec.backend)?.start(name).await?;
        self.note_state(name, VmState::Running, "booted");
        Ok(())
    }

    /// Whether domain `rec` runs, or that cannot be told (its backend asked, not the last
    /// state seen).
    async fn may_run(&self, rec: &VmRecord) -> bool {
        match self.backend(rec.backend) {
            Ok(be) => be
                .state(&rec.spec.name)
                .await
                .map_or(true, |s| s.is_active()),
            Err(_) => true,
        }
    }

    /// Forgets the disks `rec` was unplugging if its domain is stopped (its guest let go of
    /// them); under the domain's lock.
    async fn forget_unplugged(&self, rec: &mut VmRecord) -> Result<()> {
        if rec.unplugging.is_empty() {
            return Ok(());
        }
        if !self.may_run(rec).await {
            rec.unplugging.clear();
            self.store.put(rec)?;
        }
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    pub async fn shutdown(&self, name: &str, timeout: Option<Duration>) -> Result<()> {
        let rec = self.record(name)?;
        let timeout = timeout.unwrap_or_else(|| self.default_shutdown_timeout());
        self.backend(rec.backend)?.shutdown(name, timeout).await?;
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    pub async fn destroy(&self, name: &str) -> Result<()> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let rec = self.record(name)?;
        self.backend(rec.backend)?.destroy(name).await?;
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    pub async fn reboot(&self, name: &str) -> Result<()> {
        let rec = self.record(name)?;
        self.backend(rec.backend)?.reboot(name).await?;
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    pub async fn undefine(&self, name: &str) -> Result<()> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let mut rec = match self.store.get(name)? {
            // (An undefine that failed midway is carried on: each of its steps can be done
            // again.)
            Some(r) if r.phase != Phase::Defining => r,
            _ => return Err(Error::NotFound(format!("domain {name}"))),
        };
        let be = self.backend(rec.backend)?;
        match be.state(name).await {
            Ok(state) if state.is_active() => {
                return Err(Error::InvalidState(format!(
                    "domain {name}: undefine not possible while {state}"
                )))
            }
            // (Gone from the backend already: an undefine carried on, or a lost domain.)
            Ok(_) | Err(hypervisor::Error::NotFound(_)) => {}
            Err(e) => {
                return Err(Error::Unavailable(format!(
                    "domain {name}: whether it runs could not be told, not undefined: {e}"
                )))
            }
        }
        rec.phase = Phase::Undefining;
        self.store.put(&rec)?;
        self.finish_undefine(&rec, be.as_ref()).await?;
        tracing::info!("undefined");
        Ok(())
    }

    async fn finish_undefine(&self, rec: &VmRecord, be: &dyn VmBackend) -> Result<()> {
        let name = &rec.spec.name;
        be.undefine(name).await?;
        if !rec.spec.nics.is_empty() {
            self.net()?.delete_vm_ports(name).await?;
        }
        self.release_volumes(rec).await;
        hypervisor::remove_files(&self.vm_dir(name))?;
        self.store.delete(name)?;
        self.states.lock().unwrap().remove(name);
        let _ = self.events.send(ManagerEvent::Undefined(name.clone()));
        Ok(())
    }

    /// Adds a disk to a VM (`disk_toml`: the keys of one `[[disks]]` table: a volume, a file,
    /// a new blank disk or an overlay on an image), hot-plugged if the VM runs and kept in its
    /// definition. `target` picks the guest device (`vdb`...), else the first free one.
    /// Returns the target. The store has it first, so a crash never leaves a plugged disk
    /// unrecorded.
    #[tracing::instrument(skip(self, disk_toml))]
    pub async fn attach_disk(
        &self,
        name: &str,
        disk_toml: &str,
        target: Option<&str>,
    ) -> Result<String> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let mut old = self.record(name)?;
        self.forget_unplugged(&mut old).await?;
        let disk = hypervisor::DiskSpec::from_toml(disk_toml)?;
        let mut spec = old.spec.clone();
        spec.disks.push(disk.clone());
        spec.validate(self.limits)?;
        // A volume the guest has not let go of yet is still its (its use stays recorded).
        if let Some((t, v)) = old
            .unplugging
            .iter()
            .find(|(t, v)| disk.volume.as_ref() == Some(v) || target == Some(t.as_str()))
        {
            return Err(Error::InvalidState(format!(
                "domain {name}: disk {t} (volume {v}) is still being unplugged: the guest has \
                 not let go of it; it can be attached again once the domain has stopped"
            )));
        }
        let mut config = Self::config_of(&old)?.clone();
        let used: Vec<&str> = config.disks.iter().map(|d| d.target.as_str()).collect();
        let target = match target {
            Some(t) => {
                let ok =
                    t.len() == 3 && t.starts_with("vd") && t.as_bytes()[2].is_ascii_lowercase();
                if !ok {
                    return Err(Error::InvalidArgument(format!(
                        "domain {name}: disk target {t:?}: vda to vdz"
                    )));
                }
                if used.contains(&t) {
                    return Err(Error::AlreadyExists(format!("domain {name}: disk {t}")));
                }
                t.to_string()
            }
            None => (b'a'..=b'z')
                .map(|c| format!("vd{}", c as char))
                .find(|t| !used.contains(&t.as_str()))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("domain {name}: no free disk target"))
                })?,
        };
        // A file of its own gets a name of its own: a detached disk's file stays until the VM
        // is undefined, and a new blank disk must not be an old one.
        let owned = self.vm_dir(name).join(format!(
            "disk-{target}-{}.qcow2",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        let mut resolved = {
            let (disk, target, owned) = (disk, target.clone(), owned);
            tokio::task::spawn_blocking(move || hypervisor::prepare_disk(&disk, &target, &owned))
                .await
                .map_err(|e| Error::Failed(e.to_string()))??
        };
        let remove_owned = |d: &hypervisor::ResolvedDisk| {
            if d.owned {
                let _ = std::fs::remove_file(&d.path);
            }
        };
        if let Err(e) = self.resolve_volume(name, &mut resolved).await {
            remove_owned(&resolved);
            if !matches!(e, Error::InvalidState(_)) {
                // (Not refused: the use may be recorded all the same, after this gave up.)
                self.release_disk(name, &resolved).await;
            }
            return Err(e);
        }
        config.disks.push(resolved.clone());
        let rec = Self::with_disks(&old, spec, &config);
        // (Nothing returns early from here on without undoing the above.)
        let plugged = match (self.backend(rec.backend), Self::config_of(&rec)) {
            (Ok(backend), Ok(vm)) => match self.store.put(&rec) {
                Ok(()) => backend
                    .attach_disk(vm, &resolved)
                    .await
                    .map_err(Error::from),
                Err(e) => Err(e.into()),
            },
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        if let Err(e) = plugged {
            self.store.put(&old)?;
            remove_owned(&resolved);
            self.release_disk(name, &resolved).await;
            return Err(e);
        }
        tracing::info!(disk = %target, "disk attached");
        let _ = self.events.send(ManagerEvent::Changed(name.to_string()));
        Ok(target)
    }

    /// `old` with `spec` (its disks changed) and `config`'s disks, kept in the same order.
    fn with_disks(old: &VmRecord, spec: VmSpec, config: &VmConfig) -> VmRecord {
        let mut config = config.clone();
        config.spec = spec.clone();
        VmRecord {
            spec,
            config: Some(config),
            ..old.clone()
        }
    }

    /// Removes disk `target` from a VM: unplugged from the running guest (once it lets go) and
    /// from its definition. Its file stays until the VM is undefined. A VM that boots from its
    /// first disk keeps it.
    #[tracing::instrument(skip(self))]
    pub async fn detach_disk(&self, name: &str, target: &str) -> Result<()> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let old = self.record(name)?;
        let mut config = Self::config_of(&old)?.clone();
        let i = config
            .disks
            .iter()
            .position(|d| d.target == target)
            .ok_or_else(|| Error::NotFound(format!("domain {name}: disk {target}")))?;
        if i == 0 && old.spec.boots_from_disk() {
            return Err(Error::InvalidArgument(format!(
                "domain {name}: disk {target} is the one it boots from"
            )));
        }
        let disk = config.disks.remove(i);
        let mut spec = old.spec.clone();
        spec.disks.remove(i);
        let mut rec = Self::with_disks(&old, spec, &config);
        // A volume is unplugging until the guest has let go of it (recorded first: a crash
        // during the unplug keeps the volume's use).
        let unplugging = disk
            .nbd
            .as_ref()
            .map(|n| (target.to_string(), n.export.clone()));
        rec.unplugging.extend(unplugging.clone());
        // (The backend first: nothing is changed if it is not there.)
        let (backend, vm) = (self.backend(rec.backend)?, Self::config_of(&rec)?);
        self.store.put(&rec)?;
        match backend.detach_disk(vm, &disk).await {
            Ok(()) => {
                self.release_disk(name, &disk).await;
                if unplugging.is_some() {
                    rec.unplugging.retain(|u| Some(u) != unplugging.as_ref());
                    self.store.put(&rec)?;
                }
            }
            // Off the definition already; the guest lets go of it later.
            // (Its use of a volume stays recorded while it runs: `release_stale_claims`.)
            Err(e @ hypervisor::Error::UnplugTimeout { .. }) => {
                let _ = self.events.send(ManagerEvent::Changed(name.to_string()));
                return Err(e.into());
            }
            Err(e) => {
                self.store.put(&old)?;
                return Err(e.into());
            }
        }
        tracing::info!(disk = %target, "disk detached");
        let _ = self.events.send(ManagerEvent::Changed(name.to_string()));
        Ok(())
    }

    /// The VM's current state, read from its backend.
    pub async fn state(&self, name: &str) -> Result<VmState> {
        let rec = self.record(name)?;
        let state = self.backend(rec.backend)?.state(name).await?;
        self.note_state(name, state, "observed");
        Ok(state)
    }

    pub async fn info(&self, name: &str) -> Result<VmInfo> {
        let state = self.state(name).await?;
        self.info_of(&self.record(name)?, state)
    }

    /// Whether domain `name` is one an undefine failed midway on (it is not listed, and only
    /// `undefine` takes it, which carries on).
    pub fn half_undefined(&self, name: &str) -> Result<bool> {
        Ok(matches!(self.store.get(name)?, Some(r) if r.phase == Phase::Undefining))
    }

    /// The domains an undefine failed midway on ([`Manager::half_undefined`]), as shut off:
    /// their objects stay on the bus (after a restart too) for `Undefine` to carry on.
    pub fn half_undefined_domains(&self) -> Result<Vec<VmInfo>> {
        self.store
            .all()?
            .iter()
            .filter(|r| r.phase == Phase::Undefining)
            .map(|r| self.info_of(r, VmState::ShutOff))
            .collect()
    }

    /// Every defined VM with its last known state.
    pub fn list(&self) -> Result<Vec<VmInfo>> {
        let states = self.states.lock().unwrap().clone();
        let mut out = Vec::new();
        for rec in self.store.all()? {
            if rec.phase != Phase::Defined {
                continue;
            }
            let state = states
                .get(&rec.spec.name)
                .copied()
                .unwrap_or(VmState::ShutOff);
            out.push(self.info_of(&rec, state)?);
        }
        Ok(out)
    }

    fn info_of(&self, rec: &VmRecord, state: VmState) -> Result<VmInfo> {
        let config = Self::config_of(rec)?;
        Ok(VmInfo {
            name: rec.spec.name.clone(),
            uuid: rec.uuid.to_string(),
            state,
            backend: rec.backend,
            accel: config.accel,
            vcpus: rec.spec.vcpus,
            memory_mib: rec.spec.memory_mib,
            disks: config
                .disks
                .iter()
                .map(|d| {
                    let source = match &d.nbd {
                        Some(n) => {
                            format!("nbd+unix:///{}?socket={}", n.export, n.socket.display())
                        }
                        None => d.path.to_string_lossy().into_owned(),
                    };
                    (d.target.clone(), source)
                })
                .collect(),
            console_log: config.console_log.to_string_lossy().into_owned(),
            spec_toml: rec.spec.to_toml(),
            nics: self.nics_of(&rec.spec.name),
        })
    }

    fn nics_of(&self, vm: &str) -> Vec<NicInfo> {
        let Ok(net) = self.net() else {
            return Vec::new();
        };
        let Ok(st) = net.state() else {
            return Vec::new();
        };
        st.ports
            .values()
            .filter(|p| p.vm.as_deref() == Some(vm))
            .map(|p| NicInfo {
                tap: net.device_name(p),
                network: p.network.clone(),
                subnet: p.subnet.clone(),
                mac: p.mac.to_string(),
                ip: p.ip.to_string(),
                port: p.id,
            })
            .collect()
    }

    /// Opens serial port `port` of a running VM (0 is the console).
    pub async fn open_console(&self, name: &str, port: u32) -> Result<OwnedFd> {
        let rec = self.record(name)?;
        Ok(self.backend(rec.backend)?.open_console(name, port).await?)
    }

    /// Brings the backends in line with the store after a (re)start: finishes or rolls back
    /// interrupted operations, re-attaches to running VMs, redefines VMs a backend lost, and
    /// removes shut-off domains this instance owns that the store does not know.
    async fn reconcile(&self) -> Result<()> {
        for rec in self.store.all()? {
            let name = rec.spec.name.clone();
            match rec.phase {
                Phase::Defining => {
                    tracing::info!(vm = %name, "rolling back an interrupted define");
                    self.roll_back_define(&rec, true).await;
                }
                Phase::Undefining => {
                    tracing::info!(vm = %name, "finishing an interrupted undefine");
                    match self.backend(rec.backend) {
                        Ok(be) => {
                            let _ = be.destroy(&name).await;
                            if let Err(e) = self.finish_undefine(&rec, be.as_ref()).await {
                                tracing::warn!(vm = %name, "finish undefine: {e}");
                            }
                        }
                        Err(e) => tracing::warn!(vm = %name, "finish undefine: {e}"),
                    }
                }
                Phase::Defined => {
                    let state = self.attach(&rec).await.unwrap_or_else(|e| {
                        tracing::warn!(vm = %name, "re-attach failed: {e}");
                        VmState::ShutOff
                    });
                    tracing::info!(vm = %name, %state, "re-attached");
                    self.states.lock().unwrap().insert(name, state);
                }
            }
        }
        if let Ok(net) = self.net() {
            let vms: Vec<String> = self.store.all()?.into_iter().map(|r| r.spec.name).collect();
            let orphans: std::collections::BTreeSet<String> = net
                .state()?
                .ports
                .values()
                .filter_map(|p| p.vm.clone())
                .filter(|vm| !vms.contains(vm))
                .collect();
            for vm in orphans {
                tracing::info!(vm = %vm, "removing ports of a VM that no longer exists");
                net.delete_vm_ports(&vm).await?;
            }
        }
        if let Some(libvirt) = &self.libvirt {
            let known: Vec<String> = self.store.all()?.into_iter().map(|r| r.spec.name).collect();
            for name in libvirt.owned_domains().await? {
                if known.contains(&name) {
                    continue;
                }
                let be: &dyn VmBackend = libvirt;
                match be.state(&name).await {
                    Ok(s) if !s.is_active() => {
                        tracing::info!(vm = %name, "removing a stale domain this vpcd owns");
                        let _ = be.undefine(&name).await;
                    }
                    _ => {
                        tracing::warn!(vm = %name, "a running domain owned by this vpcd has no record; left alone")
                    }
                }
            }
        }
        Ok(())
    }

    async fn attach(&self, rec: &VmRecord) -> Result<VmState> {
        let be = self.backend(rec.backend)?;
        let config = Self::config_of(rec)?;
        match be.attach(config).await {
            Ok(s) => Ok(s),
            Err(hypervisor::Error::NotFound(_)) => {
                tracing::info!(vm = %rec.spec.name, "backend lost the domain; defining it again");
                be.define(config).await?;
                Ok(be.attach(config).await?)
            }
            Err(e) => Err(e.into()),
        }
    }
}
