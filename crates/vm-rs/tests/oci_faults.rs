//! Network faults between the client and a real registry, injected by a loopback proxy the
//! test controls: the store must never hold a corrupt or partial blob, and interrupted
//! transfers resume where they stopped.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::fault_proxy::{Fault, FaultProxy};
use support::oci_layout::{self, Comp, LayerBuilder};
use support::registry::Registry;
use vm_rs::oci::pull::TransferError;
use vm_rs::oci::{Digest, ImageStore, PullError, PullOptions};

/// Incompressible bytes (xorshift), so the blob is large on the wire.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Setup {
    _reg: Registry,
    proxy: FaultProxy,
    reference: String,
    layer: Digest,
    layer_len: u64,
    small: Digest,
}

fn setup() -> Setup {
    let reg = Registry::start();
    let layout = tempfile::tempdir().unwrap();
    let layer = LayerBuilder::new()
        .file("noise", &noise(3 << 20), 0o644)
        .finish(Comp::None);
    let small = LayerBuilder::new()
        .file("small", b"small", 0o644)
        .finish(Comp::Gzip);
    oci_layout::single_image_layout(
        layout.path(),
        "v1",
        &[layer.clone(), small.clone()],
        serde_json::json!({}),
    );
    reg.push_layout(layout.path(), "v1", "test/faults", false);
    let proxy = FaultProxy::start(reg.addr);
    Setup {
        reference: format!("{}/test/faults:v1", proxy.host()),
        layer: Digest::parse(&layer.digest).unwrap(),
        layer_len: layer.blob.len() as u64,
        small: Digest::parse(&small.digest).unwrap(),
        proxy,
        _reg: reg,
    }
}

fn opts() -> PullOptions {
    PullOptions {
        retry_delay: Duration::from_millis(10),
        ..PullOptions::default()
    }
}

fn assert_store_consistent(store: &ImageStore) {
    for e in std::fs::read_dir(store.root().join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let bytes = std::fs::read(e.path()).unwrap();
        assert_eq!(
            Digest::of(&bytes).hex(),
            e.file_name().to_str().unwrap(),
            "corrupt blob in store"
        );
    }
}

fn layer_requests(s: &Setup) -> Vec<support::fault_proxy::Logged> {
    s.proxy
        .log()
        .into_iter()
        .filter(|l| l.path.contains(s.layer.hex()))
        .collect()
}

#[tokio::test]
async fn connection_cut_mid_blob_resumes_with_range() {
    let s = setup();
    s.proxy.inject(s.layer.hex(), Fault::CutAfter(1 << 20), 1);
    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).await.unwrap();
    let pulled = store.pull(&s.reference, &opts()).await.unwrap();
    assert!(store.has_blob(&s.layer));
    assert_store_consistent(&store);
    let reqs = layer_requests(&s);
    assert!(reqs.len() >= 2 && reqs[0].faulted, "{reqs:?}");
    // The retry asked only for the rest.
    let range = reqs.last().unwrap().range.clone().unwrap_or_default();
    let from: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap_or(0);
    assert!(from > 0, "retry did not resume: {reqs:?}");
    // Less than the layer twice over the wire.
    assert!(pulled.downloaded_bytes < 2 * s.layer_len);
    // Nothing left in ingest.
    assert_eq!(std::fs::read_dir(store.root().join("ingest")).unwrap().count(), 0);
}

#[tokio::test]
async fn truncated_bodies_fail_cleanly_then_a_later_pull_resumes() {
    let s = setup();
    // More truncations than retries: the pull fails.
    s.proxy.inject(s.layer.hex(), Fault::TruncateHalf, 4);
    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).await.unwrap();
    let err = store.pull(&s.reference, &opts()).await.unwrap_err();
    match &err {
        PullError::Blob {
            digest,
            attempts,
            source: TransferError::Interrupted { .. },
            ..
        } => {
            assert_eq!(digest, &s.layer);
            assert_eq!(*attempts, 4);
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(!store.has_blob(&s.layer), "partial blob visible in the store");
    assert_store_consistent(&store);
    assert!(store.list().await.unwrap().is_empty());
    // The partial download is kept for resume.
    let partial = store.root().join(format!("ingest/{}.partial", s.layer.hex()));
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept > 0 && kept < s.layer_len);

    // Faults exhausted: the next pull resumes from what is on disk.
    let before = layer_requests(&s).len();
    let pulled = store.pull(&s.reference, &opts()).await.unwrap();
    let reqs = layer_requests(&s);
    assert_eq!(reqs.len(), before + 1, "{reqs:?}");
    assert_eq!(
        reqs.last().unwrap().range.as_deref(),
        Some(format!("bytes={kept}-").as_str())
    );
    // Only the missing part of the layer came over the wire again.
    assert!(
        pulled.downloaded_bytes >= s.layer_len - kept,
        "{}",
        pulled.downloaded_bytes
    );
    assert!(
        pulled.downloaded_bytes < s.layer_len,
        "{}",
        pulled.downloaded_bytes
    );
    assert!(store.has_blob(&s.layer));
    assert_store_consistent(&store);
    // The layer that finished in the failed pull was not fetched again.
    let small_fetches = s
        .proxy
        .log()
        .iter()
        .filter(|l| l.path.contains(s.small.hex()))
        .count();
    assert_eq!(small_fetches, 1);
}

#[tokio::test]
async fn corrupted_blob_is_rejected_and_never_stored() {
    let s = setup();
    s.proxy.inject(s.layer.hex(), Fault::Corrupt, 100);
    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).await.unwrap();
    let err = store.pull(&s.reference, &opts()).await.unwrap_err();
    match &err {
        PullError::Blob {
            source: TransferError::DigestMismatch { actual },
            ..
        } => {
            assert_ne!(actual, &s.layer);
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(err.to_string().contains(&s.layer.to_string()), "{err}");
    assert!(!store.has_blob(&s.layer));
    assert_store_consistent(&store);
    // Bad bytes are not kept for resume either.
    assert_eq!(std::fs::read_dir(store.root().join("ingest")).unwrap().count(), 0);
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let s = setup();
    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).await.unwrap();
    // Two 500s on the layer: retried, then fine.
    s.proxy.inject(s.layer.hex(), Fault::Status500, 2);
    store.pull(&s.reference, &opts()).await.unwrap();
    assert_eq!(layer_requests(&s).iter().filter(|r| r.faulted).count(), 2);
    assert_store_consistent(&store);

    // A manifest endpoint that always fails: a clear error naming the status.
    let home2 = tempfile::tempdir().unwrap();
    let store2 = ImageStore::open(home2.path()).await.unwrap();
    s.proxy.inject("/manifests/", Fault::Status500, 100);
    let err = store2.pull(&s.reference, &opts()).await.unwrap_err();
    assert!(matches!(err, PullError::Manifest { .. }), "{err:?}");
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    assert!(chain.contains("500"), "{chain}");
    assert!(store2.list().await.unwrap().is_empty());
}
