//! The device model: what a VM is made of, as types every backend renders in its own syntax.
//!
//! The manager turns a [`VmConfig`] plus what other subsystems contribute (the NICs networking
//! planned, an image's root disk, the guest agent's channel) into one [`DeviceSet`], checks it
//! against the chosen backend's [`Capabilities`] *before any host side effect* (no VM
//! directory, TAP device or sidecar exists for a VM the backend cannot run), and hands it to the
//! driver in [`crate::driver::BootSpec`]. Each driver renders the set: QEMU as command-line
//! arguments (`crate::driver::qemu::args`), Cloud Hypervisor as its `vm.create` body. Nothing a
//! configuration asks for is ignored: a backend renders it or [`Capabilities::check`] refuses it
//! with [`DriverError::Unsupported`] naming the feature.
//!
//! | device | QEMU (microvm) | Cloud Hypervisor | Firecracker | VZ ([`crate::driver::vz::plan`]) |
//! |--------|----------------|------------------|-------------|----|
//! | [`Disk`] | `-blockdev` (JSON) + `virtio-blk-device` (serial) | `disks[]` (serial) | `/drives/{id}` (raw, no serial) | virtio-blk over a raw image (identifier) |
//! | [`Nic`] user | `-netdev user` + `hostfwd` | refused: a user-mode NIC left to `auto` becomes a TAP served by `slirp4netns` ([`crate::net::slirp`]) | the same | NAT attachment (no published ports) |
//! | [`Nic`] tap | `-netdev tap` | `net[]` with `tap` | `/network-interfaces/{id}` | refused |
//! | [`Nic`] switch | `-netdev dgram` (Unix) | refused | refused | refused |
//! | [`AgentChannel`] | virtio-serial port on a Unix socket; or vsock: `vhost-user-vsock-device` on a `vhost-device-vsock` sidecar ([`crate::vsock`]) | vsock only: `vsock` {cid, socket} (hybrid vsock on the VM's Unix socket) | vsock only: `/vsock` {guest_cid, uds_path} | vsock, bridged by `vmrs-vz` |
//! | [`SharedFs`] | `vhost-user-fs-device` on the virtiofsd socket (needs shared memory) | `fs[]` (needs `memory.shared`) | refused | virtio-fs device + directory share |
//! | entropy | `virtio-rng-device` | `rng` | `/entropy` | virtio entropy device |
//! | [`MemoryBackend`] | `memory-backend-memfd`/`-file` (default: a shared file in the VM directory, so a snapshot can copy it) | `memory.shared` | anonymous only | anonymous only |

use crate::config::{Accel, BackendKind, CacheMode, DiskFormat, MacAddr, VmConfig};
use crate::driver::DriverError;
use crate::net::NicBackend;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything attached to one VM, in guest order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSet {
    /// Block devices (`/dev/vda`, `/dev/vdb`, ... in this order).
    pub disks: Vec<Disk>,
    /// Network interfaces (`eth0`, `eth1`, ...).
    pub nics: Vec<Nic>,
    /// The guest agent's channel, when the VM has one.
    pub agent: Option<AgentChannel>,
    /// Host directories shared into the guest.
    pub shared_dirs: Vec<SharedFs>,
    /// A virtio entropy device fed from the host's `/dev/urandom`.
    pub entropy: bool,
    /// Where guest RAM lives.
    pub memory: MemoryBackend,
    /// Network namespace the VMM must run in (its TAP devices live there).
    pub netns: Option<PathBuf>,
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Backend device id, unique within the VM (`disk0`, `root`).
    pub id: String,
    /// Image file on the host (absolute).
    pub path: PathBuf,
    /// Image format; always given to the VMM, never probed.
    pub format: DiskFormat,
    /// Attach read-only.
    pub read_only: bool,
    /// Host cache mode.
    pub cache: CacheMode,
    /// Serial number the guest sees (`/sys/block/vdX/serial`); the guest init finds the root disk
    /// by it. At most [`MAX_DISK_SERIAL`] bytes of `[A-Za-z0-9_.-]`.
    pub serial: Option<String>,
}

/// Longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_DISK_SERIAL: usize = 20;

impl Disk {
    /// The disk for entry `index` of [`VmConfig::disks`].
    pub fn from_config(index: usize, disk: &crate::config::DiskConfig) -> Self {
        Disk {
            id: format!("disk{index}"),
            path: disk.path.clone(),
            format: disk.format,
            read_only: disk.read_only,
            cache: disk.cache,
            serial: None,
        }
    }
}

/// A virtio-net interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Position: `eth<index>` in the guest.
    pub index: usize,
    /// Guest MAC address.
    pub mac: MacAddr,
    /// What carries its frames on the host.
    pub backend: NicBackend,
}

