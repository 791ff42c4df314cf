//! The QMP backend: vpcd spawns and supervises QEMU itself and drives it over QMP (`qapi` crate).
//!
//! Each running VM is one QEMU process in its own process group (so it outlives vpcd), with its
//! QMP socket, serial sockets, pid file and log in the VM's directory. A task per VM reads QMP
//! events: `SHUTDOWN` (QEMU runs with `-no-shutdown`) becomes `quit`, or `system_reset` + `cont`
//! when a reboot was asked for; the end of the QMP stream means QEMU has exited. After a vpcd
//! restart, `attach` finds the QEMU by its pid file and reconnects to its QMP socket.

mod cmdline;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use qapi::qmp;
use tokio::sync::{broadcast, watch};

use crate::backend::{
    BackendKind, ResolvedDisk, VmBackend, VmConfig, VmEvent, VmState, HOTPLUG_PORTS, UNPLUG_TIMEOUT,
};
use crate::error::{Error, Result};

pub use cmdline::{qemu_args, RunPaths, MAX_SOCKET_PATH};

type Service = qapi::futures::QapiService<
    qapi::futures::QmpStreamTokio<tokio::io::WriteHalf<tokio::net::UnixStream>>,
>;

/// How long a new QEMU may take to open its QMP socket.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `quit` may take before the process is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// VMs as QEMU processes that vpcd runs itself.
pub struct QmpBackend {
    qemu: String,
    /// The host's network namespace, entered by QEMU before it runs (its taps live there).
    netns: Option<std::path::PathBuf>,
    vms: Mutex<HashMap<String, Arc<QmpVm>>>,
    events: broadcast::Sender<VmEvent>,
}

impl std::fmt::Debug for QmpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpBackend")
            .field("qemu", &self.qemu)
            .finish_non_exhaustive()
    }
}

struct QmpVm {
    config: VmConfig,
    /// The disks now (attach and detach change them); the next QEMU gets these.
    disks: Mutex<Vec<ResolvedDisk>>,
    paths: RunPaths,
    state: watch::Sender<VmState>,
    session: Mutex<Option<Arc<Service>>>,
    /// A reboot was asked for: the next guest power-off resets instead of quitting.
    reboot_pending: AtomicBool,
    /// Why QEMU is about to exit, when vpcd made it (`destroyed`, `shutdown`).
    exit_reason: Mutex<Option<&'static str>>,
    /// Serializes start, destroy and attach of this VM.
    op: tokio::sync::Mutex<()>,
}

impl QmpVm {
    fn name(&self) -> &str {
        self.config.name()
    }

    fn session(&self) -> Option<Arc<Service>> {
        self.session.lock().unwrap().clone()
    }

    fn qmp_err(&self, op: &'static str) -> impl FnOnce(qapi::ExecuteError) -> Error + '_ {
        move |e| Error::Qmp {
            name: self.name().to_string(),
            op,
            reason: e.to_string(),
        }
    }
}

impl QmpBackend {
    /// `netns`: the namespace QEMU runs in (None: vpcd's own).
    pub fn new(qemu: &str, netns: Option<std::path::PathBuf>) -> Arc<QmpBackend> {
        let (events, _) = broadcast::channel(256);
        Arc::new(QmpBackend {
            qemu: qemu.to_string(),
            netns,
            vms: Mutex::new(HashMap::new()),
            events,
        })
    }

    fn get(&self, name: &str) -> Result<Arc<QmpVm>> {
        self.vms
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }

