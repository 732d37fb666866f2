//! Applying image layers to a root directory, safely.
//!
//! Layers are tar streams (plain, gzip or zstd — detected from the bytes, not trusted from the
//! media type) applied bottom first. Layer content is untrusted, so this module does the
//! confinement itself instead of trusting a tar library's `unpack`:
//!
//! * Every path is split into components; `..` makes the layer invalid ([`UnpackError::UnsafePath`]);
//!   a leading `/` and `.` components are dropped (absolute paths are relative to the root).
//! * The parent directory of every entry is opened with `openat2(RESOLVE_IN_ROOT)`, so symlinks
//!   met on the way (`etc -> /host/etc`, `x -> ../../..`) are resolved as if the root were `/`:
//!   nothing is ever created, removed or linked outside it. The final component is created
//!   relative to that directory fd with `O_NOFOLLOW`/`O_EXCL` after removing what was there
//!   (tar semantics), so a planted symlink is replaced, never written through.
//! * Hardlink targets are resolved the same way, inside the root.
//! * Device nodes are skipped unless [`UnpackOptions::allow_devices`] (and running as root);
//!   setuid/setgid bits on files are dropped unless [`UnpackOptions::allow_setuid`].
//! * The bytes written and the entries created are bounded ([`UnpackOptions::max_bytes`],
//!   [`UnpackOptions::max_entries`]), across all layers.
//! * The uncompressed stream is hashed and must match the image config's `diff_ids`.
//!
//! OCI whiteouts: `.wh.<name>` removes `<name>` from lower layers; `.wh..wh..opq` empties its
//! directory of everything lower layers put there. Ownership is applied when running as root
//! (else files belong to the caller, and [`UnpackOptions::record_ownership`] lists the owners
//! the image wanted), permissions and mtimes always (directory mtimes last). Extended
//! attributes (e.g. `security.capability`) are not applied.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::host::fs::{Confine, O_PATH};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use super::digest::{Digest, Hasher};
use super::store::{ImageStore, StoreError};

/// Marker of an opaque directory.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of a whiteout.
const WHITEOUT: &[u8] = b".wh.";

/// How to unpack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Most file-content bytes written in total (size-bomb guard). Default 64 GiB.
    pub max_bytes: u64,
    /// Most entries processed in total. Default 4 million.
    pub max_entries: u64,
    /// Apply owners from the layers. Default: true when running as root. When false, or not
    /// root, everything belongs to the caller.
    pub preserve_ownership: bool,
    /// Create block/char device nodes (root only). Default false: they are skipped and listed
    /// in [`UnpackReport::skipped`].
    pub allow_devices: bool,
    /// Keep setuid/setgid bits on files. Default false.
    pub allow_setuid: bool,
    /// Check each layer's uncompressed digest against the config's `diff_ids`. Default true.
    pub verify_diff_ids: bool,
    /// When owners are not applied (not root, or `preserve_ownership` off), list the entries
    /// the image gives a non-root owner in [`UnpackReport::ownership`], so a later step (e.g.
    /// building a filesystem image) can apply them. Default false.
    pub record_ownership: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 30,
            max_entries: 4_000_000,
            preserve_ownership: rustix::process::geteuid().is_root(),
            allow_devices: false,
            allow_setuid: false,
            verify_diff_ids: true,
            record_ownership: false,
        }
    }
}

/// Why an entry was not created.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SkipReason {
    /// A block or character device, not allowed by the options.
    Device,
    /// An entry type this unpacker does not create (tar type byte).
    Unsupported(u8),
    /// An entry naming the root itself with a non-directory type.
    RootEntry,
}

/// An entry that was skipped, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEntry {
    /// Path as written in the layer.
    pub path: String,
    /// Why.
    pub reason: SkipReason,
}

