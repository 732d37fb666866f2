//! VMM processes: launch in their own session, identify by pid + start time, signal through a
//! pidfd, and wait for exit without polling.
//!
//! A pid alone is not an identity: after a VMM dies its pid can be reused by an unrelated
//! process. Every record therefore carries the process start time (`/proc/<pid>/stat` field 22),
//! and [`VmmProcess::attach`] opens a pidfd and then checks the start time, so once attached the
//! pidfd pins the right process and signals can never reach a stranger. The host-specific
//! parts (the start time's source, pidfd vs kqueue on macOS) are in [`crate::host::proc`].

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Environment variable naming the directory that owns a process vm-rs spawned (a VM's
/// directory for its VMM and port forwarders, a switch network's for its sidecar). It is set
/// before `exec`, so the owner can be found from `/proc/<pid>/environ` even when the process
/// that spawned it died before writing any record (see [`owned_by`]).
pub const OWNER_ENV: &str = "VMRS_OWNER";

/// A process found through its [`OWNER_ENV`] marker: pid + start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnedProcess {
    /// Pid.
    pub pid: u32,
    /// Start time (clock ticks since boot).
    pub start_time: u64,
}

/// Every live process whose [`OWNER_ENV`] names `owner` (exactly), found by scanning `/proc`.
/// Processes that exit during the scan are skipped; zombies have no environment and never
/// match.
pub fn owned_by(owner: &Path) -> Vec<OwnedProcess> {
    let mut marker = format!("{OWNER_ENV}=").into_bytes();
    marker.extend_from_slice(owner.as_os_str().as_encoded_bytes());
    let mut out = Vec::new();
    for pid in crate::host::proc::pids() {
        let Some(env) = crate::host::proc::environ(pid) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|v| v == marker.as_slice()) {
            continue;
        }
        if let Ok(Some(start_time)) = start_time(pid) {
            if is_same_process_alive(pid, start_time) {
                out.push(OwnedProcess { pid, start_time });
            }
        }
    }
    out
}

/// How long [`kill_owned_by`] waits for the processes it killed to be gone.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// SIGKILL every process [`owned_by`] `owner` (and its process group) and wait (up to
/// 2 s) until they have exited; returns the pids killed. Each is signalled through a
/// pidfd checked against its start time.
pub fn kill_owned_by(owner: &Path) -> Vec<u32> {
    let killed: Vec<VmmProcess> = owned_by(owner)
        .into_iter()
        .filter_map(|p| {
            let proc = VmmProcess::attach(p.pid, p.start_time).ok()?;
            proc.kill().ok().map(|()| proc)
        })
        .collect();
    // SIGKILL is delivered asynchronously: the caller is about to delete what they used.
    let deadline = std::time::Instant::now() + KILL_WAIT;
    while killed.iter().any(VmmProcess::is_alive) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    killed.iter().map(VmmProcess::pid).collect()
}

/// Errors about VMM processes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// No process with that pid exists any more.
    #[error("process {pid} is gone")]
    Gone {
        /// Pid.
        pid: u32,
    },
    /// The pid now belongs to a different process.
    #[error("pid {pid} was reused by another process (start time {found}, expected {expected})")]
    Reused {
        /// Pid.
        pid: u32,
        /// Recorded start time.
        expected: u64,
        /// Start time found.
        found: u64,
    },
    /// Reading `/proc` or a pidfd syscall failed.
    #[error("cannot inspect process {pid}")]
    Inspect {
        /// Pid.
        pid: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Sending a signal failed.
    #[error("cannot signal process {pid}")]
    Signal {
        /// Pid.
        pid: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Spawning failed.
    #[error("cannot start {}", program.display())]
    Spawn {
        /// Program.
        program: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl ProcessError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            ProcessError::Gone { .. } | ProcessError::Reused { .. } => K::NotFound,
            ProcessError::Spawn { .. } => K::Backend,
            ProcessError::Inspect { .. } | ProcessError::Signal { .. } => K::Other,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    /// Exited with a status code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
    /// Not our child, so the status is not known.
    Unknown,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit status {c}"),
            ExitInfo::Signal(s) => write!(
                f,
                "killed by signal {s}{}",
                signal_name(*s).map(|n| format!(" ({n})")).unwrap_or_default()
            ),
            ExitInfo::Unknown => f.write_str("exit status unknown"),
        }
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => return None,
    })
}

