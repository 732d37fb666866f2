//! A protocol peer for the Cloud Hypervisor driver.
//!
//! **This is a stand-in for the `cloud-hypervisor` binary, which cannot be installed from the
//! package registries and so is absent on CI machines.** It follows Cloud Hypervisor's
//! published OpenAPI document (`vmm/src/api/openapi/cloud-hypervisor.yaml`) for the request
//! shapes of the endpoints the driver uses, and the released v53.0 binary for its answers:
//!
//! * bodies are decoded into this file's own types, written from the document's schemas. A
//!   mistyped or missing required field is `400 ["Failed to deserialize JSON", ...]`, as in
//!   the binary. An *unknown* field is refused the same way, which is stricter than the
//!   binary (it ignores unknown fields, silently dropping the setting): a body with one is a
//!   driver bug either way;
//! * status codes as v53 maps them (`vmm/src/api/http/mod.rs`): `400` for an undecodable
//!   body, `404` when no VM is created (or its config is missing), and `500` for every other
//!   failure — a wrong state, a duplicate device, an unknown device to remove (the document
//!   says `404` there, and Cloud Hypervisor after v53 answers `404`/`409`; v53 answers `500`);
//! * error bodies are the error chain, outermost first, starting with `"Error from API"`;
//! * where the document is silent it mirrors the binary as observed (a second `vm.create`
//!   answers `500 "VM is already created"`; snapshots need a paused VM).
//!
//! It speaks the same command line (`--api-socket path=`, `--event-monitor path=`,
//! `--log-file`), serves HTTP/1.1 on the Unix socket, and writes event-monitor records (pretty
//! JSON followed by a blank line) for the lifecycle events. It runs no guest: on `vm.boot` it
//! copies the `VMRS_READY` line found in the kernel image to the serial console (its stdout in
//! `Tty` mode, the file in `File` mode), which is what the
//! tiny PVH test guest (`support::pvh_guest`) prints when it really runs, and when the image
//! holds the guest's power-off instructions it then shuts down the way the VMM does on a guest
//! power-off (`vm shutdown`, `vm deleted`, `vmm shutdown`, exit status 0).
//!
//! Test binaries run it by re-executing themselves: their `main` calls [`run_if_invoked`]
//! first, and the driver is pointed at `std::env::current_exe()`.

use super::http_peer::{read_request, write_reply, Reply};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

const SERVER: &str = "Cloud Hypervisor API";

// ---- the document's schemas (request bodies); `Value` where the driver sends nothing ----

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cpus: Option<CpusConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    memory: Option<MemoryConfig>,
    payload: PayloadConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_limit_groups: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disks: Option<Vec<DiskConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    net: Option<Vec<NetConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rng: Option<RngConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    balloon: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fs: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generic_vhost_user: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pmem: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    console: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    debug_console: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    devices: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_devices: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vdpa: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vsock: Option<VsockConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    numa: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iommu: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watchdog: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rtc: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pvpanic: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pci_segments: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    platform: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tpm: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    landlock_enable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    landlock_rules: Option<Vec<Value>>,
}

