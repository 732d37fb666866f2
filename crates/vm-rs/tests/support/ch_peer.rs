//! A protocol peer for the Cloud Hypervisor driver.
//!
//! **This is a stand-in for the `cloud-hypervisor` binary, which cannot be installed from the
//! package registries and so is absent on CI machines.** It follows Cloud Hypervisor's
//! published OpenAPI document (`vmm/src/api/openapi/cloud-hypervisor.yaml`) for the endpoints
//! the driver uses: request shapes, status codes (`200` with JSON, `204`, `400` bad body,
//! `404` VM not created / unknown device, `405` wrong state, `409` duplicate device, `500`
//! failure) and error bodies (a JSON array of messages, outermost first, starting with
//! `"Error from API"`). Where the document is silent it mirrors the real binary as observed
//! (a second `vm.create` answers `500 "VM is already created"`; snapshots need a paused VM).
//! One known difference: the real binary answers pause/resume in the wrong state with `500`,
//! the document with `405`; the peer follows the document, and the driver maps both the same.
//!
//! It speaks the same command line (`--api-socket path=`, `--event-monitor path=`,
//! `--log-file`), serves HTTP/1.1 on the Unix socket, and writes event-monitor records (pretty
//! JSON followed by a blank line) for the lifecycle events. It runs no guest: on `vm.boot` it
//! copies the `VMRS_READY` line found in the kernel image to the serial file, which is what the
//! tiny PVH test guest (`support::pvh_guest`) prints when it really runs, and when the image
//! holds the guest's power-off instructions it then shuts down the way the VMM does on a guest
//! power-off (`vm shutdown`, `vm deleted`, `vmm shutdown`, exit status 0).
//!
//! Test binaries run it by re-executing themselves: their `main` calls [`run_if_invoked`]
//! first, and the driver is pointed at `std::env::current_exe()`.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;

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

