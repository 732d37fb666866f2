//! # vm-rs
//!
//! Create, boot, watch, pause, snapshot, stop and orchestrate lightweight Linux virtual machines
//! from one async API, on whichever hypervisor the host has.
//!
//! ## Architecture
//!
//! ```text
//!  VmManager ──────────────┬──────────────► VmDriver (trait)
//!   │ one directory per VM │                  ├─ driver::qemu   (QMP over a Unix socket)
//!   │ (config.json,        │                  ├─ driver::cloud_hypervisor (REST API on a Unix socket)
//!   │                      │                  ├─ driver::firecracker (REST API on a Unix socket)
//!   │                      │                  └─ driver::vz     (macOS: a vmrs-vz host process per VM)
//!   │  state.json,         │
//!   │  serial.log, vmm.log)├──► process  : pid + start time + pidfd, own session
//!   │                      ├──► console  : serial log follower + VMRS_READY parser
//!   │                      └──► state    : VmState + the one transition table
//!   │
//!   └─ config : VmConfig (+ builder, validation)
//!      guest  : guest assets (Debian kernel, busybox, vmrs-init) and the initramfs builder
//! ```
//!
//! * [`config`] — what the caller asks for: [`VmConfig`], disks, networks, shared dirs.
//! * [`state`] — the lifecycle state machine ([`VmState`]).
//! * [`driver`] — the [`VmDriver`] trait and backends; [`driver::choose`] picks one for a VM
//!   (and says why).
//! * [`error`] — [`ErrorKind`]: every public error's `kind()` (not found, conflict, invalid, ...),
//!   looking through wrappers to the cause.
//! * [`process`] — VMM process identity and signalling (never signals a reused pid).
//! * [`console`] — serial console following and readiness detection ([`READY_MARKER`]).
//! * [`manager`] — [`VmManager`], the verbs users call; persistence and reattach.
//! * [`agent`] — host side of the guest agent (exec, copy, ping, shutdown over virtio-serial;
//!   terminals, streamed stdin and the VM's main process), with [`agent::session`] for
//!   attaching a local terminal or stream to a guest process.
//! * [`guest`] — guest assets: kernel, modules, busybox, vmrs-init, and the initramfs builder.
//! * [`net`] — networking: user-mode NAT, TAP/bridge/NAT, the userspace switch, port forwarding.
//! * [`oci`] — OCI images: pull into a content-addressed store ([`ImageStore`]), unpack safely.
//! * [`devices`] — the device model every backend renders, and backend capabilities.
//! * [`host`] — host facts (KVM, HVF, program lookup, CPU clock) and the platform facade: what
//!   differs between Linux and macOS hosts (process handles, file events, confined opens,
//!   codecs) sits behind its functions, so no caller writes a `cfg`.
//! * [`paths`] — where data lives (`VMRS_HOME`).
//! * [`setup`] — one-call helpers: seed image, SSH key, catalog image → per-VM disk.
//! * [`virtiofs`] — shared directories: the virtiofsd sidecar serving each one over virtio-fs.
//! * [`vm_dir`] — the layout of a VM's directory (every file name in one place).
//! * [`snapshot`] — snapshots: a running VM saved once, restored and cloned many times.
//! * [`storage`] — disks, copy-on-write clones, cloud-init seeds, SSH keys, verified downloads.
//!
//! Every VM has a directory under the data dir (`$VMRS_HOME/vms/<name>`), so a new
//! [`VmManager`] in a new process reattaches to running VMs: the VMM runs in its own session and
//! outlives the process that started it.
//!
//! ## Example
//!
//! ```no_run
//! use vm_rs::{VmConfig, VmManager};
//! use std::time::Duration;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let manager = VmManager::new().await?;
//! let config = VmConfig::builder("demo")
//!     .kernel("/path/to/vmlinuz")
//!     .initramfs("/path/to/initramfs.img")
//!     .memory_mib(256)
//!     .build()?;
//! manager.start(config).await?;
//! let ip = manager.wait_ready("demo", Duration::from_secs(60)).await?;
//! println!("guest is up at {ip}");
//! manager.stop("demo", Duration::from_secs(10)).await?;
//! manager.remove("demo", false).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod agent;
pub mod config;
pub mod console;
pub mod devices;
pub mod driver;
pub mod error;
mod fsutil;
pub mod guest;
pub mod host;
pub mod manager;
pub mod net;
pub mod oci;
pub mod paths;
pub mod process;
pub mod rootfs;
pub mod setup;
pub mod snapshot;
pub mod state;
pub mod storage;
pub mod virtiofs;
pub mod vm_dir;
pub mod vsock;

pub use config::{Accel, BackendKind, DiskConfig, NetworkAttachment, SharedDir, VmConfig};
pub use console::READY_MARKER;
pub use driver::{VmDriver, VmHandle};
pub use error::ErrorKind;
pub use manager::{ManagerError, VmInfo, VmManager};
pub use oci::ImageStore;
pub use state::VmState;

/// The README's Rust examples, compiled (not run) by `cargo test --doc` so they stay as written.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExamples;
