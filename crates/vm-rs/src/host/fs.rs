//! File-system calls that differ between hosts, behind one interface: confined opens
//! ([`openat_confined`]: `openat2(2)` on Linux, a component-by-component walk elsewhere),
//! `O_PATH` ([`O_PATH`]), permission bits ([`mode`]), device nodes ([`mknodat`]) and early
//! write-back ([`start_writeback`]).
//!
//! The walk ([`openat_walk`]) is the portable form of `openat2`'s two resolution modes vm-rs
//! uses, built from `openat(O_NOFOLLOW)`, `fstatat` and `readlinkat` only: every component is
//! opened relative to the directory before it without following symlinks, so a symlink swapped
//! in between the check and the open fails the open (`ELOOP`) instead of leading outside. On
//! Linux it is tested against `openat2` itself.

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

/// How [`openat_confined`] resolves a path below its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confine {
    /// As if the directory were `/`: absolute symlinks and `..` stay inside
    /// (`RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`).
    InRoot,
    /// Below the directory, without following any symlink: a symlink is `ELOOP`, leaving the
    /// directory (an absolute path, `..` above it) is `EXDEV`
    /// (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`).
    NoSymlinks,
}

/// `O_PATH` where the host has it (Linux); elsewhere no flag (a read-only open, which a
/// directory allows).
#[cfg(target_os = "linux")]
pub const O_PATH: OFlags = OFlags::PATH;
/// `O_PATH` where the host has it (Linux); elsewhere no flag (a read-only open, which a
/// directory allows).
#[cfg(not(target_os = "linux"))]
pub const O_PATH: OFlags = OFlags::empty();

/// Permission bits (the low 12 bits of `bits`) as the host's mode type.
#[cfg(target_os = "linux")]
pub fn mode(bits: u32) -> Mode {
    Mode::from_raw_mode(bits & 0o7777)
}

/// Permission bits (the low 12 bits of `bits`) as the host's mode type.
#[cfg(not(target_os = "linux"))]
pub fn mode(bits: u32) -> Mode {
    // masked to 12 bits, so it fits the host's 16-bit mode_t
    #[allow(clippy::cast_possible_truncation)]
    Mode::from_raw_mode((bits & 0o7777) as rustix::fs::RawMode)
}

/// Open `path` below `dir` under `confine`.
pub fn openat_confined(
    dir: BorrowedFd<'_>,
    path: &OsStr,
    flags: OFlags,
    mode: Mode,
    confine: Confine,
) -> Result<OwnedFd, Errno> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::ResolveFlags as R;
        let resolve = match confine {
            Confine::InRoot => R::IN_ROOT | R::NO_MAGICLINKS,
            Confine::NoSymlinks => R::BENEATH | R::NO_SYMLINKS | R::NO_MAGICLINKS,
        };
        rustix::fs::openat2(dir, path, flags, mode, resolve)
    }
    #[cfg(not(target_os = "linux"))]
    {
        openat_walk(dir, path, flags, mode, confine)
    }
}

/// Most symlinks one resolution follows (Linux's limit).
const MAX_LINKS: usize = 40;

fn components(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
}

/// The portable form of [`openat_confined`] (see the module docs).
pub fn openat_walk(
    dir: BorrowedFd<'_>,
    path: &OsStr,
    flags: OFlags,
    mode: Mode,
    confine: Confine,
) -> Result<OwnedFd, Errno> {
    let path = path.as_bytes();
    if path.is_empty() {
        // as openat(2): an empty path names nothing
        return Err(Errno::NOENT);
    }
    if path.starts_with(b"/") && confine == Confine::NoSymlinks {
        return Err(Errno::XDEV);
    }
    // directories entered below `dir`, innermost last
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut queue: VecDeque<Vec<u8>> = components(path).collect();
    let mut links = 0usize;
    let dir_flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
    loop {
        let cur = stack.last().map_or(dir, AsFd::as_fd);
        let Some(comp) = queue.pop_front() else {
            return rustix::fs::openat(cur, ".", flags, mode);
        };
        if comp == b".." {
            if stack.pop().is_none() && confine == Confine::NoSymlinks {
                return Err(Errno::XDEV);
            }
            continue;
        }
        let name = OsStr::from_bytes(&comp);
        let last = queue.is_empty();
        let is_link = match rustix::fs::statat(cur, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink,
            Err(Errno::NOENT) => false,
            Err(e) => return Err(e),
        };
        if is_link {
            if confine == Confine::NoSymlinks {
                return Err(Errno::LOOP);
            }
            if last && flags.contains(OFlags::NOFOLLOW) {
                return rustix::fs::openat(cur, name, flags, mode);
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(Errno::LOOP);
            }
            let target = rustix::fs::readlinkat(cur, name, Vec::new())?;
            let target = target.as_bytes();
            if target.starts_with(b"/") {
                stack.clear();
            }
            for c in components(target).collect::<Vec<_>>().into_iter().rev() {
                queue.push_front(c);
            }
            continue;
        }
        if last {
            return rustix::fs::openat(cur, name, flags | OFlags::NOFOLLOW, mode);
        }
        let fd = rustix::fs::openat(cur, name, dir_flags, Mode::empty())?;
        stack.push(fd);
    }
}

