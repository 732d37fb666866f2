//! Verified downloads of guest assets and base images.
//!
//! [`download_verified`] streams an HTTP(S) body into `DEST.part`, hashing with SHA-256 as
//! bytes arrive, and publishes it as `DEST` (fsync → rename) only when the digest matches the
//! expected one. Protocol details:
//!
//! * **Resume**: an existing `DEST.part` is re-hashed and the request carries
//!   `Range: bytes=N-`. A `206` whose `Content-Range` starts at `N` is appended; a `200` means
//!   the server ignored the range, so the part is truncated and the download starts over; a
//!   `416` means nothing is left to fetch, so the part is checked as it is.
//! * **Retries**: a transfer error (connection cut, timeout) keeps the part file and retries
//!   with a range, up to [`DownloadOptions::retries`] times. HTTP error statuses are not retried.
//! * **Mismatch**: if a *resumed* download does not verify (the part held bytes of another
//!   version of the file), it starts over once from byte 0. A wrong digest otherwise deletes
//!   the part and fails with [`DownloadError::ChecksumMismatch`]; nothing ever appears under
//!   `DEST`.
//! * **Bounds**: bodies larger than [`DownloadOptions::max_bytes`] (or than their own
//!   `Content-Length`) are cut off with an error.
//! * **Concurrency**: the part file is `flock`ed (and re-checked to still be the file at that
//!   path once locked); a second downloader of the same destination fails fast with
//!   [`DownloadError::InProgress`].

use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// The HTTP client downloads use (re-exported so callers need no `reqwest` dependency).
pub type HttpClient = reqwest::Client;

/// Errors from a verified download.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DownloadError {
    /// The expected digest is not 64 hex characters.
    #[error("invalid sha256 digest {digest:?}")]
    BadDigest {
        /// The rejected digest.
        digest: String,
    },
    /// The request could not be sent or the response head not read.
    #[error("request to {url}")]
    Request {
        /// The URL.
        url: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("{url} answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
    },
    /// The body stopped before it was complete (after all retries). The part file is kept
    /// for a later resume.
    #[error("transfer from {url} failed after {received} bytes")]
    Transfer {
        /// The URL.
        url: String,
        /// Bytes in the part file.
        received: u64,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The body ended before its announced length.
    #[error("{url} ended after {received} of {expected} bytes")]
    Truncated {
        /// The URL.
        url: String,
        /// Bytes received in total.
        received: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// The body is larger than allowed.
    #[error("{url} is larger than {limit} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit that was hit.
        limit: u64,
    },
    /// The server sent a `Content-Range` that does not continue the part file.
    #[error("{url} sent an unexpected content range {range:?} (wanted bytes {wanted}-)")]
    BadRange {
        /// The URL.
        url: String,
        /// The header value.
        range: String,
        /// The offset that was requested.
        wanted: u64,
    },
    /// The downloaded bytes do not have the expected digest; the file was deleted.
    #[error("sha256 mismatch for {url}: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// The URL.
        url: String,
        /// Expected digest.
        expected: String,
        /// Digest of what arrived.
        actual: String,
    },
    /// Another download of the same destination is running.
    #[error("another download to {path} is in progress")]
    InProgress {
        /// The part file.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl DownloadError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            DownloadError::BadDigest { .. } => K::Invalid,
            DownloadError::Status { status, .. } if *status == reqwest::StatusCode::NOT_FOUND => K::NotFound,
            DownloadError::Request { source, .. } | DownloadError::Transfer { source, .. }
                if source.is_timeout() =>
            {
                K::Timeout
            }
            DownloadError::Request { .. }
            | DownloadError::Status { .. }
            | DownloadError::Transfer { .. }
            | DownloadError::Truncated { .. }
            | DownloadError::TooLarge { .. }
            | DownloadError::BadRange { .. }
            | DownloadError::ChecksumMismatch { .. } => K::Backend,
            DownloadError::InProgress { .. } => K::Conflict,
            DownloadError::Io { source, .. } => K::of_io(source),
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError {
    let path = path.to_path_buf();
    move |source| DownloadError::Io { op, path, source }
}

/// Progress of one download, passed to the progress callback after every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes in the part file so far (including resumed bytes).
    pub downloaded: u64,
    /// Total size, when the server announced it.
    pub total: Option<u64>,
    /// Bytes that were already present when this attempt started.
    pub resumed_from: u64,
}

/// Knobs for [`download_verified`].
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Extra attempts after a transfer error, each resuming from the part file (default 3).
    pub retries: u32,
    /// Largest body accepted (default 64 GiB).
    pub max_bytes: u64,
    /// HTTP client to use (default: [`default_client`]).
    pub client: Option<reqwest::Client>,
}

