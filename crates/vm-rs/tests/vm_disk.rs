//! Real QEMU guests boot with data disks made by `vm_rs::storage` and read back the bytes the
//! test wrote into them — once through the guest agent (mount an ext4 disk and read a file,
//! checksum the read-only seed, write into a qcow2 overlay the host then inspects), and once
//! with the guest kernel alone, described below.
//!
//! The test writes a partition table chosen at run time (an MBR with a random number of
//! logical partitions in an EBR chain) into a raw disk, and a GPT (also with a run-time
//! partition count, CRC-checked by the kernel) into a qcow2 overlay whose base holds an MBR. The guest kernel reads both tables through
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

/// CRC-32 (IEEE 802.3, as GPT uses).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A GPT for a disk of `sectors` sectors with `n` 1 MiB partitions: returns the head (protective
/// MBR, primary header, entry array: 34 sectors) and the tail (entry array copy and backup
/// header: 33 sectors). The kernel checks both headers' and the entry array's CRCs.
fn gpt(sectors: u64, n: u32) -> (Vec<u8>, Vec<u8>) {
    let last = sectors - 1;
    let mut entries = vec![0u8; 128 * 128];
    // Linux filesystem data type GUID, mixed-endian as stored on disk.
    let linux: [u8; 16] = [
        0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
    ];
    for i in 0..n as usize {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[..16].copy_from_slice(&linux);
        e[16] = i as u8 + 1; // unique GUID: anything non-zero and distinct
        e[31] = 0x5a;
        let first = 2048 * (i as u64 + 1);
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&(first + 2047).to_le_bytes());
        for (j, c) in format!("vmrs{i}").encode_utf16().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&c.to_le_bytes());
        }
    }
    let entries_crc = crc32(&entries);
    let header = |my: u64, alt: u64, entries_lba: u64| {
        let mut h = vec![0u8; SECTOR];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&alt.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(last - 33).to_le_bytes());
        h[56..72].copy_from_slice(&[0x11; 16]);
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    let mut pmbr = vec![0u8; SECTOR];
    entry(&mut pmbr, 0, 0xee, 1, u32::try_from(last).unwrap_or(u32::MAX));
    let mut head = signed(pmbr);
    head.extend(header(1, last, 2));
    head.extend(&entries);
    let mut tail = entries.clone();
    tail.extend(header(last, 1, last - 32));
    (head, tail)
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
    // A GPT whose partition count is also chosen at run time, head and tail of the 24 MiB disk.
    let gpt_parts = 2 + logicals * 2;
    let (head, tail) = gpt(24 << 11, gpt_parts);
    for (name, bytes, offset) in [
        ("head.bin", &head, 0u64),
        ("tail.bin", &tail, (24u64 << 20) - tail.len() as u64),
    ] {
        let src = disks.path().join(name);
        std::fs::write(&src, bytes).expect("write gpt part");
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("write -s {} {offset} {}", src.display(), bytes.len()),
                overlay.to_str().expect("utf8"),
            ],
        );
    }
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
            && partition_line(&s, |l| !l.contains('<')).is_some()
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
    // The overlay: the GPT written into the overlay (CRCs checked by the kernel), not the
    // base's one-partition MBR.
    let line2 = partition_line(&s, |l| !l.contains('<')).expect("overlay line");
    let dev2 = &line2[..3];
    assert_ne!(dev, dev2);
    let gpt_list: Vec<String> = (1..=gpt_parts).map(|i| format!("{dev2}{i}")).collect();
    assert_eq!(line2, format!("{dev2}: {}", gpt_list.join(" ")));
    assert!(
        !s.lines()
            .any(|l| l.contains("GPT:") || l.contains("Alternate GPT")),
        "kernel complained about the GPT:\n{s}"
    );
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

