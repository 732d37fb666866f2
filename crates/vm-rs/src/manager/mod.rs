//! [`VmManager`]: the verbs (start, stop, kill, pause, resume, state, list, remove, wait_ready,
//! wait_all_ready, exec/copy, snapshot/restore/clone_snapshot and the snapshot store (see
//! `snapshot`), and the VMM verbs resize, add_disk, add_net, remove_device, counters,
//! vmm_info), one directory per VM, and reattaching to VMs started by
//! other processes. Every verb checks the VM's state against [`crate::state`] first.
//!
//! [`VmManager::builder`] sets the data dir and, for tests and embedders, the one driver every
//! VM of the manager runs on — started or reattached (see [`VmManagerBuilder`]); by default the
//! backend is detected per VM.
//!
//! ## Persistence and reattach
//!
//! Each VM lives in `$VMRS_HOME/vms/<name>/` ([`record::files`]): `config.json`, `state.json`
//! (written atomically), `serial.log`, `vmm.log`, the VMM's sockets, the guest agent's socket
//! `agent.sock` (see [`VmManager::exec`]), for VMs started from an image `root.qcow2`
//! (see [`VmManager::start_with_rootfs`]), while the VMM runs `live.json` (what the VMM verbs
//! changed: sizes, hot-plugged devices) and, once a stop or kill was asked for,
//! `exit-request.json` (so every process watching records the exit as a stop). The VMM runs
//! in its own session, so it outlives the process that started it. Any manager, in any process, *attaches*
//! to a VM before acting on it: it opens a pidfd for the recorded pid, checks the recorded start
//! time (a reused pid is never signalled), asks the VMM for its status, scans the serial log for
//! the readiness marker, and from then on watches the VM: process exit through the pidfd, VMM
//! events (QMP `STOP`/`RESUME`/`SHUTDOWN`) and serial output through inotify. A VM whose VMM is
//! gone is marked stopped (a stop was asked for, or the guest powered itself off) or failed,
//! with the reason (a guest kernel panic is a failure; see `monitor`).
//!
//! ## Concurrency
//!
//! Creating a VM creates its directory with `mkdir(2)`, which is atomic: of two concurrent
//! starts with one name, exactly one succeeds and the other gets
//! [`ManagerError::AlreadyExists`]. The lifecycle verbs on one VM (start, stop, kill, pause,
//! resume, remove) serialise on its verb lock, across processes (see `lock`): `rm -f` while
//! another process starts the VM waits for the start and then removes what it made. A stop
//! holds the lock while it asks for the exit, not while the guest powers off, so a kill can
//! still force it.
//!
//! ## Nothing untracked
//!
//! Every process vm-rs spawns for a VM (its VMM, port forwarders, the virtiofsd of each shared
//! directory, see [`crate::virtiofs`]) carries the VM directory in
//! its environment ([`crate::process::OWNER_ENV`]), set before `exec`. So a VMM can be found
//! from its directory even when the process that spawned it died before any record named it:
//! a manager that finds a VM recorded `starting` whose starter is gone, or a VM not live whose
//! directory still owns processes, kills them and says so in the state's reason; removing a VM
//! kills whatever its directory owns before the directory goes.
//!
//! ## Damage is contained
//!
//! A VM whose records cannot be read (a truncated or garbage `state.json` or `config.json`, a
//! directory without a state record) is listed as [`VmListing::Damaged`] with the reason, next
//! to every other VM; [`VmManager::remove`] removes it, killing what its directory owns.

mod builder;
mod exec;
mod lock;
mod monitor;
mod readdress;
pub mod record;
mod snapshot;
#[cfg(test)]
mod tests;
mod vmm;
mod warm;
pub use snapshot::{RestoreOptions, SnapshotOptions};
pub use warm::{FileIdentity, WarmEntry, WarmKey, WARM_PREFIX};

use crate::config::{BackendKind, ConfigError, VmConfig};
use crate::devices::{AgentChannel, AgentTransport, DeviceSet, Disk, Nic, SharedFs};
use crate::driver::{BootSpec, DriverError, VmDriver, VmHandle};
use crate::process::{ProcessError, VmmProcess};
use crate::state::{Operation, StateError, VmState};
use builder::Drivers;
pub use builder::VmManagerBuilder;
pub use lock::LOCK_WAIT;
use lock::{VmLock, VM_LOCK};
use monitor::VmEntry;
use record::{files, now, PluggedDevice, RecordError, VmRecord, RECORD_VERSION};
use serde::Serialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Errors from [`VmManager`] verbs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// A VM with that name exists already.
    #[error("a vm named {name:?} already exists")]
    AlreadyExists {
        /// Name.
        name: String,
    },
    /// No VM with that name.
    #[error("no vm named {name:?}")]
    NotFound {
        /// Name.
        name: String,
    },
    /// The operation is not allowed in the VM's state.
    #[error(transparent)]
    State(#[from] StateError),
    /// The backend failed.
    #[error("vm {name:?}: backend error")]
    Driver {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: DriverError,
    },
    /// Process bookkeeping failed.
    #[error("vm {name:?}: process error")]
    Process {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: ProcessError,
    },
    /// Reading or writing the VM's records failed.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// File-system work in the data dir failed.
    #[error("cannot access {}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM stopped or failed while we waited for it.
    #[error("vm {name:?} is {state} (serial log: {})", serial_log.display())]
    NotRunning {
        /// Name.
        name: String,
        /// Its state.
        state: VmState,
        /// Where to look for what happened.
        serial_log: PathBuf,
    },
    /// Host networking (TAP/bridge/NAT, switch, port forwarding) could not be set up.
    #[error("vm {name:?}: network setup failed")]
    Network {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: crate::net::HostError,
    },
    /// The root filesystem overlay could not be created.
    #[error("vm {name:?}: root filesystem setup failed")]
    Rootfs {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: Box<crate::rootfs::RootfsError>,
    },
    /// A shared directory's daemon (virtiofsd) could not be started.
    #[error("vm {name:?}: shared directory setup failed")]
    Share {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: crate::virtiofs::VirtiofsError,
    },
    /// The vsock sidecar (`vhost-device-vsock`) could not be started.
    #[error("vm {name:?}: vsock setup failed")]
    Vsock {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: crate::vsock::VsockError,
    },
    /// Talking to the guest agent failed.
    #[error("vm {name:?}: guest agent error")]
    Agent {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: crate::agent::AgentError,
    },
    /// A verb was called with arguments that ask for nothing or contradict themselves.
    #[error("vm {name:?}: {reason}")]
    InvalidRequest {
        /// VM name.
        name: String,
        /// What is wrong with the request.
        reason: &'static str,
    },
    /// Another verb on the VM held its lock for longer than [`LOCK_WAIT`].
    #[error("vm {name:?} is busy: another operation on it did not finish within {secs:.1}s")]
    Busy {
        /// Name.
        name: String,
        /// Seconds waited.
        secs: f64,
    },
    /// The VM's records cannot be read (or reconciled with its VMM); it can still be removed.
    #[error("vm {name:?} is damaged")]
    Damaged {
        /// Name.
        name: String,
        /// What failed.
        #[source]
        source: Box<ManagerError>,
    },
    /// A snapshot verb failed or was refused ([`crate::snapshot`]).
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Waiting timed out.
    #[error("timed out after {secs:.1}s waiting for vm {name:?} to become {what}")]
    Timeout {
        /// Name.
        name: String,
        /// What we waited for.
        what: &'static str,
        /// Seconds waited.
        secs: f64,
    },
}

