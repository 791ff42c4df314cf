//! Port plumbing benchmark: how long `NetHost::apply` takes to create and to delete one tenant's
//! bridge and N tap ports (N = 100, 250, 500), against `ip -batch` doing the same links in the
//! same run.
//!
//! Run as root: `cargo bench -p netdrv --bench plumbing` (or `benches/network.sh`).
//! Environment: `BENCH_RUNS` (measurements per cell, default 3, the median is reported),
//! `BENCH_SIZES` (comma-separated N, default `100,250,500`), `BENCH_PROFILE=0` skips the
//! per-step breakdown.
//!
//! # What is measured
//! - netdrv: a fresh network namespace `vpcdb-<pid>-plumb` (the "host") with an
//!   [`EbpfFilter`] pinned under `/sys/fs/bpf/vpcd-bench-<pid>-plumb`. The desired state is one
//!   tenant, one subnet (VLAN 10), no underlay (so no VxLAN device, port MTU 1500), and N tap
//!   ports with port security on (the port's MAC and IPv4 address). `create` is one `apply` of
//!   it from an empty namespace: bridge, taps, MTU, master, up, alias, and the eBPF VLAN filter
//!   plus port security attached to every tap. `delete` is one `apply` of the empty state.
//! - baseline: the same bridge and taps made by ONE `ip -n NS -batch FILE` (`link add BR type
//!   bridge`, `link set BR up`, per tap `tuntap add mode tap name X` and `link set X mtu M
//!   master BR up`), and removed by one `ip -batch` of `link del` (taps, then the bridge). No
//!   aliases, no filter: the bare kernel work plus iproute2's per-command overhead.
//! - references (not targets), to locate the cost: (a) the baseline's links plus the same two
//!   eBPF programs attached the legacy TC way (clsact qdisc + cls_bpf direct-action filter per
//!   direction, from netdrv's pins) with ONE `tc -batch`, deleted one by one by `ip -batch`
//!   and, in a second cycle, in bulk; (b) plain links deleted in bulk by `ip link del group G`
//!   (the kernel unregisters them together: one set of RCU grace periods for the lot); (c)
//!   links made by netdrv (with their port filters attached) deleted in bulk the same way.
//!
//! Each cell is measured `BENCH_RUNS` times, netdrv and `ip` alternating (the order flips every
//! run), after one unmeasured warm-up; the median is printed. Targets (from the issue): netdrv
//! create <= 2x ip-batch, delete <= 1x, per-port cost about constant in N. The numbers are
//! printed, never asserted; the bench only stops on a functional failure (a link missing after
//! create, something left after delete).
//!
//! A second part ("breakdown") runs `apply`'s steps one by one through netdrv's public API,
//! mirroring `NetHost::run` in `src/host.rs`, and times each kind of step, plus micro-timings of
//! the primitives they share (`Netlink::index_of`, `Netns::run`). That is where the time goes.
//!
//! Cleanup: everything created is registered and removed by a drop guard, on panic too, and on
//! SIGINT/SIGTERM; namespaces and pin dirs left by a benchmark process that no longer runs are
//! removed at start.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netdrv::filter::ebpf::EbpfFilter;
use netdrv::filter::{PortSecurity, VlanFilter};
use netdrv::ipam::Mac;
use netdrv::model::{HostNet, PortKind, PortNet, SubnetNet, TenantNet};
use netdrv::plan::{self, Op};
use netdrv::{names, NetHost, Netns};

mod common;
use common::*;

const PREFIX: &str = "vb";
const OWNER: &str = "bench";
const TENANT: u32 = 1;
/// Port MTU without an underlay (what netdrv sets).
const MTU: u32 = 1500;
/// The link group of the bulk-delete reference.
const GROUP: u32 = 77;

fn add_netns(name: &str) {
    sh(&["ip", "netns", "add", name]);
    register(Resource::Netns(name.to_owned()));
    sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
}

