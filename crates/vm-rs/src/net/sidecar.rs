//! Sidecar processes: the `vmrs-net` program serving a switch network or a published port
//! after the CLI that started a VM has exited.
//!
//! ## Layout
//!
//! ```text
//! <data dir>/networks/<network>/switch.sock    the switch socket QEMU sends to
//!                               switch.json    sidecar record: pid + start time
//!                               switch.log     its stderr
//!                               stats.json     per-port counters, refreshed every second
//!                               members/<vm>   one empty file per VM attached
//! ```
//!
//! [`ensure_switch`] starts the sidecar unless its recorded process (pid *and* start time, see
//! [`crate::process`]) is alive; [`join`]/[`leave`] maintain membership, and `leave` stops
//! the sidecar with its last member. A file lock (`flock` on `lock`) serialises managers.
//!
//! The program is found as `$VMRS_NET_BIN`, else `vmrs-net` next to the running executable
//! (or one directory up, for test binaries in `target/*/deps`), else — when the running
//! executable is the `vmrs` CLI or the containerd shim `containerd-shim-vmrs-v1` — its
//! `net-sidecar` subcommand, else `vmrs-net` on `PATH`. Both programs
//! run [`main`].

use crate::process::{is_same_process_alive, ProcessError, VmmProcess};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a new sidecar may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors managing sidecars.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SidecarError {
    /// A file or directory of the sidecar could not be read or written.
    #[error("cannot access {}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started or signalled.
    #[error("sidecar process")]
    Process(#[from] ProcessError),
    /// The sidecar did not come up in time.
    #[error("{what} sidecar did not start within {timeout:?} (see {})", log.display())]
    StartTimeout {
        /// "switch" or "forward".
        what: &'static str,
        /// Timeout.
        timeout: Duration,
        /// Its log.
        log: PathBuf,
    },
}

impl SidecarError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            SidecarError::Io { .. } => crate::ErrorKind::Other,
            SidecarError::Process(e) => e.kind(),
            SidecarError::StartTimeout { .. } => crate::ErrorKind::Timeout,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SidecarError + '_ {
    move |source| SidecarError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A sidecar process, identified by pid and start time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarRecord {
    /// Pid.
    pub pid: u32,
    /// Start time in clock ticks since boot (see [`crate::process::start_time`]).
    pub start_time: u64,
}

impl SidecarRecord {
    /// Whether the recorded process is still running.
    pub fn is_alive(&self) -> bool {
        is_same_process_alive(self.pid, self.start_time)
    }

    /// Stop the process (SIGTERM, then SIGKILL after `grace`), if it is still the recorded one.
    pub async fn stop(&self, grace: Duration) -> Result<(), SidecarError> {
        let mut p = match VmmProcess::attach(self.pid, self.start_time) {
            Ok(p) => p,
            Err(ProcessError::Gone { .. } | ProcessError::Reused { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match p.signal(rustix::process::Signal::TERM) {
            Ok(()) | Err(ProcessError::Gone { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if tokio::time::timeout(grace, p.wait()).await.is_err() {
            p.kill()?;
            let _ = p.wait().await;
        }
        Ok(())
    }
}

/// The sidecar program and the arguments that precede the mode (see the module docs for the
/// search order).
pub fn program() -> (PathBuf, Vec<String>) {
    if let Some(p) = std::env::var_os("VMRS_NET_BIN").filter(|v| !v.is_empty()) {
        return (PathBuf::from(p), Vec::new());
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let cand = dir.join("vmrs-net");
            if cand.is_file() {
                return (cand, Vec::new());
            }
        }
        // Programs that carry the sidecar as their `net-sidecar` subcommand.
        if exe
            .file_name()
            .is_some_and(|n| n == "vmrs" || n == "containerd-shim-vmrs-v1")
        {
            return (exe, vec!["net-sidecar".to_string()]);
        }
    }
    (PathBuf::from("vmrs-net"), Vec::new())
}

/// Usage of the sidecar program.
pub const USAGE: &str = "usage: vmrs-net switch --network NAME --socket PATH [--stats PATH]\n       vmrs-net forward --listen ADDR:PORT --to ADDR:PORT\n       vmrs-net serial-log --log PATH --max BYTES  (listening socket on stdin)";

/// The sidecar's main: `switch --network NAME --socket PATH [--stats PATH]`,
/// `forward --listen ADDR:PORT --to ADDR:PORT` or `serial-log --log PATH --max BYTES`
/// ([`crate::console::capture`]); runs until SIGTERM/SIGINT, then shuts down
/// cleanly. Returns the exit code (2 for bad arguments). The caller owns the runtime.
pub async fn main(args: &[String]) -> i32 {
    fn opt(args: &[String], name: &str) -> Option<String> {
        args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone())
    }
    fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut cur = e.source();
        while let Some(s) = cur {
            out.push_str(": ");
            out.push_str(&s.to_string());
            cur = s.source();
        }
        out
    }
    async fn terminated() {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    let usage = || {
        eprintln!("{USAGE}");
        2
    };
    match args.first().map(String::as_str) {
        Some("switch") => {
            let (Some(network), Some(socket)) = (opt(args, "--network"), opt(args, "--socket")) else {
                return usage();
            };
            let opts = super::switch::server::ServeOptions {
                network,
                socket: PathBuf::from(socket),
                config: super::SwitchConfig::default(),
                stats: opt(args, "--stats").map(PathBuf::from),
            };
            match super::switch::server::serve(opts, terminated()).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("vmrs-net switch: {}", chain(&e));
                    1
                }
            }
        }
        Some("forward") => {
            let (Some(Ok(listen)), Some(Ok(to))) = (
                opt(args, "--listen").map(|s| s.parse::<SocketAddr>()),
                opt(args, "--to").map(|s| s.parse::<SocketAddr>()),
            ) else {
                return usage();
            };
            match super::PortForwarder::bind(listen, to).await {
                Ok(f) => {
                    terminated().await;
                    f.stop().await;
                    0
                }
                Err(e) => {
                    eprintln!("vmrs-net forward: {}", chain(&e));
                    1
                }
            }
        }
        // the capped serial console (crate::console::capture), not networking, but a
        // sidecar found and run the same way
        Some("serial-log") => match crate::console::capture::main(&args[1..], terminated()).await {
            Ok(2) => usage(),
            Ok(code) => code,
            Err(e) => {
                eprintln!("vmrs-net serial-log: {}", chain(&e));
                1
            }
        },
        _ => usage(),
    }
}

/// Directory of switch network `network`.
pub fn network_dir(networks_dir: &Path, network: &str) -> PathBuf {
    networks_dir.join(network)
}

/// The switch socket of `network`.
pub fn switch_socket(networks_dir: &Path, network: &str) -> PathBuf {
    network_dir(networks_dir, network).join("switch.sock")
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), SidecarError> {
    crate::fsutil::write_atomic(path, data).map_err(io_err(path))
}

fn read_record(path: &Path) -> Option<SidecarRecord> {
    let data = std::fs::read(path).ok()?;
    serde_json::from_slice(&data).ok()
}

/// An exclusive `flock` on `<dir>/lock`, released on drop.
struct DirLock(#[allow(dead_code)] std::fs::File);

async fn lock_dir(dir: &Path) -> Result<DirLock, SidecarError> {
    let path = dir.join("lock");
    tokio::task::spawn_blocking(move || {
        let f = crate::paths::private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(&path)(e.into()))?;
        Ok(DirLock(f))
    })
    .await
    .map_err(|e| SidecarError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e),
    })?
}

/// Spawn the sidecar with `args`, logging to `log`, owned by the directory `owner` (see
/// [`crate::process::OWNER_ENV`]).
fn spawn(
    args: &[String],
    log: &Path,
    owner: &Path,
    netns: Option<&Path>,
) -> Result<SidecarRecord, SidecarError> {
    let out = crate::paths::private_file()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(log))?;
    let err = out.try_clone().map_err(io_err(log))?;
    let (prog, prefix) = program();
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(prefix)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some(ns) = netns {
        super::netns::command_in(&mut cmd, ns).map_err(|e| SidecarError::Io {
            path: ns.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
    }
    let p = VmmProcess::spawn_owned(cmd, owner)?;
    Ok(SidecarRecord {
        pid: p.pid(),
        start_time: p.start_time(),
    })
}

/// Start the switch sidecar of `network` unless it runs; returns its record.
pub async fn ensure_switch(networks_dir: &Path, network: &str) -> Result<SidecarRecord, SidecarError> {
    let dir = network_dir(networks_dir, network);
    crate::paths::create_private_dir_all(&dir.join("members")).map_err(io_err(&dir))?;
    let _lock = lock_dir(&dir).await?;
    let record_path = dir.join("switch.json");
    let socket = switch_socket(networks_dir, network);
    if let Some(r) = read_record(&record_path) {
        if r.is_alive() && socket.exists() {
            return Ok(r);
        }
        // a dead or stale record: make sure nothing half-alive keeps the socket
        r.stop(Duration::from_secs(1)).await?;
    }
    // A sidecar whose starter died before recording it (it carries the network's directory
    // as its owner, see `crate::process::OWNER_ENV`): one switch per network.
    let strays = crate::process::kill_owned_by(&dir);
    if !strays.is_empty() {
        tracing::warn!(%network, pids = ?strays, "killed switch sidecars no record tracked");
    }
    let log = dir.join("switch.log");
    let args = vec![
        "switch".to_string(),
        "--network".to_string(),
        network.to_string(),
        "--socket".to_string(),
        socket.to_string_lossy().into_owned(),
        "--stats".to_string(),
        dir.join("stats.json").to_string_lossy().into_owned(),
    ];
    let _ = std::fs::remove_file(&socket);
    let record = spawn(&args, &log, &dir, None)?;
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while !socket.exists() {
        if tokio::time::Instant::now() > deadline || !record.is_alive() {
            record.stop(Duration::from_millis(100)).await?;
            return Err(SidecarError::StartTimeout {
                what: "switch",
                timeout: START_TIMEOUT,
                log,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let json = serde_json::to_vec(&record).map_err(|e| io_err(&record_path)(e.into()))?;
    write_atomic(&record_path, &json)?;
    Ok(record)
}

/// Record `vm_name` as a member of `network`.
pub fn join(networks_dir: &Path, network: &str, vm_name: &str) -> Result<(), SidecarError> {
    let dir = network_dir(networks_dir, network).join("members");
    crate::paths::create_private_dir_all(&dir).map_err(io_err(&dir))?;
    let f = dir.join(vm_name);
    crate::paths::private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&f)
        .map(drop)
        .map_err(io_err(&f))
}

/// Members of `network`.
pub fn members(networks_dir: &Path, network: &str) -> Vec<String> {
    let dir = network_dir(networks_dir, network).join("members");
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Remove `vm_name` from `network`; with the last member gone, stop the switch and remove
/// the network's directory.
pub async fn leave(networks_dir: &Path, network: &str, vm_name: &str) -> Result<(), SidecarError> {
    let dir = network_dir(networks_dir, network);
    if !dir.exists() {
        return Ok(());
    }
    let _lock = lock_dir(&dir).await?;
    let f = dir.join("members").join(vm_name);
    match std::fs::remove_file(&f) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&f)(e)),
    }
    if members(networks_dir, network).is_empty() {
        if let Some(r) = read_record(&dir.join("switch.json")) {
            r.stop(Duration::from_secs(2)).await?;
        }
        // and any sidecar of this network no record names
        crate::process::kill_owned_by(&dir);
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    Ok(())
}

/// Switch networks that have a directory under `networks_dir`.
pub fn networks(networks_dir: &Path) -> Vec<String> {
    std::fs::read_dir(networks_dir)
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.ok()?;
                e.file_type().ok()?.is_dir().then_some(())?;
                e.file_name().into_string().ok()
            })
            .collect()
        })
        .unwrap_or_default()
}

