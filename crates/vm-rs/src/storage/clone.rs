//! Copy-on-write disk clones.
//!
//! [`clone_disk`] makes a writable copy of a base image that never modifies the base:
//!
//! 1. **Reflink** (`FICLONE` ioctl) where the filesystem shares extents between files (XFS with
//!    `reflink=1`, Btrfs, bcachefs, ...): instant, and no space used until either side writes.
//! 2. **Sparse copy** everywhere else: the data ranges of the base (found with `SEEK_DATA` /
//!    `SEEK_HOLE`) are copied with `copy_file_range` (in-kernel, no user-space buffer), and holes
//!    stay holes, so a mostly-empty 10G image stays mostly unallocated.
//!
//! The clone is written under a temp name beside the target, fsynced and renamed into place;
//! an existing target is never overwritten. For qcow2 overlays with a backing file see
//! [`super::disk::create_overlay`].

use super::fsutil;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// How a clone was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloneMethod {
    /// Extents shared with the base (`FICLONE`).
    Reflink,
    /// Data ranges copied, holes kept.
    SparseCopy,
}

impl std::fmt::Display for CloneMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloneMethod::Reflink => "reflink",
            CloneMethod::SparseCopy => "sparse-copy",
        })
    }
}

/// Which strategies [`clone_disk_with`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClonePolicy {
    /// Reflink if possible, else sparse copy (default).
    #[default]
    Auto,
    /// Only reflink; fail with [`CloneError::ReflinkUnsupported`] otherwise.
    ReflinkOnly,
    /// Always copy the data with plain reads and writes (holes kept), so the clone shares no
    /// extents with the base even where `copy_file_range` would quietly reflink (XFS, Btrfs).
    CopyOnly,
}

/// Errors from cloning a disk.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CloneError {
    /// The base is not a regular file.
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The base path.
        path: PathBuf,
    },
    /// The target exists (clones never overwrite).
    #[error("{path} already exists")]
    TargetExists {
        /// The target path.
        path: PathBuf,
    },
    /// Reflink was required but the filesystem refused it.
    #[error("filesystem of {path} does not support reflink clones")]
    ReflinkUnsupported {
        /// The target path.
        path: PathBuf,
        /// The ioctl error.
        #[source]
        source: std::io::Error,
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
    /// The base changed size while it was being copied.
    #[error("{path} changed while it was being cloned")]
    BaseChanged {
        /// The base path.
        path: PathBuf,
    },
    /// The blocking task panicked or was cancelled.
    #[error("clone task did not complete")]
    Join(#[source] tokio::task::JoinError),
}

impl CloneError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            CloneError::NotAFile { .. } => K::Invalid,
            CloneError::TargetExists { .. } => K::Conflict,
            CloneError::ReflinkUnsupported { .. } => K::Unsupported,
            CloneError::Io { source, .. } => K::of_io(source),
            CloneError::BaseChanged { .. } => K::Conflict,
            CloneError::Join(_) => K::Other,
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CloneError {
    let path = path.to_path_buf();
    move |source| CloneError::Io { op, path, source }
}

/// Clone `base` to `target`: reflink where supported, else a sparse copy. Returns the method
/// used. `base` is opened read-only and never modified.
pub async fn clone_disk(base: &Path, target: &Path) -> Result<CloneMethod, CloneError> {
    clone_disk_with(base, target, ClonePolicy::Auto).await
}

/// [`clone_disk`] with an explicit [`ClonePolicy`].
pub async fn clone_disk_with(
    base: &Path,
    target: &Path,
    policy: ClonePolicy,
) -> Result<CloneMethod, CloneError> {
    let (base, target) = (base.to_path_buf(), target.to_path_buf());
    tokio::task::spawn_blocking(move || clone_disk_blocking(&base, &target, policy))
        .await
        .map_err(CloneError::Join)?
}

/// The blocking implementation of [`clone_disk_with`], for callers already off the runtime.
pub fn clone_disk_blocking(
    base: &Path,
    target: &Path,
    policy: ClonePolicy,
) -> Result<CloneMethod, CloneError> {
    let src = File::open(base).map_err(io_err("open", base))?;
    let meta = src.metadata().map_err(io_err("stat", base))?;
    if !meta.is_file() {
        return Err(CloneError::NotAFile {
            path: base.to_path_buf(),
        });
    }
    if target.exists() {
        return Err(CloneError::TargetExists {
            path: target.to_path_buf(),
        });
    }
    let tmp = fsutil::temp_beside(target).map_err(io_err("create temp file for", target))?;

    let method = match policy {
        ClonePolicy::CopyOnly => {
            sparse_copy(&src, tmp.as_file(), meta.len(), base, false)?;
            CloneMethod::SparseCopy
        }
        ClonePolicy::ReflinkOnly | ClonePolicy::Auto => match reflink(&src, tmp.as_file()) {
            Ok(()) => CloneMethod::Reflink,
            Err(e) if policy == ClonePolicy::ReflinkOnly || !reflink_unsupported(&e) => {
                return Err(if reflink_unsupported(&e) {
                    CloneError::ReflinkUnsupported {
                        path: target.to_path_buf(),
                        source: e,
                    }
                } else {
                    CloneError::Io {
                        op: "reflink",
                        path: target.to_path_buf(),
                        source: e,
                    }
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, base = %base.display(), "reflink unsupported, sparse copy");
                sparse_copy(&src, tmp.as_file(), meta.len(), base, true)?;
                CloneMethod::SparseCopy
            }
        },
    };

    // The clone belongs to whoever runs the VM: the base's mode plus owner write.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = (meta.permissions().mode() & 0o777) | 0o200;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", tmp.path()))?;
    }
    fsutil::persist(tmp, target, false).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CloneError::TargetExists {
                path: target.to_path_buf(),
            }
        } else {
            CloneError::Io {
                op: "publish",
                path: target.to_path_buf(),
                source,
            }
        }
    })?;
    tracing::debug!(base = %base.display(), target = %target.display(), %method, "cloned disk");
    Ok(method)
}