/// Start time of `pid` in clock ticks since boot, or `None` if there is no such process.
pub fn start_time(pid: u32) -> Result<Option<u64>, ProcessError> {
    crate::host::proc::stat(pid)
        .map(|s| s.map(|s| s.start_time))
        .map_err(|source| ProcessError::Inspect { pid, source })
}

/// Whether `pid` is alive (not a zombie) and started at `start`.
pub fn is_same_process_alive(pid: u32, start: u64) -> bool {
    // a zombie has exited; treat it as dead
    matches!(crate::host::proc::stat(pid), Ok(Some(s)) if s.start_time == start && !s.zombie)
}

/// A running VMM, either our child or attached by pid + start time.
#[derive(Debug)]
pub struct VmmProcess {
    pid: u32,
    start_time: u64,
    pidfd: OwnedFd,
    child: Option<tokio::process::Child>,
}

impl VmmProcess {
    /// Spawn `cmd` in a new session (so it survives the caller's terminal and CLI, and its
    /// process group can be signalled as a whole), with umask 0177 so whatever it creates
    /// (sockets, logs) is 0600.
    pub fn spawn(mut cmd: tokio::process::Command) -> Result<Self, ProcessError> {
        Self::spawn_inner(&mut cmd)
    }

    /// [`spawn`](Self::spawn) with [`OWNER_ENV`] set to `owner`, so the process can be found
    /// from that directory whatever happens to the caller before it records the process.
    pub fn spawn_owned(mut cmd: tokio::process::Command, owner: &Path) -> Result<Self, ProcessError> {
        cmd.env(OWNER_ENV, owner);
        Self::spawn_inner(&mut cmd)
    }

    fn spawn_inner(cmd: &mut tokio::process::Command) -> Result<Self, ProcessError> {
        let program = PathBuf::from(cmd.as_std().get_program());
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2)
        // and umask(2), which are async-signal-safe; it touches no memory shared with the
        // parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Sockets and files the child creates are 0600 whatever the caller's umask
                // (see `crate::paths`); it creates no directories.
                libc::umask(0o177);
                Ok(())
            });
        }
        cmd.kill_on_drop(false);
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = child.id().ok_or_else(|| ProcessError::Spawn {
            program: program.clone(),
            source: std::io::Error::other("child exited before its pid could be read"),
        })?;
        let pidfd = pidfd_open(pid)?;
        let start_time = start_time(pid)?.ok_or(ProcessError::Gone { pid })?;
        Ok(Self {
            pid,
            start_time,
            pidfd,
            child: Some(child),
        })
    }

    /// Attach to a process recorded earlier. Fails with [`ProcessError::Gone`] or
    /// [`ProcessError::Reused`] when it is not the recorded process any more.
    pub fn attach(pid: u32, expected_start: u64) -> Result<Self, ProcessError> {
        let pidfd = pidfd_open(pid)?;
        // The pidfd now pins whatever process has this pid; check it is ours.
        match start_time(pid)? {
            None => Err(ProcessError::Gone { pid }),
            Some(t) if t != expected_start => Err(ProcessError::Reused {
                pid,
                expected: expected_start,
                found: t,
            }),
            Some(_) if !is_same_process_alive(pid, expected_start) => Err(ProcessError::Gone { pid }),
            Some(_) => Ok(Self {
                pid,
                start_time: expected_start,
                pidfd,
                child: None,
            }),
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Start time (clock ticks since boot).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Send `signal` to the process through its pidfd (never to a reused pid).
    pub fn signal(&self, signal: rustix::process::Signal) -> Result<(), ProcessError> {
        match crate::host::proc::send_signal(&self.pidfd, self.pid, signal) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::SRCH) => Err(ProcessError::Gone { pid: self.pid }),
            Err(e) => Err(ProcessError::Signal {
                pid: self.pid,
                source: e.into(),
            }),
        }
    }

    /// SIGKILL the process and the rest of its process group.
    pub fn kill(&self) -> Result<(), ProcessError> {
        let r = self.signal(rustix::process::Signal::KILL);
        // The VMM leads its own session/group (see `spawn`); reap helpers it started. The pidfd
        // check above guarantees the group id still belongs to our process tree.
        if let Some(pgid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        match r {
            Err(ProcessError::Gone { .. }) => Ok(()),
            other => other,
        }
    }

    /// Wait until the process exits. For our own child this reaps it and returns its status.
    pub async fn wait(&mut self) -> Result<ExitInfo, ProcessError> {
        if let Some(child) = self.child.as_mut() {
            use std::os::unix::process::ExitStatusExt;
            let status = child.wait().await.map_err(|source| ProcessError::Inspect {
                pid: self.pid,
                source,
            })?;
            return Ok(match (status.code(), status.signal()) {
                (Some(c), _) => ExitInfo::Code(c),
                (None, Some(s)) => ExitInfo::Signal(s),
                _ => ExitInfo::Unknown,
            });
        }
        // A pidfd becomes readable when the process exits.
        // SAFETY: the registered fd is `self.pidfd`, which stays open (owned by `self`, borrowed
        // for the whole lifetime of `fd`, a local dropped before this function returns).
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                self.pidfd.as_fd(),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| ProcessError::Inspect {
            pid: self.pid,
            source: e.into(),
        })?;
        let guard = fd.readable().await.map_err(|source| ProcessError::Inspect {
            pid: self.pid,
            source,
        })?;
        drop(guard);
        Ok(ExitInfo::Unknown)
    }

    /// Whether the process is still running.
    pub fn is_alive(&self) -> bool {
        // poll(2) with zero timeout: readable == exited.
        let mut fds = [rustix::event::PollFd::new(
            &self.pidfd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(
            &mut fds,
            Some(&rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            }),
        ) {
            Ok(0) => true,
            Ok(_) => false,
            Err(_) => is_same_process_alive(self.pid, self.start_time),
        }
    }

    /// Raw pidfd (for callers that integrate with their own event loop).
    pub fn pidfd_raw(&self) -> i32 {
        self.pidfd.as_raw_fd()
    }
}

