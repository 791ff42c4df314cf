//! Privileged tests of the eBPF VLAN filter and port security (run as root:
//! `cargo test -p netdrv --test ebpf_filter -- --test-threads=1`).
//!
//! Each test builds its own lab (`common`): a "host" namespace with a bridge `br0` (no
//! vlan_filtering) and "VM" namespaces joined to it by veth pairs.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;

use aya::maps::{HashMap, Map, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use netdrv::filter::ebpf::{eui64_link_local, EbpfFilter};
use netdrv::filter::{PortCounters, PortFilter, VlanFilter};
use netdrv::Netns;

/// The `bpf` filters of one direction of a port: (program name, program id).
type Filters = Vec<(String, u32)>;

mod common;
use common::*;

impl Lab {
    fn open(&self) -> EbpfFilter {
        EbpfFilter::open(&self.netns, &self.pin_dir).expect("open filter")
    }

    /// The `bpf` filters on `port` (ingress, egress), as (name, program id), from
    /// `tc filter show`.
    fn tc_filters(&self, port: &str) -> (Filters, Filters) {
        let list = |hook: &str| {
            let out = sh(&["tc", "-n", &self.host, "filter", "show", "dev", port, hook]);
            out.lines()
                .filter(|l| l.contains(" handle "))
                .map(|l| {
                    let words: Vec<&str> = l.split_whitespace().collect();
                    let after = |w: &str| {
                        let i = words.iter().position(|x| *x == w).expect(l);
                        words[i + 1]
                    };
                    // "... bpf chain 0 handle 0x1 port_ingress direct-action ... id 42 ..."
                    let handle = words.iter().position(|x| *x == "handle").expect(l);
                    (words[handle + 2].to_owned(), after("id").parse().expect(l))
                })
                .collect::<Vec<_>>()
        };
        (list("ingress"), list("egress"))
    }

    /// The ids of the programs of the filters on `port` (ingress, egress).
    fn filter_program_ids(&self, port: &str) -> (Vec<u32>, Vec<u32>) {
        let (i, e) = self.tc_filters(port);
        let ids = |v: Filters| v.into_iter().map(|(_, id)| id).collect();
        (ids(i), ids(e))
    }

    /// The names of the programs of the filters on `port` (ingress, egress).
    fn filter_programs(&self, port: &str) -> (Vec<String>, Vec<String>) {
        let (i, e) = self.tc_filters(port);
        let names = |v: Filters| v.into_iter().map(|(n, _)| n).collect();
        (names(i), names(e))
    }

    /// Whether `port` has a clsact qdisc.
    fn has_clsact(&self, port: &str) -> bool {
        sh(&["tc", "-n", &self.host, "qdisc", "show", "dev", port]).contains("clsact")
    }

    /// The id of the program pinned as `name` in the pin directory.
    fn pinned_program_id(&self, name: &str) -> u32 {
        let prog = SchedClassifier::from_pin(self.pin_dir.join(name)).expect("pinned program");
        prog.info().expect("program info").id()
    }
}

fn counters(f: &EbpfFilter, vm: &Vm) -> PortCounters {
    f.counters(vm.ifindex).expect("counters")
}

#[test]
fn probe_accepts_this_kernel() {
    EbpfFilter::probe().expect("probe");
}

#[test]
fn two_vlan10_ports_ping_each_other() {
    let lab = Lab::new(2);
    let f = lab.open();
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    assert!(a.ping(b.ip), "VLAN 10 to VLAN 10");
    assert!(b.ping(a.ip), "VLAN 10 to VLAN 10, back");
}

#[test]
fn vlan20_port_cannot_reach_vlan10_port() {
    let lab = Lab::new(3);
    let f = lab.open();
    let (a, b, c) = (lab.vm(0), lab.vm(1), lab.vm(2));
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    f.set_port(c.ifindex, &c.port, &plain(20)).unwrap();
    assert!(a.ping(b.ip));
    let (a0, b0) = (counters(&f, a), counters(&f, b));

    assert!(!c.ping(a.ip), "VLAN 20 reached VLAN 10");
    // C's ARP requests are flooded with tag 20 and dropped where they would leave to A and B.
    let (a1, b1) = (counters(&f, a), counters(&f, b));
    assert!(a1.drop_vlan > a0.drop_vlan, "{a0:?} -> {a1:?}");
    assert!(b1.drop_vlan > b0.drop_vlan, "{b0:?} -> {b1:?}");
    assert_eq!(
        a1.rx_packets, a0.rx_packets,
        "A received something from VLAN 20"
    );
    assert!(
        counters(&f, c).tx_packets > 0,
        "C's frames entered the bridge"
    );
    assert!(!a.ping(c.ip), "VLAN 10 reached VLAN 20");
}

#[test]
fn port_without_configuration_passes_nothing() {
    let lab = Lab::new(2);
    let f = lab.open();
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    assert!(a.ping(b.ip));

    // B's programs stay attached but its configuration goes: both directions drop.
    let cfg_pin = lab.pin_dir.join("port_cfg");
    let data = MapData::from_pin(&cfg_pin).expect("pinned port_cfg");
    let mut cfg: HashMap<MapData, u32, [u8; 376]> =
        HashMap::try_from(Map::HashMap(data)).expect("port_cfg layout");
    cfg.remove(&b.ifindex).unwrap();
    assert_eq!(f.port(b.ifindex).unwrap(), None);
    let a0 = counters(&f, a);
    assert!(!a.ping(b.ip), "unconfigured port passed traffic");
    assert!(!b.ping(a.ip), "unconfigured port passed traffic");
    // Nothing from B entered the bridge: A received nothing.
    assert_eq!(counters(&f, a).rx_packets, a0.rx_packets);
    assert_eq!(
        lab.filter_programs(&b.port),
        (vec!["port_ingress".into()], vec!["port_egress".into()])
    );
}

#[test]
fn port_security_drops_frames_from_a_changed_mac() {
    let lab = Lab::new(2);
    let f = lab.open();
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &secured(a, 10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    assert!(a.ping(b.ip), "allowed MAC and address");
    let before = counters(&f, a);

    sh(&a.exec(&["ip", "link", "set", "eth0", "address", "02:99:00:00:00:ee"]));
    sh(&a.exec(&["ip", "neigh", "flush", "all"]));
    assert!(!a.ping(b.ip), "frames from a foreign MAC passed");
    let after = counters(&f, a);
    assert!(
        after.drop_security > before.drop_security,
        "{before:?} -> {after:?}"
    );

    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    assert!(a.ping(b.ip), "without port security the new MAC passes");
}

#[test]
fn port_security_drops_a_foreign_ipv4_source() {
    let lab = Lab::new(2);
    let f = lab.open();
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &secured(a, 10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    let spoofed = Ipv4Addr::new(10, 99, 0, 101);
    sh(&a.exec(&["ip", "addr", "add", &format!("{spoofed}/24"), "dev", "eth0"]));
    // A static neighbour: A sends no ARP at all, only IPv4 from the foreign source.
    let (b_ip, b_mac) = (b.ip.to_string(), mac_str(b.mac));
    sh(&a.exec(&[
        "ip", "neigh", "replace", &b_ip, "lladdr", &b_mac, "dev", "eth0",
    ]));
    assert!(a.ping_from(a.ip, b.ip), "allowed source");
    let before = counters(&f, a);

    assert!(!a.ping_from(spoofed, b.ip), "foreign IPv4 source passed");
    let after = counters(&f, a);
    assert!(
        after.drop_security >= before.drop_security + 3,
        "{before:?} -> {after:?}"
    );

    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    assert!(
        a.ping_from(spoofed, b.ip),
        "without port security any source passes"
    );
}

#[test]
fn port_security_drops_arp_with_a_foreign_sender_ip() {
    let lab = Lab::new(2);
    let f = lab.open();
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &secured(a, 10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    let foreign = Ipv4Addr::new(10, 99, 0, 101);
    sh(&a.exec(&["ip", "addr", "add", &format!("{foreign}/24"), "dev", "eth0"]));
    assert!(b.ping(a.ip), "allowed address");
    let before = counters(&f, a);

    // B asks who has .101; A's ARP reply (sender IP .101) is dropped, so nothing more is sent.
    assert!(
        !b.ping(foreign),
        "ARP reply with a foreign sender IP passed"
    );
    let after = counters(&f, a);
    assert!(
        after.drop_security > before.drop_security,
        "{before:?} -> {after:?}"
    );

    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    assert!(
        b.ping(foreign),
        "without port security the ARP reply passes"
    );
}

#[test]
fn ipv6_link_local_from_the_port_mac_passes_port_security() {
    let lab = Lab::with_ipv6(2);
    let f = lab.open();
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &secured(a, 10)).unwrap();
    f.set_port(b.ifindex, &b.port, &secured(b, 10)).unwrap();
    let b_ll = format!("{}%eth0", eui64_link_local(b.mac));
    let ping6 =
        |to: &str| ok(&a.exec(&["ping", "-6", "-q", "-c", "3", "-i", "0.2", "-W", "1", to]));
    assert!(ping6(&b_ll), "EUI-64 link-local to EUI-64 link-local");

    // A global address not in the port's list does not pass (B answers to it, A's request
    // never leaves).
    sh(&a.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:99::1/64",
        "dev",
        "eth0",
        "nodad",
    ]));
    sh(&b.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:99::2/64",
        "dev",
        "eth0",
        "nodad",
    ]));
    let before = counters(&f, a);
    assert!(!ping6("fd00:99::2"), "IPv6 source not in the list passed");
    assert!(counters(&f, a).drop_security > before.drop_security);

    let mut sec = a.security();
    sec.ipv6.push("fd00:99::1".parse().unwrap());
    f.set_port(
        a.ifindex,
        &a.port,
        &PortFilter {
            vlan: 10,
            security: Some(sec),
        },
    )
    .unwrap();
    let mut sec = b.security();
    sec.ipv6.push("fd00:99::2".parse().unwrap());
    f.set_port(
        b.ifindex,
        &b.port,
        &PortFilter {
            vlan: 10,
            security: Some(sec),
        },
    )
    .unwrap();
    assert!(ping6("fd00:99::2"), "listed IPv6 addresses pass");
}

