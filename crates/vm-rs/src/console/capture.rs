//! The capped serial log: a guest printing forever must not fill the host disk.
//!
//! QEMU's `file` chardev has no size limit, so QEMU writes the console to a Unix socket
//! instead (`serial.sock` in the VM directory, QEMU the client), and a small sidecar process,
//! `vmrs-net serial-log` (found like the networking sidecars, see
//! [`crate::net::sidecar::program`]), takes that one connection and appends to `serial.log`:
//!
//! * the first `max` bytes (boot log, readiness marker) as they arrive, so readiness detection
//!   (inotify on the file) and `vmrs logs -f` work as before;
//! * past `max`, one marker line (starting with [`CAPPED_MARKER`]) and nothing more while the VM
//!   runs; the last [`TAIL`] bytes seen are kept in memory;
//! * when the VMM closes the connection (it exited, however it did), a second marker line
//!   (starting with [`TAIL_MARKER`]) and that tail, so the log's end still shows how the guest
//!   ended (a power-off, a kernel panic: see `manager::monitor`).
//!
//! The log never grows past `max` + [`TAIL`] + the two marker lines ([`MAX_SLACK`]).
//!
//! ## Lifetime
//!
//! [`start`] binds the listening socket *before* QEMU starts and hands it to the sidecar as
//! its standard input, so QEMU's connect at startup cannot race the sidecar's start. The
//! sidecar's record (pid + start time, [`crate::net::sidecar::SidecarRecord`]) is
//! `console.json` in the VM directory. The sidecar ends on its own when the VMM's connection
//! ends (or when no VMM connected within [`ACCEPT_TIMEOUT`], or on SIGTERM), removing the
//! socket once the log is complete; [`wait_done`] waits for that. Should the sidecar die
//! early, QEMU discards console output (a disconnected socket chardev drops writes): the guest
//! never blocks on its console.

use crate::net::sidecar::SidecarRecord;
use crate::process::{ProcessError, VmmProcess};
use std::collections::VecDeque;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The socket QEMU writes the console to, in the VM directory.
pub const SOCKET: &str = crate::vm_dir::VmDir::SERIAL_SOCKET;
/// The sidecar's record (pid + start time), in the VM directory.
pub const RECORD: &str = crate::vm_dir::VmDir::CONSOLE_RECORD;
/// The sidecar's own messages, in the VM directory.
pub const SIDECAR_LOG: &str = "console.log";
/// Default cap of the serial log.
pub const DEFAULT_MAX: u64 = 8 << 20;
/// How much of the output past the cap is kept for the log's end.
pub const TAIL: usize = 64 << 10;
/// How far past the cap the log may grow: the tail and the two marker lines.
pub const MAX_SLACK: u64 = TAIL as u64 + 512;
/// How long the sidecar waits for the VMM to connect.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
/// The start of the line written where the log reaches its cap.
pub const CAPPED_MARKER: &str = "[vmrs: serial log capped at";
/// The start of the line written before the kept tail.
pub const TAIL_MARKER: &str = "[vmrs: serial output dropped:";

/// Errors capturing the console.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// A file or socket could not be created, read or written.
    #[error("cannot access {}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The sidecar could not be started.
    #[error("cannot start the serial log sidecar")]
    Spawn(#[source] ProcessError),
    /// No VMM connected to the console socket in time.
    #[error("no vmm connected to {} within {:.0}s", socket.display(), timeout.as_secs_f64())]
    NoVmm {
        /// The socket.
        socket: PathBuf,
        /// How long the sidecar waited.
        timeout: Duration,
    },
}

impl CaptureError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            CaptureError::Io { .. } => crate::ErrorKind::Other,
            CaptureError::Spawn(e) => e.kind(),
            CaptureError::NoVmm { .. } => crate::ErrorKind::Timeout,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaptureError + '_ {
    move |source| CaptureError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The log writer: everything up to `max`, then a marker and only a remembered tail, written
