//! The VM spec: what a user writes (TOML) to describe a VM, and its validation.
//!
//! ```toml
//! name = "demo"            # [A-Za-z0-9][A-Za-z0-9._-]{0,62}
//! vcpus = 1                # 1..=host CPUs (x4 under TCG is still accepted up to 64)
//! memory_mib = 256         # 16..=host memory
//!
//! [boot]                   # kernel boot; leave out `kernel` to boot the first disk by firmware
//! kernel = "/var/lib/vpcd/images/vmlinux"
//! initrd = "/var/lib/vpcd/images/initramfs.cpio.gz"
//! cmdline = "console=ttyS0 panic=-1 quiet"
//!
//! [[disks]]                # virtio-blk disks, vda, vdb, ... in this order (image, path,
//!                          # size_mib, or volume: a replicated volume served over NBD)
//! image = "/var/lib/vpcd/images/disk.qcow2"   # base image: the VM gets a copy-on-write overlay
//! # path = "/srv/data.raw" # or an existing file used as it is (format = "raw" | "qcow2")
//! # size_mib = 1024        # or a new blank qcow2 disk of this size, owned by the VM
//!
//! [[nics]]                 # virtio-net NICs: a port on a tenant subnet (see vpcctl net-create)
//! network = "tenant-a"
//! subnet = "web"
//! # mac = "02:00:00:00:00:01"  # default: a stable locally administered MAC
//! # ip = "10.0.1.5"            # default: the subnet's next free address
//! # port_security = true       # only the port's MAC/IP may send
//! # allowed_address_pairs = [{ ip = "10.0.1.100" }]
//!
//! [cloud_init]             # a NoCloud seed (ISO 9660, label cidata) attached as a CD-ROM
//! hostname = "demo"
//! user_data = "#cloud-config\n"
//! ssh_authorized_keys = ["ssh-ed25519 AAAA... user@host"]
//!
//! # console_log = "/var/log/vpcd/demo.console.log"  # default: <state>/vms/<name>/console.log
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest accepted VM name; libvirt and QEMU take longer ones, but names end up in socket paths.
pub const MAX_NAME_LEN: usize = 63;
/// Smallest guest memory that boots the test guest's kernel.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Upper bound on vCPUs; a host limit is checked separately.
pub const MAX_VCPUS: u32 = 64;

/// A VM as the user describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default)]
    pub boot: BootSpec,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_log: Option<PathBuf>,
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory() -> u64 {
    256
}

/// How the guest boots: a kernel given directly, or (no kernel) the first disk through firmware.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// One virtio-blk disk. Exactly one of `image`, `path` and `size_mib` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// A base image; the VM gets its own qcow2 overlay on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// An existing disk file used as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A new blank disk of this size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    /// A replicated volume of this host's block storage (served over NBD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Format of `path` (`raw` or `qcow2`); probed for `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A NIC: a port on a tenant subnet. Addresses are checked by the network layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub network: String,
    pub subnet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_security: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_address_pairs: Vec<AddressPairSpec>,
}

/// An extra MAC and/or IP a NIC may send from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressPairSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// Fields written into the VM's cloud-init NoCloud seed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitSpec {
    /// `local-hostname`; defaults to the VM name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The user-data document, verbatim (`#cloud-config ...` or a script).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// A network-config document (version 2), verbatim; defaults to DHCP on every NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
}

/// Host limits the spec is checked against.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    pub cpus: u32,
    pub memory_mib: u64,
}

impl HostLimits {
    /// Reads the limits of the machine this runs on.
    pub fn probe() -> HostLimits {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(u64::MAX, |kb| kb / 1024);
        HostLimits { cpus, memory_mib }
    }
}

/// Parses TOML into `T`; errors name the key and the place.
fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    toml::from_str(text)
        .map_err(|e| Error::ParseSpec(e.message().to_string() + &location(text, e.span())))
}

