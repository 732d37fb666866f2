//! A protocol peer for the Firecracker driver.
//!
//! **This is a stand-in for the `firecracker` binary, which cannot be installed from the
//! package registries and so is absent on CI machines.** It is written from Firecracker's
//! published OpenAPI description (`src/firecracker/swagger/firecracker.yaml`) and, where the
//! document is silent, from how the binary behaves (its API server's request parsing and its
//! VMM's pre-boot / runtime split):
//!
//! * bodies are decoded into this file's own types, written from the document's
//!   `definitions`, with serde's `deny_unknown_fields` as Firecracker does: an unknown or
//!   mistyped field, or a missing required one, is `400` with `{"fault_message": "An error
//!   occurred when deserializing the json body of a request: ..."}`;
//! * every error is `400` with a `fault_message`; unknown paths are `400 "Invalid request
//!   method and/or path: PUT frobnicate."`; a `PUT`/`PATCH` without a body is `400 "Empty PUT
//!   request."`; resource ids in the path must match the body's and be alphanumerics or `_`;
//! * the state machine: before `InstanceStart` only configuration calls (and
//!   `/snapshot/load`, when nothing was configured) are accepted, the rest answer "The
//!   requested operation is not supported before starting the microVM."; after it, the
//!   configuration calls answer "... not supported after starting the microVM.";
//!   `PATCH /vm` pauses or resumes (pausing a paused VM is fine, as in Firecracker);
//!   `/snapshot/create` needs a paused VM;
//! * files are opened when configured, as Firecracker does: a missing kernel fails
//!   `PUT /boot-source`, a missing disk image `PUT /drives/{id}`;
//! * its log (`--log-path`, which must exist) ends with `Firecracker exiting successfully.
//!   exit_code=0` when the guest resets, as the binary's does.
//!
//! It runs no guest: on `InstanceStart` it writes the `VMRS_READY` line found in the kernel
//! image to its standard output (Firecracker's serial console), which is what the tiny PVH
//! test guest (`support::pvh_guest`) prints when it really runs; when the image holds the
//! guest's i8042 reset instructions it then exits the way Firecracker does on a guest reset.
//!
//! Test binaries run it by re-executing themselves: their `main` calls [`run_if_invoked`]
//! first, and the driver is pointed at `std::env::current_exe()`.

use super::http_peer::{read_request, write_reply, Reply};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

const SERVER: &str = "Firecracker API";
const VERSION: &str = "1.17.0-peer";

/// If this process was started as a VMM (`--api-sock` among the arguments), serve as the
/// peer and exit; otherwise return.
pub fn run_if_invoked() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--api-sock") {
        return;
    }
    let code = match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e}");
            1
        }
    };
    std::process::exit(code);
}