    fn insert(&self, vm: &VmConfig) -> Result<Arc<QmpVm>> {
        let paths = RunPaths::new(&vm.dir);
        if paths.longest_socket() > MAX_SOCKET_PATH {
            return Err(Error::InvalidSpec(format!(
                "{}: socket paths under {} are longer than {MAX_SOCKET_PATH} bytes",
                vm.name(),
                vm.dir.display()
            )));
        }
        let mut vms = self.vms.lock().unwrap();
        if let Some(existing) = vms.get(vm.name()) {
            if existing.config.uuid != vm.uuid {
                return Err(Error::AlreadyExists(vm.name().to_string()));
            }
            return Ok(existing.clone());
        }
        let entry = Arc::new(QmpVm {
            config: vm.clone(),
            disks: Mutex::new(vm.disks.clone()),
            paths,
            state: watch::Sender::new(VmState::ShutOff),
            session: Mutex::new(None),
            reboot_pending: AtomicBool::new(false),
            exit_reason: Mutex::new(None),
            op: tokio::sync::Mutex::new(()),
        });
        vms.insert(vm.name().to_string(), entry.clone());
        Ok(entry)
    }

    fn set_state(&self, vm: &QmpVm, state: VmState, reason: &str) {
        let changed = vm.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
        if changed {
            tracing::info!(vm = vm.name(), state = %state, reason, "state changed");
            let _ = self.events.send(VmEvent {
                name: vm.name().to_string(),
                state,
                reason: reason.to_string(),
            });
        }
    }

