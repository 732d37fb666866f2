//! The guest side of the vm-rs agent (protocol: the `vmrs-proto` crate).
//!
//! One thread per virtio-serial port named `vmrs.agent*` reads frames and answers them. A port
//! has at most one host connection: `read` returning 0 means no host is connected (the thread
//! then polls every 50 ms); when a connection that sent data goes away, the processes it started
//! are killed and frames still queued for it are dropped (a connection generation counter).
//!
//! Exec: each process gets a thread forwarding its stdout/stderr (non-blocking pipes, polled)
//! and one writing stdin from the host; its exit status arrives from the PID 1 reaper
//! ([`crate::reaper`]). A terminal exec ([`Message::ExecTty`]) gets a pseudo-terminal
//! ([`crate::tty`]) instead of pipes: the output thread reads its master, the stdin thread
//! writes to it, and a resize sets its window size. Copy in is handled on the port thread; copy out streams from its own
//! thread. Writes to the port are serialised by a mutex, one whole frame at a time.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmrs_proto::{
    valid_relative_path, Decoder, Entry, EntryKind, ExecRequest, Message, Restart, RestartPolicy, WinSize,
    CHUNK, EXEC_DETACH, EXEC_STDIN, LOG_PORT_NAME, MAIN_EXIT_MARKER, MIN_VERSION, PORT_NAME, VERSION,
    VERSION_TTY, VSOCK_PORT,
};

use crate::{log, reaper, sys, tty};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const MAX_DEPTH: usize = 256;

/// Find the agent ports (`/dev/vportNpM` whose sysfs name starts with [`PORT_NAME`]).
pub fn find_ports() -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") else {
        return Vec::new();
    };
    let mut ports: Vec<PathBuf> = dir
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("name"))
                .map(|n| n.trim().starts_with(PORT_NAME))
                .unwrap_or(false)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect();
    ports.sort();
    ports
}

/// Start serving every agent port and the vsock listener ([`VSOCK_PORT`]); `shutdown` is
/// written to when the host asks for a power-off.
pub fn start(shutdown: Arc<OwnedFd>) {
    match sys::vsock_listen(VSOCK_PORT) {
        Ok(listener) => {
            let shutdown = shutdown.clone();
            let spawned = std::thread::Builder::new()
                .name("agent vsock".into())
                .spawn(move || serve_vsock(listener, shutdown));
            if let Err(e) = spawned {
                log(&format!("agent: cannot start the vsock thread: {e}"));
            }
        }
        // no vsock device (a QEMU VM on virtio-serial): nothing to listen on
        Err(e) => log(&format!("agent: no vsock listener on port {VSOCK_PORT}: {e}")),
    }
    for port in find_ports() {
        let shutdown = shutdown.clone();
        let name = port.display().to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("agent {name}"))
            .spawn(move || serve_port(&port, &shutdown));
        if let Err(e) = spawned {
            log(&format!("agent: cannot start thread for {name}: {e}"));
        }
    }
}

/// The write half of a port, shared by the threads answering on it.
struct Output {
    file: Mutex<File>,
    generation: AtomicU64,
    /// Protocol version of the current conversation (from its hello).
    version: AtomicU16,
}

impl Output {
    /// Send one frame if the connection `gen` is still current. False when it is not (or the
    /// write failed).
    fn send(&self, gen: u64, stream: u32, msg: &Message) -> bool {
        let Ok(frame) = msg.encode(stream) else {
            return false;
        };
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::SeqCst) != gen {
            return false;
        }
        f.write_all(&frame).is_ok()
    }

    fn error(&self, gen: u64, stream: u32, message: impl AsRef<str>) {
        self.send(
            gen,
            stream,
            &Message::Error {
                message: message.as_ref().as_bytes().to_vec(),
            },
        );
    }
}

enum Stream {
    Exec {
        pid: libc::pid_t,
        stdin: Option<Sender<Vec<u8>>>,
        done: Arc<AtomicBool>,
        /// The terminal's master, for a terminal exec.
        pty: Option<Arc<OwnedFd>>,
    },
    CopyIn(CopyIn),
    /// Finished or failed: further frames are ignored.
    Closed,
}

