//! Hypervisor backends behind one trait, [`VmDriver`].
//!
//! A driver knows how to launch its VMM for a [`BootSpec`] and how to talk to a running one
//! through the [`VmHandle`] persisted in the VM's state record, so every verb works from a new
//! process too. Process identity (pid + start time) and signalling live in
//! [`crate::process`], shared by all backends; state bookkeeping lives in the manager.
//!
//! [`detect`] picks the backend for [`BackendKind::Auto`].

#[cfg(feature = "cloud-hypervisor")]
pub mod cloud_hypervisor;
#[cfg(feature = "qemu")]
pub mod qemu;
pub mod vz;

use crate::config::{BackendKind, VmConfig};
use crate::process::{ProcessError, VmmProcess};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the manager hands a driver to boot one VM: the configuration and the typed devices
/// built from it ([`crate::devices`]), already checked against [`VmDriver::capabilities`].
/// Drivers render `devices`; they do not read devices from `config` again.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    /// The validated configuration (name, CPUs, memory, kernel, initramfs, user command line,
    /// accelerator).
    pub config: &'a VmConfig,
    /// The VM's own directory; the driver keeps its sockets and files here.
    pub vm_dir: &'a Path,
    /// File the guest serial console must be written to.
    pub serial_log: PathBuf,
    /// File the VMM's own stdout/stderr go to.
    pub vmm_log: PathBuf,
    /// Every device of the VM.
    pub devices: crate::devices::DeviceSet,
    /// Kernel parameters for the guest init from other subsystems (network addressing, root
    /// disk); the same words on every backend.
    pub guest_params: Vec<String>,
}

/// Identity of a running VMM and how to reach it; persisted in the VM's state record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandle {
    /// VM name.
    pub name: String,
    /// Backend that runs it.
    pub backend: BackendKind,
    /// VMM process id.
    pub pid: u32,
    /// VMM process start time (on Linux clock ticks since boot, `/proc/<pid>/stat` field 22;
    /// on macOS microseconds since the epoch, see [`crate::host::proc`]); with `pid` it
    /// identifies the process so a reused pid is never signalled.
    pub start_time: u64,
    /// Control socket (QMP for QEMU, REST API for Cloud Hypervisor).
    pub api_socket: PathBuf,
    /// Secondary socket for the event stream, when the backend uses one.
    #[serde(default)]
    pub event_socket: Option<PathBuf>,
    /// Serial console log.
    pub serial_log: PathBuf,
    /// Acceleration actually used (`kvm`, `tcg`), when the backend reports one.
    #[serde(default)]
    pub accel: Option<String>,
}

/// What the VMM says the guest is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmStatus {
    /// vCPUs run.
    Running,
    /// vCPUs are stopped.
    Paused,
    /// The guest shut down (the VMM may be about to exit).
    Shutdown,
    /// Anything else (e.g. an internal error state).
    Other,
}

/// Asynchronous events from the VMM, consumed instead of polling.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmmEvent {
    /// vCPUs stopped.
    Paused,
    /// vCPUs resumed.
    Resumed,
    /// The guest powered off or the VMM was asked to quit; `guest` is true when the guest did it.
    Shutdown {
        /// The guest initiated the shutdown (power-off from inside).
        guest: bool,
        /// Backend's reason string.
        reason: String,
    },
    /// The guest or VMM hit an error (e.g. guest panic, vCPU internal error).
    Error {
        /// Description.
        reason: String,
    },
}

