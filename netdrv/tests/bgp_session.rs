//! netdrv's BGP session (`Session::spawn`) against a fake peer: a TCP listener on 127.0.0.1
//! that speaks BGP with netdrv's own codec, so that each test can misbehave on purpose and
//! check what the session puts on the wire (NOTIFICATIONs, KEEPALIVEs, routes, closes,
//! reconnects). The session connects in the test's own namespace (entering it needs root, like
//! the other tests here): `cargo test -p netdrv --test bgp_session`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use netdrv::bgp::session::{Session, SessionConfig, SessionEvent, SessionState};
use netdrv::bgp::wire::{
    self, code, route_target, vxlan_encapsulation, Attributes, Capability, EvpnRoute, Message,
    Notification, Open, Rd, Update, AFI_IPV4, AFI_L2VPN, AS_TRANS, ATTR_AS_PATH, ATTR_MP_REACH,
    ATTR_ORIGIN, FLAG_OPTIONAL, FLAG_TRANSITIVE, SAFI_EVPN, SAFI_UNICAST,
};
use netdrv::Netns;

const ASN: u32 = 65000;
const AS4: u32 = 4_200_000_001;
const OUR_ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const PEER_ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
const VNI: u32 = 5001;
/// How long the peer waits for something the session must send (generous: nothing waits this
/// long when the session behaves).
const WAIT: Duration = Duration::from_secs(5);

/// The fake peer's listening socket.
struct Peer {
    listener: TcpListener,
}

impl Peer {
    async fn new() -> Peer {
        Peer {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    /// A session to this peer that retries quickly (50 ms, doubling).
    fn config(&self, asn: u32) -> SessionConfig {
        let addr: SocketAddr = self.listener.local_addr().unwrap();
        let mut cfg = SessionConfig::new(asn, OUR_ID, addr, Netns::current().unwrap());
        cfg.backoff = Duration::from_millis(50);
        cfg.max_backoff = Duration::from_secs(5);
        cfg
    }

    /// The session's next connection.
    async fn accept(&self) -> Conn {
        let (stream, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("the session did not connect in time")
            .unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }
}

/// One connection from the session, seen from the peer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// The bytes of the next whole message, or None once the session closed the connection.
    /// Cancel-safe: bytes read stay in the buffer.
    async fn next_raw(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(len) = wire::message_len(&self.buf).expect("a valid BGP header") {
                if self.buf.len() >= len {
                    return Some(self.buf.drain(..len).collect());
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn recv_raw(&mut self) -> Vec<u8> {
        tokio::time::timeout(WAIT, self.next_raw())
            .await
            .expect("no message from the session in time")
            .expect("the session closed the connection")
    }

    async fn recv(&mut self) -> Message {
        wire::decode(&self.recv_raw().await, true).expect("the session sent a valid message")
    }

    /// The next message other than a KEEPALIVE.
    async fn recv_skipping_keepalives(&mut self) -> Message {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "only KEEPALIVEs");
            match self.recv().await {
                Message::Keepalive => continue,
                m => return m,
            }
        }
    }

    async fn send_raw(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.unwrap();
    }

    async fn send(&mut self, m: &Message) {
        self.send_raw(&m.encode(true)).await;
    }

    /// Passive side of the handshake: the session's OPEN, then ours (`asn`, `hold`) and a
    /// KEEPALIVE, then the session's KEEPALIVE.
    async fn establish(&mut self, asn: u32, hold: u16) {
        assert!(
            matches!(self.recv().await, Message::Open(_)),
            "the session did not start with an OPEN"
        );
        self.send(&open(asn, hold)).await;
        self.send(&Message::Keepalive).await;
        assert_eq!(self.recv().await, Message::Keepalive);
    }

    /// The NOTIFICATION the session sends (after any KEEPALIVEs), and that it closes then.
    async fn expect_notification_and_close(&mut self) -> Notification {
        let n = match self.recv_skipping_keepalives().await {
            Message::Notification(n) => n,
            other => panic!("expected a NOTIFICATION, got {other:?}"),
        };
        self.expect_closed().await;
        n
    }

    /// The session closes the connection without sending anything more.
    async fn expect_closed(&mut self) {
        let next = tokio::time::timeout(WAIT, self.next_raw())
            .await
            .expect("the session did not close the connection");
        assert!(next.is_none(), "sent after the end: {next:?}");
    }

    /// The UPDATEs the session sends next, up to its next KEEPALIVE (the session sends a
    /// batch of routes in one go, so with a short keepalive interval the KEEPALIVE after them
    /// marks the end of the batch).
    async fn updates_until_keepalive(&mut self) -> Vec<Update> {
        let mut out = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no UPDATEs, only KEEPALIVEs");
            match self.recv().await {
                Message::Keepalive if out.is_empty() => {}
                Message::Keepalive => return out,
                Message::Update(u) => out.push(*u),
                other => panic!("expected UPDATEs, got {other:?}"),
            }
        }
    }
}

/// The peer's OPEN: EVPN, route refresh, 4-octet AS (which makes the encoder put AS_TRANS in
/// the 2-octet field for a 4-octet `asn`).
fn open(asn: u32, hold: u16) -> Message {
    Message::Open(Open {
        version: 4,
        asn,
        hold_time: hold,
        bgp_id: PEER_ID,
        capabilities: vec![
            Capability::Multiprotocol {
                afi: AFI_L2VPN,
                safi: SAFI_EVPN,
            },
            Capability::RouteRefresh,
            Capability::FourOctetAs(asn),
        ],
    })
}

fn mac_route(origin: Ipv4Addr, last: u8) -> EvpnRoute {
    EvpnRoute::MacIp {
        rd: Rd::ip(origin, 1),
        esi: [0; 10],
        eth_tag: 0,
        mac: [0x02, 0, 0, 0, 0, last],
        ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))),
        vni: VNI,
        vni2: None,
    }
}

