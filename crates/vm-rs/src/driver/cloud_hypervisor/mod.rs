//! Cloud Hypervisor backend: launches `cloud-hypervisor` with only its control channels and
//! drives the VM through the REST API on a Unix socket.
//!
//! ## Protocol
//!
//! ```text
//!  cloud-hypervisor --api-socket path=<dir>/ch-api.sock     (REST API, see [`api`])
//!                   --event-monitor path=<dir>/ch-events.json (event records, see [`events`])
//!                   --log-file <dir>/ch.log -v
//!
//!  GET /api/v1/vmm.ping          until the API answers (VMM up)
//!  PUT /api/v1/vm.create  {VmConfig}   400 with the error chain on a bad config
//!  PUT /api/v1/vm.boot
//!  PUT vm.pause | vm.resume | vm.power-button | vm.snapshot | vm.resize | vm.add-disk |
//!      vm.add-net | vm.remove-device | vmm.shutdown;   GET vm.info | vm.counters
//!  PUT /api/v1/vm.restore {source_url}  (in a fresh VMM, then vm.resume)
//! ```
//!
//! Bodies are the typed structs of [`model`], written from Cloud Hypervisor's OpenAPI document.
//! The VM configuration goes through `vm.create` rather than the command line, so a bad
//! configuration comes back as a structured API error instead of a dead process. Every verb
//! reaches the VMM through the socket path recorded in the [`VmHandle`], so any process can
//! drive a VM another one started.
//!
//! ## Kernel
//!
//! Cloud Hypervisor direct-boots an ELF vmlinux through its PVH entry point. A bzImage kernel is
//! unpacked into `<dir>/vmlinux` first ([`vmlinux`]), so the guest assets built for QEMU serve
//! here too. The serial console goes to the VM's `serial.log`, as with every backend.
//!
//! ## The VM it creates
//!
//! * `boot_vcpus` = `cpus`, `max_vcpus` = `max(cpus, min(host cpus, 8))`, so
//!   [`VmDriver::resize`] can add vCPUs up to that;
//! * memory `size` = `memory_mib`, with as much again reserved for ACPI memory hot-plug;
//! * serial console in file mode to the VM's serial log, virtio-console off;
//! * disks as virtio-blk with an explicit `image_type` (`Raw`/`Qcow2`); `cache=none` is
//!   `direct`, `cache=unsafe` is refused;
//! * disks carry their serial (the image root disk is found by it);
//! * TAP NICs (plain or on a bridge) in `net` at `vm.create`, and hot-plugged with
//!   [`VmDriver::add_net`]; the VMM runs in the NICs' network namespace when they have one;
//!   user-mode NAT and switch networks are refused by [`VmDriver::capabilities`] before anything
//!   is created (Cloud Hypervisor has neither);
//! * an entropy device (`rng` from `/dev/urandom`); guest RAM anonymous or `shared`;
//! * shared directories as `fs` entries (virtio-fs on the share's virtiofsd socket, see
//!   [`crate::virtiofs`]), with `memory.shared` on: the daemon maps guest RAM;
//! * the guest agent over vsock (`vsock` {cid, socket}: the host reaches the guest's agent port
//!   through Cloud Hypervisor's hybrid-vsock Unix socket, `CONNECT <port>\n` / `OK <port>\n`),
//!   for VMs that need it (an image's process) or ask for it — not by default: a restored
//!   snapshot would bind the source's vsock socket, so a VM with the agent is not
//!   snapshotted. The virtio-serial transport is refused up front.
//!
//! Snapshots need a paused VM; restore re-creates the VM from the snapshot's own
//! configuration, so the restored guest writes to the serial log path recorded there. Saving
//! vCPU state needs hardware KVM: a software KVM fails with `GetNestedState`, which
//! [`VmDriver::snapshot`] explains.
//!
//! ## Failure detection
//!
//! Cloud Hypervisor exits with status 0 even when a vCPU fails, so the exit status says
//! nothing. [`VmDriver::events`] follows the event monitor file; [`VmDriver::exit_reason`]
//! explains a VMM that is gone from the event file, the driver's quit marker and the VMM log
//! (see [`events`]).
//!
//! ## Binary
//!
//! The binary is looked up as: the path given to [`CloudHypervisorDriver::with_binary`], then
//! `VMRS_CLOUD_HYPERVISOR`, then `cloud-hypervisor` on `PATH`. It is not packaged by the usual
//! distributions; [`find_binary`] reports where it looked when it is absent.

pub mod events;
pub mod model;
/// The HTTP client (shared with the Firecracker backend: [`crate::driver::http`]).
pub use super::http as api;
/// The bzImage → ELF extraction (shared with the Firecracker backend:
/// [`crate::driver::vmlinux`]).
pub use super::vmlinux;

