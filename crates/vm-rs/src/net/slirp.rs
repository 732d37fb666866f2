//! User-mode networking through `slirp4netns`, for backends without their own (Cloud
//! Hypervisor, Firecracker) and for any VM that asks for it (`--net user,via=slirp4netns`).
//!
//! The guest sees exactly what QEMU's user-mode network gives it (both are libslirp):
//! `10.0.2.0/24` by default, the host's loopback at `.2`, the host's resolver at `.3`, published
//! ports forwarded to the guest address. On the host:
//!
//! * the VM gets a **network namespace of its own**, a bind mount of the namespace at
//!   `<vm dir>/netns` (made by [`create_netns`], removed by [`remove_netns`]); the VMM runs in
//!   it;
//! * inside it a bridge [`BRIDGE`] joins the VM's TAP (which the VMM opens, as for any TAP NIC)
//!   and the TAP [`SLIRP_TAP`] that `slirp4netns` serves — no address, route or firewall rule
//!   is configured anywhere, and nothing outside the namespace changes;
//! * `slirp4netns` runs as a sidecar in the host's namespace (its sockets are the host's; it
//!   publishes the ports on the host through its API socket, [`API_SOCKET`]), sandboxed by its
//!   own `--enable-sandbox --enable-seccomp` inside a private mount namespace vm-rs gives it (its
//!   sandbox unmounts what it does not need, which without that private namespace would reach
//!   the host's mounts through shared propagation — seen here: it took `ip netns` mounts away).
//!
//! Everything is recorded in `net.json` before it is made and removed with the VM (or by the
//! reconciliation after a crash); the sidecar is owned by the VM directory, so even a record
//! that was never written cannot hide it from `rm`.

use super::sidecar::SidecarRecord;
use crate::config::{Ipv4Cidr, PortForward, Protocol};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The VM's network namespace, in its directory.
pub const NETNS: &str = "netns";
/// `slirp4netns`'s API socket, in the VM directory.
pub const API_SOCKET: &str = "slirp4netns.sock";
/// `slirp4netns`'s log, in the VM directory.
pub const LOG: &str = "slirp4netns.log";
/// The bridge inside the VM's namespace.
pub const BRIDGE: &str = "vmrs-br0";
/// The TAP `slirp4netns` serves inside the VM's namespace.
pub const SLIRP_TAP: &str = "vmrs-slirp0";
/// Environment variable naming the `slirp4netns` program (else `PATH`).
pub const ENV: &str = "VMRS_SLIRP4NETNS";
/// How long `slirp4netns` may take to say it is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest API answer read.
const MAX_REPLY: u64 = 64 << 10;

/// What a user-mode NIC served by `slirp4netns` needs (part of its
/// [`NicBackend::Tap`](super::NicBackend::Tap)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlirpNic {
    /// The user-mode network (`--cidr`).
    pub net: Ipv4Cidr,
    /// Where published ports go.
    pub guest: Ipv4Addr,
    /// Published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_forwards: Vec<PortForward>,
}

/// Errors of the `slirp4netns` path (wrapped in [`super::HostError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlirpError {
    /// The program is not installed.
    #[error("user-mode networking here runs through slirp4netns, which was not found (searched {ENV} and PATH; Debian: apt install slirp4netns)")]
    NotFound,
    /// It did not come up.
    #[error("slirp4netns did not start: {reason}; see {}", log.display())]
    Start {
        /// Why.
        reason: String,
        /// Its log.
        log: PathBuf,
    },
    /// Its API refused a request or could not be reached.
    #[error("slirp4netns could not {what}: {reason}")]
    Api {
        /// What was asked.
        what: String,
        /// Its answer.
        reason: String,
    },
    /// The namespace could not be made or removed.
    #[error("cannot {op} {}", path.display())]
    Netns {
        /// What was being done.
        op: &'static str,
        /// The namespace file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl SlirpError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            SlirpError::NotFound => crate::ErrorKind::NotFound,
            SlirpError::Netns { source, .. } => crate::ErrorKind::of_io(source),
            SlirpError::Api { reason, .. } if reason.contains("Address already in use") => {
                crate::ErrorKind::Conflict
            }
            _ => crate::ErrorKind::Other,
        }
    }
}

/// The `slirp4netns` program: `$VMRS_SLIRP4NETNS`, else `slirp4netns` on `PATH`.
pub fn program() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os(ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        return crate::host::is_executable(&p).then_some(p);
    }
    crate::host::find_on_path("slirp4netns")
}

/// The VM's namespace file in `vm_dir`.
pub fn netns_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(NETNS)
}