/// What an unpack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackReport {
    /// Layers applied.
    pub layers: usize,
    /// Entries processed (including whiteouts and skipped ones).
    pub entries: u64,
    /// File-content bytes written.
    pub bytes: u64,
    /// Entries not created.
    pub skipped: Vec<SkippedEntry>,
    /// With [`UnpackOptions::record_ownership`] and owners not applied: every path in the final
    /// tree whose owner in the image is not `0:0`, sorted. Everything else is `0:0`.
    pub ownership: Vec<OwnershipRecord>,
}

/// The owner an image gives a path, when it could not be applied on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnershipRecord {
    /// Path relative to the root.
    pub path: String,
    /// User id.
    pub uid: u64,
    /// Group id.
    pub gid: u64,
}

/// Why an unpack failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    /// The image or its blobs are not in the store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A filesystem operation inside the root failed.
    #[error("cannot {op} {path} in the unpack root")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Path relative to the root.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The target directory cannot be opened or created.
    #[error("cannot open unpack root {path}")]
    Root {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A path or link target with `..` (or otherwise unusable).
    #[error("layer entry has an unsafe path {path:?}")]
    UnsafePath {
        /// The path as written in the layer.
        path: String,
    },
    /// A size or count limit was hit.
    #[error("layer exceeds the {what} limit of {max}")]
    Limit {
        /// `bytes` or `entries`.
        what: &'static str,
        /// The limit.
        max: u64,
    },
    /// The layer is not a readable tar stream (or its compression is broken).
    #[error("layer {layer} is not a valid tar stream")]
    Archive {
        /// The layer (empty digest string when applying a bare stream).
        layer: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The uncompressed layer does not match the config's diff_id.
    #[error("layer {layer} uncompresses to {actual}, config says {expected}")]
    DiffIdMismatch {
        /// The layer blob.
        layer: Digest,
        /// diff_id from the config.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// The config lists a different number of diff_ids than the manifest has layers.
    #[error("image has {layers} layers but its config lists {diff_ids} diff_ids")]
    DiffIdCount {
        /// Layers in the manifest.
        layers: usize,
        /// diff_ids in the config.
        diff_ids: usize,
    },
    /// A blocking task was cancelled or panicked.
    #[error("unpack task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl UnpackError {
    /// What kind of failure this is (see [`crate::error`]): a hostile or broken layer is
    /// invalid input.
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            UnpackError::Store(e) => e.kind(),
            UnpackError::Root { source, .. } => K::of_io(source),
            UnpackError::UnsafePath { .. }
            | UnpackError::Limit { .. }
            | UnpackError::Archive { .. }
            | UnpackError::DiffIdMismatch { .. }
            | UnpackError::DiffIdCount { .. } => K::Invalid,
            UnpackError::Io { .. } | UnpackError::Task(_) => K::Other,
        }
    }
}

fn io_at(op: &'static str, path: &[u8]) -> impl FnOnce(Errno) -> UnpackError {
    let path = String::from_utf8_lossy(path).into_owned();
    move |e| UnpackError::Io {
        op,
        path,
        source: e.into(),
    }
}

