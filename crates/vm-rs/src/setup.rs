//! One-call VM setup helpers (the seed crate's `setup` names), built on [`crate::storage`]:
//!
//! * [`create_seed_iso`] — write a cloud-init NoCloud seed (`cidata` FAT image; NoCloud reads
//!   vfat as well as ISO9660, and vfat needs no external tool) and return it as a read-only
//!   [`DiskConfig`] to attach.
//! * [`generate_ssh_key`] — the ed25519 pair `DIR/id_ed25519` (+ `.pub`), created once.
//! * [`pull_image`] — fetch a catalog asset (disk image, kernel, initrd) into the cache,
//!   verified.
//! * [`prepare_image`] — fetch a catalog image into the cache (SHA-256 verified, resumable)
//!   and make this VM's own disk from it: a qcow2 overlay backed by the cached image, or a
//!   reflink/sparse clone; optionally grown to a size.
//!
//! ```no_run
//! use vm_rs::setup::{self, PrepareOptions, SeedConfig};
//! use vm_rs::{VmConfig, VmManager};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("/var/lib/myvms/web-1");
//! let key = setup::generate_ssh_key(dir).await?;
//! let mut seed = SeedConfig::new("web-1");
//! seed.ssh_authorized_keys.push(key.public_openssh.clone());
//! let seed_disk = setup::create_seed_iso(&dir.join("seed.img"), &seed).await?;
//!
//! let opts = PrepareOptions::default();
//! let root = setup::prepare_image("ubuntu-24.04", &dir.join("root.qcow2"), &opts, &mut |_| {}).await?;
//! let kernel = setup::pull_image("ubuntu-24.04-kernel", &opts, &mut |_| {}).await?;
//! let initrd = setup::pull_image("ubuntu-24.04-initrd", &opts, &mut |_| {}).await?;
//!
//! let config = VmConfig::builder("web-1")
//!     .kernel(kernel.path)
//!     .initramfs(initrd.path)
//!     .cmdline("root=LABEL=cloudimg-rootfs")
//!     .memory_mib(1024)
//!     .disk(root.disk)
//!     .disk(seed_disk)
//!     .build()?;
//! VmManager::new().await?.start(config).await?;
//! # Ok(()) }
//! ```
//!
//! Cache layout: `$VMRS_HOME/disk-images/<catalog name>/<sha256>/<file name>` (see
//! [`cached_base_path`]); cached bases are made read-only (0444) so nothing writes them by
//! accident, and are never replaced by a newer release, since overlays are backed by them.
//! Nothing is garbage-collected yet: remove a directory once no VM disk is backed by it.

use crate::config::{DiskConfig, DiskFormat};
use crate::storage::catalog::{AssetKind, CatalogEntry, CatalogError, ImageCatalog};
use crate::storage::clone::{clone_disk, CloneError, CloneMethod};
use crate::storage::disk::{create_overlay, grow_disk, image_info, DiskError};
use crate::storage::download::{download_verified, DownloadError, DownloadOptions, Progress};
use crate::storage::seed::{write_seed_image, SeedError};
use crate::storage::ssh::{ensure_key_pair, SshKeyError, SshKeyPair};
use serde::Serialize;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub use crate::storage::seed::{SeedConfig, SeedFile, SeedMount, SeedNic, SeedUser};

