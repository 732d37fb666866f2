//! Turning a bzImage into the ELF `vmlinux` that Cloud Hypervisor and Firecracker direct-boot.
//!
//! Cloud Hypervisor (and Firecracker, which also enters a PVH kernel that way) loads an uncompressed ELF kernel and enters it through the PVH entry point
//! (a `Xen` ELF note of type [`XEN_ELFNOTE_PHYS32_ENTRY`]); it does not run the bzImage's own
//! decompressor. Distribution kernels ship only the bzImage, so this module digs the ELF out of
//! it and the same guest assets serve both backends.
//!
//! ## bzImage layout (x86 boot protocol ≥ 2.08)
//!
//! ```text
//! 0x1f1  u8   setup_sects        (0 means 4)
//! 0x202  [4]  "HdrS"             header magic
//! 0x206  u16  version            boot protocol version
//! 0x248  u32  payload_offset     from the start of the protected-mode code
//! 0x24c  u32  payload_length
//! (setup_sects + 1) * 512        start of the protected-mode code
//! ```
//!
//! The payload is the compressed `vmlinux.bin` (an ELF). Its compressor is recognised by magic:
//! gzip `1f 8b`, xz `fd 37 7a 58 5a 00`, zstd `28 b5 2f fd`, LZ4 legacy `02 21 4c 18` (Debian's
//! choice). Every compressor but gzip is followed by a 4-byte little-endian uncompressed size,
//! which is checked against the output. The LZ4 legacy format is the magic followed by chunks of
//! `u32 compressed length` + one LZ4 block of at most 8 MiB of output.
//!
//! The image is untrusted input: every offset is bounds-checked and the output is capped at
//! [`MAX_VMLINUX_SIZE`].

use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest uncompressed kernel accepted (a distribution vmlinux is ~60 MiB).
pub const MAX_VMLINUX_SIZE: usize = 512 << 20;

/// ELF note type carrying the 32-bit PVH entry point (from Xen's `elfnote.h`).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Why a kernel image could not be turned into a bootable vmlinux.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmlinuxError {
    /// Reading or writing a file failed.
    #[error("i/o error on {}", path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("not a bzImage or ELF kernel: {reason}")]
    UnknownFormat {
        /// What was checked.
        reason: String,
    },
    /// The bzImage header points outside the file or is too old.
    #[error("malformed bzImage: {reason}")]
    BadBzImage {
        /// What is wrong.
        reason: String,
    },
    /// The payload uses a compressor this module does not handle.
    #[error("unsupported kernel payload compression (magic {magic})")]
    UnsupportedCompression {
        /// First bytes of the payload, hex.
        magic: String,
    },
    /// The payload could not be decompressed.
    #[error("cannot decompress {compression} kernel payload")]
    Decompress {
        /// Compressor.
        compression: Compression,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The decompressed kernel exceeds [`MAX_VMLINUX_SIZE`].
    #[error("decompressed kernel exceeds {max} bytes")]
    TooLarge {
        /// Limit.
        max: usize,
    },
    /// The uncompressed size recorded after the payload does not match the output.
    #[error("decompressed kernel is {got} bytes but the image records {expected}")]
    SizeMismatch {
        /// Recorded size (low 32 bits).
        expected: u32,
        /// Output size (low 32 bits).
        got: u32,
    },
    /// The (decompressed) kernel is not a usable x86-64 ELF.
    #[error("invalid vmlinux ELF: {reason}")]
    BadElf {
        /// What is wrong.
        reason: String,
    },
    /// The ELF has no PVH entry note, so Cloud Hypervisor cannot boot it.
    #[error("vmlinux has no PVH entry note (kernel built without CONFIG_PVH)")]
    NoPvhNote,
}

/// Compressor of a bzImage payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (deflate).
    Gzip,
    /// xz (LZMA2).
    Xz,
    /// Zstandard.
    Zstd,
    /// LZ4 legacy frame format.
    Lz4Legacy,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lz4Legacy => "lz4",
        })
    }
}

/// What [`inspect_elf`] found in a vmlinux.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PvhElf {
    /// ELF entry point (`e_entry`).
    pub elf_entry: u64,
    /// The PVH 32-bit entry point from the note (guest physical address).
    pub pvh_entry: u64,
}

