//! Tenant networks on this host: the state in the store ([`state`]) and its application to the
//! kernel through netdrv. Every change is one store transaction followed by a full
//! reconciliation of the host (plan + apply); if applying fails, the previous state is restored
//! in the store and on the host, so nothing is half-created.

mod dhcp;
pub mod evpn;
pub use dhcp::DhcpSettings;
mod l3;
pub mod metadata;
pub mod nat;
pub mod router;
pub mod state;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use netdrv::filter::{FilterKind, PortCounters};
use netdrv::model::Underlay;
use netdrv::{NetHost, Netns};

use crate::error::{Error, Result};
use crate::store::Store;
use state::{NetState, Network, Port, PortDevice, PortRequest, Subnet};

pub(crate) const DOC: &str = "netstate";

/// Host settings for tenant networks (from vpcd's configuration).
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub netns: Netns,
    pub prefix: String,
    pub owner: String,
    pub underlay: Option<Underlay>,
    pub peers: Vec<Ipv4Addr>,
    pub pin_dir: PathBuf,
    /// The VLAN filter implementation; `None`: probe the kernel.
    pub filter: Option<FilterKind>,
    /// The external network of routers, if this host has one.
    pub external: Option<router::ExternalNet>,
    /// What DHCP hands out besides addresses and routes.
    pub dhcp: dhcp::DhcpSettings,
    /// Whether this host has the route role (may hold routers).
    pub route_role: bool,
    /// EVPN (BGP to route reflectors) instead of static FDB entries, if set.
    pub evpn: Option<evpn::EvpnConfig>,
}

/// The tenant networks of this host.
#[derive(Debug)]
pub struct NetManager {
    store: Arc<Store>,
    host: NetHost,
    cfg: NetConfig,
    dhcp: dhcp::DhcpAgent,
    l3: l3::L3Agent,
    evpn: Option<evpn::EvpnAgent>,
    /// Signalled when EVPN learned something (taken by the manager's follower task).
    evpn_dirty: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<()>>>,
    /// The host-namespace local-port table last written (`nat::local_ruleset`).
    local_table: std::sync::Mutex<Option<nat::Written>>,
    lock: tokio::sync::Mutex<()>,
}

