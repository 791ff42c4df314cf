//! DHCPv4 for tenant subnets: a sans-I/O server ([`server`]), frame building with checksums
//! computed here ([`frame`]), and the packet-socket shell that serves an interface
//! ([`service`]).

pub mod frame;
pub mod server;
mod service;

pub use server::{Destination, DhcpConfig, DhcpServer, Reply};
pub use service::{packet_socket, DhcpService};
