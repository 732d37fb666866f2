//! Pulling images from a registry into the store.
//!
//! ## Protocol
//! 1. Resolve the reference: `GET /v2/<repo>/manifests/<tag|digest>` (via `oci-client`, which
//!    handles the anonymous/basic/bearer token dance). The reply's digest is recomputed here;
//!    a digest-pinned reference must match it.
//! 2. An index / manifest list is resolved to one platform ([`PullOptions::platform`], default
//!    the host's) and that manifest is fetched by digest. Index and manifest are both stored.
//! 3. The config and the layers are fetched, several at once. Each blob is streamed to
//!    `ingest/<hex>.partial` while it is hashed; it enters `blobs/` only when its size and
//!    sha256 match the descriptor. A blob already in the store is not fetched again.
//! 4. A transfer that breaks (connection cut, short body, 5xx) is retried
//!    ([`PullOptions::retries`]). The partial file is kept: the retry re-hashes what is on disk
//!    and asks for the rest with `Range: bytes=<n>-`; a registry that answers `200` instead of
//!    `206` sends it all again. Bytes that do not match the digest are thrown away.
//! 5. Finally the reference is recorded in `refs.json`.
//!
//! Plain HTTP is used only for loopback registries and those listed in
//! [`PullOptions::insecure_registries`]; everything else is HTTPS (rustls, webpki roots plus
//! the CAs of [`PullOptions::registry_tls`], which also makes a loopback registry HTTPS).
//! Redirects (a registry sending blob GETs to a CDN or object store) are followed; the bytes
//! are verified against the descriptor's digest wherever they came from.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::RegistryOperation;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::{self, AuthError, Credentials};
use super::config::{ConfigError, ImageConfig};
use super::digest::{Digest, Hasher};
use super::manifest::{self, Descriptor, ImageManifest, Manifest, ManifestError};
use super::platform::Platform;
use super::reference::{is_loopback_host, ImageReference, ReferenceError};
use super::store::{io_err, ImageStore, RefRecord, StoreError};
use super::tls::{self, RegistryTls, TlsError};

/// A progress event, for progress bars.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PullProgress {
    /// The manifest is known: these blobs (config first, then layers) will be fetched.
    Resolved {
        /// Manifest digest.
        manifest: Digest,
        /// The blobs, config first.
        blobs: Vec<(Digest, u64)>,
    },
    /// A blob transfer (re)started at `offset`.
    Started {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
        /// Bytes already on disk from an earlier attempt.
        offset: u64,
    },
    /// Bytes of a blob on disk so far.
    Progress {
        /// The blob.
        digest: Digest,
        /// Bytes done.
        done: u64,
        /// Its size.
        size: u64,
    },
    /// A blob is verified and in the store.
    Done {
        /// The blob.
        digest: Digest,
        /// True when it was already stored and nothing was downloaded.
        cached: bool,
    },
}

/// Callback receiving [`PullProgress`] events.
pub type ProgressFn = Arc<dyn Fn(&PullProgress) + Send + Sync>;

/// How to pull.
#[derive(Clone)]
pub struct PullOptions {
    /// Platform to pick from an index. Default: the host's ([`Platform::host`]).
    pub platform: Option<Platform>,
    /// Credentials. Default `None`: look in the Docker config, else anonymous.
    pub credentials: Option<Credentials>,
    /// Docker config file to read credentials from. Default: `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json`.
    pub docker_config: Option<std::path::PathBuf>,
    /// Registries (`host:port`) reached over plain HTTP. Loopback registries are too, unless
    /// listed in [`registry_tls`](Self::registry_tls).
    pub insecure_registries: Vec<String>,
    /// Registries reached over HTTPS with extra trusted CAs (see [`super::tls`]). Default none.
    pub registry_tls: Vec<RegistryTls>,
    /// Blobs fetched at once. Default 4.
    pub max_concurrent_downloads: usize,
    /// Retries per blob (and for the manifest) after a transient failure. Default 3.
    pub retries: u32,
    /// First retry delay, doubled each time. Default 200 ms.
    pub retry_delay: Duration,
    /// Connect timeout. Default 30 s.
    pub connect_timeout: Duration,
    /// Read timeout (between bytes). Default 60 s.
    pub read_timeout: Duration,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            platform: None,
            credentials: None,
            docker_config: None,
            insecure_registries: Vec::new(),
            registry_tls: Vec::new(),
            max_concurrent_downloads: 4,
            retries: 3,
            retry_delay: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            progress: None,
        }
    }
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("platform", &self.platform)
            .field("credentials", &self.credentials)
            .field("docker_config", &self.docker_config)
            .field("insecure_registries", &self.insecure_registries)
            .field("registry_tls", &self.registry_tls)
            .field("max_concurrent_downloads", &self.max_concurrent_downloads)
            .field("retries", &self.retries)
            .field("progress", &self.progress.is_some())
            .finish_non_exhaustive()
    }
}

