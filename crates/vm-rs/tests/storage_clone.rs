//! Copy-on-write clones on real filesystems: a loop-mounted XFS with reflink (extents shared),
//! ext4 (sparse copy keeps holes), across filesystems, and qcow2 overlays (writes go to the
//! overlay, the base's hash never changes). Needs root (loop mounts) and qemu-utils.

#[path = "support/storage.rs"]
mod storage_support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use storage_support::*;
use vm_rs::config::DiskFormat;
use vm_rs::storage::{
    clone_disk, clone_disk_with, create_disk, create_overlay, image_info, CloneError, CloneMethod,
    ClonePolicy,
};

/// A 64 MiB base with 16 MiB of data at 0 and 4 MiB at 40 MiB; holes elsewhere.
fn write_base(path: &Path) {
    let f = File::create(path).expect("create base");
    f.set_len(64 << 20).expect("len");
    f.write_all_at(&pattern(16 << 20, 1), 0).expect("write");
    f.write_all_at(&pattern(4 << 20, 2), 40 << 20).expect("write");
    f.sync_all().expect("sync");
}

#[tokio::test]
async fn reflink_clone_on_xfs_shares_extents_and_never_touches_base() {
    let fs = LoopFs::new(FsKind::XfsReflink);
    let base = fs.path().join("base.img");
    write_base(&base);
    let base_hash = sha256_file(&base);
    let free_before = fs.free_bytes();

    let clone = fs.path().join("clone.img");
    let method = clone_disk(&base, &clone).await.expect("clone");
    assert_eq!(method, CloneMethod::Reflink);

    // Evidence 1: every extent of the clone is flagged shared by FIEMAP (filefrag -v).
    let flags = extent_flags(&clone);
    assert!(!flags.is_empty(), "clone has no extents");
    assert!(
        flags.iter().all(|f| f.iter().any(|x| x == "shared")),
        "clone extents not shared: {flags:?}"
    );
    // Evidence 2: cloning 20 MiB of data consumed (almost) no space.
    let used = free_before.saturating_sub(fs.free_bytes());
    assert!(used < 2 << 20, "reflink clone used {used} bytes");
    assert_eq!(sha256_file(&clone), base_hash);

    // Writing the clone unshares only what it wrote; the base is unchanged.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&clone)
        .expect("open clone");
    f.write_all_at(b"guest wrote this", 4096).expect("write");
    f.sync_all().expect("sync");
    assert_eq!(sha256_file(&base), base_hash);
    assert_ne!(sha256_file(&clone), base_hash);

    // Refuses to overwrite.
    assert!(matches!(
        clone_disk(&base, &clone).await,
        Err(CloneError::TargetExists { .. })
    ));

    // CopyOnly really copies, even here where copy_file_range could reflink: no shared
    // extents, same bytes, holes kept.
    let copy = fs.path().join("copy.img");
    let method = clone_disk_with(&base, &copy, ClonePolicy::CopyOnly)
        .await
        .expect("copy");
    assert_eq!(method, CloneMethod::SparseCopy);
    let flags = extent_flags(&copy);
    assert!(!flags.is_empty());
    assert!(
        flags.iter().all(|f| !f.iter().any(|x| x == "shared")),
        "copy shares extents: {flags:?}"
    );
    assert_eq!(sha256_file(&copy), base_hash);
    assert!(allocated(&copy) < 24 << 20);
}

#[tokio::test]
async fn sparse_copy_on_ext4_keeps_holes_and_content() {
    let fs = LoopFs::new(FsKind::Ext4);
    let base = fs.path().join("base.img");
    write_base(&base);
    let base_hash = sha256_file(&base);

    let clone = fs.path().join("clone.img");
    let method = clone_disk(&base, &clone).await.expect("clone");
    assert_eq!(method, CloneMethod::SparseCopy);
    assert_eq!(sha256_file(&clone), base_hash);
    assert_eq!(sha256_file(&base), base_hash);

    // 20 MiB of data in a 64 MiB file: the clone allocates about 20 MiB, not 64.
    let (a_base, a_clone) = (allocated(&base), allocated(&clone));
    assert!(a_clone <= a_base + (1 << 20), "clone {a_clone} vs base {a_base}");
    assert!(
        a_clone < 24 << 20,
        "holes not preserved: {a_clone} bytes allocated"
    );
    assert_eq!(std::fs::metadata(&clone).expect("stat").len(), 64 << 20);

    // ext4 has no reflink: ReflinkOnly says so instead of silently copying.
    let err = clone_disk_with(&base, &fs.path().join("r.img"), ClonePolicy::ReflinkOnly).await;
    assert!(
        matches!(err, Err(CloneError::ReflinkUnsupported { .. })),
        "{err:?}"
    );
    assert!(!fs.path().join("r.img").exists());
}

#[tokio::test]
async fn clone_across_filesystems_falls_back_to_copy() {
    let xfs = LoopFs::new(FsKind::XfsReflink);
    let ext4 = LoopFs::new(FsKind::Ext4);
    let base = ext4.path().join("base.img");
    write_base(&base);
    let clone = xfs.path().join("clone.img");
    let method = clone_disk(&base, &clone).await.expect("clone");
    assert_eq!(method, CloneMethod::SparseCopy);
    assert_eq!(sha256_file(&clone), sha256_file(&base));
    assert!(allocated(&clone) < 24 << 20);
}

