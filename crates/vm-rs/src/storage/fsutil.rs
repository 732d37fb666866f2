//! Small file helpers shared by the storage module: temp files next to their destination,
//! no-clobber publication and directory fsync. Every file the module writes goes
//! temp → fsync → rename, so a crash never leaves a half-written image under the final name.

use std::io;
use std::path::{Path, PathBuf};
use tempfile::NamedTempFile;

/// The directory a destination lives in (`.` for a bare file name).
pub(crate) fn parent_dir(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Create an empty temp file in `dest`'s directory, named after it (`.NAME.XXXXXX.tmp`);
/// it is deleted when dropped unless persisted.
pub(crate) fn temp_beside(dest: &Path) -> io::Result<NamedTempFile> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_string());
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(parent_dir(dest))
}

/// fsync a directory so a rename inside it is durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// fsync the temp file's data, then publish it at `dest`. With `overwrite == false` an existing
/// `dest` is an error (`AlreadyExists`) and is left untouched.
pub(crate) fn persist(tmp: NamedTempFile, dest: &Path, overwrite: bool) -> io::Result<()> {
    // Reopen by path: a tool (qemu-img) may have written the file through its own descriptor.
    std::fs::File::open(tmp.path())?.sync_all()?;
    if overwrite {
        tmp.persist(dest).map_err(|e| e.error)?;
    } else {
        tmp.persist_noclobber(dest).map_err(|e| e.error)?;
    }
    fsync_dir(&parent_dir(dest))
}
