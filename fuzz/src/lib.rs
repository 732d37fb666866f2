//! Helpers shared by the fuzz targets: a tokio runtime, a peer that answers one connection
//! with the fuzzer's bytes, and a sandbox that proves a writer stayed inside its root.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

/// How long one fuzz input may keep a client busy. Every peer here ends its connection after
/// sending, so a client still waiting after this is hung: a bug (reliability invariant 4).
pub const HANG: Duration = Duration::from_secs(10);

/// A current-thread runtime with I/O, timers and a blocking pool (as the library expects).
pub fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build a tokio runtime: {e}"),
    }
}

/// A Unix socket that serves fuzz bytes: each accepted connection gets `reply` written to it
/// and is then closed. Lives in its own temporary directory.
#[derive(Debug)]
pub struct Peer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
}

impl Peer {
    /// Bind a fresh socket (call inside the runtime).
    pub fn bind() -> Peer {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let path = dir.path().join("peer.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => panic!("bind {}: {e}", path.display()),
        };
        Peer {
            _dir: dir,
            path,
            listener,
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept connections for as long as the returned future runs (it never completes); each one gets the next of
    /// `replies` (then nothing), written whole before the socket is closed. The client's request
    /// stays unread in the socket buffer, which a Unix socket does not turn into a reset.
    pub async fn serve(&self, replies: Vec<Vec<u8>>) {
        let mut replies = replies.into_iter();
        loop {
            let Ok((mut stream, _)) = self.listener.accept().await else {
                // Never ends on its own, so a caller can select! it against the client.
                return std::future::pending().await;
            };
            let reply = replies.next().unwrap_or_default();
            let _ = stream.write_all(&reply).await;
            let _ = stream.shutdown().await;
        }
    }
}

/// What a path in the sandbox looks like, for before/after comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// File type and permission bits.
    pub mode: u32,
    /// Link count (a hardlink made to an outside file raises it).
    pub nlink: u64,
    /// Size in bytes.
    pub size: u64,
    /// Content of regular files, target of symlinks.
    pub content: Vec<u8>,
}

/// A temporary directory holding `root/` (where the code under test may write) and
/// `outside/` with a few decoys (a file, a directory, a symlink back up) that nothing may
/// touch. [`Sandbox::check`] panics when anything outside `root/` changed.
#[derive(Debug)]
pub struct Sandbox {
    dir: tempfile::TempDir,
    before: BTreeMap<PathBuf, Node>,
}

impl Sandbox {
    /// A fresh sandbox.
    pub fn new() -> Sandbox {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let base = dir.path();
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir(base.join("root"))?;
            std::fs::create_dir_all(base.join("outside/dir"))?;
            std::fs::write(base.join("outside/sentinel"), b"do not touch")?;
            std::fs::write(base.join("outside/dir/file"), b"nor this")?;
            std::os::unix::fs::symlink("..", base.join("outside/up"))?;
            Ok(())
        })();
        if let Err(e) = made {
            panic!("building the sandbox: {e}");
        }
        let before = snapshot_outside(base);
        Sandbox { dir, before }
    }

    /// The directory the code under test may write to.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The sandbox directory itself (parent of `root/` and `outside/`).
    pub fn base(&self) -> &Path {
        self.dir.path()
    }

    /// Panic if anything beside `root/` was created, removed or changed.
    pub fn check(&self) {
        let after = snapshot_outside(self.dir.path());
        if after != self.before {
            let mut diff = String::new();
            for path in self.before.keys().chain(after.keys()) {
                let (b, a) = (self.before.get(path), after.get(path));
                if b != a && !diff.contains(&format!("{}:", path.display())) {
                    diff.push_str(&format!("  {}: {b:?} -> {a:?}\n", path.display()));
                }
            }
            panic!("a write escaped the root:\n{diff}");
        }
        // Nothing under root/ may be a hardlink of an outside file: the snapshot's link counts
        // cover that. And root/ itself must still be a directory.
        match std::fs::symlink_metadata(self.root()) {
            Ok(m) if m.is_dir() => {}
            other => panic!("root/ is no longer a directory: {other:?}"),
        }
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new()
    }
}

/// Every path below `base` except those under `base/root`, with what it looks like.
fn snapshot_outside(base: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![base.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path == base.join("root") {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let content = if meta.file_type().is_symlink() {
                std::fs::read_link(&path)
                    .map(|p| p.into_os_string().into_encoded_bytes())
                    .unwrap_or_default()
            } else if meta.is_file() {
                std::fs::read(&path).unwrap_or_default()
            } else {
                Vec::new()
            };
            if meta.is_dir() {
                stack.push(path.clone());
            }
            let rel = path.strip_prefix(base).unwrap_or(&path).to_path_buf();
            out.insert(
                rel,
                Node {
                    mode: meta.mode(),
                    nlink: meta.nlink(),
                    size: meta.size(),
                    content,
                },
            );
        }
    }
    out
}

/// Split `data` at the offsets given by `cuts` (each taken modulo the remaining length), so a
/// target can check that a streaming parser gives the same answer however its input arrives.
pub fn chunks<'a>(data: &'a [u8], cuts: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    for &c in cuts {
        if rest.is_empty() {
            break;
        }
        let n = (c as usize % rest.len()) + 1;
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}
