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