impl DiskSpec {
    /// Parses one disk (the keys of a `[[disks]]` table) from TOML.
    pub fn from_toml(text: &str) -> Result<DiskSpec> {
        parse(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a disk spec always serializes")
    }
}

impl VmSpec {
    /// Parses a spec from TOML; unknown keys are errors that name the key.
    pub fn from_toml(text: &str) -> Result<VmSpec> {
        parse(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a VM spec always serializes")
    }

    /// Checks everything that can be checked without creating anything.
    pub fn validate(&self, host: HostLimits) -> Result<()> {
        validate_name(&self.name)?;
        let bad = |m: String| Err(Error::InvalidSpec(format!("{}: {m}", self.name)));
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!("vcpus {} outside 1..={MAX_VCPUS}", self.vcpus));
        }
        if self.vcpus > host.cpus.saturating_mul(4) {
            return bad(format!(
                "vcpus {} more than 4x the host's {} CPUs",
                self.vcpus, host.cpus
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB || self.memory_mib > host.memory_mib {
            return bad(format!(
                "memory_mib {} outside {MIN_MEMORY_MIB}..={} (host memory)",
                self.memory_mib, host.memory_mib
            ));
        }
        match &self.boot.kernel {
            Some(kernel) => {
                require_file(kernel, "boot.kernel")?;
                if let Some(initrd) = &self.boot.initrd {
                    require_file(initrd, "boot.initrd")?;
                }
            }
            None => {
                if self.boot.initrd.is_some() || self.boot.cmdline.is_some() {
                    return bad("boot.initrd and boot.cmdline need boot.kernel".into());
                }
                if self.disks.is_empty() {
                    return bad("no boot.kernel and no disk to boot from".into());
                }
            }
        }
        if let Some(cmdline) = &self.boot.cmdline {
            if cmdline.contains('\n') || cmdline.len() > 2048 {
                return bad("boot.cmdline must be one line of at most 2048 bytes".into());
            }
        }
        if self.disks.len() > 16 {
            return bad(format!("{} disks, at most 16", self.disks.len()));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let set = [
                disk.image.is_some(),
                disk.path.is_some(),
                disk.size_mib.is_some(),
                disk.volume.is_some(),
            ];
            if set.iter().filter(|s| **s).count() != 1 {
                return bad(format!(
                    "disks[{i}] needs exactly one of image, path, size_mib, volume"
                ));
            }
            if disk.volume.as_deref() == Some("") {
                return bad(format!("disks[{i}].volume is empty"));
            }
            if let Some(image) = &disk.image {
                require_file(image, &format!("disks[{i}].image"))?;
            }
            if let Some(path) = &disk.path {
                require_file(path, &format!("disks[{i}].path"))?;
            }
            if let Some(size) = disk.size_mib {
                if size == 0 || size > 16 * 1024 * 1024 {
                    return bad(format!("disks[{i}].size_mib {size} outside 1..=16777216"));
                }
            }
            if disk.format.is_some() && disk.path.is_none() {
                return bad(format!("disks[{i}].format only applies to path"));
            }
        }
        if self.nics.len() > 8 {
            return bad(format!("{} nics, at most 8", self.nics.len()));
        }
        for (i, nic) in self.nics.iter().enumerate() {
            if nic.network.is_empty() || nic.subnet.is_empty() {
                return bad(format!("nics[{i}] needs network and subnet"));
            }
        }
        if let Some(ci) = &self.cloud_init {
            if let Some(h) = &ci.hostname {
                validate_hostname(h).or_else(|e| bad(format!("cloud_init.hostname: {e}")))?;
            }
            if ci.ssh_authorized_keys.iter().any(|k| k.contains('\n')) {
                return bad(
                    "cloud_init.ssh_authorized_keys: one key per entry, no newlines".into(),
                );
            }
        }
        if let Some(log) = &self.console_log {
            if !log.is_absolute() {
                return bad(format!(
                    "console_log {} is not an absolute path",
                    log.display()
                ));
            }
        }
        Ok(())
    }

    /// Whether the guest boots from its first disk through firmware.
    pub fn boots_from_disk(&self) -> bool {
        self.boot.kernel.is_none()
    }
}

/// Checks a VM name: it becomes part of file names, socket paths and D-Bus object paths.
pub fn validate_name(name: &str) -> Result<()> {
    check_object_name(name, MAX_NAME_LEN)
        .map_err(|rule| Error::InvalidSpec(format!("invalid name {name:?}: {rule}")))
}

/// The rule for names of vpcd's objects (VMs, networks, subnets): 1 to `max` characters of
/// `A-Z a-z 0-9 . _ -`, starting with a letter or digit. Err holds the rule, for messages.
pub fn check_object_name(name: &str, max: usize) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "1 to {max} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        ))
    }
}

fn validate_hostname(h: &str) -> std::result::Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{h:?} is not a valid host name"))
    }
}

