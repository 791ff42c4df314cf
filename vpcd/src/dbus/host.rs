//! `org.vpcd.Host1` at `/org/vpcd/Host1`: defining and finding domains.

use std::sync::Arc;

use hypervisor::BackendKind;
use zbus::interface;
use zbus::zvariant::OwnedObjectPath;

use super::error::ApiError;
use super::path::domain_path;
use crate::manager::Manager;

#[derive(Debug)]
pub struct HostIface {
    pub(super) manager: Arc<Manager>,
}

fn parse_backend(s: &str) -> Result<Option<BackendKind>, ApiError> {
    match s {
        "" => Ok(None),
        "libvirt" => Ok(Some(BackendKind::Libvirt)),
        "qmp" => Ok(Some(BackendKind::Qmp)),
        other => Err(ApiError::InvalidArgument(format!(
            "unknown backend {other:?} (libvirt, qmp, or empty for the default)"
        ))),
    }
}

fn object_path(name: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(domain_path(name)).expect("escaped names are valid paths")
}

#[interface(name = "org.vpcd.Host1")]
impl HostIface {
    /// Defines a domain from a TOML spec; `backend` is "libvirt", "qmp" or "" for the default.
    async fn define_domain(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        spec: &str,
        backend: &str,
    ) -> Result<OwnedObjectPath, ApiError> {
        let info = self.manager.define(spec, parse_backend(backend)?).await?;
        // Exported before the reply, so the caller can use the path at once.
        super::add_domain(conn, &self.manager, &info.name).await;
        Ok(object_path(&info.name))
    }

    /// Defines and starts a domain; nothing is left defined if it cannot start.
    async fn create_domain(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        spec: &str,
        backend: &str,
    ) -> Result<OwnedObjectPath, ApiError> {
        let info = self.manager.create(spec, parse_backend(backend)?).await?;
        super::add_domain(conn, &self.manager, &info.name).await;
        Ok(object_path(&info.name))
    }

    /// The object path of a domain by name.
    async fn lookup_domain(&self, name: &str) -> Result<OwnedObjectPath, ApiError> {
        // (One an undefine failed midway on is found too: its undefine carries on.)
        if !self.manager.half_undefined(name)? {
            self.manager.info(name).await?;
        }
        Ok(object_path(name))
    }

    async fn list_domains(&self) -> Result<Vec<OwnedObjectPath>, ApiError> {
        Ok(self
            .manager
            .list()?
            .iter()
            .map(|i| object_path(&i.name))
            .collect())
    }

    /// Creates a router for network `network` (one per network).
    async fn create_router(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        name: &str,
        network: &str,
    ) -> Result<OwnedObjectPath, ApiError> {
        self.manager.net()?.create_router(name, network).await?;
        super::sync_net_objects(conn, &self.manager).await;
        Ok(super::router::router_object(name))
    }

    async fn lookup_router(&self, name: &str) -> Result<OwnedObjectPath, ApiError> {
        self.manager.net()?.state()?.router(name)?;
        Ok(super::router::router_object(name))
    }

    async fn list_routers(&self) -> Result<Vec<OwnedObjectPath>, ApiError> {
        let st = self.manager.net()?.state()?;
        Ok(st
            .routers
            .keys()
            .map(|n| super::router::router_object(n))
            .collect())
    }

    /// Allocates a floating IP from the external pool: `ip`, or the next free one if "".
    async fn create_floating_ip(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        ip: &str,
    ) -> Result<OwnedObjectPath, ApiError> {
        let ip = super::router::parse_ip("floating IP", ip)?;
        let f = self.manager.net()?.create_floating_ip(ip).await?;
        super::sync_net_objects(conn, &self.manager).await;
        Ok(super::router::floating_ip_object(f.ip))
    }

    async fn lookup_floating_ip(&self, ip: &str) -> Result<OwnedObjectPath, ApiError> {
        let ip = super::router::parse_ip("floating IP", ip)?
            .ok_or_else(|| ApiError::InvalidArgument("floating IP: an address is needed".into()))?;
        self.manager.net()?.state()?.floating_ip(ip)?;
        Ok(super::router::floating_ip_object(ip))
    }

    async fn list_floating_ips(&self) -> Result<Vec<OwnedObjectPath>, ApiError> {
        let st = self.manager.net()?.state()?;
        Ok(st
            .floating_ips
            .iter()
            .map(|f| super::router::floating_ip_object(f.ip))
            .collect())
    }

