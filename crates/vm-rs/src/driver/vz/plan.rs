//! The VZ configuration plan: a VM's configuration and typed devices ([`BootSpec`]) translated
//! into plain data that mirrors the Virtualization.framework objects one to one, with every
//! limit of the framework checked on the way.
//!
//! The plan is the only thing the per-VM host process `vmrs-vz` reads (as `vz-plan.json` in
//! the VM directory): it turns each field into one framework object and does no policy of its
//! own. Keeping the translation here means every decision — and every refusal — is ordinary
//! Rust that is unit-tested on any host, while the macOS-only part stays a mechanical mapping.
//!
//! | plan field | Virtualization.framework object |
//! |------------|---------------------------------|
//! | [`VzPlan::cpus`], [`VzPlan::memory_bytes`] | `VZVirtualMachineConfiguration.CPUCount` / `.memorySize` |
//! | [`VzBoot`] | `VZLinuxBootLoader` (kernel URL, `initialRamdiskURL`, `commandLine`) |
//! | [`VzConsole`] | `VZVirtioConsoleDeviceSerialPortConfiguration` + `VZFileHandleSerialPortAttachment` writing the log |
//! | [`VzDisk`] | `VZVirtioBlockDeviceConfiguration` (`blockDeviceIdentifier`) over `VZDiskImageStorageDeviceAttachment` |
//! | [`VzNic`] | `VZVirtioNetworkDeviceConfiguration` + `VZNATNetworkDeviceAttachment`, `VZMACAddress` |
//! | [`VzShare`] | `VZVirtioFileSystemDeviceConfiguration` (tag) + `VZSingleDirectoryShare` |
//! | [`VzVsock`] | `VZVirtioSocketDeviceConfiguration`; `vmrs-vz` bridges the agent socket to the guest port |
//! | [`VzPlan::entropy`] | `VZVirtioEntropyDeviceConfiguration` |
//!
//! What VZ cannot do is refused here with a [`VzPlanError`] naming it, before any host side
//! effect: qcow2 disks (VZ reads raw images only), TAP and switch NICs and network namespaces
//! (VZ's NAT attachment is the networking it has without an entitlement Apple grants on
//! request), published ports on a NAT NIC (VZ's NAT has no port forwarding, and vm-rs has no
//! proxy for it yet), software or KVM acceleration (VZ always runs on Hypervisor.framework), and
//! guest RAM backed by a memfd or a file, and a fixed guest address on a NAT NIC.
//!
//! NAT NICs ask DHCP: the NIC planner writes QEMU user-mode addressing (`vmrs.ip=10.0.2.15/24`,
//! gateway, DNS) on the kernel command line, which would not route behind VZ's NAT (its DHCP
//! server hands out a subnet macOS picks), so [`nat_dhcp_params`] replaces those words with
//! `vmrs.ip[.ethN]=dhcp` and the guest init's DHCP client takes the lease.

use crate::config::{Accel, BackendKind, CacheMode, DiskFormat, GuestAddress, MacAddr, NetworkAttachment};
use crate::devices::{AgentChannel, MemoryBackend, MAX_DISK_SERIAL};
use crate::driver::BootSpec;
use crate::net::NicBackend;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Version of [`VzPlan`] records.
pub const PLAN_VERSION: u32 = 1;
/// The guest's console device on VZ (a virtio console, not a UART).
pub const GUEST_CONSOLE: &str = "hvc0";
/// Guest vsock port the agent listens on ([`vmrs_proto::VSOCK_PORT`], the guest init's vsock
/// listener); `vmrs-vz` joins each connection to the host's agent socket to a new vsock
/// connection to it.
pub const AGENT_VSOCK_PORT: u32 = vmrs_proto::VSOCK_PORT;
/// Longest virtio-fs tag (the `tag` field of the virtio-fs config space).
pub const MAX_SHARE_TAG: usize = 36;

/// Bounds the framework puts on a VM. On macOS they come from
/// `VZVirtualMachineConfiguration`'s class properties (`minimumAllowedMemorySize`,
/// `maximumAllowedMemorySize`, `minimumAllowedCPUCount`, `maximumAllowedCPUCount`), which
/// depend on the Mac; [`VzLimits::FALLBACK`] is used where they cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzLimits {
    /// Least guest memory, bytes.
    pub min_memory_bytes: u64,
    /// Most guest memory, bytes.
    pub max_memory_bytes: u64,
    /// Fewest vCPUs.
    pub min_cpus: u32,
    /// Most vCPUs.
    pub max_cpus: u32,
}

impl VzLimits {
    /// Conservative bounds for hosts that cannot ask the framework: 128 MiB to 16 GiB, 1 to 16
    /// vCPUs (every Mac that runs VZ allows at least this).
    pub const FALLBACK: VzLimits = VzLimits {
        min_memory_bytes: 128 << 20,
        max_memory_bytes: 16 << 30,
        min_cpus: 1,
        max_cpus: 16,
    };
}

