//! `setup::prepare_image` end to end against a catalog whose image and SHA256SUMS are served
//! on 127.0.0.1: verified download into the cache, per-VM qcow2 overlays and clones, cache
//! reuse, growing the disk, and a checksum list that does not match.

#[path = "support/storage.rs"]
mod storage_support;

use storage_support::http::TestServer;
use storage_support::{run, sha256, sha256_file};
use vm_rs::config::DiskFormat;
use vm_rs::setup::{prepare_image, pull_image, PrepareMode, PrepareOptions, SetupError};
use vm_rs::storage::{image_info, AssetKind, CatalogEntry, CloneMethod, DownloadError, ImageCatalog};

/// A small qcow2 "cloud image" with a known pattern at offset 0.
fn make_qcow2_base(dir: &std::path::Path) -> Vec<u8> {
    let p = dir.join("src.qcow2");
    let ps = p.to_str().expect("utf8");
    run("qemu-img", &["create", "-q", "-f", "qcow2", ps, "64M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x42 0 2M", ps]);
    std::fs::read(&p).expect("read")
}

fn catalog(server: &TestServer, sums_path: &str) -> ImageCatalog {
    let mut c = ImageCatalog::builtin();
    c.insert(CatalogEntry {
        name: "test-cloud".into(),
        url: server.url("/images/test-cloud.qcow2"),
        kind: AssetKind::Disk,
        format: DiskFormat::Qcow2,
        sha256: None,
        sha256sums_url: Some(server.url(sums_path)),
        description: None,
    })
    .expect("insert");
    c
}