/// Make a new network namespace and bind-mount it at `path` (a leftover at `path` from a
/// crash is removed first). The namespace lives until [`remove_netns`] and the last process in
/// it are gone.
#[cfg(target_os = "linux")]
pub async fn create_netns(path: &Path) -> Result<(), SlirpError> {
    let err = |op, source| SlirpError::Netns {
        op,
        path: path.to_path_buf(),
        source,
    };
    remove_netns(path)?;
    crate::paths::private_file()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| err("create", e))?;
    let target = path.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own: unshare(2) moves only the calling thread, which then exits.
    std::thread::Builder::new()
        .name("vmrs-netns-new".into())
        .spawn(move || {
            let r = (|| {
                // SAFETY: unshare(2) with CLONE_NEWNET changes only this thread's network
                // namespace; no memory is involved.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                rustix::mount::mount_bind("/proc/thread-self/ns/net", &target).map_err(std::io::Error::from)
            })();
            let _ = tx.send(r);
        })
        .map_err(|e| err("create", e))?;
    let r = rx
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread died")));
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(err("create a network namespace at", e));
    }
    Ok(())
}

/// Non-Linux hosts have no network namespaces.
#[cfg(not(target_os = "linux"))]
pub async fn create_netns(path: &Path) -> Result<(), SlirpError> {
    Err(SlirpError::Netns {
        op: "create",
        path: path.to_path_buf(),
        source: std::io::ErrorKind::Unsupported.into(),
    })
}

