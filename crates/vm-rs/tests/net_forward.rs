//! PortForwarder against real loopback TCP servers: parallel connections, large transfers
//! with integrity checks, half-close, unreachable targets and clean shutdown.

use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vm_rs::net::PortForwarder;

/// Echo server: copies everything back; ends its write side when the client ends its own.
async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, h)
}

/// Server that reads the whole request until EOF, then answers with its SHA-256 and closes:
/// works only if the half-close reaches it through the forwarder.
async fn digest_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_ok() {
                    let d = Sha256::digest(&all);
                    let _ = s.write_all(&d).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    (addr, h)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    // xorshift: cheap, deterministic, not compressible by accident
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn round_trip(fwd: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let s = TcpStream::connect(fwd).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("shutdown");
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.expect("read");
    writer.await.expect("writer");
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parallel_connections_keep_their_data() {
    let (target, _srv) = echo_server().await;
    let fwd = PortForwarder::bind("127.0.0.1:0".parse().expect("addr"), target)
        .await
        .expect("bind");
    let addr = fwd.local_addr();
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        tasks.push(tokio::spawn(async move {
            let data = pattern(i, 64 * 1024 + i as usize * 37);
            let back = round_trip(addr, data.clone()).await;
            assert_eq!(back.len(), data.len(), "connection {i} length");
            assert!(back == data, "connection {i} corrupted");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let st = fwd.stats();
    assert_eq!(st.accepted, 100);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_and_half_close() {
    let (target, _srv) = digest_server().await;
    let fwd = PortForwarder::bind("127.0.0.1:0".parse().expect("addr"), target)
        .await
        .expect("bind");
    let data = pattern(7, 64 << 20);
    let want = Sha256::digest(&data).to_vec();
    let got = round_trip(fwd.local_addr(), data).await;
    assert_eq!(got, want, "digest of 64 MiB relayed through the forwarder");
    // byte counters are updated when the connection ends
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while fwd.stats().bytes_to_target < 64 << 20 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", fwd.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fwd.stats().bytes_from_target, 32);
    fwd.stop().await;
}

#[tokio::test]
async fn unreachable_target_closes_the_client() {
    // a port that was free a moment ago
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let fwd = PortForwarder::bind("127.0.0.1:0".parse().expect("addr"), dead)
        .await
        .expect("bind");
    let mut s = TcpStream::connect(fwd.local_addr()).await.expect("connect");
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(fwd.stats().failed_connects, 1);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_open_connections_and_frees_the_port() {
    let (target, _srv) = echo_server().await;
    let fwd = PortForwarder::bind("127.0.0.1:0".parse().expect("addr"), target)
        .await
        .expect("bind");
    let addr = fwd.local_addr();
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.expect("echo");
        assert_eq!(&b, b"ping");
        clients.push(s);
    }
    assert_eq!(fwd.stats().active, 10);
    tokio::time::timeout(Duration::from_secs(5), fwd.stop())
        .await
        .expect("stop finishes");
    for mut c in clients {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
            .await
            .expect("client sees the close");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
    // nothing listens any more and the port can be bound again
    assert!(TcpStream::connect(addr).await.is_err());
    let again = TcpListener::bind(addr).await;
    assert!(again.is_ok(), "{again:?}");
}