/// Everything `vmrs-vz` needs to build and start one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzPlan {
    /// Record version ([`PLAN_VERSION`]).
    pub version: u32,
    /// VM name (for `vmrs-vz`'s log lines).
    pub name: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory in bytes (a whole number of MiB, as VZ requires).
    pub memory_bytes: u64,
    /// The Linux boot loader.
    pub boot: VzBoot,
    /// The guest console, written to the VM's serial log (readiness reads it).
    pub console: VzConsole,
    /// Block devices, in guest order (`/dev/vda`, ...).
    pub disks: Vec<VzDisk>,
    /// Network devices, in guest order (`eth0`, ...).
    pub nics: Vec<VzNic>,
    /// Shared directories.
    pub shares: Vec<VzShare>,
    /// The vsock device carrying the guest agent, when the VM has one.
    pub vsock: Option<VzVsock>,
    /// A virtio entropy device.
    pub entropy: bool,
}

/// `VZLinuxBootLoader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzBoot {
    /// Kernel image (an uncompressed `Image` on Apple silicon, a bzImage on Intel Macs).
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line: VZ's console first, then the subsystems' words, then the user's.
    pub cmdline: String,
}

/// The guest console's host end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzConsole {
    /// File the guest's console output is appended to.
    pub log: PathBuf,
}

/// `VZDiskImageCachingMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VzCaching {
    /// The framework decides (host page cache used).
    Automatic,
    /// Host page cache bypassed.
    Uncached,
    /// Host page cache always used.
    Cached,
}

/// `VZDiskImageSynchronizationMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VzSync {
    /// Guest flushes reach the disk (`F_FULLFSYNC`).
    Full,
    /// Guest flushes are `fsync(2)` (the drive's cache may keep them).
    Fsync,
    /// Guest flushes are ignored (fast, unsafe on host crash).
    None,
}

/// A virtio-blk disk over a raw image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzDisk {
    /// The device model's id (`disk0`, `root`), for messages.
    pub id: String,
    /// Raw image file.
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
    /// Host caching.
    pub caching: VzCaching,
    /// Flush semantics.
    pub sync: VzSync,
    /// `blockDeviceIdentifier` (the virtio-blk serial the guest init finds the root disk by).
    pub identifier: Option<String>,
}

/// A virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzNic {
    /// `eth<index>` in the guest.
    pub index: usize,
    /// Guest MAC address.
    pub mac: MacAddr,
    /// What carries its frames.
    pub attachment: VzNetAttachment,
}

/// The network attachments the plan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum VzNetAttachment {
    /// `VZNATNetworkDeviceAttachment`: the host's shared NAT (vmnet); the guest gets its
    /// address by DHCP.
    Nat,
}

/// A virtio-fs share of one host directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzShare {
    /// Tag the guest mounts (`mount -t virtiofs <tag> <dir>`).
    pub tag: String,
    /// Host directory.
    pub host_path: PathBuf,
    /// Share read-only.
    pub read_only: bool,
}

/// The vsock device and the agent bridged over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzVsock {
    /// Guest port the agent listens on.
    pub guest_port: u32,
    /// Host Unix socket `vmrs-vz` serves; each connection is joined to a new vsock connection
    /// to `guest_port` (the same byte stream the virtio-serial port carries on QEMU).
    pub host_socket: PathBuf,
}

/// Why a VM cannot run on VZ as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VzPlanError {
    /// Guest memory outside what the framework allows on this Mac.
    #[error(
        "{mib} MiB of memory is outside what Virtualization.framework allows here ({min_mib}-{max_mib} MiB)"
    )]
    Memory {
        /// Asked.
        mib: u64,
        /// Least allowed.
        min_mib: u64,
        /// Most allowed.
        max_mib: u64,
    },
    /// vCPU count outside what the framework allows on this Mac.
    #[error("{cpus} vCPUs is outside what Virtualization.framework allows here ({min}-{max})")]
    Cpus {
        /// Asked.
        cpus: u32,
        /// Fewest allowed.
        min: u32,
        /// Most allowed.
        max: u32,
    },
    /// A device or setting VZ does not have.
    #[error("the vz backend does not support {feature}")]
    Unsupported {
        /// What it cannot do.
        feature: &'static str,
    },
    /// A NAT NIC publishes ports: VZ's NAT attachment cannot forward them.
    #[error("eth{index} publishes host port {host_port}, but Virtualization.framework's NAT has no port forwarding (and vm-rs has no proxy for it yet)")]
    PortForward {
        /// NIC.
        index: usize,
        /// First published port.
        host_port: u16,
    },
    /// A user-mode NIC with a fixed guest address: VZ's NAT hands out addresses by DHCP on a
    /// subnet macOS chooses, so a fixed one would not route.
    #[error("eth{index} asks a fixed address, but Virtualization.framework's NAT assigns guest addresses by DHCP (use ip=dhcp or leave the address out)")]
    NatAddress {
        /// NIC.
        index: usize,
    },
    /// A multicast MAC address (`VZMACAddress` must be unicast).
    #[error("eth{index}'s MAC address {mac} is multicast")]
    MulticastMac {
        /// NIC.
        index: usize,
        /// The address.
        mac: MacAddr,
    },
    /// A path the framework cannot take (it wants an absolute file URL, which an `NSString`
    /// of valid UTF-8 must spell).
    #[error("{what} path {} must be absolute and valid UTF-8 for Virtualization.framework", path.display())]
    Path {
        /// What it is ("kernel", "disk disk0", ...).
        what: String,
        /// The path.
        path: PathBuf,
    },
    /// A disk serial `blockDeviceIdentifier` refuses (at most 20 ASCII bytes, printable).
    #[error("disk {id}'s serial {serial:?} is not a valid block device identifier (1-{MAX_DISK_SERIAL} printable ASCII bytes)")]
    DiskIdentifier {
        /// Disk.
        id: String,
        /// The serial.
        serial: String,
    },
    /// A share tag `VZVirtioFileSystemDeviceConfiguration` refuses.
    #[error("shared directory tag {tag:?} is not valid for virtio-fs (1-{MAX_SHARE_TAG} bytes, no control characters, unique)")]
    ShareTag {
        /// The tag.
        tag: String,
    },
    /// The kernel command line holds a NUL byte.
    #[error("the kernel command line holds a NUL byte")]
    Cmdline,
}

