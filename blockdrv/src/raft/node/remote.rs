//! Volumes a node holds no replica of, served all the same: once a cluster has more nodes than
//! a volume has replicas, a host's VMs may use a volume whose replicas are elsewhere. The NBD
//! server looks a name its table does not hold up in the cluster ([`Remote`]); the connection
//! then gets a [`RemoteVolume`], which sends every request to the volume's leader
//! (`Rpc::Remote`, naming the volume's id, so a volume deleted and made again under its name
//! is not taken for it): writes as a follower forwards them, reads and block status served by
//! the leader's replica behind its read barrier, linearizable as its own front ends' are. A
//! replica whose raft stopped, or that its node no longer holds, has its front ends'
//! requests served the same way ([`super::RaftVolume`]).
//!
//! Where the leader is: each node of the cluster that holds the volume says, in its `Status`,
//! which leader it knows and in which term; the newest term wins (a leader that hung and runs
//! again still thinks it leads, in an older term). The lookup ends once the leader's own
//! status and those of a majority of its members are in, so a node that is down does not hold
//! it up. Requests wait out elections as a replica's do (up to [`Node::leader_wait`]), and one
//! waiting for a leader that hangs goes to the next one once it is elected.

use std::io;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{
    extents, status, write_in_parts, BlockOp, Data, Node, Pool, RemoteOp, Reply, Rpc, Status,
};

/// How long each node has to say whether it holds a volume, and who leads it.
pub(super) const ASK: Duration = Duration::from_secs(2);
/// After this long without an answer, a request checks every [`RECHECK`] whether another node
/// leads now.
const PATIENCE: Duration = Duration::from_secs(1);
const RECHECK: Duration = Duration::from_millis(500);

/// How a status's word on a volume's leader ranks ([`Node::locate`], [`Node::cluster_volumes`]):
/// one that names a leader it can be reached at first, then the newest term (a leader that
/// hung and runs again still thinks it leads, in an older term), then, of one term, the
/// leader's own (its size is the newest).
fn rank(s: &Status) -> (bool, u64, bool) {
    (s.leader_addr.is_some(), s.term, s.leader == Some(s.node))
}

impl Node {
    /// Who leads volume `name`, as the other nodes of the cluster that hold it say (asked all
    /// at once, [`ASK`] each): of their answers that name a leader, the newest term's (a
    /// replica that campaigns on its own, left behind by a move or a delete, names none, how
    /// ever high its term), the leader's own first; a status naming none if none does. The
    /// answers of nodes that are down are not waited for once the leader's own and a majority
    /// of its members' are in. `NotFound` if no node that answered holds it (those that did
    /// not are named).
    pub async fn locate(&self, name: &str) -> io::Result<Status> {
        match self.locate_volume(name, None).await {
            Err(e) if e.kind() == io::ErrorKind::Other => {
                Err(io::Error::new(io::ErrorKind::NotFound, e.to_string()))
            }
            found => found,
        }
    }

    /// [`Node::locate`] of volume (`name`, `id`): the answers of replicas of another volume of
    /// that name are left out, and a name that no node that answered holds, while some did
    /// not answer, is `Other` (a connected client tries again: its volume's nodes may be
    /// back in a moment). A client of the cluster that finds no node holding it asks for the
    /// node list again, and looks again (the volume may have moved to a node that joined).
    pub(super) async fn locate_volume(&self, name: &str, id: Option<u64>) -> io::Result<Status> {
        match self.locate_once(name, id).await {
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.is_client() => {
                if let Err(e) = self.refresh_cluster().await {
                    tracing::warn!("the cluster's node list: {e}");
                }
                self.locate_once(name, id).await
            }
            found => found,
        }
    }

