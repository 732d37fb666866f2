//! Watching one file for appends and deletion, per host: inotify on Linux, a kqueue
//! `EVFILT_VNODE` filter on macOS (registered with tokio like any other descriptor, so waiting
//! costs no polling on either). [`crate::console::LogFollower`] is built on it.

use std::path::Path;

/// What happened to a watched file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It was written to (or closed after writing): read again.
    Modified,
    /// It was deleted (or renamed away, or revoked).
    Deleted,
}

#[cfg(target_os = "linux")]
mod imp {
    use super::Change;
    use futures::StreamExt;
    use std::path::Path;

    #[derive(Debug)]
    pub struct FileWatch {
        events: inotify::EventStream<Vec<u8>>,
    }

    impl FileWatch {
        pub fn open(path: &Path) -> std::io::Result<Self> {
            let inotify = inotify::Inotify::init()?;
            inotify.watches().add(
                path,
                inotify::WatchMask::MODIFY
                    | inotify::WatchMask::CLOSE_WRITE
                    | inotify::WatchMask::DELETE_SELF,
            )?;
            Ok(Self {
                events: inotify.into_event_stream(vec![0u8; 4096])?,
            })
        }

        pub async fn next(&mut self) -> std::io::Result<Change> {
            match self.events.next().await {
                Some(Ok(ev)) if ev.mask.contains(inotify::EventMask::DELETE_SELF) => Ok(Change::Deleted),
                Some(Ok(_)) => Ok(Change::Modified),
                Some(Err(e)) => Err(e),
                None => Ok(Change::Deleted),
            }
        }
    }
}

#[cfg(target_os = "macos")]
mod imp {
    use super::Change;
    use rustix::event::kqueue::{kevent, kqueue, Event, EventFilter, EventFlags, VnodeEvents};
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::path::Path;
    use tokio::io::unix::AsyncFd;

    #[derive(Debug)]
    pub struct FileWatch {
        kq: AsyncFd<OwnedFd>,
        /// The watched file, open for as long as the kqueue filter refers to it.
        _file: OwnedFd,
    }

    const WATCHED: VnodeEvents = VnodeEvents::WRITE
        .union(VnodeEvents::EXTEND)
        .union(VnodeEvents::DELETE)
        .union(VnodeEvents::RENAME)
        .union(VnodeEvents::REVOKE);

    impl FileWatch {
        pub fn open(path: &Path) -> std::io::Result<Self> {
            use rustix::fs::{Mode, OFlags};
            let file = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
            let kq = kqueue()?;
            let ev = Event::new(
                EventFilter::Vnode {
                    vnode: file.as_raw_fd(),
                    flags: WATCHED,
                },
                EventFlags::ADD | EventFlags::CLEAR,
                std::ptr::null_mut(),
            );
            let mut none: Vec<Event> = Vec::new();
            // SAFETY: the filter refers to `file`, which the returned FileWatch owns for as
            // long as it owns the kqueue (both are dropped together).
            unsafe { kevent(&kq, &[ev], &mut none, Some(std::time::Duration::ZERO)) }?;
            // SAFETY: the AsyncFd owns the kqueue descriptor; it stays open and the same until
            // the AsyncFd is dropped (it is never exchanged through get_mut).
            let kq = unsafe { AsyncFd::register_with_interest(kq, tokio::io::Interest::READABLE) }?;
            Ok(Self { kq, _file: file })
        }

        pub async fn next(&mut self) -> std::io::Result<Change> {
            loop {
                let mut guard = self.kq.readable().await?;
                let mut events: Vec<Event> = Vec::with_capacity(8);
                // SAFETY: no change list; the registered filter's descriptor (`self.file`)
                // stays open while `self` lives.
                let n = unsafe {
                    kevent(
                        self.kq.get_ref().as_fd(),
                        &[],
                        &mut events,
                        Some(std::time::Duration::ZERO),
                    )
                }?;
                if n == 0 {
                    guard.clear_ready();
                    continue;
                }
                let gone = events.iter().any(|e| match e.filter() {
                    EventFilter::Vnode { flags, .. } => {
                        flags.intersects(VnodeEvents::DELETE | VnodeEvents::RENAME | VnodeEvents::REVOKE)
                    }
                    _ => false,
                });
                return Ok(if gone { Change::Deleted } else { Change::Modified });
            }
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod imp {
    use super::Change;
    use std::path::Path;

    /// Hosts without a file-event API: wake every 50 ms and let the caller re-read.
    #[derive(Debug)]
    pub struct FileWatch {
        path: std::path::PathBuf,
    }

    impl FileWatch {
        pub fn open(path: &Path) -> std::io::Result<Self> {
            std::fs::metadata(path)?;
            Ok(Self {
                path: path.to_path_buf(),
            })
        }

        pub async fn next(&mut self) -> std::io::Result<Change> {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            Ok(if self.path.exists() {
                Change::Modified
            } else {
                Change::Deleted
            })
        }
    }
}

/// A watch on one file.
#[derive(Debug)]
pub struct FileWatch(imp::FileWatch);

impl FileWatch {
    /// Watch `path` (which must exist).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        imp::FileWatch::open(path).map(Self)
    }

    /// Wait for the next change.
    pub async fn next(&mut self) -> std::io::Result<Change> {
        self.0.next().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[tokio::test]
    async fn appends_and_deletion_are_seen() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("log");
        std::fs::write(&path, b"").expect("create");
        let mut w = FileWatch::open(&path).expect("watch");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(b"hello").expect("write");
        let c = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("event")
            .expect("ok");
        assert_eq!(c, Change::Modified);
        drop(f);
        std::fs::remove_file(&path).expect("rm");
        // events queued before the deletion come first; the deletion follows
        let mut last = Change::Modified;
        while last != Change::Deleted {
            last = tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .expect("event")
                .expect("ok");
        }
        assert!(
            FileWatch::open(&path).is_err(),
            "a missing file cannot be watched"
        );
    }
}
