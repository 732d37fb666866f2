//! The per-VM locks, both `flock(2)` on files in the VM's directory, so they hold across
//! processes and are released by the kernel when their holder dies (even by SIGKILL):
//!
//! - `vm.lock` ([`VmLock`]) serialises the verbs that change a VM's lifecycle: start (new and
//!   existing), stop, kill, pause, resume and remove. A verb takes it before it reads the record
//!   it acts on, so it always acts on what the previous verb left, and `rm -f` while another
//!   process starts the VM waits for the start to end and then removes what it made. Waiting is
//!   bounded ([`LOCK_WAIT`], then [`ManagerError::Busy`]).
//! - `start.lock` is held, inside `vm.lock`, only while a start runs: a record that says
//!   `starting` while nobody holds it was left by a starter that died.
//!
//! Removing a VM deletes its lock file while holding it. A waiter that then gets the lock holds
//! it on a file no longer in the directory; [`VmLock::acquire`] checks that the file it locked
//! is still the one at the path (same inode) and otherwise reports the VM gone (or tries again
//! when a new VM of that name was created meanwhile).

use super::ManagerError;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File name of the verb lock.
pub(super) const VM_LOCK: &str = crate::vm_dir::VmDir::VM_LOCK;
/// File name of the start lock.
pub(super) const START_LOCK: &str = crate::vm_dir::VmDir::START_LOCK;

/// How long a verb waits for another verb on the same VM to finish.
pub const LOCK_WAIT: Duration = Duration::from_secs(60);

/// The verb lock of one VM, held until dropped.
#[derive(Debug)]
pub(super) struct VmLock {
    _file: std::fs::File,
}

impl VmLock {
    /// Take the verb lock of the VM `name` in `dir`, waiting up to `wait` for other verbs.
    /// [`ManagerError::NotFound`] when the directory does not exist (or was removed while we
    /// waited).
    pub(super) async fn acquire(name: &str, dir: &Path, wait: Duration) -> Result<Self, ManagerError> {
        let path = dir.join(VM_LOCK);
        let deadline = tokio::time::Instant::now() + wait;
        let not_found = || ManagerError::NotFound {
            name: name.to_string(),
        };
        loop {
            let f = match crate::paths::private_file()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
                Err(source) => return Err(ManagerError::Io { path, source }),
            };
            loop {
                match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                    Ok(()) => break,
                    Err(rustix::io::Errno::WOULDBLOCK) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        return Err(ManagerError::Io {
                            path,
                            source: e.into(),
                        })
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(ManagerError::Busy {
                        name: name.to_string(),
                        secs: wait.as_secs_f64(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Still the lock file of a VM directory? (A remove deletes it while holding it.)
            let held = f.metadata().map_err(|source| ManagerError::Io {
                path: path.clone(),
                source,
            })?;
            match std::fs::metadata(&path) {
                Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => return Ok(VmLock { _file: f }),
                Ok(_) => continue, // a new VM of that name: lock its file
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
                Err(source) => return Err(ManagerError::Io { path, source }),
            }
        }
    }
}

/// Whether some process holds the lock file `file` of the VM in `dir` right now.
pub(super) fn held(dir: &Path, file: &str) -> bool {
    let Ok(f) = std::fs::File::open(dir.join(file)) else {
        return false;
    };
    matches!(
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared),
        Err(rustix::io::Errno::WOULDBLOCK)
    )
}

/// The VM's start lock if nobody holds it: held while a manager decides that a VM's starter is
/// gone and kills what its directory owns, so no start can spawn a VMM meanwhile.
pub(super) fn try_lock_start(dir: &Path) -> Option<std::fs::File> {
    let f = crate::paths::private_file()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(START_LOCK))
        .ok()?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
    Some(f)
}

/// Take the VM's start lock (exclusive, released when the file is dropped). Only ever taken
/// under the [`VmLock`], so it never waits long.
pub(super) fn lock_start(dir: &Path) -> Result<std::fs::File, ManagerError> {
    let path: PathBuf = dir.join(START_LOCK);
    let io = |source| ManagerError::Io {
        path: path.clone(),
        source,
    };
    let f = crate::paths::private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io)?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).map_err(|e| io(e.into()))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verbs_serialise_and_a_removed_vm_is_not_found() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("v");
        std::fs::create_dir(&dir).expect("mkdir");
        let first = VmLock::acquire("v", &dir, LOCK_WAIT).await.expect("lock");
        assert!(held(&dir, VM_LOCK));
        // a second taker waits, and gives up after its bound
        let t = std::time::Instant::now();
        let busy = VmLock::acquire("v", &dir, Duration::from_millis(200)).await;
        assert!(matches!(busy, Err(ManagerError::Busy { .. })), "{busy:?}");
        assert!(t.elapsed() >= Duration::from_millis(200));
        // a waiter whose VM is removed meanwhile finds it gone
        let waiter = tokio::spawn({
            let dir = dir.clone();
            async move { VmLock::acquire("v", &dir, LOCK_WAIT).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::remove_dir_all(&dir).expect("rm");
        drop(first);
        let got = waiter.await.expect("join");
        assert!(matches!(got, Err(ManagerError::NotFound { .. })), "{got:?}");
        assert!(!held(&dir, VM_LOCK));
    }
}