/// The switch sidecar record of `network`, if one was written.
pub fn switch_record(networks_dir: &Path, network: &str) -> Option<SidecarRecord> {
    read_record(&network_dir(networks_dir, network).join("switch.json"))
}

/// Start a `vmrs-net forward` sidecar relaying `listen` to `target`, inside network namespace
/// `netns` when given (where the guest is reachable); waits until it accepts. The forwarder is
/// owned by `vm_dir` (its VM's directory), so it can be found from there even if its record
/// was never written.
pub async fn spawn_forwarder(
    listen: SocketAddr,
    target: SocketAddr,
    log: &Path,
    vm_dir: &Path,
    netns: Option<&Path>,
) -> Result<SidecarRecord, SidecarError> {
    let args = vec![
        "forward".to_string(),
        "--listen".to_string(),
        listen.to_string(),
        "--to".to_string(),
        target.to_string(),
    ];
    let record = spawn(&args, log, vm_dir, netns)?;
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let probe = super::netns::run_in(netns, move || {
            std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok()
        })
        .await;
        if matches!(probe, Ok(true)) {
            return Ok(record);
        }
        if tokio::time::Instant::now() > deadline || !record.is_alive() {
            record.stop(Duration::from_millis(100)).await?;
            return Err(SidecarError::StartTimeout {
                what: "forward",
                timeout: START_TIMEOUT,
                log: log.to_path_buf(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