/// Splits a layer path into safe components: no `..`, no empty or `.` parts, no NUL.
/// `Ok(vec![])` means the root itself.
pub fn sanitize_path(path: &[u8]) -> Result<Vec<&[u8]>, UnpackError> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(UnpackError::UnsafePath {
                    path: String::from_utf8_lossy(path).into_owned(),
                })
            }
            c if c.contains(&0) => {
                return Err(UnpackError::UnsafePath {
                    path: String::from_utf8_lossy(path).into_owned(),
                })
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

fn ts(secs: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(secs).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Applies layers to one root; keeps totals and deferred directory mtimes across layers.
struct Unpacker<'a> {
    root: OwnedFd,
    opts: &'a UnpackOptions,
    as_root: bool,
    report: UnpackReport,
    dir_times: Vec<(Vec<u8>, u64)>,
    owners: std::collections::BTreeMap<Vec<u8>, (u64, u64)>,
    this_layer: HashSet<Vec<u8>>,
    parent_cache: Option<(Vec<u8>, OwnedFd)>,
    buf: Vec<u8>,
}

impl<'a> Unpacker<'a> {
    fn new(root: &Path, opts: &'a UnpackOptions) -> Result<Self, UnpackError> {
        std::fs::create_dir_all(root).map_err(|source| UnpackError::Root {
            path: root.to_owned(),
            source,
        })?;
        let fd = rustix::fs::open(root, O_PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| UnpackError::Root {
                path: root.to_owned(),
                source: e.into(),
            })?;
        Ok(Self {
            root: fd,
            opts,
            as_root: rustix::process::geteuid().is_root(),
            report: UnpackReport::default(),
            dir_times: Vec::new(),
            owners: std::collections::BTreeMap::new(),
            this_layer: HashSet::new(),
            parent_cache: None,
            buf: vec![0u8; 256 << 10],
        })
    }

    /// Opens a directory inside the root, resolving symlinks as if the root were `/`.
    fn open_in_root(&self, rel: &[u8], flags: OFlags) -> Result<OwnedFd, Errno> {
        let path: &OsStr = if rel.is_empty() {
            OsStr::new(".")
        } else {
            OsStr::from_bytes(rel)
        };
        loop {
            match crate::host::fs::openat_confined(
                self.root.as_fd(),
                path,
                flags | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                Confine::InRoot,
            ) {
                Err(Errno::AGAIN) | Err(Errno::INTR) => continue,
                r => return r,
            }
        }
    }

    /// The parent directory of `comps` as an O_PATH fd, created (0755) if missing.
    fn parent(&mut self, comps: &[&[u8]]) -> Result<OwnedFd, UnpackError> {
        let parent = &comps[..comps.len().saturating_sub(1)];
        let key = join(parent);
        if let Some((k, fd)) = &self.parent_cache {
            if *k == key {
                return fd.try_clone().map_err(|e| UnpackError::Io {
                    op: "dup",
                    path: String::from_utf8_lossy(&key).into_owned(),
                    source: e,
                });
            }
        }
        let fd = match self.open_in_root(&key, O_PATH) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                // Create the missing directories one by one, each resolved inside the root.
                let mut cur = self.open_in_root(b"", O_PATH).map_err(io_at("open", b"."))?;
                for i in 0..parent.len() {
                    let prefix = join(&parent[..=i]);
                    match self.open_in_root(&prefix, O_PATH) {
                        Ok(fd) => cur = fd,
                        Err(Errno::NOENT) => {
                            match rustix::fs::mkdirat(
                                &cur,
                                OsStr::from_bytes(parent[i]),
                                Mode::from_raw_mode(0o755),
                            ) {
                                Ok(()) | Err(Errno::EXIST) => {}
                                Err(e) => return Err(io_at("create directory", &prefix)(e)),
                            }
                            cur = self
                                .open_in_root(&prefix, O_PATH)
                                .map_err(io_at("open", &prefix))?;
                        }
                        Err(e) => return Err(io_at("open", &prefix)(e)),
                    }
                }
                cur
            }
            Err(e) => return Err(io_at("open", &key)(e)),
        };
        let dup = fd.try_clone().map_err(|e| UnpackError::Io {
            op: "dup",
            path: String::from_utf8_lossy(&key).into_owned(),
            source: e,
        })?;
        self.parent_cache = Some((key, dup));
        Ok(fd)
    }

    /// Removes `name` in `dir` (recursively, never following symlinks). Missing is fine.
    fn remove_all(&mut self, dir: &OwnedFd, name: &[u8], shown: &[u8]) -> Result<(), UnpackError> {
        self.parent_cache = None;
        remove_all_at(dir, OsStr::from_bytes(name)).map_err(io_at("remove", shown))
    }

    /// Drops recorded owners of `path` and everything under it (it was removed).
    fn forget_owners(&mut self, path: &[u8]) {
        if self.owners.is_empty() {
            return;
        }
        self.owners.remove(path);
        let mut lo = path.to_vec();
        lo.push(b'/');
        let mut hi = path.to_vec();
        hi.push(b'/' + 1);
        let doomed: Vec<Vec<u8>> = self.owners.range(lo..hi).map(|(k, _)| k.clone()).collect();
        for k in doomed {
            self.owners.remove(&k);
        }
    }

    fn mark(&mut self, comps: &[&[u8]]) {
        for i in 1..=comps.len() {
            self.this_layer.insert(join(&comps[..i]));
        }
    }

    fn apply_layer<R: Read>(&mut self, reader: R, layer: &str) -> Result<(), UnpackError> {
        self.this_layer.clear();
        self.parent_cache = None;
        let archive_err = |source: std::io::Error| UnpackError::Archive {
            layer: layer.to_owned(),
            source,
        };
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(archive_err)? {
            let mut entry = entry.map_err(archive_err)?;
            self.report.entries += 1;
            if self.report.entries > self.opts.max_entries {
                return Err(UnpackError::Limit {
                    what: "entries",
                    max: self.opts.max_entries,
                });
            }
            self.apply_entry(&mut entry, layer)?;
        }
        self.report.layers += 1;
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        layer: &str,
    ) -> Result<(), UnpackError> {
        let raw_path = entry.path_bytes().into_owned();
        let comps = sanitize_path(&raw_path)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let Some((&name, _)) = comps.split_last() else {
            if !kind.is_dir() {
                self.report.skipped.push(SkippedEntry {
                    path: String::from_utf8_lossy(&raw_path).into_owned(),
                    reason: SkipReason::RootEntry,
                });
            }
            return Ok(());
        };
        let rel = join(&comps);

        // Whiteouts.
        if name == OPAQUE {
            let parent = &comps[..comps.len() - 1];
            let prel = join(parent);
            self.parent(&comps)?; // make sure the directory exists
            let dir = self
                .open_in_root(&prel, OFlags::RDONLY)
                .map_err(io_at("open", &prel))?;
            let mut doomed = Vec::new();
            let mut it = rustix::fs::Dir::read_from(&dir).map_err(io_at("list", &prel))?;
            for e in it.by_ref() {
                let e = e.map_err(io_at("list", &prel))?;
                let n = e.file_name().to_bytes();
                if n == b"." || n == b".." {
                    continue;
                }
                let mut child = prel.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(n);
                if !self.this_layer.contains(&child) {
                    doomed.push((n.to_vec(), child));
                }
            }
            for (n, shown) in doomed {
                self.remove_all(&dir, &n, &shown)?;
                self.forget_owners(&shown);
            }
            return Ok(());
        }
        if let Some(target) = name.strip_prefix(WHITEOUT) {
            if target.is_empty() || target == b"." || target == b".." {
                return Err(UnpackError::UnsafePath {
                    path: String::from_utf8_lossy(&raw_path).into_owned(),
                });
            }
            let parent = &comps[..comps.len() - 1];
            let mut removed = join(parent);
            if !removed.is_empty() {
                removed.push(b'/');
            }
            removed.extend_from_slice(target);
            self.forget_owners(&removed);
            match self.open_in_root(&join(parent), O_PATH) {
                Ok(dir) => self.remove_all(&dir, target, &rel)?,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) => {}
                Err(e) => return Err(io_at("open", &join(parent))(e)),
            }
            return Ok(());
        }

        let header = entry.header();
        let mut mode = header.mode().map_err(|source| UnpackError::Archive {
            layer: layer.to_owned(),
            source,
        })? & 0o7777;
        let (mut uid, mut gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        let mut mtime = header.mtime().unwrap_or(0);
        let dev = (
            header.device_major().ok().flatten(),
            header.device_minor().ok().flatten(),
        );
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                let v = ext.value().ok().map(str::trim);
                match (ext.key().ok(), v) {
                    (Some("uid"), Some(v)) => uid = v.parse().unwrap_or(uid),
                    (Some("gid"), Some(v)) => gid = v.parse().unwrap_or(gid),
                    (Some("mtime"), Some(v)) => {
                        mtime = v.split('.').next().and_then(|s| s.parse().ok()).unwrap_or(mtime)
                    }
                    _ => {}
                }
            }
        }
        if !kind.is_dir() && !self.opts.allow_setuid {
            mode &= !0o6000;
        }
        let owner = (self.opts.preserve_ownership
            && self.as_root
            && uid < u64::from(u32::MAX)
            && gid < u64::from(u32::MAX))
        .then(|| {
            (
                rustix::fs::Uid::from_raw(u32::try_from(uid).unwrap_or(0)),
                rustix::fs::Gid::from_raw(u32::try_from(gid).unwrap_or(0)),
            )
        });

        let is_dev = matches!(kind, tar::EntryType::Block | tar::EntryType::Char);
        if is_dev && !(self.opts.allow_devices && self.as_root) {
            self.report.skipped.push(SkippedEntry {
                path: String::from_utf8_lossy(&raw_path).into_owned(),
                reason: SkipReason::Device,
            });
            return Ok(());
        }
        let supported = kind.is_file()
            || kind.is_dir()
            || kind.is_symlink()
            || kind.is_hard_link()
            || kind.is_fifo()
            || is_dev
            || kind == tar::EntryType::Continuous
            || kind == tar::EntryType::GNUSparse;
        if !supported {
            self.report.skipped.push(SkippedEntry {
                path: String::from_utf8_lossy(&raw_path).into_owned(),
                reason: SkipReason::Unsupported(kind.as_byte()),
            });
            return Ok(());
        }

        let parent = self.parent(&comps)?;
        let cname = OsStr::from_bytes(name);
        // Clear the slot: a directory stays a directory; anything else is replaced.
        match rustix::fs::statat(&parent, cname, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let existing = FileType::from_raw_mode(st.st_mode);
                if !(kind.is_dir() && existing == FileType::Directory) {
                    if existing == FileType::Directory {
                        self.remove_all(&parent, name, &rel)?;
                    } else {
                        // A cached parent may have been reached through this (symlink) name.
                        self.parent_cache = None;
                        rustix::fs::unlinkat(&parent, cname, AtFlags::empty())
                            .map_err(io_at("remove", &rel))?;
                    }
                }
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(io_at("stat", &rel)(e)),
        }
        self.mark(&comps);
        if owner.is_none() && self.opts.record_ownership {
            if !kind.is_dir() {
                self.forget_owners(&rel);
            }
            if (uid, gid) == (0, 0) {
                self.owners.remove(&rel);
            } else {
                self.owners.insert(rel.clone(), (uid, gid));
            }
        }

        if kind.is_dir() {
            match rustix::fs::mkdirat(&parent, cname, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(io_at("create directory", &rel)(e)),
            }
            let fd = rustix::fs::openat(
                &parent,
                cname,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_at("open", &rel))?;
            if let Some((u, g)) = owner {
                rustix::fs::fchown(&fd, Some(u), Some(g)).map_err(io_at("chown", &rel))?;
            }
            rustix::fs::fchmod(&fd, crate::host::fs::mode(mode)).map_err(io_at("chmod", &rel))?;
            self.dir_times.push((rel, mtime));
        } else if kind.is_file() || kind == tar::EntryType::Continuous || kind == tar::EntryType::GNUSparse {
            let size = entry.size();
            if self.report.bytes.saturating_add(size) > self.opts.max_bytes {
                return Err(UnpackError::Limit {
                    what: "bytes",
                    max: self.opts.max_bytes,
                });
            }
            let fd = rustix::fs::openat(
                &parent,
                cname,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(io_at("create", &rel))?;
            let mut file = std::fs::File::from(fd);
            let mut written = 0u64;
            loop {
                let n = entry.read(&mut self.buf).map_err(|source| UnpackError::Archive {
                    layer: layer.to_owned(),
                    source,
                })?;
                if n == 0 {
                    break;
                }
                written += n as u64;
                if self.report.bytes.saturating_add(written) > self.opts.max_bytes {
                    return Err(UnpackError::Limit {
                        what: "bytes",
                        max: self.opts.max_bytes,
                    });
                }
                file.write_all(&self.buf[..n]).map_err(|source| UnpackError::Io {
                    op: "write",
                    path: String::from_utf8_lossy(&rel).into_owned(),
                    source,
                })?;
            }
            self.report.bytes += written;
            if let Some((u, g)) = owner {
                rustix::fs::fchown(&file, Some(u), Some(g)).map_err(io_at("chown", &rel))?;
            }
            rustix::fs::fchmod(&file, crate::host::fs::mode(mode)).map_err(io_at("chmod", &rel))?;
            rustix::fs::futimens(&file, &ts(mtime)).map_err(io_at("set times of", &rel))?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .unwrap_or_default();
            if target.is_empty() || target.contains(&0) {
                return Err(UnpackError::UnsafePath {
                    path: String::from_utf8_lossy(&raw_path).into_owned(),
                });
            }
            self.parent_cache = None;
            rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, cname)
                .map_err(io_at("create symlink", &rel))?;
            if let Some((u, g)) = owner {
                rustix::fs::chownat(&parent, cname, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io_at("chown", &rel))?;
            }
            rustix::fs::utimensat(&parent, cname, &ts(mtime), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io_at("set times of", &rel))?;
        } else if kind.is_hard_link() {
            let target_raw = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .unwrap_or_default();
            let tcomps = sanitize_path(&target_raw)?;
            let Some((&tname, tparent)) = tcomps.split_last() else {
                return Err(UnpackError::UnsafePath {
                    path: String::from_utf8_lossy(&target_raw).into_owned(),
                });
            };
            let tdir = self
                .open_in_root(&join(tparent), O_PATH)
                .map_err(io_at("open", &target_raw))?;
            rustix::fs::linkat(&tdir, OsStr::from_bytes(tname), &parent, cname, AtFlags::empty())
                .map_err(io_at("hardlink", &rel))?;
        } else {
            // FIFO or (allowed) device node.
            let (ft, rdev) = match kind {
                tar::EntryType::Block => (
                    FileType::BlockDevice,
                    rustix::fs::makedev(dev.0.unwrap_or(0), dev.1.unwrap_or(0)),
                ),
                tar::EntryType::Char => (
                    FileType::CharacterDevice,
                    rustix::fs::makedev(dev.0.unwrap_or(0), dev.1.unwrap_or(0)),
                ),
                _ => (FileType::Fifo, 0),
            };
            crate::host::fs::mknodat(parent.as_fd(), cname, ft, crate::host::fs::mode(mode), rdev)
                .map_err(io_at("create node", &rel))?;
            if let Some((u, g)) = owner {
                rustix::fs::chownat(&parent, cname, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io_at("chown", &rel))?;
            }
            rustix::fs::utimensat(&parent, cname, &ts(mtime), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io_at("set times of", &rel))?;
        }
        Ok(())
    }

    /// Sets directory mtimes, deepest first (creating children changes a directory's mtime).
    fn finish(mut self) -> Result<UnpackReport, UnpackError> {
        let times = std::mem::take(&mut self.dir_times);
        let mut seen = HashSet::new();
        for (rel, mtime) in times.into_iter().rev() {
            if !seen.insert(rel.clone()) {
                continue;
            }
            match self.open_in_root(&rel, OFlags::RDONLY) {
                Ok(fd) => rustix::fs::futimens(&fd, &ts(mtime)).map_err(io_at("set times of", &rel))?,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) => {}
                Err(e) => return Err(io_at("open", &rel)(e)),
            }
        }
        self.report.ownership = std::mem::take(&mut self.owners)
            .into_iter()
            .map(|(path, (uid, gid))| OwnershipRecord {
                path: String::from_utf8_lossy(&path).into_owned(),
                uid,
                gid,
            })
            .collect();
        Ok(self.report)
    }
}

