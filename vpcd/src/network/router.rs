//! Virtual routers and floating IPs as vpcd stores them, and every rule about them (pure
//! functions over [`NetState`]); `nat.rs` and `mod.rs` make them real.
//!
//! A router belongs to one network (tenant), at most one per network, and routes between the
//! subnets attached to it. With a gateway set it has an address from the external pool and
//! SNATs the attached subnets to it; floating IPs, also from the pool, map 1:1 to ports behind
//! it. Static routes point at next hops inside an attached subnet or the external network.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use netdrv::ipam::Ipv4Cidr;
use serde::{Deserialize, Serialize};

use super::state::{validate_name, NetState};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Router {
    pub name: String,
    pub network: String,
    /// Names of the attached subnets (of `network`).
    pub subnets: BTreeSet<String>,
    /// The router's address on the external network (router-set-gateway).
    pub external_ip: Option<Ipv4Addr>,
    pub routes: Vec<Route>,
}

/// A static route of a router: `dest/prefix via via`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dest: Ipv4Addr,
    pub prefix: u8,
    pub via: Ipv4Addr,
}

impl Route {
    pub fn dest_str(&self) -> String {
        format!("{}/{}", self.dest, self.prefix)
    }
}

/// A route destination `a.b.c.d/n` (n 0..=32, no host bits).
pub fn parse_dest(s: &str) -> std::result::Result<(Ipv4Addr, u8), String> {
    let bad = || format!("{s:?} is not an IPv4 destination (a.b.c.d/n, n 0-32)");
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    let net = Ipv4Addr::from(u32::from(addr) & mask);
    if net != addr {
        return Err(format!("{s} has host bits set (use {net}/{prefix})"));
    }
    Ok((addr, prefix))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloatingIp {
    pub ip: Ipv4Addr,
    /// The port it maps to, if attached.
    pub port: Option<u32>,
}

/// The external network routers' gateways and floating IPs live on (configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalNet {
    /// The host link of the external network: a bridge (routers' external legs are veths
    /// into it) or an interface (their legs are macvlans on it).
    pub link: String,
    pub cidr: Ipv4Cidr,
    /// The next hop of routers' default routes.
    pub gateway: Ipv4Addr,
    /// First and last address handed out to gateways and floating IPs.
    pub pool: (Ipv4Addr, Ipv4Addr),
}

impl ExternalNet {
    /// Checks the configuration: the gateway and the pool inside the CIDR, the pool ordered
    /// and without the network, broadcast or gateway address.
    pub fn new(
        link: &str,
        cidr: &str,
        gateway: &str,
        pool: Option<&str>,
    ) -> std::result::Result<ExternalNet, String> {
        let cidr: Ipv4Cidr = cidr
            .parse()
            .map_err(|e| format!("external_cidr {cidr:?}: {e}"))?;
        let gateway: Ipv4Addr = gateway
            .parse()
            .map_err(|_| format!("external_gateway {gateway:?} is not an IPv4 address"))?;
        if !cidr.contains(gateway) {
            return Err(format!("external_gateway {gateway} is outside {cidr}"));
        }
        let pool = match pool {
            None => (
                Ipv4Addr::from(u32::from(cidr.network()) + 1),
                Ipv4Addr::from(u32::from(cidr.broadcast()) - 1),
            ),
            Some(p) => {
                let bad = || format!("external_pool {p:?}: FIRST-LAST, two addresses in {cidr}");
                let (a, b) = p.split_once('-').ok_or_else(bad)?;
                let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
                let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
                if !cidr.contains(a) || !cidr.contains(b) || a > b {
                    return Err(bad());
                }
                (a, b)
            }
        };
        if pool.0 == cidr.network() || pool.1 == cidr.broadcast() {
            return Err(format!(
                "external_pool {}-{} holds the network or broadcast address of {cidr}",
                pool.0, pool.1
            ));
        }
        if link.is_empty() || link.len() > 15 {
            return Err(format!("external_link {link:?}: 1 to 15 bytes"));
        }
        Ok(ExternalNet {
            link: link.to_string(),
            cidr,
            gateway,
            pool,
        })
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        (self.pool.0..=self.pool.1).contains(&ip) && ip != self.gateway
    }
}