    /// Connects to the VM's QMP socket and starts the task that follows its events.
    async fn connect(self: &Arc<Self>, vm: &Arc<QmpVm>) -> std::io::Result<Arc<Service>> {
        let stream = qapi::futures::QmpStreamTokio::open_uds(&vm.paths.qmp)
            .await?
            .negotiate()
            .await?;
        let (service, mut events) = stream.into_parts();
        let service = Arc::new(service);
        *vm.session.lock().unwrap() = Some(service.clone());
        let this = self.clone();
        let vm = vm.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Ok(qmp::Event::SHUTDOWN { data, .. }) => this.on_guest_shutdown(&vm, data),
                    Ok(qmp::Event::RESET { .. }) => {
                        tracing::debug!(vm = vm.name(), "reset");
                        let _ = this.events.send(VmEvent {
                            name: vm.name().to_string(),
                            state: VmState::Running,
                            reason: "reset".into(),
                        });
                    }
                    Ok(qmp::Event::STOP { .. }) => {
                        if *vm.state.borrow() == VmState::Running {
                            this.set_state(&vm, VmState::Paused, "paused")
                        }
                    }
                    Ok(qmp::Event::RESUME { .. }) => {
                        this.set_state(&vm, VmState::Running, "unpaused")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(vm = vm.name(), "qmp stream: {e}");
                        break;
                    }
                }
            }
            this.on_exit(&vm);
        });
        Ok(service)
    }

    /// QEMU stopped the guest after it powered off (`-no-shutdown`): quit, or reset for a reboot.
    fn on_guest_shutdown(self: &Arc<Self>, vm: &Arc<QmpVm>, data: qmp::SHUTDOWN) {
        let Some(service) = vm.session() else { return };
        let reboot = vm.reboot_pending.swap(false, Ordering::SeqCst);
        tracing::debug!(vm = vm.name(), ?data.reason, reboot, "guest shutdown");
        let this = self.clone();
        let vm = vm.clone();
        tokio::spawn(async move {
            if reboot {
                let reset = service.execute(qmp::system_reset {}).await;
                let cont = service.execute(qmp::cont {}).await;
                if reset.is_ok() && cont.is_ok() {
                    let _ = this.events.send(VmEvent {
                        name: vm.name().to_string(),
                        state: VmState::Running,
                        reason: "rebooted".into(),
                    });
                    return;
                }
            }
            vm.exit_reason.lock().unwrap().get_or_insert("shutdown");
            let _ = service.execute(qmp::quit {}).await;
        });
    }

    /// The QMP stream ended: QEMU has exited.
    fn on_exit(&self, vm: &QmpVm) {
        *vm.session.lock().unwrap() = None;
        vm.reboot_pending.store(false, Ordering::SeqCst);
        let reason = vm.exit_reason.lock().unwrap().take().unwrap_or("crashed");
        remove_run_files(&vm.paths);
        self.set_state(vm, VmState::ShutOff, reason);
    }

    async fn wait_for_state(vm: &QmpVm, want: impl Fn(VmState) -> bool, timeout: Duration) -> bool {
        let mut rx = vm.state.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| want(*s)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn spawn_qemu(self: &Arc<Self>, vm: &Arc<QmpVm>) -> Result<()> {
        let name = vm.name().to_string();
        let spawn_err = |reason: String| Error::Spawn {
            name: name.clone(),
            reason,
        };
        remove_run_files(&vm.paths);
        let log = std::fs::File::create(&vm.paths.log)
            .map_err(|e| spawn_err(format!("create {}: {e}", vm.paths.log.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| spawn_err(format!("log: {e}")))?;
        let mut cmd = tokio::process::Command::new(&self.qemu);
        let netns = match &self.netns {
            Some(ns) => Some(
                std::fs::File::open(ns)
                    .map_err(|e| spawn_err(format!("netns {}: {e}", ns.display())))?,
            ),
            None => None,
        };
        if let Some(file) = &netns {
            let fd = std::os::fd::AsRawFd::as_raw_fd(file);
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // setns(2), which is async-signal-safe, on a descriptor inherited from the parent
            // (`netns` stays open until spawn has returned).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = self.spawn_with(cmd, vm, log, log2, &spawn_err)?;
        drop(netns);
        self.wait_qmp(child, vm, &spawn_err).await
    }

    fn spawn_with(
        &self,
        mut cmd: tokio::process::Command,
        vm: &Arc<QmpVm>,
        log: std::fs::File,
        log2: std::fs::File,
        spawn_err: &(dyn Fn(String) -> Error + Sync),
    ) -> Result<tokio::process::Child> {
        let mut config = vm.config.clone();
        config.disks = vm.disks.lock().unwrap().clone();
        cmd.args(qemu_args(&config, &vm.paths))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: signals meant for vpcd (Ctrl-C, a killed session) do not
            // reach the guest, and QEMU keeps running when vpcd dies.
            .process_group(0)
            .spawn()
            .map_err(|e| spawn_err(format!("{}: {e}", self.qemu)))
    }

    /// Waits for a new QEMU's QMP socket and connects; fails with the end of QEMU's log if it
    /// exits first.
    async fn wait_qmp(
        self: &Arc<Self>,
        mut child: tokio::process::Child,
        vm: &Arc<QmpVm>,
        spawn_err: &(dyn Fn(String) -> Error + Sync),
    ) -> Result<()> {
        let deadline = Instant::now() + SPAWN_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&vm.paths.log).unwrap_or_default();
                return Err(spawn_err(format!(
                    "qemu exited ({status}): {}",
                    log.trim().lines().last().unwrap_or("")
                )));
            }
            if vm.paths.qmp.exists() {
                if let Ok(_service) = self.connect(vm).await {
                    break;
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(spawn_err("QMP socket did not come up".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Reap the process when it exits while this vpcd runs.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }

    async fn quit_or_kill(&self, vm: &Arc<QmpVm>, reason: &'static str) {
        *vm.exit_reason.lock().unwrap() = Some(reason);
        if let Some(service) = vm.session() {
            let _ = tokio::time::timeout(QUIT_TIMEOUT, service.execute(qmp::quit {})).await;
        }
        if QmpBackend::wait_for_state(vm, |s| !s.is_active(), QUIT_TIMEOUT).await {
            return;
        }
        if let Some(pid) = live_pid(&vm.paths.pid, &vm.config) {
            tracing::warn!(vm = vm.name(), pid, "qemu did not quit; killing it");
            // SAFETY: kill(2) with a pid read from our own pid file and checked against the
            // process's command line; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if !QmpBackend::wait_for_state(vm, |s| !s.is_active(), QUIT_TIMEOUT).await {
            self.on_exit(vm);
        }
    }
}

#[async_trait::async_trait]
impl VmBackend for Arc<QmpBackend> {
    fn kind(&self) -> BackendKind {
        BackendKind::Qmp
    }

    async fn define(&self, vm: &VmConfig) -> Result<()> {
        self.insert(vm).map(drop)
    }

    async fn attach(&self, vm: &VmConfig) -> Result<VmState> {
        let entry = self.insert(vm)?;
        let _op = entry.op.lock().await;
        if entry.session().is_some() {
            return Ok(*entry.state.borrow());
        }
        if live_pid(&entry.paths.pid, vm).is_none() {
            remove_run_files(&entry.paths);
            return Ok(VmState::ShutOff);
        }
        let service = match self.connect(&entry).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(vm = vm.name(), "qemu runs but its QMP socket fails: {e}");
                self.set_state(&entry, VmState::Running, "attached");
                return Ok(VmState::Running);
            }
        };
        let status = service
            .execute(qmp::query_status {})
            .await
            .map_err(entry.qmp_err("query-status"))?;
        let state = match status.status {
            qmp::RunState::running => VmState::Running,
            qmp::RunState::shutdown => {
                // The guest powered off while vpcd was away.
                *entry.exit_reason.lock().unwrap() = Some("shutdown");
                let _ = service.execute(qmp::quit {}).await;
                VmState::ShuttingDown
            }
            qmp::RunState::guest_panicked | qmp::RunState::internal_error => VmState::Crashed,
            _ => VmState::Paused,
        };
        if matches!(state, VmState::Running | VmState::Paused) {
            converge_disks(&entry, &service).await;
        }
        self.set_state(&entry, state, "attached");
        Ok(state)
    }

    async fn start(&self, name: &str) -> Result<()> {
        let vm = self.get(name)?;
        let _op = vm.op.lock().await;
        let state = *vm.state.borrow();
        if state.is_active() {
            return Err(Error::InvalidState {
                name: name.to_string(),
                op: "start",
                state: state.to_string(),
            });
        }
        self.spawn_qemu(&vm).await?;
        self.set_state(&vm, VmState::Running, "booted");
        Ok(())
    }

    async fn shutdown(&self, name: &str, timeout: Duration) -> Result<()> {
        let vm = self.get(name)?;
        let Some(service) = vm.session() else {
            return Ok(());
        };
        *vm.exit_reason.lock().unwrap() = Some("shutdown");
        service
            .execute(qmp::system_powerdown {})
            .await
            .map_err(vm.qmp_err("system_powerdown"))?;
        if QmpBackend::wait_for_state(&vm, |s| !s.is_active(), timeout).await {
            Ok(())
        } else {
            vm.exit_reason.lock().unwrap().take();
            Err(Error::ShutdownTimeout {
                name: name.to_string(),
                secs: timeout.as_secs(),
            })
        }
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        let vm = self.get(name)?;
        let _op = vm.op.lock().await;
        if vm.state.borrow().is_active() {
            self.quit_or_kill(&vm, "destroyed").await;
        }
        Ok(())
    }

    async fn reboot(&self, name: &str) -> Result<()> {
        let vm = self.get(name)?;
        let Some(service) = vm.session() else {
            return Err(Error::InvalidState {
                name: name.to_string(),
                op: "reboot",
                state: "shut off".into(),
            });
        };
        vm.reboot_pending.store(true, Ordering::SeqCst);
        service
            .execute(qmp::system_powerdown {})
            .await
            .map_err(vm.qmp_err("system_powerdown"))?;
        Ok(())
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        let Ok(vm) = self.get(name) else {
            return Ok(());
        };
        let state = *vm.state.borrow();
        if state.is_active() {
            return Err(Error::InvalidState {
                name: name.to_string(),
                op: "undefine",
                state: state.to_string(),
            });
        }
        self.vms.lock().unwrap().remove(name);
        Ok(())
    }

    async fn state(&self, name: &str) -> Result<VmState> {
        Ok(*self.get(name)?.state.borrow())
    }

    async fn open_console(&self, name: &str, port: u32) -> Result<OwnedFd> {
        let vm = self.get(name)?;
        let err = |reason: String| Error::Console {
            name: name.to_string(),
            dev: format!("serial{port}"),
            reason,
        };
        let path = vm
            .paths
            .serial
            .get(port as usize)
            .ok_or_else(|| err("no such serial port".into()))?;
        if !vm.state.borrow().is_active() {
            return Err(err("the domain is not running".into()));
        }
        let stream = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| err(format!("connect {}: {e}", path.display())))?;
        Ok(stream.into())
    }

    fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.events.subscribe()
    }

    async fn attach_disk(&self, vm: &VmConfig, disk: &ResolvedDisk) -> Result<()> {
        let entry = self.get(vm.name())?;
        let _op = entry.op.lock().await;
        let active = entry.state.borrow().is_active();
        if let (Some(service), true) = (entry.session(), active) {
            plug(&entry, &service, disk).await?;
        }
        *entry.disks.lock().unwrap() = vm.disks.clone();
        Ok(())
    }

    async fn detach_disk(&self, vm: &VmConfig, disk: &ResolvedDisk) -> Result<()> {
        let entry = self.get(vm.name())?;
        let _op = entry.op.lock().await;
        *entry.disks.lock().unwrap() = vm.disks.clone();
        let active = entry.state.borrow().is_active();
        if let (Some(service), true) = (entry.session(), active) {
            unplug(&entry, &service, &disk.target).await?;
        }
        Ok(())
    }
}

/// The ids of the devices QEMU has (`/machine/peripheral`).
async fn devices(vm: &QmpVm, service: &Service) -> Result<Vec<String>> {
    let props = service
        .execute(qmp::qom_list {
            path: "/machine/peripheral".into(),
        })
        .await
        .map_err(vm.qmp_err("qom-list"))?;
    Ok(props.into_iter().map(|p| p.name).collect())
}

/// Hot-plugs `disk` into a running QEMU: its block nodes, then a virtio-blk device on a free
/// root port. Undone as far as it got if a step fails.
async fn plug(vm: &QmpVm, service: &Service, disk: &ResolvedDisk) -> Result<()> {
    let (file, format) = cmdline::disk_nodes(disk);
    let add = |node: serde_json::Value| {
        let opts: std::result::Result<qmp::BlockdevOptions, _> = serde_json::from_value(node);
        opts.map(qmp::blockdev_add)
    };
    let bad = |e: serde_json::Error| Error::Qmp {
        name: vm.name().to_string(),
        op: "blockdev-add",
        reason: e.to_string(),
    };
    let del = |node: String| async move {
        let _ = service.execute(qmp::blockdev_del { node_name: node }).await;
    };
    let file_node = format!("{}-file", disk.target);
    // Nodes left behind by a device removed without vpcd (device_del leaves them).
    del(disk.target.clone()).await;
    del(file_node.clone()).await;
    service
        .execute(add(file).map_err(bad)?)
        .await
        .map_err(vm.qmp_err("blockdev-add"))?;
    if let Err(e) = service.execute(add(format).map_err(bad)?).await {
        del(file_node).await;
        return Err(vm.qmp_err("blockdev-add")(e));
    }
    // A root port with nothing behind it.
    let pci = service
        .execute(qmp::query_pci {})
        .await
        .map_err(vm.qmp_err("query-pci"))?;
    let port = pci
        .iter()
        .flat_map(|bus| &bus.devices)
        .filter(|d| d.qdev_id.starts_with("hp"))
        .find(|d| {
            d.pci_bridge
                .as_ref()
                .is_some_and(|b| b.devices.as_ref().is_none_or(|v| v.is_empty()))
        })
        .map(|d| d.qdev_id.clone());
    let Some(port) = port else {
        del(disk.target.clone()).await;
        del(file_node).await;
        return Err(Error::Qmp {
            name: vm.name().to_string(),
            op: "device_add",
            reason: format!("all {HOTPLUG_PORTS} hot-plug ports are taken"),
        });
    };
    let device = cmdline::disk_device(disk);
    let mut fields = device.split(',');
    let driver = fields.next().expect("a driver").to_string();
    let mut arguments = serde_json::Map::new();
    for f in fields {
        let (k, v) = f.split_once('=').expect("key=value");
        if k != "id" {
            arguments.insert(k.into(), serde_json::Value::String(v.into()));
        }
    }
    let added = service
        .execute(qmp::device_add {
            bus: Some(port),
            id: Some(disk.target.clone()),
            driver,
            arguments,
        })
        .await;
    if let Err(e) = added {
        del(disk.target.clone()).await;
        del(file_node).await;
        return Err(vm.qmp_err("device_add")(e));
    }
    tracing::info!(vm = vm.name(), disk = %disk.target, "disk hot-plugged");
    Ok(())
}

/// Unplugs disk `target` from a running QEMU: the device (once the guest has let it go), then
/// its block nodes.
async fn unplug(vm: &QmpVm, service: &Service, target: &str) -> Result<()> {
    if devices(vm, service).await?.iter().any(|d| d == target) {
        service
            .execute(qmp::device_del {
                id: target.to_string(),
            })
            .await
            .map_err(vm.qmp_err("device_del"))?;
        let deadline = Instant::now() + UNPLUG_TIMEOUT;
        while devices(vm, service).await?.iter().any(|d| d == target) {
            if Instant::now() > deadline {
                return Err(Error::UnplugTimeout {
                    name: vm.name().to_string(),
                    target: target.to_string(),
                    secs: UNPLUG_TIMEOUT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The nodes go with the device only if QEMU made them; these were added by name.
    for node in [target.to_string(), format!("{target}-file")] {
        let _ = service.execute(qmp::blockdev_del { node_name: node }).await;
    }
    tracing::info!(vm = vm.name(), disk = %target, "disk unplugged");
    Ok(())
}

/// Brings a running QEMU's disks in line with the VM's (after vpcd was away while a disk was
/// attached or detached, or a device was removed behind its back): missing ones are plugged,
/// extra ones unplugged in the background (the guest takes seconds to let go).
async fn converge_disks(vm: &Arc<QmpVm>, service: &Arc<Service>) {
    let want = vm.disks.lock().unwrap().clone();
    let live: Vec<String> = match devices(vm, service).await {
        Ok(d) => d.into_iter().filter(|d| is_disk_target(d)).collect(),
        Err(e) => {
            tracing::warn!(vm = vm.name(), "disks not checked: {e}");
            return;
        }
    };
    for disk in want.iter().filter(|d| !live.contains(&d.target)) {
        match plug(vm, service, disk).await {
            Ok(()) => tracing::info!(vm = vm.name(), disk = %disk.target, "missing disk plugged"),
            Err(e) => tracing::warn!(vm = vm.name(), disk = %disk.target, "missing disk: {e}"),
        }
    }
    for target in live
        .into_iter()
        .filter(|t| !want.iter().any(|d| &d.target == t))
    {
        let (vm, service) = (vm.clone(), service.clone());
        tokio::spawn(async move {
            if let Err(e) = unplug(&vm, &service, &target).await {
                tracing::warn!(vm = vm.name(), disk = %target, "extra disk: {e}");
            }
        });
    }
}

/// `vda` .. `vdz`: the ids vpcd gives disk devices.
fn is_disk_target(id: &str) -> bool {
    id.len() == 3 && id.starts_with("vd") && id.as_bytes()[2].is_ascii_lowercase()
}

/// The pid in `pid_file` if that process is alive and is this VM's QEMU (its command line
/// carries the VM's UUID), so a recycled pid is never mistaken for it.
fn live_pid(pid_file: &Path, vm: &VmConfig) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit(')').next()?.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let uuid = vm.uuid.to_string();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == uuid.as_bytes())
        .then_some(pid)
}

fn remove_run_files(paths: &RunPaths) {
    for p in [&paths.qmp, &paths.pid, &paths.serial[0], &paths.serial[1]] {
        let _ = std::fs::remove_file(p);
    }
}
