//! The libvirt backend: VMs are ordinary libvirt domains (so `virsh` works on them), defined
//! from XML that `xml.rs` generates, driven through the `virt` crate.
//!
//! libvirt calls block, so each runs on tokio's blocking pool. State changes, including those
//! made with `virsh` behind vpcd's back, are found by a watcher that reads the state of every
//! domain this backend manages every 200 ms and broadcasts the differences.

mod xml;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::ErrorNumber;
use virt::sys;

use crate::backend::{
    BackendKind, ResolvedDisk, VmBackend, VmConfig, VmEvent, VmState, UNPLUG_TIMEOUT,
};
use crate::error::{Error, Result};

pub use xml::{disk_targets, disk_xml, domain_xml, owner_of, serial_pty, METADATA_NS};

/// How often the watcher reads domain states.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// VMs as libvirt domains on one libvirt connection.
pub struct LibvirtBackend {
    uri: String,
    /// The vpcd instance id written into each domain's metadata.
    owner: String,
    conn: Mutex<Option<Arc<Connect>>>,
    /// Domains this backend manages, with the state last reported for each.
    watched: Mutex<HashMap<String, Option<VmState>>>,
    events: broadcast::Sender<VmEvent>,
}

impl std::fmt::Debug for LibvirtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtBackend")
            .field("uri", &self.uri)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl LibvirtBackend {
    /// Connects to libvirt at `uri` and starts the state watcher. Fails with
    /// [`Error::LibvirtUnavailable`] when libvirtd does not answer.
    pub async fn connect(uri: &str, owner: &str) -> Result<Arc<LibvirtBackend>> {
        let (events, _) = broadcast::channel(256);
        let backend = Arc::new(LibvirtBackend {
            uri: uri.to_string(),
            owner: owner.to_string(),
            conn: Mutex::new(None),
            watched: Mutex::new(HashMap::new()),
            events,
        });
        let b = backend.clone();
        tokio::task::spawn_blocking(move || b.conn())
            .await
            .expect("libvirt connect task panicked")?;
        let weak = Arc::downgrade(&backend);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                let Some(b) = weak.upgrade() else { break };
                let _ = tokio::task::spawn_blocking(move || b.poll_states()).await;
            }
        });
        Ok(backend)
    }

    /// Brings the domain's disks in line with the VM's (after vpcd was away while a disk was
    /// attached or detached, or a disk was detached behind its back): the definition is
    /// written again if its disks differ, and a running guest gets missing disks plugged and
    /// extra ones unplugged (without waiting for the guest to let go).
    async fn converge_disks(self: &Arc<Self>, vm: &VmConfig) -> Result<()> {
        let this = self.clone();
        let vm = vm.clone();
        let xml = domain_xml(&vm, &self.owner);
        tokio::task::spawn_blocking(move || {
            let name = vm.name().to_string();
            let err = |e| virt_error(&name, "attach", e);
            let dom = this.lookup(&name)?;
            let want: Vec<String> = vm.disks.iter().map(|d| d.target.clone()).collect();
            let defined = dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE).map_err(err)?;
            let sorted = |mut v: Vec<String>| {
                v.sort();
                v
            };
            if sorted(xml::disk_targets(&defined)) != sorted(want.clone()) {
                tracing::info!(vm = %name, "definition's disks differ; defining it again");
                this.conn()?.define_domain_xml(&xml).map_err(err)?;
            }
            if !dom.is_active().map_err(err)? {
                return Ok(());
            }
            let live = xml::disk_targets(&dom.xml_desc(0).map_err(err)?);
            for disk in vm.disks.iter().filter(|d| !live.contains(&d.target)) {
                match dom.attach_device_flags(&disk_xml(disk, ""), sys::VIR_DOMAIN_AFFECT_LIVE) {
                    Ok(_) => {
                        tracing::info!(vm = %name, disk = %disk.target, "missing disk plugged")
                    }
                    Err(e) => tracing::warn!(vm = %name, disk = %disk.target, "missing disk: {e}"),
                }
            }
            for target in live.iter().filter(|t| !want.contains(t)) {
                // libvirt finds a disk to detach by its target.
                let dev = format!(
                    "<disk type='file' device='disk'><target dev='{target}' bus='virtio'/></disk>"
                );
                if let Err(e) = dom.detach_device_flags(&dev, sys::VIR_DOMAIN_AFFECT_LIVE) {
                    tracing::warn!(vm = %name, disk = %target, "extra disk: {e}");
                }
            }
            Ok(())
        })
        .await
        .expect("libvirt task panicked")
    }

    /// Whether libvirt at `uri` answers (used to choose the default backend).
    pub async fn answers(uri: &str) -> bool {
        let uri = uri.to_string();
        let probe = tokio::task::spawn_blocking(move || Connect::open(Some(&uri)).is_ok());
        matches!(
            tokio::time::timeout(Duration::from_secs(30), probe).await,
            Ok(Ok(true))
        )
    }

    /// The open connection, reopened if libvirtd went away and came back.
    fn conn(&self) -> Result<Arc<Connect>> {
        let mut guard = self.conn.lock().unwrap();
        if let Some(c) = guard.as_ref() {
            if c.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
        }
        let c =
            Arc::new(
                Connect::open(Some(&self.uri)).map_err(|e| Error::LibvirtUnavailable {
                    uri: self.uri.clone(),
                    reason: e.message().to_string(),
                })?,
            );
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` with the domain `name` on the blocking pool.
    async fn with_domain<T: Send + 'static>(
        self: &Arc<Self>,
        name: &str,
        op: &'static str,
        f: impl FnOnce(&Domain) -> std::result::Result<T, virt::error::Error> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let dom = this.lookup(&name)?;
            f(&dom).map_err(|e| virt_error(&name, op, e))
        })
        .await
        .expect("libvirt task panicked")
    }

    /// Looks a domain up and checks vpcd owns it: domains of others are never touched.
    fn lookup(&self, name: &str) -> Result<Domain> {
        let conn = self.conn()?;
        let dom = conn
            .lookup_domain_by_name(name)
            .map_err(|e| virt_error(name, "lookup", e))?;
        let xml = dom
            .xml_desc(0)
            .map_err(|e| virt_error(name, "dumpxml", e))?;
        if owner_of(&xml) != Some(self.owner.as_str()) {
            return Err(Error::AlreadyExists(format!(
                "{name} (not managed by this vpcd)"
            )));
        }
        Ok(dom)
    }

    fn read_state(dom: &Domain, name: &str) -> Result<(VmState, String)> {
        let (state, reason) = dom.state().map_err(|e| virt_error(name, "state", e))?;
        let state = match state.known() {
            Some(DomainState::Running | DomainState::Blocked) => VmState::Running,
            Some(DomainState::Paused | DomainState::PMSuspended) => VmState::Paused,
            Some(DomainState::Shutdown) => VmState::ShuttingDown,
            Some(DomainState::Shutoff) => VmState::ShutOff,
            Some(DomainState::Crashed) => VmState::Crashed,
            Some(DomainState::NoState) | None => return Err(Error::NotFound(name.to_string())),
        };
        Ok((state, reason_word(&format!("{reason:?}"))))
    }

    /// One watcher round: reads every watched domain's state and broadcasts changes.
    fn poll_states(&self) {
        let names: Vec<String> = self.watched.lock().unwrap().keys().cloned().collect();
        let Ok(conn) = self.conn() else { return };
        for name in names {
            let Ok(dom) = conn.lookup_domain_by_name(&name) else {
                continue;
            };
            if let Ok((state, reason)) = LibvirtBackend::read_state(&dom, &name) {
                self.note_state(&name, state, &reason);
            }
        }
    }

    /// Records `state` for `name` and broadcasts it if it changed.
    fn note_state(&self, name: &str, state: VmState, reason: &str) {
        let mut watched = self.watched.lock().unwrap();
        let Some(last) = watched.get_mut(name) else {
            return;
        };
        if *last != Some(state) {
            *last = Some(state);
            tracing::info!(vm = name, state = %state, reason, "state changed");
            let _ = self.events.send(VmEvent {
                name: name.to_string(),
                state,
                reason: reason.to_string(),
            });
        }
    }

    fn watch(&self, name: &str, state: VmState) {
        self.watched
            .lock()
            .unwrap()
            .insert(name.to_string(), Some(state));
    }

    /// Polls until the domain is shut off or `timeout` passes.
    fn wait_shut_off(&self, name: &str, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let dom = self.lookup(name)?;
            let (state, reason) = LibvirtBackend::read_state(&dom, name)?;
            if !state.is_active() {
                self.note_state(name, state, &reason);
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Domains of this vpcd instance that libvirt has (for reconciliation).
    pub async fn owned_domains(self: &Arc<Self>) -> Result<Vec<String>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this.conn()?;
            let doms = conn
                .list_all_domains(0)
                .map_err(|e| virt_error("*", "list", e))?;
            Ok(doms
                .iter()
                .filter(|d| {
                    d.xml_desc(0)
                        .ok()
                        .is_some_and(|x| owner_of(&x) == Some(this.owner.as_str()))
                })
                .filter_map(|d| d.name().ok())
                .collect())
        })
        .await
        .expect("libvirt task panicked")
    }

    /// The domain's current XML (`virsh dumpxml`).
    pub async fn dump_xml(self: &Arc<Self>, name: &str) -> Result<String> {
        self.with_domain(name, "dumpxml", |d| d.xml_desc(0)).await
    }
}

#[async_trait::async_trait]
impl VmBackend for Arc<LibvirtBackend> {
    fn kind(&self) -> BackendKind {
        BackendKind::Libvirt
    }

    async fn define(&self, vm: &VmConfig) -> Result<()> {
        let xml = domain_xml(vm, &self.owner);
        let this = self.clone();
        let name = vm.name().to_string();
        let uuid = vm.uuid;
        tokio::task::spawn_blocking(move || {
            let conn = this.conn()?;
            if let Ok(existing) = conn.lookup_domain_by_name(&name) {
                let same = existing
                    .uuid()
                    .is_ok_and(|u| u.as_bytes() == uuid.as_bytes());
                let ours = existing
                    .xml_desc(0)
                    .ok()
                    .is_some_and(|x| owner_of(&x) == Some(this.owner.as_str()));
                if !(same && ours) {
                    return Err(Error::AlreadyExists(name));
                }
            }
            conn.define_domain_xml(&xml)
                .map_err(|e| virt_error(&name, "define", e))?;
            let dom = this.lookup(&name)?;
            let (state, _) = LibvirtBackend::read_state(&dom, &name)?;
            this.watch(&name, state);
            Ok(())
        })
        .await
        .expect("libvirt task panicked")
    }

    async fn attach(&self, vm: &VmConfig) -> Result<VmState> {
        let name = vm.name().to_string();
        let state = self
            .with_domain(vm.name(), "attach", move |d| {
                Ok(LibvirtBackend::read_state(d, &name))
            })
            .await??;
        self.watch(vm.name(), state.0);
        self.converge_disks(vm).await?;
        Ok(state.0)
    }

    async fn start(&self, name: &str) -> Result<()> {
        let this = self.clone();
        let n = name.to_string();
        self.with_domain(name, "start", move |d| {
            if d.is_active()? {
                return Ok(Err(Error::InvalidState {
                    name: n,
                    op: "start",
                    state: "running".into(),
                }));
            }
            d.create()?;
            if let Ok((state, reason)) = LibvirtBackend::read_state(d, &n) {
                this.note_state(&n, state, &reason);
            }
            Ok(Ok(()))
        })
        .await?
    }

    async fn shutdown(&self, name: &str, timeout: Duration) -> Result<()> {
        let this = self.clone();
        let n = name.to_string();
        let active = self
            .with_domain(name, "shutdown", |d| d.is_active())
            .await?;
        if !active {
            return Ok(());
        }
        self.with_domain(name, "shutdown", |d| d.shutdown()).await?;
        let done = tokio::task::spawn_blocking(move || this.wait_shut_off(&n, timeout))
            .await
            .expect("libvirt task panicked")?;
        if done {
            Ok(())
        } else {
            Err(Error::ShutdownTimeout {
                name: name.to_string(),
                secs: timeout.as_secs(),
            })
        }
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        let this = self.clone();
        let n = name.to_string();
        self.with_domain(name, "destroy", move |d| {
            if d.is_active()? {
                d.destroy()?;
            }
            if let Ok((state, reason)) = LibvirtBackend::read_state(d, &n) {
                this.note_state(&n, state, &reason);
            }
            Ok(())
        })
        .await
    }

    async fn reboot(&self, name: &str) -> Result<()> {
        let n = name.to_string();
        self.with_domain(name, "reboot", move |d| {
            if !d.is_active()? {
                return Ok(Err(Error::InvalidState {
                    name: n,
                    op: "reboot",
                    state: "shut off".into(),
                }));
            }
            d.reboot(virt::sys::VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)?;
            Ok(Ok(()))
        })
        .await?
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        let n = name.to_string();
        let result = self
            .with_domain(name, "undefine", move |d| {
                if d.is_active()? {
                    return Ok(Err(Error::InvalidState {
                        name: n,
                        op: "undefine",
                        state: "running".into(),
                    }));
                }
                d.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM)?;
                Ok(Ok(()))
            })
            .await;
        match result {
            Ok(r) => r?,
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        self.watched.lock().unwrap().remove(name);
        Ok(())
    }

    async fn state(&self, name: &str) -> Result<VmState> {
        let n = name.to_string();
        Ok(self
            .with_domain(name, "state", move |d| {
                Ok(LibvirtBackend::read_state(d, &n))
            })
            .await??
            .0)
    }

    async fn open_console(&self, name: &str, port: u32) -> Result<OwnedFd> {
        let xml = self.dump_xml(name).await?;
        let console_err = |reason: String| Error::Console {
            name: name.to_string(),
            dev: format!("serial{port}"),
            reason,
        };
        let pty = serial_pty(&xml, port).ok_or_else(|| {
            console_err("no such serial port, or the domain is not running".into())
        })?;
        crate::console::open_pty(&pty).map_err(|e| console_err(format!("open {pty}: {e}")))
    }

    fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    async fn attach_disk(&self, vm: &VmConfig, disk: &ResolvedDisk) -> Result<()> {
        let this = self.clone();
        let name = vm.name().to_string();
        let (xml, dev) = (domain_xml(vm, &self.owner), disk_xml(disk, ""));
        let err = |name: &str| {
            let name = name.to_string();
            move |e| virt_error(&name, "attach disk", e)
        };
        tokio::task::spawn_blocking(move || {
            let dom = this.lookup(&name)?;
            let live = dom.is_active().map_err(err(&name))?;
            if live {
                dom.attach_device_flags(&dev, sys::VIR_DOMAIN_AFFECT_LIVE)
                    .map_err(err(&name))?;
            }
            // The definition is vpcd's XML with the disk, as a new define would make it.
            if let Err(e) = this.conn()?.define_domain_xml(&xml) {
                if live {
                    let _ = dom.detach_device_flags(&dev, sys::VIR_DOMAIN_AFFECT_LIVE);
                }
                return Err(err(&name)(e));
            }
            Ok(())
        })
        .await
        .expect("libvirt task panicked")
    }

    async fn detach_disk(&self, vm: &VmConfig, disk: &ResolvedDisk) -> Result<()> {
        let this = self.clone();
        let name = vm.name().to_string();
        let target = disk.target.clone();
        let (xml, dev) = (domain_xml(vm, &self.owner), disk_xml(disk, ""));
        let err = |name: &str| {
            let name = name.to_string();
            move |e| virt_error(&name, "detach disk", e)
        };
        tokio::task::spawn_blocking(move || {
            let dom = this.lookup(&name)?;
            let before = dom
                .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
                .map_err(err(&name))?;
            this.conn()?.define_domain_xml(&xml).map_err(err(&name))?;
            let plugged = |dom: &Domain| -> Result<bool> {
                if !dom.is_active().map_err(err(&name))? {
                    return Ok(false);
                }
                let live = dom.xml_desc(0).map_err(err(&name))?;
                Ok(xml::disk_targets(&live).contains(&target))
            };
            // Whether the unplug was asked (libvirt waits a few seconds for the guest, then
            // leaves it pending); none is needed if the guest does not have the disk.
            let unplug = || -> Result<bool> {
                if !plugged(&dom)? {
                    return Ok(false);
                }
                dom.detach_device_flags(&dev, sys::VIR_DOMAIN_AFFECT_LIVE)
                    .map_err(err(&name))?;
                Ok(true)
            };
            match unplug() {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                // The guest keeps the disk: so does the definition again (as the caller's
                // record does), or its next boot would be without it.
                Err(e) => {
                    let undo = this.conn().and_then(|c| {
                        c.define_domain_xml(&before)
                            .map(drop)
                            .map_err(err(&name))
                    });
                    if let Err(undo) = undo {
                        tracing::warn!(vm = %name, "definition not restored after a failed unplug: {undo}");
                    }
                    return Err(e);
                }
            }
            let deadline = Instant::now() + UNPLUG_TIMEOUT;
            while plugged(&dom)? {
                if Instant::now() > deadline {
                    return Err(Error::UnplugTimeout {
                        name,
                        target,
                        secs: UNPLUG_TIMEOUT.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        })
        .await
        .expect("libvirt task panicked")
    }
}

fn virt_error(name: &str, op: &'static str, e: virt::error::Error) -> Error {
    match e.code().known() {
        Some(ErrorNumber::NoDomain) => Error::NotFound(name.to_string()),
        Some(ErrorNumber::DomExist) => Error::AlreadyExists(name.to_string()),
        Some(ErrorNumber::OperationInvalid) => Error::InvalidState {
            name: name.to_string(),
            op,
            state: e.message().to_string(),
        },
        _ => Error::Libvirt {
            name: name.to_string(),
            op,
            reason: e.message().to_string(),
        },
    }
}

/// `Shutoff(Known(Destroyed))` -> `destroyed`.
fn reason_word(debug: &str) -> String {
    debug
        .split(|c: char| !c.is_ascii_alphanumeric())
        .rfind(|w| !w.is_empty() && *w != "Known")
        .unwrap_or("unknown")
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reason_word_takes_the_innermost_name() {
        assert_eq!(super::reason_word("Shutoff(Known(Destroyed))"), "destroyed");
        assert_eq!(super::reason_word("Running(Known(Booted))"), "booted");
        assert_eq!(super::reason_word("Unknown(7)"), "7");
    }
}
