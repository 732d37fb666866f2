//! Pulling from a registry with htpasswd basic auth.

#![allow(clippy::unwrap_used)]

mod support;

use support::oci_layout::{self, Comp, LayerBuilder};
use support::registry::Registry;
use vm_rs::oci::{Credentials, ImageStore, PullError, PullOptions};

#[tokio::test]
async fn basic_auth_wrong_password_is_a_clear_error_right_one_pulls() {
    let reg = Registry::start_with_auth("alice", "s3cret-pass");
    let layout = tempfile::tempdir().unwrap();
    let layer = LayerBuilder::new()
        .file("hello", b"world", 0o644)
        .finish(Comp::Gzip);
    oci_layout::single_image_layout(layout.path(), "v1", &[layer], serde_json::json!({}));
    reg.push_layout(layout.path(), "v1", "private/img", false);

    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).await.unwrap();
    let reference = format!("{}/private/img:v1", reg.host());
    // An empty docker config, so the host's own credentials never leak in.
    let docker = tempfile::tempdir().unwrap();
    std::fs::write(docker.path().join("config.json"), "{}").unwrap();
    let base = PullOptions {
        docker_config: Some(docker.path().join("config.json")),
        ..PullOptions::default()
    };

    // Wrong password.
    let wrong = PullOptions {
        credentials: Some(Credentials::Basic {
            username: "alice".into(),
            password: "wrong".into(),
        }),
        ..base.clone()
    };
    let err = store.pull(&reference, &wrong).await.unwrap_err();
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("not authorized"), "{err}");
    // Anonymous.
    let err = store.pull(&reference, &base).await.unwrap_err();
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err:?}");
    assert!(store.list().await.unwrap().is_empty());

    // Right password.
    let right = PullOptions {
        credentials: Some(Credentials::Basic {
            username: "alice".into(),
            password: "s3cret-pass".into(),
        }),
        ..base.clone()
    };
    store.pull(&reference, &right).await.unwrap();

    // Credentials from a docker config.json `auths` entry.
    let store2 = ImageStore::open(home.path().join("second")).await.unwrap();
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret-pass");
    std::fs::write(
        docker.path().join("config.json"),
        serde_json::json!({"auths": {(format!("http://{}", reg.host())): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let pulled = store2.pull(&reference, &base).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    store2
        .unpack(&pulled.record.reference, root.path(), &Default::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(root.path().join("hello")).unwrap(), b"world");

    // Credentials from a `credHelpers` helper program on PATH (docker-credential-<name> get).
    let bin = tempfile::tempdir().unwrap();
    let helper = bin.path().join("docker-credential-vmrstest");
    std::fs::write(
        &helper,
        "#!/bin/sh\nread server\necho \"{\\\"ServerURL\\\":\\\"$server\\\",\\\"Username\\\":\\\"alice\\\",\\\"Secret\\\":\\\"s3cret-pass\\\"}\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Only test in this binary; nothing else reads PATH concurrently.
    std::env::set_var("PATH", path);
    std::fs::write(
        docker.path().join("config.json"),
        serde_json::json!({"credHelpers": {(reg.host()): "vmrstest"}}).to_string(),
    )
    .unwrap();
    let store3 = ImageStore::open(home.path().join("third")).await.unwrap();
    store3.pull(&reference, &base).await.unwrap();
    // A helper that knows nothing: anonymous, so unauthorized.
    std::fs::write(
        &helper,
        "#!/bin/sh\necho 'credentials not found in native keychain'\nexit 1\n",
    )
    .unwrap();
    let store4 = ImageStore::open(home.path().join("fourth")).await.unwrap();
    let err = store4.pull(&reference, &base).await.unwrap_err();
    assert!(matches!(err, PullError::Unauthorized { .. }), "{err:?}");
}
