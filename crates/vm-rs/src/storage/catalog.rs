//! The image catalog: named base images (URL + where their checksum comes from) that
//! [`crate::setup::prepare_image`] can fetch and verify.
//!
//! Built in are the Ubuntu cloud images the seed crate offered (22.04 and 24.04, for the host
//! architecture) with their generic kernel and initrd (`ubuntu-24.04-kernel`,
//! `ubuntu-24.04-initrd`), verified against Ubuntu's published `SHA256SUMS` lists. Users add or override
//! entries with a JSON file (by default `$VMRS_HOME/image-catalog.json`):
//!
//! ```json
//! { "images": [
//!   { "name": "debian-12", "url": "https://example.org/debian-12-genericcloud-amd64.qcow2",
//!     "format": "qcow2", "sha256sums_url": "https://example.org/SHA256SUMS" },
//!   { "name": "my-base", "url": "http://127.0.0.1:8000/base.raw", "format": "raw",
//!     "sha256": "0123...cdef" }
//! ] }
//! ```
//!
//! Every entry needs exactly one of `sha256` (the digest itself) or `sha256sums_url` (a
//! `SHA256SUMS`-style file listing `<digest> [*]<file name>`, looked up by the URL's last path
//! segment). Unknown keys are rejected, so a typo never silently drops the checksum. A
//! `sha256sums_url` must be `https://` (or plain HTTP to a loopback address): a list fetched
//! over plain HTTP from elsewhere would vouch for whatever a man in the middle sends.
//! The sums file is trusted as far as its transport (HTTPS) is; signatures are not checked.

use super::download::{fetch_text, normalize_sha256, DownloadError};
use crate::config::DiskFormat;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Largest checksum list accepted.
const MAX_SUMS: u64 = 1 << 20;
/// Largest catalog file accepted.
const MAX_CATALOG: u64 = 4 << 20;

/// Errors from loading or resolving catalog entries.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// No entry with that name.
    #[error("no image named {name:?} in the catalog (see `vmrs images catalog`)")]
    UnknownImage {
        /// The requested name.
        name: String,
    },
    /// The catalog file could not be read.
    #[error("read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The catalog file is not valid.
    #[error("parse {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error (unknown keys included).
        #[source]
        source: serde_json::Error,
    },
    /// An entry breaks a rule.
    #[error("catalog entry {name:?}: {reason}")]
    InvalidEntry {
        /// The entry.
        name: String,
        /// Why.
        reason: String,
    },
    /// The checksum list does not mention the image's file.
    #[error("{sums_url} lists no checksum for {file}")]
    NotInSums {
        /// The list.
        sums_url: String,
        /// The file name looked up.
        file: String,
    },
    /// Fetching the checksum list failed.
    #[error("fetch checksums for {name}")]
    Fetch {
        /// The entry.
        name: String,
        /// The download error.
        #[source]
        source: DownloadError,
    },
}

impl CatalogError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            CatalogError::UnknownImage { .. } => K::NotFound,
            CatalogError::Read { source, .. } => K::of_io(source),
            CatalogError::Parse { .. } | CatalogError::InvalidEntry { .. } => K::Invalid,
            CatalogError::NotInSums { .. } => K::Backend,
            CatalogError::Fetch { source, .. } => source.kind(),
        }
    }
}

/// What a catalog entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssetKind {
    /// A disk image (default).
    #[default]
    Disk,
    /// A kernel to boot the disk with (e.g. Ubuntu's `vmlinuz-generic`).
    Kernel,
    /// The matching initial ramdisk.
    Initrd,
}

impl std::fmt::Display for AssetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AssetKind::Disk => "disk",
            AssetKind::Kernel => "kernel",
            AssetKind::Initrd => "initrd",
        })
    }
}

