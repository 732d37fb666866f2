//! [`PortForwarder`]: a TCP relay from a host address to a guest `ip:port`, for TAP, bridge
//! and switch networks where QEMU's `hostfwd` does not apply.
//!
//! Every accepted connection gets its own task that connects to the target and relays both
//! directions concurrently. On Linux the bytes move with `splice(2)` through a pipe per
//! direction, so they never enter user space (readiness comes from tokio; both sockets stay
//! non-blocking); where splice is refused the relay falls back to copying with 64 KiB
//! buffers. When one side finishes sending (EOF), the forwarder shuts down the write half
//! towards the other side and keeps relaying the opposite direction, so half-closed
//! protocols (a client that sends a request then `shutdown(SHUT_WR)`) work.
//! [`PortForwarder::stop`] stops accepting, aborts open connections and waits until every
//! task has ended, so no socket outlives it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long connecting to the target may take before the client connection is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const BUF_SIZE: usize = 64 * 1024;

/// Errors of a [`PortForwarder`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl ForwardError {
    /// What kind of failure this is (see [`crate::error`]): an address in use is a conflict.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            ForwardError::Bind { source, .. } => crate::ErrorKind::of_io(source),
        }
    }
}

/// Counters of a [`PortForwarder`].
#[derive(Debug, Default)]
struct Stats {
    active: AtomicUsize,
    accepted: AtomicU64,
    failed_connects: AtomicU64,
    bytes_to_target: AtomicU64,
    bytes_from_target: AtomicU64,
}

/// A snapshot of a forwarder's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Connections open now.
    pub active: usize,
    /// Connections accepted in total.
    pub accepted: u64,
    /// Connections closed because the target could not be reached.
    pub failed_connects: u64,
    /// Bytes relayed from clients to the target (finished connections).
    pub bytes_to_target: u64,
    /// Bytes relayed from the target to clients (finished connections).
    pub bytes_from_target: u64,
}

/// A running TCP port forwarder. Dropping it cancels it without waiting; prefer
/// [`stop`](Self::stop).
#[derive(Debug)]
pub struct PortForwarder {
    local: SocketAddr,
    target: SocketAddr,
    cancel: CancellationToken,
    accept_task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl PortForwarder {
    /// Listen on `listen` (port 0 picks a free port; see [`local_addr`](Self::local_addr)) and
    /// relay every connection to `target`.
    pub async fn bind(listen: SocketAddr, target: SocketAddr) -> Result<Self, ForwardError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ForwardError::Bind { addr: listen, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ForwardError::Bind { addr: listen, source })?;
        let cancel = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let accept_task = tokio::spawn(accept_loop(listener, target, cancel.clone(), stats.clone()));
        tracing::debug!(%local, %target, "port forwarder listening");
        Ok(Self {
            local,
            target,
            cancel,
            accept_task: Some(accept_task),
            stats,
        })
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The target address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Current counters.
    pub fn stats(&self) -> ForwardStats {
        ForwardStats {
            active: self.stats.active.load(Ordering::Relaxed),
            accepted: self.stats.accepted.load(Ordering::Relaxed),
            failed_connects: self.stats.failed_connects.load(Ordering::Relaxed),
            bytes_to_target: self.stats.bytes_to_target.load(Ordering::Relaxed),
            bytes_from_target: self.stats.bytes_from_target.load(Ordering::Relaxed),
        }
    }

    /// Stop accepting, close every open connection, and wait until all of them are gone.
    /// When this returns the port is free again.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.accept_task.take() {
            let _ = t.await;
        }
    }

    /// Wait until the forwarder is stopped by someone else ([`stop`](Self::stop) from a clone
    /// of the token, or a failure of the listener).
    pub async fn closed(&mut self) {
        if let Some(t) = self.accept_task.as_mut() {
            let _ = t.await;
            self.accept_task = None;
        }
    }

    /// A token that stops the forwarder when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    cancel: CancellationToken,
    stats: Arc<Stats>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            // reap finished connection tasks so the set does not grow
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    stats.active.fetch_add(1, Ordering::Relaxed);
                    let cancel = cancel.clone();
                    let stats = stats.clone();
                    conns.spawn(async move {
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            r = relay(client, target, &stats) => {
                                if let Err(e) = r {
                                    tracing::debug!(%peer, %target, error = %e, "forwarded connection ended");
                                }
                            }
                        }
                        stats.active.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
    }
    drop(listener);
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn relay(mut client: TcpStream, target: SocketAddr, stats: &Stats) -> std::io::Result<()> {
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.failed_connects.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        Err(_) => {
            stats.failed_connects.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect to target timed out",
            ));
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (to, from) = match splice::bidirectional(&client, &upstream).await {
        Ok(r) => r,
        Err(splice::SpliceError::Unsupported) => {
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF_SIZE, BUF_SIZE).await?
        }
        Err(splice::SpliceError::Io(e)) => return Err(e),
    };
    stats.bytes_to_target.fetch_add(to, Ordering::Relaxed);
    stats.bytes_from_target.fetch_add(from, Ordering::Relaxed);
    Ok(())
}

