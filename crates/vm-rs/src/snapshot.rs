//! Snapshots: a running VM saved once, started many times ([`crate::VmManager::snapshot`],
//! [`crate::VmManager::restore`], [`crate::VmManager::clone_snapshot`]).
//!
//! ## Layout
//!
//! A snapshot is a directory `$VMRS_HOME/snapshots/<name>/` ([`SnapshotDir`] owns every name in
//! it), made under a temporary name (`.tmp-<name>-<pid>`) and renamed into place once complete,
//! so a snapshot that exists is whole: a snapshotting process killed at any moment leaves a
//! temporary directory that the next manager removes (its pid is gone), never a half snapshot.
//!
//! | file | what |
//! |------|------|
//! | `snapshot.json` | [`SnapshotMeta`]: format version, backend, source VM, sizes, kernel and initramfs digests, the configuration and devices it ran with |
//! | `memory` | guest RAM (QEMU, when the VM's RAM was a shared file): mapped copy-on-write by every restore |
//! | `vmstate` | device state (QEMU's migration stream; the RAM too when there is no `memory`) |
//! | `config.json`, `state.json`, `memory-ranges` | Cloud Hypervisor's own `vm.snapshot` output |
//! | `disk-<id>` | a frozen copy of each disk, taken while the vCPUs were stopped, so memory and disks agree |
//!
//! Every file is read-only (`0400`) once the snapshot is published, and nothing vm-rs does
//! writes it again: a restore maps `memory` private (`share=off`) and gives each restored VM
//! its own qcow2 overlays over the frozen disks.
//!
//! ## QEMU
//!
//! QEMU VMs run with their RAM in a `memory-backend-file` (`share=on`) in the VM directory
//! ([`crate::vm_dir::VmDir::MEMORY`]). Saving uses the `x-ignore-shared` migration capability:
//! the stream (`vmstate`) then carries device state only (tens of kB, milliseconds) and the RAM
//! file is copied beside it (reflink where the file system has it, else a sparse copy). A
//! restore starts QEMU with `-incoming defer`, its RAM mapped from the snapshot's `memory`
//! copy-on-write, feeds it the stream with `migrate-incoming` and `cont`s. A VM whose RAM is
//! not a shared file (a VM restored from a snapshot) is saved with its RAM in the stream and
//! restored into anonymous memory: slower, but it works.

use crate::config::{BackendKind, VmConfig};
use crate::devices::DeviceSet;
use crate::manager::StartOptions;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Current [`SnapshotMeta`] format version.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Prefix of a snapshot directory being written (not a valid snapshot name).
pub const TEMP_PREFIX: &str = ".tmp-";

/// A snapshot's directory and the names in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDir {
    path: PathBuf,
}

impl SnapshotDir {
    /// The metadata record.
    pub const META: &'static str = "snapshot.json";
    /// Guest RAM.
    pub const MEMORY: &'static str = "memory";
    /// QEMU's migration stream.
    pub const DEVICE_STATE: &'static str = "vmstate";

    /// The directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SnapshotDir { path: path.into() }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// File name of the frozen copy of disk `id`.
    pub fn disk_name(id: &str) -> String {
        format!("disk-{id}")
    }
}

/// A file's identity and content digest, so a restore can tell whether the kernel or initramfs
/// at the recorded path is still the one the snapshot's guest booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Where it was.
    pub path: PathBuf,
    /// SHA-256 of its content, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (ns since the epoch) and inode: when both and the size are unchanged
    /// the content is not hashed again.
    #[serde(default)]
    pub mtime_ns: i128,
    /// Inode number.
    #[serde(default)]
    pub ino: u64,
}

impl FileDigest {
    /// Hash `path` (blocking: call from `spawn_blocking`).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use sha2::Digest;
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let (size, mtime_ns, ino) = stat_key(&f.metadata()?);
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(FileDigest {
            path: path.to_path_buf(),
            sha256: hex::encode(h.finalize()),
            size,
            mtime_ns,
            ino,
        })
    }

    /// Whether the file at the recorded path still has this content: cheap when its size,
    /// mtime and inode are unchanged, else hashed again (blocking).
    pub fn still_matches(&self) -> std::io::Result<bool> {
        let m = std::fs::metadata(&self.path)?;
        if stat_key(&m) == (self.size, self.mtime_ns, self.ino) {
            return Ok(true);
        }
        Ok(FileDigest::of(&self.path)?.sha256 == self.sha256)
    }
}

