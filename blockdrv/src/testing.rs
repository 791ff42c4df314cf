//! Helpers for the tests of this workspace (blockdrv's and the integration tests), not for
//! production use.

/// A TCP port on loopback for a server the test starts. Taken below the kernel's ephemeral
/// range (`ip_local_port_range`), so an outgoing connection cannot be given it between this
/// pick and the server's bind (binding port 0 and letting go had that race: "address already
/// in use"); never the same twice in a process; free when picked.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let (start, span) = (
        low.saturating_sub(12_000).max(1_024),
        12_000.min(low.saturating_sub(1_024)).max(1),
    );
    let offset = std::process::id() * 37;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let port = (start + (offset + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
