//! Network namespaces. Every netdrv operation names the namespace it acts in: a `Netns` is an
//! open handle on one, and [`Netns::run`] runs a closure on a thread that has entered it.
//! Sockets (netlink, BPF links by ifindex) are bound to the namespace of the thread that opens
//! them, so they are opened through `run` and then used from anywhere.
//!
//! Entering is done with `setns(2)`, not `ip netns exec`: the latter remounts /sys and would hide
//! the bpffs pins under /sys/fs/bpf.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// An open network namespace.
#[derive(Debug, Clone)]
pub struct Netns {
    path: PathBuf,
    file: Arc<File>,
}

impl Netns {
    /// The namespace of the calling process (at the time of the call).
    pub fn current() -> Result<Netns> {
        Netns::open(Path::new("/proc/self/ns/net"))
    }

    /// A namespace by path: `/run/netns/NAME` (iproute2's), `/proc/PID/ns/net`, ...
    pub fn open(path: &Path) -> Result<Netns> {
        let file = File::open(path).map_err(|e| Error::Netns {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Netns {
            path: path.to_owned(),
            file: Arc::new(file),
        })
    }

    /// A namespace named as iproute2 does: `/run/netns/NAME`.
    pub fn named(name: &str) -> Result<Netns> {
        Netns::open(&Path::new("/run/netns").join(name))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode: equal for two handles on the same namespace.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.ino()).unwrap_or(0)
    }

    /// Runs `f` on a new thread inside this namespace and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = self.file.clone();
        let path = self.path.display().to_string();
        std::thread::spawn(move || {
            // SAFETY: setns(2) on a descriptor we hold open; it changes only this thread's
            // network namespace, and this thread ends when `f` returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(Error::Netns {
                    path,
                    reason: std::io::Error::last_os_error().to_string(),
                });
            }
            Ok(f())
        })
        .join()
        .expect("netns thread panicked")
    }

    /// Makes `cmd` run inside this namespace: the child enters it between fork and exec. The
    /// namespace handle (`self`) must stay alive until `cmd` has been spawned.
    pub fn enter_in_child(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let fd = self.file.as_raw_fd();
        // SAFETY: setns(2), async-signal-safe, on a descriptor the child inherits (kept open by
        // `self` until spawn returns); it affects only the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// The descriptor, for `setns` in a child process before it executes (QEMU of the QMP
    /// backend runs in the host namespace).
    pub fn as_file(&self) -> &File {
        &self.file
    }
}

/// Named namespaces under /run/netns, made and removed as iproute2 does (`ip netns add/del`):
/// a file bind-mounted from a new namespace.
impl Netns {
    /// Creates `/run/netns/NAME` with a new network namespace, or opens it if it exists.
    pub fn create_named(name: &str) -> Result<Netns> {
        let dir = Path::new("/run/netns");
        let path = dir.join(name);
        if path.exists() {
            if let Ok(ns) = Netns::open(&path) {
                if ns.is_namespace() {
                    return Ok(ns);
                }
            }
        }
        let err = |reason: String| Error::Netns {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        std::fs::File::create(&path).map_err(|e| err(e.to_string()))?;
        let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| err(e.to_string()))?;
        let made = std::thread::spawn(move || -> std::io::Result<()> {
            // SAFETY: unshare(2) gives only this thread a new network namespace; the thread ends
            // right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let source = c"/proc/thread-self/ns/net";
            // SAFETY: mount(2) with valid NUL-terminated paths that live across the call; a
            // bind mount of this thread's namespace file keeps the namespace alive.
            let rc = unsafe {
                libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
        .join()
        .expect("netns thread panicked");
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(err(e.to_string()));
        }
        Netns::open(&path)
    }

    /// Removes `/run/netns/NAME` (the namespace goes once nothing uses it). Idempotent.
    pub fn delete_named(name: &str) -> Result<()> {
        let path = Path::new("/run/netns").join(name);
        if !path.exists() {
            return Ok(());
        }
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| {
            Error::Netns {
                path: path.display().to_string(),
                reason: e.to_string(),
            }
        })?;
        // SAFETY: umount2(2) on a NUL-terminated path that lives across the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        std::fs::remove_file(&path).map_err(|e| Error::Netns {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Whether the file is a network namespace (and not, say, an empty mount point left over).
    fn is_namespace(&self) -> bool {
        let own = match std::fs::metadata("/proc/self/ns/net") {
            Ok(m) => m,
            Err(_) => return false,
        };
        use std::os::unix::fs::MetadataExt;
        // nsfs files share the device of /proc/self/ns/net.
        self.file.metadata().is_ok_and(|m| m.dev() == own.dev())
    }
}