impl ManagerError {
    /// What kind of failure this is, looking through to the cause (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            ManagerError::Config(e) => e.kind(),
            ManagerError::AlreadyExists { .. } | ManagerError::State(_) => K::Conflict,
            ManagerError::NotFound { .. } => K::NotFound,
            ManagerError::Driver { source, .. } => source.kind(),
            ManagerError::Process { source, .. } => source.kind(),
            ManagerError::Record(e) => e.kind(),
            ManagerError::Io { .. } => K::Other,
            // The VM failed on its own: not something the caller's input or state caused.
            ManagerError::NotRunning {
                state: VmState::Failed { .. },
                ..
            } => K::Other,
            ManagerError::NotRunning { .. } => K::Conflict,
            ManagerError::Network { source, .. } => source.kind(),
            ManagerError::Rootfs { source, .. } => source.kind(),
            ManagerError::Agent { source, .. } => source.kind(),
            ManagerError::Share { source, .. } => source.kind(),
            ManagerError::Vsock { source, .. } => source.kind(),
            ManagerError::Timeout { .. } | ManagerError::Busy { .. } => K::Timeout,
            ManagerError::InvalidRequest { .. } => K::Invalid,
            ManagerError::Damaged { .. } => K::Other,
            ManagerError::Snapshot(e) => e.kind(),
        }
    }
}

impl ManagerError {
    fn driver(name: &str) -> impl FnOnce(DriverError) -> ManagerError + '_ {
        move |source| match source {
            DriverError::Config(e) => ManagerError::Config(e),
            source => ManagerError::Driver {
                name: name.to_string(),
                source,
            },
        }
    }
}

/// A VM as `list`/`inspect` show it.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// State.
    pub state: VmState,
    /// The VMM process runs but did not answer a short status probe (frozen or wedged): the
    /// state is the one last recorded.
    pub unresponsive: bool,
    /// Address from the readiness marker, when known.
    pub ip: Option<IpAddr>,
    /// Backend.
    pub backend: BackendKind,
    /// Why this backend was chosen (`auto` weighs what the VM needs and what is installed).
    pub backend_reason: Option<String>,
    /// VMM pid while live.
    pub pid: Option<u32>,
    /// Accelerator used (`kvm`/`tcg`).
    pub accel: Option<String>,
    /// vCPUs (after the last [`VmManager::resize`] while the VMM runs).
    pub cpus: u32,
    /// Memory in MiB (after the last [`VmManager::resize`] while the VMM runs).
    pub memory_mib: u64,
    /// Devices hot-plugged into the running VMM ([`VmManager::add_disk`], [`VmManager::add_net`]).
    pub devices: Vec<PluggedDevice>,
    /// The shared directories and, while the VM is live, whether each one's daemon still
    /// serves it.
    pub mounts: Vec<crate::virtiofs::MountInfo>,
    /// Unix time created.
    pub created_at: u64,
    /// Unix time of the last start.
    pub started_at: Option<u64>,
    /// Unix time it last stopped/failed.
    pub finished_at: Option<u64>,
    /// How the main process of an image VM ([`VmManager::exec_main`]) ended, once the VM has
    /// stopped because of it: the exit code, or 128 + signal.
    pub exit_code: Option<i32>,
    /// The image of an image VM ([`VmManager::start_image`]).
    pub image: Option<ImageRef>,
    /// Disks the manager adds to the configured ones (an image VM's root overlay).
    pub root_disk: Option<PathBuf>,
    /// The VM directory.
    pub dir: PathBuf,
    /// Serial console log.
    pub serial_log: PathBuf,
    /// VMM log.
    pub vmm_log: PathBuf,
    /// The configuration.
    pub config: VmConfig,
}

/// A VM whose records cannot be read, as `list`/`inspect` show it.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedVm {
    /// Name.
    pub name: String,
    /// Why it is damaged: the error and its causes, on one line.
    pub reason: String,
    /// The VM directory.
    pub dir: PathBuf,
    /// Processes its directory still owns (its VMM, if one runs), found from `/proc`.
    pub pids: Vec<u32>,
}

/// One VM in [`VmManager::list`]: readable, or damaged (see the module docs).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum VmListing {
    /// A VM whose records were read.
    Vm(Box<VmInfo>),
    /// A VM whose records cannot be read.
    Damaged(DamagedVm),
}

impl VmListing {
    /// The VM's name.
    pub fn name(&self) -> &str {
        match self {
            VmListing::Vm(i) => &i.name,
            VmListing::Damaged(d) => &d.name,
        }
    }

    /// The VM's information, unless it is damaged.
    pub fn info(&self) -> Option<&VmInfo> {
        match self {
            VmListing::Vm(i) => Some(i),
            VmListing::Damaged(_) => None,
        }
    }
}