// ---- Crafted frames through the loaded programs (BPF_PROG_TEST_RUN) ----

const PASS: u32 = u32::MAX; // TC_ACT_UNSPEC (-1): on to the next filter, i.e. pass
const SHOT: u32 = 2; // TC_ACT_SHOT

fn eth(dst: [u8; 6], src: [u8; 6], proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(payload);
    // Pad to the Ethernet minimum.
    f.resize(f.len().max(60), 0);
    f
}

fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 8, 0, 0]);
    p
}

fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&tpa.octets());
    p
}

fn ipv6_icmp(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 8, 58, 255];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[128, 0, 0, 0, 0, 0, 0, 0]);
    p
}

/// Runs the pinned program `prog` of `pin_dir` on `frame` as if it came through `ifindex`
/// (in the calling thread's namespace); returns the verdict.
fn run_program(pin_dir: &Path, prog: &str, ifindex: u32, frame: &[u8]) -> u32 {
    let prog = SchedClassifier::from_pin(pin_dir.join(prog)).expect("pinned program");
    // struct __sk_buff up to `ifindex` (offset 40); the other fields must stay zero.
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        ..TestRunOptions::default()
    };
    prog.test_run(opts).expect("test run").return_value
}

#[test]
fn port_security_verdicts_on_crafted_frames() {
    let lab = Lab::new(1);
    let f = lab.open();
    let a = lab.vm(0);
    let global: Ipv6Addr = "fd00:99::1".parse().unwrap();
    let mut sec = a.security();
    sec.ipv6.push(global);
    f.set_port(
        a.ifindex,
        &a.port,
        &PortFilter {
            vlan: 10,
            security: Some(sec),
        },
    )
    .unwrap();

    let bcast = [0xff; 6];
    let other_mac = [0x02, 0x99, 0, 0, 0, 0xee];
    let other_ip = Ipv4Addr::new(10, 99, 0, 101);
    let any = Ipv4Addr::UNSPECIFIED;
    let ll = eui64_link_local(a.mac);
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "IPv4 from the port's address",
            eth(bcast, a.mac, 0x0800, &ipv4_udp(a.ip, other_ip, 1, 2)),
            PASS,
        ),
        (
            "IPv4 from another address",
            eth(bcast, a.mac, 0x0800, &ipv4_udp(other_ip, a.ip, 1, 2)),
            SHOT,
        ),
        (
            "IPv4 from the port's address, foreign MAC",
            eth(bcast, other_mac, 0x0800, &ipv4_udp(a.ip, other_ip, 1, 2)),
            SHOT,
        ),
        (
            "DHCP discover",
            eth(
                bcast,
                a.mac,
                0x0800,
                &ipv4_udp(any, Ipv4Addr::BROADCAST, 68, 67),
            ),
            PASS,
        ),
        (
            "0.0.0.0 not to DHCP",
            eth(
                bcast,
                a.mac,
                0x0800,
                &ipv4_udp(any, Ipv4Addr::BROADCAST, 68, 53),
            ),
            SHOT,
        ),
        (
            "ARP request",
            eth(bcast, a.mac, 0x0806, &arp(1, a.mac, a.ip, other_ip)),
            PASS,
        ),
        (
            "ARP probe",
            eth(bcast, a.mac, 0x0806, &arp(1, a.mac, any, a.ip)),
            PASS,
        ),
        (
            "ARP with a foreign sender IP",
            eth(bcast, a.mac, 0x0806, &arp(2, a.mac, other_ip, a.ip)),
            SHOT,
        ),
        (
            "ARP with a sender MAC not the source",
            eth(bcast, a.mac, 0x0806, &arp(2, other_mac, a.ip, other_ip)),
            SHOT,
        ),
        (
            "IPv6 from the EUI-64 link-local",
            eth(bcast, a.mac, 0x86dd, &ipv6_icmp(ll, all_nodes)),
            PASS,
        ),
        (
            "IPv6 from the unspecified address",
            eth(
                bcast,
                a.mac,
                0x86dd,
                &ipv6_icmp(Ipv6Addr::UNSPECIFIED, all_nodes),
            ),
            PASS,
        ),
        (
            "IPv6 from a listed address",
            eth(bcast, a.mac, 0x86dd, &ipv6_icmp(global, all_nodes)),
            PASS,
        ),
        (
            "IPv6 from another link-local",
            eth(
                bcast,
                a.mac,
                0x86dd,
                &ipv6_icmp(eui64_link_local(other_mac), all_nodes),
            ),
            SHOT,
        ),
        (
            "IPv6 from another address",
            eth(
                bcast,
                a.mac,
                0x86dd,
                &ipv6_icmp("fd00:99::2".parse().unwrap(), all_nodes),
            ),
            SHOT,
        ),
        (
            "another ethertype (LLDP)",
            eth(bcast, a.mac, 0x88cc, &[0; 46]),
            SHOT,
        ),
    ];
    let shot = cases.iter().filter(|c| c.2 == SHOT).count() as u64;
    let passed = cases.len() as u64 - shot;
    let tagged = eth(bcast, a.mac, 0x8100, &[0, 10, 0x08, 0x06]);

    lab.quiesce(a);
    let before = counters(&f, a);
    let (pin_dir, ifindex) = (lab.pin_dir.clone(), a.ifindex);
    let results = lab.in_host(move || {
        let mut r: Vec<(String, u32, u32)> = cases
            .into_iter()
            .map(|(what, frame, want)| {
                (
                    what.to_owned(),
                    run_program(&pin_dir, "port_ingress", ifindex, &frame),
                    want,
                )
            })
            .collect();
        r.push((
            "802.1Q-tagged frame".into(),
            run_program(&pin_dir, "port_ingress", ifindex, &tagged),
            SHOT,
        ));
        r
    });
    let wrong: Vec<_> = results
        .iter()
        .filter(|(_, got, want)| got != want)
        .collect();
    assert!(
        wrong.is_empty(),
        "wrong verdicts (case, got, want): {wrong:?}"
    );

    let after = counters(&f, a);
    assert_eq!(after.drop_security - before.drop_security, shot);
    assert_eq!(after.drop_vlan - before.drop_vlan, 1, "the tagged frame");
    assert_eq!(after.tx_packets - before.tx_packets, passed);
}

