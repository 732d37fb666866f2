//! The host side of the guest agent: run commands in a guest and copy files in and out, over a
//! virtio-serial port or over vsock ([`hybrid`]).
//!
//! ## Wiring
//!
//! The VMM gives the guest a virtio-serial port named [`proto::PORT_NAME`] whose host end is a
//! Unix socket on which QEMU listens ([`crate::devices::AgentChannel`], rendered by the QEMU
//! driver as):
//!
//! ```text
//! -device virtio-serial-device,id=vmrs-vser0
//! -chardev socket,id=vmrs-agent0,path=<vm dir>/agent.sock,server=on,wait=off
//! -device virtserialport,bus=vmrs-vser0.0,chardev=vmrs-agent0,name=vmrs.agent
//! ```
//!
//! `vmrs-init` in the guest serves the port. [`AgentClient::connect`] connects to the socket and
//! says hello; bytes sent before the guest opened its end wait in QEMU, so connecting while the
//! guest still boots simply waits. The socket takes one connection at a time: share one
//! [`AgentClient`] (it is `Clone`, and multiplexes any number of concurrent execs and copies).
//! When a connection closes, the guest kills the processes it started (except detached ones).
//!
//! ## Protocol
//!
//! Length-prefixed frames `[len u32][type u8][stream u32][payload]`, at most
//! [`proto::MAX_FRAME`] bytes, versioned by a hello exchange; see [`proto`] (the `vmrs-proto`
//! crate, shared with the guest) for the frame layout, every message and the conversation of
//! each operation. Everything the guest sends is untrusted: an invalid or oversized frame
//! ends the connection with [`AgentError::Protocol`] (nothing is allocated beyond
//! [`proto::MAX_FRAME`]); paths in files copied out of the guest are confined to the
//! destination (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`; no `..`, no absolute
//! paths, no writing through symlinks).
//!
//! ## Example
//!
//! ```no_run
//! use vm_rs::agent::{AgentClient, ExecCommand};
//! # async fn demo() -> Result<(), vm_rs::agent::AgentError> {
//! let agent = AgentClient::connect("/var/lib/vmrs/vms/demo/agent.sock").await?;
//! let out = agent.exec(ExecCommand::new(["sh", "-c", "echo hi; exit 3"])).await?;
//! assert_eq!(out.stdout, b"hi\n");
//! assert_eq!(out.status.code(), Some(3));
//! agent.copy_to("/etc/hosts".as_ref(), "/tmp").await?;
//! # Ok(()) }
//! ```

mod copy;
pub mod hybrid;
pub mod session;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

pub use vmrs_proto as proto;
use vmrs_proto::{Decoder, ExecRequest, Message, ProtoError, CHUNK, EXEC_DETACH, EXEC_STDIN};
pub use vmrs_proto::{Restart, RestartPolicy, WinSize};

/// How long [`AgentClient::connect`] waits for the guest's hello.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the VMM may take to answer a hybrid-vsock `CONNECT` (it answers at once or
/// closes; a live socket that says nothing is broken).
const HYBRID_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames buffered per stream before the reader waits for the consumer.
const STREAM_QUEUE: usize = 64;