impl Nic {
    /// Backend device id (`net<index>`).
    pub fn id(&self) -> String {
        format!("net{}", self.index)
    }
}

impl From<&crate::net::NicPlan> for Nic {
    fn from(p: &crate::net::NicPlan) -> Self {
        Nic {
            index: p.index,
            mac: p.mac,
            backend: p.backend.clone(),
        }
    }
}

/// How the host reaches the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AgentChannel {
    /// A virtio-serial port named [`vmrs_proto::PORT_NAME`]; the VMM listens on `socket`.
    VirtioSerial {
        /// Host end (a Unix socket the VMM serves).
        socket: PathBuf,
        /// A second port, [`vmrs_proto::LOG_PORT_NAME`], whose output the VMM appends to this
        /// file: the main process's output of an image VM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        process_log: Option<PathBuf>,
    },
    /// virtio-vsock: the guest agent listens on vsock `port` ([`vmrs_proto::VSOCK_PORT`]);
    /// the host reaches it through the hybrid-vsock Unix socket `socket` (`CONNECT <port>\n`,
    /// see [`crate::agent::hybrid`]).
    Vsock {
        /// The guest's context id.
        cid: u32,
        /// Guest port of the agent.
        port: u32,
        /// The hybrid-vsock Unix socket the host connects to (the VMM, or the
        /// `vhost-device-vsock` sidecar on QEMU, listens on it).
        socket: PathBuf,
        /// QEMU: the vhost-user socket of the `vhost-device-vsock` sidecar ([`crate::vsock`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vhost_user: Option<PathBuf>,
        /// As for [`AgentChannel::VirtioSerial`]: where the main process's output goes (QEMU
        /// keeps a virtio-serial `vmrs.log` port for it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        process_log: Option<PathBuf>,
    },
}

/// The agent transports a backend can give a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AgentTransport {
    /// virtio-serial (QEMU).
    VirtioSerial,
    /// virtio-vsock, over the hybrid-vsock Unix socket (Cloud Hypervisor, Firecracker; QEMU
    /// with the `vhost-device-vsock` sidecar).
    Vsock,
}

impl std::str::FromStr for AgentTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "serial" | "virtio-serial" => Ok(AgentTransport::VirtioSerial),
            "vsock" => Ok(AgentTransport::Vsock),
            other => Err(format!(
                "unknown agent transport {other:?} (expected serial or vsock)"
            )),
        }
    }
}

impl AgentChannel {
    /// Which transport this is.
    pub fn transport(&self) -> AgentTransport {
        match self {
            AgentChannel::VirtioSerial { .. } => AgentTransport::VirtioSerial,
            AgentChannel::Vsock { .. } => AgentTransport::Vsock,
        }
    }
}

/// A host directory shared over virtio-fs: a vhost-user-fs device whose backend is a virtiofsd
/// sidecar serving `host_path` on `socket` (see [`crate::virtiofs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedFs {
    /// Tag the guest mounts.
    pub tag: String,
    /// Directory on the host.
    pub host_path: PathBuf,
    /// Share read-only (the daemon enforces it).
    pub read_only: bool,
    /// The virtiofsd's vhost-user socket (in the VM directory, [`crate::vm_dir::VmDir::fs_socket`]);
    /// the VMM connects to it.
    #[serde(default)]
    pub socket: PathBuf,
}

/// Where guest RAM lives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MemoryBackend {
    /// Private anonymous memory (the VMM's default).
    #[default]
    Anonymous,
    /// A memfd, shareable with vhost-user sidecars (virtio-fs, vsock) when `shared`.
    Memfd {
        /// Map it shared.
        shared: bool,
    },
    /// A file (e.g. a snapshot's RAM image); `shared` maps it `MAP_SHARED`, otherwise private
    /// copy-on-write.
    File {
        /// The file.
        path: PathBuf,
        /// Map it shared.
        shared: bool,
    },
}

/// The kinds of [`MemoryBackend`], for [`Capabilities`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryKind {
    /// [`MemoryBackend::Anonymous`]
    Anonymous,
    /// [`MemoryBackend::Memfd`]
    Memfd,
    /// [`MemoryBackend::File`]
    File,
}

impl MemoryBackend {
    /// Its kind.
    pub fn kind(&self) -> MemoryKind {
        match self {
            MemoryBackend::Anonymous => MemoryKind::Anonymous,
            MemoryBackend::Memfd { .. } => MemoryKind::Memfd,
            MemoryBackend::File { .. } => MemoryKind::File,
        }
    }
}