/// `VsockConfig`: `cid` (int64, minimum 3) and `socket` required.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockConfig {
    cid: i64,
    socket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iommu: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pci_segment: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CpusConfig {
    boot_vcpus: u8,
    max_vcpus: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topology: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kvm_hyperv: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_phys_bits: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    affinity: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    features: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    core_scheduling: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryConfig {
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hotplug_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hotplugged_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mergeable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hotplug_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shared: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hugepages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hugepage_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefault: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reserve: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    thp: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zones: Option<Vec<Value>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    firmware: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    igvm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_data: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

/// `ConsoleConfig`; `SerialConfig` is its subset (`mode`, `file`, `socket`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleConfig {
    mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iommu: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pci_segment: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pci_device_id: Option<u8>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum ImageType {
    FixedVhd,
    Qcow2,
    Raw,
    Vhdx,
    Unknown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    readonly: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    direct: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iommu: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num_queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queue_size: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vhost_user: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vhost_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_limiter_config: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pci_segment: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pci_device_id: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_limit_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queue_affinity: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backing_files: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sparse: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_type: Option<ImageType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lock_granularity: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mask: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iommu: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num_queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queue_size: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vhost_user: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vhost_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vhost_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pci_segment: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pci_device_id: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate_limiter_config: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offload_tso: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offload_ufo: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offload_csum: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RngConfig {
    src: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pci_segment: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pci_device_id: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iommu: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmResize {
    #[serde(default)]
    desired_vcpus: Option<u8>,
    #[serde(default)]
    desired_ram: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    desired_balloon: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmRemoveDevice {
    #[serde(default)]
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmSnapshotConfig {
    #[serde(default)]
    destination_url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreConfig {
    source_url: String,
    #[serde(default)]
    #[allow(dead_code)]
    prefault: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    memory_restore_mode: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    resume: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    zone_updates: Option<Vec<Value>>,
}

/// Decode a body strictly; a body the schema refuses is v53's `400`.
fn strict<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| {
        let mut chain = vec!["Failed to deserialize JSON".to_string()];
        chain.push(e.to_string());
        (400, Some(json!(chain)))
    })
}

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// If this process was started as a VMM (`--api-socket` among the arguments), serve as the
/// peer and exit; otherwise return.
pub fn run_if_invoked() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--api-socket") {
        return;
    }
    let code = match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ch-peer: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn arg_value(args: &[String], flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    let v = args.get(i + 1)?;
    Some(v.strip_prefix("path=").unwrap_or(v).to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Created => "Created",
            State::Running => "Running",
            State::Paused => "Paused",
            State::Shutdown => "Shutdown",
        }
    }
}

struct Device {
    id: String,
    path: Option<String>,
    net: bool,
}

struct Peer {
    events: Option<std::fs::File>,
    start: Instant,
    config: Option<Value>,
    state: State,
    devices: Vec<Device>,
    next_bdf: u32,
    exit: bool,
}

fn err(status: u16, chain: &[&str]) -> Reply {
    let mut v = vec!["Error from API".to_string()];
    v.extend(chain.iter().map(|s| s.to_string()));
    (status, Some(json!(v)))
}

fn run(args: &[String]) -> Result<(), String> {
    let socket = arg_value(args, "--api-socket").ok_or("--api-socket needs a value")?;
    let events = match arg_value(args, "--event-monitor") {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| format!("event monitor {p}: {e}"))?,
        ),
        None => None,
    };
    if let Some(log) = arg_value(args, "--log-file") {
        std::fs::write(&log, b"ch-peer: protocol peer standing in for cloud-hypervisor\n")
            .map_err(|e| format!("log file {log}: {e}"))?;
    }
    let listener = UnixListener::bind(&socket).map_err(|e| format!("bind {socket}: {e}"))?;
    let mut peer = Peer {
        events,
        start: Instant::now(),
        config: None,
        state: State::Created,
        devices: Vec::new(),
        next_bdf: 2,
        exit: false,
    };
    peer.event("vmm", "starting");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        peer.serve(conn);
        if peer.exit {
            break;
        }
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

impl Peer {
    fn event(&mut self, source: &str, event: &str) {
        let elapsed = self.start.elapsed();
        if let Some(f) = self.events.as_mut() {
            let record = json!({
                "timestamp": { "secs": elapsed.as_secs(), "nanos": elapsed.subsec_nanos() },
                "source": source,
                "event": event,
                "properties": null,
            });
            let text = serde_json::to_string_pretty(&record).unwrap_or_default();
            let _ = f.write_all(text.as_bytes());
            let _ = f.write_all(b"\n\n");
            let _ = f.flush();
        }
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
                    let _ = write_reply(&mut writer, SERVER, (400, Some(json!([e]))));
                    return;
                }
            };
            let reply = self.route(&method, &path, &body);
            if write_reply(&mut writer, SERVER, reply).is_err() {
                return;
            }
            if self.exit {
                return;
            }
        }
    }

    fn created(&self) -> Result<&Value, Reply> {
        self.config
            .as_ref()
            .ok_or_else(|| err(404, &["VM is not created"]))
    }

    fn route(&mut self, method: &str, path: &str, body: &[u8]) -> Reply {
        let Some(verb) = path.strip_prefix("/api/v1/") else {
            return (404, None);
        };
        let get = matches!(verb, "vmm.ping" | "vm.info" | "vm.counters");
        let known = get
            || matches!(
                verb,
                "vmm.shutdown"
                    | "vm.create"
                    | "vm.boot"
                    | "vm.pause"
                    | "vm.resume"
                    | "vm.shutdown"
                    | "vm.power-button"
                    | "vm.snapshot"
                    | "vm.restore"
                    | "vm.resize"
                    | "vm.add-disk"
                    | "vm.add-net"
                    | "vm.remove-device"
                    | "vm.delete"
            );
        if !known {
            return (404, None);
        }
        if (get && method != "GET") || (!get && method != "PUT") {
            return (400, None);
        }
        let result: Result<Reply, Reply> = (|| match verb {
            "vmm.ping" => Ok((
                200,
                Some(json!({
                    "build_version": "vm-rs protocol peer",
                    "version": "0.0.0-peer",
                    "pid": std::process::id(),
                    "features": [],
                })),
            )),
            "vmm.shutdown" => {
                if self.config.is_some() {
                    if matches!(self.state, State::Running | State::Paused) {
                        self.event("vm", "shutdown");
                    }
                    self.event("vm", "deleted");
                }
                self.event("vmm", "shutdown");
                self.exit = true;
                Ok((204, None))
            }
            "vm.create" => {
                let cfg = to_json(&strict::<VmConfig>(body)?);
                if self.config.is_some() {
                    return Err(err(
                        500,
                        &["The VM could not be created", "VM is already created"],
                    ));
                }
                validate_config(&cfg)?;
                self.config = Some(cfg);
                self.state = State::Created;
                Ok((204, None))
            }
            "vm.delete" => {
                self.config = None;
                self.devices.clear();
                self.event("vm", "deleted");
                Ok((204, None))
            }
            "vm.boot" => {
                let cfg = self
                    .config
                    .clone()
                    .ok_or_else(|| err(404, &["The VM could not boot", "VM config is missing"]))?;
                if matches!(self.state, State::Running | State::Paused) {
                    return Err(err(500, &["The VM could not boot", "VM is already running"]));
                }
                self.event("vm", "booting");
                let powers_off = boot_payload(&cfg)?;
                if let Some(socket) = cfg["vsock"]["socket"].as_str() {
                    super::serve_hybrid_vsock(socket).map_err(|e| {
                        err(
                            500,
                            &[
                                "The VM could not boot",
                                &format!("Error creating vsock device: {e}"),
                            ],
                        )
                    })?;
                }
                self.state = State::Running;
                self.event("vm", "booted");
                if powers_off {
                    self.event("vm", "shutdown");
                    self.event("vm", "deleted");
                    self.event("vmm", "shutdown");
                    self.exit = true;
                }
                Ok((204, None))
            }
            "vm.info" => {
                let cfg = self.created()?.clone();
                let size = cfg["memory"]["size"].as_u64().unwrap_or(512 << 20);
                Ok((
                    200,
                    Some(json!({ "config": cfg, "state": self.state.name(), "memory_actual_size": size })),
                ))
            }
            "vm.counters" => {
                self.created()?;
                let mut out = serde_json::Map::new();
                for d in &self.devices {
                    let c = if d.net {
                        json!({"rx_bytes": 0, "rx_frames": 0, "tx_bytes": 0, "tx_frames": 0})
                    } else {
                        json!({"read_bytes": 0, "read_ops": 0, "write_bytes": 0, "write_ops": 0})
                    };
                    out.insert(d.id.clone(), c);
                }
                Ok((200, Some(Value::Object(out))))
            }
            "vm.pause" => {
                self.created()?;
                if self.state != State::Running {
                    return Err(err(500, &["The VM could not be paused", "VM is not running"]));
                }
                self.event("vm", "pausing");
                self.state = State::Paused;
                self.event("vm", "paused");
                Ok((204, None))
            }
            "vm.resume" => {
                self.created()?;
                if self.state != State::Paused {
                    return Err(err(500, &["The VM could not resume", "VM is not paused"]));
                }
                self.event("vm", "resuming");
                self.state = State::Running;
                self.event("vm", "resumed");
                Ok((204, None))
            }
            "vm.shutdown" => {
                self.created()?;
                if !matches!(self.state, State::Running | State::Paused) {
                    return Err(err(500, &["The VM could not shut down", "VM is not running"]));
                }
                self.state = State::Shutdown;
                self.event("vm", "shutdown");
                Ok((204, None))
            }
            "vm.power-button" => {
                self.created()?;
                if !matches!(self.state, State::Running | State::Paused) {
                    return Err(err(
                        500,
                        &["The power button could not be pressed", "VM is not running"],
                    ));
                }
                // The emulated guest has no ACPI driver: the press has no visible effect.
                Ok((204, None))
            }
            "vm.snapshot" => {
                let req: VmSnapshotConfig = strict(body)?;
                let cfg = self.created()?.clone();
                match self.state {
                    State::Paused => {}
                    State::Running => {
                        return Err(err(500, &["The VM could not be snapshotted", "VM is not paused"]))
                    }
                    _ => return Err(err(500, &["The VM could not be snapshotted", "VM is not booted"])),
                }
                let dir = file_url(req.destination_url.as_deref()).ok_or_else(|| {
                    err(
                        500,
                        &["The VM could not be snapshotted", "Invalid destination URL"],
                    )
                })?;
                self.event("vm", "snapshotting");
                std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(dir.join("config.json"), cfg.to_string()))
                    .and_then(|()| {
                        std::fs::write(dir.join("state.json"), json!({"state": "Paused"}).to_string())
                    })
                    .map_err(|e| err(500, &["The VM could not be snapshotted", &e.to_string()]))?;
                self.event("vm", "snapshotted");
                Ok((204, None))
            }
            "vm.restore" => {
                let req: RestoreConfig = strict(body)?;
                if self.config.is_some() {
                    return Err(err(
                        500,
                        &["The VM could not be restored", "VM is already created"],
                    ));
                }
                let dir = file_url(Some(&req.source_url))
                    .ok_or_else(|| err(500, &["The VM could not be restored", "Invalid source URL"]))?;
                let cfg = std::fs::read(dir.join("config.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .ok_or_else(|| {
                        err(
                            500,
                            &["The VM could not be restored", "Cannot read snapshot config"],
                        )
                    })?;
                self.event("vm", "restoring");
                self.config = Some(cfg);
                self.state = State::Paused;
                self.event("vm", "restored");
                Ok((204, None))
            }
            "vm.resize" => {
                let req: VmResize = strict(body)?;
                let cfg = self
                    .config
                    .as_mut()
                    .ok_or_else(|| err(404, &["VM is not created"]))?;
                let max = cfg["cpus"]["max_vcpus"].as_u64().unwrap_or(1);
                if let Some(v) = req.desired_vcpus {
                    let n = Some(u64::from(v))
                        .filter(|n| (1..=max).contains(n))
                        .ok_or_else(|| {
                            err(500, &["The VM could not be resized", "Invalid number of vCPUs"])
                        })?;
                    cfg["cpus"]["boot_vcpus"] = n.into();
                }
                if let Some(v) = req.desired_ram {
                    let size = cfg["memory"]["size"].as_u64().unwrap_or(0);
                    let hot = cfg["memory"]["hotplug_size"].as_u64().unwrap_or(0);
                    let n = Some(v)
                        .filter(|n| *n >= size && *n <= size + hot)
                        .ok_or_else(|| err(500, &["The VM could not be resized", "Invalid memory size"]))?;
                    cfg["memory"]["size"] = n.into();
                }
                self.event("vm", "resizing");
                self.event("vm", "resized");
                Ok((204, None))
            }
            "vm.add-disk" | "vm.add-net" => {
                let net = verb == "vm.add-net";
                let req = if net {
                    to_json(&strict::<NetConfig>(body)?)
                } else {
                    to_json(&strict::<DiskConfig>(body)?)
                };
                self.created()?;
                let path = req.get("path").and_then(Value::as_str).map(str::to_string);
                if !net {
                    let p = path.as_deref().ok_or_else(|| {
                        err(500, &["The disk could not be added to the VM", "Missing path"])
                    })?;
                    if self.devices.iter().any(|d| d.path.as_deref() == Some(p)) {
                        return Err(err(
                            500,
                            &[
                                "The disk could not be added to the VM",
                                "Failed to validate config",
                                &format!("Duplicated device path: {p}"),
                            ],
                        ));
                    }
                    if !Path::new(p).is_file() {
                        return Err(err(
                            500,
                            &[
                                "The disk could not be added to the VM",
                                "Failed to open disk image",
                            ],
                        ));
                    }
                }
                let id = match req.get("id").and_then(Value::as_str) {
                    Some(id) if self.devices.iter().any(|d| d.id == id) => {
                        return Err(err(
                            500,
                            &[
                                "The device could not be added to the VM",
                                "Failed to validate config",
                                &format!("Identifier {id} is not unique"),
                            ],
                        ))
                    }
                    Some(id) => id.to_string(),
                    None => format!("_{}{}", if net { "net" } else { "disk" }, self.next_bdf),
                };
                let bdf = format!("0000:00:{:02x}.0", self.next_bdf);
                self.next_bdf += 1;
                self.devices.push(Device {
                    id: id.clone(),
                    path,
                    net,
                });
                if matches!(self.state, State::Running | State::Paused) {
                    Ok((200, Some(json!({ "id": id, "bdf": bdf }))))
                } else {
                    Ok((204, None))
                }
            }
            "vm.remove-device" => {
                let req: VmRemoveDevice = strict(body)?;
                self.created()?;
                let id = req.id.unwrap_or_default();
                // v53 answers 500 here (the document and later releases: 404)
                let pos = self.devices.iter().position(|d| d.id == id).ok_or_else(|| {
                    err(
                        500,
                        &[
                            "The device could not be removed from the VM",
                            "Error from device manager",
                            &format!("Failed to find device corresponding to the given identifier: {id}"),
                        ],
                    )
                })?;
                self.devices.remove(pos);
                Ok((204, None))
            }
            _ => Ok((404, None)),
        })();
        result.unwrap_or_else(|e| e)
    }
}