/// Connect timeout of [`default_client`].
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest a [`default_client`] transfer may sit without receiving a byte before it counts
/// as interrupted (and is resumed).
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A client with [`CONNECT_TIMEOUT`] and [`READ_TIMEOUT`], so a stalled server ends in a retry
/// instead of a hang. No overall timeout: big images take as long as they take.
pub fn default_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .build()
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot build HTTP client with timeouts, using defaults");
            reqwest::Client::new()
        })
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            retries: 3,
            max_bytes: 64 << 30,
            client: None,
        }
    }
}

/// What [`download_verified`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DownloadOutcome {
    /// The verified file.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Its SHA-256 (lower-case hex).
    pub sha256: String,
    /// The destination already held the right bytes; nothing was fetched.
    pub already_present: bool,
    /// Bytes reused from an earlier partial download (first attempt).
    pub resumed_from: u64,
    /// Transfer attempts made (0 when already present).
    pub attempts: u32,
}

/// Parse a lower/upper-case 64-character hex SHA-256 into its canonical lower-case form.
pub fn normalize_sha256(digest: &str) -> Result<String, DownloadError> {
    let d = digest.trim();
    let d = d.strip_prefix("sha256:").unwrap_or(d);
    if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DownloadError::BadDigest {
            digest: digest.chars().take(100).collect(),
        });
    }
    Ok(d.to_ascii_lowercase())
}

/// `DEST.part`.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// Hash a file (async, streaming).
async fn hash_file(path: &Path) -> Result<(Sha256, u64), DownloadError> {
    let mut f = tokio::fs::File::open(path).await.map_err(io_err("open", path))?;
    hash_from(&mut f, path).await
}

async fn hash_from(f: &mut tokio::fs::File, path: &Path) -> Result<(Sha256, u64), DownloadError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf).await.map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((h, n_total))
}

/// `Some(outcome)` when `dest` exists with the expected digest.
async fn already_there(dest: &Path, expected: &str) -> Result<Option<DownloadOutcome>, DownloadError> {
    if !tokio::fs::try_exists(dest).await.unwrap_or(false) {
        return Ok(None);
    }
    let (h, size) = hash_file(dest).await?;
    if hex::encode(h.finalize()) != expected {
        tracing::info!(path = %dest.display(), "existing file has the wrong digest, downloading again");
        return Ok(None);
    }
    Ok(Some(DownloadOutcome {
        path: dest.to_path_buf(),
        size,
        sha256: expected.to_string(),
        already_present: true,
        resumed_from: 0,
        attempts: 0,
    }))
}

