//! Shared directories over virtio-fs: the virtiofsd sidecars.
//!
//! Each [`SharedFs`] of a VM is served by its own `virtiofsd` process (the maintained Rust
//! daemon, crates.io `virtiofsd`; see [`find`] for where it is looked for). The VMM is its
//! vhost-user frontend: it maps guest RAM into the daemon (so guest memory must be a shared
//! backend, [`crate::devices::MemoryBackend::Memfd`] `{ shared: true }`) and forwards the
//! guest's FUSE requests over the socket.
//!
//! ## Lifetime
//!
//! [`start`] binds each share's listening socket (`fs<N>.sock` in the VM directory) *before*
//! the daemon starts and hands it over as its standard input (`--fd=0`), so the VMM's connect
//! cannot race the daemon's start (the same scheme as the serial log's sidecar). The daemons
//! carry the VM directory as their owner ([`crate::process::OWNER_ENV`]), so whatever happens to
//! the process that started them, removing or reconciling the VM finds and kills them; their
//! pid + start time are recorded in `virtiofsd.json` ([`SharesRecord`]). A daemon ends on its
//! own when its VMM disconnects (the VMM exited, however it did); [`stop`] kills what is left
//! when a VM ends, and a start that fails kills the daemons it started.
//!
//! In its default `namespace` sandbox the Rust virtiofsd forks: the recorded process waits for
//! a worker child in new mount/pid/network namespaces that pivots into the shared directory.
//! The worker dies with its parent (parent-death signal) and the parent exits when the worker
//! dies, so the recorded process is alive exactly while the share is served ([`status`]).
//!
//! ## Safety
//!
//! The daemon only ever resolves names inside the shared directory (it pivots into it and
//! opens every path component with `O_NOFOLLOW` relative to its parent), so a symlink in the
//! share is a symlink to the guest — resolved by the guest kernel against the guest's own tree,
//! never against the host's — and device nodes are opened by the guest kernel as the guest's
//! devices. A read-only share is enforced by the daemon (`--readonly`: writes fail with
//! `EROFS` whatever the guest's mount options say). Debian's old C virtiofsd (from QEMU) has no
//! read-only mode: it serves read-write shares only, and a read-only share on it is refused.

use crate::devices::SharedFs;
use crate::process::{ProcessError, VmmProcess};
use crate::vm_dir::VmDir;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Environment variable naming the virtiofsd binary to use.
pub const ENV: &str = "VMRS_VIRTIOFSD";
/// The program looked up on `PATH`.
pub const BINARY: &str = "virtiofsd";
/// Debian's `qemu-system-common` ships the old C daemon here: used when nothing else is found.
pub const QEMU_FALLBACK: &str = "/usr/lib/qemu/virtiofsd";
/// Version of [`SharesRecord`].
pub const RECORD_VERSION: u32 = 1;

/// Errors starting or finding the virtio-fs daemons.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VirtiofsError {
    /// No virtiofsd is installed.
    #[error("virtiofsd not found (looked in {searched}); install it with `cargo install --locked virtiofsd` (scripts/setup.sh does)")]
    NotFound {
        /// Where it was looked for.
        searched: String,
    },
    /// The daemon found cannot enforce a read-only share.
    #[error("{} cannot serve read-only shares (the C virtiofsd has no read-only mode); install the Rust virtiofsd", path.display())]
    ReadOnlyUnsupported {
        /// The daemon.
        path: PathBuf,
    },
    /// A socket or log in the VM directory could not be created.
    #[error("cannot access {}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The daemon could not be started.
    #[error("cannot start virtiofsd for share {tag:?}")]
    Spawn {
        /// The share's tag.
        tag: String,
        /// Cause.
        #[source]
        source: ProcessError,
    },
    /// The daemon exited right after starting.
    #[error("virtiofsd for share {tag:?} ({}) exited at start: {detail}", host_path.display())]
    Exited {
        /// The share's tag.
        tag: String,
        /// The shared directory.
        host_path: PathBuf,
        /// Its last words (from `virtiofsd.log`) or exit status.
        detail: String,
    },
}

