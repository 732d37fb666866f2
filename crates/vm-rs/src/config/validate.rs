//! Validation of [`VmConfig`]: names, resources, and the files it points at.

use super::VmConfig;
use std::path::PathBuf;

/// Longest VM name accepted (fits a hostname label and a socket path comfortably).
pub const MAX_NAME_LEN: usize = 63;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The VM name breaks the naming rules.
    #[error("invalid vm name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// `cpus` is zero.
    #[error("cpus must be at least 1")]
    ZeroCpus,
    /// More vCPUs than the backend supports.
    #[error("cpus {requested} exceeds the maximum of {max}")]
    TooManyCpus {
        /// Requested.
        requested: u32,
        /// Maximum.
        max: u32,
    },
    /// `memory_mib` is zero or too small to boot.
    #[error("memory must be at least {min} MiB (got {requested} MiB)")]
    TooLittleMemory {
        /// Requested MiB.
        requested: u64,
        /// Minimum MiB.
        min: u64,
    },
    /// More memory than the host has.
    #[error("memory {requested} MiB exceeds host memory of {host} MiB")]
    MemoryExceedsHost {
        /// Requested MiB.
        requested: u64,
        /// Host total MiB.
        host: u64,
    },
    /// A file the VM needs does not exist or is not a regular file.
    #[error("{what} not found: {}", path.display())]
    FileNotFound {
        /// "kernel", "initramfs", "disk", ...
        what: &'static str,
        /// The missing path.
        path: PathBuf,
    },
    /// A shared directory is not a directory.
    #[error("shared directory not found: {}", path.display())]
    DirNotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// The kernel command line contains a character that cannot be passed safely.
    #[error("kernel command line contains a control character or is longer than {max} bytes")]
    InvalidCmdline {
        /// Maximum length.
        max: usize,
    },
    /// A `--disk` specification could not be parsed.
    #[error("invalid disk spec {spec:?}: {reason}")]
    InvalidDiskSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A value is not one of the accepted words.
    #[error("invalid {field} {value:?} (expected one of: {expected})")]
    UnknownValue {
        /// Field name.
        field: &'static str,
        /// Given value.
        value: String,
        /// Accepted values.
        expected: &'static str,
    },
    /// Something else about the configuration is wrong.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl ConfigError {
    /// What kind of failure this is (see [`crate::error`]): always
    /// [`Invalid`](crate::ErrorKind::Invalid), a missing kernel or disk included (the
    /// configuration names a file that is not there).
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Invalid
    }
}

/// Smallest guest memory we let a VM boot with.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Most vCPUs we accept (QEMU microvm's limit is far above what users need here).
pub const MAX_CPUS: u32 = 255;
/// Longest kernel command line (x86 boot protocol limit).
pub const MAX_CMDLINE: usize = 2048;

/// Check a VM name: 1..=63 chars of ASCII letters, digits, `_`, `.`, `-`; not starting with
/// `-` or `.`; no `..`.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let bad = |reason| {
        Err(ConfigError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("name is longer than 63 characters");
    }
    if name.starts_with('-') || name.starts_with('.') {
        return bad("name must not start with '-' or '.'");
    }
    if name.contains("..") {
        return bad("name must not contain '..'");
    }
    if name.contains('/') {
        return bad("name must not contain '/'");
    }
    if name.chars().any(char::is_whitespace) {
        return bad("name must not contain spaces");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return bad("name may only contain letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

/// Total host memory in MiB, from `/proc/meminfo` (None when it cannot be read).
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn require_file(what: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() || !path.is_file() {
        return Err(ConfigError::FileNotFound {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

pub(super) fn validate(cfg: &VmConfig) -> Result<(), ConfigError> {
    validate_name(&cfg.name)?;
    if cfg.cpus == 0 {
        return Err(ConfigError::ZeroCpus);
    }
    if cfg.cpus > MAX_CPUS {
        return Err(ConfigError::TooManyCpus {
            requested: cfg.cpus,
            max: MAX_CPUS,
        });
    }
    if cfg.memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::TooLittleMemory {
            requested: cfg.memory_mib,
            min: MIN_MEMORY_MIB,
        });
    }
    if let Some(host) = host_memory_mib() {
        if cfg.memory_mib > host {
            return Err(ConfigError::MemoryExceedsHost {
                requested: cfg.memory_mib,
                host,
            });
        }
    }
    if cfg.cmdline.len() > MAX_CMDLINE || cfg.cmdline.chars().any(char::is_control) {
        return Err(ConfigError::InvalidCmdline { max: MAX_CMDLINE });
    }
    require_file("kernel", &cfg.kernel)?;
    if let Some(initrd) = &cfg.initramfs {
        require_file("initramfs", initrd)?;
    }
    for disk in &cfg.disks {
        require_file("disk", &disk.path)?;
    }
    for dir in &cfg.shared_dirs {
        if !dir.host_path.is_dir() {
            return Err(ConfigError::DirNotFound {
                path: dir.host_path.clone(),
            });
        }
        if dir.tag.is_empty() || dir.tag.len() > 36 || dir.tag.chars().any(|c| c == ',' || c.is_control()) {
            return Err(ConfigError::Invalid {
                field: "shared_dirs.tag",
                reason: format!(
                    "tag {:?} must be 1-36 characters without ',' or control characters",
                    dir.tag
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VmConfig;

    fn kernel_file() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().expect("tempfile")
    }

    #[test]
    fn names() {
        for good in ["a", "web-1", "A_b.c", &"x".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a/b",
            "a..b",
            "a b",
            "a\tb",
            "ü",
            "a;b",
            &"x".repeat(64),
        ] {
            assert!(
                matches!(validate_name(bad), Err(ConfigError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn resources_and_files() {
        let k = kernel_file();
        let base = VmConfig::builder("ok").kernel(k.path());
        assert!(base.clone().build().is_ok());
        assert!(matches!(base.clone().cpus(0).build(), Err(ConfigError::ZeroCpus)));
        assert!(matches!(
            base.clone().memory_mib(0).build(),
            Err(ConfigError::TooLittleMemory { .. })
        ));
        assert!(matches!(
            base.clone().memory_mib(u64::MAX / 2).build(),
            Err(ConfigError::MemoryExceedsHost { .. })
        ));
        assert!(matches!(
            VmConfig::builder("ok").kernel("/nonexistent/vmlinuz").build(),
            Err(ConfigError::FileNotFound { what: "kernel", .. })
        ));
        assert!(matches!(
            base.clone().initramfs("/nonexistent/initrd").build(),
            Err(ConfigError::FileNotFound {
                what: "initramfs",
                ..
            })
        ));
        assert!(matches!(
            base.cmdline("a\nb").build(),
            Err(ConfigError::InvalidCmdline { .. })
        ));
    }
}
