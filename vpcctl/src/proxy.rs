//! Proxies for `org.vpcd.Host1` and `org.vpcd.Domain1` (see `docs/dbus-api.md`).

use zbus::proxy;
use zbus::zvariant::{OwnedFd, OwnedObjectPath};

/// A volume: (name, size, leader node (0: none), health, replicas (node, address), NBD URI,
/// NBD URI over TCP or "").
/// (name, size, leader, health, replicas, NBD URI, TCP URI, attachments (node, domain, disk,
/// read-only)).
pub type VolumeRow = (
    String,
    u64,
    u64,
    String,
    Vec<(u64, String)>,
    String,
    String,
    Vec<(u64, String, String, bool)>,
);

/// The well-known name vpcd takes by default.
pub const BUS_NAME: &str = "org.vpcd.Host1";
pub const HOST_PATH: &str = "/org/vpcd/Host1";

#[proxy(interface = "org.vpcd.Host1", default_path = "/org/vpcd/Host1")]
pub trait Host {
    fn define_domain(&self, spec: &str, backend: &str) -> zbus::Result<OwnedObjectPath>;
    fn create_domain(&self, spec: &str, backend: &str) -> zbus::Result<OwnedObjectPath>;
    fn lookup_domain(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn list_domains(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    fn create_network(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn lookup_network(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn list_networks(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    fn create_router(&self, name: &str, network: &str) -> zbus::Result<OwnedObjectPath>;
    fn lookup_router(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn list_routers(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    fn create_floating_ip(&self, ip: &str) -> zbus::Result<OwnedObjectPath>;
    fn lookup_floating_ip(&self, ip: &str) -> zbus::Result<OwnedObjectPath>;
    fn list_floating_ips(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    fn bgp_sessions(&self) -> zbus::Result<Vec<(String, String, u64, u64)>>;
    fn create_volume(&self, name: &str, size: u64, replicas: u32) -> zbus::Result<VolumeRow>;
    fn resize_volume(&self, name: &str, size: u64) -> zbus::Result<VolumeRow>;
    fn delete_volume(&self, name: &str) -> zbus::Result<()>;
    fn force_delete_volume(&self, name: &str) -> zbus::Result<()>;
    fn list_volumes(&self) -> zbus::Result<Vec<VolumeRow>>;
    fn list_volumes_with_unreachable(&self) -> zbus::Result<(Vec<VolumeRow>, Vec<(u64, String)>)>;
    fn volume_info(&self, name: &str) -> zbus::Result<VolumeRow>;
    fn release_volume(&self, name: &str, node: u64, domain: &str) -> zbus::Result<()>;
    fn add_storage_node(&self, id: u64, address: &str) -> zbus::Result<Vec<(String, u64, u64)>>;
    fn remove_storage_node(&self, id: u64) -> zbus::Result<Vec<(String, u64, u64)>>;
    fn list_storage_nodes(&self) -> zbus::Result<Vec<(u64, String)>>;
    fn evpn_routes(&self) -> zbus::Result<Vec<(String, u32, String, String)>>;
    #[allow(clippy::too_many_arguments)]
    fn create_port(
        &self,
        network: &str,
        subnet: &str,
        netns: &str,
        ifname: &str,
        ip: &str,
        mac: &str,
        port_security: bool,
    ) -> zbus::Result<OwnedObjectPath>;
    fn list_ports(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    fn lookup_port(&self, id: u32) -> zbus::Result<OwnedObjectPath>;
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
    fn attach_disk(&self, disk_toml: &str, target: &str) -> zbus::Result<String>;
    fn detach_disk(&self, target: &str) -> zbus::Result<()>;
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
    /// (interface, network, subnet, MAC, IPv4, port id) per NIC.
    #[zbus(property)]
    fn nics(&self) -> zbus::Result<Vec<(String, String, String, String, String, u32)>>;
}

#[proxy(interface = "org.vpcd.Network1")]
pub trait Network {
    fn delete(&self) -> zbus::Result<()>;
    fn create_subnet(&self, name: &str, cidr: &str, vni: u32, vlan: u16) -> zbus::Result<()>;
    fn delete_subnet(&self, name: &str) -> zbus::Result<()>;
    fn add_remote_mac(&self, subnet: &str, mac: &str, vtep: &str) -> zbus::Result<()>;
    fn remove_remote_mac(&self, subnet: &str, mac: &str) -> zbus::Result<()>;
    /// (subnet, MAC, VTEP) per static remote MAC.
    #[zbus(property)]
    fn remote_macs(&self) -> zbus::Result<Vec<(String, String, String)>>;
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn id(&self) -> zbus::Result<u32>;
    /// (name, CIDR, gateway, VLAN, VNI) per subnet.
    #[zbus(property)]
    fn subnets(&self) -> zbus::Result<Vec<(String, String, String, u16, u32)>>;
}

#[proxy(interface = "org.vpcd.Port1")]
pub trait Port {
    fn delete(&self) -> zbus::Result<()>;
    fn set_port_security(&self, on: bool) -> zbus::Result<()>;
    fn get_counters(&self) -> zbus::Result<std::collections::HashMap<String, u64>>;
    #[zbus(property)]
    fn id(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn network(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn subnet(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn mac(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn ip(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn device(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn kind(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn port_security(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn domain(&self) -> zbus::Result<String>;
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

#[proxy(interface = "org.vpcd.Router1")]
pub trait Router {
    fn delete(&self) -> zbus::Result<()>;
    fn add_subnet(&self, subnet: &str) -> zbus::Result<()>;
    fn remove_subnet(&self, subnet: &str) -> zbus::Result<()>;
    fn set_gateway(&self, ip: &str) -> zbus::Result<String>;
    fn clear_gateway(&self) -> zbus::Result<()>;
    fn add_route(&self, destination: &str, via: &str) -> zbus::Result<()>;
    fn remove_route(&self, destination: &str) -> zbus::Result<()>;
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn network(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn subnets(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn external_address(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn routes(&self) -> zbus::Result<Vec<(String, String)>>;
    #[zbus(property)]
    fn namespace(&self) -> zbus::Result<String>;
}

#[proxy(interface = "org.vpcd.FloatingIp1")]
pub trait FloatingIp {
    fn attach(&self, port: u32) -> zbus::Result<()>;
    fn detach(&self) -> zbus::Result<()>;
    fn delete(&self) -> zbus::Result<()>;
    #[zbus(property)]
    fn address(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn port(&self) -> zbus::Result<u32>;
}

/// A proxy of type `P` for the object at `path` of `bus`, reading properties afresh each time.
pub async fn object<P>(conn: &zbus::Connection, bus: &str, path: OwnedObjectPath) -> zbus::Result<P>
where
    P: From<zbus::Proxy<'static>> + zbus::proxy::Defaults,
{
    zbus::proxy::Builder::<P>::new(conn)
        .destination(bus.to_string())?
        .path(path)?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}