impl VzPlanError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            VzPlanError::Unsupported { .. }
            | VzPlanError::PortForward { .. }
            | VzPlanError::NatAddress { .. } => K::Unsupported,
            _ => K::Invalid,
        }
    }
}

impl From<VzPlanError> for crate::driver::DriverError {
    fn from(e: VzPlanError) -> Self {
        match e {
            VzPlanError::Unsupported { feature } => crate::driver::DriverError::Unsupported {
                backend: BackendKind::Vz,
                feature,
            },
            other => crate::driver::DriverError::Vz(other),
        }
    }
}

/// `params` with the addressing words of the NICs at `nat_indexes` (`vmrs.ip[.ethN]=`,
/// `vmrs.dns[.ethN]=`, and `vmrs.gw=` for `eth0`; see [`crate::net`]) replaced by one
/// `vmrs.ip[.ethN]=dhcp` each. Every other word is kept, in order.
pub fn nat_dhcp_params(params: &[String], nat_indexes: &[usize]) -> Vec<String> {
    let suffix = |i: usize| if i == 0 { String::new() } else { format!(".eth{i}") };
    let addressing = |word: &str| {
        let key = word.split_once('=').map_or(word, |(k, _)| k);
        nat_indexes.iter().any(|&i| {
            let s = suffix(i);
            key == format!("vmrs.ip{s}") || key == format!("vmrs.dns{s}") || (i == 0 && key == "vmrs.gw")
        })
    };
    let mut out: Vec<String> = params.iter().filter(|w| !addressing(w)).cloned().collect();
    out.extend(nat_indexes.iter().map(|&i| format!("vmrs.ip{}=dhcp", suffix(i))));
    out
}

fn unsupported(feature: &'static str) -> VzPlanError {
    VzPlanError::Unsupported { feature }
}

/// An absolute, UTF-8 path, or [`VzPlanError::Path`].
fn url_path(what: impl Into<String>, path: &Path) -> Result<PathBuf, VzPlanError> {
    if path.is_absolute() && path.to_str().is_some() {
        Ok(path.to_path_buf())
    } else {
        Err(VzPlanError::Path {
            what: what.into(),
            path: path.to_path_buf(),
        })
    }
}

/// `(caching, sync)` for a configured cache mode: writeback keeps full flushes, `none`
/// bypasses the host cache, `unsafe` drops flushes.
pub fn disk_modes(cache: CacheMode) -> (VzCaching, VzSync) {
    match cache {
        CacheMode::Writeback => (VzCaching::Automatic, VzSync::Full),
        CacheMode::None => (VzCaching::Uncached, VzSync::Full),
        CacheMode::Unsafe => (VzCaching::Cached, VzSync::None),
    }
}

fn valid_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_DISK_SERIAL && s.bytes().all(|b| b.is_ascii_graphic())
}

fn valid_tag(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SHARE_TAG && !s.chars().any(char::is_control)
}

