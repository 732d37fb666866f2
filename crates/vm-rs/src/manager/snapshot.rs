//! The snapshot verbs of [`VmManager`]: [`snapshot`](VmManager::snapshot),
//! [`restore`](VmManager::restore), [`clone_snapshot`](VmManager::clone_snapshot) and the
//! snapshot store (list, inspect, remove). The layout and formats are in [`crate::snapshot`].
//!
//! ## Snapshot
//!
//! Under the VM's verb lock: everything that can refuse is checked first (backend
//! capabilities, shared directories, networks that need a per-VM address, live changes, the
//! name) — before the VM is paused. Then the vCPUs stop, the backend saves the device state
//! (and RAM) into a temporary directory, every disk is copied while nothing writes it (so
//! memory and disks agree), the metadata is written, every file sealed read-only and the
//! directory renamed into place (`RENAME_NOREPLACE`). The VM stays paused unless
//! [`SnapshotOptions::leave_running`]; when anything fails it returns to the state it was in.
//!
//! ## Restore
//!
//! A restored VM is a normal VM (its own directory, record, verb lock; `ps`, `exec`, `stop`,
//! `rm`, reattach): its disks are qcow2 overlays in its directory over the snapshot's frozen
//! copies, its RAM the snapshot's `memory` mapped copy-on-write. The kernel and initramfs must
//! be the ones the snapshot's guest booted (digests), the sizes the same; then the VMM is
//! started from the snapshot, the VM recorded ready at the address its guest had, and the guest
//! agent gives it a new identity ([`vmrs_proto::Identity`]) before the verb returns.

use super::record::{self, files, now, VmRecord, RECORD_VERSION};
use super::{lock, DirGuard, ManagerError, StartOptions, VmInfo, VmManager};
use crate::config::DiskFormat;
use crate::devices::{AgentChannel, DeviceSet, MemoryBackend};
use crate::driver::DriverError;
use crate::net::NicBackend;
use crate::snapshot::{
    self as snap, FileDigest, SnapshotDir, SnapshotDisk, SnapshotError, SnapshotInfo, SnapshotMeta,
    SNAPSHOT_VERSION,
};
use crate::state::{Operation, VmState};
use crate::vm_dir::VmDir;
use std::path::{Path, PathBuf};

/// Options of [`VmManager::snapshot`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Resume the VM once the snapshot is taken (a VM paused before stays paused). Without it
    /// the VM is left paused, so nothing it does after the snapshot is lost unnoticed.
    pub leave_running: bool,
}

/// What a restore asks of the machine: each size given must be the snapshot's (a restored
/// guest's RAM and vCPUs cannot change), `None` takes the snapshot's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
}

/// File in a restored VM's directory naming its snapshot (so the snapshot is not removed
/// from under it).
const ORIGIN: &str = VmDir::ORIGIN;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Origin {
    snapshot: String,
}

