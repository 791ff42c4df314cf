//! The service namespace of each tenant on this host, its legs and their DHCP servers: per
//! tenant with ports here or a router, a namespace `<prefix>-svc-<tenant>-<owner8>`; per subnet
//! with ports here or attached to the router, a leg into the tenant bridge (a veth, an access
//! port of the subnet's VLAN, port security off) and a DHCP server on it that answers from the
//! IPAM's static leases. With a router the namespace is the router (`l3.rs`).
//!
//! A leg is one of two kinds:
//! - a router leg (`gw<vlan>`), for a subnet attached to this host's router: it holds the
//!   subnet's gateway address with a MAC of its own, and is reachable from every host;
//! - a service leg (`dh<vlan>`), for any other subnet: DHCP and metadata only, as Neutron's DHCP
//!   agent and OVN's metadata port. Every host's service leg of a subnet has the same address
//!   (the subnet's service address, its last host address) and the same MAC, and is a local
//!   port: the host-namespace table `bridge vpcd_<prefix>` (`nat::local_ruleset`) keeps its
//!   frames off the VxLAN devices, so each VM talks to the leg on its own host, whose DHCP server
//!   and metadata service know it. Its DHCP hands out the gateway as router (held by the
//!   route host's router leg, wherever that is) and a classless route to 169.254.169.254 via
//!   the service address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use netdrv::dhcp::{DhcpConfig, DhcpServer, DhcpService};
use netdrv::ipam::Mac;
use netdrv::model::{HostNet, PortKind, PortNet};
use netdrv::Netns;

use super::state::{NetState, Network, Subnet};
use crate::error::Result;

/// Port ids of service legs: above any real port id, one per VNI (unique on a host).
const SERVICE_PORT_BASE: u32 = 0xf000_0000;
/// Port ids of router legs, one per VNI (VNIs have 24 bits, so the ranges do not meet).
const ROUTER_PORT_BASE: u32 = 0xf100_0000;
/// Where a service leg sends metadata requests: the link-local metadata address.
const METADATA_ROUTE: (Ipv4Addr, u8) = (super::metadata::ADDRESS, 32);
/// Lease time handed out.
/// What DHCP hands out besides addresses and routes (configuration: `dns_servers`,
/// `dns_domain`, `dhcp_lease_secs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSettings {
    pub dns: Vec<Ipv4Addr>,
    /// Option 15; `None`: not sent.
    pub domain: Option<String>,
    pub lease_secs: u32,
}

/// The subnets with a leg on this host: (network, subnet) with at least one port here or
/// attached to a router.
pub fn served(st: &NetState) -> BTreeSet<(String, String)> {
    st.ports
        .values()
        .map(|p| (p.network.clone(), p.subnet.clone()))
        .chain(
            st.routers
                .values()
                .flat_map(|r| r.subnets.iter().map(|s| (r.network.clone(), s.clone()))),
        )
        .collect()
}

/// The service namespace of tenant `id` of the vpcd instance `owner`.
pub fn namespace(prefix: &str, owner: &str, id: u32) -> String {
    format!("{prefix}-svc-{id:x}-{}", owner_tag(owner))
}

fn owner_tag(owner: &str) -> &str {
    &owner[..owner.len().min(8)]
}

/// Port ids of the routers' external legs (their MACs): one per tenant.
const EXTERNAL_PORT_BASE: u32 = 0xe000_0000;

/// Adds the routers' external legs to `host`: for each router with a gateway whose tenant has
/// a service namespace here.
pub fn add_external_legs(
    st: &NetState,
    host: &mut HostNet,
    prefix: &str,
    owner: &str,
    bridge: &str,
) {
    let served = served(st);
    for r in st.routers.values().filter(|r| r.external_ip.is_some()) {
        let Some(net) = st.networks.get(&r.network) else {
            continue;
        };
        if !served.iter().any(|(n, _)| n == &net.name) {
            continue;
        }
        host.externals.push(netdrv::model::ExternalLeg {
            tenant: net.id,
            bridge: bridge.to_string(),
            netns: PathBuf::from("/run/netns").join(namespace(prefix, owner, net.id)),
            ifname: super::nat::EXTERNAL_IF.to_string(),
            mac: external_mac(owner, net.id),
        });
    }
}