fn remove_all_at(dir: &OwnedFd, name: &OsStr) -> Result<(), Errno> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut names = Vec::new();
        let mut it = rustix::fs::Dir::read_from(&sub)?;
        for e in it.by_ref() {
            let e = e?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        for n in names {
            remove_all_at(&sub, OsStr::from_bytes(&n))?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())
    }
}

/// Wraps a (possibly compressed) layer stream in the matching decoder, by magic bytes.
pub fn decompress<'a, R: Read + 'a>(reader: R) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::with_capacity(256 << 10, reader);
    let head = buf.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(buf)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        crate::host::codec::zstd(buf)
    } else {
        Ok(Box::new(buf))
    }
}

/// Reads what a decoder thread sends; a closed channel is the end of the stream.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Decompresses and hashes a layer on its own thread (like `tar` piping from `gzip -d`), so
/// decoding overlaps with writing files. The thread reads to the end of the stream even after
/// the tar reader stopped (the diff_id covers every byte), at most `cap` bytes, and stops early
/// when `abort` is set.
fn spawn_decoder<R: Read + Send + 'static>(
    reader: R,
    cap: u64,
    abort: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<(ChannelReader, std::thread::JoinHandle<std::io::Result<Digest>>)> {
    use std::sync::atomic::Ordering;
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(16);
    let handle = std::thread::Builder::new()
        .name("vmrs-layer-decode".to_owned())
        .spawn(move || {
            let mut hasher = Hasher::new();
            let mut inner = match decompress(reader) {
                Ok(r) => r,
                Err(e) => {
                    let kind = e.kind();
                    let _ = tx.send(Err(e));
                    return Err(kind.into());
                }
            };
            let mut receiver_alive = true;
            loop {
                if abort.load(Ordering::Relaxed) {
                    return Err(std::io::ErrorKind::Interrupted.into());
                }
                let mut chunk = vec![0u8; 256 << 10];
                let n = match inner.read(&mut chunk) {
                    Ok(0) => return Ok(hasher.finish()),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let kind = e.kind();
                        let msg = e.to_string();
                        let _ = tx.send(Err(e));
                        return Err(std::io::Error::new(kind, msg));
                    }
                };
                chunk.truncate(n);
                hasher.update(&chunk);
                if hasher.len() > cap {
                    let e = std::io::Error::other("uncompressed layer exceeds the size limit");
                    let _ = tx.send(Err(std::io::Error::other(
                        "uncompressed layer exceeds the size limit",
                    )));
                    return Err(e);
                }
                if receiver_alive && tx.send(Ok(chunk)).is_err() {
                    receiver_alive = false;
                }
            }
        })?;
    Ok((
        ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        },
        handle,
    ))
}

