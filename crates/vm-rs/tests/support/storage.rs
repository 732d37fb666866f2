//! Test support for the storage tests: loop-mounted filesystems, extent inspection, hashing,
//! and a small HTTP server on 127.0.0.1 (see [`http`]). Included with
//! `#[path = "support/storage.rs"] mod storage_support;`.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Run a program (argument vector), panic with its output if it fails; return stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Which filesystem a [`LoopFs`] carries.
#[derive(Debug, Clone, Copy)]
pub enum FsKind {
    /// XFS with reflink enabled.
    XfsReflink,
    /// ext4 (no reflink).
    Ext4,
}

/// A filesystem in a sparse image file, loop-mounted on a temp dir; unmounted (and its loop
/// device released, `mount -o loop` sets autoclear) when dropped, even if the test failed.
pub struct LoopFs {
    mountpoint: PathBuf,
    mounted: bool,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    pub fn new(kind: FsKind) -> LoopFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("fs.img");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("mkdir");
        let size = match kind {
            FsKind::XfsReflink => 320u64 << 20,
            FsKind::Ext4 => 128 << 20,
        };
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("image");
        let image_s = image.to_str().expect("utf8");
        match kind {
            FsKind::XfsReflink => run("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", image_s]),
            FsKind::Ext4 => run("mkfs.ext4", &["-q", "-F", image_s]),
        };
        let mut fs = LoopFs {
            mountpoint,
            mounted: false,
            _dir: dir,
        };
        run(
            "mount",
            &["-o", "loop", image_s, fs.mountpoint.to_str().expect("utf8")],
        );
        fs.mounted = true;
        fs
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Free bytes on the filesystem.
    pub fn free_bytes(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.mountpoint).expect("statvfs");
        st.f_bfree * st.f_frsize
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let ok = Command::new("umount")
            .arg(&self.mountpoint)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

/// Extent flags per extent, from `filefrag -v` (e.g. `["last", "shared", "eof"]`).
pub fn extent_flags(path: &Path) -> Vec<Vec<String>> {
    let out = run("filefrag", &["-v", path.to_str().expect("utf8")]);
    out.lines()
        .filter(|l| {
            l.trim_start()
                .split(':')
                .next()
                .is_some_and(|n| !n.is_empty() && n.trim().chars().all(|c| c.is_ascii_digit()))
        })
        .map(|l| {
            // Flags are the last column when present: "... length:   expected: flags:"
            let last = l.rsplit(':').next().unwrap_or("").trim();
            last.split(',')
                .filter(|f| !f.is_empty())
                .map(|f| f.trim().to_string())
                .collect()
        })
        .collect()
}

/// Allocated bytes (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).expect("open");
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("read");
    hex::encode(h.finalize())
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tiny HTTP/1.1 file server on 127.0.0.1 for download tests. One request per connection
/// (`Connection: close`); supports `Range: bytes=N-`, and can be told to fail with a status,
/// to cut the body of the next responses short, or to ignore ranges. Stops when dropped.
pub mod http {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// What the server does next.
    #[derive(Debug, Default, Clone)]
    pub struct Behaviour {
        /// Answer every request with this status and an empty body.
        pub status: Option<u16>,
        /// Cut this many upcoming bodies short...
        pub cut_next: u32,
        /// ...after this many body bytes.
        pub cut_at: usize,
        /// Answer range requests with the full file (200).
        pub ignore_range: bool,
        /// Instead of closing a cut connection, keep it open and silent (a stalled server).
        pub stall: bool,
    }

    /// One request the server saw.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Seen {
        pub path: String,
        pub range: Option<String>,
    }

    #[derive(Default)]
    struct State {
        files: HashMap<String, Vec<u8>>,
        behaviour: Behaviour,
        seen: Vec<Seen>,
    }

    pub struct TestServer {
        addr: SocketAddr,
        state: Arc<Mutex<State>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl TestServer {
        pub async fn start() -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let state = Arc::new(Mutex::new(State::default()));
            let st = state.clone();
            let task = tokio::spawn(async move {
                while let Ok((sock, _)) = listener.accept().await {
                    let st = st.clone();
                    tokio::spawn(async move {
                        let _ = serve(sock, st).await;
                    });
                }
            });
            TestServer { addr, state, task }
        }

        pub fn url(&self, path: &str) -> String {
            format!("http://{}{}", self.addr, path)
        }

        pub fn put(&self, path: &str, data: Vec<u8>) {
            self.state
                .lock()
                .expect("lock")
                .files
                .insert(path.to_string(), data);
        }

        pub fn set(&self, b: Behaviour) {
            self.state.lock().expect("lock").behaviour = b;
        }

        pub fn seen(&self) -> Vec<Seen> {
            self.state.lock().expect("lock").seen.clone()
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn serve(mut sock: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await?;
            if n == 0 || head.len() > 16 << 10 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut lines = text.split("\r\n");
        let path = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("/")
            .to_string();
        let range = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("range"))
            .map(|(_, v)| v.trim().to_string());

        let stall = state.lock().expect("lock").behaviour.stall;
        let (status, headers, body, cut) = {
            let mut st = state.lock().expect("lock");
            st.seen.push(super::http::Seen {
                path: path.clone(),
                range: range.clone(),
            });
            let b = st.behaviour.clone();
            if let Some(code) = b.status {
                (code, String::new(), Vec::new(), None)
            } else if let Some(data) = st.files.get(&path).cloned() {
                let len = data.len();
                let start = range
                    .as_deref()
                    .filter(|_| !b.ignore_range)
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|n| n.parse::<usize>().ok());
                let cut = if b.cut_next > 0 {
                    st.behaviour.cut_next -= 1;
                    Some(b.cut_at)
                } else {
                    None
                };
                match start {
                    Some(s) if s >= len => {
                        (416, format!("Content-Range: bytes */{len}\r\n"), Vec::new(), None)
                    }
                    Some(s) => (
                        206,
                        format!("Content-Range: bytes {s}-{}/{len}\r\n", len - 1),
                        data[s..].to_vec(),
                        cut,
                    ),
                    None => (200, String::new(), data, cut),
                }
            } else {
                (404, String::new(), Vec::new(), None)
            }
        };
        let reason = match status {
            200 => "OK",
            206 => "Partial Content",
            404 => "Not Found",
            416 => "Range Not Satisfiable",
            500 => "Internal Server Error",
            _ => "Status",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n{headers}Connection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes()).await?;
        match cut {
            Some(n) if n < body.len() => {
                sock.write_all(&body[..n]).await?;
                sock.flush().await?;
                if stall {
                    // Keep the connection open and say nothing more.
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                }
                // Drop the connection mid-body.
                return Ok(());
            }
            _ => sock.write_all(&body).await?,
        }
        sock.shutdown().await
    }
}
