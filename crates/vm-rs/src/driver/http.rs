//! A minimal HTTP/1.1 client for the REST APIs of Cloud Hypervisor and Firecracker on a Unix
//! socket.
//!
//! The API (`/api/v1/<verb>`, see Cloud Hypervisor's `cloud-hypervisor.yaml` OpenAPI document)
//! is served by a small HTTP/1.1 server. Each call here opens a fresh connection, sends one
//! request with a `Content-Length`, and reads one response: a status line, headers, and a body
//! of exactly `Content-Length` bytes (`204 No Content` has none). Successful calls answer `200`
//! with a JSON body or `204`; errors answer `4xx`/`5xx` with a JSON array of strings, the chain
//! of error messages from outermost to innermost.
//!
//! The transport ([`ApiClient::request`]) is plain HTTP/1.1 and shared with the Firecracker
//! driver, whose API (`/boot-source`, `/actions`, ... with `PATCH`) rides the same kind of
//! socket; only the paths and the error body (`{"fault_message": ...}`) differ.
//!
//! Replies are untrusted: the head is capped at [`MAX_HEAD`] bytes, the body at [`MAX_BODY`],
//! chunked transfer encoding is refused, and every read has a deadline.

use crate::driver::DriverError;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest response head (status line + headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest response body accepted.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// HTTP method of an API call (Cloud Hypervisor uses `GET` and `PUT`, Firecracker also `PATCH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Queries (`vm.info`, `vm.counters`, `vmm.ping`).
    Get,
    /// Actions.
    Put,
    /// Partial updates (Firecracker's `PATCH /vm`).
    Patch,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes (empty for 204).
    pub body: Vec<u8>,
}

/// What a response head says about the body that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Length`, if sent.
    pub content_length: Option<usize>,
}

/// Parse a response head (everything before the blank line, without it).
pub fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not utf-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {:?}", truncate(status_line)));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| format!("bad status line {:?}", truncate(status_line)))?;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {:?}", truncate(line)));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| format!("bad content-length {:?}", truncate(value)))?;
            if n > MAX_BODY {
                return Err(format!("response body of {n} bytes exceeds {MAX_BODY}"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") && !value.eq_ignore_ascii_case("identity") {
            return Err(format!("unsupported transfer-encoding {:?}", truncate(value)));
        }
    }
    Ok(Head {
        status,
        content_length,
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Turn an error body (a JSON array of messages, or anything else) into one message.
pub fn error_message(status: u16, body: &[u8]) -> String {
    let reason = match status {
        400 => "bad request",
        404 => "not found",
        405 => "not allowed in this state",
        409 => "conflict",
        429 => "too many requests",
        500 => "internal error",
        _ => "error",
    };
    let detail = match serde_json::from_slice::<Vec<String>>(body) {
        // Drop the "Error from API" wrapper and any attached backtraces.
        Ok(chain) if !chain.is_empty() => chain
            .iter()
            .filter(|m| m.as_str() != "Error from API")
            .map(|m| m.split("\n\nStack backtrace:").next().unwrap_or_default().trim())
            .map(|m| m.chars().take(512).collect::<String>())
            .take(16)
            .collect::<Vec<_>>()
            .join(": "),
        _ => String::from_utf8_lossy(body).trim().chars().take(512).collect(),
    };
    if detail.is_empty() {
        format!("{status} {reason}")
    } else {
        format!("{status} {reason}: {detail}")
    }
}

/// Client for one API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
    vmm: &'static str,
}

impl ApiClient {
    /// A client for `socket` whose calls each time out after `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
            vmm: "cloud-hypervisor",
        }
    }

    /// The same client naming another VMM in its timeouts.
    pub fn for_vmm(mut self, vmm: &'static str) -> Self {
        self.vmm = vmm;
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Same socket, another timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            socket: self.socket.clone(),
            timeout,
            vmm: self.vmm,
        }
    }

    /// Send one Cloud Hypervisor request (`/api/v1/<verb>`) and read the raw response (any
    /// status).
    pub async fn raw(
        &self,
        method: Method,
        verb: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, DriverError> {
        let payload = match body {
            Some(v) => Some(
                serde_json::to_vec(v)
                    .map_err(|e| DriverError::Protocol(format!("cannot encode {verb} body: {e}")))?,
            ),
            None => None,
        };
        self.request(method, &format!("/api/v1/{verb}"), payload.as_deref())
            .await
    }

    /// Send one request for `path` with an optional JSON `body` and read the raw response (any
    /// status), under this client's deadline.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, DriverError> {
        let fut = self.request_inner(method, path, body);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::Timeout {
                what: format!("{} api {path}", self.vmm),
                secs: self.timeout.as_secs_f64(),
            }),
        }
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, DriverError> {
        let connect_err = |source| DriverError::Connect {
            what: "API socket",
            path: self.socket.clone(),
            source,
        };
        let mut stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(connect_err)?;
        let payload = body.unwrap_or_default();
        let mut req = format!(
            "{} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n",
            method.as_str()
        );
        if body.is_some() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(payload);
        stream.write_all(&bytes).await.map_err(connect_err)?;
        stream.flush().await.map_err(connect_err)?;
        let verb = path.trim_start_matches("/api/v1/");
        read_response(&mut stream).await.map_err(|e| match e {
            ReadError::Io(source) => connect_err(source),
            ReadError::Protocol(msg) => DriverError::Protocol(format!("{verb}: {msg}")),
        })
    }

    /// Send a request; a 2xx answer returns its body (possibly empty), anything else becomes
    /// [`DriverError::Command`] carrying the VMM's error chain.
    pub async fn call(
        &self,
        method: Method,
        verb: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, DriverError> {
        let resp = self.raw(method, verb, body).await?;
        if (200..300).contains(&resp.status) {
            Ok(resp.body)
        } else {
            Err(DriverError::Command {
                command: verb.to_string(),
                message: error_message(resp.status, &resp.body),
            })
        }
    }

    /// [`call`](Self::call) and decode a JSON answer.
    pub async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        verb: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, DriverError> {
        let bytes = self.call(method, verb, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| DriverError::Protocol(format!("{verb}: undecodable reply: {e}")))
    }
}

