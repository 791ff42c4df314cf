//! Scaffolding shared by the network benchmarks: registering what a run makes (namespaces,
//! pin dirs, scratch dirs) and removing it on every way out (normal end, panic, SIGINT/TERM/
//! HUP, and leftovers of killed runs at the next start), running commands, statistics.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

pub const NS_PREFIX: &str = "vpcdb-";
pub const PIN_PREFIX: &str = "/sys/fs/bpf/vpcd-bench-";
/// Scratch directories (batch files) in the temporary directory: `vpcd-netbench-<pid>-XXXX`
/// (not `vpcd-bench-`: benches/vm-start.sh makes `/tmp/vpcd-bench-XXXXXX`).
pub const SCRATCH_PREFIX: &str = "vpcd-netbench-";

// ---------------------------------------------------------------------------------------------
// Cleanup: every namespace and pin dir this process makes is registered here.

pub enum Resource {
    Netns(String),
    PinDir(PathBuf),
    /// A scratch directory (the batch files).
    Dir(PathBuf),
}

pub static CREATED: Mutex<Vec<Resource>> = Mutex::new(Vec::new());

pub fn register(r: Resource) {
    CREATED.lock().unwrap_or_else(|p| p.into_inner()).push(r);
}

/// Removes everything registered, newest first. Idempotent.
pub fn cleanup_all() {
    let mut list = CREATED.lock().unwrap_or_else(|p| p.into_inner());
    while let Some(r) = list.pop() {
        match r {
            Resource::Netns(ns) => {
                let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            }
            // Removing link pins detaches links whose devices still exist.
            Resource::PinDir(dir) | Resource::Dir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// Runs `cleanup_all` when dropped (normal end or panic).
pub struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        cleanup_all();
    }
}

/// Removes namespaces and pin dirs of earlier benchmark processes that are gone (killed).
pub fn sweep_stale() {
    let dead = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name, NS_PREFIX) {
                eprintln!("removing stale namespace {name}");
                let _ = Command::new("ip").args(["netns", "del", &name]).output();
            }
        }
    }
    let pin_name = Path::new(PIN_PREFIX)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name, &pin_name) {
                eprintln!("removing stale pin dir {}", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name, SCRATCH_PREFIX) {
                eprintln!("removing stale scratch dir {}", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: clean up and exit.
pub fn cleanup_on_signals(rt: &tokio::runtime::Runtime) {
    use tokio::signal::unix::{signal, SignalKind};
    for kind in [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
    ] {
        let Ok(mut s) = rt.block_on(async { signal(kind) }) else {
            continue;
        };
        rt.spawn(async move {
            if s.recv().await.is_some() {
                eprintln!("signal: cleaning up");
                cleanup_all();
                std::process::exit(130);
            }
        });
    }
}

/// Runs a command; panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
