//! Tenant networks on netns "hosts" joined by an underlay, with real guests and namespace
//! "VMs": reachability across VxLAN, isolation between subnets and tenants, port security,
//! reconciliation and crash safety.

use vpcd_tests::*;

/// A vpcd for host `n` of the lab, with the QMP backend (QEMU runs in the host namespace).
async fn host_daemon(lab: &Underlay, n: u8) -> Daemon {
    let opts = DaemonOpts {
        backend: "qmp",
        extra: lab.flags(n),
        ..Default::default()
    };
    Daemon::start_with(opts, Bus::open()).await
}

/// Tenant `a` with subnets web (VNI 5001) and db (VNI 5002), tenant `b` with the same CIDR as
/// a/web (VNI 6001): the same on every host.
fn tenants(d: &Daemon) {
    d.vpcctl_ok(&["net-create", "a"]);
    d.vpcctl_ok(&["subnet-create", "a", "web", "10.10.1.0/24", "--vni", "5001"]);
    d.vpcctl_ok(&["subnet-create", "a", "db", "10.10.2.0/24", "--vni", "5002"]);
    d.vpcctl_ok(&["net-create", "b"]);
    d.vpcctl_ok(&["subnet-create", "b", "web", "10.10.1.0/24", "--vni", "6001"]);
}

