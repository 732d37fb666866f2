//! Hypervisor backends behind one trait, [`VmDriver`].
//!
//! A driver knows how to launch its VMM for a [`BootSpec`] and how to talk to a running one
//! through the [`VmHandle`] persisted in the VM's state record, so every verb works from a new
//! process too. Process identity (pid + start time) and signalling live in
//! [`crate::process`], shared by all backends; state bookkeeping lives in the manager.
//!
//! [`detect`] and [`choose`] pick the backend for [`BackendKind::Auto`]; [`choose`] also weighs
//! what the VM needs against each backend's capabilities and says why it picked one.

#[cfg(feature = "cloud-hypervisor")]
pub mod cloud_hypervisor;
#[cfg(feature = "firecracker")]
pub mod firecracker;
#[cfg(any(feature = "cloud-hypervisor", feature = "firecracker"))]
pub mod http;
#[cfg(feature = "qemu")]
pub mod qemu;
#[cfg(any(feature = "cloud-hypervisor", feature = "firecracker"))]
pub mod vmlinux;
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

    /// Where guest RAM lives when nothing else asks for a backend: what the backend needs to
    /// [`snapshot`](Self::snapshot) the VM cheaply (QEMU: a shared file in `vm_dir`).
    fn preferred_memory(&self, vm_dir: &Path) -> crate::devices::MemoryBackend {
        let _ = vm_dir;
        crate::devices::MemoryBackend::Anonymous
    }

    /// Save the VM's state into the snapshot directory `dir` (the VM must be paused); the
    /// files are the backend's ([`crate::snapshot::SnapshotDir`] names them).
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

/// Find a VMM program: `explicit`, else the path in the environment variable `env`, else
/// `program` on `PATH`; the error says where it looked and `hint`.
pub(crate) fn find_program(
    explicit: Option<&Path>,
    env: &str,
    program: &str,
    hint: &'static str,
) -> Result<PathBuf, DriverError> {
    let mut searched = Vec::new();
    if let Some(p) = explicit {
        if crate::host::is_executable(p) {
            return Ok(p.to_path_buf());
        }
        searched.push(p.display().to_string());
    }
    if let Some(v) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if crate::host::is_executable(&p) {
            return Ok(p);
        }
        searched.push(format!("{env}={}", p.display()));
    }
    if let Some(p) = crate::host::find_on_path(program) {
        return Ok(p);
    }
    if std::env::var_os("PATH").is_some() {
        searched.push("PATH".into());
    }
    Err(DriverError::BinaryNotFound {
        program: program.into(),
        searched: searched.join(", "),
        hint,
    })
}

/// Resolve [`BackendKind::Auto`] (and check an explicit choice is available), returning a
/// driver. `VMRS_BACKEND` overrides `Auto`. `Auto` takes the first backend of
/// [`auto_backend`] (on macOS Virtualization.framework when `vmrs-vz` is found); [`choose`]
/// also weighs what a VM needs.
pub fn detect(kind: BackendKind) -> Result<Arc<dyn VmDriver>, DriverError> {
    let kind = match kind {
        BackendKind::Auto => match env_backend()? {
            Some(k) => k,
            None => auto_backend(),
        },
        k => k,
    };
    check_installed(kind)?;
    driver_for(kind)
}

/// `VMRS_BACKEND`, when it names a concrete backend.
fn env_backend() -> Result<Option<BackendKind>, DriverError> {
    match std::env::var("VMRS_BACKEND") {
        Ok(v) if !v.is_empty() && v != "auto" => v.parse().map(Some).map_err(|_| DriverError::Unsupported {
            backend: BackendKind::Auto,
            feature: "VMRS_BACKEND value",
        }),
        _ => Ok(None),
    }
}

