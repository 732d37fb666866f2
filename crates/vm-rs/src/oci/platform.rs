//! Platforms (`linux/amd64`, `linux/arm64/v8`) and choosing one from an image index.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An OS/architecture(/variant) triple as used in image indexes and configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture in Go naming, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// Architecture variant, e.g. `v8` for arm64, `v7` for arm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// A platform string that is not `os/arch[/variant]`.
#[derive(Debug, thiserror::Error)]
#[error("invalid platform {platform:?} (expected os/arch[/variant])")]
#[non_exhaustive]
pub struct PlatformError {
    /// The string as given.
    pub platform: String,
}

impl Platform {
    /// The platform of this host (`linux/amd64` on x86-64 Linux).
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        Self {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }

    /// Whether an index entry for `other` can run here: os and architecture equal, and the
    /// variant equal when this platform names one (`arm64` and `arm64/v8` are the same).
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        match (&self.variant, &other.variant) {
            (Some(a), Some(b)) => a == b,
            (Some(a), None) => self.architecture == "arm64" && a == "v8",
            (None, _) => true,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PlatformError {
            platform: s.to_owned(),
        };
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Self {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Self {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: Some((*variant).to_owned()),
            }),
            _ => Err(err()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_match() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        let plain: Platform = "linux/arm64".parse().unwrap();
        assert!(p.matches(&plain));
        assert!(plain.matches(&p));
        assert!(!plain.matches(&"linux/amd64".parse().unwrap()));
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux/amd64/v1/x".parse::<Platform>().is_err());
        assert!("linux/../x".parse::<Platform>().is_err());
        assert_eq!(Platform::host().os, std::env::consts::OS);
    }
}