fn pidfd_open(pid: u32) -> Result<OwnedFd, ProcessError> {
    match crate::host::proc::open_handle(pid) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::SRCH) => Err(ProcessError::Gone { pid }),
        Err(e) => Err(ProcessError::Inspect {
            pid,
            source: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_stable() {
        let me = std::process::id();
        let a = start_time(me).expect("stat").expect("exists");
        let b = start_time(me).expect("stat").expect("exists");
        assert_eq!(a, b);
        assert!(is_same_process_alive(me, a));
        assert!(!is_same_process_alive(me, a + 1));
    }

    #[tokio::test]
    async fn owned_processes_are_found_from_their_owner_and_killed() {
        let owner = tempfile::tempdir().expect("tmp");
        let other = owner.path().join("other");
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30");
        let mut p = VmmProcess::spawn_owned(cmd, owner.path()).expect("spawn");
        let found = owned_by(owner.path());
        assert_eq!(
            found,
            vec![OwnedProcess {
                pid: p.pid(),
                start_time: p.start_time()
            }]
        );
        // the marker names the owner exactly: a path below it is another owner
        assert!(owned_by(&other).is_empty());
        assert_eq!(kill_owned_by(owner.path()), vec![p.pid()]);
        assert_eq!(p.wait().await.expect("wait"), ExitInfo::Signal(libc::SIGKILL));
        assert!(owned_by(owner.path()).is_empty());
    }

    #[tokio::test]
    async fn spawn_attach_kill_wait() {
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30");
        let mut p = VmmProcess::spawn(cmd).expect("spawn");
        assert!(p.is_alive());
        let other = VmmProcess::attach(p.pid(), p.start_time()).expect("attach");
        assert!(matches!(
            VmmProcess::attach(p.pid(), p.start_time() + 1),
            Err(ProcessError::Reused { .. })
        ));
        other.kill().expect("kill");
        let exit = p.wait().await.expect("wait");
        assert_eq!(exit, ExitInfo::Signal(libc::SIGKILL));
        assert!(!other.is_alive());
        assert!(matches!(
            VmmProcess::attach(p.pid(), p.start_time()),
            Err(ProcessError::Gone { .. })
        ));
    }
}
