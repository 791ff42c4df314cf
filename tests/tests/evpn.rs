//! EVPN between two vpcd hosts through an FRR route reflector, no static FDB configuration:
//! namespace "hosts" h1 (192.0.2.1) and h2 (192.0.2.2) and the reflector rr (192.0.2.10) on one
//! underlay bridge.

use std::time::Duration;

use vpcd_tests::*;

struct Lab {
    h1: Ns,
    h2: Ns,
    h3: Ns,
    rr: Ns,
    _lan: Ns,
}

impl Lab {
    fn new() -> Lab {
        let lan = Ns::new("el");
        lan.ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        lan.ok(&["ip", "link", "set", "br0", "up"]);
        let mk = |tag: &str, ip: &str| {
            let ns = Ns::new(tag);
            let port = format!("p{tag}");
            sh(
                "ip",
                &[
                    "-n", &lan.name, "link", "add", "name", &port, "type", "veth", "peer", "u0",
                    "netns", &ns.name,
                ],
            );
            lan.ok(&["ip", "link", "set", &port, "master", "br0", "up"]);
            ns.ok(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "u0"]);
            ns.ok(&["ip", "link", "set", "u0", "up"]);
            ns
        };
        let h1 = mk("e1", "192.0.2.1");
        let h2 = mk("e2", "192.0.2.2");
        let h3 = mk("e3", "192.0.2.3");
        let rr = mk("er", "192.0.2.10");
        Lab {
            h1,
            h2,
            h3,
            rr,
            _lan: lan,
        }
    }

    async fn host(&self, n: u8) -> Daemon {
        self.host_with(n, &["--bgp-peer", "192.0.2.10", "--bgp-hold-time", "15"])
            .await
    }

    /// Host `n` with EVPN flags `bgp` (peers, timers).
    async fn host_with(&self, n: u8, bgp: &[&str]) -> Daemon {
        let ns = match n {
            1 => &self.h1,
            2 => &self.h2,
            _ => &self.h3,
        };
        let mut extra = [
            "--netns".to_string(),
            ns.path(),
            "--underlay-ip".into(),
            format!("192.0.2.{n}"),
            "--bgp-asn".into(),
            "65000".into(),
        ]
        .to_vec();
        extra.extend(bgp.iter().map(|s| s.to_string()));
        let opts = DaemonOpts {
            backend: "qmp",
            extra,
            ..Default::default()
        };
        Daemon::start_with(opts, Bus::open()).await
    }
}

fn fdb_has(host: &Ns, mac: &str, dst: &str) -> bool {
    let out = host.ok(&["bridge", "fdb", "show"]);
    out.lines()
        .any(|l| l.starts_with(mac) && l.contains(&format!("dst {dst}")))
}

