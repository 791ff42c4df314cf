//! Routers made real, after netdrv has made the legs: in each tenant's service namespace
//! (`dhcp.rs`) this sets forwarding (on with a router), the external addresses (the router's
//! gateway address and its floating IPs on `ext0`), the static routes (default via the external
//! gateway, the router's own), the nftables table (`nat.rs`), and runs the metadata service on
//! 169.254.169.254 (on `lo`). Everything is derived from the store each time, so a restarted
//! vpcd converges the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use netdrv::{Netlink, Netns};

use super::metadata::{self, Instance, MetadataServer};
use super::nat::{self, RouterRules, EXTERNAL_IF};
use super::router::ExternalNet;
use super::state::{NetState, Port};
use super::{dhcp, DOC};
use crate::error::{Error, Result};
use crate::store::Store;

/// The metadata servers, per tenant id.
#[derive(Debug, Default)]
pub struct L3Agent {
    metadata: Mutex<BTreeMap<u32, MetadataServer>>,
    /// Floating IP mappings last applied per tenant, to flush the flows of ones that went.
    /// Filled at the first sync from the table in the namespace, so mappings removed while
    /// vpcd was down are flushed too.
    floating: Mutex<BTreeMap<u32, Vec<(Ipv4Addr, Ipv4Addr)>>>,
    /// The nft batch last applied per tenant, and the namespace's ruleset generation right
    /// after: the table is written again only if the batch changed or anything changed the
    /// ruleset since (drift, such as the table deleted by hand, is repaired at the next sync).
    tables: Mutex<BTreeMap<u32, nat::Written>>,
}

fn ns_err(what: &str, ns: &Netns, e: impl std::fmt::Display) -> Error {
    Error::Failed(format!("{what} in {}: {e}", ns.path().display()))
}