/// Errors of agent operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The socket could not be connected.
    #[error("cannot connect to agent socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The hybrid-vsock handshake on the VM's vsock socket failed.
    #[error("vsock connection through {path} failed")]
    Vsock {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: hybrid::HandshakeError,
    },
    /// The guest did not answer the hello in time.
    #[error("guest agent at {path} did not answer within {timeout:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
    /// The guest speaks another protocol version or refused the hello.
    #[error("guest agent refused the connection: {message}")]
    Refused {
        /// The guest's message.
        message: String,
    },
    /// The guest sent bytes that are not a valid frame; the connection was closed.
    #[error("invalid data from the guest agent")]
    Protocol {
        /// What was wrong.
        #[source]
        source: ProtoError,
    },
    /// The guest sent a valid frame that makes no sense at this point.
    #[error("unexpected message from the guest agent: {what}")]
    Unexpected {
        /// Description of the message.
        what: String,
    },
    /// Reading or writing the socket failed.
    #[error("agent connection failed")]
    Io {
        /// Cause.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The connection closed before the operation finished.
    #[error("agent connection closed")]
    Closed,
    /// The guest could not run the command.
    #[error("guest could not run the command: {message}")]
    Exec {
        /// The guest's message.
        message: String,
    },
    /// The command's program could not be started in the guest: not found (`errno` ENOENT)
    /// or not executable (EACCES, ENOEXEC, ...). See [`AgentError::shell_code`].
    #[error("{message}")]
    Spawn {
        /// The guest's `errno`.
        errno: i32,
        /// The guest's message.
        message: String,
    },
    /// The guest agent speaks a protocol version without this feature (its guest assets are
    /// older than this host: `vmrs setup` rebuilds them).
    #[error("the guest agent (protocol version {version}) does not support {feature}; rebuild the guest assets with `vmrs setup`")]
    Unsupported {
        /// What was asked for.
        feature: &'static str,
        /// The conversation's version.
        version: u16,
    },
    /// A copy failed in the guest.
    #[error("copy failed in the guest: {message}")]
    GuestCopy {
        /// The guest's message.
        message: String,
    },
    /// A copy failed on the host.
    #[error("copy failed on the host at {path}")]
    HostCopy {
        /// Host path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A path sent by the guest is absolute, has `..`, or goes through a symlink.
    #[error("guest sent a path that escapes the destination: {path:?}")]
    UnsafePath {
        /// The offending path (lossy).
        path: String,
    },
    /// The image has neither entrypoint nor cmd and none was given.
    #[error("no command to run: the image has no entrypoint or cmd and none was given")]
    NoCommand,
    /// A blocking task failed.
    #[error("background task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl AgentError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            AgentError::Vsock {
                source: hybrid::HandshakeError::Timeout { .. },
                ..
            } => K::Timeout,
            AgentError::Connect { .. }
            | AgentError::Vsock { .. }
            | AgentError::Refused { .. }
            | AgentError::Protocol { .. }
            | AgentError::Unexpected { .. }
            | AgentError::Io { .. }
            | AgentError::Closed
            | AgentError::UnsafePath { .. } => K::Backend,
            AgentError::Timeout { .. } => K::Timeout,
            AgentError::Exec { .. } | AgentError::GuestCopy { .. } => K::Other,
            AgentError::Spawn { errno, .. } if *errno == libc::ENOENT => K::NotFound,
            AgentError::Spawn { .. } => K::Invalid,
            AgentError::Unsupported { .. } => K::Unsupported,
            AgentError::HostCopy { source, .. } => K::of_io(source),
            AgentError::NoCommand => K::Invalid,
            AgentError::Task(_) => K::Other,
        }
    }

    /// The exit code a shell gives a command that failed this way: 127 when the program was
    /// not found, 126 when it could not be executed; `None` for failures of another kind.
    pub fn shell_code(&self) -> Option<i32> {
        match self {
            AgentError::Spawn { errno, .. } if *errno == libc::ENOENT => Some(127),
            AgentError::Spawn { .. } => Some(126),
            _ => None,
        }
    }
}

/// Why the connection ended, shared with every waiting stream.
#[derive(Debug, Clone)]
enum Closed {
    Eof,
    Io(Arc<std::io::Error>),
    Protocol(ProtoError),
}

impl Closed {
    fn to_error(&self) -> AgentError {
        match self {
            Closed::Eof => AgentError::Closed,
            Closed::Io(e) => AgentError::Io { source: e.clone() },
            Closed::Protocol(p) => AgentError::Protocol { source: p.clone() },
        }
    }
}

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    streams: Mutex<HashMap<u32, mpsc::Sender<Message>>>,
    closed: Mutex<Option<Closed>>,
    next_stream: AtomicU32,
    nonce: AtomicU64,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    agent: String,
    /// The conversation's protocol version (from the guest's `HelloOk`).
    version: u16,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
    }
}

