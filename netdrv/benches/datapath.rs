//! Data path benchmark: TCP throughput between two "VMs" on two "hosts" through the full path
//! netdrv builds (tenant bridge, eBPF VLAN filter and port security on the ports and on the
//! VxLAN uplinks, VxLAN with static flood entries), against a plain bridge + VxLAN made with
//! `ip` in the same run.
//!
//! Run as root: `cargo bench -p netdrv --bench datapath` (or `benches/network.sh`).
//! Environment: `BENCH_RUNS` (iperf3 runs per setup and configuration, default 3),
//! `BENCH_SECS` (iperf3 `-t`, default 5), `BENCH_STREAMS` (iperf3 `-P`, default 2).
//!
//! # Topology (eight namespaces `vpcdb-<pid>-*`, all removed at the end)
//! ```text
//!  full (netdrv):                              baseline (ip):
//!  fv1 eth0 10.10.0.1/24                       bv1 eth0 10.10.0.1/24
//!   |  veth port (PortKind::Veth, moved        |  veth p1, MTU 1450
//!   |  and addressed by netdrv)                |
//!  fh1 vpcb1 bridge, vpcv1 + vpcx64 (VNI 100)  bh1 br0, p1 + vx0 (VNI 100, nolearning)
//!   |  eBPF: VLAN 10 + port security on        |  no programs
//!   |  vpcv1, VLAN 10 on vpcx64                |
//!  ul 192.0.2.1/24 ==== veth, MTU 1500 ==== ul 192.0.2.2/24 (same on the other side)
//! ```
//! Flood entries: both VxLAN devices send to the other VTEP (netdrv: `peers`; baseline: `bridge
//! fdb append 00:00:00:00:00:00 dev vx0 dst ...`). Port MTU is 1450 (underlay 1500 - 50) as
//! netdrv sets it; the baseline uses the MTUs netdrv produced, read back from the full setup.
//!
//! # Measurement
//! iperf3 TCP, server in the second VM, client (`-t BENCH_SECS -P BENCH_STREAMS`) in the first,
//! full and baseline alternating (the order flips every run), `BENCH_RUNS` runs each; printed:
//! every run, the medians (Gb/s, received), the ratio full/baseline (target >= 0.95), the
//! spread, TCP retransmits and iperf3's CPU figures. Configurations, applied to both setups
//! alike: "as built" (the veths' default offloads, the MTUs netdrv set); "as built, VM tx off"
//! (`ethtool -K eth0 tx off` in both VMs; platform.md: some paths never fill in the checksum
//! otherwise); and, only if netdrv left the VM end of the port at another MTU than the port,
//! "VM MTU = port MTU" (set by hand in both VMs).
//!
//! Before measuring, an unfragmentable ping of the VM's MTU and of the port's MTU is sent from
//! VM 1 to VM 2 in both setups and the outcome printed: frames that are not GSO and larger than
//! the port's MTU are dropped by the veth, which TCP with TSO does not show.
//!
//! Cleanup: everything created is registered and removed by a drop guard, on panic too, and on
//! SIGINT/SIGTERM; namespaces and pin dirs left by a benchmark process that no longer runs are
//! removed at start. The iperf3 processes run under `timeout` and are killed if still there.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netdrv::filter::ebpf::EbpfFilter;
use netdrv::filter::{PortSecurity, VlanFilter};
use netdrv::ipam::Mac;
use netdrv::model::{HostNet, PortKind, PortNet, SubnetNet, TenantNet, Underlay};
use netdrv::{names, NetHost, Netns};

mod common;
use common::*;

const PREFIX: &str = "vpc";
const OWNER: &str = "bench";
const VLAN: u16 = 10;
const VNI: u32 = 100;
const UNDERLAY_MTU: u32 = 1500;

