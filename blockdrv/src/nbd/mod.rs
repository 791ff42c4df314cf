//! NBD: the protocol as pure functions (`proto`) and the async server (`server`).

pub mod proto;
pub mod server;

pub use server::{Export, Server};