/// by [`finish`](Self::finish).
#[derive(Debug)]
pub struct CappedLog<W: Write> {
    out: W,
    max: u64,
    written: u64,
    dropped: u64,
    tail: VecDeque<u8>,
}

impl<W: Write> CappedLog<W> {
    /// A writer appending to `out`, which holds `already` bytes.
    pub fn new(out: W, already: u64, max: u64) -> Self {
        CappedLog {
            out,
            max,
            written: already,
            dropped: 0,
            tail: VecDeque::new(),
        }
    }

    /// Take console output.
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let room = usize::try_from(self.max.saturating_sub(self.written)).unwrap_or(usize::MAX);
        let (head, rest) = data.split_at(room.min(data.len()));
        if !head.is_empty() {
            self.out.write_all(head)?;
            self.written += head.len() as u64;
        }
        if rest.is_empty() {
            return Ok(());
        }
        if self.dropped == 0 {
            let marker = format!(
                "\n{CAPPED_MARKER} {} bytes; the rest is dropped, its last {} KiB are added when the vm ends]\n",
                self.max,
                TAIL >> 10
            );
            self.out.write_all(marker.as_bytes())?;
        }
        self.dropped += rest.len() as u64;
        let keep = &rest[rest.len().saturating_sub(TAIL)..];
        let overflow = (self.tail.len() + keep.len()).saturating_sub(TAIL);
        self.tail.drain(..overflow);
        self.tail.extend(keep);
        Ok(())
    }

    /// The console ended: write the tail of what was dropped, if anything was.
    pub fn finish(&mut self) -> std::io::Result<()> {
        if self.dropped > 0 {
            let kept = self.tail.len();
            let marker = format!(
                "\n{TAIL_MARKER} {} bytes in all; the last {kept} follow]\n",
                self.dropped
            );
            self.out.write_all(marker.as_bytes())?;
            let (a, b) = self.tail.as_slices();
            self.out.write_all(a)?;
            self.out.write_all(b)?;
            self.tail.clear();
            self.dropped = 0;
        }
        self.out.flush()
    }
}

/// A started console capture.
#[derive(Debug)]
pub struct Capture {
    /// The socket the VMM must connect to.
    pub socket: PathBuf,
    /// The sidecar.
    pub record: SidecarRecord,
}

impl Capture {
    /// Kill the sidecar (the VMM never started) and remove its files.
    pub fn abort(&self, vm_dir: &Path) {
        if let Ok(p) = VmmProcess::attach(self.record.pid, self.record.start_time) {
            let _ = p.kill();
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(vm_dir.join(RECORD));
    }
}

/// A [`Capture`] whose VMM is being launched: dropped before [`disarm`](Self::disarm) (every
/// early return of a launch), it aborts the capture so no sidecar outlives a VMM that never
/// came up.
#[derive(Debug)]
pub struct CaptureGuard<'a> {
    capture: Option<Capture>,
    vm_dir: &'a Path,
}

impl<'a> CaptureGuard<'a> {
    /// Guard `capture` of `vm_dir`.
    pub fn new(capture: Capture, vm_dir: &'a Path) -> Self {
        Self {
            capture: Some(capture),
            vm_dir,
        }
    }

    /// The socket the VMM must connect to.
    pub fn socket(&self) -> PathBuf {
        self.capture
            .as_ref()
            .map(|c| c.socket.clone())
            .unwrap_or_default()
    }

    /// Connect to the capture as the VMM's console: for a VMM that writes its serial port to
    /// its standard output (Firecracker; Cloud Hypervisor in `Tty` mode), this is that stdout.
    pub fn connect(&self) -> std::io::Result<std::os::unix::net::UnixStream> {
        std::os::unix::net::UnixStream::connect(self.socket())
    }

    /// The VMM runs: the capture lives on with it.
    pub fn disarm(mut self) {
        self.capture = None;
    }
}

