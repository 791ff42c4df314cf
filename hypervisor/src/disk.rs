//! Disk files of a VM: copy-on-write overlays on base images and new blank disks, made with
//! `qemu-img` (Debian package `qemu-utils`).

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};
use crate::spec::DiskFormat;

/// Probes the format of an image file (`qemu-img info`).
pub fn probe_format(path: &Path) -> Result<DiskFormat> {
    let out = qemu_img(&["info", "--output=json", "-U"], path, None, path)?;
    let info: serde_json::Value = serde_json::from_slice(&out).map_err(|e| Error::Image {
        path: path.to_owned(),
        reason: format!("qemu-img info: {e}"),
    })?;
    match info["format"].as_str() {
        Some("raw") => Ok(DiskFormat::Raw),
        Some("qcow2") => Ok(DiskFormat::Qcow2),
        other => Err(Error::Image {
            path: path.to_owned(),
            reason: format!("unsupported image format {other:?} (raw and qcow2 are)"),
        }),
    }
}

/// Creates a qcow2 overlay backed by `base`, unless `overlay` already exists (a define that a
/// crash interrupted is finished, not redone).
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<()> {
    if overlay.exists() {
        return Ok(());
    }
    let fmt = probe_format(base)?;
    let tmp = overlay.with_extension("tmp");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-F", fmt.as_str(), "-b"];
    let base_str = base.to_str().ok_or_else(|| Error::Image {
        path: base.to_owned(),
        reason: "path is not UTF-8".into(),
    })?;
    args.push(base_str);
    qemu_img(&args, &tmp, None, overlay)?;
    std::fs::rename(&tmp, overlay).map_err(Error::io(format!("rename {}", tmp.display())))
}

/// Creates a blank qcow2 disk of `size_mib`, unless it already exists.
pub fn create_blank(path: &Path, size_mib: u64) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let size = format!("{size_mib}M");
    qemu_img(&["create", "-q", "-f", "qcow2"], &tmp, Some(&size), path)?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("rename {}", tmp.display())))
}

/// Runs `qemu-img ARGS FILE [SIZE]`; errors name `named`, the file the user knows.
fn qemu_img(args: &[&str], file: &Path, size: Option<&str>, named: &Path) -> Result<Vec<u8>> {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(file)
        .args(size)
        .output()
        .map_err(Error::io("run qemu-img"))?;
    if !out.status.success() {
        return Err(Error::Image {
            path: named.to_owned(),
            reason: format!(
                "qemu-img {}: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}
