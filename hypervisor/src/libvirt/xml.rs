//! Domain XML for a VM: a pure function of its config, tested without libvirt.

use std::fmt::Write;

use crate::backend::{ResolvedDisk, VmConfig};

/// XML namespace of vpcd's `<metadata>` element, which marks the domains a vpcd instance owns.
pub const METADATA_NS: &str = "https://vpcd.dev/xmlns/domain/1";

/// The emulator libvirt runs.
pub const EMULATOR: &str = "/usr/bin/qemu-system-x86_64";

/// Builds the domain XML. `owner` is the vpcd instance id stored in the metadata.
pub fn domain_xml(vm: &VmConfig, owner: &str) -> String {
    let spec = &vm.spec;
    let mut x = String::new();
    let _ = writeln!(x, "<domain type='{}'>", vm.accel.libvirt_type());
    let _ = writeln!(x, "  <name>{}</name>", esc(&spec.name));
    let _ = writeln!(x, "  <uuid>{}</uuid>", vm.uuid);
    let _ = writeln!(x, "  <metadata>");
    let _ = writeln!(
        x,
        "    <vpcd:domain xmlns:vpcd='{METADATA_NS}'><vpcd:owner>{}</vpcd:owner></vpcd:domain>",
        esc(owner)
    );
    let _ = writeln!(x, "  </metadata>");
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", spec.memory_mib);
    let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", spec.vcpus);
    let _ = writeln!(x, "  <os>");
    let _ = writeln!(x, "    <type arch='x86_64' machine='q35'>hvm</type>");
    match &spec.boot.kernel {
        Some(kernel) => {
            let _ = writeln!(x, "    <kernel>{}</kernel>", esc(&kernel.to_string_lossy()));
            if let Some(initrd) = &spec.boot.initrd {
                let _ = writeln!(x, "    <initrd>{}</initrd>", esc(&initrd.to_string_lossy()));
            }
            if let Some(cmdline) = &spec.boot.cmdline {
                let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(cmdline));
            }
        }
        None => {
            let _ = writeln!(x, "    <boot dev='hd'/>");
        }
    }
    let _ = writeln!(x, "  </os>");
    let _ = writeln!(x, "  <features><acpi/></features>");
    if vm.accel == crate::accel::Accel::Kvm {
        let _ = writeln!(x, "  <cpu mode='host-passthrough'/>");
    }
    let _ = writeln!(x, "  <on_poweroff>destroy</on_poweroff>");
    let _ = writeln!(x, "  <on_reboot>restart</on_reboot>");
    let _ = writeln!(x, "  <on_crash>destroy</on_crash>");
    let _ = writeln!(x, "  <devices>");
    let _ = writeln!(x, "    <emulator>{EMULATOR}</emulator>");
    for disk in &vm.disks {
        x.push_str(&disk_xml(disk, "    "));
    }
    if let Some(seed) = &vm.seed {
        let _ = writeln!(x, "    <disk type='file' device='cdrom'>");
        let _ = writeln!(x, "      <driver name='qemu' type='raw'/>");
        let _ = writeln!(x, "      <source file='{}'/>", esc(&seed.to_string_lossy()));
        let _ = writeln!(x, "      <target dev='sda' bus='sata'/>");
        let _ = writeln!(x, "      <readonly/>");
        let _ = writeln!(x, "    </disk>");
    }
    for nic in &vm.nics {
        let _ = writeln!(x, "    <interface type='ethernet'>");
        let _ = writeln!(x, "      <mac address='{}'/>", esc(&nic.mac));
        let _ = writeln!(x, "      <target dev='{}' managed='no'/>", esc(&nic.tap));
        let _ = writeln!(x, "      <model type='virtio'/>");
        let _ = writeln!(x, "      <rom enabled='no'/>");
        let _ = writeln!(x, "    </interface>");
    }
    let _ = writeln!(x, "    <controller type='usb' model='none'/>");
    // Empty PCIe root ports: q35 hot-plugs a device only into one of these. (The root
    // complex comes first, or libvirt would take the first port for PCI controller 0.)
    let _ = writeln!(
        x,
        "    <controller type='pci' index='0' model='pcie-root'/>"
    );
    for _ in 0..crate::backend::HOTPLUG_PORTS {
        let _ = writeln!(x, "    <controller type='pci' model='pcie-root-port'/>");
    }
    let _ = writeln!(x, "    <serial type='pty'>");
    let _ = writeln!(
        x,
        "      <log file='{}' append='on'/>",
        esc(&vm.console_log.to_string_lossy())
    );
    let _ = writeln!(x, "      <target port='0'/>");
    let _ = writeln!(x, "    </serial>");
    let _ = writeln!(x, "    <serial type='pty'>");
    let _ = writeln!(x, "      <target port='1'/>");
    let _ = writeln!(x, "    </serial>");
    let _ = writeln!(x, "    <console type='pty'>");
    let _ = writeln!(x, "      <target type='serial' port='0'/>");
    let _ = writeln!(x, "    </console>");
    let _ = writeln!(x, "    <memballoon model='none'/>");
    let _ = writeln!(x, "  </devices>");
    let _ = writeln!(x, "</domain>");
    x
}