impl NetManager {
    /// Opens the VLAN filter (taking over pinned programs of an earlier run) and netlink in the
    /// host namespace, then reconciles the host with the store.
    pub async fn open(store: Arc<Store>, cfg: NetConfig) -> Result<NetManager> {
        let kind = match cfg.filter {
            Some(kind) => {
                netdrv::filter::check(kind)?;
                kind
            }
            None => netdrv::filter::probe()?,
        };
        let filter = netdrv::filter::open(kind, &cfg.netns, &cfg.pin_dir)?;
        tracing::info!(vlan_filter = %kind, "VLAN filter open");
        let host = NetHost::open(&cfg.netns, filter)?;
        let (evpn, evpn_dirty) = match &cfg.evpn {
            Some(e) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (
                    Some(evpn::EvpnAgent::start(e.clone(), &cfg.netns, tx)),
                    Some(rx),
                )
            }
            None => (None, None),
        };
        let m = NetManager {
            store,
            host,
            cfg,
            dhcp: dhcp::DhcpAgent::default(),
            l3: l3::L3Agent::default(),
            evpn,
            evpn_dirty: std::sync::Mutex::new(evpn_dirty),
            local_table: std::sync::Mutex::new(None),
            lock: tokio::sync::Mutex::new(()),
        };
        // A host that cannot be brought fully in line (a missing external link, a namespace
        // gone) still serves the API, so the operator can fix or delete what fails; every
        // change reconciles again.
        if let Err(e) = m.reconcile().await {
            tracing::error!("tenant networks could not be fully applied at start: {e}");
        }
        Ok(m)
    }

    /// The EVPN agent, if EVPN is on.
    pub fn evpn(&self) -> Option<&evpn::EvpnAgent> {
        self.evpn.as_ref()
    }

    /// The receiver of "EVPN learned something" (once).
    pub fn take_evpn_dirty(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<()>> {
        self.evpn_dirty.lock().unwrap().take()
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    pub fn state(&self) -> Result<NetState> {
        Ok(self.store.doc(DOC)?)
    }

    /// How routers join the external network: `Some(None)` through veths into the bridge
    /// `external_link`, `Some(Some(ifindex))` through macvlans on the interface; `None` when
    /// none is configured or the link is missing, which is an error only while a router has a
    /// gateway.
    async fn external_mode(&self, st: &NetState) -> Result<Option<Option<u32>>> {
        let Some(x) = &self.cfg.external else {
            return Ok(None);
        };
        let needed = st.routers.values().any(|r| r.external_ip.is_some());
        let nl = self.host.netlink();
        if nl.index_of(&x.link).await?.is_none() {
            if needed {
                return Err(Error::Unavailable(format!(
                    "external link {} does not exist on this host",
                    x.link
                )));
            }
            return Ok(None);
        }
        let link = nl.link(&x.link).await?;
        Ok(Some(
            (link.kind.as_deref() != Some("bridge")).then_some(link.index),
        ))
    }

    /// What the host should have. A namespace port whose namespace is gone cannot be made; it
    /// is left out (and reported), so it does not block every other change.
    fn desired(&self, st: &NetState, external: Option<Option<u32>>) -> netdrv::model::HostNet {
        let mut st = st.clone();
        st.ports.retain(|id, p| match &p.device {
            PortDevice::Veth { netns, .. } if !netns.exists() => {
                tracing::warn!(port = id, netns = %netns.display(), "namespace of port is gone; port left out");
                false
            }
            _ => true,
        });
        let mut host = st.desired(
            &self.cfg.prefix,
            &self.cfg.owner,
            self.cfg.underlay,
            &self.cfg.peers,
        );
        dhcp::add_legs(&st, &mut host, &self.cfg.prefix, &self.cfg.owner);
        if let Some(e) = &self.evpn {
            let (floods, macs, neighbours) = e.remote();
            host.floods = floods;
            host.remote_macs.extend(macs);
            host.neighbours = neighbours;
            host.vxlan_port_learning = false;
        }
        if let (Some(x), Some(None)) = (&self.cfg.external, external) {
            dhcp::add_external_legs(&st, &mut host, &self.cfg.prefix, &self.cfg.owner, &x.link);
        }
        host
    }

    /// Makes the host match `st`: service namespaces, links and filters, DHCP servers.
    async fn realize(&self, st: &NetState) -> Result<Vec<netdrv::plan::Op>> {
        let (prefix, owner) = (&self.cfg.prefix, &self.cfg.owner);
        let t0 = std::time::Instant::now();
        self.dhcp.prepare(st, prefix, owner)?;
        // Before any service leg exists, so none of its frames reaches another host.
        self.keep_service_legs_local(st).await?;
        let external = self.external_mode(st).await?;
        let desired = self.desired(st, external);
        let t1 = std::time::Instant::now();
        let ops = self.host.apply(&desired).await?;
        let t2 = std::time::Instant::now();
        // The ports exist now: tell the other hosts at once (DHCP and routers come after).
        if let Some(e) = &self.evpn {
            e.advertise(&evpn::endpoints(st, owner));
        }
        self.dhcp
            .sync(st, prefix, owner, desired.port_mtu(), &self.cfg.dhcp)
            .await?;
        let t3 = std::time::Instant::now();
        let macvlan_parent = external.flatten();
        self.l3
            .sync(
                st,
                prefix,
                owner,
                self.cfg.external.as_ref(),
                macvlan_parent,
                self.host.netlink(),
                &self.store,
            )
            .await?;
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
        tracing::debug!(
            prepare_ms = ms(t0, t1),
            links_ms = ms(t1, t2),
            dhcp_ms = ms(t2, t3),
            l3_ms = ms(t3, std::time::Instant::now()),
            ops = ops.len(),
            "realized"
        );
        Ok(ops)
    }

    /// Writes the host-namespace table that keeps `st`'s service legs off the VxLAN devices
    /// (unless it is there as written last).
    async fn keep_service_legs_local(&self, st: &NetState) -> Result<()> {
        let (prefix, owner) = (&self.cfg.prefix, &self.cfg.owner);
        let ports = match self.cfg.underlay {
            Some(_) => dhcp::local_ports(st, prefix, owner),
            None => Vec::new(),
        };
        let batch = nat::local_ruleset(prefix, &ports);
        let last = self.local_table.lock().unwrap().clone();
        let ns = self.cfg.netns.clone();
        let written =
            tokio::task::spawn_blocking(move || nat::sync_table(&ns, &batch, last.as_ref(), false))
                .await
                .map_err(|e| Error::Failed(format!("nft: {e}")))??;
        *self.local_table.lock().unwrap() = Some(written);
        Ok(())
    }

    /// Applies the stored state to the host.
    pub async fn reconcile(&self) -> Result<()> {
        let _g = self.lock.lock().await;
        let st = self.state()?;
        let ops = self.realize(&st).await?;
        let changes = ops
            .iter()
            .filter(|o| !matches!(o, netdrv::plan::Op::SetFilter { .. }))
            .count();
        if changes > 0 {
            tracing::info!(changes, "reconciled tenant networks");
        }
        Ok(())
    }

    /// Runs `f` on the state, stores the result and applies it; undoes both if applying fails.
    async fn change<T>(&self, f: impl FnOnce(&mut NetState) -> Result<T>) -> Result<T> {
        let _g = self.lock.lock().await;
        let before = self.state()?;
        let mut st = before.clone();
        let out = f(&mut st)?;
        self.store.put_doc(DOC, &st)?;
        // Tell the other hosts at once: the addresses are decided, and their devices follow
        // within milliseconds (a failure below withdraws them again with the rollback).
        if let Some(e) = &self.evpn {
            e.advertise(&evpn::endpoints(&st, &self.cfg.owner));
        }
        if let Err(e) = self.realize(&st).await {
            tracing::warn!("applying a network change failed, rolling back: {e}");
            self.store.put_doc(DOC, &before)?;
            if let Err(e2) = self.realize(&before).await {
                tracing::warn!("rolling back the network change: {e2}");
            }
            return Err(e);
        }
        Ok(out)
    }

    pub async fn create_network(&self, name: &str) -> Result<Network> {
        self.change(|st| st.add_network(name)).await
    }

    pub async fn delete_network(&self, name: &str) -> Result<()> {
        self.change(|st| st.remove_network(name).map(drop)).await
    }

    pub async fn create_subnet(
        &self,
        network: &str,
        name: &str,
        cidr: &str,
        vni: Option<u32>,
        vlan: Option<u16>,
    ) -> Result<Subnet> {
        self.change(|st| st.add_subnet(network, name, cidr, vni, vlan))
            .await
    }

    pub async fn delete_subnet(&self, network: &str, name: &str) -> Result<()> {
        self.change(|st| st.remove_subnet(network, name).map(drop))
            .await
    }

    pub async fn create_port(&self, req: &PortRequest) -> Result<Port> {
        let owner = self.cfg.owner.clone();
        if let Some(PortDevice::Veth { netns, .. }) = &req.device {
            Netns::open(netns).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        }
        self.change(|st| st.add_port(req, &owner)).await
    }

    /// Creates several ports at once (a VM's NICs): all or none.
    pub async fn create_ports(&self, reqs: &[PortRequest]) -> Result<Vec<Port>> {
        let owner = self.cfg.owner.clone();
        self.change(|st| reqs.iter().map(|r| st.add_port(r, &owner)).collect())
            .await
    }

    pub async fn delete_port(&self, id: u32) -> Result<()> {
        self.change(|st| st.remove_port(id).map(drop)).await
    }

    /// Removes every port of the VM `vm` (idempotent).
    pub async fn delete_vm_ports(&self, vm: &str) -> Result<()> {
        self.change(|st| {
            let ids: Vec<u32> = st
                .ports
                .values()
                .filter(|p| p.vm.as_deref() == Some(vm))
                .map(|p| p.id)
                .collect();
            for id in ids {
                st.remove_port(id)?;
            }
            Ok(())
        })
        .await
    }

    pub async fn add_remote_mac(
        &self,
        network: &str,
        subnet: &str,
        mac: netdrv::ipam::Mac,
        vtep: Ipv4Addr,
    ) -> Result<()> {
        self.change(|st| st.add_remote_mac(network, subnet, mac, vtep))
            .await
    }

    pub async fn remove_remote_mac(
        &self,
        network: &str,
        subnet: &str,
        mac: netdrv::ipam::Mac,
    ) -> Result<()> {
        self.change(|st| st.remove_remote_mac(network, subnet, mac))
            .await
    }

    pub async fn set_port_security(&self, id: u32, on: bool) -> Result<()> {
        self.change(|st| {
            st.port_mut(id)?.port_security = on;
            Ok(())
        })
        .await
    }

    pub async fn create_router(&self, name: &str, network: &str) -> Result<router::Router> {
        if !self.cfg.route_role {
            return Err(Error::InvalidState(format!(
                "router {name}: this host does not have the route role (roles in vpcd.toml)"
            )));
        }
        self.change(|st| st.add_router(name, network)).await
    }

    pub async fn delete_router(&self, name: &str) -> Result<()> {
        self.change(|st| st.remove_router(name).map(drop)).await
    }

    pub async fn router_add_subnet(&self, name: &str, subnet: &str) -> Result<()> {
        self.change(|st| st.router_add_subnet(name, subnet)).await
    }

    pub async fn router_remove_subnet(&self, name: &str, subnet: &str) -> Result<()> {
        self.change(|st| st.router_remove_subnet(name, subnet))
            .await
    }

    /// Gives the router an address on the external network (`ip`, or the pool's next free).
    pub async fn router_set_gateway(&self, name: &str, ip: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
        let ext = self.cfg.external.clone();
        self.change(|st| st.router_set_gateway(name, ip, ext.as_ref()))
            .await
    }

    pub async fn router_clear_gateway(&self, name: &str) -> Result<()> {
        self.change(|st| st.router_clear_gateway(name)).await
    }

    pub async fn router_add_route(&self, name: &str, dest: &str, via: Ipv4Addr) -> Result<()> {
        let ext = self.cfg.external.clone();
        self.change(|st| st.router_add_route(name, dest, via, ext.as_ref()))
            .await
    }

    pub async fn router_remove_route(&self, name: &str, dest: &str) -> Result<()> {
        self.change(|st| st.router_remove_route(name, dest)).await
    }

    pub async fn create_floating_ip(&self, ip: Option<Ipv4Addr>) -> Result<router::FloatingIp> {
        let ext = self.cfg.external.clone();
        self.change(|st| st.create_floating_ip(ip, ext.as_ref()))
            .await
    }

    pub async fn attach_floating_ip(&self, ip: Ipv4Addr, port: u32) -> Result<()> {
        self.change(|st| st.attach_floating_ip(ip, port)).await
    }

    pub async fn detach_floating_ip(&self, ip: Ipv4Addr) -> Result<()> {
        self.change(|st| st.detach_floating_ip(ip)).await
    }

    pub async fn delete_floating_ip(&self, ip: Ipv4Addr) -> Result<()> {
        self.change(|st| st.delete_floating_ip(ip)).await
    }

    /// The service (router) namespace of network `network` on this host, if it has one.
    pub fn router_namespace(&self, network: &str) -> Result<Option<String>> {
        let st = self.state()?;
        let net = st.network(network)?;
        let has = dhcp::served(&st).iter().any(|(n, _)| n == network);
        Ok(has.then(|| dhcp::namespace(&self.cfg.prefix, &self.cfg.owner, net.id)))
    }

    /// The link that carries port `p` on this host.
    pub fn device_name(&self, p: &Port) -> String {
        match p.device {
            PortDevice::Tap => netdrv::names::tap(&self.cfg.prefix, p.id),
            PortDevice::Veth { .. } => netdrv::names::veth(&self.cfg.prefix, p.id),
        }
    }

    pub async fn counters(&self, id: u32) -> Result<PortCounters> {
        let st = self.state()?;
        let p = st
            .ports
            .get(&id)
            .ok_or_else(|| Error::NotFound(format!("port {id}")))?;
        Ok(self.host.counters(&self.device_name(p)).await?)
    }
}
