//! The one error type of the hypervisor crate. Variants are named after the step that failed and
//! their messages name the VM (or file) they concern.

use std::path::PathBuf;

/// Errors from VM specs, image preparation and the VM backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("parse VM spec: {0}")]
    ParseSpec(String),
    #[error("image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("domain {0} not found")]
    NotFound(String),
    #[error("domain {0} already exists")]
    AlreadyExists(String),
    #[error("domain {name}: {op} not possible while {state}")]
    InvalidState {
        name: String,
        op: &'static str,
        state: String,
    },
    #[error("domain {name}: shutdown timed out after {secs} s")]
    ShutdownTimeout { name: String, secs: u64 },
    #[error("domain {name}: the guest did not release disk {target} within {secs} s (it goes once the guest lets it go; it is off the definition already)")]
    UnplugTimeout {
        name: String,
        target: String,
        secs: u64,
    },
    #[error("libvirt ({uri}) not answering: {reason}")]
    LibvirtUnavailable { uri: String, reason: String },
    #[error("domain {name}: libvirt {op}: {reason}")]
    Libvirt {
        name: String,
        op: &'static str,
        reason: String,
    },
    #[error("domain {name}: qmp {op}: {reason}")]
    Qmp {
        name: String,
        op: &'static str,
        reason: String,
    },
    #[error("domain {name}: start qemu: {reason}")]
    Spawn { name: String, reason: String },
    #[error("domain {name}: console {dev}: {reason}")]
    Console {
        name: String,
        dev: String,
        reason: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