fn qemu_io(image: &str, cmd: &str, read_only: bool) -> String {
    let mut args = vec!["-f", "qcow2"];
    if read_only {
        args.push("-r");
    }
    args.extend(["-c", cmd, image]);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io {cmd}: {out}"
    );
    out
}

#[tokio::test]
async fn qcow2_overlay_takes_writes_and_base_hash_is_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.img");
    let f = File::create(&base).expect("create");
    f.write_all_at(&vec![0x5au8; 8 << 20], 0).expect("write");
    drop(f);
    let base_hash = sha256_file(&base);

    let overlay = dir.path().join("vm.qcow2");
    let disk = create_overlay(&base, DiskFormat::Raw, &overlay)
        .await
        .expect("overlay");
    assert_eq!(disk.format, DiskFormat::Qcow2);
    let info = image_info(&overlay).await.expect("info");
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 8 << 20);
    let canon = std::fs::canonicalize(&base).expect("canon");
    assert_eq!(info.backing_filename.as_deref(), canon.to_str());
    assert_eq!(info.backing_format.as_deref(), Some("raw"));

    let ov = overlay.to_str().expect("utf8");
    qemu_io(ov, "write -P 0xab 0 1M", false);
    // Reads through the overlay: the written range, then base data beneath.
    qemu_io(ov, "read -P 0xab 0 1M", true);
    qemu_io(ov, "read -P 0x5a 2M 1M", true);
    assert_eq!(sha256_file(&base), base_hash, "overlay write reached the base");
    assert!(std::fs::read(&base).expect("read")[..16]
        .iter()
        .all(|b| *b == 0x5a));

    // A pattern check that must fail proves the reads above were real checks.
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", "read -P 0x5a 0 1M", ov])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Pattern verification failed"), "{text}");

    assert!(create_overlay(&base, DiskFormat::Raw, &overlay).await.is_err());
}

#[tokio::test]
async fn empty_qcow2_and_raw_disks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = dir.path().join("data.qcow2");
    create_disk(&q, 10 << 30, DiskFormat::Qcow2).await.expect("qcow2");
    let info = image_info(&q).await.expect("info");
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 10 << 30);
    assert!(std::fs::metadata(&q).expect("stat").len() < 1 << 20);

    let r = dir.path().join("data.raw");
    create_disk(&r, 1 << 30, DiskFormat::Raw).await.expect("raw");
    let info = image_info(&r).await.expect("info");
    assert_eq!(info.format, "raw");
    assert_eq!(info.virtual_size, 1 << 30);
    assert!(allocated(&r) < 1 << 20);
}

/// QEMU itself accepts the driver's `disk_args` — for a path full of QEMU option syntax, a read-only
/// raw disk and a writable qcow2 overlay — and reports the format, mode and cache we asked for.
#[tokio::test]
async fn qemu_accepts_disk_args_even_for_hostile_paths() {
    use std::io::Write;
    use vm_rs::config::{CacheMode, DiskConfig};
    use vm_rs::devices::Disk;
    use vm_rs::driver::qemu::args::disk_args;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("a,file.driver=nbd json:{}.img");
    create_disk(&base, 4 << 20, DiskFormat::Raw)
        .await
        .expect("create");
    let overlay = dir.path().join("vm.qcow2");
    let mut ov = create_overlay(&base, DiskFormat::Raw, &overlay)
        .await
        .expect("overlay");
    ov.cache = CacheMode::Unsafe;
    let mut ro = DiskConfig::new(&base);
    ro.read_only = true;

    let mut args: Vec<std::ffi::OsString> = [
        "-machine",
        "microvm",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-monitor",
        "stdio",
    ]
    .map(std::ffi::OsString::from)
    .to_vec();
    args.extend(disk_args(&Disk {
        id: "vmrs-disk0".into(),
        ..Disk::from_config(0, &ro)
    }));
    args.extend(disk_args(&Disk {
        id: "vmrs-disk1".into(),
        serial: Some("a,b".into()),
        ..Disk::from_config(1, &ov)
    }));
    let mut child = std::process::Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"info block\nquit\n")
        .expect("monitor");
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let line0 = text
        .lines()
        .find(|l| l.starts_with("vmrs-disk0:"))
        .unwrap_or_else(|| panic!("no disk0 in {text}"));
    assert!(line0.contains(base.to_str().expect("utf8")), "{line0}");
    assert!(line0.contains("(raw, read-only)"), "{line0}");
    let line1 = text
        .lines()
        .find(|l| l.starts_with("vmrs-disk1:"))
        .unwrap_or_else(|| panic!("no disk1 in {text}"));
    assert!(line1.contains("(qcow2)"), "{line1}");
    assert!(
        text.contains("Cache mode:       writeback, ignore flushes"),
        "{text}"
    );
    assert!(text.contains("Backing file:"), "{text}");
}