/// The result of a pull.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// What was recorded for the reference.
    pub record: RefRecord,
    /// The image manifest.
    pub manifest: ImageManifest,
    /// The image config.
    pub config: ImageConfig,
    /// Bytes downloaded in this pull (0 when everything was cached).
    pub downloaded_bytes: u64,
}

/// Why a blob transfer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The registry refused or failed the request.
    #[error("registry request failed")]
    Registry(#[source] OciDistributionError),
    /// The connection broke or the body ended early.
    #[error("transfer interrupted after {received} of {expected} bytes")]
    Interrupted {
        /// Bytes on disk.
        received: u64,
        /// Bytes expected.
        expected: u64,
        /// The I/O error, if the stream reported one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// More bytes arrived than the descriptor announced.
    #[error("registry sent more than the {expected} bytes announced")]
    TooLong {
        /// Bytes expected.
        expected: u64,
    },
    /// The bytes do not hash to the digest.
    #[error("content hashes to {actual}")]
    DigestMismatch {
        /// What the bytes hash to.
        actual: Digest,
    },
    /// Writing to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TransferError {
    /// What kind of failure this is (see [`crate::error`]): the registry misbehaved
    /// ([`Backend`](crate::ErrorKind::Backend)) unless the store failed.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            TransferError::Store(e) => e.kind(),
            _ => crate::ErrorKind::Backend,
        }
    }
}