/// What a backend can do, answered before anything is created. Verbs a backend lacks answer
/// [`DriverError::Unsupported`] when called; these fields let callers ask first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Accelerators it can be asked for ([`Accel::Auto`] is always accepted when one of the
    /// others is).
    pub accels: &'static [Accel],
    /// Disk image formats.
    pub disk_formats: &'static [DiskFormat],
    /// Disk cache modes.
    pub cache_modes: &'static [CacheMode],
    /// Disk serial numbers (needed for an image root disk).
    pub disk_serial: bool,
    /// User-mode NAT NICs.
    pub nic_user: bool,
    /// Published ports (`-p`) on a user-mode NIC (QEMU's `hostfwd`; VZ's NAT has none).
    pub nic_user_port_forwards: bool,
    /// A guest address the user fixes on a user-mode NIC (QEMU's user-mode network takes any;
    /// VZ's NAT hands out addresses by DHCP only).
    pub nic_user_fixed_address: bool,
    /// TAP NICs (plain or on a bridge).
    pub nic_tap: bool,
    /// NICs on a vm-rs switch network (Unix datagram sockets).
    pub nic_switch: bool,
    /// Running the VMM inside a network namespace.
    pub netns: bool,
    /// Guest agent transports, best first.
    pub agent_transports: &'static [AgentTransport],
    /// Every VM gets the agent unless its config says otherwise (QEMU, VZ); `false`: only a VM
    /// that needs it (an image's process) or asks for it ([`crate::VmConfig::agent_transport`])
    /// — Cloud Hypervisor and Firecracker, whose vsock device makes a VM unsnapshottable here
    /// (a restored clone would bind the source's vsock socket).
    pub agent_default: bool,
    /// Shared directories (virtio-fs).
    pub shared_dirs: bool,
    /// Entropy device.
    pub entropy: bool,
    /// Guest RAM backends.
    pub memory: &'static [MemoryKind],
    /// Pause/resume.
    pub pause: bool,
    /// Snapshot of a running VM.
    pub snapshot: bool,
    /// CPU/memory resize of a running VM.
    pub resize: bool,
    /// Disk and NIC hot-plug.
    pub hotplug: bool,
    /// Device counters.
    pub counters: bool,
}

