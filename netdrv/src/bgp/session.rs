//! One BGP session to a peer (a route reflector), as a tokio task: connect (inside a network
//! namespace) with exponential backoff, OPEN / KEEPALIVE handshake for L2VPN EVPN (RFC 4271
//! section 8, the states that matter for an active-only speaker), then keepalives, the hold
//! timer, NOTIFICATION both ways, ROUTE-REFRESH (answered by sending the routes again), and
//! this side's routes (Adj-RIB-Out), which it sends again after every reconnect.
//!
//! The owner drives it through [`Session`]: [`Session::announce`] and [`Session::withdraw`]
//! change the routes, [`Session::events`] gives what the peer sent and state changes. The
//! session never stops on its own; dropping the [`Session`] sends a CEASE and ends it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::wire::{
    self, code, Attributes, Capability, EvpnRoute, Message, Notification, Open, Update, WireError,
    AFI_L2VPN, SAFI_EVPN,
};
use crate::netns::Netns;

/// Routes per withdrawing UPDATE: an EVPN type-2 NLRI with an IPv6 address is 51 bytes, so 60
/// of them stay well inside a 4096-byte message.
const WITHDRAW_CHUNK: usize = 60;

/// How the session is set up.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub local_as: u32,
    pub peer_as: u32,
    pub router_id: Ipv4Addr,
    pub peer: SocketAddr,
    /// The namespace the TCP connection is made in (the host's).
    pub netns: Netns,
    /// Proposed hold time, seconds (0: none; else at least 3).
    pub hold_time: u16,
    /// Keepalive interval; default a third of the negotiated hold time.
    pub keepalive: Option<Duration>,
    /// First reconnect delay, doubled after each failure up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl SessionConfig {
    pub fn new(local_as: u32, router_id: Ipv4Addr, peer: SocketAddr, netns: Netns) -> Self {
        SessionConfig {
            local_as,
            peer_as: local_as,
            router_id,
            peer,
            netns,
            hold_time: 90,
            keepalive: None,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Where the session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Down, waiting out the reconnect backoff.
    Idle,
    Connect,
    OpenSent,
    OpenConfirm,
    Established {
        peer_id: Ipv4Addr,
        hold_time: u16,
        since: std::time::SystemTime,
    },
}

/// What the session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Established {
        peer_id: Ipv4Addr,
    },
    /// The session went down; routes learned from it are gone.
    Down {
        reason: String,
    },
    /// Routes the peer announced (with their attributes and next hop) and withdrew.
    Update {
        announced: Vec<EvpnRoute>,
        attrs: Attributes,
        next_hop: Option<IpAddr>,
        withdrawn: Vec<EvpnRoute>,
    },
}

enum Command {
    Announce(Vec<(EvpnRoute, Attributes)>),
    Withdraw(Vec<EvpnRoute>),
}

/// A running session. Dropping it closes its command channel: a session with a connection
/// (in the handshake or established) sends a CEASE (administrative shutdown) and ends; one that
/// is connecting or backing off ends at its next step. [`Session::stop`] waits for that.
#[derive(Debug)]
pub struct Session {
    commands: mpsc::UnboundedSender<Command>,
    events: Option<mpsc::UnboundedReceiver<SessionEvent>>,
    state: watch::Receiver<SessionState>,
    task: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Starts the session. Must be called within a tokio runtime.
    pub fn spawn(cfg: SessionConfig) -> Session {
        let (ctx, crx) = mpsc::unbounded_channel();
        let (etx, erx) = mpsc::unbounded_channel();
        let (stx, srx) = watch::channel(SessionState::Connect);
        let task = tokio::spawn(run(cfg, crx, etx, stx));
        Session {
            commands: ctx,
            events: Some(erx),
            state: srx,
            task,
        }
    }