#[test]
fn egress_verdicts_on_crafted_frames() {
    let lab = Lab::new(1);
    let f = lab.open();
    let a = lab.vm(0);
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    let payload = arp(1, [2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 99, 0, 9), a.ip);
    let reply = arp(2, [2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 99, 0, 9), a.ip);
    let tagged = |vid: u16| {
        let mut p = vid.to_be_bytes().to_vec();
        p.extend_from_slice(&0x0806u16.to_be_bytes());
        p.extend_from_slice(&payload);
        eth([0xff; 6], [2, 0, 0, 0, 0, 1], 0x8100, &p)
    };
    let cases = vec![
        ("tag of the port's VLAN", tagged(10), PASS),
        ("tag of another VLAN", tagged(20), SHOT),
        (
            "untagged",
            eth([0xff; 6], [2, 0, 0, 0, 0, 1], 0x0806, &payload),
            SHOT,
        ),
        (
            "untagged ARP reply (the bridge answering for a neighbour)",
            eth([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1], 0x0806, &reply),
            PASS,
        ),
        (
            "untagged IPv4",
            eth([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1], 0x0800, &[0x45; 40]),
            SHOT,
        ),
    ];
    lab.quiesce(a);
    let before = counters(&f, a);
    let (pin_dir, ifindex) = (lab.pin_dir.clone(), a.ifindex);
    let results = lab.in_host(move || {
        cases
            .into_iter()
            .map(|(what, frame, want)| {
                let got = run_program(&pin_dir, "port_egress", ifindex, &frame);
                (what, got, want)
            })
            .collect::<Vec<_>>()
    });
    let wrong: Vec<_> = results
        .iter()
        .filter(|(_, got, want)| got != want)
        .collect();
    assert!(
        wrong.is_empty(),
        "wrong verdicts (case, got, want): {wrong:?}"
    );
    let after = counters(&f, a);
    assert_eq!(after.drop_vlan - before.drop_vlan, 3);
    assert_eq!(after.rx_packets - before.rx_packets, 2);
}

