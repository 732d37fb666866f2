//! Disk images: creating empty raw/qcow2 disks, qcow2 overlays on a backing file, and reading
//! an image's format and size with `qemu-img info`.
//!
//! Raw disks are sparse files (`set_len`), so a 10G disk costs nothing until the guest writes.
//! qcow2 work is delegated to `qemu-img` (spawned with an argument vector, never a shell);
//! every image is created under a temp name beside its destination and renamed into place
//! (no clobbering of existing files).

use super::fsutil;
use super::size::format_size;
use crate::config::{DiskConfig, DiskFormat};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use thiserror::Error;

/// Largest stderr excerpt kept in an error.
const MAX_STDERR: usize = 4096;
/// Largest `qemu-img info` reply accepted.
const MAX_INFO_JSON: usize = 1 << 20;

/// Errors from creating or inspecting disk images.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DiskError {
    /// An overlay's base names host files of its own (the overlay vm-rs returns allows the one
    /// backing file it named, not a chain it did not).
    #[error("overlay base refused")]
    Base(#[source] super::image_refs::ImageRefError),
    /// A disk of size zero was requested.
    #[error("disk size must be greater than zero")]
    ZeroSize,
    /// The destination already exists (disks are never overwritten).
    #[error("{path} already exists")]
    Exists {
        /// Destination path.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A required tool is not installed.
    #[error("{tool} not found (install qemu-utils)")]
    ToolMissing {
        /// Program name.
        tool: &'static str,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("{tool} {args} failed ({status}): {stderr}")]
    ToolFailed {
        /// Program name.
        tool: &'static str,
        /// Its arguments, space-joined for the message.
        args: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Trimmed standard error.
        stderr: String,
    },
    /// `qemu-img info` printed something we could not read.
    #[error("unreadable qemu-img info output for {path}")]
    BadInfo {
        /// The image.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The image format is not one vm-rs attaches.
    #[error("{path} has unsupported format {format:?} (expected raw or qcow2)")]
    UnsupportedFormat {
        /// The image.
        path: PathBuf,
        /// The format `qemu-img` reported.
        format: String,
    },
    /// A resize would shrink the disk (and lose data).
    #[error("{path} is {current} bytes; refusing to shrink it to {requested}")]
    Shrink {
        /// The image.
        path: PathBuf,
        /// Its current virtual size.
        current: u64,
        /// The requested size.
        requested: u64,
    },
    /// A blocking task panicked or was cancelled.
    #[error("disk task did not complete")]
    Join(#[source] tokio::task::JoinError),
}

impl DiskError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            DiskError::ZeroSize | DiskError::Shrink { .. } => K::Invalid,
            DiskError::Exists { .. } => K::Conflict,
            DiskError::Io { source, .. } => K::of_io(source),
            DiskError::ToolMissing { .. } | DiskError::ToolFailed { .. } | DiskError::BadInfo { .. } => {
                K::Backend
            }
            DiskError::UnsupportedFormat { .. } => K::Unsupported,
            DiskError::Join(_) => K::Other,
            DiskError::Base(_) => K::Invalid,
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.to_path_buf();
    move |source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            DiskError::Exists { path }
        } else {
            DiskError::Io { op, path, source }
        }
    }
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Format name (`raw`, `qcow2`, ...).
    pub format: String,
    /// Size the guest sees, in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Bytes allocated on the host, when known.
    #[serde(rename = "actual-size", default)]
    pub actual_size: Option<u64>,
    /// Backing file as recorded in the image (qcow2 overlays).
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
    /// Format recorded for the backing file.
    #[serde(rename = "backing-filename-format", default)]
    pub backing_format: Option<String>,
}

impl ImageInfo {
    /// The format as a [`DiskFormat`], if vm-rs can attach it.
    pub fn disk_format(&self) -> Option<DiskFormat> {
        match self.format.as_str() {
            "raw" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            _ => None,
        }
    }
}

/// Run `qemu-img` with `args`; return stdout.
pub(crate) async fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, DiskError> {
    const TOOL: &str = "qemu-img";
    let output = tokio::process::Command::new(TOOL)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                DiskError::ToolMissing { tool: TOOL, source }
            } else {
                DiskError::Io {
                    op: "spawn",
                    path: PathBuf::from(TOOL),
                    source,
                }
            }
        })?;
    if !output.status.success() {
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if stderr.len() > MAX_STDERR {
            let mut cut = MAX_STDERR;
            while !stderr.is_char_boundary(cut) {
                cut -= 1;
            }
            stderr.truncate(cut);
        }
        return Err(DiskError::ToolFailed {
            tool: TOOL,
            args: args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            status: output.status,
            stderr,
        });
    }
    Ok(output.stdout)
}

