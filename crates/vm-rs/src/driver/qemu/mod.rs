//! QEMU backend: `qemu-system-x86_64 -M microvm,acpi=on` with virtio-mmio devices, driven over
//! QMP ([`qmp`]).
//!
//! * The command line is built by [`args::build`] (pure, unit-tested).
//! * The accelerator comes from [`accel::resolve`]: KVM only when a probe guest proves it usable,
//!   else TCG with a logged reason.
//! * QEMU gets two QMP monitors: `qmp.sock` for commands (each verb connects, negotiates, runs
//!   one command and disconnects, so any process can drive the VM) and `qmp-events.sock`, held
//!   open by the managing process to receive `STOP`/`RESUME`/`SHUTDOWN` events instead of
//!   polling.
//! * QEMU runs in its own session (see [`crate::process`]) so it outlives a detached CLI.
//!
//! * The serial console goes to a Unix socket served by a sidecar that writes `serial.log` with
//!   a size cap ([`crate::console::capture`]): QEMU's `file` chardev has none.
//! * When QEMU exits during boot, the error carries its own words from `vmm.log`
//!   ([`refusal`]); a published host port that is taken is a typed conflict.
//!
//! QEMU 7.2 (Debian 12) is the oldest version supported.

pub mod accel;
pub mod args;
pub mod qmp;
pub mod refusal;
mod snapshot;

use super::{BootSpec, DriverError, EventStream, Launched, VmDriver, VmHandle, VmmEvent, VmmStatus};
use crate::config::{Accel, BackendKind, CacheMode, DiskFormat};
use crate::devices::{AgentTransport, Capabilities, MemoryBackend, MemoryKind};
use crate::process::{ExitInfo, VmmProcess};
use qmp::Qmp;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Name of the QEMU binary looked up on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// How long one QMP verb (connect, greeting, negotiation and the command's reply) may take:
/// a frozen QEMU makes a verb fail with a timeout after this, never hang.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QEMU may take to open its QMP socket after launch.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The QEMU driver.
#[derive(Debug, Default, Clone)]
pub struct QemuDriver {
    binary: Option<PathBuf>,
}

impl QemuDriver {
    /// A driver that finds QEMU via `VMRS_QEMU` or `PATH` when it boots.
    pub fn new() -> Self {
        Self { binary: None }
    }

    /// A driver using a specific QEMU binary.
    pub fn with_binary(path: impl Into<PathBuf>) -> Self {
        Self {
            binary: Some(path.into()),
        }
    }

    /// Locate the QEMU binary: explicit path, `VMRS_QEMU`, then `PATH`.
    pub fn find_binary(&self) -> Result<PathBuf, DriverError> {
        if let Some(b) = &self.binary {
            return Ok(b.clone());
        }
        if let Some(p) = std::env::var_os("VMRS_QEMU").filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        find_on_path(QEMU_BINARY).ok_or_else(|| DriverError::BinaryNotFound {
            program: QEMU_BINARY.into(),
            searched: "VMRS_QEMU and PATH".into(),
            hint: "install it (Debian: apt-get install qemu-system-x86)",
        })
    }

    /// Connect and negotiate, retrying briefly: QEMU serves one QMP client per monitor at a
    /// time, and a connection queued behind another client can be reset when that client
    /// leaves. Only the connect/negotiation is retried, never a command.
    async fn qmp(&self, handle: &VmHandle) -> Result<Qmp, DriverError> {
        let mut attempt = 0u64;
        loop {
            match Qmp::connect(&handle.api_socket, QMP_TIMEOUT).await {
                Ok(q) => return Ok(q),
                Err(e @ (DriverError::Protocol(_) | DriverError::Connect { .. })) if attempt < 5 => {
                    tracing::debug!(vm = %handle.name, error = %e, attempt, "retrying QMP connect");
                }
                Err(e) => return Err(e),
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
        }
    }

    /// One command on a fresh connection, all of it (retried connects included) within
    /// [`QMP_TIMEOUT`].
    async fn run(&self, handle: &VmHandle, command: &str) -> Result<serde_json::Value, DriverError> {
        let exchange = async {
            let mut q = self.qmp(handle).await?;
            q.execute(command, None).await
        };
        match tokio::time::timeout(QMP_TIMEOUT, exchange).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::Timeout {
                what: format!("QEMU to answer QMP command {command}"),
                secs: QMP_TIMEOUT.as_secs_f64(),
            }),
        }
    }
}

use crate::host::find_on_path;

pub use crate::console::tail_lines;

/// Aborts a console capture whose QEMU never came up (every early return of a boot).
struct CaptureGuard<'a> {
    capture: Option<crate::console::capture::Capture>,
    vm_dir: &'a Path,
}

impl CaptureGuard<'_> {
    fn disarm(mut self) {
        self.capture = None;
    }
}

impl Drop for CaptureGuard<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.capture.take() {
            c.abort(self.vm_dir);
        }
    }
}

