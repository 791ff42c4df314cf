//! The cluster's node list at run time. A node joins or leaves through any node: the list is
//! recorded by every member (`cluster.json`, which then wins over the configured one), and
//! replicas move with it (`placement`): onto a node that joined until the replicas are spread
//! evenly, off a node that leaves (alive or dead) before it is dropped from the list. Each move
//! is `Move` on the volume's leader: the new replica catches up before the membership changes,
//! so no acknowledged write is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use super::{err, list, manage, status, Node, Rpc, VolumeSpec, LEADER_WAIT};
use crate::raft::placement::{self, Move};
use crate::raft::NodeId;

/// How long a client of the cluster waits for each node it asks for the node list.
const REFRESH_ASK: std::time::Duration = std::time::Duration::from_secs(2);

impl Node {
    fn cluster_path(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }

    /// The storage nodes of the cluster (id -> RPC address).
    pub fn cluster(&self) -> BTreeMap<NodeId, String> {
        self.cluster.read().unwrap().clone()
    }

    /// The list an earlier join or leave recorded here, if any (read at start-up).
    pub(super) fn saved_cluster(&self) -> io::Result<Option<BTreeMap<NodeId, String>>> {
        match std::fs::read(self.cluster_path()) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).map_err(err)?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records `members` as the cluster list, durably, and uses it from now on (a client of
    /// the cluster keeps it in memory: it asks for it again).
    pub(super) async fn save_cluster(&self, members: &BTreeMap<NodeId, String>) -> io::Result<()> {
        if self.is_client() {
            self.set_cluster(members.clone());
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(members).map_err(err)?;
        let path = self.cluster_path();
        tokio::task::spawn_blocking(move || crate::raft::write_atomic(&path, &bytes))
            .await
            .map_err(err)??;
        self.set_cluster(members.clone());
        Ok(())
    }

    /// Whether this node is a client of the cluster ([`Node::client`]).
    pub fn is_client(&self) -> bool {
        self.seeds.is_some()
    }

    /// On a client of the cluster: takes the node list from the first storage node that
    /// answers with a list that has it at the address asked (a node removed from the cluster
    /// while it was down keeps its old list), those it knows first, then those it was given.
    /// Refused (and the list kept) if the list names this client's id: a storage node of that
    /// id would be taken for this one. One at a time: a caller that waited for another's
    /// refresh takes its outcome.
    pub async fn refresh_cluster(&self) -> io::Result<()> {
        let Some(seeds) = &self.seeds else {
            return Ok(());
        };
        let asked = std::time::Instant::now();
        let mut refreshed = self.refreshed.lock().await;
        if refreshed.is_some_and(|at| at >= asked) {
            return Ok(());
        }
        let known = self.cluster();
        let ask = known
            .iter()
            .chain(seeds.iter().filter(|(id, _)| !known.contains_key(*id)));
        let mut failed = Vec::new();
        for (id, addr) in ask {
            let list = match tokio::time::timeout(REFRESH_ASK, super::cluster(addr)).await {
                Ok(Ok(list)) if list.get(id) == Some(addr) => list,
                Ok(Ok(_)) => {
                    failed.push(format!("node {id} at {addr}: not in its own list"));
                    continue;
                }
                Ok(Err(e)) => {
                    failed.push(format!("node {id} at {addr}: {e}"));
                    continue;
                }
                Err(_) => {
                    failed.push(format!("node {id} at {addr}: no answer"));
                    continue;
                }
            };
            if list.contains_key(&self.id) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "node {id} lists a storage node {} (this client's id): give this \
                         client another id",
                        self.id
                    ),
                ));
            }
            if list != known {
                tracing::info!(node = id, "the cluster's nodes are now {list:?}");
                self.set_cluster(list);
            }
            *refreshed = Some(std::time::Instant::now());
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::HostUnreachable,
            format!(
                "no storage node answered for the cluster's node list ({})",
                failed.join("; ")
            ),
        ))
    }

    /// On a client of the cluster (the nodes do not tell it of joins and leaves): takes the
    /// node list now and every `every` ([`Node::refresh_cluster`]). Ends with the node.
    pub fn follow_cluster(self: &Arc<Node>, every: std::time::Duration) {
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(n) = node.upgrade() else {
                    return;
                };
                if let Err(e) = n.refresh_cluster().await {
                    tracing::warn!("the cluster's node list: {e}");
                }
                drop(n);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// A join or leave through a client of the cluster: carried out by the first storage node
    /// that answers (its node list is the one to go by), whatever it says.
    async fn through_a_storage_node(&self, rpc: Rpc) -> io::Result<Vec<Move>> {
        self.refresh_cluster().await?;
        for (_, addr) in self.cluster() {
            if super::probe(&addr, REFRESH_ASK).await != Some(true) {
                continue;
            }
            let r = super::moves(&addr, rpc).await;
            if let Err(e) = self.refresh_cluster().await {
                tracing::warn!("the cluster's node list: {e}");
            }
            return r;
        }
        Err(io::Error::new(
            io::ErrorKind::HostUnreachable,
            "no storage node answered",
        ))
    }

    /// Tells every node in `to` (this one too) that the cluster list is `members`. Nodes that
    /// do not answer are reported, not waited for.
    async fn announce_cluster(
        &self,
        members: &BTreeMap<NodeId, String>,
        to: &BTreeMap<NodeId, String>,
    ) -> io::Result<()> {
        for (id, addr) in to {
            if *id == self.id {
                self.save_cluster(members).await?;
            } else if let Err(e) = manage(addr, Rpc::SetCluster(members.clone())).await {
                tracing::warn!(node = id, "cluster list not recorded there: {e}");
            }
        }
        Ok(())
    }

    /// Every volume of the cluster with its members: the union of the catalogs of the nodes
    /// that answer (a dead member's volumes are known to their other members).
    async fn all_volumes(&self) -> BTreeMap<String, VolumeSpec> {
        let mut out: BTreeMap<String, VolumeSpec> = BTreeMap::new();
        for (spec, _) in self.volumes().await {
            out.insert(spec.name.clone(), spec);
        }
        for (id, addr) in self.cluster() {
            if id == self.id {
                continue;
            }
            match list(&addr).await {
                Ok(v) => {
                    for (spec, _) in v {
                        out.entry(spec.name.clone()).or_insert(spec);
                    }
                }
                Err(e) => tracing::info!(node = id, "volumes not listed: {e}"),
            }
        }
        out
    }

    /// Moves `spec`'s replica from node `from` to node `to`, through a member other than
    /// `from` (the group's leader does it; `from` may be dead). While the group elects a new
    /// leader (`from` was the leader and just died) the move is tried again, up to
    /// [`LEADER_WAIT`].
    async fn move_one(
        self: &Arc<Node>,
        spec: &VolumeSpec,
        from: NodeId,
        to: NodeId,
    ) -> io::Result<()> {
        let to_addr = self
            .cluster()
            .get(&to)
            .cloned()
            .ok_or_else(|| err(format!("node {to} is not in the cluster")))?;
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let mut last = err(format!(
                "volume {}: no member to move it through",
                spec.name
            ));
            if self.id != from && spec.members.contains_key(&self.id) {
                match self.move_replica(&spec.name, from, to, &to_addr).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e,
                }
            } else {
                for (id, addr) in spec.members.iter().filter(|(id, _)| **id != from) {
                    let rpc = Rpc::Move(spec.name.clone(), from, to, to_addr.clone());
                    match manage(addr, rpc).await {
                        Ok(()) => return Ok(()),
                        Err(e) => last = err(format!("node {id}: {e}")),
                    }
                }
            }
            // A move that went through although it reported an error is not done twice.
            if self.moved(spec, from, to).await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(last);
            }
            tracing::info!(volume = %spec.name, from, to, "move not done yet ({last}); trying again");
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }

    /// Whether `spec`'s group has `to` and not `from` among its voters, as a member with a
    /// leader sees it.
    async fn moved(&self, spec: &VolumeSpec, from: NodeId, to: NodeId) -> bool {
        for (id, addr) in spec.members.iter().filter(|(id, _)| **id != from) {
            let s = match self.group(&spec.name) {
                Some(g) if *id == self.id => Some(g.status(self.id)),
                _ => status(addr, &spec.name).await.ok(),
            };
            if let Some(s) = s.filter(|s| s.leader.is_some()) {
                return s.members.contains(&to) && !s.members.contains(&from);
            }
        }
        false
    }

    /// Carries out `moves` in order (the members of `volumes` follow them); stops at the first
    /// that fails.
    async fn run_moves(
        self: &Arc<Node>,
        volumes: &BTreeMap<String, VolumeSpec>,
        moves: &[Move],
    ) -> io::Result<()> {
        let mut volumes = volumes.clone();
        let cluster = self.cluster();
        for (name, from, to) in moves {
            let spec = volumes.get_mut(name).expect("planned from these volumes");
            tracing::info!(volume = %name, from, to, "moving a replica");
            self.move_one(spec, *from, *to).await.map_err(|e| {
                err(format!(
                    "volume {name}: move from node {from} to node {to}: {e}"
                ))
            })?;
            spec.members.remove(from);
            spec.members
                .insert(*to, cluster.get(to).cloned().unwrap_or_default());
        }
        Ok(())
    }

    /// Adds node `id` at `addr` to the cluster: it (and every member) records the new list,
    /// then replicas move onto it until the nodes' replica counts differ by one at most.
    /// Adding a node that is there already at that address only spreads again. Returns the
    /// moves made.
    pub async fn add_node(self: &Arc<Node>, id: NodeId, addr: &str) -> io::Result<Vec<Move>> {
        if self.is_client() {
            if id == self.id {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "node {id}: this client's id (a client of the cluster is no storage node)"
                    ),
                ));
            }
            return self
                .through_a_storage_node(Rpc::AddNode(id, addr.to_string()))
                .await;
        }
        let mut members = self.cluster();
        match members.get(&id) {
            Some(a) if a != addr => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("node {id} is in the cluster already, at {a}"),
                ))
            }
            _ => {}
        }
        members.insert(id, addr.to_string());
        // The new node first: if it cannot be reached, nothing changes.
        if id != self.id {
            manage(addr, Rpc::SetCluster(members.clone()))
                .await
                .map_err(|e| err(format!("node {id} at {addr}: {e}")))?;
        }
        self.announce_cluster(&members, &members).await?;
        let volumes = self.all_volumes().await;
        let holders: BTreeMap<String, BTreeSet<NodeId>> = volumes
            .iter()
            .map(|(n, s)| (n.clone(), s.members.keys().copied().collect()))
            .collect();
        let nodes: Vec<NodeId> = members.keys().copied().collect();
        let moves = placement::spread(&holders, &nodes);
        self.run_moves(&volumes, &moves).await?;
        tracing::info!(node = id, %addr, moves = moves.len(), "node added");
        Ok(moves)
    }

    /// Removes node `id` (alive or dead) from the cluster: each of its replicas moves to
    /// another node first (refused, with nothing moved, when a volume would have nowhere to
    /// go), then every remaining member records the list without it. Returns the moves made.
    pub async fn remove_node(self: &Arc<Node>, id: NodeId) -> io::Result<Vec<Move>> {
        if self.is_client() {
            return self.through_a_storage_node(Rpc::RemoveNode(id)).await;
        }
        let old = self.cluster();
        if !old.contains_key(&id) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("node {id} is not in the cluster"),
            ));
        }
        let volumes = self.all_volumes().await;
        let holders: BTreeMap<String, BTreeSet<NodeId>> = volumes
            .iter()
            .map(|(n, s)| (n.clone(), s.members.keys().copied().collect()))
            .collect();
        let nodes: Vec<NodeId> = old.keys().copied().collect();
        let moves = placement::drain(&holders, &nodes, id)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.run_moves(&volumes, &moves).await?;
        let mut members = old.clone();
        members.remove(&id);
        self.announce_cluster(&members, &old).await?;
        tracing::info!(node = id, moves = moves.len(), "node removed");
        Ok(moves)
    }
}