/// Download `url` to `dest`, verifying its SHA-256 against `expected_sha256` (hex, optionally
/// `sha256:`-prefixed). If `dest` already has that digest nothing is fetched. See the module
/// docs for resume, retry and failure behaviour.
pub async fn download_verified(
    url: &str,
    dest: &Path,
    expected_sha256: &str,
    options: &DownloadOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<DownloadOutcome, DownloadError> {
    let expected = normalize_sha256(expected_sha256)?;
    let part = part_path(dest);
    // Lock the part file. A downloader that finishes renames its part away while we may be
    // waiting on it, so after locking check that the path still names the inode we locked; if
    // not, start over (and most likely find the finished file).
    let mut tries = 0;
    let std_file = loop {
        tries += 1;
        if let Some(done) = already_there(dest, &expected).await? {
            return Ok(done);
        }
        if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io_err("create directory", dir))?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(io_err("open", &part))?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(DownloadError::InProgress { path: part }),
            Err(e) => return Err(io_err("lock", &part)(e.into())),
        }
        use std::os::unix::fs::MetadataExt;
        let locked = f.metadata().map_err(io_err("stat", &part))?;
        match std::fs::metadata(&part) {
            Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => break f,
            _ if tries < 3 => continue,
            _ => return Err(DownloadError::InProgress { path: part }),
        }
    };
    let mut file = tokio::fs::File::from_std(std_file);
    let client = match &options.client {
        Some(c) => c.clone(),
        None => default_client(),
    };

    // Seed the hash with what an earlier attempt left.
    let (mut hasher, mut have) = hash_from(&mut file, &part).await?;
    let first_resume = have;
    let mut attempts = 0u32;
    // A part file left by an earlier run may hold bytes from another file (the URL's content
    // changed): if the resumed result does not verify, start over once without it.
    let mut restarted = false;
    let actual = loop {
        let total = loop {
            attempts += 1;
            match fetch_into(
                &client,
                url,
                &mut file,
                &part,
                &mut hasher,
                &mut have,
                options,
                progress,
            )
            .await
            {
                Ok(total) => break total,
                Err(FetchError::Retryable { source, .. }) if attempts <= options.retries => {
                    tracing::warn!(%url, received = have, attempt = attempts, error = %source, "transfer interrupted, resuming");
                    continue;
                }
                Err(FetchError::Retryable { source, in_body }) => {
                    file.sync_all().await.map_err(io_err("sync", &part))?;
                    return Err(if in_body {
                        DownloadError::Transfer {
                            url: url.to_string(),
                            received: have,
                            source,
                        }
                    } else {
                        DownloadError::Request {
                            url: url.to_string(),
                            source,
                        }
                    });
                }
                Err(FetchError::Fatal(e)) => {
                    if matches!(e, DownloadError::TooLarge { .. }) {
                        // Oversized bodies are not worth resuming.
                        drop(file);
                        let _ = tokio::fs::remove_file(&part).await;
                    } else {
                        let _ = file.sync_all().await;
                    }
                    return Err(e);
                }
            }
        };
        if let Some(t) = total {
            if have != t {
                return Err(DownloadError::Truncated {
                    url: url.to_string(),
                    received: have,
                    expected: t,
                });
            }
        }
        let actual = hex::encode(hasher.finalize_reset());
        if actual == expected {
            break actual;
        }
        if first_resume > 0 && !restarted {
            tracing::warn!(%url, "resumed download does not verify, starting over");
            restarted = true;
            file.set_len(0).await.map_err(io_err("truncate", &part))?;
            have = 0;
            continue;
        }
        drop(file);
        let _ = tokio::fs::remove_file(&part).await;
        return Err(DownloadError::ChecksumMismatch {
            url: url.to_string(),
            expected,
            actual,
        });
    };
    file.sync_all().await.map_err(io_err("sync", &part))?;
    drop(file);
    tokio::fs::rename(&part, dest)
        .await
        .map_err(io_err("publish", dest))?;
    let dir = super::fsutil::parent_dir(dest);
    tokio::task::spawn_blocking(move || super::fsutil::fsync_dir(&dir))
        .await
        .map_err(|e| io_err("sync directory of", dest)(std::io::Error::other(e)))?
        .map_err(io_err("sync directory of", dest))?;
    Ok(DownloadOutcome {
        path: dest.to_path_buf(),
        size: have,
        sha256: actual,
        already_present: false,
        resumed_from: first_resume,
        attempts,
    })
}

enum FetchError {
    /// Worth another attempt; `in_body` says whether the response had started.
    Retryable {
        source: reqwest::Error,
        in_body: bool,
    },
    Fatal(DownloadError),
}

impl From<DownloadError> for FetchError {
    fn from(e: DownloadError) -> Self {
        FetchError::Fatal(e)
    }
}

/// `Content-Range: bytes START-END/TOTAL` → (START, TOTAL).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, total))
}

