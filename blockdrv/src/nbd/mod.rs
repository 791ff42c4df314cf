//! NBD: the protocol as pure functions (`proto`), the async server (`server`) and its optional
//! TLS (`tls`).

pub mod proto;
pub mod server;
pub mod tls;

pub use server::{Export, Resolve, Server};
pub use tls::{TlsConfig, TlsError};
