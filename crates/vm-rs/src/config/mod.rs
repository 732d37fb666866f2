//! VM configuration: the data types a caller fills in ([`VmConfig`] and its parts) and the
//! builder. Validation lives in the private `validate` module, apart from the data; its rules are
//! documented on [`ConfigError`] and [`validate_name`].
//!
//! A `VmConfig` is what the caller *asks for*; the manager persists it as `config.json` in the VM's
//! directory so a later process can show and restart the VM.

mod network;
mod validate;

pub use network::{
    AddrParseError, GuestAddress, Ipv4Cidr, MacAddr, NetworkAttachment, PortForward, Protocol, UserNat,
};
pub use validate::{
    bzimage_cmdline_size, check_kernel_cmdline, host_memory_mib, kernel_cmdline_limit, validate_disk,
    validate_name, ConfigError, COMMAND_LINE_SIZE, MAX_NAME_LEN, MAX_SHARES, MAX_TAG_LEN,
};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which hypervisor backend runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Pick the best backend available on this host (see [`crate::driver::detect`]).
    #[default]
    Auto,
    /// QEMU, driven over QMP.
    Qemu,
    /// Cloud Hypervisor, driven over its REST API.
    CloudHypervisor,
    /// Firecracker, driven over its REST API.
    Firecracker,
    /// Apple's Virtualization.framework (macOS), run by a per-VM `vmrs-vz` host process.
    Vz,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Qemu => "qemu",
            BackendKind::CloudHypervisor => "cloud-hypervisor",
            BackendKind::Firecracker => "firecracker",
            BackendKind::Vz => "vz",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "qemu" => Ok(Self::Qemu),
            "cloud-hypervisor" | "ch" => Ok(Self::CloudHypervisor),
            "firecracker" | "fc" => Ok(Self::Firecracker),
            "vz" => Ok(Self::Vz),
            other => Err(ConfigError::UnknownValue {
                field: "backend",
                value: other.to_string(),
                expected: "auto, qemu, cloud-hypervisor, firecracker, vz",
            }),
        }
    }
}

/// CPU acceleration for the QEMU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Probe KVM and use it when it is usable, else fall back to TCG (logged with the reason).
    #[default]
    Auto,
    /// Hardware virtualization through `/dev/kvm`; fails if KVM is not usable.
    Kvm,
    /// QEMU's software emulation; slow but works everywhere.
    Tcg,
    /// Apple's Hypervisor.framework (macOS hosts: QEMU `-accel hvf`; what VZ always uses).
    Hvf,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Hvf => "hvf",
        })
    }
}

impl std::str::FromStr for Accel {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            "hvf" => Ok(Self::Hvf),
            other => Err(ConfigError::UnknownValue {
                field: "accel",
                value: other.to_string(),
                expected: "auto, kvm, tcg, hvf",
            }),
        }
    }
}

/// On-disk format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain image, byte for byte the block device.
    #[default]
    Raw,
    /// QEMU copy-on-write format (may have a backing file).
    Qcow2,
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        })
    }
}

/// Host page-cache behaviour for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Host page cache used, guest flushes honoured (QEMU `writeback`).
    #[default]
    Writeback,
    /// Bypass the host page cache (`O_DIRECT`).
    None,
    /// Ignore guest flushes: fastest, unsafe on host crash.
    Unsafe,
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
            CacheMode::Unsafe => "unsafe",
        })
    }
}

/// Whether a qcow2 disk may refer to other host files (a backing file, an external data file).
/// See [`crate::storage::image_refs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackingPolicy {
    /// Refuse an image that names any other host file (the default).
    #[default]
    Deny,
    /// Let QEMU open the files the image names; the chain is logged when the VM starts.
    Allow,
}

/// A block device attached to the VM as virtio-blk (`/dev/vda`, `/dev/vdb`, ... in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Image file on the host.
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Image format (default raw).
    #[serde(default)]
    pub format: DiskFormat,
    /// Host cache mode (default writeback).
    #[serde(default)]
    pub cache: CacheMode,
    /// Whether the image may refer to other host files (default deny; overlays vm-rs creates
    /// with [`crate::storage::create_overlay`] come back with allow).
    #[serde(default)]
    pub backing: BackingPolicy,
}