/// Check a `VmConfig` against the document's required fields and minimums.
fn validate_config(cfg: &Value) -> Result<(), Reply> {
    let bad = |why: &str| err(500, &["The VM could not be created", why]);
    if let Some(v) = cfg.get("vsock").filter(|v| !v.is_null()) {
        if !matches!(v["cid"].as_i64(), Some(c) if c >= 3) {
            return Err(bad("Invalid vsock CID (the document's minimum is 3)"));
        }
    }
    let payload = cfg
        .get("payload")
        .filter(|p| p.is_object())
        .ok_or_else(|| bad("Missing payload"))?;
    if payload.get("kernel").and_then(Value::as_str).is_none()
        && payload.get("firmware").and_then(Value::as_str).is_none()
    {
        return Err(bad("No kernel or firmware in the payload"));
    }
    if let Some(cpus) = cfg.get("cpus") {
        let boot = cpus["boot_vcpus"]
            .as_u64()
            .ok_or_else(|| bad("Missing boot_vcpus"))?;
        let max = cpus["max_vcpus"]
            .as_u64()
            .ok_or_else(|| bad("Missing max_vcpus"))?;
        if boot < 1 || max < boot {
            return Err(bad("Max vCPUs lower than boot vCPUs or boot vCPUs is zero"));
        }
    }
    if let Some(mem) = cfg.get("memory") {
        if !matches!(mem["size"].as_u64(), Some(s) if s > 0) {
            return Err(bad("Invalid memory size"));
        }
    }
    // FsConfig: tag, socket, num_queues and queue_size are required; vhost-user devices need
    // shared guest memory (the binary refuses "Using fs requires shared memory")
    for fs in cfg["fs"].as_array().into_iter().flatten() {
        if fs["tag"].as_str().map_or(true, str::is_empty) || fs["socket"].as_str().is_none() {
            return Err(bad("Missing fs tag or socket"));
        }
        if fs["num_queues"].as_u64().is_none() || fs["queue_size"].as_u64().is_none() {
            return Err(bad("Missing fs num_queues or queue_size"));
        }
        if cfg["memory"]["shared"] != true {
            return Err(bad("Using fs requires shared memory"));
        }
    }
    for key in ["serial", "console"] {
        if let Some(c) = cfg.get(key) {
            let mode = c["mode"].as_str().ok_or_else(|| bad("Missing console mode"))?;
            if !["Off", "Pty", "Tty", "File", "Socket", "Null"].contains(&mode) {
                return Err(bad("Unknown console mode"));
            }
            if mode == "File" && c["file"].as_str().is_none() {
                return Err(bad("File console without a file"));
            }
        }
    }
    Ok(())
}

