//! Turns a validated spec into a [`VmConfig`]: the VM's directory, its disks (overlays on base
//! images, new blank disks) and its cloud-init seed. Every step is idempotent, so a define that
//! a crash interrupted can be finished by running it again.

use std::path::Path;

use crate::accel::Accel;
use crate::backend::{ResolvedDisk, VmConfig};
use crate::error::{Error, Result};
use crate::spec::{DiskFormat, DiskSpec, VmSpec};
use crate::{cloudinit, disk};

/// Creates (or completes) the files of a VM under `dir`. On failure, a directory this call
/// created is removed again.
pub fn prepare(spec: &VmSpec, dir: &Path, uuid: uuid::Uuid, accel: Accel) -> Result<VmConfig> {
    let existed = dir.exists();
    let result = prepare_in(spec, dir, uuid, accel);
    if result.is_err() && !existed {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn prepare_in(spec: &VmSpec, dir: &Path, uuid: uuid::Uuid, accel: Accel) -> Result<VmConfig> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    // QEMU under libvirt runs as an unprivileged user and must reach the files in here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(Error::io(format!("chmod {}", dir.display())))?;
    let mut disks = Vec::with_capacity(spec.disks.len());
    for (i, d) in spec.disks.iter().enumerate() {
        let target = format!("vd{}", (b'a' + i as u8) as char);
        disks.push(prepare_disk(
            d,
            &target,
            &dir.join(format!("disk{i}.qcow2")),
        )?);
    }
    let seed = match &spec.cloud_init {
        Some(ci) => {
            let iso = dir.join("seed.iso");
            let files = cloudinit::seed_files(ci, &spec.name, &uuid.to_string());
            cloudinit::write_seed(&files, &iso)?;
            Some(iso)
        }
        None => None,
    };
    Ok(VmConfig {
        spec: spec.clone(),
        uuid,
        dir: dir.to_owned(),
        disks,
        nics: Vec::new(),
        seed,
        console_log: spec
            .console_log
            .clone()
            .unwrap_or_else(|| dir.join("console.log")),
        accel,
    })
}

/// One disk as guest device `target`: a volume (the caller fills in the NBD socket), the
/// user's file as it is, or a file of the VM's own at `owned_path` (an overlay on a base image
/// or a new blank disk; an existing one is kept, so a define can be finished after a crash).
pub fn prepare_disk(d: &DiskSpec, target: &str, owned_path: &Path) -> Result<ResolvedDisk> {
    if let Some(volume) = &d.volume {
        return Ok(ResolvedDisk {
            path: std::path::PathBuf::new(),
            format: DiskFormat::Raw,
            readonly: d.readonly,
            target: target.to_string(),
            owned: false,
            nbd: Some(crate::backend::NbdDisk {
                socket: std::path::PathBuf::new(),
                export: volume.clone(),
                volume_id: 0,
            }),
        });
    }
    let (path, format, owned) = if let Some(base) = &d.image {
        disk::create_overlay(base, owned_path)?;
        (owned_path.to_owned(), DiskFormat::Qcow2, true)
    } else if let Some(path) = &d.path {
        let format = match d.format {
            Some(f) => f,
            None => disk::probe_format(path)?,
        };
        (path.clone(), format, false)
    } else {
        let size = d.size_mib.expect("validated: one disk source is set");
        disk::create_blank(owned_path, size)?;
        (owned_path.to_owned(), DiskFormat::Qcow2, true)
    };
    Ok(ResolvedDisk {
        path,
        format,
        readonly: d.readonly,
        target: target.to_string(),
        owned,
        nbd: None,
    })
}

/// Removes a VM's directory (overlays, owned disks, seed, logs, sockets).
pub fn remove_files(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            what: format!("remove {}", dir.display()),
            source: e,
        }),
    }
}
