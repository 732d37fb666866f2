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

use crate::config::{BackendKind, VmConfig};
use crate::process::{ProcessError, VmmProcess};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What the manager hands a driver to boot one VM.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    /// The validated configuration.
    pub config: &'a VmConfig,
    /// The VM's own directory; the driver keeps its sockets and files here.
    pub vm_dir: &'a Path,
    /// File the guest serial console must be written to.
    pub serial_log: PathBuf,
    /// File the VMM's own stdout/stderr go to.
    pub vmm_log: PathBuf,
    /// Extra kernel command line parameters contributed by other subsystems (network config,
    /// agent channel, root disk).
    pub extra_cmdline: Vec<String>,
    /// Extra backend-specific VMM arguments contributed by other subsystems.
    pub extra_args: Vec<std::ffi::OsString>,
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
    /// VMM process start time (clock ticks since boot, `/proc/<pid>/stat` field 22); with `pid`
    /// it identifies the process so a reused pid is never signalled.
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
    /// This backend cannot do the operation.
    #[error("{backend} backend does not support {op}")]
    Unsupported {
        /// Backend.
        backend: BackendKind,
        /// Operation.
        op: &'static str,
    },
    /// Process bookkeeping failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
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
            op: "events",
        })
    }

    /// Save the VM's state into `dir` (the VM must be paused).
    async fn snapshot(&self, handle: &VmHandle, dir: &Path) -> Result<(), DriverError> {
        let _ = (handle, dir);
        Err(DriverError::Unsupported {
            backend: self.kind(),
            op: "snapshot",
        })
    }

    /// Launch a new VMM for `spec` from the snapshot in `dir` and return it running.
    async fn restore(&self, spec: &BootSpec<'_>, dir: &Path) -> Result<Launched, DriverError> {
        let _ = (spec, dir);
        Err(DriverError::Unsupported {
            backend: self.kind(),
            op: "restore",
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
            op: "resize",
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
            op: "add disk",
        })
    }

    /// Hot-plug a network device; returns the backend's device id.
    async fn add_net(&self, handle: &VmHandle, net: &TapNetwork) -> Result<String, DriverError> {
        let _ = (handle, net);
        Err(DriverError::Unsupported {
            backend: self.kind(),
            op: "add net",
        })
    }

    /// Hot-unplug a device by the id `add_disk`/`add_net` returned.
    async fn remove_device(&self, handle: &VmHandle, id: &str) -> Result<(), DriverError> {
        let _ = (handle, id);
        Err(DriverError::Unsupported {
            backend: self.kind(),
            op: "remove device",
        })
    }

    /// Device counters (bytes/ops per disk and NIC).
    async fn counters(&self, handle: &VmHandle) -> Result<Counters, DriverError> {
        let _ = handle;
        Err(DriverError::Unsupported {
            backend: self.kind(),
            op: "counters",
        })
    }

    /// The VMM's own description of the VM (backend-specific JSON).
    async fn info(&self, handle: &VmHandle) -> Result<serde_json::Value, DriverError> {
        let _ = handle;
        Err(DriverError::Unsupported {
            backend: self.kind(),
            op: "info",
        })
    }

    /// After the VMM process is gone: why it went away, from the backend's own records (event
    /// log, VMM log). `None` when the backend cannot tell; the manager then uses the exit status.
    async fn exit_reason(&self, handle: &VmHandle) -> Result<Option<VmmEvent>, DriverError> {
        let _ = handle;
        Ok(None)
    }
}

/// Whether `path` is a regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Find an executable called `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Resolve [`BackendKind::Auto`] (and check an explicit choice is available), returning a
/// driver. `VMRS_BACKEND` overrides `Auto`. `Auto` prefers Cloud Hypervisor when its binary is
/// found and KVM is usable, else QEMU.
pub fn detect(kind: BackendKind) -> Result<Arc<dyn VmDriver>, DriverError> {
    let kind = match kind {
        BackendKind::Auto => match std::env::var("VMRS_BACKEND") {
            Ok(v) if !v.is_empty() && v != "auto" => v.parse().map_err(|_| DriverError::Unsupported {
                backend: BackendKind::Auto,
                op: "VMRS_BACKEND value",
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
        #[allow(unreachable_patterns)]
        other => Err(DriverError::Unsupported {
            backend: other,
            op: "this host (backend not built in)",
        }),
    }
}
