//! One host's tenant networks: plans with [`crate::plan`] and carries the plan out through
//! netlink and the VLAN filter, in the host's namespace.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::filter::{PortCounters, VlanFilter};
use crate::link::Netlink;
use crate::model::HostNet;
use crate::names;
use crate::netns::Netns;
use crate::plan::{self, Observed, Op};

/// The link group a vpcd instance uses for bulk deletion: from its id, away from 0 (default)
/// and from the small numbers people assign by hand.
fn delete_group(owner: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in owner.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    0x4000_0000 | (h & 0x3fff_ffff)
}

/// The tenant networks of the host whose network namespace is `netns`.
#[derive(Debug, Clone)]
pub struct NetHost {
    nl: Netlink,
    filter: Arc<dyn VlanFilter>,
}

impl NetHost {
    /// Opens netlink in `netns`. Must be called within a tokio runtime.
    pub fn open(netns: &Netns, filter: Arc<dyn VlanFilter>) -> Result<NetHost> {
        Ok(NetHost {
            nl: Netlink::open(netns)?,
            filter,
        })
    }

    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    pub fn filter(&self) -> &Arc<dyn VlanFilter> {
        &self.filter
    }

    /// What the kernel and the filter have now.
    pub async fn observe(&self) -> Result<Observed> {
        let links = self.nl.links().await?;
        let fdb = self.nl.fdb(&links).await?;
        let filtered = self.filter.ports()?.into_iter().collect();
        let bridges: Vec<_> = links
            .iter()
            .filter(|l| matches!(l.kind.as_deref(), Some("bridge" | "vlan")))
            .cloned()
            .collect();
        let neighbours = self.nl.neighbours(&bridges).await?;
        Ok(Observed {
            links,
            floods: fdb.floods,
            remote: fdb.unicast,
            filtered,
            neighbours,
            bridge_vlans: self.filter.kind() == crate::filter::FilterKind::Kernel,
        })
    }

    /// Makes the host match `desired`: plans, then runs every step, going on after a failed
    /// one and reporting all failures together. Returns the steps that were planned.
    #[tracing::instrument(skip_all)]
    pub async fn apply(&self, desired: &HostNet) -> Result<Vec<Op>> {
        names::validate_prefix(&desired.prefix)?;
        let observed = self.observe().await?;
        let ops = plan::plan(desired, &observed)?;
        let alias = names::alias(&desired.owner);
        let mut errors = Vec::new();
        // Deletions come first in a plan; they go in one request when that is safe.
        let deletes: Vec<&str> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Delete { name } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        let bulk = deletes.len() > 1
            && self
                .delete_in_bulk(&deletes, &observed, &desired.owner)
                .await
                .inspect_err(|e| tracing::warn!("bulk delete failed, deleting one by one: {e}"))
                .is_ok();
        // New taps are made together in one namespace thread, and each is configured (MTU,
        // master, alias, up) with one request, the requests in flight together; their indexes
        // are kept for the filter steps.
        let masters: std::collections::HashMap<&str, &str> = ops
            .iter()
            .filter_map(|o| match o {
                Op::SetMaster { name, master } => Some((name.as_str(), master.as_str())),
                _ => None,
            })
            .collect();
        let mut configured: std::collections::HashSet<&str> = Default::default();
        let mut indexes: std::collections::HashMap<&str, u32> = Default::default();
        let new_taps: Vec<(String, u32, String)> = ops
            .iter()
            .filter_map(|o| match o {
                Op::CreateTap { name, mtu } => masters
                    .get(name.as_str())
                    .map(|m| (name.clone(), *mtu, m.to_string())),
                _ => None,
            })
            .collect();
        let mut failed_taps: std::collections::HashMap<&str, Error> = Default::default();
        let mut taps_made = false;
        for op in &ops {
            if bulk && matches!(op, Op::Delete { .. }) {
                continue;
            }
            tracing::debug!(?op, "netdrv step");
            let result = match op {
                Op::CreateTap { name, .. } if masters.contains_key(name.as_str()) => {
                    // The first new tap: make them all (their bridges exist by now, the plan
                    // creates bridges first).
                    if !taps_made {
                        taps_made = true;
                        let made = self.nl.create_taps_attached(&new_taps, &alias).await;
                        for ((tap, _, _), r) in new_taps.iter().zip(made) {
                            let tap = ops
                                .iter()
                                .find_map(|o| match o {
                                    Op::CreateTap { name: n, .. } if n == tap => Some(n.as_str()),
                                    _ => None,
                                })
                                .expect("taken from ops");
                            match r {
                                Ok(index) => {
                                    configured.insert(tap);
                                    indexes.insert(tap, index);
                                }
                                Err(e) => {
                                    failed_taps.insert(tap, e);
                                }
                            }
                        }
                    }
                    match failed_taps.remove(name.as_str()) {
                        Some(e) => Err(e),
                        None => continue,
                    }
                }
                Op::SetFilter { dev, cfg } if indexes.contains_key(dev.as_str()) => {
                    self.filter.set_port(indexes[dev.as_str()], dev, cfg)
                }
                Op::SetMaster { name, .. } | Op::SetUp { name }
                    if configured.contains(name.as_str()) =>
                {
                    continue;
                }
                _ => self.run(op, &alias).await,
            };
            if let Err(e) = result {
                tracing::warn!(?op, "netdrv step failed: {e}");
                errors.push(e);
            }
        }
        match errors.len() {
            0 => Ok(ops),
            1 => Err(errors.pop().expect("one error")),
            _ => Err(Error::Many(errors)),
        }
    }