/// A connection to a guest agent. Cheap to clone; clones share the connection, which closes
/// when the last clone and the last [`ExecProcess`] started from it are dropped.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent", &self.inner.agent)
            .finish()
    }
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl ExitStatus {
    /// The exit code, if it exited.
    pub fn code(&self) -> Option<i32> {
        match self {
            ExitStatus::Exited(c) => Some(*c),
            ExitStatus::Signaled(_) => None,
        }
    }

    /// The signal, if it was killed by one.
    pub fn signal(&self) -> Option<i32> {
        match self {
            ExitStatus::Signaled(s) => Some(*s),
            ExitStatus::Exited(_) => None,
        }
    }

    /// Exited with code 0.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }

    /// Shell convention: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match self {
            ExitStatus::Exited(c) => *c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecCommand {
    /// Program and arguments (`argv[0]` is looked up in `PATH`).
    pub argv: Vec<String>,
    /// Environment on top of the defaults (`PATH`, `HOME`).
    pub env: Vec<(String, String)>,
    /// Working directory; default `/`.
    pub cwd: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`; default root.
    pub user: Option<String>,
    /// Bytes fed to stdin by [`AgentClient::exec`] (stdin is `/dev/null` when `None`).
    pub stdin: Option<Vec<u8>>,
    /// For [`AgentClient::spawn`]: keep stdin open for [`ExecProcess::write_stdin`].
    pub interactive_stdin: bool,
    /// Run detached: no output or status; the process outlives the connection.
    pub detach: bool,
    /// Run on a new pseudo-terminal of this size (`docker exec -t`): stdin, stdout and stderr
    /// are the terminal, output arrives as [`ExecEvent::Stdout`], and
    /// [`ExecControl::resize`] changes its size. Needs protocol version
    /// [`proto::VERSION_TTY`]. Terminal input is accepted with or without
    /// [`Self::interactive_stdin`].
    pub tty: Option<WinSize>,
    /// Run chrooted in this absolute guest directory, `cwd` and `user` resolved inside it
    /// (how one VM runs the containers of a pod, each on its own root filesystem). Needs
    /// protocol version [`proto::VERSION_ROOT`].
    pub root: Option<String>,
}

impl ExecCommand {
    /// A command from its argument vector.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Add an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Set the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Set the user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Feed these bytes to stdin.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Run on a pseudo-terminal of `size` (see [`Self::tty`]).
    pub fn tty(mut self, size: WinSize) -> Self {
        self.tty = Some(size);
        self
    }

    /// Keep stdin open for [`ExecStdin`] (see [`Self::interactive_stdin`]).
    pub fn interactive(mut self) -> Self {
        self.interactive_stdin = true;
        self
    }

    fn message(&self, stdin: bool) -> Message {
        let exec = self.request(stdin);
        match self.tty {
            Some(size) => Message::ExecTty { exec, size },
            None => Message::Exec(exec),
        }
    }

    fn request(&self, stdin: bool) -> ExecRequest {
        let mut flags = 0;
        if stdin {
            flags |= EXEC_STDIN;
        }
        if self.detach {
            flags |= EXEC_DETACH;
        }
        ExecRequest {
            argv: self.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            env: self
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}").into_bytes())
                .collect(),
            cwd: self.cwd.as_ref().map(|c| c.as_bytes().to_vec()),
            user: self.user.as_ref().map(|u| u.as_bytes().to_vec()),
            flags,
            root: self.root.as_ref().map(|r| r.as_bytes().to_vec()),
        }
    }
}

/// The process part of an OCI image config (`Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User`),
/// which the host applies per exec: the guest init has no image config of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ImageProcess {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` (`KEY=VALUE`; entries without `=` are ignored).
    pub env: Vec<String>,
    /// `WorkingDir` (empty = `/`).
    pub working_dir: Option<String>,
    /// `User` (empty = root).
    pub user: Option<String>,
}

impl ImageProcess {
    /// Give `cmd` this image's context where it sets none: the working directory and user,
    /// and the environment underneath its own (`docker exec` in a container).
    pub fn apply_defaults(&self, cmd: &mut ExecCommand) {
        if cmd.cwd.is_none() {
            cmd.cwd = self.working_dir.clone().filter(|w| !w.is_empty());
        }
        if cmd.user.is_none() {
            cmd.user = self.user.clone().filter(|u| !u.is_empty());
        }
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| !k.is_empty() && !cmd.env.iter().any(|(ck, _)| ck == k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.append(&mut cmd.env);
        cmd.env = env;
    }

    /// The command `docker run IMAGE [CMD...]` would run: `Entrypoint` followed by
    /// `override_cmd` when given (`vmrs run IMAGE -- CMD`), else by `Cmd`; with the image's
    /// environment, working directory and user. Fails when that leaves nothing to run.
    pub fn command(&self, override_cmd: Option<&[String]>) -> Result<ExecCommand, AgentError> {
        let mut argv = self.entrypoint.clone();
        argv.extend_from_slice(override_cmd.unwrap_or(&self.cmd));
        if argv.is_empty() {
            return Err(AgentError::NoCommand);
        }
        let mut cmd = ExecCommand::new(argv);
        cmd.env = self
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cmd.cwd = self.working_dir.clone().filter(|w| !w.is_empty());
        cmd.user = self.user.clone().filter(|u| !u.is_empty());
        Ok(cmd)
    }
}

/// Collected result of [`AgentClient::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Everything written to stdout.
    pub stdout: Vec<u8>,
    /// Everything written to stderr.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
}

/// One event of a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes on stdout.
    Stdout(Vec<u8>),
    /// Bytes on stderr.
    Stderr(Vec<u8>),
    /// The process ended (the last event).
    Exit(ExitStatus),
}

/// A process started with [`AgentClient::spawn`].
#[derive(Debug)]
pub struct ExecProcess {
    client: AgentClient,
    stream: u32,
    pid: u32,
    events: mpsc::Receiver<Message>,
    stdin_open: bool,
    finished: bool,
}

/// The stdin of an [`ExecProcess`], taken with [`ExecProcess::take_stdin`] so it can be fed
/// from another task while the output is read ([`session::pump_stdin`]). Dropping it without
/// [`close`](Self::close) leaves the process's stdin open.
#[derive(Debug)]
pub struct ExecStdin {
    client: AgentClient,
    stream: u32,
    open: bool,
}

/// Signals and terminal resizes for an [`ExecProcess`], usable from any task
/// ([`ExecProcess::control`]); cheap to clone.
#[derive(Debug, Clone)]
pub struct ExecControl {
    client: AgentClient,
    stream: u32,
}

impl AgentClient {
    /// Connect to the agent socket and exchange hellos, waiting up to
    /// [`DEFAULT_CONNECT_TIMEOUT`] (the guest may still be booting).
    pub async fn connect(socket: impl AsRef<Path>) -> Result<AgentClient, AgentError> {
        Self::connect_timeout(socket, DEFAULT_CONNECT_TIMEOUT).await
    }

