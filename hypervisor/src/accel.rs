//! Which accelerator guests get: KVM where it really runs a guest, TCG otherwise.
//!
//! `/dev/kvm` existing is not enough: on some nested set-ups (this project's CI among them) a vCPU
//! runs real-mode code but hangs at the switch to protected mode, as every OS kernel makes. So the
//! probe boots a 64 KiB firmware under `-accel kvm` that enters protected mode and then writes to
//! QEMU's `isa-debug-exit` port. QEMU exiting with that code within a few seconds means KVM works.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// libvirt's `<domain type=...>`.
    pub fn libvirt_type(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
        }
    }
}

/// Exit status QEMU reports for a write of 1 to `isa-debug-exit`: `(1 << 1) | 1`.
const PROBE_EXIT: i32 = 3;
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Code at the start of the firmware (mapped at 0xf0000), assembled from:
/// ```text
///     .code16
///     cli; mov $0xf000, %ax; mov %ax, %ds; lgdtl (gdtr)
///     mov %cr0, %eax; or $1, %eax; mov %eax, %cr0        # protected mode on
///     ljmpl $0x08, $(0xf0000 + start32)
///     .code32
/// start32: mov $0x10, %ax; mov %ax, %ds; mov $1, %al; out %al, $0xf4; hlt
///     .p2align 3
/// gdt: .quad 0, 0x00cf9a000000ffff, 0x00cf92000000ffff  # null, flat code, flat data
/// gdtr: .word 23; .long 0xf0000 + gdt
/// ```
const PROBE_CODE: [u8; 80] = [
    0xfa, 0xb8, 0x00, 0xf0, 0x8e, 0xd8, 0x66, 0x0f, 0x01, 0x16, 0x48, 0x00, 0x0f, 0x20, 0xc0, 0x66,
    0x83, 0xc8, 0x01, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x1e, 0x00, 0x0f, 0x00, 0x08, 0x00, 0x66, 0xb8,
    0x10, 0x00, 0x8e, 0xd8, 0xb0, 0x01, 0xe6, 0xf4, 0xf4, 0x8d, 0xb4, 0x00, 0x00, 0x8d, 0x74, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00, 0x17, 0x00, 0x30, 0x00, 0x0f, 0x00, 0x00, 0x00,
];
/// At the reset vector (offset 0xfff0): `ljmp $0xf000, $0`.
const RESET_VECTOR: [u8; 5] = [0xea, 0x00, 0x00, 0x00, 0xf0];

/// The probe firmware: 64 KiB with the code at 0 and the jump to it at the reset vector.
fn probe_firmware() -> Vec<u8> {
    let mut fw = vec![0u8; 64 * 1024];
    fw[..PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    fw[0xfff0..0xfff5].copy_from_slice(&RESET_VECTOR);
    fw
}

/// Runs the firmware under `accel`; true when it reached the exit port in time.
pub fn probe(qemu: &str, accel: Accel) -> bool {
    if accel == Accel::Kvm && !std::path::Path::new("/dev/kvm").exists() {
        return false;
    }
    let Ok(mut fw) = tempfile_named() else {
        return false;
    };
    if fw.1.write_all(&probe_firmware()).is_err() {
        return false;
    }
    let child = Command::new(qemu)
        .args([
            "-accel",
            accel.as_str(),
            "-M",
            "pc",
            "-m",
            "16",
            "-nodefaults",
        ])
        .args(["-no-user-config", "-display", "none", "-device"])
        .arg("isa-debug-exit,iobase=0xf4,iosize=1")
        .arg("-bios")
        .arg(&fw.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let ok = match child {
        Ok(mut child) => {
            let deadline = Instant::now() + PROBE_TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => break status.code() == Some(PROBE_EXIT),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break false;
                    }
                }
            }
        }
        Err(_) => false,
    };
    let _ = std::fs::remove_file(&fw.0);
    drop(fw.1.flush());
    ok
}

/// KVM when the probe passes, else TCG.
pub fn detect(qemu: &str) -> Accel {
    if probe(qemu, Accel::Kvm) {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

fn tempfile_named() -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    let path = std::env::temp_dir().join(format!("vpcd-kvm-probe-{}.bin", uuid::Uuid::new_v4()));
    let file = std::fs::File::create(&path)?;
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_puts_the_exit_sequence_at_the_reset_vector() {
        let fw = probe_firmware();
        assert_eq!(fw.len(), 65536);
        assert_eq!(fw[0xfff0], 0xea);
    }

    /// Under TCG the firmware must reach the exit port: this checks the probe itself.
    #[test]
    fn probe_passes_under_tcg() {
        if std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            panic!("qemu-system-x86_64 is not installed (scripts/install-deps.sh installs it)");
        }
        assert!(probe("qemu-system-x86_64", Accel::Tcg));
    }
}