fn attrs() -> Attributes {
    Attributes {
        origin: Some(0),
        local_pref: Some(100),
        ext_communities: vec![route_target(ASN, VNI), vxlan_encapsulation()],
        ..Default::default()
    }
}

/// An UPDATE from the peer announcing `route`.
fn peer_announces(route: EvpnRoute) -> Message {
    Message::Update(Box::new(Update {
        attrs: attrs(),
        next_hop: Some(IpAddr::V4(PEER_ID)),
        announced: vec![route],
        ..Default::default()
    }))
}

/// One path attribute (short length form).
fn attr(flags: u8, typ: u8, value: &[u8]) -> Vec<u8> {
    let mut a = vec![flags, typ, u8::try_from(value.len()).unwrap()];
    a.extend_from_slice(value);
    a
}

/// An UPDATE with these encoded path attributes and no IPv4 routes.
fn update_with_attrs(attrs: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&u16::try_from(19 + 4 + attrs.len()).unwrap().to_be_bytes());
    m.push(2);
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&u16::try_from(attrs.len()).unwrap().to_be_bytes());
    m.extend_from_slice(attrs);
    m
}

/// ORIGIN IGP and an empty AS_PATH, as an iBGP announcement carries them.
fn origin_and_as_path() -> Vec<u8> {
    let mut a = attr(FLAG_TRANSITIVE, ATTR_ORIGIN, &[0]);
    a.extend(attr(FLAG_TRANSITIVE, ATTR_AS_PATH, &[]));
    a
}

async fn event(ev: &mut UnboundedReceiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(WAIT, ev.recv())
        .await
        .expect("no session event in time")
        .expect("the session task ended")
}

async fn expect_established(ev: &mut UnboundedReceiver<SessionEvent>) {
    assert_eq!(
        event(ev).await,
        SessionEvent::Established { peer_id: PEER_ID }
    );
}

async fn expect_down(ev: &mut UnboundedReceiver<SessionEvent>) -> String {
    match event(ev).await {
        SessionEvent::Down { reason } => reason,
        other => panic!("expected Down, got {other:?}"),
    }
}

/// The routes (announced, withdrawn) of the next UPDATE event.
async fn update_event(
    ev: &mut UnboundedReceiver<SessionEvent>,
) -> (Vec<EvpnRoute>, Vec<EvpnRoute>) {
    match event(ev).await {
        SessionEvent::Update {
            announced,
            withdrawn,
            ..
        } => (announced, withdrawn),
        other => panic!("expected an UPDATE event, got {other:?}"),
    }
}