/// The compressed payload inside a bzImage and its compressor.
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a> {
    /// Compressor.
    pub compression: Compression,
    /// Compressed bytes, without the trailing size field.
    pub data: &'a [u8],
    /// Uncompressed size recorded after the payload (absent for gzip).
    pub recorded_size: Option<u32>,
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// Whether `image` starts like an ELF file.
pub fn is_elf(image: &[u8]) -> bool {
    image.starts_with(&ELF_MAGIC)
}

/// Locate the compressed payload of a bzImage.
pub fn bzimage_payload(image: &[u8]) -> Result<Payload<'_>, VmlinuxError> {
    let bad = |reason: &str| VmlinuxError::BadBzImage {
        reason: reason.to_string(),
    };
    if image.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return Err(VmlinuxError::UnknownFormat {
            reason: "no ELF magic and no bzImage \"HdrS\" header".into(),
        });
    }
    let version = read_u16(image, 0x206).ok_or_else(|| bad("truncated header"))?;
    if version < 0x0208 {
        return Err(bad(&format!(
            "boot protocol {}.{:02} has no payload fields (need 2.08)",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match image.get(0x1f1).copied() {
        Some(0) => 4,
        Some(n) => usize::from(n),
        None => return Err(bad("truncated header")),
    };
    let pm_start = (setup_sects + 1) * 512;
    let offset = read_u32(image, 0x248).ok_or_else(|| bad("truncated header"))? as usize;
    let length = read_u32(image, 0x24c).ok_or_else(|| bad("truncated header"))? as usize;
    let start = pm_start
        .checked_add(offset)
        .ok_or_else(|| bad("payload offset overflows"))?;
    let end = start
        .checked_add(length)
        .ok_or_else(|| bad("payload length overflows"))?;
    let payload = image
        .get(start..end)
        .ok_or_else(|| bad("payload lies outside the file"))?;
    let compression = if payload.starts_with(&LZ4_LEGACY_MAGIC) {
        Compression::Lz4Legacy
    } else if payload.starts_with(&XZ_MAGIC) {
        Compression::Xz
    } else if payload.starts_with(&ZSTD_MAGIC) {
        Compression::Zstd
    } else if payload.starts_with(&GZIP_MAGIC) {
        Compression::Gzip
    } else {
        let n = payload.len().min(6);
        return Err(VmlinuxError::UnsupportedCompression {
            magic: hex::encode(&payload[..n]),
        });
    };
    if compression == Compression::Gzip {
        return Ok(Payload {
            compression,
            data: payload,
            recorded_size: None,
        });
    }
    let split = payload
        .len()
        .checked_sub(4)
        .ok_or_else(|| bad("payload shorter than its size field"))?;
    Ok(Payload {
        compression,
        data: &payload[..split],
        recorded_size: read_u32(payload, split),
    })
}

/// Read at most [`MAX_VMLINUX_SIZE`] bytes from `r`.
fn read_bounded(mut r: impl Read, compression: Compression) -> Result<Vec<u8>, VmlinuxError> {
    let mut out = Vec::new();
    (&mut r)
        .take(MAX_VMLINUX_SIZE as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|source| VmlinuxError::Decompress { compression, source })?;
    if out.len() > MAX_VMLINUX_SIZE {
        return Err(VmlinuxError::TooLarge {
            max: MAX_VMLINUX_SIZE,
        });
    }
    Ok(out)
}

fn lz4_legacy(data: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let err = |msg: String| VmlinuxError::Decompress {
        compression: Compression::Lz4Legacy,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
    };
    let mut pos = LZ4_LEGACY_MAGIC.len();
    let mut out: Vec<u8> = Vec::new();
    while pos < data.len() {
        let Some(size) = read_u32(data, pos) else {
            return Err(err(format!("truncated chunk header at offset {pos}")));
        };
        pos += 4;
        // Concatenated frames repeat the magic.
        if size.to_le_bytes() == LZ4_LEGACY_MAGIC {
            continue;
        }
        let size = size as usize;
        let chunk = pos
            .checked_add(size)
            .and_then(|end| data.get(pos..end))
            .ok_or_else(|| err(format!("chunk of {size} bytes at offset {pos} runs past the end")))?;
        pos += size;
        let base = out.len();
        if base >= MAX_VMLINUX_SIZE {
            return Err(VmlinuxError::TooLarge {
                max: MAX_VMLINUX_SIZE,
            });
        }
        out.resize(base + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(chunk, &mut out[base..])
            .map_err(|e| err(format!("chunk at offset {}: {e}", pos - size)))?;
        out.truncate(base + n);
        if out.len() > MAX_VMLINUX_SIZE {
            return Err(VmlinuxError::TooLarge {
                max: MAX_VMLINUX_SIZE,
            });
        }
    }
    Ok(out)
}

/// Decompress a payload found by [`bzimage_payload`], checking the recorded size.
pub fn decompress(payload: &Payload<'_>) -> Result<Vec<u8>, VmlinuxError> {
    let c = payload.compression;
    let out = match c {
        Compression::Gzip => read_bounded(flate2::read::GzDecoder::new(payload.data), c)?,
        Compression::Zstd => {
            let dec = crate::host::codec::zstd_single_frame(payload.data).map_err(|source| {
                VmlinuxError::Decompress {
                    compression: c,
                    source,
                }
            })?;
            read_bounded(dec, c)?
        }
        Compression::Xz => read_bounded(crate::host::codec::xz(payload.data), c)?,
        Compression::Lz4Legacy => lz4_legacy(payload.data)?,
    };
    if let Some(expected) = payload.recorded_size {
        let got = out.len() as u32;
        if got != expected {
            return Err(VmlinuxError::SizeMismatch { expected, got });
        }
    }
    Ok(out)
}

/// Check that `elf` is an x86-64 ELF with a PVH entry note and return its entry points.
pub fn inspect_elf(elf: &[u8]) -> Result<PvhElf, VmlinuxError> {
    let bad = |reason: &str| VmlinuxError::BadElf {
        reason: reason.to_string(),
    };
    if !is_elf(elf) {
        return Err(bad("no ELF magic"));
    }
    if elf.get(4) != Some(&2) {
        return Err(bad("not a 64-bit ELF"));
    }
    if elf.get(5) != Some(&1) {
        return Err(bad("not little-endian"));
    }
    if read_u16(elf, 0x12) != Some(62) {
        return Err(bad("not an x86-64 ELF"));
    }
    let elf_entry = read_u64(elf, 0x18).ok_or_else(|| bad("truncated header"))?;
    let phoff = read_u64(elf, 0x20).ok_or_else(|| bad("truncated header"))?;
    let phentsize = read_u16(elf, 0x36).ok_or_else(|| bad("truncated header"))? as usize;
    let phnum = read_u16(elf, 0x38).ok_or_else(|| bad("truncated header"))? as usize;
    if phnum == 0 {
        return Err(bad("no program headers"));
    }
    if phentsize < 56 {
        return Err(bad("program header entries too small"));
    }
    let phoff = usize::try_from(phoff).map_err(|_| bad("program header offset too large"))?;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| bad("program header offset overflows"))?;
        let p_type = read_u32(elf, ph).ok_or_else(|| bad("program headers past end of file"))?;
        if p_type != 4 {
            continue; // not PT_NOTE
        }
        let off = read_u64(elf, ph + 8).ok_or_else(|| bad("truncated program header"))?;
        let size = read_u64(elf, ph + 32).ok_or_else(|| bad("truncated program header"))?;
        let notes = usize::try_from(off)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, s)| elf.get(o..o.checked_add(s)?))
            .ok_or_else(|| bad("note segment outside the file"))?;
        if let Some(pvh_entry) = find_pvh_note(notes) {
            return Ok(PvhElf { elf_entry, pvh_entry });
        }
    }
    Err(VmlinuxError::NoPvhNote)
}

