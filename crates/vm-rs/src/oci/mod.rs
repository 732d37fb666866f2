//! OCI images: pull from any registry into a content-addressed store, unpack layers safely.
//!
//! This module owns everything about images on the host side:
//!
//! * [`reference`](mod@reference) — parsing and normalising image references ([`ImageReference`]).
//! * [`pull`] — the registry client side ([`ImageStore::pull`], [`PullOptions`]): manifest and
//!   index resolution, per-platform selection, concurrent digest-verified blob downloads with
//!   resume, credentials ([`auth`]).
//! * [`store`] — the on-disk store ([`ImageStore`]): blobs by digest, references, gc, locks.
//! * [`unpack`] — applying layers to a directory with OCI whiteouts and strict confinement
//!   ([`ImageStore::unpack`], [`UnpackOptions`]).
//! * [`config`] — the image's run configuration ([`ImageConfig`]: entrypoint, cmd, env, ...).
//! * [`tls`] — which registries speak HTTPS and the extra CAs they are trusted under.
//! * [`manifest`], [`digest`], [`platform`] — the data types in between.
//!
//! The store lives in `vm_rs::paths::data_dir()/images` ([`ImageStore::open_default`]).
//!
//! ## Example: run-ready rootfs from an image
//!
//! ```no_run
//! use vm_rs::oci::{ImageStore, PullOptions, UnpackOptions};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = ImageStore::open_default().await?;
//! let pulled = store.pull("alpine:3.20", &PullOptions::default()).await?;
//! println!("pulled {} ({})", pulled.record.reference, pulled.record.manifest);
//! store.unpack("alpine:3.20", "/tmp/rootfs".as_ref(), &UnpackOptions::default()).await?;
//! let config = store.config("alpine:3.20").await?;
//! println!("would run {:?} in {:?}", config.argv(), config.working_dir);
//! # Ok(()) }
//! ```

pub mod auth;
pub mod config;
pub mod digest;
pub mod manifest;
pub mod platform;
pub mod pull;
pub mod reference;
pub mod store;
pub mod tls;
pub mod unpack;

pub use auth::Credentials;
pub use config::{ExposedPort, ImageConfig, PortProtocol};
pub use digest::Digest;
pub use platform::Platform;
pub use pull::{PullError, PullOptions, PullProgress, PulledImage};
pub use reference::{ImageReference, ReferenceError};
pub use store::{GcReport, ImageStore, ImageSummary, RefRecord, StoreError, StoredImage};
pub use tls::{RegistryTls, TlsError};
pub use unpack::{OwnershipRecord, UnpackError, UnpackOptions, UnpackReport};
