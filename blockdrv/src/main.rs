//! `blockdrv`: serves volumes over NBD.
//!
//! ```text
//! blockdrv nbd --unix /run/sbs.sock --export data=/var/lib/sbs/data.img:1G [--tcp 127.0.0.1:10809]
//!     [--tls-cert server-cert.pem --tls-key server-key.pem [--tls-ca ca-cert.pem]]
//! blockdrv node --id 1 --dir /var/lib/sbs --listen 127.0.0.1:7001 \
//!     --member 1=127.0.0.1:7001 --member 2=127.0.0.1:7002 --member 3=127.0.0.1:7003 \
//!     --volume data:1G --nbd-unix /run/sbs-1.sock
//! blockdrv status --addr 127.0.0.1:7001 --volume data
//! blockdrv vhost-user --socket /run/data.vhost --export data=/var/lib/sbs/data.img:1G
//! ```
//!
//! `node --vhost-user-dir DIR` serves each volume over vhost-user-blk too, on `DIR/NAME.sock`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use blockdrv::nbd::{Export, Server, TlsConfig};
use blockdrv::volume::FileVolume;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "blockdrv", about = "SBS block storage")]
enum Cli {
    /// Serves file-backed volumes over NBD.
    Nbd(NbdArgs),
    /// Runs a storage node: raft-replicated volumes, served over NBD too.
    Node(NodeArgs),
    /// Serves a file-backed volume as a vhost-user-blk device.
    VhostUser {
        /// The unix socket QEMU connects to.
        #[arg(long)]
        socket: PathBuf,
        /// NAME=FILE[:SIZE], as for `nbd`.
        #[arg(long)]
        export: String,
        #[arg(long, default_value = "info")]
        log: String,
    },
    /// Prints a node's view of a volume's group (JSON).
    Status {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        volume: String,
    },
    /// Manages volumes through a node (`--addr`).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Changes the cluster's node list through a node (`--addr`); replicas move with it.
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(clap::Subcommand, Debug)]
enum ClusterCmd {
    /// Adds a running node (ID=ADDR) to the cluster; replicas move onto it.
    Add {
        #[arg(long)]
        addr: String,
        node: String,
    },
    /// Removes node ID (alive or dead) after moving its replicas to the other nodes.
    Remove {
        #[arg(long)]
        addr: String,
        id: u64,
    },
    /// The cluster's nodes (JSON: id -> address).
    List {
        #[arg(long)]
        addr: String,
    },
}

