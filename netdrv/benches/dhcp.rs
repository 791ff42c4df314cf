//! DHCP benchmark: full DORA exchanges per second for `BENCH_CLIENTS` (default 200) clients
//! with static leases, netdrv's DHCP server (the one vpcd runs on every router leg) against
//! dnsmasq configured with the same static hosts, in the same lab and the same run.
//!
//! Run as root: `cargo bench -p netdrv --bench dhcp` (or `benches/network.sh dhcp`).
//! Environment: `BENCH_RUNS` (runs per server, alternating, default 3), `BENCH_CLIENTS`
//! (default 200), `BENCH_WINDOW` (exchanges in flight, default 32), `BENCH_ROUNDS` (times the
//! clients go through DORA per run, default 20: one round takes milliseconds).
//!
//! # Lab (two namespaces `vpcdb-<pid>-*`, removed at the end)
//! ```text
//!  dcli: c0 (no address; the client sends and receives frames on a packet socket)
//!   |  veth
//!  dsrv: s0 10.50.0.1/16; the server under test listens here
//! ```
//! The client is written here on a packet socket, as the servers' clients are VMs: for each of
//! the clients (MAC 02:dd:00:00:hi:lo, lease 10.50.<1 + i / 250>.<1 + i % 250>) DISCOVER,
//! OFFER, REQUEST (requested address + server id), ACK, with the broadcast flag so the
//! replies need no promiscuous receiver, `BENCH_WINDOW` exchanges in flight, a message
//! resent after 500 ms without an answer (counted). The time runs from the first DISCOVER to
//! the last ACK; every ACK must carry the client's static address.
//!
//! dnsmasq: `--port=0 --bind-interfaces --interface=s0 --dhcp-range=10.50.0.0,static,
//! 255.255.0.0 --dhcp-hostsfile=<the same leases> --no-ping --leasefile-ro
//! --dhcp-authoritative`, no log; started fresh for each run, like ours.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use netdrv::dhcp::{frame, packet_socket, DhcpConfig, DhcpServer, DhcpService};
use netdrv::ipam::Mac;
use netdrv::Netns;

mod common;
use common::*;

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 1);

fn client_mac(i: usize) -> Mac {
    Mac([0x02, 0xdd, 0, 0, (i >> 8) as u8, i as u8])
}

fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 50, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

fn request(
    i: usize,
    kind: MessageType,
    server: Option<Ipv4Addr>,
    offered: Option<Ipv4Addr>,
) -> Vec<u8> {
    let mac = client_mac(i);
    let mut m = Message::default();
    m.set_opcode(Opcode::BootRequest)
        .set_xid(0x5000_0000 + i as u32)
        .set_flags(Flags::default().set_broadcast())
        .set_chaddr(&mac.0);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    if let Some(s) = server {
        m.opts_mut().insert(DhcpOption::ServerIdentifier(s));
    }
    if let Some(ip) = offered {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    }
    let mut payload = Vec::new();
    m.encode(&mut Encoder::new(&mut payload)).expect("encode");
    frame::build(
        mac,
        Mac([0xff; 6]),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        frame::DHCP_CLIENT_PORT,
        frame::DHCP_SERVER_PORT,
        &payload,
    )
}

enum Step {
    Discovering,
    Requesting { frame: Vec<u8> },
}

struct Outcome {
    secs: f64,
    resent: usize,
}

