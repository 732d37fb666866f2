//! [`VmManager`]: the verbs (start, stop, kill, pause, resume, state, list, remove, wait_ready,
//! wait_all_ready), one directory per VM, and reattaching to VMs started by other processes.
//!
//! ## Persistence and reattach
//!
//! Each VM lives in `$VMRS_HOME/vms/<name>/` ([`record::files`]): `config.json`, `state.json`
//! (written atomically), `serial.log`, `vmm.log`, the VMM's sockets, the guest agent's socket
//! `agent.sock` (see [`VmManager::exec`]) and, for VMs started from an image, `root.qcow2`
//! (see [`VmManager::start_with_rootfs`]). The VMM runs in its own
//! session, so it outlives the process that started it. Any manager, in any process, *attaches*
//! to a VM before acting on it: it opens a pidfd for the recorded pid, checks the recorded start
//! time (a reused pid is never signalled), asks the VMM for its status, scans the serial log for
//! the readiness marker, and from then on watches the VM: process exit through the pidfd, VMM
//! events (QMP `STOP`/`RESUME`/`SHUTDOWN`) and serial output through inotify. A VM whose VMM is
//! gone is marked stopped (when the guest powered itself off) or failed, with the reason.
//!
//! ## Concurrency
//!
//! Creating a VM creates its directory with `mkdir(2)`, which is atomic: of two concurrent
//! starts with one name, exactly one succeeds and the other gets
//! [`ManagerError::AlreadyExists`].

mod exec;
mod monitor;
pub mod record;

use crate::config::{BackendKind, ConfigError, VmConfig};
use crate::driver::{self, BootSpec, DriverError, VmDriver, VmHandle};
use crate::process::{ProcessError, VmmProcess};
use crate::state::{Operation, StateError, VmState};
use monitor::VmEntry;
use record::{files, now, RecordError, VmRecord, RECORD_VERSION};
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
    /// Talking to the guest agent failed.
    #[error("vm {name:?}: guest agent error")]
    Agent {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: crate::agent::AgentError,
    },
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
    /// Address from the readiness marker, when known.
    pub ip: Option<String>,
    /// Backend.
    pub backend: BackendKind,
    /// VMM pid while live.
    pub pid: Option<u32>,
    /// Accelerator used (`kvm`/`tcg`).
    pub accel: Option<String>,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Unix time created.
    pub created_at: u64,
    /// Unix time of the last start.
    pub started_at: Option<u64>,
    /// Unix time it last stopped/failed.
    pub finished_at: Option<u64>,
    /// The VM directory.
    pub dir: PathBuf,
    /// Serial console log.
    pub serial_log: PathBuf,
    /// VMM log.
    pub vmm_log: PathBuf,
    /// The configuration.
    pub config: VmConfig,
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
    entries: tokio::sync::Mutex<HashMap<String, Arc<VmEntry>>>,
    /// One agent connection per VM (the agent socket takes one client at a time).
    agents: tokio::sync::Mutex<HashMap<String, crate::agent::AgentClient>>,
}