/// Applies `layers` (each a possibly compressed tar stream) to `root`, bottom first, with the
/// confinement rules of this module. Blocking: call it from `spawn_blocking`.
///
/// `expected_diff_ids`, when given, must have one digest per layer; each uncompressed stream
/// must hash to it.
pub fn apply_layers<R: Read + Send + 'static>(
    root: &Path,
    layers: impl IntoIterator<Item = (String, R)>,
    expected_diff_ids: Option<&[Digest]>,
    opts: &UnpackOptions,
) -> Result<UnpackReport, UnpackError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut u = Unpacker::new(root, opts)?;
    // Uncompressed bytes of one layer: file content plus headers and padding.
    let cap = opts
        .max_bytes
        .saturating_add(opts.max_entries.saturating_mul(1536))
        .saturating_add(1 << 20);
    for (i, (name, reader)) in layers.into_iter().enumerate() {
        let archive_err = |source: std::io::Error| UnpackError::Archive {
            layer: name.clone(),
            source,
        };
        let abort = Arc::new(AtomicBool::new(false));
        let (mut rd, decoder) = spawn_decoder(reader, cap, abort.clone()).map_err(archive_err)?;
        let applied = u.apply_layer(&mut rd, &name);
        if applied.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        drop(rd);
        let digest = decoder
            .join()
            .map_err(|_| archive_err(std::io::Error::other("layer decoder thread panicked")));
        applied?;
        let actual = digest?.map_err(archive_err)?;
        if let Some(expected) = expected_diff_ids.and_then(|d| d.get(i)) {
            if &actual != expected {
                return Err(UnpackError::DiffIdMismatch {
                    layer: Digest::parse(&name).unwrap_or_else(|_| Digest::of(name.as_bytes())),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
    }
    u.finish()
}

impl ImageStore {
    /// Unpacks a stored image into `target` (created if missing): its layers applied in order
    /// with OCI whiteouts, confined to `target` (see the [`unpack`](super::unpack) module docs).
    ///
    /// `target` is usually empty; unpacking onto an existing tree applies the layers on top.
    /// Runs on a blocking thread; holds the store lock shared so gc cannot remove the blobs.
    pub async fn unpack(
        &self,
        reference: &str,
        target: &Path,
        opts: &UnpackOptions,
    ) -> Result<UnpackReport, UnpackError> {
        let _lock = self.lock_store(false).await?;
        let image = self.image(reference).await?;
        let diff_ids = image.config.diff_ids.clone();
        if opts.verify_diff_ids && diff_ids.len() != image.manifest.layers.len() {
            return Err(UnpackError::DiffIdCount {
                layers: image.manifest.layers.len(),
                diff_ids: diff_ids.len(),
            });
        }
        let mut layers = Vec::new();
        for l in &image.manifest.layers {
            let path = self.blob_path(&l.digest);
            if !path.is_file() {
                return Err(StoreError::BlobMissing {
                    digest: l.digest.clone(),
                }
                .into());
            }
            layers.push((l.digest.to_string(), path));
        }
        let target = target.to_owned();
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || {
            let mut files = Vec::new();
            for (name, path) in layers {
                let f = std::fs::File::open(&path).map_err(|source| StoreError::Io {
                    op: "open",
                    path: path.clone(),
                    source,
                })?;
                files.push((name, f));
            }
            let ids = opts.verify_diff_ids.then_some(diff_ids.as_slice());
            apply_layers(&target, files, ids, &opts)
        })
        .await
        .map_err(UnpackError::Task)?
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sanitize_rules() {
        assert_eq!(sanitize_path(b"./a//b/./c").unwrap(), [&b"a"[..], b"b", b"c"]);
        assert_eq!(sanitize_path(b"/etc/passwd").unwrap(), [&b"etc"[..], b"passwd"]);
        assert!(sanitize_path(b"a/../../b").is_err());
        assert!(sanitize_path(b"..").is_err());
        assert!(sanitize_path(b"./").unwrap().is_empty());
    }

    proptest! {
        #[test]
        fn sanitized_components_are_plain_names(path in prop::collection::vec(prop_oneof![
            Just(b"..".to_vec()), Just(b".".to_vec()), Just(Vec::new()),
            prop::collection::vec(any::<u8>(), 1..6)], 0..8)) {
            let joined = path.join(&b'/');
            if let Ok(comps) = sanitize_path(&joined) {
                for c in comps {
                    prop_assert!(!c.is_empty());
                    prop_assert!(c != b"." && c != b"..");
                    prop_assert!(!c.contains(&b'/') && !c.contains(&0));
                }
            } else {
                prop_assert!(path.iter().any(|c| c == b"..") || joined.contains(&0));
            }
        }
    }
}