#[test]
fn counters_grow_with_traffic() {
    let lab = Lab::new(2);
    let f = lab.open();
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    let (a0, b0) = (counters(&f, a), counters(&f, b));
    assert!(a.ping(b.ip));
    let (a1, b1) = (counters(&f, a), counters(&f, b));
    // Three echo requests out of A (plus ARP), three replies back; 98-byte frames. (The
    // bridge's own IGMP reports may add untagged frames, dropped as drop_vlan.)
    for (what, c0, c1) in [("A", a0, a1), ("B", b0, b1)] {
        assert!(
            c1.tx_packets >= c0.tx_packets + 3,
            "{what}: {c0:?} -> {c1:?}"
        );
        assert!(
            c1.rx_packets >= c0.rx_packets + 3,
            "{what}: {c0:?} -> {c1:?}"
        );
        assert!(
            c1.tx_bytes >= c0.tx_bytes + 3 * 98,
            "{what}: {c0:?} -> {c1:?}"
        );
        assert!(
            c1.rx_bytes >= c0.rx_bytes + 3 * 98,
            "{what}: {c0:?} -> {c1:?}"
        );
        assert_eq!(c1.drop_security, 0, "{what}");
    }
    assert!(f.counters(999_999).is_err(), "unknown port");
}

#[test]
fn takeover_keeps_traffic_flowing_and_reuses_the_pins() {
    let lab = Lab::new(3);
    let (a, b, c) = (lab.vm(0), lab.vm(1), lab.vm(2));
    {
        let f = lab.open();
        f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
        f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
        f.set_port(c.ifindex, &c.port, &secured(c, 20)).unwrap();
        assert!(a.ping(b.ip));
        assert!(!a.ping(c.ip));
    }
    let ids_before = lab.filter_program_ids(&a.port);
    // No EbpfFilter exists: the filters on the devices keep filtering.
    assert!(a.ping(b.ip), "traffic stopped without an EbpfFilter");
    assert!(!a.ping(c.ip), "VLANs leak without an EbpfFilter");

    let f = lab.open();
    let mut want = vec![a.ifindex, b.ifindex, c.ifindex];
    want.sort_unstable();
    assert_eq!(f.ports().unwrap(), want);
    assert_eq!(f.port(c.ifindex).unwrap(), Some(secured(c, 20)));
    assert!(
        counters(&f, a).tx_packets >= 6,
        "counters survive the takeover"
    );
    // Still one filter per direction, running the program this open loaded and pinned: the
    // filters were switched to it, not duplicated.
    let now = (
        vec![lab.pinned_program_id("port_ingress")],
        vec![lab.pinned_program_id("port_egress")],
    );
    assert_ne!(now, ids_before, "the filters still run the old programs");
    for vm in [a, b, c] {
        assert_eq!(lab.filter_program_ids(&vm.port), now, "{}", vm.port);
    }

    // Live reconfiguration through the new filter.
    f.set_port(c.ifindex, &c.port, &secured(c, 10)).unwrap();
    assert!(a.ping(c.ip), "C moved to VLAN 10");
    f.set_port(b.ifindex, &b.port, &plain(20)).unwrap();
    assert!(!a.ping(b.ip), "B moved to VLAN 20");

    f.remove_all().unwrap();
    assert!(!lab.pin_dir.exists(), "pins left behind");
    for vm in [a, b, c] {
        assert_eq!(
            lab.filter_programs(&vm.port),
            (vec![], vec![]),
            "{}",
            vm.port
        );
    }
    // Nothing filters any more: the plain bridge joins everyone.
    assert!(a.ping(b.ip));
    assert!(
        f.set_port(a.ifindex, &a.port, &plain(10)).is_err(),
        "usable after remove_all"
    );
}