    /// Adds or replaces routes (sent now if established, and after every reconnect).
    pub fn announce(&self, routes: Vec<(EvpnRoute, Attributes)>) {
        let _ = self.commands.send(Command::Announce(routes));
    }

    pub fn withdraw(&self, routes: Vec<EvpnRoute>) {
        let _ = self.commands.send(Command::Withdraw(routes));
    }

    /// Ends the session (CEASE if established) and waits up to `grace` for it, then aborts.
    pub async fn stop(self, grace: Duration) {
        let Session { commands, task, .. } = self;
        drop(commands);
        let abort = task.abort_handle();
        if tokio::time::timeout(grace, task).await.is_err() {
            abort.abort();
        }
    }

    pub fn state(&self) -> SessionState {
        self.state.borrow().clone()
    }

    /// The event stream (once).
    pub fn events(&mut self) -> mpsc::UnboundedReceiver<SessionEvent> {
        self.events.take().expect("events taken once")
    }
}

/// Why a connection ended.
enum End {
    /// The owner dropped the session.
    Stopped,
    Down(String),
}

async fn connect(cfg: &SessionConfig) -> std::io::Result<TcpStream> {
    let (peer, netns) = (cfg.peer, cfg.netns.clone());
    // A blocking connect in a thread inside the namespace, off the runtime's workers.
    let s = tokio::task::spawn_blocking(move || {
        netns
            .run(move || {
                let s = std::net::TcpStream::connect_timeout(&peer, Duration::from_secs(3))?;
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                Ok::<_, std::io::Error>(s)
            })
            .map_err(|e| std::io::Error::other(e.to_string()))?
    })
    .await
    .map_err(std::io::Error::other)??;
    TcpStream::from_std(s)
}

async fn run(
    cfg: SessionConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<SessionEvent>,
    state: watch::Sender<SessionState>,
) {
    let mut rib_out: BTreeMap<EvpnRoute, Attributes> = BTreeMap::new();
    let mut delay = cfg.backoff;
    loop {
        let _ = state.send(SessionState::Connect);
        let (end, connected) = match connect(&cfg).await {
            Ok(stream) => {
                let end = session(
                    &cfg,
                    stream,
                    &mut commands,
                    &events,
                    &state,
                    &mut rib_out,
                    &mut delay,
                )
                .await;
                (end, true)
            }
            Err(e) => (End::Down(format!("connect: {e}")), false),
        };
        let End::Down(reason) = end else { return };
        // Idle before the Down event, so that whoever sees the event sees the state too.
        let _ = state.send(SessionState::Idle);
        if connected {
            tracing::info!(peer = %cfg.peer, "BGP session down: {reason}");
            let _ = events.send(SessionEvent::Down { reason });
        } else {
            tracing::debug!(peer = %cfg.peer, "BGP {reason}");
        }
        // Back off, still taking route changes.
        let until = Instant::now() + delay;
        delay = (delay * 2).min(cfg.max_backoff);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(c) => apply(&mut rib_out, c),
                },
            }
        }
    }
}

fn apply(rib_out: &mut BTreeMap<EvpnRoute, Attributes>, c: Command) {
    match c {
        Command::Announce(routes) => rib_out.extend(routes),
        Command::Withdraw(routes) => {
            for r in routes {
                rib_out.remove(&r);
            }
        }
    }
}

/// Why reading failed: a NOTIFICATION to send first, or just down.
enum Fail {
    Notify(u8, u8, Vec<u8>, String),
    Down(String),
}

/// The reading half of a connection and its framing buffer (cancel-safe: bytes read stay in
/// `buf`).
struct Reader {
    rd: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
    four_octet: bool,
    peer: SocketAddr,
}

