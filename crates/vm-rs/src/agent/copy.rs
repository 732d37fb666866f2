//! Host side of copies: turning a host tree into entry/data messages, and writing a tree
//! received from the (untrusted) guest under a destination without ever leaving it.
//!
//! Writing resolves every parent with `openat2(root, parent, RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` and creates the last component with `O_NOFOLLOW` relative to that
//! parent, so neither `..`, absolute paths nor symlinks (pre-existing or sent earlier in the same
//! copy) can redirect a write outside the destination. Both functions are blocking.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::host::fs::{Confine, O_PATH};
use rustix::fs::{Mode, OFlags};
use tokio::sync::mpsc;
use vmrs_proto::{valid_relative_path, Entry, EntryKind, Message, CHUNK};

use super::AgentError;

const MAX_DEPTH: usize = 256;

fn host_err(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::HostCopy {
        path: path.to_path_buf(),
        source,
    }
}

/// Walk `src` and send its entries and data (parents first). Stops quietly when the receiver
/// is gone.
pub(super) fn read_tree(src: &Path, tx: &mpsc::Sender<Message>) -> Result<(), AgentError> {
    let meta = std::fs::symlink_metadata(src).map_err(host_err(src))?;
    if send_tree(src, Vec::new(), &meta, tx, 0)? {
        let _ = tx.blocking_send(Message::End);
    }
    Ok(())
}

/// Returns false when the receiver went away.
fn send_tree(
    path: &Path,
    rel: Vec<u8>,
    meta: &std::fs::Metadata,
    tx: &mpsc::Sender<Message>,
    depth: usize,
) -> Result<bool, AgentError> {
    if depth > MAX_DEPTH {
        return Err(AgentError::HostCopy {
            path: path.to_path_buf(),
            source: std::io::Error::other("directory tree too deep"),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    let ft = meta.file_type();
    let entry = |kind, size, target: Vec<u8>, rel: Vec<u8>| {
        Message::Entry(Entry {
            kind,
            mode,
            size,
            path: rel,
            target,
        })
    };
    if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(host_err(path))?;
        return Ok(tx
            .blocking_send(entry(
                EntryKind::Symlink,
                0,
                target.into_os_string().into_vec(),
                rel,
            ))
            .is_ok());
    }
    if ft.is_file() {
        let mut file = File::open(path).map_err(host_err(path))?;
        let size = file.metadata().map_err(host_err(path))?.len();
        if tx
            .blocking_send(entry(EntryKind::File, size, Vec::new(), rel))
            .is_err()
        {
            return Ok(false);
        }
        let mut remaining = size;
        let mut buf = vec![0u8; CHUNK];
        while remaining > 0 {
            let want = remaining.min(CHUNK as u64) as usize;
            let n = file.read(&mut buf[..want]).map_err(host_err(path))?;
            if n == 0 {
                return Err(AgentError::HostCopy {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "file shrank while copying",
                    ),
                });
            }
            if tx
                .blocking_send(Message::Data {
                    data: buf[..n].to_vec(),
                })
                .is_err()
            {
                return Ok(false);
            }
            remaining -= n as u64;
        }
        return Ok(true);
    }
    if ft.is_dir() {
        if tx
            .blocking_send(entry(EntryKind::Dir, 0, Vec::new(), rel.clone()))
            .is_err()
        {
            return Ok(false);
        }
        let mut children: Vec<_> = std::fs::read_dir(path)
            .map_err(host_err(path))?
            .collect::<Result<_, _>>()
            .map_err(host_err(path))?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let cpath = child.path();
            let cmeta = std::fs::symlink_metadata(&cpath).map_err(host_err(&cpath))?;
            let mut crel = rel.clone();
            if !crel.is_empty() {
                crel.push(b'/');
            }
            crel.extend_from_slice(child.file_name().as_bytes());
            if !send_tree(&cpath, crel, &cmeta, tx, depth + 1)? {
                return Ok(false);
            }
        }
    }
    // Devices, fifos and sockets are skipped.
    Ok(true)
}

fn unsafe_path(rel: &[u8]) -> AgentError {
    AgentError::UnsafePath {
        path: String::from_utf8_lossy(rel).into_owned(),
    }
}

/// Writes a received tree rooted at `target`.
struct TreeWriter {
    target: PathBuf,
    root: Option<OwnedFd>,
    started: bool,
    current: Option<(File, u64, PathBuf)>,
    dirs: Vec<(Vec<u8>, u32)>,
}

/// Receive entries from `rx` and write them under `target`. Returns after `End`, or with an
/// error on the first invalid entry.
pub(super) fn write_tree(target: &Path, rx: std::sync::mpsc::Receiver<Message>) -> Result<(), AgentError> {
    let mut w = TreeWriter {
        target: target.to_path_buf(),
        root: None,
        started: false,
        current: None,
        dirs: Vec::new(),
    };
    for msg in rx {
        match msg {
            Message::Entry(e) => w.entry(e)?,
            Message::Data { data } => w.data(&data)?,
            Message::End => return w.finish(),
            _ => {
                return Err(AgentError::Unexpected {
                    what: "non-copy message in a copy".into(),
                })
            }
        }
    }
    Err(AgentError::Closed)
}