/// One request: append the (rest of the) body to `file`. Returns the full size if known.
#[allow(clippy::too_many_arguments)]
async fn fetch_into(
    client: &reqwest::Client,
    url: &str,
    file: &mut tokio::fs::File,
    part: &Path,
    hasher: &mut Sha256,
    have: &mut u64,
    options: &DownloadOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Option<u64>, FetchError> {
    let mut req = client.get(url);
    if *have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={}-", *have));
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(source) if source.is_connect() || source.is_timeout() || source.is_request() => {
            return Err(FetchError::Retryable {
                source,
                in_body: false,
            })
        }
        Err(source) => {
            return Err(DownloadError::Request {
                url: url.to_string(),
                source,
            }
            .into())
        }
    };
    let status = resp.status();
    let total = if status == reqwest::StatusCode::PARTIAL_CONTENT && *have > 0 {
        let header = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        match parse_content_range(&header) {
            Some((start, total)) if start == *have => total,
            _ => {
                return Err(DownloadError::BadRange {
                    url: url.to_string(),
                    range: header,
                    wanted: *have,
                }
                .into())
            }
        }
    } else if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && *have > 0 {
        // Nothing past what we have: the part may be complete; the digest decides.
        return Ok(None);
    } else if status.is_success() {
        if *have > 0 {
            tracing::info!(%url, "server ignored the range request, starting over");
            file.set_len(0).await.map_err(io_err("truncate", part))?;
            *hasher = Sha256::new();
            *have = 0;
        }
        resp.content_length()
    } else {
        return Err(DownloadError::Status {
            url: url.to_string(),
            status,
        }
        .into());
    };
    let limit = total.unwrap_or(options.max_bytes).min(options.max_bytes);
    if total.is_some_and(|t| t > options.max_bytes) {
        return Err(DownloadError::TooLarge {
            url: url.to_string(),
            limit: options.max_bytes,
        }
        .into());
    }
    file.seek(std::io::SeekFrom::Start(*have))
        .await
        .map_err(io_err("seek", part))?;
    let resumed_from = *have;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                file.flush().await.map_err(io_err("write", part))?;
                return Err(FetchError::Retryable {
                    source: e,
                    in_body: true,
                });
            }
        };
        if *have + chunk.len() as u64 > limit {
            return Err(DownloadError::TooLarge {
                url: url.to_string(),
                limit,
            }
            .into());
        }
        file.write_all(&chunk).await.map_err(io_err("write", part))?;
        hasher.update(&chunk);
        *have += chunk.len() as u64;
        progress(Progress {
            downloaded: *have,
            total,
            resumed_from,
        });
    }
    file.flush().await.map_err(io_err("write", part))?;
    Ok(total)
}

/// Fetch a small text document (e.g. a `SHA256SUMS` file), at most `max` bytes.
pub async fn fetch_text(client: &reqwest::Client, url: &str, max: u64) -> Result<String, DownloadError> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|source| DownloadError::Request {
            url: url.to_string(),
            source,
        })?;
    if !resp.status().is_success() {
        return Err(DownloadError::Status {
            url: url.to_string(),
            status: resp.status(),
        });
    }
    let mut body = resp.bytes_stream();
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| DownloadError::Transfer {
            url: url.to_string(),
            received: out.len() as u64,
            source,
        })?;
        if out.len() as u64 + chunk.len() as u64 > max {
            return Err(DownloadError::TooLarge {
                url: url.to_string(),
                limit: max,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_normalize() {
        let d = "AB".repeat(32);
        assert_eq!(normalize_sha256(&d).expect("ok"), "ab".repeat(32));
        assert_eq!(
            normalize_sha256(&format!("sha256:{d}")).expect("ok"),
            "ab".repeat(32)
        );
        assert!(normalize_sha256("abc").is_err());
        assert!(normalize_sha256(&"g".repeat(64)).is_err());
    }

    proptest::proptest! {
        // Untrusted header: never panics, and a parsed start always comes from the text.
        #[test]
        fn content_range_never_panics(v in ".{0,64}") {
            if let Some((start, _)) = parse_content_range(&v) {
                proptest::prop_assert!(v.contains(&start.to_string()));
            }
        }

        #[test]
        fn content_range_round_trips(start in 0u64..u64::MAX / 2, len in 1u64..1 << 40) {
            let header = format!("bytes {start}-{}/{}", start + len - 1, start + len);
            proptest::prop_assert_eq!(parse_content_range(&header), Some((start, Some(start + len))));
        }
    }

    #[test]
    fn content_range_parses() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range("bytes x-2/3"), None);
    }
}
