//! The system calls and /proc reads the eBPF filter needs beyond aya: mounting bpffs and asking
//! a TCX link which device it is attached to. The only `unsafe` of the filter lives here.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

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

/// Where a TCX link is attached, from its `/proc/self/fdinfo` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkTarget {
    /// Attached to the device with this ifindex (in the device's namespace).
    Attached(u32),
    /// The device is gone (the kernel reports ifindex 0): the link does nothing any more.
    Detached,
}

/// Parses the `ifindex:` line of a TCX link's fdinfo.
pub(crate) fn parse_tcx_fdinfo(fdinfo: &str) -> Option<LinkTarget> {
    let value = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("ifindex:"))?
        .trim();
    match value.parse::<u32>().ok()? {
        0 => Some(LinkTarget::Detached),
        i => Some(LinkTarget::Attached(i)),
    }
}

/// Where the TCX link behind `fd` is attached.
pub(crate) fn tcx_link_target(fd: BorrowedFd<'_>) -> std::io::Result<LinkTarget> {
    let path = Path::new("/proc/self/fdinfo").join(fd.as_raw_fd().to_string());
    let text = std::fs::read_to_string(&path)?;
    parse_tcx_fdinfo(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: no ifindex (not a TCX link?)", path.display()),
        )
    })
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

    #[test]
    fn tcx_fdinfo_gives_the_ifindex_or_detached() {
        let live = "pos:\t0\nflags:\t02000000\nmnt_id:\t15\nino:\t1\nlink_type:\ttcx\n\
                    link_id:\t7\nprog_tag:\tabcd\nprog_id:\t42\nifindex:\t5\nattach_type:\t46\n";
        assert_eq!(parse_tcx_fdinfo(live), Some(LinkTarget::Attached(5)));
        let gone = "link_type:\ttcx\nlink_id:\t7\nprog_id:\t42\nifindex:\t0\nattach_type:\t46\n";
        assert_eq!(parse_tcx_fdinfo(gone), Some(LinkTarget::Detached));
        assert_eq!(parse_tcx_fdinfo("link_type:\txdp\n"), None);
    }
}
