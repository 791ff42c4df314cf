//! The EVPN control plane of a compute host: iBGP sessions to route reflectors
//! (`netdrv::bgp::session`), advertising from the port database (no data-plane learning) and
//! installing what is learned through netdrv's plan.
//!
//! Advertised, per subnet with ports or a router leg on this host: a type-3 route (RD
//! `<ASN>:<VNI>`, PMSI tunnel ingress replication with the VNI as label and this host's VTEP)
//! and a type-2 route per port and router leg (MAC, IPv4, VNI as label 1), each with the route
//! target `<ASN & 0xFFFF>:<VNI>` (FRR's auto-derived one) and the VxLAN encapsulation
//! community. Service legs are local and not
//! announced. The tenant bridges do not learn on their VxLAN ports in this mode. Learned: remote type-3 routes become
//! head-end-replication flood entries on the VNI's VxLAN device, type-2 routes static FDB
//! entries (VxLAN device, remote VTEP). Routes of a session that went down are kept for its
//! hold time (traffic keeps flowing while a route reflector restarts), then removed unless the
//! session came back and announced them again.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netdrv::bgp::session::{Session, SessionConfig, SessionEvent, SessionState};
use netdrv::bgp::wire::{
    route_target, vxlan_encapsulation, Attributes, EvpnRoute, PmsiTunnel, Rd, RouteKey,
    PMSI_INGRESS_REPLICATION,
};
use netdrv::ipam::Mac;
use netdrv::Netns;

use super::state::NetState;

/// How this host speaks EVPN.
#[derive(Debug, Clone)]
pub struct EvpnConfig {
    pub asn: u32,
    /// Router id and VTEP address (the underlay address).
    pub router_id: Ipv4Addr,
    pub peers: Vec<SocketAddr>,
    pub hold_time: u16,
    /// Keepalive interval, seconds; 0: a third of the negotiated hold time.
    pub keepalive: u16,
}

#[derive(Debug, Clone)]
struct Learned {
    vni: u32,
    vtep: Ipv4Addr,
    mac: Option<Mac>,
    /// The IPv4 address a type-2 route carries.
    ip: Option<Ipv4Addr>,
    /// Since when the route's session has been down.
    stale_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    /// (session index, route key) -> what it says.
    learned: BTreeMap<(usize, RouteKey), Learned>,
    /// What this host announces now.
    announced: BTreeMap<RouteKey, EvpnRoute>,
    /// The VNI of each announced type-3 route (its key holds none).
    vni_of: BTreeMap<RouteKey, u32>,
}

/// What a host announces a type-2 route for: (VNI, MAC, IPv4); each VNI also gets its type-3.
pub type Endpoint = (u32, Mac, Ipv4Addr);

/// The endpoints of `st` on this host: its ports, and its router legs (the gateways other
/// hosts' VMs send to; service legs stay local and are not announced).
pub fn endpoints(st: &NetState, owner: &str) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = st
        .ports
        .values()
        .filter_map(|p| {
            let subnet = st.networks.get(&p.network)?.subnets.get(&p.subnet)?;
            Some((subnet.vni, p.mac, p.ip))
        })
        .collect();
    out.extend(super::dhcp::router_endpoints(st, owner));
    out
}

/// What was learned, for netdrv: flood entries (VNI, VTEP), remote MACs (VNI, MAC, VTEP) and
/// neighbours for ARP suppression (VNI, IPv4, MAC).
pub type Remote = (
    Vec<(u32, Ipv4Addr)>,
    Vec<(u32, Mac, Ipv4Addr)>,
    Vec<(u32, Ipv4Addr, Mac)>,
);

/// A session's state for the API: (peer, state, established since, prefixes received).
pub type PeerStatus = (String, String, u64, u64);

#[derive(Debug)]
pub struct EvpnAgent {
    cfg: EvpnConfig,
    sessions: Vec<Session>,
    inner: Arc<Mutex<Inner>>,
}

/// RD type 0 `<ASN>:<VNI>` (the whole 24-bit VNI fits; AS_TRANS stands for a 4-octet AS). Routes
/// of different hosts stay apart by their keys (originating router, MAC).
fn rd(asn: u32, vni: u32) -> Rd {
    let mut b = [0u8; 8];
    b[2..4].copy_from_slice(&u16::try_from(asn).unwrap_or(23456).to_be_bytes());
    b[4..8].copy_from_slice(&vni.to_be_bytes());
    Rd(b)
}