/// Whether a command succeeds.
fn ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn add_netns(name: &str) {
    sh(&["ip", "netns", "add", name]);
    register(Resource::Netns(name.to_owned()));
    // IPv6 off: no router/neighbour solicitations besides the measured traffic.
    sh(&[
        "ip",
        "netns",
        "exec",
        name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ]);
    sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Link MTU of `dev` in namespace `ns`.
fn mtu_of(ns: &str, dev: &str) -> u32 {
    let out = sh(&["ip", "-n", ns, "-o", "link", "show", "dev", dev]);
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mtu" {
            return words.next().and_then(|m| m.parse().ok()).expect("mtu");
        }
    }
    panic!("no mtu in {out:?}");
}

fn underlay_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, i)
}

fn vm_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 0, i)
}

fn vm_mac(i: u8) -> Mac {
    Mac::for_port(OWNER, u32::from(i))
}

// ---------------------------------------------------------------------------------------------
// The two setups.

/// Namespaces of one setup: hosts h[0], h[1]; VMs v[0], v[1].
struct Setup {
    name: &'static str,
    h: [String; 2],
    v: [String; 2],
}

impl Setup {
    fn new(name: &'static str, tag: char, pid: u32) -> Setup {
        let ns = |what: &str, i: usize| format!("{NS_PREFIX}{pid}-{tag}{what}{i}");
        let s = Setup {
            name,
            h: [ns("h", 1), ns("h", 2)],
            v: [ns("v", 1), ns("v", 2)],
        };
        for n in s.h.iter().chain(&s.v) {
            add_netns(n);
        }
        // The underlay: one veth between the hosts.
        sh(&[
            "ip", "-n", &s.h[0], "link", "add", "ul", "mtu", "1500", "type", "veth", "peer",
            "name", "ul", "mtu", "1500", "netns", &s.h[1],
        ]);
        for i in 0..2u8 {
            let h = &s.h[usize::from(i)];
            let addr = format!("{}/24", underlay_ip(i + 1));
            sh(&["ip", "-n", h, "addr", "add", &addr, "dev", "ul"]);
            sh(&["ip", "-n", h, "link", "set", "ul", "up"]);
        }
        s
    }

    fn vm_exec<'a>(&'a self, i: usize, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["ip", "netns", "exec", self.v[i].as_str()];
        v.extend_from_slice(args);
        v
    }

    /// Both directions answer pings (also fills ARP and FDB before measuring).
    fn check_ping(&self) {
        for (from, to) in [(0, 2u8), (1, 1u8)] {
            let to = vm_ip(to).to_string();
            let args = self.vm_exec(
                from,
                &["ping", "-q", "-c", "3", "-i", "0.2", "-W", "1", &to],
            );
            assert!(ok(&args), "{}: {:?} failed", self.name, args);
        }
    }

    /// Whether an unfragmentable ping of `size` bytes (IP packet) gets from VM 1 to VM 2.
    fn ping_size(&self, size: u32) -> bool {
        let (payload, to) = ((size - 28).to_string(), vm_ip(2).to_string());
        let args = self.vm_exec(
            0,
            &[
                "ping", "-q", "-c", "2", "-i", "0.2", "-W", "1", "-M", "do", "-s", &payload, &to,
            ],
        );
        ok(&args)
    }

    /// TX checksum offload and MTU of both VMs' eth0.
    fn set_vm(&self, tx_on: bool, mtu: u32) {
        let (tx, mtu) = (if tx_on { "on" } else { "off" }, mtu.to_string());
        for i in 0..2 {
            sh(&self.vm_exec(i, &["ethtool", "-K", "eth0", "tx", tx]));
            sh(&self.vm_exec(i, &["ip", "link", "set", "eth0", "mtu", &mtu]));
        }
    }
}

