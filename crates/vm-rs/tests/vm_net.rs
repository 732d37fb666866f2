//! Networking with real guests under TCG: user-mode NAT both ways, VMs on switch networks,
//! and a VM on a bridge inside a test network namespace, including cleanup after a crash.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use support::netns::TestNetns;
use support::{net_guest, sh, wait_until, TestHome, BOOT_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vm_rs::config::{GuestAddress, NetworkAttachment, PortForward, UserNat};
use vm_rs::{VmConfig, VmManager};

/// Kills the switch and forwarder sidecars recorded under a home when dropped (the VMMs are
/// killed by [`TestHome`]), so a failing test leaves no `vmrs-net` process behind.
struct SidecarGuard(std::path::PathBuf);

impl Drop for SidecarGuard {
    fn drop(&mut self) {
        let nets = vm_rs::net::networks_dir(&self.0);
        let mut records: Vec<_> = vm_rs::net::sidecar::networks(&nets)
            .iter()
            .filter_map(|n| vm_rs::net::sidecar::switch_record(&nets, n))
            .collect();
        if let Ok(rd) = std::fs::read_dir(self.0.join("vms")) {
            for e in rd.flatten() {
                if let Ok(Some(st)) = vm_rs::net::NetState::load(&e.path()) {
                    records.extend(st.forwarders);
                }
            }
        }
        for r in records {
            if let Ok(p) = vm_rs::process::VmmProcess::attach(r.pid, r.start_time) {
                let _ = p.kill();
            }
        }
    }
}

fn use_built_sidecar() {
    std::env::set_var("VMRS_NET_BIN", env!("CARGO_BIN_EXE_vmrs-net"));
}

async fn config(name: &str, cmdline: &str, nets: Vec<NetworkAttachment>) -> VmConfig {
    let mut b = VmConfig::builder(name)
        .kernel(net_guest::kernel().await)
        .initramfs(net_guest::initramfs().await)
        .memory_mib(256)
        .cmdline(cmdline);
    for n in nets {
        b = b.network(n);
    }
    b.build().expect("valid config")
}

fn serial(mgr: &VmManager, name: &str) -> String {
    std::fs::read_to_string(mgr.vm_dir(name).join("serial.log")).unwrap_or_default()
}

/// Wait until the serial log of `name` has a line starting with `prefix`; returns that line.
async fn wait_serial(mgr: &VmManager, name: &str, prefix: &str, timeout: Duration) -> Option<String> {
    let mut found = None;
    wait_until(timeout, || {
        found = serial(mgr, name)
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .map(|l| l.trim().to_string());
        found.is_some()
    })
    .await;
    found
}

/// A one-shot HTTP/1.0 GET over a fresh TCP connection; returns the body.
async fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await?;
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut resp))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    Ok(resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// A tiny HTTP server on 127.0.0.1 answering every request with `body`.
async fn host_http_server(body: String) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, h)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_mode_reaches_host_and_published_port_reaches_guest() {
    user_mode_both_ways(UserNat::Vmm, "user1").await;
}

/// The same network through a slirp4netns sidecar (what Cloud Hypervisor and Firecracker get):
/// the same addresses both ways; the VMM runs in the VM's own namespace, which goes with the
/// sidecar when the VM stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slirp4netns_user_mode_reaches_host_and_published_port_reaches_guest() {
    let (home, dir, sidecar) = user_mode_both_ways(UserNat::Slirp4netns, "slirp1").await;
    assert!(
        !sidecar.expect("slirp4netns record").is_alive(),
        "slirp4netns still running"
    );
    assert!(!dir.join("netns").exists(), "namespace file left");
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains(home.path().to_str().expect("utf-8")),
        "a mount under the home is left"
    );
}