/// One disk's `<disk>` element, each line indented by `indent` (also what attach and detach
/// hand to libvirt).
pub fn disk_xml(disk: &ResolvedDisk, indent: &str) -> String {
    let mut x = String::new();
    let kind = if disk.nbd.is_some() {
        "network"
    } else {
        "file"
    };
    let _ = writeln!(x, "{indent}<disk type='{kind}' device='disk'>");
    let _ = writeln!(
        x,
        "{indent}  <driver name='qemu' type='{}' discard='unmap'/>",
        disk.format.as_str()
    );
    match &disk.nbd {
        Some(n) => {
            let _ = writeln!(
                x,
                "{indent}  <source protocol='nbd' name='{}'>",
                esc(&n.export)
            );
            let _ = writeln!(
                x,
                "{indent}    <host transport='unix' socket='{}'/>",
                esc(&n.socket.to_string_lossy())
            );
            let _ = writeln!(
                x,
                "{indent}    <reconnect delay='{}'/>",
                crate::backend::NBD_RECONNECT_SECS
            );
            let _ = writeln!(x, "{indent}  </source>");
        }
        None => {
            let _ = writeln!(
                x,
                "{indent}  <source file='{}'/>",
                esc(&disk.path.to_string_lossy())
            );
        }
    }
    let _ = writeln!(x, "{indent}  <target dev='{}' bus='virtio'/>", disk.target);
    if disk.readonly {
        let _ = writeln!(x, "{indent}  <readonly/>");
    }
    let _ = writeln!(x, "{indent}</disk>");
    x
}

/// The targets (`vda`, ...) of the virtio disks in a domain's XML.
pub fn disk_targets(xml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<disk ") {
        let Some(end) = rest[i..].find("</disk>").map(|e| e + i) else {
            break;
        };
        let body = &rest[i..end];
        if let Some(t) = body.find("<target dev='") {
            let tag = &body[t..body[t..].find('>').map_or(body.len(), |e| t + e)];
            let name = &tag["<target dev='".len()..];
            if let Some(e) = name.find('\'') {
                if tag.contains("bus='virtio'") {
                    out.push(name[..e].to_string());
                }
            }
        }
        rest = &rest[end..];
    }
    out
}

/// The owner recorded in a domain's XML, if vpcd made it.
pub fn owner_of(xml: &str) -> Option<&str> {
    let start = xml.find("<vpcd:owner>")? + "<vpcd:owner>".len();
    let len = xml[start..].find("</vpcd:owner>")?;
    Some(&xml[start..start + len])
}