use self::api::{ApiClient, Method};
use super::{
    BootSpec, Counters, DriverError, EventStream, Launched, TapNetwork, VmDriver, VmHandle, VmmEvent,
    VmmStatus,
};
use crate::config::{Accel, BackendKind, CacheMode, DiskConfig, DiskFormat, VmConfig};
use crate::devices::{AgentChannel, Capabilities, DeviceSet, Disk, MemoryBackend, MemoryKind};
use crate::net::NicBackend;
use crate::process::VmmProcess;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Program name looked up on `PATH`.
pub const PROGRAM: &str = "cloud-hypervisor";
/// Environment variable naming the binary.
pub const BINARY_ENV: &str = "VMRS_CLOUD_HYPERVISOR";

/// API socket file name inside the VM directory.
pub const API_SOCKET: &str = crate::vm_dir::VmDir::CH_API_SOCKET;
/// Event monitor file name inside the VM directory.
pub const EVENT_FILE: &str = crate::vm_dir::VmDir::CH_EVENTS;
/// VMM log file name inside the VM directory.
pub const LOG_FILE: &str = crate::vm_dir::VmDir::CH_LOG;
/// Marker written before the driver asks the VMM to exit.
pub const QUIT_MARKER: &str = crate::vm_dir::VmDir::CH_QUIT_MARKER;

/// Longest Unix socket path the kernel accepts (`sun_path` minus the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How long the VMM gets to open its API socket.
const API_STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Timeout of ordinary API calls.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of snapshot/restore calls (they copy guest memory).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Find the `cloud-hypervisor` binary: `explicit`, else `VMRS_CLOUD_HYPERVISOR`, else `PATH`.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, DriverError> {
    super::find_program(
        explicit,
        BINARY_ENV,
        PROGRAM,
        "install cloud-hypervisor or set VMRS_CLOUD_HYPERVISOR to its path (or use --backend qemu)",
    )
}

/// Whether KVM is usable for Cloud Hypervisor, which has no software fallback: the host probe
/// that runs a tiny guest and requires hardware speed ([`crate::host::kvm::usable`]).
pub fn kvm_usable() -> Result<(), String> {
    crate::host::kvm::usable().map(drop)
}

/// The Cloud Hypervisor driver.
#[derive(Debug, Default, Clone)]
pub struct CloudHypervisorDriver {
    binary: Option<PathBuf>,
}

/// Files of one VM, derived from its directory.
#[derive(Debug, Clone)]
struct VmFiles {
    api_socket: PathBuf,
    events: PathBuf,
    log: PathBuf,
    quit_marker: PathBuf,
}

impl VmFiles {
    fn new(dir: &Path) -> Self {
        Self {
            api_socket: dir.join(API_SOCKET),
            events: dir.join(EVENT_FILE),
            log: dir.join(LOG_FILE),
            quit_marker: dir.join(QUIT_MARKER),
        }
    }

    /// Why the VMM went away, from its records (see [`events::exit_reason`]). Cloud Hypervisor
    /// removes its API socket and logs an orderly-exit line when it exits normally.
    fn exit_reason(&self, records: &[events::ChEvent]) -> VmmEvent {
        let orderly = !self.api_socket.exists() || events::clean_exit_in_log(&self.log);
        events::exit_reason(records, self.quit_marker.exists(), &self.log, orderly)
    }

