//! What a user's disk image refers to besides itself.
//!
//! vm-rs runs QEMU as root, and a qcow2 image can name other host files: a *backing file* (read
//! for every cluster the image does not hold) and an *external data file* (where all guest data
//! lives). Either name can be any path — `/etc/shadow`, another VM's disk — or a `json:{...}`
//! block-driver description. A disk is "what the user named" only if it names nothing else, so
//! a qcow2 disk with such references is refused unless its [`DiskConfig::backing`] is
//! [`BackingPolicy::Allow`]; then the chain is logged.
//!
//! The header is parsed here, not by `qemu-img info` (which would open the backing chain to
//! report on it): [`parse_qcow2_header`] is a pure function over the first bytes of the image,
//! and [`check_disk`] reads at most [`HEADER_READ_LIMIT`] bytes of the one file the user named.
//! Only after an opt-in are backing files opened, to show the chain.
//!
//! The format is never guessed: a raw disk is passed to QEMU as `format=raw` whatever its bytes
//! look like (a raw disk holding a qcow2 header is just data to QEMU then), and a disk declared
//! qcow2 must carry a qcow2 header.
//!
//! qcow2 header layout (big-endian, QEMU `docs/interop/qcow2.txt`): magic `QFI\xfb` at 0,
//! version at 4, backing file offset (u64) at 8 and size (u32) at 16, cluster bits at 20; from
//! version 3, incompatible features (u64) at 72 — bit 2 is "external data file" — and the header
//! length at 100. Header extensions follow the header: `{type: u32, len: u32, data, padding to
//! 8}` until type 0; type `0xe2792aca` is the backing file's format, `0x44415441` the external
//! data file's name.

use crate::config::{BackingPolicy, DiskConfig, DiskFormat};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Most bytes read from the start of an image to find its references (the header and its
/// extensions live in the first cluster; QEMU limits a backing file name to 1023 bytes).
pub const HEADER_READ_LIMIT: usize = 64 * 1024;

/// Deepest backing chain followed when showing an allowed chain.
const MAX_CHAIN: usize = 16;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// QEMU's own limit on a backing file name.
const MAX_BACKING_NAME: u32 = 1023;

/// Why a qcow2 header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The bytes do not start with the qcow2 magic.
    #[error("not a qcow2 image (no QFI\\xfb magic)")]
    NotQcow2,
    /// The image ends inside its header.
    #[error("qcow2 header truncated at {len} bytes")]
    Truncated {
        /// Bytes available.
        len: usize,
    },
    /// A version QEMU does not write (2 and 3 exist).
    #[error("unsupported qcow2 version {version}")]
    Version {
        /// The version field.
        version: u32,
    },
    /// A field is out of range (offset past the end, length beyond the limit).
    #[error("malformed qcow2 header: {field} out of range")]
    Malformed {
        /// Which field.
        field: &'static str,
    },
}

/// Host references found in a qcow2 header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Qcow2Refs {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Backing file name as stored (may be relative to the image, or a `json:` description).
    pub backing_file: Option<String>,
    /// Backing file format from the header extension, if recorded.
    pub backing_format: Option<String>,
    /// The image keeps its data in an external file.
    pub has_data_file: bool,
    /// The external data file's name, if recorded.
    pub data_file: Option<String>,
}