    async fn locate_once(&self, name: &str, id: Option<u64>) -> io::Result<Status> {
        let mut asks: futures::stream::FuturesUnordered<_> = self
            .cluster()
            .into_iter()
            .filter(|(id, _)| *id != self.id)
            .map(|(_, addr)| async move {
                match tokio::time::timeout(ASK, status(&addr, name)).await {
                    Ok(r) => r,
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{addr} did not answer within {} s", ASK.as_secs()),
                    )),
                }
            })
            .collect();
        let mut best: Option<Status> = None;
        let (mut holders, mut failed) = (Vec::new(), Vec::new());
        // A replica here (one that cannot serve, whose clients come this way) is one of the
        // members heard: a member that is down does not hold the lookup up then either.
        let here = self.group(name);
        if here.is_some_and(|g| id.is_none_or(|i| g.incarnation.volume_id() == i)) {
            holders.push(self.id);
        }
        while let Some(answer) = asks.next().await {
            match answer {
                Ok(s) if id.is_some_and(|id| id != s.id) => {}
                Ok(s) => {
                    holders.push(s.node);
                    if best.as_ref().is_none_or(|b| rank(&s) > rank(b)) {
                        best = Some(s);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => failed.push(e.to_string()),
            }
            let settled = best.as_ref().is_some_and(|b| {
                let heard = b.members.iter().filter(|m| holders.contains(m)).count();
                b.leader == Some(b.node) && 2 * heard > b.members.len()
            });
            if settled {
                break;
            }
        }
        match best {
            Some(s) => Ok(s),
            None if failed.is_empty() => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("volume {name}: no node of the cluster holds it"),
            )),
            None => Err(io::Error::other(format!(
                "volume {name}: no node that answered holds it ({})",
                failed.join("; ")
            ))),
        }
    }

    /// The volumes of the cluster: those this node holds, with their status here, and those
    /// only other nodes hold, as the node that says it leads each has them (or, while none
    /// does, any holder), from every other node's list (asked at once, [`ASK`] each), and
    /// the nodes that did not answer (the volumes only they hold are missing).
    pub async fn cluster_volumes(&self) -> (Vec<(super::VolumeSpec, Status)>, Vec<u64>) {
        let mut all: std::collections::BTreeMap<String, (super::VolumeSpec, Status)> = self
            .volumes()
            .await
            .into_iter()
            .map(|(spec, st)| (spec.name.clone(), (spec, st)))
            .collect();
        let here: Vec<String> = all.keys().cloned().collect();
        let asks = self
            .cluster()
            .into_iter()
            .filter(|(id, _)| *id != self.id)
            .map(|(id, addr)| async move {
                let list = tokio::time::timeout(ASK, super::list(&addr))
                    .await
                    .ok()
                    .and_then(Result::ok);
                (id, list)
            });
        let (silent, lists): (Vec<_>, Vec<_>) = futures::future::join_all(asks)
            .await
            .into_iter()
            .partition(|(_, list)| list.is_none());
        // A replica of a deleted volume that its node has not dropped yet (cut off during the
        // delete: it drops it once it learns) is not a volume of the cluster.
        let buried = self.tombstones.lock().await.clone();
        for (spec, st) in lists.into_iter().filter_map(|(_, list)| list).flatten() {
            if here.contains(&spec.name) || super::buried(&buried, &spec.name, spec.id) {
                continue;
            }
            let better = all.get(&spec.name).is_none_or(|(_, b)| rank(&st) > rank(b));
            if better {
                all.insert(spec.name.clone(), (spec, st));
            }
        }
        let silent = silent.into_iter().map(|(id, _)| id).collect();
        (all.into_values().collect(), silent)
    }

    /// The status of volume `name`, which other nodes hold, as its leader sees it ([`Node::locate`],
    /// then the leader's own if that was not among the answers; with the leader unreachable
    /// if it does not answer within [`ASK`]). `HostUnreachable` (naming them) if no node that
    /// answered holds it while some did not answer.
    pub async fn volume_status(&self, name: &str) -> io::Result<Status> {
        let found = match self.locate_volume(name, None).await {
            Err(e) if e.kind() == io::ErrorKind::Other => {
                return Err(io::Error::new(
                    io::ErrorKind::HostUnreachable,
                    e.to_string(),
                ))
            }
            found => found?,
        };
        let Some(addr) = found.leader_addr.clone() else {
            return Ok(found);
        };
        if found.leader == Some(found.node) {
            return Ok(found);
        }
        Ok(super::as_leader_sees(found, &addr, name).await)
    }
}

/// Finds the volumes this node holds no replica of for its NBD server (see the module's doc).
#[derive(Debug)]
pub(super) struct Remote(pub(super) Weak<Node>);

