//! The QEMU command line for a VM: a pure function of its config and run directory.

use std::path::{Path, PathBuf};

use crate::backend::{ResolvedDisk, VmConfig};

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
    // Empty root ports first, for disks hot-plugged later (`hp0`...).
    for k in 0..crate::backend::HOTPLUG_PORTS {
        push(&["-device", &hotplug_port(k)]);
    }
    for (i, disk) in vm.disks.iter().enumerate() {
        let (file, format) = disk_nodes(disk);
        push(&["-blockdev", &file.to_string()]);
        push(&["-blockdev", &format.to_string()]);
        let boot = if i == 0 && spec.boots_from_disk() {
            ",bootindex=1"
        } else {
            ""
        };
        push(&["-device", &format!("{}{boot}", disk_device(disk))]);
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

/// The `-device` of empty PCIe root port `k` (`hp<k>`).
fn hotplug_port(k: usize) -> String {
    format!(
        "pcie-root-port,id=hp{k},bus=pcie.0,chassis={},slot={}",
        k + 1,
        k + 1
    )
}

/// A disk's two block nodes, as `-blockdev` JSON and as `blockdev-add` takes them: the file
/// (or NBD client) node `<target>-file` and the format node `<target>` on it.
pub fn disk_nodes(disk: &ResolvedDisk) -> (serde_json::Value, serde_json::Value) {
    let file_node = format!("{}-file", disk.target);
    let file = match &disk.nbd {
        Some(n) => serde_json::json!({
            "driver": "nbd",
            "node-name": file_node,
            "server": {"type": "unix", "path": n.socket.to_string_lossy()},
            "export": n.export,
            // The server is this host's storage node: when it restarts (with vpcd), requests
            // wait for it instead of failing.
            "reconnect-delay": crate::backend::NBD_RECONNECT_SECS,
            "discard": "unmap",
            "read-only": disk.readonly,
        }),
        None => serde_json::json!({
            "driver": "file",
            "node-name": file_node,
            "filename": disk.path.to_string_lossy(),
            "discard": "unmap",
            "read-only": disk.readonly,
        }),
    };
    let format = serde_json::json!({
        "driver": disk.format.as_str(),
        "node-name": disk.target,
        "file": file_node,
        "discard": "unmap",
        "read-only": disk.readonly,
    });
    (file, format)
}

/// A disk's virtio-blk device (id, drive and serial are the target).
pub fn disk_device(disk: &ResolvedDisk) -> String {
    format!(
        "virtio-blk-pci,drive={t},id={t},serial={t}",
        t = disk.target
    )
}

/// QEMU option values escape `,` by doubling it.
fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;
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
                        volume_id: 7,
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
        assert!(a.contains("\"filename\":\"/s/t/a,b.qcow2\""), "{a}");
        assert!(a.contains("-device virtio-blk-pci,drive=vda,id=vda,serial=vda "));
        let args = qemu_args(&vm(), &paths);
        let nodes: Vec<serde_json::Value> = args
            .windows(2)
            .filter(|w| w[0] == "-blockdev" && w[1].starts_with('{'))
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        let nbd = nodes.iter().find(|n| n["node-name"] == "vdb-file").unwrap();
        assert_eq!(nbd["driver"], "nbd");
        assert_eq!(nbd["server"]["path"], "/s/sbs/nbd.sock");
        assert_eq!(nbd["export"], "data");
        let raw = nodes.iter().find(|n| n["node-name"] == "vdb").unwrap();
        assert_eq!(raw["file"], "vdb-file");
        assert_eq!(raw["driver"], "raw");
        for k in 0..crate::backend::HOTPLUG_PORTS {
            assert!(
                a.contains(&format!("-device pcie-root-port,id=hp{k},bus=pcie.0")),
                "{a}"
            );
        }
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