impl Qcow2Refs {
    /// Whether the image refers to any host file besides itself.
    pub fn refers_elsewhere(&self) -> bool {
        self.backing_file.is_some() || self.has_data_file || self.data_file.is_some()
    }
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn name(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Parse the host references out of the first bytes of a qcow2 image. Pure: `bytes` is all it
/// looks at, so a reference lying beyond them is reported as [`HeaderError::Malformed`] rather
/// than followed. Never panics, whatever the bytes.
pub fn parse_qcow2_header(bytes: &[u8]) -> Result<Qcow2Refs, HeaderError> {
    if bytes.len() < 4 {
        return Err(if QCOW2_MAGIC.starts_with(bytes) && !bytes.is_empty() {
            HeaderError::Truncated { len: bytes.len() }
        } else {
            HeaderError::NotQcow2
        });
    }
    if &bytes[..4] != QCOW2_MAGIC {
        return Err(HeaderError::NotQcow2);
    }
    let truncated = HeaderError::Truncated { len: bytes.len() };
    let version = be_u32(bytes, 4).ok_or(truncated.clone())?;
    if !(2..=3).contains(&version) {
        return Err(HeaderError::Version { version });
    }
    let backing_offset = be_u64(bytes, 8).ok_or(truncated.clone())?;
    let backing_size = be_u32(bytes, 16).ok_or(truncated.clone())?;
    let mut refs = Qcow2Refs {
        version,
        ..Qcow2Refs::default()
    };
    // QEMU treats a non-zero offset as "has a backing file"; so do we.
    if backing_offset != 0 {
        if backing_size > MAX_BACKING_NAME {
            return Err(HeaderError::Malformed {
                field: "backing_file_size",
            });
        }
        let start = usize::try_from(backing_offset).map_err(|_| HeaderError::Malformed {
            field: "backing_file_offset",
        })?;
        let end = start
            .checked_add(backing_size as usize)
            .filter(|&e| e <= bytes.len())
            .ok_or(HeaderError::Malformed {
                field: "backing_file_offset",
            })?;
        refs.backing_file = Some(name(&bytes[start..end]));
    }
    let ext_start = if version == 2 {
        72
    } else {
        let incompatible = be_u64(bytes, 72).ok_or(truncated.clone())?;
        refs.has_data_file = incompatible & INCOMPAT_DATA_FILE != 0;
        let header_len = be_u32(bytes, 100).ok_or(truncated.clone())?;
        if header_len < 104 {
            return Err(HeaderError::Malformed {
                field: "header_length",
            });
        }
        header_len as usize
    };
    // Header extensions, until the end marker. A header whose extensions run past the bytes
    // we read is malformed as far as we are concerned: we cannot say what it refers to.
    let mut at = ext_start;
    loop {
        let (Some(kind), Some(len)) = (be_u32(bytes, at), be_u32(bytes, at + 4)) else {
            return Err(HeaderError::Malformed {
                field: "header extensions",
            });
        };
        if kind == EXT_END {
            break;
        }
        let data_start = at + 8;
        let data_end = data_start
            .checked_add(len as usize)
            .filter(|&e| e <= bytes.len())
            .ok_or(HeaderError::Malformed {
                field: "header extension length",
            })?;
        let data = &bytes[data_start..data_end];
        match kind {
            EXT_BACKING_FORMAT => refs.backing_format = Some(name(data)),
            EXT_DATA_FILE => refs.data_file = Some(name(data)),
            _ => {}
        }
        // Padded to a multiple of 8.
        at = data_end
            .checked_add(7)
            .map(|e| e & !7)
            .ok_or(HeaderError::Malformed {
                field: "header extension length",
            })?;
    }
    Ok(refs)
}

/// One image in a backing chain, as shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// The image.
    pub path: PathBuf,
    /// Its backing file as stored in the header.
    pub backing_file: Option<String>,
    /// The backing file's recorded format.
    pub backing_format: Option<String>,
    /// Its external data file, if any (`Some("")` when the name is not recorded).
    pub data_file: Option<String>,
}

/// Why a disk image is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageRefError {
    /// The image could not be read.
    #[error("cannot read disk image {}", path.display())]
    Read {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The image is declared qcow2 but its header does not parse.
    #[error("disk {} is declared qcow2 but its header is not usable", path.display())]
    BadHeader {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: HeaderError,
    },
    /// The image refers to other host files and the disk does not allow it.
    #[error(
        "disk {} refers to other host files ({}); attach it with backing=allow \
         (DiskConfig::backing = BackingPolicy::Allow) if that is intended",
        path.display(), describe(refs)
    )]
    RefersElsewhere {
        /// The image.
        path: PathBuf,
        /// What it refers to.
        refs: Box<Qcow2Refs>,
    },
}

fn describe(refs: &Qcow2Refs) -> String {
    let mut parts = Vec::new();
    if let Some(b) = &refs.backing_file {
        match &refs.backing_format {
            Some(f) => parts.push(format!("backing file {b:?} as {f}")),
            None => parts.push(format!("backing file {b:?}")),
        }
    }
    if refs.has_data_file || refs.data_file.is_some() {
        parts.push(format!(
            "external data file {:?}",
            refs.data_file.as_deref().unwrap_or("")
        ));
    }
    parts.join(", ")
}

fn read_header(path: &Path) -> Result<Vec<u8>, ImageRefError> {
    let read = |source| ImageRefError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut bytes = Vec::with_capacity(4096);
    file.take(HEADER_READ_LIMIT as u64)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    Ok(bytes)
}

