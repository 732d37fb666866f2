//! Tar entries of image layers: layers built from fuzzed entries (any path bytes, `..`,
//! absolute paths, symlinks and hardlinks pointing out, whiteouts, long-name and pax records,
//! devices, setuid bits) or taken as raw bytes are unpacked into a sandbox's root. Nothing may
//! panic; nothing outside the root is created, changed or linked to; limits hold; setuid bits
//! never survive unless allowed.
#![no_main]

use std::os::unix::fs::MetadataExt;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_rs::oci::unpack::{apply_layers, UnpackOptions};
use vmrs_fuzz::Sandbox;

/// Path pieces that make interesting paths likely.
const WORDS: [&[u8]; 12] = [
    b"a",
    b"b",
    b"..",
    b".",
    b"",
    b"outside",
    b"sentinel",
    b".wh.a",
    b".wh..wh..opq",
    b"up",
    b"dir",
    b"root",
];

#[derive(Arbitrary, Debug)]
enum Piece {
    Word(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Path {
    absolute: bool,
    pieces: Vec<Piece>,
}

impl Path {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.absolute {
            out.push(b'/');
        }
        for (i, p) in self.pieces.iter().enumerate() {
            if i > 0 {
                out.push(b'/');
            }
            match p {
                Piece::Word(w) => out.extend_from_slice(WORDS[*w as usize % WORDS.len()]),
                Piece::Raw(r) => out.extend_from_slice(r),
            }
        }
        out
    }
}

#[derive(Arbitrary, Debug)]
struct Entry {
    /// Index into the tar type bytes below.
    kind: u8,
    path: Path,
    link: Path,
    mode: u16,
    uid: u16,
    data: Vec<u8>,
}

const KINDS: [u8; 10] = [b'0', b'5', b'2', b'1', b'3', b'4', b'6', b'L', b'x', b'K'];

#[derive(Arbitrary, Debug)]
struct Input {
    layers: Vec<Vec<Entry>>,
    raw: Option<Vec<u8>>,
    allow_devices: bool,
    allow_setuid: bool,
    preserve_ownership: bool,
}

fn block(header: &tar::Header, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn layer(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let kind = KINDS[e.kind as usize % KINDS.len()];
        let mut h = tar::Header::new_gnu();
        let path = e.path.bytes();
        let link = e.link.bytes();
        {
            let old = h.as_old_mut();
            let n = path.len().min(old.name.len());
            old.name[..n].copy_from_slice(&path[..n]);
            let n = link.len().min(old.linkname.len());
            old.linkname[..n].copy_from_slice(&link[..n]);
        }
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_mode(u32::from(e.mode) & 0o7777);
        h.set_uid(u64::from(e.uid));
        h.set_gid(u64::from(e.uid));
        h.set_mtime(1_700_000_000);
        // Long-name / pax records carry the path in their data.
        let data: Vec<u8> = match kind {
            b'L' | b'K' => {
                let mut p = path.clone();
                p.push(0);
                p
            }
            b'x' => {
                let rec = |k: &str, v: &[u8]| {
                    let body_len = k.len() + v.len() + 3;
                    let mut len = body_len + 1;
                    while len != body_len + len.to_string().len() {
                        len = body_len + len.to_string().len();
                    }
                    let mut r = format!("{len} {k}=").into_bytes();
                    r.extend_from_slice(v);
                    r.push(b'\n');
                    r
                };
                let mut d = rec("path", &path);
                d.extend(rec("linkpath", &link));
                d
            }
            b'0' => e.data.clone(),
            _ => Vec::new(),
        };
        h.set_size(data.len() as u64);
        h.set_cksum();
        block(&h, &data, &mut out);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fuzz_target!(|input: Input| {
    let sandbox = Sandbox::new();
    let opts = UnpackOptions {
        max_bytes: 1 << 16,
        max_entries: 256,
        preserve_ownership: input.preserve_ownership,
        allow_devices: input.allow_devices,
        allow_setuid: input.allow_setuid,
        verify_diff_ids: false,
        record_ownership: !input.preserve_ownership,
    };
    let mut layers: Vec<(String, std::io::Cursor<Vec<u8>>)> = input
        .layers
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, l)| (format!("layer{i}"), std::io::Cursor::new(layer(l))))
        .collect();
    if let Some(raw) = input.raw {
        layers.push(("raw".into(), std::io::Cursor::new(raw)));
    }
    let result = apply_layers(&sandbox.root(), layers, None, &opts);
    sandbox.check();
    if let Ok(report) = result {
        assert!(report.bytes <= opts.max_bytes);
        assert!(report.entries <= opts.max_entries);
    }
    if !input.allow_setuid {
        let mut stack = vec![sandbox.root()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                    continue;
                };
                if m.is_dir() {
                    stack.push(e.path());
                } else if m.is_file() {
                    assert_eq!(m.mode() & 0o6000, 0, "{} kept setuid/setgid", e.path().display());
                }
            }
        }
    }
});
