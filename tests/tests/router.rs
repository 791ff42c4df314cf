//! Virtual routers against real kernel objects: a vpcd "host" namespace with an external
//! bridge, an "external" namespace on it (203.0.113.1, the routers' next hop), namespace "VMs"
//! and real guests. Routing between subnets, SNAT (the source the external side sees), floating
//! IPs attached and detached live, tenant isolation with overlapping CIDRs, static routes,
//! crash safety, and the metadata service.

use vpcd_tests::*;

const EXT_GW: &str = "203.0.113.1";

/// A vpcd host with an external network: `world`, a namespace holding the external gateway
/// address, joined to the host namespace by a veth whose host end `wx` is either in a bridge
/// `xbr` (the external link) or is itself the external link (an interface: macvlan legs).
struct Lab {
    host: Ns,
    world: Ns,
    external_link: &'static str,
}

impl Lab {
    fn new() -> Lab {
        Lab::with_link(true)
    }

    fn with_link(bridge: bool) -> Lab {
        let host = Ns::new("rh");
        let world = Ns::new("rw");
        sh(
            "ip",
            &[
                "link",
                "add",
                "wx",
                "netns",
                &host.name,
                "type",
                "veth",
                "peer",
                "eth0",
                "netns",
                &world.name,
            ],
        );
        host.ok(&["ip", "link", "set", "wx", "up"]);
        if bridge {
            host.ok(&["ip", "link", "add", "xbr", "type", "bridge"]);
            host.ok(&["ip", "link", "set", "xbr", "up"]);
            host.ok(&["ip", "link", "set", "wx", "master", "xbr"]);
        }
        world.ok(&["ip", "addr", "add", &format!("{EXT_GW}/24"), "dev", "eth0"]);
        world.ok(&["ip", "link", "set", "eth0", "up"]);
        let external_link = if bridge { "xbr" } else { "wx" };
        Lab {
            host,
            world,
            external_link,
        }
    }

