//! The socket side of the switch: one Unix datagram socket per switch network, one
//! [`NetworkSwitch`] port per VM NIC.
//!
//! ## Protocol
//!
//! QEMU 7.2's `-netdev dgram,local.type=unix,local.path=L,remote.type=unix,remote.path=S`
//! sends every guest frame as one datagram from its socket `L` to the switch socket `S`, and
//! delivers every datagram arriving on `L` to the guest. There is no header: a datagram is an
//! Ethernet frame. The switch therefore knows a port by the sender's socket path: a datagram
//! from a new path adds a port (up to [`SwitchConfig::max_ports`]; datagrams from unnamed
//! sockets are ignored), and a port is removed when sending to it fails because its socket is
//! gone (`ECONNREFUSED`/`ENOENT`, the VM stopped) or its path no longer exists.
//!
//! Frames go out through one datagram socket per port, connected to the peer's path, so the
//! kernel tells the switch when that peer's receive queue has room again: frames the peer
//! cannot take right now (`EAGAIN`) stay in the port's bounded queue until its socket turns
//! writable; beyond the queue they are dropped and counted. (QEMU's socket is bound, not
//! connected, so it accepts datagrams from these sockets.)
//! Every second the MAC table is aged and, when asked, per-port counters are written to a
//! JSON stats file (temp file + rename).

use super::{NetworkSwitch, PortCounters, PortId, SwitchConfig};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixDatagram;

/// Frames read per wake-up before queued frames are flushed.
const BATCH: usize = 64;
/// Safety-net retry interval for ports whose socket was full (normally a writable
/// notification comes first).
const RETRY: Duration = Duration::from_millis(50);
/// Socket buffer size asked for (the kernel caps it at `net.core.*mem_max`).
const SOCKET_BUFFER: usize = 4 << 20;

/// Errors of the switch server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The switch socket could not be created.
    #[error("cannot bind switch socket {}", path.display())]
    Bind {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Receiving failed for a reason other than a transient one.
    #[error("switch socket {} failed", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            ServeError::Bind { source, .. } => crate::ErrorKind::of_io(source),
            ServeError::Io { .. } => crate::ErrorKind::Other,
        }
    }
}

/// What to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Network name (ports all join it).
    pub network: String,
    /// Path of the switch socket; a stale file there is replaced.
    pub socket: PathBuf,
    /// Switch tunables.
    pub config: SwitchConfig,
    /// Where to write per-port counters every second (`None`: nowhere).
    pub stats: Option<PathBuf>,
}

/// Per-port counters as written to the stats file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PortStats {
    /// The peer's socket path.
    pub peer: PathBuf,
    /// Counters.
    pub counters: PortCounters,
}

/// Serve the switch until `shutdown` completes; removes the socket file on the way out.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let _ = std::fs::remove_file(&opts.socket);
    let sock = UnixDatagram::bind(&opts.socket).map_err(|source| ServeError::Bind {
        path: opts.socket.clone(),
        source,
    })?;
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&sock, SOCKET_BUFFER);
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&sock, SOCKET_BUFFER);
    let result = run(&sock, &opts, shutdown).await;
    let _ = std::fs::remove_file(&opts.socket);
    result
}

struct State {
    sw: NetworkSwitch,
    network: String,
    by_path: HashMap<PathBuf, PortId>,
    paths: HashMap<PortId, PathBuf>,
    tx: HashMap<PortId, Arc<UnixDatagram>>,
    /// Ports with frames waiting for their socket to become writable.
    waiting: HashSet<PortId>,
    waits: FuturesUnordered<BoxFuture<'static, PortId>>,
}

fn connect_tx(path: &Path) -> std::io::Result<UnixDatagram> {
    let s = UnixDatagram::unbound()?;
    s.connect(path)?;
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&s, SOCKET_BUFFER);
    Ok(s)
}

fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::ENOENT | libc::ENOTSOCK | libc::EPERM)
    )
}

impl State {
    fn port_for(&mut self, path: &Path) -> Option<PortId> {
        if let Some(p) = self.by_path.get(path) {
            return Some(*p);
        }
        let tx = match connect_tx(path) {
            Ok(tx) => tx,
            Err(e) => {
                tracing::debug!(peer = %path.display(), error = %e, "cannot reach new peer");
                return None;
            }
        };
        match self.sw.add_port(&self.network) {
            Ok(id) => {
                tracing::info!(peer = %path.display(), port = id, "switch port added");
                self.by_path.insert(path.to_path_buf(), id);
                self.paths.insert(id, path.to_path_buf());
                self.tx.insert(id, Arc::new(tx));
                Some(id)
            }
            Err(e) => {
                tracing::warn!(peer = %path.display(), error = %e, "switch port refused");
                None
            }
        }
    }

