//! The host agent client against a fake guest on a socket pair: malformed, oversized and
//! out-of-place frames end the connection with an error and never crash or hang the host.

use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vm_rs::agent::proto::{Decoder, Message, MAX_FRAME, VERSION};
use vm_rs::agent::{AgentClient, AgentError, ExecCommand, WinSize};

/// A fake guest: answers the hello, then runs `script` with the decoded frames it receives.
async fn fake_guest(mut guest: UnixStream) -> (UnixStream, Decoder) {
    let mut dec = Decoder::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame().expect("valid frame from host") {
            assert_eq!(f.message, Message::Hello { version: VERSION });
            break;
        }
        let n = guest.read(&mut buf).await.expect("read");
        assert!(n > 0, "host closed");
        dec.push(&buf[..n]);
    }
    let ok = Message::HelloOk {
        version: VERSION,
        agent: b"fake".to_vec(),
    };
    guest
        .write_all(&ok.encode(0).expect("encode"))
        .await
        .expect("write");
    (guest, dec)
}

async fn next_request(guest: &mut UnixStream, dec: &mut Decoder) -> (u32, Message) {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame().expect("valid frame") {
            return (f.stream, f.message);
        }
        let n = guest.read(&mut buf).await.expect("read");
        assert!(n > 0);
        dec.push(&buf[..n]);
    }
}

async fn connected() -> (AgentClient, UnixStream, Decoder) {
    let (host, guest) = UnixStream::pair().expect("pair");
    let (client, (guest, dec)) = tokio::join!(AgentClient::from_stream(host), fake_guest(guest));
    (client.expect("handshake"), guest, dec)
}

#[tokio::test]
async fn oversized_frame_from_guest_is_a_protocol_error() {
    let (client, mut guest, mut dec) = connected().await;
    let c2 = client.clone();
    let exec = tokio::spawn(async move { c2.exec(ExecCommand::new(["true"])).await });
    let (stream, msg) = next_request(&mut guest, &mut dec).await;
    assert!(matches!(msg, Message::Exec(_)));
    // Started, then a frame header claiming 4 GiB.
    guest
        .write_all(&Message::Started { pid: 5 }.encode(stream).expect("enc"))
        .await
        .expect("w");
    guest.write_all(&u32::MAX.to_be_bytes()).await.expect("w");
    let result = tokio::time::timeout(Duration::from_secs(10), exec)
        .await
        .expect("no hang")
        .expect("join");
    assert!(matches!(result, Err(AgentError::Protocol { .. })), "{result:?}");
    // The client stays usable as an object and reports the closed connection.
    assert!(matches!(client.ping().await, Err(AgentError::Protocol { .. })));
}

#[tokio::test]
async fn frame_of_exactly_max_size_header_but_bad_type_is_rejected() {
    let (client, mut guest, _dec) = connected().await;
    let mut frame = ((MAX_FRAME - 4) as u32).to_be_bytes().to_vec();
    frame.push(0x7f); // unknown type
    frame.extend_from_slice(&[0, 0, 0, 1]);
    guest.write_all(&frame).await.expect("w");
    // The body never fully arrives; the header alone must not make the host allocate or hang
    // forever once the guest closes.
    drop(guest);
    let r = tokio::time::timeout(Duration::from_secs(10), client.ping())
        .await
        .expect("no hang");
    assert!(r.is_err());
}

#[tokio::test]
async fn unexpected_reply_and_unknown_streams() {
    let (client, mut guest, mut dec) = connected().await;
    let c2 = client.clone();
    let ping = tokio::spawn(async move { c2.ping().await });
    let (stream, _) = next_request(&mut guest, &mut dec).await;
    // A frame for a stream nobody opened is ignored; a wrong reply type is an error.
    guest
        .write_all(&Message::Stdout { data: b"x".to_vec() }.encode(999).expect("e"))
        .await
        .expect("w");
    guest
        .write_all(&Message::Exited { code: 0 }.encode(stream).expect("e"))
        .await
        .expect("w");
    let r = tokio::time::timeout(Duration::from_secs(10), ping)
        .await
        .expect("no hang")
        .expect("join");
    assert!(matches!(r, Err(AgentError::Unexpected { .. })), "{r:?}");
}

#[tokio::test]
async fn copy_from_with_escaping_paths_is_refused() {
    let (client, mut guest, mut dec) = connected().await;
    let dest = tempfile::tempdir().expect("tempdir");
    let target = dest.path().join("out");
    let t2 = target.clone();
    let c2 = client.clone();
    let copy = tokio::spawn(async move { c2.copy_from("/x", &t2).await });
    let (stream, msg) = next_request(&mut guest, &mut dec).await;
    assert!(matches!(msg, Message::CopyOut { .. }));
    use vm_rs::agent::proto::{Entry, EntryKind};
    for m in [
        Message::Entry(Entry {
            kind: EntryKind::Dir,
            mode: 0o755,
            size: 0,
            path: vec![],
            target: vec![],
        }),
        Message::Entry(Entry {
            kind: EntryKind::File,
            mode: 0o644,
            size: 1,
            path: b"../escape".to_vec(),
            target: vec![],
        }),
        Message::Data { data: b"x".to_vec() },
        Message::End,
    ] {
        guest.write_all(&m.encode(stream).expect("e")).await.expect("w");
    }
    let r = tokio::time::timeout(Duration::from_secs(10), copy)
        .await
        .expect("no hang")
        .expect("join");
    assert!(matches!(r, Err(AgentError::UnsafePath { .. })), "{r:?}");
    assert!(!dest.path().join("escape").exists());
}

