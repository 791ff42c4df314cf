//! The seam between vpcd and a hypervisor: one trait, two implementations (libvirt, QMP).

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::accel::Accel;
use crate::error::Result;
use crate::spec::{DiskFormat, VmSpec};

/// Which backend runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Libvirt,
    Qmp,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Libvirt => "libvirt",
            BackendKind::Qmp => "qmp",
        })
    }
}

/// The state of a VM, with virsh's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Running,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "in shutdown",
            VmState::ShutOff => "shut off",
            VmState::Crashed => "crashed",
        }
    }

    /// Whether the VM has a live QEMU process.
    pub fn is_active(self) -> bool {
        !matches!(self, VmState::ShutOff | VmState::Crashed)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state change of one VM, whoever caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    pub name: String,
    pub state: VmState,
    /// Why, in a few words: `booted`, `shutdown`, `destroyed`, `guest poweroff`, `reset`...
    pub reason: String,
}

/// A disk as the backend attaches it: a file, its format, its guest device name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedDisk {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub readonly: bool,
    /// `vda`, `vdb`, ...
    pub target: String,
    /// Whether the VM owns the file (an overlay or a blank disk), so undefine removes it.
    pub owned: bool,
    /// A disk served over NBD instead of a file (`path` is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdDisk>,
}

/// An NBD export on a unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdDisk {
    pub socket: PathBuf,
    pub export: String,
    /// Which volume of that name it is (the storage cluster's id; 0: not known), so that one
    /// deleted and made again under the name is not taken for it.
    #[serde(default)]
    pub volume_id: u64,
}

/// A NIC as the backend attaches it: the tap the network layer made, and the guest's MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedNic {
    pub tap: String,
    pub mac: String,
}

/// A VM ready for a backend: the spec plus everything resolved on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub spec: VmSpec,
    pub uuid: uuid::Uuid,
    /// `<state>/vms/<name>`: overlays, seed, console log, QMP sockets.
    pub dir: PathBuf,
    pub disks: Vec<ResolvedDisk>,
    /// NICs, in spec order (filled in by vpcd from the ports it made).
    #[serde(default)]
    pub nics: Vec<ResolvedNic>,
    /// The cloud-init seed ISO, if the spec asks for cloud-init.
    pub seed: Option<PathBuf>,
    pub console_log: PathBuf,
    pub accel: Accel,
}

impl VmConfig {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// What every VM backend does. All operations are idempotent where that makes sense: defining
/// an already defined VM with the same UUID and undefining an unknown VM both succeed.
#[async_trait::async_trait]
pub trait VmBackend: Send + Sync + fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// Makes the VM known to the hypervisor, not running.
    async fn define(&self, vm: &VmConfig) -> Result<()>;

    /// Takes over a VM defined before vpcd (re)started and reports its true state.
    async fn attach(&self, vm: &VmConfig) -> Result<VmState>;

    async fn start(&self, name: &str) -> Result<()>;

    /// Asks the guest to power off (ACPI) and waits until it has, at most `timeout`.
    async fn shutdown(&self, name: &str, timeout: Duration) -> Result<()>;

    /// Stops the VM at once.
    async fn destroy(&self, name: &str) -> Result<()>;

    /// Asks the guest to reboot (ACPI power-off, then a fresh start of the same process).
    async fn reboot(&self, name: &str) -> Result<()>;

    /// Forgets the VM; it must be shut off.
    async fn undefine(&self, name: &str) -> Result<()>;

    async fn state(&self, name: &str) -> Result<VmState>;

    /// Opens serial port `port` (0 is the console) as a byte stream.
    async fn open_console(&self, name: &str, port: u32) -> Result<OwnedFd>;

    /// Adds `disk` to the VM: plugged into the running guest if it runs (a free PCIe root
    /// port), and to its definition. `vm` is the VM's config with the disk.
    async fn attach_disk(&self, vm: &VmConfig, disk: &ResolvedDisk) -> Result<()>;

    /// Removes `disk` from the VM: unplugged from the running guest, waiting until the guest
    /// has let it go (at most [`UNPLUG_TIMEOUT`]), and from its definition. `vm` is the VM's
    /// config without the disk.
    async fn detach_disk(&self, vm: &VmConfig, disk: &ResolvedDisk) -> Result<()>;

    /// State changes of every VM this backend knows, including those made behind vpcd's back.
    fn subscribe(&self) -> broadcast::Receiver<VmEvent>;
}

/// How long QEMU waits for a volume's NBD server (this host's storage node, in vpcd) to come
/// back before a request fails: vpcd restarting does not break the guests' volumes.
pub const NBD_RECONNECT_SECS: u32 = 60;

/// Empty PCIe root ports each VM gets, so that disks can be hot-plugged (q35 has no other
/// hot-pluggable slot).
pub const HOTPLUG_PORTS: usize = 4;

/// How long a detach waits for the guest to release a device (a Linux guest's pciehp waits
/// 5 s after the attention button before it powers the slot off).
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a graceful shutdown may take unless the caller says otherwise.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