impl Capabilities {
    /// Check `config` and the devices built for it; the first feature this backend lacks is
    /// a [`DriverError::Unsupported`].
    pub fn check(
        &self,
        backend: BackendKind,
        config: &VmConfig,
        devices: &DeviceSet,
    ) -> Result<(), DriverError> {
        let refuse = |feature: &'static str| DriverError::Unsupported { backend, feature };
        if config.accel != Accel::Auto && !self.accels.contains(&config.accel) {
            return Err(refuse(match config.accel {
                Accel::Kvm => "kvm acceleration",
                Accel::Hvf => "hvf acceleration",
                _ => "tcg (software) acceleration",
            }));
        }
        for d in &devices.disks {
            if !self.disk_formats.contains(&d.format) {
                return Err(refuse(match d.format {
                    DiskFormat::Raw => "raw disks",
                    DiskFormat::Qcow2 => "qcow2 disks",
                }));
            }
            if !self.cache_modes.contains(&d.cache) {
                return Err(refuse(match d.cache {
                    CacheMode::Writeback => "cache=writeback disks",
                    CacheMode::None => "cache=none disks",
                    CacheMode::Unsafe => "cache=unsafe disks",
                }));
            }
            if d.serial.is_some() && !self.disk_serial {
                return Err(refuse("disk serial numbers (an image root disk)"));
            }
        }
        for n in &devices.nics {
            let ok = match n.backend {
                NicBackend::User { .. } => self.nic_user,
                NicBackend::Tap { .. } => self.nic_tap,
                NicBackend::Switch { .. } => self.nic_switch,
            };
            if !ok {
                return Err(refuse(match n.backend {
                    NicBackend::User { .. } => "user-mode networking (--net user, -p without a bridge)",
                    NicBackend::Tap { .. } => "tap networking",
                    NicBackend::Switch { .. } => "switch networks",
                }));
            }
        }
        if self.nic_user {
            for net in &config.networks {
                if let crate::config::NetworkAttachment::User {
                    port_forwards,
                    address,
                    ..
                } = net
                {
                    if !port_forwards.is_empty() && !self.nic_user_port_forwards {
                        return Err(refuse("published ports (-p) on a user-mode network"));
                    }
                    if matches!(address, crate::config::GuestAddress::Static(_))
                        && !self.nic_user_fixed_address
                    {
                        return Err(refuse(
                            "a fixed guest address on a user-mode network (its NAT assigns addresses by DHCP)",
                        ));
                    }
                }
            }
        }
        if devices.netns.is_some() && !self.netns {
            return Err(refuse("running the vmm in a network namespace"));
        }
        if let Some(a) = &devices.agent {
            if !self.agent_transports.contains(&a.transport()) {
                return Err(refuse(match a.transport() {
                    AgentTransport::VirtioSerial => "the guest agent over virtio-serial",
                    AgentTransport::Vsock => "the guest agent over vsock",
                }));
            }
        }
        if !devices.shared_dirs.is_empty() && !self.shared_dirs {
            return Err(refuse("shared directories (virtio-fs)"));
        }
        let shared_memory = matches!(
            devices.memory,
            MemoryBackend::Memfd { shared: true } | MemoryBackend::File { shared: true, .. }
        );
        if !devices.shared_dirs.is_empty() && !shared_memory {
            return Err(refuse("shared directories without shared guest memory"));
        }
        if devices.entropy && !self.entropy {
            return Err(refuse("an entropy device"));
        }
        if !self.memory.contains(&devices.memory.kind()) {
            return Err(refuse(match devices.memory.kind() {
                MemoryKind::Anonymous => "anonymous guest memory",
                MemoryKind::Memfd => "memfd guest memory",
                MemoryKind::File => "file-backed guest memory",
            }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkAttachment;

    fn caps() -> Capabilities {
        Capabilities {
            accels: &[Accel::Kvm],
            disk_formats: &[DiskFormat::Raw],
            cache_modes: &[CacheMode::Writeback],
            disk_serial: false,
            nic_user: false,
            nic_user_port_forwards: false,
            nic_user_fixed_address: false,
            nic_tap: true,
            nic_switch: false,
            netns: false,
            agent_transports: &[],
            agent_default: false,
            shared_dirs: false,
            entropy: false,
            memory: &[MemoryKind::Anonymous],
            pause: true,
            snapshot: false,
            resize: false,
            hotplug: false,
            counters: false,
        }
    }

    fn feature(r: Result<(), DriverError>) -> &'static str {
        match r {
            Err(DriverError::Unsupported { feature, .. }) => feature,
            other => panic!("expected unsupported, got {other:?}"),
        }
    }

    #[test]
    fn each_missing_feature_is_named() {
        let c = caps();
        let cfg = VmConfig::builder("a").kernel("/k").build_unchecked();
        let b = BackendKind::CloudHypervisor;
        assert!(c.check(b, &cfg, &DeviceSet::default()).is_ok());
        let tcg = VmConfig {
            accel: Accel::Tcg,
            ..cfg.clone()
        };
        assert_eq!(
            feature(c.check(b, &tcg, &DeviceSet::default())),
            "tcg (software) acceleration"
        );
        let disk = Disk {
            id: "d".into(),
            path: "/x".into(),
            format: DiskFormat::Qcow2,
            read_only: false,
            cache: CacheMode::Writeback,
            serial: None,
        };
        let set = |f: &dyn Fn(&mut DeviceSet)| {
            let mut s = DeviceSet::default();
            f(&mut s);
            s
        };
        let qcow = set(&|s| s.disks.push(disk.clone()));
        assert_eq!(feature(c.check(b, &cfg, &qcow)), "qcow2 disks");
        let serial = set(&|s| {
            s.disks.push(Disk {
                format: DiskFormat::Raw,
                serial: Some("vmrs-root".into()),
                ..disk.clone()
            })
        });
        assert!(feature(c.check(b, &cfg, &serial)).contains("serial"));
        let user = crate::net::plan(
            "a",
            "/v".as_ref(),
            "/h".as_ref(),
            &[NetworkAttachment::user(Vec::new())],
        )
        .expect("plan");
        let nics = set(&|s| s.nics = user.iter().map(Nic::from).collect());
        assert!(feature(c.check(b, &cfg, &nics)).starts_with("user-mode networking"));
        let agent = set(&|s| {
            s.agent = Some(AgentChannel::VirtioSerial {
                socket: "/v/agent.sock".into(),
                process_log: None,
            })
        });
        assert!(feature(c.check(b, &cfg, &agent)).contains("agent"));
        let shared = set(&|s| {
            s.shared_dirs.push(SharedFs {
                tag: "t".into(),
                host_path: "/tmp".into(),
                read_only: false,
                socket: "/v/fs0.sock".into(),
            })
        });
        assert!(feature(c.check(b, &cfg, &shared)).contains("virtio-fs"));
        let rng = set(&|s| s.entropy = true);
        assert_eq!(feature(c.check(b, &cfg, &rng)), "an entropy device");
        let mem = set(&|s| s.memory = MemoryBackend::Memfd { shared: true });
        assert_eq!(feature(c.check(b, &cfg, &mem)), "memfd guest memory");
        let ns = set(&|s| s.netns = Some("/var/run/netns/x".into()));
        assert!(feature(c.check(b, &cfg, &ns)).contains("namespace"));
    }
}
