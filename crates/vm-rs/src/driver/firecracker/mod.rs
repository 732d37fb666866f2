//! Firecracker backend: launches `firecracker` with only its API socket and configures and
//! drives the microVM through its REST API on that Unix socket.
//!
//! ## Protocol
//!
//! ```text
//!  firecracker --api-sock <dir>/fc-api.sock --log-path <dir>/fc.log --level Info
//!              stdout = the serial console (into the capped serial log, see below)
//!
//!  GET  /                          until the API answers (InstanceInfo; state "Not started")
//!  PUT  /machine-config            {vcpu_count, mem_size_mib}
//!  PUT  /boot-source               {kernel_image_path, boot_args, initrd_path}
//!  PUT  /drives/{id}               one per disk (raw images)
//!  PUT  /network-interfaces/{id}   one per TAP NIC
//!  PUT  /entropy                   virtio-rng
//!  PUT  /vsock                     {guest_cid, uds_path}  the guest agent's transport (hybrid vsock)
//!  PUT  /actions                   {"action_type": "InstanceStart"}      boots the guest
//!  PATCH /vm                       {"state": "Paused" | "Resumed"}
//!  PUT  /actions                   {"action_type": "SendCtrlAltDel"}     graceful stop
//!  PUT  /snapshot/create           {snapshot_path, mem_file_path}        (paused VM)
//!  PUT  /snapshot/load             {snapshot_path, mem_backend, resume_vm} (fresh VMM)
//! ```
//!
//! Bodies are the typed structs of [`model`], written from Firecracker's OpenAPI document.
//! Every error answer is `400` (or `500`) with `{"fault_message": "..."}`, which reaches the
//! user as [`DriverError::Command`]. The pre-boot calls are refused after `InstanceStart`
//! ("not supported after starting the microVM"): configuration happens in one go, before
//! the start.
//!
//! ## Serial console
//!
//! Firecracker writes the guest's serial port to its own standard output. The driver starts
//! the capped serial log's sidecar ([`crate::console::capture`]) as for QEMU, connects to its
//! socket and hands that connection to Firecracker as stdout, so the size cap holds, the
//! readiness marker lands in `serial.log` as with every backend, and the sidecar finishes the
//! log when Firecracker exits (the connection closes). Firecracker's own log goes to `fc.log`.
//!
//! ## Kernel
//!
//! Firecracker direct-boots an ELF vmlinux (through its PVH entry point when the kernel has
//! one); a bzImage is unpacked first, by the same code as for Cloud Hypervisor
//! ([`crate::driver::vmlinux`]).
//!
//! ## What it lacks
//!
//! Firecracker has no virtio-fs, no user-mode networking, no switch (datagram socket) NICs,
//! no qcow2, no `O_DIRECT` disks, no disk serial numbers (the image root disk is found by
//! its serial), no shared guest memory, no resize, and the released versions no hot-plug:
//! [`VmDriver::capabilities`] says so, so such a configuration is refused before anything is
//! created, with the reason.
//!
//! ## Stop and exit classification
//!
//! Firecracker has no "quit" call. A graceful stop presses Ctrl-Alt-Del (a Linux guest booted
//! with `reboot=k` then resets through the keyboard controller and Firecracker exits 0); when
//! that is not enough, [`VmDriver::quit`] writes a quit marker (`fc-quit-requested`) and
//! kills the process. Why a Firecracker went away ([`VmDriver::exit_reason`], from any
//! process) comes from, in order: the quit marker (asked for); its log's last words, which
//! are `Firecracker exiting successfully. exit_code=0` (the guest reset or powered off) or
//! `Firecracker exiting with error. exit_code=N` (a failure, with the meaning of `N` and the
//! log's last lines); no such line means it was killed or crashed.
//!
//! ## Binary
//!
//! Found as: the path given to [`FirecrackerDriver::with_binary`], then `VMRS_FIRECRACKER`,
//! then `firecracker` on `PATH` ([`find_binary`]).

pub mod model;