impl EvpnAgent {
    /// Starts a session per peer; `dirty` gets a message whenever learned routes change.
    pub fn start(
        cfg: EvpnConfig,
        netns: &Netns,
        dirty: tokio::sync::mpsc::UnboundedSender<()>,
    ) -> EvpnAgent {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let mut sessions = Vec::new();
        for (i, peer) in cfg.peers.iter().enumerate() {
            let mut sc = SessionConfig::new(cfg.asn, cfg.router_id, *peer, netns.clone());
            sc.hold_time = cfg.hold_time;
            sc.keepalive = (cfg.keepalive != 0).then(|| Duration::from_secs(cfg.keepalive.into()));
            let mut s = Session::spawn(sc);
            let mut events = s.events();
            let (inner, dirty, me) = (inner.clone(), dirty.clone(), cfg.router_id);
            tokio::spawn(async move {
                while let Some(ev) = events.recv().await {
                    if learn(&inner, i, me, ev) {
                        let _ = dirty.send(());
                    }
                }
            });
            sessions.push(s);
        }
        tracing::info!(asn = cfg.asn, router_id = %cfg.router_id, peers = ?cfg.peers, "EVPN on");
        EvpnAgent {
            cfg,
            sessions,
            inner,
        }
    }

    /// Announces this host's routes for its endpoints and withdraws the ones that went.
    pub fn advertise(&self, endpoints: &[Endpoint]) {
        let me = self.cfg.router_id;
        let attrs = |vni: u32, pmsi: bool| Attributes {
            origin: Some(0),
            local_pref: Some(100),
            ext_communities: vec![route_target(self.cfg.asn, vni), vxlan_encapsulation()],
            pmsi: pmsi.then_some(PmsiTunnel {
                flags: 0,
                tunnel_type: PMSI_INGRESS_REPLICATION,
                label: vni,
                endpoint: IpAddr::V4(me),
            }),
            ..Default::default()
        };
        let mut want: BTreeMap<RouteKey, (EvpnRoute, Attributes)> = BTreeMap::new();
        for &(vni, mac, ip) in endpoints {
            let t3 = EvpnRoute::InclusiveMulticast {
                rd: rd(self.cfg.asn, vni),
                eth_tag: 0,
                origin: IpAddr::V4(me),
            };
            want.insert(t3.key(), (t3, attrs(vni, true)));
            let t2 = EvpnRoute::MacIp {
                rd: rd(self.cfg.asn, vni),
                esi: [0; 10],
                eth_tag: 0,
                mac: mac.0,
                ip: Some(IpAddr::V4(ip)),
                vni,
                vni2: None,
            };
            want.insert(t2.key(), (t2, attrs(vni, false)));
        }
        let mut inner = self.inner.lock().unwrap();
        let gone: Vec<EvpnRoute> = inner
            .announced
            .iter()
            .filter(|(k, _)| !want.contains_key(*k))
            .map(|(_, r)| r.clone())
            .collect();
        let new: Vec<(EvpnRoute, Attributes)> = want
            .iter()
            .filter(|(k, _)| !inner.announced.contains_key(*k))
            .map(|(_, v)| v.clone())
            .collect();
        for s in &self.sessions {
            if !gone.is_empty() {
                s.withdraw(gone.clone());
            }
            if !new.is_empty() {
                s.announce(new.clone());
            }
        }
        inner.vni_of = want
            .iter()
            .filter_map(|(k, (_, a))| a.pmsi.as_ref().map(|p| (k.clone(), p.label)))
            .collect();
        inner.announced = want.into_iter().map(|(k, (r, _))| (k, r)).collect();
    }

    /// What was learned: flood entries (VNI, VTEP) and remote MACs (VNI, MAC, VTEP).
    pub fn remote(&self) -> Remote {
        let inner = self.inner.lock().unwrap();
        let mut floods: Vec<(u32, Ipv4Addr)> = Vec::new();
        let mut macs: BTreeMap<(u32, Mac), Ipv4Addr> = BTreeMap::new();
        let mut neighbours: BTreeMap<(u32, Ipv4Addr), Mac> = BTreeMap::new();
        for l in inner.learned.values() {
            match l.mac {
                None => floods.push((l.vni, l.vtep)),
                Some(m) => {
                    macs.insert((l.vni, m), l.vtep);
                    if let Some(ip) = l.ip {
                        neighbours.insert((l.vni, ip), m);
                    }
                }
            }
        }
        floods.sort();
        floods.dedup();
        (
            floods,
            macs.into_iter().map(|((v, m), t)| (v, m, t)).collect(),
            neighbours
                .into_iter()
                .map(|((v, i), m)| (v, i, m))
                .collect(),
        )
    }

