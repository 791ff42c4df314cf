//! netdrv's BGP sessions against a real FRR route reflector (zebra + bgpd in a namespace), as
//! root: `cargo test -p netdrv --test bgp_frr -- --test-threads=1`.
//!
//! Lab (removed on drop, also when a test fails): namespaces `vbg<pid>-<n>-{lan,rr,a,b}`; `lan`
//! holds a bridge, the others a veth into it: rr 10.77.0.1 (FRR, AS 65000 or the test's,
//! `bgp listen range`, route-reflector-client for l2vpn evpn; optionally also a VTEP of one VNI
//! with `advertise-all-vni`), a 10.77.0.2 and b 10.77.0.3 (our speakers).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use netdrv::bgp::session::{Session, SessionConfig, SessionEvent};
use netdrv::bgp::wire::{
    route_target, vxlan_encapsulation, Attributes, EvpnRoute, PmsiTunnel, Rd, AS_TRANS,
    PMSI_INGRESS_REPLICATION,
};
use netdrv::Netns;

static SEQ: AtomicUsize = AtomicUsize::new(0);
const RR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

mod common;
use common::sh;

struct Lab {
    prefix: String,
    frr_dir: PathBuf,
    /// The reflector's AS (iBGP: also the speakers' peer AS).
    asn: u32,
}

impl Lab {
    fn new() -> Lab {
        Lab::start(65000, None)
    }

