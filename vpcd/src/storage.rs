//! The storage role: this host is a node of the block storage cluster (blockdrv) in-process.
//! It serves the other nodes' RPCs on `storage_listen`, every volume it holds over NBD on
//! `<state_dir>/sbs/nbd.sock`, and manages volumes (create, grow, delete, list) through its
//! node, which forwards what only a volume's leader or members can do.
//!
//! A host without the role that names the storage nodes (`storage_members`) is a client of
//! the cluster: its node holds no replica and listens for no node, and serves every volume of
//! the cluster on its NBD socket all the same, through the nodes that hold them (blockdrv's
//! `remote`), so its guests use volumes as a storage host's do.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use blockdrv::raft::node::{self, Node, Timing, VolumeSpec};
use blockdrv::raft::{Attachment, BlockOp};

use crate::error::{Error, Result};

/// How this host takes part in block storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    pub id: u64,
    /// Where the other storage nodes reach this one (`None`: a client of the cluster).
    pub listen: Option<SocketAddr>,
    /// Every storage node: id -> address.
    pub members: BTreeMap<u64, String>,
    pub dir: PathBuf,
    /// NBD over TCP too, at this address.
    pub nbd_tcp: Option<SocketAddr>,
    /// TLS on the TCP listener (the unix socket is local and guarded by its mode).
    pub tls: Option<blockdrv::nbd::TlsConfig>,
    /// Raft heartbeats and election timeouts.
    pub timing: Timing,
}

/// A volume as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    /// The group's leader as this node sees it (0: none).
    pub leader: u64,
    /// `ok` with a leader, `no leader` without.
    pub health: String,
    /// The nodes holding a replica: (id, address).
    pub members: Vec<(u64, String)>,
    /// Where this host serves it over NBD.
    pub uri: String,
    /// The same over TCP (`nbds://` with TLS), "" without a TCP listener.
    pub tcp_uri: String,
    /// Its users: the domains (on storage nodes) that have it as a disk.
    pub attachments: Vec<Attachment>,
    /// Which volume of that name it is (0: one given on the nodes' command lines).
    pub id: u64,
}

/// How often a client of the cluster asks for its node list.
const CLIENT_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// The storage node of this host.
#[derive(Debug)]
pub struct Storage {
    node: Arc<Node>,
    socket: PathBuf,
    /// `nbd://ADDRESS:PORT` or `nbds://...`, if NBD is served over TCP too.
    tcp: Option<String>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn err(volume: &str, e: io::Error) -> Error {
    let what = if volume.starts_with("storage node") {
        volume.to_string()
    } else {
        format!("volume {volume}")
    };
    // (Most messages from the node name the volume already.)
    let msg = e.to_string();
    let named = if msg.starts_with(&what) {
        msg
    } else {
        format!("{what}: {msg}")
    };
    match e.kind() {
        io::ErrorKind::NotFound => Error::NotFound(what),
        io::ErrorKind::AlreadyExists => Error::AlreadyExists(what),
        io::ErrorKind::InvalidInput => Error::InvalidArgument(named),
        io::ErrorKind::TimedOut => Error::Timeout(named),
        // A volume another domain has, or one being deleted (its message names it).
        io::ErrorKind::ResourceBusy => Error::InvalidState(e.to_string()),
        // (Its message names the volume and the nodes that did not answer.)
        io::ErrorKind::HostUnreachable => Error::Unavailable(e.to_string()),
        _ => Error::Failed(named),
    }
}

/// `nbd://ADDRESS:PORT` (`nbds://` with TLS) of the NBD listener on `addr`; one on every
/// address is named by the address the other nodes reach this one at (`listen`):
/// `nbd://0.0.0.0:...` is no use from another host.
fn tcp_base(tls: bool, addr: SocketAddr, listen: SocketAddr) -> String {
    let scheme = if tls { "nbds" } else { "nbd" };
    let shown = if addr.ip().is_unspecified() && !listen.ip().is_unspecified() {
        SocketAddr::new(listen.ip(), addr.port())
    } else {
        addr
    };
    format!("{scheme}://{shown}")
}

fn node_err(id: u64, e: io::Error) -> Error {
    err(&format!("storage node {id}"), e)
}

/// The NBD socket gives access to every volume: root and the `kvm` group only (QEMU under
/// libvirt runs as `libvirt-qemu:kvm`); root alone where there is no such group.
fn restrict_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let gid = nix_group_id("kvm");
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The id of group `name` (from /etc/group), if there is one.
fn nix_group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}