/// Errors meaning "this filesystem/pair cannot reflink", as opposed to real I/O failures.
fn reflink_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS)
    )
}

#[cfg(target_os = "linux")]
fn reflink(src: &File, dst: &File) -> std::io::Result<()> {
    rustix::fs::ioctl_ficlone(dst, src).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn reflink(_src: &File, _dst: &File) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

/// Copy the data ranges of `src` (length `len`) into `dst`, leaving holes unallocated; with
/// `kernel_copy` through `copy_file_range`, else with reads and writes.
fn sparse_copy(src: &File, dst: &File, len: u64, base: &Path, kernel_copy: bool) -> Result<(), CloneError> {
    dst.set_len(len).map_err(io_err("resize clone of", base))?;
    let mut pos = 0u64;
    while pos < len {
        let (start, end) = match next_data(src, pos, len) {
            Ok(Some(range)) => range,
            Ok(None) => break,
            Err(e) => return Err(io_err("find data in", base)(e)),
        };
        copy_range(src, dst, start, end, base, kernel_copy)?;
        pos = end;
    }
    Ok(())
}

/// The next `[start, end)` data range at or after `pos`, or `None` if only holes remain.
/// Filesystems without `SEEK_DATA` report the whole rest of the file as data.
#[cfg(target_os = "linux")]
fn next_data(src: &File, pos: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let start = match seek(src, SeekFrom::Data(pos)) {
        Ok(s) => s,
        Err(rustix::io::Errno::NXIO) => return Ok(None),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => return Ok(Some((pos, len))),
        Err(e) => return Err(e.into()),
    };
    if start >= len {
        return Ok(None);
    }
    let end = match seek(src, SeekFrom::Hole(start)) {
        Ok(e) => e.min(len),
        Err(rustix::io::Errno::NXIO) => len,
        Err(e) => return Err(e.into()),
    };
    Ok(Some((start, end)))
}

#[cfg(not(target_os = "linux"))]
fn next_data(_src: &File, pos: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    Ok(Some((pos, len)))
}

/// Copy `[start, end)` from `src` to the same offsets in `dst`: `copy_file_range` where the
/// kernel can (and `kernel_copy` allows), else `pread`/`pwrite`.
fn copy_range(
    src: &File,
    dst: &File,
    start: u64,
    end: u64,
    base: &Path,
    kernel_copy: bool,
) -> Result<(), CloneError> {
    #[cfg(target_os = "linux")]
    const CHUNK: u64 = 64 << 20;
    let mut off = start;
    #[cfg(target_os = "linux")]
    while kernel_copy && off < end {
        let want = (end - off).min(CHUNK) as usize;
        let (mut off_in, mut off_out) = (off, off);
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => {
                return Err(CloneError::BaseChanged {
                    path: base.to_path_buf(),
                })
            }
            Ok(n) => off += n as u64,
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::INVAL,
            ) => break,
            Err(e) => return Err(io_err("copy", base)(e.into())),
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = kernel_copy;
    // Fallback (or non-Linux, or no kernel copy wanted): plain positional reads and writes.
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (1 << 20).min((end - off) as usize)];
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        let n = src.read_at(&mut buf[..want], off).map_err(io_err("read", base))?;
        if n == 0 {
            return Err(CloneError::BaseChanged {
                path: base.to_path_buf(),
            });
        }
        dst.write_all_at(&buf[..n], off)
            .map_err(io_err("write clone of", base))?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[tokio::test]
    async fn clone_copies_content_and_refuses_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.img");
        let f = File::create(&base).expect("create");
        f.set_len(8 << 20).expect("len");
        f.write_all_at(b"head", 0).expect("write");
        f.write_all_at(b"tail", (8 << 20) - 4).expect("write");
        drop(f);
        let target = dir.path().join("clone.img");
        clone_disk_with(&base, &target, ClonePolicy::CopyOnly)
            .await
            .expect("clone");
        assert_eq!(
            std::fs::read(&base).expect("read"),
            std::fs::read(&target).expect("read")
        );
        let again = clone_disk(&base, &target).await;
        assert!(matches!(again, Err(CloneError::TargetExists { .. })));
        let dirent = clone_disk(dir.path(), &dir.path().join("x")).await;
        assert!(matches!(dirent, Err(CloneError::NotAFile { .. })));
    }
}
