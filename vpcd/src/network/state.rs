//! Tenant networks as vpcd stores them, and every rule about them, as pure functions over one
//! document ([`NetState`]) that the store keeps in a single transaction. `NetManager` applies the
//! result to the kernel through netdrv.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use netdrv::filter::PortSecurity;
use netdrv::ipam::{Ipv4Cidr, Mac};
use netdrv::model::{HostNet, PortKind, PortNet, SubnetNet, TenantNet, Underlay};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MAX_VNI: u32 = 16_777_215;
/// Where automatically chosen VNIs start. Hosts that share a subnet must agree on its VNI, so
/// multi-host set-ups give VNIs explicitly.
pub const AUTO_VNI_BASE: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub next_network_id: u32,
    pub next_port_id: u32,
    pub networks: BTreeMap<String, Network>,
    pub ports: BTreeMap<u32, Port>,
    /// Static FDB entries: MACs behind remote VTEPs (the EVPN issue learns these over BGP).
    #[serde(default)]
    pub remote_macs: Vec<RemoteMac>,
    #[serde(default)]
    pub routers: BTreeMap<String, super::router::Router>,
    #[serde(default)]
    pub floating_ips: Vec<super::router::FloatingIp>,
}

impl Default for NetState {
    fn default() -> NetState {
        NetState {
            next_network_id: 1,
            next_port_id: 1,
            networks: BTreeMap::new(),
            ports: BTreeMap::new(),
            remote_macs: Vec::new(),
            routers: BTreeMap::new(),
            floating_ips: Vec::new(),
        }
    }
}

/// A MAC on a subnet that lives behind another host's VTEP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteMac {
    pub network: String,
    pub subnet: String,
    pub mac: Mac,
    pub vtep: Ipv4Addr,
}

/// A tenant (VPC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: u32,
    pub name: String,
    pub subnets: BTreeMap<String, Subnet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub name: String,
    pub cidr: Ipv4Cidr,
    /// Host-local tag on the tenant bridge.
    pub vlan: u16,
    pub vni: u32,
}

/// An extra MAC and/or IPv4 a port may send from (Neutron's allowed address pairs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowedPair {
    pub mac: Option<Mac>,
    pub ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortDevice {
    /// A VM NIC: a tap.
    Tap,
    /// A namespace's interface: a veth whose other end is `ifname` in `netns`.
    Veth { netns: PathBuf, ifname: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub id: u32,
    pub network: String,
    pub subnet: String,
    pub device: PortDevice,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub port_security: bool,
    pub allowed_pairs: Vec<AllowedPair>,
    /// The VM whose NIC this is.
    pub vm: Option<String>,
}

/// What a caller asks for when creating a port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortRequest {
    pub network: String,
    pub subnet: String,
    pub device: Option<PortDevice>,
    pub mac: Option<Mac>,
    pub ip: Option<Ipv4Addr>,
    pub port_security: Option<bool>,
    pub allowed_pairs: Vec<AllowedPair>,
    pub vm: Option<String>,
}

/// Network and subnet names: like VM names, at most 32 characters.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    hypervisor::spec::check_object_name(name, 32)
        .map_err(|rule| Error::InvalidArgument(format!("invalid {kind} name {name:?}: {rule}")))
}