#[tokio::test]
async fn vms_on_two_hosts_reach_each_other_through_evpn_routes() {
    let lab = Lab::new();
    let frr = FrrReflector::start(&lab.rr, 65000, "192.0.2.10", "192.0.2.0/24");
    let d1 = lab.host(1).await;
    let d2 = lab.host(2).await;
    for d in [&d1, &d2] {
        d.vpcctl_ok(&["net-create", "a"]);
        d.vpcctl_ok(&["subnet-create", "a", "web", "10.50.1.0/24", "--vni", "7001"]);
    }
    let vm1 = ns_port(&d1, "v1", "a", "web", "10.50.1.11", true);
    let vm2 = ns_port(&d2, "v2", "a", "web", "10.50.1.12", true);
    let mac1 = port_mac_of(&d1, "10.50.1.11");
    // Each host learns the other's VTEP (type 3) and port (type 2): no static configuration.
    wait_until(
        Duration::from_secs(30),
        || {
            fdb_has(&lab.h2, &mac1, "192.0.2.1")
                && fdb_has(&lab.h2, "00:00:00:00:00:00", "192.0.2.1")
        },
        "h2 to learn vm1's MAC and h1's VTEP",
    );
    // The bridge entry too: the MAC is pinned to the VxLAN port, learning cannot move it.
    let fdb = lab.h2.ok(&["bridge", "fdb", "show"]);
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(&mac1) && l.contains(" master ") && l.contains("static")),
        "{fdb}"
    );
    assert!(vm1.pings("10.50.1.12"), "vm1 -> vm2 across EVPN");
    assert!(vm2.pings("10.50.1.11"), "vm2 -> vm1 across EVPN");

    // ARP suppression: h1's bridge answers vm1's ARP for vm2 from the type-2 route. vm2 stops
    // answering ARP (it knows vm1 statically), so vm1 reaches it only if h1 answered.
    let mac2 = port_mac_of(&d2, "10.50.1.12");
    let neigh = lab.h1.ok(&["ip", "neigh", "show", "10.50.1.12"]);
    assert!(
        neigh.contains(&mac2) && neigh.contains("PERMANENT"),
        "{neigh}"
    );
    vm2.ok(&["ip", "link", "set", "eth0", "arp", "off"]);
    vm2.ok(&[
        "ip",
        "neigh",
        "replace",
        "10.50.1.11",
        "lladdr",
        &mac1,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    vm1.ok(&["ip", "neigh", "flush", "dev", "eth0"]);
    assert!(vm1.pings("10.50.1.12"), "vm1's ARP for vm2 answered by h1");
    vm2.ok(&["ip", "link", "set", "eth0", "arp", "on"]);
    let routes = frr.vtysh("show bgp l2vpn evpn route");
    assert!(routes.contains(&mac1), "{routes}");
    let sessions: serde_json::Value =
        serde_json::from_str(&d1.vpcctl_ok(&["--json", "bgp-sessions"])).unwrap();
    assert_eq!(sessions[0]["state"], "established", "{sessions}");
    assert!(sessions[0]["prefixes"].as_u64().unwrap() >= 2, "{sessions}");
    let routes: serde_json::Value =
        serde_json::from_str(&d1.vpcctl_ok(&["--json", "evpn-routes", "--vni", "7001"])).unwrap();
    let has = |dir: &str, needle: &str| {
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["direction"] == dir && r["route"].as_str().unwrap().contains(needle))
    };
    assert!(has("in", &mac2) && has("out", &mac1), "{routes}");

    // The route reflector restarts: traffic between the VMs goes on (learned routes outlive
    // the sessions by the hold time), and the routes are learned again once it is back.
    drop(frr);
    assert!(
        vm1.pings("10.50.1.12"),
        "traffic while the reflector is down"
    );
    let _frr = FrrReflector::start(&lab.rr, 65000, "192.0.2.10", "192.0.2.0/24");
    wait_until(
        Duration::from_secs(40),
        || {
            [&d1, &d2].iter().all(|d| {
                d.vpcctl_ok(&["--json", "bgp-sessions"])
                    .contains("\"established\"")
            })
        },
        "sessions back after the reflector restarted",
    );
    // Past the hold time the routes are still there: learned again, not expired.
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert!(
        fdb_has(&lab.h2, &mac1, "192.0.2.1"),
        "re-learned after the restart"
    );
    assert!(vm2.pings("10.50.1.11"), "traffic after the restart");

    // Deleting the port withdraws its route; h2's FDB entry goes.
    let id = port_id_of(&d1, "10.50.1.11").to_string();
    d1.vpcctl_ok(&["port-delete", &id]);
    wait_until(
        Duration::from_secs(30),
        || !lab.h2.ok(&["bridge", "fdb", "show"]).contains(&mac1),
        "h2 to drop vm1's MAC (VxLAN and bridge entries)",
    );
    let neigh = lab.h2.ok(&["ip", "neigh", "show", "10.50.1.11"]);
    assert!(
        !neigh.contains(&mac1),
        "h2 still answers ARP for vm1: {neigh}"
    );
    drop((vm1, vm2));
}

