//! The QEMU command line for a VM: a pure function of its config and run directory.

use std::path::{Path, PathBuf};

use crate::backend::VmConfig;

/// Files of a running VM in its directory.
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub qmp: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
    /// Serial port sockets: 0 is the console, 1 the guest command channel.
    pub serial: [PathBuf; 2],
}

impl RunPaths {
    pub fn new(dir: &Path) -> RunPaths {
        RunPaths {
            qmp: dir.join("qmp.sock"),
            pid: dir.join("qemu.pid"),
            log: dir.join("qemu.log"),
            serial: [dir.join("serial0.sock"), dir.join("serial1.sock")],
        }
    }

    /// The longest socket path; it must fit `sockaddr_un` (107 bytes plus NUL).
    pub fn longest_socket(&self) -> usize {
        [&self.qmp, &self.serial[0], &self.serial[1]]
            .iter()
            .map(|p| p.as_os_str().len())
            .max()
            .unwrap_or(0)
    }
}

/// Longest path a unix socket can have.
pub const MAX_SOCKET_PATH: usize = 107;

/// Arguments after the program name. QEMU is started with `-no-shutdown` so that a guest
/// power-off leaves the process paused for vpcd to decide: quit, or reset for a reboot.
pub fn qemu_args(vm: &VmConfig, paths: &RunPaths) -> Vec<String> {
    let spec = &vm.spec;
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("{},debug-threads=on", spec.name)]);
    push(&["-uuid", &vm.uuid.to_string()]);
    push(&["-accel", vm.accel.as_str()]);
    if vm.accel == crate::accel::Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-machine", "q35", "-m", &format!("{}M", spec.memory_mib)]);
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-shutdown",
    ]);
    if let Some(kernel) = &spec.boot.kernel {
        push(&["-kernel", &p(kernel)]);
        if let Some(initrd) = &spec.boot.initrd {
            push(&["-initrd", &p(initrd)]);
        }
        if let Some(cmdline) = &spec.boot.cmdline {
            push(&["-append", cmdline]);
        }
    }
    for (i, disk) in vm.disks.iter().enumerate() {
        let ro = if disk.readonly { ",read-only=on" } else { "" };
        match &disk.nbd {
            Some(n) => push(&[
                "-blockdev",
                &format!(
                    "driver=nbd,node-name=file{i},server.type=unix,server.path={},export={},discard=unmap{ro}",
                    qemu_opt_escape(&p(&n.socket)),
                    qemu_opt_escape(&n.export)
                ),
            ]),
            None => push(&[
                "-blockdev",
                &format!(
                    "driver=file,node-name=file{i},filename={},discard=unmap{ro}",
                    qemu_opt_escape(&p(&disk.path))
                ),
            ]),
        }
        push(&[
            "-blockdev",
            &format!(
                "driver={},node-name={},file=file{i},discard=unmap{ro}",
                disk.format.as_str(),
                disk.target
            ),
        ]);
        let boot = if i == 0 && spec.boots_from_disk() {
            ",bootindex=1"
        } else {
            ""
        };
        push(&[
            "-device",
            &format!(
                "virtio-blk-pci,drive={},id={},serial={}{boot}",
                disk.target, disk.target, disk.target
            ),
        ]);
    }
    for (i, nic) in vm.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!(
                "tap,id=nic{i},ifname={},script=no,downscript=no",
                qemu_opt_escape(&nic.tap)
            ),
        ]);
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev=nic{i},mac={},romfile=", nic.mac),
        ]);
    }
    if let Some(seed) = &vm.seed {
        push(&[
            "-blockdev",
            &format!(
                "driver=file,node-name=cidata-file,filename={},read-only=on",
                qemu_opt_escape(&p(seed))
            ),
        ]);
        push(&[
            "-blockdev",
            "driver=raw,node-name=cidata,file=cidata-file,read-only=on",
        ]);
        push(&["-device", "ide-cd,drive=cidata,bus=ide.1"]);
    }
    for (port, sock) in paths.serial.iter().enumerate() {
        let mut chardev = format!(
            "socket,id=serial{port},path={},server=on,wait=off",
            qemu_opt_escape(&p(sock))
        );
        if port == 0 {
            chardev.push_str(&format!(
                ",logfile={},logappend=on",
                qemu_opt_escape(&p(&vm.console_log))
            ));
        }
        push(&["-chardev", &chardev]);
        push(&["-serial", &format!("chardev:serial{port}")]);
    }
    push(&[
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            qemu_opt_escape(&p(&paths.qmp))
        ),
    ]);
    push(&["-pidfile", &p(&paths.pid)]);
    a
}

