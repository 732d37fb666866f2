//! Pull → store → unpack against a real registry (Debian `docker-registry` on 127.0.0.1),
//! with images built here and pushed with skopeo.

#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use support::oci_layout::{self, busybox_layer, Comp, LayerBuilder};
use support::registry::Registry;
use vm_rs::oci::{
    Digest, ImageStore, Platform, PortProtocol, PullError, PullOptions, StoreError, UnpackOptions,
};

/// Every blob in the store hashes to its name and nothing is half-written.
pub fn assert_store_consistent(store: &ImageStore) {
    let dir = store.root().join("blobs/sha256");
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let bytes = std::fs::read(e.path()).unwrap();
        assert_eq!(Digest::of(&bytes).hex(), name, "corrupt blob in store");
    }
}

fn blob_count(store: &ImageStore) -> usize {
    std::fs::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn pull_and_unpack_busybox_rootfs_equals_image() {
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let (layer, busybox) = busybox_layer(Comp::Gzip);
    let run = serde_json::json!({
        "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hello"], "Env": ["PATH=/bin", "A=b=c"],
        "WorkingDir": "/tmp", "User": "0:0", "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        "Labels": {"org.example": "yes"}
    });
    let mdigest = oci_layout::single_image_layout(layout.path(), "v1", std::slice::from_ref(&layer), run);
    reg.push_layout(layout.path(), "v1", "test/busybox", false);

    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path().join("images")).await.unwrap();
    let reference = format!("{}/test/busybox:v1", reg.host());
    let pulled = store.pull(&reference, &PullOptions::default()).await.unwrap();
    assert_eq!(pulled.record.manifest.to_string(), mdigest);
    assert_eq!(pulled.record.reference, reference);
    assert!(pulled.downloaded_bytes >= layer.blob.len() as u64);
    assert!(store.has_blob(&Digest::parse(&layer.digest).unwrap()));
    assert_store_consistent(&store);

    // The typed config.
    let c = store.config(&reference).await.unwrap();
    assert_eq!(c.argv(), ["/bin/sh", "-c", "echo hello"]);
    assert_eq!(c.env_pairs()[1], ("A".to_owned(), "b=c".to_owned()));
    assert_eq!(c.working_dir.as_deref(), Some("/tmp"));
    assert_eq!(c.user.as_deref(), Some("0:0"));
    assert_eq!(c.exposed_ports.len(), 2);
    assert_eq!(
        (c.exposed_ports[0].port, c.exposed_ports[0].protocol),
        (53, PortProtocol::Udp)
    );
    assert_eq!(c.labels["org.example"], "yes");
    assert_eq!((c.os.as_str(), c.architecture.as_str()), ("linux", "amd64"));

    // Unpack: the files on disk equal what was put in the image.
    let root = tempfile::tempdir().unwrap();
    let report = store
        .unpack(&reference, root.path(), &UnpackOptions::default())
        .await
        .unwrap();
    assert_eq!(report.layers, 1);
    let r = root.path();
    assert_eq!(std::fs::read(r.join("bin/busybox")).unwrap(), busybox);
    assert_eq!(
        std::fs::read_link(r.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
        "vmrs-test\n"
    );
    let meta = std::fs::metadata(r.join("bin/busybox")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    assert_eq!(meta.mtime(), 1_600_000_000);
    let tmp = std::fs::metadata(r.join("tmp")).unwrap();
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
    assert_eq!(std::fs::metadata(r.join("bin")).unwrap().mtime(), 1_600_000_000);
    // The unpacked static busybox runs.
    let out = std::process::Command::new(r.join("bin/busybox"))
        .args(["echo", "ok"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"ok\n");

    // A second pull downloads nothing; the list shows the image.
    let again = store.pull(&reference, &PullOptions::default()).await.unwrap();
    assert_eq!(again.downloaded_bytes, 0);
    let list = store.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].created.as_deref(), Some("2024-05-01T12:00:00Z"));
    assert!(list[0].record.size > layer.blob.len() as u64);

    // By digest, and by a digest the registry does not have.
    let by_digest = format!("{}/test/busybox@{mdigest}", reg.host());
    store.pull(&by_digest, &PullOptions::default()).await.unwrap();
    let missing = format!("{}/test/busybox@{}", reg.host(), Digest::of(b"nope"));
    let err = store.pull(&missing, &PullOptions::default()).await.unwrap_err();
    assert!(matches!(err, PullError::Manifest { .. }), "{err:?}");

    // A single-platform image pulled for another platform explicitly: refused, not recorded.
    let fresh = ImageStore::open(home.path().join("fresh")).await.unwrap();
    let other = PullOptions {
        platform: Some("linux/riscv64".parse().unwrap()),
        ..PullOptions::default()
    };
    match fresh.pull(&reference, &other).await.unwrap_err() {
        PullError::NoMatchingPlatform { available, .. } => assert_eq!(available, ["linux/amd64"]),
        e => panic!("unexpected {e:?}"),
    }
    assert!(fresh.list().await.unwrap().is_empty());
    assert!(
        !fresh.has_blob(&Digest::parse(&layer.digest).unwrap()),
        "layers fetched anyway"
    );
}