/// Two route reflectors (rr and h3): losing one changes nothing; with both gone, learned
/// routes go once the hold time has passed, and come back with a reflector. A subnet's last
/// port going withdraws its type-3 route: the flood entry on the other host goes.
#[tokio::test]
async fn two_reflectors_routes_expire_after_the_hold_time_and_subnets_withdraw_floods() {
    let lab = Lab::new();
    let rr1 = FrrReflector::start(&lab.rr, 65000, "192.0.2.10", "192.0.2.0/24");
    let rr2 = FrrReflector::start(&lab.h3, 65000, "192.0.2.3", "192.0.2.0/24");
    let bgp = [
        "--bgp-peer",
        "192.0.2.10",
        "--bgp-peer",
        "192.0.2.3",
        "--bgp-hold-time",
        "3",
    ];
    let d1 = lab.host_with(1, &bgp).await;
    let d2 = lab.host_with(2, &bgp).await;
    for d in [&d1, &d2] {
        d.vpcctl_ok(&["net-create", "a"]);
        d.vpcctl_ok(&["subnet-create", "a", "web", "10.50.4.0/24", "--vni", "7201"]);
        d.vpcctl_ok(&["subnet-create", "a", "db", "10.50.5.0/24", "--vni", "7202"]);
    }
    let vm1 = ns_port(&d1, "t1", "a", "web", "10.50.4.11", true);
    let _vm2 = ns_port(&d2, "t2", "a", "web", "10.50.4.12", true);
    let _db1 = ns_port(&d1, "u1", "a", "db", "10.50.5.11", true);
    let _db2 = ns_port(&d2, "u2", "a", "db", "10.50.5.12", true);
    let mac1 = port_mac_of(&d1, "10.50.4.11");
    let vx_web = netdrv::names::vxlan("vpc", 7201);
    let vx_db = netdrv::names::vxlan("vpc", 7202);
    let flood = |vx: &str| {
        lab.h2
            .ok(&["bridge", "fdb", "show", "dev", vx])
            .lines()
            .any(|l| l.starts_with("00:00:00:00:00:00") && l.contains("dst 192.0.2.1"))
    };
    wait_until(
        Duration::from_secs(30),
        || fdb_has(&lab.h2, &mac1, "192.0.2.1") && flood(&vx_web) && flood(&vx_db),
        "h2 to learn h1's MAC and both VTEP floods",
    );
    // Both sessions up, with an uptime that grows.
    let sessions = |d: &Daemon| -> serde_json::Value {
        serde_json::from_str(&d.vpcctl_ok(&["--json", "bgp-sessions"])).unwrap()
    };
    let s = sessions(&d1);
    assert_eq!(s.as_array().unwrap().len(), 2, "{s}");
    for x in s.as_array().unwrap() {
        assert_eq!(x["state"], "established", "{s}");
    }
    let up0 = s[0]["uptime_secs"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let up1 = sessions(&d1)[0]["uptime_secs"].as_u64().unwrap();
    assert!(up1 >= up0 + 2, "uptime {up0} -> {up1}");

    // The db subnet's last port on h1 goes: its type-3 route is withdrawn, h2's flood entry
    // towards h1 on VNI 7202 goes; web's stays.
    let id = port_id_of(&d1, "10.50.5.11").to_string();
    d1.vpcctl_ok(&["port-delete", &id]);
    wait_until(
        Duration::from_secs(30),
        || !flood(&vx_db),
        "h2 to drop h1's flood entry on the db VNI",
    );
    assert!(flood(&vx_web));

    // One reflector gone, well past the hold time: the other still carries everything.
    drop(rr1);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        fdb_has(&lab.h2, &mac1, "192.0.2.1"),
        "lost with one reflector left"
    );
    assert!(vm1.pings("10.50.4.12"), "traffic with one reflector left");

    // Both gone: the routes stay for the hold time, then go (MAC, flood, ARP entries).
    drop(rr2);
    assert!(
        fdb_has(&lab.h2, &mac1, "192.0.2.1"),
        "dropped before the hold time"
    );
    wait_until(
        Duration::from_secs(20),
        || !fdb_has(&lab.h2, &mac1, "192.0.2.1") && !flood(&vx_web),
        "h2 to drop routes of sessions down past the hold time",
    );
    let neigh = lab.h2.ok(&["ip", "neigh", "show", "10.50.4.11"]);
    assert!(!neigh.contains(&mac1), "{neigh}");

    // A reflector back: learned again.
    let _rr = FrrReflector::start(&lab.rr, 65000, "192.0.2.10", "192.0.2.0/24");
    wait_until(
        Duration::from_secs(60),
        || fdb_has(&lab.h2, &mac1, "192.0.2.1") && flood(&vx_web),
        "h2 to learn h1's routes again",
    );
    assert!(
        vm1.pings("10.50.4.12"),
        "traffic after a reflector came back"
    );
}

