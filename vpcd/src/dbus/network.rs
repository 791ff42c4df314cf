//! `org.vpcd.Network1` at `/org/vpcd/Host1/network/<name>` (a tenant) and `org.vpcd.Port1` at
//! `/org/vpcd/Host1/port/<id>`. Properties are read from the store on each call.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::interface;
use zbus::zvariant::OwnedObjectPath;

use super::error::ApiError;
use super::path::{network_path, port_path};
use crate::manager::Manager;
use crate::network::state::{Network, Port, PortDevice};

/// (name, CIDR, gateway, VLAN, VNI): a subnet on D-Bus.
type SubnetTuple = (String, String, String, u16, u32);

#[derive(Debug)]
pub struct NetworkIface {
    pub(super) manager: Arc<Manager>,
    pub(super) name: String,
}

impl NetworkIface {
    fn network(&self) -> Result<Network, ApiError> {
        let st = self.manager.net()?.state()?;
        Ok(st.network(&self.name)?.clone())
    }
}

#[interface(name = "org.vpcd.Network1")]
impl NetworkIface {
    /// Removes the network; it must have no ports.
    async fn delete(&self, #[zbus(connection)] conn: &zbus::Connection) -> Result<(), ApiError> {
        self.manager.net()?.delete_network(&self.name).await?;
        super::sync_net_objects(conn, &self.manager).await;
        Ok(())
    }

    /// Adds a subnet. `vni` 0 and `vlan` 0 pick free ones.
    async fn create_subnet(
        &self,
        name: &str,
        cidr: &str,
        vni: u32,
        vlan: u16,
    ) -> Result<(), ApiError> {
        self.manager
            .net()?
            .create_subnet(
                &self.name,
                name,
                cidr,
                (vni != 0).then_some(vni),
                (vlan != 0).then_some(vlan),
            )
            .await?;
        Ok(())
    }

    async fn delete_subnet(&self, name: &str) -> Result<(), ApiError> {
        self.manager.net()?.delete_subnet(&self.name, name).await?;
        Ok(())
    }

    /// Installs a static FDB entry: `mac` on `subnet` lives behind the VTEP `vtep`.
    async fn add_remote_mac(&self, subnet: &str, mac: &str, vtep: &str) -> Result<(), ApiError> {
        let mac = mac
            .parse()
            .map_err(|e: netdrv::Error| ApiError::InvalidArgument(e.to_string()))?;
        let vtep = vtep
            .parse()
            .map_err(|_| ApiError::InvalidArgument(format!("{vtep:?} is not an IPv4 address")))?;
        self.manager
            .net()?
            .add_remote_mac(&self.name, subnet, mac, vtep)
            .await?;
        Ok(())
    }

    async fn remove_remote_mac(&self, subnet: &str, mac: &str) -> Result<(), ApiError> {
        let mac = mac
            .parse()
            .map_err(|e: netdrv::Error| ApiError::InvalidArgument(e.to_string()))?;
        self.manager
            .net()?
            .remove_remote_mac(&self.name, subnet, mac)
            .await?;
        Ok(())
    }

    /// (subnet, MAC, VTEP) per static remote MAC.
    #[zbus(property)]
    fn remote_macs(&self) -> Result<Vec<(String, String, String)>, zbus::fdo::Error> {
        let st = self
            .manager
            .net()
            .and_then(|n| n.state())
            .map_err(|e| fdo(e.into()))?;
        Ok(st
            .remote_macs
            .iter()
            .filter(|r| r.network == self.name)
            .map(|r| (r.subnet.clone(), r.mac.to_string(), r.vtep.to_string()))
            .collect())
    }

    #[zbus(property)]
    fn name(&self) -> String {
        self.name.clone()
    }

    #[zbus(property)]
    fn id(&self) -> Result<u32, zbus::fdo::Error> {
        Ok(self.network().map_err(fdo)?.id)
    }

    /// (name, CIDR, gateway, VLAN, VNI) per subnet.
    #[zbus(property)]
    fn subnets(&self) -> Result<Vec<SubnetTuple>, zbus::fdo::Error> {
        Ok(self
            .network()
            .map_err(fdo)?
            .subnets
            .values()
            .map(|s| {
                (
                    s.name.clone(),
                    s.cidr.to_string(),
                    s.cidr.gateway().to_string(),
                    s.vlan,
                    s.vni,
                )
            })
            .collect())
    }
}

