//! Manifests and indexes, Docker v2 and OCI media types, parsed from untrusted bytes.
//!
//! A registry answers a reference with either an *index* (OCI image index / Docker manifest
//! list: one entry per platform) or an *image manifest* (one config blob + ordered layers).
//! OCI documents may omit `mediaType`; then the shape decides (`manifests` → index, `layers`
//! → image). Only `schemaVersion: 2` is accepted (Docker schema 1 is long obsolete). Every
//! digest is validated as a [`Digest`] before it is used as a file name, sizes must be
//! non-negative, and the number of layers/entries is bounded.

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::platform::Platform;

/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker image manifest (schema 2) media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media types sent in `Accept` when resolving a reference.
pub const ACCEPTED: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// Largest manifest or index accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Most layers (or index entries) accepted in one document.
pub const MAX_ENTRIES: usize = 4096;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (`+gzip`, Docker's `tar.gzip`).
    Gzip,
    /// zstd (`+zstd`).
    Zstd,
}

impl Compression {
    /// The compression a layer media type announces, or `None` (the Rust `Option`) when the
    /// media type is not a filesystem layer.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        let base = media_type.replace(".nondistributable", "").replace(
            "vnd.docker.image.rootfs.foreign.diff",
            "vnd.docker.image.rootfs.diff",
        );
        match base.as_str() {
            "application/vnd.oci.image.layer.v1.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A content descriptor: what a manifest says about one blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced blob.
    #[serde(default)]
    pub media_type: String,
    /// Content digest.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Platform (index entries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// An image manifest: one config and the layers, bottom first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManifest {
    /// Media type of the manifest itself.
    pub media_type: String,
    /// The config blob.
    pub config: Descriptor,
    /// Filesystem layers, applied in order.
    pub layers: Vec<Descriptor>,
}

/// A parsed manifest document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// An index / manifest list: one manifest per platform.
    Index {
        /// Media type of the index.
        media_type: String,
        /// The entries, in document order.
        manifests: Vec<Descriptor>,
    },
    /// A single-platform image manifest.
    Image(ImageManifest),
}

/// Why manifest bytes were rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON of the expected shape.
    #[error("manifest is not valid json of the expected shape")]
    Json(#[source] serde_json::Error),
    /// `schemaVersion` is not 2.
    #[error("unsupported manifest schema version {version}")]
    SchemaVersion {
        /// The version found.
        version: i64,
    },
    /// A media type this store does not handle.
    #[error("unsupported manifest media type {media_type:?}")]
    MediaType {
        /// The media type found.
        media_type: String,
    },
    /// More than [`MAX_ENTRIES`] layers or entries.
    #[error("manifest lists {count} entries, more than the {max} allowed")]
    TooManyEntries {
        /// How many it lists.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A layer whose media type is not a filesystem layer.
    #[error("layer {digest} has unsupported media type {media_type:?}")]
    LayerMediaType {
        /// The layer.
        digest: Digest,
        /// Its media type.
        media_type: String,
    },
}

impl ManifestError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            ManifestError::SchemaVersion { .. }
            | ManifestError::MediaType { .. }
            | ManifestError::LayerMediaType { .. } => crate::ErrorKind::Unsupported,
            ManifestError::TooLarge { .. }
            | ManifestError::Json(_)
            | ManifestError::TooManyEntries { .. } => crate::ErrorKind::Invalid,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: i64,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// Parses manifest or index bytes. `content_type` (from the HTTP reply or the parent
/// descriptor) is used only when the document itself does not say.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            size: bytes.len(),
            max: MAX_MANIFEST_BYTES,
        });
    }
    let raw: RawManifest = serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
    if raw.schema_version != 2 {
        return Err(ManifestError::SchemaVersion {
            version: raw.schema_version,
        });
    }
    let media_type = raw
        .media_type
        .clone()
        .or_else(|| content_type.map(str::to_owned))
        .unwrap_or_else(|| {
            if raw.manifests.is_some() {
                OCI_INDEX.to_owned()
            } else {
                OCI_MANIFEST.to_owned()
            }
        });
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            let manifests = raw.manifests.unwrap_or_default();
            check_count(manifests.len())?;
            Ok(Manifest::Index {
                media_type,
                manifests,
            })
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let (Some(config), Some(layers)) = (raw.config, raw.layers) else {
                return Err(ManifestError::MediaType { media_type });
            };
            check_count(layers.len())?;
            for l in &layers {
                if Compression::from_media_type(&l.media_type).is_none() {
                    return Err(ManifestError::LayerMediaType {
                        digest: l.digest.clone(),
                        media_type: l.media_type.clone(),
                    });
                }
            }
            Ok(Manifest::Image(ImageManifest {
                media_type,
                config,
                layers,
            }))
        }
        _ => Err(ManifestError::MediaType { media_type }),
    }
}