    /// [`AgentClient::connect`] with a deadline; retries while the socket does not exist yet.
    pub async fn connect_timeout(
        socket: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        let path = socket.as_ref().to_path_buf();
        let deadline = Instant::now() + timeout;
        loop {
            let stream = match UnixStream::connect(&path).await {
                Ok(s) => s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(source) => return Err(AgentError::Connect { path, source }),
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, Self::handshake(stream)).await {
                // A torn frame left over from a previous connection can precede the hello
                // reply; the guest resets when we disconnect, so try again with a fresh one.
                Ok(Err(AgentError::Protocol { .. })) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(r) => return r,
                Err(_) => return Err(AgentError::Timeout { path, timeout }),
            }
        }
    }

    /// Connect to the guest agent's vsock `port` through the hybrid-vsock Unix socket `socket`
    /// ([`hybrid`]) and exchange hellos, within `timeout`. While the socket does not exist yet
    /// or nothing listens on the port (the guest still boots) it retries; a malformed reply
    /// is an error at once.
    pub async fn connect_vsock_timeout(
        socket: impl AsRef<Path>,
        port: u32,
        timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        let path = socket.as_ref().to_path_buf();
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let mut stream = match UnixStream::connect(&path).await {
                Ok(s) => s,
                // Only a socket not created yet is waited for: the VMM (or sidecar) creates it
                // before the guest runs, so a refused connection means its listener is gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !remaining.is_zero() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(source) => return Err(AgentError::Connect { path, source }),
            };
            match hybrid::connect(&mut stream, port, remaining.min(HYBRID_REPLY_TIMEOUT)).await {
                Ok(_) => {}
                Err(hybrid::HandshakeError::NoListener { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(source) => return Err(AgentError::Vsock { path, source }),
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            return match tokio::time::timeout(remaining, Self::handshake(stream)).await {
                Ok(r) => r,
                Err(_) => Err(AgentError::Timeout { path, timeout }),
            };
        }
    }

    /// Whether the connection has ended (the guest went away, or a protocol error closed it);
    /// a closed client fails every operation, so connect again.
    pub fn is_closed(&self) -> bool {
        self.inner
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Use an already connected stream (e.g. one end of a socket pair). Exchanges hellos.
    pub async fn from_stream(stream: UnixStream) -> Result<AgentClient, AgentError> {
        Self::handshake(stream).await
    }

    async fn handshake(stream: UnixStream) -> Result<AgentClient, AgentError> {
        let (mut reader, mut writer) = stream.into_split();
        let hello = |version| {
            Message::Hello { version }
                .encode(0)
                .map_err(|source| AgentError::Protocol { source })
        };
        // Newest first; a guest that refuses it gets the next older one (see the protocol's
        // "Versions").
        let mut asked = proto::VERSION;
        writer.write_all(&hello(asked)?).await.map_err(io_err)?;
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; CHUNK];
        let (agent, version) = loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => match frame.message {
                    Message::HelloOk { version, agent }
                        if (proto::MIN_VERSION..=asked).contains(&version) =>
                    {
                        break (String::from_utf8_lossy(&agent).into_owned(), version)
                    }
                    Message::HelloOk { version, .. } => {
                        return Err(AgentError::Refused {
                            message: format!("guest speaks protocol version {version}"),
                        })
                    }
                    Message::Error { .. } if frame.stream == 0 && asked > proto::MIN_VERSION => {
                        asked -= 1;
                        writer.write_all(&hello(asked)?).await.map_err(io_err)?;
                        continue;
                    }
                    Message::Error { message } => {
                        return Err(AgentError::Refused {
                            message: String::from_utf8_lossy(&message).into_owned(),
                        })
                    }
                    // Late frames of a previous connection: skip.
                    _ => continue,
                },
                Ok(None) => {}
                Err(source) => return Err(AgentError::Protocol { source }),
            }
            let n = reader.read(&mut buf).await.map_err(io_err)?;
            if n == 0 {
                return Err(AgentError::Closed);
            }
            decoder.push(&buf[..n]);
        };
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(writer),
            streams: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            next_stream: AtomicU32::new(1),
            nonce: AtomicU64::new(1),
            reader: Mutex::new(None),
            agent,
            version,
        });
        let weak = Arc::downgrade(&inner);
        let handle = tokio::spawn(read_loop(reader, decoder, weak));
        *inner.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(AgentClient { inner })
    }

    /// The guest agent's name and version (from its hello).
    pub fn agent_version(&self) -> &str {
        &self.inner.agent
    }

    /// The protocol version of this connection (the newest both sides speak).
    pub fn protocol_version(&self) -> u16 {
        self.inner.version
    }

    fn closed_error(&self) -> AgentError {
        self.inner
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Closed::to_error)
            .unwrap_or(AgentError::Closed)
    }

    fn open_stream(&self) -> Result<(u32, mpsc::Receiver<Message>), AgentError> {
        if let Some(c) = self
            .inner
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Err(c.to_error());
        }
        let mut id = self.inner.next_stream.fetch_add(1, Ordering::SeqCst);
        if id == 0 {
            id = self.inner.next_stream.fetch_add(1, Ordering::SeqCst);
        }
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        Ok((id, rx))
    }

    fn close_stream(&self, id: u32) {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    async fn send(&self, stream: u32, msg: &Message) -> Result<(), AgentError> {
        let frame = msg
            .encode(stream)
            .map_err(|source| AgentError::Protocol { source })?;
        let mut w = self.inner.writer.lock().await;
        w.write_all(&frame).await.map_err(io_err)
    }

    async fn recv(&self, rx: &mut mpsc::Receiver<Message>) -> Result<Message, AgentError> {
        match rx.recv().await {
            Some(m) => Ok(m),
            None => Err(self.closed_error()),
        }
    }

    /// Round-trip a ping; returns the time it took.
    pub async fn ping(&self) -> Result<Duration, AgentError> {
        let nonce = self.inner.nonce.fetch_add(1, Ordering::SeqCst);
        let start = Instant::now();
        match self.request(&Message::Ping { nonce }).await? {
            Message::Pong { nonce: n } if n == nonce => Ok(start.elapsed()),
            other => Err(unexpected(&other)),
        }
    }

    /// Give a guest restored from a snapshot a new identity (wall clock, kernel RNG reseed,
    /// host name, machine id; see [`vmrs_proto::Identity`]); returns once it is applied.
    pub async fn set_identity(&self, identity: vmrs_proto::Identity) -> Result<(), AgentError> {
        match self.request(&Message::SetIdentity(identity)).await? {
            Message::IdentitySet => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Give the guest's NICs new MACs and IPv4 addresses (a restored clone on a TAP, bridge
    /// or switch network); needs protocol version [`proto::VERSION_ADDRESSES`].
    pub async fn set_addresses(&self, nics: Vec<proto::NicAddress>) -> Result<(), AgentError> {
        if self.inner.version < proto::VERSION_ADDRESSES {
            return Err(AgentError::Unsupported {
                feature: "new network addresses",
                version: self.inner.version,
            });
        }
        match self.request(&Message::SetAddresses(nics)).await? {
            Message::AddressesSet => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Ask the guest to power off in an orderly way; returns once the guest acknowledged.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        match self.request(&Message::Shutdown).await? {
            Message::ShutdownOk => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// One request on a stream of its own and the guest's one reply (the stream is closed
    /// again whatever happened).
    async fn request(&self, message: &Message) -> Result<Message, AgentError> {
        let (id, mut rx) = self.open_stream()?;
        let result = async {
            self.send(id, message).await?;
            self.recv(&mut rx).await
        }
        .await;
        self.close_stream(id);
        result
    }

    /// A root (chroot) needs protocol version 3 and an absolute path.
    fn check_root(&self, cmd: &ExecCommand) -> Result<(), AgentError> {
        let Some(root) = &cmd.root else {
            return Ok(());
        };
        if self.inner.version < proto::VERSION_ROOT {
            return Err(AgentError::Unsupported {
                feature: "a process root (chroot)",
                version: self.inner.version,
            });
        }
        if !root.starts_with('/') {
            return Err(AgentError::Exec {
                message: format!("the process root {root:?} is not an absolute path"),
            });
        }
        Ok(())
    }

    /// Start a process and stream its output ([`ExecProcess`]). With `cmd.stdin` set, those
    /// bytes are written and stdin closed; with `cmd.interactive_stdin`, stdin stays open for
    /// [`ExecProcess::write_stdin`].
    pub async fn spawn(&self, cmd: ExecCommand) -> Result<ExecProcess, AgentError> {
        if cmd.tty.is_some() && self.inner.version < proto::VERSION_TTY {
            return Err(AgentError::Unsupported {
                feature: "terminals (-t)",
                version: self.inner.version,
            });
        }
        self.check_root(&cmd)?;
        let with_stdin = cmd.stdin.is_some() || cmd.interactive_stdin || cmd.tty.is_some();
        let (id, mut rx) = self.open_stream()?;
        let started = async {
            self.send(id, &cmd.message(with_stdin)).await?;
            match self.recv(&mut rx).await? {
                Message::Started { pid } => Ok(pid),
                Message::SpawnFailed { errno, message } => Err(AgentError::Spawn {
                    errno,
                    message: String::from_utf8_lossy(&message).into_owned(),
                }),
                Message::Error { message } => Err(AgentError::Exec {
                    message: String::from_utf8_lossy(&message).into_owned(),
                }),
                other => Err(unexpected(&other)),
            }
        }
        .await;
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                self.close_stream(id);
                return Err(e);
            }
        };
        let mut process = ExecProcess {
            client: self.clone(),
            stream: id,
            pid,
            events: rx,
            stdin_open: with_stdin,
            finished: cmd.detach,
        };
        if cmd.detach {
            self.close_stream(id);
        }
        if let Some(data) = &cmd.stdin {
            // Feed stdin concurrently with reading output, or a big input could deadlock
            // against a process that writes before it reads.
            let client = self.clone();
            let data = data.clone();
            tokio::spawn(async move {
                for chunk in data.chunks(CHUNK) {
                    if client
                        .send(id, &Message::Stdin { data: chunk.to_vec() })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = client.send(id, &Message::Stdin { data: Vec::new() }).await;
            });
            process.stdin_open = false;
        }
        Ok(process)
    }

    /// Start the VM's main process (`run -d IMAGE`): like a detached exec it outlives the
    /// connection, its output goes to the VM's process log, `restart` says whether the guest
    /// starts it again when it ends, and when it ends for good the guest reports its exit
    /// status on the console and powers off (see [`proto::MAIN_EXIT_MARKER`]). Returns its pid.
    /// Needs protocol version [`proto::VERSION_TTY`].
    pub async fn spawn_main(&self, cmd: &ExecCommand, restart: Restart) -> Result<u32, AgentError> {
        if self.inner.version < proto::VERSION_TTY {
            return Err(AgentError::Unsupported {
                feature: "main processes (exit status, --restart)",
                version: self.inner.version,
            });
        }
        self.check_root(cmd)?;
        let (id, mut rx) = self.open_stream()?;
        let result = async {
            let exec = cmd.request(false);
            self.send(id, &Message::ExecMain { exec, restart }).await?;
            match self.recv(&mut rx).await? {
                Message::Started { pid } => Ok(pid),
                Message::SpawnFailed { errno, message } => Err(AgentError::Spawn {
                    errno,
                    message: String::from_utf8_lossy(&message).into_owned(),
                }),
                Message::Error { message } => Err(AgentError::Exec {
                    message: String::from_utf8_lossy(&message).into_owned(),
                }),
                other => Err(unexpected(&other)),
            }
        }
        .await;
        self.close_stream(id);
        result
    }

    /// Run a command to completion, collecting its output in memory (use [`Self::spawn`] to
    /// stream instead).
    pub async fn exec(&self, cmd: ExecCommand) -> Result<ExecOutput, AgentError> {
        self.spawn(cmd).await?.wait_with_output().await
    }

    /// Copy the host file or directory `src` into the guest at `dest` (`docker cp` rules: when
    /// `dest` is an existing directory, `src` lands inside it under its own name). Modes are
    /// kept; symlinks are copied as links.
    pub async fn copy_to(&self, src: &Path, dest: &str) -> Result<(), AgentError> {
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (id, mut rx) = self.open_stream()?;
        let result = async {
            self.send(
                id,
                &Message::CopyIn {
                    dest: dest.as_bytes().to_vec(),
                    name: name.into_bytes(),
                },
            )
            .await?;
            let (tx, mut frames) = mpsc::channel::<Message>(8);
            let src = src.to_path_buf();
            let producer = tokio::task::spawn_blocking(move || copy::read_tree(&src, &tx));
            // The guest's reply can arrive as soon as `End` is sent, before the producer has
            // ended its side of the channel: once `End` is out, the reply is the answer (the
            // cause of the old "Unexpected CopyDone" failures), not an early error.
            let mut early = None;
            loop {
                tokio::select! {
                    frame = frames.recv() => match frame {
                        Some(m) => {
                            let end = matches!(m, Message::End);
                            self.send(id, &m).await?;
                            if end {
                                break;
                            }
                        }
                        None => break,
                    },
                    reply = rx.recv() => match reply {
                        Some(m @ Message::Error { .. }) => {
                            early = Some(m);
                            break;
                        }
                        Some(other) => return Err(unexpected(&other)),
                        None => return Err(self.closed_error()),
                    },
                }
            }
            if early.is_some() {
                // Stop the producer (its sends fail) before reporting the guest's error.
                drop(frames);
            }
            let produced = producer.await.map_err(AgentError::Task)?;
            let reply = match early {
                Some(m) => m,
                None => {
                    produced?;
                    self.recv(&mut rx).await?
                }
            };
            match reply {
                Message::CopyDone => Ok(()),
                Message::Error { message } => Err(AgentError::GuestCopy {
                    message: String::from_utf8_lossy(&message).into_owned(),
                }),
                other => Err(unexpected(&other)),
            }
        }
        .await;
        self.close_stream(id);
        result
    }

    /// Copy the guest file or directory `src` to the host at `dest` (when `dest` is an
    /// existing directory, the copy lands inside it under `src`'s name). Every path the guest
    /// sends stays inside the destination.
    pub async fn copy_from(&self, src: &str, dest: &Path) -> Result<(), AgentError> {
        let (id, mut rx) = self.open_stream()?;
        let result = async {
            self.send(
                id,
                &Message::CopyOut {
                    src: src.as_bytes().to_vec(),
                },
            )
            .await?;
            let name = Path::new(src)
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_else(|| "root".into());
            let target = match tokio::fs::metadata(dest).await {
                Ok(m) if m.is_dir() => dest.join(name),
                _ => dest.to_path_buf(),
            };
            let (tx, wrx) = std::sync::mpsc::sync_channel::<Message>(8);
            let writer = tokio::task::spawn_blocking(move || copy::write_tree(&target, wrx));
            let mut outcome = Ok(());
            loop {
                let msg = match self.recv(&mut rx).await {
                    Ok(m) => m,
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                };
                match msg {
                    Message::Error { message } => {
                        outcome = Err(AgentError::GuestCopy {
                            message: String::from_utf8_lossy(&message).into_owned(),
                        });
                        break;
                    }
                    m @ (Message::Entry(_) | Message::Data { .. }) => {
                        if tx.send(m).is_err() {
                            break; // the writer failed; its error is reported below
                        }
                    }
                    Message::End => {
                        let _ = tx.send(Message::End);
                        break;
                    }
                    other => {
                        outcome = Err(unexpected(&other));
                        break;
                    }
                }
            }
            drop(tx);
            let written = writer.await.map_err(AgentError::Task)?;
            outcome?;
            written
        }
        .await;
        self.close_stream(id);
        result
    }
}

impl ExecProcess {
    /// The process id in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Take the process's stdin to feed it from another task (requires
    /// [`ExecCommand::interactive_stdin`] or [`ExecCommand::tty`]); `None` when it is not open
    /// or was taken already.
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        if !self.stdin_open {
            return None;
        }
        self.stdin_open = false;
        Some(ExecStdin {
            client: self.client.clone(),
            stream: self.stream,
            open: true,
        })
    }

    /// A handle for signals and resizes that other tasks can use while this one reads.
    pub fn control(&self) -> ExecControl {
        ExecControl {
            client: self.client.clone(),
            stream: self.stream,
        }
    }

    /// Write to the process's stdin (requires [`ExecCommand::interactive_stdin`]).
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), AgentError> {
        if !self.stdin_open {
            return Err(AgentError::Unexpected {
                what: "stdin is not open".into(),
            });
        }
        for chunk in data.chunks(CHUNK) {
            self.client
                .send(self.stream, &Message::Stdin { data: chunk.to_vec() })
                .await?;
        }
        Ok(())
    }

    /// Close stdin (the process sees end of input).
    pub async fn close_stdin(&mut self) -> Result<(), AgentError> {
        if self.stdin_open {
            self.stdin_open = false;
            self.client
                .send(self.stream, &Message::Stdin { data: Vec::new() })
                .await?;
        }
        Ok(())
    }

    /// Send a signal to the process.
    pub async fn signal(&self, signo: i32) -> Result<(), AgentError> {
        self.client.send(self.stream, &Message::Signal { signo }).await
    }

    /// The next event; `None` after [`ExecEvent::Exit`].
    pub async fn next_event(&mut self) -> Option<Result<ExecEvent, AgentError>> {
        if self.finished {
            return None;
        }
        let ev = match self.client.recv(&mut self.events).await {
            Ok(Message::Stdout { data }) => Ok(ExecEvent::Stdout(data)),
            Ok(Message::Stderr { data }) => Ok(ExecEvent::Stderr(data)),
            Ok(Message::Exited { code }) => Ok(ExecEvent::Exit(ExitStatus::Exited(code))),
            Ok(Message::Signaled { signo }) => Ok(ExecEvent::Exit(ExitStatus::Signaled(signo))),
            Ok(Message::Error { message }) => Err(AgentError::Exec {
                message: String::from_utf8_lossy(&message).into_owned(),
            }),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        };
        if !matches!(ev, Ok(ExecEvent::Stdout(_) | ExecEvent::Stderr(_))) {
            self.finished = true;
            self.client.close_stream(self.stream);
        }
        Some(ev)
    }

    /// Wait for the process to end, collecting its output.
    pub async fn wait_with_output(mut self) -> Result<ExecOutput, AgentError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(ev) = self.next_event().await {
            match ev? {
                ExecEvent::Stdout(d) => stdout.extend_from_slice(&d),
                ExecEvent::Stderr(d) => stderr.extend_from_slice(&d),
                ExecEvent::Exit(status) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        status,
                    })
                }
            }
        }
        Err(AgentError::Closed)
    }
}

