//! VMs for vpcd: the VM spec, preparing a VM's files (overlays, cloud-init seed), and two
//! backends behind one trait: libvirt (`virt` crate) and QEMU driven directly over QMP (`qapi`).

pub mod accel;
mod backend;
pub mod cloudinit;
mod console;
mod disk;
mod error;
pub mod libvirt;
mod prepare;
pub mod qmp;
pub mod spec;

pub use accel::Accel;
pub use backend::{
    BackendKind, NbdDisk, ResolvedDisk, ResolvedNic, VmBackend, VmConfig, VmEvent, VmState,
    DEFAULT_SHUTDOWN_TIMEOUT, HOTPLUG_PORTS, UNPLUG_TIMEOUT,
};
pub use disk::probe_format;
pub use error::{Error, Result};
pub use libvirt::LibvirtBackend;
pub use prepare::{prepare, prepare_disk, remove_files};
pub use qmp::QmpBackend;
pub use spec::{DiskSpec, HostLimits, VmSpec};