/// Manages VMs under one data dir. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct VmManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    home: PathBuf,
    vms_dir: PathBuf,
    /// Where every VM's driver comes from (host detection, or the one injected).
    drivers: Drivers,
    entries: tokio::sync::Mutex<HashMap<String, Arc<VmEntry>>>,
    /// One agent connection per VM (the agent socket takes one client at a time).
    agents: tokio::sync::Mutex<HashMap<String, crate::agent::AgentClient>>,
    /// One attach at a time per VM name; attaches of different VMs (each may wait up to the
    /// status probe for a frozen VMM) run side by side.
    attaching: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Addresses restores in flight have picked and not yet written into their VM's
    /// configuration (see `snapshot::readdress`): clones started together never pick one twice.
    claimed: std::sync::Mutex<std::collections::HashSet<(String, std::net::Ipv4Addr)>>,
}

/// How long a graceful stop waits before forcing.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// After a stop's timeout: how long asking the VMM to quit may take before it is killed. A
/// stop therefore ends within its timeout plus this plus the kill.
pub const QUIT_GRACE: Duration = Duration::from_secs(2);

impl VmManager {
    /// A manager for the default data dir ([`crate::paths::data_dir`], `VMRS_HOME` overrides).
    /// Reattaches to VMs that are still running.
    pub async fn new() -> Result<Self, ManagerError> {
        Self::builder().build().await
    }

    /// A manager for a specific data dir.
    pub async fn with_home(home: impl Into<PathBuf>) -> Result<Self, ManagerError> {
        Self::builder().home(home).build().await
    }

    /// Configure a manager: its data dir and, for tests and embedders, the driver every VM
    /// of it runs on.
    pub fn builder() -> VmManagerBuilder {
        VmManagerBuilder::default()
    }

    /// Open the data dir, reattach to everything recorded there and clean up after VMs that
    /// died unwatched.
    async fn open(home: PathBuf, drivers: Drivers) -> Result<Self, ManagerError> {
        let vms_dir = crate::paths::vms_dir(&home);
        crate::paths::create_private_dir_all(&home)
            .and_then(|()| crate::paths::create_private_dir_all(&vms_dir))
            .and_then(|()| crate::paths::make_private(&vms_dir))
            .map_err(|source| ManagerError::Io {
                path: vms_dir.clone(),
                source,
            })?;
        let mgr = VmManager {
            inner: Arc::new(Inner {
                home,
                vms_dir,
                drivers,
                entries: tokio::sync::Mutex::new(HashMap::new()),
                agents: tokio::sync::Mutex::new(HashMap::new()),
                attaching: std::sync::Mutex::new(HashMap::new()),
                claimed: std::sync::Mutex::new(std::collections::HashSet::new()),
            }),
        };
        // Directories of removals whose remover died (their processes were killed first);
        // one whose remover still runs is left to it.
        if let Ok(rd) = std::fs::read_dir(&mgr.inner.vms_dir) {
            for e in rd.flatten() {
                let file_name = e.file_name();
                let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(TOMBSTONE)) else {
                    continue;
                };
                let remover = rest.rsplit_once('-').and_then(|(_, pid)| pid.parse::<u32>().ok());
                if remover.map_or(true, |pid| !crate::host::proc::exists(pid)) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        // Snapshots whose writer was killed before it published them.
        crate::snapshot::remove_stale_temps(&crate::snapshot::snapshots_dir(&mgr.inner.home));
        // Reattach to everything recorded here, marking dead VMs failed.
        let mut live = std::collections::HashSet::new();
        let names = mgr.names()?;
        let attached = futures::future::join_all(names.iter().map(|n| mgr.entry(n))).await;
        for (name, attached) in names.into_iter().zip(attached) {
            match attached {
                Ok(e) if e.state().is_live() => {
                    live.insert(name);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "cannot reattach");
                    // A damaged record whose VMM (or a sidecar) still runs: its TAPs, switch
                    // membership and forwarders are in use until `rm -f` kills it.
                    if !crate::process::owned_by(&mgr.vm_dir(&name)).is_empty() {
                        live.insert(name);
                    }
                }
            }
        }
        // Remove host network devices, switch memberships and forwarders of VMs that died
        // while no manager watched (crash, kill -9).
        let home = mgr.inner.home.clone();
        if let Err(e) = crate::net::host::reconcile(&home, &|vm: &str| live.contains(vm)).await {
            tracing::warn!(error = %e, "network reconciliation failed");
        }
        Ok(mgr)
    }

    /// The data dir.
    pub fn home(&self) -> &Path {
        &self.inner.home
    }

