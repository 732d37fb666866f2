//! The content-addressed image store on disk.
//!
//! ```text
//! <root>/                      usually $VMRS_HOME/images
//!   blobs/sha256/<hex>         verified blobs: indexes, manifests, configs, layers
//!   ingest/<hex>.partial       downloads in progress (kept after an interruption, to resume)
//!   locks/<hex>.lock           one flock per blob being fetched
//!   store.lock                 shared by pulls and unpacks, exclusive for gc
//!   refs.lock                  serialises updates of refs.json
//!   refs.json                  reference → manifest digest (+ index digest, platform, size)
//! ```
//!
//! A blob enters `blobs/` only by rename, after its bytes were hashed and matched its digest
//! and were fsynced, so a reader never sees a partial or corrupt blob. `refs.json` is
//! rewritten temp → fsync → rename under `refs.lock`. Fetching a blob takes its lock first, so
//! two concurrent pulls of the same layer download it once: the second waits, then finds it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::config::{ConfigError, ImageConfig};
use super::digest::Digest;
use super::manifest::{self, ImageManifest, Manifest, ManifestError};
use super::platform::Platform;
use super::reference::{ImageReference, ReferenceError};

/// Version written in `refs.json`.
const REFS_VERSION: u32 = 1;

/// Errors of the store itself (paths, records, stored blobs).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No image with this reference is in the store.
    #[error("image {reference} is not in the store")]
    NotFound {
        /// The reference as looked up.
        reference: String,
    },
    /// A short digest matches several images.
    #[error("{prefix} matches more than one image")]
    Ambiguous {
        /// The prefix given.
        prefix: String,
    },
    /// A blob the records point at is missing.
    #[error("blob {digest} is missing from the store")]
    BlobMissing {
        /// The blob.
        digest: Digest,
    },
    /// Bytes offered for a digest do not hash to it.
    #[error("content does not match digest {expected} (got {actual})")]
    DigestMismatch {
        /// The digest claimed.
        expected: Digest,
        /// The digest of the bytes.
        actual: Digest,
    },
    /// `refs.json` cannot be read.
    #[error("store record {path} is corrupt")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored manifest does not parse.
    #[error("stored manifest {digest} is invalid")]
    Manifest {
        /// The manifest blob.
        digest: Digest,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// A stored manifest is an index where an image manifest was expected.
    #[error("stored manifest {digest} is an index, not an image manifest")]
    NotAnImage {
        /// The manifest blob.
        digest: Digest,
    },
    /// A stored config does not parse.
    #[error("stored image config {digest} is invalid")]
    Config {
        /// The config blob.
        digest: Digest,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// The reference string is invalid.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A blocking task was cancelled or panicked.
    #[error("store task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl StoreError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            StoreError::NotFound { .. } => K::NotFound,
            StoreError::Ambiguous { .. } => K::Invalid,
            StoreError::Reference(e) => e.kind(),
            StoreError::Io { .. }
            | StoreError::BlobMissing { .. }
            | StoreError::DigestMismatch { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Manifest { .. }
            | StoreError::NotAnImage { .. }
            | StoreError::Config { .. }
            | StoreError::Task(_) => K::Other,
        }
    }
}

pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { op, path, source }
}

/// What the store records for one reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefRecord {
    /// Canonical reference (`docker.io/library/alpine:3.20`).
    pub reference: String,
    /// Digest of the image manifest for this host's (or the chosen) platform.
    pub manifest: Digest,
    /// Digest of the index the manifest was chosen from, when the reference named an index.
    #[serde(default)]
    pub index: Option<Digest>,
    /// The platform chosen from the index.
    #[serde(default)]
    pub platform: Option<Platform>,
    /// Bytes of manifest + config + layers as stored (compressed).
    #[serde(default)]
    pub size: u64,
    /// When it was pulled (seconds since the Unix epoch).
    #[serde(default)]
    pub pulled_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RefsFile {
    #[serde(default)]
    version: u32,
    #[serde(default)]
    refs: BTreeMap<String, RefRecord>,
}