/// Check that `disk` refers to no host file besides itself, reading only its header (see the
/// module docs). With [`BackingPolicy::Allow`] the references are permitted and the chain is
/// returned (and logged) instead; a raw disk has no chain.
pub fn check_disk(disk: &DiskConfig) -> Result<Vec<ChainLink>, ImageRefError> {
    if disk.format == DiskFormat::Raw {
        return Ok(Vec::new());
    }
    let header = read_header(&disk.path)?;
    let refs = parse_qcow2_header(&header).map_err(|source| ImageRefError::BadHeader {
        path: disk.path.clone(),
        source,
    })?;
    if !refs.refers_elsewhere() {
        return Ok(Vec::new());
    }
    if disk.backing != BackingPolicy::Allow {
        return Err(ImageRefError::RefersElsewhere {
            path: disk.path.clone(),
            refs: Box::new(refs),
        });
    }
    let chain = backing_chain(&disk.path, refs);
    tracing::warn!(
        disk = %disk.path.display(),
        chain = %show_chain(&chain),
        "disk refers to other host files (backing=allow)"
    );
    Ok(chain)
}

/// `a.qcow2 -> /b.img (raw) [data file /c]` for logs.
pub fn show_chain(chain: &[ChainLink]) -> String {
    let mut out = String::new();
    for (i, link) in chain.iter().enumerate() {
        if i == 0 {
            out.push_str(&link.path.display().to_string());
        }
        if let Some(d) = &link.data_file {
            out.push_str(&format!(" [data file {d:?}]"));
        }
        if let Some(b) = &link.backing_file {
            out.push_str(&format!(" -> {b:?}"));
            if let Some(f) = &link.backing_format {
                out.push_str(&format!(" ({f})"));
            }
        }
    }
    out
}