    /// Forgets routes of sessions down for longer than the hold time; true if any went.
    pub fn sweep(&self) -> bool {
        let grace = Duration::from_secs(u64::from(self.cfg.hold_time.max(3)));
        let mut inner = self.inner.lock().unwrap();
        let before = inner.learned.len();
        inner
            .learned
            .retain(|_, l| l.stale_since.is_none_or(|t| t.elapsed() < grace));
        before != inner.learned.len()
    }

    /// The sessions for the API.
    pub fn status(&self) -> Vec<PeerStatus> {
        let inner = self.inner.lock().unwrap();
        self.sessions
            .iter()
            .zip(&self.cfg.peers)
            .enumerate()
            .map(|(i, (s, peer))| {
                let (state, since) = match s.state() {
                    SessionState::Established { since, .. } => (
                        "established".to_string(),
                        since
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                    ),
                    other => (format!("{other:?}").to_lowercase(), 0),
                };
                let prefixes = inner.learned.keys().filter(|(s, _)| *s == i).count() as u64;
                (peer.to_string(), state, since, prefixes)
            })
            .collect()
    }

    /// Routes in (learned) and out (announced): (direction, VNI, route, VTEP).
    pub fn routes(&self) -> Vec<(String, u32, String, String)> {
        let inner = self.inner.lock().unwrap();
        let show = |k: &RouteKey| match k {
            RouteKey::MacIp { rd, mac, ip, .. } => format!(
                "[2] {rd} {} {}",
                Mac(*mac),
                ip.map(|i| i.to_string()).unwrap_or_default()
            ),
            RouteKey::InclusiveMulticast { rd, origin, .. } => format!("[3] {rd} {origin}"),
            RouteKey::Other { route_type, .. } => format!("[{route_type}]"),
        };
        let mut out: Vec<(String, u32, String, String)> = inner
            .learned
            .iter()
            .map(|((_, k), l)| ("in".into(), l.vni, show(k), l.vtep.to_string()))
            .collect();
        for (k, r) in &inner.announced {
            let vni = match r {
                EvpnRoute::MacIp { vni, .. } => *vni,
                EvpnRoute::InclusiveMulticast { .. } => {
                    inner.vni_of.get(k).copied().unwrap_or_default()
                }
                EvpnRoute::Other { .. } => 0,
            };
            out.push(("out".into(), vni, show(k), self.cfg.router_id.to_string()));
        }
        out
    }
}

/// Applies one session event to what was learned; true if it changed.
fn learn(inner: &Mutex<Inner>, session: usize, me: Ipv4Addr, ev: SessionEvent) -> bool {
    let mut inner = inner.lock().unwrap();
    match ev {
        SessionEvent::Established { .. } => false,
        SessionEvent::Down { .. } => {
            let now = Instant::now();
            for ((s, _), l) in inner.learned.iter_mut() {
                if *s == session && l.stale_since.is_none() {
                    l.stale_since = Some(now);
                }
            }
            false
        }
        SessionEvent::Update {
            announced,
            attrs,
            next_hop,
            withdrawn,
        } => {
            let mut changed = false;
            for r in withdrawn {
                changed |= inner.learned.remove(&(session, r.key())).is_some();
            }
            for r in announced {
                let (vni, vtep, mac, ip) = match &r {
                    EvpnRoute::InclusiveMulticast { origin, .. } => {
                        let Some(p) = &attrs.pmsi else { continue };
                        let vtep = match (p.endpoint, origin) {
                            (IpAddr::V4(e), _) => e,
                            (_, IpAddr::V4(o)) => *o,
                            _ => continue,
                        };
                        (p.label, vtep, None, None)
                    }
                    EvpnRoute::MacIp { mac, vni, ip, .. } => {
                        let Some(IpAddr::V4(nh)) = next_hop else {
                            continue;
                        };
                        let ip = match ip {
                            Some(IpAddr::V4(a)) => Some(*a),
                            _ => None,
                        };
                        (*vni, nh, Some(Mac(*mac)), ip)
                    }
                    EvpnRoute::Other { .. } => continue,
                };
                if vtep == me {
                    continue; // our own, reflected back
                }
                let l = Learned {
                    vni,
                    vtep,
                    mac,
                    ip,
                    stale_since: None,
                };
                let key = (session, r.key());
                let same = inner
                    .learned
                    .get(&key)
                    .is_some_and(|o| (o.vni, o.vtep, o.mac, o.ip) == (vni, vtep, mac, ip));
                if !same {
                    changed = true;
                }
                if let Some(old) = inner.learned.get(&key) {
                    if old.stale_since.is_some() {
                        changed = true;
                    }
                }
                inner.learned.insert(key, l);
            }
            changed
        }
    }
}