/// One image as listed by [`ImageStore::list`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// The stored record.
    #[serde(flatten)]
    pub record: RefRecord,
    /// The image's own creation time (from its config), if it says.
    pub created: Option<String>,
}

/// Everything known about one stored image.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// The stored record.
    pub record: RefRecord,
    /// Its image manifest.
    pub manifest: ImageManifest,
    /// Its config.
    pub config: ImageConfig,
}

/// What [`ImageStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Blobs deleted.
    pub removed_blobs: usize,
    /// Partial downloads deleted.
    pub removed_partials: usize,
    /// Bytes freed.
    pub freed_bytes: u64,
}

/// Allocated bytes of one file (as `du` counts it).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// An exclusive or shared `flock`, released on drop.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

fn lock_file(path: &Path, exclusive: bool) -> Result<FileLock, StoreError> {
    let file = crate::paths::private_file()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open lock", path))?;
    let op = if exclusive {
        rustix::fs::FlockOperation::LockExclusive
    } else {
        rustix::fs::FlockOperation::LockShared
    };
    loop {
        match rustix::fs::flock(&file, op) {
            Ok(()) => return Ok(FileLock { _file: file }),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io_err("lock", path)(e.into())),
        }
    }
}

/// Writes `bytes` to `path` atomically: temp file in the same dir → fsync → rename → fsync dir.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    crate::fsutil::write_atomic(path, bytes).map_err(io_err("replace", path))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The content-addressed image store. Cheap to clone; all state is on disk.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let store = Self { root };
        let s = store.clone();
        tokio::task::spawn_blocking(move || {
            for d in [s.blobs_dir(), s.ingest_dir(), s.locks_dir()] {
                crate::paths::create_private_dir_all(&d).map_err(io_err("create", d))?;
            }
            Ok::<_, StoreError>(())
        })
        .await
        .map_err(StoreError::Task)??;
        Ok(store)
    }

    /// Opens the default store, `vm_rs::paths::data_dir()/images` (`VMRS_HOME` overrides).
    pub async fn open_default() -> Result<Self, StoreError> {
        Self::open(crate::paths::data_dir().join("images")).await
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }
    pub(crate) fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }
    fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }
    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    /// Path of a verified blob (it may not exist).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    /// Path of the partial download of a blob.
    pub(crate) fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.ingest_dir().join(format!("{}.partial", digest.hex()))
    }

    /// Whether a verified blob is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Takes the per-blob lock (waits while another task or process holds it).
    pub(crate) async fn lock_blob(&self, digest: &Digest) -> Result<FileLock, StoreError> {
        let path = self.locks_dir().join(format!("{}.lock", digest.hex()));
        tokio::task::spawn_blocking(move || lock_file(&path, true))
            .await
            .map_err(StoreError::Task)?
    }

    /// Takes the store lock: shared for pulls/unpacks, exclusive for gc.
    pub(crate) async fn lock_store(&self, exclusive: bool) -> Result<FileLock, StoreError> {
        let path = self.root.join("store.lock");
        tokio::task::spawn_blocking(move || lock_file(&path, exclusive))
            .await
            .map_err(StoreError::Task)?
    }

    /// Stores small verified content (manifests, configs) under `expected`.
    pub(crate) async fn put_bytes(&self, expected: &Digest, bytes: bytes::Bytes) -> Result<(), StoreError> {
        let actual = Digest::of(&bytes);
        if &actual != expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        if self.has_blob(expected) {
            return Ok(());
        }
        let _lock = self.lock_blob(expected).await?;
        let path = self.blob_path(expected);
        tokio::task::spawn_blocking(move || {
            if path.is_file() {
                return Ok(());
            }
            write_atomic(&path, &bytes)
        })
        .await
        .map_err(StoreError::Task)?
    }

    /// Moves a fully downloaded and verified partial file into `blobs/`.
    pub(crate) fn commit_partial(&self, digest: &Digest) -> Result<(), StoreError> {
        let partial = self.partial_path(digest);
        let blob = self.blob_path(digest);
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync", &partial))?;
        std::fs::rename(&partial, &blob).map_err(io_err("rename into", &blob))?;
        sync_dir(&self.blobs_dir())
    }

    /// Reads a whole (small) blob.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::BlobMissing {
                digest: digest.clone(),
            }),
            Err(e) => Err(io_err("read", path)(e)),
        }
    }

    async fn read_refs(&self) -> Result<RefsFile, StoreError> {
        let path = self.refs_path();
        match tokio::fs::read(&path).await {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RefsFile::default()),
            Err(e) => Err(io_err("read", path)(e)),
        }
    }

    /// Read-modify-write of `refs.json` under `refs.lock`.
    async fn update_refs<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut RefsFile) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let lock_path = self.root.join("refs.lock");
        let path = self.refs_path();
        tokio::task::spawn_blocking(move || {
            let _lock = lock_file(&lock_path, true)?;
            let mut refs = match std::fs::read(&path) {
                Ok(b) => serde_json::from_slice(&b).map_err(|source| StoreError::Corrupt {
                    path: path.clone(),
                    source,
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => RefsFile::default(),
                Err(e) => return Err(io_err("read", path)(e)),
            };
            let out = f(&mut refs)?;
            refs.version = REFS_VERSION;
            let bytes = serde_json::to_vec_pretty(&refs).map_err(|source| StoreError::Corrupt {
                path: path.clone(),
                source,
            })?;
            write_atomic(&path, &bytes)?;
            Ok(out)
        })
        .await
        .map_err(StoreError::Task)?
    }

    /// Records `reference → manifest` (replacing an older record of the same reference).
    pub(crate) async fn set_ref(&self, mut record: RefRecord) -> Result<(), StoreError> {
        record.pulled_at = now_secs();
        self.update_refs(move |refs| {
            refs.refs.insert(record.reference.clone(), record);
            Ok(())
        })
        .await
    }

    /// Finds the record for a reference string, or for a (prefix of a) manifest digest.
    pub async fn resolve(&self, reference: &str) -> Result<RefRecord, StoreError> {
        let refs = self.read_refs().await?;
        if let Ok(r) = ImageReference::parse(reference) {
            if let Some(rec) = refs.refs.get(&r.canonical()) {
                return Ok(rec.clone());
            }
        }
        let prefix = reference.strip_prefix("sha256:").unwrap_or(reference);
        if prefix.len() >= 6 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: BTreeSet<&Digest> = refs
                .refs
                .values()
                .filter(|r| r.manifest.hex().starts_with(prefix))
                .map(|r| &r.manifest)
                .collect();
            match hits.len() {
                0 => {}
                1 => {
                    if let Some(rec) = refs.refs.values().find(|r| r.manifest.hex().starts_with(prefix)) {
                        return Ok(rec.clone());
                    }
                }
                _ => {
                    return Err(StoreError::Ambiguous {
                        prefix: reference.to_owned(),
                    })
                }
            }
        }
        Err(StoreError::NotFound {
            reference: reference.to_owned(),
        })
    }

    /// Reads and parses a stored image manifest.
    pub async fn manifest(&self, digest: &Digest) -> Result<ImageManifest, StoreError> {
        let bytes = self.read_blob(digest).await?;
        match manifest::parse(&bytes, None) {
            Ok(Manifest::Image(m)) => Ok(m),
            Ok(Manifest::Index { .. }) => Err(StoreError::NotAnImage {
                digest: digest.clone(),
            }),
            Err(source) => Err(StoreError::Manifest {
                digest: digest.clone(),
                source,
            }),
        }
    }

    /// Reads and parses a stored config blob.
    pub async fn config_blob(&self, digest: &Digest) -> Result<ImageConfig, StoreError> {
        let bytes = self.read_blob(digest).await?;
        ImageConfig::parse(&bytes).map_err(|source| StoreError::Config {
            digest: digest.clone(),
            source,
        })
    }

    /// Everything about one stored image: record, manifest, config.
    pub async fn image(&self, reference: &str) -> Result<StoredImage, StoreError> {
        let record = self.resolve(reference).await?;
        let manifest = self.manifest(&record.manifest).await?;
        let config = self.config_blob(&manifest.config.digest).await?;
        Ok(StoredImage {
            record,
            manifest,
            config,
        })
    }

    /// The run configuration of a stored image (entrypoint, cmd, env, ...).
    pub async fn config(&self, reference: &str) -> Result<ImageConfig, StoreError> {
        Ok(self.image(reference).await?.config)
    }

    /// All stored references, sorted.
    pub async fn list(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let refs = self.read_refs().await?;
        let mut out = Vec::with_capacity(refs.refs.len());
        for record in refs.refs.into_values() {
            let created = match self.manifest(&record.manifest).await {
                Ok(m) => self
                    .config_blob(&m.config.digest)
                    .await
                    .ok()
                    .and_then(|c| c.created),
                Err(_) => None,
            };
            out.push(ImageSummary { record, created });
        }
        Ok(out)
    }

    /// Removes a reference (its blobs stay until [`ImageStore::gc`]). Returns the record removed.
    pub async fn remove(&self, reference: &str) -> Result<RefRecord, StoreError> {
        let record = self.resolve(reference).await?;
        let key = record.reference.clone();
        self.update_refs(move |refs| {
            refs.refs
                .remove(&key)
                .ok_or(StoreError::NotFound { reference: key })
        })
        .await
    }

    /// Deletes every blob no reference needs, and abandoned partial downloads. Waits for
    /// running pulls and unpacks (they hold the store lock shared).
    pub async fn gc(&self) -> Result<GcReport, StoreError> {
        self.collect(false).await
    }

    /// What [`gc`](Self::gc) would delete now, deleting nothing (`vmrs system df`'s
    /// reclaimable space). Sizes are allocated bytes, as `du` counts them.
    pub async fn gc_preview(&self) -> Result<GcReport, StoreError> {
        self.collect(true).await
    }

    async fn collect(&self, dry_run: bool) -> Result<GcReport, StoreError> {
        let _lock = self.lock_store(!dry_run).await?;
        let refs = self.read_refs().await?;
        let mut keep: BTreeSet<Digest> = BTreeSet::new();
        for r in refs.refs.values() {
            keep.insert(r.manifest.clone());
            if let Some(i) = &r.index {
                keep.insert(i.clone());
            }
            if let Ok(m) = self.manifest(&r.manifest).await {
                keep.insert(m.config.digest.clone());
                keep.extend(m.layers.iter().map(|l| l.digest.clone()));
            }
        }
        let blobs = self.blobs_dir();
        let ingest = self.ingest_dir();
        let locks = self.locks_dir();
        tokio::task::spawn_blocking(move || {
            let mut report = GcReport::default();
            for entry in std::fs::read_dir(&blobs).map_err(io_err("list", &blobs))? {
                let entry = entry.map_err(io_err("list", &blobs))?;
                let name = entry.file_name();
                let keep_it = name
                    .to_str()
                    .and_then(|n| Digest::parse(&format!("sha256:{n}")).ok())
                    .is_some_and(|d| keep.contains(&d));
                if !keep_it {
                    let size = entry.metadata().map_or(0, |m| m.len());
                    if dry_run {
                        report.removed_blobs += 1;
                        report.freed_bytes += allocated(&entry.path());
                        continue;
                    }
                    std::fs::remove_file(entry.path()).map_err(io_err("remove", entry.path()))?;
                    report.removed_blobs += 1;
                    report.freed_bytes += size;
                }
            }
            for (dir, is_partial) in [(&ingest, true), (&locks, false)] {
                for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
                    let entry = entry.map_err(io_err("list", dir))?;
                    let size = entry.metadata().map_or(0, |m| m.len());
                    if dry_run {
                        if is_partial {
                            report.removed_partials += 1;
                            report.freed_bytes += allocated(&entry.path());
                        }
                        continue;
                    }
                    std::fs::remove_file(entry.path()).map_err(io_err("remove", entry.path()))?;
                    if is_partial {
                        report.removed_partials += 1;
                        report.freed_bytes += size;
                    }
                }
            }
            Ok(report)
        })
        .await
        .map_err(StoreError::Task)?
    }
}