/// Create an empty disk of `size` bytes at `path`: a sparse raw file, or a qcow2 image via
/// `qemu-img create`. Fails with [`DiskError::Exists`] if `path` exists.
pub async fn create_disk(path: &Path, size: u64, format: DiskFormat) -> Result<(), DiskError> {
    if size == 0 {
        return Err(DiskError::ZeroSize);
    }
    if path.exists() {
        return Err(DiskError::Exists {
            path: path.to_path_buf(),
        });
    }
    let dest = path.to_path_buf();
    let tmp = tokio::task::spawn_blocking({
        let dest = dest.clone();
        move || fsutil::temp_beside(&dest)
    })
    .await
    .map_err(DiskError::Join)?
    .map_err(io_err("create temp file for", path))?;
    match format {
        DiskFormat::Raw => {
            tmp.as_file()
                .set_len(size)
                .map_err(io_err("resize", tmp.path()))?;
        }
        DiskFormat::Qcow2 => {
            let size_arg = size.to_string();
            qemu_img(&[
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                tmp.path().as_os_str(),
                size_arg.as_ref(),
            ])
            .await?;
        }
    }
    tokio::task::spawn_blocking(move || fsutil::persist(tmp, &dest, false))
        .await
        .map_err(DiskError::Join)?
        .map_err(io_err("publish", path))?;
    tracing::debug!(path = %path.display(), size = %format_size(size), %format, "created disk");
    Ok(())
}

/// Create a qcow2 overlay at `target` whose backing file is `base` (in `base_format`).
/// Guest writes land in the overlay; `base` is only ever read. The backing path is recorded
/// as an absolute path so the overlay can be moved. Returns a [`DiskConfig`] for the overlay,
/// with [`crate::config::BackingPolicy::Allow`]: vm-rs named its one backing file. A qcow2 base
/// that itself names other host files is refused ([`DiskError::Base`]).
pub async fn create_overlay(
    base: &Path,
    base_format: DiskFormat,
    target: &Path,
) -> Result<DiskConfig, DiskError> {
    let base_abs = tokio::fs::canonicalize(base)
        .await
        .map_err(io_err("resolve", base))?;
    if target.exists() {
        return Err(DiskError::Exists {
            path: target.to_path_buf(),
        });
    }
    let base_disk = DiskConfig {
        format: base_format,
        ..DiskConfig::new(&base_abs)
    };
    tokio::task::spawn_blocking(move || super::image_refs::check_disk(&base_disk))
        .await
        .map_err(DiskError::Join)?
        .map_err(DiskError::Base)?;
    let dest = target.to_path_buf();
    let tmp = tokio::task::spawn_blocking({
        let dest = dest.clone();
        move || fsutil::temp_beside(&dest)
    })
    .await
    .map_err(DiskError::Join)?
    .map_err(io_err("create temp file for", target))?;
    let fmt = base_format.to_string();
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        fmt.as_ref(),
        "-b".as_ref(),
        base_abs.as_os_str(),
        tmp.path().as_os_str(),
    ])
    .await?;
    tokio::task::spawn_blocking(move || fsutil::persist(tmp, &dest, false))
        .await
        .map_err(DiskError::Join)?
        .map_err(io_err("publish", target))?;
    let mut disk = DiskConfig::new(target);
    disk.format = DiskFormat::Qcow2;
    // vm-rs made this chain and named the base itself.
    disk.backing = crate::config::BackingPolicy::Allow;
    Ok(disk)
}