/// The session answers a ROUTE-REFRESH with `route`, its only announced one: it is up and
/// reads and writes (used after an UPDATE that must not have reset it).
async fn expect_alive(conn: &mut Conn, route: &EvpnRoute) {
    conn.send(&Message::RouteRefresh {
        afi: AFI_L2VPN,
        safi: SAFI_EVPN,
    })
    .await;
    match conn.recv_skipping_keepalives().await {
        Message::Update(u) => assert_eq!(u.announced, vec![route.clone()]),
        other => panic!("expected our route again, got {other:?}"),
    }
}

fn is_established(s: &Session) -> bool {
    matches!(s.state(), SessionState::Established { .. })
}

#[tokio::test]
async fn a_peer_with_the_wrong_as_gets_bad_peer_as_and_is_retried() {
    let peer = Peer::new().await;
    let mut cfg = peer.config(ASN);
    // Long enough to see the session idle between the attempts.
    cfg.backoff = Duration::from_millis(500);
    let mut s = Session::spawn(cfg);
    let mut ev = s.events();

    let mut conn = peer.accept().await;
    let Message::Open(ours) = conn.recv().await else {
        panic!("no OPEN")
    };
    assert_eq!(ours.asn, ASN);
    conn.send(&open(ASN + 1, 90)).await;
    let n = conn.expect_notification_and_close().await;
    assert_eq!(
        (n.code, n.subcode),
        (code::OPEN, code::OPEN_BAD_PEER_AS),
        "{n:?}"
    );
    let reason = expect_down(&mut ev).await;
    assert!(reason.contains("2/2"), "{reason}");
    assert_eq!(s.state(), SessionState::Idle);

    // It tries again: a new connection, a new OPEN.
    let mut again = peer.accept().await;
    assert!(matches!(again.recv().await, Message::Open(_)));
    s.stop(WAIT).await;
}

#[tokio::test]
async fn a_silent_peer_gets_hold_timer_expired_notification() {
    let peer = Peer::new().await;
    let mut s = Session::spawn(peer.config(ASN));
    let mut ev = s.events();
    let mut conn = peer.accept().await;
    // The peer proposes 3 s, less than the session's 90: 3 s it is, keepalives every second.
    conn.establish(ASN, 3).await;
    expect_established(&mut ev).await;
    match s.state() {
        SessionState::Established {
            peer_id, hold_time, ..
        } => assert_eq!((peer_id, hold_time), (PEER_ID, 3)),
        other => panic!("{other:?}"),
    }

    // Alive for longer than the hold time: a KEEPALIVE a second each way, no NOTIFICATION.
    let alive_until = Instant::now() + Duration::from_secs(4);
    let mut next_keepalive = Instant::now() + Duration::from_secs(1);
    let mut from_session = 0;
    while Instant::now() < alive_until {
        let wake = next_keepalive.min(alive_until);
        match tokio::time::timeout_at(wake, conn.next_raw()).await {
            Ok(Some(b)) => match wire::decode(&b, true).unwrap() {
                Message::Keepalive => from_session += 1,
                other => panic!("{other:?} while the peer is alive"),
            },
            Ok(None) => panic!("the session closed while the peer is alive"),
            Err(_) if Instant::now() >= next_keepalive => {
                conn.send(&Message::Keepalive).await;
                next_keepalive += Duration::from_secs(1);
            }
            Err(_) => {}
        }
    }
    assert!(
        from_session >= 2,
        "{from_session} KEEPALIVEs in 4 s at a 1 s interval"
    );
    assert!(is_established(&s));

    // Silent: the hold timer expires.
    let n = conn.expect_notification_and_close().await;
    assert_eq!((n.code, n.subcode), (code::HOLD_TIMER, 0), "{n:?}");
    let reason = expect_down(&mut ev).await;
    assert!(reason.contains("hold timer"), "{reason}");
    s.stop(WAIT).await;
}