impl DiskConfig {
    /// A writable raw disk.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            format: DiskFormat::Raw,
            cache: CacheMode::Writeback,
            backing: BackingPolicy::Deny,
        }
    }

    /// Parse the CLI form
    /// `PATH[,ro][,format=raw|qcow2][,cache=writeback|none|unsafe][,backing=deny|allow]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(ConfigError::InvalidDiskSpec {
                spec: spec.to_string(),
                reason: "empty path".into(),
            });
        }
        let mut disk = DiskConfig::new(path);
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" || opt == "readonly" => disk.read_only = true,
                None if opt == "rw" => disk.read_only = false,
                Some(("format", v)) => {
                    disk.format = match v {
                        "raw" => DiskFormat::Raw,
                        "qcow2" => DiskFormat::Qcow2,
                        _ => {
                            return Err(ConfigError::InvalidDiskSpec {
                                spec: spec.to_string(),
                                reason: format!("unknown format {v:?} (expected raw or qcow2)"),
                            })
                        }
                    }
                }
                Some(("cache", v)) => {
                    disk.cache = match v {
                        "writeback" => CacheMode::Writeback,
                        "none" => CacheMode::None,
                        "unsafe" => CacheMode::Unsafe,
                        _ => {
                            return Err(ConfigError::InvalidDiskSpec {
                                spec: spec.to_string(),
                                reason: format!(
                                    "unknown cache mode {v:?} (expected writeback, none or unsafe)"
                                ),
                            })
                        }
                    }
                }
                Some(("backing", v)) => {
                    disk.backing = match v {
                        "deny" => BackingPolicy::Deny,
                        "allow" => BackingPolicy::Allow,
                        _ => {
                            return Err(ConfigError::InvalidDiskSpec {
                                spec: spec.to_string(),
                                reason: format!("unknown backing policy {v:?} (expected deny or allow)"),
                            })
                        }
                    }
                }
                _ => {
                    return Err(ConfigError::InvalidDiskSpec {
                        spec: spec.to_string(),
                        reason: format!("unknown option {opt:?}"),
                    })
                }
            }
        }
        Ok(disk)
    }
}

/// A host directory shared into the guest over virtio-fs (docker's `-v HOST:GUEST[:ro]`).
///
/// A virtiofsd sidecar serves `host_path` to the guest as the virtio-fs device `tag`; the guest
/// init mounts it at `guest_path` (read-only when asked) before the guest is ready, and a share
/// that cannot be mounted fails the VM. Without `guest_path` the share is only offered: the
/// guest mounts it itself (`mount -t virtiofs TAG /mnt`).
///
/// `read_only` is enforced by the daemon (`virtiofsd --readonly`), not only by the guest's
/// mount options: a guest that remounts the share read-write still cannot write.
///
/// ```
/// use vm_rs::SharedDir;
/// let d = SharedDir::parse_volume("/srv/data:/data:ro", 0).expect("spec");
/// assert_eq!(d.guest_path.as_deref(), Some(std::path::Path::new("/data")));
/// assert!(d.read_only);
/// assert_eq!(d.tag, "vmrs0");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedDir {
    /// Directory on the host (made absolute before the VM is created).
    pub host_path: PathBuf,
    /// virtio-fs tag the guest mounts (`mount -t virtiofs TAG /mnt`): 1-36 bytes without
    /// whitespace, `,` or control characters, unique within the VM.
    pub tag: String,
    /// Share read-only (enforced by the daemon).
    #[serde(default)]
    pub read_only: bool,
    /// Where the guest init mounts it: absolute, not `/`, without `.`/`..` components or
    /// control characters, unique within the VM. `None`: not mounted by the init.
    #[serde(default)]
    pub guest_path: Option<PathBuf>,
}

impl SharedDir {
    /// Share `host` at `guest` in the guest, read-write, with tag `tag`.
    pub fn new(host: impl Into<PathBuf>, guest: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        SharedDir {
            host_path: host.into(),
            tag: tag.into(),
            read_only: false,
            guest_path: Some(guest.into()),
        }
    }

    /// The tag vm-rs gives share `index` of a VM when the caller names none (`vmrs<index>`).
    pub fn default_tag(index: usize) -> String {
        format!("vmrs{index}")
    }

    /// Parse docker's volume syntax `HOST:GUEST[:ro|:rw]` for share `index` (its tag is
    /// [`default_tag`](Self::default_tag)). A relative `HOST` is resolved against the current
    /// directory; both paths must be non-empty, and `GUEST` absolute. The host directory's
    /// existence is checked by validation, before anything starts.
    pub fn parse_volume(spec: &str, index: usize) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::InvalidVolumeSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let mut parts: Vec<&str> = spec.split(':').collect();
        let read_only = match parts.last().copied() {
            Some("ro") if parts.len() == 3 => {
                parts.pop();
                true
            }
            Some("rw") if parts.len() == 3 => {
                parts.pop();
                false
            }
            _ => false,
        };
        let [host, guest] = parts[..] else {
            return Err(bad("expected HOST:GUEST[:ro|:rw] (paths cannot contain ':')"));
        };
        if host.is_empty() {
            return Err(bad("the host path is empty"));
        }
        if !guest.starts_with('/') {
            return Err(bad("the guest path must be absolute"));
        }
        let mut host_path = PathBuf::from(host);
        if host_path.is_relative() {
            host_path = std::path::absolute(&host_path).map_err(|e| bad(&e.to_string()))?;
        }
        Ok(SharedDir {
            host_path,
            tag: Self::default_tag(index),
            read_only,
            guest_path: Some(PathBuf::from(guest)),
        })
    }
}