impl VirtiofsError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            VirtiofsError::NotFound { .. } | VirtiofsError::ReadOnlyUnsupported { .. } => K::Unsupported,
            VirtiofsError::Io { .. } => K::Other,
            VirtiofsError::Spawn { source, .. } => source.kind(),
            VirtiofsError::Exited { .. } => K::Backend,
        }
    }
}

/// Which virtiofsd a binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// The Rust daemon (`virtiofsd 1.x`): `--shared-dir`, `--readonly`, `--fd`.
    Rust,
    /// QEMU's old C daemon (`virtiofsd version 7.x`): `-o source=`, `--fd=`, no read-only mode.
    Qemu,
}

/// A virtiofsd binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    /// The program.
    pub path: PathBuf,
    /// Which daemon it is.
    pub flavour: Flavour,
}

/// Which daemon `--version` output describes: QEMU's says `virtiofsd version 7.2.x (...)`,
/// the Rust one `virtiofsd 1.14.0`.
pub fn flavour_of(version_output: &str) -> Flavour {
    if version_output.contains("QEMU") || version_output.contains("virtiofsd version") {
        Flavour::Qemu
    } else {
        Flavour::Rust
    }
}

/// Find virtiofsd: `$VMRS_VIRTIOFSD`, `virtiofsd` on `PATH`, cargo's bin directory
/// (`$CARGO_HOME/bin`, `~/.cargo/bin`: where `cargo install` puts it), then Debian's
/// [`QEMU_FALLBACK`].
pub fn find() -> Result<Daemon, VirtiofsError> {
    let path = std::env::var_os(ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| crate::host::find_on_path(BINARY))
        .or_else(|| {
            let cargo_home = std::env::var_os("CARGO_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
            Some(cargo_home.join("bin").join(BINARY)).filter(|p| crate::host::is_executable(p))
        })
        .or_else(|| Some(PathBuf::from(QEMU_FALLBACK)).filter(|p| crate::host::is_executable(p)))
        .ok_or_else(|| VirtiofsError::NotFound {
            searched: format!("{ENV}, PATH, cargo's bin directory and {QEMU_FALLBACK}"),
        })?;
    let out = std::process::Command::new(&path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| VirtiofsError::Io {
            path: path.clone(),
            source,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Daemon {
        flavour: flavour_of(&text),
        path,
    })
}

/// The daemon's arguments for `share`, whose listening socket is its standard input (fd 0).
pub fn daemon_args(daemon: &Daemon, share: &SharedFs) -> Result<Vec<OsString>, VirtiofsError> {
    let mut a: Vec<OsString> = Vec::new();
    match daemon.flavour {
        Flavour::Rust => {
            let mut dir = OsString::from("--shared-dir=");
            dir.push(&share.host_path);
            a.push(dir);
            a.push("--fd=0".into());
            a.push("--sandbox=namespace".into());
            a.push("--cache=auto".into());
            a.push("--log-level=warn".into());
            if share.read_only {
                a.push("--readonly".into());
            }
        }
        Flavour::Qemu => {
            if share.read_only {
                return Err(VirtiofsError::ReadOnlyUnsupported {
                    path: daemon.path.clone(),
                });
            }
            // `-o` values are comma-separated: a comma in the path would start another option
            let mut src = OsString::from("source=");
            src.push(escape_commas(&share.host_path));
            a.extend([
                "--fd=0".into(),
                "-o".into(),
                src,
                "-o".into(),
                "cache=auto".into(),
            ]);
        }
    }
    Ok(a)
}

/// Unix socket paths are limited to 108 bytes (including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Double every comma (the C daemon's `-o` syntax).
fn escape_commas(p: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in p.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// One daemon, as `virtiofsd.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonRecord {
    /// The share's tag.
    pub tag: String,
    /// The shared directory.
    pub host_path: PathBuf,
    /// The daemon's pid.
    pub pid: u32,
    /// Its start time (clock ticks since boot): with `pid`, its identity.
    pub start_time: u64,
}

impl DaemonRecord {
    /// Whether the recorded process still runs (a reused pid is not it).
    pub fn is_alive(&self) -> bool {
        crate::process::is_same_process_alive(self.pid, self.start_time)
    }
}

/// `virtiofsd.json`: the daemons of a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharesRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// One per share, in the VM's order.
    pub daemons: Vec<DaemonRecord>,
}

/// The daemons recorded for the VM in `vm_dir` (none when there is no readable record).
pub fn load(vm_dir: &Path) -> SharesRecord {
    std::fs::read(VmDir::new(vm_dir).file(VmDir::VIRTIOFSD_RECORD))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Each recorded daemon of the VM in `vm_dir` and whether it still runs.
pub fn status(vm_dir: &Path) -> Vec<(DaemonRecord, bool)> {
    load(vm_dir)
        .daemons
        .into_iter()
        .map(|d| {
            let alive = d.is_alive();
            (d, alive)
        })
        .collect()
}

/// A shared directory as `inspect`/`ps` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountInfo {
    /// Directory on the host.
    pub host_path: PathBuf,
    /// Where the guest has it (`None`: offered by tag, not mounted by the init).
    pub guest_path: Option<PathBuf>,
    /// Read-only.
    pub read_only: bool,
    /// virtio-fs tag.
    pub tag: String,
    /// The daemon serving it, while the VM is live.
    pub daemon_pid: Option<u32>,
    /// While the VM is live: whether its daemon still runs. A share whose daemon died gives the
    /// guest I/O errors (`false` on a live VM is the report of that).
    pub serving: bool,
}

impl MountInfo {
    /// docker's `HOST:GUEST[:ro]`.
    pub fn spec(&self) -> String {
        let guest = match &self.guest_path {
            Some(g) => g.display().to_string(),
            None => format!("tag={}", self.tag),
        };
        let ro = if self.read_only { ":ro" } else { "" };
        format!("{}:{guest}{ro}", self.host_path.display())
    }
}

/// The mounts of the VM in `vm_dir` with configuration `shares`; `live` tells whether its VMM
/// runs (daemons of a VM that is not live are not looked up).
pub fn mounts(vm_dir: &Path, shares: &[crate::config::SharedDir], live: bool) -> Vec<MountInfo> {
    let daemons = if live { load(vm_dir).daemons } else { Vec::new() };
    shares
        .iter()
        .map(|s| {
            let d = daemons.iter().find(|d| d.tag == s.tag);
            MountInfo {
                host_path: s.host_path.clone(),
                guest_path: s.guest_path.clone(),
                read_only: s.read_only,
                tag: s.tag.clone(),
                daemon_pid: d.map(|d| d.pid),
                serving: d.is_some_and(DaemonRecord::is_alive),
            }
        })
        .collect()
}

/// The guest init's parameter for each share it mounts: `vmrs.mount=TAG:PATH[:ro]`, with
/// every byte of `TAG` and `PATH` outside `[A-Za-z0-9/._+=@-]` percent-encoded (`%3A` for a
/// colon, `%20` for a space), so no value can end the word or add a parameter.
pub fn guest_params(shares: &[crate::config::SharedDir]) -> Vec<String> {
    shares
        .iter()
        .filter_map(|s| {
            // normalised: `/data/` and `/a/./b` are `/data` and `/a/b`
            let guest: PathBuf = s.guest_path.as_ref()?.components().collect();
            let ro = if s.read_only { ":ro" } else { "" };
            Some(format!(
                "vmrs.mount={}:{}{ro}",
                percent_encode(s.tag.as_bytes()),
                percent_encode(guest.as_os_str().as_encoded_bytes())
            ))
        })
        .collect()
}

fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"/._+=@-".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The reason a VM is failed with when the daemon `d` of one of its shares died while it ran
/// (`how`: its exit status, when known).
pub fn lost_reason(d: &DaemonRecord, how: Option<&str>) -> String {
    format!(
        "the virtiofsd of shared directory {} (tag {}, pid {}) exited{} while the vm ran; \
         the vm was killed, its guest would hang on the share",
        d.host_path.display(),
        d.tag,
        d.pid,
        how.map(|h| format!(" ({h})")).unwrap_or_default()
    )
}

/// The first recorded daemon of the VM in `vm_dir` that no longer runs, if any.
pub fn first_dead(vm_dir: &Path) -> Option<DaemonRecord> {
    load(vm_dir).daemons.into_iter().find(|d| !d.is_alive())
}

/// Kills daemons a failed start left, unless disarmed.
struct Started<'a> {
    vm_dir: &'a Path,
    armed: bool,
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        if self.armed {
            stop(self.vm_dir);
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VirtiofsError + '_ {
    move |source| VirtiofsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How long a daemon that exits at once (a bad directory, a missing capability) is given to
/// do so before the start goes on.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// Start one daemon per share for the VM in `vm_dir` and record them in `virtiofsd.json`. On
/// error, every daemon started here is killed again and the sockets removed.
pub async fn start(vm_dir: &Path, shares: &[SharedFs]) -> Result<SharesRecord, VirtiofsError> {
    let mut record = SharesRecord {
        version: RECORD_VERSION,
        daemons: Vec::new(),
    };
    if shares.is_empty() {
        return Ok(record);
    }
    let daemon = find()?;
    let dir = VmDir::new(vm_dir);
    let record_path = dir.file(VmDir::VIRTIOFSD_RECORD);
    let log_path = dir.file(VmDir::VIRTIOFSD_LOG);
    // refused before anything runs
    let argvs = shares
        .iter()
        .map(|s| daemon_args(&daemon, s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut guard = Started { vm_dir, armed: true };
    let log = crate::paths::private_file()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err(&log_path))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut spawned = Vec::new();
    for (share, argv) in shares.iter().zip(argvs) {
        let sock = &share.socket;
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(io_err(sock)(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "socket path too long for a Unix socket; use a shorter VMRS_HOME",
            )));
        }
        let _ = std::fs::remove_file(sock);
        let listener = std::os::unix::net::UnixListener::bind(sock).map_err(io_err(sock))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600)).map_err(io_err(sock))?;
        }
        let out = log.try_clone().map_err(io_err(&log_path))?;
        let err = log.try_clone().map_err(io_err(&log_path))?;
        let mut cmd = tokio::process::Command::new(&daemon.path);
        cmd.args(&argv)
            .current_dir(vm_dir)
            .stdin(std::os::fd::OwnedFd::from(listener))
            .stdout(out)
            .stderr(err);
        let process = VmmProcess::spawn_owned(cmd, vm_dir).map_err(|source| VirtiofsError::Spawn {
            tag: share.tag.clone(),
            source,
        })?;
        record.daemons.push(DaemonRecord {
            tag: share.tag.clone(),
            host_path: share.host_path.clone(),
            pid: process.pid(),
            start_time: process.start_time(),
        });
        // recorded before the next one starts: a failure from here on kills what it names
        let json = serde_json::to_vec_pretty(&record).map_err(|e| io_err(&record_path)(e.into()))?;
        crate::fsutil::write_atomic(&record_path, &json).map_err(io_err(&record_path))?;
        spawned.push((share, process));
    }
    // A daemon refusing its arguments or directory exits at once: say so now rather than
    // letting the VMM fail on a dead socket.
    tokio::time::sleep(EXIT_GRACE).await;
    for (share, process) in &mut spawned {
        if !process.is_alive() {
            let status = process.wait().await.map(|e| e.to_string()).unwrap_or_default();
            let words = read_from(&log_path, log_start);
            let detail = if words.trim().is_empty() {
                status
            } else {
                format!("{status}: {}", words.trim())
            };
            return Err(VirtiofsError::Exited {
                tag: share.tag.clone(),
                host_path: share.host_path.clone(),
                detail,
            });
        }
    }
    guard.armed = false;
    drop(guard);
    // The daemons are not waited for by this process: they run in their own sessions and end
    // with their VMM. Dropping the child handles does not kill them.
    Ok(record)
}