#[async_trait::async_trait]
impl crate::nbd::server::Resolve for Remote {
    async fn resolve(&self, name: &str) -> Option<crate::nbd::Export> {
        let node = self.0.upgrade()?;
        super::check_volume_name(name).ok()?;
        let found = match node.locate(name).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(volume = name, "not served: {e}");
                return None;
            }
        };
        Some(crate::nbd::Export {
            name: name.to_string(),
            description: REMOTE_DESCRIPTION.into(),
            volume: Arc::new(RemoteVolume::new(node, name, found)),
            read_only: false,
        })
    }

    /// The cluster's volumes ([`Node::cluster_volumes`]: those of nodes that do not answer
    /// within [`ASK`] are missing); the server leaves out those it has.
    async fn list(&self) -> Vec<(String, String)> {
        let Some(node) = self.0.upgrade() else {
            return Vec::new();
        };
        let (volumes, _) = node.cluster_volumes().await;
        volumes
            .into_iter()
            .map(|(spec, _)| (spec.name, REMOTE_DESCRIPTION.to_string()))
            .collect()
    }
}

/// How an export served through other nodes describes itself.
const REMOTE_DESCRIPTION: &str = "replicated volume (replicas on other nodes)";

/// A leader lookup's result, shared by the requests that waited for it.
type Found = Result<Status, (io::ErrorKind, String)>;

/// A replicated volume served by a node that holds no replica of it: every request runs on
/// the leader (see the module's doc). One per NBD connection; its size is the volume's when
/// the connection was made (NBD tells a client the size once).
pub struct RemoteVolume {
    node: Arc<Node>,
    name: String,
    /// Which volume of that name ([`super::VolumeSpec::id`]).
    id: u64,
    size: u64,
    /// The leader's address as last found; cleared by a request that failed there.
    leader: std::sync::Mutex<Option<String>>,
    /// The last lookup of the leader and when it ended: requests that need one share the one
    /// under way.
    lookup: tokio::sync::Mutex<Option<(Instant, Found)>>,
    pool: Pool,
}