/// The MAC of tenant `tenant`'s external leg (veth end or macvlan), stable.
pub(crate) fn external_mac(owner: &str, tenant: u32) -> Mac {
    Mac::for_port(owner, EXTERNAL_PORT_BASE | tenant)
}

/// A router leg's interface name inside the service namespace.
pub(crate) fn router_ifname(vlan: u16) -> String {
    format!("gw{vlan}")
}

/// One subnet's leg on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    pub id: u32,
    pub ifname: String,
    pub mac: Mac,
    pub address: Ipv4Addr,
    /// A router leg (else a service leg).
    pub router: bool,
}

/// The leg of subnet `subnet` of network `net` on this host.
pub fn leg(st: &NetState, net: &Network, subnet: &Subnet, owner: &str) -> Leg {
    let routed = st
        .router_of(&net.name)
        .is_some_and(|r| r.subnets.contains(&subnet.name));
    if routed {
        let id = ROUTER_PORT_BASE | subnet.vni;
        Leg {
            id,
            ifname: router_ifname(subnet.vlan),
            mac: Mac::for_port(owner, id),
            address: subnet.cidr.gateway(),
            router: true,
        }
    } else {
        Leg {
            id: SERVICE_PORT_BASE | subnet.vni,
            ifname: format!("dh{}", subnet.vlan),
            mac: service_mac(subnet.vni),
            address: subnet.cidr.service(),
            router: false,
        }
    }
}

/// The MAC of the service legs of VNI `vni`: the same on every host.
pub fn service_mac(vni: u32) -> Mac {
    Mac::for_port("vpcd-service-leg", SERVICE_PORT_BASE | vni)
}

/// The served subnets with their legs.
fn legs<'a>(st: &'a NetState, owner: &str) -> Vec<(&'a Network, &'a Subnet, Leg)> {
    let served = served(st);
    st.networks
        .values()
        .flat_map(|n| n.subnets.values().map(move |s| (n, s)))
        .filter(|(n, s)| served.contains(&(n.name.clone(), s.name.clone())))
        .map(|(n, s)| (n, s, leg(st, n, s, owner)))
        .collect()
}

/// The router legs as (VNI, MAC, gateway address).
pub fn router_endpoints(st: &NetState, owner: &str) -> Vec<(u32, Mac, Ipv4Addr)> {
    legs(st, owner)
        .into_iter()
        .filter(|(_, _, l)| l.router)
        .map(|(_, s, l)| (s.vni, l.mac, l.address))
        .collect()
}

/// The service legs' (VxLAN device, MAC) pairs whose frames must stay on this host.
pub fn local_ports(st: &NetState, prefix: &str, owner: &str) -> Vec<(String, Mac)> {
    legs(st, owner)
        .into_iter()
        .filter(|(_, _, l)| !l.router)
        .map(|(_, s, l)| (netdrv::names::vxlan(prefix, s.vni), l.mac))
        .collect()
}

/// Adds the legs to `host` (the desired state netdrv makes).
pub fn add_legs(st: &NetState, host: &mut HostNet, prefix: &str, owner: &str) {
    for (net, subnet, leg) in legs(st, owner) {
        let Some(tenant) = host.tenants.iter_mut().find(|t| t.id == net.id) else {
            continue;
        };
        tenant.ports.push(PortNet {
            id: leg.id,
            subnet: subnet.name.clone(),
            kind: PortKind::Veth {
                netns: PathBuf::from("/run/netns").join(namespace(prefix, owner, net.id)),
                ifname: leg.ifname,
                address: Some((leg.address, subnet.cidr.prefix())),
            },
            mac: leg.mac,
            security: None,
        });
    }
}

struct Served {
    /// The leg it serves on; a changed leg (a subnet attached to or detached from the router)
    /// is a new interface, so the server starts again.
    leg: Leg,
    server: Arc<RwLock<DhcpServer>>,
    _service: DhcpService,
}

