//! Where replicas go when the cluster changes: pure planning over "which nodes hold which
//! volume", tested without a cluster. A node joining gets replicas moved onto it until the
//! replica counts of the nodes differ by at most one; a node leaving (alive or dead) has each
//! of its replicas moved to the least loaded node that does not hold that volume yet.

use std::collections::{BTreeMap, BTreeSet};

use super::NodeId;

/// One replica to move: (volume, from, to).
pub type Move = (String, NodeId, NodeId);

/// The replicas each node of `nodes` holds (nodes without any count 0).
fn counts(
    volumes: &BTreeMap<String, BTreeSet<NodeId>>,
    nodes: &[NodeId],
) -> BTreeMap<NodeId, usize> {
    let mut c: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for members in volumes.values() {
        for m in members {
            if let Some(n) = c.get_mut(m) {
                *n += 1;
            }
        }
    }
    c
}

/// Moves that spread the replicas of `volumes` (volume -> the nodes holding it) evenly over
/// `nodes`: from the most loaded node to the least loaded one, a volume the latter does not
/// hold, until no two nodes differ by more than one replica (or nothing can move).
pub fn spread(volumes: &BTreeMap<String, BTreeSet<NodeId>>, nodes: &[NodeId]) -> Vec<Move> {
    let mut volumes = volumes.clone();
    let mut moves = Vec::new();
    loop {
        let c = counts(&volumes, nodes);
        let (Some((&most, &max)), Some((&least, &min))) = (
            c.iter().max_by_key(|(n, k)| (**k, std::cmp::Reverse(**n))),
            c.iter().min_by_key(|(n, k)| (**k, **n)),
        ) else {
            return moves;
        };
        if max <= min + 1 {
            return moves;
        }
        let Some(name) = volumes
            .iter()
            .find(|(_, m)| m.contains(&most) && !m.contains(&least))
            .map(|(v, _)| v.clone())
        else {
            return moves;
        };
        let members = volumes.get_mut(&name).expect("found above");
        members.remove(&most);
        members.insert(least);
        moves.push((name, most, least));
    }
}

/// Moves that take every replica off node `gone` onto `nodes` (the nodes that stay): each to
/// the least loaded one not holding that volume yet. Refused, naming the volume, when a volume
/// would have nowhere to go (fewer nodes left than its replicas).
pub fn drain(
    volumes: &BTreeMap<String, BTreeSet<NodeId>>,
    nodes: &[NodeId],
    gone: NodeId,
) -> Result<Vec<Move>, String> {
    let stay: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != gone).collect();
    let mut volumes = volumes.clone();
    let mut moves = Vec::new();
    let names: Vec<String> = volumes
        .iter()
        .filter(|(_, m)| m.contains(&gone))
        .map(|(v, _)| v.clone())
        .collect();
    for name in names {
        let c = counts(&volumes, &stay);
        let members = &volumes[&name];
        let to = c
            .iter()
            .filter(|(n, _)| !members.contains(n))
            .min_by_key(|(n, k)| (**k, **n))
            .map(|(n, _)| *n)
            .ok_or_else(|| {
                format!(
                    "volume {name}: no node left to take its replica from node {gone} ({} of {} nodes hold it)",
                    members.len(),
                    nodes.len()
                )
            })?;
        let members = volumes.get_mut(&name).expect("listed above");
        members.remove(&gone);
        members.insert(to);
        moves.push((name, gone, to));
    }
    Ok(moves)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vols(list: &[(&str, &[NodeId])]) -> BTreeMap<String, BTreeSet<NodeId>> {
        list.iter()
            .map(|(n, m)| (n.to_string(), m.iter().copied().collect()))
            .collect()
    }

    /// Applies `moves` and returns the replica count per node.
    fn after(
        mut v: BTreeMap<String, BTreeSet<NodeId>>,
        moves: &[Move],
        nodes: &[NodeId],
    ) -> BTreeMap<NodeId, usize> {
        for (name, from, to) in moves {
            let m = v.get_mut(name).unwrap();
            assert!(m.remove(from), "{name} was not on {from}");
            assert!(m.insert(*to), "{name} was on {to} already");
        }
        counts(&v, nodes)
    }

    #[test]
    fn a_new_node_takes_replicas_until_counts_differ_by_one_at_most() {
        let v = vols(&[("a", &[1, 2, 3]), ("b", &[1, 2, 3]), ("c", &[1, 2, 3])]);
        let nodes = [1, 2, 3, 4];
        let moves = spread(&v, &nodes);
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert!(moves.iter().all(|(_, _, to)| *to == 4), "{moves:?}");
        let c = after(v, &moves, &nodes);
        assert_eq!(c[&4], 2);
        assert!(c.values().all(|k| (2..=3).contains(k)), "{c:?}");
    }

    #[test]
    fn a_balanced_cluster_moves_nothing() {
        let v = vols(&[
            ("a", &[1, 2, 3]),
            ("b", &[2, 3, 4]),
            ("c", &[1, 3, 4]),
            ("d", &[1, 2, 4]),
        ]);
        assert!(spread(&v, &[1, 2, 3, 4]).is_empty());
        assert!(spread(&BTreeMap::new(), &[1, 2]).is_empty());
    }

    #[test]
    fn a_leaving_node_hands_each_replica_to_a_node_without_that_volume() {
        let v = vols(&[("a", &[1, 2, 3]), ("b", &[1, 2, 4]), ("c", &[2, 3, 4])]);
        let nodes = [1, 2, 3, 4, 5];
        let moves = drain(&v, &nodes, 1).unwrap();
        assert_eq!(moves.len(), 2);
        assert!(moves.iter().all(|(_, from, _)| *from == 1));
        let c = after(v, &moves, &nodes);
        assert_eq!(c[&1], 0);
        assert_eq!(c[&5], 2, "the empty node takes them first: {c:?}");
    }

    #[test]
    fn a_leaving_node_is_refused_when_a_volume_would_have_nowhere_to_go() {
        let v = vols(&[("a", &[1, 2, 3])]);
        let e = drain(&v, &[1, 2, 3], 3).unwrap_err();
        assert!(e.contains("volume a") && e.contains("node 3"), "{e}");
        // A node holding nothing leaves freely.
        assert!(drain(&v, &[1, 2, 3, 4], 4).unwrap().is_empty());
    }
}