/// Errors from a backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The VMM binary is not installed.
    #[error("{program} not found (looked in {searched}); {hint}")]
    BinaryNotFound {
        /// Program name.
        program: String,
        /// Where we looked.
        searched: String,
        /// How to get it.
        hint: &'static str,
    },
    /// Launching the VMM failed.
    #[error("failed to launch {program}")]
    Spawn {
        /// Program.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMM exited during boot.
    #[error("{program} exited during boot: {detail}")]
    BootFailed {
        /// Program.
        program: String,
        /// Last lines of the VMM log or exit status.
        detail: String,
    },
    /// A host port the VM publishes is taken by another program, so the VMM refused to start.
    #[error("host port {addr}/{protocol} is already in use ({program}: {vmm_message})")]
    HostPortInUse {
        /// Host address and port.
        addr: std::net::SocketAddr,
        /// Protocol.
        protocol: crate::config::Protocol,
        /// Program.
        program: String,
        /// The VMM's own words.
        vmm_message: String,
    },
    /// Hardware acceleration was requested but cannot be used.
    #[error("kvm acceleration is not usable: {reason}")]
    AccelUnavailable {
        /// Why.
        reason: String,
    },
    /// The control socket could not be reached or broke.
    #[error("cannot reach {what} at {}", path.display())]
    Connect {
        /// "QMP socket", "API socket".
        what: &'static str,
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMM answered a command with an error.
    #[error("{command} failed: {message}")]
    Command {
        /// Command name.
        command: String,
        /// Error class/description from the VMM.
        message: String,
    },
    /// The VMM sent something that does not follow its protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Timed out waiting for the VMM.
    #[error("timed out after {secs:.1}s waiting for {what}")]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        secs: f64,
    },
    /// This backend cannot do what was asked (a device, a setting or a verb).
    #[error("the {backend} backend does not support {feature}")]
    Unsupported {
        /// Backend.
        backend: BackendKind,
        /// What it cannot do.
        feature: &'static str,
    },
    /// Process bookkeeping failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The VM cannot run on Virtualization.framework as configured (see [`vz::plan`]).
    #[error(transparent)]
    Vz(vz::plan::VzPlanError),
    /// The serial console's capture (the capped log's sidecar) could not be set up.
    #[error("cannot capture the serial console")]
    Console(#[from] crate::console::capture::CaptureError),
    /// What the backend would pass the VMM breaks a limit of the configuration (the whole
    /// kernel command line); found before anything starts.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// File I/O in the VM directory failed.
    #[error("i/o error on {}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl DriverError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            DriverError::BinaryNotFound { .. }
            | DriverError::Spawn { .. }
            | DriverError::BootFailed { .. }
            | DriverError::Connect { .. }
            | DriverError::Command { .. }
            | DriverError::Protocol(_) => K::Backend,
            DriverError::AccelUnavailable { .. } | DriverError::Unsupported { .. } => K::Unsupported,
            DriverError::HostPortInUse { .. } => K::Conflict,
            DriverError::Timeout { .. } => K::Timeout,
            DriverError::Process(e) => e.kind(),
            DriverError::Console(e) => e.kind(),
            DriverError::Io { .. } => K::Other,
            DriverError::Config(e) => e.kind(),
            DriverError::Vz(e) => e.kind(),
        }
    }
}

/// A launched VMM: its handle to persist and the process to watch.
#[derive(Debug)]
pub struct Launched {
    /// Handle for the state record.
    pub handle: VmHandle,
    /// The process (our child).
    pub process: VmmProcess,
}

/// A network device to hot-plug: a host TAP device (created by the VMM when `tap` is `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapNetwork {
    /// Existing host TAP interface to attach; `None` lets the backend create one.
    #[serde(default)]
    pub tap: Option<String>,
    /// Guest MAC address (`52:54:00:..`); `None` lets the backend pick one.
    #[serde(default)]
    pub mac: Option<String>,
}

/// Per-device counters: device id -> counter name -> value.
pub type Counters = std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>;

/// Event stream from a VMM; ends when the VMM goes away.
pub type EventStream = futures::stream::BoxStream<'static, VmmEvent>;