    fn of_handle(handle: &VmHandle) -> Self {
        let dir = handle.api_socket.parent().unwrap_or(Path::new("/"));
        let mut f = Self::new(dir);
        f.api_socket = handle.api_socket.clone();
        if let Some(ev) = &handle.event_socket {
            f.events = ev.clone();
        }
        f
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |source| DriverError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn remove_if_exists(path: &Path) -> Result<(), DriverError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Last `max` bytes of a log, for error messages.
fn log_tail(path: &Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// Build the `vm.create` body for `config` and its `devices`, booting `kernel` with
/// `guest_params` appended to the command line. The serial console goes to the VMM's standard
/// output (`Tty` mode), which the driver connects to the capped serial log's sidecar.
/// The devices were checked against [`CloudHypervisorDriver`]'s capabilities; one this body
/// cannot express is still refused here rather than dropped.
pub fn vm_config(
    config: &VmConfig,
    devices: &DeviceSet,
    kernel: &Path,
    guest_params: &[String],
) -> Result<model::VmConfig, DriverError> {
    let unsupported = |feature| DriverError::Unsupported {
        backend: BackendKind::CloudHypervisor,
        feature,
    };
    let vsock = match &devices.agent {
        None => None,
        Some(AgentChannel::Vsock {
            cid,
            socket,
            vhost_user: None,
            ..
        }) => Some(model::VsockConfig {
            cid: u64::from(*cid),
            socket: path_str(socket)?,
            id: Some("vmrs-vsock".into()),
        }),
        Some(AgentChannel::Vsock { .. }) => return Err(unsupported("a vhost-user vsock device")),
        Some(AgentChannel::VirtioSerial { .. }) => {
            return Err(unsupported("the guest agent over virtio-serial"))
        }
    };
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let max_vcpus = config.cpus.max(host_cpus.min(8));
    let memory = config
        .memory_mib
        .checked_mul(1 << 20)
        .ok_or(DriverError::Command {
            command: "vm.create".into(),
            message: format!("memory of {} MiB is too large", config.memory_mib),
        })?;
    let mut cmdline = String::from("console=ttyS0");
    for part in std::iter::once(&config.cmdline).chain(guest_params) {
        if !part.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(part);
        }
    }
    crate::config::check_kernel_cmdline(&config.kernel, &cmdline)?;
    let payload = model::PayloadConfig {
        kernel: Some(path_str(kernel)?),
        cmdline: Some(cmdline),
        initramfs: config.initramfs.as_deref().map(path_str).transpose()?,
    };
    let disks = devices
        .disks
        .iter()
        .map(disk_config)
        .collect::<Result<Vec<_>, _>>()?;
    let net = devices
        .nics
        .iter()
        .map(|n| match &n.backend {
            NicBackend::Tap { ifname, .. } => Ok(model::NetConfig {
                id: Some(n.id()),
                tap: Some(ifname.clone()),
                mac: Some(n.mac.to_string()),
            }),
            NicBackend::User { .. } => Err(unsupported(
                "user-mode networking (--net user, -p without a bridge)",
            )),
            NicBackend::Switch { .. } => Err(unsupported("switch networks")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let shared = match &devices.memory {
        MemoryBackend::Anonymous => None,
        MemoryBackend::Memfd { shared } => Some(*shared),
        MemoryBackend::File { .. } => return Err(unsupported("file-backed guest memory")),
    };
    // vhost-user devices need guest RAM the daemon can map
    if !devices.shared_dirs.is_empty() && shared != Some(true) {
        return Err(unsupported("shared directories without shared guest memory"));
    }
    let fs = devices
        .shared_dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Ok(model::FsConfig {
                id: Some(format!("fs{i}")),
                tag: d.tag.clone(),
                socket: path_str(&d.socket)?,
                num_queues: 1,
                queue_size: 1024,
            })
        })
        .collect::<Result<Vec<_>, DriverError>>()?;
    Ok(model::VmConfig {
        cpus: model::CpusConfig {
            boot_vcpus: config.cpus,
            max_vcpus,
        },
        memory: model::MemoryConfig {
            size: memory,
            hotplug_size: Some(memory),
            shared,
        },
        payload,
        disks,
        net,
        fs,
        rng: devices.entropy.then(|| model::RngConfig {
            src: "/dev/urandom".into(),
        }),
        vsock,
        // Not `File`: Cloud Hypervisor's file has no size limit (a guest printing forever would
        // fill the host disk); its stdout is the capture's connection (see `launch`).
        serial: model::ConsoleConfig {
            mode: model::ConsoleMode::Tty,
            file: None,
        },
        console: model::ConsoleConfig {
            mode: model::ConsoleMode::Off,
            file: None,
        },
    })
}

/// [`vm_config`] as the JSON sent.
pub fn vm_config_body(
    config: &VmConfig,
    devices: &DeviceSet,
    kernel: &Path,
    guest_params: &[String],
) -> Result<serde_json::Value, DriverError> {
    to_value("vm.create", &vm_config(config, devices, kernel, guest_params)?)
}

fn to_value<T: serde::Serialize>(verb: &str, v: &T) -> Result<serde_json::Value, DriverError> {
    serde_json::to_value(v).map_err(|e| DriverError::Protocol(format!("cannot encode {verb} body: {e}")))
}

fn path_str(p: &Path) -> Result<String, DriverError> {
    p.to_str().map(str::to_string).ok_or_else(|| DriverError::Io {
        path: p.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not valid utf-8"),
    })
}

/// Build a `DiskConfig` (also used for hot-plug, where an empty id is the backend's choice).
pub fn disk_config(disk: &Disk) -> Result<model::DiskConfig, DriverError> {
    if disk.cache == CacheMode::Unsafe {
        return Err(DriverError::Unsupported {
            backend: BackendKind::CloudHypervisor,
            feature: "cache=unsafe disks",
        });
    }
    Ok(model::DiskConfig {
        path: path_str(&disk.path)?,
        readonly: disk.read_only,
        direct: disk.cache == CacheMode::None,
        image_type: match disk.format {
            DiskFormat::Raw => model::ImageType::Raw,
            DiskFormat::Qcow2 => model::ImageType::Qcow2,
        },
        id: (!disk.id.is_empty()).then(|| disk.id.clone()),
        serial: disk.serial.clone(),
    })
}

/// [`disk_config`] as the JSON sent.
pub fn disk_body(disk: &Disk) -> Result<serde_json::Value, DriverError> {
    to_value("disk", &disk_config(disk)?)
}

/// Map Cloud Hypervisor's `VmState` string.
pub fn map_state(state: &str) -> VmmStatus {
    match state {
        "Running" => VmmStatus::Running,
        "Paused" => VmmStatus::Paused,
        "Shutdown" | "Created" => VmmStatus::Shutdown,
        _ => VmmStatus::Other,
    }
}

/// Add a hint to errors this host is known to produce.
fn explain_snapshot_error(e: DriverError) -> DriverError {
    match e {
        DriverError::Command { command, message } if message.contains("GetNestedState") => {
            DriverError::Command {
                command,
                message: format!(
                    "{message} (this host's KVM cannot save nested vCPU state, as with software KVM \
                 implementations; snapshots need hardware KVM)"
                ),
            }
        }
        other => other,
    }
}

impl CloudHypervisorDriver {
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

    fn client(handle: &VmHandle) -> ApiClient {
        ApiClient::new(&handle.api_socket, API_TIMEOUT)
    }

    /// Start a VMM with only its control channels and wait until its API answers.
    async fn launch(&self, spec: &BootSpec<'_>) -> Result<(VmmProcess, VmFiles, ApiClient), DriverError> {
        let program = self.binary()?;
        let files = VmFiles::new(spec.vm_dir);
        if files.api_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(DriverError::Io {
                path: files.api_socket.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "socket path too long"),
            });
        }
        for f in [&files.api_socket, &files.events, &files.quit_marker, &files.log] {
            remove_if_exists(f)?;
        }
        let vmm_log = crate::paths::private_file()
            .create(true)
            .append(true)
            .open(&spec.vmm_log)
            .map_err(io_err(&spec.vmm_log))?;
        crate::paths::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&spec.serial_log)
            .map_err(io_err(&spec.serial_log))?;
        // The serial console (Tty mode) is the VMM's stdout: the capped log's sidecar.
        let capture =
            crate::console::capture::start(spec.vm_dir, &spec.serial_log, spec.config.serial_log_max())?;
        let guard = crate::console::capture::CaptureGuard::new(capture, spec.vm_dir);
        let console = guard.connect().map_err(io_err(&guard.socket()))?;
        let mut cmd = tokio::process::Command::new(&program);
        // TAP devices in a network namespace are only found from inside it
        if let Some(ns) = spec.devices.netns.as_deref() {
            crate::net::netns::command_in(&mut cmd, ns).map_err(|e| DriverError::Io {
                path: ns.to_path_buf(),
                source: std::io::Error::other(e),
            })?;
        }
        cmd.arg("--api-socket")
            .arg(format!("path={}", files.api_socket.display()))
            .arg("--event-monitor")
            .arg(format!("path={}", files.events.display()))
            .arg("--log-file")
            .arg(&files.log)
            // info level: the log then ends with "Cloud Hypervisor exited successfully" on an
            // orderly exit (see `events`).
            .arg("-v")
            .stdin(std::process::Stdio::null())
            .stdout(std::os::fd::OwnedFd::from(console))
            .stderr(vmm_log)
            .current_dir(spec.vm_dir);
        // owned by the VM directory: found from there even if no record ever names it
        let mut process = VmmProcess::spawn_owned(cmd, spec.vm_dir).map_err(|e| match e {
            crate::process::ProcessError::Spawn { source, .. } => DriverError::Spawn {
                program: program.display().to_string(),
                source,
            },
            other => DriverError::Process(other),
        })?;
        let client = ApiClient::new(&files.api_socket, Duration::from_secs(2));
        let deadline = Instant::now() + API_STARTUP_TIMEOUT;
        // The API is usually up within a few milliseconds: poll fast first, then back off.
        let mut pause = Duration::from_millis(1);
        loop {
            if !process.is_alive() {
                let status = process.wait().await.map(|s| s.to_string()).unwrap_or_default();
                let mut detail = format!("{status}; {}", log_tail(&spec.vmm_log, 2000));
                let log = log_tail(&files.log, 2000);
                if !log.is_empty() {
                    detail.push_str("; ");
                    detail.push_str(&log);
                }
                // The usual reason for a VMM dying at once is KVM; say so when it is.
                if let Err(reason) = crate::host::kvm::opens() {
                    return Err(DriverError::AccelUnavailable { reason });
                }
                return Err(DriverError::BootFailed {
                    program: PROGRAM.into(),
                    detail,
                });
            }
            if files.api_socket.exists() {
                match client.call(Method::Get, "vmm.ping", None).await {
                    Ok(_) => break,
                    Err(DriverError::Connect { .. }) => {}
                    Err(e) => {
                        let _ = process.kill();
                        let _ = process.wait().await;
                        return Err(e);
                    }
                }
            }
            if Instant::now() > deadline {
                let _ = process.kill();
                let _ = process.wait().await;
                return Err(DriverError::Timeout {
                    what: "cloud-hypervisor api socket".into(),
                    secs: API_STARTUP_TIMEOUT.as_secs_f64(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        guard.disarm();
        Ok((process, files, client.with_timeout(API_TIMEOUT)))
    }

    fn handle_for(spec: &BootSpec<'_>, process: &VmmProcess, files: &VmFiles) -> VmHandle {
        VmHandle {
            name: spec.config.name.clone(),
            backend: BackendKind::CloudHypervisor,
            pid: process.pid(),
            start_time: process.start_time(),
            api_socket: files.api_socket.clone(),
            event_socket: Some(files.events.clone()),
            serial_log: spec.serial_log.clone(),
            accel: Some("kvm".into()),
        }
    }

    /// Launch a VMM for `spec` and send it `steps` (verb, body, timeout) in order; when one
    /// fails, kill the VMM so nothing is left behind.
    async fn launch_with(
        &self,
        spec: &BootSpec<'_>,
        steps: &[(&str, Option<serde_json::Value>, Duration)],
    ) -> Result<Launched, DriverError> {
        let (mut process, files, client) = self.launch(spec).await?;
        for (verb, body, timeout) in steps {
            let sent = client
                .with_timeout(*timeout)
                .call(Method::Put, verb, body.as_ref())
                .await;
            if let Err(e) = sent {
                let _ = process.kill();
                let _ = process.wait().await;
                return Err(e);
            }
        }
        Ok(Launched {
            handle: Self::handle_for(spec, &process, &files),
            process,
        })
    }
}

#[async_trait::async_trait]
impl VmDriver for CloudHypervisorDriver {
    fn kind(&self) -> BackendKind {
        BackendKind::CloudHypervisor
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Cloud Hypervisor runs on KVM only (Accel::Auto means KVM here).
            accels: &[Accel::Kvm],
            disk_formats: &[DiskFormat::Raw, DiskFormat::Qcow2],
            cache_modes: &[CacheMode::Writeback, CacheMode::None],
            disk_serial: true,
            nic_user: false,
            nic_user_port_forwards: false,
            nic_user_fixed_address: false,
            nic_tap: true,
            nic_switch: false,
            netns: true,
            // The agent over vsock: Cloud Hypervisor's own device, hybrid vsock on the VM's
            // Unix socket.
            agent_transports: &[crate::devices::AgentTransport::Vsock],
            agent_default: false,
            shared_dirs: true,
            entropy: true,
            memory: &[MemoryKind::Anonymous, MemoryKind::Memfd],
            pause: true,
            snapshot: true,
            resize: true,
            hotplug: true,
            counters: true,
        }
    }

    async fn boot(&self, spec: &BootSpec<'_>) -> Result<Launched, DriverError> {
        // Check what can be checked before starting a process.
        let kernel = vmlinux::prepare_vmlinux(&spec.config.kernel, spec.vm_dir)
            .await
            .map_err(|e| DriverError::BootFailed {
                program: PROGRAM.into(),
                detail: format!("kernel {}: {e}", spec.config.kernel.display()),
            })?;
        let body = vm_config_body(spec.config, &spec.devices, &kernel, &spec.guest_params)?;
        self.launch_with(
            spec,
            &[
                ("vm.create", Some(body), API_TIMEOUT),
                ("vm.boot", None, API_TIMEOUT),
            ],
        )
        .await
    }

    async fn status(&self, handle: &VmHandle) -> Result<VmmStatus, DriverError> {
        let resp = Self::client(handle).raw(Method::Get, "vm.info", None).await?;
        match resp.status {
            200 => {
                let info: model::VmInfoState = serde_json::from_slice(&resp.body)
                    .map_err(|e| DriverError::Protocol(format!("vm.info: undecodable reply: {e}")))?;
                Ok(map_state(&info.state))
            }
            // No VM created: nothing runs.
            404 => Ok(VmmStatus::Shutdown),
            s => Err(DriverError::Command {
                command: "vm.info".into(),
                message: api::error_message(s, &resp.body),
            }),
        }
    }

    async fn pause(&self, handle: &VmHandle) -> Result<(), DriverError> {
        Self::client(handle)
            .call(Method::Put, "vm.pause", None)
            .await
            .map(drop)
    }

    async fn resume(&self, handle: &VmHandle) -> Result<(), DriverError> {
        Self::client(handle)
            .call(Method::Put, "vm.resume", None)
            .await
            .map(drop)
    }

    async fn request_shutdown(&self, handle: &VmHandle) -> Result<(), DriverError> {
        Self::client(handle)
            .call(Method::Put, "vm.power-button", None)
            .await
            .map(drop)
    }

    async fn quit(&self, handle: &VmHandle) -> Result<(), DriverError> {
        let files = VmFiles::of_handle(handle);
        crate::paths::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&files.quit_marker)
            .map_err(io_err(&files.quit_marker))?;
        match Self::client(handle).call(Method::Put, "vmm.shutdown", None).await {
            Ok(_) => Ok(()),
            // The VMM may exit before its answer is read.
            Err(DriverError::Protocol(m)) if m.contains("connection closed") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn events(&self, handle: &VmHandle) -> Result<EventStream, DriverError> {
        let files = VmFiles::of_handle(handle);
        // A VMM that is already gone still has its records: the stream replays them and ends
        // with the reason it went away.
        let process = match VmmProcess::attach(handle.pid, handle.start_time) {
            Ok(p) => Some(p),
            Err(crate::process::ProcessError::Gone { .. } | crate::process::ProcessError::Reused { .. }) => {
                None
            }
            Err(e) => return Err(e.into()),
        };
        let mut follower = crate::console::LogFollower::open(&files.events, 0)
            .await
            .map_err(io_err(&files.events))?;
        let stream = async_stream(move |tx| async move {
            let mut parser = events::EventParser::new();
            let mut buf = vec![0u8; 8192];
            let mut offset = 0usize;
            // Send mapped events; true once the final `vmm shutdown` went out.
            let emit = |evs: Vec<events::ChEvent>| {
                for ev in evs {
                    let f = files.clone();
                    let mapped = events::map_event(&ev, move || {
                        events::explain_shutdown(f.quit_marker.exists(), &f.log)
                    });
                    if let Some(m) = mapped {
                        if tx.send(m).is_err() || ev.is("vmm", "shutdown") {
                            return true;
                        }
                    }
                }
                false
            };
            let exited = async move {
                if let Some(mut p) = process {
                    let _ = p.wait().await;
                }
            };
            tokio::pin!(exited);
            loop {
                tokio::select! {
                    r = follower.next_chunk(&mut buf) => match r {
                        Ok(Some(n)) => {
                            offset += n;
                            if emit(parser.feed(&buf[..n])) {
                                return;
                            }
                        }
                        Ok(None) | Err(_) => return,
                    },
                    () = &mut exited => {
                        // Drain what the VMM wrote before it went away.
                        let all = std::fs::read(&files.events).unwrap_or_default();
                        let rest = all.get(offset..).unwrap_or_default();
                        if emit(parser.feed(rest)) {
                            return;
                        }
                        let records = events::EventParser::new().feed(&all);
                        let _ = tx.send(files.exit_reason(&records));
                        return;
                    }
                }
            }
        });
        Ok(stream)
    }

    async fn snapshot(&self, handle: &VmHandle, dir: &Path) -> Result<(), DriverError> {
        let dir = std::path::absolute(dir).map_err(io_err(dir))?;
        crate::paths::create_private_dir_all(&dir).map_err(io_err(&dir))?;
        let body = to_value(
            "vm.snapshot",
            &model::VmSnapshotConfig {
                destination_url: format!("file://{}", dir.display()),
            },
        )?;
        Self::client(handle)
            .with_timeout(SNAPSHOT_TIMEOUT)
            .call(Method::Put, "vm.snapshot", Some(&body))
            .await
            .map(drop)
            .map_err(explain_snapshot_error)
    }

    async fn restore(&self, spec: &BootSpec<'_>, dir: &Path) -> Result<Launched, DriverError> {
        let dir = std::path::absolute(dir).map_err(io_err(dir))?;
        if !dir.join("config.json").is_file() {
            return Err(DriverError::Io {
                path: dir.join("config.json"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a cloud-hypervisor snapshot"),
            });
        }
        let body = to_value(
            "vm.restore",
            &model::RestoreConfig {
                source_url: format!("file://{}", dir.display()),
            },
        )?;
        self.launch_with(
            spec,
            &[
                ("vm.restore", Some(body), SNAPSHOT_TIMEOUT),
                ("vm.resume", None, API_TIMEOUT),
            ],
        )
        .await
    }

    async fn resize(
        &self,
        handle: &VmHandle,
        cpus: Option<u32>,
        memory_mib: Option<u64>,
    ) -> Result<(), DriverError> {
        let desired_ram = memory_mib
            .map(|m| {
                m.checked_mul(1 << 20).ok_or(DriverError::Command {
                    command: "vm.resize".into(),
                    message: format!("memory of {m} MiB is too large"),
                })
            })
            .transpose()?;
        let body = to_value(
            "vm.resize",
            &model::VmResize {
                desired_vcpus: cpus,
                desired_ram,
            },
        )?;
        Self::client(handle)
            .call(Method::Put, "vm.resize", Some(&body))
            .await
            .map(drop)
    }

    async fn add_disk(&self, handle: &VmHandle, disk: &DiskConfig) -> Result<String, DriverError> {
        crate::config::validate_disk(disk)?;
        let body = disk_body(&Disk {
            id: String::new(),
            ..Disk::from_config(0, disk)
        })?;
        let info: model::PciDeviceInfo = Self::client(handle)
            .call_json(Method::Put, "vm.add-disk", Some(&body))
            .await?;
        Ok(info.id)
    }

    async fn add_net(&self, handle: &VmHandle, net: &TapNetwork) -> Result<String, DriverError> {
        let body = to_value(
            "vm.add-net",
            &model::NetConfig {
                tap: net.tap.clone(),
                mac: net.mac.clone(),
                id: None,
            },
        )?;
        let info: model::PciDeviceInfo = Self::client(handle)
            .call_json(Method::Put, "vm.add-net", Some(&body))
            .await?;
        Ok(info.id)
    }

    async fn remove_device(&self, handle: &VmHandle, id: &str) -> Result<(), DriverError> {
        let body = to_value("vm.remove-device", &model::VmRemoveDevice { id: id.to_string() })?;
        Self::client(handle)
            .call(Method::Put, "vm.remove-device", Some(&body))
            .await
            .map(drop)
    }

    async fn counters(&self, handle: &VmHandle) -> Result<Counters, DriverError> {
        Self::client(handle)
            .call_json(Method::Get, "vm.counters", None)
            .await
    }

    async fn info(&self, handle: &VmHandle) -> Result<serde_json::Value, DriverError> {
        Self::client(handle).call_json(Method::Get, "vm.info", None).await
    }

    async fn exit_reason(&self, handle: &VmHandle) -> Result<Option<VmmEvent>, DriverError> {
        let files = VmFiles::of_handle(handle);
        let all = events::read_all(&files.events).map_err(io_err(&files.events))?;
        Ok(Some(files.exit_reason(&all)))
    }
}

/// A stream fed by a task through an unbounded channel; the task stops when the receiver is
/// dropped (its sends fail).
fn async_stream<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<VmmEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(f(tx));
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ev| (ev, rx))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vsock_agent(vhost_user: Option<&str>) -> AgentChannel {
        AgentChannel::Vsock {
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
        let body = vm_config_body(&cfg, &devices, Path::new("/k"), &[]).expect("body");
        assert_eq!(
            body["vsock"],
            serde_json::json!({"cid": 3, "socket": "/v/agent.sock", "id": "vmrs-vsock"})
        );
        devices.agent = Some(vsock_agent(Some("/v/vhost.sock")));
        assert!(matches!(
            vm_config(&cfg, &devices, Path::new("/k"), &[]),
            Err(DriverError::Unsupported { .. })
        ));
        devices.agent = Some(AgentChannel::VirtioSerial {
            socket: "/v/agent.sock".into(),
            process_log: None,
        });
        assert!(matches!(
            vm_config(&cfg, &devices, Path::new("/k"), &[]),
            Err(DriverError::Unsupported { .. })
        ));
    }

    fn devices_of(cfg: &VmConfig) -> DeviceSet {
        DeviceSet {
            disks: cfg
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| Disk::from_config(i, d))
                .collect(),
            ..DeviceSet::default()
        }
    }

    #[test]
    fn whole_command_line_over_the_limit_is_a_config_error() {
        let cfg = VmConfig::builder("a")
            .kernel("/k/vmlinux")
            .cmdline("a".repeat(2000))
            .build_unchecked();
        let extra = vec![format!("vmrs.x={}", "b".repeat(40))];
        let err = vm_config_body(&cfg, &DeviceSet::default(), Path::new("/k/vmlinux"), &extra);
        assert!(matches!(
            err,
            Err(DriverError::Config(crate::config::ConfigError::CmdlineTooLong {
                max: 2047,
                ..
            }))
        ));
        assert!(vm_config_body(&cfg, &DeviceSet::default(), Path::new("/k/vmlinux"), &[]).is_ok());
    }

    #[test]
    fn config_body_follows_the_api_schema() {
        let cfg = VmConfig::builder("a")
            .kernel("/k/vmlinux")
            .initramfs("/k/initrd")
            .cpus(2)
            .memory_mib(128)
            .cmdline("quiet")
            .disk(DiskConfig::parse("/d/root.img,ro,format=qcow2,cache=none").expect("disk"))
            .build_unchecked();
        let extra = vec!["vmrs.net=1".to_string()];
        let mut devices = devices_of(&cfg);
        devices.disks[0].serial = Some("vmrs-root".into());
        let br = crate::config::NetworkAttachment::Bridge {
            bridge: "vmrsbr0".into(),
            gateway: "10.88.0.1/24".parse().expect("cidr"),
            nat: false,
            address: crate::config::GuestAddress::Auto,
            dns: vec![],
            port_forwards: vec![],
            mac: None,
            netns: None,
        };
        let nics = crate::net::plan("a", Path::new("/v"), Path::new("/h"), &[br]).expect("plan");
        devices.nics = nics.iter().map(crate::devices::Nic::from).collect();
        devices.entropy = true;
        devices.memory = MemoryBackend::Memfd { shared: true };
        devices.shared_dirs.push(crate::devices::SharedFs {
            tag: "vmrs0".into(),
            host_path: "/srv".into(),
            read_only: true,
            socket: "/v/fs0.sock".into(),
        });
        let body = vm_config_body(&cfg, &devices, Path::new("/k/vmlinux"), &extra).expect("body");
        assert_eq!(body["cpus"]["boot_vcpus"], 2);
        assert!(body["cpus"]["max_vcpus"].as_u64().expect("max") >= 2);
        assert_eq!(body["memory"]["size"], 128u64 << 20);
        assert_eq!(body["memory"]["shared"], true);
        assert_eq!(body["payload"]["kernel"], "/k/vmlinux");
        assert_eq!(body["payload"]["initramfs"], "/k/initrd");
        assert_eq!(body["payload"]["cmdline"], "console=ttyS0 quiet vmrs.net=1");
        assert_eq!(body["serial"], serde_json::json!({"mode": "Tty"}));
        assert_eq!(body["console"]["mode"], "Off");
        assert_eq!(
            body["disks"][0],
            serde_json::json!({"path": "/d/root.img", "readonly": true, "direct": true,
                "image_type": "Qcow2", "id": "disk0", "serial": "vmrs-root"})
        );
        assert_eq!(
            body["net"][0],
            serde_json::json!({"id": "net0", "tap": crate::net::tap_name("a", 0),
                "mac": crate::net::derive_mac("a", 0).to_string()})
        );
        assert_eq!(body["rng"]["src"], "/dev/urandom");
        assert_eq!(
            body["fs"][0],
            serde_json::json!({"id": "fs0", "tag": "vmrs0", "socket": "/v/fs0.sock",
                "num_queues": 1, "queue_size": 1024})
        );
        // a share without shared memory is refused, not rendered
        devices.memory = MemoryBackend::Anonymous;
        assert!(matches!(
            vm_config_body(&cfg, &devices, Path::new("/k/vmlinux"), &extra),
            Err(DriverError::Unsupported { feature, .. }) if feature.contains("shared guest memory")
        ));
    }

    #[test]
    fn unsupported_devices_are_typed() {
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
        assert!(matches!(
            vm_config_body(&cfg, &devices, Path::new("/k"), &[]),
            Err(DriverError::Unsupported { .. })
        ));
        let caps = CloudHypervisorDriver::new().capabilities();
        assert!(caps.check(BackendKind::CloudHypervisor, &cfg, &devices).is_err());
        let tcg = VmConfig {
            accel: Accel::Tcg,
            ..cfg
        };
        assert!(matches!(
            caps.check(BackendKind::CloudHypervisor, &tcg, &DeviceSet::default()),
            Err(DriverError::Unsupported { feature, .. }) if feature.contains("tcg")
        ));
    }

    #[test]
    fn states_and_snapshot_hint() {
        assert_eq!(map_state("Running"), VmmStatus::Running);
        assert_eq!(map_state("Paused"), VmmStatus::Paused);
        assert_eq!(map_state("Created"), VmmStatus::Shutdown);
        assert_eq!(map_state("BreakPoint"), VmmStatus::Other);
        let e = explain_snapshot_error(DriverError::Command {
            command: "vm.snapshot".into(),
            message: "500 internal error: GetNestedState".into(),
        });
        assert!(e.to_string().contains("hardware KVM"), "{e}");
    }

    #[test]
    fn missing_binary_is_clear() {
        let err = find_binary(Some(Path::new("/nonexistent/cloud-hypervisor"))).err();
        // May still be found through the environment on a developer machine.
        if let Some(e) = err {
            let msg = e.to_string();
            assert!(msg.contains("cloud-hypervisor not found"), "{msg}");
            assert!(msg.contains("/nonexistent/cloud-hypervisor"), "{msg}");
            assert!(msg.contains("VMRS_CLOUD_HYPERVISOR"), "{msg}");
        }
    }
}
