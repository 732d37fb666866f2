//! Port-forwarder throughput against a direct loopback TCP connection, in the same run.
//!
//! A sink thread reads and discards; a client thread writes `NET_BENCH_MIB` MiB (default
//! 2048) in 256 KiB writes, once straight to the sink and once through a port forwarder
//! running the way vm-rs runs it: the `vmrs-net forward` sidecar process (its own
//! single-threaded runtime, splice relay). Reports both rates and the ratio (target ≥ 0.8x).
//! Three rounds, alternating; the best of each counts.
//!
//! Run: `cargo bench -p vm-rs --bench net_forward`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes());
            });
        }
    });
    addr
}

fn push(to: SocketAddr, mib: u64) -> f64 {
    let mut s = TcpStream::connect(to).expect("connect");
    let chunk = vec![0xa5u8; 256 * 1024];
    let total = mib * 1024 * 1024;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        s.write_all(&chunk).expect("write");
        sent += chunk.len() as u64;
    }
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).expect("ack");
    assert_eq!(u64::from_be_bytes(ack), total, "sink saw every byte");
    total as f64 / start.elapsed().as_secs_f64()
}

struct Sidecar(std::process::Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let mib: u64 = std::env::var("NET_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2048);
    let target = sink();
    let listen = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let _fwd = Sidecar(
        std::process::Command::new(env!("CARGO_BIN_EXE_vmrs-net"))
            .args([
                "forward",
                "--listen",
                &listen.to_string(),
                "--to",
                &target.to_string(),
            ])
            .spawn()
            .expect("start vmrs-net forward"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        assert!(Instant::now() < deadline, "forwarder did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut best_direct: f64 = 0.0;
    let mut best_fwd: f64 = 0.0;
    for _ in 0..3 {
        best_direct = best_direct.max(push(target, mib));
        best_fwd = best_fwd.max(push(listen, mib));
    }
    let gbit = |b: f64| b * 8.0 / 1e9;
    println!("== port forwarder, {mib} MiB per run, best of 3 ==");
    println!("direct loopback              {:>8.2} Gbit/s", gbit(best_direct));
    println!("through vmrs-net forward     {:>8.2} Gbit/s", gbit(best_fwd));
    let ratio = best_fwd / best_direct;
    println!(
        "ratio forwarded/direct: {ratio:.2}x (target >= 0.80x: {})",
        if ratio >= 0.8 { "met" } else { "NOT met" }
    );
}