/// QEMU option values escape `,` by doubling it.
fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;
    use crate::backend::ResolvedDisk;
    use crate::spec::{DiskFormat, VmSpec};

    fn vm() -> VmConfig {
        VmConfig {
            spec: VmSpec::from_toml(
                "name = \"t\"\nvcpus = 2\nmemory_mib = 128\n[boot]\nkernel = \"/k\"\ninitrd = \"/i\"\ncmdline = \"console=ttyS0\"\n",
            )
            .unwrap(),
            uuid: uuid::Uuid::nil(),
            dir: "/s/t".into(),
            disks: vec![
                ResolvedDisk {
                    path: "/s/t/a,b.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    readonly: false,
                    target: "vda".into(),
                    owned: true,
                    nbd: None,
                },
                ResolvedDisk {
                    path: "".into(),
                    format: DiskFormat::Raw,
                    readonly: false,
                    target: "vdb".into(),
                    owned: false,
                    nbd: Some(crate::backend::NbdDisk {
                        socket: "/s/sbs/nbd.sock".into(),
                        export: "data".into(),
                    }),
                },
            ],
            nics: vec![crate::backend::ResolvedNic {
                tap: "vpct3".into(),
                mac: "02:00:00:00:00:03".into(),
            }],
            seed: Some("/s/t/seed.iso".into()),
            console_log: "/s/t/console.log".into(),
            accel: Accel::Tcg,
        }
    }

    #[test]
    fn args_carry_kernel_sizes_sockets_and_escaped_paths() {
        let paths = RunPaths::new(Path::new("/s/t"));
        let a = qemu_args(&vm(), &paths).join(" ");
        assert!(a.contains("-accel tcg -machine q35 -m 128M -smp 2"), "{a}");
        assert!(a.contains("-kernel /k -initrd /i -append console=ttyS0"));
        assert!(a.contains("filename=/s/t/a,,b.qcow2"));
        assert!(a.contains("-device virtio-blk-pci,drive=vda,id=vda,serial=vda "));
        assert!(a.contains("-blockdev driver=nbd,node-name=file1,server.type=unix,server.path=/s/sbs/nbd.sock,export=data,discard=unmap -blockdev driver=raw,node-name=vdb,file=file1"), "{a}");
        assert!(a.contains("path=/s/t/serial0.sock,server=on,wait=off,logfile=/s/t/console.log"));
        assert!(a.contains("-qmp unix:/s/t/qmp.sock,server=on,wait=off"));
        assert!(a.contains("-no-shutdown"));
        assert!(a.contains("ide-cd,drive=cidata"));
        assert!(!a.contains("-cpu host"));
        assert!(a.contains("-netdev tap,id=nic0,ifname=vpct3,script=no,downscript=no -device virtio-net-pci,netdev=nic0,mac=02:00:00:00:00:03,romfile="));
    }

    #[test]
    fn disk_boot_sets_bootindex_on_first_disk() {
        let mut vm = vm();
        vm.spec.boot = Default::default();
        let a = qemu_args(&vm, &RunPaths::new(Path::new("/s/t"))).join(" ");
        assert!(a.contains("serial=vda,bootindex=1"));
        assert!(!a.contains("-kernel"));
    }
}
