//! vpcd's error type: the kinds a client can act on. Each message names the object.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: an invalid spec, name, size or argument.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("domain {0} not found")]
    NotFound(String),
    #[error("domain {0} already exists")]
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
            H::NotFound(name) => Error::NotFound(name),
            H::AlreadyExists(name) => Error::AlreadyExists(name),
            H::InvalidState { .. } => Error::InvalidState(msg),
            H::ShutdownTimeout { .. } => Error::Timeout(msg),
            H::LibvirtUnavailable { .. } => Error::Unavailable(msg),
            H::Libvirt { .. }
            | H::Qmp { .. }
            | H::Spawn { .. }
            | H::Console { .. }
            | H::Io { .. } => Error::Failed(msg),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::Failed(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