/// A fake guest that speaks only `versions`: it refuses other hellos with an error, as an
/// agent of that age does. Returns after accepting one.
async fn versioned_guest(mut guest: UnixStream, versions: &[u16]) -> Option<(UnixStream, Decoder, Vec<u16>)> {
    let mut dec = Decoder::new();
    let mut buf = [0u8; 4096];
    let mut asked = Vec::new();
    loop {
        while let Some(f) = dec.next_frame().expect("valid frame") {
            let Message::Hello { version } = f.message else {
                panic!("not a hello: {:?}", f.message)
            };
            asked.push(version);
            let reply = if versions.contains(&version) {
                Message::HelloOk {
                    version,
                    agent: b"old".to_vec(),
                }
            } else {
                Message::Error {
                    message: format!("unsupported protocol version {version}").into_bytes(),
                }
            };
            guest.write_all(&reply.encode(0).expect("e")).await.expect("w");
            if versions.contains(&version) {
                return Some((guest, dec, asked));
            }
        }
        let n = guest.read(&mut buf).await.expect("read");
        if n == 0 {
            return None;
        }
        dec.push(&buf[..n]);
    }
}

#[tokio::test]
async fn guest_refusing_every_version_is_reported() {
    let (host, guest) = UnixStream::pair().expect("pair");
    let g = tokio::spawn(versioned_guest(guest, &[]));
    let r = tokio::time::timeout(Duration::from_secs(10), AgentClient::from_stream(host))
        .await
        .expect("no hang");
    assert!(matches!(r, Err(AgentError::Refused { .. })), "{r:?}");
    drop(r);
    assert!(g.await.expect("join").is_none());
}

#[tokio::test]
async fn an_old_guest_is_spoken_to_in_its_version_and_refuses_terminals_clearly() {
    let (host, guest) = UnixStream::pair().expect("pair");
    let (client, g) = tokio::join!(AgentClient::from_stream(host), versioned_guest(guest, &[1]));
    let client = client.expect("handshake with a version 1 guest");
    let (mut guest, mut dec, asked) = g.expect("accepted");
    // the host steps down one version at a time until the guest accepts
    assert_eq!(asked, (1..=VERSION).rev().collect::<Vec<_>>());
    assert_eq!(client.protocol_version(), 1);
    // A terminal needs version 2: refused on the host before anything reaches the guest.
    let r = client
        .spawn(ExecCommand::new(["sh"]).tty(WinSize { rows: 24, cols: 80 }))
        .await;
    match r {
        Err(e @ AgentError::Unsupported { version: 1, .. }) => {
            assert!(e.to_string().contains("vmrs setup"), "{e}");
            assert_eq!(e.kind(), vm_rs::ErrorKind::Unsupported);
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // A plain exec still goes out as version 1's Exec.
    let c2 = client.clone();
    let exec = tokio::spawn(async move { c2.exec(ExecCommand::new(["true"])).await });
    let (stream, msg) = next_request(&mut guest, &mut dec).await;
    assert!(matches!(msg, Message::Exec(_)), "{msg:?}");
    for m in [Message::Started { pid: 5 }, Message::Exited { code: 0 }] {
        guest.write_all(&m.encode(stream).expect("e")).await.expect("w");
    }
    let out = exec.await.expect("join").expect("exec");
    assert!(out.status.success());
}

#[tokio::test]
async fn a_program_that_cannot_start_has_the_shell_codes() {
    let (client, mut guest, mut dec) = connected().await;
    for (errno, code) in [(libc::ENOENT, 127), (libc::EACCES, 126), (libc::ENOEXEC, 126)] {
        let c2 = client.clone();
        let exec = tokio::spawn(async move { c2.spawn(ExecCommand::new(["x"])).await });
        let (stream, _) = next_request(&mut guest, &mut dec).await;
        let m = Message::SpawnFailed {
            errno,
            message: b"cannot run".to_vec(),
        };
        guest.write_all(&m.encode(stream).expect("e")).await.expect("w");
        let e = exec.await.expect("join").expect_err("spawn failed");
        assert_eq!(e.shell_code(), Some(code), "{e:?}");
    }
    let c2 = client.clone();
    let exec = tokio::spawn(async move { c2.spawn(ExecCommand::new(["x"])).await });
    let (stream, _) = next_request(&mut guest, &mut dec).await;
    let m = Message::Error {
        message: b"unknown user".to_vec(),
    };
    guest.write_all(&m.encode(stream).expect("e")).await.expect("w");
    let e = exec.await.expect("join").expect_err("refused");
    assert_eq!(e.shell_code(), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn random_bytes_from_the_guest_never_panic_or_hang(garbage in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let (client, mut guest, mut dec) = connected().await;
            let c2 = client.clone();
            let exec = tokio::spawn(async move { c2.exec(ExecCommand::new(["x"])).await });
            let (_stream, _) = next_request(&mut guest, &mut dec).await;
            guest.write_all(&garbage).await.expect("w");
            drop(guest);
            let r = tokio::time::timeout(Duration::from_secs(10), exec).await.expect("no hang").expect("join");
            // Random bytes can at most look like frames for other streams; the exec never
            // succeeds from them.
            prop_assert!(r.is_err());
            Ok(())
        })?;
    }
}