// ---------------------------------------------------------------------------------------------
// Statistics and printing.

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn sizes() -> Vec<usize> {
    std::env::var("BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![100, 250, 500])
}

fn fmt_runs(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join("/")
}

// ---------------------------------------------------------------------------------------------
// The desired states and the baseline's batch files.

fn tap_name(id: u32) -> String {
    names::tap(PREFIX, id)
}

fn bridge_name() -> String {
    names::bridge(PREFIX, TENANT)
}

fn desired(n: usize) -> HostNet {
    let ports = (1..=n as u32)
        .map(|id| {
            let mac = Mac::for_port(OWNER, id);
            PortNet {
                id,
                subnet: "web".into(),
                kind: PortKind::Tap,
                mac,
                security: Some(PortSecurity {
                    macs: vec![mac.0],
                    ipv4: vec![Ipv4Addr::from(0x0a00_0000 + id)],
                    ipv6: vec![],
                }),
            }
        })
        .collect();
    HostNet {
        prefix: PREFIX.into(),
        owner: OWNER.into(),
        underlay: None,
        peers: vec![],
        tenants: vec![TenantNet {
            id: TENANT,
            subnets: vec![SubnetNet {
                name: "web".into(),
                vlan: 10,
                vni: 100,
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

fn empty() -> HostNet {
    HostNet {
        tenants: vec![],
        ..desired(0)
    }
}

fn write_batch(path: &Path, lines: &[String]) {
    let mut f = std::fs::File::create(path).expect("batch file");
    for l in lines {
        writeln!(f, "{l}").expect("write batch file");
    }
}

/// `ip -batch` files: create, delete one by one, and create with a group for the bulk delete.
fn batch_files(dir: &Path, n: usize) -> (PathBuf, PathBuf, PathBuf) {
    let br = bridge_name();
    let create = |group: bool| {
        let mut v = vec![format!("link add {br} type bridge")];
        if group {
            v.push(format!("link set {br} group {GROUP}"));
        }
        v.push(format!("link set {br} up"));
        for id in 1..=n as u32 {
            let t = tap_name(id);
            v.push(format!("tuntap add mode tap name {t}"));
            let g = if group {
                format!(" group {GROUP}")
            } else {
                String::new()
            };
            v.push(format!("link set {t} mtu {MTU} master {br} up{g}"));
        }
        v
    };
    let mut del: Vec<String> = (1..=n as u32)
        .map(|id| format!("link del {}", tap_name(id)))
        .collect();
    del.push(format!("link del {br}"));
    let paths = (
        dir.join(format!("create-{n}")),
        dir.join(format!("delete-{n}")),
        dir.join(format!("create-group-{n}")),
    );
    write_batch(&paths.0, &create(false));
    write_batch(&paths.1, &del);
    write_batch(&paths.2, &create(true));
    paths
}

// ---------------------------------------------------------------------------------------------
// One cycle (create, check, delete, check) per method.

struct Bench {
    ns: String,
    host: NetHost,
    dir: tempfile::TempDir,
    /// The filter's pins (its programs are reused by the legacy-TC reference).
    pin_dir: PathBuf,
}

impl Bench {
    /// Checks that the namespace holds the bridge and `n` taps in it, up (or only `lo` for 0).
    async fn check(&self, n: usize, what: &str) {
        let links = self.host.netlink().links().await.expect("list links");
        let br = links.iter().find(|l| l.name == bridge_name());
        let others: Vec<_> = links.iter().filter(|l| l.name != "lo").collect();
        if n == 0 {
            assert!(others.is_empty(), "{what}: links left: {others:?}");
            return;
        }
        let br = br.unwrap_or_else(|| panic!("{what}: no bridge"));
        let taps = links
            .iter()
            .filter(|l| l.name.starts_with(&format!("{PREFIX}t")))
            .filter(|l| l.master == Some(br.index) && l.up && l.mtu == MTU)
            .count();
        assert_eq!(taps, n, "{what}: taps in the bridge, up");
        assert_eq!(others.len(), n + 1, "{what}: links");
    }

    fn ip_batch(&self, file: &Path) -> Duration {
        let f = file.to_str().expect("utf-8 path");
        let t = Instant::now();
        sh(&["ip", "-n", &self.ns, "-batch", f]);
        t.elapsed()
    }

    async fn netdrv_cycle(&self, n: usize) -> (Duration, Duration) {
        let want = desired(n);
        let t = Instant::now();
        self.host.apply(&want).await.expect("netdrv create");
        let create = t.elapsed();
        self.check(n, "netdrv create").await;
        let filtered = self.host.filter().ports().expect("filter ports").len();
        assert_eq!(filtered, n, "ports with a filter");
        let t = Instant::now();
        self.host.apply(&empty()).await.expect("netdrv delete");
        let delete = t.elapsed();
        self.check(0, "netdrv delete").await;
        let filtered = self.host.filter().ports().expect("filter ports").len();
        assert_eq!(filtered, 0, "ports with a filter after delete");
        (create, delete)
    }

    async fn ip_cycle(&self, n: usize) -> (Duration, Duration) {
        let (create, delete, _) = batch_files(self.dir.path(), n);
        let c = self.ip_batch(&create);
        self.check(n, "ip-batch create").await;
        let d = self.ip_batch(&delete);
        self.check(0, "ip-batch delete").await;
        (c, d)
    }

    fn del_group(&self) -> Duration {
        let g = GROUP.to_string();
        let t = Instant::now();
        sh(&["ip", "-n", &self.ns, "link", "del", "group", &g]);
        t.elapsed()
    }

    /// Reference: plain links in one group, removed at once by `ip link del group G`.
    async fn group_delete(&self, n: usize) -> Duration {
        let (_, _, create) = batch_files(self.dir.path(), n);
        self.ip_batch(&create);
        self.check(n, "ip-batch create (group)").await;
        let d = self.del_group();
        self.check(0, "ip link del group").await;
        d
    }

    /// Reference: links made by netdrv (with their port filters attached), put in one group (not timed),
    /// removed at once by `ip link del group G`; then netdrv forgets the gone ports (not timed).
    async fn netdrv_group_delete(&self, n: usize) -> Duration {
        self.host.apply(&desired(n)).await.expect("netdrv create");
        self.check(n, "netdrv create").await;
        let mut lines: Vec<String> = (1..=n as u32)
            .map(|id| format!("link set {} group {GROUP}", tap_name(id)))
            .collect();
        lines.push(format!("link set {} group {GROUP}", bridge_name()));
        let file = self.dir.path().join(format!("group-{n}"));
        write_batch(&file, &lines);
        self.ip_batch(&file);
        let d = self.del_group();
        self.check(0, "ip link del group (netdrv links)").await;
        self.host.apply(&empty()).await.expect("netdrv forget");
        let filtered = self.host.filter().ports().expect("filter ports").len();
        assert_eq!(filtered, 0, "ports with a filter after the group delete");
        d
    }

    /// Reference: the baseline's links, then the same two programs attached the legacy TC way
    /// (clsact qdisc + cls_bpf direct-action filter per direction, by pin) with ONE `tc -batch`
    /// (all qdiscs, then all ingress, then all egress filters), then the baseline's one-by-one
    /// `ip -batch` delete. Returns (ip create, tc attach, delete).
    /// With `group`, the links are made in one group and deleted by `ip link del group G`.
    async fn legacy_tc_cycle(&self, n: usize, group: bool) -> (Duration, Duration, Duration) {
        let (create, delete, create_group) = batch_files(self.dir.path(), n);
        let c = self.ip_batch(if group { &create_group } else { &create });
        let taps: Vec<String> = (1..=n as u32).map(tap_name).collect();
        let mut lines: Vec<String> = taps
            .iter()
            .map(|t| format!("qdisc add dev {t} clsact"))
            .collect();
        for (dir, prog) in [("ingress", "port_ingress"), ("egress", "port_egress")] {
            let pin = self.pin_dir.join(prog);
            lines.extend(taps.iter().map(|t| {
                format!(
                    "filter add dev {t} {dir} bpf da object-pinned {}",
                    pin.display()
                )
            }));
        }
        let file = self.dir.path().join(format!("tc-{n}"));
        write_batch(&file, &lines);
        // nsenter, not `tc -n`: the latter remounts /sys and hides the pins under /sys/fs/bpf.
        let net = format!("--net=/run/netns/{}", self.ns);
        let f = file.to_str().expect("utf-8 path");
        let t = Instant::now();
        sh(&["nsenter", &net, "tc", "-batch", f]);
        let a = t.elapsed();
        self.check(n, "ip-batch create + tc attach").await;
        let last = tap_name(n as u32);
        for dir in ["ingress", "egress"] {
            let shown = sh(&["tc", "-n", &self.ns, "filter", "show", "dev", &last, dir]);
            assert!(
                shown.contains("port_"),
                "legacy TC: no program on {last} {dir}"
            );
        }
        let d = if group {
            self.del_group()
        } else {
            self.ip_batch(&delete)
        };
        self.check(0, "delete (clsact)").await;
        (c, a, d)
    }
}

/// Lets the kernel finish deferred work of the previous cycle.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

#[derive(Default)]
struct Cell {
    nd_create: Vec<f64>,
    nd_delete: Vec<f64>,
    ip_create: Vec<f64>,
    ip_delete: Vec<f64>,
    // References.
    group_delete: Vec<f64>,
    nd_group_delete: Vec<f64>,
    tc_ip_create: Vec<f64>,
    tc_attach: Vec<f64>,
    tc_delete: Vec<f64>,
    tc_group_delete: Vec<f64>,
}

// ---------------------------------------------------------------------------------------------
// Breakdown: apply's steps one by one (mirrors `NetHost::run` in src/host.rs).

#[derive(Default)]
struct Profile {
    /// step -> (count, total)
    steps: BTreeMap<&'static str, (usize, Duration)>,
}

impl Profile {
    async fn time<T>(&mut self, step: &'static str, f: impl Future<Output = T>) -> T {
        let t = Instant::now();
        let r = f.await;
        let e = self.steps.entry(step).or_default();
        e.0 += 1;
        e.1 += t.elapsed();
        r
    }

    fn total(&self) -> Duration {
        self.steps.values().map(|(_, d)| *d).sum()
    }

    fn print(&self, title: &str, wall: Duration) {
        println!("  {title}: wall {:.1} ms", ms(wall));
        println!(
            "    {:<44} {:>6} {:>10} {:>10} {:>6}",
            "step", "count", "total ms", "us/step", "share"
        );
        let total = self.total();
        let mut rows: Vec<_> = self.steps.iter().collect();
        rows.sort_by_key(|(_, (_, d))| std::cmp::Reverse(*d));
        for (step, (count, d)) in rows {
            println!(
                "    {:<44} {:>6} {:>10.1} {:>10.0} {:>5.1}%",
                step,
                count,
                ms(*d),
                d.as_secs_f64() * 1e6 / *count as f64,
                100.0 * d.as_secs_f64() / total.as_secs_f64()
            );
        }
    }
}

/// `apply`, step by step with a timer per kind of step. Same calls as `NetHost::apply`/`run`.
async fn profiled_apply(host: &NetHost, want: &HostNet, p: &mut Profile) {
    let observed = p
        .time("observe (links+fdb dump, filter prune)", host.observe())
        .await;
    let observed = observed.expect("observe");
    let t = Instant::now();
    let ops = plan::plan(want, &observed).expect("plan");
    let e = p.steps.entry("plan (pure)").or_default();
    e.0 += 1;
    e.1 += t.elapsed();
    let alias = names::alias(&want.owner);
    let nl = host.netlink();
    for op in &ops {
        match op {
            Op::CreateBridge { name } => {
                p.time("create bridge", nl.create_bridge(name))
                    .await
                    .expect("create bridge");
                p.time("set alias (index_of + set)", nl.set_alias(name, &alias))
                    .await
                    .expect("alias");
            }
            Op::CreateTap { name, mtu } => {
                p.time(
                    "create tap (thread+setns+ioctl, set mtu)",
                    nl.create_tap(name, *mtu),
                )
                .await
                .expect("create tap");
                p.time("set alias (index_of + set)", nl.set_alias(name, &alias))
                    .await
                    .expect("alias");
            }
            Op::SetMaster { name, master } => p
                .time(
                    "set master (2x index_of + set)",
                    nl.set_master(name, master),
                )
                .await
                .expect("master"),
            Op::SetUp { name } => p
                .time("set up (index_of + set)", nl.set_up(name))
                .await
                .expect("up"),
            Op::SetFilter { dev, cfg } => {
                let index = p
                    .time("set filter: index_of", nl.index_of(dev))
                    .await
                    .expect("index_of")
                    .expect("port exists");
                let f = host.filter();
                p.time("set filter: filter.set_port (2 attaches)", async {
                    f.set_port(index, dev, cfg)
                })
                .await
                .expect("set_port");
            }
            Op::Delete { name } => p
                .time("delete link (index_of + RTM_DELLINK)", nl.delete(name))
                .await
                .expect("delete"),
            Op::DropFilter { index } => {
                let f = host.filter();
                p.time("drop filter (unpin 2 links, map deletes)", async {
                    f.remove_port(*index)
                })
                .await
                .expect("remove_port")
            }
            other => panic!("step not expected in this bench: {other:?}"),
        }
    }
}

/// Primitives: `index_of` on existing links, `Netns::run` of nothing.
async fn primitives(b: &Bench, n: usize) -> (f64, f64, f64) {
    let nl = b.host.netlink();
    let t = Instant::now();
    for id in 1..=n as u32 {
        nl.index_of(&tap_name(id))
            .await
            .expect("index_of")
            .expect("tap exists");
    }
    let index_of = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let t = Instant::now();
    for id in 1..=n as u32 {
        nl.set_up(&tap_name(id)).await.expect("set up");
    }
    let set_up = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let netns = nl.netns().clone();
    let t = Instant::now();
    for _ in 0..n {
        netns.run(|| ()).expect("netns run");
    }
    let run = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    (index_of, set_up, run)
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
    let sizes = sizes();
    let profile = env_or("BENCH_PROFILE", 1) != 0;
    let pid = std::process::id();
    let ns = format!("{NS_PREFIX}{pid}-plumb");
    let pin_dir = PathBuf::from(format!("{PIN_PREFIX}{pid}-plumb"));
    add_netns(&ns);
    register(Resource::PinDir(pin_dir.clone()));
    let netns = Netns::named(&ns).expect("open netns");
    let filter: Arc<dyn VlanFilter> =
        Arc::new(EbpfFilter::open(&netns, &pin_dir).expect("open eBPF filter"));
    let dir = tempfile::Builder::new()
        .prefix(&format!("{SCRATCH_PREFIX}{pid}-"))
        .tempdir()
        .expect("scratch dir");
    register(Resource::Dir(dir.path().to_owned()));
    let b = Bench {
        host: NetHost::open(&netns, filter).expect("open NetHost"),
        ns,
        dir,
        pin_dir: pin_dir.clone(),
    };

    println!("netdrv port plumbing: NetHost::apply vs one `ip -batch`");
    println!(
        "host netns {}, pin dir {}, {runs} runs per cell (median), kernel {}",
        b.ns,
        pin_dir.display(),
        sh(&["uname", "-r"]).trim()
    );
    println!(
        "desired state: 1 tenant, 1 subnet (VLAN 10), no underlay (no VxLAN, MTU {MTU}), N taps \
         with port security (MAC + IPv4)"
    );

    // Warm-up (page cache, program pins, ip binary), not measured.
    b.netdrv_cycle(10).await;
    b.ip_cycle(10).await;
    b.group_delete(10).await;
    b.netdrv_group_delete(10).await;
    b.legacy_tc_cycle(10, false).await;
    b.legacy_tc_cycle(10, true).await;

    let mut cells: BTreeMap<usize, Cell> = BTreeMap::new();
    for &n in &sizes {
        let c = cells.entry(n).or_default();
        for r in 0..runs {
            let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            for m in order {
                settle();
                if m == 0 {
                    let (cr, de) = b.netdrv_cycle(n).await;
                    c.nd_create.push(ms(cr));
                    c.nd_delete.push(ms(de));
                } else {
                    let (cr, de) = b.ip_cycle(n).await;
                    c.ip_create.push(ms(cr));
                    c.ip_delete.push(ms(de));
                }
            }
            settle();
            c.group_delete.push(ms(b.group_delete(n).await));
            settle();
            c.nd_group_delete.push(ms(b.netdrv_group_delete(n).await));
            settle();
            let (ic, ta, de) = b.legacy_tc_cycle(n, false).await;
            c.tc_ip_create.push(ms(ic));
            c.tc_attach.push(ms(ta));
            c.tc_delete.push(ms(de));
            settle();
            let (_, _, de) = b.legacy_tc_cycle(n, true).await;
            c.tc_group_delete.push(ms(de));
            eprintln!(
                "N={n} run {}: netdrv create {:.0} ms delete {:.0} ms | ip-batch create {:.0} ms \
                 delete {:.0} ms | refs: group del {:.0} ms, netdrv links group del {:.0} ms, \
                 legacy tc attach {:.0} ms, delete with clsact {:.0} ms (group {:.0} ms)",
                r + 1,
                c.nd_create[r],
                c.nd_delete[r],
                c.ip_create[r],
                c.ip_delete[r],
                c.group_delete[r],
                c.nd_group_delete[r],
                c.tc_attach[r],
                c.tc_delete[r],
                c.tc_group_delete[r]
            );
        }
    }

    print_results(runs, &cells);
    if !profile {
        return;
    }
    println!();
    println!("Breakdown: apply's steps run one by one (as NetHost::run does), one run per N");
    for &n in &sizes {
        settle();
        let mut p = Profile::default();
        let t = Instant::now();
        profiled_apply(&b.host, &desired(n), &mut p).await;
        let wall = t.elapsed();
        b.check(n, "profiled create").await;
        println!("N={n}");
        p.print("create", wall);
        let (index_of, set_up, run) = primitives(&b, n).await;
        println!(
            "    primitives: index_of {index_of:.0} us, set up of an up link (index_of + set) \
             {set_up:.0} us, Netns::run(empty closure) {run:.0} us"
        );
        settle();
        let mut p = Profile::default();
        let t = Instant::now();
        profiled_apply(&b.host, &empty(), &mut p).await;
        let wall = t.elapsed();
        b.check(0, "profiled delete").await;
        p.print("delete", wall);
    }
}

/// One series of a [`Cell`].
type Column = fn(&Cell) -> &Vec<f64>;

fn print_results(runs: usize, cells: &BTreeMap<usize, Cell>) {
    let yes = |ok: bool| if ok { "yes" } else { "NO" };
    println!();
    println!("Medians (ms) of {runs} runs; targets: create ratio <= 2, delete ratio <= 1");
    println!(
        "{:>5} | {:>10} {:>10} {:>7} {:>4} | {:>10} {:>10} {:>7} {:>4}",
        "N", "nd create", "ip create", "ratio", "ok", "nd delete", "ip delete", "ratio", "ok"
    );
    for (n, c) in cells {
        let (nc, ic, nd, id) = (
            median(&c.nd_create),
            median(&c.ip_create),
            median(&c.nd_delete),
            median(&c.ip_delete),
        );
        println!(
            "{n:>5} | {nc:>10.1} {ic:>10.1} {:>7.2} {:>4} | {nd:>10.1} {id:>10.1} {:>7.2} {:>4}",
            nc / ic,
            yes(nc / ic <= 2.0),
            nd / id,
            yes(nd / id <= 1.0),
        );
    }

    println!();
    println!("References (medians, ms; not targets): what the same work costs other ways");
    println!("  tc create = ip-batch create + ONE tc -batch attaching the same two programs per");
    println!("  tap the legacy way (clsact + cls_bpf da); tc delete = ip-batch 1-by-1 delete of");
    println!("  those, tc grp del = the same deleted by `ip link del group`; group del = plain");
    println!(
        "  links deleted by `ip link del group`; nd group del = links made by netdrv (filters"
    );
    println!("  their port filters) deleted by `ip link del group`");
    println!(
        "{:>5} | {:>10} {:>10} {:>7} {:>10} {:>10} | {:>10} {:>12}",
        "N",
        "tc create",
        "(attach)",
        "vs ip",
        "tc delete",
        "tc grp del",
        "group del",
        "nd group del"
    );
    for (n, c) in cells {
        let tc: Vec<f64> = c
            .tc_ip_create
            .iter()
            .zip(&c.tc_attach)
            .map(|(a, b)| a + b)
            .collect();
        println!(
            "{n:>5} | {:>10.1} {:>10.1} {:>7.2} {:>10.1} {:>10.1} | {:>10.1} {:>12.1}",
            median(&tc),
            median(&c.tc_attach),
            median(&tc) / median(&c.ip_create),
            median(&c.tc_delete),
            median(&c.tc_group_delete),
            median(&c.group_delete),
            median(&c.nd_group_delete)
        );
    }
    println!("All runs (ms):");
    for (n, c) in cells {
        println!(
            "  N={n}: nd create [{}] ip create [{}] nd delete [{}] ip delete [{}]",
            fmt_runs(&c.nd_create),
            fmt_runs(&c.ip_create),
            fmt_runs(&c.nd_delete),
            fmt_runs(&c.ip_delete),
        );
        println!(
            "  N={n}: tc attach [{}] tc delete [{}] tc grp del [{}] group del [{}] nd group del [{}]",
            fmt_runs(&c.tc_attach),
            fmt_runs(&c.tc_delete),
            fmt_runs(&c.tc_group_delete),
            fmt_runs(&c.group_delete),
            fmt_runs(&c.nd_group_delete)
        );
    }

    println!();
    println!("Per-port cost (median ms / N); rows \"+K\": marginal cost (ms per added port)");
    let cols: [(&str, Column); 9] = [
        ("nd create", |c| &c.nd_create),
        ("ip create", |c| &c.ip_create),
        ("tc attach", |c| &c.tc_attach),
        ("nd delete", |c| &c.nd_delete),
        ("ip delete", |c| &c.ip_delete),
        ("tc delete", |c| &c.tc_delete),
        ("tc grp del", |c| &c.tc_group_delete),
        ("group del", |c| &c.group_delete),
        ("nd grp del", |c| &c.nd_group_delete),
    ];
    print!("{:>5} |", "N");
    for (name, _) in &cols {
        print!(" {name:>10}");
    }
    println!();
    let mut prev: Option<(usize, Vec<f64>)> = None;
    for (n, c) in cells {
        let m: Vec<f64> = cols.iter().map(|(_, f)| median(f(c))).collect();
        print!("{n:>5} |");
        for x in &m {
            print!(" {:>10.3}", x / *n as f64);
        }
        println!();
        if let Some((pn, pm)) = &prev {
            let d = (n - pn) as f64;
            print!("{:>5} |", format!("+{}", n - pn));
            for (x, p) in m.iter().zip(pm) {
                print!(" {:>10.3}", (x - p) / d);
            }
            println!();
        }
        prev = Some((*n, m));
    }
    if let (Some((n0, c0)), Some((n1, c1))) = (cells.iter().next(), cells.iter().next_back()) {
        if n0 != n1 {
            print!("growth: per-port cost at N={n1} / at N={n0} (1.00 = linear):");
            for (name, f) in &cols {
                let g = (median(f(c1)) / *n1 as f64) / (median(f(c0)) / *n0 as f64);
                print!(" {name} {g:.2},");
            }
            println!();
        }
    }
}
