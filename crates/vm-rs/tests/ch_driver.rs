//! The Cloud Hypervisor driver against the protocol peer (`support::ch_peer`), which stands in
//! for the `cloud-hypervisor` binary on machines where it is not installed (CI). This binary
//! is its own peer: started with `--api-socket` it serves the API instead of running tests.
//!
//! The same scenarios run against the real binary in `vm_ch_real`.

mod support;

use std::path::PathBuf;
use support::ch_flows::{self, block_on, Fixture};
use vm_rs::driver::{DriverError, VmDriver, VmmStatus};

fn me() -> PathBuf {
    std::env::current_exe().expect("current exe")
}

/// `vm.create` rejects a config the VMM cannot run (zero vCPUs): v53's 500 with its reason,
/// and the VMM is not left behind.
async fn create_rejects_invalid_config(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let mut cfg = fx.config();
    cfg.cpus = 0;
    match fx.driver.boot(&fx.spec(&cfg)).await {
        Err(DriverError::Command { command, message }) => {
            assert_eq!(command, "vm.create");
            assert!(
                message.starts_with("500 internal error: The VM could not be created"),
                "{message}"
            );
            assert!(message.contains("boot vCPUs"), "{message}");
        }
        other => panic!("expected vm.create error, got {other:?}"),
    }
    assert!(std::os::unix::net::UnixStream::connect(fx.vm_dir.join("ch-api.sock")).is_err());
}

/// Snapshot needs a paused VM; restore starts a new VMM from it and resumes it.
async fn snapshot_restore(bin: PathBuf) {
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let h = vmm.handle();
    let snap = fx.tmp.path().join("snap");
    match fx.driver.snapshot(h, &snap).await {
        Err(DriverError::Command { command, message }) => {
            assert_eq!(command, "vm.snapshot");
            assert!(message.contains("not paused"), "{message}");
        }
        other => panic!("snapshot of a running vm should fail, got {other:?}"),
    }
    fx.driver.pause(h).await.expect("pause");
    fx.driver.snapshot(h, &snap).await.expect("snapshot");
    assert!(snap.join("config.json").is_file());
    fx.driver.quit(h).await.expect("quit");

    let fx2 = Fixture::new(&bin);
    let cfg = fx2.config();
    let restored = fx2.driver.restore(&fx2.spec(&cfg), &snap).await.expect("restore");
    let restored = ch_flows::Vmm(Some(restored));
    assert_eq!(
        fx2.driver.status(restored.handle()).await.expect("status"),
        VmmStatus::Running
    );
    let info = fx2.driver.info(restored.handle()).await.expect("info");
    assert_eq!(info["config"]["memory"]["size"], 128u64 << 20);
    let missing = fx2
        .driver
        .restore(&fx2.spec(&cfg), &fx2.tmp.path().join("nothing"))
        .await;
    assert!(matches!(missing, Err(DriverError::Io { .. })), "{missing:?}");
}

/// The peer answers undecodable bodies and unknown verbs as the document says.
async fn peer_protocol_errors(bin: PathBuf) {
    use vm_rs::driver::cloud_hypervisor::api::{ApiClient, Method};
    let fx = Fixture::new(&bin);
    let vmm = fx.boot().await;
    let api = ApiClient::new(&vmm.handle().api_socket, std::time::Duration::from_secs(5));
    let r = api
        .raw(Method::Put, "vm.resize", Some(&serde_json::json!("nope")))
        .await
        .expect("raw");
    assert_eq!(r.status, 400);
    let r = api.raw(Method::Get, "vm.frobnicate", None).await.expect("raw");
    assert_eq!(r.status, 404);
    let r = api.raw(Method::Get, "vm.pause", None).await.expect("raw");
    assert_eq!(r.status, 400);
    // bodies are checked against the document: unknown, mistyped and missing fields are 400
    for (verb, body, want) in [
        (
            "vm.resize",
            serde_json::json!({"desired_vcpus": 2, "desired_cpus": 2}),
            "unknown field `desired_cpus`",
        ),
        (
            "vm.resize",
            serde_json::json!({"desired_vcpus": "two"}),
            "invalid type",
        ),
        (
            "vm.add-disk",
            serde_json::json!({"path": "/x", "readonly": "yes"}),
            "invalid type",
        ),
        (
            "vm.add-disk",
            serde_json::json!({"path": "/x", "image_type": "Iso"}),
            "unknown variant `Iso`",
        ),
        ("vm.restore", serde_json::json!({}), "missing field `source_url`"),
    ] {
        let r = api.raw(Method::Put, verb, Some(&body)).await.expect("raw");
        assert_eq!(r.status, 400, "{verb} {body}");
        let chain: Vec<String> = serde_json::from_slice(&r.body).expect("error chain");
        assert_eq!(chain[0], "Failed to deserialize JSON", "{chain:?}");
        assert!(chain[1].contains(want), "{verb} {body}: {chain:?}");
    }
    // removing an unknown device is 500, as the v53 binary answers
    let r = api
        .raw(
            Method::Put,
            "vm.remove-device",
            Some(&serde_json::json!({"id": "nope"})),
        )
        .await
        .expect("raw");
    assert_eq!(r.status, 500);
    let r = api.raw(Method::Get, "vmm.ping", None).await.expect("raw");
    assert_eq!(r.status, 200);
    let ping: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert!(ping["version"].is_string());
}

fn main() {
    support::ch_peer::run_if_invoked();
    // The manager finds its VMM like users do: through VMRS_CLOUD_HYPERVISOR. Set before any
    // thread starts.
    std::env::set_var(vm_rs::driver::cloud_hypervisor::BINARY_ENV, me());
    let args = libtest_mimic::Arguments::from_args();
    let mut flows = ch_flows::shared();
    flows.extend(ch_flows::manager());
    flows.push(("create_rejects_invalid_config", |b| {
        Box::pin(create_rejects_invalid_config(b))
    }));
    flows.push(("snapshot_restore", |b| Box::pin(snapshot_restore(b))));
    flows.push(("peer_protocol_errors", |b| Box::pin(peer_protocol_errors(b))));
    let trials = flows
        .into_iter()
        .map(|(name, flow)| {
            libtest_mimic::Trial::test(format!("peer::{name}"), move || {
                block_on(flow(me()));
                Ok(())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
