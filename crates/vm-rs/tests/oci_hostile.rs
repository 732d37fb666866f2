//! A corpus of hostile layers, each built here with raw tar headers: every one is rejected or
//! contained, and nothing outside the unpack root changes.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use support::oci_layout::{compress, Comp, LayerBuilder};
use tar::EntryType;
use vm_rs::oci::unpack::{apply_layers, SkipReason, UnpackError, UnpackReport};
use vm_rs::oci::UnpackOptions;

/// A sandbox: `root/` is unpacked into, `outside/` (a sibling) must never change.
struct Sandbox {
    dir: tempfile::TempDir,
}

type Snapshot = BTreeMap<PathBuf, (u32, u64, u64, Vec<u8>)>;

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside/sub")).unwrap();
        std::fs::write(dir.path().join("outside/secret"), b"secret").unwrap();
        std::fs::write(dir.path().join("outside/sub/file"), b"file").unwrap();
        Self { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }
    /// Everything in the sandbox except `root/`: path → (mode, nlink, mtime, content).
    fn snapshot(&self) -> Snapshot {
        let mut out = BTreeMap::new();
        walk(self.dir.path(), &self.root(), &mut out);
        out
    }
}

fn walk(dir: &Path, skip: &Path, out: &mut Snapshot) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p == skip {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        let content = if m.is_file() {
            std::fs::read(&p).unwrap()
        } else if m.file_type().is_symlink() {
            std::fs::read_link(&p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else {
            Vec::new()
        };
        out.insert(p.clone(), (m.mode(), m.nlink(), m.mtime() as u64, content));
        if m.is_dir() {
            walk(&p, skip, out);
        }
    }
}

/// Unpacks `tar` into a fresh sandbox; asserts the outside is untouched; returns the result.
fn run(tar: Vec<u8>, opts: &UnpackOptions) -> (Sandbox, Result<UnpackReport, UnpackError>) {
    run_with(|_| tar, opts)
}

/// Like [`run`], the layer built knowing the sandbox's absolute paths.
fn run_with(
    build: impl FnOnce(&Sandbox) -> Vec<u8>,
    opts: &UnpackOptions,
) -> (Sandbox, Result<UnpackReport, UnpackError>) {
    let sb = Sandbox::new();
    let tar = build(&sb);
    let before = sb.snapshot();
    let res = apply_layers(
        &sb.root(),
        vec![("hostile".to_owned(), Cursor::new(tar))],
        None,
        opts,
    );
    assert_eq!(before, sb.snapshot(), "something outside the root changed");
    (sb, res)
}

fn abs(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

#[test]
fn dotdot_paths_are_rejected() {
    for name in [
        &b"../outside/evil"[..],
        b"a/../../outside/evil",
        b"./../evil",
        b"..",
    ] {
        let tar = LayerBuilder::new()
            .raw(EntryType::Regular, name, b"", 0o644, b"pwned")
            .tar();
        let (_sb, res) = run(tar, &UnpackOptions::default());
        assert!(
            matches!(res, Err(UnpackError::UnsafePath { .. })),
            "{name:?}: {res:?}"
        );
    }
    // Whiteouts with `..` too.
    for name in [&b"../outside/.wh.secret"[..], b".wh..."] {
        let tar = LayerBuilder::new()
            .raw(EntryType::Regular, name, b"", 0o644, b"")
            .tar();
        let (_sb, res) = run(tar, &UnpackOptions::default());
        assert!(res.is_err(), "{name:?}: {res:?}");
    }
}

#[test]
fn absolute_paths_land_inside_the_root() {
    let mut target = String::new();
    let (sb, res) = run_with(
        |sb| {
            target = format!("{}/evil", abs(&sb.outside()));
            LayerBuilder::new()
                .raw(EntryType::Regular, target.as_bytes(), b"", 0o644, b"pwned")
                .tar()
        },
        &UnpackOptions::default(),
    );
    res.unwrap();
    assert!(!Path::new(&target).exists());
    let inside = sb.root().join(target.trim_start_matches('/'));
    assert_eq!(std::fs::read(inside).unwrap(), b"pwned");
}

#[test]
fn writes_through_symlinks_stay_inside() {
    // A symlink to the outside (relative and absolute), then a file and a dir written through it.
    for link in ["../outside", "../../outside", "ABS"] {
        let (sb, res) = run_with(
            |sb| {
                let target = if link == "ABS" {
                    abs(&sb.outside())
                } else {
                    link.to_owned()
                };
                LayerBuilder::new()
                    .symlink("escape", &target)
                    .raw(EntryType::Regular, b"escape/evil", b"", 0o644, b"pwned")
                    .raw(EntryType::Directory, b"escape/newdir/", b"", 0o755, b"")
                    .tar()
            },
            &UnpackOptions::default(),
        );
        // Either refused or created under the root; `run_with` checked the outside.
        if res.is_ok() {
            assert!(!sb.outside().join("evil").exists());
        }
    }
    // A symlink to `/` makes `rootlink/etc/x` resolve to `<root>/etc/x`.
    let tar = LayerBuilder::new()
        .symlink("rootlink", "/")
        .dir("etc", 0o755)
        .raw(EntryType::Regular, b"rootlink/etc/x", b"", 0o644, b"contained")
        .tar();
    let (sb, res) = run(tar, &UnpackOptions::default());
    res.unwrap();
    assert_eq!(std::fs::read(sb.root().join("etc/x")).unwrap(), b"contained");
}

#[test]
fn planted_symlink_is_replaced_not_written_through() {
    for relative in [false, true] {
        let (sb, res) = run_with(
            |sb| {
                let target = if relative {
                    "../outside/secret".to_owned()
                } else {
                    abs(&sb.outside().join("secret"))
                };
                LayerBuilder::new()
                    .symlink("victim", &target)
                    .file("victim", b"overwritten", 0o644)
                    .tar()
            },
            &UnpackOptions::default(),
        );
        res.unwrap();
        let m = std::fs::symlink_metadata(sb.root().join("victim")).unwrap();
        assert!(m.is_file());
        assert_eq!(std::fs::read(sb.root().join("victim")).unwrap(), b"overwritten");
    }
}

#[test]
fn hardlinks_cannot_reach_outside_files() {
    for target in ["../outside/secret", "/../outside/secret"] {
        let tar = LayerBuilder::new()
            .raw(EntryType::Link, b"hl", target.as_bytes(), 0o644, b"")
            .tar();
        let (_sb, res) = run(tar, &UnpackOptions::default());
        assert!(
            matches!(res, Err(UnpackError::UnsafePath { .. })),
            "{target}: {res:?}"
        );
    }
    // Absolute target: resolved inside the root, where it does not exist.
    let (sb, res) = run_with(
        |sb| {
            let secret = abs(&sb.outside().join("secret"));
            LayerBuilder::new()
                .raw(EntryType::Link, b"hl", secret.as_bytes(), 0o644, b"")
                .tar()
        },
        &UnpackOptions::default(),
    );
    assert!(res.is_err());
    assert_eq!(std::fs::metadata(sb.outside().join("secret")).unwrap().nlink(), 1);
    // Through a symlinked directory pointing outside.
    let tar = LayerBuilder::new()
        .symlink("out", "../outside")
        .raw(EntryType::Link, b"hl", b"out/secret", 0o644, b"")
        .tar();
    let (sb, res) = run(tar, &UnpackOptions::default());
    assert!(res.is_err());
    assert!(!sb.root().join("hl").exists());
    // A hardlink to a symlink that points outside, then written: the write replaces the name.
    let tar = LayerBuilder::new()
        .symlink("s", "../outside/secret")
        .hardlink("h", "s")
        .file("h", b"replaced", 0o644)
        .tar();
    let (sb, res) = run(tar, &UnpackOptions::default());
    res.unwrap();
    assert_eq!(std::fs::read(sb.root().join("h")).unwrap(), b"replaced");
}

#[test]
fn whiteouts_through_symlinks_stay_inside() {
    let tar = LayerBuilder::new()
        .symlink("d", "../outside")
        .raw(EntryType::Regular, b"d/.wh.secret", b"", 0o644, b"")
        .raw(EntryType::Regular, b"d/.wh..wh..opq", b"", 0o644, b"")
        .tar();
    let _ = run(tar, &UnpackOptions::default());
    // Absolute symlink to the outside dir, whiteouts under it.
    let _ = run_with(
        |sb| {
            LayerBuilder::new()
                .symlink("d", &abs(&sb.outside()))
                .raw(EntryType::Regular, b"d/sub/.wh..wh..opq", b"", 0o644, b"")
                .raw(EntryType::Regular, b"d/.wh.sub", b"", 0o644, b"")
                .raw(EntryType::Regular, b"d/.wh.secret", b"", 0o644, b"")
                .tar()
        },
        &UnpackOptions::default(),
    );
}

#[test]
fn device_nodes_skipped_unless_asked_setuid_dropped() {
    let tar = LayerBuilder::new()
        .device("dev/null", EntryType::Char, 1, 3)
        .device("dev/sda", EntryType::Block, 8, 0)
        .file("suid", b"#!", 0o4755)
        .file("sgid", b"#!", 0o2755)
        .tar();
    let (sb, res) = run(tar.clone(), &UnpackOptions::default());
    let report = res.unwrap();
    assert_eq!(
        report
            .skipped
            .iter()
            .filter(|s| s.reason == SkipReason::Device)
            .count(),
        2
    );
    assert!(!sb.root().join("dev/null").exists() && !sb.root().join("dev/sda").exists());
    assert_eq!(
        std::fs::metadata(sb.root().join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        std::fs::metadata(sb.root().join("sgid")).unwrap().mode() & 0o7777,
        0o755
    );

    if rustix::process::geteuid().is_root() {
        let opts = UnpackOptions {
            allow_devices: true,
            allow_setuid: true,
            ..UnpackOptions::default()
        };
        let (sb, res) = run(tar, &opts);
        assert!(res.unwrap().skipped.is_empty());
        use std::os::unix::fs::FileTypeExt;
        let m = std::fs::symlink_metadata(sb.root().join("dev/null")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), rustix::fs::makedev(1, 3));
        assert_eq!(
            std::fs::metadata(sb.root().join("suid")).unwrap().mode() & 0o7777,
            0o4755
        );
    }
}

#[test]
fn size_and_entry_bombs_are_bounded() {
    // 256 MiB of zeros compress to a few hundred KiB of zstd.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(256 << 20);
    h.set_mode(0o644);
    b.append_data(&mut h, "bomb", std::io::repeat(0).take(256 << 20))
        .unwrap();
    let tar = b.into_inner().unwrap();
    let blob = compress(&tar, Comp::Zstd);
    assert!(blob.len() < 4 << 20);
    let opts = UnpackOptions {
        max_bytes: 16 << 20,
        ..UnpackOptions::default()
    };
    let (sb, res) = run(blob, &opts);
    assert!(
        matches!(res, Err(UnpackError::Limit { what: "bytes", .. })),
        "{res:?}"
    );
    // Refused before writing: nothing big on disk.
    let written = std::fs::metadata(sb.root().join("bomb"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(written <= 16 << 20);

    let mut lb = LayerBuilder::new();
    for i in 0..200 {
        lb = lb.file(&format!("f{i}"), b"", 0o644);
    }
    let opts = UnpackOptions {
        max_entries: 100,
        ..UnpackOptions::default()
    };
    let (_sb, res) = run(lb.tar(), &opts);
    assert!(
        matches!(res, Err(UnpackError::Limit { what: "entries", .. })),
        "{res:?}"
    );
}

#[test]
fn wrong_diff_id_is_rejected() {
    let tar = LayerBuilder::new().file("a", b"a", 0o644).tar();
    let sb = Sandbox::new();
    let wrong = vm_rs::oci::Digest::of(b"something else");
    let res = apply_layers(
        &sb.root(),
        vec![("layer".to_owned(), Cursor::new(compress(&tar, Comp::Gzip)))],
        Some(std::slice::from_ref(&wrong)),
        &UnpackOptions::default(),
    );
    assert!(matches!(res, Err(UnpackError::DiffIdMismatch { .. })), "{res:?}");
    let right = vm_rs::oci::Digest::of(&tar);
    let sb = Sandbox::new();
    apply_layers(
        &sb.root(),
        vec![("layer".to_owned(), Cursor::new(compress(&tar, Comp::Gzip)))],
        Some(std::slice::from_ref(&right)),
        &UnpackOptions::default(),
    )
    .unwrap();
}

#[test]
fn garbage_is_an_archive_error_not_a_panic() {
    for bytes in [
        vec![0x1f, 0x8b, 1, 2, 3],
        vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0],
        vec![7u8; 1000],
    ] {
        let (_sb, res) = run(bytes, &UnpackOptions::default());
        assert!(res.is_err());
    }
}

use std::io::Read as _;

#[test]
fn symlink_replaced_by_directory_is_followed_no_further() {
    // `a -> elsewhere` is used as a parent, then replaced by a real directory: later entries
    // under `a/` must land in the new directory, not where the symlink pointed.
    let tar = LayerBuilder::new()
        .dir("elsewhere", 0o755)
        .symlink("a", "elsewhere")
        .file("a/first", b"1", 0o644)
        .dir("a", 0o755)
        .file("a/second", b"2", 0o644)
        .tar();
    let (sb, res) = run(tar, &UnpackOptions::default());
    res.unwrap();
    let r = sb.root();
    assert!(r.join("elsewhere/first").is_file());
    assert!(std::fs::symlink_metadata(r.join("a")).unwrap().is_dir());
    assert!(r.join("a/second").is_file());
    assert!(!r.join("elsewhere/second").exists());
}

mod random {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        File(String),
        Dir(String),
        Symlink(String, String),
        Hardlink(String, String),
        Whiteout(String),
        Opaque(String),
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                6 => Just("a"),
                3 => Just("b"),
                2 => Just("out"),
                1 => Just("."),
                1 => Just(""),
                1 => Just(".."),
            ],
            1..4,
        )
        .prop_map(|c| c.join("/"))
    }

    fn target() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => Just("../outside".to_owned()),
            2 => Just("../../outside/secret".to_owned()),
            2 => Just("/".to_owned()),
            1 => Just("..".to_owned()),
            3 => Just("ABS".to_owned()),
            2 => Just("ABS/secret".to_owned()),
            2 => Just("ABS/sub/file".to_owned()),
            2 => path(),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            path().prop_map(Op::File),
            path().prop_map(Op::Dir),
            (path(), target()).prop_map(|(p, t)| Op::Symlink(p, t)),
            (path(), target()).prop_map(|(p, t)| Op::Hardlink(p, t)),
            path().prop_map(Op::Whiteout),
            path().prop_map(Op::Opaque),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any sequence of entries, however hostile: no panic, and nothing outside the root
        /// changes (checked by `run_with`).
        #[test]
        fn random_layers_never_escape(layers in prop::collection::vec(prop::collection::vec(op(), 1..12), 1..4)) {
            let sb = Sandbox::new();
            let abs_out = abs(&sb.outside());
            let fix = |t: &str| t.replace("ABS", &abs_out);
            let mut tars = Vec::new();
            for ops in &layers {
                let mut b = LayerBuilder::new();
                for op in ops {
                    b = match op {
                        Op::File(p) => b.raw(EntryType::Regular, p.as_bytes(), b"", 0o644, b"pwned"),
                        Op::Dir(p) => b.raw(EntryType::Directory, p.as_bytes(), b"", 0o755, b""),
                        Op::Symlink(p, t) => b.raw(EntryType::Symlink, p.as_bytes(), fix(t).as_bytes(), 0o777, b""),
                        Op::Hardlink(p, t) => b.raw(EntryType::Link, p.as_bytes(), fix(t).as_bytes(), 0o644, b""),
                        Op::Whiteout(p) => {
                            let (d, n) = p.rsplit_once('/').unwrap_or(("", p.as_str()));
                            let name = if d.is_empty() { format!(".wh.{n}") } else { format!("{d}/.wh.{n}") };
                            b.raw(EntryType::Regular, name.as_bytes(), b"", 0o644, b"")
                        }
                        Op::Opaque(p) => b.raw(EntryType::Regular, format!("{p}/.wh..wh..opq").as_bytes(), b"", 0o644, b""),
                    };
                }
                tars.push(("layer".to_owned(), Cursor::new(b.tar())));
            }
            let before = sb.snapshot();
            // Ok or an error: either way, nothing outside the root changed.
            let _ = apply_layers(&sb.root(), tars, None, &UnpackOptions::default());
            prop_assert_eq!(before, sb.snapshot());
        }
    }
}