#[derive(clap::Subcommand, Debug)]
enum VolumeCmd {
    /// Creates a volume on 3 nodes of the cluster (or --replicas).
    Create {
        #[arg(long)]
        addr: String,
        name: String,
        /// Size (K, M, G).
        size: String,
        #[arg(long, default_value_t = 0)]
        replicas: u32,
    },
    /// Deletes a volume on all its nodes.
    Delete {
        #[arg(long)]
        addr: String,
        name: String,
        /// Also when whether a domain has it cannot be told (its group has no leader).
        #[arg(long)]
        force: bool,
    },
    /// Grows a volume.
    Resize {
        #[arg(long)]
        addr: String,
        name: String,
        size: String,
    },
    /// Records that domain DOMAIN on node NODE has the volume as disk DISK: refused while
    /// another user has it, unless both are read-only.
    Attach {
        #[arg(long)]
        addr: String,
        name: String,
        node: u64,
        domain: String,
        disk: String,
        #[arg(long)]
        readonly: bool,
    },
    /// Forgets that domain DOMAIN on node NODE has the volume (as --disk, or any disk).
    Detach {
        #[arg(long)]
        addr: String,
        name: String,
        node: u64,
        domain: String,
        #[arg(long)]
        disk: Option<String>,
    },
    /// The volumes a node holds (JSON).
    List {
        #[arg(long)]
        addr: String,
    },
    /// Replaces a volume's replica on node FROM (alive or dead) by one on node TO=ADDR.
    Move {
        #[arg(long)]
        addr: String,
        name: String,
        from: u64,
        /// ID=ADDR of the node taking the replica.
        to: String,
    },
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// This node's id (as in --member).
    #[arg(long)]
    id: u64,
    /// Where the node keeps its logs and blocks.
    #[arg(long)]
    dir: PathBuf,
    /// The address other nodes reach this one at.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// ID=ADDR of every node holding the volumes (this one too).
    #[arg(long = "member", required = true)]
    members: Vec<String>,
    /// NAME:SIZE of a volume replicated on all the members (volumes are also created with
    /// `blockdrv volume create`, and reopened from the node's catalog at start).
    #[arg(long = "volume")]
    volumes: Vec<String>,
    /// A unix socket to serve the volumes over NBD on.
    #[arg(long)]
    nbd_unix: Option<PathBuf>,
    /// A directory to serve each volume over vhost-user-blk in (`NAME.sock`).
    #[arg(long)]
    vhost_user_dir: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Raft heartbeat interval, ms.
    #[arg(long, default_value_t = 250)]
    heartbeat_ms: u64,
    /// Raft election timeout, ms: a random value between this and twice it.
    #[arg(long, default_value_t = 1000)]
    election_ms: u64,
    /// A snapshot once this many MiB were applied since the last (entries count at least
    /// 64 KiB each).
    #[arg(long, default_value_t = 64)]
    snapshot_logs: u64,
    /// MiB of log kept (entries count at least 64 KiB each) for replicas that fell behind
    /// (a leader keeps more for a follower that answers, up to the volume's size or 1 GiB).
    #[arg(long, default_value_t = 64)]
    keep_logs: u64,
    /// MiB of log segments a volume's writes of 64 KiB or more may keep: they stay where the
    /// log wrote them until that fills, then those in the emptiest segment go to the blocks
    /// (overwritten before: never); 0: every write goes to the blocks at once.
    #[arg(long, default_value_t = blockdrv::raft::node::Timing::default().defer_logs)]
    defer_logs: u64,
    /// MiB per raft log segment file.
    #[arg(long, default_value_t = blockdrv::raft::node::Timing::default().segment_mib, value_parser = clap::value_parser!(u64).range(1..=1024))]
    segment_mib: u64,
    /// Every this many seconds, hand the volumes this node leads that another member should
    /// lead (the one each name hashes to) back to it; 0: never.
    #[arg(long, default_value_t = blockdrv::raft::node::Timing::default().rebalance_s)]
    rebalance_s: u64,
    #[arg(long, default_value = "info")]
    log: String,
}

#[derive(clap::Args, Debug)]
struct NbdArgs {
    /// A unix socket to listen on.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// A TCP address to listen on (loopback unless you mean otherwise).
    #[arg(long)]
    tcp: Option<std::net::SocketAddr>,
    /// NAME=FILE[:SIZE] (SIZE with K, M, G; needed when FILE does not exist). The first export
    /// is also the default (empty name).
    #[arg(long = "export", required = true)]
    exports: Vec<String>,
    /// Serve read-only.
    #[arg(long)]
    read_only: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// Log filter (`info`, `debug`, ...).
    #[arg(long, default_value = "info")]
    log: String,
}

/// TLS for the NBD server: with a certificate, clients must upgrade with STARTTLS before
/// anything else (forced TLS).
#[derive(clap::Args, Debug)]
struct TlsArgs {
    /// PEM: the server's certificate (chain); requires TLS of every NBD client.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM: the key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM: CA certificates; clients must then present a certificate signed by one of them.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// `server` with TLS if it was asked for.
    fn apply(&self, server: Server) -> anyhow::Result<Server> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(server);
        };
        let tls = TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            ca: self.tls_ca.clone(),
        };
        let server = server.with_tls(&tls).context("NBD TLS")?;
        tracing::info!(
            cert = %cert.display(),
            client_certificates = tls.ca.is_some(),
            "NBD requires TLS"
        );
        Ok(server)
    }
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("size {s:?}"))?;
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

