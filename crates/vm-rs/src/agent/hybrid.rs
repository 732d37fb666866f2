//! The hybrid-vsock handshake: how a host process reaches a guest vsock port through a Unix
//! socket (Cloud Hypervisor, Firecracker, rust-vmm's `vhost-device-vsock`).
//!
//! The host connects to the VM's Unix socket and writes `CONNECT <port>\n`; the VMM opens a
//! vsock connection to that guest port and answers `OK <host port>\n` (the host port is the
//! ephemeral local port it picked). From then on the Unix socket carries the vsock stream.
//! When nothing listens on the guest port the VMM closes the socket without a reply (the guest
//! answered with a reset), which is what a still-booting guest looks like.
//!
//! The reply is untrusted: it is read one byte at a time up to its newline (so no stream byte
//! after it is consumed), at most [`MAX_REPLY`] bytes, within a deadline.

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest reply line accepted, newline included (`OK 4294967295\n` is 14 bytes).
pub const MAX_REPLY: usize = 32;

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The socket closed before any reply byte: nothing listens on the guest port (yet).
    #[error("the vmm closed the connection without a reply (nothing listens on vsock port {port})")]
    NoListener {
        /// The guest port.
        port: u32,
    },
    /// The reply was not `OK <port>\n`.
    #[error("bad hybrid-vsock reply to CONNECT {port}: {reply:?}")]
    BadReply {
        /// The guest port.
        port: u32,
        /// What arrived (lossy, at most [`MAX_REPLY`] bytes).
        reply: String,
    },
    /// No complete reply within the deadline.
    #[error("no hybrid-vsock reply to CONNECT {port} within {timeout:?}")]
    Timeout {
        /// The guest port.
        port: u32,
        /// How long we waited.
        timeout: Duration,
    },
    /// Reading or writing the socket failed.
    #[error("hybrid-vsock handshake i/o")]
    Io(#[source] std::io::Error),
}

/// Parse a complete reply line (without its newline): `OK <u32>`. Returns the host port.
pub fn parse_reply(line: &[u8]) -> Option<u32> {
    let rest = line.strip_prefix(b"OK ")?;
    if rest.is_empty() || rest.len() > 10 || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// Send `CONNECT <port>\n` on `stream` and read the reply, within `timeout`. On success the
/// stream carries the guest connection and the VMM's host port is returned.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    port: u32,
    timeout: Duration,
) -> Result<u32, HandshakeError> {
    match tokio::time::timeout(timeout, exchange(stream, port)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout { port, timeout }),
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    port: u32,
) -> Result<u32, HandshakeError> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(HandshakeError::Io)?;
    let mut line = Vec::with_capacity(MAX_REPLY);
    let bad = |line: &[u8]| HandshakeError::BadReply {
        port,
        reply: String::from_utf8_lossy(line).into_owned(),
    };
    loop {
        let mut b = [0u8; 1];
        let n = match stream.read(&mut b).await {
            Ok(n) => n,
            // a reset before any reply is the guest refusing, like a plain close
            Err(e) if line.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(HandshakeError::Io(e)),
        };
        if n == 0 {
            return Err(if line.is_empty() {
                HandshakeError::NoListener { port }
            } else {
                bad(&line)
            });
        }
        if b[0] == b'\n' {
            return parse_reply(&line).ok_or_else(|| bad(&line));
        }
        line.push(b[0]);
        if line.len() >= MAX_REPLY {
            return Err(bad(&line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Run the handshake against a peer that reads the request and writes `reply`, then
    /// either keeps the connection open or closes it.
    async fn against(reply: &'static [u8], close: bool) -> (Result<u32, HandshakeError>, Vec<u8>) {
        let (mut host, mut vmm) = tokio::io::duplex(4096);
        let peer = tokio::spawn(async move {
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while vmm.read(&mut b).await.unwrap_or(0) == 1 {
                req.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            vmm.write_all(reply).await.ok();
            (req, (!close).then_some(vmm))
        });
        let r = connect(&mut host, 1024, Duration::from_millis(300)).await;
        drop(host);
        let (req, _keep) = peer.await.expect("peer");
        (r, req)
    }

    #[tokio::test]
    async fn ok_reply_gives_the_host_port_and_leaves_the_stream() {
        let (mut host, mut vmm) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut req = [0u8; 13];
            vmm.read_exact(&mut req).await.unwrap();
            assert_eq!(&req, b"CONNECT 1024\n");
            vmm.write_all(b"OK 1073741824\nFRAME").await.unwrap();
        });
        assert_eq!(
            connect(&mut host, 1024, Duration::from_secs(2)).await.unwrap(),
            1073741824
        );
        let mut rest = [0u8; 5];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"FRAME", "no stream byte after the reply line is consumed");
    }

    #[tokio::test]
    async fn hostile_replies_are_clear_errors() {
        let (r, req) = against(b"OK 12", false).await;
        assert_eq!(req, b"CONNECT 1024\n");
        assert!(
            matches!(r, Err(HandshakeError::Timeout { port: 1024, .. })),
            "no newline: {r:?}"
        );
        let (r, _) = against(b"OK 12", true).await;
        assert!(
            matches!(r, Err(HandshakeError::BadReply { .. })),
            "no newline then eof: {r:?}"
        );
        let (r, _) = against(&[b'A'; 10_000], false).await;
        match r {
            Err(HandshakeError::BadReply { reply, .. }) => assert_eq!(reply.len(), MAX_REPLY),
            other => panic!("huge line: {other:?}"),
        }
        for garbage in [
            &b"OK garbage\n"[..],
            b"OK \n",
            b"OK -1\n",
            b"OK 99999999999\n",
            b"ok 5\n",
            b"OK 5 6\n",
            b"\n",
            b"NOPE\n",
        ] {
            let reply: &'static [u8] = garbage;
            let (r, _) = against(reply, false).await;
            assert!(
                matches!(r, Err(HandshakeError::BadReply { .. })),
                "{garbage:?}: {r:?}"
            );
        }
        let (r, _) = against(b"", true).await;
        assert!(
            matches!(r, Err(HandshakeError::NoListener { port: 1024 })),
            "{r:?}"
        );
    }

    #[test]
    fn parse_reply_accepts_only_ok_and_a_u32() {
        assert_eq!(parse_reply(b"OK 0"), Some(0));
        assert_eq!(parse_reply(b"OK 4294967295"), Some(u32::MAX));
        assert_eq!(parse_reply(b"OK 4294967296"), None);
        assert_eq!(parse_reply(b"OK +1"), None);
        assert_eq!(parse_reply(b"OK1"), None);
        assert_eq!(parse_reply(b"OK 1\r"), None);
    }
}
