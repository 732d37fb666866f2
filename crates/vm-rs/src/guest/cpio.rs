//! A small writer (and reader) for the `newc` cpio format the Linux kernel unpacks as initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` + 13 eight-digit hex fields: ino, mode, uid,
//! gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the
//! NUL-terminated name padded to a multiple of 4 bytes, and the data padded to a multiple of 4.
//! The archive ends with an entry named `TRAILER!!!`. Names are stored without a leading `/`.
//!
//! The writer emits entries in the order given; [`super::initramfs::InitramfsBuilder`] sorts them
//! so that every directory precedes its contents. Timestamps are fixed at 0 so the same inputs
//! produce the same bytes. The reader ([`read_newc`]) treats its input as untrusted: every length
//! is checked against the remaining input and no entry is larger than the input itself.

use std::io::{self, Read, Write};

/// `S_IFDIR`.
pub const S_IFDIR: u32 = 0o040000;
/// `S_IFREG`.
pub const S_IFREG: u32 = 0o100000;
/// `S_IFLNK`.
pub const S_IFLNK: u32 = 0o120000;
/// `S_IFCHR`.
pub const S_IFCHR: u32 = 0o020000;
/// Mask of the file-type bits.
pub const S_IFMT: u32 = 0o170000;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;

/// One entry as written to or read from a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// Path inside the archive, without a leading `/`.
    pub name: String,
    /// Full mode: file type bits | permission bits.
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Device number for character/block devices (`major`, `minor`).
    pub rdev: (u32, u32),
    /// File contents, or the link target for symlinks; empty for directories and devices.
    pub data: Vec<u8>,
}

/// Streams entries into a newc archive.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// Append one entry whose contents are `data` (link target for symlinks).
    pub fn append(&mut self, entry: &CpioEntry) -> io::Result<()> {
        self.append_header(entry, entry.data.len())?;
        self.write_bytes(&entry.data)?;
        self.pad()
    }

    /// Append one regular file whose `len` bytes come from `reader` (avoids holding big files
    /// in memory). Fails if the reader yields a different number of bytes.
    pub fn append_reader(
        &mut self,
        entry: &CpioEntry,
        len: u64,
        reader: &mut dyn io::Read,
    ) -> io::Result<()> {
        let len_usize = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large for cpio"))?;
        self.append_header(entry, len_usize)?;
        let copied = io::copy(&mut Read::take(reader, len), &mut self.out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file changed size while archiving",
            ));
        }
        self.written += copied;
        self.pad()
    }

    fn append_header(&mut self, entry: &CpioEntry, size: usize) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large for cpio"))?;
        let name_len = u32::try_from(entry.name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
        if entry.name.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "name contains a NUL byte",
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if entry.mode & S_IFMT == S_IFDIR { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino,
            entry.mode,
            entry.uid,
            entry.gid,
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            entry.rdev.0,
            entry.rdev.1,
            name_len,
            0, // check
        );
        self.write_bytes(header.as_bytes())?;
        self.write_bytes(entry.name.as_bytes())?;
        self.write_bytes(&[0])?;
        self.pad()
    }

    fn write_bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.write_bytes(&[0u8; 3][..4 - rem])?;
        }
        Ok(())
    }

    /// Write the trailer and return the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.append(&CpioEntry {
            name: TRAILER.to_string(),
            mode: 0,
            uid: 0,
            gid: 0,
            rdev: (0, 0),
            data: Vec::new(),
        })?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Why a newc archive could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CpioReadError {
    /// The input ended inside an entry.
    #[error("archive truncated at offset {offset}")]
    Truncated {
        /// Byte offset where more input was expected.
        offset: usize,
    },
    /// A header did not start with the newc magic.
    #[error("bad magic at offset {offset}")]
    BadMagic {
        /// Byte offset of the header.
        offset: usize,
    },
    /// A header field was not hexadecimal.
    #[error("bad header field at offset {offset}")]
    BadField {
        /// Byte offset of the header.
        offset: usize,
    },
    /// A name was not valid UTF-8 or not NUL-terminated.
    #[error("bad entry name at offset {offset}")]
    BadName {
        /// Byte offset of the header.
        offset: usize,
    },
}

/// Parse a whole newc archive (up to its trailer) into entries.
pub fn read_newc(input: &[u8]) -> Result<Vec<CpioEntry>, CpioReadError> {
    let mut entries = Vec::new();
    let mut off = 0usize;
    loop {
        let header = input
            .get(off..off + HEADER_LEN)
            .ok_or(CpioReadError::Truncated { offset: off })?;
        if &header[..6] != MAGIC {
            return Err(CpioReadError::BadMagic { offset: off });
        }
        let field = |i: usize| -> Result<u32, CpioReadError> {
            let s = &header[6 + i * 8..6 + (i + 1) * 8];
            std::str::from_utf8(s)
                .ok()
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or(CpioReadError::BadField { offset: off })
        };
        let mode = field(1)?;
        let uid = field(2)?;
        let gid = field(3)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let name_len = field(11)? as usize;
        let name_start = off + HEADER_LEN;
        let name_bytes = input
            .get(name_start..name_start.saturating_add(name_len))
            .ok_or(CpioReadError::Truncated { offset: name_start })?;
        let (last, name_bytes) = name_bytes
            .split_last()
            .ok_or(CpioReadError::BadName { offset: off })?;
        if *last != 0 {
            return Err(CpioReadError::BadName { offset: off });
        }
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| CpioReadError::BadName { offset: off })?
            .to_string();
        let data_start = align4(name_start + name_len);
        let data = input
            .get(data_start..data_start.saturating_add(size))
            .ok_or(CpioReadError::Truncated { offset: data_start })?;
        off = align4(data_start + size);
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            mode,
            uid,
            gid,
            rdev,
            data: data.to_vec(),
        });
    }
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(name: &str, mode: u32, data: &[u8]) -> CpioEntry {
        CpioEntry {
            name: name.into(),
            mode,
            uid: 0,
            gid: 0,
            rdev: (0, 0),
            data: data.to_vec(),
        }
    }

    #[test]
    fn round_trip() {
        let entries = vec![
            entry("bin", S_IFDIR | 0o755, b""),
            entry("bin/busybox", S_IFREG | 0o755, b"\x7fELF..."),
            entry("bin/sh", S_IFLNK | 0o777, b"busybox"),
            CpioEntry {
                rdev: (5, 1),
                ..entry("dev/console", S_IFCHR | 0o600, b"")
            },
        ];
        let mut w = CpioWriter::new(Vec::new());
        for e in &entries {
            w.append(e).unwrap();
        }
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(read_newc(&bytes).unwrap(), entries);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        w.append(&entry("a", S_IFREG | 0o644, b"hello world")).unwrap();
        let bytes = w.finish().unwrap();
        for cut in [0, 5, 110, 115, 120] {
            assert!(read_newc(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn reader_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read_newc(&data);
        }

        #[test]
        fn arbitrary_entries_round_trip(
            files in proptest::collection::vec(("[a-z]{1,12}", proptest::collection::vec(any::<u8>(), 0..64)), 0..8)
        ) {
            let entries: Vec<_> = files.iter().map(|(n, d)| entry(n, S_IFREG | 0o644, d)).collect();
            let mut w = CpioWriter::new(Vec::new());
            for e in &entries { w.append(e).unwrap(); }
            let bytes = w.finish().unwrap();
            prop_assert_eq!(read_newc(&bytes).unwrap(), entries);
        }
    }
}
