//! The DHCP server on a real interface against real clients: busybox udhcpc and ISC dhclient,
//! across a veth pair whose server end keeps its checksum offload on (the case where a kernel
//! UDP socket would send offers with unfilled checksums that udhcpc ignores).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Arc, RwLock};

use netdrv::dhcp::{DhcpConfig, DhcpServer, DhcpService};
use netdrv::ipam::Mac;
use netdrv::Netns;

struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        // Unique per test too: the tests of this file may run in parallel.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("nd{}{n}{tag}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        Ns(name)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const CLIENT_MAC: &str = "02:00:00:aa:00:07";

/// Server namespace with `s0` 10.0.1.1/24, client namespace with `c0` (CLIENT_MAC).
fn lab() -> (Ns, Ns, tempfile::TempDir) {
    let s = Ns::new("s");
    let c = Ns::new("c");
    run(
        "ip",
        &[
            "link", "add", "s0", "netns", &s.0, "type", "veth", "peer", "c0", "netns", &c.0,
        ],
    );
    run(
        "ip",
        &["-n", &s.0, "addr", "add", "10.0.1.1/24", "dev", "s0"],
    );
    run("ip", &["-n", &s.0, "link", "set", "s0", "up"]);
    run(
        "ip",
        &["-n", &c.0, "link", "set", "c0", "address", CLIENT_MAC],
    );
    run("ip", &["-n", &c.0, "link", "set", "c0", "up"]);
    let dir = tempfile::tempdir().unwrap();
    (s, c, dir)
}

async fn serve(s: &Ns) -> (DhcpService, Arc<RwLock<DhcpServer>>) {
    let mut server = DhcpServer::new(DhcpConfig {
        server: Ipv4Addr::new(10, 0, 1, 1),
        subnet: "10.0.1.0/24".parse().unwrap(),
        router: Some(Ipv4Addr::new(10, 0, 1, 1)),
        dns: vec![Ipv4Addr::new(10, 0, 1, 1)],
        domain: Some("vpc.internal".into()),
        mtu: Some(1450),
        lease_secs: 600,
        routes: vec![(
            "169.254.169.254/32".parse().unwrap(),
            Ipv4Addr::new(10, 0, 1, 1),
        )],
    });
    server.set_leases([(
        CLIENT_MAC.parse::<Mac>().unwrap(),
        Ipv4Addr::new(10, 0, 1, 7),
    )]);
    let server = Arc::new(RwLock::new(server));
    let ns = Netns::named(&s.0).unwrap();
    let svc = DhcpService::spawn(&ns, "s0", server.clone()).await.unwrap();
    (svc, server)
}