/// Walk ELF notes looking for `Xen`/[`XEN_ELFNOTE_PHYS32_ENTRY`].
fn find_pvh_note(mut notes: &[u8]) -> Option<u64> {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    while notes.len() >= 12 {
        let namesz = read_u32(notes, 0)? as usize;
        let descsz = read_u32(notes, 4)? as usize;
        let ntype = read_u32(notes, 8)?;
        let name_end = 12usize.checked_add(align4(namesz)?)?;
        let desc_end = name_end.checked_add(align4(descsz)?)?;
        let name = notes.get(12..12 + namesz)?;
        let desc = notes.get(name_end..name_end + descsz)?;
        if name == b"Xen\0" && ntype == XEN_ELFNOTE_PHYS32_ENTRY {
            return match desc.len() {
                4 => read_u32(desc, 0).map(u64::from),
                8 => read_u64(desc, 0),
                _ => None,
            };
        }
        notes = notes.get(desc_end..).unwrap_or_default();
    }
    None
}

/// Turn any supported kernel image (ELF or bzImage) into vmlinux bytes, verified to carry a
/// PVH note.
pub fn vmlinux_from_image(image: &[u8]) -> Result<(Vec<u8>, PvhElf), VmlinuxError> {
    let elf = if is_elf(image) {
        image.to_vec()
    } else {
        decompress(&bzimage_payload(image)?)?
    };
    let info = inspect_elf(&elf)?;
    Ok((elf, info))
}

