//! A small QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! QMP is newline-delimited JSON. On connect QEMU sends a greeting
//! (`{"QMP": {"version": ..., "capabilities": [...]}}`); the client must send
//! `{"execute": "qmp_capabilities"}` before any other command. Each command
//! `{"execute": NAME, "arguments": {...}, "id": N}` gets exactly one reply carrying the same `id`:
//! `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`. Asynchronous events
//! (`{"event": NAME, "data": {...}, "timestamp": {...}}`) may arrive at any time, including
//! between a command and its reply; [`Qmp::execute`] queues them for [`Qmp::next_event`].
//!
//! Replies are bounded to [`MAX_MESSAGE`] bytes per line; anything longer or not JSON is a
//! protocol error rather than unbounded buffering.
//!
//! Every exchange is bounded in time too: [`Qmp::connect`] (connect, greeting, negotiation)
//! and each [`Qmp::execute`] get the session's deadline, so a frozen QEMU (stopped with
//! `SIGSTOP`, or wedged) turns into [`DriverError::Timeout`] instead of a verb that hangs.
//! Only [`Qmp::next_event`] waits without a bound: events come when they come.

use crate::driver::DriverError;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest QMP message accepted.
pub const MAX_MESSAGE: usize = 1 << 20;

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name (`SHUTDOWN`, `STOP`, `RESUME`, `POWERDOWN`, `GUEST_PANICKED`, ...).
    pub name: String,
    /// Event data (`{}` when absent).
    pub data: Value,
}

/// A connected, capabilities-negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    line: Vec<u8>,
    /// How long one command may wait for its reply.
    timeout: Duration,
}