/// How long a graceful stop waits before forcing.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl VmManager {
    /// A manager for the default data dir ([`crate::paths::data_dir`], `VMRS_HOME` overrides).
    /// Reattaches to VMs that are still running.
    pub async fn new() -> Result<Self, ManagerError> {
        Self::with_home(crate::paths::data_dir()).await
    }

    /// A manager for a specific data dir.
    pub async fn with_home(home: impl Into<PathBuf>) -> Result<Self, ManagerError> {
        let home = home.into();
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
                entries: tokio::sync::Mutex::new(HashMap::new()),
                agents: tokio::sync::Mutex::new(HashMap::new()),
            }),
        };
        // Reattach to everything recorded here, marking dead VMs failed.
        let mut live = std::collections::HashSet::new();
        for name in mgr.names()? {
            match mgr.entry(&name).await {
                Ok(e) if e.state().is_live() => {
                    live.insert(name);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(vm = %name, error = %e, "cannot reattach"),
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
            .filter(|e| e.path().join(files::STATE).is_file())
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
        let mut entries = self.inner.entries.lock().await;
        if let Some(e) = entries.get(name) {
            return Ok(e.clone());
        }
        let dir = self.vm_dir(name);
        if !dir.join(files::STATE).is_file() {
            return Err(ManagerError::NotFound {
                name: name.to_string(),
            });
        }
        let record = record::load_record(&dir)?;
        let config = record::load_config(&dir)?;
        let entry = VmEntry::attach(dir, config, record).await?;
        // A VM another process is still starting is not cached: ask again next time.
        if !(entry.state() == VmState::Starting && entry.handle().await.is_none()) {
            entries.insert(name.to_string(), entry.clone());
        }
        Ok(entry)
    }

    /// Validate `config`, create the VM's directory and boot it. Returns once the VMM runs; use
    /// [`wait_ready`](Self::wait_ready) for the guest. On any error nothing is left behind.
    pub async fn start(&self, config: VmConfig) -> Result<VmInfo, ManagerError> {
        self.start_with(config, Vec::new(), Vec::new()).await
    }

    /// [`start`](Self::start) with extra kernel parameters and VMM arguments contributed by
    /// other subsystems (networking, agent).
    pub async fn start_with(
        &self,
        config: VmConfig,
        extra_cmdline: Vec<String>,
        extra_args: Vec<std::ffi::OsString>,
    ) -> Result<VmInfo, ManagerError> {
        self.start_impl(config, None, extra_cmdline, extra_args).await
    }

    /// [`start_with`](Self::start_with) booting into the root filesystem image `rootfs`
    /// ([`crate::rootfs::build_rootfs`]): the VM gets its own qcow2 overlay of it in its
    /// directory (the image itself is never written) as the root disk, and the guest init
    /// switches root to it.
    pub async fn start_with_rootfs(
        &self,
        config: VmConfig,
        rootfs: &Path,
        extra_cmdline: Vec<String>,
        extra_args: Vec<std::ffi::OsString>,
    ) -> Result<VmInfo, ManagerError> {
        self.start_impl(config, Some(rootfs), extra_cmdline, extra_args)
            .await
    }

    async fn start_impl(
        &self,
        config: VmConfig,
        rootfs: Option<&Path>,
        extra_cmdline: Vec<String>,
        extra_args: Vec<std::ffi::OsString>,
    ) -> Result<VmInfo, ManagerError> {
        let mut config = config;
        config.make_paths_absolute();
        config.validate()?;
        let name = config.name.clone();
        let driver = driver::detect(config.backend).map_err(ManagerError::driver(&name))?;
        let dir = self.vm_dir(&name);
        match crate::paths::create_private_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ManagerError::AlreadyExists { name });
            }
            Err(source) => return Err(ManagerError::Io { path: dir, source }),
        }
        let cleanup = DirGuard(Some(dir.clone()));
        // Held until the record names the VMM, so other processes can tell "being started"
        // from "its starter died" (see `start_in_progress`).
        let _start_lock = lock_start(&dir)?;
        if config.serial_log.is_none() {
            config.serial_log = Some(dir.join(files::SERIAL_LOG));
        }
        record::write_json_atomic(&dir.join(files::CONFIG), &config)?;
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
        };
        record::write_json_atomic(&dir.join(files::STATE), &rec)?;
        // Host side of the networks (TAPs, bridges, switch sidecars, forwarders); recorded in
        // net.json and torn down when the VM stops, is removed, or is found dead.
        let (mut extra_cmdline, mut extra_args) = (extra_cmdline, extra_args);
        if let Some(rootfs) = rootfs {
            let (_, args) =
                crate::rootfs::vm_overlay(rootfs, &dir)
                    .await
                    .map_err(|e| ManagerError::Rootfs {
                        name: name.clone(),
                        source: Box::new(e),
                    })?;
            extra_args.extend(args);
            extra_cmdline.extend(crate::rootfs::root_cmdline());
        }
        let net = if config.networks.is_empty() {
            None
        } else {
            let st = crate::net::host::prepare(&self.inner.home, &name, &dir, &config.networks)
                .await
                .map_err(|source| ManagerError::Network {
                    name: name.clone(),
                    source,
                })?;
            extra_cmdline.extend(st.guest_cmdline());
            extra_args.extend(st.qemu_args().into_iter().map(std::ffi::OsString::from));
            Some(st)
        };
        // The guest agent's port (exec, copy); its host end is `<vm dir>/agent.sock`.
        if driver.kind() == BackendKind::Qemu {
            extra_args.extend(crate::agent::qemu_args(&dir.join(exec::AGENT_SOCKET)));
        }
        let booted = self
            .boot(&dir, &config, &mut rec, driver, extra_cmdline, extra_args)
            .await;
        let entry = match (booted, net) {
            (Ok(e), _) => e,
            (Err(e), Some(st)) => {
                if let Err(t) = crate::net::host::teardown(&st).await {
                    tracing::warn!(vm = %name, error = %t, "network teardown after failed boot");
                }
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        };
        cleanup.disarm();
        self.inner
            .entries
            .lock()
            .await
            .insert(name.clone(), entry.clone());
        Ok(entry.info().await)
    }

    async fn boot(
        &self,
        dir: &Path,
        config: &VmConfig,
        rec: &mut VmRecord,
        driver: Arc<dyn VmDriver>,
        extra_cmdline: Vec<String>,
        extra_args: Vec<std::ffi::OsString>,
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
            extra_cmdline,
            extra_args,
        };
        let launched = driver
            .boot(&spec)
            .await
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

    /// Full information about `name`.
    pub async fn inspect(&self, name: &str) -> Result<VmInfo, ManagerError> {
        Ok(self.entry(name).await?.info().await)
    }

    /// All VMs, sorted by name.
    pub async fn list(&self) -> Result<Vec<VmInfo>, ManagerError> {
        let mut out = Vec::new();
        for name in self.names()? {
            match self.entry(&name).await {
                Ok(e) => out.push(e.info().await),
                Err(ManagerError::NotFound { .. }) => {} // removed meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(out)
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
                    VmState::Ready { ip } => {
                        return ip.parse::<IpAddr>().map_err(|_| ManagerError::NotRunning {
                            name: name.to_string(),
                            state: st.clone(),
                            serial_log: entry.serial_log(),
                        })
                    }
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
        let entry = self.entry(name).await?;
        entry.state().check(name, Operation::Pause)?;
        let handle = entry.require_handle(name).await?;
        entry
            .driver()
            .pause(&handle)
            .await
            .map_err(ManagerError::driver(name))?;
        entry.transition(VmState::Paused).await;
        Ok(())
    }

    /// Resume the vCPUs; the VM returns to ready (when it was) or running.
    pub async fn resume(&self, name: &str) -> Result<(), ManagerError> {
        let entry = self.entry(name).await?;
        entry.state().check(name, Operation::Resume)?;
        let handle = entry.require_handle(name).await?;
        entry
            .driver()
            .resume(&handle)
            .await
            .map_err(ManagerError::driver(name))?;
        entry.resumed().await;
        Ok(())
    }

    /// Graceful stop: press the power button, wait up to `timeout` for the guest to power off,
    /// then ask the VMM to quit, then kill it.
    pub async fn stop(&self, name: &str, timeout: Duration) -> Result<VmState, ManagerError> {
        let entry = self.entry(name).await?;
        entry.state().check(name, Operation::Stop)?;
        entry.set_stop_requested();
        self.drop_agent(name).await;
        let handle = entry.require_handle(name).await?;
        let driver = entry.driver();
        // A paused guest cannot react to the power button.
        if entry.state() == VmState::Paused {
            let _ = driver.resume(&handle).await;
        }
        match driver.request_shutdown(&handle).await {
            Ok(()) => {
                if let Some(st) = entry.wait_finished(timeout).await {
                    return Ok(st);
                }
                tracing::warn!(vm = %name, "guest did not power off within {:.1}s; forcing", timeout.as_secs_f64());
            }
            Err(e) => tracing::warn!(vm = %name, error = %e, "power button failed; forcing"),
        }
        if driver.quit(&handle).await.is_ok() {
            if let Some(st) = entry.wait_finished(Duration::from_secs(3)).await {
                return Ok(st);
            }
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
        let entry = self.entry(name).await?;
        entry.state().check(name, Operation::Kill)?;
        entry.set_stop_requested();
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
    pub async fn remove(&self, name: &str, force: bool) -> Result<(), ManagerError> {
        let entry = self.entry(name).await?;
        if entry.state().is_live() {
            if !force {
                entry.state().check(name, Operation::Remove)?;
            }
            self.kill(name).await?;
        }
        entry.retire().await;
        self.inner.entries.lock().await.remove(name);
        self.drop_agent(name).await;
        let dir = self.vm_dir(name);
        crate::net::host::teardown_vm_dir(&dir)
            .await
            .map_err(|source| ManagerError::Network {
                name: name.to_string(),
                source,
            })?;
        std::fs::remove_dir_all(&dir).map_err(|source| ManagerError::Io { path: dir, source })?;
        Ok(())
    }
}

const START_LOCK: &str = "start.lock";

/// Take the VM's start lock (exclusive `flock`, released when the file is dropped).
fn lock_start(dir: &Path) -> Result<std::fs::File, ManagerError> {
    let path = dir.join(START_LOCK);
    let io = |source| ManagerError::Io {
        path: path.clone(),
        source,
    };
    let f = crate::paths::private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io)?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).map_err(|e| io(e.into()))?;
    Ok(f)
}

/// Whether another process holds the VM's start lock right now.
fn start_in_progress(dir: &Path) -> bool {
    let Ok(f) = std::fs::File::open(dir.join(START_LOCK)) else {
        return false;
    };
    matches!(
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared),
        Err(rustix::io::Errno::WOULDBLOCK)
    )
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