/// Grow the disk at `path` to `size` bytes: `set_len` for raw, `qemu-img resize` for qcow2.
/// Shrinking is refused ([`DiskError::Shrink`]); the same size is a no-op.
pub async fn grow_disk(path: &Path, format: DiskFormat, size: u64) -> Result<(), DiskError> {
    let current = match format {
        DiskFormat::Raw => tokio::fs::metadata(path)
            .await
            .map_err(io_err("stat", path))?
            .len(),
        DiskFormat::Qcow2 => image_info_as(path, Some(format)).await?.virtual_size,
    };
    if size < current {
        return Err(DiskError::Shrink {
            path: path.to_path_buf(),
            current,
            requested: size,
        });
    }
    if size == current {
        return Ok(());
    }
    match format {
        DiskFormat::Raw => {
            let f = tokio::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .await
                .map_err(io_err("open", path))?;
            f.set_len(size).await.map_err(io_err("resize", path))?;
            f.sync_all().await.map_err(io_err("sync", path))?;
        }
        DiskFormat::Qcow2 => {
            let size_arg = size.to_string();
            qemu_img(&[
                "resize".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                path.as_os_str(),
                size_arg.as_ref(),
            ])
            .await?;
        }
    }
    Ok(())
}

/// Read an image's format, virtual size and backing file with `qemu-img info` (with
/// `--force-share`, so it works on an image a running VM holds).
pub async fn image_info(path: &Path) -> Result<ImageInfo, DiskError> {
    image_info_as(path, None).await
}

/// [`image_info`] reading the image as `format` (`qemu-img info -f`): nothing is guessed from
/// the content. With `None` qemu-img probes the format (only for tools that ask what a file
/// is; never for a disk a VM gets).
pub async fn image_info_as(path: &Path, format: Option<DiskFormat>) -> Result<ImageInfo, DiskError> {
    let fmt = format.map(|f| f.to_string());
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "info".as_ref(),
        "--force-share".as_ref(),
        "--output=json".as_ref(),
    ];
    if let Some(f) = &fmt {
        args.push("-f".as_ref());
        args.push(f.as_ref());
    }
    args.push(path.as_os_str());
    let out = qemu_img(&args).await?;
    if out.len() > MAX_INFO_JSON {
        return Err(DiskError::UnsupportedFormat {
            path: path.to_path_buf(),
            format: "oversized qemu-img info reply".into(),
        });
    }
    serde_json::from_slice(&out).map_err(|source| DiskError::BadInfo {
        path: path.to_path_buf(),
        source,
    })
}

/// Probe `path` and return a [`DiskConfig`] with its real format (raw or qcow2).
pub async fn probe_disk(path: &Path) -> Result<DiskConfig, DiskError> {
    let info = image_info(path).await?;
    let format = info.disk_format().ok_or_else(|| DiskError::UnsupportedFormat {
        path: path.to_path_buf(),
        format: info.format.clone(),
    })?;
    let mut disk = DiskConfig::new(path);
    disk.format = format;
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn raw_disk_is_sparse_and_sized() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.img");
        create_disk(&p, 64 << 20, DiskFormat::Raw).await.expect("create");
        let md = std::fs::metadata(&p).expect("stat");
        assert_eq!(md.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(md.blocks() * 512 < 1 << 20, "raw disk is not sparse");
        let again = create_disk(&p, 1 << 20, DiskFormat::Raw).await;
        assert!(matches!(again, Err(DiskError::Exists { .. })));
        assert_eq!(std::fs::metadata(&p).expect("stat").len(), 64 << 20);
        assert!(matches!(
            create_disk(&dir.path().join("z"), 0, DiskFormat::Raw).await,
            Err(DiskError::ZeroSize)
        ));
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn info_json_parses() {
        let j = r#"{"virtual-size": 10737418240, "filename": "o.qcow2", "cluster-size": 65536,
            "format": "qcow2", "actual-size": 200704, "backing-filename": "/b.img",
            "backing-filename-format": "raw", "dirty-flag": false}"#;
        let info: ImageInfo = serde_json::from_str(j).expect("parse");
        assert_eq!(info.disk_format(), Some(DiskFormat::Qcow2));
        assert_eq!(info.virtual_size, 10 << 30);
        assert_eq!(info.backing_filename.as_deref(), Some("/b.img"));
    }
}
