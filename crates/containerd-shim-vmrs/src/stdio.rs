//! Bridging containerd's stdio FIFOs to an agent process's streams.
//!
//! The stdin FIFO is read on a blocking thread (opening a FIFO for reading blocks until
//! containerd has the writing end) and fed to the process; end of file closes the process's
//! stdin. Output goes to the stdout/stderr FIFOs, which are closed once the process has exited
//! and all of its output is written, so containerd's copy ends before the exit is published.

use std::path::PathBuf;
use tokio::io::AsyncWriteExt;
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

/// Feed the stdin FIFO to `stdin` until end of file or until `close` is notified (CloseIO),
/// then close it.
pub fn pump_stdin(path: String, mut stdin: ExecStdin, close: std::sync::Arc<tokio::sync::Notify>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    std::thread::spawn(move || {
        use std::io::Read;
        let Ok(mut f) = std::fs::File::open(&path) else {
            return;
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(chunk) => {
                        if stdin.write(&chunk).await.is_err() {
                            return;
                        }
                    }
                    None => break,
                },
                () = close.notified() => break,
            }
        }
        let _ = stdin.close().await;
    });
}

async fn open_out(path: &str) -> Option<tokio::fs::File> {
    if path.is_empty() {
        return None;
    }
    tokio::fs::OpenOptions::new()
        .write(true)
        .open(PathBuf::from(path))
        .await
        .ok()
}

/// Copy `process`'s output to the FIFOs until it exits; returns its shell-style exit code
/// (128 + n for signal n; 255 when the agent connection ended without a status).
pub async fn pump_output(mut process: ExecProcess, stdio: &Stdio) -> i32 {
    let mut out = open_out(&stdio.stdout).await;
    let mut err = if stdio.terminal {
        None
    } else {
        open_out(&stdio.stderr).await
    };
    let code = loop {
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
    };
    if let Some(mut f) = out {
        let _ = f.flush().await;
    }
    if let Some(mut f) = err {
        let _ = f.flush().await;
    }
    code
}
