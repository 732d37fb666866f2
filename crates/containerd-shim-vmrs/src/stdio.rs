//! Bridging containerd's stdio FIFOs to an agent process's streams.
//!
//! The output FIFOs are opened from the moment the process is created (Create for the
//! container's init, Exec for an exec), while the client (`ctr`, the CRI plugin) waits on
//! that call — not at Start: a detached `ctr run -d` closes its ends right after Start, and a
//! blocking open of an output FIFO without a reader would never return (the exit would then
//! never be published). The client opens its read ends asynchronously (Go's `fifo` package
//! opens in a goroutine), so at Create its reader may not be there yet: the write end is
//! opened non-blocking and retried for [`OUTPUT_OPEN_WINDOW`]; no reader by then, that stream
//! is dropped. Output waits for the open (at most that long), so nothing is lost to the race.
//!
//! Stdin is opened for reading at Start, on a thread (a FIFO's read end opened before any writer
//! would read end of file at once); the client's writes wait for it. It ends at end of file (the
//! client closed its write end, as `ctr` does at the end of its input) or at CloseIO, which
//! clients send when their input ended while they may keep the FIFO open (the CRI plugin):
//! what is already in the FIFO is still delivered, then the process's stdin is closed. Bytes the
//! client wrote before CloseIO are never lost to the race between the two.
//!
//! Output is copied until the process's exit status arrives; the exit is published after its
//! output is written, so the client's copy ends before it learns of the exit.

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use std::os::unix::fs::OpenOptionsExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;
use vm_rs::agent::{ExecEvent, ExecProcess, ExecStdin};

/// The FIFO paths of one process (empty: none).
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    /// stdin FIFO.
    pub stdin: String,
    /// stdout FIFO.
    pub stdout: String,
    /// stderr FIFO.
    pub stderr: String,
    /// Run on a terminal.
    pub terminal: bool,
}

/// How long the write end of an output FIFO is retried while the client has no reader yet.
pub const OUTPUT_OPEN_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// The output ends of one process's FIFOs, being opened.
#[derive(Debug, Default)]
pub struct Opened {
    /// Write end of the stdout FIFO.
    pub stdout: Option<tokio::task::JoinHandle<Option<pipe::Sender>>>,
    /// Write end of the stderr FIFO (none with a terminal: the terminal carries both).
    pub stderr: Option<tokio::task::JoinHandle<Option<pipe::Sender>>>,
}

fn open_out(path: &str) -> Option<tokio::task::JoinHandle<Option<pipe::Sender>>> {
    if path.is_empty() {
        return None;
    }
    let path = path.to_string();
    Some(tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + OUTPUT_OPEN_WINDOW;
        loop {
            match pipe::OpenOptions::new().open_sender(&path) {
                Ok(s) => return Some(s),
                // ENXIO: no reader (yet)
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err(e) => {
                    log::warn!("output {path} is not used: {e}");
                    return None;
                }
            }
        }
    }))
}

async fn opened(h: Option<tokio::task::JoinHandle<Option<pipe::Sender>>>) -> Option<pipe::Sender> {
    h?.await.ok().flatten()
}

impl Stdio {
    /// Start opening the output FIFOs this process has, without blocking. Must run inside a
    /// Tokio runtime.
    pub fn open_outputs(&self) -> Opened {
        Opened {
            stdout: open_out(&self.stdout),
            stderr: if self.terminal {
                None
            } else {
                open_out(&self.stderr)
            },
        }
    }
}

/// Open `path` for reading without holding a Tokio worker: the open blocks until a writer has
/// it open. A thread still blocked when `cancel` fires is released by a write end of our own.
async fn open_stdin(path: &str, cancel: impl std::future::Future<Output = ()>) -> Option<pipe::Receiver> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let p = path.to_string();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::File::open(&p));
    });
    let mut rx = rx;
    let opened = tokio::select! {
        biased;
        opened = &mut rx => opened,
        () = cancel => {
            // a write end of ours completes an open still blocked; what a client wrote before
            // is then read by the caller (the end came through `closed` or the exit)
            let _ours = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path);
            rx.await
        }
    };
    match opened {
        Ok(Ok(f)) => {
            if !std::os::unix::fs::FileTypeExt::is_fifo(&f.metadata().ok()?.file_type()) {
                log::warn!("stdin {path} is not a FIFO; not used");
                return None;
            }
            pipe::Receiver::from_file(f)
                .map_err(|e| log::warn!("stdin {path}: {e}"))
                .ok()
        }
        Ok(Err(e)) => {
            log::warn!("stdin {path}: {e}");
            None
        }
        Err(_) => None,
    }
}