/// The binary of `kind`, when the backend has one to find (QEMU's is found at boot).
fn check_installed(kind: BackendKind) -> Result<Option<PathBuf>, DriverError> {
    match kind {
        #[cfg(feature = "cloud-hypervisor")]
        BackendKind::CloudHypervisor => cloud_hypervisor::find_binary(None).map(Some),
        #[cfg(feature = "firecracker")]
        BackendKind::Firecracker => firecracker::find_binary(None).map(Some),
        #[cfg(all(target_os = "macos", feature = "vz"))]
        BackendKind::Vz => vz::VzDriver::new().find_binary().map(Some),
        _ => Ok(None),
    }
}

/// The KVM-only backends `Auto` considers, best first (Cloud Hypervisor can do more: resize,
/// hot-plug, qcow2, disk serials; Firecracker is the smaller VMM).
const KVM_BACKENDS: &[BackendKind] = &[
    #[cfg(feature = "cloud-hypervisor")]
    BackendKind::CloudHypervisor,
    #[cfg(feature = "firecracker")]
    BackendKind::Firecracker,
];

/// The backend `Auto` resolves to on this host when nothing about the VM is known: the first
/// installed KVM-only backend when KVM is usable, else QEMU.
pub fn auto_backend() -> BackendKind {
    #[cfg(all(target_os = "macos", feature = "vz"))]
    if vz::VzDriver::new().find_binary().is_ok() {
        return BackendKind::Vz;
    }
    if crate::host::kvm::usable().is_ok() {
        for &k in KVM_BACKENDS {
            if check_installed(k).is_ok() {
                return k;
            }
        }
    }
    BackendKind::Qemu
}

/// A backend chosen for one VM, and why (logged, and shown by `inspect`).
#[derive(Debug, Clone)]
pub struct BackendChoice {
    /// The driver.
    pub driver: Arc<dyn VmDriver>,
    /// Why this backend, in words.
    pub reason: String,
}

/// Choose the backend for a VM whose config asks for `kind`. An explicit backend (or
/// `VMRS_BACKEND`) is taken as it is, once its binary is found. For `Auto`, with usable KVM,
/// the first installed KVM-only backend (Cloud Hypervisor, then Firecracker) that `fits` —
/// the VM's devices pass its [`VmDriver::capabilities`] — is taken; otherwise QEMU, which runs
/// everything. The reason names what was skipped and why.
pub fn choose(
    kind: BackendKind,
    fits: &dyn Fn(&dyn VmDriver) -> Result<(), DriverError>,
) -> Result<BackendChoice, DriverError> {
    let explicit = match kind {
        BackendKind::Auto => env_backend()?.map(|k| (k, "set by VMRS_BACKEND")),
        k => Some((k, "asked for")),
    };
    if let Some((k, why)) = explicit {
        check_installed(k)?;
        return Ok(BackendChoice {
            driver: driver_for(k)?,
            reason: format!("{k}: {why}"),
        });
    }
    // on macOS, Virtualization.framework when its host process is installed and the VM fits
    #[cfg(all(target_os = "macos", feature = "vz"))]
    if check_installed(BackendKind::Vz).is_ok() {
        let vz = vz::VzDriver::new();
        if fits(&vz).is_ok() {
            return Ok(BackendChoice {
                driver: Arc::new(vz),
                reason: "vz: Virtualization.framework (vmrs-vz found)".into(),
            });
        }
    }
    choose_auto(crate::host::kvm::usable().map(drop), &check_installed, fits)
}

