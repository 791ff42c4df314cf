//! Arbitrary bytes as a DHCP request, and as a whole frame: the server must never panic, and
//! whatever it answers must decode again.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use netdrv::dhcp::{frame, DhcpConfig, DhcpServer};
use netdrv::ipam::Mac;

fuzz_target!(|data: &[u8]| {
    let mut server = DhcpServer::new(DhcpConfig {
        server: Ipv4Addr::new(10, 0, 0, 1),
        subnet: "10.0.0.0/24".parse().unwrap(),
        router: Some(Ipv4Addr::new(10, 0, 0, 1)),
        dns: vec![Ipv4Addr::new(10, 0, 0, 1)],
        domain: Some("fuzz.internal".into()),
        mtu: Some(1450),
        lease_secs: 600,
        routes: vec![("169.254.169.254/32".parse().unwrap(), Ipv4Addr::new(10, 0, 0, 1))],
    });
    // Lease the MAC the input carries in chaddr (offset 28), so known-client paths are reached.
    if data.len() >= 34 {
        let mut m = [0u8; 6];
        m.copy_from_slice(&data[28..34]);
        server.set_leases([(Mac(m), Ipv4Addr::new(10, 0, 0, 7))]);
    }
    if let Some(reply) = server.handle(data) {
        assert!(reply.payload.len() >= 300);
        assert!(server.handle(&reply.payload).is_none(), "a reply must not be answered");
    }
    if let Some(d) = frame::parse(data) {
        let _ = server.handle(d.payload);
    }
});