#[tokio::test]
async fn multi_layer_whiteouts_hardlinks_zstd_and_plain_layers() {
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let base = LayerBuilder::new()
        .dir("a", 0o755)
        .file("a/keep", b"keep", 0o644)
        .file("a/gone", b"gone", 0o644)
        .dir("b", 0o755)
        .file("b/x", b"x", 0o644)
        .dir("b/sub", 0o755)
        .file("b/sub/y", b"y", 0o644)
        .file("top", b"top content", 0o600)
        .symlink("was-link", "top")
        .finish(Comp::Gzip);
    let upper = LayerBuilder::new()
        .whiteout("a", "gone")
        .dir("b", 0o750)
        .opaque("b")
        .file("b/new", b"new", 0o644)
        .hardlink("link", "top")
        .file_owned("c/owned", b"owned", 0o640, 1234, 4321)
        .file("was-link", b"now a file", 0o644)
        .finish(Comp::Zstd);
    let third = LayerBuilder::new()
        .whiteout("", "top")
        .file("setuid", b"s", 0o4755)
        .finish(Comp::None);
    oci_layout::single_image_layout(layout.path(), "v1", &[base, upper, third], serde_json::json!({}));
    reg.push_layout(layout.path(), "v1", "test/layers", false);

    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).await.unwrap();
    let reference = format!("{}/test/layers:v1", reg.host());
    let pulled = store.pull(&reference, &PullOptions::default()).await.unwrap();
    assert_eq!(pulled.manifest.layers.len(), 3);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let report = store
        .unpack(&reference, r, &UnpackOptions::default())
        .await
        .unwrap();
    assert_eq!(report.layers, 3);

    assert_eq!(std::fs::read(r.join("a/keep")).unwrap(), b"keep");
    assert!(!r.join("a/gone").exists(), "whiteout not applied");
    assert!(
        !r.join("b/x").exists() && !r.join("b/sub").exists(),
        "opaque dir not applied"
    );
    assert_eq!(std::fs::read(r.join("b/new")).unwrap(), b"new");
    assert_eq!(
        std::fs::metadata(r.join("b")).unwrap().permissions().mode() & 0o777,
        0o750
    );
    assert!(!r.join("top").exists(), "whiteout of a file not applied");
    // The hardlink keeps the content of the removed original.
    assert_eq!(std::fs::read(r.join("link")).unwrap(), b"top content");
    assert_eq!(
        std::fs::metadata(r.join("link")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A symlink replaced by a file.
    assert!(!std::fs::symlink_metadata(r.join("was-link"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(r.join("was-link")).unwrap(), b"now a file");
    // Ownership (we run as root in CI) and setuid dropped by default.
    let owned = std::fs::metadata(r.join("c/owned")).unwrap();
    if rustix::process::geteuid().is_root() {
        assert_eq!((owned.uid(), owned.gid()), (1234, 4321));
    }
    assert_eq!(
        std::fs::metadata(r.join("setuid")).unwrap().permissions().mode() & 0o7777,
        0o755
    );

    // Asked for, setuid stays.
    let root2 = tempfile::tempdir().unwrap();
    let opts = UnpackOptions {
        allow_setuid: true,
        ..UnpackOptions::default()
    };
    store.unpack(&reference, root2.path(), &opts).await.unwrap();
    assert_eq!(
        std::fs::metadata(root2.path().join("setuid"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o4755
    );
    // Hardlinks are real hardlinks when both names survive.
    let root3 = tempfile::tempdir().unwrap();
    vm_rs::oci::unpack::apply_layers(
        root3.path(),
        vec![(
            "l".to_owned(),
            std::io::Cursor::new(
                LayerBuilder::new()
                    .file("f", b"1", 0o644)
                    .hardlink("g", "f")
                    .tar(),
            ),
        )],
        None,
        &UnpackOptions::default(),
    )
    .unwrap();
    let (f, g) = (
        std::fs::metadata(root3.path().join("f")).unwrap(),
        std::fs::metadata(root3.path().join("g")).unwrap(),
    );
    assert_eq!(f.ino(), g.ino());
    assert_eq!(f.nlink(), 2);
}

#[tokio::test]
async fn index_with_two_platforms_resolves_to_host_or_requested() {
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let amd = LayerBuilder::new()
        .file("arch", b"amd64", 0o644)
        .finish(Comp::Gzip);
    let arm = LayerBuilder::new()
        .file("arch", b"arm64", 0o644)
        .finish(Comp::Gzip);
    let m1 = oci_layout::write_image(layout.path(), &[amd], serde_json::json!({}), "linux", "amd64");
    let m2 = oci_layout::write_image(layout.path(), &[arm], serde_json::json!({}), "linux", "arm64");
    let index_digest = oci_layout::write_layout_index(layout.path(), "multi", vec![m1, m2], true);
    reg.push_layout(layout.path(), "multi", "test/multi", true);

    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).await.unwrap();
    let reference = format!("{}/test/multi:multi", reg.host());

    let arm_opts = PullOptions {
        platform: Some("linux/arm64".parse().unwrap()),
        ..PullOptions::default()
    };
    let pulled = store.pull(&reference, &arm_opts).await.unwrap();
    assert_eq!(
        pulled.record.index.as_ref().map(ToString::to_string),
        Some(index_digest.clone())
    );
    assert_eq!(
        pulled
            .record
            .platform
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("linux/arm64")
    );
    let root = tempfile::tempdir().unwrap();
    store
        .unpack(&reference, root.path(), &UnpackOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(root.path().join("arch")).unwrap(), b"arm64");

    let host = Platform::host();
    if host.architecture == "amd64" || host.architecture == "arm64" {
        let pulled = store.pull(&reference, &PullOptions::default()).await.unwrap();
        assert_eq!(pulled.config.architecture, host.architecture);
        let root = tempfile::tempdir().unwrap();
        store
            .unpack(&reference, root.path(), &UnpackOptions::default())
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(root.path().join("arch")).unwrap(),
            host.architecture.as_bytes()
        );
    }

    let s390 = PullOptions {
        platform: Some("linux/s390x".parse().unwrap()),
        ..PullOptions::default()
    };
    match store.pull(&reference, &s390).await.unwrap_err() {
        PullError::NoMatchingPlatform { available, .. } => {
            assert_eq!(available, ["linux/amd64", "linux/arm64"]);
        }
        e => panic!("unexpected {e:?}"),
    }
}

#[tokio::test]
async fn shared_layers_stored_once_rmi_and_gc() {
    let reg = Registry::start();
    let (base, _) = busybox_layer(Comp::Gzip);
    let extra1 = LayerBuilder::new().file("one", b"1", 0o644).finish(Comp::Gzip);
    let extra2 = LayerBuilder::new().file("two", b"2", 0o644).finish(Comp::Zstd);
    for (tag, extra) in [("one", &extra1), ("two", &extra2)] {
        let layout = tempfile::tempdir().unwrap();
        oci_layout::single_image_layout(
            layout.path(),
            tag,
            &[base.clone(), extra.clone()],
            serde_json::json!({}),
        );
        reg.push_layout(layout.path(), tag, "test/shared", false);
    }
    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).await.unwrap();
    let r1 = format!("{}/test/shared:one", reg.host());
    let r2 = format!("{}/test/shared:two", reg.host());

    // Concurrent pulls of overlapping images: the shared layer is fetched once.
    let opts = PullOptions::default();
    let (a, b) = tokio::join!(store.pull(&r1, &opts), store.pull(&r2, &opts));
    let (a, b) = (a.unwrap(), b.unwrap());
    let total = a.downloaded_bytes + b.downloaded_bytes;
    assert!(
        total < 2 * base.blob.len() as u64,
        "shared layer downloaded twice ({total})"
    );
    assert_store_consistent(&store);
    // 2 manifests + 2 configs + base + 2 extras.
    assert_eq!(blob_count(&store), 7);
    assert_eq!(store.list().await.unwrap().len(), 2);

    // rmi one + gc: only its own blobs go.
    store.remove(&r1).await.unwrap();
    assert!(matches!(
        store.resolve(&r1).await,
        Err(StoreError::NotFound { .. })
    ));
    let report = store.gc().await.unwrap();
    assert_eq!(report.removed_blobs, 3);
    assert_eq!(blob_count(&store), 4);
    let root = tempfile::tempdir().unwrap();
    store
        .unpack(&r2, root.path(), &UnpackOptions::default())
        .await
        .unwrap();
    assert!(root.path().join("bin/busybox").is_file() && root.path().join("two").is_file());

    // Removing by short digest works too; then gc empties the store.
    let short = b.record.manifest.hex()[..12].to_owned();
    store.remove(&short).await.unwrap();
    store.gc().await.unwrap();
    assert_eq!(blob_count(&store), 0);
    assert!(store.list().await.unwrap().is_empty());
}
