//! The control protocol between the VZ driver and a VM's `vmrs-vz` host process.
//!
//! `vmrs-vz` serves a Unix socket (`vz.sock` in the VM directory, mode 0600 through the
//! VMM umask). Each connection carries one exchange: the driver writes one [`Request`] as a
//! JSON line, `vmrs-vz` answers one [`Reply`] as a JSON line and closes. One exchange per
//! connection keeps both ends trivial and makes a half-read reply impossible to mistake for
//! the next one; the framework's own calls are asynchronous (completion handlers), so
//! `vmrs-vz` answers a verb once its completion handler ran.
//!
//! ```text
//! driver                                   vmrs-vz
//!   {"op":"status"}\n           ─────►
//!                               ◄─────   {"result":"state","state":"running"}\n
//!   {"op":"request-stop"}\n     ─────►   (VZVirtualMachine.requestStopWithError:)
//!                               ◄─────   {"result":"ok"}\n
//! ```
//!
//! Every exchange is bounded by a deadline ([`call`]) and a reply is at most
//! [`MAX_REPLY`] bytes, so a wedged or hostile peer cannot hang or flood a verb.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest reply line accepted.
pub const MAX_REPLY: usize = 64 << 10;

/// What the driver asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Request {
    /// The machine's state.
    Status,
    /// `pauseWithCompletionHandler:`.
    Pause,
    /// `resumeWithCompletionHandler:`.
    Resume,
    /// `requestStopWithError:` — the guest is asked to power off (like an ACPI button).
    RequestStop,
    /// `stopWithCompletionHandler:` — the machine ends now; `vmrs-vz` then exits.
    Stop,
    /// `saveMachineStateToURL:completionHandler:` (macOS 14+; the machine must be paused).
    Save {
        /// File the state is written to.
        path: PathBuf,
    },
}

/// What `vmrs-vz` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Reply {
    /// The verb was carried out.
    Ok,
    /// The machine's state (for [`Request::Status`]).
    State {
        /// `VZVirtualMachine.state`.
        state: VzState,
    },
    /// The framework refused or failed; its own words.
    Error {
        /// `NSError.localizedDescription`, or why the request could not be read.
        message: String,
    },
}

/// `VZVirtualMachineState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VzState {
    /// Not started, or ended.
    Stopped,
    /// vCPUs run.
    Running,
    /// vCPUs are stopped.
    Paused,
    /// The machine hit an unrecoverable error.
    Error,
    /// Starting.
    Starting,
    /// Pausing.
    Pausing,
    /// Resuming.
    Resuming,
    /// Stopping.
    Stopping,
    /// Saving its state.
    Saving,
    /// Restoring a saved state.
    Restoring,
}

impl VzState {
    /// The driver-level status.
    pub fn status(self) -> crate::driver::VmmStatus {
        use crate::driver::VmmStatus as S;
        match self {
            VzState::Running | VzState::Resuming | VzState::Starting | VzState::Restoring => S::Running,
            VzState::Paused | VzState::Pausing | VzState::Saving => S::Paused,
            VzState::Stopped | VzState::Stopping => S::Shutdown,
            VzState::Error => S::Other,
        }
    }
}

/// One request line (JSON and a newline).
pub fn encode_request(r: &Request) -> Vec<u8> {
    let mut line = serde_json::to_vec(r).unwrap_or_default();
    line.push(b'\n');
    line
}

/// One reply line (JSON and a newline).
pub fn encode_reply(r: &Reply) -> Vec<u8> {
    let mut line = serde_json::to_vec(r).unwrap_or_default();
    line.push(b'\n');
    line
}

/// A request line as `vmrs-vz` reads it; garbage is an error reply's message.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

/// Errors of one exchange.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The socket could not be reached, or the exchange broke.
    #[error("cannot reach vmrs-vz at {}", path.display())]
    Io {
        /// Control socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No reply within the deadline.
    #[error("vmrs-vz at {} did not answer within {:.1}s", path.display(), after.as_secs_f64())]
    Timeout {
        /// Control socket.
        path: PathBuf,
        /// The deadline.
        after: Duration,
    },
    /// The reply is not a [`Reply`] line.
    #[error("vmrs-vz sent a malformed reply")]
    Malformed {
        /// Why it does not parse (or that it is too long or empty).
        #[source]
        source: serde_json::Error,
    },
    /// The reply was longer than [`MAX_REPLY`].
    #[error("vmrs-vz sent a reply longer than {MAX_REPLY} bytes")]
    TooLong,
}

impl From<ControlError> for crate::driver::DriverError {
    fn from(e: ControlError) -> Self {
        use crate::driver::DriverError as D;
        match e {
            ControlError::Io { path, source } => D::Connect {
                what: "vmrs-vz control socket",
                path,
                source,
            },
            ControlError::Timeout { after, .. } => D::Timeout {
                what: "vmrs-vz".into(),
                secs: after.as_secs_f64(),
            },
            ControlError::Malformed { source } => D::Protocol(format!("vmrs-vz reply: {source}")),
            ControlError::TooLong => D::Protocol(format!("vmrs-vz reply longer than {MAX_REPLY} bytes")),
        }
    }
}