fn stat_key(m: &std::fs::Metadata) -> (u64, i128, u64) {
    use std::os::unix::fs::MetadataExt;
    (
        m.len(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        m.ino(),
    )
}

/// A frozen disk in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    /// The device id ([`crate::devices::Disk::id`]).
    pub id: String,
    /// File name inside the snapshot directory.
    pub file: String,
}

/// `snapshot.json`: what a snapshot is and what it needs to be restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Format version ([`SNAPSHOT_VERSION`]); a newer one is refused.
    pub version: u32,
    /// Snapshot name.
    pub name: String,
    /// The VM it was taken of.
    pub source_vm: String,
    /// Backend that ran it (a restore uses the same).
    pub backend: BackendKind,
    /// Unix time taken.
    pub created_at: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The kernel the guest booted.
    pub kernel: FileDigest,
    /// The initramfs it booted, if any.
    #[serde(default)]
    pub initramfs: Option<FileDigest>,
    /// The source VM's configuration.
    pub config: VmConfig,
    /// What other subsystems added at its start.
    #[serde(default)]
    pub start: StartOptions,
    /// The devices it ran with (paths of the source VM).
    pub devices: DeviceSet,
    /// Frozen disks, in device order.
    #[serde(default)]
    pub disks: Vec<SnapshotDisk>,
    /// Guest RAM is in [`SnapshotDir::MEMORY`] (else in the device state).
    #[serde(default)]
    pub memory_file: bool,
    /// The guest's address when it was taken.
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// Accelerator it ran on (`kvm`/`tcg`).
    #[serde(default)]
    pub accel: Option<String>,
}

/// A snapshot as `snapshot ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// The metadata.
    #[serde(flatten)]
    pub meta: SnapshotMeta,
    /// The directory.
    pub dir: PathBuf,
    /// Bytes allocated on disk by its files.
    pub disk_usage: u64,
}

/// Errors of the snapshot verbs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// No snapshot with that name.
    #[error("no snapshot named {name:?}")]
    NotFound {
        /// Name.
        name: String,
    },
    /// A snapshot with that name exists already.
    #[error("a snapshot named {name:?} already exists")]
    AlreadyExists {
        /// Name.
        name: String,
    },
    /// The name is not a valid snapshot name.
    #[error("invalid snapshot name {name:?}")]
    InvalidName {
        /// Name.
        name: String,
        /// Why.
        #[source]
        source: crate::config::ConfigError,
    },
    /// The VM cannot be snapshotted, or the snapshot cannot be restored, as asked.
    #[error("snapshot {name:?}: {reason}")]
    Refused {
        /// Snapshot name.
        name: String,
        /// Why (what the caller can change).
        reason: String,
    },
    /// A restore would put a second VM on an address or MAC another VM of this data dir has
    /// (one the snapshot's configuration pins, or no free address left in the subnet).
    #[error("snapshot {name:?}: {what}")]
    AddressInUse {
        /// Snapshot name.
        name: String,
        /// Which address, and whose.
        what: String,
    },
    /// VMs restored from the snapshot still use its files.
    #[error("snapshot {name:?} is used by vms restored from it ({}); remove them first, or force", vms.join(", "))]
    InUse {
        /// Snapshot name.
        name: String,
        /// The VMs.
        vms: Vec<String>,
    },
    /// A restore asked for a machine different from the one saved.
    #[error("snapshot {name:?} was taken with {what} {recorded}, not {requested}")]
    Mismatch {
        /// Snapshot name.
        name: String,
        /// `memory (MiB)`, `vcpus`, `kernel`, `initramfs`.
        what: &'static str,
        /// What the snapshot recorded.
        recorded: String,
        /// What the restore has or asked for.
        requested: String,
    },
    /// The snapshot's format version is newer than this vm-rs.
    #[error("snapshot {name:?} has format version {version}; this vm-rs reads up to {SNAPSHOT_VERSION}")]
    Version {
        /// Snapshot name.
        name: String,
        /// Its version.
        version: u32,
    },
    /// Reading or writing a snapshot's files failed.
    #[error("cannot access {}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Its metadata cannot be read.
    #[error(transparent)]
    Record(#[from] crate::manager::record::RecordError),
    /// Copying a disk or the RAM file failed.
    #[error("cannot copy {}", path.display())]
    Copy {
        /// What was copied.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::storage::clone::CloneError,
    },
    /// A restored VM's disk overlay could not be created.
    #[error("cannot create a disk overlay of {}", path.display())]
    Overlay {
        /// The frozen disk.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::storage::disk::DiskError,
    },
}