fn refused(name: &str, reason: impl Into<String>) -> ManagerError {
    ManagerError::Snapshot(SnapshotError::Refused {
        name: name.to_string(),
        reason: reason.into(),
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManagerError + '_ {
    move |source| {
        ManagerError::Snapshot(SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, ManagerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(io(path))
}

impl VmManager {
    /// `$VMRS_HOME/snapshots`.
    pub fn snapshots_dir(&self) -> PathBuf {
        snap::snapshots_dir(self.home())
    }

    /// Directory of snapshot `name`.
    pub fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.snapshots_dir().join(name)
    }

    /// Save VM `name` (running, ready or paused) as the snapshot `snapshot` (see the module
    /// docs). Refusals come before the VM is paused; the snapshot exists whole or not at all.
    pub async fn snapshot(
        &self,
        name: &str,
        snapshot: &str,
        opts: SnapshotOptions,
    ) -> Result<SnapshotInfo, ManagerError> {
        snap::validate_name(snapshot)?;
        let _lock = self.lock(name).await?;
        let entry = self.locked_entry(name).await?;
        let state = entry.state();
        state.check(name, Operation::Snapshot)?;
        let handle = entry.require_handle(name).await?;
        let driver = entry.driver();
        if !driver.capabilities().snapshot {
            return Err(ManagerError::driver(name)(DriverError::Unsupported {
                backend: driver.kind(),
                feature: "snapshots",
            }));
        }
        let dir = self.vm_dir(name);
        let config = record::load_config(&dir)?;
        let start: StartOptions = record::load_json_or_default(&dir.join(files::START))?;
        let devices_path = dir.join(VmDir::DEVICES);
        if !devices_path.is_file() {
            return Err(refused(
                snapshot,
                format!("vm {name:?} was started by an older vm-rs that did not record its devices; restart it first"),
            ));
        }
        let devices: DeviceSet = record::read_json(&devices_path)?;
        check_snapshottable(snapshot, name, driver.kind(), &config, &devices)?;
        let live = record::load_live(&dir)?;
        if live != record::LiveChanges::default() {
            return Err(refused(
                snapshot,
                format!("vm {name:?} was resized or has hot-plugged devices; a restore could not rebuild that machine"),
            ));
        }
        let snaps = self.snapshots_dir();
        crate::paths::create_private_dir_all(&snaps).map_err(io(&snaps))?;
        let final_dir = snaps.join(snapshot);
        if final_dir.exists() {
            return Err(SnapshotError::AlreadyExists {
                name: snapshot.to_string(),
            }
            .into());
        }
        // hashed while the guest still runs: the pause is for the VMM's state and the disks
        let kernel = {
            let k = config.kernel.clone();
            blocking(&config.kernel, move || FileDigest::of(&k)).await?
        };
        let initramfs = match &config.initramfs {
            Some(i) => {
                let p = i.clone();
                Some(blocking(i, move || FileDigest::of(&p)).await?)
            }
            None => None,
        };
        let tmp = snap::temp_dir(&snaps, snapshot);
        if tmp.exists() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        crate::paths::create_private_dir(&tmp).map_err(io(&tmp))?;
        let guard = DirGuard(Some(tmp.clone()));
        let was_paused = state == VmState::Paused;
        if !was_paused {
            driver.pause(&handle).await.map_err(ManagerError::driver(name))?;
            entry.transition(VmState::Paused).await?;
        }
        let taken = async {
            driver
                .snapshot(&handle, &tmp)
                .await
                .map_err(ManagerError::driver(name))?;
            let mut disks = Vec::new();
            for d in &devices.disks {
                let file = SnapshotDir::disk_name(&d.id);
                let dest = tmp.join(&file);
                crate::storage::clone::clone_disk(&d.path, &dest)
                    .await
                    .map_err(|source| SnapshotError::Copy {
                        path: d.path.clone(),
                        source,
                    })?;
                disks.push(SnapshotDisk {
                    id: d.id.clone(),
                    file,
                });
            }
            let ip = entry.state().ip().or(record::load_record(&dir)?.ip);
            let meta = SnapshotMeta {
                version: SNAPSHOT_VERSION,
                name: snapshot.to_string(),
                source_vm: name.to_string(),
                backend: driver.kind(),
                created_at: now(),
                cpus: config.cpus,
                memory_mib: config.memory_mib,
                kernel,
                initramfs,
                config: config.clone(),
                start: start.clone(),
                devices: devices.clone(),
                disks,
                memory_file: tmp.join(SnapshotDir::MEMORY).is_file(),
                ip,
                accel: handle.accel.clone(),
            };
            record::write_json_atomic(&tmp.join(SnapshotDir::META), &meta)?;
            let t = tmp.clone();
            blocking(&tmp, move || snap::seal(&t)).await?;
            publish(&tmp, &final_dir, snapshot)?;
            Ok::<_, ManagerError>(meta)
        }
        .await;
        if !was_paused && (opts.leave_running || taken.is_err()) {
            match driver.resume(&handle).await {
                Ok(()) => entry.resumed().await?,
                Err(e) => tracing::warn!(vm = %name, error = %e, "cannot resume after the snapshot"),
            }
        }
        let meta = taken?;
        guard.disarm();
        Ok(SnapshotInfo {
            meta,
            disk_usage: snap::disk_usage(&final_dir),
            dir: final_dir,
        })
    }

    /// Every snapshot, sorted by name (temporary directories of snapshots being written are
    /// not snapshots; one whose metadata cannot be read is skipped with a warning).
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, ManagerError> {
        let snaps = self.snapshots_dir();
        let rd = match std::fs::read_dir(&snaps) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&snaps)(e)),
        };
        let mut names: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| snap::validate_name(n).is_ok())
            .collect();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            match self.inspect_snapshot(&n).await {
                Ok(i) => out.push(i),
                Err(e) => tracing::warn!(snapshot = %n, error = %e, "unreadable snapshot"),
            }
        }
        Ok(out)
    }

    /// One snapshot's metadata.
    pub async fn inspect_snapshot(&self, snapshot: &str) -> Result<SnapshotInfo, ManagerError> {
        snap::validate_name(snapshot).map_err(|_| SnapshotError::NotFound {
            name: snapshot.to_string(),
        })?;
        let dir = self.snapshot_dir(snapshot);
        let meta = snap::load_meta(snapshot, &dir)?;
        Ok(SnapshotInfo {
            meta,
            disk_usage: snap::disk_usage(&dir),
            dir,
        })
    }

    /// Remove snapshot `snapshot`. VMs restored from it need its files (their disks are
    /// overlays of its disks): refused while one exists, unless `force`.
    pub async fn remove_snapshot(&self, snapshot: &str, force: bool) -> Result<(), ManagerError> {
        snap::validate_name(snapshot).map_err(|_| SnapshotError::NotFound {
            name: snapshot.to_string(),
        })?;
        let dir = self.snapshot_dir(snapshot);
        if !dir.is_dir() {
            return Err(SnapshotError::NotFound {
                name: snapshot.to_string(),
            }
            .into());
        }
        if !force {
            let users = self.snapshot_users(snapshot)?;
            if !users.is_empty() {
                return Err(SnapshotError::InUse {
                    name: snapshot.to_string(),
                    vms: users,
                }
                .into());
            }
        }
        // out of the way in one step (a stale temp name, so a killed remove is finished later)
        let tomb = self.snapshots_dir().join(format!(
            "{}rm-{snapshot}-{}",
            snap::TEMP_PREFIX,
            std::process::id()
        ));
        std::fs::rename(&dir, &tomb).map_err(io(&dir))?;
        blocking(&tomb, {
            let t = tomb.clone();
            move || std::fs::remove_dir_all(&t)
        })
        .await
    }

    /// The VMs whose directory says they were restored from `snapshot`.
    pub(super) fn snapshot_users(&self, snapshot: &str) -> Result<Vec<String>, ManagerError> {
        let mut users = Vec::new();
        for vm in self.names()? {
            let origin: Option<Origin> = record::read_json(&self.vm_dir(&vm).join(ORIGIN)).ok();
            if origin.is_some_and(|o| o.snapshot == snapshot) {
                users.push(vm);
            }
        }
        Ok(users)
    }

    /// Start a new VM `name` from snapshot `snapshot` (see the module docs); returns once the
    /// VM is ready for exec with its new identity. Refusals (a different kernel, initramfs,
    /// memory size or vCPU count, a backend that cannot restore) come before anything exists;
    /// on any later error the VM is removed again.
    pub async fn restore(
        &self,
        snapshot: &str,
        name: &str,
        opts: RestoreOptions,
    ) -> Result<VmInfo, ManagerError> {
        snap::validate_name(snapshot).map_err(|_| SnapshotError::NotFound {
            name: snapshot.to_string(),
        })?;
        let started = std::time::Instant::now();
        let snap_dir = self.snapshot_dir(snapshot);
        let meta = snap::load_meta(snapshot, &snap_dir)?;
        check_restorable(&meta, &opts).await?;
        let driver = self
            .inner
            .drivers
            .for_start(meta.backend)
            .map_err(ManagerError::driver(name))?;
        if !driver.capabilities().snapshot {
            return Err(ManagerError::driver(name)(DriverError::Unsupported {
                backend: driver.kind(),
                feature: "restoring snapshots",
            }));
        }
        let dir = self.vm_dir(name);
        let vm_dir = VmDir::new(&dir);
        let (config, devices) = restored_machine(&meta, &snap_dir, name, &vm_dir)?;
        // on tap, bridge and switch networks: a mac and an address of its own
        let readdressed = self.readdress(snapshot, config, name, &dir)?;
        let config = readdressed.config.clone();
        // checked as it would run, with the frozen disks in place of the overlays to come
        let mut as_checked = config.clone();
        for ((c, orig), sd) in as_checked
            .disks
            .iter_mut()
            .zip(&meta.config.disks)
            .zip(&meta.disks)
        {
            *c = orig.clone();
            c.path = snap_dir.join(&sd.file);
        }
        as_checked.validate()?;
        driver
            .capabilities()
            .check(driver.kind(), &config, &devices)
            .map_err(ManagerError::driver(name))?;
        match crate::paths::create_private_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ManagerError::AlreadyExists {
                    name: name.to_string(),
                });
            }
            Err(source) => return Err(ManagerError::Io { path: dir, source }),
        }
        let lock = super::VmLock::acquire(name, &dir, super::LOCK_WAIT).await?;
        let cleanup = DirGuard(Some(dir.clone()));
        let start_lock = lock::lock_start(&dir)?;
        record::write_json_atomic(
            &dir.join(ORIGIN),
            &Origin {
                snapshot: snapshot.to_string(),
            },
        )?;
        // the disks: overlays over the frozen copies, which are never written
        for (d, sd) in devices.disks.iter().zip(&meta.disks) {
            let base = snap_dir.join(&sd.file);
            let format = meta
                .devices
                .disks
                .iter()
                .find(|x| x.id == sd.id)
                .map_or(DiskFormat::Raw, |x| x.format);
            overlay(&base, format, &d.path).await?;
        }
        record::write_json_atomic(&dir.join(files::CONFIG), &config)?;
        record::write_json_atomic(&dir.join(files::START), &meta.start)?;
        let mut rec = VmRecord {
            version: RECORD_VERSION,
            name: name.to_string(),
            state: VmState::Starting,
            backend: driver.kind(),
            handle: None,
            ip: None,
            created_at: now(),
            started_at: Some(now()),
            finished_at: None,
            exit_code: None,
        };
        record::write_json_atomic(&dir.join(files::STATE), &rec)?;
        let entry = self
            .launch(
                &dir,
                &config,
                &meta.start,
                devices.clone(),
                &mut rec,
                driver,
                Some(&snap_dir),
            )
            .await?;
        drop(start_lock);
        tracing::debug!(vm = %name, ms = started.elapsed().as_millis(), "restored vmm resumed");
        self.inner
            .entries
            .lock()
            .await
            .insert(name.to_string(), entry.clone());
        let settled = async {
            let ip = readdressed.ip.map(std::net::IpAddr::V4).or(meta.ip);
            if let Some(ip) = ip {
                entry.transition(VmState::Ready { ip }).await?;
            }
            if devices.agent.is_some() && ip.is_some() {
                let agent = self.agent(name).await?;
                if !readdressed.nics.is_empty() {
                    agent
                        .set_addresses(readdressed.nics.clone())
                        .await
                        .map_err(|source| ManagerError::Agent {
                            name: name.to_string(),
                            source,
                        })?;
                }
                let identity = new_identity(name)?;
                let hostname = identity
                    .hostname
                    .as_deref()
                    .map(|h| String::from_utf8_lossy(h).into_owned());
                agent
                    .set_identity(identity)
                    .await
                    .map_err(|source| ManagerError::Agent {
                        name: name.to_string(),
                        source,
                    })?;
                if let Some(h) = hostname {
                    renamed_hosts(&agent, &dir, &h).await;
                }
            }
            Ok::<_, ManagerError>(())
        }
        .await;
        if let Err(e) = settled {
            tracing::warn!(vm = %name, error = %e, "restored vm did not settle; removing it");
            let _ = self.kill_locked(name, &entry).await;
            entry.retire().await;
            self.inner.entries.lock().await.remove(name);
            self.drop_agent(name).await;
            let _ = crate::net::host::teardown_vm_dir(&dir).await;
            crate::process::kill_owned_by(&dir);
            drop(cleanup);
            drop(lock);
            return Err(e);
        }
        tracing::debug!(vm = %name, ms = started.elapsed().as_millis(), "restored vm has its identity");
        cleanup.disarm();
        drop(lock);
        Ok(entry.info().await)
    }

    /// Restore `count` VMs from `snapshot` at once, named `<prefix>-1` .. `<prefix>-<count>`;
    /// returns when every one is ready for exec. If any fails, the others are removed again
    /// and the first error is returned.
    pub async fn clone_snapshot(
        &self,
        snapshot: &str,
        count: usize,
        prefix: &str,
        opts: RestoreOptions,
    ) -> Result<Vec<VmInfo>, ManagerError> {
        if count == 0 {
            return Err(refused(snapshot, "a clone needs a count of at least 1"));
        }
        let names: Vec<String> = (1..=count).map(|i| format!("{prefix}-{i}")).collect();
        for n in &names {
            crate::config::validate_name(n)?;
        }
        if count > 1 {
            snap::validate_name(snapshot).map_err(|_| SnapshotError::NotFound {
                name: snapshot.to_string(),
            })?;
            let meta = snap::load_meta(snapshot, &self.snapshot_dir(snapshot))?;
            check_clonable(&meta, count)?;
        }
        let results =
            futures::future::join_all(names.iter().map(|n| self.restore(snapshot, n, opts.clone()))).await;
        if results.iter().any(Result::is_err) {
            let mut first = None;
            for (n, r) in names.iter().zip(results) {
                match r {
                    Ok(_) => {
                        if let Err(e) = self.remove(n, true).await {
                            tracing::warn!(vm = %n, error = %e, "cannot remove a clone after a failed clone");
                        }
                    }
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
            return Err(first.unwrap_or_else(|| refused(snapshot, "clone failed")));
        }
        Ok(results.into_iter().flatten().collect())
    }
}

/// What [`VmManager::snapshot`] refuses before it pauses anything.
fn check_snapshottable(
    snapshot: &str,
    vm: &str,
    backend: crate::config::BackendKind,
    config: &crate::VmConfig,
    devices: &DeviceSet,
) -> Result<(), ManagerError> {
    if !devices.shared_dirs.is_empty() || !config.shared_dirs.is_empty() {
        return Err(refused(
            snapshot,
            format!(
                "vm {vm:?} has shared directories: virtio-fs keeps their state in its daemon, which a snapshot cannot hold"
            ),
        ));
    }
    if devices
        .nics
        .iter()
        .any(|n| matches!(n.backend, NicBackend::Tap { slirp: Some(_), .. }))
    {
        return Err(refused(
            snapshot,
            format!(
                "vm {vm:?} has a slirp4netns user-mode network: its connections live in the sidecar, which a snapshot cannot hold (not supported yet; the vmm's own user-mode network is)"
            ),
        ));
    }
    // on tap, bridge and switch networks every restored vm gets a mac and an address of its
    // own (see `readdress`): the guest agent applies them, and only QEMU starts a saved
    // machine on a new TAP
    let readdressed: Vec<usize> = devices
        .nics
        .iter()
        .filter(|n| !matches!(n.backend, NicBackend::User { .. }))
        .map(|n| n.index)
        .collect();
    if let Some(&i) = readdressed.first() {
        if backend != crate::config::BackendKind::Qemu {
            return Err(refused(
                snapshot,
                format!(
                    "vm {vm:?} is on a tap, bridge or switch network (nic {i}): only QEMU restores such a vm with a new mac and address (user-mode networking snapshots on every backend)"
                ),
            ));
        }
        if devices.agent.is_none() {
            return Err(refused(
                snapshot,
                format!(
                    "vm {vm:?} is on a tap, bridge or switch network (nic {i}) and has no guest agent: a restored vm gets its new address through the agent"
                ),
            ));
        }
    }
    for &i in &readdressed {
        if let Some(a) = config.networks.get(i) {
            let dhcp = matches!(a.address(), crate::config::GuestAddress::Dhcp);
            if dhcp && super::readdress::address_key(a).is_some() {
                return Err(refused(
                    snapshot,
                    format!(
                        "vm {vm:?} takes the address of nic {i} by dhcp on a {} network: a restored guest would keep the lease of the vm it was saved from (give it a fixed address, or let vm-rs derive one)",
                        a.kind()
                    ),
                ));
            }
        }
    }
    match &devices.agent {
        Some(crate::devices::AgentChannel::Vsock {
            vhost_user: Some(_), ..
        }) => {
            return Err(refused(
                snapshot,
                format!(
                    "vm {vm:?} talks to its agent over vsock: the vhost-user vsock backend keeps the device's state outside QEMU, which a snapshot cannot hold (use the virtio-serial agent transport)"
                ),
            ))
        }
        Some(crate::devices::AgentChannel::Vsock { .. }) => {
            return Err(refused(
                snapshot,
                format!(
                    "vm {vm:?} has a vsock device for its agent: its restored clones would all bind the source's vsock socket (start the vm without the agent to snapshot it)"
                ),
            ))
        }
        _ => {}
    }
    if matches!(devices.memory, MemoryBackend::Memfd { shared: true }) {
        return Err(refused(
            snapshot,
            format!("vm {vm:?} shares its memory with a sidecar"),
        ));
    }
    Ok(())
}

/// What [`VmManager::clone_snapshot`] refuses for `count` (> 1) clones before it starts any:
/// what every clone would take the same of on a shared network (a pinned MAC or address, a
/// published host port).
fn check_clonable(meta: &SnapshotMeta, count: usize) -> Result<(), ManagerError> {
    for (i, a) in meta.config.networks.iter().enumerate() {
        let shared = super::readdress::address_key(a).is_some();
        let what = if !a.port_forwards().is_empty() {
            Some("publishes host ports")
        } else if shared && a.mac().is_some() {
            Some("pins a mac")
        } else if shared && super::readdress::pins_address(a) {
            Some(match a {
                crate::config::NetworkAttachment::Tap { .. } => {
                    "is a tap network (one address after its host address)"
                }
                _ => "pins an address",
            })
        } else {
            None
        };
        if let Some(what) = what {
            return Err(refused(
                &meta.name,
                format!(
                    "network {i} ({}) {what}: {count} clones would all take it (restore one at a time, or snapshot a vm without it)",
                    a.kind()
                ),
            ));
        }
    }
    Ok(())
}

/// What [`VmManager::restore`] refuses before it creates anything.
async fn check_restorable(meta: &SnapshotMeta, opts: &RestoreOptions) -> Result<(), ManagerError> {
    let mismatch = |what, recorded: String, requested: String| {
        ManagerError::Snapshot(SnapshotError::Mismatch {
            name: meta.name.clone(),
            what,
            recorded,
            requested,
        })
    };
    if let Some(m) = opts.memory_mib.filter(|m| *m != meta.memory_mib) {
        return Err(mismatch(
            "memory (MiB)",
            meta.memory_mib.to_string(),
            m.to_string(),
        ));
    }
    if let Some(c) = opts.cpus.filter(|c| *c != meta.cpus) {
        return Err(mismatch("vcpus", meta.cpus.to_string(), c.to_string()));
    }
    let files =
        std::iter::once(("kernel", &meta.kernel)).chain(meta.initramfs.iter().map(|i| ("initramfs", i)));
    for (what, digest) in files {
        let d = digest.clone();
        let same = tokio::task::spawn_blocking(move || d.still_matches())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        match same {
            Ok(true) => {}
            Ok(false) => {
                return Err(mismatch(
                    what,
                    format!("{} (sha256 {})", digest.path.display(), digest.sha256),
                    "a file that changed since".into(),
                ))
            }
            Err(_) => {
                return Err(mismatch(
                    what,
                    digest.path.display().to_string(),
                    "nothing: the file is gone".into(),
                ))
            }
        }
    }
    Ok(())
}

/// The configuration and devices of VM `name` restored from `meta` (paths rewritten into its
/// directory: overlays, agent socket; RAM from the snapshot).
fn restored_machine(
    meta: &SnapshotMeta,
    snap_dir: &Path,
    name: &str,
    vm_dir: &VmDir,
) -> Result<(crate::VmConfig, DeviceSet), ManagerError> {
    let mut config = meta.config.clone();
    config.name = name.to_string();
    config.serial_log = Some(vm_dir.file(files::SERIAL_LOG));
    // the saved vCPU state is only valid on the accelerator it was taken on
    if let Some(a) = meta.accel.as_deref().and_then(|a| a.parse().ok()) {
        config.accel = a;
    }
    let mut devices = meta.devices.clone();
    for d in &mut devices.disks {
        d.path = if d.id == crate::rootfs::root_disk(vm_dir.path()).id {
            crate::rootfs::root_disk(vm_dir.path()).path
        } else {
            vm_dir.disk_overlay(&d.id)
        };
        d.format = DiskFormat::Qcow2;
    }
    // the configured disks are the first devices, in order (see `plan_devices`)
    for (i, c) in config.disks.iter_mut().enumerate() {
        let d = devices
            .disks
            .get(i)
            .ok_or_else(|| refused(&meta.name, "its devices do not match its configuration"))?;
        c.path = d.path.clone();
        c.format = DiskFormat::Qcow2;
        c.backing = crate::config::BackingPolicy::Allow;
    }
    if devices.disks.len() != meta.disks.len() {
        return Err(refused(&meta.name, "its disks do not match its devices"));
    }
    if let Some(AgentChannel::VirtioSerial { socket, process_log }) = &mut devices.agent {
        *socket = vm_dir.file(VmDir::AGENT_SOCKET);
        if let Some(log) = process_log {
            *log = vm_dir.file(VmDir::PROCESS_LOG);
        }
    }
    // the RAM block keeps the source's id (QEMU matches blocks by it): a backend object when
    // the source had one, the machine's own RAM when it did not
    devices.memory = match (&meta.memory_file, &meta.devices.memory) {
        (true, _) => MemoryBackend::File {
            path: snap_dir.join(SnapshotDir::MEMORY),
            shared: false,
        },
        (false, MemoryBackend::Anonymous) => MemoryBackend::Anonymous,
        (false, _) => MemoryBackend::Memfd { shared: false },
    };
    Ok((config, devices))
}

/// A qcow2 overlay at `target` over the snapshot's frozen disk `base` (vm-rs made the chain,
/// so the base's own backing file, an image's root filesystem, is allowed).
async fn overlay(base: &Path, format: DiskFormat, target: &Path) -> Result<(), ManagerError> {
    let fmt = format.to_string();
    crate::storage::disk::qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        fmt.as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        target.as_os_str(),
    ])
    .await
    .map(drop)
    .map_err(|source| {
        ManagerError::Snapshot(SnapshotError::Overlay {
            path: base.to_path_buf(),
            source,
        })
    })
}