    /// Creates a replicated volume of `size` bytes with `replicas` replicas (0: 3, or as many
    /// storage nodes as there are).
    async fn create_volume(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        name: &str,
        size: u64,
        replicas: u32,
    ) -> Result<VolumeRow, ApiError> {
        let v = self.manager.storage()?.create(name, size, replicas).await?;
        super::volume::export_volume(conn, &self.manager, v.clone()).await;
        Ok(row(v))
    }

    /// Grows a volume to `size` bytes.
    async fn resize_volume(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        name: &str,
        size: u64,
    ) -> Result<VolumeRow, ApiError> {
        let v = self.manager.storage()?.resize(name, size).await?;
        super::volume::export_volume(conn, &self.manager, v.clone()).await;
        Ok(row(v))
    }

    /// Deletes a volume on all its nodes: refused while a domain (of any host) has it as a
    /// disk, and while no leader of the volume answers to tell (`ForceDeleteVolume` then).
    async fn delete_volume(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        name: &str,
    ) -> Result<(), ApiError> {
        super::volume::delete(conn, &self.manager, name, false).await
    }

    /// `DeleteVolume`, also when whether a domain has the volume cannot be told (its group
    /// has no leader: a volume whose replicas are mostly gone).
    async fn force_delete_volume(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        name: &str,
    ) -> Result<(), ApiError> {
        super::volume::delete(conn, &self.manager, name, true).await
    }

    /// The object of a volume of the storage cluster (there once this answers, also for a
    /// volume made through another host a moment ago).
    async fn lookup_volume(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        name: &str,
    ) -> Result<OwnedObjectPath, ApiError> {
        let v = self.manager.storage()?.info(name).await?;
        super::volume::export_volume(conn, &self.manager, v).await;
        Ok(super::volume::volume_object(name))
    }

    /// The volumes of the storage cluster: (name, size, leader node (0: none), health, members
    /// (id, address), NBD URI on this host, NBD URI over TCP or "").
    async fn list_volumes(&self) -> Result<Vec<VolumeRow>, ApiError> {
        Ok(self
            .manager
            .storage()?
            .list()
            .await?
            .into_iter()
            .map(row)
            .collect())
    }

    /// `ListVolumes`, and the storage nodes that did not answer, (id, address): the volumes
    /// only they hold are not in the list.
    async fn list_volumes_with_unreachable(
        &self,
    ) -> Result<(Vec<VolumeRow>, Vec<(u64, String)>), ApiError> {
        let (volumes, unreachable) = self.manager.storage()?.list_all().await;
        Ok((volumes.into_iter().map(row).collect(), unreachable))
    }

    /// Adds storage node `id` at `address` to the cluster; replicas move onto it. Returns the
    /// moves: (volume, from node, to node).
    async fn add_storage_node(
        &self,
        id: u64,
        address: &str,
    ) -> Result<Vec<(String, u64, u64)>, ApiError> {
        Ok(self.manager.storage()?.add_node(id, address).await?)
    }

    /// Removes storage node `id` (alive or dead) after moving its replicas elsewhere.
    async fn remove_storage_node(&self, id: u64) -> Result<Vec<(String, u64, u64)>, ApiError> {
        Ok(self.manager.storage()?.remove_node(id).await?)
    }

    /// The storage nodes of the cluster: (id, RPC address).
    async fn list_storage_nodes(&self) -> Result<Vec<(u64, String)>, ApiError> {
        Ok(self.manager.storage()?.nodes())
    }

    /// Forgets that domain `domain` on storage node `node` has volume `name` as a disk: for a
    /// host that is gone (its domains' volumes stay attached to them until then). A domain of
    /// this host that has the volume keeps it. Node 0: this host's.
    async fn release_volume(&self, name: &str, node: u64, domain: &str) -> Result<(), ApiError> {
        Ok(self.manager.release_volume(name, node, domain).await?)
    }

    /// One volume, as in `ListVolumes`.
    async fn volume_info(&self, name: &str) -> Result<VolumeRow, ApiError> {
        Ok(row(self.manager.storage()?.info(name).await?))
    }

    /// EVPN sessions: (peer, state, established since (Unix seconds, 0 if not), routes
    /// received). Empty without EVPN.
    async fn bgp_sessions(&self) -> Result<Vec<(String, String, u64, u64)>, ApiError> {
        Ok(self
            .manager
            .net()?
            .evpn()
            .map(|e| e.status())
            .unwrap_or_default())
    }