/// The desired state of host `i` (1 or 2) of the full setup.
fn desired(i: u8, vm_ns: &str, with_port: bool) -> HostNet {
    let mac = vm_mac(i);
    let ports = if with_port {
        vec![PortNet {
            id: u32::from(i),
            subnet: "web".into(),
            kind: PortKind::Veth {
                netns: PathBuf::from("/run/netns").join(vm_ns),
                ifname: "eth0".into(),
                address: Some((vm_ip(i), 24)),
            },
            mac,
            security: Some(PortSecurity {
                macs: vec![mac.0],
                ipv4: vec![vm_ip(i)],
                ipv6: vec![],
            }),
        }]
    } else {
        vec![]
    };
    HostNet {
        prefix: PREFIX.into(),
        owner: OWNER.into(),
        underlay: Some(Underlay {
            local: underlay_ip(i),
            mtu: UNDERLAY_MTU,
        }),
        peers: vec![underlay_ip(3 - i)],
        tenants: vec![TenantNet {
            id: 1,
            subnets: vec![SubnetNet {
                name: "web".into(),
                vlan: VLAN,
                vni: VNI,
            }],
            ports,
        }],
        remote_macs: vec![],
        externals: vec![],
        floods: vec![],
        vxlan_port_learning: true,
        neighbours: Vec::new(),
    }
}

/// Builds the full path with netdrv; returns the two NetHosts.
async fn build_full(s: &Setup, pid: u32) -> Vec<NetHost> {
    let mut hosts = Vec::new();
    for i in 1..=2u8 {
        let h = &s.h[usize::from(i - 1)];
        let pin_dir = PathBuf::from(format!("{PIN_PREFIX}{pid}-fh{i}"));
        register(Resource::PinDir(pin_dir.clone()));
        let netns = Netns::named(h).expect("open host netns");
        let filter: Arc<dyn VlanFilter> =
            Arc::new(EbpfFilter::open(&netns, &pin_dir).expect("open eBPF filter"));
        let host = NetHost::open(&netns, filter).expect("open NetHost");
        let ops = host
            .apply(&desired(i, &s.v[usize::from(i - 1)], true))
            .await
            .expect("netdrv apply");
        eprintln!("full host {i}: {} netdrv steps", ops.len());
        hosts.push(host);
    }
    hosts
}