fn rustix_err(path: &Path) -> impl FnOnce(rustix::io::Errno) -> AgentError + '_ {
    move |e| AgentError::HostCopy {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

impl TreeWriter {
    fn root_fd(&self, rel: &[u8]) -> Result<&OwnedFd, AgentError> {
        self.root.as_ref().ok_or_else(|| unsafe_path(rel))
    }

    /// Open `rel` (a directory below the root) without following symlinks or leaving the root.
    fn open_beneath(&self, rel: &[u8], flags: OFlags) -> Result<OwnedFd, AgentError> {
        let root = self.root_fd(rel)?;
        let path = if rel.is_empty() { &b"."[..] } else { rel };
        crate::host::fs::openat_confined(
            root.as_fd(),
            std::ffi::OsStr::from_bytes(path),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            Confine::NoSymlinks,
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV | rustix::io::Errno::NOTDIR => unsafe_path(rel),
            other => AgentError::HostCopy {
                path: self.target.join(std::ffi::OsStr::from_bytes(rel)),
                source: other.into(),
            },
        })
    }

    fn entry(&mut self, e: Entry) -> Result<(), AgentError> {
        if self.current.is_some() {
            return Err(AgentError::Unexpected {
                what: "entry inside a file's data".into(),
            });
        }
        if !valid_relative_path(&e.path) || e.path.contains(&0) || e.target.contains(&0) {
            return Err(unsafe_path(&e.path));
        }
        let mode = e.mode & 0o7777;
        if !self.started {
            if !e.path.is_empty() {
                return Err(unsafe_path(&e.path));
            }
            self.started = true;
            return self.root_entry(e.kind, mode, e.size, &e.target);
        }
        if e.path.is_empty() || self.root.is_none() {
            return Err(unsafe_path(&e.path));
        }
        let (parent, name) = match e.path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&e.path[..i], &e.path[i + 1..]),
            None => (&b""[..], &e.path[..]),
        };
        let parent_fd = self.open_beneath(parent, O_PATH | OFlags::DIRECTORY)?;
        let name = std::ffi::OsStr::from_bytes(name);
        let full = self.target.join(std::ffi::OsStr::from_bytes(&e.path));
        match e.kind {
            EntryKind::Dir => {
                match rustix::fs::mkdirat(&parent_fd, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) => {}
                    Err(rustix::io::Errno::EXIST) => {
                        // Must be a real directory (open_beneath refuses symlinks).
                        self.open_beneath(&e.path, O_PATH | OFlags::DIRECTORY)?;
                    }
                    Err(err) => return Err(rustix_err(&full)(err)),
                }
                self.dirs.push((e.path.clone(), mode));
            }
            EntryKind::File => {
                let fd = rustix::fs::openat(
                    &parent_fd,
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|err| match err {
                    rustix::io::Errno::LOOP => unsafe_path(&e.path),
                    other => rustix_err(&full)(other),
                })?;
                rustix::fs::fchmod(&fd, crate::host::fs::mode(mode)).map_err(rustix_err(&full))?;
                if e.size > 0 {
                    self.current = Some((File::from(fd), e.size, full));
                }
            }
            EntryKind::Symlink => {
                match rustix::fs::unlinkat(&parent_fd, name, rustix::fs::AtFlags::empty()) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(err) => return Err(rustix_err(&full)(err)),
                }
                rustix::fs::symlinkat(std::ffi::OsStr::from_bytes(&e.target), &parent_fd, name)
                    .map_err(rustix_err(&full))?;
            }
        }
        Ok(())
    }

    fn root_entry(&mut self, kind: EntryKind, mode: u32, size: u64, target: &[u8]) -> Result<(), AgentError> {
        let path = self.target.clone();
        let existing = std::fs::symlink_metadata(&path).ok();
        match kind {
            EntryKind::Dir => {
                match existing {
                    Some(m) if m.is_dir() => {}
                    Some(_) => {
                        return Err(AgentError::HostCopy {
                            path,
                            source: std::io::Error::new(
                                std::io::ErrorKind::AlreadyExists,
                                "exists and is not a directory",
                            ),
                        })
                    }
                    None => std::fs::create_dir(&path).map_err(host_err(&path))?,
                }
                let fd = rustix::fs::open(
                    &path,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(rustix_err(&path))?;
                self.root = Some(fd);
                self.dirs.push((Vec::new(), mode));
            }
            EntryKind::File => {
                let fd = rustix::fs::open(
                    &path,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(rustix_err(&path))?;
                rustix::fs::fchmod(&fd, crate::host::fs::mode(mode)).map_err(rustix_err(&path))?;
                if size > 0 {
                    self.current = Some((File::from(fd), size, path));
                }
            }
            EntryKind::Symlink => {
                if existing.is_some_and(|m| !m.is_dir()) {
                    std::fs::remove_file(&path).map_err(host_err(&path))?;
                }
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &path)
                    .map_err(host_err(&path))?;
            }
        }
        Ok(())
    }

    fn data(&mut self, data: &[u8]) -> Result<(), AgentError> {
        let Some((file, remaining, path)) = self.current.as_mut() else {
            return Err(AgentError::Unexpected {
                what: "data without a file entry".into(),
            });
        };
        if data.len() as u64 > *remaining {
            return Err(AgentError::Unexpected {
                what: "more data than the entry's declared size".into(),
            });
        }
        file.write_all(data).map_err(host_err(path))?;
        *remaining -= data.len() as u64;
        if *remaining == 0 {
            self.current = None;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), AgentError> {
        if self.current.is_some() {
            return Err(AgentError::Unexpected {
                what: "copy ended inside a file".into(),
            });
        }
        if !self.started {
            return Err(AgentError::Unexpected {
                what: "empty copy".into(),
            });
        }
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, mode) in dirs.iter().rev() {
            let fd = self.open_beneath(rel, OFlags::RDONLY | OFlags::DIRECTORY)?;
            rustix::fs::fchmod(&fd, crate::host::fs::mode(*mode)).map_err(rustix_err(&self.target))?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(kind: EntryKind, mode: u32, size: u64, path: &str, target: &str) -> Message {
        Message::Entry(Entry {
            kind,
            mode,
            size,
            path: path.as_bytes().to_vec(),
            target: target.as_bytes().to_vec(),
        })
    }

    fn run(target: &Path, msgs: Vec<Message>) -> Result<(), AgentError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(msgs.len() + 1);
        for m in msgs {
            tx.send(m).unwrap();
        }
        drop(tx);
        write_tree(target, rx)
    }

    #[test]
    fn writes_a_tree_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("out");
        run(
            &t,
            vec![
                entry(EntryKind::Dir, 0o750, 0, "", ""),
                entry(EntryKind::Dir, 0o555, 0, "sub", ""),
                entry(EntryKind::File, 0o741, 3, "sub/x", ""),
                Message::Data {
                    data: b"abc".to_vec(),
                },
                entry(EntryKind::Symlink, 0o777, 0, "link", "sub/x"),
                Message::End,
            ],
        )
        .unwrap();
        assert_eq!(std::fs::read(t.join("sub/x")).unwrap(), b"abc");
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&t), 0o750);
        assert_eq!(mode(&t.join("sub")), 0o555);
        assert_eq!(mode(&t.join("sub/x")), 0o741);
        assert_eq!(std::fs::read_link(t.join("link")).unwrap(), Path::new("sub/x"));
    }

    #[test]
    fn hostile_paths_never_leave_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let t = dir.path().join("out");
        let attempts: Vec<Vec<Message>> = vec![
            vec![entry(EntryKind::File, 0o644, 1, "../outside/f", "")],
            vec![
                entry(EntryKind::Dir, 0o755, 0, "", ""),
                entry(EntryKind::File, 0o644, 0, "../outside/f", ""),
            ],
            vec![
                entry(EntryKind::Dir, 0o755, 0, "", ""),
                entry(EntryKind::File, 0o644, 0, "/etc/f", ""),
            ],
            vec![
                entry(EntryKind::Dir, 0o755, 0, "", ""),
                entry(EntryKind::Symlink, 0o777, 0, "esc", "../outside"),
                entry(EntryKind::File, 0o644, 0, "esc/f", ""),
            ],
            vec![
                entry(EntryKind::Dir, 0o755, 0, "", ""),
                entry(EntryKind::Symlink, 0o777, 0, "esc2", "../outside/f2"),
                entry(EntryKind::File, 0o644, 0, "esc2", ""),
            ],
            vec![
                entry(EntryKind::Dir, 0o755, 0, "", ""),
                entry(EntryKind::Symlink, 0o777, 0, "esc3", "../outside"),
                entry(EntryKind::Dir, 0o755, 0, "esc3/d", ""),
            ],
            vec![
                entry(EntryKind::Dir, 0o755, 0, "", ""),
                entry(EntryKind::Dir, 0o755, 0, "", ""),
            ],
        ];
        for (i, msgs) in attempts.into_iter().enumerate() {
            let _ = std::fs::remove_dir_all(&t);
            let mut msgs = msgs;
            msgs.push(Message::End);
            assert!(run(&t, msgs).is_err(), "attempt {i} succeeded");
            assert_eq!(
                std::fs::read_dir(&outside).unwrap().count(),
                0,
                "attempt {i} wrote outside"
            );
        }
    }

    #[test]
    fn data_beyond_declared_size_or_truncated_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("f");
        assert!(run(
            &t,
            vec![
                entry(EntryKind::File, 0o644, 2, "", ""),
                Message::Data {
                    data: b"abc".to_vec()
                },
                Message::End
            ]
        )
        .is_err());
        assert!(run(
            &t,
            vec![
                entry(EntryKind::File, 0o644, 5, "", ""),
                Message::Data {
                    data: b"abc".to_vec()
                },
                Message::End
            ]
        )
        .is_err());
    }
}