fn open_port(port: &Path) -> Option<File> {
    for _ in 0..100 {
        match std::fs::OpenOptions::new().read(true).write(true).open(port) {
            Ok(f) => return Some(f),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    log(&format!("agent: cannot open {}", port.display()));
    None
}

/// Accept vsock connections; each is one conversation on its own thread, ending at its EOF.
fn serve_vsock(listener: OwnedFd, shutdown: Arc<OwnedFd>) {
    loop {
        let conn = match sys::accept(&listener) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log(&format!("agent: vsock accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let shutdown = shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name("agent vsock conn".into())
            .spawn(move || {
                let reader = File::from(conn);
                match reader.try_clone() {
                    Ok(writer) => serve(reader, writer, "vsock", true, &shutdown),
                    Err(e) => log(&format!("agent: vsock: {e}")),
                }
            });
        if let Err(e) = spawned {
            log(&format!("agent: cannot start a vsock connection thread: {e}"));
        }
    }
}

fn serve_port(port: &Path, shutdown: &OwnedFd) {
    let Some(reader) = open_port(port) else {
        return;
    };
    let writer = match reader.try_clone() {
        Ok(w) => w,
        Err(e) => {
            log(&format!("agent: {}: {e}", port.display()));
            return;
        }
    };
    serve(reader, writer, &port.display().to_string(), false, shutdown);
}

/// One agent conversation over `reader`/`writer`. On a virtio-serial port EOF means "no host
/// connected" and the loop waits for the next one; on a socket (`ends_at_eof`) EOF ends it.
fn serve(mut reader: File, writer: File, label: &str, ends_at_eof: bool, shutdown: &OwnedFd) {
    let out = Arc::new(Output {
        file: Mutex::new(writer),
        generation: AtomicU64::new(0),
        version: AtomicU16::new(MIN_VERSION),
    });
    let mut decoder = Decoder::new();
    let mut streams: HashMap<u32, Stream> = HashMap::new();
    let mut connected = false;
    // After a protocol error: bytes are skipped until a hello frame starts a new conversation.
    let mut desynced: Option<Vec<u8>> = None;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                // No host connected. (A quick disconnect + reconnect may never show up here;
                // a hello resets the connection state as well.)
                if connected || ends_at_eof {
                    reset_connection(&out, &mut streams);
                    decoder = Decoder::new();
                    connected = false;
                    desynced = None;
                }
                if ends_at_eof {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(n) => {
                connected = true;
                let fresh: Vec<u8>;
                let data: &[u8] = if let Some(pending) = desynced.as_mut() {
                    pending.extend_from_slice(&buf[..n]);
                    match find_hello(pending) {
                        Some(at) => {
                            fresh = pending.split_off(at);
                            desynced = None;
                            decoder = Decoder::new();
                            &fresh
                        }
                        None => {
                            // Keep only what could be the start of a hello.
                            let keep = pending.len().saturating_sub(HELLO_PREFIX.len());
                            pending.drain(..keep);
                            continue;
                        }
                    }
                } else {
                    &buf[..n]
                };
                decoder.push(data);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => {
                            if matches!(frame.message, Message::Hello { .. }) {
                                // A new conversation: whatever came before is over.
                                reset_connection(&out, &mut streams);
                            }
                            let gen = out.generation.load(Ordering::SeqCst);
                            handle(&out, gen, &mut streams, frame.stream, frame.message, shutdown);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let gen = out.generation.load(Ordering::SeqCst);
                            out.error(gen, 0, format!("protocol error: {e}"));
                            log(&format!("agent: protocol error from host: {e}"));
                            desynced = Some(Vec::new());
                            break;
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if ends_at_eof => {
                log(&format!("agent: read {label}: {e}"));
                reset_connection(&out, &mut streams);
                return;
            }
            Err(e) => {
                log(&format!("agent: read {label}: {e}"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Take the identity a restore gives the guest: clock first (certificates), then entropy and
/// a reseed, then host name and machine id. The first failure is the answer.
fn apply_identity(id: &vmrs_proto::Identity) -> Result<(), String> {
    if id.realtime_ns != 0 {
        sys::set_realtime(id.realtime_ns).map_err(|e| format!("set clock: {e}"))?;
    }
    sys::add_entropy_and_reseed(&id.entropy).map_err(|e| format!("reseed rng: {e}"))?;
    if let Some(h) = &id.hostname {
        let h = std::str::from_utf8(h).map_err(|_| "host name is not utf-8".to_string())?;
        if h.is_empty()
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(format!("invalid host name {h:?}"));
        }
        sys::sethostname(h).map_err(|e| format!("sethostname: {e}"))?;
        // best effort: a read-only root keeps the file it has
        let _ = write_replacing(Path::new("/etc/hostname"), format!("{h}\n").as_bytes());
    }
    if let Some(m) = &id.machine_id {
        if m.len() != 32 || !m.iter().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return Err("machine id must be 32 lower-case hex digits".into());
        }
        let mut line = m.clone();
        line.push(b'\n');
        write_replacing(Path::new("/etc/machine-id"), &line)
            .map_err(|e| format!("write /etc/machine-id: {e}"))?;
    }
    Ok(())
}

/// Re-address the NICs a restore names: MAC first (so nothing leaves with the old one under
/// the new address), then the address, then the default route the address change dropped.
/// Every NIC is checked before any is changed; the first failure is the answer.
fn apply_addresses(nics: &[vmrs_proto::NicAddress]) -> Result<(), String> {
    for n in nics {
        if n.mac[0] & 1 != 0 || n.mac == [0; 6] {
            return Err(format!("eth{}: {:02x?} is not a unicast mac", n.index, n.mac));
        }
        if !Path::new(&format!("/sys/class/net/eth{}", n.index)).exists() {
            return Err(format!("eth{}: no such interface", n.index));
        }
    }
    for n in nics {
        let ifname = format!("eth{}", n.index);
        sys::set_mac(&ifname, n.mac).map_err(|e| format!("{ifname}: set mac: {e}"))?;
        sys::set_ipv4(&ifname, n.address, n.prefix_len).map_err(|e| format!("{ifname}: set address: {e}"))?;
        if let Some(gw) = n.gateway {
            sys::add_default_route(gw).map_err(|e| format!("{ifname}: default route: {e}"))?;
        }
    }
    Ok(())
}

/// Replace `path` through a temp file and a rename (a reader never sees half a file).
fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("vmrs-tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))?;
    std::fs::rename(&tmp, path)
}

/// The bytes every hello frame starts with: length 7, type 0x01, stream 0.
const HELLO_PREFIX: [u8; 9] = [0, 0, 0, 7, 0x01, 0, 0, 0, 0];

fn find_hello(buf: &[u8]) -> Option<usize> {
    buf.windows(HELLO_PREFIX.len()).position(|w| w == HELLO_PREFIX)
}

/// Forget a connection: frames still queued for it are dropped, its processes killed.
fn reset_connection(out: &Output, streams: &mut HashMap<u32, Stream>) {
    out.generation.fetch_add(1, Ordering::SeqCst);
    for (_, s) in streams.drain() {
        if let Stream::Exec { pid, done, .. } = s {
            if !done.load(Ordering::SeqCst) {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn handle(
    out: &Arc<Output>,
    gen: u64,
    streams: &mut HashMap<u32, Stream>,
    stream: u32,
    msg: Message,
    shutdown: &OwnedFd,
) {
    match msg {
        Message::Hello { version } => {
            if (MIN_VERSION..=VERSION).contains(&version) {
                out.version.store(version, Ordering::SeqCst);
                out.send(
                    gen,
                    0,
                    &Message::HelloOk {
                        version,
                        agent: format!("vmrs-init {}", env!("CARGO_PKG_VERSION")).into_bytes(),
                    },
                );
            } else {
                out.error(
                    gen,
                    0,
                    format!(
                        "unsupported protocol version {version} (agent speaks {MIN_VERSION} to {VERSION})"
                    ),
                );
            }
        }
        Message::Ping { nonce } => {
            out.send(gen, stream, &Message::Pong { nonce });
        }
        Message::Shutdown => {
            out.send(gen, stream, &Message::ShutdownOk);
            // SAFETY: writes one byte from a live buffer to a pipe we own.
            unsafe { libc::write(shutdown.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
        Message::SetIdentity(id) => match apply_identity(&id) {
            Ok(()) => {
                out.send(gen, stream, &Message::IdentitySet);
            }
            Err(e) => out.error(gen, stream, e),
        },
        Message::SetAddresses(nics) => match apply_addresses(&nics) {
            Ok(()) => {
                out.send(gen, stream, &Message::AddressesSet);
            }
            Err(e) => out.error(gen, stream, e),
        },
        Message::Exec(_) | Message::ExecTty { .. } => {
            let (req, size) = match msg {
                Message::ExecTty { exec, size } => (exec, Some(size)),
                Message::Exec(exec) => (exec, None),
                _ => return,
            };
            streams.retain(|_, s| match s {
                Stream::Exec { done, .. } => !done.load(Ordering::SeqCst),
                Stream::Closed => false,
                Stream::CopyIn(_) => true,
            });
            if stream == 0 || streams.contains_key(&stream) {
                out.error(gen, stream, "stream id in use");
                return;
            }
            match start_exec(out, gen, stream, req, size) {
                Ok(Some(s)) => {
                    streams.insert(stream, s);
                }
                Ok(None) => {}
                Err(ExecError::Spawn { errno, message })
                    if out.version.load(Ordering::SeqCst) >= VERSION_TTY =>
                {
                    out.send(
                        gen,
                        stream,
                        &Message::SpawnFailed {
                            errno,
                            message: message.into_bytes(),
                        },
                    );
                }
                Err(ExecError::Spawn { message, .. } | ExecError::Other(message)) => {
                    out.error(gen, stream, message)
                }
            }
        }
        Message::ExecMain { exec, restart } => match shutdown.try_clone() {
            Ok(fd) => start_main(out, gen, stream, exec, restart, fd),
            Err(e) => out.error(gen, stream, format!("cannot start the main process: {e}")),
        },
        Message::Resize { size } => {
            if let Some(Stream::Exec {
                pty: Some(master), ..
            }) = streams.get(&stream)
            {
                let _ = tty::resize(master, size);
            }
        }
        Message::Stdin { data } => {
            if let Some(Stream::Exec { stdin, pty, .. }) = streams.get_mut(&stream) {
                if data.is_empty() && pty.is_some() {
                    // The end of the host's input ends nothing on a terminal (a user's ^D is
                    // an ordinary byte for the line discipline).
                } else if data.is_empty() {
                    *stdin = None;
                } else if let Some(tx) = stdin {
                    let _ = tx.send(data);
                }
            }
        }
        Message::Signal { signo } => {
            if let Some(Stream::Exec { pid, done, .. }) = streams.get(&stream) {
                if !done.load(Ordering::SeqCst) {
                    let _ = sys::kill(*pid, signo);
                }
            }
        }
        Message::CopyIn { dest, name } => {
            if stream == 0 || streams.contains_key(&stream) {
                out.error(gen, stream, "stream id in use");
                return;
            }
            match CopyIn::begin(&dest, &name) {
                Ok(c) => {
                    streams.insert(stream, Stream::CopyIn(c));
                }
                Err(e) => {
                    streams.insert(stream, Stream::Closed);
                    out.error(gen, stream, e);
                }
            }
        }
        Message::Entry(_) | Message::Data { .. } | Message::End => {
            let Some(Stream::CopyIn(copy)) = streams.get_mut(&stream) else {
                return;
            };
            let end = matches!(msg, Message::End);
            match copy.apply(msg) {
                Ok(()) if end => {
                    out.send(gen, stream, &Message::CopyDone);
                    streams.insert(stream, Stream::Closed);
                }
                Ok(()) => {}
                Err(e) => {
                    out.error(gen, stream, e);
                    streams.insert(stream, Stream::Closed);
                }
            }
        }
        Message::CopyOut { src } => {
            let out2 = out.clone();
            let path = PathBuf::from(OsString::from_vec(src));
            let spawned = std::thread::Builder::new()
                .name("agent copy-out".into())
                .spawn(move || {
                    if let Err(e) = copy_out(&out2, gen, stream, &path) {
                        out2.error(gen, stream, e);
                    }
                });
            if spawned.is_err() {
                out.error(gen, stream, "cannot start copy thread");
            }
        }
        _ => out.error(gen, stream, "unexpected message"),
    }
}

/// The output of the main process: the log port when the VM has one, else the console.
fn main_output() -> Stdio {
    let port = std::fs::read_dir("/sys/class/virtio-ports")
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == LOG_PORT_NAME))
        .map(|e| Path::new("/dev").join(e.file_name()));
    match port.and_then(|p| std::fs::OpenOptions::new().write(true).open(p).ok()) {
        Some(f) => Stdio::from(f),
        None => Stdio::inherit(),
    }
}

/// Start the VM's main process ([`Message::ExecMain`]): answer `Started` for the first start,
/// then, on a thread, wait for it, restart it as `restart` says, and when it ends for good
/// report its end on the console and power the VM off through `shutdown`.
fn start_main(
    out: &Arc<Output>,
    gen: u64,
    stream: u32,
    req: ExecRequest,
    restart: Restart,
    shutdown: OwnedFd,
) {
    // One main process per boot: its end is the VM's.
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::SeqCst) {
        out.error(gen, stream, "the VM has a main process already");
        return;
    }
    let program = req.argv.first().cloned().unwrap_or_default();
    let spawn = move || -> Result<(std::process::Child, Receiver<libc::c_int>), ExecError> {
        let (mut cmd, cwd) = command(&req, false)?;
        // The same port for both (a `Stdio` cannot be cloned: it is opened twice).
        cmd.stdin(Stdio::null())
            .stdout(main_output())
            .stderr(main_output());
        reaper::spawn_registered(&mut cmd).map_err(|e| spawn_error(&program, &cwd, e))
    };
    let first = spawn();
    if first.is_err() {
        STARTED.store(false, Ordering::SeqCst);
    }
    let (child, status_rx) = match first {
        Ok(c) => c,
        Err(ExecError::Spawn { errno, message }) if out.version.load(Ordering::SeqCst) >= VERSION_TTY => {
            out.send(
                gen,
                stream,
                &Message::SpawnFailed {
                    errno,
                    message: message.into_bytes(),
                },
            );
            return;
        }
        Err(ExecError::Spawn { message, .. } | ExecError::Other(message)) => {
            out.error(gen, stream, message);
            return;
        }
    };
    out.send(gen, stream, &Message::Started { pid: child.id() });
    let spawned = std::thread::Builder::new()
        .name("main process".into())
        .spawn(move || {
            let mut status_rx = status_rx;
            let mut restarts = 0u32;
            let mut backoff = Duration::from_millis(100);
            let end = loop {
                let status = status_rx.recv().ok();
                let failed = !matches!(status, Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0);
                let again = restarts < restart.max
                    && match restart.policy {
                        RestartPolicy::No => false,
                        RestartPolicy::OnFailure => failed,
                        RestartPolicy::Always => true,
                    };
                if !again {
                    break status;
                }
                restarts += 1;
                log(&format!(
                    "main process ended; restart {restarts} of {}",
                    restart.max
                ));
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
                match spawn() {
                    Ok((_, rx)) => status_rx = rx,
                    Err(ExecError::Spawn { message, .. } | ExecError::Other(message)) => {
                        log(&format!("main process: {message}"));
                        break Some(127 << 8);
                    }
                }
            };
            let what = match end {
                Some(s) if libc::WIFSIGNALED(s) => format!("signal={}", libc::WTERMSIG(s)),
                Some(s) => format!("code={}", libc::WEXITSTATUS(s)),
                None => "code=255".to_string(),
            };
            // a kernel record, so no kernel message splits it (see sys::announce)
            sys::announce(&format!("{MAIN_EXIT_MARKER}{what} restarts={restarts}"));
            sys::drain_console();
            // SAFETY: writes one byte from a live buffer to a pipe we own.
            unsafe { libc::write(shutdown.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        });
    if spawned.is_err() {
        log("main process: cannot start its watcher thread");
    }
}

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Numeric uid.
    pub uid: u32,
    /// Numeric gid.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// Resolve `user`, `uid`, `user:group` or `uid:gid` against passwd/group file contents.
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<User, String> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .collect();
    let by_name = entries.iter().find(|f| f[0] == u);
    let (uid, pw) = match u.parse::<u32>() {
        Ok(uid) => (uid, entries.iter().find(|f| f[2].parse() == Ok(uid))),
        Err(_) => {
            let f = by_name.ok_or_else(|| format!("unknown user {u:?}"))?;
            let uid = f[2].parse().map_err(|_| format!("bad uid for user {u:?}"))?;
            (uid, Some(f))
        }
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("unknown group {g:?}"))?,
        },
        None => pw.and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let home =
        pw.map(|f| f[5].to_string())
            .unwrap_or_else(|| if uid == 0 { "/root".into() } else { "/".into() });
    Ok(User { uid, gid, home })
}

/// Why an exec did not start.
enum ExecError {
    /// The program could not be started (not found, not executable).
    Spawn { errno: i32, message: String },
    /// Anything else (bad request, unknown user, no working directory).
    Other(String),
}

impl From<String> for ExecError {
    fn from(s: String) -> Self {
        ExecError::Other(s)
    }
}

impl From<&str> for ExecError {
    fn from(s: &str) -> Self {
        ExecError::Other(s.to_string())
    }
}

/// The process `req` asks for, with its user, environment and working directory applied, and
/// the child-side setup (signal mask; a session on the terminal when `tty`).
fn command(req: &ExecRequest, tty: bool) -> Result<(Command, PathBuf), ExecError> {
    let Some(program) = req.argv.first() else {
        return Err("empty command".into());
    };
    let root = match &req.root {
        Some(r) => Some(process_root(r)?),
        None => None,
    };
    let inside = |p: &str| match &root {
        Some(r) => r.join(p.trim_start_matches('/')),
        None => PathBuf::from(p),
    };
    let user = match &req.user {
        Some(u) => {
            let spec = String::from_utf8_lossy(u).into_owned();
            let passwd = std::fs::read_to_string(inside("/etc/passwd")).unwrap_or_default();
            let group = std::fs::read_to_string(inside("/etc/group")).unwrap_or_default();
            resolve_user(&spec, &passwd, &group)?
        }
        None => User {
            uid: 0,
            gid: 0,
            home: "/root".into(),
        },
    };
    let mut cmd = Command::new(OsStr::from_bytes(program));
    cmd.args(req.argv[1..].iter().map(|a| OsStr::from_bytes(a)));
    cmd.env_clear();
    cmd.env("PATH", DEFAULT_PATH);
    cmd.env("HOME", &user.home);
    for kv in &req.env {
        match kv.iter().position(|&b| b == b'=') {
            Some(i) if i > 0 => {
                cmd.env(OsStr::from_bytes(&kv[..i]), OsStr::from_bytes(&kv[i + 1..]));
            }
            _ => {
                return Err(ExecError::Other(format!(
                    "invalid environment entry {:?}",
                    String::from_utf8_lossy(kv)
                )))
            }
        }
    }
    let cwd = req
        .cwd
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|c| PathBuf::from(OsStr::from_bytes(c)))
        .unwrap_or_else(|| PathBuf::from("/"));
    // A missing working directory would fail the start with ENOENT, which reads as "command
    // not found": say what it is.
    if !inside(&cwd.to_string_lossy()).is_dir() {
        return Err(ExecError::Other(format!(
            "working directory {} does not exist",
            cwd.display()
        )));
    }
    // With a root, the child enters it first and then changes directory and user itself: std's
    // uid/gid/current_dir would apply before the chroot (which needs root's privilege).
    let chroot = match &root {
        None => {
            cmd.current_dir(&cwd);
            if user.uid != 0 || user.gid != 0 {
                cmd.gid(user.gid).uid(user.uid);
            }
            None
        }
        Some(r) => {
            let c = |p: &Path| {
                std::ffi::CString::new(p.as_os_str().as_bytes())
                    .map_err(|_| ExecError::Other("a path with a NUL byte".into()))
            };
            Some((c(r)?, c(&cwd)?, user.uid, user.gid))
        }
    };
    if !tty {
        cmd.process_group(0);
    }
    let with_tty = tty;
    // PID 1 blocks the signals it reads through a signalfd; the mask is inherited across exec,
    // so clear it or the workload could never be stopped with SIGTERM. A terminal exec leads a
    // session of its own with the terminal as its controlling tty (so ^C reaches it).
    // SAFETY: runs in the child between fork and exec and only calls sigemptyset,
    // sigprocmask, setsid and ioctl, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if with_tty {
                tty::become_session_leader()?;
            }
            if let Some((root, cwd, uid, gid)) = &chroot {
                enter_root(root, cwd, *uid, *gid)?;
            }
            Ok(())
        });
    }
    Ok((cmd, cwd))
}

/// A process root from an exec request: an absolute directory of the guest, made ready to run
/// a container's process in (its `/proc` and `/dev` mounted when it has those directories).
fn process_root(r: &[u8]) -> Result<PathBuf, ExecError> {
    let root = PathBuf::from(OsStr::from_bytes(r));
    if !root.is_absolute() || !root.is_dir() {
        return Err(ExecError::Other(format!(
            "process root {} is not an existing absolute directory",
            root.display()
        )));
    }
    for (sub, fstype, source, flags) in [
        ("proc", "proc", "proc", 0),
        ("dev", "", "/dev", libc::MS_BIND | libc::MS_REC),
    ] {
        let target = root.join(sub);
        // lstat: a symlink there (container content) is never followed out of the root
        let is_dir = std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir());
        if is_dir && !is_mount_point(&target) {
            let t = target.to_string_lossy().into_owned();
            if let Err(e) = crate::sys::mount(source, &t, fstype, flags, "") {
                eprintln!("vmrs-init: cannot mount {sub} in {}: {e}", root.display());
            }
        }
    }
    Ok(root)
}

fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Some(parent)) = (std::fs::metadata(p), p.parent()) else {
        return false;
    };
    std::fs::metadata(parent).is_ok_and(|pm| pm.dev() != m.dev())
}

/// In the child, between fork and exec: chroot into `root`, change to `cwd` inside it and drop
/// to `uid:gid`. Only async-signal-safe calls.
fn enter_root(root: &std::ffi::CStr, cwd: &std::ffi::CStr, uid: u32, gid: u32) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls on valid NUL-terminated strings; no allocation.
    unsafe {
        check(libc::chroot(root.as_ptr()))?;
        check(libc::chdir(c"/".as_ptr()))?;
        check(libc::chdir(cwd.as_ptr()))?;
        if uid != 0 || gid != 0 {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
        }
    }
    Ok(())
}

fn spawn_error(program: &[u8], cwd: &Path, e: std::io::Error) -> ExecError {
    ExecError::Spawn {
        errno: e.raw_os_error().unwrap_or(0),
        message: format!(
            "cannot run {:?} in {}: {e}",
            String::from_utf8_lossy(program),
            cwd.display()
        ),
    }
}

fn start_exec(
    out: &Arc<Output>,
    gen: u64,
    stream: u32,
    req: ExecRequest,
    tty_size: Option<WinSize>,
) -> Result<Option<Stream>, ExecError> {
    let (mut cmd, cwd) = command(&req, tty_size.is_some())?;
    let program = req.argv.first().map(Vec::as_slice).unwrap_or_default();
    let pty = match tty_size {
        Some(size) => Some(tty::open(size).map_err(|e| format!("cannot allocate a terminal: {e}"))?),
        None => None,
    };
    let detach = req.flags & EXEC_DETACH != 0 && pty.is_none();
    let mut master = None;
    if let Some((m, slave)) = pty {
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| format!("cannot set up the terminal: {e}"))
        };
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        master = Some(m);
    } else if detach {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
    } else {
        cmd.stdin(if req.flags & EXEC_STDIN != 0 {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }
    let spawned = reaper::spawn_registered(&mut cmd);
    // The child has its copies of the terminal's slave; ours must go, or the master never
    // reads end of file.
    drop(cmd);
    let (mut child, status_rx) = spawned.map_err(|e| spawn_error(program, &cwd, e))?;
    let pid = child.id() as libc::pid_t;
    out.send(gen, stream, &Message::Started { pid: pid as u32 });
    if detach {
        return Ok(None);
    }
    let done = Arc::new(AtomicBool::new(false));
    if let Some(master) = master {
        let master = Arc::new(master);
        let (tx, rx) = channel::<Vec<u8>>();
        let writer = master.clone();
        let _ = std::thread::Builder::new()
            .name("agent tty in".into())
            .spawn(move || {
                for chunk in rx {
                    if tty::write_all(writer.as_raw_fd(), &chunk).is_err() {
                        break;
                    }
                }
            });
        let reader = master
            .try_clone()
            .map_err(|e| format!("cannot set up the terminal: {e}"));
        let out2 = out.clone();
        let done2 = done.clone();
        let spawned = reader.and_then(|reader| {
            std::thread::Builder::new()
                .name("agent tty out".into())
                .spawn(move || forward_output(&out2, gen, stream, vec![reader], status_rx, &done2))
                .map_err(|_| "cannot start output thread".to_string())
        });
        if let Err(e) = spawned {
            let _ = sys::kill(pid, libc::SIGKILL);
            return Err(e.into());
        }
        return Ok(Some(Stream::Exec {
            pid,
            stdin: Some(tx),
            done,
            pty: Some(master),
        }));
    }
    let stdin_tx = child.stdin.take().map(|mut stdin| {
        let (tx, rx) = channel::<Vec<u8>>();
        let _ = std::thread::Builder::new()
            .name("agent stdin".into())
            .spawn(move || {
                for chunk in rx {
                    if stdin.write_all(&chunk).is_err() {
                        break;
                    }
                }
            });
        tx
    });
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let out2 = out.clone();
    let done2 = done.clone();
    let spawned = std::thread::Builder::new()
        .name("agent output".into())
        .spawn(move || {
            let fds: Vec<OwnedFd> = [stdout.map(OwnedFd::from), stderr.map(OwnedFd::from)]
                .into_iter()
                .flatten()
                .collect();
            forward_output(&out2, gen, stream, fds, status_rx, &done2);
        });
    if spawned.is_err() {
        let _ = sys::kill(pid, libc::SIGKILL);
        return Err("cannot start output thread".into());
    }
    Ok(Some(Stream::Exec {
        pid,
        stdin: stdin_tx,
        done,
        pty: None,
    }))
}

fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// Read what is available from `fd`: Some(bytes) (empty = would block), None = EOF/error.
fn read_some(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: `buf` is a valid writable buffer of its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n > 0 {
        Some(n as usize)
    } else if n == 0 {
        None
    } else {
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Some(0),
            _ => None,
        }
    }
}

fn forward_output(
    out: &Output,
    gen: u64,
    stream: u32,
    fds: Vec<OwnedFd>,
    status_rx: Receiver<libc::c_int>,
    done: &AtomicBool,
) {
    for fd in &fds {
        set_nonblocking(fd);
    }
    // Index 0 = stdout, 1 = stderr; None once closed.
    let mut open: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut buf = vec![0u8; CHUNK];
    let mut status = None;
    let emit = |idx: usize, data: &[u8]| {
        let msg = if idx == 0 {
            Message::Stdout { data: data.to_vec() }
        } else {
            Message::Stderr { data: data.to_vec() }
        };
        out.send(gen, stream, &msg);
    };
    loop {
        if status.is_none() {
            status = status_rx.try_recv().ok();
        }
        let raw: Vec<_> = open
            .iter()
            .map(|f| f.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1))
            .collect();
        if raw.iter().all(|&fd| fd < 0) {
            break;
        }
        if status.is_some() {
            // Exited: drain what is buffered without waiting for writers that outlive it.
            for (idx, slot) in open.iter_mut().enumerate() {
                while let Some(fd) = slot.as_ref() {
                    match read_some(fd, &mut buf) {
                        Some(0) => break,
                        Some(n) => emit(idx, &buf[..n]),
                        None => *slot = None,
                    }
                }
            }
            break;
        }
        let ready = sys::poll_readable(&raw, 100);
        for idx in ready {
            // Gather what the pipe holds (up to one chunk) into one frame: every frame costs a
            // virtqueue notification, expensive under emulation.
            let mut filled = 0;
            let mut eof = false;
            while let Some(fd) = open[idx].as_ref() {
                if filled == buf.len() {
                    break;
                }
                match read_some(fd, &mut buf[filled..]) {
                    Some(0) => break,
                    Some(n) => filled += n,
                    None => {
                        eof = true;
                        break;
                    }
                }
            }
            if filled > 0 {
                emit(idx, &buf[..filled]);
            }
            if eof {
                open[idx] = None;
            }
        }
    }
    let status = match status {
        Some(s) => Some(s),
        None => status_rx.recv().ok(),
    };
    done.store(true, Ordering::SeqCst);
    let msg = match status {
        Some(s) if libc::WIFEXITED(s) => Message::Exited {
            code: libc::WEXITSTATUS(s),
        },
        Some(s) if libc::WIFSIGNALED(s) => Message::Signaled {
            signo: libc::WTERMSIG(s),
        },
        _ => Message::Error {
            message: b"lost the exit status".to_vec(),
        },
    };
    out.send(gen, stream, &msg);
}

/// State of a copy into the guest.
struct CopyIn {
    target: PathBuf,
    started: bool,
    current: Option<(File, u64)>,
    dirs: Vec<(PathBuf, u32)>,
}

fn bytes_path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

impl CopyIn {
    fn begin(dest: &[u8], name: &[u8]) -> Result<CopyIn, String> {
        if dest.is_empty() || dest.contains(&0) {
            return Err("invalid destination".into());
        }
        let dest = bytes_path(dest);
        let target = match std::fs::metadata(&dest) {
            Ok(m) if m.is_dir() && !name.is_empty() => {
                if name.contains(&b'/') || !valid_relative_path(name) {
                    return Err("invalid name".into());
                }
                dest.join(OsStr::from_bytes(name))
            }
            _ => dest,
        };
        Ok(CopyIn {
            target,
            started: false,
            current: None,
            dirs: Vec::new(),
        })
    }

    fn full_path(&self, rel: &[u8]) -> Result<PathBuf, String> {
        if !valid_relative_path(rel) {
            return Err(format!("invalid path {:?}", String::from_utf8_lossy(rel)));
        }
        if rel.is_empty() {
            return Ok(self.target.clone());
        }
        // The root and every parent below it must be real directories (no symlinks
        // followed): a root entry that was a symlink would otherwise lead outside.
        let mut p = self.target.clone();
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(format!("{} is not a directory", p.display())),
        }
        let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
        for c in &comps[..comps.len() - 1] {
            p.push(OsStr::from_bytes(c));
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                _ => return Err(format!("{} is not a directory", p.display())),
            }
        }
        if let Some(last) = comps.last() {
            p.push(OsStr::from_bytes(last));
        }
        Ok(p)
    }

    fn apply(&mut self, msg: Message) -> Result<(), String> {
        match msg {
            Message::Entry(e) => self.entry(e),
            Message::Data { data } => {
                let Some((file, remaining)) = self.current.as_mut() else {
                    return Err("data without a file entry".into());
                };
                if data.len() as u64 > *remaining {
                    return Err("more data than the entry's size".into());
                }
                file.write_all(&data).map_err(|e| format!("write: {e}"))?;
                *remaining -= data.len() as u64;
                if *remaining == 0 {
                    self.current = None;
                }
                Ok(())
            }
            Message::End => {
                if self.current.is_some() {
                    return Err("copy ended inside a file".into());
                }
                for (dir, mode) in self.dirs.iter().rev() {
                    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(*mode));
                }
                Ok(())
            }
            _ => Err("unexpected message".into()),
        }
    }

    fn entry(&mut self, e: Entry) -> Result<(), String> {
        if self.current.is_some() {
            return Err("entry inside a file".into());
        }
        if !self.started && !e.path.is_empty() {
            return Err("the first entry must be the root".into());
        }
        if self.started && e.path.is_empty() {
            return Err("second root entry".into());
        }
        self.started = true;
        let path = self.full_path(&e.path)?;
        let mode = e.mode & 0o7777;
        let existing = std::fs::symlink_metadata(&path).ok();
        match e.kind {
            EntryKind::Dir => {
                match existing {
                    Some(m) if m.is_dir() => {}
                    Some(_) => return Err(format!("{} exists and is not a directory", path.display())),
                    None => std::fs::create_dir(&path)
                        .map_err(|err| format!("mkdir {}: {err}", path.display()))?,
                }
                // Keep it writable until the end; the real mode is applied then.
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700));
                self.dirs.push((path, mode));
            }
            EntryKind::File => {
                if existing.as_ref().is_some_and(|m| m.file_type().is_symlink()) {
                    std::fs::remove_file(&path).map_err(|err| format!("{}: {err}", path.display()))?;
                }
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|err| format!("create {}: {err}", path.display()))?;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|err| format!("chmod {}: {err}", path.display()))?;
                if e.size > 0 {
                    self.current = Some((file, e.size));
                }
            }
            EntryKind::Symlink => {
                if let Some(m) = existing {
                    if m.is_dir() {
                        return Err(format!("{} is a directory", path.display()));
                    }
                    let _ = std::fs::remove_file(&path);
                }
                std::os::unix::fs::symlink(bytes_path(&e.target), &path)
                    .map_err(|err| format!("symlink {}: {err}", path.display()))?;
            }
        }
        Ok(())
    }
}