/// Set in the child process of `sigkilled_owner_leaves_ports_filtered_and_a_new_open_takes_over`:
/// "<host netns> <pin dir> <port>:<ifindex>:<vlan> ...".
const OWNER_ENV: &str = "VPCD_EBPF_TEST_OWNER";

/// The child: opens the filter, configures the ports, then waits to be killed.
fn run_owner(spec: &str) -> ! {
    let mut words = spec.split_whitespace();
    let netns = Netns::named(words.next().unwrap()).unwrap();
    let f = EbpfFilter::open(&netns, Path::new(words.next().unwrap())).unwrap();
    for port in words {
        let v: Vec<&str> = port.split(':').collect();
        let vlan = v[2].parse().unwrap();
        f.set_port(v[1].parse().unwrap(), v[0], &plain(vlan))
            .unwrap();
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

#[test]
fn sigkilled_owner_leaves_ports_filtered_and_a_new_open_takes_over() {
    if let Ok(spec) = std::env::var(OWNER_ENV) {
        run_owner(&spec);
    }
    let lab = Lab::new(3);
    let (a, b, c) = (lab.vm(0), lab.vm(1), lab.vm(2));
    let spec = format!(
        "{} {} {}:{}:10 {}:{}:10 {}:{}:20",
        lab.host,
        lab.pin_dir.display(),
        a.port,
        a.ifindex,
        b.port,
        b.ifindex,
        c.port,
        c.ifindex
    );
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "sigkilled_owner_leaves_ports_filtered_and_a_new_open_takes_over",
            "--exact",
            "--test-threads=1",
        ])
        .env(OWNER_ENV, spec)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn the owner process");
    // Ready when the last filter is attached (egress is attached first, then ingress).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while lab.filter_programs(&c.port).0.is_empty() {
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("the owner process did not configure the ports");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert!(a.ping(b.ip), "traffic stopped with the owner");
    assert!(!a.ping(c.ip), "VLANs leak without the owner");
    let f = lab.open();
    let mut want = vec![a.ifindex, b.ifindex, c.ifindex];
    want.sort_unstable();
    assert_eq!(f.ports().unwrap(), want);
    f.set_port(c.ifindex, &c.port, &plain(10)).unwrap();
    assert!(a.ping(c.ip), "C moved to VLAN 10 by the new owner");
    f.remove_all().unwrap();
}