/// A hypervisor backend.
#[async_trait::async_trait]
pub trait VmDriver: Send + Sync + std::fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// What this backend can run; the manager checks a VM's devices against it before
    /// creating anything ([`crate::devices::Capabilities::check`]).
    fn capabilities(&self) -> crate::devices::Capabilities;

    /// Launch the VMM for `spec` and return once its control socket answers. The guest boots
    /// asynchronously; readiness comes from the serial console.
    async fn boot(&self, spec: &BootSpec<'_>) -> Result<Launched, DriverError>;

    /// Ask the VMM what the guest is doing.
    async fn status(&self, handle: &VmHandle) -> Result<VmmStatus, DriverError>;

    /// Stop the vCPUs.
    async fn pause(&self, handle: &VmHandle) -> Result<(), DriverError>;

    /// Resume the vCPUs.
    async fn resume(&self, handle: &VmHandle) -> Result<(), DriverError>;

    /// Press the ACPI power button so the guest shuts down cleanly.
    async fn request_shutdown(&self, handle: &VmHandle) -> Result<(), DriverError>;

    /// Ask the VMM to exit now (no guest cooperation).
    async fn quit(&self, handle: &VmHandle) -> Result<(), DriverError>;

    /// Subscribe to VMM events (pause/resume/shutdown). Backends without an event channel return
    /// [`DriverError::Unsupported`]; the manager then relies on process exit alone.
    async fn events(&self, handle: &VmHandle) -> Result<EventStream, DriverError> {
        let _ = handle;
        Err(DriverError::Unsupported {
            backend: self.kind(),
            feature: "events",
        })
    }

    /// Save the VM's state into `dir` (the VM must be paused).
    async fn snapshot(&self, handle: &VmHandle, dir: &Path) -> Result<(), DriverError> {
        let _ = (handle, dir);
        Err(DriverError::Unsupported {
            backend: self.kind(),
            feature: "snapshot",
        })
    }

    /// Launch a new VMM for `spec` from the snapshot in `dir` and return it running.
    async fn restore(&self, spec: &BootSpec<'_>, dir: &Path) -> Result<Launched, DriverError> {
        let _ = (spec, dir);
        Err(DriverError::Unsupported {
            backend: self.kind(),
            feature: "restore",
        })
    }

    /// Change the number of vCPUs and/or the memory size of a running VM.
    async fn resize(
        &self,
        handle: &VmHandle,
        cpus: Option<u32>,
        memory_mib: Option<u64>,
    ) -> Result<(), DriverError> {
        let _ = (handle, cpus, memory_mib);
        Err(DriverError::Unsupported {
            backend: self.kind(),
            feature: "resize",
        })
    }

    /// Hot-plug a disk; returns the backend's device id (for [`VmDriver::remove_device`]).
    async fn add_disk(
        &self,
        handle: &VmHandle,
        disk: &crate::config::DiskConfig,
    ) -> Result<String, DriverError> {
        let _ = (handle, disk);
        Err(DriverError::Unsupported {
            backend: self.kind(),
            feature: "add disk",
        })
    }

    /// Hot-plug a network device; returns the backend's device id.
    async fn add_net(&self, handle: &VmHandle, net: &TapNetwork) -> Result<String, DriverError> {
        let _ = (handle, net);
        Err(DriverError::Unsupported {
            backend: self.kind(),
            feature: "add net",
        })
    }

    /// Hot-unplug a device by the id `add_disk`/`add_net` returned.
    async fn remove_device(&self, handle: &VmHandle, id: &str) -> Result<(), DriverError> {
        let _ = (handle, id);
        Err(DriverError::Unsupported {
            backend: self.kind(),
            feature: "remove device",
        })
    }

    /// Device counters (bytes/ops per disk and NIC).
    async fn counters(&self, handle: &VmHandle) -> Result<Counters, DriverError> {
        let _ = handle;
        Err(DriverError::Unsupported {
            backend: self.kind(),
            feature: "counters",
        })
    }

    /// The VMM's own description of the VM (backend-specific JSON).
    async fn info(&self, handle: &VmHandle) -> Result<serde_json::Value, DriverError> {
        let _ = handle;
        Err(DriverError::Unsupported {
            backend: self.kind(),
            feature: "info",
        })
    }

    /// After the VMM process is gone: why it went away, from the backend's own records (event
    /// log, VMM log). `None` when the backend cannot tell; the manager then uses the exit status.
    async fn exit_reason(&self, handle: &VmHandle) -> Result<Option<VmmEvent>, DriverError> {
        let _ = handle;
        Ok(None)
    }
}

/// Resolve [`BackendKind::Auto`] (and check an explicit choice is available), returning a
/// driver. `VMRS_BACKEND` overrides `Auto`. `Auto` prefers Cloud Hypervisor when its binary is
/// found and KVM is usable, on macOS Virtualization.framework when `vmrs-vz` is found, else
/// QEMU.
pub fn detect(kind: BackendKind) -> Result<Arc<dyn VmDriver>, DriverError> {
    let kind = match kind {
        BackendKind::Auto => match std::env::var("VMRS_BACKEND") {
            Ok(v) if !v.is_empty() && v != "auto" => v.parse().map_err(|_| DriverError::Unsupported {
                backend: BackendKind::Auto,
                feature: "VMRS_BACKEND value",
            })?,
            _ => auto_backend(),
        },
        k => k,
    };
    #[cfg(feature = "cloud-hypervisor")]
    if kind == BackendKind::CloudHypervisor {
        cloud_hypervisor::find_binary(None)?;
    }
    driver_for(kind)
}

/// The backend `Auto` resolves to on this host.
pub fn auto_backend() -> BackendKind {
    #[cfg(all(target_os = "macos", feature = "vz"))]
    if vz::VzDriver::new().find_binary().is_ok() {
        return BackendKind::Vz;
    }
    #[cfg(feature = "cloud-hypervisor")]
    if cloud_hypervisor::find_binary(None).is_ok() && cloud_hypervisor::kvm_usable().is_ok() {
        return BackendKind::CloudHypervisor;
    }
    BackendKind::Qemu
}

/// The driver for a concrete backend (used when reattaching to a recorded VM).
pub fn driver_for(kind: BackendKind) -> Result<Arc<dyn VmDriver>, DriverError> {
    match kind {
        #[cfg(feature = "qemu")]
        BackendKind::Qemu | BackendKind::Auto => Ok(Arc::new(qemu::QemuDriver::new())),
        #[cfg(feature = "cloud-hypervisor")]
        BackendKind::CloudHypervisor => Ok(Arc::new(cloud_hypervisor::CloudHypervisorDriver::new())),
        #[cfg(all(target_os = "macos", feature = "vz"))]
        BackendKind::Vz => Ok(Arc::new(vz::VzDriver::new())),
        #[allow(unreachable_patterns)]
        other => Err(DriverError::Unsupported {
            backend: other,
            feature: "this host (backend not built in)",
        }),
    }
}
