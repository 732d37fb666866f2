//! TLS trust for registries: which registries speak HTTPS and which extra CAs they may chain to.
//!
//! By default a registry is reached over HTTPS and must present a certificate that chains to the
//! webpki roots; loopback registries (`localhost`, `127.0.0.1`, `[::1]`) and
//! [`super::PullOptions::insecure_registries`] are reached over plain HTTP. A [`RegistryTls`]
//! entry (like Docker's `certs.d/<host>/ca.crt`) names a registry that is always reached over
//! HTTPS — also on loopback — and adds CA certificates it is trusted under. Nothing here turns
//! verification off.

use std::path::{Path, PathBuf};

/// TLS settings for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryTls {
    /// The registry as written in image references (`host` or `host:port`).
    pub registry: String,
    /// PEM files of CA certificates to trust for it, besides the webpki roots. Each file may
    /// hold several certificates.
    pub ca_certificates: Vec<PathBuf>,
}

impl RegistryTls {
    /// HTTPS for `registry`, trusting the CA certificates in the PEM file `ca`.
    pub fn with_ca(registry: impl Into<String>, ca: impl Into<PathBuf>) -> Self {
        Self {
            registry: registry.into(),
            ca_certificates: vec![ca.into()],
        }
    }
}

/// A CA certificate file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read CA certificate file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no PEM certificate.
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A PEM block's body is not base64.
    #[error("certificate #{index} in {} is not valid base64", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which block (from 1).
        index: usize,
        /// Cause.
        #[source]
        source: base64::DecodeError,
    },
    /// A PEM block does not hold a DER certificate (an ASN.1 SEQUENCE).
    #[error("certificate #{index} in {} is not a DER certificate", path.display())]
    NotDer {
        /// The file.
        path: PathBuf,
        /// Which block (from 1).
        index: usize,
    },
}

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";
/// A CA bundle larger than this is not a CA bundle.
const MAX_BUNDLE: u64 = 4 << 20;

/// The `BEGIN CERTIFICATE` … `END CERTIFICATE` blocks of a PEM text, each with its markers.
pub(crate) fn pem_blocks(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        out.push(&rest[start..end]);
        rest = &rest[end..];
    }
    out
}

/// The DER bytes of one PEM block (markers included).
fn pem_to_der(block: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine;
    let body: String = block
        .trim_start_matches(BEGIN)
        .trim_end_matches(END)
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body)
}

/// Read the CA certificates of `file`, decoded to DER (the TLS stack parses them when the
/// client is built, see [`super::PullError::Client`]).
fn load_file(path: &Path) -> Result<Vec<oci_client::client::Certificate>, TlsError> {
    use std::io::Read;
    let read = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_BUNDLE)
        .read_to_string(&mut text)
        .map_err(read)?;
    let blocks = pem_blocks(&text);
    if blocks.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    blocks
        .into_iter()
        .enumerate()
        .map(|(i, block)| {
            let der = pem_to_der(block).map_err(|source| TlsError::Invalid {
                path: path.to_path_buf(),
                index: i + 1,
                source,
            })?;
            if der.first() != Some(&0x30) {
                return Err(TlsError::NotDer {
                    path: path.to_path_buf(),
                    index: i + 1,
                });
            }
            Ok(oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Der,
                data: der,
            })
        })
        .collect()
}

/// The extra roots for a pull that talks to `registries` (the reference's registry and the one
/// it resolves to).
pub(crate) fn extra_roots(
    settings: &[RegistryTls],
    registries: &[&str],
) -> Result<Vec<oci_client::client::Certificate>, TlsError> {
    let mut roots = Vec::new();
    for s in settings
        .iter()
        .filter(|s| registries.contains(&s.registry.as_str()))
    {
        for file in &s.ca_certificates {
            roots.extend(load_file(file)?);
        }
    }
    Ok(roots)
}

/// Whether `registry` has a TLS entry (and so is reached over HTTPS even on loopback).
pub(crate) fn wants_tls(settings: &[RegistryTls], registry: &str) -> bool {
    settings.iter().any(|s| s.registry == registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_blocks_are_split_and_junk_ignored() {
        let text = format!("junk\n{BEGIN}\nAAAA\n{END}\nmore\n{BEGIN}\nBBBB\n{END}\n{BEGIN}\nunterminated");
        let blocks = pem_blocks(&text);
        assert_eq!(blocks.len(), 2);
        assert!(blocks[0].contains("AAAA") && blocks[1].contains("BBBB"));
        assert!(pem_blocks("").is_empty());
        assert!(pem_blocks(END).is_empty());
    }

    #[test]
    fn unusable_files_are_typed_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        assert!(matches!(load_file(&missing), Err(TlsError::Read { .. })));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here").expect("write");
        assert!(matches!(load_file(&empty), Err(TlsError::NoCertificate { .. })));
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, format!("{BEGIN}\n!!!not base64!!!\n{END}\n")).expect("write");
        assert!(matches!(load_file(&bad), Err(TlsError::Invalid { index: 1, .. })));
        let not_der = dir.path().join("notder.pem");
        std::fs::write(&not_der, format!("{BEGIN}\naGVsbG8=\n{END}\n")).expect("write");
        assert!(matches!(
            load_file(&not_der),
            Err(TlsError::NotDer { index: 1, .. })
        ));
        let settings = [RegistryTls::with_ca("r.example:443", &bad)];
        // Only the registries of this pull load their files.
        assert!(extra_roots(&settings, &["other:5000"]).expect("none").is_empty());
        assert!(extra_roots(&settings, &["r.example:443"]).is_err());
        assert!(wants_tls(&settings, "r.example:443"));
        assert!(!wants_tls(&settings, "127.0.0.1:5000"));
    }
}