/// The ifindex of `dev` in namespace `ns`.
fn ifindex(ns: &str, dev: &str) -> u32 {
    let path = format!("/sys/class/net/{dev}/ifindex");
    sh(&["ip", "netns", "exec", ns, "cat", &path])
        .trim()
        .parse()
        .expect("ifindex")
}

#[test]
fn vxlan_uplink_is_an_access_port_of_its_vlan() {
    // Two hosts joined by a veth underlay; on each, br0 with a VxLAN uplink (VNI 100).
    let h1 = Lab::build(2, false, 0);
    let h2 = Lab::build(1, false, 10);
    sh(&[
        "ip", "-n", &h1.host, "link", "add", "ul", "type", "veth", "peer", "name", "ul", "netns",
        &h2.host,
    ]);
    let filters = [
        (&h1, "192.168.99.1", "192.168.99.2"),
        (&h2, "192.168.99.2", "192.168.99.1"),
    ]
    .map(|(lab, local, remote)| {
        let h = lab.host.as_str();
        sh(&[
            "ip",
            "-n",
            h,
            "addr",
            "add",
            &format!("{local}/24"),
            "dev",
            "ul",
        ]);
        sh(&["ip", "-n", h, "link", "set", "ul", "up"]);
        sh(&[
            "ip", "-n", h, "link", "add", "vx0", "type", "vxlan", "id", "100", "local", local,
            "remote", remote, "dstport", "4789",
        ]);
        sh(&["ip", "-n", h, "link", "set", "vx0", "master", "br0", "up"]);
        let f = lab.open();
        f.set_port(ifindex(h, "vx0"), "vx0", &plain(10)).unwrap();
        f
    });
    let (a, c, b) = (h1.vm(0), h1.vm(1), h2.vm(0));
    filters[0].set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    filters[0].set_port(c.ifindex, &c.port, &plain(20)).unwrap();
    filters[1].set_port(b.ifindex, &b.port, &plain(10)).unwrap();

    // Frames leave through the uplink untagged (the far side drops tagged ones) and get the
    // far uplink's VLAN on arrival.
    assert!(a.ping(b.ip), "VLAN 10 across the VxLAN uplinks");
    let vx = filters[1].counters(ifindex(&h2.host, "vx0")).unwrap();
    assert!(vx.tx_packets >= 3 && vx.rx_packets >= 3, "{vx:?}");
    assert!(!c.ping(b.ip), "VLAN 20 reached the VLAN 10 uplink");
}