impl VzPlan {
    /// Translate `spec` into a plan within `limits`, or say what VZ cannot do.
    pub fn build(spec: &BootSpec<'_>, limits: &VzLimits) -> Result<Self, VzPlanError> {
        let config = spec.config;
        let devices = &spec.devices;
        match config.accel {
            Accel::Auto | Accel::Hvf => {}
            Accel::Kvm => return Err(unsupported("kvm acceleration (VZ runs on Hypervisor.framework)")),
            Accel::Tcg => return Err(unsupported("tcg (software) acceleration")),
        }
        let memory_bytes = config.memory_mib.saturating_mul(1 << 20);
        if memory_bytes < limits.min_memory_bytes || memory_bytes > limits.max_memory_bytes {
            return Err(VzPlanError::Memory {
                mib: config.memory_mib,
                min_mib: limits.min_memory_bytes.div_ceil(1 << 20),
                max_mib: limits.max_memory_bytes >> 20,
            });
        }
        if config.cpus < limits.min_cpus || config.cpus > limits.max_cpus {
            return Err(VzPlanError::Cpus {
                cpus: config.cpus,
                min: limits.min_cpus,
                max: limits.max_cpus,
            });
        }
        if devices.netns.is_some() {
            return Err(unsupported("running the vmm in a network namespace"));
        }
        match devices.memory {
            MemoryBackend::Anonymous => {}
            MemoryBackend::Memfd { .. } => return Err(unsupported("memfd guest memory")),
            MemoryBackend::File { .. } => return Err(unsupported("file-backed guest memory")),
        }

        // VZ's NAT (VZNATNetworkDeviceAttachment) runs its own DHCP server on a subnet macOS
        // picks (192.168.64.0/24 by default, but not fixed): the QEMU user-mode addressing the
        // NIC plan wrote (10.0.2.15, gateway .2, dns .3) would leave the guest unreachable, so
        // every NAT NIC asks DHCP, and an address the user fixed is refused, not ignored.
        for (index, net) in config.networks.iter().enumerate() {
            if let NetworkAttachment::User {
                address: GuestAddress::Static(_),
                ..
            } = net
            {
                return Err(VzPlanError::NatAddress { index });
            }
        }
        let nat_nics: Vec<usize> = devices
            .nics
            .iter()
            .filter(|n| matches!(n.backend, NicBackend::User { .. }))
            .map(|n| n.index)
            .collect();
        let params = nat_dhcp_params(&spec.guest_params, &nat_nics);
        let mut cmdline = format!("console={GUEST_CONSOLE} reboot=t panic=-1");
        for word in params
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(config.cmdline.trim()).filter(|s| !s.is_empty()))
        {
            cmdline.push(' ');
            cmdline.push_str(word);
        }
        if cmdline.contains('\0') {
            return Err(VzPlanError::Cmdline);
        }
        let boot = VzBoot {
            kernel: url_path("kernel", &config.kernel)?,
            initrd: config
                .initramfs
                .as_deref()
                .map(|p| url_path("initramfs", p))
                .transpose()?,
            cmdline,
        };
        let console = VzConsole {
            log: url_path("serial log", &spec.serial_log)?,
        };

        let mut disks = Vec::with_capacity(devices.disks.len());
        for d in &devices.disks {
            if d.format != DiskFormat::Raw {
                return Err(unsupported("qcow2 disks (VZ reads raw images only)"));
            }
            if let Some(s) = d.serial.as_deref().filter(|s| !valid_identifier(s)) {
                return Err(VzPlanError::DiskIdentifier {
                    id: d.id.clone(),
                    serial: s.to_string(),
                });
            }
            let (caching, sync) = disk_modes(d.cache);
            disks.push(VzDisk {
                id: d.id.clone(),
                path: url_path(format!("disk {}", d.id), &d.path)?,
                read_only: d.read_only,
                caching,
                sync,
                identifier: d.serial.clone(),
            });
        }

        let mut nics = Vec::with_capacity(devices.nics.len());
        for n in &devices.nics {
            match &n.backend {
                NicBackend::User { port_forwards, .. } => {
                    if let Some(pf) = port_forwards.first() {
                        return Err(VzPlanError::PortForward {
                            index: n.index,
                            host_port: pf.host_port,
                        });
                    }
                }
                NicBackend::Tap { .. } => return Err(unsupported("tap networking")),
                NicBackend::Switch { .. } => return Err(unsupported("switch networks")),
            }
            if n.mac.0[0] & 1 == 1 {
                return Err(VzPlanError::MulticastMac {
                    index: n.index,
                    mac: n.mac,
                });
            }
            nics.push(VzNic {
                index: n.index,
                mac: n.mac,
                attachment: VzNetAttachment::Nat,
            });
        }

        let mut shares: Vec<VzShare> = Vec::with_capacity(devices.shared_dirs.len());
        for s in &devices.shared_dirs {
            if !valid_tag(&s.tag) || shares.iter().any(|o| o.tag == s.tag) {
                return Err(VzPlanError::ShareTag { tag: s.tag.clone() });
            }
            shares.push(VzShare {
                tag: s.tag.clone(),
                host_path: url_path(format!("shared directory {}", s.tag), &s.host_path)?,
                read_only: s.read_only,
            });
        }

        let vsock = match &devices.agent {
            None => None,
            Some(AgentChannel::VirtioSerial { socket, .. }) => Some(VzVsock {
                guest_port: AGENT_VSOCK_PORT,
                host_socket: url_path("agent socket", socket)?,
            }),
            // VZ's vsock is bridged by vmrs-vz on a plain socket, not the hybrid convention
            Some(_) => return Err(unsupported("a hybrid-vsock agent channel")),
        };

