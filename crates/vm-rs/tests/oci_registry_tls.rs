//! Registries for real (issue 16): a `docker-registry` behind TLS with a CA this test makes,
//! pulled with that CA trusted through `PullOptions::registry_tls` and refused without it;
//! bearer-token auth against a token server the test runs (Docker token spec, RS256 JWTs with
//! an `x5c` chain); and a registry whose blob GETs redirect to another local server, where the
//! digest is still verified and a server sending wrong bytes is rejected.

mod support;

use std::sync::atomic::Ordering;
use support::oci_layout::{self, Comp, LayerBuilder};
use support::registry::{Registry, RegistryOptions, TokenAuth};
use support::registry_auth::{BlobServer, TestPki, TokenServer};
use vm_rs::oci::pull::TransferError;
use vm_rs::oci::{Credentials, Digest, ImageStore, PullError, PullOptions, RegistryTls};

/// A one-layer image pushed as `<repo>:v1`; returns (manifest digest, layer digest).
fn push_small_image(reg: &Registry, repo: &str) -> (String, String) {
    let layout = tempfile::tempdir().expect("tempdir");
    let layer = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/hello", b"hello from a registry test\n", 0o644)
        .finish(Comp::Gzip);
    let m = oci_layout::single_image_layout(
        layout.path(),
        "v1",
        std::slice::from_ref(&layer),
        serde_json::json!({"Cmd": ["/bin/true"]}),
    );
    reg.push_layout(layout.path(), "v1", repo, false);
    (m, layer.digest)
}

async fn fresh_store() -> (tempfile::TempDir, ImageStore) {
    let home = tempfile::tempdir().expect("tempdir");
    let store = ImageStore::open(home.path().join("images")).await.expect("store");
    (home, store)
}

