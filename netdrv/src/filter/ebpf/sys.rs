//! The system call the eBPF filter needs beyond aya and netlink: mounting bpffs. The only
//! `unsafe` of the filter lives here.

use std::ffi::CString;

use crate::error::{Error, Result};

/// Where bpffs is mounted (the pin directories are below it).
pub(crate) const BPFFS: &str = "/sys/fs/bpf";

/// Whether `/proc/mounts` text `mounts` has a bpffs mounted at `at`.
pub(crate) fn bpffs_mounted_in(mounts: &str, at: &str) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let _source = f.next();
        f.next() == Some(at) && f.next() == Some("bpf")
    })
}

/// Mounts bpffs at [`BPFFS`] unless one is mounted there already.
pub(crate) fn ensure_bpffs() -> Result<()> {
    let err = |reason: String| Error::Bpf {
        what: format!("mount bpffs at {BPFFS}"),
        reason,
    };
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| err(e.to_string()))?;
    if bpffs_mounted_in(&mounts, BPFFS) {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(|e| err(e.to_string()))?;
    let c = |s: &str| CString::new(s).expect("no NUL in a constant");
    let (source, target, fstype) = (c("bpf"), c(BPFFS), c("bpf"));
    // SAFETY: mount(2) with three valid NUL-terminated strings that outlive the call and a
    // null data pointer (bpffs takes no required options); it does not touch our memory after
    // returning.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    tracing::info!(at = BPFFS, "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpffs_is_found_only_at_its_mount_point() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(bpffs_mounted_in(mounts, "/sys/fs/bpf"));
        assert!(!bpffs_mounted_in(
            "sysfs /sys sysfs rw 0 0\n",
            "/sys/fs/bpf"
        ));
        assert!(!bpffs_mounted_in(
            "tmpfs /sys/fs/bpf tmpfs rw 0 0\n",
            "/sys/fs/bpf"
        ));
    }
}
