//! vpcd: the host daemon. Desired state in a transactional store ([`store`]), a
//! transport-agnostic API over the VM backends ([`manager`]) and its D-Bus adapter ([`dbus`]).

pub mod config;
pub mod dbus;
mod error;
pub mod frr;
pub mod manager;
pub mod network;
pub mod storage;
pub mod store;

pub use error::{Error, Result};