    /// Directory of VM `name`.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.inner.vms_dir.join(name)
    }

    fn names(&self) -> Result<Vec<String>, ManagerError> {
        let dir = &self.inner.vms_dir;
        let rd = std::fs::read_dir(dir).map_err(|source| ManagerError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| crate::config::validate_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Get (attaching if needed) the live entry for `name`.
    async fn entry(&self, name: &str) -> Result<Arc<VmEntry>, ManagerError> {
        crate::config::validate_name(name).map_err(|_| ManagerError::NotFound {
            name: name.to_string(),
        })?;
        if let Some(e) = self.inner.entries.lock().await.get(name) {
            return Ok(e.clone());
        }
        let gate = self
            .inner
            .attaching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        let _attaching = gate.lock().await;
        // attached by whoever held the gate before us
        if let Some(e) = self.inner.entries.lock().await.get(name) {
            return Ok(e.clone());
        }
        let dir = self.vm_dir(name);
        if !dir.is_dir() {
            return Err(ManagerError::NotFound {
                name: name.to_string(),
            });
        }
        let damaged = |source: ManagerError| ManagerError::Damaged {
            name: name.to_string(),
            source: Box::new(source),
        };
        let record = record::load_record(&dir).map_err(|e| damaged(e.into()))?;
        let config = record::load_config(&dir).map_err(|e| damaged(e.into()))?;
        let entry = VmEntry::attach(dir, config, record, &self.inner.drivers)
            .await
            .map_err(damaged)?;
        // A VM another process is still starting is not cached: ask again next time.
        if !(entry.state() == VmState::Starting && entry.handle().await.is_none()) {
            self.inner
                .entries
                .lock()
                .await
                .insert(name.to_string(), entry.clone());
        }
        Ok(entry)
    }

    /// Validate `config`, create the VM's directory and boot it. Returns once the VMM runs; use
    /// [`wait_ready`](Self::wait_ready) for the guest. On any error nothing is left behind.
    pub async fn start(&self, config: VmConfig) -> Result<VmInfo, ManagerError> {
        self.start_with(config, StartOptions::default()).await
    }

    /// [`start`](Self::start) booting into the root filesystem image `rootfs`
    /// ([`crate::rootfs::build_rootfs`]) with a guest agent: the VM gets its own qcow2 overlay
    /// of it in its directory (the image itself is never written) as the root disk, and the
    /// guest init switches root to it.
    pub async fn start_with_rootfs(&self, config: VmConfig, rootfs: &Path) -> Result<VmInfo, ManagerError> {
        let opts = StartOptions {
            rootfs: Some(rootfs.to_path_buf()),
            require_agent: true,
            ..StartOptions::default()
        };
        self.start_with(config, opts).await
    }

    /// [`start_with_rootfs`](Self::start_with_rootfs) for the root filesystem built from the
    /// image `reference`: the VM also records the image ([`StartOptions::image`]), which
    /// `inspect` shows and whose working directory, environment and user every exec in the VM
    /// gets by default.
    /// `rootfs_size` is the root disk's size in bytes (default: the image's file system with
    /// at least 1 GiB free, [`crate::rootfs::root_disk_size`]).
    pub async fn start_image(
        &self,
        config: VmConfig,
        rootfs: &crate::rootfs::Rootfs,
        reference: &str,
        rootfs_size: Option<u64>,
    ) -> Result<VmInfo, ManagerError> {
        let opts = StartOptions {
            rootfs: Some(rootfs.path.clone()),
            require_agent: true,
            rootfs_size,
            image: Some(ImageRef {
                reference: reference.to_string(),
                manifest: rootfs.manifest.to_string(),
                process: rootfs.process.clone(),
            }),
        };
        self.start_with(config, opts).await
    }

    /// [`start`](Self::start) with what other subsystems add to the VM ([`StartOptions`]).
    ///
    /// The order is what makes a refused VM leave nothing behind: the configuration is
    /// validated, the backend chosen, the VM's devices planned and checked against the
    /// backend's [`capabilities`](crate::driver::VmDriver::capabilities) — and only then are
    /// the VM directory, root overlay, host network devices and sidecars created.
    pub async fn start_with(&self, config: VmConfig, opts: StartOptions) -> Result<VmInfo, ManagerError> {
        let mut config = config;
        config.make_paths_absolute();
        config.validate()?;
        let name = config.name.clone();
        let dir = self.vm_dir(&name);
        let choice = self.start_driver(&config, &dir, &opts)?;
        let driver = choice.driver.clone();
        // recorded as run: which stack serves a user-mode NIC (inspect shows it)
        config.networks = crate::net::resolve_user_nat(&config.networks, &driver.capabilities());
        // Planned (and refused) before anything exists on the host.
        let devices = plan_devices(&config, &dir, self.home(), &opts, driver.as_ref())?;
        match crate::paths::create_private_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ManagerError::AlreadyExists { name });
            }
            Err(source) => return Err(ManagerError::Io { path: dir, source }),
        }
        // The verb lock for the whole start (a remove racing it waits), and the start lock
        // until the record names the VMM, so other processes can tell "being started" from
        // "its starter died". The guard is declared after the verb lock, so a failed start
        // removes its directory before the lock is released.
        // (Failing here, the directory was taken by a remove of it: nothing of ours is left.)
        let _lock = VmLock::acquire(&name, &dir, LOCK_WAIT).await?;
        let cleanup = DirGuard(Some(dir.clone()));
        let _start_lock = lock::lock_start(&dir)?;
        if config.serial_log.is_none() {
            config.serial_log = Some(dir.join(files::SERIAL_LOG));
        }
        record::write_json_atomic(&dir.join(files::CONFIG), &config)?;
        record::write_json_atomic(&dir.join(files::START), &opts)?;
        record::write_json_atomic(
            &dir.join(files::BACKEND_CHOICE),
            &record::BackendChoiceRecord {
                backend: driver.kind(),
                reason: choice.reason.clone(),
            },
        )?;
        let mut rec = VmRecord {
            version: RECORD_VERSION,
            name: name.clone(),
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
            .launch(&dir, &config, &opts, devices, &mut rec, driver, None)
            .await?;
        cleanup.disarm();
        self.inner
            .entries
            .lock()
            .await
            .insert(name.clone(), entry.clone());
        Ok(entry.info().await)
    }

    /// Boot a stopped or failed VM again with the configuration, disks and networks it was
    /// created with (`vmrs start NAME`, docker's habit). An image VM keeps its root overlay, so
    /// what the guest wrote survives. Starting a live VM is a conflict
    /// ([`StateError`]); if the boot fails the VM is left `failed` with the reason.
    pub async fn start_existing(&self, name: &str) -> Result<VmInfo, ManagerError> {
        let dir = self.vm_dir(name);
        let _lock = self.lock(name).await?;
        let entry = self.locked_entry(name).await?;
        entry.state().check(name, Operation::Start)?;
        let _start_lock = lock::lock_start(&dir)?;
        // Another process may have started it while we waited for the lock: the record on disk
        // is the truth.
        let mut rec = record::load_record(&dir)?;
        rec.state.check(name, Operation::Start)?;
        let config = record::load_config(&dir)?;
        let opts: StartOptions = record::load_json_or_default(&dir.join(files::START))?;
        let driver = self
            .inner
            .drivers
            .for_start(rec.backend)
            .map_err(ManagerError::driver(name))?;
        config.validate()?;
        let devices = plan_devices(&config, &dir, self.home(), &opts, driver.as_ref())?;
        entry.retire().await;
        self.inner.entries.lock().await.remove(name);
        self.drop_agent(name).await;
        rec.state = VmState::Starting;
        rec.handle = None;
        rec.ip = None;
        rec.started_at = Some(now());
        rec.finished_at = None;
        rec.exit_code = None;
        record::write_json_atomic(&dir.join(files::STATE), &rec)?;
        match self
            .launch(&dir, &config, &opts, devices, &mut rec, driver, None)
            .await
        {
            Ok(entry) => {
                self.inner
                    .entries
                    .lock()
                    .await
                    .insert(name.to_string(), entry.clone());
                Ok(entry.info().await)
            }
            Err(e) => {
                rec.state = VmState::Failed {
                    reason: format!("start failed: {}", error_chain(&e)),
                };
                rec.finished_at = Some(now());
                if let Err(w) = record::write_json_atomic(&dir.join(files::STATE), &rec) {
                    tracing::warn!(vm = %name, error = %w, "cannot record the failed start");
                }
                Err(e)
            }
        }
    }

    /// Create the host side of `devices` (root overlay, networks) and boot the VMM (from
    /// `snapshot`, when given). On error, what was created here is removed again.
    #[allow(clippy::too_many_arguments)]
    async fn launch(
        &self,
        dir: &Path,
        config: &VmConfig,
        opts: &StartOptions,
        mut devices: DeviceSet,
        rec: &mut VmRecord,
        driver: Arc<dyn VmDriver>,
        snapshot: Option<&Path>,
    ) -> Result<Arc<VmEntry>, ManagerError> {
        let name = &config.name;
        // The guest's host name is the VM's (the characters a host name cannot have become
        // '-'); the guest writes /etc/hosts for it where the root has none.
        let mut guest_params = vec![format!("vmrs.hostname={}", guest_hostname(name))];
        if let Some(rootfs) = &opts.rootfs {
            crate::rootfs::vm_overlay(rootfs, dir, opts.rootfs_size)
                .await
                .map_err(|e| ManagerError::Rootfs {
                    name: name.clone(),
                    source: Box::new(e),
                })?;
            guest_params.extend(crate::rootfs::root_cmdline());
        }
        // Host side of the networks (TAPs, bridges, switch sidecars, forwarders); recorded in
        // net.json and torn down when the VM stops, is removed, or is found dead.
        let net = if config.networks.is_empty() {
            None
        } else {
            let networks = crate::net::resolve_user_nat(&config.networks, &driver.capabilities());
            let st = crate::net::host::prepare(&self.inner.home, name, dir, &networks)
                .await
                .map_err(|source| ManagerError::Network {
                    name: name.clone(),
                    source,
                })?;
            guest_params.extend(st.guest_cmdline());
            devices.nics = st.nics.iter().map(Nic::from).collect();
            devices.netns = st.netns.clone();
            Some(st)
        };
        // The shared directories' daemons (virtiofsd), listening before the VMM starts; recorded
        // in virtiofsd.json and killed when the VM ends, is removed, or is found dead.
        guest_params.extend(crate::virtiofs::guest_params(&config.shared_dirs));
        let booted = match crate::virtiofs::start(dir, &devices.shared_dirs).await {
            // the vsock sidecar (QEMU with a vsock agent) likewise, in vsock.json
            Ok(_) => match crate::vsock::start(dir, devices.agent.as_ref()).await {
                Ok(()) => {
                    let booted = self
                        .boot(dir, config, rec, driver, devices, guest_params, snapshot)
                        .await;
                    if booted.is_err() {
                        crate::virtiofs::stop(dir);
                        crate::vsock::stop(dir);
                    }
                    booted
                }
                Err(source) => {
                    crate::virtiofs::stop(dir);
                    Err(ManagerError::Vsock {
                        name: name.clone(),
                        source,
                    })
                }
            },
            Err(source) => Err(ManagerError::Share {
                name: name.clone(),
                source,
            }),
        };
        match (booted, net) {
            (Ok(e), _) => Ok(e),
            (Err(e), Some(st)) => {
                if let Err(t) = crate::net::host::teardown(&st).await {
                    tracing::warn!(vm = %name, error = %t, "network teardown after failed boot");
                }
                Err(e)
            }
            (Err(e), None) => Err(e),
        }
    }

    /// Boot the VMM (from the snapshot in `snapshot` when given, see [`crate::snapshot`]).
    #[allow(clippy::too_many_arguments)]
    async fn boot(
        &self,
        dir: &Path,
        config: &VmConfig,
        rec: &mut VmRecord,
        driver: Arc<dyn VmDriver>,
        devices: DeviceSet,
        guest_params: Vec<String>,
        snapshot: Option<&Path>,
    ) -> Result<Arc<VmEntry>, ManagerError> {
        let serial_log = config
            .serial_log
            .clone()
            .unwrap_or_else(|| dir.join(files::SERIAL_LOG));
        let spec = BootSpec {
            config,
            vm_dir: dir,
            serial_log,
            vmm_log: dir.join(files::VMM_LOG),
            devices,
            guest_params,
        };
        // what a snapshot of the VM records; a stale RAM file of an earlier run is not reused
        record::write_json_atomic(&dir.join(crate::vm_dir::VmDir::DEVICES), &spec.devices)?;
        let _ = std::fs::remove_file(dir.join(crate::vm_dir::VmDir::MEMORY));
        let launched = match snapshot {
            Some(snap) => driver.restore(&spec, snap).await,
            None => driver.boot(&spec).await,
        }
        .map_err(ManagerError::driver(&config.name))?;
        rec.handle = Some(launched.handle.clone());
        rec.state = VmState::Running;
        if let Err(e) = record::write_json_atomic(&dir.join(files::STATE), rec) {
            let _ = launched.process.kill();
            return Err(e.into());
        }
        Ok(VmEntry::launched(
            dir.to_path_buf(),
            config.clone(),
            rec.clone(),
            driver,
            launched.process,
        ))
    }

    /// Current state of `name`.
    pub async fn state(&self, name: &str) -> Result<VmState, ManagerError> {
        Ok(self.entry(name).await?.state())
    }

    /// Full information about `name` ([`ManagerError::Damaged`] when its records cannot be
    /// read; [`listing`](Self::listing) shows such a VM too).
    pub async fn inspect(&self, name: &str) -> Result<VmInfo, ManagerError> {
        Ok(self.entry(name).await?.info().await)
    }

    /// `name` as [`list`](Self::list) shows it: its information, or why it is damaged.
    pub async fn listing(&self, name: &str) -> Result<VmListing, ManagerError> {
        match self.entry(name).await {
            Ok(e) => Ok(VmListing::Vm(Box::new(e.info().await))),
            Err(e @ ManagerError::Damaged { .. }) => {
                let dir = self.vm_dir(name);
                Ok(VmListing::Damaged(DamagedVm {
                    name: name.to_string(),
                    reason: error_chain(&e),
                    pids: crate::process::owned_by(&dir).iter().map(|p| p.pid).collect(),
                    dir,
                }))
            }
            Err(e) => Err(e),
        }
    }

    /// All VMs, sorted by name. A VM whose records cannot be read is listed as damaged; it
    /// never hides the others.
    pub async fn list(&self) -> Result<Vec<VmListing>, ManagerError> {
        let mut out = Vec::new();
        let names: Vec<String> = self
            .names()?
            .into_iter()
            // being created right now: not a VM yet
            .filter(|name| {
                let dir = self.vm_dir(name);
                dir.join(files::STATE).exists() || !lock::held(&dir, VM_LOCK)
            })
            .collect();
        let listings = futures::future::join_all(names.iter().map(|n| self.listing(n))).await;
        for (name, listing) in names.into_iter().zip(listings) {
            let dir = self.vm_dir(&name);
            match listing {
                Ok(l) => out.push(l),
                Err(ManagerError::NotFound { .. }) => {} // removed meanwhile
                Err(e) => out.push(VmListing::Damaged(DamagedVm {
                    name: name.clone(),
                    reason: error_chain(&e),
                    pids: crate::process::owned_by(&dir).iter().map(|p| p.pid).collect(),
                    dir,
                })),
            }
        }
        Ok(out)
    }

    /// Take the verb lock of `name` (see `lock`).
    async fn lock(&self, name: &str) -> Result<VmLock, ManagerError> {
        crate::config::validate_name(name).map_err(|_| ManagerError::NotFound {
            name: name.to_string(),
        })?;
        VmLock::acquire(name, &self.vm_dir(name), LOCK_WAIT).await
    }

    /// The entry of `name` for a verb that holds its lock: a cached entry another process
    /// has overtaken (the record names another VMM) is dropped and the VM attached afresh.
    async fn locked_entry(&self, name: &str) -> Result<Arc<VmEntry>, ManagerError> {
        let cached = self.inner.entries.lock().await.get(name).cloned();
        if let Some(e) = cached {
            let on_disk = record::load_record(&self.vm_dir(name)).ok().map(|r| r.handle);
            if on_disk != Some(e.handle().await) {
                e.retire().await;
                self.inner.entries.lock().await.remove(name);
            }
        }
        self.entry(name).await
    }

    /// Subscribe to state changes of `name`.
    pub async fn subscribe(&self, name: &str) -> Result<tokio::sync::watch::Receiver<VmState>, ManagerError> {
        Ok(self.entry(name).await?.subscribe())
    }

    /// Handle of a live VM (for backend-specific operations).
    pub async fn handle(&self, name: &str) -> Result<Option<VmHandle>, ManagerError> {
        Ok(self.entry(name).await?.handle().await)
    }

    /// Wait until the guest reports ready; returns its address.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<IpAddr, ManagerError> {
        let entry = self.entry(name).await?;
        let mut rx = entry.subscribe();
        let wait = async {
            loop {
                let st = rx.borrow_and_update().clone();
                match &st {
                    VmState::Ready { ip } => return Ok(*ip),
                    s if !s.is_live() => {
                        return Err(ManagerError::NotRunning {
                            name: name.to_string(),
                            state: st.clone(),
                            serial_log: entry.serial_log(),
                        })
                    }
                    _ => {}
                }
                if rx.changed().await.is_err() {
                    return Err(ManagerError::NotRunning {
                        name: name.to_string(),
                        state: entry.state(),
                        serial_log: entry.serial_log(),
                    });
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(ManagerError::Timeout {
                name: name.to_string(),
                what: "ready",
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// Wait until all `names` are ready; returns their addresses in order.
    pub async fn wait_all_ready(
        &self,
        names: &[&str],
        timeout: Duration,
    ) -> Result<Vec<IpAddr>, ManagerError> {
        let futs = names.iter().map(|n| self.wait_ready(n, timeout));
        futures::future::try_join_all(futs).await
    }

    /// Pause the vCPUs.
    pub async fn pause(&self, name: &str) -> Result<(), ManagerError> {
        let _lock = self.lock(name).await?;
        let entry = self.locked_entry(name).await?;
        entry.state().check(name, Operation::Pause)?;
        let handle = entry.require_handle(name).await?;
        entry
            .driver()
            .pause(&handle)
            .await
            .map_err(ManagerError::driver(name))?;
        entry.transition(VmState::Paused).await?;
        Ok(())
    }

    /// Resume the vCPUs; the VM returns to ready (when it was) or running.
    pub async fn resume(&self, name: &str) -> Result<(), ManagerError> {
        let _lock = self.lock(name).await?;
        let entry = self.locked_entry(name).await?;
        entry.state().check(name, Operation::Resume)?;
        let handle = entry.require_handle(name).await?;
        entry
            .driver()
            .resume(&handle)
            .await
            .map_err(ManagerError::driver(name))?;
        entry.resumed().await?;
        Ok(())
    }

    /// Graceful stop: press the power button, wait up to `timeout` for the guest to power off,
    /// then ask the VMM to quit (up to [`QUIT_GRACE`]), then kill it. The graceful part is
    /// bounded by `timeout` as a whole, so a frozen VMM is killed on time.
    ///
    /// Stopping a VM that is not running (stopped or failed) is a no-op that returns its state,
    /// as `docker stop` of an exited container is: the caller wanted it off, and it is.
    pub async fn stop(&self, name: &str, timeout: Duration) -> Result<VmState, ManagerError> {
        let lock = self.lock(name).await?;
        let entry = self.locked_entry(name).await?;
        let current = entry.state();
        if !current.is_live() {
            return Ok(current);
        }
        current.check(name, Operation::Stop)?;
        entry.request_exit(Operation::Stop).await?;
        self.drop_agent(name).await;
        let handle = entry.require_handle(name).await?;
        let driver = entry.driver();
        // The exit is recorded as asked for: from here on only this VMM (pidfd) is forced, and
        // another verb (a second Ctrl-C's kill) need not wait for a VMM that may not answer.
        drop(lock);
        // Everything graceful happens within `timeout`, even when the VMM does not answer.
        let graceful = async {
            // A paused guest cannot react to the power button.
            if entry.state() == VmState::Paused {
                let _ = driver.resume(&handle).await;
            }
            match driver.request_shutdown(&handle).await {
                Ok(()) => entry.wait_finished(timeout).await,
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "power button failed; forcing");
                    None
                }
            }
        };
        match tokio::time::timeout(timeout, graceful).await {
            Ok(Some(st)) => return Ok(st),
            Ok(None) => {}
            Err(_) => {
                tracing::warn!(vm = %name, "guest did not power off within {:.1}s; forcing", timeout.as_secs_f64())
            }
        }
        let quit = async {
            driver.quit(&handle).await.ok()?;
            entry.wait_finished(QUIT_GRACE).await
        };
        if let Ok(Some(st)) = tokio::time::timeout(QUIT_GRACE, quit).await {
            return Ok(st);
        }
        entry.kill().await.map_err(|source| ManagerError::Process {
            name: name.to_string(),
            source,
        })?;
        Ok(entry
            .wait_finished(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| entry.state()))
    }

    /// Kill the VMM immediately.
    pub async fn kill(&self, name: &str) -> Result<VmState, ManagerError> {
        let _lock = self.lock(name).await?;
        let entry = self.locked_entry(name).await?;
        self.kill_locked(name, &entry).await
    }

    async fn kill_locked(&self, name: &str, entry: &VmEntry) -> Result<VmState, ManagerError> {
        entry.state().check(name, Operation::Kill)?;
        entry.request_exit(Operation::Kill).await?;
        self.drop_agent(name).await;
        entry.kill().await.map_err(|source| ManagerError::Process {
            name: name.to_string(),
            source,
        })?;
        Ok(entry
            .wait_finished(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| entry.state()))
    }

    /// Remove a stopped or failed VM and its directory; `force` kills a live one first.
    ///
    /// A damaged VM ([`VmListing::Damaged`]) is removed too, once nothing its directory owns
    /// runs — `force` kills what does. Whatever the records say, no process the directory owns
    /// survives it.
    pub async fn remove(&self, name: &str, force: bool) -> Result<(), ManagerError> {
        let _lock = self.lock(name).await?;
        let dir = self.vm_dir(name);
        let entry = match self.locked_entry(name).await {
            Ok(e) => Some(e),
            Err(ManagerError::Damaged { .. }) => None,
            Err(e) => return Err(e),
        };
        match &entry {
            Some(entry) => {
                if entry.state().is_live() {
                    if !force {
                        entry.state().check(name, Operation::Remove)?;
                    }
                    self.kill_locked(name, entry).await?;
                }
                entry.retire().await;
            }
            None if !force && !crate::process::owned_by(&dir).is_empty() => {
                return Err(ManagerError::InvalidRequest {
                    name: name.to_string(),
                    reason: "its records are damaged and its vmm still runs; force removes it",
                });
            }
            None => {}
        }
        self.inner.entries.lock().await.remove(name);
        self.drop_agent(name).await;
        let teardown = crate::net::host::teardown_vm_dir(&dir).await;
        crate::virtiofs::stop(&dir);
        crate::vsock::stop(&dir);
        // anything the directory still owns (a VMM or forwarder no record names)
        let strays = crate::process::kill_owned_by(&dir);
        // a namespace of the VM's own whose record was unreadable: a mount would keep the
        // directory from going
        if let Err(e) = crate::net::slirp::remove_netns(&crate::net::slirp::netns_path(&dir)) {
            tracing::warn!(vm = %name, error = %e, "removing the vm's network namespace");
        }
        if !strays.is_empty() {
            tracing::warn!(vm = %name, pids = ?strays, "killed processes no record tracked");
        }
        match teardown {
            Ok(()) => {}
            // a damaged VM's network record may be damaged too: what it named is reconciled
            // by the next manager (its devices carry the VM's name)
            // and a forced remove always removes (docker rm -f): an unreadable or failing
            // network record must not keep a VM that can never be removed; its tagged devices
            // are reconciled the same way
            Err(e) if entry.is_none() || force => {
                tracing::warn!(vm = %name, error = %e, "network teardown")
            }
            Err(source) => {
                return Err(ManagerError::Network {
                    name: name.to_string(),
                    source,
                })
            }
        }
        // Out of the way in one step, so a verb waiting for the lock finds the VM gone.
        let tomb = self
            .inner
            .vms_dir
            .join(format!("{TOMBSTONE}{name}-{}", std::process::id()));
        std::fs::rename(&dir, &tomb).map_err(|source| ManagerError::Io {
            path: dir.clone(),
            source,
        })?;
        // The VM is gone from here on; what is left of the tombstone the next manager removes.
        if let Err(e) = std::fs::remove_dir_all(&tomb) {
            tracing::warn!(vm = %name, path = %tomb.display(), error = %e, "cannot delete the removed vm's files");
        }
        Ok(())
    }
}

/// What other subsystems add to a VM at start; saved as `start.json` in the VM's directory so
/// [`VmManager::start_existing`] boots the same machine again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StartOptions {
    /// Boot into this root filesystem image (an ext4 image from
    /// [`crate::rootfs::build_rootfs`]) through a per-VM qcow2 overlay.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// The VM needs the guest agent (exec, copy, an image's process): refused up front on a
    /// backend with no agent transport. Without it the VM gets an agent whenever the backend
    /// can give it one.
    #[serde(default)]
    pub require_agent: bool,
    /// Size in bytes of the VM's root disk (its overlay of `rootfs`; the guest grows the file
    /// system to fill it). Default: [`crate::rootfs::root_disk_size`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_size: Option<u64>,
    /// The image the root filesystem was built from ([`VmManager::start_image`]): shown by
    /// `inspect`, and its working directory, environment and user are the defaults of every
    /// exec in the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
}

/// The image an image VM runs, as [`StartOptions::image`] records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ImageRef {
    /// The reference it was started from (`registry/repo:tag`).
    pub reference: String,
    /// Its manifest digest (`sha256:…`).
    pub manifest: String,
    /// Its process settings (entrypoint, cmd, env, working dir, user).
    #[serde(default)]
    pub process: crate::agent::ImageProcess,
}