/// Check the files a boot needs and "run" the emulated guest; true when the guest powers off.
fn boot_payload(cfg: &Value) -> Result<bool, Reply> {
    let kernel = cfg["payload"]["kernel"].as_str().unwrap_or_default();
    let image = std::fs::read(kernel).map_err(|e| {
        err(
            500,
            &[
                "The VM could not boot",
                "Error loading kernel",
                &format!("{kernel}: {e}"),
            ],
        )
    })?;
    if !image.starts_with(b"\x7fELF") {
        return Err(err(
            500,
            &[
                "The VM could not boot",
                "Error loading kernel",
                "Invalid ELF magic number",
            ],
        ));
    }
    for d in cfg["disks"].as_array().into_iter().flatten() {
        let p = d["path"].as_str().unwrap_or_default();
        if !Path::new(p).is_file() {
            return Err(err(
                500,
                &[
                    "The VM could not boot",
                    "Error creating devices",
                    &format!("Failed to open disk image {p}"),
                ],
            ));
        }
    }
    // the VMM connects to each virtio-fs daemon when it creates the device
    for fs in cfg["fs"].as_array().into_iter().flatten() {
        let p = fs["socket"].as_str().unwrap_or_default();
        match UnixStream::connect(p) {
            // held for the VMM's life, as the binary's vhost-user frontend does
            Ok(s) => std::mem::forget(s),
            Err(_) => {
                return Err(err(
                    500,
                    &[
                        "The VM could not boot",
                        "Error creating devices",
                        &format!("Failed to connect to vhost-user socket {p}"),
                    ],
                ))
            }
        }
    }
    // Tty: the VMM's own standard output (the driver's capped serial log)
    if cfg["serial"]["mode"] == "Tty" {
        if let Some(line) = super::pvh_guest::ready_line(&image) {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
    }
    if cfg["serial"]["mode"] == "File" {
        let serial = cfg["serial"]["file"].as_str().unwrap_or_default();
        let line = super::pvh_guest::ready_line(&image);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(serial)
            .map_err(|e| {
                err(
                    500,
                    &[
                        "The VM could not boot",
                        "Error creating serial output file",
                        &e.to_string(),
                    ],
                )
            })?;
        if let Some(line) = line {
            let _ = f.write_all(&line);
        }
    }
    let code = super::pvh_guest::POWER_OFF_CODE;
    Ok(image.windows(code.len()).any(|w| w == code))
}

fn file_url(v: Option<&str>) -> Option<PathBuf> {
    v?.strip_prefix("file://").map(PathBuf::from)
}