fn export(spec: &str, read_only: bool) -> anyhow::Result<Export> {
    let Some((name, rest)) = spec.split_once('=') else {
        bail!("export {spec:?}: expected NAME=FILE[:SIZE]");
    };
    let (file, size) = match rest.rsplit_once(':') {
        Some((f, s)) => (f, parse_size(s)?),
        None => (rest, 0),
    };
    let volume = FileVolume::open(file.as_ref(), size)
        .with_context(|| format!("export {name}: open {file}"))?;
    if blockdrv::volume::Volume::size(&volume) == 0 {
        bail!("export {name}: {file} is empty; give a size (NAME=FILE:SIZE)");
    }
    Ok(Export {
        name: name.to_string(),
        description: format!("file {file}"),
        volume: Arc::new(volume),
        read_only,
    })
}

fn init_log(filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs written to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn node(args: NodeArgs) -> anyhow::Result<()> {
    use blockdrv::raft::node::{Node, VolumeSpec};
    init_log(&args.log);
    let mut members = std::collections::BTreeMap::new();
    for m in &args.members {
        let Some((id, addr)) = m.split_once('=') else {
            bail!("member {m:?}: expected ID=ADDR");
        };
        let id: u64 = id.parse().with_context(|| format!("member {m:?}"))?;
        members.insert(id, addr.to_string());
    }
    if !members.contains_key(&args.id) {
        bail!("node {} is not among the members", args.id);
    }
    if args.tls.tls_cert.is_some() && args.nbd_unix.is_none() {
        bail!("--tls-cert is for the NBD server: give --nbd-unix too");
    }
    let timing = blockdrv::raft::node::Timing {
        heartbeat_ms: args.heartbeat_ms,
        election_ms: (args.election_ms, 2 * args.election_ms),
        snapshot_logs: args.snapshot_logs,
        keep_logs: args.keep_logs,
        defer_logs: args.defer_logs,
        segment_mib: args.segment_mib,
        rebalance_s: args.rebalance_s,
    };
    let node = Node::new(args.id, &args.dir, timing);
    node.set_cluster(members.clone());
    node.start().await.context("reopen volumes")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let serving = tokio::spawn(node.clone().serve(listener));
    if let Some(path) = &args.nbd_unix {
        let server = args.tls.apply(Server::new(Vec::new()))?;
        node.serve_nbd(server.clone());
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("listen on {}", path.display()))?;
        tokio::spawn(server.serve_unix(l));
    }
    if let Some(dir) = &args.vhost_user_dir {
        node.serve_vhost_user(dir)
            .with_context(|| format!("vhost-user-blk in {}", dir.display()))?;
    }
    // Volumes given on the command line: this node's replica, on all members.
    for v in &args.volumes {
        let Some((name, size)) = v.split_once(':') else {
            bail!("volume {v:?}: expected NAME:SIZE");
        };
        blockdrv::raft::node::check_new_volume_name(name)?;
        let spec = VolumeSpec {
            name: name.to_string(),
            size: parse_size(size)?,
            members: members.clone(),
            replicas: 0,
            id: 0,
        };
        node.open_replica(&spec)
            .await
            .with_context(|| format!("volume {name}"))?;
        node.initialize(name, &members)
            .await
            .with_context(|| format!("volume {name}: initialize"))?;
    }
    tracing::info!(id = args.id, listen = %args.listen, "storage node up");
    serving.await??;
    Ok(())
}

async fn volume(cmd: VolumeCmd) -> anyhow::Result<()> {
    use blockdrv::raft::node;
    match cmd {
        VolumeCmd::Create {
            addr,
            name,
            size,
            replicas,
        } => {
            let spec = node::VolumeSpec {
                name: name.clone(),
                size: parse_size(&size)?,
                members: Default::default(),
                replicas,
                id: 0,
            };
            node::create(&addr, spec)
                .await
                .with_context(|| format!("create volume {name}"))?;
        }
        VolumeCmd::Delete { addr, name, force } => node::delete(&addr, &name, force)
            .await
            .with_context(|| format!("delete volume {name}"))?,
        VolumeCmd::Resize { addr, name, size } => node::resize(&addr, &name, parse_size(&size)?)
            .await
            .with_context(|| format!("resize volume {name}"))?,
        VolumeCmd::Move {
            addr,
            name,
            from,
            to,
        } => {
            let Some((id, to_addr)) = to.split_once('=') else {
                bail!("{to:?}: expected ID=ADDR");
            };
            let id: u64 = id.parse().with_context(|| format!("node id in {to:?}"))?;
            node::move_replica(&addr, &name, from, id, to_addr)
                .await
                .with_context(|| format!("move volume {name} from node {from} to {id}"))?;
        }
        VolumeCmd::Attach {
            addr,
            name,
            node: on,
            domain,
            disk,
            readonly,
        } => {
            let a = blockdrv::raft::Attachment {
                node: on,
                domain,
                disk,
                readonly,
            };
            node::claim(&addr, &name, blockdrv::raft::BlockOp::Attach(a))
                .await
                .with_context(|| format!("attach volume {name}"))?
        }
        VolumeCmd::Detach {
            addr,
            name,
            node: on,
            domain,
            disk,
        } => {
            let op = blockdrv::raft::BlockOp::Detach {
                node: on,
                domain,
                disk,
            };
            node::claim(&addr, &name, op)
                .await
                .with_context(|| format!("detach volume {name}"))?
        }
        VolumeCmd::List { addr } => {
            let v = node::list(&addr).await?;
            println!("{}", serde_json::to_string(&v)?);
        }
    }
    Ok(())
}