/// Run `argv` in the guest; panic with its output unless it exits 0; return stdout.
async fn guest(agent: &vm_rs::agent::AgentClient, cmd: vm_rs::agent::ExecCommand) -> Vec<u8> {
    let argv = cmd.argv.clone();
    let out = agent.exec(cmd).await.expect("exec");
    assert_eq!(
        out.status,
        vm_rs::agent::ExitStatus::Exited(0),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Through the guest agent: the guest mounts an ext4 data disk the test built and reads back
/// the file the test put in it; reads the read-only seed image byte for byte and cannot write
/// it; writes into a qcow2 overlay, and after shutdown the host finds those bytes in the
/// overlay while the base image is unchanged.
#[tokio::test]
async fn guest_reads_and_writes_data_disks_through_the_agent() {
    use vm_rs::agent::{AgentClient, ExecCommand};
    use vm_rs::storage::{write_seed_image, SeedConfig};

    let home = TestHome::new();
    let disks = tempfile::tempdir().expect("tempdir");
    let seed_nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_nanos() as u64;

    // 1. ext4 data disk (32 MiB) holding payload.bin, built on the host with mkfs.ext4 -d.
    let content = disks.path().join("content");
    std::fs::create_dir(&content).expect("mkdir");
    let payload = storage_support::pattern(1 << 20, seed_nanos);
    std::fs::write(content.join("payload.bin"), &payload).expect("payload");
    let ext4 = disks.path().join("data.ext4");
    create_disk(&ext4, 32 << 20, DiskFormat::Raw)
        .await
        .expect("ext4 disk");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "vmrsdata",
            "-d",
            content.to_str().expect("utf8"),
            ext4.to_str().expect("utf8"),
        ],
    );

    // 2. qcow2 overlay (16 MiB) over a base full of a known pattern.
    let base = disks.path().join("base.raw");
    let base_bytes = storage_support::pattern(16 << 20, seed_nanos ^ 0xabcdef);
    std::fs::write(&base, &base_bytes).expect("base");
    let base_hash = sha256_file(&base);
    let overlay = disks.path().join("vm.qcow2");
    let ov = create_overlay(&base, DiskFormat::Raw, &overlay)
        .await
        .expect("overlay");

    // 3. The cloud-init seed, attached read-only (2 MiB).
    let seed = disks.path().join("seed.img");
    write_seed_image(&seed, &SeedConfig::new("disky2"))
        .await
        .expect("seed");
    let seed_hash = sha256_file(&seed);
    let mut seed_disk = DiskConfig::new(&seed);
    seed_disk.read_only = true;

    let mut cfg = test_config("disky2");
    cfg.disks.push(DiskConfig::new(&ext4));
    cfg.disks.push(ov);
    cfg.disks.push(seed_disk);
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    // The manager gives every QEMU VM the agent port.
    let sock = mgr.agent_socket("disky2");
    mgr.start(cfg).await.expect("start");
    let agent = AgentClient::connect_timeout(&sock, BOOT_TIMEOUT)
        .await
        .expect("agent");

    // Which vdX is which: by size in sectors, and the read-only flag.
    let listing = guest(
        &agent,
        ExecCommand::new([
            "sh",
            "-c",
            "for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/size) $(cat $d/ro); done",
        ]),
    )
    .await;
    let listing = String::from_utf8_lossy(&listing).into_owned();
    let dev = |sectors: &str| -> (String, String) {
        listing
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[1] == sectors).then(|| (format!("/dev/{}", f[0]), f[2].to_string()))
            })
            .unwrap_or_else(|| panic!("no disk of {sectors} sectors in:\n{listing}"))
    };
    let (ext4_dev, ext4_ro) = dev("65536");
    let (ov_dev, ov_ro) = dev("32768");
    let (seed_dev, seed_ro) = dev("4096");
    assert_eq!(
        (ext4_ro.as_str(), ov_ro.as_str(), seed_ro.as_str()),
        ("0", "0", "1")
    );

    // The guest reads the file the test put into the ext4 image.
    let read = guest(
        &agent,
        ExecCommand::new([
            "sh",
            "-c",
            "mkdir -p /mnt/data && mount -t ext4 -o ro \"$1\" /mnt/data && cat /mnt/data/payload.bin",
            "sh",
            &ext4_dev,
        ]),
    )
    .await;
    assert!(
        read == payload,
        "payload read back differs ({} bytes)",
        read.len()
    );

    // The seed, byte for byte, and it is read-only.
    let sum = guest(&agent, ExecCommand::new(["sha256sum", &seed_dev])).await;
    let sum = String::from_utf8_lossy(&sum).into_owned();
    assert_eq!(sum.split_whitespace().next(), Some(seed_hash.as_str()));
    let denied = agent
        .exec(
            ExecCommand::new(["dd", &format!("of={seed_dev}"), "bs=512", "count=1", "conv=fsync"])
                .stdin(vec![0u8; 512]),
        )
        .await
        .expect("exec");
    assert_ne!(
        denied.status,
        vm_rs::agent::ExitStatus::Exited(0),
        "the guest wrote to a read-only disk"
    );

    // The guest writes 64 KiB at 4 MiB into the overlay device.
    let written = storage_support::pattern(64 << 10, seed_nanos ^ 0x5555);
    guest(
        &agent,
        ExecCommand::new([
            "dd",
            &format!("of={ov_dev}"),
            "bs=4096",
            "seek=1024",
            "conv=fsync,notrunc",
        ])
        .stdin(written.clone()),
    )
    .await;
    drop(agent);
    mgr.stop("disky2", Duration::from_secs(60)).await.expect("stop");

    // On the host: the overlay holds the guest's bytes over the base's, and the base is intact.
    let flat = disks.path().join("flat.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            overlay.to_str().expect("utf8"),
            flat.to_str().expect("utf8"),
        ],
    );
    let flat = std::fs::read(&flat).expect("read flat");
    assert_eq!(flat.len(), 16 << 20);
    let at = 4 << 20;
    assert!(
        flat[at..at + written.len()] == written[..],
        "guest write not in the overlay"
    );
    assert!(
        flat[..at] == base_bytes[..at],
        "overlay differs from base before the write"
    );
    assert!(
        flat[at + written.len()..] == base_bytes[at + written.len()..],
        "overlay differs from base after the write"
    );
    assert_eq!(sha256_file(&base), base_hash, "the guest changed the base");
    mgr.remove("disky2", false).await.expect("rm");
}
