//! Building the guest initramfs (an uncompressed newc cpio archive).
//!
//! [`InitramfsBuilder`] collects directories, files (from disk or memory), symlinks and device
//! nodes by guest path and writes them with every directory before its contents; parent
//! directories are added automatically. [`InitramfsSpec`] + [`build_initramfs`] assemble the
//! standard vm-rs image:
//!
//! ```text
//! /init                       the static vmrs-init (PID 1)
//! /bin/busybox, /bin/<applet> busybox and symlinks for the applets in BUSYBOX_APPLETS
//! /lib/modules/<kver>/*.ko    the resolved modules, flat, by name
//! /etc/vmrs/modules           their load order: one absolute .ko path per line
//! /etc/passwd, /etc/group     root only
//! /dev/console, /dev/null     so PID 1 starts with a console before devtmpfs is mounted
//! /proc /sys /dev /tmp /run /mnt /root /var
//! ```
//!
//! The archive is uncompressed: under TCG the kernel unpacks it faster than it would decompress
//! it. Output is written to a temporary file, fsynced and renamed into place.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::cpio::{CpioEntry, CpioWriter, S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG};
use super::modules::{ModuleEntry, ModuleIndex};
use super::GuestError;

/// Busybox applets linked into `/bin` (the init and the tests use these).
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "ip",
    "ifconfig",
    "route",
    "mount",
    "umount",
    "ls",
    "cat",
    "echo",
    "printf",
    "poweroff",
    "reboot",
    "halt",
    "httpd",
    "nc",
    "wget",
    "ping",
    "udhcpc",
    "sleep",
    "ps",
    "kill",
    "mkdir",
    "rm",
    "rmdir",
    "cp",
    "mv",
    "ln",
    "chmod",
    "chown",
    "touch",
    "dmesg",
    "uname",
    "hostname",
    "grep",
    "sed",
    "awk",
    "head",
    "tail",
    "wc",
    "sort",
    "uniq",
    "cut",
    "tr",
    "tee",
    "sync",
    "free",
    "df",
    "du",
    "date",
    "env",
    "id",
    "true",
    "false",
    "test",
    "[",
    "find",
    "xargs",
    "tar",
    "gzip",
    "gunzip",
    "dd",
    "stat",
    "sha256sum",
    "md5sum",
    "seq",
    "which",
    "mknod",
    "insmod",
    "lsmod",
    "rmmod",
    "readlink",
    "realpath",
    "basename",
    "dirname",
    "pwd",
    "vi",
    "less",
    "more",
    "top",
    "uptime",
    "whoami",
    "su",
    "chroot",
    "switch_root",
    "nslookup",
    "telnet",
    "arp",
    "netstat",
    "mkfifo",
    "yes",
    "od",
    "hexdump",
    "base64",
    "expr",
    "timeout",
    "nohup",
    "setsid",
    "losetup",
    "blkid",
    "mountpoint",
    "watch",
    "usleep",
    "mktemp",
];

/// Modules every guest needs: virtio-mmio transport, block, net, console, and the ACPI power
/// button with `evdev` (without it the button has no `/dev/input/event*` node for the init).
pub const REQUIRED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "button",
    "evdev",
];

/// Modules added when the kernel has them (built-in or absent ones are skipped).
pub const OPTIONAL_MODULES: &[&str] = &[
    "virtio_rng",
    "virtiofs",
    "erofs",
    "overlay",
    "ext4",
    "af_packet",
    "vmw_vsock_virtio_transport",
];

#[derive(Debug, Clone)]
enum Node {
    Dir { mode: u32 },
    File { source: FileSource, mode: u32 },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
enum FileSource {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// Collects initramfs contents by guest path, then writes a newc archive.
#[derive(Debug, Clone, Default)]
pub struct InitramfsBuilder {
    nodes: BTreeMap<String, Node>,
}

/// Normalise a guest path: strip leading `/`, reject `.`/`..`/empty components.
fn guest_path(path: &str) -> Result<String, GuestError> {
    let trimmed = path.trim_start_matches('/');
    let ok = !trimmed.is_empty()
        && trimmed
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'));
    if ok {
        Ok(trimmed.to_string())
    } else {
        Err(GuestError::BadGuestPath {
            path: path.to_string(),
        })
    }
}

impl InitramfsBuilder {
    /// An empty image.
    pub fn new() -> Self {
        Self::default()
    }

    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let mut parts: Vec<&str> = path.split('/').collect();
        parts.pop();
        for p in parts {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            self.nodes.entry(acc.clone()).or_insert(Node::Dir { mode: 0o755 });
        }
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<&mut Self, GuestError> {
        let p = guest_path(path)?;
        self.parents(&p);
        self.nodes.insert(p, node);
        Ok(self)
    }