// ---- the document's definitions (request bodies) ----

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineConfiguration {
    vcpu_count: u8,
    mem_size_mib: usize,
    #[serde(default)]
    smt: bool,
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cpu_template: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    huge_pages: Option<HugePages>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum HugePages {
    None,
    Transparent,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootSource {
    kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initrd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_args: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum CacheType {
    Unsafe,
    Writeback,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum IoEngine {
    Sync,
    Async,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Drive {
    drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partuuid: Option<String>,
    is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cache_type: Option<CacheType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_on_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    io_engine: Option<IoEngine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    socket: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBucket {
    size: u64,
    refill_time: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    one_time_burst: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ops: Option<TokenBucket>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkInterface {
    iface_id: String,
    host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tx_rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntropyDevice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_limiter: Option<RateLimiter>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vsock {
    guest_cid: u32,
    uds_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vsock_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceActionInfo {
    action_type: ActionType,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum WantedState {
    Paused,
    Resumed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vm {
    state: WantedState,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum SnapshotType {
    Full,
    Diff,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreateParams {
    mem_file_path: String,
    snapshot_path: String,
    #[serde(default)]
    snapshot_type: Option<SnapshotType>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum MemoryBackendType {
    File,
    Uffd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryBackend {
    backend_type: MemoryBackendType,
    backend_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkOverride {
    iface_id: String,
    host_dev_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockOverride {
    #[allow(dead_code)]
    uds_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotLoadParams {
    snapshot_path: String,
    #[serde(default)]
    mem_file_path: Option<String>,
    #[serde(default)]
    mem_backend: Option<MemoryBackend>,
    #[serde(default)]
    #[allow(dead_code)]
    enable_diff_snapshots: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    track_dirty_pages: Option<bool>,
    #[serde(default)]
    resume_vm: Option<bool>,
    #[serde(default)]
    network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    #[allow(dead_code)]
    vsock_override: Option<VsockOverride>,
    #[serde(default)]
    #[allow(dead_code)]
    clock_realtime: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    huge_pages: Option<String>,
}

// ---- the VMM ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NotStarted,
    Running,
    Paused,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::NotStarted => "Not started",
            State::Running => "Running",
            State::Paused => "Paused",
        }
    }
}

/// What a snapshot holds (the peer's own format: the configuration).
#[derive(Debug, Serialize, Deserialize)]
struct PeerSnapshot {
    peer_snapshot: u32,
    #[serde(rename = "machine-config")]
    machine: MachineConfiguration,
    #[serde(rename = "boot-source")]
    boot: Option<BootSource>,
    drives: Vec<Drive>,
    #[serde(rename = "network-interfaces")]
    ifaces: Vec<NetworkInterface>,
}

struct Peer {
    log: std::fs::File,
    state: State,
    machine: MachineConfiguration,
    boot: Option<BootSource>,
    drives: Vec<Drive>,
    ifaces: Vec<NetworkInterface>,
    entropy: bool,
    vsock: Option<Vsock>,
    /// Something boot-specific was configured (a snapshot can no longer be loaded).
    boot_path: bool,
    /// Exit with this code once the current answer is written.
    exit: Option<i32>,
}

fn fault(msg: impl Into<String>) -> Reply {
    (400, Some(json!({ "fault_message": msg.into() })))
}

const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";
const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| {
        fault(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

fn checked_id(id: Option<&str>) -> Result<&str, Reply> {
    match id {
        None | Some("") => Err(fault("The ID cannot be empty.")),
        Some(id) if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) => Err(fault(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        )),
        Some(id) => Ok(id),
    }
}

fn run(args: &[String]) -> Result<i32, String> {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let socket = value("--api-sock").ok_or("--api-sock needs a value")?;
    let log_path = value("--log-path").ok_or("the peer needs --log-path")?;
    // Firecracker opens its log without creating it
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("Failed to open target file: {e}"))?;
    let listener = UnixListener::bind(&socket).map_err(|e| format!("Failed to bind {socket}: {e}"))?;
    let mut peer = Peer {
        log,
        state: State::NotStarted,
        machine: MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        },
        boot: None,
        drives: Vec::new(),
        ifaces: Vec::new(),
        entropy: false,
        vsock: None,
        boot_path: false,
        exit: None,
    };
    peer.log(&format!("Running Firecracker v{VERSION} (protocol peer)"));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        peer.serve(conn);
        if let Some(code) = peer.exit {
            if code == 0 {
                peer.log("Firecracker exiting successfully. exit_code=0");
            } else {
                peer.log(&format!("Firecracker exiting with error. exit_code={code}"));
            }
            return Ok(code);
        }
    }
    Ok(0)
}

impl Peer {
    fn log(&mut self, msg: &str) {
        let _ = writeln!(self.log, "[anonymous-instance:main] {msg}");
        let _ = self.log.flush();
    }

    fn serve(&mut self, conn: UnixStream) {
        let mut reader = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => return,
        });
        let mut writer = conn;
        loop {
            let (method, path, body) = match read_request(&mut reader) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    let _ = write_reply(&mut writer, SERVER, fault(e));
                    return;
                }
            };
            self.log(&format!(
                "The API server received a {method} request on {path:?}."
            ));
            let reply = self.route(&method, &path, &body).unwrap_or_else(|e| e);
            if write_reply(&mut writer, SERVER, reply).is_err() || self.exit.is_some() {
                return;
            }
        }
    }

    fn full_config(&self) -> Value {
        json!({
            "machine-config": self.machine,
            "boot-source": self.boot,
            "drives": self.drives,
            "network-interfaces": self.ifaces,
            "vsock": self.vsock,
            "entropy": if self.entropy { json!({}) } else { Value::Null },
        })
    }

    /// A configuration call: only before the start.
    fn preboot(&mut self) -> Result<(), Reply> {
        if self.state != State::NotStarted {
            return Err(fault(POST_BOOT));
        }
        self.boot_path = true;
        Ok(())
    }

    /// A runtime call: only after the start.
    fn runtime(&self) -> Result<(), Reply> {
        if self.state == State::NotStarted {
            return Err(fault(PRE_BOOT));
        }
        Ok(())
    }

    fn route(&mut self, method: &str, uri: &str, body: &[u8]) -> Result<Reply, Reply> {
        let mut tokens = uri.trim_start_matches('/').split_terminator('/');
        let path = tokens.next().unwrap_or("");
        let has_body = !body.is_empty();
        match (method, path, has_body) {
            ("GET", "", false) => Ok((
                200,
                Some(json!({
                    "app_name": "Firecracker",
                    "id": "anonymous-instance",
                    "state": self.state.name(),
                    "vmm_version": VERSION,
                })),
            )),
            ("GET", "version", false) => Ok((200, Some(json!({ "firecracker_version": VERSION })))),
            ("GET", "machine-config", false) => Ok((200, Some(json!(self.machine)))),
            ("GET", "vm", false) if tokens.next() == Some("config") => Ok((200, Some(self.full_config()))),
            ("GET", _, true) => Err(fault("GET request cannot have a body.")),
            ("PUT", "actions", true) => self.action(parse(body)?),
            ("PUT", "machine-config", true) => {
                let m: MachineConfiguration = parse(body)?;
                self.preboot()?;
                if m.vcpu_count == 0
                    || m.vcpu_count > 32
                    || (m.smt && m.vcpu_count > 1 && m.vcpu_count % 2 == 1)
                {
                    return Err(fault(
                        "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.",
                    ));
                }
                if m.mem_size_mib == 0 {
                    return Err(fault(
                        "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size.",
                    ));
                }
                self.machine = m;
                Ok((204, None))
            }
            ("PUT", "boot-source", true) => {
                let b: BootSource = parse(body)?;
                self.preboot()?;
                std::fs::File::open(&b.kernel_image_path).map_err(|e| {
                    fault(format!(
                        "Boot source error: The kernel file cannot be opened: {e}"
                    ))
                })?;
                if let Some(initrd) = &b.initrd_path {
                    std::fs::File::open(initrd).map_err(|e| {
                        fault(format!(
                            "Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. {e}"
                        ))
                    })?;
                }
                self.boot = Some(b);
                Ok((204, None))
            }
            ("PUT", "drives", true) => {
                let id = checked_id(tokens.next())?.to_string();
                let d: Drive = parse(body)?;
                if d.drive_id != id {
                    return Err(fault("The id from the path does not match the id from the body!"));
                }
                self.preboot()?;
                let (Some(p), Some(_)) = (&d.path_on_host, d.is_read_only) else {
                    return Err(fault(
                        "Drive config error: Unable to create the virtio block device: path_on_host and is_read_only are required for a virtio-block drive",
                    ));
                };
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(d.is_read_only != Some(true))
                    .open(p)
                    .map_err(|e| {
                        fault(format!(
                            "Drive config error: Unable to create the virtio block device: Error manipulating the backing file: {e} {p}"
                        ))
                    })?;
                if d.is_root_device && self.drives.iter().any(|o| o.is_root_device && o.drive_id != id) {
                    return Err(fault("Drive config error: A root block device already exists!"));
                }
                self.drives.retain(|o| o.drive_id != id);
                self.drives.push(d);
                Ok((204, None))
            }
            ("PUT", "network-interfaces", true) => {
                let id = checked_id(tokens.next())?.to_string();
                let n: NetworkInterface = parse(body)?;
                if n.iface_id != id {
                    return Err(fault("The id from the path does not match the id from the body!"));
                }
                self.preboot()?;
                if let Some(mac) = &n.guest_mac {
                    let ok = mac.split(':').count() == 6
                        && mac
                            .split(':')
                            .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok());
                    if !ok {
                        return Err(fault(format!(
                            "An error occurred when deserializing the json body of a request: invalid MAC address {mac}."
                        )));
                    }
                    if self
                        .ifaces
                        .iter()
                        .any(|o| o.iface_id != id && o.guest_mac.as_ref() == Some(mac))
                    {
                        return Err(fault(format!(
                            "Network config error: The MAC address is already in use: {mac}"
                        )));
                    }
                }
                self.ifaces.retain(|o| o.iface_id != id);
                self.ifaces.push(n);
                Ok((204, None))
            }
            ("PUT", "vsock", true) => {
                let v: Vsock = parse(body)?;
                self.preboot()?;
                if v.guest_cid < 3 {
                    return Err(fault("Vsock config error: Invalid guest CID"));
                }
                super::serve_hybrid_vsock(&v.uds_path)
                    .map_err(|e| fault(format!("Vsock config error: cannot bind {}: {e}", v.uds_path)))?;
                self.vsock = Some(v);
                Ok((204, None))
            }
            ("PUT", "entropy", true) => {
                let _e: EntropyDevice = parse(body)?;
                self.preboot()?;
                self.entropy = true;
                Ok((204, None))
            }
            ("PUT", "snapshot", true) => match tokens.next() {
                Some("create") => self.snapshot_create(parse(body)?),
                Some("load") => self.snapshot_load(parse(body)?),
                Some(other) => Err(fault(format!(
                    "Invalid request method and/or path: PUT /snapshot/{other}."
                ))),
                None => Err(fault("Missing snapshot operation type.")),
            },
            ("PUT", _, false) => Err(fault("Empty PUT request.")),
            ("PATCH", "vm", true) => {
                let vm: Vm = parse(body)?;
                self.runtime()?;
                self.state = match vm.state {
                    WantedState::Paused => State::Paused,
                    WantedState::Resumed => State::Running,
                };
                Ok((204, None))
            }
            ("PATCH", _, false) => Err(fault("Empty PATCH request.")),
            (m, p, _) => Err(fault(format!("Invalid request method and/or path: {m} {p}."))),
        }
    }

    fn action(&mut self, a: InstanceActionInfo) -> Result<Reply, Reply> {
        match a.action_type {
            ActionType::FlushMetrics => {
                self.runtime()?;
                Ok((204, None))
            }
            ActionType::SendCtrlAltDel => {
                self.runtime()?;
                // The emulated guest has no keyboard driver: the keys change nothing.
                Ok((204, None))
            }
            ActionType::InstanceStart => {
                if self.state != State::NotStarted {
                    return Err(fault(POST_BOOT));
                }
                let Some(boot) = self.boot.clone() else {
                    return Err(fault(
                        "Start microvm error: Cannot start microvm without kernel configuration.",
                    ));
                };
                let image = std::fs::read(&boot.kernel_image_path)
                    .map_err(|e| fault(format!("Start microvm error: Cannot load kernel: {e}")))?;
                if !image.starts_with(b"\x7fELF") && !is_bzimage(&image) {
                    return Err(fault(
                        "Start microvm error: Cannot load kernel due to invalid memory configuration or invalid kernel image: Failed to read ELF magic number",
                    ));
                }
                self.state = State::Running;
                // the guest's serial output goes to stdout
                if let Some(line) = super::pvh_guest::ready_line(&image) {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(&line);
                    let _ = out.flush();
                }
                let code = super::pvh_guest::RESET_CODE;
                if image.windows(code.len()).any(|w| w == code) {
                    self.log("Vmm is stopping.");
                    self.exit = Some(0);
                }
                Ok((204, None))
            }
        }
    }

    fn snapshot_create(&mut self, p: SnapshotCreateParams) -> Result<Reply, Reply> {
        self.runtime()?;
        if self.state != State::Paused {
            return Err(fault(
                "Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running",
            ));
        }
        if matches!(p.snapshot_type, Some(SnapshotType::Diff)) && !self.machine.track_dirty_pages {
            return Err(fault(
                "Create snapshot error: Diff snapshots are not allowed on uVMs with dirty page tracking disabled.",
            ));
        }
        let snap = PeerSnapshot {
            peer_snapshot: 1,
            machine: self.machine.clone(),
            boot: self.boot.clone(),
            drives: self.drives.clone(),
            ifaces: self.ifaces.clone(),
        };
        let state = serde_json::to_vec(&snap).unwrap_or_default();
        std::fs::write(&p.snapshot_path, state).map_err(|e| {
            fault(format!(
                "Create snapshot error: Cannot perform open on the snapshot backing file: {e}"
            ))
        })?;
        std::fs::File::create(&p.mem_file_path)
            .and_then(|f| f.set_len((self.machine.mem_size_mib as u64) << 20))
            .map_err(|e| {
                fault(format!(
                    "Create snapshot error: Cannot perform open on the memory backing file: {e}"
                ))
            })?;
        Ok((204, None))
    }

    fn snapshot_load(&mut self, p: SnapshotLoadParams) -> Result<Reply, Reply> {
        match (&p.mem_backend, &p.mem_file_path) {
            (Some(_), Some(_)) => {
                return Err(fault(
                    "An error occurred when deserializing the json body of a request: too many fields: either `mem_backend` or `mem_file_path` exclusively is required.",
                ))
            }
            (None, None) => {
                return Err(fault(
                    "An error occurred when deserializing the json body of a request: missing field: either `mem_backend` or `mem_file_path` is required.",
                ))
            }
            _ => {}
        }
        if self.state != State::NotStarted {
            return Err(fault(POST_BOOT));
        }
        if self.boot_path {
            return Err(fault(
                "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ));
        }
        let mem = match (&p.mem_backend, &p.mem_file_path) {
            (Some(b), _) => {
                if matches!(b.backend_type, MemoryBackendType::Uffd) {
                    return Err(fault("Load snapshot error: the peer has no UFFD page server"));
                }
                b.backend_path.clone()
            }
            (None, Some(f)) => f.clone(),
            (None, None) => unreachable!("checked above"),
        };
        let snap: PeerSnapshot = std::fs::read(&p.snapshot_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| {
                fault(format!(
                    "Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state from file: {e}"
                ))
            })?;
        let mem_len = std::fs::metadata(&mem).map(|m| m.len()).map_err(|e| {
            fault(format!(
                "Load snapshot error: Failed to restore from snapshot: Failed to load guest memory: {e}"
            ))
        })?;
        if mem_len != (snap.machine.mem_size_mib as u64) << 20 {
            return Err(fault(
                "Load snapshot error: Failed to restore from snapshot: Failed to load guest memory: size mismatch",
            ));
        }
        let mut ifaces = snap.ifaces;
        for o in &p.network_overrides {
            let Some(i) = ifaces.iter_mut().find(|i| i.iface_id == o.iface_id) else {
                return Err(fault(format!(
                    "Load snapshot error: Failed to restore from snapshot: Invalid network override: no interface {}",
                    o.iface_id
                )));
            };
            i.host_dev_name = o.host_dev_name.clone();
        }
        self.machine = snap.machine;
        self.boot = snap.boot;
        self.drives = snap.drives;
        self.ifaces = ifaces;
        self.state = if p.resume_vm == Some(true) {
            State::Running
        } else {
            State::Paused
        };
        Ok((204, None))
    }
}

fn is_bzimage(image: &[u8]) -> bool {
    image.get(0x202..0x206) == Some(b"HdrS")
}

/// The files this peer needs to exist (for tests that check nothing is left behind).
pub fn socket_of(vm_dir: &Path) -> std::path::PathBuf {
    vm_dir.join(vm_rs::driver::firecracker::API_SOCKET)
}