/// `mknodat(2)`: a FIFO or device node. Hosts without it in rustix (macOS) answer
/// `ENOTSUP`.
pub fn mknodat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    file_type: rustix::fs::FileType,
    mode: Mode,
    dev: rustix::fs::Dev,
) -> Result<(), Errno> {
    #[cfg(target_os = "linux")]
    {
        rustix::fs::mknodat(dir, name, file_type, mode, dev)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (dir, name, file_type, mode, dev);
        Err(Errno::NOTSUP)
    }
}

/// Start writing `len` bytes at `offset` of `fd` back to disk without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on Linux; nothing elsewhere, where the page cache
/// decides).
pub fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: sync_file_range only reads its integer arguments; `fd` is a valid open
        // descriptor borrowed for the call. Its result is advisory and ignored.
        unsafe {
            libc::sync_file_range(fd.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, offset, len);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A tree with every kind of hostile link.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path().join("root");
        std::fs::create_dir_all(r.join("usr/lib/x")).expect("mkdir");
        std::fs::create_dir_all(t.path().join("outside")).expect("mkdir");
        std::fs::write(r.join("usr/lib/x/file"), b"in").expect("write");
        std::fs::write(t.path().join("outside/file"), b"out").expect("write");
        symlink("usr/lib", r.join("lib")).expect("link");
        symlink("/usr/lib", r.join("abs")).expect("link");
        symlink("../../outside", r.join("usr/escape")).expect("link");
        symlink("/../../../outside", r.join("absescape")).expect("link");
        symlink("loop2", r.join("loop1")).expect("link");
        symlink("loop1", r.join("loop2")).expect("link");
        symlink("x/file", r.join("usr/lib/tofile")).expect("link");
        t
    }

    fn content(fd: Result<OwnedFd, Errno>) -> Result<String, Errno> {
        let fd = fd?;
        let mut f = std::fs::File::from(fd);
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).map_err(|_| Errno::ISDIR)?;
        Ok(s)
    }

    fn ino(fd: Result<OwnedFd, Errno>) -> Result<u64, Errno> {
        Ok(rustix::fs::fstat(fd?)?.st_ino)
    }

    #[test]
    fn the_walk_resolves_like_openat2() {
        let t = tree();
        let root = rustix::fs::open(
            t.path().join("root"),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .expect("root");
        let dirs = [
            "",
            ".",
            "usr",
            "usr/lib/x",
            "lib",
            "lib/x",
            "abs/x",
            "usr/escape",
            "absescape",
            "../..",
            "/usr",
            "usr/../../lib",
            "loop1",
            "missing",
            "usr/missing/x",
            "lib/tofile",
            "usr/lib/x/file",
        ];
        for confine in [Confine::InRoot, Confine::NoSymlinks] {
            for p in dirs {
                let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
                let want = ino(openat_confined(
                    root.as_fd(),
                    OsStr::new(p),
                    flags,
                    Mode::empty(),
                    confine,
                ));
                let got = ino(openat_walk(
                    root.as_fd(),
                    OsStr::new(p),
                    flags,
                    Mode::empty(),
                    confine,
                ));
                assert_eq!(got, want, "{confine:?} directory {p:?}");
            }
            for p in [
                "usr/lib/x/file",
                "lib/x/file",
                "abs/x/file",
                "usr/lib/tofile",
                "usr/escape/file",
                "absescape/file",
            ] {
                let want = content(openat_confined(
                    root.as_fd(),
                    OsStr::new(p),
                    OFlags::RDONLY,
                    Mode::empty(),
                    confine,
                ));
                let got = content(openat_walk(
                    root.as_fd(),
                    OsStr::new(p),
                    OFlags::RDONLY,
                    Mode::empty(),
                    confine,
                ));
                assert_eq!(got, want, "{confine:?} file {p:?}");
                assert_ne!(got.as_deref(), Ok("out"), "escaped the root through {p:?}");
            }
        }
    }

    #[test]
    fn the_walk_creates_inside_the_root_only() {
        let t = tree();
        let root = rustix::fs::open(
            t.path().join("root"),
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .expect("root");
        let flags = OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC;
        // through an escaping link: lands inside the root (InRoot) or is refused
        let r = openat_walk(
            root.as_fd(),
            OsStr::new("absescape/new"),
            flags,
            mode(0o644),
            Confine::InRoot,
        );
        assert_eq!(
            r.err(),
            Some(Errno::NOENT),
            "/outside does not exist inside the root"
        );
        assert!(!t.path().join("outside/new").exists());
        let r = openat_walk(
            root.as_fd(),
            OsStr::new("lib/new"),
            flags,
            mode(0o644),
            Confine::InRoot,
        );
        assert!(r.is_ok());
        assert!(t.path().join("root/usr/lib/new").exists());
        let r = openat_walk(
            root.as_fd(),
            OsStr::new("lib/new2"),
            flags,
            mode(0o644),
            Confine::NoSymlinks,
        );
        assert_eq!(r.err(), Some(Errno::LOOP));
    }

    #[test]
    fn modes_keep_permission_bits_only() {
        assert_eq!(mode(0o100_755).as_raw_mode(), 0o755);
        assert_eq!(mode(0o4755).as_raw_mode(), 0o4755);
    }
}