/// Rename the complete temporary directory to its name, never over an existing snapshot.
fn publish(tmp: &Path, dest: &Path, name: &str) -> Result<(), ManagerError> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, tmp, CWD, dest, RenameFlags::NOREPLACE) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) | Err(rustix::io::Errno::NOTEMPTY) => {
            return Err(SnapshotError::AlreadyExists {
                name: name.to_string(),
            }
            .into())
        }
        Err(e) => return Err(io(tmp)(e.into())),
    }
    if let Some(parent) = dest.parent() {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A new identity for restored VM `name`: the host's clock, host entropy, the VM's name as
/// host name, a random machine id.
/// The `/etc/hosts` the guest init writes at boot where the root has none (its text, up to
/// the host name): the first two lines, then `127.0.1.1<TAB>NAME`.
const INIT_HOSTS_HEAD: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t";

/// The init-written `/etc/hosts` text naming `name` again when `current` is one for another
/// name; `None` for any other file (an image's own is left alone).
fn hosts_for(current: &str, name: &str) -> Option<String> {
    let old = current.strip_prefix(INIT_HOSTS_HEAD)?.strip_suffix('\n')?;
    (!old.is_empty() && !old.contains(['\n', '\t']) && old != name)
        .then(|| format!("{INIT_HOSTS_HEAD}{name}\n"))
}

/// After a restore the guest's `/etc/hosts` still names the snapshotted VM when the guest
/// init wrote it at boot: rewrite it through the agent (best effort; a read-only root or an
/// image's own file keeps what it has).
async fn renamed_hosts(agent: &crate::agent::AgentClient, dir: &Path, hostname: &str) {
    let tmp = dir.join(".hosts");
    let rewritten = async {
        agent.copy_from("/etc/hosts", &tmp).await.ok()?;
        let text = hosts_for(&std::fs::read_to_string(&tmp).ok()?, hostname)?;
        std::fs::write(&tmp, text).ok()?;
        agent.copy_to(&tmp, "/etc/hosts").await.ok()
    }
    .await;
    if rewritten.is_none() {
        tracing::debug!(dir = %dir.display(), "/etc/hosts left as it was");
    }
    let _ = std::fs::remove_file(&tmp);
}

fn new_identity(name: &str) -> Result<vmrs_proto::Identity, ManagerError> {
    use std::io::Read;
    let mut random = [0u8; 64 + 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .map_err(io(Path::new("/dev/urandom")))?;
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let hostname: String = name.chars().take(vmrs_proto::MAX_HOSTNAME).collect();
    Ok(vmrs_proto::Identity {
        realtime_ns,
        entropy: random[..64].to_vec(),
        hostname: Some(hostname.into_bytes()),
        machine_id: Some(hex::encode(&random[64..]).into_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_differ_and_fit_the_protocol() {
        let a = new_identity("clone-1").expect("id");
        let b = new_identity("clone-1").expect("id");
        assert_ne!(a.entropy, b.entropy);
        assert_ne!(a.machine_id, b.machine_id);
        assert_eq!(a.machine_id.as_ref().map(Vec::len), Some(32));
        assert_eq!(a.hostname.as_deref(), Some(&b"clone-1"[..]));
        let frame = vmrs_proto::Message::SetIdentity(a).encode(1).expect("encode");
        assert!(frame.len() < 256);
    }

    #[test]
    fn what_cannot_be_restored_is_refused_before_anything_pauses() {
        use crate::config::{BackendKind, GuestAddress, NetworkAttachment};
        const Q: BackendKind = BackendKind::Qemu;
        let cfg = crate::VmConfig::builder("v").kernel("/k").build_unchecked();
        let plain = DeviceSet::default();
        assert!(check_snapshottable("s", "v", Q, &cfg, &plain).is_ok());
        let devices_on = |nets: &[NetworkAttachment], agent: bool| {
            let plan = crate::net::plan("v", Path::new("/h/vms/v"), Path::new("/h"), nets).expect("plan");
            let mut cfg = cfg.clone();
            cfg.networks = nets.to_vec();
            let devices = DeviceSet {
                nics: plan.iter().map(crate::devices::Nic::from).collect(),
                agent: agent.then(|| AgentChannel::VirtioSerial {
                    socket: "/v/agent.sock".into(),
                    process_log: None,
                }),
                ..DeviceSet::default()
            };
            (cfg, devices)
        };
        let (c, d) = devices_on(&[NetworkAttachment::user(Vec::new())], false);
        assert!(check_snapshottable("s", "v", Q, &c, &d).is_ok());
        assert!(check_snapshottable("s", "v", BackendKind::CloudHypervisor, &c, &d).is_ok());
        // a switch network: QEMU with the agent re-addresses the clones
        let switch = [
            NetworkAttachment::user(Vec::new()),
            NetworkAttachment::switch("lab"),
        ];
        let (c, d) = devices_on(&switch, true);
        assert!(check_snapshottable("s", "v", Q, &c, &d).is_ok());
        let e = check_snapshottable("s", "v", BackendKind::Firecracker, &c, &d).expect_err("fc");
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(
            e.to_string().contains("nic 1") && e.to_string().contains("only QEMU"),
            "{e}"
        );
        let (c, d) = devices_on(&switch, false);
        let e = check_snapshottable("s", "v", Q, &c, &d).expect_err("no agent");
        assert!(e.to_string().contains("no guest agent"), "{e}");
        let dhcp = [NetworkAttachment::Switch {
            network: "lab".into(),
            subnet: None,
            address: GuestAddress::Dhcp,
            mac: None,
        }];
        let (c, d) = devices_on(&dhcp, true);
        let e = check_snapshottable("s", "v", Q, &c, &d).expect_err("dhcp");
        assert!(e.to_string().contains("dhcp"), "{e}");
        let shared = DeviceSet {
            shared_dirs: vec![crate::devices::SharedFs {
                tag: "t".into(),
                host_path: "/tmp".into(),
                read_only: false,
                socket: "/v/fs0.sock".into(),
            }],
            ..DeviceSet::default()
        };
        let e = check_snapshottable("s", "v", Q, &cfg, &shared).expect_err("shared dirs");
        assert!(e.to_string().contains("virtio-fs"), "{e}");
        let memfd = DeviceSet {
            memory: MemoryBackend::Memfd { shared: true },
            ..DeviceSet::default()
        };
        assert!(check_snapshottable("s", "v", Q, &cfg, &memfd).is_err());
        let vsock = DeviceSet {
            agent: Some(crate::devices::AgentChannel::Vsock {
                cid: 3,
                port: vmrs_proto::VSOCK_PORT,
                socket: "/v/agent.sock".into(),
                vhost_user: Some("/v/vsock-vhost.sock".into()),
                process_log: None,
            }),
            ..DeviceSet::default()
        };
        let e = check_snapshottable("s", "v", Q, &cfg, &vsock).expect_err("vsock agent");
        assert!(e.to_string().contains("vsock"), "{e}");
    }

    #[test]
    fn a_restored_machine_lives_in_its_own_directory() {
        let cfg = crate::VmConfig::builder("src")
            .kernel("/k")
            .disk(crate::config::DiskConfig::new("/data/d.img"))
            .build_unchecked();
        let devices = DeviceSet {
            disks: vec![
                crate::devices::Disk::from_config(0, &cfg.disks[0]),
                crate::rootfs::root_disk(Path::new("/h/vms/src")),
            ],
            agent: Some(AgentChannel::VirtioSerial {
                socket: "/h/vms/src/agent.sock".into(),
                process_log: Some("/h/vms/src/process.log".into()),
            }),
            memory: MemoryBackend::File {
                path: "/h/vms/src/memory".into(),
                shared: true,
            },
            ..DeviceSet::default()
        };
        let meta = SnapshotMeta {
            version: SNAPSHOT_VERSION,
            name: "s".into(),
            source_vm: "src".into(),
            backend: crate::config::BackendKind::Qemu,
            created_at: 0,
            cpus: 1,
            memory_mib: 256,
            kernel: FileDigest {
                path: "/k".into(),
                sha256: String::new(),
                size: 0,
                mtime_ns: 0,
                ino: 0,
            },
            initramfs: None,
            config: cfg,
            start: StartOptions::default(),
            disks: devices
                .disks
                .iter()
                .map(|d| SnapshotDisk {
                    id: d.id.clone(),
                    file: SnapshotDir::disk_name(&d.id),
                })
                .collect(),
            devices,
            memory_file: true,
            ip: None,
            accel: Some("tcg".into()),
        };
        let vm = VmDir::new("/h/vms/new");
        let (config, devices) =
            restored_machine(&meta, Path::new("/h/snapshots/s"), "new", &vm).expect("machine");
        assert_eq!(config.name, "new");
        assert_eq!(config.accel, crate::config::Accel::Tcg);
        assert_eq!(config.disks[0].path, Path::new("/h/vms/new/disk-disk0.qcow2"));
        assert_eq!(config.disks[0].format, DiskFormat::Qcow2);
        assert_eq!(devices.disks[1].path, Path::new("/h/vms/new/root.qcow2"));
        assert_eq!(
            devices.agent,
            Some(AgentChannel::VirtioSerial {
                socket: "/h/vms/new/agent.sock".into(),
                process_log: Some("/h/vms/new/process.log".into()),
            })
        );
        assert_eq!(
            devices.memory,
            MemoryBackend::File {
                path: "/h/snapshots/s/memory".into(),
                shared: false
            }
        );
        // every path the restored vm writes is in its own directory
        for d in &devices.disks {
            assert!(d.path.starts_with("/h/vms/new"), "{d:?}");
        }
    }

    #[test]
    fn only_the_init_written_hosts_file_is_renamed() {
        let init = format!("{INIT_HOSTS_HEAD}old\n");
        assert_eq!(hosts_for(&init, "new"), Some(format!("{INIT_HOSTS_HEAD}new\n")));
        assert_eq!(hosts_for(&init, "old"), None);
        assert_eq!(hosts_for("127.0.0.1 localhost\n", "new"), None);
        assert_eq!(hosts_for(&format!("{init}10.0.0.1\tdb\n"), "new"), None);
    }

    #[test]
    fn publish_never_replaces_a_snapshot() {
        let tmp = tempfile::tempdir().expect("tmp");
        let a = tmp.path().join(".tmp-a");
        let dest = tmp.path().join("a");
        std::fs::create_dir(&a).expect("mkdir");
        std::fs::create_dir(&dest).expect("mkdir");
        let e = publish(&a, &dest, "a").expect_err("exists");
        assert_eq!(e.kind(), crate::ErrorKind::Conflict);
        std::fs::remove_dir(&dest).expect("rm");
        publish(&a, &dest, "a").expect("publish");
        assert!(dest.is_dir() && !a.exists());
    }
}