impl Storage {
    /// Starts the node: reopens its volumes, listens for the other nodes (a storage node)
    /// and for NBD clients.
    pub async fn start(cfg: &StorageConfig) -> anyhow::Result<Storage> {
        let node = match cfg.listen {
            Some(_) => {
                let node = Node::new(cfg.id, &cfg.dir, cfg.timing);
                node.set_cluster(cfg.members.clone());
                node
            }
            None => Node::client(cfg.id, &cfg.dir, cfg.timing, cfg.members.clone())?,
        };
        node.start().await?;
        let mut tasks = Vec::new();
        match cfg.listen {
            Some(listen) => {
                let listener = tokio::net::TcpListener::bind(listen).await?;
                tasks.push(tokio::spawn({
                    let node = node.clone();
                    async move {
                        if let Err(e) = node.serve(listener).await {
                            tracing::error!("storage RPC server stopped: {e}");
                        }
                    }
                }));
            }
            // (The nodes do not tell a client of joins and leaves: it asks.)
            None => node.follow_cluster(CLIENT_REFRESH),
        }
        let socket = cfg.dir.join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let l = tokio::net::UnixListener::bind(&socket)?;
        restrict_socket(&socket)?;
        let server = blockdrv::nbd::Server::new(Vec::new());
        node.serve_nbd(server.clone());
        let mut tcp = None;
        if let (Some(addr), Some(listen)) = (cfg.nbd_tcp, cfg.listen) {
            // The same exports; TLS only here.
            let tcp_server = match &cfg.tls {
                Some(t) => server.clone().with_tls(t)?,
                None => server.clone(),
            };
            let l = tokio::net::TcpListener::bind(addr).await?;
            tasks.push(tokio::spawn(async move {
                if let Err(e) = tcp_server.serve_tcp(l).await {
                    tracing::error!("NBD TCP server stopped: {e}");
                }
            }));
            tcp = Some(tcp_base(cfg.tls.is_some(), addr, listen));
        }
        tasks.push(tokio::spawn(async move {
            if let Err(e) = server.serve_unix(l).await {
                tracing::error!("NBD server stopped: {e}");
            }
        }));
        tracing::info!(id = cfg.id, listen = ?cfg.listen, socket = %socket.display(), tcp = ?tcp, "storage node up");
        Ok(Storage {
            node,
            socket,
            tcp,
            _tasks: tasks,
        })
    }

    /// This host's storage node id (the node its domains' attachments name).
    pub fn node_id(&self) -> u64 {
        self.node.id
    }

    /// Records that domain `domain` of this host has volume `name` as disk `disk`: refused
    /// (`InvalidState`, naming the user) while another domain, of this host or another, has
    /// it, unless both disks are read-only; the same disk again is no change.
    pub async fn attach(&self, name: &str, domain: &str, disk: &str, readonly: bool) -> Result<()> {
        let a = Attachment {
            node: self.node.id,
            domain: domain.to_string(),
            disk: disk.to_string(),
            readonly,
        };
        self.claim(name, BlockOp::Attach(a)).await
    }

    /// Forgets that domain `domain` on storage node `node` has volume `name` (as `disk`, or
    /// as any disk).
    pub async fn detach(
        &self,
        name: &str,
        node: u64,
        domain: &str,
        disk: Option<&str>,
    ) -> Result<()> {
        let op = BlockOp::Detach {
            node,
            domain: domain.to_string(),
            disk: disk.map(str::to_string),
        };
        self.claim(name, op).await
    }

    async fn claim(&self, name: &str, op: BlockOp) -> Result<()> {
        // (Boxed: the future is deep, and the callers' are deeper still.)
        Box::pin(self.node.claim_volume(name, op))
            .await
            .map_err(|e| err(name, e))
    }

    /// The NBD socket this host serves its volumes on.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Creates a volume with `replicas` replicas (0: 3, or as many nodes as there are).
    pub async fn create(&self, name: &str, size: u64, replicas: u32) -> Result<VolumeInfo> {
        let spec = VolumeSpec {
            name: name.to_string(),
            size,
            members: BTreeMap::new(),
            replicas,
            id: 0,
        };
        self.node
            .create_volume(&spec)
            .await
            .map_err(|e| err(name, e))?;
        self.info(name).await
    }

