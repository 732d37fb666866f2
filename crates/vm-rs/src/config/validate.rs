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
    /// The serial log cap is too small to hold a boot log.
    #[error("the serial log cap must be at least {min} bytes (got {requested})")]
    SerialLogCapTooSmall {
        /// Requested bytes.
        requested: u64,
        /// Minimum bytes.
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
    /// A path that must name a regular file names a directory.
    #[error("{what} {} is a directory, not a file", path.display())]
    IsADirectory {
        /// "kernel", "initramfs", "disk", ...
        what: &'static str,
        /// The directory.
        path: PathBuf,
    },
    /// A path that must name a regular file names something else (a device, a socket, a FIFO).
    #[error("{what} {} is not a regular file", path.display())]
    NotAFile {
        /// "kernel", "initramfs", "disk", ...
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A disk image is empty: the guest would see a device with no sectors.
    #[error("disk {} is empty (0 bytes)", path.display())]
    EmptyDisk {
        /// The image.
        path: PathBuf,
    },
    /// The whole kernel command line (vm-rs's parameters plus the user's) is longer than the
    /// kernel accepts; the kernel would cut it and the boot would hang without a word.
    #[error("kernel command line is {len} bytes, longer than the kernel's limit of {max} bytes")]
    CmdlineTooLong {
        /// Length of the command line the backend would pass.
        len: usize,
        /// Longest command line the kernel takes (without the terminating NUL).
        max: usize,
    },
    /// A disk image refers to host files the user did not name, or is not what its format says.
    #[error(transparent)]
    DiskImage(#[from] crate::storage::image_refs::ImageRefError),
    /// A shared directory is not a directory.
    #[error("shared directory not found: {}", path.display())]
    DirNotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// A `-v HOST:GUEST[:ro]` specification could not be parsed.
    #[error("invalid volume {spec:?}: {reason}")]
    InvalidVolumeSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// The kernel command line contains a character that cannot be passed safely.
    #[error("kernel command line contains a control character")]
    InvalidCmdline,
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
/// x86 `COMMAND_LINE_SIZE`: the kernel's command-line buffer, including the terminating NUL
/// (2048 in Debian's x86_64 kernels; the setup header's `cmdline_size` says 2047).
pub const COMMAND_LINE_SIZE: usize = 2048;

/// Offsets in the x86 boot protocol's setup header (Documentation/arch/x86/boot.rst).
const HDR_MAGIC: std::ops::Range<usize> = 0x202..0x206;
const HDR_VERSION: std::ops::Range<usize> = 0x206..0x208;
const HDR_CMDLINE_SIZE: std::ops::Range<usize> = 0x238..0x23c;

/// The longest command line (without the NUL) a bzImage accepts, from the first bytes of the
/// image: the setup header's `cmdline_size` (boot protocol 2.06 and later). `None` when the
/// bytes are not a bzImage header of that version (an ELF vmlinux, a short or garbage file).
pub fn bzimage_cmdline_size(header: &[u8]) -> Option<usize> {
    if header.get(HDR_MAGIC)? != b"HdrS" {
        return None;
    }
    let version = u16::from_le_bytes(header.get(HDR_VERSION)?.try_into().ok()?);
    if version < 0x206 {
        return None;
    }
    let size = u32::from_le_bytes(header.get(HDR_CMDLINE_SIZE)?.try_into().ok()?);
    usize::try_from(size).ok().filter(|&s| s > 0)
}

/// The longest kernel command line `kernel` accepts: its bzImage header's `cmdline_size`, or
/// `COMMAND_LINE_SIZE - 1` when the image does not say (vmlinux, old boot protocol).
/// Reads at most the first 0x240 bytes of the file.
pub fn kernel_cmdline_limit(kernel: &std::path::Path) -> usize {
    use std::io::Read;
    let fallback = COMMAND_LINE_SIZE - 1;
    let Ok(file) = std::fs::File::open(kernel) else {
        return fallback;
    };
    let mut header = Vec::with_capacity(HDR_CMDLINE_SIZE.end);
    if file
        .take(HDR_CMDLINE_SIZE.end as u64)
        .read_to_end(&mut header)
        .is_err()
    {
        return fallback;
    }
    bzimage_cmdline_size(&header).map_or(fallback, |s| s.min(fallback))
}

/// Check the whole command line a backend is about to pass to `kernel` against the kernel's
/// limit ([`kernel_cmdline_limit`]). Backends call this before starting anything.
pub fn check_kernel_cmdline(kernel: &std::path::Path, cmdline: &str) -> Result<(), ConfigError> {
    let max = kernel_cmdline_limit(kernel);
    if cmdline.len() > max {
        return Err(ConfigError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

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

/// Total host memory in MiB (None when it cannot be read; see [`crate::host::memory_mib`]).
pub fn host_memory_mib() -> Option<u64> {
    crate::host::memory_mib()
}

/// Check that `path` names a regular file (following symlinks); returns its size.
fn require_file(what: &'static str, path: &std::path::Path) -> Result<u64, ConfigError> {
    let path_buf = || path.to_path_buf();
    if path.as_os_str().is_empty() {
        return Err(ConfigError::FileNotFound {
            what,
            path: path_buf(),
        });
    }
    let meta = std::fs::metadata(path).map_err(|_| ConfigError::FileNotFound {
        what,
        path: path_buf(),
    })?;
    if meta.is_dir() {
        return Err(ConfigError::IsADirectory {
            what,
            path: path_buf(),
        });
    }
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            what,
            path: path_buf(),
        });
    }
    Ok(meta.len())
}

/// Check one disk: a non-empty regular file that names no other host file unless it allows it
/// (see [`crate::storage::image_refs`]). Used for the config's disks and for hot-plugged ones.
pub fn validate_disk(disk: &super::DiskConfig) -> Result<(), ConfigError> {
    // QEMU reads a file name starting with `json:` as block-driver options (any host file, or
    // a network export). The manager makes paths absolute, which defuses it; refuse it plainly
    // wherever it reaches validation as written.
    use std::os::unix::ffi::OsStrExt;
    if disk.path.as_os_str().as_bytes().starts_with(b"json:") {
        return Err(ConfigError::Invalid {
            field: "disks.path",
            reason: format!(
                "{} is a QEMU json: block-driver description, not a file",
                disk.path.display()
            ),
        });
    }
    if require_file("disk", &disk.path)? == 0 {
        return Err(ConfigError::EmptyDisk {
            path: disk.path.clone(),
        });
    }
    crate::storage::image_refs::check_disk(disk)?;
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
    if let Some(requested) = cfg.serial_log_max.filter(|&m| m < super::MIN_SERIAL_LOG_MAX) {
        return Err(ConfigError::SerialLogCapTooSmall {
            requested,
            min: super::MIN_SERIAL_LOG_MAX,
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
    if cfg.cmdline.chars().any(char::is_control) {
        return Err(ConfigError::InvalidCmdline);
    }
    require_file("kernel", &cfg.kernel)?;
    // The user's part alone must fit; the backend checks the whole line before it starts.
    let max = kernel_cmdline_limit(&cfg.kernel);
    if cfg.cmdline.len() > max {
        return Err(ConfigError::CmdlineTooLong {
            len: cfg.cmdline.len(),
            max,
        });
    }
    if let Some(initrd) = &cfg.initramfs {
        require_file("initramfs", initrd)?;
    }
    for disk in &cfg.disks {
        validate_disk(disk)?;
    }
    validate_shared_dirs(&cfg.shared_dirs)?;
    Ok(())
}

/// Longest virtio-fs tag (the device's `tag` field is 36 bytes).
pub const MAX_TAG_LEN: usize = 36;
/// Most shared directories one VM takes (each is a device and a virtiofsd process).
pub const MAX_SHARES: usize = 8;

fn validate_shared_dirs(dirs: &[crate::config::SharedDir]) -> Result<(), ConfigError> {
    let invalid = |field, reason: String| ConfigError::Invalid { field, reason };
    let mut tags = std::collections::HashSet::new();
    let mut guests = std::collections::HashSet::new();
    if dirs.len() > MAX_SHARES {
        return Err(invalid(
            "shared_dirs",
            format!("{} shared directories; at most {MAX_SHARES}", dirs.len()),
        ));
    }
    for dir in dirs {
        if dir.host_path.to_str().is_none() {
            return Err(invalid(
                "shared_dirs.host_path",
                format!("{} is not valid utf-8", dir.host_path.display()),
            ));
        }
        if !dir.host_path.is_dir() {
            return Err(ConfigError::DirNotFound {
                path: dir.host_path.clone(),
            });
        }
        if dir.tag.is_empty()
            || dir.tag.len() > MAX_TAG_LEN
            || dir
                .tag
                .chars()
                .any(|c| c == ',' || c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "shared_dirs.tag",
                format!(
                    "tag {:?} must be 1-{MAX_TAG_LEN} bytes without ',', whitespace or control characters",
                    dir.tag
                ),
            ));
        }
        if !tags.insert(dir.tag.as_str()) {
            return Err(invalid(
                "shared_dirs.tag",
                format!("tag {:?} is used twice", dir.tag),
            ));
        }
        if let Some(g) = &dir.guest_path {
            let text = g.to_str().unwrap_or_default();
            let normal = g.is_absolute()
                && text.len() <= 1024
                && !text.chars().any(char::is_control)
                && g.components()
                    .skip(1)
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
                && g.parent().is_some();
            if g.to_str().is_none() || !normal {
                return Err(invalid(
                    "shared_dirs.guest_path",
                    format!(
                        "{:?} must be an absolute path other than / without '.' or '..' components or control characters",
                        g
                    ),
                ));
            }
            let key = g.components().collect::<PathBuf>();
            if !guests.insert(key) {
                return Err(invalid(
                    "shared_dirs.guest_path",
                    format!("{} is mounted twice", g.display()),
                ));
            }
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
            base.clone().cmdline("a\nb").build(),
            Err(ConfigError::InvalidCmdline)
        ));
        // Not a bzImage: the x86 default applies to the user's words.
        assert!(matches!(
            base.clone().cmdline("x".repeat(COMMAND_LINE_SIZE)).build(),
            Err(ConfigError::CmdlineTooLong { max: 2047, .. })
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            VmConfig::builder("ok").kernel(dir.path()).build(),
            Err(ConfigError::IsADirectory { what: "kernel", .. })
        ));
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").expect("write");
        assert!(matches!(
            base.clone().disk(crate::DiskConfig::new(&empty)).build(),
            Err(ConfigError::EmptyDisk { .. })
        ));
        let json = crate::DiskConfig::new(r#"json:{"driver":"file","filename":"/etc/shadow"}"#);
        assert!(matches!(
            base.clone().disk(json).build(),
            Err(ConfigError::Invalid {
                field: "disks.path",
                ..
            })
        ));
        let one = dir.path().join("one.img");
        std::fs::write(&one, [0u8; 512]).expect("write");
        assert!(base.disk(crate::DiskConfig::new(&one)).build().is_ok());
    }

    #[test]
    fn bzimage_header_gives_the_limit() {
        let mut h = vec![0u8; 0x240];
        assert_eq!(bzimage_cmdline_size(&h), None);
        h[0x202..0x206].copy_from_slice(b"HdrS");
        h[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        h[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        assert_eq!(bzimage_cmdline_size(&h), Some(2047));
        // Older boot protocols have no cmdline_size field; short input is not a header.
        h[0x206..0x208].copy_from_slice(&0x205u16.to_le_bytes());
        assert_eq!(bzimage_cmdline_size(&h), None);
        assert_eq!(bzimage_cmdline_size(&h[..0x210]), None);
        assert_eq!(bzimage_cmdline_size(b""), None);
    }

    #[test]
    fn a_kernel_claiming_a_huge_limit_is_capped() {
        let mut h = vec![0u8; 0x240];
        h[0x202..0x206].copy_from_slice(b"HdrS");
        h[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        h[0x238..0x23c].copy_from_slice(&u32::MAX.to_le_bytes());
        let f = tempfile::NamedTempFile::new().expect("tempfile");
        std::fs::write(f.path(), &h).expect("write");
        assert_eq!(kernel_cmdline_limit(f.path()), COMMAND_LINE_SIZE - 1);
        assert!(check_kernel_cmdline(f.path(), &"y".repeat(2047)).is_ok());
        assert!(matches!(
            check_kernel_cmdline(f.path(), &"y".repeat(2048)),
            Err(ConfigError::CmdlineTooLong { len: 2048, max: 2047 })
        ));
    }
}
