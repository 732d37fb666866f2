//! Verified downloads against an HTTP server the test runs on 127.0.0.1: good file, wrong
//! checksum, connection cut mid-file then resume (explicitly and by automatic retry), a server
//! that ignores ranges, server errors, and size limits.

#[path = "support/storage.rs"]
mod storage_support;

use storage_support::http::{Behaviour, TestServer};
use storage_support::{pattern, sha256};
use vm_rs::storage::download::part_path;
use vm_rs::storage::{download_verified, DownloadError, DownloadOptions, Progress};

const SIZE: usize = 3 << 20;

async fn server_with_file() -> (TestServer, Vec<u8>) {
    let server = TestServer::start().await;
    let data = pattern(SIZE, 7);
    server.put("/disk.img", data.clone());
    (server, data)
}

fn no_retries() -> DownloadOptions {
    DownloadOptions {
        retries: 0,
        ..DownloadOptions::default()
    }
}

#[tokio::test]
async fn good_file_is_verified_published_and_reused() {
    let (server, data) = server_with_file().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("images/disk.img");
    let mut last: Option<Progress> = None;
    let mut calls = 0;
    let out = download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &DownloadOptions::default(),
        &mut |p| {
            calls += 1;
            last = Some(p);
        },
    )
    .await
    .expect("download");
    assert_eq!(std::fs::read(&dest).expect("read"), data);
    assert_eq!(out.sha256, sha256(&data));
    assert_eq!(out.size, SIZE as u64);
    assert!(!out.already_present);
    assert!(!part_path(&dest).exists());
    assert!(calls > 0);
    assert_eq!(
        last,
        Some(Progress {
            downloaded: SIZE as u64,
            total: Some(SIZE as u64),
            resumed_from: 0
        })
    );

    // Already there with the right digest: no request is made.
    let before = server.seen().len();
    let again = download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &DownloadOptions::default(),
        &mut |_| {},
    )
    .await
    .expect("reuse");
    assert!(again.already_present);
    assert_eq!(server.seen().len(), before);
}

#[tokio::test]
async fn wrong_checksum_fails_and_leaves_nothing() {
    let (server, data) = server_with_file().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("disk.img");
    let wrong = sha256(b"something else");
    let err = download_verified(
        &server.url("/disk.img"),
        &dest,
        &wrong,
        &DownloadOptions::default(),
        &mut |_| {},
    )
    .await;
    match err {
        Err(DownloadError::ChecksumMismatch { expected, actual, .. }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha256(&data));
        }
        other => panic!("expected mismatch, got {other:?}"),
    }
    assert!(!dest.exists());
    assert!(!part_path(&dest).exists());
    assert!(matches!(
        download_verified(&server.url("/disk.img"), &dest, "xyz", &no_retries(), &mut |_| {}).await,
        Err(DownloadError::BadDigest { .. })
    ));
}

#[tokio::test]
async fn cut_connection_keeps_part_then_resumes_with_range() {
    let (server, data) = server_with_file().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("disk.img");
    let cut_at = 1_000_000;
    server.set(Behaviour {
        cut_next: 1,
        cut_at,
        ..Behaviour::default()
    });
    let err = download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &no_retries(),
        &mut |_| {},
    )
    .await;
    assert!(matches!(err, Err(DownloadError::Transfer { .. })), "{err:?}");
    assert!(!dest.exists());
    let part_len = std::fs::metadata(part_path(&dest)).expect("part kept").len();
    assert!(part_len > 0 && part_len <= cut_at as u64, "part {part_len}");
    assert_eq!(
        std::fs::read(part_path(&dest)).expect("read"),
        data[..part_len as usize]
    );

    let out = download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &no_retries(),
        &mut |_| {},
    )
    .await
    .expect("resume");
    assert_eq!(out.resumed_from, part_len);
    assert_eq!(std::fs::read(&dest).expect("read"), data);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].range, None);
    assert_eq!(seen[1].range, Some(format!("bytes={part_len}-")));
    assert!(!part_path(&dest).exists());
}

#[tokio::test]
async fn automatic_retry_resumes_after_cuts() {
    let (server, data) = server_with_file().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("disk.img");
    server.set(Behaviour {
        cut_next: 2,
        cut_at: 700_000,
        ..Behaviour::default()
    });
    let out = download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &DownloadOptions::default(),
        &mut |_| {},
    )
    .await
    .expect("download with retries");
    assert_eq!(out.attempts, 3);
    assert_eq!(std::fs::read(&dest).expect("read"), data);
    let ranges: Vec<_> = server.seen().into_iter().map(|s| s.range).collect();
    assert_eq!(ranges.len(), 3);
    assert_eq!(ranges[0], None);
    assert!(ranges[1].as_deref().is_some_and(|r| r.starts_with("bytes=")));
    assert!(ranges[2].as_deref().is_some_and(|r| r.starts_with("bytes=")));
}