/// One downloadable base image (or the kernel/initrd that boots it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// Name users refer to (`ubuntu-24.04`): `[A-Za-z0-9._-]`, 1-64 characters.
    pub name: String,
    /// HTTP(S) URL of the image.
    pub url: String,
    /// Disk image, kernel or initrd (default disk).
    #[serde(default)]
    pub kind: AssetKind,
    /// Image format for disks (default qcow2, what cloud images ship as).
    #[serde(default = "default_format")]
    pub format: DiskFormat,
    /// The image's SHA-256, when known up front.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// URL of a `SHA256SUMS` file listing the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256sums_url: Option<String>,
    /// One-line description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn default_format() -> DiskFormat {
    DiskFormat::Qcow2
}

impl CatalogEntry {
    /// Check the name, URL scheme and checksum source.
    pub fn validate(&self) -> Result<(), CatalogError> {
        let bad = |reason: &str| CatalogError::InvalidEntry {
            name: self.name.chars().take(80).collect(),
            reason: reason.to_string(),
        };
        if self.name.is_empty()
            || self.name.len() > 64
            || self.name.starts_with(['.', '-'])
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(bad("name must be 1-64 characters of [A-Za-z0-9._-]"));
        }
        for u in std::iter::once(&self.url).chain(self.sha256sums_url.iter()) {
            let parsed = reqwest::Url::parse(u).map_err(|_| bad("URL does not parse"))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(bad("URLs must be http:// or https://"));
            }
        }
        if let Some(sums) = &self.sha256sums_url {
            if !is_https_or_loopback(sums) {
                return Err(bad(
                    "sha256sums_url must be https (a list fetched over plain HTTP verifies nothing), \
                     except on a loopback address",
                ));
            }
        }
        if self.file_name().is_empty() {
            return Err(bad("URL has no file name"));
        }
        match (&self.sha256, &self.sha256sums_url) {
            (Some(d), None) => {
                normalize_sha256(d).map_err(|_| bad("sha256 must be 64 hex characters"))?;
            }
            (None, Some(_)) => {}
            _ => return Err(bad("set exactly one of sha256 and sha256sums_url")),
        }
        Ok(())
    }

    /// The last path segment of the URL (the name looked up in the sums file).
    pub fn file_name(&self) -> &str {
        let path = self.url.split(['?', '#']).next().unwrap_or("");
        path.rsplit('/').next().unwrap_or("")
    }

    /// The expected SHA-256: the fixed one, or the one the sums file lists.
    pub async fn resolve_sha256(&self, client: &reqwest::Client) -> Result<String, CatalogError> {
        self.validate()?;
        if let Some(d) = &self.sha256 {
            return normalize_sha256(d).map_err(|source| CatalogError::Fetch {
                name: self.name.clone(),
                source,
            });
        }
        let sums_url = self.sha256sums_url.as_deref().unwrap_or_default();
        let text = fetch_text(client, sums_url, MAX_SUMS)
            .await
            .map_err(|source| CatalogError::Fetch {
                name: self.name.clone(),
                source,
            })?;
        find_in_sums(&text, self.file_name()).ok_or_else(|| CatalogError::NotInSums {
            sums_url: sums_url.to_string(),
            file: self.file_name().to_string(),
        })
    }
}

/// `https://...`, or `http://` to a loopback host (a local mirror or test server).
fn is_https_or_loopback(u: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(u) else {
        return false;
    };
    let Some(host) = url.host_str() else {
        return false;
    };
    match url.scheme() {
        "https" => true,
        "http" => {
            host.eq_ignore_ascii_case("localhost")
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        _ => false,
    }
}

/// Look `file` up in a `SHA256SUMS` text (`<hex>  name` or `<hex> *name` lines). Returns
/// `None` when absent or listed twice with different digests.
pub fn find_in_sums(text: &str, file: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in text.lines() {
        let Some((digest, name)) = line.trim_end().split_once(char::is_whitespace) else {
            continue;
        };
        let name = name.trim_start();
        let name = name.strip_prefix('*').unwrap_or(name);
        let name = name.strip_prefix("./").unwrap_or(name);
        if name != file {
            continue;
        }
        let d = normalize_sha256(digest).ok()?;
        match &found {
            Some(prev) if *prev != d => return None,
            _ => found = Some(d),
        }
    }
    found
}

/// On-disk catalog file shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    /// Entries to add (or override built-ins with the same name).
    pub images: Vec<CatalogEntry>,
}

