//! Apple Virtualization.framework backend (macOS hosts).
//!
//! VZ runs a VM *inside* the process that creates it, so the backend keeps vm-rs daemonless
//! the same way the other backends do: every VM gets its own small host process, `vmrs-vz`
//! (a binary of this crate, built on macOS and signed with the
//! `com.apple.security.virtualization` entitlement, see `docs/macos.md`), which the manager
//! launches, identifies (pid + start time) and reattaches to like any VMM.
//!
//! ```text
//!  VzDriver::boot                                   vmrs-vz (one per VM)
//!   ├─ plan::VzPlan::build(spec)   (pure; refuses what VZ cannot do)
//!   ├─ write <vm_dir>/vz-plan.json (atomic)
//!   ├─ spawn vmrs-vz --plan vz-plan.json ──────────► host::configuration(plan) → VZ objects
//!   │          --control vz.sock                       validateWithError, startWithCompletionHandler
//!   └─ wait until vz.sock answers  ◄──── control ────  serves vz.sock (one JSON line each way)
//!  status / pause / resume / request_shutdown / quit  ─► control::Request
//! ```
//!
//! * [`plan`] — the configuration plan (plain data) and its validation; tested on every host.
//! * [`control`] — the driver ↔ `vmrs-vz` protocol; tested on every host.
//! * `host` (macOS only) — turns a plan into framework objects with `objc2-virtualization` and
//!   runs the machine; used by `vmrs-vz`.
//!
//! The guest console is `hvc0` (a virtio console port) written to the VM's serial log, which
//! the manager follows for readiness as with the other backends. NAT NICs get their address
//! from vmnet's DHCP. The guest agent is planned over vsock ([`plan::AGENT_VSOCK_PORT`]).
//!
//! **Status:** this backend is compiled (type-checked for `aarch64-apple-darwin` and
//! `x86_64-apple-darwin` in CI) but has never been run on a Mac.

pub mod control;
#[cfg(all(target_os = "macos", feature = "vz"))]
pub mod host;
pub mod plan;

use crate::config::{Accel, BackendKind, CacheMode, DiskFormat};
use crate::devices::{AgentTransport, Capabilities, MemoryKind};
use crate::driver::{BootSpec, DriverError, Launched, VmDriver, VmHandle, VmmStatus};
use crate::process::VmmProcess;
use control::{Reply, Request};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// File name of the plan in the VM directory.
pub const PLAN_FILE: &str = "vz-plan.json";
/// File name of the control socket in the VM directory.
pub const CONTROL_SOCKET: &str = "vz.sock";
/// Deadline of one control exchange.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `vmrs-vz` may take to validate and start the machine.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// File name of a saved machine state in a snapshot directory.
pub const SAVE_FILE: &str = "machine.vzvmsave";
/// Environment variable naming the `vmrs-vz` binary (else: beside the running executable, then
/// `PATH`).
pub const BIN_ENV: &str = "VMRS_VZ_BIN";

/// The Virtualization.framework driver.
#[derive(Debug, Clone, Default)]
pub struct VzDriver {
    binary: Option<PathBuf>,
}