/// Boot a VM on a user-mode network served by `via`, fetch from a host server through the
/// gateway, fetch from the guest through a published port, stop; returns the home, the VM
/// directory and the `slirp4netns` record the VM had.
async fn user_mode_both_ways(
    via: UserNat,
    name: &str,
) -> (
    TestHome,
    std::path::PathBuf,
    Option<vm_rs::net::sidecar::SidecarRecord>,
) {
    let home = TestHome::new();
    let _sidecars = SidecarGuard(home.path().to_path_buf());
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let token = format!("host-page-{}", std::process::id());
    let (srv, _h) = host_http_server(token.clone()).await;
    let published = free_port();
    let nets = vec![NetworkAttachment::User {
        port_forwards: vec![PortForward::tcp(published, 80)],
        mac: None,
        address: GuestAddress::Auto,
        via,
    }];
    let cmdline = format!("nettest.httpd=1 nettest.fetch=http://10.0.2.2:{}/", srv.port());
    mgr.start(config(name, &cmdline, nets).await)
        .await
        .expect("start");
    let ip = mgr.wait_ready(name, BOOT_TIMEOUT).await.expect("ready");
    assert_eq!(
        ip.to_string(),
        "10.0.2.15",
        "readiness marker carries the guest address"
    );
    // guest -> host through the gateway address
    let line = wait_serial(&mgr, name, "NETTEST fetch", Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no fetch result:\n{}", serial(&mgr, name)));
    assert_eq!(
        line,
        format!("NETTEST fetch ok: {token}"),
        "{}",
        serial(&mgr, name)
    );
    // host -> guest through the published port
    wait_serial(&mgr, name, "NETTEST httpd up", Duration::from_secs(30))
        .await
        .expect("httpd up");
    let body = http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, published)))
        .await
        .expect("published port answers");
    assert_eq!(body.trim(), "hello from 10.0.2.15");
    let dir = mgr.vm_dir(name);
    let net = vm_rs::net::NetState::load(&dir)
        .expect("net.json")
        .expect("net state");
    let sidecar = net.slirp.first().cloned();
    if via == UserNat::Slirp4netns {
        let rec = sidecar.as_ref().expect("a slirp4netns sidecar is recorded");
        assert!(rec.is_alive());
        assert!(net.own_netns && net.netns.as_deref() == Some(dir.join("netns").as_path()));
        // the VMM runs in the VM's namespace, not the test's
        let handle = mgr.handle(name).await.expect("handle").expect("live");
        let ns_of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns link");
        assert_ne!(ns_of(handle.pid), ns_of(std::process::id()));
    } else {
        assert!(sidecar.is_none() && !net.own_netns);
    }
    mgr.stop(name, Duration::from_secs(20)).await.expect("stop");
    // the published port is closed with the VM
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", published))
        .await
        .is_err());
    (home, dir, sidecar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_mode_dhcp_lease_configures_the_guest() {
    let home = TestHome::new();
    let _sidecars = SidecarGuard(home.path().to_path_buf());
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let token = format!("dhcp-page-{}", std::process::id());
    let (srv, _h) = host_http_server(token.clone()).await;
    let nets = vec![NetworkAttachment::User {
        port_forwards: vec![],
        mac: None,
        address: GuestAddress::Dhcp,
        via: UserNat::Auto,
    }];
    let cmdline = format!("nettest.fetch=http://10.0.2.2:{}/", srv.port());
    mgr.start(config("dhcp1", &cmdline, nets).await)
        .await
        .expect("start");
    let ip = mgr.wait_ready("dhcp1", BOOT_TIMEOUT).await.expect("ready");
    // QEMU's DHCP server hands out its first address; the marker carries the leased address
    assert_eq!(ip.to_string(), "10.0.2.15", "{}", serial(&mgr, "dhcp1"));
    assert!(serial(&mgr, "dhcp1").contains("vmrs.ip=dhcp"));
    // the default route came from the lease too
    let line = wait_serial(&mgr, "dhcp1", "NETTEST fetch", Duration::from_secs(60)).await;
    assert_eq!(
        line,
        Some(format!("NETTEST fetch ok: {token}")),
        "{}",
        serial(&mgr, "dhcp1")
    );
    mgr.stop("dhcp1", Duration::from_secs(20)).await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_network_connects_its_vms_and_isolates_others() {
    use_built_sidecar();
    let home = TestHome::new();
    let _sidecars = SidecarGuard(home.path().to_path_buf());
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let on = |net: &str, ip: &str| NetworkAttachment::Switch {
        network: net.into(),
        subnet: None,
        address: GuestAddress::Static(ip.parse().expect("cidr")),
        mac: None,
    };
    mgr.start(config("red-a", "", vec![on("red", "10.77.0.10/24")]).await)
        .await
        .expect("start red-a");
    mgr.start(
        config(
            "red-b",
            "nettest.ping=10.77.0.10",
            vec![on("red", "10.77.0.11/24")],
        )
        .await,
    )
    .await
    .expect("start red-b");
    mgr.start(
        config(
            "blue-c",
            "nettest.ping=10.77.0.10",
            vec![on("blue", "10.77.0.12/24")],
        )
        .await,
    )
    .await
    .expect("start blue-c");
    for (vm, ip) in [
        ("red-a", "10.77.0.10"),
        ("red-b", "10.77.0.11"),
        ("blue-c", "10.77.0.12"),
    ] {
        let got = mgr.wait_ready(vm, BOOT_TIMEOUT).await.expect("ready");
        assert_eq!(got.to_string(), ip);
    }
    let b = wait_serial(&mgr, "red-b", "NETTEST ping", Duration::from_secs(90)).await;
    assert_eq!(
        b.as_deref(),
        Some("NETTEST ping ok 10.77.0.10"),
        "red-b:\n{}",
        serial(&mgr, "red-b")
    );
    let c = wait_serial(&mgr, "blue-c", "NETTEST ping", Duration::from_secs(120)).await;
    assert_eq!(
        c.as_deref(),
        Some("NETTEST ping failed 10.77.0.10"),
        "blue-c:\n{}",
        serial(&mgr, "blue-c")
    );
    let nets = vm_rs::net::networks_dir(home.path());
    let red = vm_rs::net::sidecar::switch_record(&nets, "red").expect("red switch record");
    assert!(red.is_alive());
    for vm in ["red-a", "red-b", "blue-c"] {
        mgr.stop(vm, Duration::from_secs(20)).await.expect("stop");
    }
    // the last member left: switch sidecars stopped and their directories gone
    assert!(!red.is_alive(), "red switch still running");
    assert!(vm_rs::net::sidecar::networks(&nets).is_empty());
}

fn vmrs_links(ns: &TestNetns) -> Vec<String> {
    ns.links().into_iter().filter(|l| l.starts_with("vmrs")).collect()
}

fn nft_has_vmrs_table(ns: &TestNetns) -> bool {
    String::from_utf8_lossy(&ns.exec(&["nft", "list", "tables"]).stdout).contains("vmrs_")
}

fn bridge_net(ns: &TestNetns, port_forwards: Vec<PortForward>) -> NetworkAttachment {
    NetworkAttachment::Bridge {
        bridge: "vmrsbr9".into(),
        gateway: "10.66.0.1/24".parse().expect("cidr"),
        nat: true,
        address: GuestAddress::Auto,
        dns: vec![],
        port_forwards,
        mac: None,
        netns: Some(ns.path()),
    }
}

/// `busybox wget` from inside the namespace.
/// (`addr` is `IP` or `IP:PORT`)
fn fetch_in_ns(ns: &TestNetns, addr: &str) -> String {
    let out = ns.exec(&[
        "timeout",
        "10",
        "busybox",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{addr}/"),
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_vm_in_netns_is_reachable_and_leaves_nothing_behind() {
    use_built_sidecar();
    let ns = TestNetns::new("vmbr");
    let home = TestHome::new();
    let _sidecars = SidecarGuard(home.path().to_path_buf());
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let published = free_port();
    let nets = vec![bridge_net(&ns, vec![PortForward::tcp(published, 80)])];
    mgr.start(config("br1", "nettest.httpd=1", nets).await)
        .await
        .expect("start");
    let ip = mgr
        .wait_ready("br1", BOOT_TIMEOUT)
        .await
        .expect("ready")
        .to_string();
    assert!(ip.starts_with("10.66.0."), "{ip}");
    wait_serial(&mgr, "br1", "NETTEST httpd up", Duration::from_secs(30))
        .await
        .expect("httpd up");
    let mut body = String::new();
    wait_until(Duration::from_secs(30), || {
        body = fetch_in_ns(&ns, &ip);
        !body.is_empty()
    })
    .await;
    assert_eq!(body, format!("hello from {ip}"));
    // the published port: a PortForwarder sidecar inside the namespace
    let via_forwarder = fetch_in_ns(&ns, &format!("127.0.0.1:{published}"));
    assert_eq!(via_forwarder, format!("hello from {ip}"));
    let state = vm_rs::net::NetState::load(&mgr.vm_dir("br1"))
        .expect("net.json")
        .expect("recorded");
    assert_eq!(state.forwarders.len(), 1);
    assert!(state.forwarders[0].is_alive());
    assert_eq!(vmrs_links(&ns).len(), 2, "{:?}", ns.links());
    assert!(nft_has_vmrs_table(&ns));
    mgr.stop("br1", Duration::from_secs(20)).await.expect("stop");
    assert!(vmrs_links(&ns).is_empty(), "left after stop: {:?}", ns.links());
    assert!(!state.forwarders[0].is_alive(), "forwarder left after stop");
    assert!(fetch_in_ns(&ns, &format!("127.0.0.1:{published}")).is_empty());
    assert!(!nft_has_vmrs_table(&ns), "nat table left after stop");
    mgr.remove("br1", false).await.expect("remove");

    // crash: the manager that started the VM dies (its runtime is dropped, so no watcher sees
    // the exit) and QEMU is killed with SIGKILL; a new manager must clean up
    let home2 = home.path().to_path_buf();
    let cfg = config("br2", "", vec![bridge_net(&ns, vec![])]).await;
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let m = VmManager::with_home(&home2).await.expect("manager");
            m.start(cfg).await.expect("start br2");
            m.wait_ready("br2", BOOT_TIMEOUT).await.expect("ready br2");
            m.handle("br2").await.expect("handle").expect("some")
        })
    })
    .join()
    .expect("first manager");
    assert_eq!(vmrs_links(&ns).len(), 2, "{:?}", ns.links());
    let qemu = vm_rs::process::VmmProcess::attach(handle.pid, handle.start_time).expect("attach");
    qemu.kill().expect("kill -9 qemu");
    assert!(wait_until(Duration::from_secs(10), || !qemu.is_alive()).await);
    assert_eq!(vmrs_links(&ns).len(), 2, "nobody cleaned up yet");
    let mgr2 = VmManager::with_home(home.path())
        .await
        .expect("restarted manager");
    assert!(vmrs_links(&ns).is_empty(), "left after crash: {:?}", ns.links());
    assert!(!nft_has_vmrs_table(&ns));
    assert!(!mgr2.state("br2").await.expect("state").is_live());
}

/// A guest command that pings `ip` until it answers (5 tries).
fn ping_script(ip: &str) -> String {
    format!("for i in 1 2 3 4 5; do ping -c1 -W2 {ip} >/dev/null && exit 0; done; exit 1")
}

/// Snapshot a VM on a bridge (eth0) and a switch (eth1), leave it running, clone it twice:
/// the three VMs have three MACs and three addresses on each network, the host sees each
/// clone at its new address with its new MAC, the clones reach the gateway and each other on
/// both networks; an address the snapshot pins that another VM has is refused before anything
/// is made, as are clones of it; after stop + rm nothing is left in the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_on_a_bridge_and_a_switch_get_a_mac_and_an_address_of_their_own() {
    use vm_rs::manager::{RestoreOptions, SnapshotOptions};
    use_built_sidecar();
    let ns = TestNetns::new("vmsnap");
    let home = TestHome::new();
    let _sidecars = SidecarGuard(home.path().to_path_buf());
    let mgr = VmManager::with_home(home.path()).await.expect("manager");
    let nets = vec![bridge_net(&ns, vec![]), NetworkAttachment::switch("snapnet")];
    mgr.start(config("netsrc", "", nets).await).await.expect("start");
    mgr.wait_ready("netsrc", BOOT_TIMEOUT).await.expect("ready");
    let leave_running = SnapshotOptions { leave_running: true };
    mgr.snapshot("netsrc", "netsnap", leave_running.clone())
        .await
        .expect("snapshot of a bridge + switch vm");
    let clones = mgr
        .clone_snapshot("netsnap", 2, "netc", RestoreOptions::default())
        .await
        .expect("clone");
    assert_eq!(clones.len(), 2);
    let vms = ["netsrc", "netc-1", "netc-2"];
    let mut seen = std::collections::HashSet::new();
    let mut addrs = Vec::new();
    for vm in vms {
        let mut nic = Vec::new();
        for dev in ["eth0", "eth1"] {
            let mac = sh(&mgr, vm, &format!("cat /sys/class/net/{dev}/address")).await;
            let ip = sh(
                &mgr,
                vm,
                &format!("ip -4 -o addr show dev {dev} | awk '{{print $4}}'"),
            )
            .await;
            assert_eq!(ip.lines().count(), 1, "{vm} {dev}: one address, got {ip:?}");
            assert!(seen.insert(mac.clone()), "{vm} {dev}: mac {mac} twice");
            assert!(seen.insert(ip.clone()), "{vm} {dev}: address {ip} twice");
            nic.push((mac, ip.split('/').next().expect("addr").to_string()));
        }
        assert!(nic[0].1.starts_with("10.66.0."), "{vm}: {nic:?}");
        let route = sh(&mgr, vm, "ip route show default").await;
        assert!(
            route.contains("via 10.66.0.1 dev eth0"),
            "{vm}: default route {route:?}"
        );
        let state = mgr.state(vm).await.expect("state");
        assert_eq!(
            state.ip().map(|i| i.to_string()).as_deref(),
            Some(nic[0].1.as_str()),
            "{vm} is ready at its new address"
        );
        addrs.push(nic);
    }
    for (vm, nic) in vms.iter().zip(&addrs) {
        let (mac, ip) = &nic[0];
        let answered = (0..5).any(|_| ns.exec(&["busybox", "ping", "-c1", "-W2", ip]).status.success());
        assert!(answered, "{vm} does not answer at {ip} on the bridge");
        let neigh = String::from_utf8_lossy(&ns.exec(&["ip", "neigh", "show", ip]).stdout).to_string();
        assert!(
            neigh.contains(mac.as_str()),
            "{vm}: the host sees {ip} at {neigh:?}, not {mac}"
        );
    }
    // clone to clone on both networks, and to the source on the switch
    sh(&mgr, "netc-1", &ping_script(&addrs[2][0].1)).await;
    sh(&mgr, "netc-1", &ping_script(&addrs[2][1].1)).await;
    sh(&mgr, "netc-2", &ping_script(&addrs[0][1].1)).await;
    sh(&mgr, "netc-2", &ping_script("10.66.0.1")).await;

    // a pinned address another vm has: refused before anything exists
    let pinned = NetworkAttachment::Bridge {
        bridge: "vmrsbr9".into(),
        gateway: "10.66.0.1/24".parse().expect("cidr"),
        nat: true,
        address: GuestAddress::Static("10.66.0.250/24".parse().expect("cidr")),
        dns: vec![],
        port_forwards: vec![],
        mac: None,
        netns: Some(ns.path()),
    };
    mgr.start(config("pinsrc", "", vec![pinned]).await)
        .await
        .expect("start pinned");
    mgr.wait_ready("pinsrc", BOOT_TIMEOUT).await.expect("ready");
    mgr.snapshot("pinsrc", "pinsnap", leave_running)
        .await
        .expect("snapshot pinned");
    let links = vmrs_links(&ns);
    let e = mgr
        .restore("pinsnap", "pinned-1", RestoreOptions::default())
        .await
        .expect_err("restore onto an address in use");
    assert_eq!(e.kind(), vm_rs::ErrorKind::Conflict, "{e}");
    assert!(
        e.to_string().contains("10.66.0.250") && e.to_string().contains("pinsrc"),
        "{e}"
    );
    assert!(!mgr.vm_dir("pinned-1").exists());
    let e = mgr
        .clone_snapshot("pinsnap", 2, "pinc", RestoreOptions::default())
        .await
        .expect_err("clones of a pinned address");
    assert!(e.to_string().contains("pins an address"), "{e}");
    assert!(!mgr.vm_dir("pinc-1").exists() && !mgr.vm_dir("pinc-2").exists());
    assert_eq!(vmrs_links(&ns), links, "a refused restore made links");
    // with the source gone, the one restore takes the address
    mgr.remove("pinsrc", true).await.expect("rm pinsrc");
    mgr.restore("pinsnap", "pinned-1", RestoreOptions::default())
        .await
        .expect("restore once the address is free");
    assert_eq!(
        sh(&mgr, "pinned-1", "ip -4 -o addr show dev eth0 | awk '{print $4}'").await,
        "10.66.0.250/24"
    );
    assert!((0..5).any(|_| ns
        .exec(&["busybox", "ping", "-c1", "-W2", "10.66.0.250"])
        .status
        .success()));

    for vm in ["netsrc", "netc-1", "netc-2", "pinned-1"] {
        mgr.remove(vm, true).await.expect("rm");
    }
    assert!(vmrs_links(&ns).is_empty(), "left: {:?}", ns.links());
    assert!(!nft_has_vmrs_table(&ns), "nat table left");
    assert!(vm_rs::net::sidecar::networks(&vm_rs::net::networks_dir(home.path())).is_empty());
}