impl Qmp {
    /// Connect to `path`, read the greeting and negotiate capabilities, all within `timeout`;
    /// each later [`execute`](Self::execute) waits up to `timeout` for its reply as well.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, DriverError> {
        let fut = async {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|source| DriverError::Connect {
                    what: "QMP socket",
                    path: path.to_path_buf(),
                    source,
                })?;
            let (r, w) = stream.into_split();
            let mut qmp = Qmp {
                reader: BufReader::new(r),
                writer: w,
                next_id: 1,
                events: VecDeque::new(),
                line: Vec::new(),
                timeout,
            };
            let greeting = qmp.read_message().await?;
            if greeting.get("QMP").is_none() {
                return Err(DriverError::Protocol(format!(
                    "expected QMP greeting, got {greeting}"
                )));
            }
            qmp.exchange("qmp_capabilities", None).await?;
            Ok(qmp)
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::Timeout {
                what: format!("QMP greeting on {}", path.display()),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    async fn read_message(&mut self) -> Result<Value, DriverError> {
        self.line.clear();
        let n = (&mut self.reader)
            .take(MAX_MESSAGE as u64 + 1)
            .read_until(b'\n', &mut self.line)
            .await
            .map_err(|e| DriverError::Protocol(format!("reading QMP socket: {e}")))?;
        if n == 0 {
            return Err(DriverError::Protocol("QMP connection closed".into()));
        }
        if self.line.len() > MAX_MESSAGE {
            return Err(DriverError::Protocol(format!(
                "QMP message longer than {MAX_MESSAGE} bytes"
            )));
        }
        serde_json::from_slice(&self.line)
            .map_err(|e| DriverError::Protocol(format!("QMP sent invalid JSON: {e}")))
    }

    /// Run `command` with optional `arguments` and return its `return` value, or
    /// [`DriverError::Timeout`] when no reply came within the session's deadline.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, DriverError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange(command, arguments)).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::Timeout {
                what: format!("QEMU's reply to QMP command {command}"),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// Hand QEMU the file descriptor `fd` under `name` (`getfd`, the descriptor travels as
    /// `SCM_RIGHTS` with the command's bytes), for a later command that names it (`fd:NAME`
    /// migration URIs). No shell and no path is involved.
    pub async fn send_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), DriverError> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "execute": "getfd", "arguments": { "fdname": name }, "id": id });
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| DriverError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        let timeout = self.timeout;
        let exchange = async {
            self.send_with_fd(&bytes, fd).await?;
            self.reply(id, "getfd").await.map(drop)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::Timeout {
                what: "QEMU's reply to QMP command getfd".into(),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// Write `bytes` with `fd` attached (`SCM_RIGHTS`).
    async fn send_with_fd(&self, bytes: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> Result<(), DriverError> {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage};
        let stream: &UnixStream = self.writer.as_ref();
        {
            loop {
                stream
                    .writable()
                    .await
                    .map_err(|e| DriverError::Protocol(format!("writing QMP command getfd: {e}")))?;
                let fds = [fd];
                let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut anc = SendAncillaryBuffer::new(&mut space);
                anc.push(SendAncillaryMessage::ScmRights(&fds));
                let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
                    sendmsg(
                        stream,
                        &[std::io::IoSlice::new(bytes)],
                        &mut anc,
                        crate::host::send_nosignal(),
                    )
                    .map_err(std::io::Error::from)
                });
                match r {
                    // a QMP command line is far below a socket buffer: sent whole or not at all
                    Ok(n) if n == bytes.len() => return Ok(()),
                    Ok(n) => {
                        return Err(DriverError::Protocol(format!(
                            "QMP command getfd sent short ({n} of {} bytes)",
                            bytes.len()
                        )))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(DriverError::Protocol(format!("writing QMP command getfd: {e}"))),
                }
            }
        }
    }

    /// Send one command and read until its reply (no deadline of its own).
    async fn exchange(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, DriverError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| DriverError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .await
            .map_err(|e| DriverError::Protocol(format!("writing QMP command {command}: {e}")))?;
        self.reply(id, command).await
    }

    /// Read until the reply to command `id` (events on the way are queued).
    async fn reply(&mut self, id: u64, command: &str) -> Result<Value, DriverError> {
        loop {
            let reply = self.read_message().await?;
            if let Some(name) = reply.get("event").and_then(Value::as_str) {
                let data = reply.get("data").cloned().unwrap_or_else(|| json!({}));
                self.events.push_back(QmpEvent {
                    name: name.to_string(),
                    data,
                });
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                // a reply to something else (cannot happen with one outstanding command); skip
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let class = err.get("class").and_then(Value::as_str).unwrap_or("GenericError");
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("");
                return Err(DriverError::Command {
                    command: command.to_string(),
                    message: format!("{class}: {desc}"),
                });
            }
            return Err(DriverError::Protocol(format!("unexpected QMP reply: {reply}")));
        }
    }

    /// Next asynchronous event (queued or read from the socket). Errors when the connection ends.
    pub async fn next_event(&mut self) -> Result<QmpEvent, DriverError> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(ev);
        }
        loop {
            let msg = self.read_message().await?;
            if let Some(name) = msg.get("event").and_then(Value::as_str) {
                let data = msg.get("data").cloned().unwrap_or_else(|| json!({}));
                return Ok(QmpEvent {
                    name: name.to_string(),
                    data,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A QMP peer following the protocol as documented in QEMU's qmp-spec, for unit-testing the
    /// client's framing (the real QEMU is exercised by the integration tests).
    async fn peer(listener: tokio::net::UnixListener, script: Vec<&'static str>) {
        let (mut s, _) = listener.accept().await.expect("accept");
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .expect("w");
        let mut buf = vec![0u8; 4096];
        for reply in script {
            let n = s.read(&mut buf).await.expect("r");
            assert!(n > 0);
            s.write_all(reply.as_bytes()).await.expect("w");
        }
    }

    #[tokio::test]
    async fn events_between_command_and_reply_are_queued() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("q.sock");
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        let t = tokio::spawn(peer(
            l,
            vec![
                "{\"return\": {}, \"id\": 1}\n",
                "{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {\"status\": \"paused\", \"running\": false}, \"id\": 2}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": 3}\n",
            ],
        ));
        let mut q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        let st = q.execute("query-status", None).await.expect("status");
        assert_eq!(st["status"], "paused");
        let err = q.execute("stop", None).await.unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert_eq!(q.next_event().await.expect("ev").name, "STOP");
        t.await.expect("peer");
    }

    #[tokio::test]
    async fn a_peer_that_stops_answering_is_a_timeout_not_a_hang() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("q.sock");
        // 1. accepts (the kernel does, even for a frozen process) but never greets
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        let t0 = std::time::Instant::now();
        let err = Qmp::connect(&path, Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(err, DriverError::Timeout { .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        drop(l);
        // 2. greets and negotiates, then goes silent on a command
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        let peer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .expect("w");
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await.expect("r");
            s.write_all(b"{\"return\": {}, \"id\": 1}\n").await.expect("w");
            // read the next command and never answer it
            let _ = s.read(&mut buf).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let mut q = Qmp::connect(&path, Duration::from_millis(300))
            .await
            .expect("connect");
        let t0 = std::time::Instant::now();
        let err = q.execute("query-status", None).await.unwrap_err();
        assert!(
            matches!(&err, DriverError::Timeout { what, .. } if what.contains("query-status")),
            "{err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        peer.abort();
    }

    #[tokio::test]
    async fn garbage_and_eof_are_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("q.sock");
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        let t = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            s.write_all(b"not json\n").await.expect("w");
        });
        let err = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, DriverError::Protocol(_)), "{err}");
        t.await.expect("peer");
        let err = Qmp::connect(&dir.path().join("missing.sock"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::Connect { .. }), "{err}");
    }
}