#[test]
fn remove_port_detaches_and_is_idempotent() {
    let lab = Lab::new(2);
    let f = lab.open();
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(20)).unwrap();
    assert!(!a.ping(b.ip));
    f.remove_port(b.ifindex).unwrap();
    f.remove_port(b.ifindex).unwrap();
    assert_eq!(lab.filter_programs(&b.port), (vec![], vec![]));
    assert_eq!(f.ports().unwrap(), vec![a.ifindex]);
    assert!(f.counters(b.ifindex).is_err());
    assert!(!lab.has_clsact(&b.port), "the qdisc of our filters stayed");
    // B is a plain bridge port now and A still tags: B sees A's frames tagged, A drops B's.
    assert!(!a.ping(b.ip));
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    assert!(a.ping(b.ip), "B attached again");
}

#[test]
fn deleted_port_device_is_pruned() {
    let lab = Lab::new(2);
    let f = lab.open();
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    sh(&["ip", "-n", &lab.host, "link", "del", &b.port]);
    assert_eq!(
        f.ports().unwrap(),
        vec![a.ifindex],
        "the gone port is listed"
    );
    assert!(f.counters(b.ifindex).is_err());
    // A new open finds nothing stale either.
    drop(f);
    let f = lab.open();
    assert_eq!(f.ports().unwrap(), vec![a.ifindex]);
}

#[test]
fn invalid_configuration_is_refused_and_names_the_port() {
    let lab = Lab::new(1);
    let f = lab.open();
    let a = lab.vm(0);
    let err = f.set_port(a.ifindex, &a.port, &plain(4095)).unwrap_err();
    assert!(err.to_string().contains(&a.port), "{err}");
    let mut sec = a.security();
    sec.macs = vec![a.mac; 9];
    let err = f
        .set_port(
            a.ifindex,
            &a.port,
            &PortFilter {
                vlan: 10,
                security: Some(sec),
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, netdrv::Error::Invalid(ref m) if m.contains(&a.port)),
        "{err}"
    );
    assert_eq!(f.ports().unwrap(), Vec::<u32>::new());
    assert_eq!(lab.filter_programs(&a.port), (vec![], vec![]));
}

#[test]
fn set_port_on_a_missing_device_fails_and_leaves_nothing() {
    let lab = Lab::new(0);
    let f = lab.open();
    assert!(f.set_port(4242, "nosuchdev", &plain(10)).is_err());
    assert_eq!(f.ports().unwrap(), Vec::<u32>::new());
    assert!(f.counters(4242).is_err());
}

/// How many loaded programs are named `port_ingress` (all instances on this machine).
fn loaded_port_ingress() -> usize {
    sh(&["bpftool", "prog", "show"])
        .lines()
        .filter(|l| l.contains("port_ingress"))
        .count()
}