use self::model::{
    ActionType, BootSource, Drive, EntropyDevice, InstanceActionInfo, InstanceInfo, MachineConfiguration,
    NetworkInterface, SnapshotCreateParams, SnapshotLoadParams,
};
use super::http::{ApiClient, Method, Response};
use super::{BootSpec, DriverError, Launched, VmDriver, VmHandle, VmmEvent, VmmStatus};
use crate::config::{Accel, BackendKind, CacheMode, DiskFormat, VmConfig};
use crate::devices::{AgentTransport, Capabilities, DeviceSet, MemoryBackend, MemoryKind};
use crate::net::NicBackend;
use crate::process::VmmProcess;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Program name looked up on `PATH`.
pub const PROGRAM: &str = "firecracker";
/// Environment variable naming the binary.
pub const BINARY_ENV: &str = "VMRS_FIRECRACKER";
/// API socket file name inside the VM directory.
pub const API_SOCKET: &str = crate::vm_dir::VmDir::FC_API_SOCKET;
/// Firecracker's log file name inside the VM directory.
pub const LOG_FILE: &str = crate::vm_dir::VmDir::FC_LOG;
/// Marker written before the driver kills the VMM on request.
pub const QUIT_MARKER: &str = crate::vm_dir::VmDir::FC_QUIT_MARKER;
/// Snapshot files inside a snapshot directory.
pub const SNAPSHOT_STATE: &str = "vmstate";
/// Guest memory file inside a snapshot directory.
pub const SNAPSHOT_MEMORY: &str = "memory";

/// The log line of an orderly exit.
pub const EXIT_OK_LINE: &str = "Firecracker exiting successfully";
/// The start of the log line of an exit with an error (followed by ` exit_code=N`).
pub const EXIT_ERROR_LINE: &str = "Firecracker exiting with error";

/// Kernel parameters Firecracker guests need: the console on the serial port, reboot through
/// the keyboard controller (which ends the VMM), reboot on panic.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

const MAX_SOCKET_PATH: usize = 107;
const API_STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
const API_TIMEOUT: Duration = Duration::from_secs(30);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Find the `firecracker` binary: `explicit`, else `VMRS_FIRECRACKER`, else `PATH`.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, DriverError> {
    super::find_program(
        explicit,
        BINARY_ENV,
        PROGRAM,
        "install firecracker or set VMRS_FIRECRACKER to its path (or use --backend qemu)",
    )
}

/// The Firecracker driver.
#[derive(Debug, Default, Clone)]
pub struct FirecrackerDriver {
    binary: Option<PathBuf>,
}

/// Files of one VM, derived from its directory.
#[derive(Debug, Clone)]
struct VmFiles {
    api_socket: PathBuf,
    log: PathBuf,
    quit_marker: PathBuf,
}

impl VmFiles {
    fn new(dir: &Path) -> Self {
        Self {
            api_socket: dir.join(API_SOCKET),
            log: dir.join(LOG_FILE),
            quit_marker: dir.join(QUIT_MARKER),
        }
    }