async fn cluster(cmd: ClusterCmd) -> anyhow::Result<()> {
    use blockdrv::raft::node;
    let moves: Vec<blockdrv::raft::placement::Move> = match cmd {
        ClusterCmd::Add { addr, node: n } => {
            let Some((id, node_addr)) = n.split_once('=') else {
                bail!("{n:?}: expected ID=ADDR");
            };
            let id: u64 = id.parse().with_context(|| format!("node id in {n:?}"))?;
            node::add_node(&addr, id, node_addr)
                .await
                .with_context(|| format!("add node {id}"))?
        }
        ClusterCmd::Remove { addr, id } => node::remove_node(&addr, id)
            .await
            .with_context(|| format!("remove node {id}"))?,
        ClusterCmd::List { addr } => {
            println!("{}", serde_json::to_string(&node::cluster(&addr).await?)?);
            return Ok(());
        }
    };
    println!("{}", serde_json::to_string(&moves)?);
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // One line, causes after colons (anyhow's `{:#}`), never a backtrace: a bad address or an
    // unknown volume is an answer, not a crash.
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockdrv: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let args = match cli {
        Cli::Nbd(a) => a,
        Cli::Node(a) => return node(a).await,
        Cli::Status { addr, volume } => {
            // A node that hangs answers nothing: say so rather than wait for ever.
            let asked = blockdrv::raft::node::status(&addr, &volume);
            let s = tokio::time::timeout(std::time::Duration::from_secs(10), asked)
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer within 10 s",
                    ))
                })
                .with_context(|| format!("status of volume {volume} at {addr}"))?;
            println!("{}", serde_json::to_string(&s)?);
            return Ok(());
        }
        Cli::Volume(cmd) => return volume(cmd).await,
        Cli::Cluster(cmd) => return cluster(cmd).await,
        Cli::VhostUser {
            socket,
            export: spec,
            log,
        } => {
            init_log(&log);
            let e = export(&spec, false)?;
            let _served = blockdrv::vhost_user::serve(
                &e.name,
                e.volume,
                &socket,
                tokio::runtime::Handle::current(),
            )
            .with_context(|| format!("vhost-user-blk on {}", socket.display()))?;
            tracing::info!(socket = %socket.display(), "serving vhost-user-blk");
            std::future::pending::<()>().await;
            return Ok(());
        }
    };
    init_log(&args.log);
    if args.unix.is_none() && args.tcp.is_none() {
        bail!("give --unix PATH and/or --tcp ADDR");
    }
    let exports = args
        .exports
        .iter()
        .map(|e| export(e, args.read_only))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let default = exports[0].name.clone();
    let server = args
        .tls
        .apply(Server::new(exports).with_default(&default))?;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = &args.unix {
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("listen on {}", path.display()))?;
        tracing::info!(socket = %path.display(), "serving NBD");
        tasks.spawn(server.clone().serve_unix(l));
    }
    if let Some(addr) = args.tcp {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr}"))?;
        tracing::info!(%addr, "serving NBD");
        tasks.spawn(server.clone().serve_tcp(l));
    }
    if let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}
