//! A pod through containerd's CRI plugin (what the kubelet drives), with the typed CRI client
//! of the `k8s-cri` crate: the pod sandbox runs with runtime handler `vmrs`, two containers
//! created and started in it run in the sandbox's one VM (same guest boot id, one VMM), each on
//! its own root filesystem; `ExecSync` (`kubectl exec`) and the container logs (`kubectl
//! logs`) work; stopping and removing the pod leaves no VMM and no mount.

mod common;

use common::*;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

fn client(rt: &tokio::runtime::Runtime, sock: PathBuf) -> RuntimeServiceClient<Channel> {
    rt.block_on(async move {
        let channel = Endpoint::try_from("http://[::]:50051")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }))
            .await
            .expect("CRI connects");
        RuntimeServiceClient::new(channel)
    })
}

fn pod_config(logs: &std::path::Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "pod1".into(),
            uid: "uid-pod1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "pod1".into(),
        log_directory: logs.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                // the host's network: no CNI plugin is needed (nor installed)
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(name: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// One CRI call, bounded in time: a hung call fails the test with containerd's log.
fn call<T>(
    rt: &tokio::runtime::Runtime,
    g: &Guard,
    what: &str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> T {
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(120), f).await }) {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(e)) => panic!("{what}: {e}\n{}", g.log()),
        Err(_) => panic!("{what} did not answer within 120 s\n{}", g.log()),
    }
}

/// The lines of a CRI log file (`<time> <stream> <tag> <line>`), without the prefix.
fn log_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_string))
        .collect()
}

#[test]
fn a_pod_runs_its_containers_in_one_vm() {
    let g = Guard::start_with(true);
    import_cri(&g);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut c = client(&rt, g.sock());
    let logs = g.dir.path().join("pod-logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let pod = pod_config(&logs);

    let sandbox = call(
        &rt,
        &g,
        "RunPodSandbox",
        c.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: HANDLER.into(),
        }),
    )
    .pod_sandbox_id;
    assert_eq!(
        g.our_processes("qemu-system").len(),
        1,
        "the sandbox boots one VM"
    );

    let script = |n: &str| {
        format!("echo {n} boot=$(cat /proc/sys/kernel/random/boot_id); echo {n}-root > /tmp/mark; sleep 1000")
    };
    let mut ids = Vec::new();
    for name in ["c1", "c2"] {
        let id = call(
            &rt,
            &g,
            "CreateContainer",
            c.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(container_config(name, &script(name))),
                sandbox_config: Some(pod.clone()),
            }),
        )
        .container_id;
        call(
            &rt,
            &g,
            "StartContainer",
            c.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }),
        );
        ids.push(id);
    }
    // both print the guest's boot id: one kernel, so one VM
    let boots: Vec<String> = ["c1", "c2"]
        .iter()
        .map(|n| {
            let path = logs.join(format!("{n}.log"));
            assert!(
                wait_until(Duration::from_secs(60), || log_lines(&path)
                    .iter()
                    .any(|l| l.contains("boot="))),
                "no output from {n}: {:?}\n{}",
                std::fs::read_to_string(&path),
                g.log()
            );
            let line = log_lines(&path)
                .into_iter()
                .find(|l| l.contains("boot="))
                .expect("line");
            let boot = line.split("boot=").nth(1).unwrap_or_default().trim().to_string();
            assert_eq!(boot.len(), 36, "{n} printed {line:?}");
            boot
        })
        .collect();
    assert_eq!(boots[0], boots[1], "the pod's containers run in different guests");
    assert_eq!(
        g.our_processes("qemu-system").len(),
        1,
        "a container of the pod booted a VM of its own"
    );
    for id in &ids {
        let st = call(
            &rt,
            &g,
            "ContainerStatus",
            c.container_status(cri::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            }),
        )
        .status
        .expect("status");
        assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32, "{st:?}");
    }

    // kubectl exec: ExecSync runs in the container's own root (each wrote its own /tmp/mark)
    for (id, want) in ids.iter().zip(["c1-root", "c2-root"]) {
        let r = call(
            &rt,
            &g,
            "ExecSync",
            c.exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec!["sh".into(), "-c".into(), "cat /tmp/mark; exit 3".into()],
                timeout: 30,
            }),
        );
        assert_eq!(r.exit_code, 3);
        assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), want);
    }

    // stop one container: the pod's VM keeps running the other
    call(
        &rt,
        &g,
        "StopContainer",
        c.stop_container(cri::StopContainerRequest {
            container_id: ids[0].clone(),
            timeout: 2,
        }),
    );
    call(
        &rt,
        &g,
        "RemoveContainer",
        c.remove_container(cri::RemoveContainerRequest {
            container_id: ids[0].clone(),
        }),
    );
    let r = call(
        &rt,
        &g,
        "ExecSync after the other container left",
        c.exec_sync(cri::ExecSyncRequest {
            container_id: ids[1].clone(),
            cmd: vec!["cat".into(), "/tmp/mark".into()],
            timeout: 30,
        }),
    );
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "c2-root");

    // the pod goes: no VMM and no mount of ours is left
    call(
        &rt,
        &g,
        "StopPodSandbox",
        c.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        }),
    );
    call(
        &rt,
        &g,
        "RemovePodSandbox",
        c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        }),
    );
    assert!(
        wait_until(Duration::from_secs(30), || g
            .our_processes("qemu-system")
            .is_empty()),
        "a VMM is left after the pod was removed"
    );
    assert!(
        wait_until(Duration::from_secs(30), || g.our_mounts().is_empty()),
        "mounts left: {:?}",
        g.our_mounts()
    );
}