/// Feed the stdin FIFO at `path` to the process's `stdin` (see [`feed`]), then close it —
/// unless the process exited first.
pub fn pump_stdin(
    path: String,
    mut stdin: ExecStdin,
    closed: watch::Receiver<bool>,
    exited: watch::Receiver<Option<(u32, Timestamp)>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let mut exited2 = exited.clone();
    tokio::spawn(feed(path, closed, exited, tx));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(c) => {
                        if stdin.write(&c).await.is_err() {
                            return;
                        }
                    }
                    None => break,
                },
                () = has_exited(&mut exited2) => return,
            }
        }
        let _ = stdin.close().await;
    });
}

/// Send what the stdin FIFO at `path` carries to `tx` until end of file, or until CloseIO
/// (`closed` turns true; what the FIFO holds by then is still sent), or until the process has
/// exited; dropping `tx` then says the input ended.
pub async fn feed(
    path: String,
    mut closed: watch::Receiver<bool>,
    mut exited: watch::Receiver<Option<(u32, Timestamp)>>,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) {
    let mut closed2 = closed.clone();
    let mut exited2 = exited.clone();
    let cancel = async move {
        tokio::select! {
            () = is_closed(&mut closed2) => {},
            () = has_exited(&mut exited2) => {},
        }
    };
    let Some(mut from) = open_stdin(&path, cancel).await else {
        return;
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            biased;
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            },
            () = is_closed(&mut closed) => {
                // deliver what the client wrote before it said its input ended
                // (a read(2) on the non-blocking fd: Tokio's try_read answers from its cached
                // readiness and would report "nothing" without asking the kernel)
                loop {
                    match rustix::io::read(std::os::fd::AsFd::as_fd(&from), &mut buf[..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tx.send(buf[..n].to_vec()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            () = has_exited(&mut exited) => return,
        }
    }
}

async fn is_closed(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn has_exited(rx: &mut watch::Receiver<Option<(u32, Timestamp)>>) {
    // the Ref is dropped here: it must not live across an await of the caller
    let _ = rx.wait_for(|e| e.is_some()).await.is_ok();
}

/// Copy `process`'s output to the opened FIFOs until it exits; returns its shell-style exit
/// code (128 + n for signal n; 255 when the agent connection ended without a status).
pub async fn pump_output(
    mut process: ExecProcess,
    out: Option<tokio::task::JoinHandle<Option<pipe::Sender>>>,
    err: Option<tokio::task::JoinHandle<Option<pipe::Sender>>>,
) -> i32 {
    let (mut out, mut err) = tokio::join!(opened(out), opened(err));
    loop {
        match process.next_event().await {
            Some(Ok(ExecEvent::Stdout(data))) => {
                if let Some(f) = out.as_mut() {
                    if f.write_all(&data).await.is_err() {
                        out = None;
                    }
                }
            }
            Some(Ok(ExecEvent::Stderr(data))) => {
                if let Some(f) = err.as_mut() {
                    if f.write_all(&data).await.is_err() {
                        err = None;
                    }
                }
            }
            Some(Ok(ExecEvent::Exit(status))) => break status.shell_code(),
            Some(Err(e)) => {
                log::warn!("agent stream ended: {e}");
                break 255;
            }
            None => break 255,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(dir: &std::path::Path, name: &str) -> String {
        let p = dir.join(name);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        p.to_string_lossy().into_owned()
    }

    #[tokio::test]
    async fn an_output_fifo_without_a_reader_is_dropped_after_the_window() {
        let d = tempfile::tempdir().expect("tmp");
        let s = Stdio {
            stdout: fifo(d.path(), "out"),
            stderr: fifo(d.path(), "err"),
            ..Default::default()
        };
        let o = tokio::time::timeout(std::time::Duration::from_secs(1), async { s.open_outputs() })
            .await
            .expect("open does not block");
        let t = std::time::Instant::now();
        let (out, err) = tokio::join!(opened(o.stdout), opened(o.stderr));
        assert!(out.is_none() && err.is_none());
        assert!(t.elapsed() < OUTPUT_OPEN_WINDOW + std::time::Duration::from_secs(2));
    }

    #[tokio::test]
    async fn an_output_reader_that_comes_late_still_gets_everything() {
        let d = tempfile::tempdir().expect("tmp");
        let s = Stdio {
            stdout: fifo(d.path(), "out"),
            ..Default::default()
        };
        let o = s.open_outputs();
        // the client's reader shows up a little after Create (Go opens it in a goroutine)
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let path = s.stdout.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::open(path).expect("reader"), &mut all)
                .expect("read");
            all
        });
        let mut w = opened(o.stdout).await.expect("opened once the reader came");
        w.write_all(b"early output").await.expect("write");
        drop(w);
        assert_eq!(reader.await.expect("join"), b"early output");
    }

    type Exit = watch::Sender<Option<(u32, Timestamp)>>;

    /// Run [`feed`] on the FIFO at `path`; returns the bytes it sent once it ended (or None
    /// if it did not end within 5 s).
    fn start_feed(
        path: &str,
    ) -> (
        watch::Sender<bool>,
        Exit,
        tokio::task::JoinHandle<Option<Vec<u8>>>,
    ) {
        let (close_tx, close_rx) = watch::channel(false);
        let (exit_tx, exit_rx) = watch::channel(None);
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(feed(path.to_string(), close_rx, exit_rx, tx));
        let got = tokio::spawn(async move {
            let mut all = Vec::new();
            let collect = async {
                while let Some(c) = rx.recv().await {
                    all.extend_from_slice(&c);
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(5), collect)
                .await
                .ok()
                .map(|()| all)
        });
        (close_tx, exit_tx, got)
    }

    fn client_write(path: &str, data: &[u8]) -> std::fs::File {
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open writer");
        std::io::Write::write_all(&mut w, data).expect("write");
        w
    }

    #[tokio::test]
    async fn stdin_ends_when_the_client_closes_its_end() {
        let d = tempfile::tempdir().expect("tmp");
        let path = fifo(d.path(), "in");
        let (_close, _exit, got) = start_feed(&path);
        let p = path.clone();
        tokio::task::spawn_blocking(move || drop(client_write(&p, b"piped data\n")))
            .await
            .expect("client");
        assert_eq!(got.await.expect("join").as_deref(), Some(&b"piped data\n"[..]));
    }

    #[tokio::test]
    async fn close_io_delivers_what_the_fifo_holds_then_ends_with_the_client_end_still_open() {
        let d = tempfile::tempdir().expect("tmp");
        let path = fifo(d.path(), "in");
        let (close, _exit, got) = start_feed(&path);
        let p = path.clone();
        // the client writes, keeps its end open and says CloseIO at once: the race that lost
        // the data when CloseIO won over the pending read
        let w = tokio::task::spawn_blocking(move || client_write(&p, b"written before CloseIO"))
            .await
            .expect("client");
        close.send_replace(true);
        assert_eq!(
            got.await.expect("join").as_deref(),
            Some(&b"written before CloseIO"[..])
        );
        drop(w);
    }

    #[tokio::test]
    async fn close_io_without_any_writer_ends_the_input() {
        let d = tempfile::tempdir().expect("tmp");
        let path = fifo(d.path(), "in");
        let (close, _exit, got) = start_feed(&path);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        close.send_replace(true);
        assert_eq!(got.await.expect("join").as_deref(), Some(&b""[..]));
    }

    #[tokio::test]
    async fn the_process_exiting_releases_a_reader_waiting_for_a_writer() {
        let d = tempfile::tempdir().expect("tmp");
        let path = fifo(d.path(), "in");
        let (_close, exit, got) = start_feed(&path);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        exit.send_replace(Some((0, Timestamp::default())));
        assert!(got.await.expect("join").is_some(), "the feed did not end");
    }

    #[tokio::test]
    async fn a_stdin_path_that_is_not_a_fifo_is_not_read() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("plain");
        std::fs::write(&p, b"secret").expect("write");
        let (_close, _exit, got) = start_feed(&p.to_string_lossy());
        assert_eq!(got.await.expect("join").as_deref(), Some(&b""[..]));
    }
}
