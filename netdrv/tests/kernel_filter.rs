//! Tests of the kernel bridge VLAN filter (`filter::kernel`), run as root.
//!
//! This project's CI kernel has no bridge VLAN filtering, so the tests that need it are
//! `#[ignore]`d here and run inside a TCG guest with the Debian kernel (which has it) by
//! [`kernel_filter_tests_pass_in_a_guest_with_bridge_vlan_filtering`]: that test boots
//! `images/run-in-guest.sh` with this very test binary and `--ignored`, and fails unless every
//! one of them passes there. Each test builds its own lab (`common`).

use std::net::Ipv4Addr;
use std::process::Command;

use netdrv::filter::kernel::{KernelFilter, VLAN_PVID, VLAN_UNTAGGED};
use netdrv::filter::{FilterKind, PortFilter, VlanFilter};

mod common;
use common::*;

/// The tests below that run in the guest (kept in step with the `#[ignore]`d tests).
const GUEST_TESTS: usize = 9;

#[test]
fn kernel_filter_tests_pass_in_a_guest_with_bridge_vlan_filtering() {
    let exe = std::env::current_exe().expect("test binary");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../images/run-in-guest.sh");
    let out = Command::new(script)
        .args(["-m", "bridge veth vxlan sch_ingress cls_bpf 8021q"])
        .args(["-b", "ip bridge ping"])
        .args(["-t", "900", "--"])
        .arg(&exe)
        .args(["--ignored", "--test-threads=1"])
        .output()
        .expect("run images/run-in-guest.sh");
    let console = String::from_utf8_lossy(&out.stdout);
    println!("{console}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "tests in the guest: {}", out.status);
    let want = format!("test result: ok. {GUEST_TESTS} passed; 0 failed");
    assert!(
        console.contains(&want),
        "expected {want:?} in the guest's output"
    );
}

fn kernel_lab(n_vms: usize) -> (Lab, KernelFilter) {
    let lab = Lab::new(n_vms);
    let f = KernelFilter::open(&lab.netns, &lab.pin_dir).expect("open kernel filter");
    (lab, f)
}

fn plain(vlan: u16) -> PortFilter {
    PortFilter {
        vlan,
        security: None,
    }
}

const ACCESS: u16 = VLAN_PVID | VLAN_UNTAGGED;

#[test]
#[ignore = "needs bridge VLAN filtering: runs in a guest (see the first test)"]
fn probe_chooses_the_kernel_bridge() {
    assert!(KernelFilter::probe().expect("probe"));
    assert_eq!(netdrv::filter::probe().expect("probe"), FilterKind::Kernel);
}

#[test]
#[ignore = "needs bridge VLAN filtering: runs in a guest (see the first test)"]
fn access_ports_of_one_vlan_talk_and_of_another_do_not() {
    let (lab, f) = kernel_lab(3);
    for (i, vlan) in [(0, 10), (1, 10), (2, 20)] {
        let vm = lab.vm(i);
        f.set_port(vm.ifindex, &vm.port, &plain(vlan))
            .expect("set port");
    }
    // The bridge filters now, and the ports are untagged pvid members of their VLAN only.
    let filtering = sh(&lab.exec_host(&["cat", "/sys/class/net/br0/bridge/vlan_filtering"]));
    assert_eq!(filtering.trim(), "1");
    assert_eq!(f.port_vlans(lab.vm(0).ifindex).unwrap(), vec![(10, ACCESS)]);
    assert_eq!(f.port_vlans(lab.vm(2).ifindex).unwrap(), vec![(20, ACCESS)]);
    assert!(lab.vm(0).ping(lab.vm(1).ip), "same VLAN");
    assert!(!lab.vm(0).ping(lab.vm(2).ip), "VLAN 10 reached VLAN 20");

    // Moved live: the old VLAN goes, the new one comes.
    let vm2 = lab.vm(2);
    f.set_port(vm2.ifindex, &vm2.port, &plain(10)).unwrap();
    assert_eq!(f.port_vlans(vm2.ifindex).unwrap(), vec![(10, ACCESS)]);
    assert!(lab.vm(0).ping(vm2.ip), "after the move to VLAN 10");
    let c = f.counters(vm2.ifindex).unwrap();
    assert!(c.tx_packets > 0 && c.rx_packets > 0, "{c:?}");
}

#[test]
#[ignore = "needs bridge VLAN filtering: runs in a guest (see the first test)"]
fn ports_without_configuration_pass_nothing() {
    let (lab, f) = kernel_lab(3);
    let (a, b, c) = (lab.vm(0), lab.vm(1), lab.vm(2));
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    // c joined br0 before the filter prepared it (default pvid 1): set_port of the others
    // turned the default off, and c has no VLAN.
    assert_eq!(f.port_vlans(c.ifindex).unwrap(), vec![]);
    assert!(!a.ping(c.ip), "an unconfigured port passed traffic");
    assert!(a.ping(b.ip));
    // Removing a port takes its VLAN and its programs: nothing passes, and again is fine.
    f.remove_port(b.ifindex).unwrap();
    assert_eq!(f.port_vlans(b.ifindex).unwrap(), vec![]);
    assert!(!f.ports().unwrap().contains(&b.ifindex));
    assert!(!a.ping(b.ip), "a removed port passed traffic");
    f.remove_port(b.ifindex).unwrap();
}

#[test]
#[ignore = "needs bridge VLAN filtering: runs in a guest (see the first test)"]
fn port_security_drops_a_foreign_source_and_counts_it() {
    let (lab, f) = kernel_lab(2);
    let (a, b) = (lab.vm(0), lab.vm(1));
    let secured = PortFilter {
        vlan: 10,
        security: Some(a.security()),
    };
    f.set_port(a.ifindex, &a.port, &secured).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    assert!(a.ping(b.ip), "own address");
    let foreign = Ipv4Addr::new(10, 99, 0, 77);
    sh(&a.exec(&["ip", "addr", "add", "10.99.0.77/24", "dev", "eth0"]));
    let before = f.counters(a.ifindex).unwrap().drop_security;
    assert!(!a.ping_from(foreign, b.ip), "a foreign source passed");
    assert!(f.counters(a.ifindex).unwrap().drop_security > before);
    // Port security off: it passes.
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    assert!(a.ping_from(foreign, b.ip), "with port security off");
}

#[test]
#[ignore = "needs bridge VLAN filtering: runs in a guest (see the first test)"]
fn tagged_frames_from_a_port_are_dropped_even_of_its_own_vlan() {
    // The bridge alone would take a frame tagged with a VLAN the port is a member of; an
    // access port must not let a VM pick its VLAN.
    let (lab, f) = kernel_lab(2);
    let (a, b) = (lab.vm(0), lab.vm(1));
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(b.ifindex, &b.port, &plain(10)).unwrap();
    for (vm, ip) in [(a, "10.98.0.1/24"), (b, "10.98.0.2/24")] {
        sh(&vm.exec(&[
            "ip", "link", "add", "link", "eth0", "name", "eth0.10", "type", "vlan", "id", "10",
        ]));
        sh(&vm.exec(&["ip", "addr", "add", ip, "dev", "eth0.10"]));
        sh(&vm.exec(&["ip", "link", "set", "eth0.10", "up"]));
    }
    let before = f.counters(a.ifindex).unwrap().drop_vlan;
    assert!(
        !a.ping(Ipv4Addr::new(10, 98, 0, 2)),
        "a tagged frame passed"
    );
    assert!(f.counters(a.ifindex).unwrap().drop_vlan > before);
    assert!(a.ping(b.ip), "untagged traffic still passes");
}

#[test]
#[ignore = "needs bridge VLAN filtering: runs in a guest (see the first test)"]
fn a_port_in_no_bridge_or_gone_is_refused_and_nothing_is_left() {
    let (lab, f) = kernel_lab(1);
    let a = lab.vm(0);
    sh(&lab.exec_host(&["ip", "link", "set", &a.port, "nomaster"]));
    let err = f.set_port(a.ifindex, &a.port, &plain(10)).unwrap_err();
    assert!(err.to_string().contains(&a.port), "{err}");
    assert!(f.ports().unwrap().is_empty());
    let err = f.set_port(a.ifindex, &a.port, &plain(0)).unwrap_err();
    assert!(err.to_string().contains("VLAN 0"), "{err}");
    let err = f.set_port(999_999, "gone0", &plain(10)).unwrap_err();
    assert!(err.to_string().contains("gone0"), "{err}");
    assert!(f.ports().unwrap().is_empty());
}

#[test]
#[ignore = "needs bridge VLAN filtering: runs in a guest (see the first test)"]
fn vxlan_uplink_is_an_access_port_and_frames_leave_untagged() {
    // Two "hosts" (the lab's host and a second bridge namespace) joined by VxLAN over an
    // underlay veth; a VM on each side in VLAN 10 (host-local tags: 10 here, 30 there).
    let (lab, f) = kernel_lab(1);
    let (lab2, f2) = {
        let l = Lab::build(1, false, 1);
        let f = KernelFilter::open(&l.netns, &l.pin_dir).expect("open");
        (l, f)
    };
    sh(&lab.exec_host(&[
        "ip", "link", "add", "u0", "type", "veth", "peer", "name", "u0", "netns", &lab2.host,
    ]));
    for (l, ip, peer) in [
        (&lab, "192.0.2.1", "192.0.2.2"),
        (&lab2, "192.0.2.2", "192.0.2.1"),
    ] {
        sh(&l.exec_host(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "u0"]));
        sh(&l.exec_host(&["ip", "link", "set", "u0", "up"]));
        sh(&l.exec_host(&[
            "ip",
            "link",
            "add",
            "vx42",
            "type",
            "vxlan",
            "id",
            "42",
            "local",
            ip,
            "dstport",
            "4789",
            "nolearning",
        ]));
        sh(&l.exec_host(&["ip", "link", "set", "vx42", "master", "br0", "up"]));
        sh(&l.exec_host(&[
            "bridge",
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "vx42",
            "dst",
            peer,
        ]));
    }
    let vx = |l: &Lab| {
        sh(&l.exec_host(&["cat", "/sys/class/net/vx42/ifindex"]))
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    let (a, b) = (lab.vm(0), lab2.vm(0));
    f.set_port(a.ifindex, &a.port, &plain(10)).unwrap();
    f.set_port(vx(&lab), "vx42", &plain(10)).unwrap();
    f2.set_port(b.ifindex, &b.port, &plain(30)).unwrap();
    f2.set_port(vx(&lab2), "vx42", &plain(30)).unwrap();
    assert!(a.ping(b.ip), "across VxLAN");
    // Untagged on the wire: a frame that came out of VxLAN tagged (10) would be dropped by the
    // other side's uplink (drop_vlan), whose VLAN is 30.
    let c = f2.counters(vx(&lab2)).unwrap();
    assert!(c.tx_packets > 0, "{c:?}");
    assert_eq!(c.drop_vlan, 0, "{c:?}");
}

#[test]
#[ignore = "needs bridge VLAN filtering: runs in a guest (see the first test)"]
fn nethost_builds_a_tenant_on_a_vlan_filtering_bridge_and_removes_it() {
    use netdrv::ipam::Mac;
    use netdrv::model::{HostNet, PortKind, PortNet, SubnetNet, TenantNet};
    use netdrv::NetHost;
    use std::path::PathBuf;
    use std::sync::Arc;

    // The lab's host namespace without its own bridge and ports; three namespaces for ports.
    let lab = Lab::build(3, false, 0);
    sh(&lab.exec_host(&["ip", "link", "del", "br0"]));
    for vm in &lab.vms {
        sh(&lab.exec_host(&["ip", "link", "del", &vm.port])); // and eth0 with it
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let filter = Arc::new(KernelFilter::open(&lab.netns, &lab.pin_dir).expect("open"));
    let host = {
        let _in_rt = rt.enter();
        NetHost::open(&lab.netns, filter.clone()).expect("net host")
    };
    let port = |i: usize, subnet: &str| {
        let vm = lab.vm(i);
        PortNet {
            id: i as u32 + 1,
            subnet: subnet.into(),
            kind: PortKind::Veth {
                netns: PathBuf::from("/run/netns").join(&vm.ns),
                ifname: "eth1".into(),
                address: Some((vm.ip, 24)),
            },
            mac: Mac(vm.mac),
            security: Some(vm.security()),
        }
    };
    let subnet = |name: &str, vlan, vni| SubnetNet {
        name: name.into(),
        vlan,
        vni,
    };
    let mut desired = HostNet {
        prefix: "kf".into(),
        owner: "kernel-filter-test".into(),
        underlay: None,
        peers: vec![],
        tenants: vec![TenantNet {
            id: 7,
            subnets: vec![subnet("web", 10, 1010), subnet("db", 20, 1020)],
            ports: vec![port(0, "web"), port(1, "web"), port(2, "db")],
        }],
        remote_macs: vec![],
        externals: vec![],
        floods: vec![],
        vxlan_port_learning: true,
        neighbours: Vec::new(),
    };
    rt.block_on(host.apply(&desired)).expect("apply");
    let bridge = netdrv::names::bridge("kf", 7);
    let filtering = sh(&lab.exec_host(&[
        "cat",
        &format!("/sys/class/net/{bridge}/bridge/vlan_filtering"),
    ]));
    assert_eq!(filtering.trim(), "1", "bridge {bridge}");
    let ping = |from: usize, to: usize| {
        ok(&lab.vm(from).exec(&[
            "ping",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "eth1",
            &lab.vm(to).ip.to_string(),
        ]))
    };
    assert!(ping(0, 1), "web to web");
    assert!(!ping(0, 2), "web reached db without a router");
    assert_eq!(filter.ports().unwrap().len(), 3);

    // Applying again only rewrites the port filters (the plan always does), which leaves the
    // VLANs as they are; the last port gone takes the bridge.
    let again = rt.block_on(host.apply(&desired)).expect("apply again");
    assert!(
        again
            .iter()
            .all(|o| matches!(o, netdrv::plan::Op::SetFilter { .. })),
        "{again:?}"
    );
    let index = |dev: &str| {
        sh(&lab.exec_host(&["cat", &format!("/sys/class/net/{dev}/ifindex")]))
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    let web_port = netdrv::names::veth("kf", 1);
    assert_eq!(
        filter.port_vlans(index(&web_port)).unwrap(),
        vec![(10, ACCESS)]
    );
    assert!(ping(0, 1), "web to web after the second apply");
    desired.tenants.clear();
    rt.block_on(host.apply(&desired)).expect("apply empty");
    assert!(!ok(&lab.exec_host(&["ip", "link", "show", &bridge])));
    assert!(filter.ports().unwrap().is_empty());
}

#[test]
#[ignore = "needs bridge VLAN filtering: runs in a guest (see the first test)"]
fn evpn_arp_suppression_answers_from_the_subnets_vlan_device() {
    use netdrv::ipam::Mac;
    use netdrv::model::{HostNet, PortKind, PortNet, SubnetNet, TenantNet, Underlay};
    use netdrv::NetHost;
    use std::path::PathBuf;
    use std::sync::Arc;

    // Host A: netdrv with a VLAN-filtering bridge in EVPN mode (no learning on the VxLAN port,
    // remote MAC and neighbour from "the control plane"), a port into VM a. Host B: a plain
    // bridge with a VxLAN device and VM b, which does not answer ARP (it knows a statically):
    // a reaches b only if A's bridge answers a's ARP for b itself.
    let lab = Lab::build(1, false, 0);
    sh(&lab.exec_host(&["ip", "link", "del", "br0"]));
    sh(&lab.exec_host(&["ip", "link", "del", &lab.vm(0).port]));
    let lab_b = Lab::build(1, false, 1);
    sh(&lab.exec_host(&[
        "ip",
        "link",
        "add",
        "u0",
        "type",
        "veth",
        "peer",
        "name",
        "u0",
        "netns",
        &lab_b.host,
    ]));
    for (l, ip) in [(&lab, "192.0.2.1"), (&lab_b, "192.0.2.2")] {
        sh(&l.exec_host(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "u0"]));
        sh(&l.exec_host(&["ip", "link", "set", "u0", "up"]));
    }
    let (mac_a, ip_a) = (Mac([2, 0x98, 0, 0, 0, 1]), Ipv4Addr::new(10, 98, 0, 1));
    let (mac_b, ip_b) = (Mac(lab_b.vm(0).mac), Ipv4Addr::new(10, 98, 0, 2));
    let b = lab_b.vm(0);
    sh(&lab_b.exec_host(&[
        "ip",
        "link",
        "add",
        "vx",
        "type",
        "vxlan",
        "id",
        "1010",
        "local",
        "192.0.2.2",
        "dstport",
        "4789",
        "nolearning",
    ]));
    sh(&lab_b.exec_host(&["ip", "link", "set", "vx", "master", "br0", "up"]));
    sh(&lab_b.exec_host(&[
        "bridge",
        "fdb",
        "append",
        "00:00:00:00:00:00",
        "dev",
        "vx",
        "dst",
        "192.0.2.1",
    ]));
    sh(&b.exec(&["ip", "addr", "add", &format!("{ip_b}/24"), "dev", "eth0"]));
    sh(&b.exec(&["ip", "link", "set", "eth0", "arp", "off"]));
    sh(&b.exec(&[
        "ip",
        "neigh",
        "replace",
        &ip_a.to_string(),
        "lladdr",
        &mac_a.to_string(),
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let filter = Arc::new(KernelFilter::open(&lab.netns, &lab.pin_dir).expect("open"));
    let host = {
        let _in_rt = rt.enter();
        NetHost::open(&lab.netns, filter.clone()).expect("net host")
    };
    let desired = HostNet {
        prefix: "kf".into(),
        owner: "kernel-filter-test".into(),
        underlay: Some(Underlay {
            local: Ipv4Addr::new(192, 0, 2, 1),
            mtu: 1500,
        }),
        peers: vec![Ipv4Addr::new(192, 0, 2, 2)],
        tenants: vec![TenantNet {
            id: 7,
            subnets: vec![SubnetNet {
                name: "web".into(),
                vlan: 10,
                vni: 1010,
            }],
            ports: vec![PortNet {
                id: 1,
                subnet: "web".into(),
                kind: PortKind::Veth {
                    netns: PathBuf::from("/run/netns").join(&lab.vm(0).ns),
                    ifname: "eth1".into(),
                    address: Some((ip_a, 24)),
                },
                mac: mac_a,
                security: None,
            }],
        }],
        remote_macs: vec![(1010, mac_b, Ipv4Addr::new(192, 0, 2, 2))],
        externals: vec![],
        floods: vec![],
        vxlan_port_learning: false,
        neighbours: vec![(1010, ip_b, mac_b)],
    };
    rt.block_on(host.apply(&desired)).expect("apply");
    let vlan_dev = netdrv::names::neigh_vlan("kf", 1010);
    let neigh = sh(&lab.exec_host(&["ip", "neigh", "show", "dev", &vlan_dev]));
    assert!(
        neigh.contains(&mac_b.to_string()) && neigh.contains("PERMANENT"),
        "{neigh}"
    );
    let fdb = sh(&lab.exec_host(&[
        "bridge",
        "fdb",
        "show",
        "dev",
        &netdrv::names::vxlan("kf", 1010),
    ]));
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(&mac_b.to_string()) && l.contains("vlan 10")),
        "{fdb}"
    );
    let pinged = ok(&lab.vm(0).exec(&[
        "ping",
        "-q",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        "eth1",
        &ip_b.to_string(),
    ]));
    assert!(pinged, "a's ARP for b answered by A's bridge");
    // Applying again changes nothing but the port filters.
    let again = rt.block_on(host.apply(&desired)).expect("apply again");
    assert!(
        again
            .iter()
            .all(|o| matches!(o, netdrv::plan::Op::SetFilter { .. })),
        "{again:?}"
    );
}
