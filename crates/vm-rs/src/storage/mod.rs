//! Storage: everything that ends up as a block device in a guest.
//!
//! * [`image_refs`] — which other host files a qcow2 image names (backing file, external
//!   data file), read from its header; refused unless the disk allows them.
//! * [`disk`] — empty raw (sparse) and qcow2 disks, qcow2 overlays on a backing file,
//!   `qemu-img info` probing.
//! * [`clone`] — copy-on-write clones of a base image: reflink (`FICLONE`) where the
//!   filesystem supports it, a hole-preserving `copy_file_range` copy elsewhere.
//! * [`seed`] — cloud-init NoCloud seed images (`cidata` FAT image, pure Rust).
//! * [`ssh`] — ed25519 SSH key pairs in OpenSSH format.
//! * [`download`] — HTTP(S) downloads verified by SHA-256, with resume.
//! * [`catalog`] — named base images (Ubuntu cloud images built in, user-extensible).
//! * [`parse_size`] — `10G`, `512M`.
//! * [`usage`] — disk usage of a tree as `du` counts it (`vmrs system df`).
//!
//! Disks are attached through [`crate::config::DiskConfig`]; this module only makes the files.
//! Every file is written under a temp name beside its destination, fsynced and renamed into
//! place. Disks, clones and keys never overwrite an existing file; a seed image is replaced
//! (it is regenerated from its configuration), and so is a download whose destination holds
//! bytes with the wrong digest.

pub mod catalog;
pub mod clone;
pub mod disk;
pub mod download;
pub(crate) mod fsutil;
pub mod image_refs;
pub mod seed;
mod size;
pub mod ssh;
pub mod usage;
mod yaml;

pub use catalog::{AssetKind, CatalogEntry, CatalogError, CatalogFile, ImageCatalog};
pub use clone::{clone_disk, clone_disk_with, CloneError, CloneMethod, ClonePolicy};
pub use disk::{
    create_disk, create_overlay, grow_disk, image_info, image_info_as, probe_disk, DiskError, ImageInfo,
};
pub use download::{download_verified, DownloadError, DownloadOptions, DownloadOutcome, Progress};
pub use seed::{write_seed_image, SeedConfig, SeedError, SeedFile, SeedFiles, SeedMount, SeedNic, SeedUser};
pub use size::{format_size, parse_size, SizeError};
pub use ssh::{ensure_key_pair, generate_key_pair, SshKeyError, SshKeyPair};
pub use usage::disk_usage;
