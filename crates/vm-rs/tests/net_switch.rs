//! The switch server over real Unix datagram sockets (the way QEMU's `-netdev dgram` talks to
//! it), both in-process and as the `vmrs-net` sidecar process.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vm_rs::net::sidecar;
use vm_rs::net::switch::server::{read_stats, serve, ServeOptions};
use vm_rs::net::SwitchConfig;

fn use_built_sidecar() {
    // SAFETY-free in edition 2021; every test sets the same value
    std::env::set_var("VMRS_NET_BIN", env!("CARGO_BIN_EXE_vmrs-net"));
}

/// A fake NIC: a bound datagram socket talking to the switch socket.
struct Nic {
    sock: UnixDatagram,
    switch: PathBuf,
    mac: [u8; 6],
}

impl Nic {
    fn new(dir: &Path, name: &str, switch: &Path, last: u8) -> Self {
        let sock = UnixDatagram::bind(dir.join(name)).expect("bind nic");
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        Self {
            sock,
            switch: switch.to_path_buf(),
            mac: [0x02, 0, 0, 0, 0, last],
        }
    }

    fn send(&self, dst: [u8; 6], payload: &[u8]) {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        self.sock.send_to(&f, &self.switch).expect("send");
    }

    fn send_raw(&self, f: &[u8]) {
        self.sock.send_to(f, &self.switch).expect("send");
    }

    /// Next frame's payload, or None after the read timeout.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut b = vec![0u8; 70000];
        match self.sock.recv(&mut b) {
            Ok(n) => Some(b[14..n].to_vec()),
            Err(_) => None,
        }
    }
}

const BCAST: [u8; 6] = [0xff; 6];

fn wait_for(path: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_switch_learns_floods_and_drops_dead_ports() {
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("switch.sock");
    let stats = dir.path().join("stats.json");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        ServeOptions {
            network: "n".into(),
            socket: sock.clone(),
            config: SwitchConfig::default(),
            stats: Some(stats.clone()),
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    wait_for(&sock);
    let d = dir.path().to_path_buf();
    let s2 = sock.clone();
    tokio::task::spawn_blocking(move || {
        let a = Nic::new(&d, "a.sock", &s2, 1);
        let b = Nic::new(&d, "b.sock", &s2, 2);
        let c = Nic::new(&d, "c.sock", &s2, 3);
        // every port announces itself once (the switch only knows senders)
        b.send(BCAST, b"hello from b");
        c.send(BCAST, b"hello from c");
        assert_eq!(b.recv().as_deref(), Some(&b"hello from c"[..]));
        assert_eq!(c.recv(), None, "c was no port yet when b spoke");
        // a is new: its broadcast reaches b and c
        a.send(BCAST, b"who has");
        assert_eq!(b.recv().as_deref(), Some(&b"who has"[..]));
        assert_eq!(c.recv().as_deref(), Some(&b"who has"[..]));
        // b answers a by unicast: only a gets it
        b.send(a.mac, b"is at");
        assert_eq!(a.recv().as_deref(), Some(&b"is at"[..]));
        assert_eq!(c.recv(), None);
        // garbage does not pass
        a.send_raw(&[1, 2, 3]);
        assert_eq!(b.recv(), None);
        // c goes away; the switch notices when sending to it fails
        drop(c);
        let _ = std::fs::remove_file(d.join("c.sock"));
        a.send(BCAST, b"anyone?");
        assert_eq!(b.recv().as_deref(), Some(&b"anyone?"[..]));
    })
    .await
    .expect("clients");
    // stats file: two ports left, a's error counted
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(st) = read_stats(&stats) {
            if st.len() == 2 && st.iter().any(|p| p.counters.rx_errors == 1) {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{:?}", read_stats(&stats));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(());
    server.await.expect("join").expect("serve");
    assert!(!sock.exists(), "socket removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_switches_are_isolated_shared_and_stopped_with_last_member() {
    use_built_sidecar();
    let home = tempfile::tempdir().expect("tmp");
    let nets = home.path().join("networks");
    let red = sidecar::ensure_switch(&nets, "red").await.expect("red");
    let blue = sidecar::ensure_switch(&nets, "blue").await.expect("blue");
    sidecar::join(&nets, "red", "vm1").expect("join");
    sidecar::join(&nets, "red", "vm2").expect("join");
    sidecar::join(&nets, "blue", "vm3").expect("join");
    assert!(red.is_alive() && blue.is_alive());
    // a second ensure finds the running one
    assert_eq!(sidecar::ensure_switch(&nets, "red").await.expect("again"), red);

    let d = home.path().to_path_buf();
    let red_sock = sidecar::switch_socket(&nets, "red");
    let blue_sock = sidecar::switch_socket(&nets, "blue");
    tokio::task::spawn_blocking(move || {
        let r1 = Nic::new(&d, "r1.sock", &red_sock, 1);
        let r2 = Nic::new(&d, "r2.sock", &red_sock, 2);
        let b1 = Nic::new(&d, "b1.sock", &blue_sock, 3);
        r2.send(BCAST, b"r2 here");
        b1.send(BCAST, b"b1 here");
        assert_eq!(r1.recv(), None, "r1 has not spoken yet, so is no port yet");
        r1.send(BCAST, b"r1 here");
        assert_eq!(r2.recv().as_deref(), Some(&b"r1 here"[..]));
        assert_eq!(b1.recv(), None, "red traffic must not reach blue");
        r1.send(r2.mac, b"unicast");
        assert_eq!(r2.recv().as_deref(), Some(&b"unicast"[..]));
        // a blue NIC aiming at red's MAC gets nowhere
        b1.send(r1.mac, b"cross");
        assert_eq!(r1.recv(), None);
        assert_eq!(r2.recv(), None);
        // large frame (jumbo) passes whole
        let big = vec![0x5a; 9000];
        r1.send(r2.mac, &big);
        assert_eq!(r2.recv(), Some(big));
    })
    .await
    .expect("clients");

    sidecar::leave(&nets, "red", "vm1").await.expect("leave");
    assert!(red.is_alive(), "vm2 still uses red");
    sidecar::leave(&nets, "red", "vm2").await.expect("leave");
    assert!(!red.is_alive(), "last member gone: switch stopped");
    assert!(!sidecar::network_dir(&nets, "red").exists());
    sidecar::leave(&nets, "blue", "vm3").await.expect("leave");
    assert!(!blue.is_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sidecar_is_restarted() {
    use_built_sidecar();
    let home = tempfile::tempdir().expect("tmp");
    let nets = home.path().join("networks");
    let first = sidecar::ensure_switch(&nets, "n").await.expect("start");
    sidecar::join(&nets, "n", "vm").expect("join");
    // SAFETY-free: kill(2) on the pid we just started and checked
    let pid = rustix::process::Pid::from_raw(first.pid as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while first.is_alive() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = sidecar::ensure_switch(&nets, "n").await.expect("restart");
    assert_ne!(first, second);
    assert!(second.is_alive());
    sidecar::leave(&nets, "n", "vm").await.expect("leave");
    assert!(!second.is_alive());
}