/// The log's text from byte `offset` on (at most 4 KiB of its end).
fn read_from(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    let tail = &bytes[from..];
    let tail = &tail[tail.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail).into_owned()
}

/// Kill the recorded daemons of the VM in `vm_dir` that still run and remove their sockets
/// and record. Missing records are fine; returns the pids killed.
pub fn stop(vm_dir: &Path) -> Vec<u32> {
    let dir = VmDir::new(vm_dir);
    let record = load(vm_dir);
    let mut killed = Vec::new();
    let mut gone: Vec<(u32, u64)> = Vec::new();
    for d in &record.daemons {
        if let Ok(p) = VmmProcess::attach(d.pid, d.start_time) {
            // its sandboxed worker (a child in the daemon's process group) goes with it
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", d.pid)).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                if let Ok(Some(t)) = crate::process::start_time(c) {
                    gone.push((c, t));
                }
            }
            if p.kill().is_ok() {
                killed.push(d.pid);
                gone.push((d.pid, d.start_time));
            }
        }
    }
    // SIGKILL is delivered asynchronously: the caller may be about to report "nothing left"
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while gone
        .iter()
        .any(|(pid, t)| crate::process::is_same_process_alive(*pid, *t))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for i in 0..record.daemons.len().max(crate::config::MAX_SHARES) {
        let _ = std::fs::remove_file(dir.fs_socket(i));
    }
    let _ = std::fs::remove_file(dir.file(VmDir::VIRTIOFSD_RECORD));
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(ro: bool) -> SharedFs {
        SharedFs {
            tag: "vmrs0".into(),
            host_path: "/srv/a,b".into(),
            read_only: ro,
            socket: "/v/fs0.sock".into(),
        }
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().expect("utf8")).collect()
    }

    #[test]
    fn flavours_from_version_output() {
        assert_eq!(flavour_of("virtiofsd 1.14.0\n"), Flavour::Rust);
        assert_eq!(
            flavour_of("virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7)\nCopyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"),
            Flavour::Qemu
        );
    }

    #[test]
    fn rust_daemon_enforces_read_only_and_takes_its_socket_on_stdin() {
        let d = Daemon {
            path: "/bin/virtiofsd".into(),
            flavour: Flavour::Rust,
        };
        let a = strings(daemon_args(&d, &share(true)).expect("args"));
        assert!(a.contains(&"--shared-dir=/srv/a,b".to_string()), "{a:?}");
        assert!(a.contains(&"--readonly".to_string()));
        assert!(a.contains(&"--fd=0".to_string()));
        assert!(a.contains(&"--sandbox=namespace".to_string()));
        let a = strings(daemon_args(&d, &share(false)).expect("args"));
        assert!(!a.contains(&"--readonly".to_string()));
    }

    #[test]
    fn c_daemon_refuses_read_only_and_escapes_commas() {
        let d = Daemon {
            path: QEMU_FALLBACK.into(),
            flavour: Flavour::Qemu,
        };
        assert!(matches!(
            daemon_args(&d, &share(true)),
            Err(VirtiofsError::ReadOnlyUnsupported { .. })
        ));
        let a = strings(daemon_args(&d, &share(false)).expect("args"));
        assert!(a.contains(&"source=/srv/a,,b".to_string()), "{a:?}");
    }

    #[test]
    fn guest_params_encode_everything_that_could_break_the_command_line() {
        let mut odd = crate::config::SharedDir::new("/h", "/mnt/my dir:x%y", "t:1");
        odd.read_only = true;
        let plain = crate::config::SharedDir::new("/h", "/data/./", "vmrs1");
        let by_tag = crate::config::SharedDir {
            guest_path: None,
            ..crate::config::SharedDir::new("/h", "/x", "vmrs2")
        };
        assert_eq!(
            guest_params(&[odd, plain, by_tag]),
            vec![
                "vmrs.mount=t%3A1:/mnt/my%20dir%3Ax%25y:ro".to_string(),
                "vmrs.mount=vmrs1:/data".to_string(),
            ]
        );
    }

    #[test]
    fn missing_record_is_empty_and_stop_is_a_no_op() {
        let tmp = tempfile::tempdir().expect("tmp");
        assert!(status(tmp.path()).is_empty());
        std::fs::write(tmp.path().join(VmDir::VIRTIOFSD_RECORD), b"garbage").expect("w");
        assert!(load(tmp.path()).daemons.is_empty());
        assert!(stop(tmp.path()).is_empty());
        assert!(!tmp.path().join(VmDir::VIRTIOFSD_RECORD).exists());
    }
}
