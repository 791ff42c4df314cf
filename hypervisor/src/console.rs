//! Serial consoles: opening a libvirt pty in raw mode. (QMP consoles are unix sockets.)

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Opens the pty at `path` read-write, without making it our controlling terminal, and switches
/// it to raw mode so bytes pass unchanged (no echo, no CR/LF translation).
pub fn open_pty(path: &str) -> std::io::Result<OwnedFd> {
    if !path.starts_with("/dev/pts/") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{path} is not a pty"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let fd = file.as_raw_fd();
    // SAFETY: `termios` is plain data that tcgetattr fills in; `fd` is a valid open descriptor
    // owned by `file` for the duration of these calls.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(file.into())
}