impl TransferError {
    fn retryable(&self) -> bool {
        match self {
            Self::Registry(e) => retryable(e),
            Self::Interrupted { .. } | Self::TooLong { .. } | Self::DigestMismatch { .. } => true,
            Self::Store(_) => false,
        }
    }
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// The reference is invalid.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// Credentials could not be read.
    #[error("cannot get credentials")]
    Credentials(#[from] AuthError),
    /// The registry refused the credentials (or anonymous access).
    #[error("not authorized to pull {reference} from {registry}")]
    Unauthorized {
        /// The reference.
        reference: String,
        /// The registry.
        registry: String,
        /// What the client said.
        #[source]
        source: OciDistributionError,
    },
    /// The manifest could not be fetched.
    #[error("cannot fetch manifest of {reference}")]
    Manifest {
        /// The reference.
        reference: String,
        /// What the client said.
        #[source]
        source: OciDistributionError,
    },
    /// The manifest is not acceptable.
    #[error("invalid manifest {digest} for {reference}")]
    InvalidManifest {
        /// The reference.
        reference: String,
        /// The manifest digest.
        digest: Digest,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// The manifest bytes do not match the digest they were asked for.
    #[error("manifest of {reference} hashes to {actual}, expected {expected}")]
    ManifestDigestMismatch {
        /// The reference.
        reference: String,
        /// The digest asked for.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// The index has no manifest for the platform.
    #[error("{reference} has no image for {platform} (available: {})", available.join(", "))]
    NoMatchingPlatform {
        /// The reference.
        reference: String,
        /// The platform asked for.
        platform: Platform,
        /// The platforms in the index.
        available: Vec<String>,
    },
    /// An index points at another index.
    #[error("{reference}: nested image indexes are not supported")]
    NestedIndex {
        /// The reference.
        reference: String,
    },
    /// A blob could not be fetched.
    #[error("cannot fetch blob {digest} of {reference} (after {attempts} attempts)")]
    Blob {
        /// The reference.
        reference: String,
        /// The blob.
        digest: Digest,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: TransferError,
    },
    /// The config blob does not parse.
    #[error("invalid image config {digest}")]
    Config {
        /// The config blob.
        digest: Digest,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A CA certificate of [`PullOptions::registry_tls`] could not be used.
    #[error("cannot set up TLS for {registry}")]
    Tls {
        /// The registry.
        registry: String,
        /// Why.
        #[source]
        source: TlsError,
    },
    /// The HTTP client could not be built from the options.
    #[error("cannot set up the registry client")]
    Client {
        /// What the client said.
        #[source]
        source: OciDistributionError,
    },
}

impl PullError {
    /// What kind of failure this is, looking through to the cause (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            PullError::Reference(e) => e.kind(),
            PullError::Credentials(e) => e.kind(),
            PullError::NoMatchingPlatform { .. } => K::NotFound,
            PullError::NestedIndex { .. } => K::Unsupported,
            PullError::Unauthorized { .. }
            | PullError::Manifest { .. }
            | PullError::InvalidManifest { .. }
            | PullError::ManifestDigestMismatch { .. }
            | PullError::Config { .. } => K::Backend,
            PullError::Blob { source, .. } => source.kind(),
            PullError::Store(e) => e.kind(),
            PullError::Tls { .. } => K::Invalid,
            PullError::Client { .. } => K::Other,
        }
    }
}

fn retryable(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429 || *code == 408,
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

fn is_auth_error(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => {
            true
        }
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                oci_client::errors::OciErrorCode::Unauthorized | oci_client::errors::OciErrorCode::Denied
            )
        }),
        OciDistributionError::ServerError { code, .. } => *code == 401 || *code == 403,
        _ => false,
    }
}

struct Ctx<'a> {
    store: &'a ImageStore,
    client: oci_client::Client,
    reference: &'a ImageReference,
    opts: &'a PullOptions,
}

