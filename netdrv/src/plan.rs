//! The planner: a pure function from desired state ([`HostNet`]) and what the kernel has
//! ([`Observed`]) to the netlink and filter operations that make them agree. Executed by
//! `host.rs`; tested here without a kernel.
//!
//! Rules: a tenant bridge exists while the tenant has a port on this host; a subnet's VxLAN
//! device while the subnet has a port here (and the host has an underlay); links that carry this
//! instance's alias and prefix but are not desired are deleted; links with a desired name that
//! are not this instance's are never touched (planning fails instead).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::filter::PortFilter;
use crate::ipam::Mac;
use crate::model::{HostNet, PortKind};
use crate::names;

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedLink {
    pub index: u32,
    pub name: String,
    /// `bridge`, `vxlan`, `tun`, `veth`, ...
    pub kind: Option<String>,
    pub master: Option<u32>,
    pub mtu: u32,
    pub up: bool,
    pub alias: Option<String>,
    /// For VxLAN devices: (VNI, local address, learning).
    pub vxlan: Option<(u32, Option<Ipv4Addr>, bool)>,
    /// The link's MAC, for Ethernet links.
    pub mac: Option<Mac>,
    /// The link group (IFLA_GROUP); 0 is the default group.
    pub group: u32,
    /// For bridge ports: whether the bridge learns source MACs on it.
    pub port_learning: Option<bool>,
    /// For bridge ports: whether the bridge answers ARP for neighbours behind it.
    pub port_neigh_suppress: Option<bool>,
    /// For VLAN devices: the VLAN id.
    pub vlan_id: Option<u16>,
}

/// What the kernel and the filter have now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub links: Vec<ObservedLink>,
    /// Flood entries (all-zero MAC) per VxLAN device name: the peers they send to.
    pub floods: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// Unicast FDB entries with a remote destination per VxLAN device name.
    pub remote: BTreeMap<String, BTreeMap<Mac, Ipv4Addr>>,
    /// Ports the VLAN filter has a configuration for.
    pub filtered: BTreeSet<u32>,
    /// Permanent IPv4 neighbour entries per bridge (or VLAN device) name.
    pub neighbours: BTreeMap<String, BTreeMap<Ipv4Addr, Mac>>,
    /// The bridges filter VLANs themselves (the kernel VLAN filter): their FDB is per VLAN, and
    /// the bridge looks neighbours up on a VLAN device of the frame's VLAN.
    pub bridge_vlans: bool,
}

/// The other end of a namespace port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPeer {
    pub netns: PathBuf,
    pub ifname: String,
    pub mac: Mac,
    pub address: Option<(Ipv4Addr, u8)>,
}

/// One step. Links are named; the executor resolves names to indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Delete {
        name: String,
    },
    CreateBridge {
        name: String,
    },
    CreateVxlan {
        name: String,
        vni: u32,
        local: Ipv4Addr,
        mtu: u32,
    },
    CreateTap {
        name: String,
        mtu: u32,
    },
    CreateVeth {
        name: String,
        mtu: u32,
        peer: VethPeer,
    },
    /// A VLAN device on a bridge (no address; it only holds neighbour entries).
    CreateVlan {
        name: String,
        parent: String,
        vid: u16,
    },
    SetMaster {
        name: String,
        master: String,
    },
    SetMtu {
        name: String,
        mtu: u32,
    },
    SetUp {
        name: String,
    },
    SetAlias {
        name: String,
    },
    /// Bridge port learning on or off, neighbour suppression the other way (`bridge link set
    /// dev NAME learning on|off neigh_suppress off|on`).
    SetLearning {
        name: String,
        on: bool,
    },
    /// `ip neigh replace IP lladdr MAC dev DEV nud permanent`.
    AddNeighbour {
        dev: String,
        ip: Ipv4Addr,
        mac: Mac,
    },
    DelNeighbour {
        dev: String,
        ip: Ipv4Addr,
    },
    AddFlood {
        dev: String,
        peer: Ipv4Addr,
    },
    DelFlood {
        dev: String,
        peer: Ipv4Addr,
    },
    /// `bridge fdb replace MAC dev DEV dst VTEP self` and `... master static [vlan VLAN]`.
    AddRemote {
        dev: String,
        mac: Mac,
        dst: Ipv4Addr,
        vlan: Option<u16>,
    },
    DelRemote {
        dev: String,
        mac: Mac,
        dst: Ipv4Addr,
        vlan: Option<u16>,
    },
    SetFilter {
        dev: String,
        cfg: PortFilter,
    },
    DropFilter {
        index: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    Bridge,
    Vxlan { vni: u32, local: Ipv4Addr },
    Tap,
    Veth(VethPeer),
    Vlan { parent: String, vid: u16 },
}

