//! `vpcd`: one per host, serving `org.vpcd.Host1` on D-Bus.

use std::path::PathBuf;

use clap::Parser;
use figment::value::{Dict, Value};
use vpcd::config::Config;

/// The vpcd host daemon. Configuration: defaults < /etc/vpcd/vpcd.toml (or --config) <
/// VPCD_* environment < these flags.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (default /etc/vpcd/vpcd.toml; also VPCD_CONFIG).
    #[arg(long, env = "VPCD_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the store and per-VM files.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// D-Bus address to serve on instead of the system bus.
    #[arg(long)]
    bus_address: Option<String>,
    /// Well-known bus name (default org.vpcd.Host1).
    #[arg(long)]
    bus_name: Option<String>,
    /// VM backend for new VMs: auto, libvirt, qmp.
    #[arg(long)]
    backend: Option<String>,
    #[arg(long)]
    libvirt_uri: Option<String>,
    /// Accelerator: auto, kvm, tcg.
    #[arg(long)]
    accel: Option<String>,
    /// QEMU binary for the QMP backend.
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// tracing filter.
    #[arg(long)]
    log: Option<String>,
    /// The host's network namespace (e.g. /run/netns/host1).
    #[arg(long)]
    netns: Option<String>,
    /// This host's VTEP address.
    #[arg(long)]
    underlay_ip: Option<String>,
    #[arg(long)]
    underlay_mtu: Option<u32>,
    /// A peer VTEP (repeat for several).
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// Prefix of the links vpcd makes.
    #[arg(long)]
    link_prefix: Option<String>,
    /// bpffs directory for pinned eBPF objects.
    #[arg(long)]
    bpf_dir: Option<PathBuf>,
    /// VLAN filtering: auto, kernel, ebpf.
    #[arg(long)]
    vlan_filter: Option<String>,
    /// Host bridge of routers' external network.
    #[arg(long)]
    external_link: Option<String>,
    /// CIDR of the external network.
    #[arg(long)]
    external_cidr: Option<String>,
    /// Routers' default next hop on the external network.
    #[arg(long)]
    external_gateway: Option<String>,
    /// FIRST-LAST addresses for router gateways and floating IPs.
    #[arg(long)]
    external_pool: Option<String>,
    /// A DNS server handed out by DHCP (repeat for several).
    #[arg(long = "dns-server")]
    dns_servers: Vec<String>,
    /// The DNS domain handed out by DHCP ("" for none).
    #[arg(long)]
    dns_domain: Option<String>,
    /// DHCP lease time, seconds.
    #[arg(long)]
    dhcp_lease_secs: Option<u32>,
    /// A role of this host: compute, route, management, storage (repeat for several; default
    /// compute and route).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// EVPN: this host's AS.
    #[arg(long)]
    bgp_asn: Option<u32>,
    /// EVPN: a route reflector, ADDRESS[:PORT] (repeat for several).
    #[arg(long = "bgp-peer")]
    bgp_peers: Vec<String>,
    /// EVPN: router id / VTEP address (default underlay_ip).
    #[arg(long)]
    bgp_router_id: Option<String>,
    /// EVPN: proposed hold time, seconds.
    #[arg(long)]
    bgp_hold_time: Option<u16>,
    /// EVPN: keepalive interval, seconds (default a third of the hold time).
    #[arg(long)]
    bgp_keepalive: Option<u16>,
    /// Management role: a prefix compute hosts peer from (repeat for several).
    #[arg(long = "bgp-listen-range")]
    bgp_listen_ranges: Vec<String>,
    /// Storage role: this node's id in the storage cluster.
    #[arg(long)]
    storage_node_id: Option<u64>,
    /// Storage role: ADDRESS:PORT the other storage nodes reach this one at.
    #[arg(long)]
    storage_listen: Option<String>,
    /// Storage role: a storage node, ID=ADDRESS:PORT (repeat for every one).
    #[arg(long = "storage-member")]
    storage_members: Vec<String>,
    /// Storage role: serve NBD over TCP too, at ADDRESS:PORT.
    #[arg(long)]
    storage_nbd_listen: Option<String>,
    /// Storage role: serve NBD over TCP on an address that is not loopback without TLS client
    /// certificates (a trusted network).
    #[arg(long)]
    storage_nbd_insecure: bool,
    /// Storage role: TLS certificate (PEM) of the NBD TCP listener.
    #[arg(long)]
    storage_tls_cert: Option<PathBuf>,
    /// Storage role: its key (PEM).
    #[arg(long)]
    storage_tls_key: Option<PathBuf>,
    /// Storage role: CA (PEM) whose client certificates the NBD TCP listener requires.
    #[arg(long)]
    storage_tls_ca: Option<PathBuf>,
    /// Storage role: raft heartbeat interval, ms (default 250).
    #[arg(long)]
    storage_heartbeat_ms: Option<u64>,
    /// Storage role: raft election timeout, ms, between this and twice it (default 1000).
    #[arg(long)]
    storage_election_ms: Option<u64>,
    /// Storage role: MiB of raft log segments a volume's large writes may stay in before they
    /// go to its blocks (default 512; 0: at once).
    #[arg(long)]
    storage_defer_mib: Option<u64>,
    /// Storage role: every this many seconds, hand volumes this host leads back to the member
    /// that should lead them (default 10; 0: never).
    #[arg(long)]
    storage_rebalance_s: Option<u64>,
}