/// Unmount and delete the namespace file at `path`; a missing or unmounted one is fine.
pub fn remove_netns(path: &Path) -> Result<(), SlirpError> {
    #[cfg(target_os = "linux")]
    match rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {}
        Err(e) => {
            return Err(SlirpError::Netns {
                op: "unmount",
                path: path.to_path_buf(),
                source: e.into(),
            })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SlirpError::Netns {
            op: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The arguments `slirp4netns` gets for the namespace `netns` and network `net` (its ready
/// notice goes to fd 3).
pub fn args(netns: &Path, api: &Path, net: Ipv4Cidr) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = [
        "--netns-type=path",
        "--enable-sandbox",
        "--enable-seccomp",
        "--ready-fd=3",
    ]
    .iter()
    .map(Into::into)
    .collect();
    v.push(format!("--cidr={}", net.network_cidr()).into());
    let mut a = std::ffi::OsString::from("--api-socket=");
    a.push(api);
    v.push(a);
    v.push(netns.into());
    v.push(SLIRP_TAP.into());
    v
}

/// Start `slirp4netns` for the namespace `netns` of the VM in `vm_dir`, serving [`SLIRP_TAP`]
/// there; returns once it says it is ready (the TAP exists), or stops it and says why.
#[cfg(target_os = "linux")]
pub async fn start(vm_dir: &Path, netns: &Path, net: Ipv4Cidr) -> Result<SidecarRecord, SlirpError> {
    let prog = program().ok_or(SlirpError::NotFound)?;
    let log = vm_dir.join(LOG);
    let api = vm_dir.join(API_SOCKET);
    let _ = std::fs::remove_file(&api);
    let start_err = |reason: String| SlirpError::Start {
        reason,
        log: log.clone(),
    };
    let out = crate::paths::private_file()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| start_err(format!("cannot open its log: {e}")))?;
    let err = out
        .try_clone()
        .map_err(|e| start_err(format!("cannot open its log: {e}")))?;
    let (ready_r, ready_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| start_err(format!("pipe: {e}")))?;
    let mut cmd = tokio::process::Command::new(&prog);
    cmd.args(args(netns, &api, net))
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    let w = std::os::fd::AsRawFd::as_raw_fd(&ready_w);
    // SAFETY: runs in the forked child before exec and only makes async-signal-safe system
    // calls (unshare, mount, dup2, fcntl) on values computed before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // a private mount namespace, so its sandbox's unmounts stay its own
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let root = c"/";
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if w == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(w, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let p = crate::process::VmmProcess::spawn_owned(cmd, vm_dir)
        .map_err(|e| start_err(format!("cannot run {}: {e}", prog.display())))?;
    drop(ready_w);
    let record = SidecarRecord {
        pid: p.pid(),
        start_time: p.start_time(),
    };
    let ready = tokio::time::timeout(READY_TIMEOUT, wait_ready(ready_r)).await;
    let reason = match ready {
        Ok(Ok(true)) => return Ok(record),
        Ok(Ok(false)) => "it exited before it was ready".to_string(),
        Ok(Err(e)) => format!("reading its ready notice: {e}"),
        Err(_) => format!("not ready after {READY_TIMEOUT:?}"),
    };
    let _ = record.stop(Duration::from_millis(200)).await;
    let tail = log_tail(&log);
    Err(start_err(if tail.is_empty() {
        reason
    } else {
        format!("{reason}: {tail}")
    }))
}

/// Non-Linux hosts have no `slirp4netns`.
#[cfg(not(target_os = "linux"))]
pub async fn start(vm_dir: &Path, netns: &Path, net: Ipv4Cidr) -> Result<SidecarRecord, SlirpError> {
    let _ = (vm_dir, netns, net);
    Err(SlirpError::NotFound)
}

/// The last lines of `log` (at most 1 KiB), on one line.
#[cfg(target_os = "linux")]
fn log_tail(log: &Path) -> String {
    let data = std::fs::read(log).unwrap_or_default();
    let tail = &data[data.len().saturating_sub(1024)..];
    String::from_utf8_lossy(tail)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ")
}

/// `true` once a byte arrives on the ready pipe, `false` at end of file (the process died).
#[cfg(target_os = "linux")]
async fn wait_ready(fd: std::os::fd::OwnedFd) -> std::io::Result<bool> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::from(fd);
        let mut b = [0u8; 1];
        loop {
            match f.read(&mut b) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The API request publishing `pf` on the host, forwarded to `guest`.
pub fn hostfwd_request(pf: &PortForward, guest: Ipv4Addr) -> serde_json::Value {
    serde_json::json!({
        "execute": "add_hostfwd",
        "arguments": {
            "proto": match pf.protocol { Protocol::Tcp => "tcp", Protocol::Udp => "udp" },
            "host_addr": pf.bind_ip().to_string(),
            "host_port": pf.host_port,
            "guest_addr": guest.to_string(),
            "guest_port": pf.guest_port,
        }
    })
}

/// Read `slirp4netns`'s answer: `{"return": ...}` is success, `{"error": {"desc": ...}}` its
/// refusal; anything else is a refusal too.
pub fn parse_reply(reply: &[u8]) -> Result<serde_json::Value, String> {
    let v: serde_json::Value =
        serde_json::from_slice(reply).map_err(|e| format!("unreadable answer ({e})"))?;
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    match v
        .get("error")
        .and_then(|e| e.get("desc"))
        .and_then(|d| d.as_str())
    {
        Some(desc) => Err(desc.to_string()),
        None => Err(format!("unexpected answer {}", String::from_utf8_lossy(reply))),
    }
}

/// Publish `pf` (to `guest`) through the API socket of the VM in `vm_dir`.
pub async fn add_hostfwd(vm_dir: &Path, pf: &PortForward, guest: Ipv4Addr) -> Result<(), SlirpError> {
    let what = format!("publish {pf}");
    let api_err = |reason: String| SlirpError::Api {
        what: what.clone(),
        reason,
    };
    let req = hostfwd_request(pf, guest).to_string();
    let sock = vm_dir.join(API_SOCKET);
    let talk = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(&sock).await?;
        s.write_all(req.as_bytes()).await?;
        s.shutdown().await?;
        let mut reply = Vec::new();
        s.take(MAX_REPLY).read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(5), talk)
        .await
        .map_err(|_| api_err("no answer in 5 s".into()))?
        .map_err(|e| api_err(format!("{}: {e}", sock.display())))?;
    parse_reply(&reply).map(drop).map_err(api_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_sandbox_and_name_the_network() {
        let a = args(
            Path::new("/v/netns"),
            Path::new("/v/slirp4netns.sock"),
            "10.0.5.15/24".parse().unwrap(),
        );
        let a: Vec<String> = a.into_iter().map(|s| s.into_string().unwrap()).collect();
        assert_eq!(
            a,
            [
                "--netns-type=path",
                "--enable-sandbox",
                "--enable-seccomp",
                "--ready-fd=3",
                "--cidr=10.0.5.0/24",
                "--api-socket=/v/slirp4netns.sock",
                "/v/netns",
                SLIRP_TAP,
            ]
        );
    }

    #[test]
    fn hostfwd_requests_follow_the_api() {
        let pf = PortForward {
            protocol: Protocol::Udp,
            ..PortForward::tcp(8080, 80)
        };
        let v = hostfwd_request(&pf, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(v["execute"], "add_hostfwd");
        assert_eq!(v["arguments"]["proto"], "udp");
        assert_eq!(v["arguments"]["host_addr"], "127.0.0.1");
        assert_eq!(v["arguments"]["host_port"], 8080);
        assert_eq!(v["arguments"]["guest_addr"], "10.0.2.15");
        assert_eq!(v["arguments"]["guest_port"], 80);
    }

    #[test]
    fn replies_are_success_refusal_or_garbage() {
        assert_eq!(parse_reply(br#"{"return":{"id":1}}"#).unwrap()["id"], 1);
        assert_eq!(
            parse_reply(br#"{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}"#)
                .unwrap_err(),
            "bad request: add_hostfwd: slirp_add_hostfwd failed"
        );
        assert!(parse_reply(b"").is_err());
        assert!(parse_reply(b"{}").is_err());
        assert!(parse_reply(&[0xff; 40]).is_err());
    }
}