fn require_file(path: &Path, field: &str) -> Result<()> {
    if !path.is_absolute() {
        return Err(Error::Image {
            path: path.to_owned(),
            reason: format!("{field} must be an absolute path"),
        });
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Error::Image {
            path: path.to_owned(),
            reason: format!("{field} is not a regular file"),
        }),
        Err(e) => Err(Error::Image {
            path: path.to_owned(),
            reason: format!("{field}: {e}"),
        }),
    }
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits {
        cpus: 2,
        memory_mib: 4096,
    };

    fn files() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"x").unwrap();
        (dir, kernel)
    }

    fn spec(kernel: &Path) -> VmSpec {
        VmSpec::from_toml(&format!(
            "name = \"vm1\"\n[boot]\nkernel = \"{}\"\n",
            kernel.display()
        ))
        .unwrap()
    }

    #[test]
    fn minimal_spec_gets_defaults_and_validates() {
        let (_d, kernel) = files();
        let s = spec(&kernel);
        assert_eq!((s.vcpus, s.memory_mib), (1, 256));
        s.validate(HOST).unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let err = VmSpec::from_toml("name = \"a\"\nmemroy_mib = 5\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("memroy_mib"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn spec_roundtrips_through_toml() {
        let (_d, kernel) = files();
        let mut s = spec(&kernel);
        s.cloud_init = Some(CloudInitSpec {
            hostname: Some("h1".into()),
            user_data: Some("#cloud-config\n".into()),
            ssh_authorized_keys: vec!["ssh-ed25519 AAA x".into()],
            network_config: None,
        });
        s.disks.push(DiskSpec {
            size_mib: Some(64),
            ..Default::default()
        });
        assert_eq!(VmSpec::from_toml(&s.to_toml()).unwrap(), s);
    }

    #[test]
    fn bad_names_are_rejected() {
        for name in ["", "-a", "a b", "a/b", "ä", &"x".repeat(64)] {
            assert!(validate_name(name).is_err(), "{name:?} accepted");
        }
        for name in ["a", "vm-1.test_2", &"x".repeat(63)] {
            validate_name(name).unwrap();
        }
    }

    #[test]
    fn impossible_sizes_are_rejected() {
        let (_d, kernel) = files();
        for (vcpus, mem) in [(0, 256), (65, 256), (9, 256), (1, 8), (1, 5000)] {
            let mut s = spec(&kernel);
            s.vcpus = vcpus;
            s.memory_mib = mem;
            let err = s.validate(HOST).unwrap_err().to_string();
            assert!(err.starts_with("invalid VM spec: vm1:"), "{err}");
        }
    }

    #[test]
    fn missing_kernel_is_an_image_error_naming_the_path() {
        let s = spec(Path::new("/nonexistent/vmlinux"));
        let err = s.validate(HOST).unwrap_err();
        assert!(matches!(err, Error::Image { .. }));
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn disk_needs_exactly_one_source() {
        let (_d, kernel) = files();
        let mut s = spec(&kernel);
        s.disks.push(DiskSpec {
            image: Some(kernel.clone()),
            size_mib: Some(5),
            ..Default::default()
        });
        assert!(s
            .validate(HOST)
            .unwrap_err()
            .to_string()
            .contains("disks[0]"));
        s.disks[0] = DiskSpec::default();
        assert!(s.validate(HOST).is_err());
    }

    #[test]
    fn disk_boot_needs_a_disk_and_no_kernel_args() {
        let mut s = VmSpec::from_toml("name = \"d\"\n").unwrap();
        assert!(s
            .validate(HOST)
            .unwrap_err()
            .to_string()
            .contains("no disk"));
        s.boot.cmdline = Some("quiet".into());
        let (_d, kernel) = files();
        s.disks.push(DiskSpec {
            image: Some(kernel),
            ..Default::default()
        });
        assert!(s
            .validate(HOST)
            .unwrap_err()
            .to_string()
            .contains("need boot.kernel"));
        s.boot.cmdline = None;
        s.validate(HOST).unwrap();
        assert!(s.boots_from_disk());
    }

    #[test]
    fn bad_hostname_is_rejected() {
        let (_d, kernel) = files();
        let mut s = spec(&kernel);
        s.cloud_init = Some(CloudInitSpec {
            hostname: Some("bad_host".into()),
            ..Default::default()
        });
        assert!(s
            .validate(HOST)
            .unwrap_err()
            .to_string()
            .contains("cloud_init.hostname"));
    }
}
