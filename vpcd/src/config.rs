//! vpcd's configuration, layered with figment: built-in defaults < `/etc/vpcd/vpcd.toml` (or
//! `--config`) < `VPCD_*` environment variables < command-line flags. An unknown key in any
//! layer is an error that names the key.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Where the configuration file is read from unless `--config` or `VPCD_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/vpcd/vpcd.toml";

/// Which VM backend new VMs get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// libvirt when `libvirt_uri` answers at start-up, QMP otherwise.
    Auto,
    Libvirt,
    Qmp,
}

/// Which accelerator guests get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when a probe guest runs under it, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// The whole configuration. Every key is documented in `docs/configuration.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Desired-state store and per-VM files.
    pub state_dir: PathBuf,
    /// D-Bus address to serve on; empty means the system bus.
    pub bus_address: String,
    /// Well-known bus name.
    pub bus_name: String,
    pub backend: BackendChoice,
    pub libvirt_uri: String,
    pub accel: AccelChoice,
    /// The QEMU binary the QMP backend runs.
    pub qemu: PathBuf,
    /// Default time a graceful shutdown may take.
    pub shutdown_timeout_secs: u64,
    /// tracing filter, e.g. `info` or `vpcd=debug,hypervisor=debug`.
    pub log: String,
    /// The host's network namespace (a path such as /run/netns/host1); empty: vpcd's own.
    pub netns: String,
    /// This host's VTEP address on the underlay; empty: no VxLAN (single-host networks).
    pub underlay_ip: String,
    /// MTU of the underlay; ports and VxLAN devices get 50 bytes less.
    pub underlay_mtu: u32,
    /// Peer VTEPs for head-end replication (static FDB mode).
    pub peers: Vec<String>,
    /// Prefix of the links vpcd makes (1-4 of a-z 0-9).
    pub link_prefix: String,
    /// VLAN filtering: `auto` (the kernel bridge's where it has it, else eBPF), `kernel` or
    /// `ebpf`.
    pub vlan_filter: String,
    /// bpffs directory for pinned programs, links and maps (one subdirectory per instance).
    pub bpf_dir: PathBuf,
    /// The host link of the external network routers' gateways join: a bridge (legs are veths
    /// into it) or an interface (legs are macvlans on it); empty: none (routers route between
    /// their subnets only).
    pub external_link: String,
    /// The external network's CIDR, e.g. 203.0.113.0/24.
    pub external_cidr: String,
    /// The next hop of routers' default routes on the external network.
    pub external_gateway: String,
    /// Addresses for router gateways and floating IPs, `FIRST-LAST`; empty: the whole CIDR
    /// but the gateway.
    pub external_pool: String,
    /// DNS servers handed out by DHCP.
    pub dns_servers: Vec<String>,
    /// The DNS domain handed out by DHCP (option 15); empty: none.
    pub dns_domain: String,
    /// DHCP lease time, seconds (at least 60).
    pub dhcp_lease_secs: u32,
    /// What this host does: `compute` (VMs and their ports), `route` (virtual routers).
    pub roles: Vec<String>,
    /// EVPN: this host's AS (iBGP with the route reflectors); 0: no EVPN (static FDB mode).
    pub bgp_asn: u32,
    /// Route reflectors, `ADDRESS` or `ADDRESS:PORT`.
    pub bgp_peers: Vec<String>,
    /// BGP router id and VTEP address in routes; empty: `underlay_ip`.
    pub bgp_router_id: String,
    /// Proposed hold time, seconds (0 or at least 3); learned routes outlive a session by it.
    pub bgp_hold_time: u16,
    /// Keepalive interval, seconds; 0: a third of the negotiated hold time.
    pub bgp_keepalive: u16,
    /// Management role: the prefixes compute hosts peer from (`bgp listen range`).
    pub bgp_listen_ranges: Vec<String>,
    /// Where FRR's daemons are.
    pub frr_bin_dir: PathBuf,
    /// Storage role: this node's id in the block storage cluster (1 or more). A host without
    /// the role that has `storage_members` uses the cluster's volumes as a client, under this
    /// id (another than the storage nodes'): its guests' uses of volumes name it.
    pub storage_node_id: u64,
    /// Storage role: where the other storage nodes reach this one, `ADDRESS:PORT`.
    pub storage_listen: String,
    /// Storage role: every storage node (this one too), `ID=ADDRESS:PORT`. On a host without
    /// the role: the storage nodes it uses volumes through (a client of the cluster).
    pub storage_members: Vec<String>,
    /// Storage role: NBD over TCP too, `ADDRESS:PORT` (e.g. `127.0.0.1:10809`); empty: only
    /// the unix socket.
    pub storage_nbd_listen: String,
    /// Storage role: serve NBD on a `storage_nbd_listen` that is not a loopback address
    /// without TLS client certificates (every volume open to whoever reaches it: a trusted
    /// network only).
    pub storage_nbd_insecure: bool,
    /// Storage role: TLS on the NBD TCP listener (forced TLS): the server certificate and key
    /// (PEM), and a CA whose client certificates are required (empty: none asked for).
    pub storage_tls_cert: PathBuf,
    pub storage_tls_key: PathBuf,
    pub storage_tls_ca: PathBuf,
    /// Storage role: raft heartbeat interval, ms.
    pub storage_heartbeat_ms: u64,
    /// Storage role: raft election timeout, ms (a random value between this and twice it). A
    /// leader whose process dies is replaced at once; one that hangs, or whose host or network
    /// fails, after 3 to 4 times this (the lease its followers gave it, twice this, then the
    /// timeout).
    pub storage_election_ms: u64,
    /// Storage role: MiB of raft log segments a volume's writes of 64 KiB or more may stay in
    /// (where the log wrote them, past its purge) before the emptiest segment's go to the
    /// volume's blocks (overwritten before: never). 0: every write goes to the blocks at once.
    pub storage_defer_mib: u64,
    /// Storage role: every this many seconds, hand the volumes this host leads that another
    /// member should lead (the one the volume's name hashes to, which led it first) back to it,
    /// so that leaders spread again after a failure. 0: never.
    pub storage_rebalance_s: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            state_dir: PathBuf::from("/var/lib/vpcd"),
            bus_address: String::new(),
            bus_name: "org.vpcd.Host1".into(),
            backend: BackendChoice::Auto,
            libvirt_uri: "qemu:///system".into(),
            accel: AccelChoice::Auto,
            qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            shutdown_timeout_secs: 60,
            log: "info".into(),
            netns: String::new(),
            underlay_ip: String::new(),
            underlay_mtu: 1500,
            peers: Vec::new(),
            link_prefix: "vpc".into(),
            vlan_filter: "auto".into(),
            bpf_dir: PathBuf::from("/sys/fs/bpf/vpcd"),
            external_link: String::new(),
            external_cidr: String::new(),
            external_gateway: String::new(),
            external_pool: String::new(),
            dns_servers: Vec::new(),
            dns_domain: "vpc.internal".into(),
            dhcp_lease_secs: 86_400,
            roles: vec!["compute".into(), "route".into()],
            bgp_asn: 0,
            bgp_peers: Vec::new(),
            bgp_router_id: String::new(),
            bgp_hold_time: 90,
            bgp_keepalive: 0,
            bgp_listen_ranges: Vec::new(),
            frr_bin_dir: PathBuf::from("/usr/lib/frr"),
            storage_node_id: 0,
            storage_listen: String::new(),
            storage_members: Vec::new(),
            storage_nbd_listen: String::new(),
            storage_nbd_insecure: false,
            storage_tls_cert: PathBuf::new(),
            storage_tls_key: PathBuf::new(),
            storage_tls_ca: PathBuf::new(),
            storage_heartbeat_ms: 250,
            storage_election_ms: 1000,
            storage_defer_mib: blockdrv::raft::node::Timing::default().defer_logs,
            storage_rebalance_s: blockdrv::raft::node::Timing::default().rebalance_s,
        }
    }
}

