//! Network namespaces: run host-side setup inside one, and start the VMM inside one.
//!
//! A namespace is named by a path to its nsfs file (`/var/run/netns/NAME` as made by
//! `ip netns add`, or `/proc/<pid>/ns/net`). Work is done on a fresh OS thread that calls
//! `setns(2)` and then exits, so no runtime thread ever changes namespace.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Errors entering a network namespace.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// The namespace file cannot be opened.
    #[error("cannot open network namespace {}", path.display())]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `setns(2)` failed.
    #[error("cannot enter network namespace {}", path.display())]
    Enter {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The helper thread could not be started or died.
    #[error("namespace worker thread failed")]
    Thread(#[source] std::io::Error),
}

impl NetnsError {
    /// What kind of failure this is (see [`crate::error`]): a namespace that does not exist is
    /// not found.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            NetnsError::Open { source, .. } => crate::ErrorKind::of_io(source),
            NetnsError::Enter { .. } | NetnsError::Thread(_) => crate::ErrorKind::Other,
        }
    }
}

fn open_ns(path: &Path) -> Result<OwnedFd, NetnsError> {
    let f = std::fs::File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(OwnedFd::from(f))
}

fn enter(fd: &OwnedFd, path: &Path) -> Result<(), NetnsError> {
    crate::host::enter_net_namespace(fd.as_raw_fd()).map_err(|source| NetnsError::Enter {
        path: path.to_path_buf(),
        source,
    })
}

/// Run `f` on a new thread inside the namespace at `ns` (or, when `ns` is `None`, on a
/// blocking thread in the caller's namespace) and return its result.
pub async fn run_in<F, R>(ns: Option<&Path>, f: F) -> Result<R, NetnsError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let Some(ns) = ns else {
        return tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| NetnsError::Thread(std::io::Error::other(e)));
    };
    let fd = open_ns(ns)?;
    let path = ns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vmrs-netns".into())
        .spawn(move || {
            let r = enter(&fd, &path).map(|()| f());
            let _ = tx.send(r);
            // the thread exits here, taking its namespace with it
        })
        .map_err(NetnsError::Thread)?;
    rx.await
        .map_err(|_| NetnsError::Thread(std::io::Error::other("namespace worker panicked")))?
}

/// Make `cmd` start its program inside the namespace at `ns` (the VMM must run in the
/// namespace of its TAP devices).
pub fn command_in(cmd: &mut tokio::process::Command, ns: &Path) -> Result<(), NetnsError> {
    let fd = open_ns(ns)?;
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which
    // is async-signal-safe. `fd` is moved into the closure so it stays open until then (it is
    // close-on-exec, so the VMM does not inherit it).
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fd;
            crate::host::enter_net_namespace(raw)
        });
    }
    Ok(())
}
