//! Request and response bodies of Cloud Hypervisor's REST API, written from its OpenAPI
//! description (`vmm/src/api/openapi/cloud-hypervisor.yaml`, `components: schemas:`), for the
//! endpoints and fields the driver uses. Names and enums follow the document; optional fields
//! are left out of the JSON when unset, so the VMM applies its documented defaults.
//!
//! Cloud Hypervisor ignores fields it does not know, so a misspelt one would silently drop a
//! setting; typed bodies (instead of `json!`) make that impossible, and the protocol peer in
//! the tests refuses unknown fields to catch any that slip in.

use serde::{Deserialize, Serialize};

/// `VmConfig` (`PUT vm.create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs.
    pub cpus: CpusConfig,
    /// Guest RAM.
    pub memory: MemoryConfig,
    /// What to boot.
    pub payload: PayloadConfig,
    /// virtio-blk disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// virtio-fs devices (vhost-user, served by virtiofsd).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsConfig>,
    /// Entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    /// The vsock device (hybrid vsock on a Unix socket: the guest agent's transport).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// The serial port (`SerialConfig`).
    pub serial: ConsoleConfig,
    /// The virtio console.
    pub console: ConsoleConfig,
}

/// `CpusConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs at boot (>= 1).
    pub boot_vcpus: u32,
    /// Upper bound for `vm.resize` (>= `boot_vcpus`).
    pub max_vcpus: u32,
}

/// `MemoryConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes at boot.
    pub size: u64,
    /// Bytes that can be hot-plugged on top (ACPI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    /// Map guest RAM shared (needed by vhost-user devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
}

/// `PayloadConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// ELF kernel (PVH entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
}

/// `ConsoleMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    /// No device.
    Off,
    /// A new pseudo-terminal.
    Pty,
    /// The VMM's terminal.
    Tty,
    /// Output appended to `file`.
    File,
    /// A Unix socket at `socket`.
    Socket,
    /// Discarded.
    Null,
}

/// `FsConfig`: a virtio-fs device whose backend is a vhost-user daemon on `socket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// Device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The mount tag the guest names.
    pub tag: String,
    /// The daemon's vhost-user socket.
    pub socket: String,
    /// Request queues.
    pub num_queues: u32,
    /// Entries per queue.
    pub queue_size: u32,
}

/// `ConsoleConfig` / `SerialConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Where output goes.
    pub mode: ConsoleMode,
    /// File for [`ConsoleMode::File`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// `ImageType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    /// Raw image.
    Raw,
    /// qcow2 image.
    Qcow2,
}

/// `DiskConfig` (also `PUT vm.add-disk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Host image.
    pub path: String,
    /// Read-only.
    pub readonly: bool,
    /// `O_DIRECT` (no host page cache).
    pub direct: bool,
    /// Image format, explicit so a raw image is never probed.
    pub image_type: ImageType,
    /// Device id (the VMM picks one when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Serial number the guest sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// `NetConfig` (also `PUT vm.add-net`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Host TAP device (the VMM creates one when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Guest MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `RngConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Host entropy source.
    pub src: String,
}

/// `VsockConfig`: required `cid` (>= 3) and `socket`; the host connects to `socket` and says
/// `CONNECT <port>\n` to reach a guest port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context id.
    pub cid: u64,
    /// The host-side Unix socket.
    pub socket: String,
    /// Device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `VmResize` (`PUT vm.resize`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResize {
    /// vCPUs wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_vcpus: Option<u32>,
    /// RAM wanted, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
}

/// `VmRemoveDevice` (`PUT vm.remove-device`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRemoveDevice {
    /// Device id.
    pub id: String,
}

/// `VmSnapshotConfig` (`PUT vm.snapshot`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotConfig {
    /// `file://<directory>`.
    pub destination_url: String,
}

/// `RestoreConfig` (`PUT vm.restore`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// `file://<directory>`.
    pub source_url: String,
}

/// `PciDeviceInfo` (answer of the hot-plug calls).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    /// Device id.
    pub id: String,
    /// PCI address.
    pub bdf: String,
}

/// The part of `VmInfo` (`GET vm.info`) the driver reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmInfoState {
    /// `VmState`: `Created`, `Running`, `Shutdown`, `Paused`, `BreakPoint`.
    pub state: String,
}