    fn of_handle(handle: &VmHandle) -> Self {
        let mut f = Self::new(handle.api_socket.parent().unwrap_or(Path::new("/")));
        f.api_socket = handle.api_socket.clone();
        f
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |source| DriverError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn path_str(p: &Path) -> Result<String, DriverError> {
    p.to_str().map(str::to_string).ok_or_else(|| DriverError::Io {
        path: p.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not valid utf-8"),
    })
}

/// Last `max` bytes of a file, lossily decoded.
fn file_tail(path: &Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// One error answer in words: status, reason and the VMM's `fault_message`.
pub fn error_message(status: u16, body: &[u8]) -> String {
    let reason = match status {
        400 => "bad request",
        404 => "not found",
        413 => "payload too large",
        500 => "internal error",
        _ => "error",
    };
    let detail: String = match serde_json::from_slice::<model::ApiError>(body) {
        Ok(e) => e.fault_message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    }
    .trim()
    .chars()
    .take(1024)
    .collect();
    if detail.is_empty() {
        format!("{status} {reason}")
    } else {
        format!("{status} {reason}: {detail}")
    }
}

/// What the driver sends before `InstanceStart`, in order: (path, body).
pub type ConfigCalls = Vec<(String, serde_json::Value)>;

fn to_value<T: serde::Serialize>(what: &str, v: &T) -> Result<serde_json::Value, DriverError> {
    serde_json::to_value(v).map_err(|e| DriverError::Protocol(format!("cannot encode {what}: {e}")))
}

/// The configuration calls for `config` and its `devices`, booting `kernel` with
/// `guest_params` appended to the command line. A device Firecracker cannot express is
/// refused here too (the manager checked [`FirecrackerDriver`]'s capabilities first).
pub fn config_calls(
    config: &VmConfig,
    devices: &DeviceSet,
    kernel: &Path,
    guest_params: &[String],
) -> Result<ConfigCalls, DriverError> {
    let unsupported = |feature| DriverError::Unsupported {
        backend: BackendKind::Firecracker,
        feature,
    };
    if !devices.shared_dirs.is_empty() {
        return Err(unsupported("shared directories (virtio-fs)"));
    }
    let vsock = match &devices.agent {
        None => None,
        Some(crate::devices::AgentChannel::Vsock {
            cid,
            socket,
            vhost_user: None,
            ..
        }) => Some(model::Vsock {
            guest_cid: *cid,
            uds_path: socket
                .to_str()
                .ok_or_else(|| DriverError::Io {
                    path: socket.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not valid utf-8"),
                })?
                .to_string(),
        }),
        Some(crate::devices::AgentChannel::Vsock { .. }) => {
            return Err(unsupported("a vhost-user vsock device"))
        }
        Some(crate::devices::AgentChannel::VirtioSerial { .. }) => {
            return Err(unsupported("the guest agent over virtio-serial"))
        }
    };
    if !matches!(devices.memory, MemoryBackend::Anonymous) {
        return Err(unsupported("shared or file-backed guest memory"));
    }
    let mut cmdline = String::from(BASE_CMDLINE);
    for part in std::iter::once(&config.cmdline).chain(guest_params) {
        if !part.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(part);
        }
    }
    crate::config::check_kernel_cmdline(&config.kernel, &cmdline)?;
    let mut calls = vec![
        (
            "/machine-config".to_string(),
            to_value(
                "machine-config",
                &MachineConfiguration {
                    vcpu_count: config.cpus,
                    mem_size_mib: config.memory_mib,
                    smt: None,
                    track_dirty_pages: None,
                },
            )?,
        ),
        (
            "/boot-source".to_string(),
            to_value(
                "boot-source",
                &BootSource {
                    kernel_image_path: path_str(kernel)?,
                    boot_args: Some(cmdline),
                    initrd_path: config.initramfs.as_deref().map(path_str).transpose()?,
                },
            )?,
        ),
    ];
    for d in &devices.disks {
        if d.format != DiskFormat::Raw {
            return Err(unsupported("qcow2 disks"));
        }
        if d.serial.is_some() {
            return Err(unsupported("disk serial numbers (an image root disk)"));
        }
        let cache_type = match d.cache {
            CacheMode::Writeback => model::CacheType::Writeback,
            CacheMode::Unsafe => model::CacheType::Unsafe,
            CacheMode::None => return Err(unsupported("cache=none disks")),
        };
        let id = drive_id(&d.id);
        calls.push((
            format!("/drives/{id}"),
            to_value(
                "drive",
                &Drive {
                    drive_id: id.clone(),
                    is_root_device: false,
                    path_on_host: path_str(&d.path)?,
                    is_read_only: d.read_only,
                    cache_type: Some(cache_type),
                },
            )?,
        ));
    }
    for n in &devices.nics {
        let NicBackend::Tap { ifname, .. } = &n.backend else {
            return Err(unsupported(match n.backend {
                NicBackend::Switch { .. } => "switch networks",
                _ => "user-mode networking (--net user, -p without a bridge)",
            }));
        };
        let id = drive_id(&n.id());
        calls.push((
            format!("/network-interfaces/{id}"),
            to_value(
                "network interface",
                &NetworkInterface {
                    iface_id: id.clone(),
                    host_dev_name: ifname.clone(),
                    guest_mac: Some(n.mac.to_string()),
                },
            )?,
        ));
    }
    if devices.entropy {
        calls.push(("/entropy".to_string(), to_value("entropy", &EntropyDevice {})?));
    }
    if let Some(v) = vsock {
        // the agent's transport: hybrid vsock on `uds_path`
        calls.push(("/vsock".to_string(), to_value("vsock", &v)?));
    }
    Ok(calls)
}

/// A resource id as Firecracker accepts it (alphanumerics and `_`): others become `_`.
pub fn drive_id(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

/// Map `InstanceInfo.state`.
pub fn map_state(state: &str) -> VmmStatus {
    match state {
        "Running" => VmmStatus::Running,
        "Paused" => VmmStatus::Paused,
        "Not started" => VmmStatus::Shutdown,
        _ => VmmStatus::Other,
    }
}

/// What Firecracker's exit code `code` means (its `FcExitCode`).
pub fn exit_code_meaning(code: i32) -> &'static str {
    match code {
        0 => "success",
        1 => "generic error",
        2 => "unexpected error",
        148 => "bad syscall (blocked by seccomp)",
        149 => "SIGBUS",
        150 => "SIGSEGV",
        151 => "SIGXFSZ",
        152 => "bad configuration",
        153 => "bad command-line arguments",
        154 => "SIGXCPU",
        155 => "SIGPIPE",
        156 => "SIGHUP",
        157 => "SIGILL",
        _ => "unknown exit code",
    }
}

/// Why a Firecracker is gone, from its log (`log`, the text of `fc.log`) and whether the
/// driver asked it to go (`quit_requested`); see the module docs.
pub fn classify_exit(log: &str, quit_requested: bool) -> VmmEvent {
    if quit_requested {
        return VmmEvent::Shutdown {
            guest: false,
            reason: "firecracker was stopped on request".into(),
        };
    }
    let lines: Vec<&str> = log.lines().collect();
    let exit = lines
        .iter()
        .rposition(|l| l.contains(EXIT_OK_LINE) || l.contains(EXIT_ERROR_LINE));
    let Some(at) = exit else {
        let last = lines.iter().rev().find(|l| !l.trim().is_empty());
        return VmmEvent::Error {
            reason: match last {
                Some(l) if l.contains("panicked") => format!(
                    "firecracker was killed or crashed: {}",
                    l.trim().chars().take(300).collect::<String>()
                ),
                _ => "firecracker was killed or crashed (its log has no exit record)".into(),
            },
        };
    };
    let line = lines[at];
    if line.contains(EXIT_OK_LINE) {
        return VmmEvent::Shutdown {
            guest: true,
            reason: "the guest reset or powered off".into(),
        };
    }
    let code = line
        .rsplit("exit_code=")
        .next()
        .and_then(|c| c.trim().parse::<i32>().ok())
        .unwrap_or(-1);
    // the lines before the exit line say what failed (bounded)
    let context: Vec<String> = lines[at.saturating_sub(3)..at]
        .iter()
        .map(|l| l.trim().chars().take(300).collect())
        .filter(|l: &String| !l.is_empty())
        .collect();
    let mut reason = format!(
        "firecracker exited with code {code} ({})",
        exit_code_meaning(code)
    );
    if !context.is_empty() {
        reason.push_str(": ");
        reason.push_str(&context.join(" / "));
    }
    VmmEvent::Error { reason }
}

impl FirecrackerDriver {
    /// A driver that finds the binary at boot time (see [`find_binary`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A driver using this binary.
    pub fn with_binary(path: impl Into<PathBuf>) -> Self {
        Self {
            binary: Some(path.into()),
        }
    }

    /// The binary this driver would launch.
    pub fn binary(&self) -> Result<PathBuf, DriverError> {
        find_binary(self.binary.as_deref())
    }

    fn client(socket: &Path) -> ApiClient {
        ApiClient::new(socket, API_TIMEOUT).for_vmm(PROGRAM)
    }

    /// Send `body` to `path`; a 2xx answer returns the response, anything else becomes
    /// [`DriverError::Command`] with the VMM's `fault_message`.
    async fn call(
        client: &ApiClient,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, DriverError> {
        let payload = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| DriverError::Protocol(format!("cannot encode {path} body: {e}")))?;
        let resp = client.request(method, path, payload.as_deref()).await?;
        if (200..300).contains(&resp.status) {
            Ok(resp)
        } else {
            Err(DriverError::Command {
                command: command_name(method, path, body),
                message: error_message(resp.status, &resp.body),
            })
        }
    }

    async fn action(handle: &VmHandle, action_type: ActionType) -> Result<(), DriverError> {
        let body = to_value("action", &InstanceActionInfo { action_type })?;
        Self::call(
            &Self::client(&handle.api_socket),
            Method::Put,
            "/actions",
            Some(&body),
        )
        .await
        .map(drop)
    }

    async fn set_state(handle: &VmHandle, state: model::VmState) -> Result<(), DriverError> {
        let body = to_value("vm state", &model::Vm { state })?;
        Self::call(
            &Self::client(&handle.api_socket),
            Method::Patch,
            "/vm",
            Some(&body),
        )
        .await
        .map(drop)
    }

    /// Start a Firecracker for `spec` (serial console into the capped log) and send it
    /// `calls`; when anything fails the VMM and the console sidecar are stopped again.
    async fn launch_with(
        &self,
        spec: &BootSpec<'_>,
        calls: &[(String, serde_json::Value, Duration)],
    ) -> Result<Launched, DriverError> {
        let program = self.binary()?;
        let files = VmFiles::new(spec.vm_dir);
        if files.api_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(DriverError::Io {
                path: files.api_socket.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "socket path too long for a Unix socket; use a shorter VMRS_HOME",
                ),
            });
        }
        for f in [&files.api_socket, &files.quit_marker, &files.log] {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(f)(e)),
            }
        }
        // Firecracker opens its log; it must exist
        crate::paths::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&files.log)
            .map_err(io_err(&files.log))?;
        crate::paths::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&spec.serial_log)
            .map_err(io_err(&spec.serial_log))?;
        let capture =
            crate::console::capture::start(spec.vm_dir, &spec.serial_log, spec.config.serial_log_max())?;
        let guard = crate::console::capture::CaptureGuard::new(capture, spec.vm_dir);
        let socket = guard.socket();
        let console = std::os::unix::net::UnixStream::connect(&socket).map_err(io_err(&socket))?;
        let vmm_log = crate::paths::private_file()
            .create(true)
            .append(true)
            .open(&spec.vmm_log)
            .map_err(io_err(&spec.vmm_log))?;
        let mut cmd = tokio::process::Command::new(&program);
        // TAP devices in a network namespace are only found from inside it
        if let Some(ns) = spec.devices.netns.as_deref() {
            crate::net::netns::command_in(&mut cmd, ns).map_err(|e| DriverError::Io {
                path: ns.to_path_buf(),
                source: std::io::Error::other(e),
            })?;
        }
        cmd.arg("--api-sock")
            .arg(&files.api_socket)
            .arg("--log-path")
            .arg(&files.log)
            // info level: the log then ends with the exit line classification reads
            .arg("--level")
            .arg("Info")
            .stdin(std::process::Stdio::null())
            .stdout(std::os::fd::OwnedFd::from(console))
            .stderr(vmm_log)
            .current_dir(spec.vm_dir);
        tracing::debug!(vm = %spec.config.name, program = %program.display(), "launching firecracker");
        let mut process = VmmProcess::spawn_owned(cmd, spec.vm_dir).map_err(|e| match e {
            crate::process::ProcessError::Spawn { source, .. } => DriverError::Spawn {
                program: program.display().to_string(),
                source,
            },
            other => DriverError::Process(other),
        })?;
        let result = async {
            wait_api(&mut process, &files, spec).await?;
            let client = Self::client(&files.api_socket);
            for (path, body, timeout) in calls {
                Self::call(&client.with_timeout(*timeout), Method::Put, path, Some(body)).await?;
            }
            Ok::<(), DriverError>(())
        }
        .await;
        if let Err(e) = result {
            let _ = process.kill();
            let _ = process.wait().await;
            return Err(e);
        }
        guard.disarm();
        Ok(Launched {
            handle: VmHandle {
                name: spec.config.name.clone(),
                backend: BackendKind::Firecracker,
                pid: process.pid(),
                start_time: process.start_time(),
                api_socket: files.api_socket.clone(),
                event_socket: None,
                serial_log: spec.serial_log.clone(),
                accel: Some("kvm".into()),
            },
            process,
        })
    }
}

