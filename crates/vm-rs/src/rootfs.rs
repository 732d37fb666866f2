//! Root filesystems built from OCI images: an ext4 image per image manifest, cached, and a
//! copy-on-write overlay per VM.
//!
//! [`build_rootfs`] unpacks a stored image ([`ImageStore::unpack`]) into a temporary directory
//! and runs `mkfs.ext4 -d DIR` on it (ownership and modes come from the unpacked tree), sized
//! to the content plus a margin. The result is cached as `$VMRS_HOME/rootfs/<manifest hex>.ext4`
//! — written to a temporary name, fsynced and renamed, so a cache file is always complete — and
//! a later build of the same manifest is a cache hit. [`vm_overlay`] puts a qcow2 overlay backed
//! by the cached image into a VM's directory: the VM writes only to its overlay, the cache is
//! never modified. The guest init finds the disk by its serial [`ROOT_SERIAL`] (see
//! [`root_cmdline`]) and switches root to it.

use crate::agent::ImageProcess;
use crate::config::DiskFormat;
use crate::oci::{Digest, ImageConfig, ImageStore, UnpackError, UnpackOptions};
use crate::storage::DiskError;
use std::path::{Path, PathBuf};

/// Serial number of the root disk; the guest init looks for it (`vmrs.root=serial:…`).
pub const ROOT_SERIAL: &str = "vmrs-root";

/// Errors building or attaching an image root filesystem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootfsError {
    /// Reading the image from the store failed.
    #[error("image {reference:?} is not usable")]
    Store {
        /// The image reference.
        reference: String,
        /// Cause.
        #[source]
        source: crate::oci::StoreError,
    },
    /// Unpacking the image failed.
    #[error("cannot unpack image {reference:?}")]
    Unpack {
        /// The image reference.
        reference: String,
        /// Cause.
        #[source]
        source: UnpackError,
    },
    /// File-system work failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 failed ({status}): {stderr}")]
    Mkfs {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its error output.
        stderr: String,
    },
    /// Creating the VM's overlay failed.
    #[error("cannot create the root overlay")]
    Overlay(#[source] DiskError),
    /// The root disk size asked for is smaller than the image's file system.
    #[error("a root disk of {requested} bytes cannot hold the image's {needed}-byte file system")]
    TooSmall {
        /// Asked for.
        requested: u64,
        /// The image's file system.
        needed: u64,
    },
    /// A blocking task failed.
    #[error("background task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl RootfsError {
    /// What kind of failure this is, looking through to the cause (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            RootfsError::Store { source, .. } => source.kind(),
            RootfsError::Unpack { source, .. } => source.kind(),
            RootfsError::Io { .. } | RootfsError::Task(_) => K::Other,
            RootfsError::Mkfs { .. } => K::Backend,
            RootfsError::Overlay(e) => e.kind(),
            RootfsError::TooSmall { .. } => K::Invalid,
        }
    }
}

/// A cached root filesystem image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    /// The ext4 image (read-only by convention: only overlays are written).
    pub path: PathBuf,
    /// The manifest digest it was built from.
    pub manifest: Digest,
    /// The image's process settings (entrypoint, cmd, env, working dir, user).
    pub process: ImageProcess,
    /// Whether this call built it (false: cache hit).
    pub built: bool,
}

/// Directory of cached root filesystems under a data dir.
pub fn cache_dir(home: &Path) -> PathBuf {
    home.join("rootfs")
}

/// The process part of an image config.
pub fn image_process(config: &ImageConfig) -> ImageProcess {
    ImageProcess {
        entrypoint: config.entrypoint.clone(),
        cmd: config.cmd.clone(),
        env: config.env.clone(),
        working_dir: config.working_dir.clone(),
        user: config.user.clone(),
    }
}

/// Kernel parameters that make the guest init switch root to the disk [`vm_overlay`] made.
pub fn root_cmdline() -> Vec<String> {
    vec![
        format!("vmrs.root=serial:{ROOT_SERIAL}"),
        "vmrs.rootfstype=ext4".to_string(),
    ]
}