impl NetState {
    pub fn network(&self, name: &str) -> Result<&Network> {
        self.networks
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("network {name}")))
    }

    pub fn add_network(&mut self, name: &str) -> Result<Network> {
        validate_name("network", name)?;
        if self.networks.contains_key(name) {
            return Err(Error::AlreadyExists(format!("network {name}")));
        }
        let net = Network {
            id: self.next_network_id,
            name: name.to_string(),
            subnets: BTreeMap::new(),
        };
        self.next_network_id += 1;
        self.networks.insert(name.to_string(), net.clone());
        Ok(net)
    }

    pub fn remove_network(&mut self, name: &str) -> Result<Network> {
        self.network(name)?;
        let ports = self.ports.values().filter(|p| p.network == name).count();
        if ports > 0 {
            return Err(Error::InvalidState(format!(
                "network {name} is in use by {ports} port(s)"
            )));
        }
        if let Some(r) = self.router_of(name) {
            return Err(Error::InvalidState(format!(
                "network {name} has router {}; delete it first",
                r.name
            )));
        }
        Ok(self.networks.remove(name).expect("checked above"))
    }

    pub fn add_subnet(
        &mut self,
        network: &str,
        name: &str,
        cidr: &str,
        vni: Option<u32>,
        vlan: Option<u16>,
    ) -> Result<Subnet> {
        validate_name("subnet", name)?;
        let cidr: Ipv4Cidr = cidr.parse().map_err(|e: netdrv::Error| {
            Error::InvalidArgument(format!("subnet {network}/{name}: {e}"))
        })?;
        let used_vnis: BTreeSet<u32> = self
            .networks
            .values()
            .flat_map(|n| n.subnets.values().map(|s| s.vni))
            .collect();
        let net = self
            .networks
            .get_mut(network)
            .ok_or_else(|| Error::NotFound(format!("network {network}")))?;
        let what = format!("subnet {network}/{name}");
        if cidr.prefix() > 29 {
            // Network, gateway, service and broadcast address leave a /30 no port address.
            return Err(Error::InvalidArgument(format!(
                "{what}: {cidr} is too small (at most /29)"
            )));
        }
        if net.subnets.contains_key(name) {
            return Err(Error::AlreadyExists(what));
        }
        if let Some(other) = net.subnets.values().find(|s| s.cidr.overlaps(&cidr)) {
            return Err(Error::InvalidArgument(format!(
                "{what}: {cidr} overlaps subnet {} ({})",
                other.name, other.cidr
            )));
        }
        let vlan = match vlan {
            Some(v) if !(1..=4094).contains(&v) => {
                return Err(Error::InvalidArgument(format!(
                    "{what}: VLAN {v} outside 1-4094"
                )))
            }
            Some(v) => {
                if let Some(s) = net.subnets.values().find(|s| s.vlan == v) {
                    return Err(Error::InvalidArgument(format!(
                        "{what}: VLAN {v} is used by subnet {}",
                        s.name
                    )));
                }
                v
            }
            None => (1..=4094)
                .find(|v| !net.subnets.values().any(|s| s.vlan == *v))
                .ok_or_else(|| Error::InvalidArgument(format!("{what}: no free VLAN")))?,
        };
        let vni = match vni {
            Some(v) if v == 0 || v > MAX_VNI => {
                return Err(Error::InvalidArgument(format!(
                    "{what}: VNI {v} outside 1-{MAX_VNI}"
                )))
            }
            Some(v) if used_vnis.contains(&v) => {
                return Err(Error::InvalidArgument(format!(
                    "{what}: VNI {v} is already used"
                )))
            }
            Some(v) => v,
            None => (AUTO_VNI_BASE..=MAX_VNI)
                .find(|v| !used_vnis.contains(v))
                .ok_or_else(|| Error::InvalidArgument(format!("{what}: no free VNI")))?,
        };
        let subnet = Subnet {
            name: name.to_string(),
            cidr,
            vlan,
            vni,
        };
        net.subnets.insert(name.to_string(), subnet.clone());
        Ok(subnet)
    }

    pub fn remove_subnet(&mut self, network: &str, name: &str) -> Result<Subnet> {
        let ports = self
            .ports
            .values()
            .filter(|p| p.network == network && p.subnet == name)
            .count();
        if let Some(r) = self.router_of(network).filter(|r| r.subnets.contains(name)) {
            return Err(Error::InvalidState(format!(
                "subnet {network}/{name} is attached to router {}; remove it first",
                r.name
            )));
        }
        self.remote_macs
            .retain(|r| !(r.network == network && r.subnet == name) || ports > 0);
        let net = self
            .networks
            .get_mut(network)
            .ok_or_else(|| Error::NotFound(format!("network {network}")))?;
        if !net.subnets.contains_key(name) {
            return Err(Error::NotFound(format!("subnet {network}/{name}")));
        }
        if ports > 0 {
            return Err(Error::InvalidState(format!(
                "subnet {network}/{name} is in use by {ports} port(s)"
            )));
        }

        Ok(net.subnets.remove(name).expect("checked above"))
    }

    /// Adds a port: checks the request, picks the MAC and address unless given.
    pub fn add_port(&mut self, req: &PortRequest, owner: &str) -> Result<Port> {
        let net = self.network(&req.network)?;
        let subnet = net
            .subnets
            .get(&req.subnet)
            .ok_or_else(|| Error::NotFound(format!("subnet {}/{}", req.network, req.subnet)))?;
        let what = format!("port on {}/{}", req.network, req.subnet);
        let id = self.next_port_id;
        let mac = req.mac.unwrap_or_else(|| Mac::for_port(owner, id));
        mac.check_unicast()
            .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
        if let Some(p) = self.ports.values().find(|p| p.mac == mac) {
            return Err(Error::InvalidArgument(format!(
                "{what}: MAC {mac} is in use by port {}",
                p.id
            )));
        }
        let taken: BTreeSet<Ipv4Addr> = self
            .ports
            .values()
            .filter(|p| p.network == req.network && p.subnet == req.subnet)
            .map(|p| p.ip)
            .collect();
        let ip = match req.ip {
            Some(ip) => {
                subnet
                    .cidr
                    .check_host(ip)
                    .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
                if taken.contains(&ip) {
                    return Err(Error::InvalidArgument(format!(
                        "{what}: address {ip} is already taken"
                    )));
                }
                ip
            }
            None => subnet
                .cidr
                .next_free(&taken)
                .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?,
        };
        for pair in &req.allowed_pairs {
            if pair.mac.is_none() && pair.ip.is_none() {
                return Err(Error::InvalidArgument(format!(
                    "{what}: an allowed address pair needs a MAC or an IP"
                )));
            }
        }
        if let Some(PortDevice::Veth { ifname, .. }) = &req.device {
            if ifname.is_empty() || ifname.len() > 15 || ifname.contains('/') {
                return Err(Error::InvalidArgument(format!(
                    "{what}: interface name {ifname:?} must be 1 to 15 bytes"
                )));
            }
        }
        let port = Port {
            id,
            network: req.network.clone(),
            subnet: req.subnet.clone(),
            device: req.device.clone().unwrap_or(PortDevice::Tap),
            mac,
            ip,
            port_security: req.port_security.unwrap_or(true),
            allowed_pairs: req.allowed_pairs.clone(),
            vm: req.vm.clone(),
        };
        self.next_port_id += 1;
        self.ports.insert(id, port.clone());
        Ok(port)
    }

    /// Adds (or moves) a static remote MAC on a subnet.
    pub fn add_remote_mac(
        &mut self,
        network: &str,
        subnet: &str,
        mac: Mac,
        vtep: Ipv4Addr,
    ) -> Result<()> {
        let net = self.network(network)?;
        if !net.subnets.contains_key(subnet) {
            return Err(Error::NotFound(format!("subnet {network}/{subnet}")));
        }
        mac.check_unicast().map_err(|e| {
            Error::InvalidArgument(format!("remote MAC on {network}/{subnet}: {e}"))
        })?;
        if let Some(p) = self.ports.values().find(|p| p.mac == mac) {
            return Err(Error::InvalidArgument(format!(
                "remote MAC {mac} on {network}/{subnet}: it is the MAC of local port {}",
                p.id
            )));
        }
        if vtep.is_unspecified() || vtep.is_multicast() || vtep.is_broadcast() {
            return Err(Error::InvalidArgument(format!(
                "remote MAC {mac} on {network}/{subnet}: {vtep} is not a VTEP address"
            )));
        }
        self.remote_macs
            .retain(|r| !(r.network == network && r.subnet == subnet && r.mac == mac));
        self.remote_macs.push(RemoteMac {
            network: network.to_string(),
            subnet: subnet.to_string(),
            mac,
            vtep,
        });
        Ok(())
    }

    pub fn remove_remote_mac(&mut self, network: &str, subnet: &str, mac: Mac) -> Result<()> {
        let before = self.remote_macs.len();
        self.remote_macs
            .retain(|r| !(r.network == network && r.subnet == subnet && r.mac == mac));
        if self.remote_macs.len() == before {
            return Err(Error::NotFound(format!(
                "remote MAC {mac} on {network}/{subnet}"
            )));
        }
        Ok(())
    }

    /// Removes a port; a floating IP mapped to it is detached (as Neutron does).
    pub fn remove_port(&mut self, id: u32) -> Result<Port> {
        let port = self
            .ports
            .remove(&id)
            .ok_or_else(|| Error::NotFound(format!("port {id}")))?;
        for f in &mut self.floating_ips {
            if f.port == Some(id) {
                f.port = None;
            }
        }
        Ok(port)
    }

    pub fn port_mut(&mut self, id: u32) -> Result<&mut Port> {
        self.ports
            .get_mut(&id)
            .ok_or_else(|| Error::NotFound(format!("port {id}")))
    }

    /// What netdrv should make on this host.
    pub fn desired(
        &self,
        prefix: &str,
        owner: &str,
        underlay: Option<Underlay>,
        peers: &[Ipv4Addr],
    ) -> HostNet {
        let tenants = self
            .networks
            .values()
            .map(|n| TenantNet {
                id: n.id,
                subnets: n
                    .subnets
                    .values()
                    .map(|s| SubnetNet {
                        name: s.name.clone(),
                        vlan: s.vlan,
                        vni: s.vni,
                    })
                    .collect(),
                ports: self
                    .ports
                    .values()
                    .filter(|p| p.network == n.name)
                    .map(|p| port_net(p, &n.subnets[&p.subnet]))
                    .collect(),
            })
            .collect();
        let remote_macs = self
            .remote_macs
            .iter()
            .filter_map(|r| {
                let vni = self.networks.get(&r.network)?.subnets.get(&r.subnet)?.vni;
                Some((vni, r.mac, r.vtep))
            })
            .collect();
        HostNet {
            prefix: prefix.to_string(),
            owner: owner.to_string(),
            underlay,
            peers: peers.to_vec(),
            tenants,
            remote_macs,
            externals: Vec::new(),
            floods: Vec::new(),
            vxlan_port_learning: true,
            neighbours: Vec::new(),
        }
    }
}

