//! Snapshots end to end with real QEMU guests (TCG): a VM saved once and restored many times
//! keeps its processes and files, clones are independent and not twins, the snapshot's files
//! are never written, disks agree with memory, and what cannot be restored is refused.

#[path = "support/storage.rs"]
mod storage_support;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{sh, TestHome};
use vm_rs::config::{DiskConfig, DiskFormat};
use vm_rs::manager::{RestoreOptions, SnapshotOptions};
use vm_rs::{ErrorKind, VmManager, VmState};

async fn manager(home: &TestHome) -> VmManager {
    VmManager::builder()
        .home(home.path())
        .build()
        .await
        .expect("manager")
}

async fn config(name: &str) -> vm_rs::VmConfig {
    let assets = support::guest::assets().await;
    vm_rs::VmConfig::builder(name)
        .kernel(&assets.kernel)
        .initramfs(&assets.initramfs)
        .memory_mib(256)
        .build()
        .expect("config")
}

/// sha256 of every file in the snapshot directory.
fn digests(dir: &Path) -> BTreeMap<PathBuf, String> {
    std::fs::read_dir(dir)
        .expect("ls snapshot")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| (e.path(), storage_support::sha256_file(&e.path())))
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[tokio::test]
async fn state_survives_restore_and_clones_are_independent_and_not_twins() {
    let home = TestHome::new();
    let mgr = manager(&home).await;
    mgr.start(config("src").await).await.expect("start");
    mgr.wait_ready("src", support::BOOT_TIMEOUT).await.expect("ready");
    sh(
        &mgr,
        "src",
        "echo before > /tmp/file; \
         (i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done) >/dev/null 2>&1 &",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let at_snapshot: u64 = sh(&mgr, "src", "cat /tmp/count").await.parse().expect("count");
    assert!(at_snapshot >= 2, "the counter does not run: {at_snapshot}");
    let info = mgr
        .snapshot("src", "s1", SnapshotOptions::default())
        .await
        .expect("snapshot");
    // left paused: the counter the snapshot holds is the one the source stopped at
    assert_eq!(mgr.state("src").await.expect("state"), VmState::Paused);
    assert!(info.meta.memory_file, "{:?}", info.meta);
    assert!(info.dir.join("vmstate").is_file());
    let before = digests(&info.dir);
    assert!(before.len() >= 3, "{before:?}");

    // the snapshot ages, so a guest clock that resumed at the snapshot time would be behind
    tokio::time::sleep(Duration::from_secs(4)).await;
    let clones = mgr
        .clone_snapshot("s1", 2, "c", RestoreOptions::default())
        .await
        .expect("clone");
    let names: Vec<String> = clones.iter().map(|c| c.name.clone()).collect();
    assert_eq!(names, ["c-1", "c-2"]);
    for c in &clones {
        assert!(matches!(c.state, VmState::Ready { .. }), "{c:?}");
    }

    // the process kept counting from where it was; the file written before is there
    for n in &names {
        assert_eq!(sh(&mgr, n, "cat /tmp/file").await, "before");
        let c1: u64 = sh(&mgr, n, "cat /tmp/count").await.parse().expect("count");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let c2: u64 = sh(&mgr, n, "cat /tmp/count").await.parse().expect("count");
        assert!(
            c1 >= at_snapshot,
            "{n}: counter restarted at {c1} (was {at_snapshot})"
        );
        assert!(c2 > c1, "{n}: counter stopped ({c1} then {c2})");
    }

    // independent: each writes its own data and never sees the other's
    for n in &names {
        sh(&mgr, n, &format!("echo {n} > /tmp/mine")).await;
    }
    for n in &names {
        assert_eq!(sh(&mgr, n, "cat /tmp/mine").await, *n);
    }

    // not twins: random bytes, host name, machine id differ; the clock is the host's
    let facts = |s: String| s.lines().map(str::to_string).collect::<Vec<_>>();
    let script = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; cat /etc/machine-id";
    let a = facts(sh(&mgr, "c-1", script).await);
    let b = facts(sh(&mgr, "c-2", script).await);
    assert_eq!(a.len(), 3, "{a:?}");
    assert_ne!(a[0], b[0], "same random bytes");
    assert_eq!(a[1], "c-1");
    assert_eq!(b[1], "c-2");
    assert_ne!(a[2], b[2], "same machine id");
    assert_eq!(a[2].len(), 32);
    for n in &names {
        let host_before = unix_now();
        let guest: i64 = sh(&mgr, n, "date +%s").await.parse().expect("date");
        let host_after = unix_now();
        assert!(
            guest >= host_before - 1 && guest <= host_after + 1,
            "{n}: guest clock {guest}, host {host_before}..{host_after}"
        );
    }

    // the snapshot's files were never written
    assert_eq!(digests(&info.dir), before);
    // a clone is a normal vm: stop, remove; the source resumes and runs on
    mgr.stop("c-1", Duration::from_secs(10))
        .await
        .expect("stop clone");
    mgr.remove("c-1", false).await.expect("rm clone");
    mgr.resume("src").await.expect("resume source");
    let c: u64 = sh(&mgr, "src", "cat /tmp/count").await.parse().expect("count");
    assert!(c >= at_snapshot, "source counter {c} (was {at_snapshot})");
    // a snapshot used by a vm is not removed; once nothing uses it, it is
    let busy = mgr.remove_snapshot("s1", false).await.expect_err("in use");
    assert_eq!(busy.kind(), ErrorKind::Conflict, "{busy}");
    mgr.remove("c-2", true).await.expect("rm clone");
    mgr.remove_snapshot("s1", false).await.expect("rm snapshot");
    assert!(mgr.list_snapshots().await.expect("ls").is_empty());
    mgr.remove("src", true).await.expect("rm src");
}

#[tokio::test]
async fn data_disk_and_memory_agree_and_mismatches_are_refused() {
    let home = TestHome::new();
    let mgr = manager(&home).await;
    let disk = home.path().join("data.img");
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .arg("32M")
        .status()
        .expect("mkfs.ext4");
    assert!(mkfs.success());
    let mut cfg = config("dsrc").await;
    cfg.disks.push(DiskConfig {
        format: DiskFormat::Raw,
        ..DiskConfig::new(&disk)
    });
    mgr.start(cfg).await.expect("start");
    mgr.wait_ready("dsrc", support::BOOT_TIMEOUT)
        .await
        .expect("ready");
    sh(
        &mgr,
        "dsrc",
        "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && echo saved > /mnt/d/a && sync \
         && echo cached > /mnt/d/b",
    )
    .await;
    let info = mgr
        .snapshot("dsrc", "d1", SnapshotOptions { leave_running: true })
        .await
        .expect("snapshot");
    assert!(matches!(
        mgr.state("dsrc").await.expect("state"),
        VmState::Ready { .. }
    ));
    // the source keeps writing its own disk
    sh(&mgr, "dsrc", "echo later > /mnt/d/c && sync").await;
    let frozen = info.dir.join("disk-disk0");
    let before = storage_support::sha256_file(&frozen);
    // the frozen disk is a consistent file system (what was synced is there)
    let check = std::fs::copy(&frozen, home.path().join("check.img")).expect("copy");
    assert!(check > 0);
    let fsck = std::process::Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(home.path().join("check.img"))
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "fsck of the frozen disk: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    mgr.restore("d1", "dclone", RestoreOptions::default())
        .await
        .expect("restore");
    // memory and disk agree: the mount is there, synced and cached writes both read back,
    // and what the source wrote after the snapshot is not
    assert_eq!(sh(&mgr, "dclone", "cat /mnt/d/a /mnt/d/b").await, "saved\ncached");
    assert_eq!(
        sh(&mgr, "dclone", "ls /mnt/d/c 2>/dev/null || echo none").await,
        "none"
    );
    sh(&mgr, "dclone", "echo clone > /mnt/d/x && sync && cat /mnt/d/x").await;
    assert_eq!(
        storage_support::sha256_file(&frozen),
        before,
        "frozen disk written"
    );
    // the source's own disk is unchanged by the clone
    assert_eq!(
        sh(&mgr, "dsrc", "ls /mnt/d/x 2>/dev/null || echo none").await,
        "none"
    );

    // a different memory size or vcpu count is refused, before anything exists
    let e = mgr
        .restore(
            "d1",
            "bad",
            RestoreOptions {
                memory_mib: Some(512),
                ..RestoreOptions::default()
            },
        )
        .await
        .expect_err("memory mismatch");
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("memory"), "{e}");
    let e = mgr
        .restore(
            "d1",
            "bad",
            RestoreOptions {
                cpus: Some(2),
                ..RestoreOptions::default()
            },
        )
        .await
        .expect_err("cpus mismatch");
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(!mgr.vm_dir("bad").exists());
    // a snapshot name that is taken is a conflict, and nothing is paused for it
    let e = mgr
        .snapshot("dsrc", "d1", SnapshotOptions::default())
        .await
        .expect_err("exists");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(matches!(
        mgr.state("dsrc").await.expect("state"),
        VmState::Ready { .. }
    ));
    // garbage names are refused
    for bad in ["", "../x", "a/b", ".tmp-x"] {
        assert!(
            mgr.snapshot("dsrc", bad, SnapshotOptions::default())
                .await
                .is_err(),
            "{bad:?}"
        );
    }
    // a second snapshot of the same (resumed) vm works too
    mgr.snapshot("dsrc", "d2", SnapshotOptions { leave_running: true })
        .await
        .expect("second snapshot");
    for vm in ["dclone", "dsrc"] {
        mgr.remove(vm, true).await.expect("rm");
    }
    for s in ["d1", "d2"] {
        mgr.remove_snapshot(s, false).await.expect("rm snapshot");
    }
}

