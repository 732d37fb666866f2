//! The HTTP/1.1 side of the protocol peers (`ch_peer`, `fc_peer`): one request at a time on a
//! Unix socket connection, bodies by `Content-Length`, JSON answers.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;

/// An HTTP answer: status and optional JSON body.
pub type Reply = (u16, Option<Value>);

/// Method, path and body of one request.
pub type Request = (String, String, Vec<u8>);

/// Read one request; `None` at the end of the connection.
pub fn read_request(r: &mut BufReader<UnixStream>) -> Result<Option<Request>, String> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take((MAX_HEAD - head.len().min(MAX_HEAD)) as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err("truncated request".into())
            };
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err("request head too large".into());
        }
    }
    let text = String::from_utf8(head).map_err(|_| "request head is not utf-8".to_string())?;
    let mut lines = text.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let mut len = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().map_err(|_| "bad content-length".to_string())?;
            }
        }
    }
    if len > MAX_BODY {
        return Err("request body too large".into());
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(Some((method, path, body)))
}

/// Write `reply`, naming `server` in the `Server` header.
pub fn write_reply(w: &mut UnixStream, server: &str, (status, body): Reply) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        500 => "Internal Server Error",
        _ => "Unknown",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nServer: {server}\r\nConnection: keep-alive\r\n");
    let body = body.map(|b| b.to_string().into_bytes());
    if let Some(b) = &body {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    } else if status != 204 {
        out.push_str("Content-Length: 0\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(&b);
    }
    w.write_all(&bytes)?;
    w.flush()
}
