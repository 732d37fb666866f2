//! The same `vmrs run -d -p HOST:GUEST` on Cloud Hypervisor and Firecracker as on QEMU: the
//! default user-mode network (slirp4netns on these backends) publishes the port on the host,
//! `inspect` says which stack serves it, `stop` closes the port and `rm` leaves nothing.
//!
//! The VMMs are the protocol peers of the vm-rs test suite (this binary re-executes itself as
//! either when `vmrs` starts it), booting the tiny PVH guest; with the real binaries the
//! manager-level flows of `vm_ch_real`/`vm_fc_real` run the same network scenario.

mod support {
    #![allow(dead_code)]
    #[path = "../../../vm-rs/tests/support/ch_peer.rs"]
    pub mod ch_peer;
    #[path = "../../../vm-rs/tests/support/fc_peer.rs"]
    pub mod fc_peer;
    #[path = "../../../vm-rs/tests/support/http_peer.rs"]
    pub mod http_peer;
    #[path = "../../../vm-rs/tests/support/hybrid_vsock.rs"]
    mod hybrid_vsock;
    #[path = "../../../vm-rs/tests/support/pvh_guest.rs"]
    pub mod pvh_guest;
    pub use hybrid_vsock::serve_hybrid_vsock;
}

use assert_cmd::Command;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Kills whatever `vmrs rm` did not (a failed assertion midway): VMMs and sidecars the VM
/// directories own.
struct Home(tempfile::TempDir);

impl Drop for Home {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(self.0.path().join("vms")) {
            for e in rd.flatten() {
                vm_rs::process::kill_owned_by(&e.path());
                let _ = vm_rs::net::slirp::remove_netns(&vm_rs::net::slirp::netns_path(&e.path()));
            }
        }
    }
}

fn publish_on(backend: &str, env: &str) {
    let home = Home(
        tempfile::Builder::new()
            .prefix("vmrs-b")
            .tempdir_in("/tmp")
            .expect("tmp"),
    );
    let h = home.0.path();
    let guest = support::pvh_guest::write(h);
    let me = std::env::current_exe().expect("current exe");
    let run = |args: &[&str]| {
        Command::cargo_bin("vmrs")
            .expect("vmrs binary")
            .env("VMRS_HOME", h)
            .env(env, &me)
            .timeout(std::time::Duration::from_secs(60))
            .args(args)
            .output()
            .expect("run vmrs")
    };
    let port = free_port();
    let publish = format!("{port}:80");
    let out = run(&[
        "run",
        "-d",
        "--backend",
        backend,
        "--memory",
        "128",
        "--name",
        "web",
        "-p",
        &publish,
        "--kernel",
        guest.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the published port is open");
    let out = run(&["inspect", "web"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    let text = info.to_string();
    assert!(text.contains("\"via\":\"slirp4netns\""), "{text}");
    assert!(run(&["stop", "-t", "1", "web"]).status.success());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port open after stop"
    );
    assert!(!h.join("vms/web/netns").exists());
    assert!(run(&["rm", "web"]).status.success());
    assert!(!h.join("vms/web").exists());
}

fn main() {
    support::ch_peer::run_if_invoked();
    support::fc_peer::run_if_invoked();
    let args = libtest_mimic::Arguments::from_args();
    let trials = vec![
        libtest_mimic::Trial::test("cloud_hypervisor_publishes_a_port", || {
            publish_on("cloud-hypervisor", vm_rs::driver::cloud_hypervisor::BINARY_ENV);
            Ok(())
        }),
        libtest_mimic::Trial::test("firecracker_publishes_a_port", || {
            publish_on("firecracker", vm_rs::driver::firecracker::BINARY_ENV);
            Ok(())
        }),
    ];
    libtest_mimic::run(&args, trials).exit();
}