/// The running DHCP servers of this host.
#[derive(Default)]
pub struct DhcpAgent {
    running: Mutex<BTreeMap<(String, String), Served>>,
}

impl std::fmt::Debug for DhcpAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<_> = self.running.lock().unwrap().keys().cloned().collect();
        f.debug_struct("DhcpAgent").field("serving", &keys).finish()
    }
}

impl DhcpAgent {
    /// Makes the service namespaces the state needs (before netdrv moves legs into them).
    pub fn prepare(&self, st: &NetState, prefix: &str, owner: &str) -> Result<()> {
        let tenants: BTreeSet<u32> = served(st)
            .iter()
            .filter_map(|(n, _)| st.networks.get(n).map(|n| n.id))
            .collect();
        for id in tenants {
            Netns::create_named(&namespace(prefix, owner, id))?;
        }
        Ok(())
    }

    /// After netdrv applied the state: starts, updates and stops servers, and removes service
    /// namespaces no tenant needs any more.
    pub async fn sync(
        &self,
        st: &NetState,
        prefix: &str,
        owner: &str,
        mtu: u32,
        settings: &DhcpSettings,
    ) -> Result<()> {
        let served = served(st);
        let stale: Vec<(String, String)> = self
            .running
            .lock()
            .unwrap()
            .keys()
            .filter(|k| !served.contains(*k))
            .cloned()
            .collect();
        for k in stale {
            self.running.lock().unwrap().remove(&k);
        }
        for (net, subnet, leg) in legs(st, owner) {
            let leases: Vec<(Mac, Ipv4Addr)> = st
                .ports
                .values()
                .filter(|p| p.network == net.name && p.subnet == subnet.name)
                .map(|p| (p.mac, p.ip))
                .collect();
            let key = (net.name.clone(), subnet.name.clone());
            {
                let mut running = self.running.lock().unwrap();
                match running.get(&key) {
                    Some(s) if s.leg == leg => {
                        s.server.write().unwrap().set_leases(leases);
                        continue;
                    }
                    Some(_) => drop(running.remove(&key)),
                    None => {}
                }
            }
            let routes = if leg.router {
                Vec::new()
            } else {
                let (ip, len) = METADATA_ROUTE;
                vec![(
                    ipnet::Ipv4Net::new(ip, len).expect("a /32 is valid"),
                    leg.address,
                )]
            };
            let mut server = DhcpServer::new(DhcpConfig {
                server: leg.address,
                subnet: subnet.cidr,
                router: Some(subnet.cidr.gateway()),
                dns: settings.dns.clone(),
                domain: settings.domain.clone(),
                mtu: u16::try_from(mtu).ok(),
                lease_secs: settings.lease_secs,
                routes,
            });
            server.set_leases(leases);
            let server = Arc::new(RwLock::new(server));
            let ns = Netns::named(&namespace(prefix, owner, net.id))?;
            let service = DhcpService::spawn(&ns, &leg.ifname, server.clone()).await?;
            tracing::info!(network = %net.name, subnet = %subnet.name, leg = %leg.ifname, "serving DHCP");
            self.running.lock().unwrap().insert(
                key,
                Served {
                    leg,
                    server,
                    _service: service,
                },
            );
        }
        // Namespaces of tenants without served subnets.
        let needed: BTreeSet<String> = served
            .iter()
            .filter_map(|(n, _)| st.networks.get(n))
            .map(|n| namespace(prefix, owner, n.id))
            .collect();
        // (`-dhcp-` is the name earlier versions used.)
        let mine = [format!("{prefix}-svc-"), format!("{prefix}-dhcp-")];
        let tail = format!("-{}", owner_tag(owner));
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if mine.iter().any(|m| name.starts_with(m.as_str()))
                    && name.ends_with(&tail)
                    && !needed.contains(&name)
                {
                    Netns::delete_named(&name)?;
                }
            }
        }
        Ok(())
    }
}