/// Whether `s` is an IP prefix `ADDRESS/LEN`.
fn is_cidr(s: &str) -> bool {
    let Some((a, l)) = s.split_once('/') else {
        return false;
    };
    match (a.parse::<std::net::IpAddr>(), l.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(l)) => l <= 32,
        (Ok(std::net::IpAddr::V6(_)), Ok(l)) => l <= 128,
        _ => false,
    }
}

/// Errors while loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the layers. `file` is the config file (a missing default file is fine, a missing
    /// file that was asked for is not); `env` are the process's variables; `flags` are the
    /// command-line overrides, already in config-key form.
    pub fn load(
        file: Option<&Path>,
        env: Env,
        flags: &figment::value::Dict,
    ) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::Invalid(format!(
                        "config file {} does not exist",
                        path.display()
                    )));
                }
                fig = fig.merge(Toml::file_exact(path));
            }
            None => fig = fig.merge(Toml::file(DEFAULT_CONFIG_FILE)),
        }
        fig = fig.merge(env).merge(Serialized::globals(flags.clone()));
        let config: Config = fig.extract().map_err(|e| {
            ConfigError::Invalid(
                e.into_iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The `VPCD_*` environment layer (`VPCD_CONFIG` names the file and is not a key).
    pub fn env() -> Env {
        Env::prefixed("VPCD_").ignore(&["CONFIG"])
    }

    /// The external network, if `external_link` is set.
    pub fn external(&self) -> Result<Option<crate::network::router::ExternalNet>, String> {
        if self.external_link.is_empty() {
            return Ok(None);
        }
        crate::network::router::ExternalNet::new(
            &self.external_link,
            &self.external_cidr,
            &self.external_gateway,
            (!self.external_pool.is_empty()).then_some(self.external_pool.as_str()),
        )
        .map(Some)
    }

    /// This host's storage node, if it has the storage role, or uses the cluster's volumes
    /// as a client (no role, but `storage_members`).
    pub fn storage(&self) -> Result<Option<crate::storage::StorageConfig>, String> {
        if !self.roles.iter().any(|r| r == "storage") {
            return self.storage_client();
        }
        if self.storage_node_id == 0 {
            return Err("the storage role needs storage_node_id (1 or more)".into());
        }
        let listen: std::net::SocketAddr = self.storage_listen.parse().map_err(|_| {
            format!(
                "storage_listen {:?} is not ADDRESS:PORT",
                self.storage_listen
            )
        })?;
        let mut members = self.storage_member_list()?;
        members
            .entry(self.storage_node_id)
            .or_insert_with(|| listen.to_string());
        let nbd_tcp = match self.storage_nbd_listen.as_str() {
            "" => None,
            a => Some(
                a.parse::<std::net::SocketAddr>()
                    .map_err(|_| format!("storage_nbd_listen {a:?} is not ADDRESS:PORT"))?,
            ),
        };
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        let tls = match (set(&self.storage_tls_cert), set(&self.storage_tls_key)) {
            (false, false) if set(&self.storage_tls_ca) => {
                return Err("storage_tls_ca needs storage_tls_cert and storage_tls_key".into())
            }
            (false, false) => None,
            (true, true) if nbd_tcp.is_none() => {
                return Err(
                    "storage_tls_cert: TLS is for the NBD TCP listener; set storage_nbd_listen"
                        .into(),
                )
            }
            (true, true) => Some(blockdrv::nbd::TlsConfig {
                cert: self.storage_tls_cert.clone(),
                key: self.storage_tls_key.clone(),
                ca: set(&self.storage_tls_ca).then(|| self.storage_tls_ca.clone()),
            }),
            _ => return Err("storage_tls_cert and storage_tls_key go together".into()),
        };
        // NBD has no authentication of its own: beyond this host, only clients with a
        // certificate, unless said otherwise.
        let authenticated = tls.as_ref().is_some_and(|t| t.ca.is_some());
        if let Some(a) = nbd_tcp.filter(|a| !a.ip().is_loopback()) {
            if !authenticated && !self.storage_nbd_insecure {
                return Err(format!(
                    "storage_nbd_listen {a}: not a loopback address, and no client certificates \
                     asked for: every volume would be open to whoever reaches it; set \
                     storage_tls_cert, storage_tls_key and storage_tls_ca, or \
                     storage_nbd_insecure = true on a trusted network"
                ));
            }
        }
        let timing = self.storage_timing()?;
        Ok(Some(crate::storage::StorageConfig {
            id: self.storage_node_id,
            listen: Some(listen),
            members,
            dir: self.state_dir.join("sbs"),
            nbd_tcp,
            tls,
            timing,
        }))
    }

    /// The raft timing of storage nodes (a client's requests wait for a leader as long as
    /// the nodes' elections may take).
    fn storage_timing(&self) -> Result<blockdrv::raft::node::Timing, String> {
        let (heartbeat, election) = (self.storage_heartbeat_ms, self.storage_election_ms);
        if heartbeat == 0 || election < 3 * heartbeat {
            return Err(format!(
                "storage_election_ms {election} must be at least 3 times storage_heartbeat_ms \
                 {heartbeat}, and that more than 0 (a follower would start elections between \
                 heartbeats)"
            ));
        }
        Ok(blockdrv::raft::node::Timing {
            heartbeat_ms: heartbeat,
            election_ms: (election, 2 * election),
            defer_logs: self.storage_defer_mib,
            rebalance_s: self.storage_rebalance_s,
            ..Default::default()
        })
    }

    /// `storage_members`: id -> address.
    fn storage_member_list(&self) -> Result<std::collections::BTreeMap<u64, String>, String> {
        let mut members = std::collections::BTreeMap::new();
        for m in &self.storage_members {
            let bad = || format!("storage_members: {m:?} is not ID=ADDRESS:PORT");
            let (id, addr) = m.split_once('=').ok_or_else(bad)?;
            let id: u64 = id.parse().map_err(|_| bad())?;
            addr.parse::<std::net::SocketAddr>().map_err(|_| bad())?;
            members.insert(id, addr.to_string());
        }
        Ok(members)
    }

    /// A host without the storage role that names storage nodes: a client of the cluster. It
    /// serves the cluster's volumes to its guests on its own NBD socket, through the nodes
    /// that hold them, and holds no replica; it listens for no node and serves no NBD over
    /// TCP (the storage hosts do).
    fn storage_client(&self) -> Result<Option<crate::storage::StorageConfig>, String> {
        if self.storage_members.is_empty() {
            return Ok(None);
        }
        let members = self.storage_member_list()?;
        let id = self.storage_node_id;
        let client = "storage_members without the storage role: this host uses the cluster's \
                      volumes as a client";
        if id == 0 {
            return Err(format!(
                "{client}, and needs storage_node_id (1 or more), unique among the storage \
                 nodes and their clients"
            ));
        }
        if let Some(addr) = members.get(&id) {
            return Err(format!(
                "{client}, under a storage_node_id of its own: {id} is the storage node's at \
                 {addr}"
            ));
        }
        let path_set = |p: &PathBuf| !p.as_os_str().is_empty();
        for (key, set) in [
            ("storage_listen", !self.storage_listen.is_empty()),
            ("storage_nbd_listen", !self.storage_nbd_listen.is_empty()),
            ("storage_nbd_insecure", self.storage_nbd_insecure),
            ("storage_tls_cert", path_set(&self.storage_tls_cert)),
            ("storage_tls_key", path_set(&self.storage_tls_key)),
            ("storage_tls_ca", path_set(&self.storage_tls_ca)),
        ] {
            if set {
                return Err(format!(
                    "{key}: for a host with the storage role; this one is a client of the \
                     cluster (storage_members without the role: add \"storage\" to roles to \
                     make it a storage node)"
                ));
            }
        }
        Ok(Some(crate::storage::StorageConfig {
            id,
            listen: None,
            members,
            dir: self.state_dir.join("sbs"),
            nbd_tcp: None,
            tls: None,
            timing: self.storage_timing()?,
        }))
    }

    /// The route reflector this host runs, if it has the management role.
    pub fn frr(&self) -> Result<Option<crate::frr::FrrConfig>, String> {
        if !self.roles.iter().any(|r| r == "management") {
            return Ok(None);
        }
        if self.bgp_asn == 0 {
            return Err("the management role needs bgp_asn".into());
        }
        if self.bgp_listen_ranges.is_empty() {
            return Err("the management role needs bgp_listen_ranges".into());
        }
        if let Some(r) = self.bgp_listen_ranges.iter().find(|r| !is_cidr(r)) {
            return Err(format!("bgp_listen_ranges: {r:?} is not a CIDR"));
        }
        Ok(Some(crate::frr::FrrConfig {
            dir: self.state_dir.join("frr"),
            asn: self.bgp_asn,
            router_id: self.router_id()?,
            listen_ranges: self.bgp_listen_ranges.clone(),
            hold_time: self.bgp_hold_time,
            bin_dir: self.frr_bin_dir.clone(),
        }))
    }

    fn router_id(&self) -> Result<std::net::Ipv4Addr, String> {
        let id = if self.bgp_router_id.is_empty() {
            &self.underlay_ip
        } else {
            &self.bgp_router_id
        };
        id.parse()
            .map_err(|_| format!("bgp_router_id {id:?} (or underlay_ip) is not an IPv4 address"))
    }

    /// The EVPN settings, if `bgp_peers` is set.
    pub fn evpn(&self) -> Result<Option<crate::network::evpn::EvpnConfig>, String> {
        if self.bgp_peers.is_empty() {
            return Ok(None);
        }
        if self.bgp_asn == 0 {
            return Err("bgp_peers needs bgp_asn".into());
        }
        let router_id = self.router_id()?;
        let peers = self
            .bgp_peers
            .iter()
            .map(|p| {
                p.parse::<std::net::SocketAddr>()
                    .or_else(|_| {
                        p.parse::<std::net::IpAddr>()
                            .map(|ip| std::net::SocketAddr::new(ip, 179))
                    })
                    .map_err(|_| format!("bgp_peers: {p:?} is not ADDRESS or ADDRESS:PORT"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.bgp_hold_time == 1 || self.bgp_hold_time == 2 {
            return Err(format!(
                "bgp_hold_time {}: 0 or at least 3",
                self.bgp_hold_time
            ));
        }
        if self.bgp_keepalive != 0
            && self.bgp_hold_time != 0
            && self.bgp_keepalive >= self.bgp_hold_time
        {
            return Err(format!(
                "bgp_keepalive {} must be below bgp_hold_time {}",
                self.bgp_keepalive, self.bgp_hold_time
            ));
        }
        Ok(Some(crate::network::evpn::EvpnConfig {
            asn: self.bgp_asn,
            router_id,
            peers,
            hold_time: self.bgp_hold_time,
            keepalive: self.bgp_keepalive,
        }))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::Invalid(format!(
                "state_dir {} is not an absolute path",
                self.state_dir.display()
            )));
        }
        if !self.underlay_ip.is_empty() && self.underlay_ip.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "underlay_ip {:?} is not an IPv4 address",
                self.underlay_ip
            )));
        }
        if let Some(p) = self
            .peers
            .iter()
            .find(|p| p.parse::<std::net::Ipv4Addr>().is_err())
        {
            return Err(ConfigError::Invalid(format!(
                "peer {p:?} is not an IPv4 address"
            )));
        }
        if !(1280..=65535).contains(&self.underlay_mtu) {
            return Err(ConfigError::Invalid(format!(
                "underlay_mtu {} outside 1280-65535",
                self.underlay_mtu
            )));
        }
        netdrv::names::validate_prefix(&self.link_prefix)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.external().map_err(ConfigError::Invalid)?;
        self.evpn().map_err(ConfigError::Invalid)?;
        self.frr().map_err(ConfigError::Invalid)?;
        self.storage().map_err(ConfigError::Invalid)?;
        if let Some(r) = self
            .roles
            .iter()
            .find(|r| !matches!(r.as_str(), "compute" | "route" | "management" | "storage"))
        {
            return Err(ConfigError::Invalid(format!(
                "roles: unknown role {r:?} (compute, route, management, storage)"
            )));
        }
        if let Some(d) = self
            .dns_servers
            .iter()
            .find(|d| d.parse::<std::net::Ipv4Addr>().is_err())
        {
            return Err(ConfigError::Invalid(format!(
                "dns_servers: {d:?} is not an IPv4 address"
            )));
        }
        if !self.dns_domain.is_empty() && !valid_domain(&self.dns_domain) {
            return Err(ConfigError::Invalid(format!(
                "dns_domain {:?}: dot-separated labels of 1-63 of a-z 0-9 - (not at either end)",
                self.dns_domain
            )));
        }
        if self.dhcp_lease_secs < 60 {
            return Err(ConfigError::Invalid(format!(
                "dhcp_lease_secs {}: at least 60",
                self.dhcp_lease_secs
            )));
        }
        if !matches!(self.vlan_filter.as_str(), "auto" | "kernel" | "ebpf") {
            return Err(ConfigError::Invalid(format!(
                "vlan_filter {:?}: auto, kernel or ebpf",
                self.vlan_filter
            )));
        }
        if self.shutdown_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "shutdown_timeout_secs must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// A DNS domain as DHCP option 15 carries it: labels of letters, digits and inner hyphens.
fn valid_domain(d: &str) -> bool {
    d.len() <= 253
        && d.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
// figment's Jail closures return figment::Error, which is large; that is the crate's API.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::value::{Dict, Value};
    use figment::Jail;

    fn load(jail: &Jail, body: &str, flags: &Dict) -> Result<Config, ConfigError> {
        let path = jail.directory().join("vpcd.toml");
        std::fs::write(&path, body).unwrap();
        Config::load(Some(&path), Config::env(), flags)
    }

    #[test]
    fn defaults_apply_with_no_configuration() {
        Jail::expect_with(|jail| {
            let c = load(jail, "", &Dict::new()).unwrap();
            assert_eq!(c, Config::default());
            assert_eq!(c.state_dir, PathBuf::from("/var/lib/vpcd"));
            Ok(())
        });
    }

    #[test]
    fn external_network_and_roles_are_checked() {
        Jail::expect_with(|jail| {
            let ok = "external_link = \"xbr\"\nexternal_cidr = \"203.0.113.0/24\"\n\
                      external_gateway = \"203.0.113.1\"\nroles = [\"compute\"]\n";
            let c = load(jail, ok, &Dict::new()).unwrap();
            let x = c.external().unwrap().expect("configured");
            assert_eq!(x.link, "xbr");
            for (bad, word) in [
                ("external_link = \"xbr\"\nexternal_cidr = \"203.0.113.0/24\"\nexternal_gateway = \"198.51.100.1\"\n", "external_gateway"),
                ("external_link = \"xbr\"\nexternal_cidr = \"nope\"\nexternal_gateway = \"203.0.113.1\"\n", "external_cidr"),
                ("roles = [\"compute\", \"routing\"]\n", "routing"),
                ("dns_servers = [\"8.8.8\"]\n", "dns_servers"),
                ("dns_domain = \"-bad.example\"\n", "dns_domain"),
                ("dns_domain = \"a..b\"\n", "dns_domain"),
                ("dhcp_lease_secs = 10\n", "dhcp_lease_secs"),
            ] {
                let err = load(jail, bad, &Dict::new()).unwrap_err().to_string();
                assert!(err.contains(word), "{bad}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn evpn_and_management_settings_are_checked() {
        Jail::expect_with(|jail| {
            let ok = "underlay_ip = \"192.0.2.1\"\nbgp_asn = 65000\nbgp_peers = [\"192.0.2.10\", \
                      \"192.0.2.11:1179\"]\nbgp_hold_time = 9\nbgp_keepalive = 2\n";
            let e = load(jail, ok, &Dict::new())
                .unwrap()
                .evpn()
                .unwrap()
                .unwrap();
            assert_eq!(e.router_id.to_string(), "192.0.2.1");
            assert_eq!(e.peers[1].port(), 1179);
            assert_eq!(e.keepalive, 2);
            for (bad, word) in [
                ("bgp_peers = [\"192.0.2.10\"]\nunderlay_ip = \"192.0.2.1\"\n", "bgp_asn"),
                ("bgp_asn = 1\nbgp_peers = [\"x\"]\nunderlay_ip = \"192.0.2.1\"\n", "bgp_peers"),
                ("bgp_asn = 1\nbgp_peers = [\"192.0.2.10\"]\n", "bgp_router_id"),
                ("bgp_asn = 1\nbgp_peers = [\"192.0.2.10\"]\nunderlay_ip = \"192.0.2.1\"\nbgp_hold_time = 9\nbgp_keepalive = 9\n", "bgp_keepalive"),
                ("roles = [\"management\"]\nbgp_asn = 1\nunderlay_ip = \"192.0.2.1\"\n", "bgp_listen_ranges"),
                ("roles = [\"management\"]\nbgp_asn = 1\nunderlay_ip = \"192.0.2.1\"\nbgp_listen_ranges = [\"192.0.2.0/33\"]\n", "not a CIDR"),
            ] {
                let err = load(jail, bad, &Dict::new()).unwrap_err().to_string();
                assert!(err.contains(word), "{bad}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        Jail::expect_with(|jail| {
            let err = load(jail, "stat_dir = \"/x\"\n", &Dict::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains("stat_dir"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_key_in_environment_is_named() {
        Jail::expect_with(|jail| {
            jail.set_env("VPCD_BOGUS_KEY", "1");
            let err = load(jail, "", &Dict::new()).unwrap_err().to_string();
            assert!(err.contains("bogus_key"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn layers_override_in_order_file_env_flags() {
        Jail::expect_with(|jail| {
            let body = "state_dir = \"/from/file\"\nlog = \"debug\"\nbackend = \"qmp\"\n";
            let c = load(jail, body, &Dict::new()).unwrap();
            assert_eq!(c.state_dir, PathBuf::from("/from/file"));
            assert_eq!(c.backend, BackendChoice::Qmp);

            jail.set_env("VPCD_STATE_DIR", "/from/env");
            jail.set_env("VPCD_CONFIG", "/ignored/as/a/key");
            let c = load(jail, body, &Dict::new()).unwrap();
            assert_eq!(c.state_dir, PathBuf::from("/from/env"));

            let mut flags = Dict::new();
            flags.insert("state_dir".into(), Value::from("/from/flag"));
            let c = load(jail, body, &flags).unwrap();
            assert_eq!(c.state_dir, PathBuf::from("/from/flag"));
            assert_eq!(c.log, "debug");
            Ok(())
        });
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Config::load(
            Some(Path::new("/nonexistent/vpcd.toml")),
            Config::env(),
            &Dict::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/vpcd.toml"));
    }

    #[test]
    fn a_host_without_the_storage_role_is_a_client_of_the_storage_nodes_it_names() {
        Jail::expect_with(|jail| {
            let members = "storage_members = [\"1=127.0.0.1:7400\", \"2=127.0.0.1:7401\"]\n";
            let s = load(
                jail,
                &format!("{members}storage_node_id = 9\n"),
                &Dict::new(),
            )
            .unwrap()
            .storage()
            .unwrap()
            .unwrap();
            assert_eq!(s.listen, None);
            assert_eq!(s.id, 9);
            let slow = format!("{members}storage_node_id = 9\nstorage_election_ms = 3000\n");
            let timing = load(jail, &slow, &Dict::new()).unwrap().storage().unwrap();
            assert_eq!(timing.unwrap().timing.election_ms, (3000, 6000));
            assert_eq!(s.members.keys().copied().collect::<Vec<_>>(), [1, 2]);
            // Nothing to use: no storage at all.
            assert_eq!(
                load(jail, "", &Dict::new()).unwrap().storage().unwrap(),
                None
            );
            for (extra, word) in [
                ("", "storage_node_id"),
                (
                    "storage_node_id = 2\n",
                    "the storage node's at 127.0.0.1:7401",
                ),
                (
                    "storage_node_id = 9\nstorage_tls_ca = \"/ca.pem\"\n",
                    "storage_tls_ca",
                ),
                (
                    "storage_node_id = 9\nstorage_heartbeat_ms = 500\n",
                    "storage_election_ms",
                ),
                (
                    "storage_node_id = 9\nstorage_listen = \"127.0.0.1:7402\"\n",
                    "storage_listen",
                ),
                (
                    "storage_node_id = 9\nstorage_nbd_listen = \"127.0.0.1:10809\"\n",
                    "storage_nbd_listen",
                ),
            ] {
                let e = load(jail, &format!("{members}{extra}"), &Dict::new()).unwrap_err();
                assert!(e.to_string().contains(word), "{extra}: {e}");
            }
            Ok(())
        });
    }

    #[test]
    fn storage_tls_and_tcp_settings_are_checked() {
        Jail::expect_with(|jail| {
            let base =
                "roles = [\"storage\"]\nstorage_node_id = 1\nstorage_listen = \"127.0.0.1:7400\"\n";
            let ok = format!(
                "{base}storage_nbd_listen = \"127.0.0.1:10809\"\nstorage_tls_cert = \"/c.pem\"\nstorage_tls_key = \"/k.pem\"\n"
            );
            let s = load(jail, &ok, &Dict::new())
                .unwrap()
                .storage()
                .unwrap()
                .unwrap();
            assert_eq!(s.nbd_tcp, Some("127.0.0.1:10809".parse().unwrap()));
            assert_eq!(s.tls.unwrap().ca, None);
            // Beyond loopback: with client certificates, or when said to be a trusted network.
            for extra in [
                "storage_tls_cert = \"/c.pem\"\nstorage_tls_key = \"/k.pem\"\nstorage_tls_ca = \"/ca.pem\"\n",
                "storage_nbd_insecure = true\n",
            ] {
                let conf = format!("{base}storage_nbd_listen = \"0.0.0.0:10809\"\n{extra}");
                let s = load(jail, &conf, &Dict::new()).unwrap().storage().unwrap();
                assert!(s.unwrap().nbd_tcp.is_some(), "{extra}");
            }
            assert_eq!(
                (
                    s.timing.heartbeat_ms,
                    s.timing.election_ms,
                    s.timing.defer_logs,
                    s.timing.rebalance_s
                ),
                (250, (1000, 2000), 512, 10)
            );
            let fast = format!(
                "{base}storage_heartbeat_ms = 100\nstorage_election_ms = 500\nstorage_defer_mib = 0\n\
                 storage_rebalance_s = 0\n"
            );
            let s = load(jail, &fast, &Dict::new())
                .unwrap()
                .storage()
                .unwrap()
                .unwrap();
            assert_eq!(
                (
                    s.timing.heartbeat_ms,
                    s.timing.election_ms,
                    s.timing.defer_logs,
                    s.timing.rebalance_s
                ),
                (100, (500, 1000), 0, 0)
            );
            for (extra, word) in [
                ("storage_nbd_listen = \"localhost\"\n", "storage_nbd_listen"),
                (
                    "storage_tls_cert = \"/c.pem\"\nstorage_tls_key = \"/k.pem\"\n",
                    "storage_nbd_listen",
                ),
                (
                    "storage_nbd_listen = \"127.0.0.1:1\"\nstorage_tls_cert = \"/c.pem\"\n",
                    "go together",
                ),
                ("storage_tls_ca = \"/ca.pem\"\n", "storage_tls_ca"),
                (
                    "storage_heartbeat_ms = 200\nstorage_election_ms = 500\n",
                    "at least 3 times storage_heartbeat_ms 200",
                ),
                ("storage_heartbeat_ms = 0\n", "storage_election_ms"),
                (
                    "storage_nbd_listen = \"0.0.0.0:10809\"\n",
                    "not a loopback address",
                ),
                (
                    "storage_nbd_listen = \"10.0.0.1:10809\"\nstorage_tls_cert = \"/c.pem\"\nstorage_tls_key = \"/k.pem\"\n",
                    "storage_tls_ca, or storage_nbd_insecure",
                ),
            ] {
                let err = load(jail, &format!("{base}{extra}"), &Dict::new())
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(word), "{extra}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_rejected() {
        Jail::expect_with(|jail| {
            for body in [
                "backend = \"xen\"\n",
                "state_dir = \"relative\"\n",
                "shutdown_timeout_secs = 0\n",
            ] {
                assert!(load(jail, body, &Dict::new()).is_err(), "{body}");
            }
            Ok(())
        });
    }
}