    fn flags(&self) -> Vec<String> {
        [
            "--netns",
            &self.host.path(),
            "--external-link",
            self.external_link,
            "--external-cidr",
            "203.0.113.0/24",
            "--external-gateway",
            EXT_GW,
            "--external-pool",
            "203.0.113.10-203.0.113.20",
            "--dns-server",
            "192.0.2.53",
            "--dns-domain",
            "tenant-a.example",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    async fn daemon(&self) -> Daemon {
        let opts = DaemonOpts {
            backend: "qmp",
            extra: self.flags(),
            ..Default::default()
        };
        Daemon::start_with(opts, Bus::open()).await
    }
}

/// A namespace VM on `net/subnet` with address `ip` and its gateway as default route.
fn vm(d: &Daemon, tag: &str, net: &str, subnet: &str, ip: &str, gw: &str) -> Ns {
    let ns = ns_port(d, tag, net, subnet, ip, true);
    ns.ok(&["ip", "route", "add", "default", "via", gw]);
    ns
}

/// The HTTP status of a metadata request from namespace VM `ns` ("000": no answer).
fn metadata_status(ns: &Ns) -> String {
    let out = ns.run(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        "http://169.254.169.254/latest/meta-data/hostname",
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The vpcctl error line of a failing verb.
fn fails(d: &Daemon, args: &[&str]) -> String {
    let out = d.vpcctl(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn router_ns(d: &Daemon, router: &str) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&d.vpcctl_ok(&["--json", "router-info", router])).unwrap();
    info["namespace"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn routes_snats_and_maps_floating_ips_between_namespace_vms() {
    let lab = Lab::new();
    // A table vpcd does not own, in the host namespace: it stays as it is throughout.
    lab.host.ok(&["nft", "add", "table", "inet", "keepme"]);
    let d = lab.daemon().await;
    d.vpcctl_ok(&["net-create", "a"]);
    d.vpcctl_ok(&["subnet-create", "a", "web", "10.20.1.0/24"]);
    d.vpcctl_ok(&["subnet-create", "a", "db", "10.20.2.0/24"]);
    d.vpcctl_ok(&["subnet-create", "a", "lone", "10.20.3.0/24"]);
    let web = vm(&d, "w1", "a", "web", "10.20.1.5", "10.20.1.1");
    let db = vm(&d, "d1", "a", "db", "10.20.2.5", "10.20.2.1");
    let lone = vm(&d, "l1", "a", "lone", "10.20.3.5", "10.20.3.1");

    // Without a router: the service leg answers, the gateway does not, nothing is routed.
    assert!(web.pings("10.20.1.254"));
    assert!(
        !web.pings("10.20.1.1"),
        "a gateway answered without a router"
    );
    assert!(!web.pings("10.20.2.5"), "routed without a router");

    d.vpcctl_ok(&["router-create", "r1", "a"]);
    d.vpcctl_ok(&["router-add-subnet", "r1", "web"]);
    d.vpcctl_ok(&["router-add-subnet", "r1", "a/db"]);
    assert!(web.pings("10.20.2.5"), "web -> db through the router");
    assert!(db.pings("10.20.1.5"), "db -> web through the router");
    // A subnet not attached is not routed, though its DHCP leg shares the namespace.
    assert!(lone.pings("10.20.3.254"));
    assert!(
        !lone.pings("10.20.3.1"),
        "an unattached subnet has a gateway"
    );
    assert!(!lone.pings("10.20.1.5"), "an unattached subnet was routed");
    assert!(!web.pings(EXT_GW), "reached outside without a gateway");

    // SNAT: the external side sees the router's external address.
    let out = d.vpcctl_ok(&["router-set-gateway", "r1"]);
    assert!(out.contains("203.0.113.10"), "{out}");
    assert!(web.pings(EXT_GW));
    let seen = lab.world.http_once("203.0.113.1:8080");
    assert!(web.tcp_from("203.0.113.1:8080").is_some());
    assert_eq!(
        seen.join().unwrap().unwrap().ip().to_string(),
        "203.0.113.10"
    );

    // A floating IP: reachable from outside while attached, and the VM's own source.
    let out = d.vpcctl_ok(&["fip-create"]);
    assert!(out.contains("203.0.113.11"), "{out}");
    assert!(
        !lab.world.pings("203.0.113.11"),
        "an unattached floating IP answered"
    );
    let web_port = port_id_in(&d, Some("a"), "10.20.1.5").to_string();
    d.vpcctl_ok(&["fip-attach", "203.0.113.11", &web_port]);
    assert!(lab.world.pings("203.0.113.11"), "floating IP not reachable");
    let seen_in_vm = web.http_once("10.20.1.5:8081");
    assert!(lab.world.tcp_from("203.0.113.11:8081").is_some());
    assert_eq!(seen_in_vm.join().unwrap().unwrap().ip().to_string(), EXT_GW);
    let seen = lab.world.http_once("203.0.113.1:8082");
    assert!(web.tcp_from("203.0.113.1:8082").is_some());
    assert_eq!(
        seen.join().unwrap().unwrap().ip().to_string(),
        "203.0.113.11"
    );
    let fips: serde_json::Value =
        serde_json::from_str(&d.vpcctl_ok(&["--json", "fip-list"])).unwrap();
    assert_eq!(fips[0]["port"].to_string(), web_port);
    // A flow through the floating IP, then detach: its conntrack entries go with the mapping.
    let ns = router_ns(&d, "r1");
    assert!(lab.world.pings("203.0.113.11"));
    let flows = |ns: &str| {
        sh(
            "ip",
            &["netns", "exec", ns, "conntrack", "-L", "-d", "203.0.113.11"],
        )
    };
    assert!(flows(&ns).contains("203.0.113.11"), "no flow before detach");
    d.vpcctl_ok(&["fip-detach", "203.0.113.11"]);
    assert!(
        !flows(&ns).contains("203.0.113.11"),
        "flows left after detach: {}",
        flows(&ns)
    );
    assert!(!lab.world.pings("203.0.113.11"), "reachable after detach");
    assert!(web.pings(EXT_GW), "SNAT after detach");

    // Drift: the router's table deleted behind vpcd's back is written again at the next
    // change; a table of someone else's in the router namespace is left alone.
    let nft = |args: &[&str]| {
        let mut cmd = vec!["ip", "netns", "exec", &ns, "nft"];
        cmd.extend_from_slice(args);
        sh(cmd[0], &cmd[1..])
    };
    nft(&["add", "table", "inet", "theirs"]);
    nft(&["delete", "table", "ip", "vpcd"]);
    d.vpcctl_ok(&["router-add-subnet", "r1", "web"]); // attached already: changes nothing
    assert!(
        nft(&["list", "tables"]).contains("table ip vpcd"),
        "table not restored"
    );
    assert!(nft(&["list", "tables"]).contains("table inet theirs"));
    assert!(web.pings(EXT_GW), "SNAT after the table came back");

    // Bad input: typed errors, nothing changed.
    d.vpcctl_ok(&["net-create", "b"]);
    d.vpcctl_ok(&["subnet-create", "b", "web", "10.20.1.0/24"]);
    let before = (
        d.vpcctl_ok(&["--json", "router-list"]),
        d.vpcctl_ok(&["--json", "router-info", "r1"]),
        d.vpcctl_ok(&["--json", "fip-list"]),
        d.vpcctl_ok(&["--json", "net-info", "b"]),
    );
    let e = fails(&d, &["router-set-gateway", "r1", "--ip", "198.51.100.9"]);
    assert!(e.contains("198.51.100.9") && e.contains("pool"), "{e}");
    let e = fails(&d, &["router-set-gateway", "r1", "--ip", "203.0.113.11"]);
    assert!(e.contains("in use"), "{e}");
    let e = fails(&d, &["router-add-subnet", "r1", "b/web"]);
    assert!(e.contains("InvalidArgument") && e.contains("b/web"), "{e}");
    let e = fails(&d, &["fip-create", "--ip", "198.51.100.7"]);
    assert!(e.contains("outside the external pool"), "{e}");
    let e = fails(&d, &["fip-create", "--ip", "203.0.113.10"]);
    assert!(e.contains("in use"), "{e}");
    let e = fails(
        &d,
        &["router-add-route", "r1", "192.168.9.0/24", "10.99.0.1"],
    );
    assert!(e.contains("next hop 10.99.0.1"), "{e}");
    let e = fails(&d, &["router-create", "r2", "a"]);
    assert!(e.contains("already has router r1"), "{e}");
    let e = fails(&d, &["subnet-delete", "a", "web"]);
    assert!(e.contains("InvalidState"), "{e}");
    let after = (
        d.vpcctl_ok(&["--json", "router-list"]),
        d.vpcctl_ok(&["--json", "router-info", "r1"]),
        d.vpcctl_ok(&["--json", "fip-list"]),
        d.vpcctl_ok(&["--json", "net-info", "b"]),
    );
    assert_eq!(before, after, "a refused request changed something");

    // A static route shows in the router's namespace.
    d.vpcctl_ok(&["router-add-route", "r1", "192.168.9.0/24", "10.20.1.5"]);
    let ns = router_ns(&d, "r1");
    let routes = sh("ip", &["-n", &ns, "route", "show"]);
    assert!(routes.contains("192.168.9.0/24 via 10.20.1.5"), "{routes}");
    assert!(
        routes.contains(&format!("default via {EXT_GW}")),
        "{routes}"
    );
    // ... and carries traffic: db reaches 192.168.9.1, which web holds behind the next hop
    // (web's port lets that source through only with port security off).
    web.ok(&["ip", "addr", "add", "192.168.9.1/32", "dev", "lo"]);
    d.vpcctl_ok(&["port-security", &web_port, "off"]);
    assert!(db.pings("192.168.9.1"), "traffic over the static route");
    d.vpcctl_ok(&["port-security", &web_port, "on"]);
    assert!(!db.pings("192.168.9.1"), "port security back on");

    // Tenant b, same CIDR as a/web, with a router of its own: reaches nothing of a's.
    let b1 = vm(&d, "b1", "b", "web", "10.20.1.5", "10.20.1.1");
    d.vpcctl_ok(&["router-create", "rb", "b"]);
    d.vpcctl_ok(&["router-add-subnet", "rb", "web"]);
    assert!(b1.pings("10.20.1.1"), "b's own gateway");
    let b2 = vm(&d, "b2", "b", "web", "10.20.1.6", "10.20.1.1");
    assert!(b2.pings("10.20.1.5"), "b's own VM with a's address");
    // While b probes a's addresses, nothing from b arrives at a's VM with the same CIDR.
    let capture =
        web.capture("src net 10.20.1.0/24 and not src host 10.20.1.1 and not src host 10.20.1.254");
    assert!(!b2.pings("10.20.2.5"), "b reached a/db");
    assert!(!b2.pings("10.20.3.254"), "b reached a's namespace");
    assert!(!b2.pings("10.20.3.5"), "b reached a/lone");
    b2.run(&["ping", "-c", "2", "-b", "-W", "1", "10.20.1.255"]);
    b2.run(&[
        "busybox",
        "arping",
        "-c",
        "2",
        "-w",
        "2",
        "-I",
        "eth0",
        "10.20.1.5",
    ]);
    let seen = capture.stop();
    assert!(seen.is_empty(), "a's VM saw b's frames: {seen:?}");

    // SIGKILL and restart: traffic goes on while vpcd is down; afterwards everything is still
    // there and still works.
    d.vpcctl_ok(&["fip-attach", "203.0.113.11", &web_port]);
    let mut d = d;
    d.kill9();
    assert!(web.pings("10.20.2.5"), "routing while vpcd is down");
    assert!(
        lab.world.pings("203.0.113.11"),
        "floating IP while vpcd is down"
    );
    d.restart().await;
    assert!(web.pings("10.20.2.5"), "routing after restart");
    assert!(lab.world.pings("203.0.113.11"), "floating IP after restart");
    let fips: serde_json::Value =
        serde_json::from_str(&d.vpcctl_ok(&["--json", "fip-list"])).unwrap();
    assert_eq!(fips[0]["port"].to_string(), web_port);
    let lease = web.run(&[
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-t",
        "3",
        "-s",
        "/bin/true",
    ]);
    assert!(lease.status.success(), "DHCP after restart: {lease:?}");
    // A namespace port is no VM: 404, from a metadata service that is there.
    assert_eq!(metadata_status(&web), "404");
    // Out through its floating IP, and db (no floating IP) through the router's address.
    let seen = lab.world.http_once("203.0.113.1:8083");
    assert!(web.tcp_from("203.0.113.1:8083").is_some());
    assert_eq!(
        seen.join().unwrap().unwrap().ip().to_string(),
        "203.0.113.11"
    );
    let seen = lab.world.http_once("203.0.113.1:8086");
    assert!(db.tcp_from("203.0.113.1:8086").is_some());
    assert_eq!(
        seen.join().unwrap().unwrap().ip().to_string(),
        "203.0.113.10"
    );

    // Tear down: the external leg and the router namespace go with the last subnet and port.
    d.vpcctl_ok(&["fip-delete", "203.0.113.11"]);
    d.vpcctl_ok(&["router-set-gateway", "r1", "--clear"]);
    let ext_legs = lab.host.ok(&["ip", "-o", "link", "show", "master", "xbr"]);
    assert!(!ext_legs.contains("vpce"), "external leg left: {ext_legs}");
    for s in ["web", "db"] {
        d.vpcctl_ok(&["router-remove-subnet", "r1", s]);
    }
    d.vpcctl_ok(&["router-delete", "r1"]);
    d.vpcctl_ok(&["router-remove-subnet", "rb", "web"]);
    d.vpcctl_ok(&["router-delete", "rb"]);
    for ip in ["10.20.1.5", "10.20.2.5", "10.20.3.5"] {
        let id = port_id_in(&d, Some("a"), ip).to_string();
        d.vpcctl_ok(&["port-delete", &id]);
    }
    for ip in ["10.20.1.5", "10.20.1.6"] {
        let id = port_id_in(&d, Some("b"), ip).to_string();
        d.vpcctl_ok(&["port-delete", &id]);
    }
    let left = d.service_namespaces();
    assert!(left.is_empty(), "service namespaces left: {left:?}");
    let links: Vec<String> = lab
        .host
        .links()
        .into_iter()
        .filter(|l| l.starts_with("vpc"))
        .collect();
    assert!(links.is_empty(), "links left: {links:?}");
    let tables = lab.host.ok(&["nft", "list", "tables"]);
    assert!(tables.contains("table inet keepme"), "{tables}");
    drop((web, db, lone, b1, b2));
}

/// Reads the metadata service at `argv[2]` with cloud-init's own EC2 and OpenStack readers
/// (cloud-init's package at `argv[1]`) and prints what they got, as JSON.
const CLOUD_INIT_READERS: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
from cloudinit.sources.helpers import ec2, openstack
base = sys.argv[2]
out = {}
for v in ("2009-04-04", "2021-03-23", "latest"):
    out["ec2/" + v] = ec2.get_instance_metadata(api_version=v, metadata_address=base, retries=2, timeout=10)
out["ec2-userdata"] = ec2.get_instance_userdata(api_version="2009-04-04", metadata_address=base, retries=2, timeout=10)
reader = openstack.MetadataReader(base, retries=2, timeout=10)
reader._read_ec2_metadata = lambda: {}  # read above, through the same address
v2 = reader.read_v2()
out["openstack"] = {"metadata": v2["metadata"], "userdata": v2["userdata"]}
print(json.dumps(out, default=lambda b: b.decode() if isinstance(b, bytes) else str(b)))
"#;

/// The body of an HTTP GET from inside a guest (busybox nc: the image's busybox wget crashes
/// in its static resolver).
fn http_get(shell: &mut GuestShell, host: &str, port: u16, path: &str) -> String {
    let out = shell.ok(&format!(
        "printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | timeout 10 nc -w 5 {host} {port}"
    ));
    let out = out.replace('\r', "");
    let (head, body) = out
        .split_once("\n\n")
        .unwrap_or_else(|| panic!("no HTTP reply for {path}: {out:?}"));
    assert!(head.contains(" 200 "), "GET {path}: {head}");
    body.to_string()
}

#[tokio::test]
async fn guests_get_dhcp_route_snat_and_only_their_own_metadata() {
    let lab = Lab::new();
    let d = lab.daemon().await;
    d.vpcctl_ok(&["net-create", "a"]);
    d.vpcctl_ok(&["subnet-create", "a", "web", "10.30.1.0/24"]);
    d.vpcctl_ok(&["subnet-create", "a", "db", "10.30.2.0/24"]);
    d.vpcctl_ok(&["router-create", "r1", "a"]);
    d.vpcctl_ok(&["router-add-subnet", "r1", "web"]);
    d.vpcctl_ok(&["router-add-subnet", "r1", "db"]);
    d.vpcctl_ok(&["router-set-gateway", "r1"]);
    let db = vm(&d, "d1", "a", "db", "10.30.2.5", "10.30.2.1");

    let nic = "[[nics]]\nnetwork = \"a\"\nsubnet = \"web\"\n";
    let mut guests = Vec::new();
    for (i, host) in ["alpha", "beta"].iter().enumerate() {
        let name = unique(&format!("md{i}"));
        let ci = format!(
            "[cloud_init]\nhostname = \"{host}\"\nuser_data = \"#cloud-config\\n# for {host}\\n\"\n"
        );
        d.create(&format!("{}{nic}{ci}", kernel_spec(&name, "")), "qmp");
        guests.push((name, host.to_string()));
    }
    for (name, host) in &guests {
        d.wait_console(name, BOOT_MARKER, 1);
        let nics: serde_json::Value =
            serde_json::from_str(&d.vpcctl_ok(&["--json", "domiflist", name])).unwrap();
        let ip = nics[0]["ip"].as_str().unwrap().to_string();
        d.wait_console(name, &format!("VPCD-DHCP eth0 {ip}/24"), 1);
        let mut shell = d.guest_shell(name).await;
        assert_eq!(shell.ok("cat /sys/class/net/eth0/mtu").trim(), "1500");
        let (out, rc) = shell.run("ping -c 2 -W 2 10.30.1.1");
        assert_eq!(rc, 0, "gateway: {out}");
        let (out, rc) = shell.run("ping -c 2 -W 2 10.30.2.5");
        assert_eq!(rc, 0, "a VM in the other subnet through the router: {out}");
        // SNAT: the external side sees the router's address.
        let seen = lab.world.http_once("203.0.113.1:8090");
        let body = http_get(&mut shell, "203.0.113.1", 8090, "/");
        assert_eq!(body.trim(), "hello", "external through SNAT");
        assert_eq!(
            seen.join().unwrap().unwrap().ip().to_string(),
            "203.0.113.10"
        );
        // Metadata: its own, in both layouts.
        let get = |shell: &mut GuestShell, path: &str| http_get(shell, "169.254.169.254", 80, path);
        assert_eq!(get(&mut shell, "/latest/meta-data/hostname").trim(), host);
        assert_eq!(get(&mut shell, "/latest/meta-data/local-ipv4").trim(), ip);
        let user = get(&mut shell, "/latest/user-data");
        assert!(user.contains(&format!("# for {host}")), "{user}");
        let other = if host == "alpha" { "beta" } else { "alpha" };
        assert!(!user.contains(other), "{user}");
        let meta = get(&mut shell, "/openstack/latest/meta_data.json");
        let j: serde_json::Value = serde_json::from_str(meta.trim()).unwrap();
        assert_eq!(j["hostname"], host.as_str());
        assert_eq!(j["name"], name.as_str());
        let uuid: serde_json::Value =
            serde_json::from_str(&d.vpcctl_ok(&["--json", "dominfo", name])).unwrap();
        assert_eq!(j["uuid"], uuid["uuid"]);
        // DNS from DHCP: the configured server and domain.
        let resolv = shell.ok("cat /etc/resolv.conf");
        assert!(resolv.contains("nameserver 192.0.2.53"), "{resolv}");
        assert!(resolv.contains("search tenant-a.example"), "{resolv}");
        // cloud-init's own readers, through a relay in the guest (so the request comes from
        // the guest's address): both layouts, dated versions too, and only its own data.
        shell.ok("nc -ll -p 8775 -e nc 169.254.169.254 80 >/dev/null 2>&1 &");
        let out = db.ok(&[
            "/usr/bin/python3",
            "-c",
            CLOUD_INIT_READERS,
            &cloud_init_lib().to_string_lossy(),
            &format!("http://{ip}:8775"),
        ]);
        let got: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("cloud-init readers: {e}: {out}"));
        for v in ["2009-04-04", "2021-03-23", "latest"] {
            let md = &got[format!("ec2/{v}")];
            assert_eq!(md["instance-id"], uuid["uuid"], "{v}: {md}");
            assert_eq!(md["local-hostname"], host.as_str(), "{v}: {md}");
            assert_eq!(md["local-ipv4"], ip.as_str(), "{v}: {md}");
        }
        let ud = got["ec2-userdata"].as_str().unwrap();
        assert!(
            ud.contains(&format!("# for {host}")) && !ud.contains(other),
            "{ud}"
        );
        let os = &got["openstack"];
        assert_eq!(os["metadata"]["instance-id"], uuid["uuid"], "{os}");
        assert_eq!(os["metadata"]["local-hostname"], host.as_str(), "{os}");
        let ud = os["userdata"].as_str().unwrap();
        assert!(
            ud.contains(&format!("# for {host}")) && !ud.contains(other),
            "{ud}"
        );
        shell.ok("pkill -f 'nc -ll'; true");
    }
    // A namespace port is no VM: nothing for it.
    assert_eq!(metadata_status(&db), "404");
    for (name, _) in &guests {
        d.vpcctl_ok(&["destroy", name]);
        d.vpcctl_ok(&["undefine", name]);
    }
}

/// The seed's layout: VMs on a compute host, their router on a route host, VxLAN between. The
/// compute host's guest gets DHCP from its own host's service leg (which holds no gateway and
/// stays local), is routed by the route host's router (to a VM there and, with SNAT, outside),
/// and gets its metadata from its own host, which knows it.
#[tokio::test]
async fn a_compute_host_vm_is_routed_by_the_route_host_and_served_locally() {
    let lab = Lab::new();
    let compute = Ns::new("ch");
    sh(
        "ip",
        &[
            "link",
            "add",
            "ul",
            "netns",
            &lab.host.name,
            "type",
            "veth",
            "peer",
            "ul",
            "netns",
            &compute.name,
        ],
    );
    for (ns, ip) in [(&lab.host, "192.0.2.1/24"), (&compute, "192.0.2.2/24")] {
        ns.ok(&["ip", "addr", "add", ip, "dev", "ul"]);
        ns.ok(&["ip", "link", "set", "ul", "up"]);
    }
    let mut extra = lab.flags();
    extra.extend(["--underlay-ip", "192.0.2.1", "--peer", "192.0.2.2"].map(String::from));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let route = qmp_daemon(&extra).await;
    let comp = qmp_daemon(&[
        "--netns",
        &compute.path(),
        "--underlay-ip",
        "192.0.2.2",
        "--peer",
        "192.0.2.1",
        "--role",
        "compute",
    ])
    .await;
    for d in [&route, &comp] {
        d.vpcctl_ok(&["net-create", "a"]);
        d.vpcctl_ok(&["subnet-create", "a", "web", "10.40.1.0/24", "--vni", "7001"]);
        d.vpcctl_ok(&["subnet-create", "a", "db", "10.40.2.0/24", "--vni", "7002"]);
    }
    route.vpcctl_ok(&["router-create", "r1", "a"]);
    route.vpcctl_ok(&["router-add-subnet", "r1", "web"]);
    route.vpcctl_ok(&["router-add-subnet", "r1", "db"]);
    route.vpcctl_ok(&["router-set-gateway", "r1"]);
    let db = vm(&route, "d1", "a", "db", "10.40.2.5", "10.40.2.1");

    let name = unique("far");
    let spec = format!(
        "{}[[nics]]\nnetwork = \"a\"\nsubnet = \"web\"\n[cloud_init]\nhostname = \"gamma\"\n",
        kernel_spec(&name, "")
    );
    comp.create(&spec, "qmp");
    comp.wait_console(&name, BOOT_MARKER, 1);
    let nics: serde_json::Value =
        serde_json::from_str(&comp.vpcctl_ok(&["--json", "domiflist", &name])).unwrap();
    let ip = nics[0]["ip"].as_str().unwrap().to_string();
    comp.wait_console(&name, &format!("VPCD-DHCP eth0 {ip}/24"), 1);
    let mut shell = comp.guest_shell(&name).await;
    let routes = shell.ok("ip -4 route");
    assert!(routes.contains("default via 10.40.1.1"), "{routes}");
    assert!(
        routes.contains("169.254.169.254 via 10.40.1.254"),
        "{routes}"
    );
    let (out, rc) = shell.run("ping -c 2 -W 2 10.40.2.5");
    assert_eq!(rc, 0, "the VM on the route host, through the router: {out}");
    // The gateway the guest resolved is the route host's router leg, not its own host's.
    let neigh = shell.ok("ip neigh show 10.40.1.1");
    let router_ns = router_ns(&route, "r1");
    let leg_mac = sh("ip", &["-n", &router_ns, "-br", "link", "show", "gw1"]);
    let leg_mac = leg_mac.split_whitespace().nth(2).unwrap().to_string();
    assert!(neigh.contains(&leg_mac), "gateway {neigh} is not {leg_mac}");
    let seen = lab.world.http_once("203.0.113.1:8091");
    let body = http_get(&mut shell, "203.0.113.1", 8091, "/");
    assert_eq!(body.trim(), "hello", "external through SNAT");
    assert_eq!(
        seen.join().unwrap().unwrap().ip().to_string(),
        "203.0.113.10"
    );
    // Metadata from its own host: the route host does not know it.
    let host = http_get(
        &mut shell,
        "169.254.169.254",
        80,
        "/latest/meta-data/hostname",
    );
    assert_eq!(host.trim(), "gamma");
    let local = http_get(
        &mut shell,
        "169.254.169.254",
        80,
        "/latest/meta-data/local-ipv4",
    );
    assert_eq!(local.trim(), ip);
    assert!(db.pings(&ip), "route host VM -> compute host guest");
    drop(shell);
    comp.vpcctl_ok(&["destroy", &name]);
    comp.vpcctl_ok(&["undefine", &name]);
}

#[tokio::test]
async fn routers_need_the_route_role() {
    let lab = Lab::new();
    let mut extra = lab.flags();
    extra.extend(["--role".to_string(), "compute".to_string()]);
    let opts = DaemonOpts {
        backend: "qmp",
        extra,
        ..Default::default()
    };
    let d = Daemon::start_with(opts, Bus::open()).await;
    d.vpcctl_ok(&["net-create", "a"]);
    let e = fails(&d, &["router-create", "r1", "a"]);
    assert!(
        e.contains("InvalidState") && e.contains("route role"),
        "{e}"
    );
    assert!(d.vpcctl_ok(&["--json", "router-list"]).trim() == "[]");
}

#[tokio::test]
async fn an_external_interface_gets_macvlan_legs() {
    let lab = Lab::with_link(false);
    let d = lab.daemon().await;
    d.vpcctl_ok(&["net-create", "a"]);
    d.vpcctl_ok(&["subnet-create", "a", "web", "10.40.1.0/24"]);
    let web = vm(&d, "w1", "a", "web", "10.40.1.5", "10.40.1.1");
    d.vpcctl_ok(&["router-create", "r1", "a"]);
    d.vpcctl_ok(&["router-add-subnet", "r1", "web"]);
    d.vpcctl_ok(&["router-set-gateway", "r1"]);
    let ns = router_ns(&d, "r1");
    let ext = sh("ip", &["-n", &ns, "-d", "link", "show", "ext0"]);
    assert!(ext.contains("macvlan"), "{ext}");
    let seen = lab.world.http_once("203.0.113.1:8084");
    assert!(web.tcp_from("203.0.113.1:8084").is_some());
    assert_eq!(
        seen.join().unwrap().unwrap().ip().to_string(),
        "203.0.113.10"
    );
    d.vpcctl_ok(&["fip-create"]);
    let port = port_id_in(&d, Some("a"), "10.40.1.5").to_string();
    d.vpcctl_ok(&["fip-attach", "203.0.113.11", &port]);
    assert!(
        lab.world.pings("203.0.113.11"),
        "floating IP through the macvlan leg"
    );
    d.vpcctl_ok(&["fip-delete", "203.0.113.11"]);
    d.vpcctl_ok(&["router-set-gateway", "r1", "--clear"]);
    let links = sh("ip", &["-n", &ns, "link", "show"]);
    assert!(!links.contains("ext0"), "macvlan leg left: {links}");
    assert!(!web.pings(EXT_GW), "reached outside without a gateway");
}
