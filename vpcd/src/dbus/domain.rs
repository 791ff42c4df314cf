//! `org.vpcd.Domain1` at `/org/vpcd/Host1/domain/<name>`: one VM.

use std::sync::Arc;
use std::time::Duration;

use zbus::interface;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedFd;

use super::error::ApiError;
use crate::manager::{Manager, VmInfo};

#[derive(Debug)]
pub struct DomainIface {
    pub(super) manager: Arc<Manager>,
    pub(super) info: VmInfo,
}

#[interface(name = "org.vpcd.Domain1")]
impl DomainIface {
    async fn start(&self) -> Result<(), ApiError> {
        Ok(self.manager.start(&self.info.name).await?)
    }

    /// ACPI power-off; waits until the guest is off, at most `timeout_secs` (0: the default).
    async fn shutdown(&self, timeout_secs: u32) -> Result<(), ApiError> {
        let timeout = (timeout_secs > 0).then(|| Duration::from_secs(timeout_secs.into()));
        Ok(self.manager.shutdown(&self.info.name, timeout).await?)
    }

    async fn destroy(&self) -> Result<(), ApiError> {
        Ok(self.manager.destroy(&self.info.name).await?)
    }

    async fn reboot(&self) -> Result<(), ApiError> {
        Ok(self.manager.reboot(&self.info.name).await?)
    }

    async fn undefine(&self) -> Result<(), ApiError> {
        Ok(self.manager.undefine(&self.info.name).await?)
    }

    /// Adds a disk (`disk_toml`: the keys of one `[[disks]]` table, e.g. `volume = "data"`),
    /// hot-plugged if the domain runs; `target` "" picks the first free `vdX`. Returns the
    /// target.
    async fn attach_disk(&self, disk_toml: &str, target: &str) -> Result<String, ApiError> {
        let target = (!target.is_empty()).then_some(target);
        Ok(self
            .manager
            .attach_disk(&self.info.name, disk_toml, target)
            .await?)
    }

    /// Removes disk `target` (unplugged once the guest lets it go).
    async fn detach_disk(&self, target: &str) -> Result<(), ApiError> {
        Ok(self.manager.detach_disk(&self.info.name, target).await?)
    }

    /// A byte stream to serial port `port` (0: the console, 1: the guest command channel).
    async fn open_console(&self, port: u32) -> Result<OwnedFd, ApiError> {
        let fd = self.manager.open_console(&self.info.name, port).await?;
        Ok(OwnedFd::from(fd))
    }

    /// A state change: new state and why (`booted`, `shutdown`, `destroyed`, `reset`...).
    #[zbus(signal)]
    pub async fn lifecycle_event(
        emitter: &SignalEmitter<'_>,
        state: &str,
        reason: &str,
    ) -> zbus::Result<()>;

    #[zbus(property)]
    fn name(&self) -> String {
        self.info.name.clone()
    }

    #[zbus(property)]
    fn uuid(&self) -> String {
        self.info.uuid.clone()
    }

    /// virsh's state names: running, paused, in shutdown, shut off, crashed.
    #[zbus(property)]
    fn state(&self) -> String {
        self.info.state.as_str().to_string()
    }

    #[zbus(property)]
    fn backend(&self) -> String {
        self.info.backend.to_string()
    }

    #[zbus(property)]
    fn accel(&self) -> String {
        self.info.accel.as_str().to_string()
    }

    #[zbus(property)]
    fn vcpus(&self) -> u32 {
        self.info.vcpus
    }

    #[zbus(property, name = "MemoryMiB")]
    fn memory_mib(&self) -> u64 {
        self.info.memory_mib
    }

    /// (target, source) per disk.
    #[zbus(property)]
    fn disks(&self) -> Vec<(String, String)> {
        self.info.disks.clone()
    }

    /// (interface, network, subnet, MAC, IPv4, port id) per NIC.
    #[zbus(property)]
    fn nics(&self) -> Vec<(String, String, String, String, String, u32)> {
        self.info
            .nics
            .iter()
            .map(|n| {
                (
                    n.tap.clone(),
                    n.network.clone(),
                    n.subnet.clone(),
                    n.mac.clone(),
                    n.ip.clone(),
                    n.port,
                )
            })
            .collect()
    }

    #[zbus(property)]
    fn console_log(&self) -> String {
        self.info.console_log.clone()
    }

    /// The spec the domain was defined from, as TOML.
    #[zbus(property)]
    fn spec(&self) -> String {
        self.info.spec_toml.clone()
    }
}