/// Errors from the setup helpers.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SetupError {
    /// Writing the seed failed.
    #[error("create seed image {path}")]
    Seed {
        /// The seed image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: SeedError,
    },
    /// Generating or loading the SSH key failed.
    #[error("ssh key in {dir}")]
    SshKey {
        /// The key directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: SshKeyError,
    },
    /// The catalog could not be read or resolved.
    #[error("image {name}")]
    Catalog {
        /// The image name.
        name: String,
        /// Why.
        #[source]
        source: CatalogError,
    },
    /// The download failed.
    #[error("download image {name}")]
    Download {
        /// The image name.
        name: String,
        /// Why.
        #[source]
        source: DownloadError,
    },
    /// The downloaded image is not in the format the catalog says.
    #[error("image {name} is {actual}, but the catalog says {expected}")]
    FormatMismatch {
        /// The image name.
        name: String,
        /// Catalog format.
        expected: DiskFormat,
        /// Format `qemu-img` found.
        actual: String,
    },
    /// The catalog entry is a kernel or initrd, not a disk image.
    #[error("image {name} is a {kind}, not a disk image")]
    NotADisk {
        /// The image name.
        name: String,
        /// What it is.
        kind: AssetKind,
    },
    /// The downloaded base names a backing file of its own; QEMU would open that host path
    /// for the guest, so such images are refused.
    #[error("image {name} has a backing file ({backing}); refusing to use it")]
    HasBackingFile {
        /// The image name.
        name: String,
        /// The backing file the header names.
        backing: String,
    },
    /// Creating, probing or resizing the VM disk failed.
    #[error("disk for image {name}")]
    Disk {
        /// The image name.
        name: String,
        /// Why.
        #[source]
        source: DiskError,
    },
    /// Cloning the base failed.
    #[error("clone image {name}")]
    Clone {
        /// The image name.
        name: String,
        /// Why.
        #[source]
        source: CloneError,
    },
    /// A file operation on the cache failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl SetupError {
    /// What kind of failure this is, looking through to the cause (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            SetupError::Seed { source, .. } => source.kind(),
            SetupError::SshKey { source, .. } => source.kind(),
            SetupError::Catalog { source, .. } => source.kind(),
            SetupError::Download { source, .. } => source.kind(),
            SetupError::FormatMismatch { .. } | SetupError::HasBackingFile { .. } => K::Invalid,
            SetupError::NotADisk { .. } => K::Invalid,
            SetupError::Disk { source, .. } => source.kind(),
            SetupError::Clone { source, .. } => source.kind(),
            SetupError::Io { source, .. } => K::of_io(source),
        }
    }
}

/// Write the NoCloud seed for `config` to `path` (replacing an older seed) and return it as a
/// read-only raw disk to attach.
pub async fn create_seed_iso(path: &Path, config: &SeedConfig) -> Result<DiskConfig, SetupError> {
    write_seed_image(path, config)
        .await
        .map_err(|source| SetupError::Seed {
            path: path.to_path_buf(),
            source,
        })?;
    let mut disk = DiskConfig::new(path);
    disk.read_only = true;
    Ok(disk)
}

/// Make sure `dir/id_ed25519` and `dir/id_ed25519.pub` exist (ed25519, OpenSSH format, private
/// key 0600) and return them; an existing pair is reused.
pub async fn generate_ssh_key(dir: &Path) -> Result<SshKeyPair, SetupError> {
    let key_err = |source| SetupError::SshKey {
        dir: dir.to_path_buf(),
        source,
    };
    tokio::fs::create_dir_all(dir).await.map_err(|e| {
        key_err(SshKeyError::Io {
            op: "create directory",
            path: dir.to_path_buf(),
            source: e,
        })
    })?;
    ensure_key_pair(&dir.join("id_ed25519"), "vmrs")
        .await
        .map_err(key_err)
}

/// Where a verified base lives in the cache: `CACHE/<name>/<sha256>/<file name>`. The digest
/// in the path means a new release of an image (new digest) never replaces the file that
/// existing overlays are backed by.
pub fn cached_base_path(cache_dir: &Path, entry: &CatalogEntry, sha256: &str) -> PathBuf {
    cache_dir.join(&entry.name).join(sha256).join(entry.file_name())
}

/// How [`prepare_image`] makes the VM's disk from the cached base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrepareMode {
    /// A qcow2 overlay with the cached image as backing file (default; instant anywhere).
    #[default]
    Overlay,
    /// A full clone: reflink where the filesystem can, else a sparse copy.
    Clone,
}