#[tokio::test]
async fn unparseable_updates_reset_the_session_with_update_message_errors() {
    let peer = Peer::new().await;
    let mut s = Session::spawn(peer.config(ASN));
    let mut ev = s.events();

    // An attribute longer than the attributes: nothing after it can be found (RFC 4271 6.3).
    let mut conn = peer.accept().await;
    conn.establish(ASN, 90).await;
    expect_established(&mut ev).await;
    let mut attrs = attr(FLAG_TRANSITIVE, ATTR_ORIGIN, &[0]);
    attrs.extend_from_slice(&[FLAG_TRANSITIVE, ATTR_AS_PATH, 200, 2, 1]);
    conn.send_raw(&update_with_attrs(&attrs)).await;
    let n = conn.expect_notification_and_close().await;
    assert_eq!(
        (n.code, n.subcode),
        (code::UPDATE, code::UPDATE_ATTRIBUTE_LENGTH),
        "{n:?}"
    );
    assert!(expect_down(&mut ev).await.contains("3/5"));

    // EVPN NLRI that cannot be parsed (a type-2 route with a MAC length of 47): the routes
    // are unknown, so no treat-as-withdraw; RFC 4760 section 7 names the error.
    let mut conn = peer.accept().await;
    conn.establish(ASN, 90).await;
    expect_established(&mut ev).await;
    let mut route = Vec::new();
    mac_route(PEER_ID, 1).encode(&mut route);
    route[2 + 8 + 10 + 4] = 47;
    let mut mp = AFI_L2VPN.to_be_bytes().to_vec();
    mp.extend_from_slice(&[SAFI_EVPN, 4]);
    mp.extend_from_slice(&PEER_ID.octets());
    mp.push(0);
    mp.extend_from_slice(&route);
    let mut attrs = origin_and_as_path();
    attrs.extend(attr(FLAG_OPTIONAL, ATTR_MP_REACH, &mp));
    conn.send_raw(&update_with_attrs(&attrs)).await;
    let n = conn.expect_notification_and_close().await;
    assert_eq!(
        (n.code, n.subcode),
        (code::UPDATE, code::UPDATE_OPTIONAL_ATTRIBUTE),
        "{n:?}"
    );
    assert!(expect_down(&mut ev).await.contains("3/9"));
    s.stop(WAIT).await;
}

#[tokio::test]
async fn a_malformed_attribute_withdraws_the_routes_and_the_session_stays_up() {
    let peer = Peer::new().await;
    let mut s = Session::spawn(peer.config(ASN));
    let mut ev = s.events();
    let ours = mac_route(OUR_ID, 100);
    s.announce(vec![(ours.clone(), attrs())]);
    let mut conn = peer.accept().await;
    conn.establish(ASN, 90).await;
    expect_established(&mut ev).await;
    let Message::Update(u) = conn.recv_skipping_keepalives().await else {
        panic!("no UPDATE")
    };
    assert_eq!(u.announced, vec![ours.clone()]);
    let since = s.state();

    let r = mac_route(PEER_ID, 1);
    conn.send(&peer_announces(r.clone())).await;
    assert_eq!(update_event(&mut ev).await, (vec![r.clone()], vec![]));

    // The same route with ORIGIN 7 (RFC 7606 section 7.1: treat-as-withdraw).
    let Message::Update(mut bad) = peer_announces(r.clone()) else {
        unreachable!()
    };
    bad.attrs.origin = Some(7);
    conn.send(&Message::Update(bad)).await;
    assert_eq!(update_event(&mut ev).await, (vec![], vec![r.clone()]));

    // Still the same session, and it still takes routes and answers.
    let r2 = mac_route(PEER_ID, 2);
    conn.send(&peer_announces(r2.clone())).await;
    assert_eq!(update_event(&mut ev).await, (vec![r2], vec![]));
    expect_alive(&mut conn, &ours).await;
    assert_eq!(s.state(), since, "the session was not re-established");
    s.stop(WAIT).await;
}