impl Cli {
    fn flags(&self) -> Dict {
        let mut d = Dict::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                d.insert(k.into(), Value::from(v));
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        put("state_dir", path(&self.state_dir));
        put("bus_address", self.bus_address.clone());
        put("bus_name", self.bus_name.clone());
        put("backend", self.backend.clone());
        put("libvirt_uri", self.libvirt_uri.clone());
        put("accel", self.accel.clone());
        put("qemu", path(&self.qemu));
        put("log", self.log.clone());
        put("netns", self.netns.clone());
        put("underlay_ip", self.underlay_ip.clone());
        put("link_prefix", self.link_prefix.clone());
        put("bpf_dir", path(&self.bpf_dir));
        put("vlan_filter", self.vlan_filter.clone());
        put("external_link", self.external_link.clone());
        put("external_cidr", self.external_cidr.clone());
        put("external_gateway", self.external_gateway.clone());
        put("external_pool", self.external_pool.clone());
        put("dns_domain", self.dns_domain.clone());
        put("storage_nbd_listen", self.storage_nbd_listen.clone());
        put("storage_tls_cert", path(&self.storage_tls_cert));
        put("storage_tls_key", path(&self.storage_tls_key));
        put("storage_tls_ca", path(&self.storage_tls_ca));
        if self.storage_nbd_insecure {
            d.insert("storage_nbd_insecure".into(), Value::from(true));
        }
        if let Some(s) = self.dhcp_lease_secs {
            d.insert("dhcp_lease_secs".into(), Value::from(s));
        }
        if let Some(mtu) = self.underlay_mtu {
            d.insert("underlay_mtu".into(), Value::from(mtu));
        }
        for (k, v) in [
            ("storage_heartbeat_ms", self.storage_heartbeat_ms),
            ("storage_election_ms", self.storage_election_ms),
            ("storage_defer_mib", self.storage_defer_mib),
            ("storage_rebalance_s", self.storage_rebalance_s),
        ] {
            if let Some(v) = v {
                d.insert(k.into(), Value::from(v));
            }
        }
        let mut list = |k: &str, v: &[String]| {
            if !v.is_empty() {
                let items: Vec<Value> = v.iter().map(|p| Value::from(p.clone())).collect();
                d.insert(k.into(), Value::from(items));
            }
        };
        list("peers", &self.peers);
        list("dns_servers", &self.dns_servers);
        list("roles", &self.roles);
        list("bgp_peers", &self.bgp_peers);
        list("bgp_listen_ranges", &self.bgp_listen_ranges);
        list("storage_members", &self.storage_members);
        if let Some(l) = &self.storage_listen {
            d.insert("storage_listen".into(), Value::from(l.clone()));
        }
        if let Some(id) = self.storage_node_id {
            d.insert("storage_node_id".into(), Value::from(id));
        }
        if let Some(id) = &self.bgp_router_id {
            d.insert("bgp_router_id".into(), Value::from(id.clone()));
        }
        if let Some(a) = self.bgp_asn {
            d.insert("bgp_asn".into(), Value::from(a));
        }
        if let Some(h) = self.bgp_hold_time {
            d.insert("bgp_hold_time".into(), Value::from(h));
        }
        if let Some(k) = self.bgp_keepalive {
            d.insert("bgp_keepalive".into(), Value::from(k));
        }
        d
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), Config::env(), &cli.flags()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vpcd: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            // netlink-packet-route warns about every link of a kernel newer than it knows
            // (IFLA_INET6_CONF sizes); a `log` that names it overrides this.
            tracing_subscriber::EnvFilter::try_new(format!(
                "netlink_packet_route=error,{}",
                config.log
            ))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vpcd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let manager = vpcd::manager::Manager::open(config.clone()).await?;
    let _conn = vpcd::dbus::serve(manager, &config.bus_address, &config.bus_name).await?;
    tracing::info!(name = %config.bus_name, "serving on D-Bus");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // VMs keep running: they belong to libvirt or to their own QEMU process group.
    tracing::info!("vpcd stopping; VMs keep running");
    Ok(())
}