impl Ctx<'_> {
    fn emit(&self, ev: PullProgress) {
        if let Some(p) = &self.opts.progress {
            p(&ev);
        }
    }

    fn manifest_err(&self, source: OciDistributionError) -> PullError {
        if is_auth_error(&source) {
            PullError::Unauthorized {
                reference: self.reference.canonical(),
                registry: self.reference.registry().to_owned(),
                source,
            }
        } else {
            PullError::Manifest {
                reference: self.reference.canonical(),
                source,
            }
        }
    }

    /// Fetches a manifest (by the reference or by digest), with retries; verifies the digest.
    async fn fetch_manifest(
        &self,
        reference: &ImageReference,
        auth: &oci_client::secrets::RegistryAuth,
        expected: Option<&Digest>,
    ) -> Result<(bytes::Bytes, Digest), PullError> {
        let mut attempt = 0;
        let (bytes, _) = loop {
            match self
                .client
                .pull_manifest_raw(reference.as_oci(), auth, manifest::ACCEPTED)
                .await
            {
                Ok(v) => break v,
                Err(e) if retryable(&e) && attempt < self.opts.retries => {
                    tokio::time::sleep(self.opts.retry_delay * 2u32.pow(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(self.manifest_err(e)),
            }
        };
        let actual = Digest::of(&bytes);
        if let Some(expected) = expected {
            if &actual != expected {
                return Err(PullError::ManifestDigestMismatch {
                    reference: self.reference.canonical(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok((bytes, actual))
    }

    /// Makes sure `desc` is in the store; returns the bytes downloaded.
    async fn fetch_blob(&self, desc: &Descriptor) -> Result<u64, PullError> {
        let digest = &desc.digest;
        if self.store.has_blob(digest) {
            self.emit(PullProgress::Done {
                digest: digest.clone(),
                cached: true,
            });
            return Ok(0);
        }
        let _lock = self.store.lock_blob(digest).await?;
        if self.store.has_blob(digest) {
            self.emit(PullProgress::Done {
                digest: digest.clone(),
                cached: true,
            });
            return Ok(0);
        }
        let mut attempt = 0u32;
        let mut downloaded = 0u64;
        loop {
            match self.try_fetch_blob(desc, &mut downloaded).await {
                Ok(()) => {
                    let store = self.store.clone();
                    let d = digest.clone();
                    tokio::task::spawn_blocking(move || store.commit_partial(&d))
                        .await
                        .map_err(StoreError::Task)??;
                    self.emit(PullProgress::Done {
                        digest: digest.clone(),
                        cached: false,
                    });
                    return Ok(downloaded);
                }
                Err(e) if e.retryable() && attempt < self.opts.retries => {
                    tracing::warn!(digest = %digest, attempt, error = %e, "blob transfer failed, retrying");
                    tokio::time::sleep(self.opts.retry_delay * 2u32.pow(attempt)).await;
                    attempt += 1;
                }
                Err(source) => {
                    return Err(PullError::Blob {
                        reference: self.reference.canonical(),
                        digest: digest.clone(),
                        attempts: attempt + 1,
                        source,
                    })
                }
            }
        }
    }

    /// One attempt: resume the partial file, stream the rest, verify size and digest.
    async fn try_fetch_blob(&self, desc: &Descriptor, downloaded: &mut u64) -> Result<(), TransferError> {
        let digest = &desc.digest;
        let size = desc.size;
        let partial = self.store.partial_path(digest);
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(crate::paths::PRIVATE_FILE_MODE)
            .open(&partial)
            .await
            .map_err(io_err("open", &partial))?;
        // Re-hash what an earlier attempt left on disk.
        let mut hasher = Hasher::new();
        let mut on_disk = file.metadata().await.map_err(io_err("stat", &partial))?.len();
        if on_disk > size {
            file.set_len(0).await.map_err(io_err("truncate", &partial))?;
            on_disk = 0;
        }
        if on_disk > 0 {
            let mut buf = vec![0u8; 1 << 20];
            let mut left = on_disk;
            while left > 0 {
                let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                let n = file
                    .read(&mut buf[..want])
                    .await
                    .map_err(io_err("read", &partial))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
            on_disk = hasher.len();
        }
        let discard = |hex_mismatch: TransferError| async {
            let _ = tokio::fs::remove_file(&partial).await;
            hex_mismatch
        };
        if on_disk == size && size > 0 {
            let actual = hasher.clone().finish();
            if &actual == digest {
                return Ok(());
            }
            return Err(discard(TransferError::DigestMismatch { actual }).await);
        }
        self.emit(PullProgress::Started {
            digest: digest.clone(),
            size,
            offset: on_disk,
        });
        let digest_str = digest.to_string();
        let reply = self
            .client
            .pull_blob_stream_partial(self.reference.as_oci(), digest_str.as_str(), on_disk, None)
            .await
            .map_err(TransferError::Registry)?;
        let mut stream = match reply {
            BlobResponse::Partial(s) => s,
            BlobResponse::Full(s) => {
                // No range support (or we asked from 0): start over.
                if on_disk > 0 {
                    file.set_len(0).await.map_err(io_err("truncate", &partial))?;
                    hasher = Hasher::new();
                    on_disk = 0;
                }
                s
            }
        };
        use std::io::SeekFrom;
        use tokio::io::AsyncSeekExt;
        file.seek(SeekFrom::Start(on_disk))
            .await
            .map_err(io_err("seek", &partial))?;
        // A second handle to start writeback early (see `start_writeback`).
        let writeback_fd = std::os::fd::AsFd::as_fd(&file)
            .try_clone_to_owned()
            .ok()
            .map(Arc::new);
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut done = on_disk;
        let mut last_report = done;
        let mut last_kick = done;
        let result = loop {
            match stream.stream.next().await {
                None => break Ok(()),
                Some(Err(e)) => break Err(Some(e)),
                Some(Ok(chunk)) => {
                    if done + chunk.len() as u64 > size {
                        drop(out);
                        return Err(discard(TransferError::TooLong { expected: size }).await);
                    }
                    hasher.update(&chunk);
                    out.write_all(&chunk).await.map_err(io_err("write", &partial))?;
                    done += chunk.len() as u64;
                    *downloaded += chunk.len() as u64;
                    if done - last_kick >= WRITEBACK_STEP {
                        if let Some(fd) = &writeback_fd {
                            start_writeback(fd.clone(), last_kick, done - last_kick);
                        }
                        last_kick = done;
                    }
                    if done - last_report >= 256 << 10 {
                        last_report = done;
                        self.emit(PullProgress::Progress {
                            digest: digest.clone(),
                            done,
                            size,
                        });
                    }
                }
            }
        };
        // Keep what arrived, for the next attempt.
        out.flush().await.map_err(io_err("write", &partial))?;
        drop(out);
        self.emit(PullProgress::Progress {
            digest: digest.clone(),
            done,
            size,
        });
        if let Err(source) = result {
            return Err(TransferError::Interrupted {
                received: done,
                expected: size,
                source,
            });
        }
        if done < size {
            return Err(TransferError::Interrupted {
                received: done,
                expected: size,
                source: None,
            });
        }
        let actual = hasher.finish();
        if &actual != digest {
            return Err(discard(TransferError::DigestMismatch { actual }).await);
        }
        Ok(())
    }
}

/// Bytes between two writeback kicks.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Asks the kernel to start writing `len` bytes at `offset` to disk now
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the fsync before a blob is committed finds
/// little left to do and disk writes overlap with the download. Best effort, off the runtime.
fn start_writeback(fd: Arc<std::os::fd::OwnedFd>, offset: u64, len: u64) {
    drop(tokio::task::spawn_blocking(move || {
        use std::os::fd::AsFd;
        crate::host::fs::start_writeback(fd.as_fd(), offset, len);
    }));
}

impl ImageStore {
    /// Pulls `reference` into the store and records it. See the module docs for the protocol.
    pub async fn pull(&self, reference: &str, opts: &PullOptions) -> Result<PulledImage, PullError> {
        let image = ImageReference::parse(reference)?;
        let _store_lock = self.lock_store(false).await?;

        let credentials = match &opts.credentials {
            Some(c) => c.clone(),
            None => {
                let found = match &opts.docker_config {
                    Some(path) => auth::docker_credentials_from(path, image.registry()).await?,
                    None => auth::docker_credentials(image.registry()).await?,
                };
                found.unwrap_or_default()
            }
        };
        let registry_auth = credentials.to_oci();

        let registries = [image.registry(), image.resolved_registry()];
        let mut plain = Vec::new();
        for host in registries {
            let insecure = opts.insecure_registries.iter().any(|r| r == host);
            if insecure || (is_loopback_host(host) && !tls::wants_tls(&opts.registry_tls, host)) {
                plain.push(host.to_owned());
            }
        }
        let extra_root_certificates =
            tls::extra_roots(&opts.registry_tls, &registries).map_err(|source| PullError::Tls {
                registry: image.registry().to_owned(),
                source,
            })?;
        let client = oci_client::Client::try_from(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            platform_resolver: None,
            connect_timeout: Some(opts.connect_timeout),
            read_timeout: Some(opts.read_timeout),
            max_concurrent_download: opts.max_concurrent_downloads.max(1),
            extra_root_certificates,
            ..ClientConfig::default()
        })
        .map_err(|source| PullError::Client { source })?;
        let ctx = Ctx {
            store: self,
            client,
            reference: &image,
            opts,
        };
        // Authenticate up front so a bad password is reported as such.
        if let Err(e) = ctx
            .client
            .auth(image.as_oci(), &registry_auth, RegistryOperation::Pull)
            .await
        {
            if is_auth_error(&e) {
                return Err(ctx.manifest_err(e));
            }
            tracing::debug!(error = %e, "registry auth probe failed; continuing");
        }

        let (bytes, digest) = ctx
            .fetch_manifest(&image, &registry_auth, image.digest().as_ref())
            .await?;
        let parsed = manifest::parse(&bytes, None).map_err(|source| PullError::InvalidManifest {
            reference: image.canonical(),
            digest: digest.clone(),
            source,
        })?;
        let want = opts.platform.clone().unwrap_or_else(Platform::host);
        let (index, manifest_digest, manifest, platform, manifest_len) = match parsed {
            Manifest::Image(m) => {
                self.put_bytes(&digest, bytes.clone()).await?;
                (None, digest, m, None, bytes.len() as u64)
            }
            Manifest::Index { manifests, .. } => {
                let Some(entry) = manifest::select_platform(&manifests, &want) else {
                    return Err(PullError::NoMatchingPlatform {
                        reference: image.canonical(),
                        platform: want,
                        available: manifests
                            .iter()
                            .filter_map(|m| m.platform.as_ref().map(ToString::to_string))
                            .collect(),
                    });
                };
                let child_ref = image.with_digest(&entry.digest);
                let (child, child_digest) = ctx
                    .fetch_manifest(&child_ref, &registry_auth, Some(&entry.digest))
                    .await?;
                let m = match manifest::parse(&child, Some(&entry.media_type)) {
                    Ok(Manifest::Image(m)) => m,
                    Ok(Manifest::Index { .. }) => {
                        return Err(PullError::NestedIndex {
                            reference: image.canonical(),
                        })
                    }
                    Err(source) => {
                        return Err(PullError::InvalidManifest {
                            reference: image.canonical(),
                            digest: child_digest,
                            source,
                        })
                    }
                };
                self.put_bytes(&digest, bytes.clone()).await?;
                self.put_bytes(&child_digest, child.clone()).await?;
                (
                    Some(digest),
                    child_digest,
                    m,
                    entry.platform.clone(),
                    child.len() as u64,
                )
            }
        };

        let mut blobs = vec![manifest.config.clone()];
        blobs.extend(manifest.layers.iter().cloned());
        ctx.emit(PullProgress::Resolved {
            manifest: manifest_digest.clone(),
            blobs: blobs.iter().map(|b| (b.digest.clone(), b.size)).collect(),
        });
        // The config first: it is small and says which platform a single manifest is for.
        let mut downloaded = ctx.fetch_blob(&manifest.config).await?;
        let config_bytes = self.read_blob(&manifest.config.digest).await?;
        let config = ImageConfig::parse(&config_bytes).map_err(|source| PullError::Config {
            digest: manifest.config.digest.clone(),
            source,
        })?;
        let image_platform = Platform {
            os: config.os.clone(),
            architecture: config.architecture.clone(),
            variant: config.variant.clone(),
        };
        if index.is_none() && !config.os.is_empty() && !want.matches(&image_platform) {
            if opts.platform.is_some() {
                return Err(PullError::NoMatchingPlatform {
                    reference: image.canonical(),
                    platform: want,
                    available: vec![image_platform.to_string()],
                });
            }
            tracing::warn!(image = %image, platform = %image_platform, "image is for another platform than this host");
        }
        // The same layer can appear twice in one manifest; fetch it once.
        let mut unique = manifest.layers.clone();
        unique.sort_by(|a, b| a.digest.cmp(&b.digest));
        unique.dedup_by(|a, b| a.digest == b.digest);
        downloaded += futures::stream::iter(unique.iter().map(|d| ctx.fetch_blob(d)))
            .buffer_unordered(opts.max_concurrent_downloads.max(1))
            .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
            .await?;

        let platform = platform.or_else(|| {
            (!config.os.is_empty()).then(|| Platform {
                os: config.os.clone(),
                architecture: config.architecture.clone(),
                variant: config.variant.clone(),
            })
        });
        let record = RefRecord {
            reference: image.canonical(),
            manifest: manifest_digest,
            index,
            platform,
            size: manifest_len + blobs.iter().map(|b| b.size).sum::<u64>(),
            pulled_at: 0,
        };
        self.set_ref(record.clone()).await?;
        let record = self.resolve(&record.reference).await?;
        Ok(PulledImage {
            record,
            manifest,
            config,
            downloaded_bytes: downloaded,
        })
    }
}