/// [`choose`] for `Auto`, given the KVM verdict and how to find a backend's binary.
fn choose_auto(
    kvm: Result<(), String>,
    installed: &dyn Fn(BackendKind) -> Result<Option<PathBuf>, DriverError>,
    fits: &dyn Fn(&dyn VmDriver) -> Result<(), DriverError>,
) -> Result<BackendChoice, DriverError> {
    let mut skipped = Vec::new();
    match kvm {
        Ok(()) => {
            for &k in KVM_BACKENDS {
                let bin = match installed(k) {
                    Ok(b) => b,
                    Err(_) => {
                        skipped.push(format!("{k} is not installed"));
                        continue;
                    }
                };
                let driver = driver_for(k)?;
                match fits(driver.as_ref()) {
                    Ok(()) => {
                        let at = bin.map(|b| format!(" ({})", b.display())).unwrap_or_default();
                        let mut reason =
                            format!("{k}{at}: KVM is usable and it runs everything this vm needs");
                        if !skipped.is_empty() {
                            reason.push_str(&format!("; {}", skipped.join("; ")));
                        }
                        return Ok(BackendChoice { driver, reason });
                    }
                    Err(DriverError::Unsupported { feature, .. }) => {
                        skipped.push(format!("{k} does not support {feature}"));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(why) => skipped.push(format!("KVM is not usable ({why})")),
    }
    let mut reason = String::from("qemu: ");
    if skipped.is_empty() {
        reason.push_str("the only backend built in");
    } else {
        reason.push_str(&skipped.join("; "));
    }
    Ok(BackendChoice {
        driver: driver_for(BackendKind::Qemu)?,
        reason,
    })
}

/// The driver for a concrete backend (used when reattaching to a recorded VM).
pub fn driver_for(kind: BackendKind) -> Result<Arc<dyn VmDriver>, DriverError> {
    match kind {
        #[cfg(feature = "qemu")]
        BackendKind::Qemu | BackendKind::Auto => Ok(Arc::new(qemu::QemuDriver::new())),
        #[cfg(feature = "cloud-hypervisor")]
        BackendKind::CloudHypervisor => Ok(Arc::new(cloud_hypervisor::CloudHypervisorDriver::new())),
        #[cfg(feature = "firecracker")]
        BackendKind::Firecracker => Ok(Arc::new(firecracker::FirecrackerDriver::new())),
        #[cfg(all(target_os = "macos", feature = "vz"))]
        BackendKind::Vz => Ok(Arc::new(vz::VzDriver::new())),
        #[allow(unreachable_patterns)]
        other => Err(DriverError::Unsupported {
            backend: other,
            feature: "this host (backend not built in)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(
        kvm: Result<(), String>,
        installed: &[BackendKind],
        refuses: &'static [BackendKind],
    ) -> (BackendKind, String) {
        let found = |k: BackendKind| {
            if installed.contains(&k) {
                Ok(Some(PathBuf::from(format!("/bin/{k}"))))
            } else {
                Err(DriverError::Unsupported {
                    backend: k,
                    feature: "x",
                })
            }
        };
        let fits = |d: &dyn VmDriver| {
            if refuses.contains(&d.kind()) {
                Err(DriverError::Unsupported {
                    backend: d.kind(),
                    feature: "shared directories (virtio-fs)",
                })
            } else {
                Ok(())
            }
        };
        let c = choose_auto(kvm, &found, &fits).expect("choice");
        (c.driver.kind(), c.reason)
    }

    #[cfg(all(feature = "qemu", feature = "cloud-hypervisor", feature = "firecracker"))]
    #[test]
    fn auto_picks_by_what_the_vm_needs_and_what_is_installed() {
        use BackendKind::{CloudHypervisor as Ch, Firecracker as Fc, Qemu};
        let (k, why) = reason(Ok(()), &[Ch, Fc], &[]);
        assert_eq!(k, Ch);
        assert!(why.contains("KVM is usable"), "{why}");
        let (k, why) = reason(Ok(()), &[Fc], &[]);
        assert_eq!(k, Fc);
        assert!(why.contains("cloud-hypervisor is not installed"), "{why}");
        let (k, why) = reason(Ok(()), &[Ch, Fc], &[Ch, Fc]);
        assert_eq!(k, Qemu);
        assert!(
            why.contains("firecracker does not support shared directories"),
            "{why}"
        );
        assert!(
            why.contains("cloud-hypervisor does not support shared directories"),
            "{why}"
        );
        let (k, why) = reason(Ok(()), &[Ch, Fc], &[Ch]);
        assert_eq!(k, Fc);
        assert!(why.contains("cloud-hypervisor does not support"), "{why}");
        let (k, why) = reason(Err("too slow".into()), &[Ch, Fc], &[]);
        assert_eq!(k, Qemu);
        assert!(why.contains("KVM is not usable (too slow)"), "{why}");
    }
}