#[derive(Debug)]
pub struct PortIface {
    pub(super) manager: Arc<Manager>,
    pub(super) id: u32,
}

impl PortIface {
    fn port(&self) -> Result<Port, zbus::fdo::Error> {
        let net = self.manager.net().map_err(|e| fdo(e.into()))?;
        let st = net.state().map_err(|e| fdo(e.into()))?;
        st.ports
            .get(&self.id)
            .cloned()
            .ok_or_else(|| zbus::fdo::Error::UnknownObject(format!("port {}", self.id)))
    }
}

pub(super) fn fdo(e: ApiError) -> zbus::fdo::Error {
    zbus::fdo::Error::Failed(format!("{e:?}"))
}

#[interface(name = "org.vpcd.Port1")]
impl PortIface {
    async fn delete(&self, #[zbus(connection)] conn: &zbus::Connection) -> Result<(), ApiError> {
        let port = self.port().map_err(|e| ApiError::NotFound(e.to_string()))?;
        if let Some(vm) = port.vm {
            return Err(ApiError::InvalidState(format!(
                "port {} is a NIC of domain {vm}: undefine the domain instead",
                self.id
            )));
        }
        self.manager.net()?.delete_port(self.id).await?;
        super::sync_net_objects(conn, &self.manager).await;
        Ok(())
    }

    async fn set_port_security(&self, on: bool) -> Result<(), ApiError> {
        self.manager.net()?.set_port_security(self.id, on).await?;
        Ok(())
    }

    /// rx_packets, rx_bytes, tx_packets, tx_bytes (from the VM's point of view: rx is what it
    /// received), drop_vlan, drop_security.
    async fn get_counters(&self) -> Result<HashMap<String, u64>, ApiError> {
        let c = self.manager.net()?.counters(self.id).await?;
        Ok(HashMap::from([
            ("rx_packets".to_string(), c.rx_packets),
            ("rx_bytes".to_string(), c.rx_bytes),
            ("tx_packets".to_string(), c.tx_packets),
            ("tx_bytes".to_string(), c.tx_bytes),
            ("drop_vlan".to_string(), c.drop_vlan),
            ("drop_security".to_string(), c.drop_security),
        ]))
    }

    #[zbus(property)]
    fn id(&self) -> u32 {
        self.id
    }

    #[zbus(property)]
    fn network(&self) -> Result<String, zbus::fdo::Error> {
        Ok(self.port()?.network)
    }

    #[zbus(property)]
    fn subnet(&self) -> Result<String, zbus::fdo::Error> {
        Ok(self.port()?.subnet)
    }

    #[zbus(property)]
    fn mac(&self) -> Result<String, zbus::fdo::Error> {
        Ok(self.port()?.mac.to_string())
    }

    #[zbus(property)]
    fn ip(&self) -> Result<String, zbus::fdo::Error> {
        Ok(self.port()?.ip.to_string())
    }

    /// The host link of the port (tap or veth).
    #[zbus(property)]
    fn device(&self) -> Result<String, zbus::fdo::Error> {
        let p = self.port()?;
        Ok(self
            .manager
            .net()
            .map_err(|e| fdo(e.into()))?
            .device_name(&p))
    }

    /// `tap` (a VM NIC) or `veth` (a namespace's interface).
    #[zbus(property)]
    fn kind(&self) -> Result<String, zbus::fdo::Error> {
        Ok(match self.port()?.device {
            PortDevice::Tap => "tap",
            PortDevice::Veth { .. } => "veth",
        }
        .to_string())
    }

    #[zbus(property)]
    fn port_security(&self) -> Result<bool, zbus::fdo::Error> {
        Ok(self.port()?.port_security)
    }

    /// The domain whose NIC this is, or "".
    #[zbus(property)]
    fn domain(&self) -> Result<String, zbus::fdo::Error> {
        Ok(self.port()?.vm.unwrap_or_default())
    }
}

pub(super) fn network_object(name: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(network_path(name)).expect("escaped names are valid paths")
}

pub(super) fn port_object(id: u32) -> OwnedObjectPath {
    OwnedObjectPath::try_from(port_path(id)).expect("port paths are valid")
}
