//! The one error type of netdrv. Variants are named after the step that failed; messages name
//! the object (`create bridge vpcb1: File exists`).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netns {path}: {reason}")]
    Netns { path: String, reason: String },
    #[error("{op} {what}: {reason}")]
    Netlink {
        op: &'static str,
        what: String,
        reason: String,
    },
    #[error("ebpf {what}: {reason}")]
    Bpf { what: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} is in use")]
    InUse(String),
    /// Several independent steps failed (teardown keeps going and reports them all).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Many(Vec<Error>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