impl ExecStdin {
    /// Send `data` to the process's stdin (in frames of at most [`CHUNK`] bytes).
    pub async fn write(&mut self, data: &[u8]) -> Result<(), AgentError> {
        if !self.open {
            return Err(AgentError::Unexpected {
                what: "stdin is closed".into(),
            });
        }
        for chunk in data.chunks(CHUNK) {
            self.client
                .send(self.stream, &Message::Stdin { data: chunk.to_vec() })
                .await?;
        }
        Ok(())
    }

    /// Close stdin: the process reads end of input (on a terminal, nothing happens: the
    /// terminal stays the process's).
    pub async fn close(mut self) -> Result<(), AgentError> {
        self.open = false;
        self.client
            .send(self.stream, &Message::Stdin { data: Vec::new() })
            .await
    }
}

impl ExecControl {
    /// Send a signal to the process.
    pub async fn signal(&self, signo: i32) -> Result<(), AgentError> {
        self.client.send(self.stream, &Message::Signal { signo }).await
    }

    /// Change the size of the process's terminal ([`ExecCommand::tty`]); ignored by the guest
    /// for a process without one.
    pub async fn resize(&self, size: WinSize) -> Result<(), AgentError> {
        self.client.send(self.stream, &Message::Resize { size }).await
    }
}