#[derive(Debug, Clone)]
struct Desired {
    want: Want,
    master: Option<String>,
    filter: Option<PortFilter>,
}

/// Deletion order: ports first, bridges last.
fn delete_rank(kind: Option<&str>) -> u8 {
    match kind {
        Some("bridge") => 2,
        Some("vxlan") => 1,
        _ => 0,
    }
}

/// Plans the operations that turn `observed` into `desired`.
pub fn plan(desired: &HostNet, observed: &Observed) -> Result<Vec<Op>> {
    let p = desired.prefix.as_str();
    let mtu = desired.port_mtu();
    let alias = names::alias(&desired.owner);
    let mut want: BTreeMap<String, Desired> = BTreeMap::new();
    for t in &desired.tenants {
        if t.ports.is_empty() {
            continue;
        }
        let bridge = names::bridge(p, t.id);
        want.insert(
            bridge.clone(),
            Desired {
                want: Want::Bridge,
                master: None,
                filter: None,
            },
        );
        let vlan_of = |subnet: &str| {
            t.subnets.iter().find(|s| s.name == subnet).ok_or_else(|| {
                Error::Invalid(format!(
                    "port of tenant {} names unknown subnet {subnet}",
                    t.id
                ))
            })
        };
        for port in &t.ports {
            let subnet = vlan_of(&port.subnet)?;
            let (name, w) = match &port.kind {
                PortKind::Tap => (names::tap(p, port.id), Want::Tap),
                PortKind::Veth {
                    netns,
                    ifname,
                    address,
                } => (
                    names::veth(p, port.id),
                    Want::Veth(VethPeer {
                        netns: netns.clone(),
                        ifname: ifname.clone(),
                        mac: port.mac,
                        address: *address,
                    }),
                ),
            };
            let filter = PortFilter {
                vlan: subnet.vlan,
                security: port.security.clone(),
            };
            want.insert(
                name,
                Desired {
                    want: w,
                    master: Some(bridge.clone()),
                    filter: Some(filter),
                },
            );
            if let Some(u) = desired.underlay {
                // A control plane on a VLAN-filtering bridge: the VLAN device the bridge looks
                // neighbours up on for ARP suppression.
                if observed.bridge_vlans && !desired.vxlan_port_learning {
                    want.entry(names::neigh_vlan(p, subnet.vni))
                        .or_insert(Desired {
                            want: Want::Vlan {
                                parent: bridge.clone(),
                                vid: subnet.vlan,
                            },
                            master: None,
                            filter: None,
                        });
                }
                let vx = names::vxlan(p, subnet.vni);
                want.entry(vx).or_insert(Desired {
                    want: Want::Vxlan {
                        vni: subnet.vni,
                        local: u.local,
                    },
                    master: Some(bridge.clone()),
                    filter: Some(PortFilter {
                        vlan: subnet.vlan,
                        security: None,
                    }),
                });
            }
        }
    }

    for x in &desired.externals {
        want.insert(
            names::external(p, x.tenant),
            Desired {
                want: Want::Veth(VethPeer {
                    netns: x.netns.clone(),
                    ifname: x.ifname.clone(),
                    mac: x.mac,
                    address: None,
                }),
                master: Some(x.bridge.clone()),
                filter: None,
            },
        );
    }

    let by_name: BTreeMap<&str, &ObservedLink> = observed
        .links
        .iter()
        .map(|l| (l.name.as_str(), l))
        .collect();
    let by_index: BTreeMap<u32, &ObservedLink> =
        observed.links.iter().map(|l| (l.index, l)).collect();
    let ours =
        |l: &ObservedLink| l.name.starts_with(p) && l.alias.as_deref() == Some(alias.as_str());
    // What a crash between creating a link and setting its alias leaves.
    let adoptable = |l: &ObservedLink| l.name.starts_with(p) && l.alias.is_none();

    let mut ops = Vec::new();
    // Stale or wrong links of ours go first, ports before bridges.
    let mut deletes: Vec<&ObservedLink> = Vec::new();
    for l in observed.links.iter().filter(|l| ours(l)) {
        let keep = match want.get(&l.name) {
            None => false,
            Some(d) => matches_kind(&d.want, l),
        };
        if !keep {
            deletes.push(l);
        }
    }
    deletes.sort_by_key(|l| (delete_rank(l.kind.as_deref()), l.name.clone()));
    let deleted: BTreeSet<&str> = deletes.iter().map(|l| l.name.as_str()).collect();
    for l in &deletes {
        ops.push(Op::Delete {
            name: l.name.clone(),
        });
    }

    // Create what is missing, bridges before their ports.
    let mut order: Vec<(&String, &Desired)> = want.iter().collect();
    order.sort_by_key(|(n, d)| (!matches!(d.want, Want::Bridge), (*n).clone()));
    for (name, d) in &order {
        let existing = by_name
            .get(name.as_str())
            .filter(|l| !deleted.contains(l.name.as_str()));
        match existing {
            Some(l) if !(ours(l) || adoptable(l)) => {
                return Err(Error::Exists(format!(
                    "link {name} (not made by this vpcd)"
                )));
            }
            Some(l) if !matches_kind(&d.want, l) => {
                return Err(Error::Exists(format!("link {name} (of another kind)")));
            }
            Some(l) => {
                if l.alias.is_none() {
                    ops.push(Op::SetAlias {
                        name: (*name).clone(),
                    });
                }
                let master_name = l
                    .master
                    .and_then(|m| by_index.get(&m))
                    .map(|m| m.name.as_str());
                if d.master.as_deref() != master_name {
                    if let Some(m) = &d.master {
                        ops.push(Op::SetMaster {
                            name: (*name).clone(),
                            master: m.clone(),
                        });
                    }
                }
                if !matches!(d.want, Want::Bridge) && l.mtu != mtu {
                    ops.push(Op::SetMtu {
                        name: (*name).clone(),
                        mtu,
                    });
                }
                let learning = matches!(d.want, Want::Vxlan { .. })
                    .then_some(desired.vxlan_port_learning)
                    .filter(|on| {
                        l.port_learning != Some(*on) || l.port_neigh_suppress != Some(!*on)
                    });
                if let Some(on) = learning {
                    ops.push(Op::SetLearning {
                        name: (*name).clone(),
                        on,
                    });
                }
                if !l.up {
                    ops.push(Op::SetUp {
                        name: (*name).clone(),
                    });
                }
            }
            None => {
                let name = (*name).clone();
                ops.push(match &d.want {
                    Want::Bridge => Op::CreateBridge { name: name.clone() },
                    Want::Vxlan { vni, local } => Op::CreateVxlan {
                        name: name.clone(),
                        vni: *vni,
                        local: *local,
                        mtu,
                    },
                    Want::Tap => Op::CreateTap {
                        name: name.clone(),
                        mtu,
                    },
                    Want::Veth(peer) => Op::CreateVeth {
                        name: name.clone(),
                        mtu,
                        peer: peer.clone(),
                    },
                    Want::Vlan { parent, vid } => Op::CreateVlan {
                        name: name.clone(),
                        parent: parent.clone(),
                        vid: *vid,
                    },
                });
                if let Some(m) = &d.master {
                    ops.push(Op::SetMaster {
                        name: name.clone(),
                        master: m.clone(),
                    });
                }
                // A new bridge port learns; switched off before it is up.
                if matches!(d.want, Want::Vxlan { .. }) && !desired.vxlan_port_learning {
                    ops.push(Op::SetLearning {
                        name: name.clone(),
                        on: false,
                    });
                }
                ops.push(Op::SetUp { name });
            }
        }
    }

    // Flood entries: every local VNI to every peer, and to the VTEPs learned for it.
    for (name, d) in &want {
        let Want::Vxlan { vni, .. } = d.want else {
            continue;
        };
        let have = if deleted.contains(name.as_str()) {
            None
        } else {
            observed.floods.get(name)
        };
        let peers: BTreeSet<Ipv4Addr> = desired
            .peers
            .iter()
            .copied()
            .chain(
                desired
                    .floods
                    .iter()
                    .filter(|(v, _)| *v == vni)
                    .map(|(_, p)| *p),
            )
            .collect();
        for peer in &peers {
            if !have.is_some_and(|h| h.contains(peer)) {
                ops.push(Op::AddFlood {
                    dev: name.clone(),
                    peer: *peer,
                });
            }
        }
        for peer in have.into_iter().flatten() {
            if !peers.contains(peer) {
                ops.push(Op::DelFlood {
                    dev: name.clone(),
                    peer: *peer,
                });
            }
        }
    }

    // Filter configuration for every port; forget ports that are gone or not desired. (Before
    // the remote MACs: on a VLAN-filtering bridge their entries need the port's VLAN.)
    let mut kept_indexes = BTreeSet::new();
    for (name, d) in &want {
        if let Some(cfg) = &d.filter {
            ops.push(Op::SetFilter {
                dev: name.clone(),
                cfg: cfg.clone(),
            });
            if let Some(l) = by_name.get(name.as_str()) {
                if !deleted.contains(name.as_str()) {
                    kept_indexes.insert(l.index);
                }
            }
        }
    }
    for index in &observed.filtered {
        if !kept_indexes.contains(index) {
            ops.push(Op::DropFilter { index: *index });
        }
    }
    // The VLAN of each VNI's bridge entries, on VLAN-filtering bridges.
    let vlan_of_vni = |vni: u32| {
        observed.bridge_vlans.then(|| {
            desired
                .tenants
                .iter()
                .flat_map(|t| &t.subnets)
                .find(|s| s.vni == vni)
                .map(|s| s.vlan)
        })?
    };
    let vlan_of_dev = |dev: &str| match want.get(dev).map(|d| &d.want) {
        Some(Want::Vxlan { vni, .. }) => vlan_of_vni(*vni),
        _ => None,
    };

    // Static remote MACs on the VxLAN devices that exist.
    let mut remote_want: BTreeMap<String, BTreeMap<Mac, Ipv4Addr>> = BTreeMap::new();
    for (vni, mac, dst) in &desired.remote_macs {
        let dev = names::vxlan(p, *vni);
        if want.contains_key(&dev) {
            remote_want.entry(dev).or_default().insert(*mac, *dst);
        }
    }
    for (dev, entries) in &remote_want {
        let have = if deleted.contains(dev.as_str()) {
            None
        } else {
            observed.remote.get(dev)
        };
        for (mac, dst) in entries {
            if have.and_then(|h| h.get(mac)) != Some(dst) {
                ops.push(Op::AddRemote {
                    dev: dev.clone(),
                    mac: *mac,
                    dst: *dst,
                    vlan: vlan_of_dev(dev),
                });
            }
        }
    }
    for (dev, entries) in &observed.remote {
        if deleted.contains(dev.as_str()) || !want.contains_key(dev) {
            continue;
        }
        for (mac, dst) in entries {
            if !remote_want.get(dev).is_some_and(|w| w.contains_key(mac)) {
                ops.push(Op::DelRemote {
                    dev: dev.clone(),
                    mac: *mac,
                    dst: *dst,
                    vlan: vlan_of_dev(dev),
                });
            }
        }
    }

    // Neighbour entries on the tenant bridges (for the bridge's ARP suppression).
    let mut neigh_want: BTreeMap<String, BTreeMap<Ipv4Addr, Mac>> = BTreeMap::new();
    for (vni, ip, mac) in &desired.neighbours {
        let Some(t) = desired
            .tenants
            .iter()
            .find(|t| t.subnets.iter().any(|s| s.vni == *vni))
        else {
            continue;
        };
        // On the VNI's VLAN device where the bridge filters VLANs, else on the bridge.
        let dev = Some(names::neigh_vlan(p, *vni))
            .filter(|d| want.contains_key(d))
            .unwrap_or_else(|| names::bridge(p, t.id));
        if want.contains_key(&dev) {
            neigh_want.entry(dev).or_default().insert(*ip, *mac);
        }
    }
    for (dev, entries) in &neigh_want {
        let have = observed
            .neighbours
            .get(dev)
            .filter(|_| !deleted.contains(dev.as_str()));
        for (ip, mac) in entries {
            if have.and_then(|h| h.get(ip)) != Some(mac) {
                ops.push(Op::AddNeighbour {
                    dev: dev.clone(),
                    ip: *ip,
                    mac: *mac,
                });
            }
        }
    }
    for (dev, entries) in &observed.neighbours {
        if deleted.contains(dev.as_str()) || !want.contains_key(dev) {
            continue;
        }
        for ip in entries.keys() {
            if !neigh_want.get(dev).is_some_and(|w| w.contains_key(ip)) {
                ops.push(Op::DelNeighbour {
                    dev: dev.clone(),
                    ip: *ip,
                });
            }
        }
    }

    Ok(ops)
}