/// Options for [`prepare_image`].
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Where verified base images are cached (default `$VMRS_HOME/disk-images`).
    pub cache_dir: PathBuf,
    /// The catalog to look names up in (default built-ins + the user file).
    pub catalog: Option<ImageCatalog>,
    /// Overlay or clone.
    pub mode: PrepareMode,
    /// Grow the VM disk to this many bytes.
    pub size: Option<u64>,
    /// Download knobs (retries, limits, HTTP client).
    pub download: DownloadOptions,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            cache_dir: crate::paths::data_dir().join("disk-images"),
            catalog: None,
            mode: PrepareMode::Overlay,
            size: None,
            download: DownloadOptions::default(),
        }
    }
}

/// What [`prepare_image`] produced.
#[derive(Debug, Clone, Serialize)]
pub struct PreparedImage {
    /// The verified base image in the cache.
    pub base: PathBuf,
    /// Its SHA-256.
    pub sha256: String,
    /// The VM's own disk, ready to attach.
    pub disk: DiskConfig,
    /// How the disk was made.
    pub mode: PrepareMode,
    /// For [`PrepareMode::Clone`], whether it was a reflink or a copy.
    pub clone_method: Option<CloneMethod>,
    /// The base was already cached (nothing downloaded).
    pub cached: bool,
}

/// A verified catalog asset in the cache.
#[derive(Debug, Clone, Serialize)]
pub struct PulledImage {
    /// The catalog entry.
    pub entry: CatalogEntry,
    /// The verified file (`CACHE/<name>/<sha256>/<file>`, mode 0444).
    pub path: PathBuf,
    /// Its SHA-256.
    pub sha256: String,
    /// It was already cached and verified (nothing downloaded, not re-hashed).
    pub cached: bool,
}