/// One exchange on `socket`, bounded by `deadline` as a whole.
pub async fn call(socket: &Path, request: &Request, deadline: Duration) -> Result<Reply, ControlError> {
    match tokio::time::timeout(deadline, exchange(socket, request)).await {
        Ok(r) => r,
        Err(_) => Err(ControlError::Timeout {
            path: socket.to_path_buf(),
            after: deadline,
        }),
    }
}

async fn exchange(socket: &Path, request: &Request) -> Result<Reply, ControlError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |source| ControlError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = tokio::net::UnixStream::connect(socket).await.map_err(io)?;
    stream.write_all(&encode_request(request)).await.map_err(io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REPLY {
            return Err(ControlError::TooLong);
        }
        if buf.contains(&b'\n') {
            break;
        }
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    serde_json::from_slice(line).map_err(|source| ControlError::Malformed { source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn lines_are_the_documented_json() {
        assert_eq!(encode_request(&Request::Status), b"{\"op\":\"status\"}\n");
        assert_eq!(
            encode_request(&Request::RequestStop),
            b"{\"op\":\"request-stop\"}\n"
        );
        assert_eq!(
            encode_reply(&Reply::State {
                state: VzState::Running
            }),
            b"{\"result\":\"state\",\"state\":\"running\"}\n"
        );
        let save = Request::Save {
            path: "/vms/a/state.vzvmsave".into(),
        };
        assert_eq!(decode_request(&encode_request(&save)[..]).as_ref(), Ok(&save));
        assert!(decode_request(b"\xff garbage").is_err());
        assert!(decode_request(b"{\"op\":\"format-disk\"}").is_err());
    }

    #[test]
    fn states_map_to_driver_statuses() {
        use crate::driver::VmmStatus as S;
        assert_eq!(VzState::Running.status(), S::Running);
        assert_eq!(VzState::Paused.status(), S::Paused);
        assert_eq!(VzState::Saving.status(), S::Paused);
        assert_eq!(VzState::Stopped.status(), S::Shutdown);
        assert_eq!(VzState::Error.status(), S::Other);
    }

    /// A peer that answers one connection with `reply` (after reading the request line).
    async fn peer(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf, tokio::task::JoinHandle<Vec<u8>>) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("vz.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = vec![0u8; 256];
            let n = s.read(&mut got).await.expect("read");
            got.truncate(n);
            let _ = s.write_all(reply).await;
            // hold the connection open so a missing newline is the client's problem
            tokio::time::sleep(Duration::from_secs(3)).await;
            got
        });
        (dir, path, task)
    }

    #[tokio::test]
    async fn a_call_sends_one_line_and_reads_one_reply() {
        let (_dir, path, task) = peer(b"{\"result\":\"state\",\"state\":\"paused\"}\n").await;
        let r = call(&path, &Request::Status, Duration::from_secs(5))
            .await
            .expect("call");
        assert_eq!(
            r,
            Reply::State {
                state: VzState::Paused
            }
        );
        task.abort();
    }

    #[tokio::test]
    async fn error_replies_carry_the_frameworks_words() {
        let (_dir, path, task) =
            peer(b"{\"result\":\"error\",\"message\":\"Invalid state transition.\"}\n").await;
        let r = call(&path, &Request::Pause, Duration::from_secs(5))
            .await
            .expect("call");
        assert_eq!(
            r,
            Reply::Error {
                message: "Invalid state transition.".into()
            }
        );
        task.abort();
    }

    #[tokio::test]
    async fn garbage_silence_and_no_peer_are_typed_errors() {
        let (_dir, path, task) = peer(b"not json\n").await;
        let e = call(&path, &Request::Status, Duration::from_secs(5))
            .await
            .expect_err("garbage");
        assert!(matches!(e, ControlError::Malformed { .. }), "{e:?}");
        task.abort();

        let (_dir2, path, task) = peer(b"{\"result\":\"ok\"").await;
        let e = call(&path, &Request::Status, Duration::from_millis(300))
            .await
            .expect_err("no newline");
        assert!(matches!(e, ControlError::Timeout { .. }), "{e:?}");
        let d: crate::driver::DriverError = e.into();
        assert_eq!(d.kind(), crate::ErrorKind::Timeout);
        task.abort();

        let e = call(
            Path::new("/nonexistent/vz.sock"),
            &Request::Status,
            Duration::from_secs(1),
        )
        .await
        .expect_err("no peer");
        assert!(matches!(e, ControlError::Io { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn a_flood_is_cut_off() {
        static FLOOD: [u8; MAX_REPLY + 10] = [b'x'; MAX_REPLY + 10];
        let (_dir, path, task) = peer(&FLOOD).await;
        let e = call(&path, &Request::Status, Duration::from_secs(5))
            .await
            .expect_err("flood");
        assert!(matches!(e, ControlError::TooLong), "{e:?}");
        task.abort();
    }
}
