//! Switch forwarding rate between two ports, 64-byte and 1500-byte frames.
//!
//! 1. `core`: the forwarding logic alone ([`NetworkSwitch::ingress`] + [`NetworkSwitch::pop`]),
//!    one core: the figure the ≥ 1 Mpps target is about.
//! 2. `socket`: end to end through the switch server over Unix datagram sockets, the way QEMU
//!    talks to it (sender socket -> switch -> receiver socket), against the baseline of the
//!    same sender writing straight to the receiver socket in the same run; reported as a ratio.
//!
//! Run: `cargo bench -p vm-rs --bench net_switch` (`NET_BENCH_SECS` sets the socket run
//! length, default 2).

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_rs::net::switch::server::{serve, ServeOptions};
use vm_rs::net::{NetworkSwitch, SwitchConfig};

fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(len, 0x5a);
    f
}

const A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

fn report(what: &str, len: usize, frames: u64, secs: f64) -> f64 {
    let fps = frames as f64 / secs;
    let gbps = fps * len as f64 * 8.0 / 1e9;
    println!(
        "{what:<28} {len:>5} B  {:>10.0} frames/s  {:>7.3} Mpps  {gbps:>7.2} Gbit/s",
        fps,
        fps / 1e6
    );
    fps
}

fn core(len: usize) -> f64 {
    let mut sw = NetworkSwitch::new(SwitchConfig::default());
    let a = sw.add_port("bench").expect("port");
    let b = sw.add_port("bench").expect("port");
    let now = Instant::now();
    // learn both sides so frames are unicast
    sw.ingress(a, &frame(B, A, len), now).expect("ingress");
    sw.ingress(b, &frame(A, B, len), now).expect("ingress");
    while sw.pop(a).is_some() {}
    while sw.pop(b).is_some() {}
    let ab = frame(B, A, len);
    let ba = frame(A, B, len);
    let n: u64 = if len <= 64 { 5_000_000 } else { 2_000_000 };
    let start = Instant::now();
    let mut bytes = 0usize;
    for i in 0..n {
        let (from, to, f) = if i & 1 == 0 { (a, b, &ab) } else { (b, a, &ba) };
        let _ = sw.ingress(from, f, now);
        if let Some(out) = sw.pop(to) {
            bytes += out.len();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(bytes, n as usize * len);
    report("core (one thread)", len, n, secs)
}

/// Receive on `rx` until `stop`, counting frames.
fn receiver(rx: UnixDatagram, count: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        rx.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut buf = vec![0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if rx.recv(&mut buf).is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

/// Send `len`-byte frames from `tx` to `to` for `secs`, return frames received per second.
fn pump(tx: &UnixDatagram, to: &Path, rx: UnixDatagram, len: usize, secs: f64) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let h = receiver(rx, count.clone(), stop.clone());
    let f = frame(B, A, len);
    // blocking sender: a full queue on the way makes it wait (backpressure), so no core is
    // burnt spinning on EAGAIN; what is counted is what arrives
    tx.set_write_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            if tx.send_to(&f, to).is_ok() {
                sent += 1;
            }
        }
    }
    let got_at_end = count.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    h.join().expect("receiver");
    let _ = sent;
    got_at_end as f64 / elapsed
}

fn socket_run(len: usize, secs: f64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tmp");
    let sw_path = dir.path().join("switch.sock");
    // baseline: straight from A's socket to B's socket
    let a = UnixDatagram::bind(dir.path().join("a0.sock")).expect("bind");
    let b_path = dir.path().join("b0.sock");
    let b = UnixDatagram::bind(&b_path).expect("bind");
    let direct = pump(&a, &b_path, b, len, secs);

    // through the switch server on its own thread and runtime (one core)
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = ServeOptions {
        network: "bench".into(),
        socket: sw_path.clone(),
        config: SwitchConfig::default(),
        stats: None,
    };
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(serve(opts, async {
            let _ = stop_rx.await;
        }))
    });
    while !sw_path.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let a = UnixDatagram::bind(dir.path().join("a.sock")).expect("bind");
    let b = UnixDatagram::bind(dir.path().join("b.sock")).expect("bind");
    // register both ports and teach the switch both MACs
    b.send_to(&frame(A, B, 60), &sw_path).expect("send");
    std::thread::sleep(Duration::from_millis(20));
    a.send_to(&frame(B, A, 60), &sw_path).expect("send");
    std::thread::sleep(Duration::from_millis(20));
    let mut drain = [0u8; 2048];
    b.set_nonblocking(true).expect("nb");
    while b.recv(&mut drain).is_ok() {}
    b.set_nonblocking(false).expect("blocking");
    let switched = pump(&a, &sw_path, b, len, secs);
    let _ = stop_tx.send(());
    server.join().expect("server").expect("serve");
    (direct, switched)
}

fn main() {
    let secs: f64 = std::env::var("NET_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    println!("== switch forwarding, two ports ==");
    let c64 = core(64);
    let c1500 = core(1500);
    for len in [64usize, 1500] {
        let (direct, switched) = socket_run(len, secs);
        report("socket: direct a->b (base)", len, direct as u64, 1.0);
        report("socket: a->switch->b", len, switched as u64, 1.0);
        println!(
            "socket ratio switched/direct ({len} B): {:.2}x",
            switched / direct
        );
    }
    println!(
        "core target >= 1 Mpps at 64 B: {} ({:.2} Mpps; 1500 B {:.2} Mpps)",
        if c64 >= 1e6 { "met" } else { "NOT met" },
        c64 / 1e6,
        c1500 / 1e6
    );
}