    /// EVPN routes: (direction "in"/"out", VNI, route, VTEP); VNI and VTEP of routes out are
    /// this host's.
    async fn evpn_routes(&self) -> Result<Vec<(String, u32, String, String)>, ApiError> {
        Ok(self
            .manager
            .net()?
            .evpn()
            .map(|e| e.routes())
            .unwrap_or_default())
    }

    /// Creates a tenant network (VPC).
    async fn create_network(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        name: &str,
    ) -> Result<OwnedObjectPath, ApiError> {
        self.manager.net()?.create_network(name).await?;
        super::sync_net_objects(conn, &self.manager).await;
        Ok(super::network::network_object(name))
    }

    async fn lookup_network(&self, name: &str) -> Result<OwnedObjectPath, ApiError> {
        self.manager.net()?.state()?.network(name)?;
        Ok(super::network::network_object(name))
    }

    async fn list_networks(&self) -> Result<Vec<OwnedObjectPath>, ApiError> {
        let st = self.manager.net()?.state()?;
        Ok(st
            .networks
            .keys()
            .map(|n| super::network::network_object(n))
            .collect())
    }

    /// Creates a port for a network namespace: a veth whose other end becomes `ifname` in
    /// `netns` (a path such as /run/netns/NAME) with the port's MAC and address. Empty `ip` and
    /// `mac` pick them.
    #[allow(clippy::too_many_arguments)]
    async fn create_port(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        network: &str,
        subnet: &str,
        netns: &str,
        ifname: &str,
        ip: &str,
        mac: &str,
        port_security: bool,
    ) -> Result<OwnedObjectPath, ApiError> {
        let req = crate::network::state::PortRequest {
            network: network.to_string(),
            subnet: subnet.to_string(),
            device: Some(crate::network::state::PortDevice::Veth {
                netns: netns.into(),
                ifname: if ifname.is_empty() { "eth0" } else { ifname }.to_string(),
            }),
            mac: if mac.is_empty() {
                None
            } else {
                Some(
                    mac.parse()
                        .map_err(|e: netdrv::Error| ApiError::InvalidArgument(e.to_string()))?,
                )
            },
            ip: if ip.is_empty() {
                None
            } else {
                Some(ip.parse().map_err(|_| {
                    ApiError::InvalidArgument(format!("{ip:?} is not an IPv4 address"))
                })?)
            },
            port_security: Some(port_security),
            allowed_pairs: Vec::new(),
            vm: None,
        };
        let port = self.manager.net()?.create_port(&req).await?;
        super::sync_net_objects(conn, &self.manager).await;
        Ok(super::network::port_object(port.id))
    }

    async fn list_ports(&self) -> Result<Vec<OwnedObjectPath>, ApiError> {
        let st = self.manager.net()?.state()?;
        Ok(st
            .ports
            .keys()
            .map(|id| super::network::port_object(*id))
            .collect())
    }

    async fn lookup_port(&self, id: u32) -> Result<OwnedObjectPath, ApiError> {
        let st = self.manager.net()?.state()?;
        if !st.ports.contains_key(&id) {
            return Err(ApiError::NotFound(format!("port {id} not found")));
        }
        Ok(super::network::port_object(id))
    }

    #[zbus(property)]
    fn instance_id(&self) -> String {
        self.manager.host().instance_id.clone()
    }

    #[zbus(property)]
    fn default_backend(&self) -> String {
        self.manager.host().default_backend.to_string()
    }

    #[zbus(property)]
    fn backends(&self) -> Vec<String> {
        self.manager
            .host()
            .backends
            .iter()
            .map(|b| b.to_string())
            .collect()
    }

    #[zbus(property)]
    fn accel(&self) -> String {
        self.manager.host().accel.as_str().to_string()
    }

    #[zbus(property)]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }
}

/// A volume on the wire: (name, size, leader, health, members (id, address), NBD URI, NBD URI
/// over TCP or "", attachments (node, domain, disk, read-only)).
type VolumeRow = (
    String,
    u64,
    u64,
    String,
    Vec<(u64, String)>,
    String,
    String,
    Vec<(u64, String, String, bool)>,
);

fn row(v: crate::storage::VolumeInfo) -> VolumeRow {
    let users = v
        .attachments
        .into_iter()
        .map(|a| (a.node, a.domain, a.disk, a.readonly))
        .collect();
    (
        v.name, v.size, v.leader, v.health, v.members, v.uri, v.tcp_uri, users,
    )
}