/// Follow an allowed chain for display: plain file names only (a `json:` name or a name that
/// does not parse ends the walk), at most [`MAX_CHAIN`] links, and no loops.
fn backing_chain(first: &Path, refs: Qcow2Refs) -> Vec<ChainLink> {
    let mut chain = Vec::new();
    let mut path = first.to_path_buf();
    let mut refs = refs;
    loop {
        let data_file = (refs.has_data_file || refs.data_file.is_some())
            .then(|| refs.data_file.clone().unwrap_or_default());
        chain.push(ChainLink {
            path: path.clone(),
            backing_file: refs.backing_file.clone(),
            backing_format: refs.backing_format.clone(),
            data_file,
        });
        let Some(next) = refs.backing_file.as_deref() else {
            break;
        };
        if chain.len() >= MAX_CHAIN
            || next.starts_with("json:")
            || refs.backing_format.as_deref() == Some("raw")
        {
            break;
        }
        let next_path = match path.parent() {
            Some(dir) => dir.join(next),
            None => PathBuf::from(next),
        };
        if chain.iter().any(|l| l.path == next_path) {
            break;
        }
        let Ok(next_refs) = read_header(&next_path).and_then(|h| {
            parse_qcow2_header(&h).map_err(|source| ImageRefError::BadHeader {
                path: next_path.clone(),
                source,
            })
        }) else {
            break;
        };
        path = next_path;
        refs = next_refs;
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header of `header_len` bytes, with extensions appended and an optional backing
    /// name placed after them.
    fn v3(incompatible: u64, exts: &[(u32, &[u8])], backing: Option<&[u8]>) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        for (kind, data) in exts {
            h.extend_from_slice(&kind.to_be_bytes());
            h.extend_from_slice(&(data.len() as u32).to_be_bytes());
            h.extend_from_slice(data);
            while h.len() % 8 != 0 {
                h.push(0);
            }
        }
        h.extend_from_slice(&[0u8; 8]);
        if let Some(b) = backing {
            let off = h.len() as u64;
            h.extend_from_slice(b);
            h[8..16].copy_from_slice(&off.to_be_bytes());
            h[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
        }
        h
    }

    #[test]
    fn plain_image_refers_to_nothing() {
        let refs = parse_qcow2_header(&v3(0, &[], None)).expect("parse");
        assert_eq!(refs.version, 3);
        assert!(!refs.refers_elsewhere());
    }

    #[test]
    fn backing_file_and_format_are_found() {
        let h = v3(0, &[(EXT_BACKING_FORMAT, b"raw")], Some(b"/etc/shadow"));
        let refs = parse_qcow2_header(&h).expect("parse");
        assert_eq!(refs.backing_file.as_deref(), Some("/etc/shadow"));
        assert_eq!(refs.backing_format.as_deref(), Some("raw"));
        assert!(refs.refers_elsewhere());
    }

    #[test]
    fn json_backing_name_is_a_reference() {
        let h = v3(
            0,
            &[],
            Some(br#"json:{"file":{"driver":"file","filename":"/etc/shadow"}}"#),
        );
        let refs = parse_qcow2_header(&h).expect("parse");
        assert!(refs.backing_file.expect("backing").starts_with("json:"));
    }

    #[test]
    fn external_data_file_bit_alone_is_a_reference() {
        let refs = parse_qcow2_header(&v3(INCOMPAT_DATA_FILE, &[], None)).expect("parse");
        assert!(refs.has_data_file && refs.data_file.is_none());
        assert!(refs.refers_elsewhere());
        let named = v3(INCOMPAT_DATA_FILE, &[(EXT_DATA_FILE, b"/dev/sda")], None);
        let refs = parse_qcow2_header(&named).expect("parse");
        assert_eq!(refs.data_file.as_deref(), Some("/dev/sda"));
    }

    #[test]
    fn version_2_has_no_extensions_field_but_a_backing_file() {
        let mut h = vec![0u8; 72];
        h[..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&2u32.to_be_bytes());
        h.extend_from_slice(&[0u8; 8]);
        let off = h.len() as u64;
        h.extend_from_slice(b"base.img");
        h[8..16].copy_from_slice(&off.to_be_bytes());
        h[16..20].copy_from_slice(&8u32.to_be_bytes());
        let refs = parse_qcow2_header(&h).expect("parse");
        assert_eq!(refs.backing_file.as_deref(), Some("base.img"));
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        assert_eq!(parse_qcow2_header(b""), Err(HeaderError::NotQcow2));
        assert_eq!(parse_qcow2_header(b"QF"), Err(HeaderError::Truncated { len: 2 }));
        assert_eq!(parse_qcow2_header(b"\x7fELF...."), Err(HeaderError::NotQcow2));
        let good = v3(0, &[], Some(b"/x"));
        // Every truncation of a valid header is an error, never a panic or a silent "no refs".
        for n in 0..good.len() {
            assert!(parse_qcow2_header(&good[..n]).is_err(), "truncated to {n}");
        }
        let mut v9 = good.clone();
        v9[4..8].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(parse_qcow2_header(&v9), Err(HeaderError::Version { version: 9 }));
        // Backing name beyond the bytes read, or at an absurd offset.
        let mut far = good.clone();
        far[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            parse_qcow2_header(&far),
            Err(HeaderError::Malformed { .. })
        ));
        let mut long = good.clone();
        long[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_qcow2_header(&long),
            Err(HeaderError::Malformed { .. })
        ));
        // An extension whose length runs past the end.
        let mut ext = v3(0, &[(EXT_DATA_FILE, b"abc")], None);
        ext[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_qcow2_header(&ext),
            Err(HeaderError::Malformed { .. })
        ));
        // A header length pointing inside the fixed header.
        let mut short = v3(0, &[], None);
        short[100..104].copy_from_slice(&8u32.to_be_bytes());
        assert!(matches!(
            parse_qcow2_header(&short),
            Err(HeaderError::Malformed { .. })
        ));
        // No end marker: extensions run off the end.
        let no_end = &v3(0, &[], None)[..104];
        assert!(parse_qcow2_header(no_end).is_err());
    }

    proptest::proptest! {
        /// Any bytes: an answer, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_qcow2_header(&bytes);
        }

        /// A real-looking header with a few bytes changed: never a panic, and whenever it
        /// still parses with the backing offset set, the backing file is reported.
        #[test]
        fn mutated_headers(edits in proptest::collection::vec((0usize..256, proptest::num::u8::ANY), 1..6)) {
            let mut h = v3(INCOMPAT_DATA_FILE, &[(EXT_BACKING_FORMAT, b"qcow2")], Some(b"/b"));
            for (i, b) in edits {
                let i = i % h.len();
                h[i] = b;
            }
            if let Ok(refs) = parse_qcow2_header(&h) {
                let offset = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
                proptest::prop_assert_eq!(offset != 0, refs.backing_file.is_some());
            }
        }
    }

    #[test]
    fn raw_disks_are_never_probed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("looks-like-qcow2.img");
        std::fs::write(&path, v3(0, &[], Some(b"/etc/shadow"))).expect("write");
        let raw = DiskConfig::new(&path);
        assert!(check_disk(&raw).expect("raw").is_empty());
        let qcow2 = DiskConfig {
            format: DiskFormat::Qcow2,
            ..DiskConfig::new(&path)
        };
        assert!(matches!(
            check_disk(&qcow2),
            Err(ImageRefError::RefersElsewhere { .. })
        ));
        let allowed = DiskConfig {
            backing: BackingPolicy::Allow,
            ..qcow2
        };
        let chain = check_disk(&allowed).expect("allowed");
        assert_eq!(chain.len(), 1);
        assert_eq!(chain[0].backing_file.as_deref(), Some("/etc/shadow"));
        assert!(show_chain(&chain).ends_with(r#"looks-like-qcow2.img -> "/etc/shadow""#));
    }
}