fn port_counters(d: &Daemon, id: u32) -> serde_json::Value {
    let out = d.vpcctl_ok(&["--json", "port-info", &id.to_string()]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["counters"].clone()
}

#[tokio::test]
async fn guest_vm_and_namespace_vm_on_two_hosts_ping_across_vxlan_and_stay_isolated() {
    let lab = Underlay::new();
    let d1 = host_daemon(&lab, 1).await;
    let d2 = host_daemon(&lab, 2).await;
    tenants(&d1);
    tenants(&d2);

    // A real guest on host 1 in a/web.
    let vm = unique("netvm");
    let nic = "[[nics]]\nnetwork = \"a\"\nsubnet = \"web\"\nip = \"10.10.1.10\"\n";
    d1.create(&format!("{}{nic}", kernel_spec(&vm, "")), "qmp");
    d1.wait_console(&vm, BOOT_MARKER, 1);
    let ifl = d1.vpcctl_ok(&["domiflist", &vm]);
    assert!(ifl.contains("a/web") && ifl.contains("10.10.1.10"), "{ifl}");
    let mac: serde_json::Value =
        serde_json::from_str(&d1.vpcctl_ok(&["--json", "domiflist", &vm])).unwrap();
    let mac = mac[0]["mac"].as_str().unwrap().to_string();
    let mut shell = d1.guest_shell(&vm).await;
    assert_eq!(shell.ok("cat /sys/class/net/eth0/address").trim(), mac);
    // The guest's init runs udhcpc: host 1 serves the subnet (no router) from its IPAM.
    d1.wait_console(&vm, "VPCD-DHCP eth0 10.10.1.10/24", 1);

    // A namespace VM on host 2 in a/web, one in a/db (port security off and an address in
    // web's range, so only the VLAN/VNI separation stands between it and web), and tenant b's
    // port with the same CIDR.
    let web2 = ns_port(&d2, "w2", "a", "web", "10.10.1.20", true);
    let db2 = ns_port(&d2, "d2", "a", "db", "10.10.2.20", false);
    db2.ok(&["ip", "addr", "add", "10.10.1.30/24", "dev", "eth0"]);
    let b2 = ns_port(&d2, "b2", "b", "web", "10.10.1.21", true);
    // And on host 1 a db port (same-host isolation).
    let db1 = ns_port(&d1, "d1", "a", "db", "10.10.2.11", false);
    db1.ok(&["ip", "addr", "add", "10.10.1.31/24", "dev", "eth0"]);

    // Across VxLAN, both ways.
    let (out, rc) = shell.run("ping -c 3 -W 2 10.10.1.20");
    assert_eq!(rc, 0, "guest -> host2 ns: {out}");
    assert!(web2.pings("10.10.1.10"), "host2 ns -> guest");

    // Each host's service leg of a/web (the same address and MAC on both) answers its own VMs,
    // and its frames never cross: no bridge learns the service MAC behind its VxLAN device.
    let (out, rc) = shell.run("ping -c 2 -W 2 10.10.1.254");
    assert_eq!(rc, 0, "guest -> its host's service leg: {out}");
    assert!(
        web2.pings("10.10.1.254"),
        "host2 ns -> its host's service leg"
    );
    let neigh = web2.ok(&["ip", "neigh", "show", "10.10.1.254"]);
    let svc_mac = neigh.split_whitespace().nth(4).unwrap().to_string();
    assert!(shell.ok("ip neigh show 10.10.1.254").contains(&svc_mac));
    let vx = netdrv::names::vxlan("vpc", 5001);
    for h in [&lab.h1, &lab.h2] {
        let fdb = h.ok(&["bridge", "fdb", "show", "dev", &vx]);
        assert!(!fdb.contains(&svc_mac), "service MAC behind VxLAN: {fdb}");
    }

    // The namespace end has the port MTU: full-size frames cross the VxLAN, DF set.
    assert_eq!(web2.ok(&["cat", "/sys/class/net/eth0/mtu"]).trim(), "1450");
    assert_eq!(shell.ok("cat /sys/class/net/eth0/mtu").trim(), "1450");
    let big = web2.run(&[
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        "-M",
        "do",
        "-s",
        "1422",
        "10.10.1.10",
    ]);
    assert!(
        big.status.success(),
        "1450-byte frames do not cross: {}",
        String::from_utf8_lossy(&big.stdout)
    );

    // db cannot reach web without a router, on the same host and across hosts.
    assert!(
        !db2.pings("10.10.1.20"),
        "db port on host 2 reached web on host 2"
    );
    assert!(
        !db2.pings("10.10.1.10"),
        "db port on host 2 reached the guest on host 1"
    );
    assert!(
        !db1.pings("10.10.1.10"),
        "db port on host 1 reached the guest on host 1"
    );
    assert!(
        db1.pings("10.10.2.20"),
        "db ports of both hosts should reach each other"
    );

    // Tenant b, same CIDR: nothing crosses.
    assert!(!b2.pings("10.10.1.10"), "tenant b reached tenant a's guest");
    assert!(!b2.pings("10.10.1.20"), "tenant b reached tenant a's port");
    let (out, rc) = shell.run("ping -c 2 -W 1 10.10.1.21");
    assert_ne!(rc, 0, "tenant a's guest reached tenant b: {out}");

    // The VLAN filter saw and dropped the cross-subnet traffic somewhere on host 2.
    let web2_id = port_id_of(&d2, "10.10.1.20");
    let c = port_counters(&d2, web2_id);
    assert!(
        c["rx_packets"].as_u64().unwrap() > 0 && c["tx_packets"].as_u64().unwrap() > 0,
        "{c}"
    );
    drop(shell);
}

#[tokio::test]
async fn port_security_drops_spoofed_mac_ip_and_arp_and_counts_them() {
    let lab = Underlay::new();
    let d = host_daemon(&lab, 1).await;
    tenants(&d);
    let a = ns_port(&d, "pa", "a", "web", "10.10.1.40", true);
    let b = ns_port(&d, "pb", "a", "web", "10.10.1.41", true);
    assert!(a.pings("10.10.1.41"));
    let id = port_id_of(&d, "10.10.1.40");
    let dropped = |d: &Daemon| port_counters(d, id)["drop_security"].as_u64().unwrap();

    // Another source IP.
    let before = dropped(&d);
    a.ok(&["ip", "addr", "add", "10.10.1.99/24", "dev", "eth0"]);
    assert!(!a
        .run(&[
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "-I",
            "10.10.1.99",
            "10.10.1.41"
        ])
        .status
        .success());
    assert!(dropped(&d) > before, "spoofed IPv4 source not counted");
    a.ok(&["ip", "addr", "del", "10.10.1.99/24", "dev", "eth0"]);

    // ARP with another IP as sender (busybox arping binds to it, so it must be assigned).
    let before = dropped(&d);
    a.ok(&["ip", "addr", "add", "10.10.1.98/32", "dev", "eth0"]);
    let arping = [
        "busybox",
        "arping",
        "-c",
        "2",
        "-w",
        "2",
        "-s",
        "10.10.1.98",
    ];
    let arp = a.run(&[&arping[..], &["-I", "eth0", "10.10.1.41"]].concat());
    a.ok(&["ip", "addr", "del", "10.10.1.98/32", "dev", "eth0"]);
    assert!(!arp.status.success(), "spoofed ARP got an answer");
    assert!(
        dropped(&d) > before,
        "spoofed ARP sender not counted: {}{}",
        String::from_utf8_lossy(&arp.stdout),
        String::from_utf8_lossy(&arp.stderr)
    );

    // Another MAC.
    let before = dropped(&d);
    a.ok(&["ip", "link", "set", "eth0", "address", "02:11:22:33:44:55"]);
    b.ok(&["ip", "neigh", "flush", "all"]);
    assert!(!a.pings("10.10.1.41"), "changed MAC still passes");
    assert!(dropped(&d) > before, "spoofed MAC not counted");

    // With port security off the same traffic passes.
    d.vpcctl_ok(&["port-security", &id.to_string(), "off"]);
    assert!(a.pings("10.10.1.41"), "port security off, still dropped");
    d.vpcctl_ok(&["port-security", &id.to_string(), "on"]);
    assert!(!a.pings("10.10.1.41"));
}

#[tokio::test]
async fn sigkill_keeps_traffic_and_restart_leaks_nothing() {
    let lab = Underlay::new();
    let mut d1 = host_daemon(&lab, 1).await;
    let d2 = host_daemon(&lab, 2).await;
    tenants(&d1);
    tenants(&d2);
    let n1 = ns_port(&d1, "k1", "a", "web", "10.10.1.50", true);
    let _n2 = ns_port(&d2, "k2", "a", "web", "10.10.1.51", true);
    assert!(n1.pings("10.10.1.51"));
    let links_before = {
        let mut l = lab.h1.links();
        l.sort();
        l
    };
    let pins_before = count_files(&d1.bpf_dir);
    let progs_before = count_programs();

    // A ping stream across the kill and the restart.
    let ping = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &n1.name,
            "ping",
            "-c",
            "30",
            "-i",
            "0.1",
            "-W",
            "1",
            "10.10.1.51",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    d1.kill9();
    std::thread::sleep(std::time::Duration::from_millis(500));
    d1.spawn().await.unwrap();
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let received: u32 = text
        .lines()
        .find_map(|l| {
            l.split(", ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0);
    assert!(
        received >= 25,
        "ping lost too much across the restart: {text}"
    );

    let mut links_after = lab.h1.links();
    links_after.sort();
    assert_eq!(
        links_before, links_after,
        "links changed across the restart"
    );
    assert_eq!(
        count_files(&d1.bpf_dir),
        pins_before,
        "pins changed across the restart"
    );
    assert_eq!(
        count_programs(),
        progs_before,
        "programs leaked across the restart"
    );
    assert!(n1.pings("10.10.1.51"));
}

/// Loaded port-filter programs on the machine.
fn count_programs() -> usize {
    sh("bpftool", &["prog", "show"])
        .lines()
        .filter(|l| l.contains("name port_ingress") || l.contains("name port_egress"))
        .count()
}

fn count_files(dir: &std::path::Path) -> usize {
    fn walk(d: &std::path::Path) -> usize {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        if e.path().is_dir() {
                            walk(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir)
}

#[tokio::test]
async fn drift_is_repaired_at_start_and_the_last_port_takes_the_bridge_along() {
    let lab = Underlay::new();
    let mut d = host_daemon(&lab, 1).await;
    tenants(&d);
    let n = ns_port(&d, "r1", "a", "web", "10.10.1.60", true);
    let id = port_id_of(&d, "10.10.1.60");
    let links = lab.h1.links();
    for l in ["vpcb1", "vpcx1389", &format!("vpcv{id:x}")] {
        assert!(links.iter().any(|x| x == l), "{l} missing in {links:?}");
    }
    let instance = d.host().await.instance_id().await.unwrap();
    d.kill9();
    // Behind vpcd's back: its VxLAN device disappears, a stale device of its own appears, and a
    // device of somebody else's with a similar name must survive.
    sh("ip", &["-n", &lab.h1.name, "link", "del", "vpcx1389"]);
    sh(
        "ip",
        &[
            "-n",
            &lab.h1.name,
            "link",
            "add",
            "vpcb77",
            "type",
            "bridge",
        ],
    );
    sh(
        "ip",
        &[
            "-n",
            &lab.h1.name,
            "link",
            "add",
            "vpcb78",
            "type",
            "bridge",
        ],
    );
    let alias = format!("vpcd:{instance}");
    sh(
        "ip",
        &["-n", &lab.h1.name, "link", "set", "vpcb78", "alias", &alias],
    );
    d.spawn().await.unwrap();
    let links = lab.h1.links();
    assert!(
        links.iter().any(|x| x == "vpcx1389"),
        "missing VxLAN not recreated: {links:?}"
    );
    assert!(
        !links.iter().any(|x| x == "vpcb78"),
        "stale device of ours not removed: {links:?}"
    );
    assert!(
        links.iter().any(|x| x == "vpcb77"),
        "a device that is not ours was removed: {links:?}"
    );
    drop(n);

    // Removing the last port of the tenant removes its bridge and VxLAN device.
    d.vpcctl_ok(&["port-delete", &id.to_string()]);
    let links = lab.h1.links();
    assert!(
        !links.iter().any(|x| x == "vpcb1" || x == "vpcx1389"),
        "{links:?}"
    );
    assert!(links.iter().any(|x| x == "vpcb77"));
}

#[tokio::test]
async fn bad_network_input_is_a_typed_error_and_creates_nothing() {
    let lab = Underlay::new();
    let d = host_daemon(&lab, 1).await;
    tenants(&d);
    let p = ns_port(&d, "e1", "a", "web", "10.10.1.70", true);
    let links_before = lab.h1.links();
    let info_before = d.vpcctl_ok(&["--json", "net-info", "a"]);
    let ports_before = d.vpcctl_ok(&["--json", "port-list"]);
    let fails = |args: &[&str], expect: &[&str]| {
        let out = d.vpcctl(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        for e in expect {
            assert!(err.contains(e), "{args:?}: {err:?} lacks {e:?}");
        }
    };
    fails(
        &[
            "subnet-create",
            "a",
            "x",
            "10.20.0.0/24",
            "--vlan",
            "4095",
            "--vni",
            "7001",
        ],
        &["VLAN 4095", "InvalidArgument"],
    );
    fails(
        &[
            "subnet-create",
            "a",
            "x",
            "10.20.0.0/24",
            "--vni",
            "16777216",
        ],
        &["VNI 16777216", "InvalidArgument"],
    );
    fails(
        &["subnet-create", "a", "x", "10.20.0.0/24", "--vni", "5001"],
        &["VNI 5001 is already used"],
    );
    fails(
        &["subnet-create", "a", "x", "10.10.0.0/16", "--vni", "7001"],
        &["overlaps subnet"],
    );
    fails(
        &["subnet-create", "a", "x", "10.20.0.5/24", "--vni", "7001"],
        &["host bits"],
    );
    fails(
        &["subnet-create", "nope", "x", "10.20.0.0/24"],
        &["network nope not found", "NotFound"],
    );
    fails(
        &["net-create", "a"],
        &["network a already exists", "AlreadyExists"],
    );
    fails(&["net-create", "bad name"], &["invalid network name"]);
    let ns = Ns::new("e2");
    let path = ns.path();
    fails(
        &[
            "port-create",
            "a",
            "web",
            "--netns",
            &path,
            "--ip",
            "10.10.2.5",
        ],
        &["outside"],
    );
    fails(
        &[
            "port-create",
            "a",
            "web",
            "--netns",
            &path,
            "--ip",
            "10.10.1.70",
        ],
        &["already taken"],
    );
    let mac = serde_json::from_str::<serde_json::Value>(&ports_before).unwrap()[0]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    fails(
        &["port-create", "a", "web", "--netns", &path, "--mac", &mac],
        &["in use by port"],
    );
    fails(
        &[
            "port-create",
            "a",
            "web",
            "--netns",
            "/run/netns/does-not-exist",
        ],
        &["does-not-exist"],
    );
    fails(&["net-delete", "a"], &["in use", "InvalidState"]);
    fails(&["subnet-delete", "a", "web"], &["in use", "InvalidState"]);
    // A VM whose NIC names an unknown subnet: nothing defined, no port left.
    let vm = unique("badnic");
    let spec = format!(
        "{}[[nics]]\nnetwork = \"a\"\nsubnet = \"nope\"\n",
        kernel_spec(&vm, "")
    );
    let out = d.vpcctl_spec("define", &spec, "qmp");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("subnet a/nope not found"));
    assert!(!d.vpcctl_ok(&["list", "--all"]).contains(&vm));

    assert_eq!(lab.h1.links(), links_before, "a failed call changed links");
    assert_eq!(d.vpcctl_ok(&["--json", "net-info", "a"]), info_before);
    assert_eq!(d.vpcctl_ok(&["--json", "port-list"]), ports_before);
    assert!(
        ns.links().iter().all(|l| l == "lo"),
        "a failed port-create left a link in the namespace"
    );
    drop(p);
}

/// Deletes the links with `prefix` in vpcd's own (the test's) namespace on drop.
struct RootLinks {
    prefix: String,
}

impl Drop for RootLinks {
    fn drop(&mut self) {
        let out = sh("ip", &["-o", "link", "show"]);
        for name in out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n))
            .filter(|n| n.starts_with(&self.prefix))
        {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", name])
                .output();
        }
    }
}

/// libvirt opens taps in its own namespace, so this host is vpcd's own namespace; the links get
/// a prefix no other test or vpcd uses.
#[tokio::test]
async fn libvirt_vm_nic_is_a_tap_on_the_tenant_bridge_with_the_port_mac() {
    let prefix = format!("z{:x}", std::process::id() % 4096);
    let _links = RootLinks {
        prefix: prefix.clone(),
    };
    let opts = DaemonOpts {
        backend: "libvirt",
        extra: vec!["--link-prefix".into(), prefix.clone()],
        ..Default::default()
    };
    let d = Daemon::start_with(opts, Bus::open()).await;
    d.vpcctl_ok(&["net-create", "lv"]);
    d.vpcctl_ok(&["subnet-create", "lv", "web", "10.77.0.0/24"]);
    let vm = unique("lvnic");
    let nic = "[[nics]]\nnetwork = \"lv\"\nsubnet = \"web\"\n";
    d.create(&format!("{}{nic}", kernel_spec(&vm, "")), "libvirt");
    d.wait_console(&vm, BOOT_MARKER, 1);
    let nics: serde_json::Value =
        serde_json::from_str(&d.vpcctl_ok(&["--json", "domiflist", &vm])).unwrap();
    let (tap, mac, ip) = (
        nics[0]["interface"].as_str().unwrap().to_string(),
        nics[0]["mac"].as_str().unwrap().to_string(),
        nics[0]["ip"].as_str().unwrap().to_string(),
    );
    assert!(tap.starts_with(&prefix), "{tap}");
    let virsh = sh("virsh", &["domiflist", &vm]);
    assert!(virsh.contains(&tap) && virsh.contains(&mac), "{virsh}");
    let master = sh("ip", &["-o", "link", "show", &tap]);
    assert!(master.contains(&format!("master {prefix}b")), "{master}");

    let ns = Ns::new("lv");
    d.vpcctl_ok(&[
        "port-create",
        "lv",
        "web",
        "--netns",
        &ns.path(),
        "--ip",
        "10.77.0.50",
    ]);
    let mut shell = d.guest_shell(&vm).await;
    assert_eq!(shell.ok("cat /sys/class/net/eth0/address").trim(), mac);
    // Addressed by DHCP from vpcd's service namespace (libvirt path).
    drop(shell);
    d.wait_console(&vm, &format!("VPCD-DHCP eth0 {ip}/24"), 1);
    let mut shell = d.guest_shell(&vm).await;
    let (out, rc) = shell.run("ping -c 3 -W 2 10.77.0.50");
    assert_eq!(rc, 0, "guest -> namespace port: {out}");
    drop(shell);

    // The tap lives as long as the domain is defined: virsh start after a shutdown works.
    d.vpcctl_ok(&["destroy", &vm]);
    sh("virsh", &["start", &vm]);
    d.wait_console(&vm, BOOT_MARKER, 2);
    d.vpcctl_ok(&["destroy", &vm]);
    d.vpcctl_ok(&["undefine", &vm]);
    let links = sh("ip", &["-o", "link", "show"]);
    assert!(!links.contains(&tap), "the tap outlived its domain");
}

#[tokio::test]
async fn static_remote_macs_and_peers_become_fdb_entries_on_the_vxlan_device() {
    let lab = Underlay::new();
    let mut d = host_daemon(&lab, 1).await;
    tenants(&d);
    let _n = ns_port(&d, "f1", "a", "web", "10.10.1.80", true);
    let fdb = || {
        sh(
            "bridge",
            &["-n", &lab.h1.name, "fdb", "show", "dev", "vpcx1389"],
        )
    };
    assert!(
        fdb().contains("00:00:00:00:00:00 dst 192.0.2.2"),
        "flood entry: {}",
        fdb()
    );
    d.vpcctl_ok(&["fdb-add", "a", "web", "02:aa:bb:cc:dd:ee", "192.0.2.2"]);
    assert!(
        fdb().contains("02:aa:bb:cc:dd:ee dst 192.0.2.2"),
        "{}",
        fdb()
    );
    assert!(d
        .vpcctl_ok(&["fdb-list", "a"])
        .contains("02:aa:bb:cc:dd:ee"));
    // Moving it to another VTEP replaces the entry.
    d.vpcctl_ok(&["fdb-add", "a", "web", "02:aa:bb:cc:dd:ee", "192.0.2.3"]);
    assert!(
        fdb().contains("02:aa:bb:cc:dd:ee dst 192.0.2.3")
            && !fdb().contains("02:aa:bb:cc:dd:ee dst 192.0.2.2"),
        "{}",
        fdb()
    );
    d.vpcctl_ok(&["fdb-delete", "a", "web", "02:aa:bb:cc:dd:ee"]);
    assert!(
        !fdb().contains("02:aa:bb:cc:dd:ee"),
        "{}\n{}",
        fdb(),
        d.log()
            .lines()
            .filter(|l| l.contains("Remote") || l.contains("failed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A new peer list at restart: flood entries follow it.
    d.kill9();
    let at = d.opts.extra.iter().position(|a| a == "192.0.2.2").unwrap();
    d.opts.extra[at] = "192.0.2.7".into();
    d.spawn().await.unwrap();
    assert!(
        fdb().contains("00:00:00:00:00:00 dst 192.0.2.7"),
        "{}",
        fdb()
    );
    assert!(
        !fdb().contains("dst 192.0.2.2"),
        "stale flood entry: {}",
        fdb()
    );
    for (args, expect) in [
        (
            vec!["fdb-add", "a", "web", "02:aa:bb:cc:dd:ee", "nope"],
            "not an IPv4 address",
        ),
        (
            vec!["fdb-add", "a", "web", "01:00:5e:00:00:01", "192.0.2.2"],
            "not a unicast",
        ),
        (
            vec!["fdb-add", "a", "nope", "02:aa:bb:cc:dd:ee", "192.0.2.2"],
            "subnet a/nope not found",
        ),
        (
            vec!["fdb-delete", "a", "web", "02:aa:bb:cc:dd:ef"],
            "not found",
        ),
    ] {
        let out = d.vpcctl(&args);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expect),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A namespace "VM" deleted behind vpcd's back takes its veth along; its port cannot be made
/// again, and must not block changes to everything else.
#[tokio::test]
async fn a_port_whose_namespace_is_gone_does_not_block_other_changes() {
    let lab = Underlay::new();
    let d = host_daemon(&lab, 1).await;
    tenants(&d);
    let gone = ns_port(&d, "g1", "a", "web", "10.10.1.90", true);
    let stays = ns_port(&d, "g2", "a", "web", "10.10.1.91", true);
    drop(gone);
    d.vpcctl_ok(&[
        "subnet-create",
        "a",
        "extra",
        "10.10.9.0/24",
        "--vni",
        "5009",
    ]);
    let third = ns_port(&d, "g3", "a", "web", "10.10.1.92", true);
    assert!(third.pings("10.10.1.91"));
    drop(stays);
}

/// Without a router, a subnet with ports still gets DHCP: the guest's own udhcpc (run by its
/// init at boot) gets the IPAM address, the MTU option, the gateway as default route and a
/// route to the metadata address via the host's service leg, which answers; the gateway,
/// which no router holds, does not.
#[tokio::test]
async fn guest_gets_its_ipam_address_and_mtu_by_dhcp_without_a_router() {
    let lab = Underlay::new();
    let d = host_daemon(&lab, 1).await;
    tenants(&d);
    let vm = unique("dhcpvm");
    let nic = "[[nics]]\nnetwork = \"a\"\nsubnet = \"web\"\n";
    d.create(&format!("{}{nic}", kernel_spec(&vm, "")), "qmp");
    d.wait_console(&vm, BOOT_MARKER, 1);
    let nics: serde_json::Value =
        serde_json::from_str(&d.vpcctl_ok(&["--json", "domiflist", &vm])).unwrap();
    let ip = nics[0]["ip"].as_str().unwrap().to_string();
    d.wait_console(&vm, &format!("VPCD-DHCP eth0 {ip}/24"), 1);
    let mut shell = d.guest_shell(&vm).await;
    assert_eq!(shell.ok("cat /sys/class/net/eth0/mtu").trim(), "1450");
    let routes = shell.ok("ip -4 route");
    assert!(routes.contains("default via 10.10.1.1"), "{routes}");
    assert!(
        routes.contains("169.254.169.254 via 10.10.1.254"),
        "{routes}"
    );
    let (out, rc) = shell.run("ping -c 2 -W 2 10.10.1.254");
    assert_eq!(rc, 0, "the service leg does not answer: {out}");
    let (out, rc) = shell.run("ping -c 1 -W 1 10.10.1.1");
    assert_ne!(rc, 0, "a gateway answered without a router: {out}");
    drop(shell);
    // The host keeps its service leg off the VxLAN device.
    let table = lab.h1.ok(&["nft", "list", "table", "bridge", "vpcd_vpc"]);
    assert!(table.contains("drop"), "{table}");
    // The service namespace goes with the last port of the tenant.
    d.vpcctl_ok(&["destroy", &vm]);
    d.vpcctl_ok(&["undefine", &vm]);
    let left = d.service_namespaces();
    assert!(left.is_empty(), "service namespaces left: {left:?}");
}
