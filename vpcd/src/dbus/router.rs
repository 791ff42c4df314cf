//! `org.vpcd.Router1` at `/org/vpcd/Host1/router/<name>` and `org.vpcd.FloatingIp1` at
//! `/org/vpcd/Host1/floating_ip/<address>`. Properties are read from the store on each call.

use std::net::Ipv4Addr;
use std::sync::Arc;

use zbus::interface;
use zbus::zvariant::OwnedObjectPath;

use super::error::ApiError;
use super::network::fdo;
use super::path::{floating_ip_path, router_path};
use crate::manager::Manager;
use crate::network::router::{FloatingIp, Router};

pub(super) fn router_object(name: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(router_path(name)).expect("escaped names are valid paths")
}

pub(super) fn floating_ip_object(ip: Ipv4Addr) -> OwnedObjectPath {
    OwnedObjectPath::try_from(floating_ip_path(ip)).expect("escaped addresses are valid paths")
}

/// An IPv4 address argument; "" is `None` where the caller may leave the choice to vpcd.
pub(super) fn parse_ip(what: &str, s: &str) -> Result<Option<Ipv4Addr>, ApiError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| ApiError::InvalidArgument(format!("{what}: {s:?} is not an IPv4 address")))
}

fn required_ip(what: &str, s: &str) -> Result<Ipv4Addr, ApiError> {
    parse_ip(what, s)?
        .ok_or_else(|| ApiError::InvalidArgument(format!("{what}: an IPv4 address is needed")))
}

#[derive(Debug)]
pub struct RouterIface {
    pub(super) manager: Arc<Manager>,
    pub(super) name: String,
}

impl RouterIface {
    fn router(&self) -> Result<Router, zbus::fdo::Error> {
        let get = || -> Result<Router, ApiError> {
            Ok(self.manager.net()?.state()?.router(&self.name)?.clone())
        };
        get().map_err(fdo)
    }
}

#[interface(name = "org.vpcd.Router1")]
impl RouterIface {
    /// Removes the router; it must have no subnets attached.
    async fn delete(&self, #[zbus(connection)] conn: &zbus::Connection) -> Result<(), ApiError> {
        self.manager.net()?.delete_router(&self.name).await?;
        super::sync_net_objects(conn, &self.manager).await;
        Ok(())
    }

    /// Attaches a subnet (`name` or `network/name`) of the router's network.
    async fn add_subnet(&self, subnet: &str) -> Result<(), ApiError> {
        self.manager
            .net()?
            .router_add_subnet(&self.name, subnet)
            .await?;
        Ok(())
    }

    async fn remove_subnet(&self, subnet: &str) -> Result<(), ApiError> {
        self.manager
            .net()?
            .router_remove_subnet(&self.name, subnet)
            .await?;
        Ok(())
    }

    /// Puts the router on the external network with address `ip` ("" picks one from the
    /// pool); returns the address.
    async fn set_gateway(&self, ip: &str) -> Result<String, ApiError> {
        let ip = parse_ip("gateway", ip)?;
        let ip = self
            .manager
            .net()?
            .router_set_gateway(&self.name, ip)
            .await?;
        Ok(ip.to_string())
    }

    async fn clear_gateway(&self) -> Result<(), ApiError> {
        self.manager.net()?.router_clear_gateway(&self.name).await?;
        Ok(())
    }

    /// Adds or replaces the static route to `destination` (a.b.c.d/n) via `via`.
    async fn add_route(&self, destination: &str, via: &str) -> Result<(), ApiError> {
        let via = required_ip("next hop", via)?;
        self.manager
            .net()?
            .router_add_route(&self.name, destination, via)
            .await?;
        Ok(())
    }

    async fn remove_route(&self, destination: &str) -> Result<(), ApiError> {
        self.manager
            .net()?
            .router_remove_route(&self.name, destination)
            .await?;
        Ok(())
    }

    #[zbus(property)]
    fn name(&self) -> String {
        self.name.clone()
    }

    #[zbus(property)]
    fn network(&self) -> Result<String, zbus::fdo::Error> {
        Ok(self.router()?.network)
    }

    #[zbus(property)]
    fn subnets(&self) -> Result<Vec<String>, zbus::fdo::Error> {
        Ok(self.router()?.subnets.into_iter().collect())
    }

    /// The address on the external network, or "".
    #[zbus(property)]
    fn external_address(&self) -> Result<String, zbus::fdo::Error> {
        Ok(self
            .router()?
            .external_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default())
    }

    /// (destination, next hop) per static route.
    #[zbus(property)]
    fn routes(&self) -> Result<Vec<(String, String)>, zbus::fdo::Error> {
        Ok(self
            .router()?
            .routes
            .iter()
            .map(|r| (r.dest_str(), r.via.to_string()))
            .collect())
    }

    /// The network namespace the router lives in on this host ("" while it has none: no
    /// subnets attached and no ports).
    #[zbus(property)]
    fn namespace(&self) -> Result<String, zbus::fdo::Error> {
        let get = || -> Result<String, ApiError> {
            let net = self.manager.net()?;
            let network = net.state()?.router(&self.name)?.network.clone();
            Ok(net.router_namespace(&network)?.unwrap_or_default())
        };
        get().map_err(fdo)
    }
}

#[derive(Debug)]
pub struct FloatingIpIface {
    pub(super) manager: Arc<Manager>,
    pub(super) ip: Ipv4Addr,
}

impl FloatingIpIface {
    fn fip(&self) -> Result<FloatingIp, zbus::fdo::Error> {
        let get = || -> Result<FloatingIp, ApiError> {
            Ok(self.manager.net()?.state()?.floating_ip(self.ip)?.clone())
        };
        get().map_err(fdo)
    }
}

#[interface(name = "org.vpcd.FloatingIp1")]
impl FloatingIpIface {
    /// Maps the address to port `port` (DNAT in, SNAT out through its router).
    async fn attach(&self, port: u32) -> Result<(), ApiError> {
        self.manager
            .net()?
            .attach_floating_ip(self.ip, port)
            .await?;
        Ok(())
    }

    async fn detach(&self) -> Result<(), ApiError> {
        self.manager.net()?.detach_floating_ip(self.ip).await?;
        Ok(())
    }

    /// Releases the address (detaching it first).
    async fn delete(&self, #[zbus(connection)] conn: &zbus::Connection) -> Result<(), ApiError> {
        self.manager.net()?.delete_floating_ip(self.ip).await?;
        super::sync_net_objects(conn, &self.manager).await;
        Ok(())
    }

    #[zbus(property)]
    fn address(&self) -> String {
        self.ip.to_string()
    }

    /// The port it maps to, 0 when detached.
    #[zbus(property)]
    fn port(&self) -> Result<u32, zbus::fdo::Error> {
        Ok(self.fip()?.port.unwrap_or(0))
    }
}