/// Options that never read the user's docker config.
fn opts(docker: &tempfile::TempDir) -> PullOptions {
    PullOptions {
        docker_config: Some(docker.path().join("config.json")),
        retries: 1,
        ..PullOptions::default()
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[tokio::test]
async fn tls_registry_with_test_ca_is_pulled_only_when_the_ca_is_trusted() {
    let pki = TestPki::new();
    let reg = Registry::start_with(RegistryOptions {
        tls: Some((pki.server_cert.clone(), pki.server_key.clone())),
        ..RegistryOptions::default()
    });
    let (manifest, layer) = push_small_image(&reg, "tls/hello");
    let reference = format!("{}/tls/hello:v1", reg.host());
    let docker = tempfile::tempdir().expect("tempdir");

    // HTTPS (the loopback registry is listed) but only the webpki roots: the TLS handshake
    // fails on the unknown issuer and nothing is stored.
    let (_h, store) = fresh_store().await;
    let untrusted = PullOptions {
        registry_tls: vec![RegistryTls {
            registry: reg.host(),
            ca_certificates: Vec::new(),
        }],
        ..opts(&docker)
    };
    let err = store
        .pull(&reference, &untrusted)
        .await
        .expect_err("untrusted CA accepted");
    let text = chain(&err);
    assert!(
        text.to_ascii_lowercase().contains("certificate") || text.contains("UnknownIssuer"),
        "not a certificate error: {text}"
    );
    assert!(!store.has_blob(&Digest::parse(&layer).expect("digest")));

    // Without any TLS entry a loopback registry is spoken to over plain HTTP: refused too.
    assert!(store.pull(&reference, &opts(&docker)).await.is_err());

    // The CA trusted for this registry: the pull succeeds and the digests match.
    let trusted = PullOptions {
        registry_tls: vec![RegistryTls::with_ca(reg.host(), &pki.ca_cert)],
        ..opts(&docker)
    };
    let pulled = store.pull(&reference, &trusted).await.expect("pull over TLS");
    assert_eq!(pulled.record.manifest.to_string(), manifest);
    assert!(store.has_blob(&Digest::parse(&layer).expect("digest")));

    // A CA file that is not one is a typed error before any connection.
    let bogus = pki.dir.path().join("bogus.pem");
    std::fs::write(&bogus, "not a certificate").expect("write");
    let bad = PullOptions {
        registry_tls: vec![RegistryTls::with_ca(reg.host(), &bogus)],
        ..opts(&docker)
    };
    assert!(matches!(
        store.pull(&reference, &bad).await,
        Err(PullError::Tls { .. })
    ));
}

#[tokio::test]
async fn bearer_token_auth_with_a_token_server() {
    let tokens = TokenServer::start("alice", "s3cret");
    let mut reg = Registry::start_with(RegistryOptions {
        token: Some(TokenAuth {
            realm: tokens.realm(),
            service: tokens.service.clone(),
            issuer: tokens.issuer.clone(),
            root_cert: tokens.cert.clone(),
        }),
        ..RegistryOptions::default()
    });
    // skopeo pushes with the same credentials (it fetches a push token).
    reg.creds = Some(("alice".into(), "s3cret".into()));
    let (manifest, _) = push_small_image(&reg, "private/hello");
    let reference = format!("{}/private/hello:v1", reg.host());
    let docker = tempfile::tempdir().expect("tempdir");
    let (_h, store) = fresh_store().await;

    let before = tokens.issued.load(Ordering::SeqCst);
    let good = PullOptions {
        credentials: Some(Credentials::Basic {
            username: "alice".into(),
            password: "s3cret".into(),
        }),
        ..opts(&docker)
    };
    let pulled = store.pull(&reference, &good).await.expect("pull with token");
    assert_eq!(pulled.record.manifest.to_string(), manifest);
    assert!(
        tokens.issued.load(Ordering::SeqCst) > before,
        "the pull did not go through the token server"
    );

    let (_h2, store2) = fresh_store().await;
    let refused_before = tokens.refused.load(Ordering::SeqCst);
    let wrong = PullOptions {
        credentials: Some(Credentials::Basic {
            username: "alice".into(),
            password: "wrong".into(),
        }),
        ..opts(&docker)
    };
    let err = store2
        .pull(&reference, &wrong)
        .await
        .expect_err("wrong password accepted");
    assert!(matches!(err, PullError::Unauthorized { .. }), "{}", chain(&err));
    assert!(tokens.refused.load(Ordering::SeqCst) > refused_before);
    // Anonymous: the token server refuses, so does the registry.
    let err = store2
        .pull(&reference, &opts(&docker))
        .await
        .expect_err("anonymous pull accepted");
    assert!(matches!(err, PullError::Unauthorized { .. }), "{}", chain(&err));
}

#[tokio::test]
async fn blob_redirects_are_followed_and_still_verified() {
    // Push into a plain registry; two more registries serve its storage with the `redirect`
    // middleware, one pointing at a faithful file server, one at a server that corrupts bytes.
    let origin = Registry::start();
    let (manifest, layer) = push_small_image(&origin, "cdn/hello");
    let good_cdn = BlobServer::start(origin.data_dir(), false);
    let bad_cdn = BlobServer::start(origin.data_dir(), true);
    let via_good = Registry::start_with(RegistryOptions {
        redirect_baseurl: Some(good_cdn.base_url()),
        data: Some(origin.data_dir()),
        ..RegistryOptions::default()
    });
    let via_bad = Registry::start_with(RegistryOptions {
        redirect_baseurl: Some(bad_cdn.base_url()),
        data: Some(origin.data_dir()),
        ..RegistryOptions::default()
    });
    let docker = tempfile::tempdir().expect("tempdir");

    let (_h, store) = fresh_store().await;
    let reference = format!("{}/cdn/hello:v1", via_good.host());
    let pulled = store
        .pull(&reference, &opts(&docker))
        .await
        .expect("pull via redirect");
    assert_eq!(pulled.record.manifest.to_string(), manifest);
    // config + layer came from the redirect target
    assert!(
        good_cdn.served.load(Ordering::SeqCst) >= 2,
        "blobs were not fetched through the redirect"
    );
    assert!(store.has_blob(&Digest::parse(&layer).expect("digest")));

    let (_h2, store2) = fresh_store().await;
    let reference = format!("{}/cdn/hello:v1", via_bad.host());
    let err = store2
        .pull(&reference, &opts(&docker))
        .await
        .expect_err("corrupted redirect accepted");
    assert!(
        matches!(
            err,
            PullError::Blob {
                source: TransferError::DigestMismatch { .. },
                ..
            }
        ),
        "{}",
        chain(&err)
    );
    assert!(bad_cdn.served.load(Ordering::SeqCst) >= 1);
    assert!(!store2.has_blob(&Digest::parse(&layer).expect("digest")));
}