/// Routing across EVPN: the tenant's router is on host 2, which has no port on web; host 1 has a
/// VM there. Host 2 announces its router leg (a type-2 route for the gateway) and web's type-3
/// route, so host 1 floods to it and pins the gateway's MAC; the VxLAN ports learn nothing.
#[tokio::test]
async fn a_router_on_another_host_is_reached_through_evpn_routes() {
    let lab = Lab::new();
    let _frr = FrrReflector::start(&lab.rr, 65000, "192.0.2.10", "192.0.2.0/24");
    let d1 = lab.host(1).await;
    let d2 = lab.host(2).await;
    for d in [&d1, &d2] {
        d.vpcctl_ok(&["net-create", "a"]);
        d.vpcctl_ok(&["subnet-create", "a", "web", "10.60.1.0/24", "--vni", "7101"]);
        d.vpcctl_ok(&["subnet-create", "a", "db", "10.60.2.0/24", "--vni", "7102"]);
    }
    d2.vpcctl_ok(&["router-create", "r1", "a"]);
    d2.vpcctl_ok(&["router-add-subnet", "r1", "web"]);
    d2.vpcctl_ok(&["router-add-subnet", "r1", "db"]);
    let db2 = ns_port(&d2, "d2", "a", "db", "10.60.2.5", true);
    db2.ok(&["ip", "route", "add", "default", "via", "10.60.2.1"]);
    let web1 = ns_port(&d1, "w1", "a", "web", "10.60.1.5", true);
    web1.ok(&["ip", "route", "add", "default", "via", "10.60.1.1"]);

    let info: serde_json::Value =
        serde_json::from_str(&d2.vpcctl_ok(&["--json", "router-info", "r1"])).unwrap();
    let router_ns = info["namespace"].as_str().unwrap().to_string();
    let leg = sh("ip", &["-n", &router_ns, "-br", "link", "show", "gw1"]);
    let gw_mac = leg.split_whitespace().nth(2).unwrap().to_string();
    wait_until(
        Duration::from_secs(30),
        || fdb_has(&lab.h1, &gw_mac, "192.0.2.2"),
        "h1 to learn the gateway's MAC behind h2",
    );
    assert!(web1.pings("10.60.2.5"), "h1's VM -> h2's router -> db");
    assert!(db2.pings("10.60.1.5"), "db -> h2's router -> h1's VM");

    // The control plane installs every remote MAC: the VxLAN bridge ports do not learn.
    let vx = netdrv::names::vxlan("vpc", 7101);
    for h in [&lab.h1, &lab.h2] {
        let link = h.ok(&["bridge", "-d", "link", "show", "dev", &vx]);
        assert!(link.contains("learning off"), "{link}");
    }
}