/// The ext4 root filesystem for `reference` (a stored image), built on a cache miss.
pub async fn build_rootfs(store: &ImageStore, home: &Path, reference: &str) -> Result<Rootfs, RootfsError> {
    let image = store
        .image(reference)
        .await
        .map_err(|source| RootfsError::Store {
            reference: reference.to_string(),
            source,
        })?;
    let manifest = image.record.manifest.clone();
    let process = image_process(&image.config);
    let dir = cache_dir(home);
    let path = dir.join(format!("{}.ext4", manifest.hex()));
    if path.is_file() {
        return Ok(Rootfs {
            path,
            manifest,
            process,
            built: false,
        });
    }
    crate::paths::create_private_dir_all(&dir).map_err(io_err("create", &dir))?;
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&dir)
        .map_err(io_err("create a build directory in", &dir))?;
    let tree = work.path().join("tree");
    store
        .unpack(reference, &tree, &UnpackOptions::default())
        .await
        .map_err(|source| RootfsError::Unpack {
            reference: reference.to_string(),
            source,
        })?;
    let tmp = work.path().join("rootfs.ext4");
    let (tree2, tmp2, path2) = (tree.clone(), tmp.clone(), path.clone());
    tokio::task::spawn_blocking(move || make_ext4(&tree2, &tmp2, &path2))
        .await
        .map_err(RootfsError::Task)??;
    Ok(Rootfs {
        path,
        manifest,
        process,
        built: true,
    })
}

/// Build an ext4 root file system at `dest` from the directory `tree` (a container runtime's
/// mounted bundle rootfs, say), sized as [`build_rootfs`] sizes image roots. It is written under
/// a temporary name beside `dest` and renamed when complete; `dest` is replaced if it exists.
pub async fn build_rootfs_from_dir(tree: &Path, dest: &Path) -> Result<(), RootfsError> {
    let tmp = dest.with_extension("ext4.new");
    let (tree, tmp2, dest) = (tree.to_path_buf(), tmp.clone(), dest.to_path_buf());
    let result = tokio::task::spawn_blocking(move || make_ext4(&tree, &tmp2, &dest))
        .await
        .map_err(RootfsError::Task)?;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// `mkfs.ext4 -d tree tmp SIZE`, fsync, rename to `dest` (blocking).
fn make_ext4(tree: &Path, tmp: &Path, dest: &Path) -> Result<(), RootfsError> {
    let (bytes, entries) = tree_usage(tree)?;
    // Content plus a quarter for metadata and block rounding, plus 64 MiB of free space.
    let size_mib = (bytes + bytes / 4 + entries * 4096) / (1 << 20) + 64;
    let inodes = entries * 2 + 4096;
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", ROOT_SERIAL, "-N"])
        .arg(inodes.to_string())
        .arg("-d")
        .arg(tree)
        .arg(tmp)
        .arg(format!("{size_mib}M"))
        .output()
        .map_err(io_err("run mkfs.ext4 for", tmp))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        let tail: String = text
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(RootfsError::Mkfs {
            status: out.status,
            stderr: tail,
        });
    }
    let f = std::fs::File::open(tmp).map_err(io_err("open", tmp))?;
    // mkfs.ext4 created it under the caller's umask.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(crate::paths::PRIVATE_FILE_MODE))
        .map_err(io_err("chmod", tmp))?;
    f.sync_all().map_err(io_err("sync", tmp))?;
    std::fs::rename(tmp, dest).map_err(io_err("rename into place", dest))?;
    if let Some(parent) = dest.parent() {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Bytes of regular-file content and number of entries under `root` (not following links).
fn tree_usage(root: &Path) -> Result<(u64, u64), RootfsError> {
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(io_err("read", &dir))?;
        for e in rd {
            let e = e.map_err(io_err("read", &dir))?;
            let ft = e.file_type().map_err(io_err("stat", &e.path()))?;
            entries += 1;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                bytes += e.metadata().map_err(io_err("stat", &e.path()))?.len();
            }
        }
    }
    Ok((bytes, entries))
}

/// File name of a VM's root overlay inside its directory.
pub const ROOT_OVERLAY: &str = crate::vm_dir::VmDir::ROOT_OVERLAY;