fn check_count(count: usize) -> Result<(), ManifestError> {
    if count > MAX_ENTRIES {
        return Err(ManifestError::TooManyEntries {
            count,
            max: MAX_ENTRIES,
        });
    }
    Ok(())
}

/// Picks the entry of an index that runs on `platform`; entries without a platform and
/// attestation manifests (`unknown/unknown`) are never picked.
pub fn select_platform<'a>(entries: &'a [Descriptor], platform: &Platform) -> Option<&'a Descriptor> {
    entries.iter().find(|e| {
        e.platform.as_ref().is_some_and(|p| platform.matches(p))
            && matches!(e.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST | "")
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn desc(mt: &str, data: &[u8]) -> serde_json::Value {
        serde_json::json!({"mediaType": mt, "digest": Digest::of(data).to_string(), "size": data.len()})
    }

    #[test]
    fn parses_docker_and_oci_manifests() {
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": desc("application/vnd.docker.container.image.v1+json", b"c"),
            "layers": [desc("application/vnd.docker.image.rootfs.diff.tar.gzip", b"l")],
        });
        let Manifest::Image(img) = parse(m.to_string().as_bytes(), None).unwrap() else {
            panic!("not an image")
        };
        assert_eq!(img.layers.len(), 1);
        // OCI without mediaType
        let m = serde_json::json!({
            "schemaVersion": 2,
            "config": desc("application/vnd.oci.image.config.v1+json", b"c"),
            "layers": [desc("application/vnd.oci.image.layer.v1.tar+zstd", b"l")],
        });
        assert!(matches!(
            parse(m.to_string().as_bytes(), None).unwrap(),
            Manifest::Image(_)
        ));
    }

    #[test]
    fn selects_platform_from_index() {
        let mut a = desc(OCI_MANIFEST, b"a");
        a["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        let mut b = desc(OCI_MANIFEST, b"b");
        b["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
        let m = serde_json::json!({"schemaVersion": 2, "manifests": [a, b]});
        let Manifest::Index { manifests, .. } = parse(m.to_string().as_bytes(), None).unwrap() else {
            panic!("not an index")
        };
        let amd = select_platform(&manifests, &"linux/amd64".parse().unwrap()).unwrap();
        assert_eq!(amd.digest, Digest::of(b"b"));
        let arm = select_platform(&manifests, &"linux/arm64".parse().unwrap()).unwrap();
        assert_eq!(arm.digest, Digest::of(b"a"));
        assert!(select_platform(&manifests, &"linux/s390x".parse().unwrap()).is_none());
    }

    #[test]
    fn rejects_bad_documents() {
        assert!(parse(br#"{"schemaVersion":1}"#, None).is_err());
        assert!(parse(b"not json", None).is_err());
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc("x", b"c"),
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:../../x", "size": 1}],
        });
        assert!(parse(m.to_string().as_bytes(), None).is_err());
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc("x", b"c"),
            "layers": [desc("application/vnd.cncf.helm.chart.content.v1.tar+gzip", b"l")],
        });
        assert!(matches!(
            parse(m.to_string().as_bytes(), None),
            Err(ManifestError::LayerMediaType { .. })
        ));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes, None);
        }

        #[test]
        fn generated_manifests_round_trip(
            layers in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..16), 0u8..3), 0..8),
            docker in any::<bool>(),
        ) {
            let types = ["application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar+zstd"];
            let ls: Vec<_> = layers.iter().map(|(d, t)| desc(types[*t as usize], d)).collect();
            let m = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": if docker { DOCKER_MANIFEST } else { OCI_MANIFEST },
                "config": desc("application/vnd.oci.image.config.v1+json", b"cfg"),
                "layers": ls,
            });
            let Manifest::Image(img) = parse(m.to_string().as_bytes(), None).unwrap() else {
                panic!("not an image");
            };
            prop_assert_eq!(img.layers.len(), layers.len());
            for (l, (d, _)) in img.layers.iter().zip(&layers) {
                prop_assert_eq!(&l.digest, &Digest::of(d));
                prop_assert_eq!(l.size, d.len() as u64);
            }
        }

        #[test]
        fn mutated_json_never_panics(s in "\\{\"schemaVersion\":2,\"mediaType\":\"[a-z./+0-9-]{0,40}\",\"manifests\":\\[\\{\"digest\":\"sha256:[0-9a-f]{0,70}\",\"size\":-?[0-9]{1,20}\\}\\]\\}") {
            let _ = parse(s.as_bytes(), None);
        }
    }
}