impl Reader {
    async fn read(&mut self) -> Result<Message, Fail> {
        loop {
            match wire::message_len(&self.buf) {
                Ok(Some(len)) if self.buf.len() >= len => {
                    let msg: Vec<u8> = self.buf.drain(..len).collect();
                    return match wire::decode(&msg, self.four_octet) {
                        Ok(m) => Ok(m),
                        Err(WireError::TreatAsWithdraw { withdrawn, reason }) => {
                            tracing::warn!(peer = %self.peer, "UPDATE treated as withdraw: {reason}");
                            Ok(Message::Update(Box::new(Update {
                                withdrawn,
                                ..Default::default()
                            })))
                        }
                        Err(WireError::Notify {
                            code,
                            subcode,
                            data,
                            reason,
                        }) => Err(Fail::Notify(code, subcode, data, reason)),
                        Err(WireError::Incomplete { .. }) => Err(Fail::Down("framing".into())),
                    };
                }
                Ok(_) => {}
                Err(WireError::Notify {
                    code,
                    subcode,
                    data,
                    reason,
                }) => return Err(Fail::Notify(code, subcode, data, reason)),
                Err(e) => return Err(Fail::Down(e.to_string())),
            }
            let mut chunk = [0u8; 4096];
            match self.rd.read(&mut chunk).await {
                Ok(0) => return Err(Fail::Down("peer closed the connection".into())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(Fail::Down(format!("read: {e}"))),
            }
        }
    }
}

struct Writer {
    wr: tokio::net::tcp::OwnedWriteHalf,
    four_octet: bool,
    next_hop: IpAddr,
}

impl Writer {
    async fn send(&mut self, m: &Message) -> Result<(), End> {
        self.wr
            .write_all(&m.encode(self.four_octet))
            .await
            .map_err(|e| End::Down(format!("send: {e}")))
    }

    /// Sends a NOTIFICATION (best effort) and gives the reason the session ends.
    async fn notify(&mut self, code: u8, subcode: u8, data: Vec<u8>, reason: String) -> End {
        let _ = self
            .send(&Message::Notification(Notification {
                code,
                subcode,
                data,
            }))
            .await;
        End::Down(format!("sent NOTIFICATION {code}/{subcode}: {reason}"))
    }

    async fn fail(&mut self, f: Fail) -> End {
        match f {
            Fail::Notify(code, subcode, data, reason) => {
                self.notify(code, subcode, data, reason).await
            }
            Fail::Down(reason) => End::Down(reason),
        }
    }

    /// Withdraws `routes`, WITHDRAW_CHUNK a message (one UPDATE must stay within 4096 bytes).
    async fn withdraw(&mut self, routes: &[EvpnRoute]) -> Result<(), End> {
        for chunk in routes.chunks(WITHDRAW_CHUNK) {
            let u = Update {
                withdrawn: chunk.to_vec(),
                ..Default::default()
            };
            self.send(&Message::Update(Box::new(u))).await?;
        }
        Ok(())
    }