#[tokio::test]
async fn prepare_image_downloads_once_and_makes_overlays_and_clones() {
    let work = tempfile::tempdir().expect("tempdir");
    let image = make_qcow2_base(work.path());
    let server = TestServer::start().await;
    server.put("/images/test-cloud.qcow2", image.clone());
    server.put(
        "/images/SHA256SUMS",
        format!(
            "{} *other.img\n{} *test-cloud.qcow2\n",
            sha256(b"x"),
            sha256(&image)
        )
        .into_bytes(),
    );
    let opts = PrepareOptions {
        cache_dir: work.path().join("cache"),
        catalog: Some(catalog(&server, "/images/SHA256SUMS")),
        size: Some(1 << 30),
        ..PrepareOptions::default()
    };

    let vm1 = work.path().join("vm1.qcow2");
    let mut progressed = 0u64;
    let p = prepare_image("test-cloud", &vm1, &opts, &mut |pr| progressed = pr.downloaded)
        .await
        .expect("prepare");
    assert!(!p.cached);
    assert_eq!(progressed, image.len() as u64);
    assert_eq!(p.sha256, sha256(&image));
    assert_eq!(sha256_file(&p.base), sha256(&image));
    assert_eq!(
        p.base,
        work.path()
            .join("cache/test-cloud")
            .join(sha256(&image))
            .join("test-cloud.qcow2")
    );
    assert_eq!(p.disk.format, DiskFormat::Qcow2);
    assert!(!p.disk.read_only);
    let info = image_info(&vm1).await.expect("info");
    assert_eq!(info.virtual_size, 1 << 30, "overlay grown");
    assert_eq!(
        info.backing_filename.as_deref(),
        std::fs::canonicalize(&p.base).expect("canon").to_str()
    );

    // The guest's writes go to its overlay; the cached base keeps its digest.
    let v = vm1.to_str().expect("utf8");
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x99 0 64k", v]);
    let out = run("qemu-io", &["-f", "qcow2", "-r", "-c", "read -P 0x42 1M 64k", v]);
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(sha256_file(&p.base), sha256(&image));

    // A second VM reuses the cache: only the checksum list is fetched again.
    let image_gets = |s: &TestServer| {
        s.seen()
            .iter()
            .filter(|r| r.path == "/images/test-cloud.qcow2")
            .count()
    };
    assert_eq!(image_gets(&server), 1);
    let vm2 = work.path().join("vm2.qcow2");
    let clone_opts = PrepareOptions {
        mode: PrepareMode::Clone,
        size: None,
        ..opts.clone()
    };
    let p2 = prepare_image("test-cloud", &vm2, &clone_opts, &mut |_| {})
        .await
        .expect("prepare clone");
    assert!(p2.cached);
    assert_eq!(image_gets(&server), 1);
    assert!(matches!(
        p2.clone_method,
        Some(CloneMethod::Reflink | CloneMethod::SparseCopy)
    ));
    assert_eq!(sha256_file(&vm2), sha256(&image));

    // The cached base carries a verification stamp; tampering with the base (same size, new
    // bytes) invalidates it, and the next prepare re-verifies and re-downloads.
    let stamp = {
        let mut s = p.base.clone().into_os_string();
        s.push(".verified");
        std::path::PathBuf::from(s)
    };
    assert!(stamp.is_file());
    {
        use std::os::unix::fs::{FileExt, PermissionsExt};
        std::fs::set_permissions(&p.base, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p.base)
            .expect("open base");
        f.write_all_at(b"tampered", 4096).expect("tamper");
    }
    assert_ne!(sha256_file(&p.base), sha256(&image));
    let vm3 = work.path().join("vm3.qcow2");
    let p3 = prepare_image("test-cloud", &vm3, &opts, &mut |_| {})
        .await
        .expect("prepare after tampering");
    assert!(!p3.cached);
    assert_eq!(image_gets(&server), 2);
    assert_eq!(sha256_file(&p3.base), sha256(&image));

    // A new release (new bytes, new digest in the sums) lands beside the old base; VMs backed
    // by the old one keep reading it.
    let newdir = work.path().join("new");
    std::fs::create_dir(&newdir).expect("mkdir");
    let image2 = {
        let p2 = newdir.join("src.qcow2");
        let ps = p2.to_str().expect("utf8");
        run("qemu-img", &["create", "-q", "-f", "qcow2", ps, "64M"]);
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x43 0 2M", ps]);
        std::fs::read(&p2).expect("read")
    };
    server.put("/images/test-cloud.qcow2", image2.clone());
    server.put(
        "/images/SHA256SUMS",
        format!("{} *test-cloud.qcow2\n", sha256(&image2)).into_bytes(),
    );
    let vm4 = work.path().join("vm4.qcow2");
    let p4 = prepare_image("test-cloud", &vm4, &opts, &mut |_| {})
        .await
        .expect("prepare new release");
    assert_ne!(p4.base, p.base);
    assert_eq!(sha256_file(&p4.base), sha256(&image2));
    assert_eq!(sha256_file(&p.base), sha256(&image));
    let out = run("qemu-io", &["-f", "qcow2", "-r", "-c", "read -P 0x42 1M 64k", v]);
    assert!(!out.contains("failed"), "{out}");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-r",
            "-c",
            "read -P 0x43 1M 64k",
            vm4.to_str().expect("utf8"),
        ],
    );
    assert!(!out.contains("failed"), "{out}");

    // Existing targets are never overwritten.
    let err = prepare_image("test-cloud", &vm1, &opts, &mut |_| {}).await;
    assert!(matches!(err, Err(SetupError::Disk { .. })), "{err:?}");

    let err = prepare_image("no-such-image", &work.path().join("x"), &opts, &mut |_| {}).await;
    assert!(matches!(err, Err(SetupError::Catalog { .. })), "{err:?}");
}