enum ReadError {
    Io(std::io::Error),
    Protocol(String),
}

async fn read_response(stream: &mut tokio::net::UnixStream) -> Result<Response, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = find_blank_line(&buf) {
            break pos;
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::Protocol(format!(
                "response head exceeds {MAX_HEAD} bytes"
            )));
        }
        let n = stream.read(&mut chunk).await.map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Protocol(if buf.is_empty() {
                "connection closed without a response".into()
            } else {
                "connection closed inside the response head".into()
            }));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = parse_head(&buf[..head_end]).map_err(ReadError::Protocol)?;
    let mut body = buf.split_off(head_end + 4);
    let expected = match (head.content_length, head.status) {
        (Some(n), _) => n,
        (None, 204 | 304) => 0,
        (None, s) if s < 200 => 0,
        (None, _) => {
            // No length: the body runs to the end of the connection.
            loop {
                let n = stream.read(&mut chunk).await.map_err(ReadError::Io)?;
                if n == 0 {
                    break;
                }
                if body.len() + n > MAX_BODY {
                    return Err(ReadError::Protocol(format!(
                        "response body exceeds {MAX_BODY} bytes"
                    )));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            return Ok(Response {
                status: head.status,
                body,
            });
        }
    };
    while body.len() < expected {
        let n = stream.read(&mut chunk).await.map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Protocol(format!(
                "connection closed after {} of {expected} body bytes",
                body.len()
            )));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(expected);
    Ok(Response {
        status: head.status,
        body,
    })
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heads() {
        assert_eq!(
            parse_head(b"HTTP/1.1 204 No Content\r\nServer: Cloud Hypervisor API"),
            Ok(Head {
                status: 204,
                content_length: None
            })
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\nContent-Type: application/json"),
            Ok(Head {
                status: 200,
                content_length: Some(12)
            })
        );
        assert!(parse_head(b"SSH-2.0-OpenSSH").is_err());
        assert!(parse_head(b"HTTP/1.1 99999 Huh").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nno colon here").is_err());
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            error_message(
                500,
                br#"["Error from API","The VM could not be snapshotted","GetNestedState"]"#
            ),
            "500 internal error: The VM could not be snapshotted: GetNestedState"
        );
        assert_eq!(error_message(404, b""), "404 not found");
        assert_eq!(
            error_message(500, br#"["Error from API","Could not get vCPU state GetNestedState(Invalid argument (os error 22)\n\nStack backtrace:\n   0: <unknown>)"]"#),
            "500 internal error: Could not get vCPU state GetNestedState(Invalid argument (os error 22)"
        );
        assert_eq!(error_message(400, b"plain text"), "400 bad request: plain text");
    }

    proptest! {
        #[test]
        fn head_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_head(&data);
        }

        #[test]
        fn error_message_is_bounded(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            prop_assert!(error_message(500, &data).len() < 600 * 4);
            let chain: Vec<String> = (0..50).map(|_| String::from_utf8_lossy(&data).into_owned()).collect();
            let body = serde_json::to_vec(&chain).unwrap_or_default();
            prop_assert!(error_message(500, &body).len() < 16 * 520 * 4);
        }
    }
}
