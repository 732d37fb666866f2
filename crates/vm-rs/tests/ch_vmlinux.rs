//! vmlinux extraction for the Cloud Hypervisor backend: synthetic bzImages wrapping the tiny
//! PVH guest in each supported compression, and the real Debian kernel from the guest assets.

mod support;

use vm_rs::driver::cloud_hypervisor::vmlinux::{self, Compression, VmlinuxError};

/// A minimal bzImage (boot protocol 2.15) whose payload is `payload`.
fn bzimage(payload: &[u8]) -> Vec<u8> {
    let setup_sects = 4u8;
    let pm = (usize::from(setup_sects) + 1) * 512;
    let offset = 0x40u32;
    let mut img = vec![0u8; pm + offset as usize];
    img[0x1f1] = setup_sects;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
    img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    img.extend_from_slice(payload);
    img.extend_from_slice(&[0u8; 64]); // what follows the payload in a real image
    img
}

/// `data` compressed as the kernel build does, with its 4-byte size trailer (not for gzip).
fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = match c {
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).expect("gzip");
            return e.finish().expect("gzip");
        }
        Compression::Zstd => zstd::encode_all(data, 3).expect("zstd"),
        Compression::Xz => {
            // As the kernel build does: x86 BCJ filter, then LZMA2, CRC32 check.
            let mut filters = xz2::stream::Filters::new();
            filters.x86();
            filters.lzma2(&xz2::stream::LzmaOptions::new_preset(6).expect("preset"));
            let stream = xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::Crc32)
                .expect("encoder");
            let mut e = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
            e.write_all(data).expect("xz");
            e.finish().expect("xz")
        }
        Compression::Lz4Legacy => {
            let mut out = vec![0x02, 0x21, 0x4c, 0x18];
            for chunk in data.chunks(8 << 20) {
                let block = lz4_flex::block::compress(chunk);
                out.extend_from_slice(&(block.len() as u32).to_le_bytes());
                out.extend_from_slice(&block);
            }
            out
        }
    };
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// A larger ELF than the bare guest, so LZ4 needs more than one 8 MiB chunk.
fn big_guest() -> Vec<u8> {
    let mut elf = support::pvh_guest::elf(support::pvh_guest::READY_LINE);
    // Bytes after the PT_LOAD segment are ignored by loaders; they make the image big.
    elf.extend((0..(9usize << 20)).map(|i| (i % 251) as u8));
    elf
}

#[test]
fn every_compression_round_trips() {
    let guest = support::pvh_guest::elf(support::pvh_guest::READY_LINE);
    for c in [
        Compression::Gzip,
        Compression::Xz,
        Compression::Zstd,
        Compression::Lz4Legacy,
    ] {
        let img = bzimage(&compress(c, &guest));
        let payload = vmlinux::bzimage_payload(&img).expect("payload");
        assert_eq!(payload.compression, c);
        let (elf, info) = vmlinux::vmlinux_from_image(&img).unwrap_or_else(|e| panic!("{c}: {e}"));
        assert_eq!(elf, guest, "{c}");
        assert_eq!(info.pvh_entry, support::pvh_guest::LOAD_ADDR + 0x100);
    }
}

#[test]
fn lz4_legacy_multi_chunk() {
    let guest = big_guest();
    let img = bzimage(&compress(Compression::Lz4Legacy, &guest));
    let (elf, _) = vmlinux::vmlinux_from_image(&img).expect("extract");
    assert_eq!(elf.len(), guest.len());
    assert!(elf == guest);
}

#[test]
fn wrong_recorded_size_is_detected() {
    let guest = support::pvh_guest::elf(support::pvh_guest::READY_LINE);
    let mut payload = compress(Compression::Zstd, &guest);
    let n = payload.len();
    payload[n - 4..].copy_from_slice(&1234u32.to_le_bytes());
    assert!(matches!(
        vmlinux::vmlinux_from_image(&bzimage(&payload)),
        Err(VmlinuxError::SizeMismatch { expected: 1234, .. })
    ));
}

#[test]
fn elf_without_pvh_note_is_refused() {
    let mut guest = support::pvh_guest::elf(support::pvh_guest::READY_LINE);
    guest[0xb0 + 8] = 17; // note type no longer XEN_ELFNOTE_PHYS32_ENTRY
    assert!(matches!(
        vmlinux::inspect_elf(&guest),
        Err(VmlinuxError::NoPvhNote)
    ));
    let img = bzimage(&compress(Compression::Gzip, &guest));
    assert!(matches!(
        vmlinux::vmlinux_from_image(&img),
        Err(VmlinuxError::NoPvhNote)
    ));
}

#[tokio::test]
async fn prepare_writes_vmlinux_once_for_bzimage_and_uses_elf_in_place() {
    let tmp = tempfile::tempdir().expect("tmp");
    let guest = support::pvh_guest::write(tmp.path());
    assert_eq!(
        vmlinux::prepare_vmlinux(&guest, tmp.path()).await.expect("elf"),
        guest
    );
    let bz = tmp.path().join("bzImage");
    let elf = std::fs::read(&guest).expect("read");
    std::fs::write(&bz, bzimage(&compress(Compression::Xz, &elf))).expect("write");
    let out = vmlinux::prepare_vmlinux(&bz, tmp.path()).await.expect("bz");
    assert_eq!(out, tmp.path().join("vmlinux"));
    assert_eq!(std::fs::read(&out).expect("read"), elf);
}

/// The Debian kernel of the guest assets: a bzImage with an LZ4 legacy payload whose ELF has
/// the PVH note.
#[tokio::test]
async fn real_debian_kernel() {
    let kernel = support::guest::assets().await.kernel;
    let image = std::fs::read(&kernel).expect("read kernel");
    let payload = vmlinux::bzimage_payload(&image).expect("payload");
    assert_eq!(payload.compression, Compression::Lz4Legacy);
    let (elf, info) = vmlinux::vmlinux_from_image(&image).expect("extract");
    assert!(elf.starts_with(b"\x7fELF\x02\x01"));
    assert!(
        elf.len() > 20 << 20,
        "a distribution vmlinux is tens of MiB, got {}",
        elf.len()
    );
    // Linux places its PVH entry (pvh_start_xen) in low physical memory, above 1 MiB.
    assert!(
        info.pvh_entry >= 0x10_0000 && info.pvh_entry < 0x1_0000_0000,
        "{:#x}",
        info.pvh_entry
    );
}
