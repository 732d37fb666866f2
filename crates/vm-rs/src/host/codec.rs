//! Decoders for the compressed data vm-rs reads (OCI layers, Debian packages, kernel
//! payloads), behind one interface: the C zstd and liblzma libraries on Linux, pure-Rust
//! decoders (`ruzstd`, `lzma-rust2`) on other hosts.
//!
//! Why two: on Linux the C libraries are the fastest decoders and what vm-rs has always used.
//! A macOS build, though, must compile without a C toolchain for the target (CI type-checks
//! the Apple targets from Linux, where `zstd-sys` and `lzma-sys` cannot be built without an
//! Apple SDK), and vm-rs only ever *decompresses*, which the pure-Rust decoders do correctly.
//! The pure decoders are tested here against the C encoders on Linux, so the code a Mac runs is
//! exercised on every CI run.

use std::io::{BufRead, Read};

/// A zstd decoder over every frame of `r` (a concatenation of frames is one stream, as
/// `zstd -d` reads it).
pub fn zstd<'a, R: BufRead + 'a>(r: R) -> std::io::Result<Box<dyn Read + 'a>> {
    imp::zstd(r, false)
}

/// A zstd decoder of the first frame of `r` only (trailing bytes are ignored; a kernel
/// payload is followed by its size).
pub fn zstd_single_frame<'a, R: BufRead + 'a>(r: R) -> std::io::Result<Box<dyn Read + 'a>> {
    imp::zstd(r, true)
}

/// An xz decoder of the first stream of `r`.
pub fn xz<'a, R: Read + 'a>(r: R) -> Box<dyn Read + 'a> {
    imp::xz(r)
}

#[cfg(target_os = "linux")]
mod imp {
    pub use super::c::*;
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub use super::pure::*;
}

#[cfg(target_os = "linux")]
mod c {
    use std::io::{BufRead, Read};

    pub fn zstd<'a, R: BufRead + 'a>(r: R, single: bool) -> std::io::Result<Box<dyn Read + 'a>> {
        let d = zstd::stream::read::Decoder::with_buffer(r)?;
        Ok(if single {
            Box::new(d.single_frame())
        } else {
            Box::new(d)
        })
    }

    pub fn xz<'a, R: Read + 'a>(r: R) -> Box<dyn Read + 'a> {
        Box::new(xz2::read::XzDecoder::new(r))
    }
}

#[cfg(any(test, not(target_os = "linux")))]
mod pure {
    use ruzstd::decoding::{FrameDecoder, StreamingDecoder};
    use std::io::{BufRead, Read};

    /// ruzstd decodes one frame per [`StreamingDecoder`]; this reads frame after frame.
    struct Frames<R: BufRead> {
        current: Option<StreamingDecoder<R, FrameDecoder>>,
        single: bool,
    }

    fn invalid(e: impl std::fmt::Display) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("zstd: {e}"))
    }

    impl<R: BufRead> Read for Frames<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            loop {
                let Some(dec) = self.current.as_mut() else {
                    return Ok(0);
                };
                let n = dec.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                // this frame is done: another one follows unless the input ended
                let Some(done) = self.current.take() else {
                    return Ok(0);
                };
                if self.single {
                    return Ok(0);
                }
                let (mut src, frame) = done.into_parts();
                if src.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                // reads the next frame's header (and reuses the decoder's buffers)
                self.current = Some(StreamingDecoder::new_with_decoder(src, frame).map_err(invalid)?);
            }
        }
    }

    pub fn zstd<'a, R: BufRead + 'a>(r: R, single: bool) -> std::io::Result<Box<dyn Read + 'a>> {
        let first = StreamingDecoder::new(r).map_err(invalid)?;
        Ok(Box::new(Frames {
            current: Some(first),
            single,
        }))
    }

    pub fn xz<'a, R: Read + 'a>(r: R) -> Box<dyn Read + 'a> {
        Box::new(lzma_rust2::XzReader::new(r, false))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn data() -> Vec<u8> {
        // compressible but not trivial: text with a counter, plus some noise
        let mut v = Vec::new();
        for i in 0..40_000u32 {
            v.extend_from_slice(
                format!("line {i} of the layer {}\n", i.wrapping_mul(2_654_435_761)).as_bytes(),
            );
        }
        v
    }

    fn read_all(mut r: Box<dyn Read + '_>) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn zstd_decoders_agree_on_one_frame() {
        let d = data();
        let z = zstd::stream::encode_all(&d[..], 3).expect("encode");
        assert_eq!(
            read_all(pure::zstd(&z[..], false).expect("pure")).expect("read"),
            d
        );
        assert_eq!(read_all(c::zstd(&z[..], false).expect("c")).expect("read"), d);
    }

    #[test]
    fn zstd_decoders_agree_on_concatenated_frames_and_single_frame_mode() {
        let d = data();
        let (a, b) = d.split_at(d.len() / 3);
        let mut z = zstd::stream::encode_all(a, 1).expect("encode");
        z.extend(zstd::stream::encode_all(b, 19).expect("encode"));
        assert_eq!(
            read_all(pure::zstd(&z[..], false).expect("pure")).expect("read"),
            d
        );
        assert_eq!(read_all(c::zstd(&z[..], false).expect("c")).expect("read"), d);
        // single frame: the first part only, trailing bytes ignored
        let mut trailing = zstd::stream::encode_all(a, 3).expect("encode");
        trailing.extend_from_slice(&[0x12, 0x34, 0x56, 0x00]);
        assert_eq!(
            read_all(pure::zstd(&trailing[..], true).expect("pure")).expect("read"),
            a
        );
        assert_eq!(
            read_all(c::zstd(&trailing[..], true).expect("c")).expect("read"),
            a
        );
    }

    #[test]
    fn zstd_garbage_and_truncation_are_errors_not_panics() {
        assert!(pure::zstd(&b"not zstd at all"[..], false).is_err());
        let z = zstd::stream::encode_all(&data()[..], 3).expect("encode");
        let cut = &z[..z.len() / 2];
        let r = pure::zstd(cut, false).and_then(read_all);
        assert!(r.is_err(), "a truncated frame must not read as complete");
        let mut flipped = z.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        // corrupt data: an error or different bytes, never a panic
        if let Ok(out) = pure::zstd(&flipped[..], false).and_then(read_all) {
            assert_ne!(out, data());
        }
    }

    #[test]
    fn xz_decoders_agree() {
        use std::io::Write;
        let d = data();
        let mut enc = xz2::write::XzEncoder::new(Vec::new(), 6);
        enc.write_all(&d).expect("encode");
        let x = enc.finish().expect("finish");
        assert_eq!(read_all(pure::xz(&x[..])).expect("pure"), d);
        assert_eq!(read_all(c::xz(&x[..])).expect("c"), d);
        assert!(read_all(pure::xz(&x[..x.len() / 2])).is_err(), "truncated");
        assert!(read_all(pure::xz(&b"garbage garbage"[..])).is_err());
    }
}