impl std::fmt::Debug for RemoteVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteVolume")
            .field("node", &self.node.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RemoteVolume {
    fn new(node: Arc<Node>, name: &str, found: Status) -> RemoteVolume {
        let v = RemoteVolume::unlocated(node, name, found.id);
        *v.leader.lock().unwrap() = found.leader_addr;
        RemoteVolume {
            size: found.size,
            ..v
        }
    }

    /// One whose leader is looked up by its first request, for a node's replica of volume
    /// (`name`, `id`) (its size is the replica's, not this one's).
    pub(super) fn unlocated(node: Arc<Node>, name: &str, id: u64) -> RemoteVolume {
        RemoteVolume {
            node,
            name: name.to_string(),
            id,
            size: 0,
            leader: std::sync::Mutex::new(None),
            lookup: tokio::sync::Mutex::new(None),
            pool: Pool::default(),
        }
    }

    /// The leader's address now (the one last found, or a new lookup).
    async fn leader(&self) -> io::Result<String> {
        if let Some(a) = self.leader.lock().unwrap().clone() {
            return Ok(a);
        }
        let addr = self.locate().await?.leader_addr.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("volume {}: no leader yet", self.name),
            )
        })?;
        *self.leader.lock().unwrap() = Some(addr.clone());
        Ok(addr)
    }

    /// [`Node::locate`], one at a time: a request takes the result of a lookup that ended
    /// after it asked. `NotFound` once the volume of that name is another one.
    async fn locate(&self) -> io::Result<Status> {
        let asked = Instant::now();
        let mut last = self.lookup.lock().await;
        let found = match &*last {
            Some((ended, found)) if *ended >= asked => found.clone(),
            _ => {
                let found = self
                    .node
                    .locate_volume(&self.name, Some(self.id))
                    .await
                    .map_err(|e| (e.kind(), e.to_string()));
                *last = Some((Instant::now(), found.clone()));
                found
            }
        };
        let found = found.map_err(|(kind, e)| io::Error::new(kind, e))?;
        if found.id != self.id {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("volume {}: deleted (a new one has its name)", self.name),
            ));
        }
        Ok(found)
    }

    /// Returns once a node other than the one at `addr` leads, or the volume is gone
    /// (checked after [`PATIENCE`], then every [`RECHECK`]).
    async fn leader_moved(&self, addr: &str) {
        tokio::time::sleep(PATIENCE).await;
        loop {
            match self.locate().await {
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Ok(s) if s.leader_addr.as_deref().is_some_and(|a| a != addr) => return,
                _ => {}
            }
            tokio::time::sleep(RECHECK).await;
        }
    }

    /// Runs `op` on the leader; tries again (another leader, after an election) until
    /// [`Node::leader_wait`] has passed, but for a volume that is gone and a request the
    /// leader finds invalid.
    async fn on_leader<T>(
        &self,
        op: impl Fn() -> RemoteOp,
        unpack: fn(Reply) -> Option<io::Result<T>>,
    ) -> io::Result<T> {
        let wait = self.node.leader_wait();
        let deadline = tokio::time::Instant::now() + wait;
        let mut last;
        loop {
            // Lookups ask every node: less often than requests are tried.
            let mut again = Duration::from_millis(50);
            last = match self.leader().await {
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(e) => {
                    again = Duration::from_millis(250);
                    e.to_string()
                }
                Ok(addr) => {
                    let rpc = Rpc::Remote(self.name.clone(), self.id, op());
                    let answer = tokio::select! {
                        r = self.pool.call(&addr, &rpc) => r,
                        () = self.leader_moved(&addr) => {
                            Err(io::Error::other("another node leads now"))
                        }
                        () = tokio::time::sleep_until(deadline) => {
                            Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"))
                        }
                    };
                    let failed = match answer.map(|r| match r {
                        Reply::NoVolume(_) => Some(Err(io::Error::other("it holds no replica"))),
                        r => unpack(r),
                    }) {
                        Ok(Some(Ok(v))) => return Ok(v),
                        Ok(Some(Err(e))) if e.kind() == io::ErrorKind::InvalidInput => {
                            return Err(e)
                        }
                        Ok(Some(Err(e))) | Err(e) => e.to_string(),
                        Ok(None) => "an unexpected reply".into(),
                    };
                    // Asked anew next time: the leader changed, or it failed (unless another
                    // request has found a new one meanwhile).
                    let mut leader = self.leader.lock().unwrap();
                    if leader.as_ref() == Some(&addr) {
                        leader.take();
                    }
                    format!("{addr}: {failed}")
                }
            };
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(again).await;
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "volume {}: no leader answered within {} s: {last}",
                self.name,
                wait.as_secs()
            ),
        ))
    }

    pub(super) async fn write_op(&self, op: BlockOp) -> io::Result<()> {
        self.on_leader(
            || RemoteOp::Write(op.clone()),
            |r| match r {
                Reply::Write(r) => Some(r.map_err(io::Error::other)),
                _ => None,
            },
        )
        .await
    }
}

replicated_volume!(RemoteVolume, {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        Ok(self.read_bytes(offset, length).await?.into())
    }

    async fn read_sendable(&self, offset: u64, length: u32) -> io::Result<crate::volume::Sendable> {
        Ok(crate::volume::Sendable::Data(
            self.read_bytes(offset, length).await?,
        ))
    }

    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<crate::volume::Extent>> {
        let runs = self
            .on_leader(
                || RemoteOp::Extents(offset, length),
                |r| match r {
                    Reply::Extents(r) => Some(r.map_err(io::Error::from)),
                    _ => None,
                },
            )
            .await?;
        Ok(extents(runs))
    }
});

impl RemoteVolume {
    /// `length` bytes at `offset`, as the leader sent them (a slice of the frame they came in).
    async fn read_bytes(&self, offset: u64, length: u32) -> io::Result<bytes::Bytes> {
        let data: Data = self
            .on_leader(
                || RemoteOp::Read(offset, length),
                |r| match r {
                    Reply::Read(r) => Some(r.map_err(io::Error::from)),
                    _ => None,
                },
            )
            .await?;
        if data.len() != length as usize {
            return Err(io::Error::other(format!(
                "volume {}: {} bytes read instead of {length}",
                self.name,
                data.len()
            )));
        }
        Ok(data.bytes().clone())
    }
}
