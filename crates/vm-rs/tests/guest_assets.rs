//! Guest assets against the real Debian packages: setup, module resolution over the real `.ko`
//! files, and the initramfs read back with Debian's `cpio`.

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};

use vm_rs::guest::cpio::{read_newc, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use vm_rs::guest::{
    setup, GuestAssets, GuestError, ModuleIndex, SetupOptions, SetupProgress, REQUIRED_MODULES,
};

#[tokio::test]
async fn setup_produces_complete_manifest() {
    let assets = support::guest::assets().await;
    assert!(
        assets.kernel_version.ends_with("-cloud-amd64"),
        "{}",
        assets.kernel_version
    );
    let m = &assets.manifest;
    for (file, sha) in &m.files {
        let bytes = std::fs::read(assets.dir.join(file)).expect("asset file");
        use sha2::Digest;
        assert_eq!(&hex::encode(sha2::Sha256::digest(&bytes)), sha, "{file}");
    }
    assert!(m.packages.iter().any(|p| p.name == "linux-image-cloud-amd64"));
    assert!(m
        .packages
        .iter()
        .any(|p| p.name == format!("linux-image-{}", assets.kernel_version)));
    assert!(m.packages.iter().any(|p| p.name == "busybox-static"));
    // The kernel is a bzImage ("HdrS" setup header magic at 0x202).
    let kernel = std::fs::read(&assets.kernel).expect("kernel");
    assert_eq!(&kernel[0x202..0x206], b"HdrS");
    // Loading the same dir again gives the same assets.
    let again = GuestAssets::load(&assets.dir).expect("load");
    assert_eq!(again.manifest, assets.manifest);
}

#[tokio::test]
async fn real_modules_resolve_with_dependencies_first() {
    let assets = support::guest::assets().await;
    let modules_dir = assets.modules_dir.clone();
    let index = tokio::task::spawn_blocking(move || ModuleIndex::scan(&modules_dir))
        .await
        .expect("join")
        .expect("scan");
    assert!(index.len() > 500, "only {} modules", index.len());
    assert!(index.is_builtin("ext4"));
    let order = index
        .resolve(
            REQUIRED_MODULES,
            &["virtiofs", "overlay", "no_such_optional_module"],
        )
        .expect("resolve");
    let names: Vec<&str> = order.iter().map(|m| m.name.as_str()).collect();
    for want in [
        "virtio",
        "virtio_ring",
        "virtio_mmio",
        "virtio_blk",
        "virtio_net",
        "net_failover",
        "failover",
        "virtio_console",
        "button",
        "fuse",
        "virtiofs",
        "overlay",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let pos = |n: &str| names.iter().position(|x| *x == n).expect("present");
    for m in &order {
        for d in &m.depends {
            if !index.is_builtin(d) {
                assert!(pos(d) < pos(&m.name), "{d} must load before {}", m.name);
            }
        }
    }
    assert!(pos("failover") < pos("net_failover") && pos("net_failover") < pos("virtio_net"));
    // Each module appears once.
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len());
    match index.resolve(&["virtio_blk", "definitely_not_a_module"], &[]) {
        Err(GuestError::UnknownModule { name, .. }) => assert_eq!(name, "definitely_not_a_module"),
        other => panic!("expected UnknownModule, got {other:?}"),
    }
}

#[tokio::test]
async fn initramfs_reads_back_with_cpio() {
    let assets = support::guest::assets().await;
    let kver = &assets.kernel_version;
    // Debian's cpio lists it (modes, symlinks, devices).
    let out = Command::new("cpio")
        .args(["-itv", "--quiet", "-F"])
        .arg(&assets.initramfs)
        .output()
        .expect("run cpio");
    assert!(
        out.status.success(),
        "cpio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    let line = |name: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")) || l.contains(&format!(" {name} -> ")))
            .unwrap_or_else(|| panic!("{name} not in listing:\n{listing}"))
            .to_string()
    };
    assert!(line("init").starts_with("-rwxr-xr-x"));
    assert!(line("bin/busybox").starts_with("-rwxr-xr-x"));
    assert!(line("bin/sh").starts_with("lrwxrwxrwx") && line("bin/sh").ends_with("bin/sh -> busybox"));
    assert!(line("dev/console").starts_with("crw-------"));
    assert!(line("tmp").starts_with("drwxrwxrwt"));
    assert!(line(&format!("lib/modules/{kver}/virtio_mmio.ko")).starts_with("-rw-r--r--"));

    // Our reader agrees, and the module list matches the manifest's load order.
    let bytes = std::fs::read(&assets.initramfs).expect("read initramfs");
    let entries = read_newc(&bytes).expect("parse initramfs");
    let get = |n: &str| {
        entries
            .iter()
            .find(|e| e.name == n)
            .unwrap_or_else(|| panic!("{n}"))
    };
    assert_eq!(get("init").mode & S_IFMT, S_IFREG);
    assert_eq!(get("init").data, std::fs::read(&assets.init).expect("init"));
    assert_eq!(get("bin/ip").mode & S_IFMT, S_IFLNK);
    assert_eq!(get("proc").mode & S_IFMT, S_IFDIR);
    assert_eq!(get("dev/console").mode & S_IFMT, S_IFCHR);
    assert_eq!(get("dev/console").rdev, (5, 1));
    let list = String::from_utf8(get("etc/vmrs/modules").data.clone()).expect("utf8");
    let listed: Vec<String> = list
        .lines()
        .map(|l| {
            l.rsplit('/')
                .next()
                .unwrap_or_default()
                .trim_end_matches(".ko")
                .to_string()
        })
        .collect();
    assert_eq!(listed, assets.manifest.modules);
    for l in list.lines() {
        let name = l.trim_start_matches('/');
        assert!(
            entries.iter().any(|e| e.name == name),
            "{name} listed but not in archive"
        );
    }
    // Every directory precedes its contents.
    for (i, e) in entries.iter().enumerate() {
        if let Some((parent, _)) = e.name.rsplit_once('/') {
            let p = entries
                .iter()
                .position(|x| x.name == parent)
                .expect("parent present");
            assert!(p < i, "{parent} after {}", e.name);
        }
    }
}