fn matches_kind(want: &Want, l: &ObservedLink) -> bool {
    match want {
        Want::Bridge => l.kind.as_deref() == Some("bridge"),
        Want::Tap => l.kind.as_deref() == Some("tun"),
        Want::Veth(_) => l.kind.as_deref() == Some("veth"),
        Want::Vxlan { vni, local } => {
            l.kind.as_deref() == Some("vxlan") && l.vxlan == Some((*vni, Some(*local), false))
        }
        Want::Vlan { vid, .. } => l.kind.as_deref() == Some("vlan") && l.vlan_id == Some(*vid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::PortSecurity;
    use crate::model::{PortNet, SubnetNet, TenantNet, Underlay};

    const OWNER: &str = "i1";

    fn host(ports: Vec<PortNet>) -> HostNet {
        HostNet {
            prefix: "vpc".into(),
            owner: OWNER.into(),
            underlay: Some(Underlay {
                local: Ipv4Addr::new(192, 0, 2, 1),
                mtu: 1500,
            }),
            peers: vec![Ipv4Addr::new(192, 0, 2, 2)],
            remote_macs: vec![],
            externals: vec![],
            floods: vec![],
            vxlan_port_learning: true,
            neighbours: Vec::new(),
            tenants: vec![TenantNet {
                id: 1,
                subnets: vec![
                    SubnetNet {
                        name: "web".into(),
                        vlan: 10,
                        vni: 100,
                    },
                    SubnetNet {
                        name: "db".into(),
                        vlan: 20,
                        vni: 200,
                    },
                ],
                ports,
            }],
        }
    }

    fn tap(id: u32, subnet: &str) -> PortNet {
        PortNet {
            id,
            subnet: subnet.into(),
            kind: PortKind::Tap,
            mac: Mac::for_port(OWNER, id),
            security: Some(PortSecurity::default()),
        }
    }

    fn link(index: u32, name: &str, kind: &str, master: Option<u32>) -> ObservedLink {
        ObservedLink {
            index,
            name: name.into(),
            kind: Some(kind.into()),
            master,
            mtu: 1450,
            up: true,
            alias: Some(names::alias(OWNER)),
            vxlan: (kind == "vxlan").then_some((100, Some(Ipv4Addr::new(192, 0, 2, 1)), false)),
            mac: None,
            group: 0,
            port_learning: master.map(|_| true),
            port_neigh_suppress: master.map(|_| false),
            vlan_id: None,
        }
    }

    #[test]
    fn neighbours_go_on_their_tenant_bridge_and_stale_ones_go() {
        let mut h = host(vec![tap(1, "web")]);
        let (m1, ip1, ip2) = (
            Mac([2, 0, 0, 0, 0, 1]),
            Ipv4Addr::new(10, 0, 1, 5),
            Ipv4Addr::new(10, 0, 1, 6),
        );
        h.neighbours = vec![(100, ip1, m1), (999, ip2, m1)];
        let mut observed = Observed {
            links: vec![
                link(10, "vpcb1", "bridge", None),
                link(11, "vpcx64", "vxlan", Some(10)),
                link(12, "vpct1", "tun", Some(10)),
            ],
            ..Default::default()
        };
        observed
            .neighbours
            .insert("vpcb1".into(), [(ip2, m1)].into_iter().collect());
        let ops = plan(&h, &observed).unwrap();
        let neigh: Vec<&Op> = ops
            .iter()
            .filter(|o| matches!(o, Op::AddNeighbour { .. } | Op::DelNeighbour { .. }))
            .collect();
        // VNI 999 is no subnet here: its entry is not wanted, and the stale one goes.
        assert_eq!(
            neigh,
            [
                &Op::AddNeighbour {
                    dev: "vpcb1".into(),
                    ip: ip1,
                    mac: m1
                },
                &Op::DelNeighbour {
                    dev: "vpcb1".into(),
                    ip: ip2
                }
            ]
        );
    }

    #[test]
    fn on_a_vlan_filtering_bridge_neighbours_go_on_a_vlan_device_and_fdb_entries_get_the_vlan() {
        let mut h = host(vec![tap(1, "web")]);
        let (m1, ip1, vtep) = (
            Mac([2, 0, 0, 0, 0, 1]),
            Ipv4Addr::new(10, 0, 1, 5),
            Ipv4Addr::new(192, 0, 2, 9),
        );
        h.vxlan_port_learning = false;
        h.neighbours = vec![(100, ip1, m1)];
        h.remote_macs = vec![(100, m1, vtep)];
        let observed = Observed {
            bridge_vlans: true,
            ..Default::default()
        };
        let ops = plan(&h, &observed).unwrap();
        let vlan_dev = ops
            .iter()
            .position(|o| {
                o == &Op::CreateVlan {
                    name: "vpcn64".into(),
                    parent: "vpcb1".into(),
                    vid: 10,
                }
            })
            .expect("the VLAN device of web");
        let bridge = ops
            .iter()
            .position(|o| matches!(o, Op::CreateBridge { .. }))
            .unwrap();
        assert!(bridge < vlan_dev);
        assert!(ops.contains(&Op::AddNeighbour {
            dev: "vpcn64".into(),
            ip: ip1,
            mac: m1
        }));
        assert!(ops.contains(&Op::AddRemote {
            dev: "vpcx64".into(),
            mac: m1,
            dst: vtep,
            vlan: Some(10),
        }));
        // Without VLAN filtering: no VLAN device, the entry on the bridge.
        let ops = plan(&h, &Observed::default()).unwrap();
        assert!(!ops.iter().any(|o| matches!(o, Op::CreateVlan { .. })));
        assert!(ops.contains(&Op::AddNeighbour {
            dev: "vpcb1".into(),
            ip: ip1,
            mac: m1
        }));
    }

    #[test]
    fn vxlan_ports_stop_learning_when_a_control_plane_installs_remote_macs() {
        let mut h = host(vec![tap(1, "web")]);
        let learning = |ops: &[Op]| -> Vec<(String, bool)> {
            ops.iter()
                .filter_map(|o| match o {
                    Op::SetLearning { name, on } => Some((name.clone(), *on)),
                    _ => None,
                })
                .collect()
        };
        let observed = Observed {
            links: vec![
                link(10, "vpcb1", "bridge", None),
                link(11, "vpcx64", "vxlan", Some(10)),
                link(12, "vpct1", "tun", Some(10)),
            ],
            ..Default::default()
        };
        // Learning wanted and on: nothing to do.
        assert!(learning(&plan(&h, &observed).unwrap()).is_empty());
        // A control plane: off on the existing device, only there (not on taps).
        h.vxlan_port_learning = false;
        let ops = plan(&h, &observed).unwrap();
        assert_eq!(learning(&ops), [("vpcx64".to_string(), false)]);
        // A new device: off before it is up.
        let ops = plan(&h, &Observed::default()).unwrap();
        let off = ops
            .iter()
            .position(|o| matches!(o, Op::SetLearning { name, on: false } if name == "vpcx64"))
            .expect("learning off on the new VxLAN device");
        let up = ops
            .iter()
            .position(|o| matches!(o, Op::SetUp { name } if name == "vpcx64"))
            .unwrap();
        assert!(off < up);
    }

    #[test]
    fn an_external_leg_is_a_veth_into_the_external_bridge_without_a_filter() {
        let mut h = host(vec![tap(1, "web")]);
        h.externals.push(crate::model::ExternalLeg {
            tenant: 1,
            bridge: "xbr".into(),
            netns: "/run/netns/r1".into(),
            ifname: "ext0".into(),
            mac: Mac::for_port(OWNER, 0xe000_0001),
        });
        let ops = plan(&h, &Observed::default()).unwrap();
        assert!(ops.iter().any(|o| matches!(o,
            Op::CreateVeth { name, peer, .. } if name == "vpce1" && peer.ifname == "ext0")));
        assert!(ops.contains(&Op::SetMaster {
            name: "vpce1".into(),
            master: "xbr".into()
        }));
        assert!(!ops
            .iter()
            .any(|o| matches!(o, Op::SetFilter { dev, .. } if dev == "vpce1")));
        // Without the leg in the desired state, an existing one of ours goes.
        let observed = Observed {
            links: vec![link(9, "vpce1", "veth", None)],
            ..Default::default()
        };
        let ops = plan(&host(vec![]), &observed).unwrap();
        assert_eq!(
            ops,
            vec![Op::Delete {
                name: "vpce1".into()
            }]
        );
    }

    #[test]
    fn first_port_creates_bridge_vxlan_tap_flood_and_filters() {
        let ops = plan(&host(vec![tap(1, "web")]), &Observed::default()).unwrap();
        assert_eq!(
            ops[0],
            Op::CreateBridge {
                name: "vpcb1".into()
            }
        );
        assert!(ops.contains(&Op::CreateVxlan {
            name: "vpcx64".into(),
            vni: 100,
            local: Ipv4Addr::new(192, 0, 2, 1),
            mtu: 1450
        }));
        assert!(ops.contains(&Op::CreateTap {
            name: "vpct1".into(),
            mtu: 1450
        }));
        assert!(ops.contains(&Op::SetMaster {
            name: "vpct1".into(),
            master: "vpcb1".into()
        }));
        assert!(ops.contains(&Op::AddFlood {
            dev: "vpcx64".into(),
            peer: Ipv4Addr::new(192, 0, 2, 2)
        }));
        assert!(ops.iter().any(|o| matches!(o, Op::SetFilter { dev, cfg } if dev == "vpcx64" && cfg.vlan == 10 && cfg.security.is_none())));
        assert!(ops.iter().any(
            |o| matches!(o, Op::SetFilter { dev, cfg } if dev == "vpct1" && cfg.security.is_some())
        ));
        // No VxLAN for the db subnet: it has no port here.
        assert!(!ops
            .iter()
            .any(|o| matches!(o, Op::CreateVxlan { vni: 200, .. })));
    }

    #[test]
    fn converged_state_only_refreshes_filters() {
        let desired = host(vec![tap(1, "web")]);
        let mut observed = Observed {
            links: vec![
                link(10, "vpcb1", "bridge", None),
                link(11, "vpcx64", "vxlan", Some(10)),
                link(12, "vpct1", "tun", Some(10)),
            ],
            ..Default::default()
        };
        observed
            .floods
            .insert("vpcx64".into(), [Ipv4Addr::new(192, 0, 2, 2)].into());
        observed.filtered = [11, 12].into();
        let ops = plan(&desired, &observed).unwrap();
        assert!(
            ops.iter().all(|o| matches!(o, Op::SetFilter { .. })),
            "{ops:?}"
        );
    }

    #[test]
    fn last_port_gone_removes_everything_ports_first() {
        let observed = Observed {
            links: vec![
                link(10, "vpcb1", "bridge", None),
                link(11, "vpcx64", "vxlan", Some(10)),
                link(12, "vpct1", "tun", Some(10)),
            ],
            filtered: [11, 12].into(),
            ..Default::default()
        };
        let ops = plan(&host(vec![]), &observed).unwrap();
        assert_eq!(
            ops,
            vec![
                Op::Delete {
                    name: "vpct1".into()
                },
                Op::Delete {
                    name: "vpcx64".into()
                },
                Op::Delete {
                    name: "vpcb1".into()
                },
                Op::DropFilter { index: 11 },
                Op::DropFilter { index: 12 },
            ]
        );
    }

    #[test]
    fn links_of_others_are_never_touched() {
        let mut foreign = link(5, "vpct1", "tun", None);
        foreign.alias = None;
        let mut other_owner = link(6, "vpct9", "tun", None);
        other_owner.alias = Some(names::alias("someone-else"));
        let unrelated = ObservedLink {
            index: 7,
            name: "eth0".into(),
            ..Default::default()
        };
        let observed = Observed {
            links: vec![other_owner, unrelated],
            ..Default::default()
        };
        let ops = plan(&host(vec![]), &observed).unwrap();
        assert!(ops.is_empty(), "{ops:?}");
        let observed = Observed {
            links: vec![foreign.clone()],
            ..Default::default()
        };
        let ops = plan(&host(vec![]), &observed).unwrap();
        assert!(
            ops.is_empty(),
            "an unaliased link that is not desired is left alone: {ops:?}"
        );
        let mut foreign_owned = foreign;
        foreign_owned.alias = Some(names::alias("someone-else"));
        let observed = Observed {
            links: vec![foreign_owned],
            ..Default::default()
        };
        let err = plan(&host(vec![tap(1, "web")]), &observed).unwrap_err();
        assert!(err.to_string().contains("vpct1"), "{err}");
    }

    #[test]
    fn drift_is_repaired_both_ways() {
        // A VxLAN with the wrong VNI is recreated; a detached, down tap is re-enslaved and set up;
        // a stale flood peer is removed.
        let mut vx = link(11, "vpcx64", "vxlan", Some(10));
        vx.vxlan = Some((999, Some(Ipv4Addr::new(192, 0, 2, 1)), false));
        let mut t = link(12, "vpct1", "tun", None);
        t.up = false;
        let mut observed = Observed {
            links: vec![link(10, "vpcb1", "bridge", None), vx, t],
            ..Default::default()
        };
        observed
            .floods
            .insert("vpcx64".into(), [Ipv4Addr::new(192, 0, 2, 9)].into());
        let ops = plan(&host(vec![tap(1, "web")]), &observed).unwrap();
        assert_eq!(
            ops[0],
            Op::Delete {
                name: "vpcx64".into()
            }
        );
        assert!(ops
            .iter()
            .any(|o| matches!(o, Op::CreateVxlan { vni: 100, .. })));
        assert!(ops.contains(&Op::SetMaster {
            name: "vpct1".into(),
            master: "vpcb1".into()
        }));
        assert!(ops.contains(&Op::SetUp {
            name: "vpct1".into()
        }));
        // The recreated device has no floods yet: the desired peer is added, the stale one died with it.
        assert!(ops.contains(&Op::AddFlood {
            dev: "vpcx64".into(),
            peer: Ipv4Addr::new(192, 0, 2, 2)
        }));
        assert!(!ops.iter().any(|o| matches!(o, Op::DelFlood { .. })));
    }

    #[test]
    fn a_link_left_without_alias_by_a_crash_is_adopted() {
        let mut t = link(12, "vpct1", "tun", Some(10));
        t.alias = None;
        let observed = Observed {
            links: vec![link(10, "vpcb1", "bridge", None), t],
            ..Default::default()
        };
        let ops = plan(&host(vec![tap(1, "web")]), &observed).unwrap();
        assert!(
            ops.contains(&Op::SetAlias {
                name: "vpct1".into()
            }),
            "{ops:?}"
        );
        assert!(!ops
            .iter()
            .any(|o| matches!(o, Op::Delete { .. } | Op::CreateTap { .. })));
    }

    #[test]
    fn remote_macs_follow_the_desired_list_on_existing_vxlan_devices() {
        let mut h = host(vec![tap(1, "web")]);
        let (m1, m2) = (Mac([2, 0, 0, 0, 0, 1]), Mac([2, 0, 0, 0, 0, 2]));
        let vtep = Ipv4Addr::new(192, 0, 2, 9);
        h.remote_macs = vec![(100, m1, vtep), (200, m2, vtep)];
        let mut observed = Observed {
            links: vec![
                link(10, "vpcb1", "bridge", None),
                link(11, "vpcx64", "vxlan", Some(10)),
                link(12, "vpct1", "tun", Some(10)),
            ],
            ..Default::default()
        };
        observed
            .floods
            .insert("vpcx64".into(), [Ipv4Addr::new(192, 0, 2, 2)].into());
        observed
            .remote
            .insert("vpcx64".into(), [(m2, vtep)].into_iter().collect());
        let ops = plan(&h, &observed).unwrap();
        // m1 goes on VNI 100's device; VNI 200 has no device here; the stale m2 entry goes.
        assert!(ops.contains(&Op::AddRemote {
            dev: "vpcx64".into(),
            mac: m1,
            dst: vtep,
            vlan: None,
        }));
        assert!(ops.contains(&Op::DelRemote {
            dev: "vpcx64".into(),
            mac: m2,
            dst: vtep,
            vlan: None,
        }));
        assert!(!ops
            .iter()
            .any(|o| matches!(o, Op::AddRemote { mac, .. } if *mac == m2)));
    }

    #[test]
    fn no_underlay_means_no_vxlan_and_mtu_1500() {
        let mut h = host(vec![tap(1, "db")]);
        h.underlay = None;
        let ops = plan(&h, &Observed::default()).unwrap();
        assert!(!ops
            .iter()
            .any(|o| matches!(o, Op::CreateVxlan { .. } | Op::AddFlood { .. })));
        assert!(ops.contains(&Op::CreateTap {
            name: "vpct1".into(),
            mtu: 1500
        }));
    }

    #[test]
    fn unknown_subnet_is_an_error() {
        assert!(plan(&host(vec![tap(1, "nope")]), &Observed::default()).is_err());
    }
}