/// Run one copy into the guest as the port thread does for a `CopyIn{dest, name}` stream:
/// `messages` are the stream's `Entry`/`Data`/`End` frames, in order. Stops at the first error
/// or after `End`. For the fuzz targets only (`fuzz/`): not part of any stable API.
#[doc(hidden)]
pub fn copy_in_for_fuzzing(
    dest: &[u8],
    name: &[u8],
    messages: impl IntoIterator<Item = Message>,
) -> Result<(), String> {
    let mut copy = CopyIn::begin(dest, name)?;
    for msg in messages {
        let end = matches!(msg, Message::End);
        copy.apply(msg)?;
        if end {
            return Ok(());
        }
    }
    Ok(())
}

fn copy_out(out: &Output, gen: u64, stream: u32, src: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    send_tree(out, gen, stream, src, Vec::new(), &meta, 0)?;
    out.send(gen, stream, &Message::End);
    Ok(())
}

fn send_tree(
    out: &Output,
    gen: u64,
    stream: u32,
    path: &Path,
    rel: Vec<u8>,
    meta: &std::fs::Metadata,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{}: tree too deep", path.display()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let ok = out.send(
            gen,
            stream,
            &Message::Entry(Entry {
                kind: EntryKind::Symlink,
                mode: 0o777,
                size: 0,
                path: rel,
                target: target.into_os_string().into_vec(),
            }),
        );
        return if ok { Ok(()) } else { Err("host went away".into()) };
    }
    if ft.is_file() {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let size = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        out.send(
            gen,
            stream,
            &Message::Entry(Entry {
                kind: EntryKind::File,
                mode,
                size,
                path: rel,
                target: Vec::new(),
            }),
        );
        let mut remaining = size;
        let mut buf = vec![0u8; CHUNK];
        while remaining > 0 {
            let want = remaining.min(CHUNK as u64) as usize;
            let n = file
                .read(&mut buf[..want])
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                return Err(format!("{}: file shrank while copying", path.display()));
            }
            if !out.send(
                gen,
                stream,
                &Message::Data {
                    data: buf[..n].to_vec(),
                },
            ) {
                return Err("host went away".into());
            }
            remaining -= n as u64;
        }
        return Ok(());
    }
    if ft.is_dir() {
        out.send(
            gen,
            stream,
            &Message::Entry(Entry {
                kind: EntryKind::Dir,
                mode,
                size: 0,
                path: rel.clone(),
                target: Vec::new(),
            }),
        );
        let mut children: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .flatten()
            .collect();
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let Ok(cmeta) = child.metadata() else {
                continue;
            };
            let mut crel = rel.clone();
            if !crel.is_empty() {
                crel.push(b'/');
            }
            crel.extend_from_slice(child.file_name().as_bytes());
            send_tree(out, gen, stream, &child.path(), crel, &cmeta, depth + 1)?;
        }
    }
    // Devices, fifos and sockets are skipped.
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hello_prefix_matches_the_encoder() {
        let hello = Message::Hello { version: VERSION }.encode(0).unwrap();
        assert_eq!(&hello[..HELLO_PREFIX.len()], &HELLO_PREFIX);
        let mut junk = vec![0xffu8, 1, 2, 3];
        junk.extend_from_slice(&hello);
        assert_eq!(find_hello(&junk), Some(4));
        assert_eq!(find_hello(&[0, 0, 0, 7]), None);
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nwww:x:33:33::/var/www:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww-data:x:33:\nstaff:x:50:www\n";

    #[test]
    fn users_resolve_by_name_and_number() {
        assert_eq!(
            resolve_user("www", PASSWD, GROUP).unwrap(),
            User {
                uid: 33,
                gid: 33,
                home: "/var/www".into()
            }
        );
        assert_eq!(resolve_user("www:staff", PASSWD, GROUP).unwrap().gid, 50);
        assert_eq!(
            resolve_user("1000:1000", PASSWD, GROUP).unwrap(),
            User {
                uid: 1000,
                gid: 1000,
                home: "/".into()
            }
        );
        assert_eq!(resolve_user("65534", PASSWD, GROUP).unwrap().gid, 65534);
        assert_eq!(resolve_user("0", PASSWD, GROUP).unwrap().home, "/root");
        assert!(resolve_user("ghost", PASSWD, GROUP).is_err());
        assert!(resolve_user("www:ghosts", PASSWD, GROUP).is_err());
    }

    #[test]
    fn copy_in_writes_tree_with_modes_and_refuses_bad_paths() {
        let dir = std::env::temp_dir().join(format!("vmrs-agent-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = CopyIn::begin(dir.as_os_str().as_bytes(), b"tree").unwrap();
        let entry = |kind, mode, size, path: &[u8], target: &[u8]| {
            Message::Entry(Entry {
                kind,
                mode,
                size,
                path: path.to_vec(),
                target: target.to_vec(),
            })
        };
        c.apply(entry(EntryKind::Dir, 0o750, 0, b"", b"")).unwrap();
        c.apply(entry(EntryKind::File, 0o640, 5, b"f", b"")).unwrap();
        c.apply(Message::Data {
            data: b"hello".to_vec(),
        })
        .unwrap();
        c.apply(entry(EntryKind::Symlink, 0o777, 0, b"l", b"/etc"))
            .unwrap();
        assert!(c
            .apply(entry(EntryKind::File, 0o644, 0, b"l/passwd", b""))
            .is_err());
        assert!(c.apply(entry(EntryKind::File, 0o644, 0, b"../x", b"")).is_err());
        c.apply(Message::End).unwrap();
        let root = dir.join("tree");
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"hello");
        assert_eq!(
            std::fs::metadata(root.join("f")).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        assert_eq!(
            std::fs::metadata(&root).unwrap().permissions().mode() & 0o7777,
            0o750
        );
        assert_eq!(std::fs::read_link(root.join("l")).unwrap(), Path::new("/etc"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn copy_in_through_a_root_symlink_is_refused() {
        // Found by the agent_guest fuzz target: a copy whose root entry is a symlink to a
        // directory outside, followed by a file entry, wrote through the symlink.
        let dir = std::env::temp_dir().join(format!("vmrs-agent-root-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("outside")).unwrap();
        std::fs::write(dir.join("outside/sentinel"), b"keep").unwrap();
        let dest = dir.join("new");
        let mut c = CopyIn::begin(dest.as_os_str().as_bytes(), b"").unwrap();
        let entry = |kind, size, path: &[u8], target: &[u8]| {
            Message::Entry(Entry {
                kind,
                mode: 0o644,
                size,
                path: path.to_vec(),
                target: target.to_vec(),
            })
        };
        c.apply(entry(EntryKind::Symlink, 0, b"", b"outside")).unwrap();
        assert!(c.apply(entry(EntryKind::File, 3, b"sentinel", b"")).is_err());
        assert!(c.apply(entry(EntryKind::Dir, 0, b"made", b"")).is_err());
        assert_eq!(std::fs::read(dir.join("outside/sentinel")).unwrap(), b"keep");
        assert!(!dir.join("outside/made").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