/// Built-in plus user entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageCatalog {
    entries: Vec<CatalogEntry>,
}

/// Ubuntu's architecture name for the host.
fn ubuntu_arch() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "amd64"
    }
}

impl ImageCatalog {
    /// Only the built-in entries.
    pub fn builtin() -> Self {
        let arch = ubuntu_arch();
        let mut entries = Vec::new();
        for (version, codename) in [("22.04", "jammy"), ("24.04", "noble")] {
            let base = format!("https://cloud-images.ubuntu.com/releases/{version}/release");
            let stem = format!("ubuntu-{version}-server-cloudimg-{arch}");
            entries.push(CatalogEntry {
                name: format!("ubuntu-{version}"),
                url: format!("{base}/{stem}.img"),
                kind: AssetKind::Disk,
                format: DiskFormat::Qcow2,
                sha256: None,
                sha256sums_url: Some(format!("{base}/SHA256SUMS")),
                description: Some(format!(
                    "Ubuntu {version} LTS ({codename}) server cloud image, {arch}"
                )),
            });
            for (kind, suffix) in [(AssetKind::Kernel, "vmlinuz"), (AssetKind::Initrd, "initrd")] {
                entries.push(CatalogEntry {
                    name: format!("ubuntu-{version}-{kind}"),
                    url: format!("{base}/unpacked/{stem}-{suffix}-generic"),
                    kind,
                    format: DiskFormat::Raw,
                    sha256: None,
                    sha256sums_url: Some(format!("{base}/unpacked/SHA256SUMS")),
                    description: Some(format!(
                        "Ubuntu {version} LTS ({codename}) generic {kind}, {arch}"
                    )),
                });
            }
        }
        Self { entries }
    }

    /// The default user catalog file: `$VMRS_HOME/image-catalog.json`.
    pub fn default_user_file() -> PathBuf {
        crate::paths::data_dir().join("image-catalog.json")
    }