impl VzDriver {
    /// A driver finding `vmrs-vz` by [`BIN_ENV`], beside the running executable, or on `PATH`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A driver using the given `vmrs-vz` binary.
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: Some(binary.into()),
        }
    }

    /// The `vmrs-vz` program.
    pub fn find_binary(&self) -> Result<PathBuf, DriverError> {
        let not_found = |searched: String| {
            DriverError::BinaryNotFound {
            program: "vmrs-vz".into(),
            searched,
            hint: "build it on macOS (cargo build -p vm-rs --bin vmrs-vz) and sign it with the virtualization entitlement (docs/macos.md)",
        }
        };
        let chosen = self.binary.clone().or_else(|| {
            std::env::var_os(BIN_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        if let Some(b) = chosen {
            return if crate::host::is_executable(&b) {
                Ok(b)
            } else {
                Err(not_found(b.display().to_string()))
            };
        }
        if let Ok(exe) = std::env::current_exe() {
            for dir in exe.ancestors().skip(1).take(2) {
                let cand = dir.join("vmrs-vz");
                if crate::host::is_executable(&cand) {
                    return Ok(cand);
                }
            }
        }
        crate::host::find_on_path("vmrs-vz")
            .ok_or_else(|| not_found(format!("${BIN_ENV}, beside this program, PATH")))
    }

    async fn exchange(&self, handle: &VmHandle, request: Request) -> Result<Reply, DriverError> {
        let reply = control::call(&handle.api_socket, &request, CONTROL_TIMEOUT).await?;
        match reply {
            Reply::Error { message } => Err(DriverError::Command {
                command: format!("{request:?}").to_lowercase(),
                message,
            }),
            other => Ok(other),
        }
    }

    async fn verb(&self, handle: &VmHandle, request: Request) -> Result<(), DriverError> {
        match self.exchange(handle, request).await? {
            Reply::Ok => Ok(()),
            other => Err(DriverError::Protocol(format!(
                "vmrs-vz answered {other:?} to a verb"
            ))),
        }
    }
}

/// What VZ can run, for [`Capabilities::check`]; [`plan::VzPlan::build`] refines it (no
/// published ports on NAT NICs, VZ's memory and CPU bounds).
pub const CAPABILITIES: Capabilities = Capabilities {
    // VZ always uses Hypervisor.framework.
    accels: &[Accel::Hvf],
    disk_formats: &[DiskFormat::Raw],
    cache_modes: &[CacheMode::Writeback, CacheMode::None, CacheMode::Unsafe],
    disk_serial: true,
    nic_user: true,
    // VZ's NAT has no port forwarding (and vm-rs no proxy for it yet) and is DHCP only: both
    // are refused before anything is created (the plan refuses them again, for its own callers).
    nic_user_port_forwards: false,
    nic_user_fixed_address: false,
    nic_tap: false,
    nic_switch: false,
    netns: false,
    agent_transports: &[AgentTransport::VirtioSerial],
    agent_default: true,
    shared_dirs: true,
    entropy: true,
    memory: &[MemoryKind::Anonymous],
    pause: true,
    // saveMachineStateToURL / restoreMachineStateFromURL, macOS 14+
    snapshot: true,
    resize: false,
    hotplug: false,
    counters: false,
};

#[async_trait::async_trait]
impl VmDriver for VzDriver {
    fn kind(&self) -> BackendKind {
        BackendKind::Vz
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn boot(&self, spec: &BootSpec<'_>) -> Result<Launched, DriverError> {
        self.launch(spec, None).await
    }

    async fn status(&self, handle: &VmHandle) -> Result<VmmStatus, DriverError> {
        match self.exchange(handle, Request::Status).await? {
            Reply::State { state } => Ok(state.status()),
            other => Err(DriverError::Protocol(format!(
                "vmrs-vz answered {other:?} to status"
            ))),
        }
    }

    async fn pause(&self, handle: &VmHandle) -> Result<(), DriverError> {
        self.verb(handle, Request::Pause).await
    }

    async fn resume(&self, handle: &VmHandle) -> Result<(), DriverError> {
        self.verb(handle, Request::Resume).await
    }

    async fn request_shutdown(&self, handle: &VmHandle) -> Result<(), DriverError> {
        self.verb(handle, Request::RequestStop).await
    }

    async fn quit(&self, handle: &VmHandle) -> Result<(), DriverError> {
        match self.verb(handle, Request::Stop).await {
            // vmrs-vz exits once the machine stopped; the reply may not make it out.
            Ok(()) | Err(DriverError::Connect { .. }) | Err(DriverError::Protocol(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `saveMachineStateToURL` (macOS 14+) into `dir`/[`SAVE_FILE`]; the VM must be paused.
    async fn snapshot(&self, handle: &VmHandle, dir: &Path) -> Result<(), DriverError> {
        self.verb(
            handle,
            Request::Save {
                path: dir.join(SAVE_FILE),
            },
        )
        .await
    }

    /// A new `vmrs-vz` for `spec` that restores `dir`/[`SAVE_FILE`]
    /// (`restoreMachineStateFromURL`, macOS 14+) and resumes it, instead of booting.
    async fn restore(&self, spec: &BootSpec<'_>, dir: &Path) -> Result<Launched, DriverError> {
        let state = dir.join(SAVE_FILE);
        if !state.is_file() {
            return Err(DriverError::Io {
                path: state,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no saved VZ machine state"),
            });
        }
        self.launch(spec, Some(&state)).await
    }
}

impl VzDriver {
    /// Write the plan, start `vmrs-vz` (booting, or restoring `restore`) and wait until its
    /// control socket answers.
    async fn launch(&self, spec: &BootSpec<'_>, restore: Option<&Path>) -> Result<Launched, DriverError> {
        let plan = plan::VzPlan::build(spec, &host_limits())?;
        let binary = self.find_binary()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DriverError::Io { path, source }
        };
        let plan_path = spec.vm_dir.join(PLAN_FILE);
        let socket = spec.vm_dir.join(CONTROL_SOCKET);
        let json = serde_json::to_vec_pretty(&plan).map_err(|e| DriverError::Io {
            path: plan_path.clone(),
            source: e.into(),
        })?;
        crate::fsutil::write_atomic(&plan_path, &json).map_err(io(&plan_path))?;
        let _ = std::fs::remove_file(&socket);
        // The console log exists before the guest writes, so followers can watch it.
        crate::paths::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&spec.serial_log)
            .map_err(io(&spec.serial_log))?;
        let vmm_log = crate::paths::private_file()
            .create(true)
            .append(true)
            .open(&spec.vmm_log)
            .map_err(io(&spec.vmm_log))?;
        let vmm_log_err = vmm_log.try_clone().map_err(io(&spec.vmm_log))?;
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.arg("--plan").arg(&plan_path).arg("--control").arg(&socket);
        if let Some(state) = restore {
            cmd.arg("--restore").arg(state);
        }
        cmd.current_dir(spec.vm_dir)
            .stdin(std::process::Stdio::null())
            .stdout(vmm_log)
            .stderr(vmm_log_err);
        let mut process = VmmProcess::spawn_owned(cmd, spec.vm_dir)?;
        let handle = VmHandle {
            name: spec.config.name.clone(),
            backend: BackendKind::Vz,
            pid: process.pid(),
            start_time: process.start_time(),
            api_socket: socket.clone(),
            event_socket: None,
            serial_log: spec.serial_log.clone(),
            accel: Some("hvf".into()),
        };
        let started = Instant::now();
        loop {
            if !process.is_alive() {
                let _ = process.wait().await;
                return Err(DriverError::BootFailed {
                    program: binary.display().to_string(),
                    detail: crate::console::tail_lines(&spec.vmm_log, 5),
                });
            }
            if socket.exists() {
                match control::call(&socket, &Request::Status, CONTROL_TIMEOUT).await {
                    Ok(Reply::State { .. }) => break,
                    Ok(Reply::Error { message }) => {
                        let _ = process.kill();
                        return Err(DriverError::BootFailed {
                            program: binary.display().to_string(),
                            detail: message,
                        });
                    }
                    Ok(_) | Err(_) => {}
                }
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                let _ = process.kill();
                return Err(DriverError::Timeout {
                    what: "vmrs-vz to start the machine".into(),
                    secs: STARTUP_TIMEOUT.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Launched { handle, process })
    }
}

/// The framework's bounds on this host ([`plan::VzLimits::FALLBACK`] where it cannot be asked).
pub fn host_limits() -> plan::VzLimits {
    #[cfg(all(target_os = "macos", feature = "vz"))]
    {
        host::limits()
    }
    #[cfg(not(all(target_os = "macos", feature = "vz")))]
    {
        plan::VzLimits::FALLBACK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_refuse_what_vz_lacks_before_anything_exists() {
        use crate::devices::DeviceSet;
        let cfg: crate::VmConfig =
            serde_json::from_value(serde_json::json!({"name": "v", "kernel": "/k"})).expect("config");
        let set = DeviceSet {
            disks: vec![crate::devices::Disk {
                id: "disk0".into(),
                path: "/d.qcow2".into(),
                format: DiskFormat::Qcow2,
                read_only: false,
                cache: CacheMode::Writeback,
                serial: None,
            }],
            ..DeviceSet::default()
        };
        let e = CAPABILITIES
            .check(BackendKind::Vz, &cfg, &set)
            .expect_err("qcow2");
        assert!(e.to_string().contains("vz backend does not support qcow2"), "{e}");
        let mut tcg = cfg.clone();
        tcg.accel = Accel::Tcg;
        assert!(CAPABILITIES
            .check(BackendKind::Vz, &tcg, &DeviceSet::default())
            .is_err());
        assert!(CAPABILITIES
            .check(BackendKind::Vz, &cfg, &DeviceSet::default())
            .is_ok());
    }

    #[test]
    fn published_ports_and_fixed_nat_addresses_are_refused_up_front() {
        use crate::config::{GuestAddress, NetworkAttachment, PortForward, Protocol};
        use crate::devices::DeviceSet;
        let mut cfg: crate::VmConfig =
            serde_json::from_value(serde_json::json!({"name": "v", "kernel": "/k"})).expect("config");
        cfg.networks = vec![NetworkAttachment::user(vec![PortForward {
            protocol: Protocol::Tcp,
            host_ip: None,
            host_port: 8080,
            guest_port: 80,
        }])];
        let e = CAPABILITIES
            .check(BackendKind::Vz, &cfg, &DeviceSet::default())
            .expect_err("-p");
        assert!(
            matches!(e, DriverError::Unsupported { feature, .. } if feature.contains("published ports")),
            "{e}"
        );
        cfg.networks = vec![NetworkAttachment::User {
            port_forwards: vec![],
            mac: None,
            address: GuestAddress::Static("10.0.2.40/24".parse().expect("cidr")),
            via: crate::config::UserNat::Auto,
        }];
        let e = CAPABILITIES
            .check(BackendKind::Vz, &cfg, &DeviceSet::default())
            .expect_err("fixed address");
        assert!(e.to_string().contains("DHCP"), "{e}");
        cfg.networks = vec![NetworkAttachment::user(vec![])];
        CAPABILITIES
            .check(BackendKind::Vz, &cfg, &DeviceSet::default())
            .expect("plain NAT");
        // QEMU takes both.
        cfg.networks = vec![NetworkAttachment::User {
            port_forwards: vec![PortForward {
                protocol: Protocol::Tcp,
                host_ip: None,
                host_port: 8080,
                guest_port: 80,
            }],
            mac: None,
            address: GuestAddress::Static("10.0.2.40/24".parse().expect("cidr")),
            via: crate::config::UserNat::Auto,
        }];
        use crate::driver::VmDriver;
        crate::driver::qemu::QemuDriver::new()
            .capabilities()
            .check(BackendKind::Qemu, &cfg, &DeviceSet::default())
            .expect("qemu");
    }

    #[test]
    fn an_explicit_binary_is_used_and_a_missing_one_is_typed() {
        let sh = crate::host::find_on_path("sh").expect("sh");
        assert_eq!(VzDriver::with_binary(&sh).find_binary().expect("binary"), sh);
        let missing = VzDriver::with_binary("/nonexistent/vmrs-vz").find_binary();
        assert!(
            matches!(missing, Err(DriverError::BinaryNotFound { .. })),
            "{missing:?}"
        );
    }
}