impl Drop for CaptureGuard<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.capture.take() {
            c.abort(self.vm_dir);
        }
    }
}

/// Bind the console socket in `vm_dir` and start the sidecar writing `serial_log` (which
/// should exist) capped at `max` bytes.
pub fn start(vm_dir: &Path, serial_log: &Path, max: u64) -> Result<Capture, CaptureError> {
    let socket = vm_dir.join(SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).map_err(io_err(&socket))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(io_err(&socket))?;
    }
    let log = vm_dir.join(SIDECAR_LOG);
    let out = crate::paths::private_file()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io_err(&log))?;
    let err = out.try_clone().map_err(io_err(&log))?;
    let (program, prefix) = crate::net::sidecar::program();
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(prefix)
        .arg("serial-log")
        .arg("--log")
        .arg(serial_log)
        .arg("--max")
        .arg(max.to_string())
        .stdin(std::os::fd::OwnedFd::from(listener))
        .stdout(out)
        .stderr(err);
    let process = VmmProcess::spawn(cmd).map_err(CaptureError::Spawn)?;
    let record = SidecarRecord {
        pid: process.pid(),
        start_time: process.start_time(),
    };
    let capture = Capture { socket, record };
    let path = vm_dir.join(RECORD);
    let json = serde_json::to_vec(&capture.record).map_err(|e| io_err(&path)(e.into()))?;
    if let Err(e) = crate::fsutil::write_atomic(&path, &json) {
        capture.abort(vm_dir);
        return Err(io_err(&path)(e));
    }
    Ok(capture)
}

/// Wait up to `timeout` for the console sidecar of `vm_dir` to finish the log (after the VMM
/// exited): until its socket is gone or it is not running. True when it is done.
pub async fn wait_done(vm_dir: &Path, timeout: Duration) -> bool {
    let socket = vm_dir.join(SOCKET);
    let record: Option<SidecarRecord> = std::fs::read(vm_dir.join(RECORD))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let Some(record) = record else {
        return true;
    };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !socket.exists() || !record.is_alive() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sidecar's work: accept the VMM's connection on `listener` (its socket file is
/// `socket`), write what it sends to `log` through a [`CappedLog`], and when it ends (or on
/// `shutdown`) finish the log and remove the socket.
pub async fn serve(
    listener: tokio::net::UnixListener,
    socket: &Path,
    log: &Path,
    max: u64,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CaptureError> {
    let file = crate::paths::private_file()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(log))?;
    let already = file.metadata().map_err(io_err(log))?.len();
    let mut capped = CappedLog::new(file, already, max);
    tokio::pin!(shutdown);
    let accepted = tokio::select! {
        r = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept()) => r,
        () = &mut shutdown => return Ok(()),
    };
    let mut conn = match accepted {
        Ok(Ok((conn, _))) => conn,
        Ok(Err(e)) => return Err(io_err(socket)(e)),
        Err(_) => {
            return Err(CaptureError::NoVmm {
                socket: socket.to_path_buf(),
                timeout: ACCEPT_TIMEOUT,
            })
        }
    };
    drop(listener);
    let mut buf = vec![0u8; 64 << 10];
    let result = loop {
        let n = tokio::select! {
            r = conn.read(&mut buf) => r,
            () = &mut shutdown => break Ok(()),
        };
        match n {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = capped.write(&buf[..n]) {
                    break Err(io_err(log)(e));
                }
            }
            // the VMM went away abruptly: the log is as complete as it gets
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break Ok(()),
            Err(e) => break Err(io_err(socket)(e)),
        }
    };
    let finished = capped.finish().map_err(io_err(log));
    let _ = std::fs::remove_file(socket);
    result.and(finished)
}