impl L3Agent {
    /// Brings every service namespace of `st` in line with it.
    #[allow(clippy::too_many_arguments)]
    pub async fn sync(
        &self,
        st: &NetState,
        prefix: &str,
        owner: &str,
        external: Option<&ExternalNet>,
        macvlan_parent: Option<u32>,
        host: &Netlink,
        store: &Arc<Store>,
    ) -> Result<()> {
        let tenants: BTreeSet<u32> = dhcp::served(st)
            .iter()
            .filter_map(|(n, _)| st.networks.get(n).map(|n| n.id))
            .collect();
        // What is kept per tenant goes with its namespace (a new one starts empty).
        self.metadata
            .lock()
            .unwrap()
            .retain(|id, _| tenants.contains(id));
        self.floating
            .lock()
            .unwrap()
            .retain(|id, _| tenants.contains(id));
        self.tables
            .lock()
            .unwrap()
            .retain(|id, _| tenants.contains(id));
        let mut errors = Vec::new();
        for net in st.networks.values().filter(|n| tenants.contains(&n.id)) {
            let ns = Netns::named(&dhcp::namespace(prefix, owner, net.id))?;
            let ext_leg = ExtLeg {
                macvlan_parent,
                host,
                name: netdrv::names::external(prefix, net.id),
                mac: dhcp::external_mac(owner, net.id),
                alias: netdrv::names::alias(owner),
            };
            let r = self
                .sync_one(st, &net.name, net.id, &ns, external, &ext_leg, store)
                .await;
            if let Err(e) = r {
                tracing::warn!(network = %net.name, "router: {e}");
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Failed(errors.join("; ")))
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn sync_one(
        &self,
        st: &NetState,
        network: &str,
        tenant: u32,
        ns: &Netns,
        external: Option<&ExternalNet>,
        ext_leg: &ExtLeg<'_>,
        store: &Arc<Store>,
    ) -> Result<()> {
        let nl = Netlink::open(ns)?;
        let router = st.router_of(network);
        let forwarding = if router.is_some() { "1" } else { "0" };
        ns.run(move || std::fs::write("/proc/sys/net/ipv4/ip_forward", forwarding))?
            .map_err(|e| ns_err("set ip_forward", ns, e))?;

        // The metadata service.
        nl.set_up("lo").await?;
        nl.add_address("lo", metadata::ADDRESS, 32).await?;
        let running = self.metadata.lock().unwrap().contains_key(&tenant);
        if !running {
            let server = MetadataServer::spawn(ns, lookup(store.clone(), network.to_string()))?;
            self.metadata.lock().unwrap().insert(tenant, server);
            tracing::info!(network, "metadata service on 169.254.169.254");
        }

        // External addresses: the gateway's and the floating IPs of ports behind the router.
        let ext = router
            .and_then(|r| r.external_ip.map(|ip| (r, ip)))
            .zip(external);
        let floating: Vec<(Ipv4Addr, Ipv4Addr)> = match ext {
            Some(((r, _), _)) => st
                .floating_ips
                .iter()
                .filter_map(|f| {
                    let p = st.ports.get(&f.port?)?;
                    (p.network == r.network && r.subnets.contains(&p.subnet))
                        .then_some((f.ip, p.ip))
                })
                .collect(),
            None => Vec::new(),
        };
        ext_leg.sync(&nl, ns, ext.is_some()).await?;
        if let Some(((_, ip), x)) = ext {
            let want: BTreeSet<(Ipv4Addr, u8)> = std::iter::once((ip, x.cidr.prefix()))
                .chain(floating.iter().map(|(f, _)| (*f, 32)))
                .collect();
            let have: BTreeSet<(Ipv4Addr, u8)> =
                nl.addresses(EXTERNAL_IF).await?.into_iter().collect();
            for (a, p) in have.difference(&want) {
                nl.del_address(EXTERNAL_IF, *a, *p).await?;
            }
            for (a, p) in want.difference(&have) {
                nl.add_address(EXTERNAL_IF, *a, *p).await?;
            }
        }

        // Static routes: default via the external gateway, then the router's own.
        let mut want: BTreeMap<(Ipv4Addr, u8), Ipv4Addr> = BTreeMap::new();
        if let Some((_, x)) = ext {
            want.insert((Ipv4Addr::UNSPECIFIED, 0), x.gateway);
        }
        for r in router.iter().flat_map(|r| &r.routes) {
            want.insert((r.dest, r.prefix), r.via);
        }
        for (dest, prefix, via) in nl.static_routes().await? {
            if want.get(&(dest, prefix)) != via.as_ref() {
                nl.del_route(dest, prefix).await?;
            }
        }
        for ((dest, prefix), via) in &want {
            nl.replace_route(*dest, *prefix, *via).await?;
        }

        // The nftables table.
        let known = self.floating.lock().unwrap().get(&tenant).cloned();
        let before = match known {
            Some(b) => b,
            None => {
                let ns2 = ns.clone();
                tokio::task::spawn_blocking(move || nat::floating_in(&ns2))
                    .await
                    .map_err(|e| Error::Failed(format!("nft: {e}")))??
            }
        };
        let gone: Vec<(Ipv4Addr, Ipv4Addr)> = before
            .into_iter()
            .filter(|m| !floating.contains(m))
            .collect();
        let batch = match router {
            Some(r) => {
                let subnets: Vec<_> = st.networks[network]
                    .subnets
                    .values()
                    .filter(|s| r.subnets.contains(&s.name))
                    .collect();
                nat::ruleset(&RouterRules {
                    legs: subnets
                        .iter()
                        .map(|s| dhcp::router_ifname(s.vlan))
                        .collect(),
                    subnets: subnets.iter().map(|s| s.cidr).collect(),
                    external_ip: ext.map(|((_, ip), _)| ip),
                    floating: floating.clone(),
                })
            }
            None => nat::removal(),
        };
        let last = self.tables.lock().unwrap().get(&tenant).cloned();
        let ns2 = ns.clone();
        let written = tokio::task::spawn_blocking(move || {
            let written = nat::sync_table(&ns2, &batch, last.as_ref(), !gone.is_empty())?;
            // Flows of a mapping that went would otherwise go on being translated until their
            // conntrack entries time out (days for TCP).
            for (fip, _) in &gone {
                nat::flush_flows(&ns2, *fip);
            }
            Ok::<_, Error>(written)
        })
        .await
        .map_err(|e| Error::Failed(format!("nft: {e}")))??;
        self.floating.lock().unwrap().insert(tenant, floating);
        self.tables.lock().unwrap().insert(tenant, written);
        Ok(())
    }
}

/// A router's external leg when the external link is an interface: a macvlan on it, made in
/// the host namespace as `<prefix>e<tenant>` (with vpcd's alias, so the planner removes one a
/// crash left there), then moved into the router namespace as `ext0`. (On a bridge the leg is
/// a veth that netdrv's planner makes.)
struct ExtLeg<'a> {
    macvlan_parent: Option<u32>,
    host: &'a Netlink,
    name: String,
    mac: netdrv::ipam::Mac,
    alias: String,
}

impl ExtLeg<'_> {
    async fn sync(&self, nl: &Netlink, ns: &Netns, wanted: bool) -> Result<()> {
        let Some(parent) = self.macvlan_parent else {
            return Ok(());
        };
        let have = match nl.index_of(EXTERNAL_IF).await? {
            Some(_) => Some(nl.link(EXTERNAL_IF).await?),
            None => None,
        };
        match (wanted, have) {
            (true, None) => {
                let h = self.host;
                // What a crash between the steps below can leave.
                h.delete(&self.name).await?;
                nl.delete(&self.name).await?;
                h.create_macvlan(&self.name, parent, self.mac.0).await?;
                h.set_alias(&self.name, &self.alias).await?;
                h.move_to(&self.name, ns).await?;
                nl.rename(&self.name, EXTERNAL_IF).await?;
                nl.set_up(EXTERNAL_IF).await?;
                tracing::info!(leg = %self.name, "external leg (macvlan) made");
            }
            (true, Some(l)) if !l.up => nl.set_up(EXTERNAL_IF).await?,
            (false, Some(l)) if l.kind.as_deref() == Some("macvlan") => {
                nl.delete(EXTERNAL_IF).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The metadata lookup of tenant `network`: source address -> its VM, from the store.
fn lookup(store: Arc<Store>, network: String) -> metadata::Lookup {
    Arc::new(move |src| {
        let st: NetState = store.doc(DOC).ok()?;
        let port: &Port = st
            .ports
            .values()
            .find(|p| p.network == network && p.ip == src)?;
        let vm = port.vm.as_ref()?;
        let rec = store.get(vm).ok()??;
        let ci = rec.spec.cloud_init.as_ref();
        Some(Instance {
            uuid: rec.uuid.to_string(),
            name: vm.clone(),
            hostname: ci
                .and_then(|c| c.hostname.clone())
                .unwrap_or_else(|| vm.clone()),
            local_ipv4: port.ip,
            public_ipv4: st
                .floating_ips
                .iter()
                .find(|f| f.port == Some(port.id))
                .map(|f| f.ip),
            user_data: ci.and_then(|c| c.user_data.clone()),
            public_keys: ci
                .map(|c| c.ssh_authorized_keys.clone())
                .unwrap_or_default(),
        })
    })
}