    fn remove(&mut self, id: PortId) {
        if let Some(path) = self.paths.remove(&id) {
            self.by_path.remove(&path);
            tracing::info!(peer = %path.display(), port = id, "switch port removed");
        }
        self.tx.remove(&id);
        self.waiting.remove(&id);
        let _ = self.sw.remove_port(id);
    }

    /// Send what is queued for `id` until its queue is empty or its socket is full.
    /// Returns false when the peer is gone.
    fn flush_port(&mut self, id: PortId) -> bool {
        if self.waiting.contains(&id) {
            return true;
        }
        let Some(tx) = self.tx.get(&id).cloned() else {
            return true;
        };
        while let Some(frame) = self.sw.pop(id) {
            match tx.try_send(&frame) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.sw.unpop(id, frame);
                    self.waiting.insert(id);
                    self.waits.push(Box::pin(async move {
                        let _ = tx.writable().await;
                        id
                    }));
                    return true;
                }
                Err(e) if is_gone(&e) => return false,
                Err(e) => {
                    tracing::debug!(port = id, error = %e, "frame dropped");
                    self.sw.count_tx_drop(id);
                }
            }
        }
        true
    }

    /// Flush every port with queued frames.
    fn flush(&mut self) {
        let mut dead = Vec::new();
        for id in self.sw.port_ids() {
            if self.sw.queued(id) > 0 && !self.flush_port(id) {
                dead.push(id);
            }
        }
        for id in dead {
            self.remove(id);
        }
    }

    fn writable(&mut self, id: PortId) {
        self.waiting.remove(&id);
        if !self.flush_port(id) {
            self.remove(id);
        }
    }

    fn stats(&self) -> Vec<PortStats> {
        self.sw
            .port_ids()
            .into_iter()
            .filter_map(|id| {
                Some(PortStats {
                    peer: self.paths.get(&id)?.clone(),
                    counters: self.sw.counters(id)?,
                })
            })
            .collect()
    }
}

async fn run(
    sock: &UnixDatagram,
    opts: &ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let mut st = State {
        sw: NetworkSwitch::new(opts.config.clone()),
        network: opts.network.clone(),
        by_path: HashMap::new(),
        paths: HashMap::new(),
        tx: HashMap::new(),
        waiting: HashSet::new(),
        waits: FuturesUnordered::new(),
    };
    let mut buf = vec![0u8; opts.config.max_frame.max(super::MIN_FRAME) + 1];
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            Some(id) = st.waits.next(), if !st.waits.is_empty() => st.writable(id),
            _ = retry.tick(), if !st.waiting.is_empty() => {
                let ids: Vec<PortId> = st.waiting.drain().collect();
                for id in ids {
                    st.writable(id);
                }
            }
            _ = housekeeping.tick() => {
                st.sw.age(Instant::now());
                // ports whose socket file vanished (VM gone, nothing sent to it lately)
                let gone: Vec<PortId> = st
                    .paths
                    .iter()
                    .filter(|(_, p)| !p.exists())
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    st.remove(id);
                }
                if let Some(path) = &opts.stats {
                    write_stats(path, &st.stats());
                }
            }
            r = sock.readable() => {
                if let Err(source) = r {
                    return Err(ServeError::Io { path: opts.socket.clone(), source });
                }
                let now = Instant::now();
                for _ in 0..BATCH {
                    match sock.try_recv_from(&mut buf) {
                        Ok((n, addr)) => {
                            let Some(path) = addr.as_pathname() else { continue };
                            let Some(port) = st.port_for(path) else { continue };
                            if n > opts.config.max_frame {
                                // truncated datagram: counted as malformed by ingress
                                let _ = st.sw.ingress(port, &buf[..n], now);
                                continue;
                            }
                            let _ = st.sw.ingress(port, &buf[..n], now);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::debug!(error = %e, "recv on switch socket");
                            break;
                        }
                    }
                }
                st.flush();
            }
        }
    }
}

fn write_stats(path: &Path, stats: &[PortStats]) {
    let Ok(json) = serde_json::to_vec_pretty(stats) else {
        return;
    };
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Read a stats file written by [`serve`].
pub fn read_stats(path: &Path) -> std::io::Result<Vec<PortStats>> {
    let data = std::fs::read(path)?;
    serde_json::from_slice(&data).map_err(std::io::Error::other)
}