        Ok(VzPlan {
            version: PLAN_VERSION,
            name: config.name.clone(),
            cpus: config.cpus,
            memory_bytes,
            boot,
            console,
            disks,
            nics,
            shares,
            vsock,
            entropy: devices.entropy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PortForward, Protocol, VmConfig};
    use crate::devices::{DeviceSet, Disk, Nic, SharedFs};
    use std::net::Ipv4Addr;

    /// A configuration as a record holds it (the builder's validation wants the files to exist).
    fn config() -> VmConfig {
        serde_json::from_value(serde_json::json!({
            "name": "vz1",
            "kernel": "/k/Image",
            "initramfs": "/k/initrd.img",
            "memory_mib": 512,
            "cpus": 2,
        }))
        .expect("config")
    }

    fn plan_of(config: &VmConfig, devices: DeviceSet) -> Result<VzPlan, VzPlanError> {
        plan_with(config, devices, &VzLimits::FALLBACK)
    }

    fn plan_with(config: &VmConfig, devices: DeviceSet, limits: &VzLimits) -> Result<VzPlan, VzPlanError> {
        let spec = BootSpec {
            config,
            vm_dir: Path::new("/vms/vz1"),
            serial_log: PathBuf::from("/vms/vz1/serial.log"),
            vmm_log: PathBuf::from("/vms/vz1/vmm.log"),
            devices,
            guest_params: vec!["vmrs.name=vz1".into(), "vmrs.net=dhcp".into()],
        };
        VzPlan::build(&spec, limits)
    }

    fn disk(id: &str, format: DiskFormat, cache: CacheMode, serial: Option<&str>) -> Disk {
        Disk {
            id: id.into(),
            path: PathBuf::from(format!("/img/{id}.raw")),
            format,
            read_only: false,
            cache,
            serial: serial.map(str::to_string),
        }
    }

    fn user_nic(index: usize, forwards: Vec<PortForward>) -> Nic {
        Nic {
            index,
            mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, index as u8]),
            backend: NicBackend::User {
                net: crate::net::USER_NET,
                host: Ipv4Addr::new(10, 0, 2, 2),
                dns: Ipv4Addr::new(10, 0, 2, 3),
                guest: Ipv4Addr::new(10, 0, 2, 15),
                port_forwards: forwards,
            },
        }
    }

    fn feature(r: Result<VzPlan, VzPlanError>) -> &'static str {
        match r {
            Err(VzPlanError::Unsupported { feature }) => feature,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn minimal_vm_boots_the_kernel_with_the_console_on_the_log() {
        let mut c = config();
        c.cmdline = "  quiet  ".into();
        let p = plan_of(&c, DeviceSet::default()).expect("plan");
        assert_eq!(p.version, PLAN_VERSION);
        assert_eq!((p.cpus, p.memory_bytes), (2, 512 << 20));
        assert_eq!(p.boot.kernel, Path::new("/k/Image"));
        assert_eq!(p.boot.initrd.as_deref(), Some(Path::new("/k/initrd.img")));
        assert_eq!(
            p.boot.cmdline,
            "console=hvc0 reboot=t panic=-1 vmrs.name=vz1 vmrs.net=dhcp quiet"
        );
        assert_eq!(p.console.log, Path::new("/vms/vz1/serial.log"));
        assert!(p.disks.is_empty() && p.nics.is_empty() && p.shares.is_empty());
        assert!(p.vsock.is_none() && !p.entropy);
    }

    #[test]
    fn no_initramfs_and_no_user_cmdline() {
        let mut c = config();
        c.initramfs = None;
        let p = plan_of(&c, DeviceSet::default()).expect("plan");
        assert_eq!(p.boot.initrd, None);
        assert!(p.boot.cmdline.ends_with("vmrs.net=dhcp"));
    }

    #[test]
    fn raw_disks_map_cache_modes_and_serials() {
        let devices = DeviceSet {
            disks: vec![
                disk("disk0", DiskFormat::Raw, CacheMode::Writeback, None),
                disk("disk1", DiskFormat::Raw, CacheMode::None, None),
                Disk {
                    read_only: true,
                    ..disk("root", DiskFormat::Raw, CacheMode::Unsafe, Some("vmrs-root"))
                },
            ],
            ..DeviceSet::default()
        };
        let p = plan_of(&config(), devices).expect("plan");
        let modes: Vec<_> = p.disks.iter().map(|d| (d.caching, d.sync)).collect();
        assert_eq!(
            modes,
            [
                (VzCaching::Automatic, VzSync::Full),
                (VzCaching::Uncached, VzSync::Full),
                (VzCaching::Cached, VzSync::None)
            ]
        );
        assert_eq!(p.disks[2].identifier.as_deref(), Some("vmrs-root"));
        assert!(p.disks[2].read_only && !p.disks[0].read_only);
        assert_eq!(p.disks[1].path, Path::new("/img/disk1.raw"));
    }

    #[test]
    fn qcow2_disks_are_refused() {
        let devices = DeviceSet {
            disks: vec![disk("disk0", DiskFormat::Qcow2, CacheMode::Writeback, None)],
            ..DeviceSet::default()
        };
        assert!(feature(plan_of(&config(), devices)).starts_with("qcow2 disks"));
    }

    #[test]
    fn bad_disk_identifiers_are_refused() {
        for serial in ["", "a-serial-longer-than-20", "tab\there", "ünïcode"] {
            let devices = DeviceSet {
                disks: vec![disk("root", DiskFormat::Raw, CacheMode::Writeback, Some(serial))],
                ..DeviceSet::default()
            };
            let err = plan_of(&config(), devices).expect_err(serial);
            assert!(
                matches!(err, VzPlanError::DiskIdentifier { ref id, .. } if id == "root"),
                "{err:?}"
            );
            assert_eq!(err.kind(), crate::ErrorKind::Invalid);
        }
    }

    #[test]
    fn user_nics_become_nat() {
        let devices = DeviceSet {
            nics: vec![user_nic(0, vec![]), user_nic(1, vec![])],
            ..DeviceSet::default()
        };
        let p = plan_of(&config(), devices).expect("plan");
        assert_eq!(p.nics.len(), 2);
        assert!(p.nics.iter().all(|n| n.attachment == VzNetAttachment::Nat));
        assert_eq!(p.nics[1].mac, MacAddr([0x52, 0x54, 0, 0x12, 0x34, 1]));
        assert_eq!(p.nics[1].index, 1);
    }

    #[test]
    fn published_ports_are_refused_without_a_proxy() {
        let pf = PortForward {
            host_ip: None,
            host_port: 8080,
            guest_port: 80,
            protocol: Protocol::Tcp,
        };
        let devices = DeviceSet {
            nics: vec![user_nic(0, vec![pf])],
            ..DeviceSet::default()
        };
        let err = plan_of(&config(), devices).expect_err("port forward");
        assert_eq!(
            err,
            VzPlanError::PortForward {
                index: 0,
                host_port: 8080
            }
        );
        assert_eq!(err.kind(), crate::ErrorKind::Unsupported);
    }

    #[test]
    fn tap_and_switch_nics_and_namespaces_are_refused() {
        let tap = Nic {
            backend: NicBackend::Tap {
                ifname: "vmrs0".into(),
                bridge: None,
                slirp: None,
            },
            ..user_nic(0, vec![])
        };
        let switch = Nic {
            backend: NicBackend::Switch {
                network: "n".into(),
                local: "/a".into(),
                remote: "/b".into(),
            },
            ..user_nic(0, vec![])
        };
        let one = |n: Nic| DeviceSet {
            nics: vec![n],
            ..DeviceSet::default()
        };
        assert_eq!(feature(plan_of(&config(), one(tap))), "tap networking");
        assert_eq!(feature(plan_of(&config(), one(switch))), "switch networks");
        let ns = DeviceSet {
            netns: Some("/run/netns/x".into()),
            ..DeviceSet::default()
        };
        assert!(feature(plan_of(&config(), ns)).contains("network namespace"));
    }

    #[test]
    fn multicast_macs_are_refused() {
        let n = Nic {
            mac: MacAddr([0x01, 0, 0x5e, 0, 0, 1]),
            ..user_nic(0, vec![])
        };
        let devices = DeviceSet {
            nics: vec![n],
            ..DeviceSet::default()
        };
        assert!(matches!(
            plan_of(&config(), devices),
            Err(VzPlanError::MulticastMac { index: 0, .. })
        ));
    }

    #[test]
    fn shares_become_virtio_fs_devices() {
        let devices = DeviceSet {
            shared_dirs: vec![
                SharedFs {
                    tag: "src".into(),
                    host_path: "/Users/me/src".into(),
                    read_only: false,
                    socket: "/vms/vz1/fs.sock".into(),
                },
                SharedFs {
                    tag: "x".repeat(MAX_SHARE_TAG),
                    host_path: "/data".into(),
                    read_only: true,
                    socket: "/vms/vz1/fs.sock".into(),
                },
            ],
            ..DeviceSet::default()
        };
        let p = plan_of(&config(), devices).expect("plan");
        assert_eq!(p.shares[0].tag, "src");
        assert_eq!(p.shares[0].host_path, Path::new("/Users/me/src"));
        assert!(!p.shares[0].read_only && p.shares[1].read_only);
    }

    #[test]
    fn bad_or_duplicate_share_tags_are_refused() {
        let share = |tag: &str| SharedFs {
            tag: tag.into(),
            host_path: "/data".into(),
            read_only: false,
            socket: "/vms/vz1/fs.sock".into(),
        };
        for shares in [
            vec![share("")],
            vec![share(&"x".repeat(MAX_SHARE_TAG + 1))],
            vec![share("a\nb")],
            vec![share("same"), share("same")],
        ] {
            let devices = DeviceSet {
                shared_dirs: shares,
                ..DeviceSet::default()
            };
            assert!(matches!(
                plan_of(&config(), devices),
                Err(VzPlanError::ShareTag { .. })
            ));
        }
    }

    #[test]
    fn the_agent_goes_over_vsock() {
        let devices = DeviceSet {
            agent: Some(AgentChannel::VirtioSerial {
                socket: "/vms/vz1/agent.sock".into(),
                process_log: None,
            }),
            ..DeviceSet::default()
        };
        let v = plan_of(&config(), devices).expect("plan").vsock.expect("vsock");
        assert_eq!(v.guest_port, AGENT_VSOCK_PORT);
        assert_eq!(v.host_socket, Path::new("/vms/vz1/agent.sock"));
    }

    #[test]
    fn entropy_is_planned() {
        let devices = DeviceSet {
            entropy: true,
            ..DeviceSet::default()
        };
        assert!(plan_of(&config(), devices).expect("plan").entropy);
    }

    #[test]
    fn memory_and_cpu_bounds_come_from_the_limits() {
        let limits = VzLimits {
            min_memory_bytes: 256 << 20,
            max_memory_bytes: 1 << 30,
            min_cpus: 1,
            max_cpus: 4,
        };
        let mut c = config();
        c.memory_mib = 128;
        assert_eq!(
            plan_with(&c, DeviceSet::default(), &limits),
            Err(VzPlanError::Memory {
                mib: 128,
                min_mib: 256,
                max_mib: 1024
            })
        );
        c.memory_mib = 2048;
        assert!(matches!(
            plan_with(&c, DeviceSet::default(), &limits),
            Err(VzPlanError::Memory { .. })
        ));
        c.memory_mib = u64::MAX;
        assert!(matches!(
            plan_with(&c, DeviceSet::default(), &limits),
            Err(VzPlanError::Memory { .. })
        ));
        c.memory_mib = 1024;
        assert!(
            plan_with(&c, DeviceSet::default(), &limits).is_ok(),
            "the maximum itself is allowed"
        );
        c.cpus = 5;
        assert_eq!(
            plan_with(&c, DeviceSet::default(), &limits),
            Err(VzPlanError::Cpus {
                cpus: 5,
                min: 1,
                max: 4
            })
        );
        c.cpus = 0;
        assert!(matches!(
            plan_with(&c, DeviceSet::default(), &limits),
            Err(VzPlanError::Cpus { .. })
        ));
    }

    #[test]
    fn software_and_kvm_acceleration_are_refused() {
        let mut c = config();
        c.accel = Accel::Tcg;
        assert!(feature(plan_of(&c, DeviceSet::default())).starts_with("tcg"));
        c.accel = Accel::Kvm;
        assert!(feature(plan_of(&c, DeviceSet::default())).starts_with("kvm"));
        c.accel = Accel::Hvf;
        assert!(
            plan_of(&c, DeviceSet::default()).is_ok(),
            "hvf is what VZ runs on"
        );
    }

    #[test]
    fn memfd_and_file_memory_are_refused() {
        let memfd = DeviceSet {
            memory: MemoryBackend::Memfd { shared: true },
            ..DeviceSet::default()
        };
        assert_eq!(feature(plan_of(&config(), memfd)), "memfd guest memory");
        let file = DeviceSet {
            memory: MemoryBackend::File {
                path: "/m".into(),
                shared: false,
            },
            ..DeviceSet::default()
        };
        assert_eq!(feature(plan_of(&config(), file)), "file-backed guest memory");
    }

    #[test]
    fn relative_and_non_utf8_paths_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let mut c = config();
        c.kernel = "relative/Image".into();
        assert!(matches!(
            plan_of(&c, DeviceSet::default()),
            Err(VzPlanError::Path { ref what, .. }) if what == "kernel"
        ));
        let mut d = disk("disk0", DiskFormat::Raw, CacheMode::Writeback, None);
        d.path = PathBuf::from(std::ffi::OsStr::from_bytes(b"/img/\xff.raw"));
        let devices = DeviceSet {
            disks: vec![d],
            ..DeviceSet::default()
        };
        assert!(matches!(
            plan_of(&config(), devices),
            Err(VzPlanError::Path { ref what, .. }) if what == "disk disk0"
        ));
    }

    #[test]
    fn a_nul_in_the_command_line_is_refused() {
        let mut c = config();
        c.cmdline = "a\0b".into();
        assert_eq!(plan_of(&c, DeviceSet::default()), Err(VzPlanError::Cmdline));
    }

    #[test]
    fn refusals_become_driver_errors_of_the_vz_backend() {
        let e: crate::driver::DriverError = unsupported("tap networking").into();
        assert!(matches!(
            e,
            crate::driver::DriverError::Unsupported {
                backend: BackendKind::Vz,
                feature: "tap networking"
            }
        ));
        let e: crate::driver::DriverError = VzPlanError::Cmdline.into();
        assert_eq!(e.kind(), crate::ErrorKind::Invalid);
    }

    #[test]
    fn the_plan_round_trips_as_json() {
        let devices = DeviceSet {
            disks: vec![disk(
                "root",
                DiskFormat::Raw,
                CacheMode::Writeback,
                Some("vmrs-root"),
            )],
            nics: vec![user_nic(0, vec![])],
            shared_dirs: vec![SharedFs {
                tag: "src".into(),
                host_path: "/src".into(),
                read_only: false,
                socket: "/vms/vz1/fs.sock".into(),
            }],
            agent: Some(AgentChannel::VirtioSerial {
                socket: "/vms/vz1/agent.sock".into(),
                process_log: None,
            }),
            entropy: true,
            ..DeviceSet::default()
        };
        let p = plan_of(&config(), devices).expect("plan");
        let json = serde_json::to_string(&p).expect("encode");
        assert_eq!(serde_json::from_str::<VzPlan>(&json).expect("decode"), p);
    }

    /// The words the NIC planner really writes for `nets`, as the manager passes them.
    fn planned_params(nets: &[NetworkAttachment]) -> Vec<String> {
        let plans = crate::net::plan("vz1", Path::new("/vms/vz1"), Path::new("/h"), nets).expect("plan");
        let mut words = vec!["vmrs.hostname=vz1".to_string()];
        words.extend(plans.iter().flat_map(crate::net::NicPlan::guest_cmdline));
        words.push("vmrs.fs=tag".to_string());
        words
    }

    #[test]
    fn nat_nics_ask_dhcp_instead_of_qemu_user_mode_addresses() {
        let mut c = config();
        c.networks = vec![NetworkAttachment::user(vec![]), NetworkAttachment::user(vec![])];
        let params = planned_params(&c.networks);
        // What QEMU's user-mode network would get: a static 10.0.2.15 with gateway and DNS.
        assert!(
            params.iter().any(|w| w.starts_with("vmrs.ip=10.0.2.15")),
            "{params:?}"
        );
        assert!(params.iter().any(|w| w.starts_with("vmrs.gw=")), "{params:?}");
        let spec = BootSpec {
            config: &c,
            vm_dir: Path::new("/vms/vz1"),
            serial_log: PathBuf::from("/vms/vz1/serial.log"),
            vmm_log: PathBuf::from("/vms/vz1/vmm.log"),
            devices: DeviceSet {
                nics: vec![user_nic(0, vec![]), user_nic(1, vec![])],
                ..DeviceSet::default()
            },
            guest_params: params,
        };
        let p = VzPlan::build(&spec, &VzLimits::FALLBACK).expect("plan");
        let words: Vec<&str> = p.boot.cmdline.split(' ').collect();
        assert!(
            words.contains(&"vmrs.ip=dhcp") && words.contains(&"vmrs.ip.eth1=dhcp"),
            "{words:?}"
        );
        for w in &words {
            assert!(
                !w.starts_with("vmrs.gw=") && !w.starts_with("vmrs.dns") && !w.contains("10.0.2."),
                "{w}"
            );
        }
        // Everything else survives, in order.
        let hostname = words
            .iter()
            .position(|w| *w == "vmrs.hostname=vz1")
            .expect("hostname");
        let fs = words.iter().position(|w| *w == "vmrs.fs=tag").expect("fs");
        assert!(hostname < fs);
    }

    #[test]
    fn only_nat_nics_are_rewritten() {
        let params: Vec<String> = [
            "vmrs.ip=10.0.2.15/24",
            "vmrs.gw=10.0.2.2",
            "vmrs.ip.eth1=192.168.9.3/24",
            "vmrs.dns.eth1=9.9.9.9",
            "vmrs.iptables=1",
            "vmrs.ipx.eth1=3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // eth1 is NAT, eth0 is not (say, a future bridged attachment): eth0's words stay.
        assert_eq!(
            nat_dhcp_params(&params, &[1]),
            [
                "vmrs.ip=10.0.2.15/24",
                "vmrs.gw=10.0.2.2",
                "vmrs.iptables=1",
                "vmrs.ipx.eth1=3",
                "vmrs.ip.eth1=dhcp"
            ]
        );
        assert_eq!(nat_dhcp_params(&params, &[]), params);
        // An already-DHCP NIC stays DHCP, once.
        let dhcp = vec!["vmrs.ip=dhcp".to_string()];
        assert_eq!(nat_dhcp_params(&dhcp, &[0]), ["vmrs.ip=dhcp"]);
    }

    #[test]
    fn a_fixed_address_on_a_nat_nic_is_refused() {
        let mut c = config();
        c.networks = vec![
            NetworkAttachment::user(vec![]),
            NetworkAttachment::User {
                port_forwards: vec![],
                mac: None,
                address: GuestAddress::Static("10.0.5.20/24".parse().expect("cidr")),
                via: crate::config::UserNat::Auto,
            },
        ];
        let devices = DeviceSet {
            nics: vec![user_nic(0, vec![]), user_nic(1, vec![])],
            ..DeviceSet::default()
        };
        let err = plan_of(&c, devices).expect_err("refused");
        assert!(matches!(err, VzPlanError::NatAddress { index: 1 }), "{err:?}");
        assert_eq!(err.kind(), crate::ErrorKind::Unsupported);
        assert!(err.to_string().contains("DHCP"), "{err}");
        // ip=dhcp is fine.
        c.networks[1] = NetworkAttachment::User {
            port_forwards: vec![],
            mac: None,
            address: GuestAddress::Dhcp,
            via: crate::config::UserNat::Auto,
        };
        let devices = DeviceSet {
            nics: vec![user_nic(0, vec![]), user_nic(1, vec![])],
            ..DeviceSet::default()
        };
        plan_of(&c, devices).expect("dhcp is accepted");
    }
}