    async fn send_routes(&mut self, routes: Vec<(EvpnRoute, Attributes)>) -> Result<(), End> {
        for (route, attrs) in routes {
            let u = Update {
                attrs,
                next_hop: Some(self.next_hop),
                announced: vec![route],
                ..Default::default()
            };
            self.send(&Message::Update(Box::new(u))).await?;
        }
        Ok(())
    }
}

/// Reads one message of the handshake within `limit`; a NOTIFICATION from the peer ends the
/// session. Route changes that arrive meanwhile go into the Adj-RIB-Out (sent once
/// established), and the owner stopping the session sends a CEASE (RFC 4271 section 8.2.2,
/// ManualStop in OpenSent and OpenConfirm) instead of leaving the peer to its hold timer.
async fn handshake_read(
    r: &mut Reader,
    w: &mut Writer,
    limit: Duration,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    rib_out: &mut BTreeMap<EvpnRoute, Attributes>,
) -> Result<Message, End> {
    let deadline = Instant::now() + limit;
    loop {
        tokio::select! {
            read = tokio::time::timeout_at(deadline, r.read()) => return match read {
                Err(_) => Err(w
                    .notify(code::HOLD_TIMER, 0, Vec::new(), "hold timer expired".into())
                    .await),
                Ok(Ok(Message::Notification(n))) => Err(End::Down(format!(
                    "peer sent NOTIFICATION {}/{}",
                    n.code, n.subcode
                ))),
                Ok(Ok(m)) => Ok(m),
                Ok(Err(f)) => Err(w.fail(f).await),
            },
            cmd = commands.recv() => match cmd {
                Some(c) => apply(rib_out, c),
                None => {
                    let _ = w.notify(code::CEASE, 2, Vec::new(), "stopped".into()).await;
                    return Err(End::Stopped);
                }
            },
        }
    }
}

/// One connection: handshake, then the established loop.
async fn session(
    cfg: &SessionConfig,
    stream: TcpStream,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    events: &mpsc::UnboundedSender<SessionEvent>,
    state: &watch::Sender<SessionState>,
    rib_out: &mut BTreeMap<EvpnRoute, Attributes>,
    delay: &mut Duration,
) -> End {
    let (rd, wr) = stream.into_split();
    let mut r = Reader {
        rd,
        buf: Vec::new(),
        four_octet: false,
        peer: cfg.peer,
    };
    let mut w = Writer {
        wr,
        four_octet: false,
        next_hop: IpAddr::V4(cfg.router_id),
    };
    let open = Open {
        version: 4,
        asn: cfg.local_as,
        hold_time: cfg.hold_time,
        bgp_id: cfg.router_id,
        capabilities: vec![
            Capability::Multiprotocol {
                afi: AFI_L2VPN,
                safi: SAFI_EVPN,
            },
            Capability::RouteRefresh,
            Capability::FourOctetAs(cfg.local_as),
        ],
    };
    if let Err(e) = w.send(&Message::Open(open)).await {
        return e;
    }
    let _ = state.send(SessionState::OpenSent);
    // RFC 4271: a large hold time until the OPEN arrives.
    let theirs =
        match handshake_read(&mut r, &mut w, Duration::from_secs(240), commands, rib_out).await {
            Ok(Message::Open(o)) => o,
            Ok(other) => {
                return w
                    .notify(
                        code::FSM,
                        1,
                        Vec::new(),
                        format!("expected OPEN, got {other:?}"),
                    )
                    .await
            }
            Err(e) => return e,
        };
    if theirs.asn != cfg.peer_as {
        let why = format!("peer AS {} (expected {})", theirs.asn, cfg.peer_as);
        return w
            .notify(code::OPEN, code::OPEN_BAD_PEER_AS, Vec::new(), why)
            .await;
    }
    let evpn = Capability::Multiprotocol {
        afi: AFI_L2VPN,
        safi: SAFI_EVPN,
    };
    if !theirs.capabilities.contains(&evpn) {
        let why = "peer does not do L2VPN EVPN".to_string();
        return w
            .notify(
                code::OPEN,
                code::OPEN_UNSUPPORTED_CAPABILITY,
                Vec::new(),
                why,
            )
            .await;
    }
    let four = theirs
        .capabilities
        .iter()
        .any(|c| matches!(c, Capability::FourOctetAs(_)));
    r.four_octet = four;
    w.four_octet = four;
    let hold = cfg.hold_time.min(theirs.hold_time);
    let hold_limit = Duration::from_secs(if hold == 0 {
        u64::from(u32::MAX)
    } else {
        u64::from(hold)
    });
    // Never slower than a third of the negotiated hold time (the peer's may be shorter).
    let third = Duration::from_secs(u64::from(hold.max(3) / 3));
    let keepalive = cfg.keepalive.map_or(third, |k| k.min(third));
    if let Err(e) = w.send(&Message::Keepalive).await {
        return e;
    }
    let _ = state.send(SessionState::OpenConfirm);
    match handshake_read(&mut r, &mut w, hold_limit, commands, rib_out).await {
        Ok(Message::Keepalive) => {}
        Ok(other) => {
            let why = format!("expected KEEPALIVE, got {other:?}");
            return w.notify(code::FSM, 2, Vec::new(), why).await;
        }
        Err(e) => return e,
    }
    let _ = state.send(SessionState::Established {
        peer_id: theirs.bgp_id,
        hold_time: hold,
        since: std::time::SystemTime::now(),
    });
    let _ = events.send(SessionEvent::Established {
        peer_id: theirs.bgp_id,
    });
    tracing::info!(peer = %cfg.peer, hold, "BGP session established");
    *delay = cfg.backoff;
    let snapshot = || -> Vec<(EvpnRoute, Attributes)> {
        rib_out
            .iter()
            .map(|(r, a)| (r.clone(), a.clone()))
            .collect()
    };
    if let Err(e) = w.send_routes(snapshot()).await {
        return e;
    }

    let mut ka = tokio::time::interval(keepalive);
    ka.reset();
    let mut hold_deadline = Instant::now() + hold_limit;
    loop {
        tokio::select! {
            _ = ka.tick(), if hold != 0 => {
                if let Err(e) = w.send(&Message::Keepalive).await {
                    return e;
                }
            }
            _ = tokio::time::sleep_until(hold_deadline), if hold != 0 => {
                return w.notify(code::HOLD_TIMER, 0, Vec::new(), "hold timer expired".into()).await;
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else {
                    // Administrative shutdown (RFC 4486).
                    let _ = w.notify(code::CEASE, 2, Vec::new(), "stopped".into()).await;
                    return End::Stopped;
                };
                let sent = match &cmd {
                    Command::Announce(routes) => w.send_routes(routes.clone()).await,
                    Command::Withdraw(routes) if !routes.is_empty() => w.withdraw(routes).await,
                    Command::Withdraw(_) => Ok(()),
                };
                apply(rib_out, cmd);
                if let Err(e) = sent {
                    return e;
                }
            }
            msg = r.read() => {
                hold_deadline = Instant::now() + hold_limit;
                match msg {
                    Ok(Message::Keepalive) => {}
                    Ok(Message::Update(u)) => {
                        let u = *u;
                        let _ = events.send(SessionEvent::Update {
                            announced: u.announced,
                            attrs: u.attrs,
                            next_hop: u.next_hop,
                            withdrawn: u.withdrawn,
                        });
                    }
                    Ok(Message::RouteRefresh { afi, safi }) if (afi, safi) == (AFI_L2VPN, SAFI_EVPN) => {
                        let routes: Vec<_> =
                            rib_out.iter().map(|(r, a)| (r.clone(), a.clone())).collect();
                        if let Err(e) = w.send_routes(routes).await {
                            return e;
                        }
                    }
                    Ok(Message::RouteRefresh { .. }) => {}
                    Ok(Message::Notification(n)) => {
                        return End::Down(format!("peer sent NOTIFICATION {}/{}", n.code, n.subcode));
                    }
                    Ok(Message::Open(_)) => {
                        return w.notify(code::FSM, 3, Vec::new(), "OPEN while established".into()).await;
                    }
                    Err(f) => return w.fail(f).await,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::wire::{Rd, MAX_LEN};

    #[test]
    fn a_chunk_of_the_largest_withdrawals_fits_one_message() {
        let route = EvpnRoute::MacIp {
            rd: Rd([0xff; 8]),
            esi: [0xff; 10],
            eth_tag: u32::MAX,
            mac: [0xff; 6],
            ip: Some(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
            vni: 0xff_ffff,
            vni2: Some(0xff_ffff),
        };
        let u = Update {
            withdrawn: vec![route; WITHDRAW_CHUNK],
            ..Default::default()
        };
        let len = Message::Update(Box::new(u)).encode(true).len();
        assert!(len <= MAX_LEN, "{len} bytes");
    }
}
