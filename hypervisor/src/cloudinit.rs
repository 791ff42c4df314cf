//! cloud-init NoCloud seeds: an ISO 9660 image with volume label `cidata` holding `meta-data`,
//! `user-data` and `network-config`, attached to the VM as a read-only CD-ROM.
//!
//! The documents are produced by pure functions (tested without I/O); the ISO itself is written
//! by `xorriso` (Debian package `xorriso`) and read back with it.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};
use crate::spec::CloudInitSpec;

/// The three NoCloud documents for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// Default network-config: DHCPv4 on every ethernet NIC.
const DEFAULT_NETWORK_CONFIG: &str =
    "version: 2\nethernets:\n  all:\n    match:\n      name: \"e*\"\n    dhcp4: true\n";

/// Builds the seed documents. `instance_id` changes when the VM is redefined, so cloud-init
/// re-runs its per-instance modules.
pub fn seed_files(ci: &CloudInitSpec, vm_name: &str, instance_id: &str) -> SeedFiles {
    let hostname = ci.hostname.as_deref().unwrap_or(vm_name);
    let mut meta = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_str(instance_id),
        yaml_str(hostname)
    );
    if !ci.ssh_authorized_keys.is_empty() {
        meta.push_str("public-keys:\n");
        for key in &ci.ssh_authorized_keys {
            meta.push_str(&format!("  - {}\n", yaml_str(key)));
        }
    }
    SeedFiles {
        meta_data: meta,
        user_data: ci
            .user_data
            .clone()
            .unwrap_or_else(|| "#cloud-config\n{}\n".to_string()),
        network_config: ci
            .network_config
            .clone()
            .unwrap_or_else(|| DEFAULT_NETWORK_CONFIG.to_string()),
    }
}

/// A YAML double-quoted scalar.
fn yaml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes `files` into an ISO 9660 image (Joliet + Rock Ridge, label `cidata`) at `iso`.
/// The image is written next to its final path and renamed, so a crash leaves no partial seed.
pub fn write_seed(files: &SeedFiles, iso: &Path) -> Result<()> {
    let parent = iso.parent().unwrap_or(Path::new("/"));
    let staging = tempdir_in(parent)?;
    for (name, body) in [
        ("meta-data", &files.meta_data),
        ("user-data", &files.user_data),
        ("network-config", &files.network_config),
    ] {
        std::fs::write(staging.join(name), body)
            .map_err(Error::io(format!("write {}", staging.join(name).display())))?;
    }
    let tmp = iso.with_extension("iso.tmp");
    let _ = std::fs::remove_file(&tmp);
    let out = Command::new("xorriso")
        .args([
            "-as", "mkisofs", "-quiet", "-volid", "cidata", "-joliet", "-rock", "-o",
        ])
        .arg(&tmp)
        .arg(&staging)
        .output()
        .map_err(Error::io("run xorriso"));
    let _ = std::fs::remove_dir_all(&staging);
    let out = out?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Image {
            path: iso.to_owned(),
            reason: format!("xorriso: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    std::fs::rename(&tmp, iso).map_err(Error::io(format!("rename {}", tmp.display())))
}

/// Reads a seed back: its volume label and the three documents.
pub fn read_seed(iso: &Path) -> Result<(String, SeedFiles)> {
    let parent = iso.parent().unwrap_or(Path::new("/"));
    let out_dir = tempdir_in(parent)?;
    let out = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(iso)
        .args(["-pvd_info", "-extract", "/"])
        .arg(&out_dir)
        .output()
        .map_err(Error::io("run xorriso"));
    let result = (|| {
        let out = out?;
        if !out.status.success() {
            return Err(Error::Image {
                path: iso.to_owned(),
                reason: format!("xorriso: {}", String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let label = stdout
            .lines()
            .find_map(|l| l.strip_prefix("Volume Id    :"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let read = |name: &str| {
            std::fs::read_to_string(out_dir.join(name))
                .map_err(Error::io(format!("read {name} from {}", iso.display())))
        };
        Ok((
            label,
            SeedFiles {
                meta_data: read("meta-data")?,
                user_data: read("user-data")?,
                network_config: read("network-config")?,
            },
        ))
    })();
    let _ = std::fs::remove_dir_all(&out_dir);
    result
}

fn tempdir_in(parent: &Path) -> Result<std::path::PathBuf> {
    let dir = parent.join(format!(
        ".seed-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::create_dir_all(&dir).map_err(Error::io(format!("create {}", dir.display())))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_defaults_to_vm_name_and_keys_go_to_meta_data() {
        let ci = CloudInitSpec {
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA a@b".into()],
            ..Default::default()
        };
        let f = seed_files(&ci, "vm1", "i-1");
        assert_eq!(
            f.meta_data,
            "instance-id: \"i-1\"\nlocal-hostname: \"vm1\"\npublic-keys:\n  - \"ssh-ed25519 AAAA a@b\"\n"
        );
        assert!(f.user_data.starts_with("#cloud-config"));
        assert!(f.network_config.contains("dhcp4: true"));
    }

    #[test]
    fn yaml_strings_are_escaped() {
        assert_eq!(yaml_str("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }
}