#[tokio::test]
async fn a_management_host_runs_the_reflector_and_a_third_host_joins() {
    let lab = Lab::new();
    // The management host: vpcd writes FRR's configuration and runs it.
    let opts = DaemonOpts {
        backend: "qmp",
        extra: [
            "--netns",
            &lab.rr.path(),
            "--underlay-ip",
            "192.0.2.10",
            "--role",
            "management",
            "--bgp-asn",
            "65000",
            "--bgp-listen-range",
            "192.0.2.0/24",
            "--bgp-hold-time",
            "15",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..Default::default()
    };
    let mgmt = Daemon::start_with(opts, Bus::open()).await;
    let conf = std::fs::read_to_string(mgmt.state.path().join("frr/bgpd.conf")).unwrap();
    assert!(conf.contains("bgp listen range 192.0.2.0/24"), "{conf}");

    let d1 = lab.host(1).await;
    let d2 = lab.host(2).await;
    for d in [&d1, &d2] {
        d.vpcctl_ok(&["net-create", "a"]);
        d.vpcctl_ok(&["subnet-create", "a", "web", "10.50.2.0/24", "--vni", "7002"]);
    }
    let vm1 = ns_port(&d1, "m1", "a", "web", "10.50.2.11", true);
    let _vm2 = ns_port(&d2, "m2", "a", "web", "10.50.2.12", true);
    wait_until(
        Duration::from_secs(40),
        || vm1.pings("10.50.2.12"),
        "vm1 to reach vm2 through the management host's reflector",
    );

    // bgpd dies: vpcd starts it again and the sessions come back.
    let pid = std::fs::read_to_string(mgmt.state.path().join("frr/bgpd.pid")).unwrap();
    sh("kill", &["-9", pid.trim()]);
    wait_until(
        Duration::from_secs(40),
        || {
            let now =
                std::fs::read_to_string(mgmt.state.path().join("frr/bgpd.pid")).unwrap_or_default();
            now.trim() != pid.trim()
                && d1
                    .vpcctl_ok(&["--json", "bgp-sessions"])
                    .contains("\"established\"")
        },
        "bgpd restarted by vpcd and the session back",
    );

    // A third compute host joins: reachable without touching the others.
    let d3 = lab.host(3).await;
    d3.vpcctl_ok(&["net-create", "a"]);
    d3.vpcctl_ok(&["subnet-create", "a", "web", "10.50.2.0/24", "--vni", "7002"]);
    let vm3 = ns_port(&d3, "m3", "a", "web", "10.50.2.13", true);
    wait_until(
        Duration::from_secs(40),
        || vm3.pings("10.50.2.11") && vm3.pings("10.50.2.12"),
        "the third host's VM to reach the others",
    );
}

#[tokio::test]
async fn an_frr_vtep_and_our_vms_reach_each_other() {
    let lab = Lab::new();
    let _rr = FrrReflector::start(&lab.rr, 65000, "192.0.2.10", "192.0.2.0/24");
    // h3 is an ordinary FRR VTEP: traditional bridge, VxLAN 7003, zebra + bgpd with
    // advertise-all-vni, a namespace "VM" behind it.
    let h = &lab.h3;
    h.ok(&["ip", "link", "add", "br7003", "type", "bridge"]);
    h.ok(&["ip", "link", "set", "br7003", "up"]);
    h.ok(&[
        "ip",
        "link",
        "add",
        "vx7003",
        "type",
        "vxlan",
        "id",
        "7003",
        "local",
        "192.0.2.3",
        "dstport",
        "4789",
        "nolearning",
    ]);
    h.ok(&["ip", "link", "set", "vx7003", "master", "br7003", "up"]);
    let vm4 = Ns::new("f4");
    sh(
        "ip",
        &[
            "-n", &h.name, "link", "add", "name", "v4", "type", "veth", "peer", "eth0", "netns",
            &vm4.name,
        ],
    );
    h.ok(&["ip", "link", "set", "v4", "master", "br7003", "up"]);
    vm4.ok(&["ip", "addr", "add", "10.50.3.14/24", "dev", "eth0"]);
    vm4.ok(&["ip", "link", "set", "eth0", "up"]);
    let dir = tempfile::Builder::new()
        .prefix("vpcd-frrvtep-")
        .tempdir()
        .unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    std::fs::write(dir.path().join("zebra.conf"), "hostname vtep\n").unwrap();
    std::fs::write(
        dir.path().join("bgpd.conf"),
        "router bgp 65000\n bgp router-id 192.0.2.3\n no bgp default ipv4-unicast\n \
         neighbor 192.0.2.10 remote-as 65000\n address-family l2vpn evpn\n  \
         neighbor 192.0.2.10 activate\n  advertise-all-vni\n exit-address-family\n",
    )
    .unwrap();
    sh("chown", &["-R", "frr:frr", &d]);
    let zsock = format!("{d}/zserv.api");
    for daemon in ["zebra", "bgpd"] {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &h.name,
                &format!("/usr/lib/frr/{daemon}"),
                "-d",
                "-f",
                &format!("{d}/{daemon}.conf"),
                "-i",
                &format!("{d}/{daemon}.pid"),
                "-z",
                &zsock,
                "--vty_socket",
                &d,
                "-A",
                "127.0.0.1",
                "-P",
                "0",
            ],
        );
    }
    struct Kill(std::path::PathBuf);
    impl Drop for Kill {
        fn drop(&mut self) {
            kill_frr(&self.0);
        }
    }
    let _kill = Kill(dir.path().to_path_buf());

    let d1 = lab.host(1).await;
    d1.vpcctl_ok(&["net-create", "a"]);
    d1.vpcctl_ok(&["subnet-create", "a", "web", "10.50.3.0/24", "--vni", "7003"]);
    let vm1 = ns_port(&d1, "f1", "a", "web", "10.50.3.11", true);
    wait_until(
        Duration::from_secs(60),
        || vm4.pings("10.50.3.11") && vm1.pings("10.50.3.14"),
        "our VM and the FRR VTEP's to reach each other",
    );
    // Each side learned the other over EVPN: FRR has our MAC, we have the VTEP's flood entry.
    let vtysh = |cmd: &str| sh("vtysh", &["--vty_socket", &d, "-c", cmd]);
    let macs = vtysh("show evpn mac vni 7003");
    let mac1 = port_mac_of(&d1, "10.50.3.11");
    assert!(macs.contains(&mac1), "{macs}");
    assert!(fdb_has(&lab.h1, "00:00:00:00:00:00", "192.0.2.3"));
}
