//! The image warm-start cache: one ready-state snapshot per machine an image VM boots into,
//! so later runs of the same image restore instead of booting.
//!
//! An entry is an ordinary snapshot (the store of [`crate::snapshot`], so it is written
//! atomically — temp dir, seal, `RENAME_NOREPLACE` — and restored copy-on-write: RAM mapped
//! private, disks as qcow2 overlays over the frozen copies) named [`WARM_PREFIX`] + the hash
//! of a [`WarmKey`]: everything that makes the machine differ (image manifest, kernel and
//! initramfs identity, vCPUs, memory, root disk size, backend, accelerator, command line,
//! serial log cap). It is taken once the guest is ready and before the run's command
//! starts, so it holds none of a command's effects. Two first runs at once both try to
//! publish the same name; the loser's rename fails and it simply does not save.
//!
//! An entry is stale when its image's tag now names another manifest (or is gone) or its
//! kernel or initramfs changed; a new key is used then (the old one is never restored), and
//! [`VmManager::prune_warm`] removes every entry no VM was restored from.

use super::{ManagerError, VmManager};
use crate::snapshot::{FileDigest, SnapshotError, SnapshotInfo};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Name prefix of warm-start snapshots in the snapshot store.
pub const WARM_PREFIX: &str = "image-warm-";

/// What makes the machine of an image run differ; its hash names the cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WarmKey {
    /// Image manifest digest (`sha256:…`).
    pub manifest: String,
    /// Kernel file identity (path, size, mtime, inode).
    pub kernel: FileIdentity,
    /// Initramfs file identity.
    pub initramfs: Option<FileIdentity>,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Requested root disk size (bytes), if any.
    pub rootfs_size: Option<u64>,
    /// Requested backend (`Debug` form of the choice).
    pub backend: String,
    /// Requested accelerator.
    pub accel: String,
    /// Extra kernel command line.
    pub cmdline: String,
    /// Serial log cap.
    pub log_max: u64,
}

/// A file's identity without reading it: a replaced or rewritten kernel has another size,
/// mtime or inode (the restore checks the recorded content digest as well).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileIdentity {
    /// Absolute path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// Inode.
    pub ino: u64,
}

impl FileIdentity {
    /// Stat `path`.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let path = std::path::absolute(path)?;
        let m = std::fs::metadata(&path)?;
        Ok(FileIdentity {
            path,
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ino: m.ino(),
        })
    }
}

impl WarmKey {
    /// The cache entry's snapshot name: [`WARM_PREFIX`] + 24 hex digits of the key's hash.
    pub fn entry_name(&self) -> String {
        use sha2::Digest;
        let json = serde_json::to_vec(self).unwrap_or_default();
        let h = sha2::Sha256::digest(json);
        format!("{WARM_PREFIX}{}", &hex::encode(h)[..24])
    }
}

/// One warm-start cache entry as `system df` counts it.
#[derive(Debug, Clone, Serialize)]
pub struct WarmEntry {
    /// The snapshot.
    pub snapshot: SnapshotInfo,
    /// Its image's tag names another manifest now (or is gone), or its kernel or initramfs
    /// changed: it is never restored again.
    pub stale: bool,
    /// VMs restored from it (which need its files).
    pub users: Vec<String>,
}

/// Whether a recorded file still has the recorded content (gone counts as changed).
fn unchanged(d: &FileDigest) -> bool {
    d.still_matches().unwrap_or(false)
}

impl VmManager {
    /// The warm-start cache entries. `current` says which manifest an image reference
    /// resolves to now (`None`: not stored), for staleness.
    pub async fn list_warm<F>(&self, current: F) -> Result<Vec<WarmEntry>, ManagerError>
    where
        F: Fn(&str) -> Option<String>,
    {
        let mut out = Vec::new();
        for s in self.list_snapshots().await? {
            if !s.meta.name.starts_with(WARM_PREFIX) {
                continue;
            }
            let image_moved = match &s.meta.start.image {
                Some(img) => current(&img.reference).as_deref() != Some(img.manifest.as_str()),
                None => true,
            };
            let meta = s.meta.clone();
            let assets_changed = tokio::task::spawn_blocking(move || {
                !unchanged(&meta.kernel) || meta.initramfs.as_ref().is_some_and(|i| !unchanged(i))
            })
            .await
            .unwrap_or(true);
            let users = self.snapshot_users(&s.meta.name)?;
            out.push(WarmEntry {
                stale: image_moved || assets_changed,
                users,
                snapshot: s,
            });
        }
        Ok(out)
    }

    /// Remove every warm-start entry no VM was restored from; returns the removed ones.
    pub async fn prune_warm(&self) -> Result<Vec<SnapshotInfo>, ManagerError> {
        let mut removed = Vec::new();
        for e in self.list_warm(|_| None).await? {
            if !e.users.is_empty() {
                continue;
            }
            match self.remove_snapshot(&e.snapshot.meta.name, false).await {
                Ok(()) => removed.push(e.snapshot),
                // in use by a restore that started meanwhile, or removed by another prune
                Err(ManagerError::Snapshot(SnapshotError::InUse { .. } | SnapshotError::NotFound { .. })) => {
                }
                Err(err) => return Err(err),
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> WarmKey {
        WarmKey {
            manifest: "sha256:aa".into(),
            kernel: FileIdentity {
                path: "/k".into(),
                size: 1,
                mtime_ns: 2,
                ino: 3,
            },
            initramfs: None,
            cpus: 1,
            memory_mib: 256,
            rootfs_size: None,
            backend: "Auto".into(),
            accel: "Auto".into(),
            cmdline: String::new(),
            log_max: 8 << 20,
        }
    }

    #[test]
    fn every_field_changes_the_entry_name_and_the_name_is_a_valid_snapshot_name() {
        let base = key();
        let name = base.entry_name();
        assert!(name.starts_with(WARM_PREFIX));
        crate::snapshot::validate_name(&name).expect("valid");
        assert_eq!(name, key().entry_name());
        let mut variants = Vec::new();
        let mut k = key();
        k.manifest = "sha256:bb".into();
        variants.push(k);
        let mut k = key();
        k.kernel.mtime_ns = 9;
        variants.push(k);
        let mut k = key();
        k.memory_mib = 512;
        variants.push(k);
        let mut k = key();
        k.cpus = 2;
        variants.push(k);
        let mut k = key();
        k.rootfs_size = Some(1 << 30);
        variants.push(k);
        let mut k = key();
        k.backend = "Qemu".into();
        variants.push(k);
        for v in variants {
            assert_ne!(v.entry_name(), name, "{v:?}");
        }
    }
}