/// The guest host name for VM `name`: what a host name cannot hold becomes `-`.
pub fn guest_hostname(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The devices [`VmManager::start_with`] gives a VM whose directory is `dir` under the data dir
/// `home`, planned without touching the host and checked against `driver`'s capabilities: an
/// `Err` here means the VM cannot run on that backend, and nothing was created. (Host-side
/// details such as a TAP device's namespace are final only after the network is prepared.)
pub fn plan_devices(
    config: &VmConfig,
    dir: &Path,
    home: &Path,
    opts: &StartOptions,
    driver: &dyn VmDriver,
) -> Result<DeviceSet, ManagerError> {
    let caps = driver.capabilities();
    let name = &config.name;
    let unsupported = |feature| ManagerError::Driver {
        name: name.clone(),
        source: DriverError::Unsupported {
            backend: driver.kind(),
            feature,
        },
    };
    let mut devices = DeviceSet {
        disks: config
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| Disk::from_config(i, d))
            .collect(),
        shared_dirs: config
            .shared_dirs
            .iter()
            .enumerate()
            .map(|(i, d)| SharedFs {
                tag: d.tag.clone(),
                host_path: d.host_path.clone(),
                read_only: d.read_only,
                socket: crate::vm_dir::VmDir::new(dir).fs_socket(i),
            })
            .collect(),
        entropy: caps.entropy,
        memory: driver.preferred_memory(dir),
        ..DeviceSet::default()
    };
    // virtio-fs daemons map guest RAM: it must be shareable (the backend's preferred file,
    // mapped shared, already is)
    if !devices.shared_dirs.is_empty()
        && !matches!(
            devices.memory,
            crate::devices::MemoryBackend::File { shared: true, .. }
                | crate::devices::MemoryBackend::Memfd { shared: true }
        )
    {
        devices.memory = crate::devices::MemoryBackend::Memfd { shared: true };
    }
    if opts.rootfs.is_some() {
        devices.disks.push(crate::rootfs::root_disk(dir));
    }
    if !config.networks.is_empty() {
        let networks = crate::net::resolve_user_nat(&config.networks, &caps);
        let net_err = |source: crate::net::host::HostError| ManagerError::Network {
            name: name.clone(),
            source,
        };
        let nics = crate::net::plan(name, dir, home, &networks).map_err(|e| net_err(e.into()))?;
        devices.nics = nics.iter().map(Nic::from).collect();
        devices.netns = if crate::net::uses_slirp(&networks) {
            if crate::net::slirp::program().is_none() {
                return Err(net_err(crate::net::slirp::SlirpError::NotFound.into()));
            }
            Some(crate::net::slirp::netns_path(dir))
        } else {
            crate::net::vmm_netns(&networks).map(Path::to_path_buf)
        };
    }
    // The agent's channel (exec, copy): the configured transport, else the backend's first.
    let process_log = opts
        .rootfs
        .is_some()
        .then(|| dir.join(crate::vm_dir::VmDir::PROCESS_LOG));
    let transport = match config.agent_transport {
        Some(t) if caps.agent_transports.contains(&t) => Some(t),
        Some(AgentTransport::Vsock) => return Err(unsupported("the agent over vsock")),
        Some(_) => return Err(unsupported("the agent over virtio-serial")),
        None if caps.agent_default || opts.require_agent => caps.agent_transports.first().copied(),
        None => None,
    };
    match transport {
        Some(AgentTransport::VirtioSerial) => {
            devices.agent = Some(AgentChannel::VirtioSerial {
                socket: dir.join(exec::AGENT_SOCKET),
                process_log,
            });
        }
        Some(AgentTransport::Vsock) => {
            let vhost_user = (driver.kind() == crate::config::BackendKind::Qemu)
                .then(|| crate::vm_dir::VmDir::new(dir).file(crate::vm_dir::VmDir::VSOCK_VHOST_SOCKET));
            if vhost_user.is_some()
                && !matches!(
                    devices.memory,
                    crate::devices::MemoryBackend::File { shared: true, .. }
                        | crate::devices::MemoryBackend::Memfd { shared: true }
                )
            {
                // the vhost-user sidecar maps guest RAM
                devices.memory = crate::devices::MemoryBackend::Memfd { shared: true };
            }
            devices.agent = Some(AgentChannel::Vsock {
                cid: crate::vsock::GUEST_CID,
                port: vmrs_proto::VSOCK_PORT,
                socket: dir.join(exec::AGENT_SOCKET),
                vhost_user,
                process_log,
            });
        }
        None if opts.require_agent => return Err(unsupported("the guest agent (exec, cp, images)")),
        None => {}
    }
    caps.check(driver.kind(), config, &devices)
        .map_err(ManagerError::driver(name))?;
    Ok(devices)
}

/// An error and its causes on one line, for a state record's reason.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Prefix of a VM directory being removed (not a valid VM name).
const TOMBSTONE: &str = ".removing-";

/// The VM's start lock, unless a start holds it right now (see `lock::try_lock_start`).
fn no_start_in_progress(dir: &Path) -> Option<std::fs::File> {
    lock::try_lock_start(dir)
}

/// Removes a half-created VM directory unless disarmed.
struct DirGuard(Option<PathBuf>);

impl DirGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[allow(dead_code)]
fn _assert_send(m: &VmManager, c: VmConfig) {
    fn is_send<T: Send>(_: T) {}
    is_send(m.start(c));
    let _ = VmmProcess::attach;
}