    /// Deletes volume `name` ([`Node::delete_volume`]: refused while a domain has it, and
    /// unless `force`, when that cannot be told).
    pub async fn delete(&self, name: &str, force: bool) -> Result<()> {
        self.node
            .delete_volume(name, force)
            .await
            .map_err(|e| err(name, e))
    }

    pub async fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        self.node
            .resize_volume(name, size)
            .await
            .map_err(|e| err(name, e))?;
        self.info(name).await
    }

    /// Adds storage node `id` at `addr` to the cluster (it must be running with this cluster's
    /// members); replicas move onto it until they are spread evenly. The moves made: (volume,
    /// from, to).
    pub async fn add_node(&self, id: u64, addr: &str) -> Result<Vec<(String, u64, u64)>> {
        addr.parse::<SocketAddr>().map_err(|_| {
            Error::InvalidArgument(format!("storage node {id}: {addr:?} is not ADDRESS:PORT"))
        })?;
        if id == 0 {
            return Err(Error::InvalidArgument(
                "storage node 0: ids start at 1".into(),
            ));
        }
        self.node
            .add_node(id, addr)
            .await
            .map_err(|e| node_err(id, e))
    }

    /// Removes storage node `id` (alive or dead) from the cluster after moving its replicas to
    /// the other nodes. The moves made.
    pub async fn remove_node(&self, id: u64) -> Result<Vec<(String, u64, u64)>> {
        self.node.remove_node(id).await.map_err(|e| node_err(id, e))
    }

    /// The storage nodes of the cluster: (id, RPC address).
    pub fn nodes(&self) -> Vec<(u64, String)> {
        self.node.cluster().into_iter().collect()
    }

    /// The volumes of the cluster (this host serves them all): those it holds a replica of,
    /// with their health as their leaders see it (asked of all leaders at once), and the
    /// others as the node that leads each lists them.
    pub async fn list(&self) -> Result<Vec<VolumeInfo>> {
        Ok(self.list_all().await.0)
    }

    /// [`Storage::list`], and the storage nodes that did not answer, (id, address): the
    /// volumes only they hold are missing.
    pub async fn list_all(&self) -> (Vec<VolumeInfo>, Vec<(u64, String)>) {
        let (volumes, silent) = self.node.cluster_volumes().await;
        let nodes = self.node.cluster();
        let silent = silent
            .into_iter()
            .map(|id| (id, nodes.get(&id).cloned().unwrap_or_default()))
            .collect();
        // (None for a volume held elsewhere: its status came from its leader already.)
        let statuses = futures::future::join_all(
            volumes
                .iter()
                .map(|(spec, _)| self.node.leader_status(&spec.name)),
        )
        .await;
        let infos = volumes
            .into_iter()
            .zip(statuses)
            .map(|((spec, status), leader)| self.to_info(spec, leader.unwrap_or(status)))
            .collect();
        (infos, silent)
    }

    /// A volume of the cluster: one this host holds a replica of, or else one other hosts
    /// hold (this host serves it all the same, through them).
    pub async fn info(&self, name: &str) -> Result<VolumeInfo> {
        let held = self
            .node
            .volumes()
            .await
            .into_iter()
            .find(|(spec, _)| spec.name == name);
        let Some((spec, status)) = held else {
            let leader = self
                .node
                .volume_status(name)
                .await
                .map_err(|e| err(name, e))?;
            let nodes = self.node.cluster();
            let spec = VolumeSpec {
                name: name.to_string(),
                size: leader.size,
                members: leader
                    .members
                    .iter()
                    .map(|id| (*id, nodes.get(id).cloned().unwrap_or_default()))
                    .collect(),
                replicas: 0,
                id: 0,
            };
            return Ok(self.to_info(spec, leader));
        };
        let leader = self.node.leader_status(name).await;
        Ok(self.to_info(spec, leader.unwrap_or(status)))
    }

    fn to_info(&self, spec: VolumeSpec, status: node::Status) -> VolumeInfo {
        VolumeInfo {
            uri: format!("nbd+unix:///{}?socket={}", spec.name, self.socket.display()),
            tcp_uri: self
                .tcp
                .as_ref()
                .map(|t| format!("{t}/{}", spec.name))
                .unwrap_or_default(),
            name: spec.name,
            // The leader's, when it answered: a replica here applies a grow a moment after the
            // leader (volumes only grow).
            size: spec.size.max(status.size),
            leader: status.leader.unwrap_or(0),
            health: health(&status),
            members: spec.members.into_iter().collect(),
            id: if spec.id != 0 { spec.id } else { status.id },
            attachments: status.claims.attachments,
        }
    }
}
/// A volume's health from its leader's status: `no leader`, `degraded: ` with
/// `node N unreachable` (a voter the leader cannot reach), `node N stalled (error)` (one that
/// answers but fails to take data: a snapshot that fills its disk) and `node N catching up`
/// (one that answers but is far behind: back from a restart or an outage, or being sent a
/// snapshot), as many as apply, `ok, a replica moving to node N`, or `ok`.
fn health(status: &node::Status) -> String {
    let nodes = |ids: &[u64]| {
        ids.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (down, behind) = (&status.unreachable[..], &status.behind[..]);
    let stalled = status
        .stalled
        .iter()
        .map(|(id, e)| format!("node {id} stalled ({e})"));
    let mut what = Vec::new();
    if !down.is_empty() {
        what.push(format!("node {} unreachable", nodes(down)));
    }
    what.extend(stalled);
    if !behind.is_empty() {
        what.push(format!("node {} catching up", nodes(behind)));
    }
    match (status.leader, &status.learners[..]) {
        (None, _) => "no leader".into(),
        (Some(_), []) if what.is_empty() => "ok".into(),
        (Some(_), to) if what.is_empty() => format!("ok, a replica moving to node {}", nodes(to)),
        (Some(_), _) => format!("degraded: {}", what.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tcp_uri_names_a_reachable_address() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let listen = a("192.0.2.7:7400");
        assert_eq!(
            tcp_base(false, a("0.0.0.0:10809"), listen),
            "nbd://192.0.2.7:10809"
        );
        assert_eq!(
            tcp_base(true, a("[::]:10809"), listen),
            "nbds://192.0.2.7:10809"
        );
        assert_eq!(
            tcp_base(false, a("127.0.0.1:10809"), listen),
            "nbd://127.0.0.1:10809"
        );
        let v6 = a("[2001:db8::1]:7400");
        assert_eq!(
            tcp_base(false, a("[::]:10809"), v6),
            "nbd://[2001:db8::1]:10809"
        );
        // Nothing better to say.
        assert_eq!(
            tcp_base(false, a("0.0.0.0:10809"), a("0.0.0.0:7400")),
            "nbd://0.0.0.0:10809"
        );
    }

    #[test]
    fn health_says_what_the_leader_sees() {
        let with = |leader, unreachable: &[u64], learners: &[u64], behind: &[u64]| node::Status {
            node: 1,
            leader,
            term: 2,
            last_applied: None,
            members: vec![1, 2, 3],
            learners: learners.to_vec(),
            unreachable: unreachable.to_vec(),
            moving: None,
            behind: behind.to_vec(),
            stalled: Vec::new(),
            size: 16 << 20,
            leader_addr: None,
            claims: Default::default(),
            id: 1,
        };
        let st = |leader, unreachable: &[u64], learners: &[u64]| {
            with(leader, unreachable, learners, &[])
        };
        assert_eq!(health(&st(None, &[3], &[])), "no leader");
        assert_eq!(health(&st(Some(1), &[], &[])), "ok");
        assert_eq!(
            health(&st(Some(1), &[], &[4])),
            "ok, a replica moving to node 4"
        );
        assert_eq!(
            health(&st(Some(1), &[2, 3], &[4])),
            "degraded: node 2, 3 unreachable"
        );
        assert_eq!(
            health(&with(Some(1), &[], &[], &[3])),
            "degraded: node 3 catching up"
        );
        assert_eq!(
            health(&with(Some(1), &[2], &[4], &[3])),
            "degraded: node 2 unreachable, node 3 catching up"
        );
        let mut full = with(Some(1), &[2], &[], &[]);
        full.stalled = vec![(3, "No space left on device (os error 28)".into())];
        assert_eq!(
            health(&full),
            "degraded: node 2 unreachable, node 3 stalled (No space left on device (os error 28))"
        );
        full.unreachable.clear();
        assert_eq!(
            health(&full),
            "degraded: node 3 stalled (No space left on device (os error 28))"
        );
    }
}