#[test]
fn a_pod_whose_shim_was_killed_is_cleaned_up_by_containerd() {
    let g = Guard::start_with(true);
    import_cri(&g);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut c = client(&rt, g.sock());
    let logs = g.dir.path().join("pod-logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let pod = pod_config(&logs);
    let sandbox = call(
        &rt,
        &g,
        "RunPodSandbox",
        c.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod.clone()),
            runtime_handler: HANDLER.into(),
        }),
    )
    .pod_sandbox_id;
    let id = call(
        &rt,
        &g,
        "CreateContainer",
        c.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(container_config("c1", "echo up; sleep 1000")),
            sandbox_config: Some(pod.clone()),
        }),
    )
    .container_id;
    call(
        &rt,
        &g,
        "StartContainer",
        c.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        }),
    );
    assert!(
        wait_until(Duration::from_secs(60), || log_lines(&logs.join("c1.log"))
            .iter()
            .any(|l| l == "up")),
        "the container did not start\n{}",
        g.log()
    );
    assert!(!g.our_mounts().is_empty());
    // one shim serves the pod; kill it
    let shims = g.our_processes("containerd-shim-vmrs-v1");
    assert_eq!(shims.len(), 1, "one shim per pod: {shims:?}");
    // SAFETY: kill(2) of the shim this test's containerd started.
    unsafe { libc::kill(shims[0], libc::SIGKILL) };
    // the kubelet's way out: stop and remove the pod (containerd runs the shim's `delete`)
    call(
        &rt,
        &g,
        "StopPodSandbox",
        c.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        }),
    );
    call(
        &rt,
        &g,
        "RemovePodSandbox",
        c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        }),
    );
    assert!(
        wait_until(Duration::from_secs(30), || g
            .our_processes("qemu-system")
            .is_empty()
            && g.our_processes("virtiofsd").is_empty()),
        "a VMM or virtiofsd is left after the pod's shim was killed and the pod removed\n{}",
        g.log()
    );
    assert!(
        wait_until(Duration::from_secs(30), || g.our_mounts().is_empty()),
        "mounts left: {:?}\n{}",
        g.our_mounts(),
        g.log()
    );
}