#[tokio::test]
async fn setup_is_idempotent_and_rebuilds_only_for_a_new_init() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("assets");
    let events = Arc::new(Mutex::new(Vec::<SetupProgress>::new()));
    let ev = events.clone();
    let opts = SetupOptions {
        dir: dir.clone(),
        init: Some(support::guest::init_binary()),
        force: false,
        progress: Some(Arc::new(move |p: &SetupProgress| {
            ev.lock().expect("lock").push(p.clone())
        })),
    };
    let first = setup(&opts).await.expect("first setup");
    let take = || std::mem::take(&mut *events.lock().expect("lock"));
    assert!(take().iter().any(|p| matches!(p, SetupProgress::Downloading(_))));
    // No staging or download leftovers next to the dir.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("readdir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "assets" && n != ".assets.lock")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let second = setup(&opts).await.expect("second setup");
    assert_eq!(take(), vec![SetupProgress::UpToDate]);
    assert_eq!(first.manifest, second.manifest);

    // A different (still static) init: only the initramfs is rebuilt, nothing downloaded.
    let mut init = std::fs::read(support::guest::init_binary()).expect("init");
    init.extend_from_slice(b"different");
    let new_init = tmp.path().join("vmrs-init-2");
    std::fs::write(&new_init, &init).expect("write init");
    let opts2 = SetupOptions {
        init: Some(new_init.clone()),
        ..opts.clone()
    };
    let third = setup(&opts2).await.expect("rebuild");
    let steps = take();
    assert!(steps.contains(&SetupProgress::BuildingInitramfs), "{steps:?}");
    assert!(
        !steps.iter().any(|p| matches!(p, SetupProgress::Downloading(_))),
        "{steps:?}"
    );
    assert_ne!(
        third.manifest.files["initramfs.img"],
        first.manifest.files["initramfs.img"]
    );
    assert_eq!(third.manifest.files["vmlinuz"], first.manifest.files["vmlinuz"]);
    assert_eq!(std::fs::read(&third.init).expect("init copy"), init);

    // A dynamically linked init is refused.
    let bad = SetupOptions {
        init: Some(std::env::current_exe().expect("exe")),
        ..opts.clone()
    };
    assert!(matches!(setup(&bad).await, Err(GuestError::InitNotStatic { .. })));
}

#[test]
fn load_without_setup_says_what_to_do() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = GuestAssets::load(tmp.path()).expect_err("empty dir");
    assert!(err.to_string().contains("vmrs setup"), "{err}");
}