#[async_trait::async_trait]
impl VmDriver for QemuDriver {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            accels: &[Accel::Kvm, Accel::Hvf, Accel::Tcg],
            disk_formats: &[DiskFormat::Raw, DiskFormat::Qcow2],
            cache_modes: &[CacheMode::Writeback, CacheMode::None, CacheMode::Unsafe],
            disk_serial: true,
            nic_user: true,
            nic_user_port_forwards: true,
            nic_user_fixed_address: true,
            nic_tap: true,
            nic_switch: true,
            netns: true,
            agent_transports: &[AgentTransport::VirtioSerial, AgentTransport::Vsock],
            agent_default: true,
            // vhost-user-fs-device on a virtiofsd sidecar per share (guest RAM in a memfd)
            shared_dirs: true,
            entropy: true,
            memory: &[MemoryKind::Anonymous, MemoryKind::Memfd, MemoryKind::File],
            pause: true,
            snapshot: true,
            resize: false,
            hotplug: false,
            counters: false,
        }
    }

    async fn boot(&self, spec: &BootSpec<'_>) -> Result<Launched, DriverError> {
        self.launch(spec, false).await
    }

    fn preferred_memory(&self, vm_dir: &Path) -> MemoryBackend {
        MemoryBackend::File {
            path: vm_dir.join(crate::vm_dir::VmDir::MEMORY),
            shared: true,
        }
    }

    async fn snapshot(&self, handle: &VmHandle, dir: &Path) -> Result<(), DriverError> {
        snapshot::save(self, handle, dir).await
    }

    async fn restore(&self, spec: &BootSpec<'_>, dir: &Path) -> Result<Launched, DriverError> {
        let started = Instant::now();
        let mut launched = self.launch(spec, true).await?;
        tracing::debug!(vm = %spec.config.name, ms = started.elapsed().as_millis(), "qemu waits for the snapshot");
        match snapshot::load(self, &launched.handle, dir).await {
            Ok(()) => Ok(launched),
            Err(e) => {
                // QEMU exits when the stream does not fit the machine: its own words say why
                if let Some(exit) = refusal::exited_within(&mut launched.process, refusal::EXIT_GRACE).await {
                    return Err(refusal::refusal(&self.find_binary()?, &spec.vmm_log, exit));
                }
                let _ = launched.process.kill();
                Err(e)
            }
        }
    }

    async fn status(&self, handle: &VmHandle) -> Result<VmmStatus, DriverError> {
        let v = self.run(handle, "query-status").await?;
        Ok(match v.get("status").and_then(|s| s.as_str()) {
            Some("running") => VmmStatus::Running,
            // after a snapshot's migration the vCPUs stay stopped ("postmigrate"); a restore
            // waits for its stream ("inmigrate")
            Some("paused" | "suspended" | "prelaunch" | "postmigrate" | "inmigrate") => VmmStatus::Paused,
            Some("shutdown") => VmmStatus::Shutdown,
            _ => VmmStatus::Other,
        })
    }

    async fn pause(&self, handle: &VmHandle) -> Result<(), DriverError> {
        self.run(handle, "stop").await.map(drop)
    }

    async fn resume(&self, handle: &VmHandle) -> Result<(), DriverError> {
        self.run(handle, "cont").await.map(drop)
    }

    async fn request_shutdown(&self, handle: &VmHandle) -> Result<(), DriverError> {
        self.run(handle, "system_powerdown").await.map(drop)
    }

    async fn quit(&self, handle: &VmHandle) -> Result<(), DriverError> {
        match self.run(handle, "quit").await {
            Ok(_) => Ok(()),
            // QEMU may close the socket before the reply arrives.
            Err(DriverError::Protocol(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn events(&self, handle: &VmHandle) -> Result<EventStream, DriverError> {
        let path = handle
            .event_socket
            .clone()
            .unwrap_or_else(|| handle.api_socket.clone());
        let qmp = Qmp::connect(&path, QMP_TIMEOUT).await?;
        let stream = futures::stream::unfold(qmp, |mut qmp| async move {
            loop {
                let ev = qmp.next_event().await.ok()?;
                let mapped = match ev.name.as_str() {
                    "STOP" => Some(VmmEvent::Paused),
                    "RESUME" => Some(VmmEvent::Resumed),
                    "SHUTDOWN" => Some(VmmEvent::Shutdown {
                        guest: ev.data.get("guest").and_then(|g| g.as_bool()).unwrap_or(false),
                        reason: ev
                            .data
                            .get("reason")
                            .and_then(|r| r.as_str())
                            .unwrap_or("unknown")
                            .to_string(),
                    }),
                    "GUEST_PANICKED" => Some(VmmEvent::Error {
                        reason: "guest kernel panicked".into(),
                    }),
                    _ => None,
                };
                if let Some(m) = mapped {
                    return Some((m, qmp));
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

impl QemuDriver {
    /// Launch QEMU for `spec` (waiting for `-incoming defer` when `incoming`) and return once
    /// its QMP socket answers.
    async fn launch(&self, spec: &BootSpec<'_>, incoming: bool) -> Result<Launched, DriverError> {
        let binary = self.find_binary()?;
        let choice =
            accel::resolve(spec.config.accel).map_err(|reason| DriverError::AccelUnavailable { reason })?;
        let paths = args::QemuPaths::in_dir(spec.vm_dir, spec.serial_log.clone());
        for sock in [&paths.qmp, &paths.qmp_events] {
            if sock.as_os_str().len() > args::MAX_SOCKET_PATH {
                return Err(DriverError::Io {
                    path: sock.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "socket path too long for a Unix socket; use a shorter VMRS_HOME",
                    ),
                });
            }
            let _ = std::fs::remove_file(sock);
        }
        // Create the serial log up front so followers can watch it before QEMU writes.
        crate::paths::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&paths.serial_log)
            .map_err(|source| DriverError::Io {
                path: paths.serial_log.clone(),
                source,
            })?;
        // The console goes through the capped log's sidecar (killed again if QEMU does not
        // come up).
        let mut paths = paths;
        let capture =
            crate::console::capture::start(spec.vm_dir, &paths.serial_log, spec.config.serial_log_max())?;
        paths.serial_socket = Some(capture.socket.clone());
        let capture = CaptureGuard {
            capture: Some(capture),
            vm_dir: spec.vm_dir,
        };
        let vmm_log = crate::paths::private_file()
            .create(true)
            .append(true)
            .open(&spec.vmm_log)
            .map_err(|source| DriverError::Io {
                path: spec.vmm_log.clone(),
                source,
            })?;
        let vmm_log_err = vmm_log.try_clone().map_err(|source| DriverError::Io {
            path: spec.vmm_log.clone(),
            source,
        })?;
        let input = args::QemuArgsInput {
            config: spec.config,
            accel: choice.accel,
            paths: &paths,
            devices: &spec.devices,
            guest_params: &spec.guest_params,
            tsc_khz: crate::host::cpu_khz(),
        };
        crate::config::check_kernel_cmdline(&spec.config.kernel, &args::kernel_cmdline(&input))?;
        let mut argv = args::build(&input);
        if incoming {
            argv.extend(args::incoming_args());
        }
        let mut cmd = tokio::process::Command::new(&binary);
        // TAP devices in a network namespace are only found from inside it
        if let Some(ns) = spec.devices.netns.as_deref() {
            crate::net::netns::command_in(&mut cmd, ns).map_err(|e| DriverError::Io {
                path: ns.to_path_buf(),
                source: std::io::Error::other(e),
            })?;
        }
        cmd.args(&argv)
            .current_dir(spec.vm_dir)
            .stdin(std::process::Stdio::null())
            .stdout(vmm_log)
            .stderr(vmm_log_err);
        tracing::debug!(vm = %spec.config.name, ?argv, "launching qemu");
        // owned by the VM directory: found from there even if no record ever names it
        let mut process = VmmProcess::spawn_owned(cmd, spec.vm_dir)?;
        let handle = VmHandle {
            name: spec.config.name.clone(),
            backend: BackendKind::Qemu,
            pid: process.pid(),
            start_time: process.start_time(),
            api_socket: paths.qmp.clone(),
            event_socket: Some(paths.qmp_events.clone()),
            serial_log: paths.serial_log.clone(),
            accel: Some(choice.accel.to_string()),
        };
        // Wait for QMP to come up (or QEMU to die on a bad argument).
        let started = Instant::now();
        loop {
            if !process.is_alive() {
                let exit = refusal::exited_within(&mut process, refusal::EXIT_GRACE).await;
                return Err(refusal::refusal(
                    &binary,
                    &spec.vmm_log,
                    exit.unwrap_or(ExitInfo::Unknown),
                ));
            }
            if paths.qmp.exists() {
                match Qmp::connect(&paths.qmp, QMP_TIMEOUT).await {
                    Ok(_) => break,
                    Err(DriverError::Connect { .. }) => {}
                    Err(e) => {
                        // A QEMU refusing its kernel resets the QMP connection as it exits.
                        if let Some(exit) = refusal::exited_within(&mut process, refusal::EXIT_GRACE).await {
                            return Err(refusal::refusal(&binary, &spec.vmm_log, exit));
                        }
                        let _ = process.kill();
                        return Err(e);
                    }
                }
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                let _ = process.kill();
                return Err(DriverError::Timeout {
                    what: "QEMU to open its QMP socket".into(),
                    secs: STARTUP_TIMEOUT.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        capture.disarm();
        Ok(Launched { handle, process })
    }
}

/// Whether `accel` as configured would use KVM on this host (probe included).
pub fn would_use_kvm(accel: Accel) -> bool {
    matches!(accel::resolve(accel), Ok(c) if c.accel == Accel::Kvm)
}
