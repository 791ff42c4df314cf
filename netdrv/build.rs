//! Compiles the eBPF programs in `bpf/` with clang into OUT_DIR; `filter::ebpf` embeds them.
//!
//! Needs clang with the BPF target and the kernel UAPI and libbpf headers (Debian: `clang`,
//! `linux-libc-dev`, `libbpf-dev`; scripts/install-deps.sh installs them). `BPF_CLANG` names
//! another clang binary.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The C sources and the headers they include.
const SOURCES: &[&str] = &["port_filter.c"];
const HEADERS: &[&str] = &["port_filter.h"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let bpf_dir = manifest_dir.join("..").join("bpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let clang = env::var("BPF_CLANG").unwrap_or_else(|_| "clang".to_owned());
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    for f in SOURCES.iter().chain(HEADERS) {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(f).display());
    }

    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb",
        _ => "bpfel",
    };
    // Debian keeps <asm/types.h> (included by <linux/types.h>) in the multiarch directory,
    // which clang does not search for the BPF target.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86" => "i386-linux-gnu".to_owned(),
        "arm" => "arm-linux-gnueabihf".to_owned(),
        a => format!("{a}-linux-gnu"),
    };
    let multiarch_inc = Path::new("/usr/include").join(multiarch);

    for src in SOURCES {
        let obj = out_dir.join(Path::new(src).with_extension("o"));
        let mut cmd = Command::new(&clang);
        cmd.args(["-O2", "-g", "-target", target, "-Wall", "-Werror"])
            .arg("-I")
            .arg(&bpf_dir);
        if multiarch_inc.is_dir() {
            cmd.arg("-I").arg(&multiarch_inc);
        }
        cmd.arg("-c").arg(bpf_dir.join(src)).arg("-o").arg(&obj);
        let status = match cmd.status() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "netdrv: `{clang}` not found: the eBPF programs in bpf/ are compiled with clang \
                 (Debian: apt-get install clang libbpf-dev, or run scripts/install-deps.sh; \
                 BPF_CLANG=/path/to/clang names another one)"
            ),
            Err(e) => panic!("netdrv: cannot run `{clang}`: {e}"),
        };
        if !status.success() {
            panic!(
                "netdrv: `{clang}` failed to compile bpf/{src} ({status}); it needs the BPF \
                 target and the headers of linux-libc-dev and libbpf-dev"
            );
        }
    }
}