/// Make a bootable vmlinux for `kernel`: an ELF kernel is used in place (after checking its PVH
/// note); a bzImage is extracted to `out_dir/vmlinux` (temp file, fsync, rename). Runs on the
/// blocking pool.
pub async fn prepare_vmlinux(kernel: &Path, out_dir: &Path) -> Result<PathBuf, VmlinuxError> {
    let kernel = kernel.to_path_buf();
    let out_dir = out_dir.to_path_buf();
    tokio::task::spawn_blocking(move || prepare_vmlinux_blocking(&kernel, &out_dir))
        .await
        .map_err(|e| VmlinuxError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })?
}

fn prepare_vmlinux_blocking(kernel: &Path, out_dir: &Path) -> Result<PathBuf, VmlinuxError> {
    use std::io::Write;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmlinuxError::Io { path, source }
    };
    let image = std::fs::read(kernel).map_err(io(kernel))?;
    if is_elf(&image) {
        inspect_elf(&image)?;
        return Ok(kernel.to_path_buf());
    }
    let (elf, _) = vmlinux_from_image(&image)?;
    drop(image);
    let target = out_dir.join(crate::vm_dir::VmDir::VMLINUX);
    let mut tmp = tempfile::NamedTempFile::new_in(out_dir).map_err(io(out_dir))?;
    tmp.write_all(&elf).map_err(io(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io(tmp.path()))?;
    tmp.persist(&target).map_err(|e| VmlinuxError::Io {
        path: target.clone(),
        source: e.error,
    })?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(setup_sects: u8, offset: u32, payload: &[u8]) -> Vec<u8> {
        let pm = (usize::from(if setup_sects == 0 { 4 } else { setup_sects }) + 1) * 512;
        let mut img = vec![0u8; pm + offset as usize];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn rejects_unknown_and_out_of_bounds() {
        assert!(matches!(
            bzimage_payload(b"hello"),
            Err(VmlinuxError::UnknownFormat { .. })
        ));
        let mut img = header(0, 16, b"\x02\x21\x4c\x18abcd");
        // claim a longer payload than the file holds
        img[0x24c..0x250].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            bzimage_payload(&img),
            Err(VmlinuxError::BadBzImage { .. })
        ));
        let img = header(2, 0, b"BZh91AY&SY");
        assert!(matches!(
            bzimage_payload(&img),
            Err(VmlinuxError::UnsupportedCompression { .. })
        ));
    }

    #[test]
    fn lz4_legacy_rejects_truncated_chunk() {
        let mut payload = LZ4_LEGACY_MAGIC.to_vec();
        payload.extend_from_slice(&100u32.to_le_bytes());
        payload.extend_from_slice(b"short");
        payload.extend_from_slice(&5u32.to_le_bytes()); // size trailer
        let img = header(0, 0, &payload);
        let p = bzimage_payload(&img).expect("payload");
        assert_eq!(p.compression, Compression::Lz4Legacy);
        assert_eq!(p.recorded_size, Some(5));
        assert!(matches!(decompress(&p), Err(VmlinuxError::Decompress { .. })));
    }

    #[test]
    fn elf_checks() {
        assert!(matches!(
            inspect_elf(b"\x7fELF\x01"),
            Err(VmlinuxError::BadElf { .. })
        ));
        // a 64-bit x86-64 header with no program headers
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(&ELF_MAGIC);
        h[4] = 2;
        h[5] = 1;
        h[0x12] = 62;
        assert!(matches!(inspect_elf(&h), Err(VmlinuxError::BadElf { .. })));
    }

    #[test]
    fn note_walk_is_bounded() {
        // namesz claims more than there is
        let mut n = Vec::new();
        n.extend_from_slice(&u32::MAX.to_le_bytes());
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&18u32.to_le_bytes());
        assert_eq!(find_pvh_note(&n), None);
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&18u32.to_le_bytes());
        n.extend_from_slice(b"Xen\0");
        n.extend_from_slice(&0x100000u32.to_le_bytes());
        assert_eq!(find_pvh_note(&n), Some(0x100000));
    }

    proptest::proptest! {
        #[test]
        fn random_images_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
            let _ = vmlinux_from_image(&data);
            let _ = inspect_elf(&data);
            let _ = find_pvh_note(&data);
        }
    }
}
