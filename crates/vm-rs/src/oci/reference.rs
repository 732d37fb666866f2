//! Image references: `alpine`, `alpine:3.20`, `docker.io/library/alpine`,
//! `ghcr.io/o/r:tag`, `localhost:5000/x/y@sha256:…`.
//!
//! Parsing follows the distribution reference grammar (via `oci-client`): a name without a
//! registry is on Docker Hub, a single-component Hub name is under `library/`, and a missing
//! tag means `latest`. [`ImageReference::canonical`] is the fully qualified form used as the
//! key in the store, so `alpine` and `docker.io/library/alpine:latest` name the same image.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::digest::Digest;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    inner: oci_client::Reference,
}

/// Why a reference string was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReferenceError {
    /// The string does not follow the reference grammar.
    #[error("invalid image reference {reference:?}")]
    Invalid {
        /// The reference as given.
        reference: String,
        /// What the parser said.
        #[source]
        source: oci_client::ParseError,
    },
    /// The digest part names an algorithm or form the store does not accept.
    #[error("invalid digest in image reference {reference:?}")]
    Digest {
        /// The reference as given.
        reference: String,
        /// Why the digest was rejected.
        #[source]
        source: super::digest::DigestError,
    },
}

impl ReferenceError {
    /// What kind of failure this is (see [`crate::error`]): always invalid input.
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Invalid
    }
}

impl ImageReference {
    /// Parses and normalises a reference.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let inner = oci_client::Reference::try_from(s).map_err(|source| ReferenceError::Invalid {
            reference: s.to_owned(),
            source,
        })?;
        // The canonical form is the store's key and what a later command names the image by:
        // it must itself be a valid reference. (oci-client takes an upper-case first component
        // as a registry host, `UPPER/x`, yet rejects the `docker.io/UPPER/x` it turns it into.)
        oci_client::Reference::try_from(inner.whole()).map_err(|source| ReferenceError::Invalid {
            reference: s.to_owned(),
            source,
        })?;
        if let Some(d) = inner.digest() {
            Digest::parse(d).map_err(|source| ReferenceError::Digest {
                reference: s.to_owned(),
                source,
            })?;
        }
        Ok(Self { inner })
    }

    /// The registry as written in the reference (`docker.io`, `localhost:5000`).
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The host actually contacted (`index.docker.io` for Docker Hub).
    pub fn resolved_registry(&self) -> &str {
        self.inner.resolve_registry()
    }

    /// The repository path (`library/alpine`).
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The tag, if any (`latest` when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// The pinned digest, if the reference has one.
    pub fn digest(&self) -> Option<Digest> {
        self.inner.digest().and_then(|d| Digest::parse(d).ok())
    }

    /// The fully qualified form, e.g. `docker.io/library/alpine:3.20`; the store's key.
    pub fn canonical(&self) -> String {
        self.inner.whole()
    }

    /// The same repository pinned to `digest` (no tag).
    pub fn with_digest(&self, digest: &Digest) -> Self {
        Self {
            inner: oci_client::Reference::with_digest(
                self.inner.registry().to_owned(),
                self.inner.repository().to_owned(),
                digest.to_string(),
            ),
        }
    }

    /// Whether the registry host is a loopback name or address (plain HTTP is allowed there).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(self.registry())
    }

    /// The underlying `oci-client` reference.
    pub(crate) fn as_oci(&self) -> &oci_client::Reference {
        &self.inner
    }
}

/// Whether `registry` (`host`, `host:port`, `[v6]:port`) names this machine.
pub(crate) fn is_loopback_host(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

impl FromStr for ImageReference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalises_docker_hub_names() {
        let r = ImageReference::parse("alpine").unwrap();
        assert_eq!(r.canonical(), "docker.io/library/alpine:latest");
        assert_eq!(r.resolved_registry(), "index.docker.io");
        let r = ImageReference::parse("alpine:3.20").unwrap();
        assert_eq!(r.canonical(), "docker.io/library/alpine:3.20");
        let r = ImageReference::parse("docker.io/library/alpine").unwrap();
        assert_eq!(r.canonical(), "docker.io/library/alpine:latest");
        let r = ImageReference::parse("ghcr.io/o/r:tag").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("ghcr.io", "o/r", Some("tag"))
        );
        let d = Digest::of(b"x");
        let r = ImageReference::parse(&format!("localhost:5000/x/y@{d}")).unwrap();
        assert_eq!(r.digest(), Some(d.clone()));
        assert!(r.is_loopback());
        assert_eq!(r.canonical(), format!("localhost:5000/x/y@{d}"));
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Alpine",
            "a b",
            "x@sha256:zz",
            "x:tag:tag",
            "/leading",
            "a//b",
            // Found by the oci_reference fuzz target: accepted, but its canonical form
            // `docker.io/UPPER/case:latest` did not parse.
            "UPPER/case",
        ] {
            assert!(ImageReference::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ImageReference::parse(&format!("x@sha512:{}", "a".repeat(128))).is_err());
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("localhost"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("ghcr.io"));
        assert!(!is_loopback_host("10.0.0.1:5000"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = ImageReference::parse(&s);
        }

        #[test]
        fn canonical_round_trips(
            host in prop::option::of("[a-z][a-z0-9]{0,8}(\\.[a-z]{2,4})?(:[0-9]{2,5})?"),
            path in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}",
            tag in prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
        ) {
            let mut s = String::new();
            if let Some(h) = &host { s.push_str(h); s.push('/'); }
            s.push_str(&path);
            if let Some(t) = &tag { s.push(':'); s.push_str(t); }
            if let Ok(r) = ImageReference::parse(&s) {
                let again = ImageReference::parse(&r.canonical()).unwrap();
                prop_assert_eq!(again.canonical(), r.canonical());
                prop_assert_eq!(again.repository(), r.repository());
                if let Some(t) = &tag { prop_assert_eq!(r.tag(), Some(t.as_str())); }
            }
        }
    }
}
