//! The DHCP server on one interface: a packet socket (opened inside the interface's namespace)
//! that receives IPv4/UDP frames to port 67 and sends complete frames back, checksums filled
//! in by [`super::frame`]. Runs as a tokio task until the service is dropped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, RwLock};

use tokio::io::unix::AsyncFd;

use super::frame::{self, DHCP_CLIENT_PORT, DHCP_SERVER_PORT};
use super::server::{Destination, DhcpServer};
use crate::error::{Error, Result};
use crate::ipam::Mac;
use crate::link::Netlink;
use crate::netns::Netns;

const ETH_P_IP: u16 = 0x0800;

/// A running DHCP server; stops when dropped.
#[derive(Debug)]
pub struct DhcpService {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DhcpService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn sock_err(what: &str, ifname: &str) -> impl FnOnce(std::io::Error) -> Error {
    let what = format!("{what} on {ifname}");
    move |e| Error::Netlink {
        op: "dhcp",
        what,
        reason: e.to_string(),
    }
}

/// Opens a non-blocking AF_PACKET socket bound to `ifindex` for IPv4 frames, in the calling
/// thread's namespace (the DHCP service's; also the DHCP benchmark's client).
pub fn packet_socket(ifindex: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_IP.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value that we then fill in.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_IP.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: bind(2) reads `size_of::<sockaddr_ll>()` bytes from `addr`, which lives across
    // the call; `fd` is open.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

impl DhcpService {
    /// Serves `server` on the interface `ifname` of `netns`, answering from `server_ip`.
    /// Must be called within a tokio runtime.
    pub async fn spawn(
        netns: &Netns,
        ifname: &str,
        server: Arc<RwLock<DhcpServer>>,
    ) -> Result<DhcpService> {
        let nl = Netlink::open(netns)?;
        let link = nl.link(ifname).await?;
        let src_mac = link
            .mac
            .ok_or_else(|| Error::Invalid(format!("{ifname} has no MAC address")))?;
        let index = link.index;
        let fd = netns
            .run(move || packet_socket(index))?
            .map_err(sock_err("open packet socket", ifname))?;
        // SAFETY: `fd` is an open socket owned by the AsyncFd from here on; it is closed only
        // when the AsyncFd (and with it the registration) is dropped.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(|e| sock_err("register packet socket", ifname)(e.into_parts().1))?;
        let name = ifname.to_string();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok(mut guard) = fd.readable().await else {
                    break;
                };
                // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`, which is live and
                // exclusively borrowed for the call.
                let n = unsafe {
                    libc::recv(
                        fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        guard.clear_ready();
                        continue;
                    }
                    tracing::warn!(ifname = %name, "dhcp receive: {e}");
                    break;
                }
                let Some(d) = frame::parse(&buf[..n as usize]) else {
                    continue;
                };
                if d.dst_port != DHCP_SERVER_PORT || d.src_port != DHCP_CLIENT_PORT {
                    continue;
                }
                let (reply, server_ip) = {
                    let s = server.read().unwrap();
                    (s.handle(d.payload), s.config().server)
                };
                let Some(reply) = reply else { continue };
                let (dst_mac, dst_ip) = match reply.to {
                    Destination::Broadcast => (Mac([0xff; 6]), std::net::Ipv4Addr::BROADCAST),
                    Destination::Unicast { mac, ip } => (mac, ip),
                };
                let out = frame::build(
                    src_mac,
                    dst_mac,
                    server_ip,
                    dst_ip,
                    DHCP_SERVER_PORT,
                    DHCP_CLIENT_PORT,
                    &reply.payload,
                );
                // SAFETY: send(2) reads `out.len()` bytes from `out`, live for the call, on the
                // bound packet socket.
                let sent = unsafe {
                    libc::send(fd.get_ref().as_raw_fd(), out.as_ptr().cast(), out.len(), 0)
                };
                if sent < 0 {
                    tracing::warn!(ifname = %name, "dhcp send: {}", std::io::Error::last_os_error());
                } else {
                    tracing::debug!(ifname = %name, kind = ?reply.kind, to = %dst_ip, "dhcp reply");
                }
            }
        });
        Ok(DhcpService { task })
    }
}