/// The root disk device of a VM booted from an image: `<vm_dir>/root.qcow2`, found by the guest
/// by its serial [`ROOT_SERIAL`]. Pure: see [`vm_overlay`] for creating the file.
pub fn root_disk(vm_dir: &Path) -> crate::devices::Disk {
    crate::devices::Disk {
        id: "vmrs-root".into(),
        path: vm_dir.join(ROOT_OVERLAY),
        format: DiskFormat::Qcow2,
        read_only: false,
        cache: crate::config::CacheMode::Writeback,
        serial: Some(ROOT_SERIAL.into()),
    }
}

/// The size of a VM's root disk for an image file system of `base` bytes: `requested` when
/// given (at least `base`), else `base` plus as much again, at least 1 GiB, of free space (and
/// [`GROWTH_OVERHEAD`] for the metadata of the grown part).
pub fn root_disk_size(base: u64, requested: Option<u64>) -> Result<u64, RootfsError> {
    match requested {
        Some(r) if r < base => Err(RootfsError::TooSmall {
            requested: r,
            needed: base,
        }),
        Some(r) => Ok(r),
        None => Ok(base
            .saturating_add(base.max(DEFAULT_FREE))
            .saturating_add(GROWTH_OVERHEAD)),
    }
}

/// Free space a root disk gets at least by default (see [`root_disk_size`]).
pub const DEFAULT_FREE: u64 = 1 << 30;
/// What the default root disk size adds for the inode tables and group descriptors of the
/// grown part of the file system, so the free space is at least [`DEFAULT_FREE`].
pub const GROWTH_OVERHEAD: u64 = 64 << 20;

/// Create `<vm_dir>/root.qcow2`, a qcow2 overlay backed by `rootfs` (never written) of
/// [`root_disk_size`] (the guest grows the file system to fill it at boot), unless it exists
/// already (a restarted VM keeps its root disk), and return it as the root disk. The overlay is
/// made under a temporary name and renamed when complete.
pub async fn vm_overlay(
    rootfs: &Path,
    vm_dir: &Path,
    size: Option<u64>,
) -> Result<crate::devices::Disk, RootfsError> {
    let disk = root_disk(vm_dir);
    if disk.path.exists() {
        return Ok(disk);
    }
    let base = tokio::fs::metadata(rootfs)
        .await
        .map_err(io_err("stat", rootfs))?
        .len();
    let size = root_disk_size(base, size)?;
    let tmp = vm_dir.join(format!("{ROOT_OVERLAY}.new"));
    let _ = tokio::fs::remove_file(&tmp).await;
    crate::storage::create_overlay(rootfs, DiskFormat::Raw, &tmp)
        .await
        .map_err(RootfsError::Overlay)?;
    if let Err(e) = crate::storage::grow_disk(&tmp, DiskFormat::Qcow2, size).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(RootfsError::Overlay(e));
    }
    tokio::fs::rename(&tmp, &disk.path)
        .await
        .map_err(io_err("rename into place", &disk.path))?;
    Ok(disk)
}

/// Root caches and who uses them, from [`cache_usage`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheUsage {
    /// Every cache file (`<manifest hex>.ext4`) and abandoned build directory, with its
    /// allocated bytes and whether something uses it.
    pub entries: Vec<CacheEntry>,
}

/// One root cache.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CacheEntry {
    /// The file (or an abandoned `.build-*` directory).
    pub path: PathBuf,
    /// Allocated bytes (`du`).
    pub bytes: u64,
    /// A stored image has this manifest, or a VM's root overlay is backed by it (or some VM's
    /// records cannot be read, so nothing can be ruled out).
    pub in_use: bool,
}

impl CacheUsage {
    /// Allocated bytes of all caches.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// The caches nothing uses.
    pub fn unused(&self) -> impl Iterator<Item = &CacheEntry> {
        self.entries.iter().filter(|e| !e.in_use)
    }
}

/// How long a `.build-*` directory may exist before it counts as abandoned (its builder was
/// killed); younger ones may belong to a build in progress.
pub const ABANDONED_BUILD_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The root caches under the data dir `home` and whether each is used: by an image in `store`
/// (same manifest digest) or by a VM under `home/vms` (its `start.json` names it).
pub async fn cache_usage(home: &Path, store: &ImageStore) -> Result<CacheUsage, RootfsError> {
    let manifests: std::collections::HashSet<String> = store
        .list()
        .await
        .map_err(|source| RootfsError::Store {
            reference: "*".into(),
            source,
        })?
        .into_iter()
        .map(|i| i.record.manifest.hex().to_string())
        .collect();
    let home = home.to_path_buf();
    tokio::task::spawn_blocking(move || scan_caches(&home, &manifests))
        .await
        .map_err(RootfsError::Task)?
}