/// Everything needed to boot one VM.
///
/// Fields are public; [`VmConfig::builder`] reads better for most callers. Defaults: 1 vCPU,
/// 256 MiB, no disks, no network, backend and acceleration chosen automatically.
///
/// ```
/// use vm_rs::VmConfig;
/// let cfg = VmConfig::builder("web-1")
///     .kernel("/var/lib/vmrs/assets/vmlinuz")
///     .initramfs("/var/lib/vmrs/assets/initramfs.img")
///     .cpus(2)
///     .memory_mib(512)
///     .build_unchecked();
/// assert_eq!(cfg.cpus, 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Unique name: 1-63 characters of `[A-Za-z0-9_.-]`, not starting with `-` or `.`.
    pub name: String,
    /// Number of vCPUs (default 1).
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Guest memory in MiB (default 256).
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Kernel image (bzImage for QEMU; see the Cloud Hypervisor backend for vmlinux).
    pub kernel: PathBuf,
    /// Initial ramdisk (newc cpio, optionally compressed).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended to the backend's console arguments.
    #[serde(default)]
    pub cmdline: String,
    /// Block devices, in guest order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Network attachments, in guest order (`eth0`, `eth1`, ...).
    #[serde(default)]
    pub networks: Vec<NetworkAttachment>,
    /// Shared directories (virtio-fs).
    #[serde(default)]
    pub shared_dirs: Vec<SharedDir>,
    /// Where the serial console is written; default `serial.log` in the VM directory.
    #[serde(default)]
    pub serial_log: Option<PathBuf>,
    /// Cap of the serial log in bytes (default [`crate::console::capture::DEFAULT_MAX`],
    /// 8 MiB; at least [`MIN_SERIAL_LOG_MAX`]). Output past it is dropped, keeping the head
    /// and, once the VM ends, the last 64 KiB (see [`crate::console::capture`]); QEMU only,
    /// Cloud Hypervisor writes the log itself without a cap.
    #[serde(default)]
    pub serial_log_max: Option<u64>,
    /// Backend to use (default auto).
    #[serde(default)]
    pub backend: BackendKind,
    /// Acceleration for QEMU (default auto; `VMRS_ACCEL` overrides auto).
    #[serde(default)]
    pub accel: Accel,
    /// How the host reaches the guest agent (default: the backend's first transport —
    /// virtio-serial on QEMU, vsock where it is the only one). A transport the backend lacks
    /// is refused before anything starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_transport: Option<crate::devices::AgentTransport>,
}

/// Smallest serial log cap accepted: the boot log up to the readiness marker must fit.
pub const MIN_SERIAL_LOG_MAX: u64 = 64 << 10;

impl VmConfig {
    /// The serial log's cap in bytes (the configured one, or the default).
    pub fn serial_log_max(&self) -> u64 {
        self.serial_log_max
            .unwrap_or(crate::console::capture::DEFAULT_MAX)
    }
}

fn default_cpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}

impl VmConfig {
    /// Start a builder for a VM called `name`.
    pub fn builder(name: impl Into<String>) -> VmConfigBuilder {
        VmConfigBuilder {
            config: VmConfig {
                name: name.into(),
                cpus: default_cpus(),
                memory_mib: default_memory(),
                kernel: PathBuf::new(),
                initramfs: None,
                cmdline: String::new(),
                disks: Vec::new(),
                networks: Vec::new(),
                shared_dirs: Vec::new(),
                serial_log: None,
                serial_log_max: None,
                backend: BackendKind::Auto,
                accel: Accel::Auto,
                agent_transport: None,
            },
        }
    }

    /// Resolve relative file paths (kernel, initramfs, disks, shared dirs, serial log) against
    /// the current directory. The VMM runs in the VM's own directory, so a relative path would
    /// name another file there — and QEMU would read a relative disk path such as `json:{...}`
    /// as options. The manager calls this before persisting a configuration.
    pub fn make_paths_absolute(&mut self) {
        fn abs(p: &mut PathBuf) {
            if !p.as_os_str().is_empty() && p.is_relative() {
                if let Ok(a) = std::path::absolute(&*p) {
                    *p = a;
                }
            }
        }
        abs(&mut self.kernel);
        if let Some(i) = self.initramfs.as_mut() {
            abs(i);
        }
        for d in &mut self.disks {
            abs(&mut d.path);
        }
        for d in &mut self.shared_dirs {
            abs(&mut d.host_path);
        }
        if let Some(s) = self.serial_log.as_mut() {
            abs(s);
        }
    }