/// `serial-log --log PATH --max BYTES`, the listening socket on standard input; see
/// [`serve`]. Returns the exit code (2 for bad arguments).
pub async fn main(args: &[String], shutdown: impl Future<Output = ()>) -> Result<i32, CaptureError> {
    let opt = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let (Some(log), Some(Ok(max))) = (opt("--log"), opt("--max").map(|m| m.parse::<u64>())) else {
        return Ok(2);
    };
    let stdin = Path::new("/dev/stdin");
    let owned = std::os::fd::AsFd::as_fd(&std::io::stdin())
        .try_clone_to_owned()
        .map_err(io_err(stdin))?;
    let listener = std::os::unix::net::UnixListener::from(owned);
    let socket = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_else(|| stdin.to_path_buf());
    listener.set_nonblocking(true).map_err(io_err(&socket))?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(io_err(&socket))?;
    serve(listener, &socket, Path::new(&log), max, shutdown).await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_its_head_a_marker_and_the_tail_and_stays_under_the_cap() {
        let mut out = Vec::new();
        let mut log = CappedLog::new(&mut out, 0, 1000);
        log.write(b"VMRS_READY 10.0.2.15\n").expect("w");
        for i in 0..50_000u32 {
            log.write(format!("line {i}\n").as_bytes()).expect("w");
        }
        log.finish().expect("finish");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.starts_with("VMRS_READY 10.0.2.15\nline 0\n"));
        assert!(text.len() as u64 <= 1000 + MAX_SLACK, "{}", text.len());
        assert_eq!(text.matches(CAPPED_MARKER).count(), 1);
        assert_eq!(text.matches(TAIL_MARKER).count(), 1);
        assert!(text.ends_with("line 49999\n"), "the last output is kept");
        assert!(text.find(CAPPED_MARKER) < text.find(TAIL_MARKER));
    }

    #[test]
    fn under_the_cap_nothing_is_added() {
        let mut out = Vec::new();
        let mut log = CappedLog::new(&mut out, 10, 100);
        log.write(b"hello\n").expect("w");
        log.finish().expect("finish");
        assert_eq!(out, b"hello\n");
        // exactly at the cap: still no marker
        let mut out = Vec::new();
        let mut log = CappedLog::new(&mut out, 0, 4);
        log.write(b"abcd").expect("w");
        log.finish().expect("finish");
        assert_eq!(out, b"abcd");
    }

    #[test]
    fn a_chunk_larger_than_the_tail_keeps_its_own_end() {
        let mut out = Vec::new();
        let mut log = CappedLog::new(&mut out, 0, 0);
        let big: Vec<u8> = (0..3 * TAIL).map(|i| (i % 251) as u8).collect();
        log.write(&big).expect("w");
        log.write(b"end").expect("w");
        log.finish().expect("finish");
        assert!(out.ends_with(b"end"));
        let tail_start = out.len() - TAIL;
        let mut expect = big[big.len() - (TAIL - 3)..].to_vec();
        expect.extend_from_slice(b"end");
        assert_eq!(&out[tail_start..], &expect[..]);
    }

    #[tokio::test]
    async fn serve_writes_what_the_vmm_sends_and_removes_the_socket_at_the_end() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().expect("tmp");
        let socket = dir.path().join(SOCKET);
        let log = dir.path().join("serial.log");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let server = tokio::spawn({
            let (socket, log) = (socket.clone(), log.clone());
            async move { serve(listener, &socket, &log, 64, std::future::pending()).await }
        });
        let mut vmm = tokio::net::UnixStream::connect(&socket).await.expect("connect");
        vmm.write_all(&[b'x'; 10_000]).await.expect("w");
        drop(vmm);
        server.await.expect("join").expect("serve");
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(text.starts_with(&"x".repeat(64)));
        assert!(text.contains(CAPPED_MARKER) && text.contains(TAIL_MARKER));
        assert!(text.len() as u64 <= 64 + MAX_SLACK);
        assert!(!socket.exists(), "the socket goes when the log is complete");
        assert!(wait_done(dir.path(), Duration::from_millis(10)).await);
    }
}