/// Builds the baseline with `ip`: the same bridge, VxLAN, flood entry, port and MTUs, no
/// programs. `port_mtu`/`vm_mtu`: the MTUs netdrv gave the host and VM ends of its ports.
fn build_baseline(s: &Setup, vx_mtu: u32, port_mtu: u32, vm_mtu: u32) {
    for i in 1..=2u8 {
        let h = s.h[usize::from(i - 1)].as_str();
        let vm = s.v[usize::from(i - 1)].as_str();
        let local = underlay_ip(i).to_string();
        let remote = underlay_ip(3 - i).to_string();
        let (vx_mtu, port_mtu, vm_mtu) =
            (vx_mtu.to_string(), port_mtu.to_string(), vm_mtu.to_string());
        sh(&["ip", "-n", h, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", h, "link", "set", "br0", "up"]);
        sh(&[
            "ip",
            "-n",
            h,
            "link",
            "add",
            "vx0",
            "mtu",
            &vx_mtu,
            "type",
            "vxlan",
            "id",
            "100",
            "local",
            &local,
            "dstport",
            "4789",
            "nolearning",
        ]);
        sh(&["ip", "-n", h, "link", "set", "vx0", "master", "br0", "up"]);
        sh(&[
            "bridge",
            "-n",
            h,
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "vx0",
            "dst",
            &remote,
        ]);
        sh(&[
            "ip", "-n", h, "link", "add", "p1", "mtu", &port_mtu, "type", "veth", "peer", "name",
            "eth0", "mtu", &vm_mtu, "netns", vm,
        ]);
        sh(&["ip", "-n", h, "link", "set", "p1", "master", "br0", "up"]);
        let mac = mac_str(vm_mac(i).0);
        sh(&["ip", "-n", vm, "link", "set", "eth0", "address", &mac]);
        let addr = format!("{}/24", vm_ip(i));
        sh(&["ip", "-n", vm, "addr", "add", &addr, "dev", "eth0"]);
        sh(&["ip", "-n", vm, "link", "set", "eth0", "up"]);
    }
}

// ---------------------------------------------------------------------------------------------
// iperf3.

/// Kills the child (the `timeout` wrapper and with it iperf3) if it still runs.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

struct IperfResult {
    gbps: f64,
    retransmits: u64,
    cpu_sender: f64,
    cpu_receiver: f64,
}

fn iperf(s: &Setup, secs: u32, streams: u32) -> IperfResult {
    let server_timeout = (secs + 30).to_string();
    let server = Command::new("timeout")
        .args([
            &server_timeout,
            "ip",
            "netns",
            "exec",
            &s.v[1],
            "iperf3",
            "-s",
            "-1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    let _server = Reap(server);
    // Wait (bounded) until it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = sh(&["ss", "-N", &s.v[1], "-ltnH", "sport", "=", ":5201"]);
        if !out.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: iperf3 server not up",
            s.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let client_timeout = (secs + 20).to_string();
    let (t, p, dst) = (secs.to_string(), streams.to_string(), vm_ip(2).to_string());
    let out = sh(&[
        "timeout",
        &client_timeout,
        "ip",
        "netns",
        "exec",
        &s.v[0],
        "iperf3",
        "-c",
        &dst,
        "-t",
        &t,
        "-P",
        &p,
        "-J",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    let end = &j["end"];
    IperfResult {
        gbps: end["sum_received"]["bits_per_second"]
            .as_f64()
            .expect("bits_per_second")
            / 1e9,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        cpu_sender: end["cpu_utilization_percent"]["host_total"]
            .as_f64()
            .unwrap_or(f64::NAN),
        cpu_receiver: end["cpu_utilization_percent"]["remote_total"]
            .as_f64()
            .unwrap_or(f64::NAN),
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    sweep_stale();
    let _guard = CleanupGuard;
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    cleanup_on_signals(&rt);
    rt.block_on(run());
}

async fn run() {
    let runs: usize = env_or("BENCH_RUNS", 3).max(1);
    let secs: u32 = env_or("BENCH_SECS", 5).clamp(1, 120);
    let streams: u32 = env_or("BENCH_STREAMS", 2).clamp(1, 16);
    let pid = std::process::id();

    let full = Setup::new("full", 'f', pid);
    let hosts = build_full(&full, pid).await;
    let port = names::veth(PREFIX, 1);
    let vx = names::vxlan(PREFIX, VNI);
    let (vx_mtu, port_mtu, vm_mtu) = (
        mtu_of(&full.h[0], &vx),
        mtu_of(&full.h[0], &port),
        mtu_of(&full.v[0], "eth0"),
    );
    let base = Setup::new("baseline", 'b', pid);
    build_baseline(&base, vx_mtu, port_mtu, vm_mtu);

    println!(
        "netdrv data path: iperf3 TCP VM -> VM across VxLAN, full netdrv path vs plain bridge"
    );
    println!(
        "kernel {}, iperf3 -t {secs} -P {streams}, {runs} runs per cell (median), alternating",
        sh(&["uname", "-r"]).trim()
    );
    println!(
        "MTUs (as netdrv made them, copied to the baseline): underlay {UNDERLAY_MTU}, VxLAN \
         {vx_mtu}, port host end {port_mtu}, VM eth0 {vm_mtu}"
    );
    for name in [&port, &vx] {
        hosts[0]
            .counters(name)
            .await
            .unwrap_or_else(|e| panic!("no filter on {name}: {e}"));
    }
    full.check_ping();
    base.check_ping();
    // Frames that are not GSO (ICMP, UDP, TCP without TSO) and fill the VM's MTU.
    for s in [&full, &base] {
        let reach = |size| if s.ping_size(size) { "passes" } else { "LOST" };
        println!(
            "{}: unfragmentable {vm_mtu}-byte IP packet VM1 -> VM2 {}; {port_mtu}-byte {}",
            s.name,
            reach(vm_mtu),
            reach(port_mtu)
        );
    }

    let mut rows = Vec::new();
    // As netdrv builds it; then with TX checksum offload off in the VMs; then (if netdrv left
    // the VM end at another MTU than the port) with the VMs' MTU set to the port's by hand.
    let mut configs = vec![
        ("as built", true, vm_mtu),
        ("as built, VM tx off", false, vm_mtu),
    ];
    if vm_mtu != port_mtu {
        configs.push(("VM MTU = port MTU", true, port_mtu));
    }
    for (cfg, tx_on, mtu) in configs {
        for s in [&full, &base] {
            s.set_vm(tx_on, mtu);
        }
        full.check_ping();
        base.check_ping();
        let (mut f, mut b) = (Vec::new(), Vec::new());
        for r in 0..runs {
            let order: [(&Setup, bool); 2] = if r % 2 == 0 {
                [(&full, true), (&base, false)]
            } else {
                [(&base, false), (&full, true)]
            };
            for (s, is_full) in order {
                std::thread::sleep(Duration::from_secs(1));
                let res = iperf(s, secs, streams);
                eprintln!(
                    "{cfg}, run {}: {:<8} {:6.2} Gb/s, {} retransmits, CPU sender {:.0}% \
                     receiver {:.0}%",
                    r + 1,
                    s.name,
                    res.gbps,
                    res.retransmits,
                    res.cpu_sender,
                    res.cpu_receiver
                );
                if is_full {
                    f.push(res);
                } else {
                    b.push(res);
                }
            }
        }
        rows.push((cfg, f, b));
    }

    // The measured traffic went through the programs.
    let c_port = hosts[0].counters(&port).await.expect("port counters");
    let c_vx = hosts[0].counters(&vx).await.expect("uplink counters");

    println!();
    println!(
        "{:<20} | {:>10} {:>10} {:>7} {:>5} | {:>17} {:>17} | {:>9} {:>9}",
        "configuration",
        "full Gb/s",
        "base Gb/s",
        "ratio",
        ">=.95",
        "full runs",
        "base runs",
        "full retr",
        "base retr"
    );
    for (cfg, f, b) in &rows {
        let g = |v: &[IperfResult]| v.iter().map(|r| r.gbps).collect::<Vec<_>>();
        let (fg, bg) = (g(f), g(b));
        let (fm, bm) = (median(&fg), median(&bg));
        let runs = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join("/")
        };
        let retr =
            |v: &[IperfResult]| median(&v.iter().map(|r| r.retransmits as f64).collect::<Vec<_>>());
        println!(
            "{:<20} | {:>10.2} {:>10.2} {:>7.3} {:>5} | {:>17} {:>17} | {:>9.0} {:>9.0}",
            cfg,
            fm,
            bm,
            fm / bm,
            if fm / bm >= 0.95 { "yes" } else { "NO" },
            runs(&fg),
            runs(&bg),
            retr(f),
            retr(b)
        );
    }
    let spread = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        100.0 * (hi - lo) / median(v)
    };
    for (cfg, f, b) in &rows {
        let g = |v: &[IperfResult]| v.iter().map(|r| r.gbps).collect::<Vec<_>>();
        println!(
            "noise ({cfg}): spread (max-min)/median full {:.0}%, baseline {:.0}%",
            spread(&g(f)),
            spread(&g(b))
        );
    }
    println!(
        "filter counters on host 1 after the runs: port {port}: tx {} pkts rx {} pkts, drops \
         vlan {} security {}; uplink {vx}: tx {} rx {} pkts, drop vlan {}",
        c_port.tx_packets,
        c_port.rx_packets,
        c_port.drop_vlan,
        c_port.drop_security,
        c_vx.tx_packets,
        c_vx.rx_packets,
        c_vx.drop_vlan
    );

    // netdrv's own teardown, then the filters' pins; the guard removes the namespaces.
    for (i, h) in hosts.iter().enumerate() {
        let i = i as u8 + 1;
        h.apply(&desired(i, &full.v[usize::from(i - 1)], false))
            .await
            .expect("netdrv teardown");
    }
}