    /// Check the configuration against the naming and resource rules and the host (files exist,
    /// memory fits).
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::validate(self)
    }
}

/// Builder for [`VmConfig`]; [`build`](Self::build) validates.
#[derive(Debug, Clone)]
pub struct VmConfigBuilder {
    config: VmConfig,
}

impl VmConfigBuilder {
    /// Number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.config.cpus = cpus;
        self
    }
    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.config.memory_mib = mib;
        self
    }
    /// Kernel image.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.kernel = path.into();
        self
    }
    /// Initial ramdisk.
    pub fn initramfs(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.initramfs = Some(path.into());
        self
    }
    /// Extra kernel command line.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.config.cmdline = cmdline.into();
        self
    }
    /// Add a disk.
    pub fn disk(mut self, disk: DiskConfig) -> Self {
        self.config.disks.push(disk);
        self
    }
    /// Add a network attachment.
    pub fn network(mut self, net: NetworkAttachment) -> Self {
        self.config.networks.push(net);
        self
    }
    /// Add a shared directory.
    pub fn shared_dir(mut self, dir: SharedDir) -> Self {
        self.config.shared_dirs.push(dir);
        self
    }
    /// Serial console log path.
    pub fn serial_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.serial_log = Some(path.into());
        self
    }
    /// Cap of the serial log in bytes.
    pub fn serial_log_max(mut self, bytes: u64) -> Self {
        self.config.serial_log_max = Some(bytes);
        self
    }
    /// Backend.
    pub fn backend(mut self, backend: BackendKind) -> Self {
        self.config.backend = backend;
        self
    }
    /// Acceleration.
    pub fn accel(mut self, accel: Accel) -> Self {
        self.config.accel = accel;
        self
    }
    /// Agent transport ([`VmConfig::agent_transport`]).
    pub fn agent_transport(mut self, t: crate::devices::AgentTransport) -> Self {
        self.config.agent_transport = Some(t);
        self
    }
    /// Validate and return the configuration.
    pub fn build(self) -> Result<VmConfig, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
    /// Return the configuration without validating (the manager validates again on start).
    pub fn build_unchecked(self) -> VmConfig {
        self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_spec_parses_options() {
        let d = DiskConfig::parse("/tmp/a.img,ro,format=qcow2,cache=none").expect("parse");
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.read_only);
        assert_eq!(d.format, DiskFormat::Qcow2);
        assert_eq!(d.cache, CacheMode::None);
        assert_eq!(d.backing, BackingPolicy::Deny);
        let d = DiskConfig::parse("/a.qcow2,format=qcow2,backing=allow").expect("parse");
        assert_eq!(d.backing, BackingPolicy::Allow);
        assert!(DiskConfig::parse("/a,backing=maybe").is_err());
        assert!(DiskConfig::parse("").is_err());
        assert!(DiskConfig::parse("/a,format=vmdk").is_err());
        assert!(DiskConfig::parse("/a,bogus").is_err());
    }

    #[test]
    fn config_json_rejects_unknown_keys() {
        let err = serde_json::from_str::<VmConfig>(r#"{"name":"a","kernel":"/k","cpuz":2}"#);
        assert!(err.is_err());
        let ok: VmConfig = serde_json::from_str(r#"{"name":"a","kernel":"/k"}"#).expect("parse");
        assert_eq!(ok.cpus, 1);
        assert_eq!(ok.memory_mib, 256);
    }

    #[test]
    fn relative_paths_become_absolute() {
        let mut cfg = VmConfig::builder("a")
            .kernel("vmlinuz")
            .initramfs("/abs/initrd")
            .disk(DiskConfig::new("json:{\"file\":\"x\"}"))
            .build_unchecked();
        cfg.make_paths_absolute();
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(cfg.kernel, cwd.join("vmlinuz"));
        assert_eq!(cfg.initramfs, Some(PathBuf::from("/abs/initrd")));
        assert!(cfg.disks[0].path.is_absolute());
        assert!(cfg.disks[0].path.starts_with(&cwd));
    }

    #[test]
    fn enums_parse_from_cli_strings() {
        assert_eq!("tcg".parse::<Accel>().ok(), Some(Accel::Tcg));
        assert_eq!("hvf".parse::<Accel>().ok(), Some(Accel::Hvf));
        assert!("warp".parse::<Accel>().is_err());
        assert_eq!("qemu".parse::<BackendKind>().ok(), Some(BackendKind::Qemu));
        assert_eq!("vz".parse::<BackendKind>().ok(), Some(BackendKind::Vz));
        for a in [Accel::Auto, Accel::Kvm, Accel::Tcg, Accel::Hvf] {
            assert_eq!(a.to_string().parse::<Accel>().ok(), Some(a));
        }
    }
}