/// The pty of serial port `port` in a running domain's live XML.
pub fn serial_pty(xml: &str, port: u32) -> Option<String> {
    let target = format!("<target type='isa-serial' port='{port}'");
    let mut rest = xml;
    while let Some(i) = rest.find("<serial type='pty'>") {
        let body_end = rest[i..].find("</serial>")? + i;
        let body = &rest[i..body_end];
        if body.contains(&target) || body.contains(&format!("<target port='{port}'")) {
            let s = body.find("<source path='")? + "<source path='".len();
            let e = body[s..].find('\'')? + s;
            return Some(body[s..e].to_string());
        }
        rest = &rest[body_end..];
    }
    None
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;
    use crate::spec::{DiskFormat, VmSpec};

    fn config(toml: &str, accel: Accel) -> VmConfig {
        VmConfig {
            spec: VmSpec::from_toml(toml).unwrap(),
            uuid: uuid::Uuid::nil(),
            dir: "/s/vms/t".into(),
            disks: vec![],
            nics: vec![],
            seed: None,
            console_log: "/s/vms/t/console.log".into(),
            accel,
        }
    }

    #[test]
    fn kernel_boot_xml_has_kernel_initrd_cmdline_and_tcg_type() {
        let vm = config(
            "name = \"t\"\nmemory_mib = 128\n[boot]\nkernel = \"/k\"\ninitrd = \"/i\"\ncmdline = \"console=ttyS0 a<b\"\n",
            Accel::Tcg,
        );
        let x = domain_xml(&vm, "host-1");
        assert!(x.starts_with("<domain type='qemu'>"));
        assert!(x.contains("<kernel>/k</kernel>"));
        assert!(x.contains("<initrd>/i</initrd>"));
        assert!(x.contains("<cmdline>console=ttyS0 a&lt;b</cmdline>"));
        assert!(x.contains("<memory unit='MiB'>128</memory>"));
        assert!(x.contains("<log file='/s/vms/t/console.log' append='on'/>"));
        assert!(!x.contains("<boot dev"));
        assert!(!x.contains("host-passthrough"));
        assert_eq!(owner_of(&x), Some("host-1"));
    }

    #[test]
    fn disk_boot_xml_boots_hd_with_virtio_disks_and_seed() {
        let mut vm = config("name = \"t\"\n", Accel::Kvm);
        vm.disks.push(ResolvedDisk {
            path: "/s/vms/t/disk0.qcow2".into(),
            format: DiskFormat::Qcow2,
            readonly: false,
            target: "vda".into(),
            owned: true,
            nbd: None,
        });
        vm.disks.push(ResolvedDisk {
            path: "/data.raw".into(),
            format: DiskFormat::Raw,
            readonly: true,
            target: "vdb".into(),
            owned: false,
            nbd: None,
        });
        vm.disks.push(ResolvedDisk {
            path: "".into(),
            format: DiskFormat::Raw,
            readonly: false,
            target: "vdc".into(),
            owned: false,
            nbd: Some(crate::backend::NbdDisk {
                socket: "/s/sbs/nbd.sock".into(),
                export: "data".into(),
                volume_id: 7,
            }),
        });
        vm.seed = Some("/s/vms/t/seed.iso".into());
        vm.nics.push(crate::backend::ResolvedNic {
            tap: "vpct1".into(),
            mac: "02:00:00:00:00:01".into(),
        });
        let x = domain_xml(&vm, "h");
        assert!(x.contains("<disk type='network' device='disk'>\n      <driver name='qemu' type='raw' discard='unmap'/>\n      <source protocol='nbd' name='data'>\n        <host transport='unix' socket='/s/sbs/nbd.sock'/>\n        <reconnect delay='60'/>\n      </source>\n      <target dev='vdc' bus='virtio'/>"), "{x}");
        assert!(x.contains("<interface type='ethernet'>\n      <mac address='02:00:00:00:00:01'/>\n      <target dev='vpct1' managed='no'/>"), "{x}");
        assert!(x.starts_with("<domain type='kvm'>"));
        assert!(x.contains("<boot dev='hd'/>"));
        assert!(x.contains("<cpu mode='host-passthrough'/>"));
        assert!(x.contains("type='qcow2'"));
        assert!(x.contains("<target dev='vdb' bus='virtio'/>\n      <readonly/>"));
        assert!(x.contains("<source file='/s/vms/t/seed.iso'/>"));
        assert!(x.contains("device='cdrom'"));
        assert_eq!(
            x.matches("<controller type='pci' model='pcie-root-port'/>")
                .count(),
            crate::backend::HOTPLUG_PORTS
        );
        // The virtio disks, not the seed's CD-ROM.
        assert_eq!(disk_targets(&x), ["vda", "vdb", "vdc"]);
        let one = disk_xml(&vm.disks[2], "");
        assert!(
            one.starts_with("<disk type='network' device='disk'>\n"),
            "{one}"
        );
        assert_eq!(disk_targets(&one), ["vdc"]);
    }

    #[test]
    fn serial_pty_is_found_per_port() {
        let live = "<serial type='pty'>\n<source path='/dev/pts/3'/>\n<log file='/l'/>\n<target type='isa-serial' port='0'>\n</target>\n</serial>\n\
                    <serial type='pty'>\n<source path='/dev/pts/4'/>\n<target type='isa-serial' port='1'>\n</target>\n</serial>";
        assert_eq!(serial_pty(live, 0).as_deref(), Some("/dev/pts/3"));
        assert_eq!(serial_pty(live, 1).as_deref(), Some("/dev/pts/4"));
        assert_eq!(serial_pty(live, 2), None);
    }
}