/// An HTTP answer: status and optional JSON body.
type Reply = (u16, Option<Value>);

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
                    let _ = write_reply(&mut writer, (400, Some(json!([e]))));
                    return;
                }
            };
            let reply = self.route(&method, &path, &body);
            if write_reply(&mut writer, reply).is_err() {
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
        let json_body = || -> Result<Value, Reply> {
            serde_json::from_slice::<Value>(body)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| err(400, &["Error parsing JSON body"]))
        };
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
                let cfg = json_body()?;
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
                    return Err(err(405, &["The VM could not be paused", "VM is not running"]));
                }
                self.event("vm", "pausing");
                self.state = State::Paused;
                self.event("vm", "paused");
                Ok((204, None))
            }
            "vm.resume" => {
                self.created()?;
                if self.state != State::Paused {
                    return Err(err(405, &["The VM could not resume", "VM is not paused"]));
                }
                self.event("vm", "resuming");
                self.state = State::Running;
                self.event("vm", "resumed");
                Ok((204, None))
            }
            "vm.shutdown" => {
                self.created()?;
                if !matches!(self.state, State::Running | State::Paused) {
                    return Err(err(405, &["The VM could not shut down", "VM is not running"]));
                }
                self.state = State::Shutdown;
                self.event("vm", "shutdown");
                Ok((204, None))
            }
            "vm.power-button" => {
                self.created()?;
                if !matches!(self.state, State::Running | State::Paused) {
                    return Err(err(
                        405,
                        &["The power button could not be pressed", "VM is not running"],
                    ));
                }
                // The emulated guest has no ACPI driver: the press has no visible effect.
                Ok((204, None))
            }
            "vm.snapshot" => {
                let req = json_body()?;
                let cfg = self.created()?.clone();
                match self.state {
                    State::Paused => {}
                    State::Running => {
                        return Err(err(500, &["The VM could not be snapshotted", "VM is not paused"]))
                    }
                    _ => return Err(err(405, &["The VM could not be snapshotted", "VM is not booted"])),
                }
                let dir = file_url(&req["destination_url"]).ok_or_else(|| {
                    err(
                        400,
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
                let req = json_body()?;
                if self.config.is_some() {
                    return Err(err(
                        404,
                        &["The VM could not be restored", "VM is already created"],
                    ));
                }
                let dir = file_url(&req["source_url"])
                    .ok_or_else(|| err(400, &["The VM could not be restored", "Invalid source URL"]))?;
                let cfg = std::fs::read(dir.join("config.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                    .ok_or_else(|| {
                        err(
                            400,
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
                let req = json_body()?;
                let cfg = self
                    .config
                    .as_mut()
                    .ok_or_else(|| err(404, &["VM is not created"]))?;
                let max = cfg["cpus"]["max_vcpus"].as_u64().unwrap_or(1);
                if let Some(v) = req.get("desired_vcpus") {
                    let n = v.as_u64().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
                        err(400, &["The VM could not be resized", "Invalid number of vCPUs"])
                    })?;
                    cfg["cpus"]["boot_vcpus"] = n.into();
                }
                if let Some(v) = req.get("desired_ram") {
                    let size = cfg["memory"]["size"].as_u64().unwrap_or(0);
                    let hot = cfg["memory"]["hotplug_size"].as_u64().unwrap_or(0);
                    let n = v
                        .as_u64()
                        .filter(|n| *n >= size && *n <= size + hot)
                        .ok_or_else(|| err(400, &["The VM could not be resized", "Invalid memory size"]))?;
                    cfg["memory"]["size"] = n.into();
                }
                self.event("vm", "resizing");
                self.event("vm", "resized");
                Ok((204, None))
            }
            "vm.add-disk" | "vm.add-net" => {
                let req = json_body()?;
                self.created()?;
                let net = verb == "vm.add-net";
                let path = req.get("path").and_then(Value::as_str).map(str::to_string);
                if !net {
                    let p = path.as_deref().ok_or_else(|| {
                        err(400, &["The disk could not be added to the VM", "Missing path"])
                    })?;
                    if self.devices.iter().any(|d| d.path.as_deref() == Some(p)) {
                        return Err(err(
                            409,
                            &["The disk could not be added to the VM", "Duplicate device path"],
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
                            409,
                            &[
                                "The device could not be added to the VM",
                                "Identifier is not unique",
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
                let req = json_body()?;
                self.created()?;
                let id = req.get("id").and_then(Value::as_str).unwrap_or_default();
                let pos = self.devices.iter().position(|d| d.id == id).ok_or_else(|| {
                    err(
                        404,
                        &[
                            "The device could not be removed from the VM",
                            "Failed to find device corresponding to the given identifier",
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
    let bad = |why: &str| err(400, &["The VM could not be created", why]);
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
    if cfg["serial"]["mode"] == "File" {
        let serial = cfg["serial"]["file"].as_str().unwrap_or_default();
        let line = ready_line(&image);
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

/// The `VMRS_READY ...\n` line embedded in a test guest image.
fn ready_line(image: &[u8]) -> Option<Vec<u8>> {
    let start = image.windows(10).position(|w| w == b"VMRS_READY")?;
    let end = image[start..].iter().position(|&b| b == b'\n')?;
    Some(image[start..=start + end].to_vec())
}

fn file_url(v: &Value) -> Option<PathBuf> {
    v.as_str()?.strip_prefix("file://").map(PathBuf::from)
}

type Request = (String, String, Vec<u8>);

fn read_request(r: &mut BufReader<UnixStream>) -> Result<Option<Request>, String> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take((MAX_HEAD - head.len().min(MAX_HEAD)) as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err("truncated request".into())
            };
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err("request head too large".into());
        }
    }
    let text = String::from_utf8(head).map_err(|_| "request head is not utf-8".to_string())?;
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let mut len = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().map_err(|_| "bad content-length".to_string())?;
            }
        }
    }
    if len > MAX_BODY {
        return Err("request body too large".into());
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(Some((method, path, body)))
}

fn write_reply(w: &mut UnixStream, (status, body): Reply) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        500 => "Internal Server Error",
        _ => "Unknown",
    };
    let mut out =
        format!("HTTP/1.1 {status} {reason}\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n");
    let body = body.map(|b| b.to_string().into_bytes());
    if let Some(b) = &body {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    } else if status != 204 {
        out.push_str("Content-Length: 0\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(&b);
    }
    w.write_all(&bytes)?;
    w.flush()
}