/// Fetch catalog asset `name` (a disk image, kernel or initrd) into the cache: resolve its
/// digest, download with verification and resume, make it read-only and stamp it, so later
/// pulls of an unchanged file neither download nor re-hash.
pub async fn pull_image(
    name: &str,
    options: &PrepareOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<PulledImage, SetupError> {
    let entry = catalog_entry(name, options)?;
    pull_entry(entry, options, progress).await
}

/// Look `name` up in the configured catalog (no network).
fn catalog_entry(name: &str, options: &PrepareOptions) -> Result<CatalogEntry, SetupError> {
    let cat_err = |source| SetupError::Catalog {
        name: name.to_string(),
        source,
    };
    let catalog = match &options.catalog {
        Some(c) => c.clone(),
        None => ImageCatalog::load(&ImageCatalog::default_user_file()).map_err(cat_err)?,
    };
    Ok(catalog.get(name).map_err(cat_err)?.clone())
}

async fn pull_entry(
    entry: CatalogEntry,
    options: &PrepareOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<PulledImage, SetupError> {
    let name = entry.name.clone();
    let cat_err = |source| SetupError::Catalog {
        name: name.clone(),
        source,
    };
    let client = options
        .download
        .client
        .clone()
        .unwrap_or_else(crate::storage::download::default_client);
    let sha256 = entry.resolve_sha256(&client).await.map_err(cat_err)?;

    let path = cached_base_path(&options.cache_dir, &entry, &sha256);
    let mut download = options.download.clone();
    download.client = Some(client);
    let cached = match read_verified_stamp(&path).await {
        Some(stamp) if stamp.sha256 == sha256 => true,
        _ => {
            let outcome = download_verified(&entry.url, &path, &sha256, &download, progress)
                .await
                .map_err(|source| SetupError::Download {
                    name: name.to_string(),
                    source,
                })?;
            {
                use std::os::unix::fs::PermissionsExt;
                tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
                    .await
                    .map_err(|source| SetupError::Io {
                        op: "chmod",
                        path: path.clone(),
                        source,
                    })?;
            }
            write_verified_stamp(&path, &sha256).await?;
            outcome.already_present
        }
    };
    Ok(PulledImage {
        entry,
        path,
        sha256,
        cached,
    })
}

/// Fetch catalog disk image `name` into the cache (see [`pull_image`]) and create the VM disk
/// `target` from it. `target` must not exist.
pub async fn prepare_image(
    name: &str,
    target: &Path,
    options: &PrepareOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<PreparedImage, SetupError> {
    let entry = catalog_entry(name, options)?;
    if entry.kind != AssetKind::Disk {
        return Err(SetupError::NotADisk {
            name: name.to_string(),
            kind: entry.kind,
        });
    }
    let pulled = pull_entry(entry, options, progress).await?;
    let (entry, base, sha256, cached) = (pulled.entry, pulled.path, pulled.sha256, pulled.cached);
    let disk_err = |source| SetupError::Disk {
        name: name.to_string(),
        source,
    };
    let info = image_info(&base).await.map_err(disk_err)?;
    if info.disk_format() != Some(entry.format) {
        return Err(SetupError::FormatMismatch {
            name: name.to_string(),
            expected: entry.format,
            actual: info.format,
        });
    }
    if let Some(backing) = info.backing_filename {
        return Err(SetupError::HasBackingFile {
            name: name.to_string(),
            backing,
        });
    }

    let (mut disk, clone_method) = match options.mode {
        PrepareMode::Overlay => (
            create_overlay(&base, entry.format, target)
                .await
                .map_err(disk_err)?,
            None,
        ),
        PrepareMode::Clone => {
            let method = clone_disk(&base, target)
                .await
                .map_err(|source| SetupError::Clone {
                    name: name.to_string(),
                    source,
                })?;
            let mut d = DiskConfig::new(target);
            d.format = entry.format;
            (d, Some(method))
        }
    };
    if let Some(size) = options.size {
        grow_disk(target, disk.format, size).await.map_err(disk_err)?;
    }
    disk.read_only = false;
    Ok(PreparedImage {
        base,
        sha256,
        disk,
        mode: options.mode,
        clone_method,
        cached,
    })
}

/// `<base>.verified`: the digest a cached base was verified against, and the file identity it
/// was verified at (device, inode, size, mtime). While all of these still match, the base is
/// not hashed again; any change (rewrite, replacement, touch) sends it through the verified
/// download path, which re-hashes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct VerifiedStamp {
    sha256: String,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

fn stamp_path(base: &Path) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

fn identity(md: &std::fs::Metadata) -> (u64, u64, u64, i128) {
    use std::os::unix::fs::MetadataExt;
    (
        md.dev(),
        md.ino(),
        md.size(),
        i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
    )
}

/// The stamp for `base`, if present and still describing the file as it is now.
async fn read_verified_stamp(base: &Path) -> Option<VerifiedStamp> {
    let text = tokio::fs::read(stamp_path(base)).await.ok()?;
    if text.len() > 4096 {
        return None;
    }
    let stamp: VerifiedStamp = serde_json::from_slice(&text).ok()?;
    let md = tokio::fs::metadata(base).await.ok()?;
    let (dev, ino, size, mtime_ns) = identity(&md);
    (stamp.dev == dev && stamp.ino == ino && stamp.size == size && stamp.mtime_ns == mtime_ns)
        .then_some(stamp)
}

async fn write_verified_stamp(base: &Path, sha256: &str) -> Result<(), SetupError> {
    let io = |op: &'static str| {
        let path = stamp_path(base);
        move |source| SetupError::Io { op, path, source }
    };
    let md = tokio::fs::metadata(base).await.map_err(io("stat"))?;
    let (dev, ino, size, mtime_ns) = identity(&md);
    let stamp = VerifiedStamp {
        sha256: sha256.to_string(),
        dev,
        ino,
        size,
        mtime_ns,
    };
    let bytes = serde_json::to_vec(&stamp).map_err(|e| io("encode")(std::io::Error::other(e)))?;
    let dest = stamp_path(base);
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut tmp = crate::storage::fsutil::temp_beside(&dest)?;
        tmp.write_all(&bytes)?;
        crate::storage::fsutil::persist(tmp, &dest, true)
    })
    .await
    .map_err(|e| io("write")(std::io::Error::other(e)))?
    .map_err(io("write"))
}