#[tokio::test]
async fn server_ignoring_range_restarts_cleanly() {
    let (server, data) = server_with_file().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("disk.img");
    // A stale part file with wrong bytes: the server ignores our range, so it must be dropped.
    std::fs::write(part_path(&dest), vec![0xee; 4096]).expect("part");
    server.set(Behaviour {
        ignore_range: true,
        ..Behaviour::default()
    });
    download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &no_retries(),
        &mut |_| {},
    )
    .await
    .expect("download");
    assert_eq!(std::fs::read(&dest).expect("read"), data);
    assert_eq!(server.seen()[0].range.as_deref(), Some("bytes=4096-"));
}

#[tokio::test]
async fn server_errors_and_limits_are_reported() {
    let (server, data) = server_with_file().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("disk.img");
    server.set(Behaviour {
        status: Some(500),
        ..Behaviour::default()
    });
    let err = download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &DownloadOptions::default(),
        &mut |_| {},
    )
    .await;
    match err {
        Err(DownloadError::Status { status, .. }) => assert_eq!(status.as_u16(), 500),
        other => panic!("expected 500, got {other:?}"),
    }
    assert!(!dest.exists());
    // Errors are not retried: exactly one request.
    assert_eq!(server.seen().len(), 1);

    server.set(Behaviour::default());
    let err = download_verified(
        &server.url("/missing.img"),
        &dest,
        &sha256(&data),
        &DownloadOptions::default(),
        &mut |_| {},
    )
    .await;
    assert!(
        matches!(&err, Err(DownloadError::Status { status, .. }) if status.as_u16() == 404),
        "{err:?}"
    );

    let small = DownloadOptions {
        max_bytes: 1 << 20,
        ..DownloadOptions::default()
    };
    let err = download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &small,
        &mut |_| {},
    )
    .await;
    assert!(matches!(err, Err(DownloadError::TooLarge { .. })), "{err:?}");
    assert!(!dest.exists());
    assert!(!part_path(&dest).exists());

    // Nothing listens here any more once the server is gone: a request error, not a hang.
    let url = server.url("/disk.img");
    drop(server);
    let err = download_verified(&url, &dest, &sha256(&data), &no_retries(), &mut |_| {}).await;
    assert!(err.is_err());
}

#[tokio::test]
async fn concurrent_download_of_the_same_destination_is_refused() {
    let (server, data) = server_with_file().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("disk.img");
    // Another downloader holds the part file's lock.
    let holder = std::fs::File::create(part_path(&dest)).expect("part");
    rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).expect("lock");
    let err = download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &no_retries(),
        &mut |_| {},
    )
    .await;
    assert!(matches!(err, Err(DownloadError::InProgress { .. })), "{err:?}");
    assert!(server.seen().is_empty(), "a request was made");
    drop(holder);
    download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &no_retries(),
        &mut |_| {},
    )
    .await
    .expect("download after the lock is released");
    assert_eq!(std::fs::read(&dest).expect("read"), data);
}

#[tokio::test]
async fn stalled_transfer_times_out_and_resumes() {
    let (server, data) = server_with_file().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("disk.img");
    server.set(Behaviour {
        cut_next: 1,
        cut_at: 500_000,
        stall: true,
        ..Behaviour::default()
    });
    let client = vm_rs::storage::download::HttpClient::builder()
        .read_timeout(std::time::Duration::from_millis(500))
        .build()
        .expect("client");
    let opts = DownloadOptions {
        client: Some(client),
        ..DownloadOptions::default()
    };
    let t0 = std::time::Instant::now();
    let out = download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &opts,
        &mut |_| {},
    )
    .await
    .expect("download despite the stall");
    assert!(t0.elapsed() < std::time::Duration::from_secs(20), "hung");
    assert_eq!(out.attempts, 2);
    assert_eq!(std::fs::read(&dest).expect("read"), data);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].range.as_deref().is_some_and(|r| r.starts_with("bytes=")));
}

#[tokio::test]
async fn stale_part_from_other_content_is_discarded_and_download_restarts() {
    let (server, data) = server_with_file().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("disk.img");
    // Left over from an older version of the file: wrong bytes, resumable length.
    std::fs::write(part_path(&dest), vec![0xee; 4096]).expect("part");
    let out = download_verified(
        &server.url("/disk.img"),
        &dest,
        &sha256(&data),
        &no_retries(),
        &mut |_| {},
    )
    .await
    .expect("download");
    assert_eq!(std::fs::read(&dest).expect("read"), data);
    assert_eq!(out.resumed_from, 4096);
    let ranges: Vec<_> = server.seen().into_iter().map(|s| s.range).collect();
    assert_eq!(ranges, [Some("bytes=4096-".to_string()), None]);
}