/// Whether the program `id` is still loaded, polled for a while: the kernel frees a replaced
/// program after an RCU grace period.
fn program_freed(id: u32) -> bool {
    for _ in 0..100 {
        if !ok(&["bpftool", "prog", "show", "id", &id.to_string()]) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

#[test]
fn repeated_takeovers_leak_no_programs() {
    let lab = Lab::new(2);
    let (a, b) = (lab.vm(0), lab.vm(1));
    let f = lab.open();
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    drop(f);
    let mut old = Vec::new();
    let first = {
        let f = lab.open();
        old.push(lab.filter_program_ids(&a.port));
        drop(f);
        loaded_port_ingress()
    };
    for _ in 0..4 {
        let f = lab.open();
        assert!(a.ping(b.ip), "traffic after a takeover");
        old.push(lab.filter_program_ids(&a.port));
        drop(f);
    }
    let last = old.pop().unwrap();
    for (ingress, egress) in old {
        for id in ingress.into_iter().chain(egress) {
            assert!(
                program_freed(id),
                "program {id} of an earlier open is still loaded"
            );
        }
    }
    assert_eq!(
        lab.filter_program_ids(&b.port),
        last,
        "one program set for all ports"
    );
    assert!(
        loaded_port_ingress() <= first,
        "port_ingress programs grew from {first} to {}",
        loaded_port_ingress()
    );
}

#[test]
fn remove_port_keeps_the_qdisc_of_other_filters() {
    let lab = Lab::new(2);
    let f = lab.open();
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    sh(&[
        "tc", "-n", &lab.host, "filter", "add", "dev", &b.port, "ingress", "prio", "7", "protocol",
        "all", "u32", "match", "u32", "0", "0",
    ]);
    f.remove_port(b.ifindex).unwrap();
    assert_eq!(lab.filter_programs(&b.port), (vec![], vec![]));
    assert!(
        lab.has_clsact(&b.port),
        "the qdisc went with another filter on it"
    );
    let rest = sh(&[
        "tc", "-n", &lab.host, "filter", "show", "dev", &b.port, "ingress",
    ]);
    assert!(rest.contains("u32"), "{rest}");
    // A's port lost both its filters and its qdisc.
    f.remove_port(a.ifindex).unwrap();
    assert!(!lab.has_clsact(&a.port));
    assert!(a.ping(b.ip), "plain bridge again");
}

#[test]
fn tcx_links_of_an_earlier_version_are_migrated() {
    use aya::programs::links::FdLink;
    use aya::programs::tc::TcAttachOptions;
    use aya::programs::{LinkOrder, TcAttachType};

    let lab = Lab::new(2);
    let (a, b) = (lab.vm(0), lab.vm(1));
    let f = lab.open();
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    drop(f);
    // What an earlier version left: the same configuration, pinned TCX links, no qdisc.
    std::fs::create_dir_all(lab.pin_dir.join("links")).unwrap();
    for vm in [a, b] {
        sh(&[
            "tc", "-n", &lab.host, "qdisc", "del", "dev", &vm.port, "clsact",
        ]);
        for (prog, t, dir) in [
            ("port_egress", TcAttachType::Egress, "egress"),
            ("port_ingress", TcAttachType::Ingress, "ingress"),
        ] {
            let (pin_dir, port) = (lab.pin_dir.clone(), vm.port.clone());
            let link_pin = lab.pin_dir.join(format!("links/{}-{dir}", vm.ifindex));
            lab.in_host(move || {
                let mut p = SchedClassifier::from_pin(pin_dir.join(prog)).unwrap();
                let opts = TcAttachOptions::TcxOrder(LinkOrder::first());
                let id = p.attach_with_options(&port, t, opts).unwrap();
                let link = FdLink::try_from(p.take_link(id).unwrap()).unwrap();
                link.pin(link_pin).unwrap();
            });
        }
    }
    assert!(a.ping(b.ip), "the TCX links filter");
    let f = lab.open();
    assert!(!lab.pin_dir.join("links").exists(), "link pins left");
    for vm in [a, b] {
        assert_eq!(
            lab.filter_programs(&vm.port),
            (vec!["port_ingress".into()], vec!["port_egress".into()])
        );
        let port = vm.port.clone();
        let tcx = lab.in_host(move || {
            [TcAttachType::Ingress, TcAttachType::Egress]
                .map(|t| SchedClassifier::query_tcx(&port, t).unwrap().1.len())
        });
        assert_eq!(tcx, [0, 0], "TCX links still attached to {}", vm.port);
    }
    assert!(a.ping(b.ip), "traffic after the migration");
    f.set_port(b.ifindex, &b.port, &plain(20)).unwrap();
    assert!(!a.ping(b.ip), "B moved to VLAN 20");
}