impl Drop for ExecProcess {
    fn drop(&mut self) {
        if !self.finished {
            self.client.close_stream(self.stream);
        }
    }
}

fn io_err(e: std::io::Error) -> AgentError {
    AgentError::Io { source: Arc::new(e) }
}

fn unexpected(m: &Message) -> AgentError {
    let mut what = format!("{m:?}");
    what.truncate(120);
    AgentError::Unexpected { what }
}

/// Reads frames and hands each to its stream; ends the connection on EOF, I/O or protocol error.
async fn read_loop(
    mut reader: tokio::net::unix::OwnedReadHalf,
    mut decoder: Decoder,
    inner: std::sync::Weak<Inner>,
) {
    let mut buf = vec![0u8; CHUNK];
    let reason = 'outer: loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let Some(inner) = inner.upgrade() else {
                        return;
                    };
                    let tx = inner
                        .streams
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&frame.stream)
                        .cloned();
                    // Frames for unknown streams (finished, dropped, stale) are discarded.
                    if let Some(tx) = tx {
                        drop(inner);
                        // A receiver that went away (dropped process) just loses its frames.
                        let _ = tx.send(frame.message).await;
                    }
                }
                Ok(None) => break,
                Err(e) => break 'outer Closed::Protocol(e),
            }
        }
        match reader.read(&mut buf).await {
            Ok(0) => break Closed::Eof,
            Ok(n) => decoder.push(&buf[..n]),
            Err(e) => break Closed::Io(Arc::new(e)),
        }
    };
    if let Some(inner) = inner.upgrade() {
        *inner.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        // Dropping the senders wakes every waiting stream with the close reason.
        inner.streams.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // Shut our write half so the peer sees the connection end.
        let mut w = inner.writer.lock().await;
        let _ = w.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_process_follows_docker_rules() {
        let img = ImageProcess {
            entrypoint: vec!["/docker-entrypoint.sh".into()],
            cmd: vec!["nginx".into(), "-g".into()],
            env: vec!["PATH=/usr/bin:/bin".into(), "A=b=c".into(), "junk".into()],
            working_dir: Some(String::new()),
            user: Some("www:www".into()),
        };
        let c = img.command(None).expect("cmd");
        assert_eq!(c.argv, ["/docker-entrypoint.sh", "nginx", "-g"]);
        assert_eq!(
            c.env,
            [
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
                ("A".to_string(), "b=c".to_string())
            ]
        );
        assert_eq!(c.cwd, None);
        assert_eq!(c.user.as_deref(), Some("www:www"));
        let c = img
            .command(Some(&["sh".to_string(), "-c".to_string()]))
            .expect("cmd");
        assert_eq!(c.argv, ["/docker-entrypoint.sh", "sh", "-c"]);
        let none = ImageProcess::default();
        assert!(matches!(none.command(None), Err(AgentError::NoCommand)));
        assert_eq!(
            none.command(Some(&["true".to_string()])).expect("cmd").argv,
            ["true"]
        );
    }

    #[test]
    fn image_context_is_the_default_and_the_command_wins() {
        let img = ImageProcess {
            env: vec!["PATH=/usr/bin".into(), "A=image".into()],
            working_dir: Some("/app".into()),
            user: Some("www".into()),
            ..ImageProcess::default()
        };
        let mut c = ExecCommand::new(["sh"]).env("A", "mine");
        img.apply_defaults(&mut c);
        assert_eq!(c.cwd.as_deref(), Some("/app"));
        assert_eq!(c.user.as_deref(), Some("www"));
        assert_eq!(
            c.env,
            [
                ("PATH".to_string(), "/usr/bin".to_string()),
                ("A".to_string(), "mine".to_string())
            ]
        );
        let mut c = ExecCommand::new(["sh"]).cwd("/tmp").user("0");
        img.apply_defaults(&mut c);
        assert_eq!((c.cwd.as_deref(), c.user.as_deref()), (Some("/tmp"), Some("0")));
    }

    #[test]
    fn exit_status_helpers() {
        assert!(ExitStatus::Exited(0).success());
        assert_eq!(ExitStatus::Exited(3).code(), Some(3));
        assert_eq!(ExitStatus::Signaled(9).shell_code(), 137);
        assert_eq!(ExitStatus::Signaled(9).signal(), Some(9));
    }
}