fn port_net(p: &Port, subnet: &Subnet) -> PortNet {
    let security = p.port_security.then(|| {
        let mut macs = vec![p.mac.0];
        let mut ipv4 = vec![p.ip];
        for pair in &p.allowed_pairs {
            if let Some(m) = pair.mac {
                macs.push(m.0);
            }
            if let Some(ip) = pair.ip {
                ipv4.push(ip);
            }
        }
        PortSecurity {
            macs,
            ipv4,
            ipv6: Vec::new(),
        }
    });
    PortNet {
        id: p.id,
        subnet: p.subnet.clone(),
        kind: match &p.device {
            PortDevice::Tap => PortKind::Tap,
            PortDevice::Veth { netns, ifname } => PortKind::Veth {
                netns: netns.clone(),
                ifname: ifname.clone(),
                address: Some((p.ip, subnet.cidr.prefix())),
            },
        },
        mac: p.mac,
        security,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NetState {
        let mut s = NetState::default();
        s.add_network("a").unwrap();
        s.add_subnet("a", "web", "10.0.1.0/24", Some(100), None)
            .unwrap();
        s
    }

    fn req(ip: Option<[u8; 4]>) -> PortRequest {
        PortRequest {
            network: "a".into(),
            subnet: "web".into(),
            ip: ip.map(Ipv4Addr::from),
            ..Default::default()
        }
    }

    #[test]
    fn subnets_get_free_vlans_and_reject_bad_vlan_vni_overlap() {
        let mut s = state();
        let db = s
            .add_subnet("a", "db", "10.0.2.0/24", Some(200), None)
            .unwrap();
        assert_eq!(db.vlan, 2);
        let err = |r: Result<Subnet>| r.unwrap_err().to_string();
        assert!(
            err(s.add_subnet("a", "x", "10.0.3.0/24", Some(5), Some(0))).contains("VLAN 0 outside")
        );
        assert!(
            err(s.add_subnet("a", "x", "10.0.3.0/24", Some(5), Some(4095))).contains("VLAN 4095")
        );
        assert!(err(s.add_subnet("a", "x", "10.0.3.0/24", Some(0), None)).contains("VNI 0 outside"));
        assert!(
            err(s.add_subnet("a", "x", "10.0.3.0/24", Some(16_777_216), None))
                .contains("VNI 16777216")
        );
        assert!(
            err(s.add_subnet("a", "x", "10.0.3.0/24", Some(100), None)).contains("already used")
        );
        assert!(
            err(s.add_subnet("a", "x", "10.0.0.0/16", Some(5), None)).contains("overlaps subnet")
        );
        assert!(
            err(s.add_subnet("a", "web", "10.0.9.0/24", Some(5), None)).contains("already exists")
        );
        assert!(err(s.add_subnet("nope", "x", "10.0.9.0/24", None, None))
            .contains("network nope not found"));
        // The same CIDR in another tenant is fine; VNIs stay unique per host.
        s.add_network("b").unwrap();
        s.add_subnet("b", "web", "10.0.1.0/24", Some(101), None)
            .unwrap();
        let auto = s
            .add_subnet("b", "auto", "10.9.0.0/24", None, None)
            .unwrap();
        assert_eq!(auto.vni, AUTO_VNI_BASE);
    }

    #[test]
    fn ports_get_next_free_address_and_stable_mac() {
        let mut s = state();
        let p1 = s.add_port(&req(None), "h").unwrap();
        let p2 = s.add_port(&req(None), "h").unwrap();
        assert_eq!(p1.ip, Ipv4Addr::new(10, 0, 1, 2));
        assert_eq!(p2.ip, Ipv4Addr::new(10, 0, 1, 3));
        assert_eq!(p1.mac, Mac::for_port("h", p1.id));
        assert!(p1.port_security);
        s.remove_port(p1.id).unwrap();
        assert_eq!(
            s.add_port(&req(None), "h").unwrap().ip,
            Ipv4Addr::new(10, 0, 1, 2)
        );
    }

    #[test]
    fn bad_port_requests_name_the_problem_and_change_nothing() {
        let mut s = state();
        let p = s.add_port(&req(Some([10, 0, 1, 7])), "h").unwrap();
        let before = s.clone();
        let err = |s: &mut NetState, r: PortRequest| s.add_port(&r, "h").unwrap_err().to_string();
        assert!(err(&mut s, req(Some([10, 0, 2, 7]))).contains("outside"));
        assert!(err(&mut s, req(Some([10, 0, 1, 7]))).contains("already taken"));
        assert!(err(&mut s, req(Some([10, 0, 1, 1]))).contains("gateway"));
        let mut r = req(None);
        r.mac = Some(p.mac);
        assert!(err(&mut s, r).contains("in use by port"));
        let mut r = req(None);
        r.subnet = "nope".into();
        assert!(err(&mut s, r).contains("subnet a/nope not found"));
        assert_eq!(s, before);
    }

    #[test]
    fn in_use_networks_and_subnets_cannot_go() {
        let mut s = state();
        let p = s.add_port(&req(None), "h").unwrap();
        assert!(matches!(
            s.remove_subnet("a", "web"),
            Err(Error::InvalidState(_))
        ));
        assert!(matches!(s.remove_network("a"), Err(Error::InvalidState(_))));
        s.remove_port(p.id).unwrap();
        s.remove_subnet("a", "web").unwrap();
        s.remove_network("a").unwrap();
    }

    #[test]
    fn desired_state_carries_port_security_with_allowed_pairs() {
        let mut s = state();
        let mut r = req(None);
        r.allowed_pairs = vec![AllowedPair {
            mac: None,
            ip: Some(Ipv4Addr::new(10, 0, 1, 100)),
        }];
        let p = s.add_port(&r, "h").unwrap();
        let mut r = req(None);
        r.port_security = Some(false);
        s.add_port(&r, "h").unwrap();
        let d = s.desired("vpc", "h", None, &[]);
        let ports = &d.tenants[0].ports;
        let sec = ports[0].security.as_ref().unwrap();
        assert_eq!(sec.macs, vec![p.mac.0]);
        assert_eq!(sec.ipv4, vec![p.ip, Ipv4Addr::new(10, 0, 1, 100)]);
        assert!(ports[1].security.is_none());
        assert_eq!(d.tenants[0].subnets[0].vlan, 1);
    }
}