#[tokio::test]
async fn prepare_image_rejects_an_image_the_sums_do_not_vouch_for() {
    let work = tempfile::tempdir().expect("tempdir");
    let image = make_qcow2_base(work.path());
    let server = TestServer::start().await;
    server.put("/images/test-cloud.qcow2", image.clone());
    // The list vouches for different bytes (e.g. a tampered mirror).
    server.put(
        "/images/SHA256SUMS",
        format!("{} *test-cloud.qcow2\n", sha256(b"the real image")).into_bytes(),
    );
    server.put(
        "/images/EMPTY_SUMS",
        format!("{} *other.img\n", sha256(b"x")).into_bytes(),
    );
    let cache = work.path().join("cache");
    let opts = PrepareOptions {
        cache_dir: cache.clone(),
        catalog: Some(catalog(&server, "/images/SHA256SUMS")),
        ..PrepareOptions::default()
    };
    let target = work.path().join("vm.qcow2");
    let err = prepare_image("test-cloud", &target, &opts, &mut |_| {}).await;
    assert!(
        matches!(
            err,
            Err(SetupError::Download {
                source: DownloadError::ChecksumMismatch { .. },
                ..
            })
        ),
        "{err:?}"
    );
    assert!(!target.exists());
    let cached: Vec<_> = walk(&cache);
    assert!(cached.is_empty(), "cache holds {cached:?}");

    let opts = PrepareOptions {
        catalog: Some(catalog(&server, "/images/EMPTY_SUMS")),
        ..opts
    };
    let err = prepare_image("test-cloud", &target, &opts, &mut |_| {}).await;
    assert!(matches!(err, Err(SetupError::Catalog { .. })), "{err:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A "cloud image" whose qcow2 header points at a host file is refused even though the sums
/// vouch for it: attaching it would let the guest read that file through the backing chain.
#[tokio::test]
async fn prepare_image_refuses_bases_with_a_backing_file() {
    let work = tempfile::tempdir().expect("tempdir");
    let secret = work.path().join("host-secret.raw");
    std::fs::write(&secret, vec![0x5eu8; 1 << 20]).expect("secret");
    let evil = work.path().join("evil.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            secret.to_str().expect("utf8"),
            evil.to_str().expect("utf8"),
        ],
    );
    let image = std::fs::read(&evil).expect("read");
    let server = TestServer::start().await;
    server.put("/images/test-cloud.qcow2", image.clone());
    server.put(
        "/images/SHA256SUMS",
        format!("{} *test-cloud.qcow2\n", sha256(&image)).into_bytes(),
    );
    let opts = PrepareOptions {
        cache_dir: work.path().join("cache"),
        catalog: Some(catalog(&server, "/images/SHA256SUMS")),
        ..PrepareOptions::default()
    };
    let target = work.path().join("vm.qcow2");
    let err = prepare_image("test-cloud", &target, &opts, &mut |_| {}).await;
    assert!(
        matches!(&err, Err(SetupError::HasBackingFile { backing, .. }) if backing.contains("host-secret")),
        "{err:?}"
    );
    assert!(!target.exists());
}

/// Kernels and initrds are catalog assets too: `pull_image` fetches and verifies them, and
/// `prepare_image` refuses to make a VM disk out of one.
#[tokio::test]
async fn kernel_assets_are_pulled_but_not_made_into_disks() {
    let work = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start().await;
    let kernel = storage_support::pattern(300_000, 9);
    server.put("/unpacked/vmlinuz-generic", kernel.clone());
    server.put(
        "/unpacked/SHA256SUMS",
        format!("{} *vmlinuz-generic\n", sha256(&kernel)).into_bytes(),
    );
    let mut cat = ImageCatalog::builtin();
    cat.insert(CatalogEntry {
        name: "test-kernel".into(),
        url: server.url("/unpacked/vmlinuz-generic"),
        kind: AssetKind::Kernel,
        format: DiskFormat::Raw,
        sha256: None,
        sha256sums_url: Some(server.url("/unpacked/SHA256SUMS")),
        description: None,
    })
    .expect("insert");
    let opts = PrepareOptions {
        cache_dir: work.path().join("cache"),
        catalog: Some(cat),
        ..PrepareOptions::default()
    };
    let pulled = pull_image("test-kernel", &opts, &mut |_| {}).await.expect("pull");
    assert!(!pulled.cached);
    assert_eq!(std::fs::read(&pulled.path).expect("read"), kernel);
    let again = pull_image("test-kernel", &opts, &mut |_| {})
        .await
        .expect("pull again");
    assert!(again.cached);
    assert_eq!(again.path, pulled.path);
    let gets = server
        .seen()
        .iter()
        .filter(|r| r.path == "/unpacked/vmlinuz-generic")
        .count();
    assert_eq!(gets, 1);

    let err = prepare_image("test-kernel", &work.path().join("vm.img"), &opts, &mut |_| {}).await;
    assert!(matches!(err, Err(SetupError::NotADisk { .. })), "{err:?}");
    assert!(!work.path().join("vm.img").exists());
}
