//! A loopback HTTP proxy in front of the test registry that injects faults into the replies
//! for chosen blobs: cut the connection mid-body, truncate the body, corrupt bytes, answer
//! 500. Each connection carries one request (`Connection: close` is forced), so every
//! request can be steered. The listener thread stops when the guard is dropped.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to do to a matching request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Relay the headers and this many body bytes, then reset the connection.
    CutAfter(usize),
    /// Relay the headers (full Content-Length) and half the body, then close cleanly.
    TruncateHalf,
    /// Flip one byte in the middle of the body.
    Corrupt,
    /// Answer 500 without asking the registry.
    Status500,
}

/// One logged request.
#[derive(Clone, Debug)]
pub struct Logged {
    pub path: String,
    pub range: Option<String>,
    pub faulted: bool,
}

struct Shared {
    upstream: SocketAddr,
    target: Mutex<Option<String>>,
    fault: Mutex<Option<Fault>>,
    remaining: AtomicUsize,
    log: Mutex<Vec<Logged>>,
    stop: AtomicBool,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            upstream,
            target: Mutex::new(None),
            fault: Mutex::new(None),
            remaining: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || {
                            let _ = handle(conn, &s);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Inject `fault` into the next `times` requests whose path contains `path_part`.
    pub fn inject(&self, path_part: &str, fault: Fault, times: usize) {
        *self.shared.target.lock().unwrap() = Some(path_part.to_owned());
        *self.shared.fault.lock().unwrap() = Some(fault);
        self.shared.remaining.store(times, Ordering::SeqCst);
    }

    pub fn log(&self) -> Vec<Logged> {
        self.shared.log.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
        if head.len() > 64 << 10 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    Ok(head)
}

fn handle(mut client: TcpStream, s: &Shared) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = read_head(&mut client)?;
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut range = None;
    let mut out = format!("{request_line}\r\n");
    for l in lines {
        if l.is_empty() {
            continue;
        }
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("connection:") {
            continue;
        }
        if lower.starts_with("range:") {
            range = Some(l[6..].trim().to_owned());
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");

    let matches = s
        .target
        .lock()
        .unwrap()
        .as_ref()
        .is_some_and(|t| path.contains(t.as_str()));
    let fault = if matches
        && s.remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        *s.fault.lock().unwrap()
    } else {
        None
    };
    s.log.lock().unwrap().push(Logged {
        path: path.clone(),
        range,
        faulted: fault.is_some(),
    });
    if fault == Some(Fault::Status500) {
        client.write_all(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let mut up = TcpStream::connect(s.upstream)?;
    up.write_all(out.as_bytes())?;
    let resp_head = read_head(&mut up)?;
    let mut body = Vec::new();
    up.read_to_end(&mut body)?;
    client.write_all(&resp_head)?;
    match fault {
        None | Some(Fault::Status500) => client.write_all(&body)?,
        Some(Fault::CutAfter(n)) => {
            client.write_all(&body[..n.min(body.len())])?;
            client.flush()?;
            // Reset instead of a clean close.
            set_linger_zero(&client);
            drop(client);
            return Ok(());
        }
        Some(Fault::TruncateHalf) => {
            client.write_all(&body[..body.len() / 2])?;
            client.shutdown(Shutdown::Both)?;
        }
        Some(Fault::Corrupt) => {
            let mut b = body;
            if !b.is_empty() {
                let mid = b.len() / 2;
                b[mid] ^= 0xff;
            }
            client.write_all(&b)?;
        }
    }
    Ok(())
}

/// Sets SO_LINGER {on, 0} so closing the socket sends RST.
fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a valid, owned socket fd with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