#[tokio::test]
async fn an_mp_reach_of_another_family_is_ignored_and_the_session_stays_up() {
    let peer = Peer::new().await;
    let mut s = Session::spawn(peer.config(ASN));
    let mut ev = s.events();
    let ours = mac_route(OUR_ID, 100);
    s.announce(vec![(ours.clone(), attrs())]);
    let mut conn = peer.accept().await;
    conn.establish(ASN, 90).await;
    expect_established(&mut ev).await;
    conn.recv_skipping_keepalives().await;

    // IPv4 unicast (10.1.2.0/24), and L2VPN with a SAFI other than EVPN (VPLS, 65) whose NLRI
    // would not parse as EVPN: neither was negotiated, both are skipped (RFC 4760 section 7).
    for (afi, safi, nlri) in [
        (AFI_IPV4, SAFI_UNICAST, vec![24, 10, 1, 2]),
        (AFI_L2VPN, 65, vec![0, 17, 0xde, 0xad]),
    ] {
        let mut mp = afi.to_be_bytes().to_vec();
        mp.extend_from_slice(&[safi, 4]);
        mp.extend_from_slice(&PEER_ID.octets());
        mp.push(0);
        mp.extend_from_slice(&nlri);
        let mut attrs = origin_and_as_path();
        attrs.extend(attr(FLAG_OPTIONAL, ATTR_MP_REACH, &mp));
        conn.send_raw(&update_with_attrs(&attrs)).await;
    }
    // Then an EVPN route: the first routes the session reports, the session still up.
    let r = mac_route(PEER_ID, 1);
    conn.send(&peer_announces(r.clone())).await;
    loop {
        match update_event(&mut ev).await {
            (a, w) if a.is_empty() && w.is_empty() => continue,
            routes => {
                assert_eq!(routes, (vec![r], vec![]));
                break;
            }
        }
    }
    expect_alive(&mut conn, &ours).await;
    assert!(is_established(&s));
    s.stop(WAIT).await;
}

#[tokio::test]
async fn route_refresh_gets_the_adj_rib_out_again() {
    let peer = Peer::new().await;
    let mut cfg = peer.config(ASN);
    // Short: the KEEPALIVE after a batch of UPDATEs marks its end.
    cfg.keepalive = Some(Duration::from_millis(300));
    let mut s = Session::spawn(cfg);
    let mut ev = s.events();
    let (r1, r2) = (mac_route(OUR_ID, 1), mac_route(OUR_ID, 2));
    s.announce(vec![(r1.clone(), attrs()), (r2.clone(), attrs())]);
    let mut conn = peer.accept().await;
    conn.establish(ASN, 90).await;
    expect_established(&mut ev).await;
    let sent: Vec<EvpnRoute> = conn
        .updates_until_keepalive()
        .await
        .into_iter()
        .flat_map(|u| u.announced)
        .collect();
    assert_eq!(sent, vec![r1.clone(), r2.clone()]);

    s.withdraw(vec![r2.clone()]);
    let u = conn.updates_until_keepalive().await;
    assert_eq!(u.len(), 1);
    assert_eq!(
        (u[0].announced.clone(), u[0].withdrawn.clone()),
        (vec![], vec![r2])
    );

    // The refresh repeats what is announced now, with its attributes and next hop.
    conn.send(&Message::RouteRefresh {
        afi: AFI_L2VPN,
        safi: SAFI_EVPN,
    })
    .await;
    let again = conn.updates_until_keepalive().await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].announced, vec![r1]);
    assert_eq!(again[0].next_hop, Some(IpAddr::V4(OUR_ID)));
    assert!(again[0]
        .attrs
        .ext_communities
        .contains(&route_target(ASN, VNI)));
    s.stop(WAIT).await;
}

#[tokio::test]
async fn stopping_an_established_session_sends_cease_before_closing() {
    let peer = Peer::new().await;
    let mut s = Session::spawn(peer.config(ASN));
    let mut ev = s.events();
    let mut conn = peer.accept().await;
    conn.establish(ASN, 90).await;
    expect_established(&mut ev).await;

    let stopping = tokio::spawn(s.stop(WAIT));
    let n = conn.expect_notification_and_close().await;
    assert_eq!(n.code, code::CEASE, "{n:?}");
    stopping.await.unwrap();
    // Stopped, not down: the task ends without a Down event.
    let after = ev.recv().await;
    assert!(after.is_none(), "an event after the stop: {after:?}");
}

