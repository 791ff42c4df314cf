//! `vpcctl console`: bridges the terminal and a serial-port stream that vpcd handed over.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;

/// Ctrl+] ends the session, as in virsh.
const ESCAPE: u8 = 0x1d;

pub async fn attach(name: &str, fd: OwnedFd) -> anyhow::Result<ExitCode> {
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!("Connected to domain '{name}'\r\nEscape character is ^] (Ctrl + ])\r");
    }
    let raw = tty.then(RawTerminal::enable).transpose()?;
    let mut from_vm = std::fs::File::from(fd);
    let mut to_vm = from_vm.try_clone()?;
    // Guest -> stdout on its own thread; it ends when the stream closes. It records when output
    // last arrived, so piped input can wait for the answers to finish.
    let last_output = std::sync::Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
    let seen = last_output.clone();
    let out = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdout = std::io::stdout();
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0
                || stdout
                    .write_all(&buf[..n])
                    .and_then(|_| stdout.flush())
                    .is_err()
            {
                break;
            }
            *seen.lock().unwrap() = std::time::Instant::now();
        }
    });
    // stdin -> guest until EOF or the escape character.
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if tty {
            if let Some(i) = chunk.iter().position(|b| *b == ESCAPE) {
                let _ = to_vm.write_all(&chunk[..i]);
                break;
            }
        }
        if to_vm.write_all(chunk).is_err() {
            break;
        }
    }
    drop(raw);
    if !tty {
        // Piped input: wait until the guest has been quiet for QUIET (at most MAX_WAIT), so
        // the answers to the last lines are printed.
        const QUIET: std::time::Duration = std::time::Duration::from_millis(1500);
        const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
        let start = std::time::Instant::now();
        while start.elapsed() < MAX_WAIT && last_output.lock().unwrap().elapsed() < QUIET {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    if tty {
        eprintln!();
    }
    // The reader thread may stay blocked on the stream (a pty has no end); it ends with the
    // process. Whatever it read has been written out already.
    drop(out);
    Ok(ExitCode::SUCCESS)
}

/// Puts the terminal in raw mode and restores it on drop.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enable() -> anyhow::Result<RawTerminal> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: termios is plain data filled in by tcgetattr on our own stdin descriptor.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            Ok(RawTerminal { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings saved from the same descriptor.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}
