//! A real QEMU guest boots with data disks made by `vm_rs::storage` and its kernel reads back
//! the bytes the test wrote into them.
//!
//! The test writes a partition table chosen at run time (an MBR with a random number of
//! logical partitions in an EBR chain) into a raw disk, and a different table into a qcow2
//! overlay whose base holds yet another one. The guest kernel reads both tables through
//! virtio-blk and prints what it found (`vda: vda1 vda2 < vda5 vda6 >`) on the serial console;
//! the test checks those lines, the sizes the guest sees (the overlay was grown), and that the
//! overlay's base image is unchanged afterwards.

#[path = "support/storage.rs"]
mod storage_support;
mod support;

use std::time::Duration;
use storage_support::{run, sha256_file};
use support::*;
use vm_rs::config::{DiskConfig, DiskFormat};
use vm_rs::storage::{create_disk, create_overlay, grow_disk};
use vm_rs::VmManager;

const SECTOR: usize = 512;

fn entry(table: &mut [u8], slot: usize, kind: u8, start: u32, sectors: u32) {
    let e = &mut table[446 + 16 * slot..446 + 16 * (slot + 1)];
    e[4] = kind;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
}

fn signed(mut sector: Vec<u8>) -> Vec<u8> {
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

/// Write an MBR: one primary partition, then an extended one holding `logicals` logical
/// partitions (each with its own EBR). Disk must be at least 2 MiB + logicals * 2 MiB.
fn write_mbr_with_logicals(path: &std::path::Path, logicals: u32) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open disk");
    let ext_start = 4096u32;
    let mut mbr = vec![0u8; SECTOR];
    entry(&mut mbr, 0, 0x83, 2048, 2048);
    entry(&mut mbr, 1, 0x05, ext_start, 4096 * logicals);
    f.write_all_at(&signed(mbr), 0).expect("mbr");
    for i in 0..logicals {
        let mut ebr = vec![0u8; SECTOR];
        entry(&mut ebr, 0, 0x83, 2048, 2048);
        if i + 1 < logicals {
            entry(&mut ebr, 1, 0x05, 4096 * (i + 1), 4096);
        }
        let at = (ext_start + 4096 * i) as u64 * SECTOR as u64;
        f.write_all_at(&signed(ebr), at).expect("ebr");
    }
    f.sync_all().expect("sync");
}

/// An MBR with `n` primary partitions of 1 MiB each.
fn primaries_mbr(n: u32) -> Vec<u8> {
    let mut mbr = vec![0u8; SECTOR];
    for i in 0..n {
        entry(&mut mbr, i as usize, 0x83, 2048 * (i + 1), 2048);
    }
    signed(mbr)
}

/// The partition line the kernel prints for a disk, e.g. `vda: vda1 vda2 < vda5 >`.
fn partition_line(serial: &str, pred: impl Fn(&str) -> bool) -> Option<String> {
    serial.lines().find_map(|l| {
        let at = l.find(" vd")?;
        let rest = l[at + 1..].trim_end();
        let (dev, parts) = rest.split_once(": ")?;
        (dev.len() == 3 && parts.starts_with(dev) && pred(rest)).then(|| rest.to_string())
    })
}

#[tokio::test]
async fn guest_kernel_reads_partition_tables_written_by_the_test() {
    let home = TestHome::new();
    let disks = tempfile::tempdir().expect("tempdir");
    let logicals = 1
        + (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .subsec_nanos()
            % 4);

    // Disk 1: raw, 16 MiB, a partition table with a run-time number of logical partitions.
    let raw = disks.path().join("data.raw");
    create_disk(&raw, 16 << 20, DiskFormat::Raw)
        .await
        .expect("raw disk");
    write_mbr_with_logicals(&raw, logicals);

    // Disk 2: a qcow2 overlay (grown to 24 MiB) on a base with one partition; the test writes
    // a three-partition table into the overlay only.
    let base = disks.path().join("base.raw");
    create_disk(&base, 8 << 20, DiskFormat::Raw).await.expect("base");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&base)
            .expect("open base");
        f.write_all_at(&primaries_mbr(1), 0).expect("base mbr");
    }
    let base_hash = sha256_file(&base);
    let overlay = disks.path().join("vm.qcow2");
    let ov = create_overlay(&base, DiskFormat::Raw, &overlay)
        .await
        .expect("overlay");
    grow_disk(&overlay, DiskFormat::Qcow2, 24 << 20)
        .await
        .expect("grow");
    let mbr3 = disks.path().join("mbr3.bin");
    std::fs::write(&mbr3, primaries_mbr(3)).expect("mbr3");
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -s {} 0 512", mbr3.display()),
            overlay.to_str().expect("utf8"),
        ],
    );
    assert_eq!(sha256_file(&base), base_hash);

    let mut cfg = test_config("disky");
    cfg.disks.push(DiskConfig::new(&raw));
    cfg.disks.push(ov);
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    mgr.start(cfg).await.expect("start");
    mgr.wait_ready("disky", BOOT_TIMEOUT).await.expect("ready");

    let serial_path = home.path().join("vms/disky/serial.log");
    let serial = || std::fs::read_to_string(&serial_path).unwrap_or_default();
    let want_logicals: Vec<String> = (0..logicals).map(|i| format!("{}", 5 + i)).collect();
    let found = wait_until(Duration::from_secs(30), || {
        let s = serial();
        partition_line(&s, |l| l.contains('<')).is_some()
            && partition_line(&s, |l| !l.contains('<') && l.matches(' ').count() == 3).is_some()
    })
    .await;
    let s = serial();
    assert!(found, "partition lines missing from the console:\n{s}");

    // The raw disk: vdX1, the extended vdX2, and exactly the logical partitions we wrote.
    let line = partition_line(&s, |l| l.contains('<')).expect("raw disk line");
    let dev = &line[..3];
    let logical_list: Vec<String> = want_logicals.iter().map(|n| format!("{dev}{n}")).collect();
    assert_eq!(
        line,
        format!("{dev}: {dev}1 {dev}2 < {} >", logical_list.join(" ")),
        "guest saw a different table than the {logicals} logical partitions written"
    );
    // The overlay: the three partitions written into the overlay, not the base's one.
    let line2 = partition_line(&s, |l| {
        !l.contains('<') && l.starts_with("vd") && !l.starts_with(dev)
    })
    .expect("overlay line");
    let dev2 = &line2[..3];
    assert_eq!(line2, format!("{dev2}: {dev2}1 {dev2}2 {dev2}3"));
    // Sizes as the guest sees them: 16 MiB raw, overlay grown to 24 MiB.
    assert!(
        s.contains(&format!("[{dev}] 32768 512-byte logical blocks")),
        "{s}"
    );
    assert!(
        s.contains(&format!("[{dev2}] 49152 512-byte logical blocks")),
        "{s}"
    );

    mgr.stop("disky", Duration::from_secs(60)).await.expect("stop");
    assert_eq!(sha256_file(&base), base_hash, "the guest run changed the base");
    mgr.remove("disky", false).await.expect("rm");
}
