//! Proxies for `org.vpcd.Host1` and `org.vpcd.Domain1` (see `docs/dbus-api.md`).

use zbus::proxy;
use zbus::zvariant::{OwnedFd, OwnedObjectPath};

/// The well-known name vpcd takes by default.
pub const BUS_NAME: &str = "org.vpcd.Host1";
pub const HOST_PATH: &str = "/org/vpcd/Host1";

#[proxy(interface = "org.vpcd.Host1", default_path = "/org/vpcd/Host1")]
pub trait Host {
    fn define_domain(&self, spec: &str, backend: &str) -> zbus::Result<OwnedObjectPath>;
    fn create_domain(&self, spec: &str, backend: &str) -> zbus::Result<OwnedObjectPath>;
    fn lookup_domain(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn list_domains(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    #[zbus(property)]
    fn instance_id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn default_backend(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn backends(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn accel(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

#[proxy(interface = "org.vpcd.Domain1")]
pub trait Domain {
    fn start(&self) -> zbus::Result<()>;
    fn shutdown(&self, timeout_secs: u32) -> zbus::Result<()>;
    fn destroy(&self) -> zbus::Result<()>;
    fn reboot(&self) -> zbus::Result<()>;
    fn undefine(&self) -> zbus::Result<()>;
    fn open_console(&self, port: u32) -> zbus::Result<OwnedFd>;
    #[zbus(signal)]
    fn lifecycle_event(&self, state: String, reason: String) -> zbus::Result<()>;
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn uuid(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn backend(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn accel(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn vcpus(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "MemoryMiB")]
    fn memory_mib(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn disks(&self) -> zbus::Result<Vec<(String, String)>>;
    #[zbus(property)]
    fn console_log(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn spec(&self) -> zbus::Result<String>;
}

/// Connects to the bus at `address`, or the system bus when empty (`DBUS_SYSTEM_BUS_ADDRESS`
/// is honoured).
pub async fn connect(address: &str) -> zbus::Result<zbus::Connection> {
    if address.is_empty() {
        zbus::Connection::system().await
    } else {
        zbus::connection::Builder::address(address)?.build().await
    }
}

/// The message of a D-Bus error reply, without zbus's wrapping.
pub fn error_message(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, Some(msg), _) => {
            format!(
                "{msg} ({})",
                name.as_str().trim_start_matches("org.vpcd.Error.")
            )
        }
        zbus::Error::MethodError(name, None, _) => name.to_string(),
        zbus::Error::FDO(fdo) => fdo.to_string(),
        other => other.to_string(),
    }
}