    /// Add a directory with permission bits `mode`.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, GuestError> {
        self.insert(path, Node::Dir { mode: mode & 0o7777 })
    }

    /// Add a file copied from `source` on the host when the archive is written.
    pub fn file_from(
        &mut self,
        path: &str,
        source: impl Into<PathBuf>,
        mode: u32,
    ) -> Result<&mut Self, GuestError> {
        self.insert(
            path,
            Node::File {
                source: FileSource::Path(source.into()),
                mode: mode & 0o7777,
            },
        )
    }

    /// Add a file with the given contents.
    pub fn file_bytes(
        &mut self,
        path: &str,
        data: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Result<&mut Self, GuestError> {
        self.insert(
            path,
            Node::File {
                source: FileSource::Bytes(data.into()),
                mode: mode & 0o7777,
            },
        )
    }

    /// Add a symlink to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, GuestError> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Add a character device node.
    pub fn char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, GuestError> {
        self.insert(
            path,
            Node::CharDev {
                mode: mode & 0o7777,
                major,
                minor,
            },
        )
    }

    /// Guest paths currently in the image, sorted (directories precede their contents).
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// Write the archive to `out` atomically (temp file in the same directory, fsync, rename).
    /// Blocking.
    pub fn write_to(&self, out: &Path) -> Result<(), GuestError> {
        let dir = out.parent().unwrap_or_else(|| Path::new("."));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| GuestError::Io { path, source }
        };
        let tmp = tempfile::Builder::new()
            .prefix(".initramfs-")
            .tempfile_in(dir)
            .map_err(io(dir))?;
        let mut w = CpioWriter::new(BufWriter::new(tmp.as_file()));
        // BTreeMap order puts "a" before "a/b": directories come before their contents.
        for (name, node) in &self.nodes {
            let mut entry = CpioEntry {
                name: name.clone(),
                mode: 0,
                uid: 0,
                gid: 0,
                rdev: (0, 0),
                data: Vec::new(),
            };
            match node {
                Node::Dir { mode } => {
                    entry.mode = S_IFDIR | mode;
                    w.append(&entry).map_err(io(out))?;
                }
                Node::Symlink { target } => {
                    entry.mode = S_IFLNK | 0o777;
                    entry.data = target.as_bytes().to_vec();
                    w.append(&entry).map_err(io(out))?;
                }
                Node::CharDev { mode, major, minor } => {
                    entry.mode = S_IFCHR | mode;
                    entry.rdev = (*major, *minor);
                    w.append(&entry).map_err(io(out))?;
                }
                Node::File {
                    source: FileSource::Bytes(data),
                    mode,
                } => {
                    entry.mode = S_IFREG | mode;
                    entry.data = data.clone();
                    w.append(&entry).map_err(io(out))?;
                }
                Node::File {
                    source: FileSource::Path(src),
                    mode,
                } => {
                    entry.mode = S_IFREG | mode;
                    let mut f = std::fs::File::open(src).map_err(io(src))?;
                    let len = f.metadata().map_err(io(src))?.len();
                    w.append_reader(&entry, len, &mut f).map_err(io(src))?;
                }
            }
        }
        let mut buf = w.finish().map_err(io(out))?;
        buf.flush().map_err(io(out))?;
        drop(buf);
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(io(out))?;
        }
        tmp.as_file().sync_all().map_err(io(out))?;
        tmp.persist(out).map_err(|e| GuestError::Io {
            path: out.to_path_buf(),
            source: e.error,
        })?;
        Ok(())
    }
}

/// Inputs of the standard vm-rs initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// The static `vmrs-init` binary (becomes `/init`).
    pub init: PathBuf,
    /// The static busybox binary.
    pub busybox: PathBuf,
    /// The kernel's modules tree (`.../modules/<kver>`).
    pub modules_dir: PathBuf,
    /// Kernel version (`uname -r`), names `/lib/modules/<kver>`.
    pub kernel_version: String,
    /// Modules that must be present (or built in); default [`REQUIRED_MODULES`].
    pub required_modules: Vec<String>,
    /// Modules added when available; default [`OPTIONAL_MODULES`].
    pub optional_modules: Vec<String>,
    /// Extra contents added on top (may replace standard files).
    pub extra: InitramfsBuilder,
    /// Where to write the archive.
    pub output: PathBuf,
}

impl InitramfsSpec {
    /// A spec with the default module sets and no extras.
    pub fn new(
        init: impl Into<PathBuf>,
        busybox: impl Into<PathBuf>,
        modules_dir: impl Into<PathBuf>,
        kernel_version: impl Into<String>,
        output: impl Into<PathBuf>,
    ) -> Self {
        Self {
            init: init.into(),
            busybox: busybox.into(),
            modules_dir: modules_dir.into(),
            kernel_version: kernel_version.into(),
            required_modules: REQUIRED_MODULES.iter().map(|s| s.to_string()).collect(),
            optional_modules: OPTIONAL_MODULES.iter().map(|s| s.to_string()).collect(),
            extra: InitramfsBuilder::new(),
            output: output.into(),
        }
    }
}