impl SnapshotError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            SnapshotError::NotFound { .. } => K::NotFound,
            SnapshotError::AlreadyExists { .. } | SnapshotError::InUse { .. } => K::Conflict,
            SnapshotError::InvalidName { .. } | SnapshotError::Mismatch { .. } => K::Invalid,
            SnapshotError::Refused { .. } | SnapshotError::Version { .. } => K::Unsupported,
            SnapshotError::AddressInUse { .. } => K::Conflict,
            SnapshotError::Io { .. } | SnapshotError::Copy { .. } | SnapshotError::Overlay { .. } => K::Other,
            SnapshotError::Record(e) => e.kind(),
        }
    }
}

/// `$VMRS_HOME/snapshots`.
pub fn snapshots_dir(home: &Path) -> PathBuf {
    home.join("snapshots")
}

/// Check a snapshot name (the VM name rules: it names a directory).
pub fn validate_name(name: &str) -> Result<(), SnapshotError> {
    crate::config::validate_name(name).map_err(|source| SnapshotError::InvalidName {
        name: name.to_string(),
        source,
    })
}

/// Load the metadata of the snapshot in `dir` named `name`, refusing newer formats.
pub fn load_meta(name: &str, dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
    let path = dir.join(SnapshotDir::META);
    if !path.is_file() {
        return Err(SnapshotError::NotFound {
            name: name.to_string(),
        });
    }
    // the version first, so a newer format is reported as such rather than as corrupt
    let v: serde_json::Value = crate::manager::record::read_json(&path)?;
    let version = v.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version > u64::from(SNAPSHOT_VERSION) {
        return Err(SnapshotError::Version {
            name: name.to_string(),
            version: u32::try_from(version).unwrap_or(u32::MAX),
        });
    }
    Ok(crate::manager::record::read_json(&path)?)
}

/// Bytes allocated by the files under `dir` (blocks, so sparse files count what they use).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        total += m.blocks() * 512;
        if m.is_dir() {
            total += disk_usage(&e.path());
        }
    }
    total
}

/// Make every file under `dir` read-only (`0400`) and fsync it (directories keep their mode,
/// so the snapshot can be removed).
pub fn seal(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            seal(&path)?;
        } else if ft.is_file() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Remove temporary snapshot directories whose writer is gone (killed mid-snapshot).
pub fn remove_stale_temps(snapshots: &Path) {
    let Ok(rd) = std::fs::read_dir(snapshots) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else {
            continue;
        };
        let writer = rest.rsplit_once('-').and_then(|(_, pid)| pid.parse::<u32>().ok());
        if writer.map_or(true, |pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The temporary directory a snapshot `name` is written in by this process.
pub fn temp_dir(snapshots: &Path, name: &str) -> PathBuf {
    snapshots.join(format!("{TEMP_PREFIX}{name}-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_notices_a_changed_file_and_skips_hashing_an_unchanged_one() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("k");
        std::fs::write(&p, b"kernel one").expect("w");
        let d = FileDigest::of(&p).expect("digest");
        assert!(d.still_matches().expect("check"));
        std::fs::write(&p, b"kernel two").expect("w");
        assert!(!d.still_matches().expect("check"));
        // same content written anew (new mtime): hashed, and equal
        std::fs::write(&p, b"kernel one").expect("w");
        assert!(d.still_matches().expect("check"));
        std::fs::remove_file(&p).expect("rm");
        assert!(d.still_matches().is_err());
    }

    #[test]
    fn stale_temp_dirs_go_and_live_ones_stay() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mine = temp_dir(tmp.path(), "s1");
        let dead = tmp.path().join(format!("{TEMP_PREFIX}s2-{}", u32::MAX - 1));
        let odd = tmp.path().join(format!("{TEMP_PREFIX}garbage"));
        let snap = tmp.path().join("s3");
        for d in [&mine, &dead, &odd, &snap] {
            std::fs::create_dir(d).expect("mkdir");
        }
        remove_stale_temps(tmp.path());
        assert!(mine.exists() && snap.exists());
        assert!(!dead.exists() && !odd.exists());
    }

    #[test]
    fn newer_versions_are_refused_by_name_and_garbage_is_corrupt() {
        let tmp = tempfile::tempdir().expect("tmp");
        let meta = tmp.path().join(SnapshotDir::META);
        assert!(matches!(
            load_meta("s", tmp.path()),
            Err(SnapshotError::NotFound { .. })
        ));
        std::fs::write(&meta, br#"{"version": 99}"#).expect("w");
        assert!(matches!(
            load_meta("s", tmp.path()),
            Err(SnapshotError::Version { version: 99, .. })
        ));
        std::fs::write(&meta, b"{garbage").expect("w");
        let e = load_meta("s", tmp.path()).expect_err("corrupt");
        assert!(matches!(e, SnapshotError::Record(_)), "{e:?}");
    }
}