/// Runs busybox udhcpc once (`-n -q`) in the client namespace with `tries` discovers.
async fn udhcpc(c: &Ns, script: &str, tries: u32) -> std::process::Output {
    let (c, script) = (c.0.clone(), script.to_string());
    tokio::task::spawn_blocking(move || {
        Command::new("ip")
            .args([
                "netns", "exec", &c, "busybox", "udhcpc", "-i", "c0", "-n", "-q",
            ])
            .args(["-t", &tries.to_string(), "-T", "1", "-s", &script])
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Runs ISC dhclient once (`-1 -v`) in the client namespace, with its lease file
/// (`<dir>/leases`, which may hold a remembered lease) and pid file in `dir`.
async fn dhclient(c: &Ns, script: &str, dir: &tempfile::TempDir) -> std::process::Output {
    let c = c.0.clone();
    let script = script.to_string();
    let lease = dir.path().join("leases").to_string_lossy().into_owned();
    let pid = dir.path().join("pid").to_string_lossy().into_owned();
    tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args([
                "30", "ip", "netns", "exec", &c, "dhclient", "-1", "-v", "-sf", &script, "-lf",
                &lease, "-pf", &pid, "c0",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// A client script that records what it was given.
fn script(dir: &tempfile::TempDir) -> (String, String) {
    let out = dir.path().join("out");
    let script = dir.path().join("script.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1$reason ip=$ip$new_ip_address mask=$subnet$new_subnet_mask router=$router$new_routers mtu=$mtu$new_interface_mtu dns=$dns$new_domain_name_servers domain=$domain$new_domain_name routes=$staticroutes$new_rfc3442_classless_static_routes\" >> {}\n",
            out.display()
        ),
    )
    .unwrap();
    run("chmod", &["+x", script.to_str().unwrap()]);
    (
        script.to_string_lossy().into_owned(),
        out.to_string_lossy().into_owned(),
    )
}

#[tokio::test]
async fn busybox_udhcpc_gets_its_lease_with_all_options_through_offloaded_veth() {
    let (s, c, dir) = lab();
    let (_svc, _server) = serve(&s).await;
    let (script, out) = script(&dir);
    let res = udhcpc(&c, &script, 5).await;
    let got = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        res.status.success(),
        "udhcpc failed: {}{}\n{got}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    let bound = got
        .lines()
        .find(|l| l.starts_with("bound"))
        .unwrap_or_else(|| panic!("{got}"));
    for want in [
        "ip=10.0.1.7",
        "mask=255.255.255.0",
        "router=10.0.1.1",
        "mtu=1450",
        "dns=10.0.1.1",
        "domain=vpc.internal",
        "169.254.169.254/32",
    ] {
        assert!(bound.contains(want), "{want} missing: {bound}");
    }
}

#[tokio::test]
async fn isc_dhclient_gets_its_lease() {
    let (s, c, dir) = lab();
    let (_svc, _server) = serve(&s).await;
    let (script, out) = script(&dir);
    let res = dhclient(&c, &script, &dir).await;
    let got = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        res.status.success(),
        "dhclient failed: {}\n{got}",
        String::from_utf8_lossy(&res.stderr)
    );
    let bound = got
        .lines()
        .find(|l| l.starts_with("BOUND"))
        .unwrap_or_else(|| {
            panic!(
                "no BOUND in {got:?}: {}",
                String::from_utf8_lossy(&res.stderr)
            )
        });
    for want in [
        "ip=10.0.1.7",
        "mask=255.255.255.0",
        "router=10.0.1.1",
        "mtu=1450",
        "dns=10.0.1.1",
        "domain=vpc.internal",
        // Option 121 as dhclient spells it: prefix length, destination, router.
        "routes=32 169 254 169 254 10 0 1 1",
    ] {
        assert!(bound.contains(want), "{want} missing: {bound}");
    }
}

/// dhclient with a remembered lease for an address the IPAM does not give it: it asks for
/// that address first (INIT-REBOOT), gets a NAK, and then the right one.
#[tokio::test]
async fn isc_dhclient_with_a_wrong_remembered_address_is_naked_then_gets_its_own() {
    let (s, c, dir) = lab();
    let (_svc, _server) = serve(&s).await;
    let (script, out) = script(&dir);
    std::fs::write(
        dir.path().join("leases"),
        "lease {\n  interface \"c0\";\n  fixed-address 10.0.1.99;\n  \
         option subnet-mask 255.255.255.0;\n  option dhcp-server-identifier 10.0.1.1;\n  \
         renew 4 2037/12/31 00:00:00;\n  rebind 4 2037/12/31 00:00:00;\n  \
         expire 4 2037/12/31 00:00:00;\n}\n",
    )
    .unwrap();
    let res = dhclient(&c, &script, &dir).await;
    let log = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "dhclient failed: {log}");
    assert!(log.contains("DHCPREQUEST for 10.0.1.99"), "{log}");
    assert!(log.contains("DHCPNAK from 10.0.1.1"), "{log}");
    let got = std::fs::read_to_string(&out).unwrap_or_default();
    let bound = got
        .lines()
        .find(|l| l.starts_with("BOUND"))
        .unwrap_or_else(|| panic!("no BOUND in {got:?}: {log}"));
    assert!(bound.contains("ip=10.0.1.7"), "{bound}");
}

#[tokio::test]
async fn unknown_clients_get_no_offer() {
    let (s, c, dir) = lab();
    let (_svc, server) = serve(&s).await;
    server.write().unwrap().set_leases([]);
    let (script, out) = script(&dir);
    let res = udhcpc(&c, &script, 2).await;
    assert!(!res.status.success(), "udhcpc got a lease it should not");
    let got = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(!got.contains("bound"), "{got}");
}
