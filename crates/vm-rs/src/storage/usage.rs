//! Disk usage as `du` counts it: allocated bytes (`st_blocks * 512`) of a tree, directories
//! included, symlinks not followed, a file with several hard links counted once. Sparse images
//! count what they hold, not their apparent size.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Allocated bytes under `path` (`du -s -B1 PATH`); 0 when it does not exist. Entries that
/// vanish during the walk are skipped.
pub fn disk_usage(path: &Path) -> std::io::Result<u64> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![(path.to_path_buf(), meta)];
    while let Some((p, m)) = stack.pop() {
        if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        total += m.blocks() * 512;
        if m.is_dir() {
            let rd = match std::fs::read_dir(&p) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for e in rd.flatten() {
                if let Ok(cm) = std::fs::symlink_metadata(e.path()) {
                    stack.push((e.path(), cm));
                }
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn matches_du_with_sparse_files_links_and_hardlinks() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("t");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a"), vec![7u8; 100_000]).unwrap();
        std::fs::hard_link(root.join("a"), root.join("sub/a-again")).unwrap();
        let sparse = std::fs::File::create(root.join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        std::os::unix::fs::symlink("/usr", root.join("link")).unwrap();
        let ours = disk_usage(&root).unwrap();
        let du = std::process::Command::new("du")
            .args(["-s", "-B1"])
            .arg(&root)
            .output()
            .unwrap();
        let theirs: u64 = String::from_utf8_lossy(&du.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ours, theirs);
        assert!(ours < 1 << 20, "the sparse gigabyte is not counted");
        assert_eq!(disk_usage(&d.path().join("missing")).unwrap(), 0);
    }
}