#[test]
fn ownership_is_recorded_when_not_applied() {
    let lower = LayerBuilder::new()
        .dir("home", 0o755)
        .file_owned("home/user/a", b"a", 0o644, 1000, 1000)
        .file_owned("home/user/b", b"b", 0o644, 1000, 100)
        .file_owned("srv/data", b"d", 0o644, 33, 33)
        .file_owned("root-owned", b"r", 0o644, 0, 0)
        .tar();
    let upper = LayerBuilder::new()
        .whiteout("home/user", "b")
        .file_owned("srv/data", b"d2", 0o644, 0, 0)
        .whiteout("", "nothing")
        .tar();
    let sb = Sandbox::new();
    let opts = UnpackOptions {
        preserve_ownership: false,
        record_ownership: true,
        ..UnpackOptions::default()
    };
    let report = apply_layers(
        &sb.root(),
        vec![
            ("l1".to_owned(), Cursor::new(lower)),
            ("l2".to_owned(), Cursor::new(upper)),
        ],
        None,
        &opts,
    )
    .unwrap();
    let got: Vec<(&str, u64, u64)> = report
        .ownership
        .iter()
        .map(|o| (o.path.as_str(), o.uid, o.gid))
        .collect();
    assert_eq!(got, [("home/user/a", 1000, 1000)]);
    // Not applied on disk: files belong to the caller.
    let me = rustix::process::geteuid().as_raw();
    assert_eq!(
        std::fs::metadata(sb.root().join("home/user/a")).unwrap().uid(),
        me
    );
}
