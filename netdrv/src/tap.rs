//! Persistent tap devices. Taps are made with the tun driver's ioctls, not netlink: open
//! `/dev/net/tun`, `TUNSETIFF` with the name, `TUNSETPERSIST`. The calling thread must be in the
//! target namespace (see [`crate::Netns::run`]).

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use crate::error::{Error, Result};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The index of link `name` in the calling thread's namespace.
pub fn index_of(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|e| Error::Invalid(e.to_string()))?;
    // SAFETY: if_nametoindex(3) reads the NUL-terminated name, which lives across the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(Error::NotFound(format!("link {name}"))),
        i => Ok(i),
    }
}

/// Creates the persistent tap `name` in the calling thread's namespace.
pub fn create_persistent(name: &str) -> Result<()> {
    let err = |reason: String| Error::Netlink {
        op: "create tap",
        what: name.to_string(),
        reason,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(err("name must be 1 to 15 bytes".into()));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| err(format!("/dev/net/tun: {e}")))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may write) a `struct ifreq`, which `IfReq` lays out (name,
    // flags, padding to 40 bytes); `tun` is an open descriptor for the duration of the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument by value on the same open descriptor.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ifreq_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<super::IfReq>(), 40);
    }
}
