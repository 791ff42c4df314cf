//! vpcd's error type: the kinds a client can act on. Each message names the object.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: an invalid spec, name, size or argument.
    #[error("{0}")]
    InvalidArgument(String),
    /// The object (`domain web1`, `network a`) does not exist.
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The operation does not fit the object's state (start a running VM...).
    #[error("{0}")]
    InvalidState(String),
    /// A service vpcd depends on (libvirtd) does not answer.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Failed(String),
}

impl From<hypervisor::Error> for Error {
    fn from(e: hypervisor::Error) -> Error {
        use hypervisor::Error as H;
        let msg = e.to_string();
        match e {
            H::InvalidSpec(_) | H::ParseSpec(_) | H::Image { .. } => Error::InvalidArgument(msg),
            H::NotFound(name) => Error::NotFound(format!("domain {name}")),
            H::AlreadyExists(name) => Error::AlreadyExists(format!("domain {name}")),
            H::InvalidState { .. } => Error::InvalidState(msg),
            H::ShutdownTimeout { .. } | H::UnplugTimeout { .. } => Error::Timeout(msg),
            H::LibvirtUnavailable { .. } => Error::Unavailable(msg),
            H::Libvirt { .. }
            | H::Qmp { .. }
            | H::Spawn { .. }
            | H::Console { .. }
            | H::Io { .. } => Error::Failed(msg),
        }
    }
}

impl From<netdrv::Error> for Error {
    fn from(e: netdrv::Error) -> Error {
        use netdrv::Error as N;
        let msg = e.to_string();
        match e {
            N::Invalid(_) => Error::InvalidArgument(msg),
            N::NotFound(what) => Error::NotFound(what),
            N::Exists(what) => Error::AlreadyExists(what),
            N::InUse(_) => Error::InvalidState(msg),
            N::Netns { .. } | N::Netlink { .. } | N::Bpf { .. } | N::Many(_) => Error::Failed(msg),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::Failed(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