fn scan_caches(
    home: &Path,
    manifests: &std::collections::HashSet<String>,
) -> Result<CacheUsage, RootfsError> {
    let dir = cache_dir(home);
    // The caches VMs' overlays are backed by (an unreadable record keeps everything).
    let mut used_by_vms = std::collections::HashSet::new();
    let mut unknown_vm = false;
    let vms = home.join("vms");
    if let Ok(rd) = std::fs::read_dir(&vms) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let start = e.path().join(crate::vm_dir::VmDir::START);
            match std::fs::read(&start) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => unknown_vm = true,
                Ok(b) => match serde_json::from_slice::<crate::manager::StartOptions>(&b) {
                    Ok(o) => {
                        if let Some(name) = o.rootfs.as_deref().and_then(Path::file_name) {
                            used_by_vms.insert(name.to_os_string());
                        }
                    }
                    Err(_) => unknown_vm = true,
                },
            }
        }
    }
    let mut usage = CacheUsage::default();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(usage),
        Err(e) => {
            return Err(RootfsError::Io {
                op: "list",
                path: dir,
                source: e,
            })
        }
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let text = name.to_string_lossy();
        let path = e.path();
        let in_use = if let Some(hex) = text.strip_suffix(".ext4") {
            unknown_vm || manifests.contains(hex) || used_by_vms.contains(&name)
        } else if text.starts_with(".build-") {
            // A build in progress is "used"; one whose builder died long ago is not.
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map_or(true, |age| age < ABANDONED_BUILD_AGE)
        } else {
            continue;
        };
        let bytes = crate::storage::disk_usage(&path).map_err(io_err("measure", &path))?;
        usage.entries.push(CacheEntry { path, bytes, in_use });
    }
    usage.entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(usage)
}

/// Delete the root caches nothing uses ([`cache_usage`]); returns what was deleted.
pub async fn gc_caches(home: &Path, store: &ImageStore) -> Result<Vec<CacheEntry>, RootfsError> {
    let usage = cache_usage(home, store).await?;
    let unused: Vec<CacheEntry> = usage.unused().cloned().collect();
    tokio::task::spawn_blocking(move || {
        let mut removed = Vec::new();
        for e in unused {
            let r = if e.path.is_dir() {
                std::fs::remove_dir_all(&e.path)
            } else {
                std::fs::remove_file(&e.path)
            };
            match r {
                Ok(()) => removed.push(e),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RootfsError::Io {
                        op: "remove",
                        path: e.path,
                        source,
                    })
                }
            }
        }
        Ok(removed)
    })
    .await
    .map_err(RootfsError::Task)?
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_disk_is_the_overlay_with_the_serial() {
        let d = root_disk(Path::new("/v"));
        assert_eq!(d.path, Path::new("/v/root.qcow2"));
        assert_eq!(d.format, DiskFormat::Qcow2);
        assert_eq!(d.serial.as_deref(), Some(ROOT_SERIAL));
        assert!(!d.read_only);
    }

    #[test]
    fn root_disks_get_free_space() {
        let mib = 1 << 20;
        assert_eq!(
            root_disk_size(100 * mib, None).unwrap(),
            100 * mib + DEFAULT_FREE + GROWTH_OVERHEAD
        );
        assert_eq!(
            root_disk_size(3 << 30, None).unwrap(),
            (6 << 30) + GROWTH_OVERHEAD
        );
        assert_eq!(root_disk_size(100 * mib, Some(2 << 30)).unwrap(), 2 << 30);
        assert!(matches!(
            root_disk_size(100 * mib, Some(mib)),
            Err(RootfsError::TooSmall { .. })
        ));
        assert_eq!(root_disk_size(u64::MAX, None).unwrap(), u64::MAX);
    }

    #[test]
    fn cmdline_names_the_root_serial() {
        assert_eq!(
            root_cmdline(),
            ["vmrs.root=serial:vmrs-root", "vmrs.rootfstype=ext4"]
        );
    }
}