#[tokio::test]
async fn a_changed_kernel_is_refused_and_a_restored_vm_can_be_snapshotted_again() {
    let home = TestHome::new();
    let mgr = manager(&home).await;
    let assets = support::guest::assets().await;
    // a private copy of the kernel, so the test can change it
    let kernel = home.path().join("vmlinuz");
    std::fs::copy(&assets.kernel, &kernel).expect("copy kernel");
    let cfg = vm_rs::VmConfig::builder("ksrc")
        .kernel(&kernel)
        .initramfs(&assets.initramfs)
        .memory_mib(256)
        .build()
        .expect("config");
    mgr.start(cfg).await.expect("start");
    mgr.wait_ready("ksrc", support::BOOT_TIMEOUT)
        .await
        .expect("ready");
    sh(&mgr, "ksrc", "echo one > /tmp/gen").await;
    mgr.snapshot("ksrc", "k1", SnapshotOptions::default())
        .await
        .expect("snapshot");
    mgr.remove("ksrc", true).await.expect("rm source");

    // restores are independent of the source vm, which is gone; a restored vm (its RAM a
    // private copy) can be snapshotted again, and that snapshot restored
    mgr.restore("k1", "k-a", RestoreOptions::default())
        .await
        .expect("restore without the source");
    sh(&mgr, "k-a", "echo two >> /tmp/gen").await;
    let again = mgr
        .snapshot("k-a", "k2", SnapshotOptions::default())
        .await
        .expect("snapshot of a restored vm");
    assert!(!again.meta.memory_file, "RAM goes in the stream");
    mgr.restore("k2", "k-b", RestoreOptions::default())
        .await
        .expect("restore of the second snapshot");
    assert_eq!(sh(&mgr, "k-b", "cat /tmp/gen").await, "one\ntwo");
    assert_eq!(sh(&mgr, "k-b", "hostname").await, "k-b");

    // the kernel changes: refused with a clear error, nothing created
    let mut bytes = std::fs::read(&kernel).expect("read kernel");
    bytes.push(0);
    std::fs::write(&kernel, &bytes).expect("change kernel");
    let e = mgr
        .restore("k1", "k-c", RestoreOptions::default())
        .await
        .expect_err("kernel changed");
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("kernel"), "{e}");
    assert!(!mgr.vm_dir("k-c").exists());
    std::fs::remove_file(&kernel).expect("rm kernel");
    let e = mgr
        .restore("k1", "k-c", RestoreOptions::default())
        .await
        .expect_err("kernel gone");
    assert!(e.to_string().contains("gone"), "{e}");
    let e = mgr
        .restore("nope", "k-c", RestoreOptions::default())
        .await
        .expect_err("no snapshot");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    for vm in ["k-a", "k-b"] {
        mgr.remove(vm, true).await.expect("rm");
    }
    for s in ["k1", "k2"] {
        mgr.remove_snapshot(s, true).await.expect("rm snapshot");
    }
}