/// The command named in an error: `PUT /actions InstanceStart`, `PATCH /vm`, ...
fn command_name(method: Method, path: &str, body: Option<&serde_json::Value>) -> String {
    let m = match method {
        Method::Get => "GET",
        Method::Put => "PUT",
        Method::Patch => "PATCH",
    };
    match body.and_then(|b| b.get("action_type")).and_then(|a| a.as_str()) {
        Some(action) => format!("{m} {path} {action}"),
        None => format!("{m} {path}"),
    }
}

/// Wait until the API answers `GET /` (or the VMM dies, or the deadline passes).
async fn wait_api(process: &mut VmmProcess, files: &VmFiles, spec: &BootSpec<'_>) -> Result<(), DriverError> {
    let client = FirecrackerDriver::client(&files.api_socket).with_timeout(Duration::from_secs(2));
    let deadline = Instant::now() + API_STARTUP_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        if !process.is_alive() {
            let status = process.wait().await.map(|s| s.to_string()).unwrap_or_default();
            let mut detail = format!("{status}; {}", file_tail(&spec.vmm_log, 2000));
            let log = file_tail(&files.log, 2000);
            if !log.is_empty() {
                detail.push_str("; ");
                detail.push_str(&log);
            }
            if let Err(reason) = crate::host::kvm::opens() {
                return Err(DriverError::AccelUnavailable { reason });
            }
            return Err(DriverError::BootFailed {
                program: PROGRAM.into(),
                detail,
            });
        }
        if files.api_socket.exists() {
            match client.request(Method::Get, "/", None).await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(_) | Err(DriverError::Connect { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if Instant::now() > deadline {
            return Err(DriverError::Timeout {
                what: "firecracker api socket".into(),
                secs: API_STARTUP_TIMEOUT.as_secs_f64(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[async_trait::async_trait]
impl VmDriver for FirecrackerDriver {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            accels: &[Accel::Kvm],
            disk_formats: &[DiskFormat::Raw],
            cache_modes: &[CacheMode::Writeback, CacheMode::Unsafe],
            disk_serial: false,
            nic_user: false,
            nic_user_port_forwards: false,
            nic_user_fixed_address: false,
            nic_tap: true,
            nic_switch: false,
            netns: true,
            // The agent over vsock: Firecracker's device, hybrid vsock on the VM's Unix socket.
            agent_transports: &[AgentTransport::Vsock],
            agent_default: false,
            shared_dirs: false,
            entropy: true,
            memory: &[MemoryKind::Anonymous],
            pause: true,
            snapshot: true,
            resize: false,
            hotplug: false,
            counters: false,
        }
    }

    async fn boot(&self, spec: &BootSpec<'_>) -> Result<Launched, DriverError> {
        // everything that can be checked is checked before a process starts
        let kernel = super::vmlinux::prepare_vmlinux(&spec.config.kernel, spec.vm_dir)
            .await
            .map_err(|e| DriverError::BootFailed {
                program: PROGRAM.into(),
                detail: format!("kernel {}: {e}", spec.config.kernel.display()),
            })?;
        let mut calls: Vec<(String, serde_json::Value, Duration)> =
            config_calls(spec.config, &spec.devices, &kernel, &spec.guest_params)?
                .into_iter()
                .map(|(p, b)| (p, b, API_TIMEOUT))
                .collect();
        let start = to_value(
            "action",
            &InstanceActionInfo {
                action_type: ActionType::InstanceStart,
            },
        )?;
        calls.push(("/actions".into(), start, API_TIMEOUT));
        self.launch_with(spec, &calls).await
    }

    async fn status(&self, handle: &VmHandle) -> Result<VmmStatus, DriverError> {
        let resp = Self::call(&Self::client(&handle.api_socket), Method::Get, "/", None).await?;
        let info: InstanceInfo = serde_json::from_slice(&resp.body)
            .map_err(|e| DriverError::Protocol(format!("GET /: undecodable reply: {e}")))?;
        Ok(map_state(&info.state))
    }

    async fn pause(&self, handle: &VmHandle) -> Result<(), DriverError> {
        Self::set_state(handle, model::VmState::Paused).await
    }

    async fn resume(&self, handle: &VmHandle) -> Result<(), DriverError> {
        Self::set_state(handle, model::VmState::Resumed).await
    }

    async fn request_shutdown(&self, handle: &VmHandle) -> Result<(), DriverError> {
        Self::action(handle, ActionType::SendCtrlAltDel).await
    }

    async fn quit(&self, handle: &VmHandle) -> Result<(), DriverError> {
        let files = VmFiles::of_handle(handle);
        let process = match VmmProcess::attach(handle.pid, handle.start_time) {
            Ok(p) => p,
            // already gone: nothing to ask
            Err(crate::process::ProcessError::Gone { .. } | crate::process::ProcessError::Reused { .. }) => {
                return Ok(())
            }
            Err(e) => return Err(e.into()),
        };
        crate::paths::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&files.quit_marker)
            .map_err(io_err(&files.quit_marker))?;
        // Firecracker has no quit call: it ends on a signal
        process.kill()?;
        Ok(())
    }

    async fn snapshot(&self, handle: &VmHandle, dir: &Path) -> Result<(), DriverError> {
        let dir = std::path::absolute(dir).map_err(io_err(dir))?;
        crate::paths::create_private_dir_all(&dir).map_err(io_err(&dir))?;
        let body = to_value(
            "snapshot",
            &SnapshotCreateParams {
                mem_file_path: path_str(&dir.join(SNAPSHOT_MEMORY))?,
                snapshot_path: path_str(&dir.join(SNAPSHOT_STATE))?,
                snapshot_type: Some(model::SnapshotType::Full),
            },
        )?;
        let client = Self::client(&handle.api_socket).with_timeout(SNAPSHOT_TIMEOUT);
        Self::call(&client, Method::Put, "/snapshot/create", Some(&body))
            .await
            .map(drop)
    }

    async fn restore(&self, spec: &BootSpec<'_>, dir: &Path) -> Result<Launched, DriverError> {
        let dir = std::path::absolute(dir).map_err(io_err(dir))?;
        for f in [SNAPSHOT_STATE, SNAPSHOT_MEMORY] {
            if !dir.join(f).is_file() {
                return Err(DriverError::Io {
                    path: dir.join(f),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a firecracker snapshot"),
                });
            }
        }
        let network_overrides = spec
            .devices
            .nics
            .iter()
            .filter_map(|n| match &n.backend {
                NicBackend::Tap { ifname, .. } => Some(model::NetworkOverride {
                    iface_id: drive_id(&n.id()),
                    host_dev_name: ifname.clone(),
                }),
                _ => None,
            })
            .collect();
        let body = to_value(
            "snapshot load",
            &SnapshotLoadParams {
                snapshot_path: path_str(&dir.join(SNAPSHOT_STATE))?,
                mem_backend: model::MemoryBackend {
                    backend_type: model::MemoryBackendType::File,
                    backend_path: path_str(&dir.join(SNAPSHOT_MEMORY))?,
                },
                resume_vm: Some(true),
                network_overrides,
            },
        )?;
        self.launch_with(spec, &[("/snapshot/load".into(), body, SNAPSHOT_TIMEOUT)])
            .await
    }

    async fn info(&self, handle: &VmHandle) -> Result<serde_json::Value, DriverError> {
        let client = Self::client(&handle.api_socket);
        let instance = Self::call(&client, Method::Get, "/", None).await?;
        let config = Self::call(&client, Method::Get, "/vm/config", None).await?;
        let decode = |what: &str, r: &Response| {
            serde_json::from_slice::<serde_json::Value>(&r.body)
                .map_err(|e| DriverError::Protocol(format!("{what}: undecodable reply: {e}")))
        };
        let mut info = decode("GET /", &instance)?;
        info["config"] = decode("GET /vm/config", &config)?;
        Ok(info)
    }

    async fn exit_reason(&self, handle: &VmHandle) -> Result<Option<VmmEvent>, DriverError> {
        let files = VmFiles::of_handle(handle);
        let log = file_tail(&files.log, 64 << 10);
        Ok(Some(classify_exit(&log, files.quit_marker.exists())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Disk;

    fn vsock_agent(vhost_user: Option<&str>) -> crate::devices::AgentChannel {
        crate::devices::AgentChannel::Vsock {
            cid: 3,
            port: 1024,
            socket: "/v/agent.sock".into(),
            vhost_user: vhost_user.map(Into::into),
            process_log: None,
        }
    }

    #[test]
    fn the_agent_is_a_vsock_device_and_virtio_serial_is_refused() {
        let cfg = VmConfig::builder("a").kernel("/k").build_unchecked();
        let mut devices = DeviceSet {
            agent: Some(vsock_agent(None)),
            ..DeviceSet::default()
        };
        let calls = config_calls(&cfg, &devices, Path::new("/k"), &[]).expect("calls");
        let (path, body) = calls.last().expect("a call");
        assert_eq!(path, "/vsock");
        assert_eq!(
            *body,
            serde_json::json!({"guest_cid": 3, "uds_path": "/v/agent.sock"})
        );
        devices.agent = Some(vsock_agent(Some("/v/vhost.sock")));
        assert!(matches!(
            config_calls(&cfg, &devices, Path::new("/k"), &[]),
            Err(DriverError::Unsupported { .. })
        ));
        devices.agent = Some(crate::devices::AgentChannel::VirtioSerial {
            socket: "/v/agent.sock".into(),
            process_log: None,
        });
        assert!(matches!(
            config_calls(&cfg, &devices, Path::new("/k"), &[]),
            Err(DriverError::Unsupported { .. })
        ));
    }

    #[test]
    fn calls_follow_the_api_document() {
        let cfg = VmConfig::builder("a")
            .kernel("/k/vmlinux")
            .initramfs("/k/initrd")
            .cpus(2)
            .memory_mib(128)
            .cmdline("quiet")
            .disk(crate::config::DiskConfig::parse("/d/data.img,ro").expect("disk"))
            .build_unchecked();
        let devices = DeviceSet {
            disks: cfg
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| Disk::from_config(i, d))
                .collect(),
            entropy: true,
            ..DeviceSet::default()
        };
        let calls =
            config_calls(&cfg, &devices, Path::new("/v/vmlinux"), &["vmrs.x=1".into()]).expect("calls");
        let paths: Vec<&str> = calls.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["/machine-config", "/boot-source", "/drives/disk0", "/entropy"]
        );
        assert_eq!(
            calls[0].1,
            serde_json::json!({"vcpu_count": 2, "mem_size_mib": 128})
        );
        assert_eq!(
            calls[1].1,
            serde_json::json!({"kernel_image_path": "/v/vmlinux", "initrd_path": "/k/initrd",
                "boot_args": "console=ttyS0 reboot=k panic=1 quiet vmrs.x=1"})
        );
        assert_eq!(
            calls[2].1,
            serde_json::json!({"drive_id": "disk0", "is_root_device": false, "path_on_host": "/d/data.img",
                "is_read_only": true, "cache_type": "Writeback"})
        );
    }

    #[test]
    fn what_firecracker_lacks_is_refused_up_front() {
        let caps = FirecrackerDriver::new().capabilities();
        let cfg = VmConfig::builder("a").kernel("/k").build_unchecked();
        let user = crate::net::plan(
            "a",
            Path::new("/v"),
            Path::new("/h"),
            &[crate::config::NetworkAttachment::user(vec![])],
        )
        .expect("plan");
        let devices = DeviceSet {
            nics: user.iter().map(crate::devices::Nic::from).collect(),
            ..DeviceSet::default()
        };
        match caps.check(BackendKind::Firecracker, &cfg, &devices) {
            Err(DriverError::Unsupported { feature, .. }) => {
                assert!(feature.contains("user-mode"), "{feature}")
            }
            other => panic!("{other:?}"),
        }
        let shares = DeviceSet {
            shared_dirs: vec![crate::devices::SharedFs {
                tag: "t".into(),
                host_path: "/tmp".into(),
                read_only: false,
                socket: "/v/fs0.sock".into(),
            }],
            ..DeviceSet::default()
        };
        match caps.check(BackendKind::Firecracker, &cfg, &shares) {
            Err(e @ DriverError::Unsupported { .. }) => {
                assert!(
                    e.to_string()
                        .contains("firecracker backend does not support shared directories"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        let qcow = DeviceSet {
            disks: vec![Disk::from_config(
                0,
                &crate::config::DiskConfig::parse("/d/x.qcow2,format=qcow2").expect("disk"),
            )],
            ..DeviceSet::default()
        };
        assert!(caps.check(BackendKind::Firecracker, &cfg, &qcow).is_err());
        assert!(!caps.hotplug && !caps.resize && !caps.nic_user && !caps.shared_dirs);
    }

    #[test]
    fn exits_are_classified_from_the_log() {
        assert!(matches!(
            classify_exit(
                "x\n[anonymous-instance:main] Firecracker exiting successfully. exit_code=0\n",
                false
            ),
            VmmEvent::Shutdown { guest: true, .. }
        ));
        assert!(matches!(
            classify_exit("", true),
            VmmEvent::Shutdown { guest: false, .. }
        ));
        match classify_exit(
            "a\nReceived KVM_EXIT_INTERNAL_ERROR signal\nFirecracker exiting with error. exit_code=1\n",
            false,
        ) {
            VmmEvent::Error { reason } => {
                assert!(reason.contains("code 1 (generic error)"), "{reason}");
                assert!(reason.contains("KVM_EXIT_INTERNAL_ERROR"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        match classify_exit("Running\n", false) {
            VmmEvent::Error { reason } => assert!(reason.contains("killed or crashed"), "{reason}"),
            other => panic!("{other:?}"),
        }
        match classify_exit("Firecracker exiting with error. exit_code=148", false) {
            VmmEvent::Error { reason } => assert!(reason.contains("seccomp"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_carry_the_fault_message() {
        assert_eq!(
            error_message(
                400,
                br#"{"fault_message":"The requested operation is not supported after starting the microVM."}"#
            ),
            "400 bad request: The requested operation is not supported after starting the microVM."
        );
        assert_eq!(error_message(400, b""), "400 bad request");
        assert_eq!(drive_id("disk-0"), "disk_0");
        assert_eq!(map_state("Not started"), VmmStatus::Shutdown);
        assert_eq!(map_state("Paused"), VmmStatus::Paused);
    }

    proptest::proptest! {
        #[test]
        fn untrusted_logs_and_answers_never_panic_and_stay_bounded(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            lines in proptest::collection::vec("[ -~]{0,400}", 0..12),
        ) {
            let msg = error_message(400, &data);
            proptest::prop_assert!(msg.chars().count() <= 1024 + 32);
            let mut log = lines.join("\n");
            let _ = classify_exit(&log, false);
            log.push_str("\nFirecracker exiting with error. exit_code=");
            log.push_str(&String::from_utf8_lossy(&data));
            match classify_exit(&log, false) {
                VmmEvent::Error { reason } => proptest::prop_assert!(reason.chars().count() < 1200),
                other => proptest::prop_assert!(false, "{:?}", other),
            }
        }
    }
}