/// Runs the DORA exchanges of `clients` clients from the namespace `cli` (interface c0).
fn dora(cli: &Netns, clients: usize, window: usize) -> Outcome {
    let index: u32 = sh(&[
        "ip",
        "netns",
        "exec",
        ns_name(cli),
        "cat",
        "/sys/class/net/c0/ifindex",
    ])
    .trim()
    .parse()
    .unwrap();
    let sock = cli
        .run(move || packet_socket(index))
        .unwrap()
        .expect("packet socket");
    let send = |f: &[u8]| {
        // SAFETY: send(2) of a buffer that lives across the call on an open socket.
        let n = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(
            n as usize,
            f.len(),
            "send: {}",
            std::io::Error::last_os_error()
        );
    };
    let mut in_flight: HashMap<u32, (usize, Step, Instant)> = HashMap::new();
    let (mut next, mut done, mut resent) = (0usize, 0usize, 0usize);
    let mut buf = vec![0u8; 2048];
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    while done < clients {
        assert!(
            Instant::now() < deadline,
            "DORA did not finish: {done}/{clients} done"
        );
        while in_flight.len() < window && next < clients {
            send(&request(next, MessageType::Discover, None, None));
            in_flight.insert(
                0x5000_0000 + next as u32,
                (next, Step::Discovering, Instant::now()),
            );
            next += 1;
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd that lives across the call; then recv(2) into `buf`,
        // which does too (non-blocking socket).
        let n = unsafe {
            libc::poll(&mut pfd, 1, 10);
            libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
        };
        if n > 0 {
            let Some(d) = frame::parse(&buf[..n as usize]) else {
                continue;
            };
            if d.dst_port != frame::DHCP_CLIENT_PORT {
                continue;
            }
            let Ok(m) = Message::decode(&mut Decoder::new(d.payload)) else {
                continue;
            };
            let Some((i, step, _)) = in_flight.remove(&m.xid()) else {
                continue;
            };
            match (step, m.opts().msg_type()) {
                (Step::Discovering, Some(MessageType::Offer)) => {
                    assert_eq!(m.yiaddr(), client_ip(i), "offer for client {i}");
                    let f = request(i, MessageType::Request, Some(SERVER_IP), Some(m.yiaddr()));
                    send(&f);
                    in_flight.insert(m.xid(), (i, Step::Requesting { frame: f }, Instant::now()));
                }
                (Step::Requesting { .. }, Some(MessageType::Ack)) => {
                    assert_eq!(m.yiaddr(), client_ip(i), "ack for client {i}");
                    done += 1;
                }
                (step, _) => {
                    // A duplicate (answer to a resend): keep waiting.
                    in_flight.insert(m.xid(), (i, step, Instant::now()));
                }
            }
        }
        let now = Instant::now();
        for (i, step, t) in in_flight.values_mut() {
            if now.duration_since(*t) > Duration::from_millis(500) {
                match step {
                    Step::Discovering => send(&request(*i, MessageType::Discover, None, None)),
                    Step::Requesting { frame } => send(frame),
                }
                *t = now;
                resent += 1;
            }
        }
    }
    Outcome {
        secs: start.elapsed().as_secs_f64(),
        resent,
    }
}

fn ns_name(ns: &Netns) -> &str {
    ns.path()
        .file_name()
        .and_then(|n| n.to_str())
        .expect("named namespace")
}

/// dnsmasq serving the same leases on s0 of `srv`, until killed.
fn dnsmasq(srv: &str, hosts: &std::path::Path) -> Child {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            srv,
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
        ])
        .args(["--port=0", "--bind-interfaces", "--interface=s0"])
        .arg("--dhcp-range=10.50.0.0,static,255.255.0.0")
        .arg(format!("--dhcp-hostsfile={}", hosts.display()))
        .args(["--no-ping", "--leasefile-ro", "--dhcp-authoritative"])
        .arg("--pid-file=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (scripts/install-deps.sh installs it)");
    // Ready when its DHCP socket is bound.
    let t0 = Instant::now();
    while !sh(&["ip", "netns", "exec", srv, "ss", "-uln"]).contains(":67 ") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "dnsmasq did not bind port 67"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn main() {
    let runs: usize = env_or("BENCH_RUNS", 3);
    let clients: usize = env_or("BENCH_CLIENTS", 200);
    let window: usize = env_or("BENCH_WINDOW", 32);
    let rounds: usize = env_or("BENCH_ROUNDS", 20);
    let timed = |cli: &Netns| {
        let mut total = Outcome {
            secs: 0.0,
            resent: 0,
        };
        for _ in 0..rounds {
            let o = dora(cli, clients, window);
            total.secs += o.secs;
            total.resent += o.resent;
        }
        total
    };
    assert!(clients <= 250 * 200, "BENCH_CLIENTS too large");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    sweep_stale();
    cleanup_on_signals(&rt);
    let _guard = CleanupGuard;

    let pid = std::process::id();
    let srv = format!("{NS_PREFIX}{pid}-dsrv");
    let cli = format!("{NS_PREFIX}{pid}-dcli");
    for ns in [&srv, &cli] {
        sh(&["ip", "netns", "add", ns]);
        register(Resource::Netns(ns.clone()));
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    sh(&[
        "ip", "-n", &srv, "link", "add", "s0", "type", "veth", "peer", "c0", "netns", &cli,
    ]);
    sh(&["ip", "-n", &srv, "addr", "add", "10.50.0.1/16", "dev", "s0"]);
    sh(&["ip", "-n", &srv, "link", "set", "s0", "up"]);
    sh(&["ip", "-n", &cli, "link", "set", "c0", "up"]);
    let srv_ns = Netns::named(&srv).unwrap();
    let cli_ns = Netns::named(&cli).unwrap();

    let leases: Vec<(Mac, Ipv4Addr)> = (0..clients)
        .map(|i| (client_mac(i), client_ip(i)))
        .collect();
    let scratch = std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{pid}-dhcp"));
    std::fs::create_dir_all(&scratch).unwrap();
    register(Resource::Dir(scratch.clone()));
    let hosts = scratch.join("hosts");
    std::fs::write(
        &hosts,
        leases
            .iter()
            .map(|(m, ip)| format!("{m},{ip}\n"))
            .collect::<String>(),
    )
    .unwrap();

    println!(
        "DHCP DORA, {clients} clients with static leases x {rounds} rounds, {window} in flight, \
         {runs} runs each ({}, {} CPUs)",
        sh(&["uname", "-r"]).trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for first in [run % 2 == 0, run % 2 == 1] {
            let outcome = if first {
                let mut server = DhcpServer::new(DhcpConfig {
                    server: SERVER_IP,
                    subnet: "10.50.0.0/16".parse().unwrap(),
                    router: Some(SERVER_IP),
                    dns: Vec::new(),
                    domain: None,
                    mtu: Some(1450),
                    lease_secs: 3600,
                    routes: Vec::new(),
                });
                server.set_leases(leases.clone());
                let service = rt
                    .block_on(DhcpService::spawn(
                        &srv_ns,
                        "s0",
                        Arc::new(RwLock::new(server)),
                    ))
                    .expect("netdrv DHCP service");
                let o = timed(&cli_ns);
                drop(service);
                o
            } else {
                let mut child = dnsmasq(&srv, &hosts);
                let o = timed(&cli_ns);
                let _ = child.kill();
                let _ = child.wait();
                o
            };
            let rate = (clients * rounds) as f64 / outcome.secs;
            println!(
                "run {}: {:<8} {:>8.0} DORA/s  ({:.3} s, {} resent)",
                run + 1,
                if first { "netdrv" } else { "dnsmasq" },
                rate,
                outcome.secs,
                outcome.resent
            );
            if first {
                ours.push(rate);
            } else {
                theirs.push(rate);
            }
        }
    }
    let (m_ours, m_theirs) = (median(&ours), median(&theirs));
    println!(
        "median: netdrv {m_ours:.0} DORA/s, dnsmasq {m_theirs:.0} DORA/s, ratio {:.2} (target >= 1.0)",
        m_ours / m_theirs
    );
}