#[tokio::test]
async fn stopping_during_the_handshake_sends_cease() {
    let peer = Peer::new().await;
    let s = Session::spawn(peer.config(ASN));
    let mut conn = peer.accept().await;
    // The session waits for the peer's OPEN, which does not come.
    assert!(matches!(conn.recv().await, Message::Open(_)));
    assert_eq!(s.state(), SessionState::OpenSent);
    let stopping = tokio::spawn(s.stop(WAIT));
    let n = conn.expect_notification_and_close().await;
    assert_eq!(n.code, code::CEASE, "{n:?}");
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_notification_from_the_peer_takes_the_session_down_and_it_reconnects() {
    let peer = Peer::new().await;
    let mut s = Session::spawn(peer.config(ASN));
    let mut ev = s.events();
    let ours = mac_route(OUR_ID, 100);
    s.announce(vec![(ours.clone(), attrs())]);
    let mut conn = peer.accept().await;
    conn.establish(ASN, 90).await;
    expect_established(&mut ev).await;
    conn.recv_skipping_keepalives().await;

    // CEASE / administrative reset (RFC 4486).
    conn.send(&Message::Notification(Notification {
        code: code::CEASE,
        subcode: 4,
        data: vec![],
    }))
    .await;
    let reason = expect_down(&mut ev).await;
    assert!(reason.contains("6/4"), "{reason}");
    assert!(!is_established(&s));
    conn.expect_closed().await;

    // Back, and the Adj-RIB-Out goes out again on the new connection.
    let mut conn = peer.accept().await;
    conn.establish(ASN, 90).await;
    expect_established(&mut ev).await;
    match conn.recv_skipping_keepalives().await {
        Message::Update(u) => assert_eq!(u.announced, vec![ours]),
        other => panic!("expected our route, got {other:?}"),
    }
    s.stop(WAIT).await;
}

#[tokio::test]
async fn a_4_octet_as_goes_in_the_capability_with_as_trans_in_the_open() {
    let peer = Peer::new().await;
    let mut s = Session::spawn(peer.config(AS4));
    let mut ev = s.events();
    let mut conn = peer.accept().await;

    let raw = conn.recv_raw().await;
    assert_eq!(raw[18], 1, "an OPEN");
    assert_eq!(u16::from_be_bytes([raw[20], raw[21]]), AS_TRANS, "My AS");
    let Message::Open(ours) = wire::decode(&raw, true).unwrap() else {
        unreachable!()
    };
    assert!(ours.capabilities.contains(&Capability::FourOctetAs(AS4)));
    assert_eq!(ours.asn, AS4);

    // A peer of the same 4-octet AS: established.
    conn.send(&open(AS4, 90)).await;
    conn.send(&Message::Keepalive).await;
    assert_eq!(conn.recv().await, Message::Keepalive);
    expect_established(&mut ev).await;
    assert!(is_established(&s));

    // AS_PATH is read with 4-octet ASNs.
    let Message::Update(mut u) = peer_announces(mac_route(PEER_ID, 1)) else {
        unreachable!()
    };
    u.attrs.as_path = vec![(2, vec![AS4 + 1])];
    conn.send(&Message::Update(u)).await;
    match event(&mut ev).await {
        SessionEvent::Update { attrs, .. } => assert_eq!(attrs.as_path, vec![(2, vec![AS4 + 1])]),
        other => panic!("{other:?}"),
    }
    s.stop(WAIT).await;
}

#[tokio::test]
async fn reconnect_attempts_back_off_exponentially_and_reset_once_established() {
    let peer = Peer::new().await;
    let mut s = Session::spawn(peer.config(ASN));
    let mut ev = s.events();
    // Five attempts, each closed at once by the peer: 50, 100, 200, 400 ms apart, plus noise.
    let mut at = Vec::new();
    for _ in 0..5 {
        let conn = peer.accept().await;
        at.push(Instant::now());
        drop(conn);
    }
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[3] > gaps[0] * 2, "{gaps:?}");

    // An established session starts the backoff over.
    let mut conn = peer.accept().await;
    conn.establish(ASN, 90).await;
    loop {
        if let SessionEvent::Established { .. } = event(&mut ev).await {
            break;
        }
    }
    drop(conn);
    let down = Instant::now();
    peer.accept().await;
    let gap = down.elapsed();
    assert!(
        gap < gaps[3],
        "{gap:?} after an established session, {gaps:?} before"
    );
    s.stop(WAIT).await;
}
