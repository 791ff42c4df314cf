//! `blockdrv`: serves volumes over NBD.
//!
//! ```text
//! blockdrv nbd --unix /run/sbs.sock --export data=/var/lib/sbs/data.img:1G [--tcp 127.0.0.1:10809]
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use blockdrv::nbd::{Export, Server};
use blockdrv::volume::FileVolume;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "blockdrv", about = "SBS block storage")]
enum Cli {
    /// Serves file-backed volumes over NBD.
    Nbd(NbdArgs),
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
    /// Log filter (`info`, `debug`, ...).
    #[arg(long, default_value = "info")]
    log: String,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli::Nbd(args) = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    if args.unix.is_none() && args.tcp.is_none() {
        bail!("give --unix PATH and/or --tcp ADDR");
    }
    let exports = args
        .exports
        .iter()
        .map(|e| export(e, args.read_only))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let default = exports[0].name.clone();
    let server = Server::new(exports).with_default(&default);
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
