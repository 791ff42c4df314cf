//! The service namespace of each tenant on this host, its legs and their DHCP servers: per
//! tenant with ports here or a router, a namespace `<prefix>-svc-<tenant>-<owner8>`; per subnet
//! with ports here or attached to the router, a leg into the tenant bridge (a veth, an access
//! port of the subnet's VLAN, port security off) holding the subnet's gateway address, and a
//! DHCP server on it that answers from the IPAM's static leases. With a router the namespace
//! is the router (`l3.rs`); without, it only serves DHCP, as Neutron's DHCP agent does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use netdrv::dhcp::{DhcpConfig, DhcpServer, DhcpService};
use netdrv::ipam::Mac;
use netdrv::model::{HostNet, PortKind, PortNet};
use netdrv::Netns;

use super::state::NetState;
use crate::error::Result;

/// Port ids of service legs: above any real port id, one per VNI (unique on a host).
const SERVICE_PORT_BASE: u32 = 0xf000_0000;
/// Lease time handed out.
const LEASE_SECS: u32 = 3600;

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

/// The leg's interface name inside the service namespace.
pub(crate) fn leg_ifname(vlan: u16) -> String {
    format!("dh{vlan}")
}

/// Adds the service legs to `host` (the desired state netdrv makes).
pub fn add_legs(st: &NetState, host: &mut HostNet, prefix: &str, owner: &str) {
    let served = served(st);
    for tenant in &mut host.tenants {
        let Some(net) = st.networks.values().find(|n| n.id == tenant.id) else {
            continue;
        };
        let ns = PathBuf::from("/run/netns").join(namespace(prefix, owner, net.id));
        for subnet in net.subnets.values() {
            if !served.contains(&(net.name.clone(), subnet.name.clone())) {
                continue;
            }
            let id = SERVICE_PORT_BASE | subnet.vni;
            tenant.ports.push(PortNet {
                id,
                subnet: subnet.name.clone(),
                kind: PortKind::Veth {
                    netns: ns.clone(),
                    ifname: leg_ifname(subnet.vlan),
                    address: Some((subnet.cidr.gateway(), subnet.cidr.prefix())),
                },
                mac: Mac::for_port(owner, id),
                security: None,
            });
        }
    }
}

struct Served {
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
        dns: &[Ipv4Addr],
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
        for (network, subnet_name) in &served {
            let Some(net) = st.networks.get(network) else {
                continue;
            };
            let Some(subnet) = net.subnets.get(subnet_name) else {
                continue;
            };
            let leases: Vec<(Mac, Ipv4Addr)> = st
                .ports
                .values()
                .filter(|p| &p.network == network && &p.subnet == subnet_name)
                .map(|p| (p.mac, p.ip))
                .collect();
            let key = (network.clone(), subnet_name.clone());
            if let Some(s) = self.running.lock().unwrap().get(&key) {
                s.server.write().unwrap().set_leases(leases);
                continue;
            }
            let mut server = DhcpServer::new(DhcpConfig {
                server: subnet.cidr.gateway(),
                subnet: subnet.cidr,
                router: Some(subnet.cidr.gateway()),
                dns: dns.to_vec(),
                domain: None,
                mtu: u16::try_from(mtu).ok(),
                lease_secs: LEASE_SECS,
                routes: Vec::new(),
            });
            server.set_leases(leases);
            let server = Arc::new(RwLock::new(server));
            let ns = Netns::named(&namespace(prefix, owner, net.id))?;
            let service = DhcpService::spawn(&ns, &leg_ifname(subnet.vlan), server.clone()).await?;
            tracing::info!(network, subnet = subnet_name, "serving DHCP");
            self.running.lock().unwrap().insert(
                key,
                Served {
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