/// Hosts without `splice(2)` (macOS) relay through user-space buffers.
#[cfg(not(target_os = "linux"))]
mod splice {
    pub(super) enum SpliceError {
        /// splice is not possible here; nothing was transferred.
        Unsupported,
        #[allow(dead_code)]
        Io(std::io::Error),
    }

    pub(super) async fn bidirectional(
        _a: &tokio::net::TcpStream,
        _b: &tokio::net::TcpStream,
    ) -> Result<(u64, u64), SpliceError> {
        Err(SpliceError::Unsupported)
    }
}

/// Zero-copy relaying between two TCP sockets with `splice(2)`.
#[cfg(target_os = "linux")]
mod splice {
    use std::os::fd::{AsFd, OwnedFd};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Bytes moved per splice call at most (the pipe is sized to hold this).
    const CHUNK: usize = 1 << 20;

    pub(super) enum SpliceError {
        /// splice is not possible here; nothing was transferred.
        Unsupported,
        Io(std::io::Error),
    }

    impl From<std::io::Error> for SpliceError {
        fn from(e: std::io::Error) -> Self {
            SpliceError::Io(e)
        }
    }

    struct Pipe {
        r: OwnedFd,
        w: OwnedFd,
    }

    fn pipe() -> std::io::Result<Pipe> {
        let (r, w) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)?;
        // a bigger pipe means fewer wake-ups; failure just keeps the default 64 KiB
        let _ = rustix::pipe::fcntl_setpipe_size(&w, CHUNK);
        Ok(Pipe { r, w })
    }

    fn splice(from: &impl AsFd, to: &impl AsFd, len: usize) -> std::io::Result<usize> {
        let flags = rustix::pipe::SpliceFlags::NONBLOCK | rustix::pipe::SpliceFlags::MOVE;
        Ok(rustix::pipe::splice(from, None, to, None, len, flags)?)
    }

    /// Relay `src` to `dst` until EOF on `src`, then shut down `dst`'s write side.
    async fn one_way(src: &TcpStream, dst: &TcpStream, p: &Pipe) -> Result<u64, SpliceError> {
        let mut total = 0u64;
        loop {
            let n = loop {
                src.readable().await?;
                match src.try_io(Interest::READABLE, || splice(src, &p.w, CHUNK)) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) && total == 0 => {
                        return Err(SpliceError::Unsupported)
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if n == 0 {
                let _ = rustix::net::shutdown(dst, rustix::net::Shutdown::Write);
                return Ok(total);
            }
            let mut left = n;
            while left > 0 {
                dst.writable().await?;
                match dst.try_io(Interest::WRITABLE, || splice(&p.r, dst, left)) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            total += n as u64;
        }
    }

    /// Relay both ways; returns (bytes a->b, bytes b->a).
    pub(super) async fn bidirectional(a: &TcpStream, b: &TcpStream) -> Result<(u64, u64), SpliceError> {
        let p1 = pipe()?;
        let p2 = pipe()?;
        let (x, y) = tokio::join!(one_way(a, b, &p1), one_way(b, a, &p2));
        Ok((x?, y?))
    }
}