    /// Puts the links to delete in a link group of this vpcd instance and deletes the group
    /// with one request. Refused (and done one by one by the caller) if any other link is in
    /// that group, so nothing vpcd does not own can go with it.
    async fn delete_in_bulk(&self, names: &[&str], observed: &Observed, owner: &str) -> Result<()> {
        let group = delete_group(owner);
        if let Some(l) = observed
            .links
            .iter()
            .find(|l| l.group == group && !names.contains(&l.name.as_str()))
        {
            return Err(Error::InUse(format!("link group {group} (by {})", l.name)));
        }
        for name in names {
            self.nl.set_group(name, group).await?;
        }
        self.nl.delete_group(group).await?;
        // Deleting a veth also removes its peer; whatever is left is deleted one by one.
        for name in names {
            self.nl.delete(name).await?;
        }
        Ok(())
    }

    async fn run(&self, op: &Op, alias: &str) -> Result<()> {
        let nl = &self.nl;
        match op {
            Op::Delete { name } => nl.delete(name).await,
            Op::CreateBridge { name } => {
                nl.create_bridge(name).await?;
                nl.set_alias(name, alias).await?;
                let index = nl
                    .index_of(name)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("link {name}")))?;
                self.filter.prepare_bridge(index, name)
            }
            Op::CreateVxlan {
                name,
                vni,
                local,
                mtu,
            } => {
                nl.create_vxlan(name, *vni, *local, *mtu).await?;
                nl.set_alias(name, alias).await
            }
            Op::CreateTap { name, mtu } => {
                nl.create_tap(name, *mtu).await?;
                nl.set_alias(name, alias).await
            }
            Op::CreateVeth { name, mtu, peer } => {
                // The peer is made inside its namespace, with its name, MAC and the port MTU
                // (or full-size frames from it would be dropped at the host end, found by the
                // data-path benchmark).
                let target = Netns::open(&peer.netns)?;
                nl.create_veth_into(name, *mtu, &peer.ifname, peer.mac.0, &target)
                    .await?;
                nl.set_alias(name, alias).await?;
                let inner = Netlink::open(&target)?;
                inner.set_up(&peer.ifname).await?;
                if let Some((ip, prefix)) = peer.address {
                    inner.add_address(&peer.ifname, ip, prefix).await?;
                }
                Ok(())
            }
            Op::SetMaster { name, master } => nl.set_master(name, master).await,
            Op::SetMtu { name, mtu } => nl.set_mtu(name, *mtu).await,
            Op::SetUp { name } => nl.set_up(name).await,
            Op::SetAlias { name } => nl.set_alias(name, alias).await,
            Op::SetLearning { name, on } => nl.set_port_learning(name, *on).await,
            Op::AddNeighbour { dev, ip, mac } => nl.neighbour(dev, *ip, Some(mac.0)).await,
            Op::DelNeighbour { dev, ip } => nl.neighbour(dev, *ip, None).await,
            Op::AddFlood { dev, peer } => nl.add_flood(dev, *peer).await,
            Op::DelFlood { dev, peer } => nl.del_flood(dev, *peer).await,
            Op::AddRemote {
                dev,
                mac,
                dst,
                vlan,
            } => nl.add_remote(dev, mac.0, *dst, *vlan).await,
            Op::DelRemote {
                dev,
                mac,
                dst,
                vlan,
            } => nl.del_remote(dev, mac.0, *dst, *vlan).await,
            Op::CreateVlan { name, parent, vid } => {
                nl.create_vlan(name, parent, *vid).await?;
                nl.set_alias(name, alias).await
            }
            Op::SetFilter { dev, cfg } => {
                let index = nl
                    .index_of(dev)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("link {dev}")))?;
                self.filter.set_port(index, dev, cfg)
            }
            Op::DropFilter { index } => self.filter.remove_port(*index),
        }
    }

    /// Counters of the port whose link is `name`.
    pub async fn counters(&self, name: &str) -> Result<PortCounters> {
        let index = self
            .nl
            .index_of(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("link {name}")))?;
        self.filter.counters(index)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn delete_groups_are_per_owner_and_away_from_hand_picked_numbers() {
        let a = super::delete_group("f99e55e9-5a79-4ddc-8396-7d86962d66f5");
        let b = super::delete_group("c1d89580-f938-4797-a80e-dc1a2413994a");
        assert_ne!(a, b);
        for g in [a, b] {
            assert!((0x4000_0000..0x8000_0000).contains(&g), "{g:#x}");
        }
        assert_eq!(
            a,
            super::delete_group("f99e55e9-5a79-4ddc-8396-7d86962d66f5")
        );
    }
}
