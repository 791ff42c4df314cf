//! Netlink (rtnetlink) in one network namespace: links, their attributes, VxLAN flood entries,
//! addresses. The socket is opened inside the namespace and then used from anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVlan, InfoVxlan,
    LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVlan, LinkVxlan,
};

use crate::error::{Error, Result};
use crate::netns::Netns;
use crate::plan::ObservedLink;

/// A netlink handle bound to one namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
    netns: Netns,
}

fn nl_err(op: &'static str, what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |e| Error::Netlink {
        op,
        what,
        reason: match e {
            rtnetlink::Error::NetlinkError(m) => match m.code {
                Some(c) => std::io::Error::from_raw_os_error(-c.get()).to_string(),
                None => m.to_string(),
            },
            other => other.to_string(),
        },
    }
}

/// `r`, with the kernel errors in `fine` (the thing is already there, or already gone) taken
/// as success.
fn ok_if(
    r: std::result::Result<(), rtnetlink::Error>,
    fine: &[i32],
    op: &'static str,
    what: impl Into<String>,
) -> Result<()> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if fine.iter().any(|c| e.raw_code() == -c) => Ok(()),
        r => r.map_err(nl_err(op, what)),
    }
}

impl Netlink {
    /// Opens a netlink socket inside `netns`. Must be called within a tokio runtime.
    pub fn open(netns: &Netns) -> Result<Netlink> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle) = netns
            .run(move || {
                let _enter = rt.enter();
                rtnetlink::new_connection().map(|(conn, handle, _)| (conn, handle))
            })?
            .map_err(|e| Error::Netlink {
                op: "open",
                what: "netlink socket".into(),
                reason: e.to_string(),
            })?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            netns: netns.clone(),
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Every link, with the attributes the planner looks at.
    pub async fn links(&self) -> Result<Vec<ObservedLink>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list", "links"))?;
        Ok(msgs.iter().map(observe).collect())
    }

    /// The index of link `name`, None if there is no such link.
    pub async fn index_of(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.find(name).await?.map(|m| m.header.index))
    }

    /// A link by name, with its attributes.
    pub async fn link(&self, name: &str) -> Result<ObservedLink> {
        self.find(name)
            .await?
            .map(|m| observe(&m))
            .ok_or_else(|| Error::NotFound(format!("link {name}")))
    }

    async fn find(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(m) => Ok(m),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl_err("find", name)(e)),
        }
    }

    async fn index(&self, name: &str) -> Result<u32> {
        self.index_of(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("link {name}")))
    }

    pub async fn create_bridge(&self, name: &str) -> Result<()> {
        let msg = LinkBridge::new(name).build();
        self.add_link(msg, "create bridge", name).await
    }

    pub async fn create_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: Ipv4Addr,
        mtu: u32,
    ) -> Result<()> {
        let msg = LinkVxlan::new(name, vni)
            .local(local)
            .port(crate::model::VXLAN_PORT)
            .learning(false)
            .mtu(mtu)
            .build();
        self.add_link(msg, "create vxlan", name).await
    }

    /// Sends a new link's message; `op` and `name` name it in the error.
    async fn add_link(&self, msg: LinkMessage, op: &'static str, name: &str) -> Result<()> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err(op, name))
    }

    /// Creates a VLAN device `name` with id `vid` on the link `parent`.
    pub async fn create_vlan(&self, name: &str, parent: &str, vid: u16) -> Result<()> {
        let parent = self.index(parent).await?;
        let msg = LinkVlan::new(name, parent, vid).build();
        self.add_link(msg, "create vlan", name).await
    }

    /// Creates a veth pair whose peer is made right inside `target` as `peer` (MAC `mac`), both
    /// ends with `mtu`: one request, and no move between namespaces (each move waits for an RCU
    /// grace period, ~10-30 ms). Both ends are down (a veth cannot come up before its pair is
    /// complete: ENOTCONN).
    pub async fn create_veth_into(
        &self,
        name: &str,
        mtu: u32,
        peer: &str,
        mac: [u8; 6],
        target: &Netns,
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .address(mac.to_vec())
            .mtu(mtu)
            .setns_by_fd(target.as_file().as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_string())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(
                rtnetlink::packet_route::link::InfoVeth::Peer(peer_msg),
            ))
            .build();
        // (`target` holds the descriptor in the message open until the kernel has it.)
        self.add_link(msg, "create veth", name).await
    }

    /// Creates a macvlan (bridge mode) on `parent` (ifindex) with MAC `mac`, down.
    pub async fn create_macvlan(&self, name: &str, parent: u32, mac: [u8; 6]) -> Result<()> {
        use rtnetlink::packet_route::link::MacVlanMode;
        let msg = rtnetlink::LinkMacVlan::new(name, parent, MacVlanMode::Bridge)
            .address(mac.to_vec())
            .build();
        self.add_link(msg, "create macvlan", name).await
    }

    /// Creates a persistent tap.
    pub async fn create_tap(&self, name: &str, mtu: u32) -> Result<()> {
        let n = name.to_string();
        self.netns
            .run(move || crate::tap::create_persistent(&n))??;
        self.set_mtu(name, mtu).await
    }

    /// Creates persistent taps, all in one namespace thread, then configures each (MTU, master,
    /// alias, up) with one request, the requests in flight together. Returns each tap's index
    /// or error, in order.
    pub async fn create_taps_attached(
        &self,
        taps: &[(String, u32, String)],
        alias: &str,
    ) -> Vec<Result<u32>> {
        let names: Vec<String> = taps.iter().map(|(n, _, _)| n.clone()).collect();
        let made = match self.netns.run(move || {
            names
                .iter()
                .map(|n| crate::tap::create_persistent(n).and_then(|()| crate::tap::index_of(n)))
                .collect::<Vec<_>>()
        }) {
            Ok(made) => made,
            Err(e) => {
                return taps
                    .iter()
                    .map(|_| Err(Error::Invalid(e.to_string())))
                    .collect()
            }
        };
        let mut masters: BTreeMap<&str, Result<u32>> = BTreeMap::new();
        for (_, _, m) in taps {
            if !masters.contains_key(m.as_str()) {
                let r = self.index(m).await;
                masters.insert(m.as_str(), r);
            }
        }
        let requests = taps.iter().zip(made).map(|((name, mtu, master), made)| {
            let master = match &masters[master.as_str()] {
                Ok(i) => Ok(*i),
                Err(e) => Err(Error::NotFound(e.to_string())),
            };
            let alias = alias.to_string();
            let handle = self.handle.clone();
            async move {
                let (index, master) = (made?, master?);
                let msg = LinkUnspec::new_with_index(index)
                    .mtu(*mtu)
                    .controller(master)
                    .append_extra_attribute(LinkAttribute::IfAlias(alias))
                    .up()
                    .build();
                handle
                    .link()
                    .set(msg)
                    .execute()
                    .await
                    .map_err(nl_err("configure tap", name.as_str()))?;
                Ok(index)
            }
        });
        futures::future::join_all(requests).await
    }

    async fn set(
        &self,
        op: &'static str,
        name: &str,
        f: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec>,
    ) -> Result<()> {
        let index = self.index(name).await?;
        let msg = f(LinkUnspec::new_with_index(index)).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl_err(op, name))
    }

    pub async fn set_master(&self, name: &str, master: &str) -> Result<()> {
        let m = self.index(master).await?;
        self.set("set master", name, |b| b.controller(m)).await
    }

    /// Bridge port learning of `name` (a bridge port) on or off, and neighbour suppression the
    /// other way (a port whose MACs come from a control plane also has the bridge answer ARP
    /// for them). Port attributes change only through RTM_NEWLINK on the existing link
    /// (RTM_SETLINK ignores them).
    pub async fn set_port_learning(&self, name: &str, on: bool) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = self.index(name).await?;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![
                InfoBridgePort::Learning(on),
                InfoBridgePort::NeighSupress(!on),
            ])),
        ]));
        self.handle
            .link()
            .add(msg)
            .set_flags(NLM_F_REQUEST | NLM_F_ACK)
            .execute()
            .await
            .map_err(nl_err("set port learning", name))
    }

    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<()> {
        self.set("set mtu", name, |b| b.mtu(mtu)).await
    }

    pub async fn set_up(&self, name: &str) -> Result<()> {
        self.set("set up", name, |b| b.up()).await
    }

    pub async fn set_alias(&self, name: &str, alias: &str) -> Result<()> {
        let a = alias.to_string();
        self.set("set alias", name, |b| {
            b.append_extra_attribute(LinkAttribute::IfAlias(a))
        })
        .await
    }

    pub async fn rename(&self, name: &str, new: &str) -> Result<()> {
        let n = new.to_string();
        self.set("rename", name, |b| b.name(n)).await
    }

    /// Moves a link into the namespace `to`.
    pub async fn move_to(&self, name: &str, to: &Netns) -> Result<()> {
        use std::os::fd::AsRawFd;
        let fd = to.as_file().as_raw_fd();
        self.set("move", name, |b| b.setns_by_fd(fd)).await
    }

    pub async fn set_group(&self, name: &str, group: u32) -> Result<()> {
        self.set("set group", name, |b| {
            b.append_extra_attribute(LinkAttribute::Group(group))
        })
        .await
    }

    /// Deletes every link of `group` in one request: the kernel unregisters them together,
    /// paying the per-device synchronisation once instead of once a link.
    pub async fn delete_group(&self, group: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::Group(group));
        let r = self.handle.link().del_with_message(msg).execute().await;
        ok_if(r, &[libc::ENODEV], "delete group", group.to_string())
    }

    /// Deletes a link; a link that is already gone is fine.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let Some(index) = self.index_of(name).await? else {
            return Ok(());
        };
        let r = self.handle.link().del(index).execute().await;
        ok_if(r, &[libc::ENODEV], "delete", name)
    }

    pub async fn add_address(&self, name: &str, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        let index = self.index(name).await?;
        let r = self
            .handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await;
        ok_if(
            r,
            &[libc::EEXIST],
            "add address",
            format!("{ip}/{prefix} on {name}"),
        )
    }

    /// The IPv4 addresses on link `name`, as (address, prefix length).
    pub async fn addresses(&self, name: &str) -> Result<Vec<(Ipv4Addr, u8)>> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let index = self.index(name).await?;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list addresses", name))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Removes an address from link `name`; an address that is not there is fine.
    pub async fn del_address(&self, name: &str, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        let index = self.index(name).await?;
        let msg = rtnetlink::AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(ip, prefix)
            .build();
        let r = self.handle.address().del(msg).execute().await;
        let what = format!("{ip}/{prefix} on {name}");
        ok_if(
            r,
            &[libc::EADDRNOTAVAIL, libc::ENOENT],
            "delete address",
            what,
        )
    }

    /// The IPv4 routes of the main table with protocol `static`: (destination, prefix length,
    /// gateway). In a namespace vpcd owns, these are the ones it made.
    pub async fn static_routes(&self) -> Result<Vec<(Ipv4Addr, u8, Option<Ipv4Addr>)>> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
        let req = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list routes", "main table"))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.protocol == RouteProtocol::Static)
            .filter(|m| m.header.table == 254)
            .map(|m| {
                let mut dest = Ipv4Addr::UNSPECIFIED;
                let mut gw = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => dest = *ip,
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
                        _ => {}
                    }
                }
                (dest, m.header.destination_prefix_length, gw)
            })
            .collect())
    }

    /// Adds or replaces the static route `dest/prefix via gateway`.
    pub async fn replace_route(&self, dest: Ipv4Addr, prefix: u8, via: Ipv4Addr) -> Result<()> {
        use rtnetlink::packet_route::route::RouteProtocol;
        let msg = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest, prefix)
            .gateway(via)
            .protocol(RouteProtocol::Static)
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl_err("add route", format!("{dest}/{prefix} via {via}")))
    }

    /// Deletes the static route to `dest/prefix`; a route that is not there is fine.
    pub async fn del_route(&self, dest: Ipv4Addr, prefix: u8) -> Result<()> {
        use rtnetlink::packet_route::route::RouteProtocol;
        let msg = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest, prefix)
            .protocol(RouteProtocol::Static)
            .build();
        let r = self.handle.route().del(msg).execute().await;
        ok_if(
            r,
            &[libc::ESRCH, libc::ENOENT],
            "delete route",
            format!("{dest}/{prefix}"),
        )
    }

    /// An FDB entry of a VxLAN device (`self`): MAC (all zero for flooding) -> remote VTEP.
    fn fdb_message(index: u32, mac: [u8; 6], peer: Ipv4Addr) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                peer,
            )));
        m
    }

    async fn request(&self, what: String, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = flags;
        let mut handle = self.handle.clone();
        let mut resp = handle
            .request(req)
            .map_err(nl_err("request", what.clone()))?;
        use futures::StreamExt;
        while let Some(m) = resp.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                if e.code.is_some() {
                    return Err(nl_err("fdb", what)(rtnetlink::Error::NetlinkError(e)));
                }
            }
        }
        Ok(())
    }

    /// Adds (`add`) or removes an FDB entry of the VxLAN device `dev`: `mac` behind the VTEP
    /// `dst`. The all-zero MAC is a flood entry, appended beside the other peers' (`bridge fdb
    /// append`); a unicast MAC replaces an entry for it (`bridge fdb replace`).
    async fn fdb_entry(&self, add: bool, dev: &str, mac: [u8; 6], dst: Ipv4Addr) -> Result<()> {
        let index = self.index(dev).await?;
        let entry = Self::fdb_message(index, mac, dst);
        let (msg, flags) = match (add, mac == [0; 6]) {
            (true, true) => (
                RouteNetlinkMessage::NewNeighbour(entry),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
            ),
            (true, false) => (
                RouteNetlinkMessage::NewNeighbour(entry),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            ),
            (false, _) => (
                RouteNetlinkMessage::DelNeighbour(entry),
                NLM_F_REQUEST | NLM_F_ACK,
            ),
        };
        self.request(format!("fdb {dev} {mac:02x?} -> {dst}"), msg, flags)
            .await
    }

    /// Head-end replication of `dev`'s VNI to `peer`.
    pub async fn add_flood(&self, dev: &str, peer: Ipv4Addr) -> Result<()> {
        self.fdb_entry(true, dev, [0; 6], peer).await
    }

    pub async fn del_flood(&self, dev: &str, peer: Ipv4Addr) -> Result<()> {
        self.fdb_entry(false, dev, [0; 6], peer).await
    }

    /// A remote MAC behind `dst`.
    /// Installs the VxLAN entry (`self`, remote `dst`) and the bridge entry (`master static`:
    /// the MAC is behind the VxLAN port, and learning cannot move it elsewhere).
    /// `vlan`: the VLAN of the bridge entry, on a bridge that filters VLANs (its FDB is per
    /// VLAN).
    pub async fn add_remote(
        &self,
        dev: &str,
        mac: [u8; 6],
        dst: Ipv4Addr,
        vlan: Option<u16>,
    ) -> Result<()> {
        self.fdb_entry(true, dev, mac, dst).await?;
        self.bridge_entry(true, dev, mac, vlan).await
    }

    pub async fn del_remote(
        &self,
        dev: &str,
        mac: [u8; 6],
        dst: Ipv4Addr,
        vlan: Option<u16>,
    ) -> Result<()> {
        self.bridge_entry(false, dev, mac, vlan).await?;
        self.fdb_entry(false, dev, mac, dst).await
    }

    /// The bridge's static entry for `mac` on its port `dev` (`bridge fdb replace/del MAC dev
    /// DEV master static [vlan VID]`); deleting one that is not there is fine.
    async fn bridge_entry(
        &self,
        add: bool,
        dev: &str,
        mac: [u8; 6],
        vlan: Option<u16>,
    ) -> Result<()> {
        let index = self.index(dev).await?;
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Noarp;
        m.header.flags = NeighbourFlags::Controller; // NTF_MASTER
        m.attributes
            .push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
        if let Some(vid) = vlan {
            m.attributes.push(NeighbourAttribute::Vlan(vid));
        }
        self.neighbour_entry(format!("bridge fdb {dev} {mac:02x?} master"), m, add)
            .await
    }

    /// Adds or replaces (`add`) or deletes a neighbour or FDB entry; deleting one that is not
    /// there is fine.
    async fn neighbour_entry(&self, what: String, m: NeighbourMessage, add: bool) -> Result<()> {
        if add {
            let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
            return self
                .request(what, RouteNetlinkMessage::NewNeighbour(m), flags)
                .await;
        }
        match self
            .request(
                what,
                RouteNetlinkMessage::DelNeighbour(m),
                NLM_F_REQUEST | NLM_F_ACK,
            )
            .await
        {
            Err(Error::Netlink { reason, .. })
                if reason.contains("No such file") || reason.contains("not found") =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// Permanent IPv4 neighbour entries per device name (of the devices in `links`).
    pub async fn neighbours(
        &self,
        links: &[ObservedLink],
    ) -> Result<BTreeMap<String, BTreeMap<Ipv4Addr, crate::ipam::Mac>>> {
        let names: BTreeMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(m));
        req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut handle = self.handle.clone();
        let mut resp = handle.request(req).map_err(nl_err("list", "neighbours"))?;
        let mut out: BTreeMap<String, BTreeMap<Ipv4Addr, crate::ipam::Mac>> = BTreeMap::new();
        use futures::StreamExt;
        while let Some(msg) = resp.next().await {
            let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) = msg.payload
            else {
                continue;
            };
            if n.header.state != NeighbourState::Permanent {
                continue;
            }
            let Some(name) = names.get(&n.header.ifindex) else {
                continue;
            };
            let ip = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLocalAddress(l) if l.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(l);
                    Some(crate::ipam::Mac(m))
                }
                _ => None,
            });
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.entry(name.to_string()).or_default().insert(ip, mac);
            }
        }
        Ok(out)
    }

    /// A permanent neighbour entry `ip` -> `mac` on `dev` (added or replaced), or its removal
    /// (one that is not there is fine).
    pub async fn neighbour(&self, dev: &str, ip: Ipv4Addr, mac: Option<[u8; 6]>) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = self.index(dev).await?;
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        if let Some(mac) = mac {
            m.attributes
                .push(NeighbourAttribute::LinkLocalAddress(mac.to_vec()));
        }
        self.neighbour_entry(format!("neighbour {ip} on {dev}"), m, mac.is_some())
            .await
    }

    /// FDB entries with a remote destination per device name: the flood entries (all-zero MAC)
    /// and the unicast ones.
    pub async fn fdb(&self, links: &[ObservedLink]) -> Result<RemoteFdb> {
        let names: BTreeMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(m));
        req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut handle = self.handle.clone();
        let mut resp = handle.request(req).map_err(nl_err("list", "fdb"))?;
        let mut out = RemoteFdb::default();
        use futures::StreamExt;
        while let Some(msg) = resp.next().await {
            let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) = msg.payload
            else {
                continue;
            };
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLocalAddress(l) if l.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(l);
                    Some(m)
                }
                _ => None,
            });
            // For AF_BRIDGE messages the parser cannot tell the address family of NDA_DST and
            // hands over the raw bytes.
            let dst = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                    Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                }
                _ => None,
            });
            if let (Some(mac), Some(dst), Some(name)) = (mac, dst, names.get(&n.header.ifindex)) {
                if mac == [0; 6] {
                    out.floods.entry(name.to_string()).or_default().insert(dst);
                } else {
                    out.unicast
                        .entry(name.to_string())
                        .or_default()
                        .insert(crate::ipam::Mac(mac), dst);
                }
            }
        }
        Ok(out)
    }
}