fn no_external() -> Error {
    Error::InvalidState(
        "no external network is configured on this host (external_link, external_cidr, \
         external_gateway)"
            .into(),
    )
}

impl NetState {
    pub fn router(&self, name: &str) -> Result<&Router> {
        self.routers
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("router {name}")))
    }

    fn router_mut(&mut self, name: &str) -> Result<&mut Router> {
        self.routers
            .get_mut(name)
            .ok_or_else(|| Error::NotFound(format!("router {name}")))
    }

    /// The router of network `network`, if it has one.
    pub fn router_of(&self, network: &str) -> Option<&Router> {
        self.routers.values().find(|r| r.network == network)
    }

    pub fn add_router(&mut self, name: &str, network: &str) -> Result<Router> {
        validate_name("router", name)?;
        self.network(network)?;
        if self.routers.contains_key(name) {
            return Err(Error::AlreadyExists(format!("router {name}")));
        }
        if let Some(r) = self.router_of(network) {
            return Err(Error::InvalidArgument(format!(
                "router {name}: network {network} already has router {} (one per network)",
                r.name
            )));
        }
        let r = Router {
            name: name.to_string(),
            network: network.to_string(),
            subnets: BTreeSet::new(),
            external_ip: None,
            routes: Vec::new(),
        };
        self.routers.insert(name.to_string(), r.clone());
        Ok(r)
    }

    pub fn remove_router(&mut self, name: &str) -> Result<Router> {
        let r = self.router(name)?;
        if !r.subnets.is_empty() {
            return Err(Error::InvalidState(format!(
                "router {name} has subnets attached ({}); remove them first",
                r.subnets.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(self.routers.remove(name).expect("checked above"))
    }

    /// Attaches a subnet, named `subnet` or `network/subnet`. Attaching again is fine.
    pub fn router_add_subnet(&mut self, router: &str, subnet: &str) -> Result<()> {
        let r = self.router(router)?;
        let name = self.resolve_subnet(r, subnet)?;
        self.router_mut(router)?.subnets.insert(name);
        Ok(())
    }

    /// Detaches a subnet; refused while floating IPs map to ports on it. Detaching a subnet
    /// that is not attached is fine.
    pub fn router_remove_subnet(&mut self, router: &str, subnet: &str) -> Result<()> {
        let r = self.router(router)?;
        let name = self.resolve_subnet(r, subnet)?;
        let network = r.network.clone();
        if let Some(f) = self.floating_ips.iter().find(|f| {
            f.port
                .and_then(|p| self.ports.get(&p))
                .is_some_and(|p| p.network == network && p.subnet == name)
        }) {
            return Err(Error::InvalidState(format!(
                "router {router}: floating IP {} maps to port {} on subnet {name}; detach it first",
                f.ip,
                f.port.unwrap_or_default()
            )));
        }
        let cidr = self.networks[&network].subnets[&name].cidr;
        let r = self.router_mut(router)?;
        r.subnets.remove(&name);
        // Routes through the subnet go with it.
        r.routes.retain(|rt| !cidr.contains(rt.via));
        Ok(())
    }

    /// `subnet` or `network/subnet` -> the name of a subnet of the router's network.
    fn resolve_subnet(&self, r: &Router, subnet: &str) -> Result<String> {
        let (network, name) = match subnet.split_once('/') {
            Some((n, s)) => (n, s),
            None => (r.network.as_str(), subnet),
        };
        if network != r.network {
            self.network(network)?;
            return Err(Error::InvalidArgument(format!(
                "router {}: subnet {network}/{name} belongs to network {network}, the router to \
                 network {}",
                r.name, r.network
            )));
        }
        let net = self.network(network)?;
        if !net.subnets.contains_key(name) {
            return Err(Error::NotFound(format!("subnet {network}/{name}")));
        }
        Ok(name.to_string())
    }

    /// Addresses of the external pool in use (gateways and floating IPs).
    fn external_in_use(&self) -> BTreeSet<Ipv4Addr> {
        self.routers
            .values()
            .filter_map(|r| r.external_ip)
            .chain(self.floating_ips.iter().map(|f| f.ip))
            .collect()
    }

    /// Checks an address asked for from the pool, or picks the next free one.
    fn take_external(
        &self,
        ext: &ExternalNet,
        ip: Option<Ipv4Addr>,
        what: &str,
    ) -> Result<Ipv4Addr> {
        let used = self.external_in_use();
        match ip {
            Some(ip) if !ext.in_pool(ip) => Err(Error::InvalidArgument(format!(
                "{what}: address {ip} is outside the external pool {}-{}",
                ext.pool.0, ext.pool.1
            ))),
            Some(ip) if used.contains(&ip) => Err(Error::InvalidArgument(format!(
                "{what}: address {ip} is already in use"
            ))),
            Some(ip) => Ok(ip),
            None => (u32::from(ext.pool.0)..=u32::from(ext.pool.1))
                .map(Ipv4Addr::from)
                .find(|ip| ext.in_pool(*ip) && !used.contains(ip))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("{what}: the external pool is exhausted"))
                }),
        }
    }

    /// Gives the router an external address (`ip`, or the next free one of the pool). Setting
    /// the address it has again is fine.
    pub fn router_set_gateway(
        &mut self,
        router: &str,
        ip: Option<Ipv4Addr>,
        ext: Option<&ExternalNet>,
    ) -> Result<Ipv4Addr> {
        let ext = ext.ok_or_else(no_external)?;
        let r = self.router(router)?;
        if let Some(have) = r.external_ip {
            if ip.is_none() || ip == Some(have) {
                return Ok(have);
            }
        }
        let mut st = self.clone();
        st.router_mut(router)?.external_ip = None;
        let ip = st.take_external(ext, ip, &format!("router {router}"))?;
        self.router_mut(router)?.external_ip = Some(ip);
        Ok(ip)
    }

    /// Takes the router off the external network; refused while floating IPs map to ports
    /// behind it. Clearing a router without a gateway is fine.
    pub fn router_clear_gateway(&mut self, router: &str) -> Result<()> {
        let r = self.router(router)?;
        let network = r.network.clone();
        if let Some(f) = self.floating_ips.iter().find(|f| {
            f.port
                .and_then(|p| self.ports.get(&p))
                .is_some_and(|p| p.network == network)
        }) {
            return Err(Error::InvalidState(format!(
                "router {router}: floating IP {} is attached behind it; detach it first",
                f.ip
            )));
        }
        // Routes through the external network go with it.
        let r = self.router(router)?;
        let keep: Vec<Route> = r
            .routes
            .iter()
            .filter(|rt| self.in_attached_subnet(r, rt.via))
            .cloned()
            .collect();
        let r = self.router_mut(router)?;
        r.external_ip = None;
        r.routes = keep;
        Ok(())
    }

    /// Whether `via` is a host inside a subnet attached to `r` (not its gateway: the router).
    fn in_attached_subnet(&self, r: &Router, via: Ipv4Addr) -> bool {
        self.networks.get(&r.network).is_some_and(|n| {
            n.subnets
                .values()
                .filter(|s| r.subnets.contains(&s.name))
                .any(|s| s.cidr.check_host(via).is_ok())
        })
    }

    /// Adds (or replaces) the static route to `dest` via `via`.
    pub fn router_add_route(
        &mut self,
        router: &str,
        dest: &str,
        via: Ipv4Addr,
        ext: Option<&ExternalNet>,
    ) -> Result<()> {
        let what = format!("router {router}: route {dest}");
        let (dest, prefix) =
            parse_dest(dest).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
        let r = self.router(router)?;
        let on_external = r.external_ip.is_some()
            && ext.is_some_and(|x| {
                x.cidr.contains(via)
                    && via != x.cidr.network()
                    && via != x.cidr.broadcast()
                    && Some(via) != r.external_ip
            });
        if !(on_external || self.in_attached_subnet(r, via)) {
            return Err(Error::InvalidArgument(format!(
                "{what}: next hop {via} is not a host in a subnet attached to the router{}",
                if r.external_ip.is_some() {
                    " or on the external network"
                } else {
                    ""
                }
            )));
        }
        let r = self.router_mut(router)?;
        r.routes.retain(|rt| (rt.dest, rt.prefix) != (dest, prefix));
        r.routes.push(Route { dest, prefix, via });
        r.routes.sort_by_key(|rt| (rt.dest, rt.prefix));
        Ok(())
    }

    pub fn router_remove_route(&mut self, router: &str, dest: &str) -> Result<()> {
        let what = format!("router {router}: route {dest}");
        let (d, p) =
            parse_dest(dest).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
        let r = self.router_mut(router)?;
        let before = r.routes.len();
        r.routes.retain(|rt| (rt.dest, rt.prefix) != (d, p));
        if r.routes.len() == before {
            return Err(Error::NotFound(format!("route {dest} of router {router}")));
        }
        Ok(())
    }

    pub fn floating_ip(&self, ip: Ipv4Addr) -> Result<&FloatingIp> {
        self.floating_ips
            .iter()
            .find(|f| f.ip == ip)
            .ok_or_else(|| Error::NotFound(format!("floating IP {ip}")))
    }

    /// Allocates a floating IP (`ip`, or the next free one of the pool).
    pub fn create_floating_ip(
        &mut self,
        ip: Option<Ipv4Addr>,
        ext: Option<&ExternalNet>,
    ) -> Result<FloatingIp> {
        let ext = ext.ok_or_else(no_external)?;
        let ip = self.take_external(ext, ip, "floating IP")?;
        let f = FloatingIp { ip, port: None };
        self.floating_ips.push(f.clone());
        self.floating_ips.sort_by_key(|f| f.ip);
        Ok(f)
    }

    /// Maps the floating IP to port `port`, which must be on a subnet attached to its
    /// network's router, and that router must have a gateway.
    pub fn attach_floating_ip(&mut self, ip: Ipv4Addr, port: u32) -> Result<()> {
        let f = self.floating_ip(ip)?.clone();
        let what = format!("floating IP {ip}");
        let p = self
            .ports
            .get(&port)
            .ok_or_else(|| Error::NotFound(format!("port {port}")))?;
        if f.port == Some(port) {
            return Ok(());
        }
        if let Some(other) = f.port {
            return Err(Error::InvalidState(format!(
                "{what} is attached to port {other}; detach it first"
            )));
        }
        if let Some(other) = self.floating_ips.iter().find(|f| f.port == Some(port)) {
            return Err(Error::InvalidState(format!(
                "{what}: port {port} already has floating IP {}",
                other.ip
            )));
        }
        let r = self.router_of(&p.network).ok_or_else(|| {
            Error::InvalidState(format!(
                "{what}: network {} of port {port} has no router",
                p.network
            ))
        })?;
        if !r.subnets.contains(&p.subnet) {
            return Err(Error::InvalidState(format!(
                "{what}: subnet {}/{} of port {port} is not attached to router {}",
                p.network, p.subnet, r.name
            )));
        }
        if r.external_ip.is_none() {
            return Err(Error::InvalidState(format!(
                "{what}: router {} has no gateway (router-set-gateway)",
                r.name
            )));
        }
        for f in &mut self.floating_ips {
            if f.ip == ip {
                f.port = Some(port);
            }
        }
        Ok(())
    }

    /// Unmaps the floating IP; detaching a detached one is fine.
    pub fn detach_floating_ip(&mut self, ip: Ipv4Addr) -> Result<()> {
        self.floating_ip(ip)?;
        for f in &mut self.floating_ips {
            if f.ip == ip {
                f.port = None;
            }
        }
        Ok(())
    }

    /// Releases the floating IP (detaching it first).
    pub fn delete_floating_ip(&mut self, ip: Ipv4Addr) -> Result<()> {
        self.floating_ip(ip)?;
        self.floating_ips.retain(|f| f.ip != ip);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::state::PortRequest;

    fn ext() -> ExternalNet {
        ExternalNet::new(
            "brx",
            "203.0.113.0/24",
            "203.0.113.1",
            Some("203.0.113.10-203.0.113.12"),
        )
        .unwrap()
    }

    /// Network a (web 10.0.0.0/24, db 10.0.1.0/24) with one port on each; network b (web).
    fn state() -> NetState {
        let mut st = NetState::default();
        st.add_network("a").unwrap();
        st.add_subnet("a", "web", "10.0.0.0/24", None, None)
            .unwrap();
        st.add_subnet("a", "db", "10.0.1.0/24", None, None).unwrap();
        st.add_network("b").unwrap();
        st.add_subnet("b", "web", "10.0.0.0/24", None, None)
            .unwrap();
        for (n, s) in [("a", "web"), ("a", "db"), ("b", "web")] {
            st.add_port(
                &PortRequest {
                    network: n.into(),
                    subnet: s.into(),
                    ..Default::default()
                },
                "owner",
            )
            .unwrap();
        }
        st
    }

    #[test]
    fn one_router_per_network_and_names_are_checked() {
        let mut st = state();
        st.add_router("r1", "a").unwrap();
        assert!(matches!(
            st.add_router("r1", "b"),
            Err(Error::AlreadyExists(_))
        ));
        let e = st.add_router("r2", "a").unwrap_err();
        assert!(e.to_string().contains("already has router r1"), "{e}");
        assert!(matches!(st.add_router("r3", "zz"), Err(Error::NotFound(_))));
        assert!(matches!(
            st.add_router("bad name", "b"),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn subnets_of_another_network_are_refused() {
        let mut st = state();
        st.add_router("r1", "a").unwrap();
        st.router_add_subnet("r1", "web").unwrap();
        st.router_add_subnet("r1", "a/db").unwrap();
        st.router_add_subnet("r1", "db").unwrap(); // again: fine
        let e = st.router_add_subnet("r1", "b/web").unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("b/web"), "{e}");
        assert!(matches!(
            st.router_add_subnet("r1", "nope"),
            Err(Error::NotFound(_))
        ));
        assert_eq!(st.router("r1").unwrap().subnets.len(), 2);
        let e = st.remove_router("r1").unwrap_err();
        assert!(matches!(e, Error::InvalidState(_)), "{e}");
    }

    #[test]
    fn gateways_and_floating_ips_come_from_the_pool_once() {
        let mut st = state();
        let x = ext();
        st.add_router("r1", "a").unwrap();
        assert!(matches!(
            st.router_set_gateway("r1", None, None),
            Err(Error::InvalidState(_))
        ));
        let gw = st.router_set_gateway("r1", None, Some(&x)).unwrap();
        assert_eq!(gw, Ipv4Addr::new(203, 0, 113, 10));
        assert_eq!(st.router_set_gateway("r1", None, Some(&x)).unwrap(), gw);
        let f = st.create_floating_ip(None, Some(&x)).unwrap();
        assert_eq!(f.ip, Ipv4Addr::new(203, 0, 113, 11));
        let e = st
            .create_floating_ip(Some(Ipv4Addr::new(203, 0, 113, 10)), Some(&x))
            .unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        let e = st
            .create_floating_ip(Some(Ipv4Addr::new(203, 0, 113, 50)), Some(&x))
            .unwrap_err();
        assert!(e.to_string().contains("outside the external pool"), "{e}");
        st.create_floating_ip(None, Some(&x)).unwrap();
        let e = st.create_floating_ip(None, Some(&x)).unwrap_err();
        assert!(e.to_string().contains("exhausted"), "{e}");
    }

    #[test]
    fn floating_ips_attach_only_behind_a_router_with_a_gateway() {
        let mut st = state();
        let x = ext();
        let f = st.create_floating_ip(None, Some(&x)).unwrap().ip;
        // Port 1 is a/web, port 2 a/db.
        let e = st.attach_floating_ip(f, 1).unwrap_err();
        assert!(e.to_string().contains("has no router"), "{e}");
        st.add_router("r1", "a").unwrap();
        let e = st.attach_floating_ip(f, 1).unwrap_err();
        assert!(e.to_string().contains("not attached to router r1"), "{e}");
        st.router_add_subnet("r1", "web").unwrap();
        let e = st.attach_floating_ip(f, 1).unwrap_err();
        assert!(e.to_string().contains("no gateway"), "{e}");
        st.router_set_gateway("r1", None, Some(&x)).unwrap();
        st.attach_floating_ip(f, 1).unwrap();
        st.attach_floating_ip(f, 1).unwrap(); // again: fine
        let g = st.create_floating_ip(None, Some(&x)).unwrap().ip;
        let e = st.attach_floating_ip(g, 1).unwrap_err();
        assert!(e.to_string().contains("already has floating IP"), "{e}");
        assert!(matches!(
            st.attach_floating_ip(f, 99),
            Err(Error::NotFound(_))
        ));
        // While attached, the subnet and the gateway stay.
        assert!(st.router_remove_subnet("r1", "web").is_err());
        assert!(st.router_clear_gateway("r1").is_err());
        st.detach_floating_ip(f).unwrap();
        st.detach_floating_ip(f).unwrap();
        st.router_clear_gateway("r1").unwrap();
        st.router_remove_subnet("r1", "web").unwrap();
        st.delete_floating_ip(f).unwrap();
        assert!(matches!(st.delete_floating_ip(f), Err(Error::NotFound(_))));
    }

    #[test]
    fn static_routes_need_a_next_hop_in_an_attached_subnet() {
        let mut st = state();
        let x = ext();
        st.add_router("r1", "a").unwrap();
        st.router_add_subnet("r1", "web").unwrap();
        st.router_add_route("r1", "192.168.5.0/24", Ipv4Addr::new(10, 0, 0, 9), Some(&x))
            .unwrap();
        let e = st
            .router_add_route("r1", "192.168.6.0/24", Ipv4Addr::new(10, 0, 1, 9), Some(&x))
            .unwrap_err();
        assert!(e.to_string().contains("next hop 10.0.1.9"), "{e}");
        let e = st
            .router_add_route("r1", "192.168.6.0/24", Ipv4Addr::new(10, 0, 0, 1), Some(&x))
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(_)),
            "the gateway itself: {e}"
        );
        let e = st
            .router_add_route("r1", "192.168.6.1/24", Ipv4Addr::new(10, 0, 0, 9), Some(&x))
            .unwrap_err();
        assert!(e.to_string().contains("host bits"), "{e}");
        // On the external network once there is a gateway.
        let e = st
            .router_add_route(
                "r1",
                "198.51.100.0/24",
                Ipv4Addr::new(203, 0, 113, 1),
                Some(&x),
            )
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        st.router_set_gateway("r1", None, Some(&x)).unwrap();
        st.router_add_route(
            "r1",
            "198.51.100.0/24",
            Ipv4Addr::new(203, 0, 113, 1),
            Some(&x),
        )
        .unwrap();
        // Replacing a destination keeps one route.
        st.router_add_route("r1", "192.168.5.0/24", Ipv4Addr::new(10, 0, 0, 8), Some(&x))
            .unwrap();
        assert_eq!(st.router("r1").unwrap().routes.len(), 2);
        st.router_remove_route("r1", "192.168.5.0/24").unwrap();
        assert!(matches!(
            st.router_remove_route("r1", "192.168.5.0/24"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn external_configuration_is_checked() {
        assert!(ExternalNet::new("brx", "203.0.113.0/24", "198.51.100.1", None).is_err());
        assert!(ExternalNet::new("brx", "203.0.113.0/24", "203.0.113.1", Some("x")).is_err());
        assert!(ExternalNet::new(
            "brx",
            "203.0.113.0/24",
            "203.0.113.1",
            Some("203.0.113.0-203.0.113.5")
        )
        .is_err());
        let x = ExternalNet::new("brx", "203.0.113.0/24", "203.0.113.1", None).unwrap();
        assert_eq!(
            x.pool,
            (
                Ipv4Addr::new(203, 0, 113, 1),
                Ipv4Addr::new(203, 0, 113, 254)
            )
        );
        assert!(
            !x.in_pool(Ipv4Addr::new(203, 0, 113, 1)),
            "the gateway is never handed out"
        );
    }
}