/// What went into an initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsReport {
    /// Module names in load order.
    pub modules: Vec<String>,
    /// Size of the archive in bytes.
    pub size: u64,
}

/// Assemble the standard image described by `spec` into a builder (resolving modules). Blocking.
pub fn standard_image(spec: &InitramfsSpec) -> Result<(InitramfsBuilder, Vec<ModuleEntry>), GuestError> {
    for p in [&spec.init, &spec.busybox] {
        if !p.is_file() {
            return Err(GuestError::MissingFile { path: p.clone() });
        }
    }
    let kver = guest_path(&spec.kernel_version)?;
    if kver.contains('/') {
        return Err(GuestError::BadGuestPath {
            path: spec.kernel_version.clone(),
        });
    }
    let index = ModuleIndex::scan(&spec.modules_dir)?;
    let required: Vec<&str> = spec.required_modules.iter().map(String::as_str).collect();
    let optional: Vec<&str> = spec.optional_modules.iter().map(String::as_str).collect();
    let order = index.resolve(&required, &optional)?;

    let mut b = InitramfsBuilder::new();
    for d in [
        "proc", "sys", "dev", "tmp", "run", "mnt", "etc", "root", "var", "sbin", "usr/bin", "usr/sbin",
    ] {
        b.dir(d, 0o755)?;
    }
    b.dir("tmp", 0o1777)?;
    b.dir("root", 0o700)?;
    b.char_device("dev/console", 0o600, 5, 1)?;
    b.char_device("dev/null", 0o666, 1, 3)?;
    b.file_from("init", &spec.init, 0o755)?;
    b.file_from("bin/busybox", &spec.busybox, 0o755)?;
    for applet in BUSYBOX_APPLETS {
        b.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    let mut load_list = String::new();
    for m in &order {
        let guest = format!("lib/modules/{kver}/{}.ko", m.name);
        b.file_from(&guest, &m.path, 0o644)?;
        load_list.push('/');
        load_list.push_str(&guest);
        load_list.push('\n');
    }
    b.file_bytes("etc/vmrs/modules", load_list, 0o644)?;
    b.file_bytes("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
    b.file_bytes("etc/group", "root:x:0:\n", 0o644)?;
    b.file_bytes("etc/hosts", "127.0.0.1 localhost\n", 0o644)?;
    for (path, node) in &spec.extra.nodes {
        b.parents(path);
        b.nodes.insert(path.clone(), node.clone());
    }
    Ok((b, order))
}

/// Build the standard initramfs described by `spec` and write it to `spec.output`.
/// Runs the blocking work on tokio's blocking pool.
pub async fn build_initramfs(spec: InitramfsSpec) -> Result<InitramfsReport, GuestError> {
    tokio::task::spawn_blocking(move || build_initramfs_blocking(&spec))
        .await
        .map_err(GuestError::Task)?
}

/// Blocking variant of [`build_initramfs`].
pub fn build_initramfs_blocking(spec: &InitramfsSpec) -> Result<InitramfsReport, GuestError> {
    let (builder, order) = standard_image(spec)?;
    builder.write_to(&spec.output)?;
    let size = std::fs::metadata(&spec.output)
        .map_err(|source| GuestError::Io {
            path: spec.output.clone(),
            source,
        })?
        .len();
    Ok(InitramfsReport {
        modules: order.into_iter().map(|m| m.name).collect(),
        size,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::guest::cpio::read_newc;

    #[test]
    fn rejects_escaping_paths() {
        let mut b = InitramfsBuilder::new();
        for bad in ["", "/", "../x", "a/../b", "a//b", "./a"] {
            assert!(b.dir(bad, 0o755).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parents_come_first_and_modes_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = InitramfsBuilder::new();
        b.file_bytes("/usr/lib/x/file", "data", 0o640).unwrap();
        b.symlink("/bin/sh", "busybox").unwrap();
        b.dir("/a", 0o700).unwrap();
        let out = dir.path().join("img");
        b.write_to(&out).unwrap();
        let entries = read_newc(&std::fs::read(&out).unwrap()).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a",
                "bin",
                "bin/sh",
                "usr",
                "usr/lib",
                "usr/lib/x",
                "usr/lib/x/file"
            ]
        );
        let file = entries.iter().find(|e| e.name == "usr/lib/x/file").unwrap();
        assert_eq!(file.mode, S_IFREG | 0o640);
        assert_eq!(file.data, b"data");
        let a = entries.iter().find(|e| e.name == "a").unwrap();
        assert_eq!(a.mode, S_IFDIR | 0o700);
    }
}