    /// Built-ins plus the entries of `path` if it exists (user entries replace built-ins of
    /// the same name).
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let mut cat = Self::builtin();
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cat),
            Err(source) => {
                return Err(CatalogError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
            Ok(md) if md.len() > MAX_CATALOG => {
                return Err(CatalogError::Read {
                    path: path.to_path_buf(),
                    source: std::io::Error::other("catalog file larger than 4 MiB"),
                })
            }
            Ok(_) => {}
        }
        let text = std::fs::read(path).map_err(|source| CatalogError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: CatalogFile = serde_json::from_slice(&text).map_err(|source| CatalogError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        for e in file.images {
            cat.insert(e)?;
        }
        Ok(cat)
    }

    /// Add or replace an entry (validated).
    pub fn insert(&mut self, entry: CatalogEntry) -> Result<(), CatalogError> {
        entry.validate()?;
        match self.entries.iter_mut().find(|e| e.name == entry.name) {
            Some(slot) => *slot = entry,
            None => self.entries.push(entry),
        }
        Ok(())
    }

    /// Look an entry up by name.
    pub fn get(&self, name: &str) -> Result<&CatalogEntry, CatalogError> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| CatalogError::UnknownImage {
                name: name.to_string(),
            })
    }

    /// All entries, built-ins first.
    pub fn entries(&self) -> &[CatalogEntry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid_ubuntu_images() {
        let c = ImageCatalog::builtin();
        let e = c.get("ubuntu-24.04").expect("entry");
        e.validate().expect("valid");
        assert_eq!(
            e.file_name(),
            format!("ubuntu-24.04-server-cloudimg-{}.img", ubuntu_arch())
        );
        assert!(e
            .sha256sums_url
            .as_deref()
            .is_some_and(|u| u.ends_with("/24.04/release/SHA256SUMS")));
        assert!(c.get("ubuntu-22.04").is_ok());
        let k = c.get("ubuntu-24.04-kernel").expect("kernel");
        assert_eq!(k.kind, AssetKind::Kernel);
        k.validate().expect("valid");
        assert!(k.url.contains("/24.04/release/unpacked/") && k.url.ends_with("-vmlinuz-generic"));
        assert!(k
            .sha256sums_url
            .as_deref()
            .is_some_and(|u| u.ends_with("/unpacked/SHA256SUMS")));
        assert_eq!(
            c.get("ubuntu-22.04-initrd").expect("initrd").kind,
            AssetKind::Initrd
        );
        assert!(matches!(c.get("fedora"), Err(CatalogError::UnknownImage { .. })));
    }

    #[test]
    fn sums_lookup() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let text = format!("{a} *disk.img\n{b}  other.img\n\n garbage\n");
        assert_eq!(find_in_sums(&text, "disk.img"), Some(a.clone()));
        assert_eq!(find_in_sums(&text, "other.img"), Some(b.clone()));
        assert_eq!(find_in_sums(&text, "missing.img"), None);
        let dup = format!("{a} *disk.img\n{b} *disk.img\n");
        assert_eq!(find_in_sums(&dup, "disk.img"), None);
    }

    proptest::proptest! {
        // Untrusted sums file: never panics; a hit is always a canonical digest.
        #[test]
        fn sums_lookup_never_panics(text in "(?s).{0,512}", file in "[a-z.*/ ]{0,12}") {
            if let Some(d) = find_in_sums(&text, &file) {
                proptest::prop_assert_eq!(d.len(), 64);
                proptest::prop_assert!(d.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            }
        }
    }

    #[test]
    fn user_file_extends_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.json");
        let d = "c".repeat(64);
        std::fs::write(
            &p,
            format!(
                r#"{{"images":[{{"name":"mine","url":"http://127.0.0.1/x.raw","format":"raw","sha256":"{d}"}},
                {{"name":"ubuntu-24.04","url":"https://mirror.example/u.img","sha256":"{d}"}}]}}"#
            ),
        )
        .expect("write");
        let c = ImageCatalog::load(&p).expect("load");
        assert_eq!(c.get("mine").expect("mine").format, DiskFormat::Raw);
        assert_eq!(
            c.get("ubuntu-24.04").expect("override").url,
            "https://mirror.example/u.img"
        );
        assert_eq!(c.entries().len(), ImageCatalog::builtin().entries().len() + 1);

        std::fs::write(
            &p,
            r#"{"images":[{"name":"x","url":"http://h/x","sha265":"ab"}]}"#,
        )
        .expect("write");
        assert!(matches!(ImageCatalog::load(&p), Err(CatalogError::Parse { .. })));
        let both = format!(
            r#"{{"images":[{{"name":"x","url":"http://h/x","sha256":"{d}","sha256sums_url":"http://h/S"}}]}}"#
        );
        std::fs::write(&p, both).expect("write");
        assert!(matches!(
            ImageCatalog::load(&p),
            Err(CatalogError::InvalidEntry { .. })
        ));
        std::fs::write(
            &p,
            r#"{"images":[{"name":"../x","url":"file:///etc/passwd","sha256sums_url":"http://h/S"}]}"#,
        )
        .expect("write");
        assert!(ImageCatalog::load(&p).is_err());
        assert!(ImageCatalog::load(&dir.path().join("absent.json")).is_ok());

        // A checksum list over plain HTTP from a remote host vouches for nothing.
        let plain =
            r#"{"images":[{"name":"x","url":"https://h/x","sha256sums_url":"http://mirror.example/S"}]}"#;
        std::fs::write(&p, plain).expect("write");
        assert!(matches!(
            ImageCatalog::load(&p),
            Err(CatalogError::InvalidEntry { .. })
        ));
        for local in ["http://127.0.0.1:8080/S", "http://[::1]/S", "http://localhost/S"] {
            let text =
                format!(r#"{{"images":[{{"name":"x","url":"http://h/x","sha256sums_url":"{local}"}}]}}"#);
            std::fs::write(&p, text).expect("write");
            assert!(ImageCatalog::load(&p).is_ok(), "{local}");
        }
    }
}