    /// A lab whose reflector is in `asn`; with `vni`, FRR is also a VTEP of that VNI (a VxLAN
    /// device in a bridge in its namespace), so that it originates EVPN routes of its own and
    /// imports ours if their route target is the one it derives.
    fn start(asn: u32, vni: Option<u32>) -> Lab {
        let prefix = format!(
            "vbg{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let frr_dir = std::env::temp_dir().join(format!("{prefix}-frr"));
        let lab = Lab {
            prefix,
            frr_dir,
            asn,
        };
        let lan = lab.ns("lan");
        sh(&["ip", "netns", "add", &lan]);
        sh(&["ip", "-n", &lan, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &lan, "link", "set", "br0", "up"]);
        for (n, ip) in [("rr", "10.77.0.1"), ("a", "10.77.0.2"), ("b", "10.77.0.3")] {
            let ns = lab.ns(n);
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            let port = format!("p{n}");
            sh(&[
                "ip", "-n", &lan, "link", "add", "name", &port, "type", "veth", "peer", "eth0",
                "netns", &ns,
            ]);
            sh(&[
                "ip", "-n", &lan, "link", "set", &port, "master", "br0", "up",
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        }
        if let Some(vni) = vni {
            let rr = lab.ns("rr");
            let (vx, br, id) = (format!("vx{vni}"), format!("br{vni}"), vni.to_string());
            sh(&["ip", "-n", &rr, "link", "add", &br, "type", "bridge"]);
            sh(&[
                "ip",
                "-n",
                &rr,
                "link",
                "add",
                &vx,
                "type",
                "vxlan",
                "id",
                &id,
                "local",
                "10.77.0.1",
                "dstport",
                "4789",
                "nolearning",
            ]);
            sh(&["ip", "-n", &rr, "link", "set", &vx, "master", &br]);
            sh(&["ip", "-n", &rr, "link", "set", &br, "up"]);
            sh(&["ip", "-n", &rr, "link", "set", &vx, "up"]);
        }
        lab.start_frr(vni.is_some());
        lab
    }

    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    fn start_frr(&self, vtep: bool) {
        let d = &self.frr_dir;
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("zebra.conf"), "hostname rr\n").unwrap();
        let asn = self.asn;
        let vtep = if vtep { "  advertise-all-vni\n" } else { "" };
        std::fs::write(
            d.join("bgpd.conf"),
            format!(
                "router bgp {asn}\n bgp router-id 10.77.0.1\n no bgp default ipv4-unicast\n \
                 neighbor VTEP peer-group\n neighbor VTEP remote-as {asn}\n \
                 bgp listen range 10.77.0.0/24 peer-group VTEP\n address-family l2vpn evpn\n  \
                 neighbor VTEP activate\n  neighbor VTEP route-reflector-client\n{vtep} \
                 exit-address-family\n"
            ),
        )
        .unwrap();
        sh(&["chown", "-R", "frr:frr", d.to_str().unwrap()]);
        let ds = d.to_str().unwrap().to_string();
        let zsock = format!("{ds}/zserv.api");
        let rr = self.ns("rr");
        for (daemon, extra) in [("zebra", vec![]), ("bgpd", vec!["-l", "10.77.0.1"])] {
            let mut args = vec![
                "ip".to_string(),
                "netns".into(),
                "exec".into(),
                rr.clone(),
                format!("/usr/lib/frr/{daemon}"),
                "-d".into(),
                "-f".into(),
                format!("{ds}/{daemon}.conf"),
                "-i".into(),
                format!("{ds}/{daemon}.pid"),
                "-z".into(),
                zsock.clone(),
                "--vty_socket".into(),
                ds.clone(),
                "-A".into(),
                "127.0.0.1".into(),
                "-P".into(),
                "0".into(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            sh(&a);
        }
    }

    fn vtysh(&self, cmd: &str) -> String {
        sh(&[
            "vtysh",
            "--vty_socket",
            self.frr_dir.to_str().unwrap(),
            "-c",
            cmd,
        ])
    }

    fn speaker(&self, n: &str, asn: u32, id: Ipv4Addr) -> Session {
        let netns = Netns::named(&self.ns(n)).unwrap();
        let mut cfg = SessionConfig::new(asn, id, SocketAddr::from((RR, 179)), netns);
        cfg.peer_as = self.asn;
        cfg.hold_time = 9;
        Session::spawn(cfg)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for daemon in ["bgpd", "zebra"] {
            if let Ok(pid) = std::fs::read_to_string(self.frr_dir.join(format!("{daemon}.pid"))) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).output();
            }
        }
        for n in ["a", "b", "rr", "lan"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.frr_dir);
    }
}

fn rd(id: Ipv4Addr) -> Rd {
    Rd::ip(id, 1)
}

fn attrs(id: Ipv4Addr, vni: u32, pmsi: bool) -> Attributes {
    attrs_in(65000, id, vni, pmsi)
}

fn attrs_in(asn: u32, id: Ipv4Addr, vni: u32, pmsi: bool) -> Attributes {
    Attributes {
        origin: Some(0),
        local_pref: Some(100),
        ext_communities: vec![route_target(asn, vni), vxlan_encapsulation()],
        pmsi: pmsi.then_some(PmsiTunnel {
            flags: 0,
            tunnel_type: PMSI_INGRESS_REPLICATION,
            label: vni,
            endpoint: IpAddr::V4(id),
        }),
        ..Default::default()
    }
}

fn imet(id: Ipv4Addr) -> EvpnRoute {
    EvpnRoute::InclusiveMulticast {
        rd: rd(id),
        eth_tag: 0,
        origin: IpAddr::V4(id),
    }
}

fn mac_ip(id: Ipv4Addr, mac_last: u8, ip: Ipv4Addr, vni: u32) -> EvpnRoute {
    EvpnRoute::MacIp {
        rd: rd(id),
        esi: [0; 10],
        eth_tag: 0,
        mac: [0x02, 0x77, 0, 0, 0, mac_last],
        ip: Some(IpAddr::V4(ip)),
        vni,
        vni2: None,
    }
}

/// The RD vpcd gives its routes (`vpcd/src/network/evpn.rs`): type 0 `<ASN>:<VNI>`, AS_TRANS
/// standing for a 4-octet AS (the whole VNI fits; the RD only has to keep a host's VNIs apart).
fn vpcd_rd(asn: u32, vni: u32) -> Rd {
    let mut b = [0u8; 8];
    b[2..4].copy_from_slice(&u16::try_from(asn).unwrap_or(AS_TRANS).to_be_bytes());
    b[4..8].copy_from_slice(&vni.to_be_bytes());
    Rd(b)
}

/// The next event within `secs`, skipping nothing.
async fn next(
    ev: &mut tokio::sync::mpsc::UnboundedReceiver<SessionEvent>,
    secs: u64,
) -> SessionEvent {
    tokio::time::timeout(Duration::from_secs(secs), ev.recv())
        .await
        .expect("no BGP event in time")
        .expect("session task ended")
}

/// Waits until `f` accepts an UPDATE event (other events are skipped).
async fn update_where(
    ev: &mut tokio::sync::mpsc::UnboundedReceiver<SessionEvent>,
    what: &str,
    mut f: impl FnMut(&[EvpnRoute], &Attributes, Option<IpAddr>, &[EvpnRoute]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = tokio::time::timeout(left, ev.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("session task ended");
        if let SessionEvent::Update {
            announced,
            attrs,
            next_hop,
            withdrawn,
        } = &e
        {
            if f(announced, attrs, *next_hop, withdrawn) {
                return;
            }
        }
    }
}

/// Waits for the session to the reflector to come up. (A bgpd that has just started may refuse
/// a connection before zebra told it about its interfaces; the speakers retry.)
async fn established(e: &mut tokio::sync::mpsc::UnboundedReceiver<SessionEvent>) {
    loop {
        match next(e, 30).await {
            SessionEvent::Established { peer_id } => {
                assert_eq!(peer_id, RR);
                return;
            }
            SessionEvent::Down { reason } => eprintln!("retrying after: {reason}"),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn sessions_to_an_frr_route_reflector_exchange_evpn_routes() {
    let lab = Lab::new();
    let (ida, idb) = (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3));
    let mut a = lab.speaker("a", 65000, ida);
    let mut b = lab.speaker("b", 65000, idb);
    let (mut ea, mut eb) = (a.events(), b.events());
    established(&mut ea).await;
    established(&mut eb).await;
    let summary = lab.vtysh("show bgp l2vpn evpn summary");
    assert!(
        summary.contains("10.77.0.2") && summary.contains("10.77.0.3"),
        "{summary}"
    );

    // A announces its VTEP for VNI 5001 and a MAC/IP; B gets both, reflected.
    let t3 = imet(ida);
    let t2 = mac_ip(ida, 0x10, Ipv4Addr::new(10, 0, 0, 5), 5001);
    a.announce(vec![
        (t3.clone(), attrs(ida, 5001, true)),
        (t2.clone(), attrs(ida, 5001, false)),
    ]);
    let mut got = Vec::new();
    update_where(&mut eb, "A's routes at B", |ann, attrs, nh, _| {
        for r in ann {
            if *r == t3 {
                let p = attrs
                    .pmsi
                    .as_ref()
                    .expect("PMSI tunnel on the type-3 route");
                assert_eq!((p.tunnel_type, p.label), (PMSI_INGRESS_REPLICATION, 5001));
            }
            assert_eq!(nh, Some(IpAddr::V4(ida)), "next hop");
            assert_eq!(attrs.originator_id, Some(ida), "reflected: ORIGINATOR_ID");
            assert!(attrs.ext_communities.contains(&vxlan_encapsulation()));
            got.push(r.clone());
        }
        got.contains(&t3) && got.contains(&t2)
    })
    .await;
    let routes = lab.vtysh("show bgp l2vpn evpn route");
    assert!(routes.contains("02:77:00:00:00:10"), "{routes}");

    // A withdraws the MAC: B sees the withdrawal.
    a.withdraw(vec![t2.clone()]);
    // (Withdrawals are matched by route key: the reflector need not repeat labels.)
    update_where(&mut eb, "the MAC's withdrawal at B", |_, _, _, w| {
        w.iter().any(|r| r.key() == t2.key())
    })
    .await;

    // A goes away (CEASE): the reflector withdraws A's remaining route from B.
    a.stop(Duration::from_secs(5)).await;
    update_where(
        &mut eb,
        "A's routes withdrawn after A left",
        |_, _, _, w| w.iter().any(|r| r.key() == t3.key()),
    )
    .await;
    drop(ea);
    b.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_wrong_as_is_refused_with_a_notification_and_retried() {
    let lab = Lab::new();
    let id = Ipv4Addr::new(10, 77, 0, 2);
    let mut s = lab.speaker("a", 65001, id);
    let mut ev = s.events();
    // The refusal of an attempt. A bgpd that just started refuses every session with an FSM
    // error (5/0) until zebra has told it its addresses; those attempts do not count.
    let mut refused = async || {
        for _ in 0..10 {
            match next(&mut ev, 30).await {
                SessionEvent::Down { reason } if reason.contains("NOTIFICATION 5/0") => continue,
                SessionEvent::Down { reason } => return reason,
                other => panic!("{other:?}"),
            }
        }
        panic!("bgpd refused 10 attempts as not ready");
    };
    let reason = refused().await;
    assert!(reason.contains("NOTIFICATION 2/2"), "{reason}");
    // Reconnects with backoff: another attempt, refused the same way.
    let reason = refused().await;
    assert!(reason.contains("NOTIFICATION 2/"), "{reason}");
    s.stop(Duration::from_secs(2)).await;
}

/// A 4-octet AS end to end: FRR (route reflector and VTEP of a VNI above 65535) and two
/// speakers in AS 4200000001. FRR's own type-3 route carries the route target vpcd derives
/// (`route_target`); FRR imports the speakers' routes into its VNI (its kernel FDB gets them),
/// which it does only if their route target is the one it derives; and the speakers get each
/// other's routes through the reflector.
#[tokio::test]
async fn sessions_with_a_4_octet_as_exchange_routes_with_an_frr_vtep_and_reflector() {
    const AS4: u32 = 4_200_000_001;
    const VNI: u32 = 70_001;
    let lab = Lab::start(AS4, Some(VNI));
    let (ida, idb) = (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3));
    let mut a = lab.speaker("a", AS4, ida);
    let mut b = lab.speaker("b", AS4, idb);
    let (mut ea, mut eb) = (a.events(), b.events());
    established(&mut ea).await;
    established(&mut eb).await;
    let summary = lab.vtysh("show bgp l2vpn evpn summary");
    assert!(summary.contains("4200000001"), "{summary}");

    // FRR's VTEP announces its VNI with the route target FRR derived for it.
    update_where(&mut ea, "FRR's type-3 route", |ann, attrs, nh, _| {
        let frr = ann.iter().any(|r| {
            matches!(r, EvpnRoute::InclusiveMulticast { origin, .. } if *origin == IpAddr::V4(RR))
        });
        if frr {
            assert_eq!(nh, Some(IpAddr::V4(RR)));
            assert_eq!(attrs.pmsi.as_ref().map(|p| p.label), Some(VNI));
            assert!(
                attrs.ext_communities.contains(&route_target(AS4, VNI)),
                "FRR's communities {:02x?}, ours {:02x?}",
                attrs.ext_communities,
                route_target(AS4, VNI)
            );
        }
        frr
    })
    .await;

    // A announces its VTEP and a MAC/IP in the VNI, with vpcd's RD and route target.
    let rd = vpcd_rd(AS4, VNI);
    let t3 = EvpnRoute::InclusiveMulticast {
        rd,
        eth_tag: 0,
        origin: IpAddr::V4(ida),
    };
    let t2 = EvpnRoute::MacIp {
        rd,
        esi: [0; 10],
        eth_tag: 0,
        mac: [0x02, 0x77, 0, 0, 0, 0x10],
        ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))),
        vni: VNI,
        vni2: None,
    };
    a.announce(vec![
        (t3.clone(), attrs_in(AS4, ida, VNI, true)),
        (t2.clone(), attrs_in(AS4, ida, VNI, false)),
    ]);
    let mut got = Vec::new();
    update_where(&mut eb, "A's routes at B", |ann, attrs, nh, _| {
        for r in ann {
            if *r == t3 || *r == t2 {
                assert_eq!(nh, Some(IpAddr::V4(ida)));
                assert!(attrs.ext_communities.contains(&route_target(AS4, VNI)));
                got.push(r.clone());
            }
        }
        got.contains(&t3) && got.contains(&t2)
    })
    .await;
    // FRR imported both into its VNI: a flood entry and the MAC towards A on its VxLAN device.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let fdb = sh(&[
            "bridge",
            "-n",
            &lab.ns("rr"),
            "fdb",
            "show",
            "dev",
            &format!("vx{VNI}"),
        ]);
        let flood = fdb
            .lines()
            .any(|l| l.starts_with("00:00:00:00:00:00 dst 10.77.0.2"));
        let mac = fdb
            .lines()
            .any(|l| l.starts_with("02:77:00:00:00:10") && l.contains("dst 10.77.0.2"));
        if flood && mac {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "FRR did not import A's routes into VNI {VNI}:\n{fdb}\n{}",
            lab.vtysh(&format!("show evpn vni {VNI}"))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // And the other way: B's MAC reaches A.
    let t2b = EvpnRoute::MacIp {
        rd,
        esi: [0; 10],
        eth_tag: 0,
        mac: [0x02, 0x77, 0, 0, 0, 0x20],
        ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 6))),
        vni: VNI,
        vni2: None,
    };
    b.announce(vec![(t2b.clone(), attrs_in(AS4, idb, VNI, false))]);
    update_where(&mut ea, "B's MAC at A", |ann, _, nh, _| {
        ann.contains(&t2b) && nh == Some(IpAddr::V4(idb))
    })
    .await;
    a.stop(Duration::from_secs(5)).await;
    b.stop(Duration::from_secs(5)).await;
}