/// Remote FDB entries of the VxLAN devices, by device name.
#[derive(Debug, Clone, Default)]
pub struct RemoteFdb {
    pub floods: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    pub unicast: BTreeMap<String, BTreeMap<crate::ipam::Mac, Ipv4Addr>>,
}

fn observe(m: &LinkMessage) -> ObservedLink {
    let mut l = ObservedLink {
        index: m.header.index,
        up: m.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(a) if a.len() == 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(a);
                l.mac = Some(crate::ipam::Mac(m));
            }
            LinkAttribute::Mtu(mtu) => l.mtu = *mtu,
            LinkAttribute::Group(g) => l.group = *g,
            LinkAttribute::Controller(c) => l.master = Some(*c),
            LinkAttribute::IfAlias(a) if !a.is_empty() => l.alias = Some(a.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => {
                            l.kind = Some(
                                match k {
                                    InfoKind::Bridge => "bridge",
                                    InfoKind::Vxlan => "vxlan",
                                    InfoKind::Tun => "tun",
                                    InfoKind::Veth => "veth",
                                    InfoKind::MacVlan => "macvlan",
                                    InfoKind::Vlan => "vlan",
                                    _ => "other",
                                }
                                .to_string(),
                            )
                        }
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            let mut id = 0;
                            let mut local = None;
                            let mut learning = true;
                            for x in v {
                                match x {
                                    InfoVxlan::Id(i) => id = *i,
                                    InfoVxlan::Local(ip) => local = Some(*ip),
                                    InfoVxlan::Learning(b) => learning = *b,
                                    _ => {}
                                }
                            }
                            l.vxlan = Some((id, local, learning));
                        }
                        LinkInfo::Data(InfoData::Vlan(v)) => {
                            for x in v {
                                if let InfoVlan::Id(id) = x {
                                    l.vlan_id = Some(*id);
                                }
                            }
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(attrs)) => {
                            for x in attrs {
                                match x {
                                    InfoBridgePort::Learning(on) => l.port_learning = Some(*on),
                                    InfoBridgePort::NeighSupress(on) => {
                                        l.port_neigh_suppress = Some(*on)
                                    }
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    l
}
