//! One watched VM ([`VmEntry`]): its state channel, persisted record and the tasks that watch
//! it — VMM process exit (pidfd / child wait), VMM events, and the serial console (inotify) for
//! the readiness marker. State changes go through [`VmEntry::transition`], which applies the
//! state machine's transition table and persists the record.

use super::record::{self, files, now, VmRecord};
use super::ManagerError;
use crate::config::VmConfig;
use crate::console::{LogFollower, ReadinessParser};
use crate::driver::{self, VmDriver, VmHandle, VmmEvent, VmmStatus};
use crate::process::{ExitInfo, ProcessError, VmmProcess};
use crate::state::VmState;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Kernel message printed when the guest powers itself off.
const POWER_OFF_MARKERS: [&str; 2] = ["reboot: Power down", "vmrs-init: power off"];

#[derive(Debug)]
pub(super) struct VmEntry {
    name: String,
    dir: PathBuf,
    config: VmConfig,
    driver: Arc<dyn VmDriver>,
    record: tokio::sync::Mutex<VmRecord>,
    state_tx: watch::Sender<VmState>,
    /// A pidfd-based handle for signalling (the exit task owns the waitable one).
    killer: std::sync::Mutex<Option<Arc<VmmProcess>>>,
    stop_requested: AtomicBool,
    guest_shutdown: AtomicBool,
    /// Set (under the record lock) when the VM's directory is being removed: no more writes.
    retired: AtomicBool,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for VmEntry {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.get_mut() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
    }
}

fn serial_shows_power_off(path: &Path) -> bool {
    let tail = std::fs::read(path).unwrap_or_default();
    let start = tail.len().saturating_sub(64 * 1024);
    let text = String::from_utf8_lossy(&tail[start..]);
    POWER_OFF_MARKERS.iter().any(|m| text.contains(m))
}

impl VmEntry {
    fn new(dir: PathBuf, config: VmConfig, record: VmRecord, driver: Arc<dyn VmDriver>) -> Arc<Self> {
        let (state_tx, _) = watch::channel(record.state.clone());
        Arc::new(VmEntry {
            name: record.name.clone(),
            dir,
            config,
            driver,
            record: tokio::sync::Mutex::new(record),
            state_tx,
            killer: std::sync::Mutex::new(None),
            stop_requested: AtomicBool::new(false),
            guest_shutdown: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            tasks: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// A VM this process just booted.
    pub(super) fn launched(
        dir: PathBuf,
        config: VmConfig,
        record: VmRecord,
        driver: Arc<dyn VmDriver>,
        process: VmmProcess,
    ) -> Arc<Self> {
        let handle = record.handle.clone();
        let entry = Self::new(dir, config, record, driver);
        if let Some(handle) = handle {
            if let Ok(k) = VmmProcess::attach(process.pid(), process.start_time()) {
                *entry.killer.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(k));
            }
            entry.spawn_watchers(process, handle, true);
        }
        entry
    }

    /// A VM recorded on disk: reconcile the record with reality and watch it if it is live.
    pub(super) async fn attach(
        dir: PathBuf,
        config: VmConfig,
        record: VmRecord,
    ) -> Result<Arc<Self>, ManagerError> {
        let driver = driver::driver_for(record.backend).map_err(|source| ManagerError::Driver {
            name: record.name.clone(),
            source,
        })?;
        let handle = record.handle.clone();
        let live = record.state.is_live();
        let entry = Self::new(dir, config, record, driver);
        let Some(handle) = handle.filter(|_| live) else {
            if live {
                entry
                    .transition(VmState::Failed {
                        reason: "no vmm process was recorded".into(),
                    })
                    .await;
            }
            return Ok(entry);
        };
        match VmmProcess::attach(handle.pid, handle.start_time) {
            Ok(process) => {
                if let Ok(k) = VmmProcess::attach(handle.pid, handle.start_time) {
                    *entry.killer.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(k));
                }
                // What is the guest doing right now?
                let status = tokio::time::timeout(Duration::from_secs(3), entry.driver.status(&handle))
                    .await
                    .ok()
                    .and_then(|r| r.ok());
                let ready_ip = crate::console::scan_log(&handle.serial_log).ok().flatten();
                match (status, ready_ip) {
                    (Some(VmmStatus::Paused), _) => entry.transition(VmState::Paused).await,
                    (Some(VmmStatus::Running), Some(ip)) => {
                        entry.transition(VmState::Ready { ip: ip.to_string() }).await
                    }
                    (Some(VmmStatus::Running), None) if entry.state() == VmState::Starting => {
                        entry.transition(VmState::Running).await
                    }
                    _ => {}
                }
                if let Some(ip) = ready_ip {
                    entry.record.lock().await.ip = Some(ip.to_string());
                }
                let follow_console = ready_ip.is_none();
                entry.spawn_watchers(process, handle, follow_console);
            }
            Err(ProcessError::Gone { .. }) | Err(ProcessError::Reused { .. }) => {
                let state = if serial_shows_power_off(&handle.serial_log) {
                    VmState::Stopped
                } else {
                    VmState::Failed {
                        reason: format!(
                            "vmm process (pid {}) exited while no vm-rs process was watching; see {}",
                            handle.pid,
                            entry.dir.join(files::VMM_LOG).display()
                        ),
                    }
                };
                entry.transition(state).await;
            }
            Err(source) => {
                return Err(ManagerError::Process {
                    name: entry.name.clone(),
                    source,
                })
            }
        }
        Ok(entry)
    }

    fn spawn_watchers(self: &Arc<Self>, mut process: VmmProcess, handle: VmHandle, follow_console: bool) {
        let mut tasks = Vec::new();
        // 1. process exit
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            let exit = process.wait().await.unwrap_or(ExitInfo::Unknown);
            me.on_exit(exit).await;
        }));
        // 2. console readiness
        if follow_console {
            let me = self.clone();
            let log = handle.serial_log.clone();
            tasks.push(tokio::spawn(async move {
                match LogFollower::open(&log, 0).await {
                    Ok(mut f) => {
                        let mut parser = ReadinessParser::new();
                        let mut buf = vec![0u8; 8192];
                        while let Ok(Some(n)) = f.next_chunk(&mut buf).await {
                            if let Some(ip) = parser.feed(&buf[..n]) {
                                me.on_ready(ip.to_string()).await;
                                break;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(vm = %me.name, error = %e, "cannot follow serial log"),
                }
            }));
        }
        // 3. VMM events (best effort: another process may hold the event socket)
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            let events = tokio::time::timeout(Duration::from_secs(2), me.driver.events(&handle)).await;
            let Ok(Ok(mut events)) = events else { return };
            while let Some(ev) = events.next().await {
                match ev {
                    VmmEvent::Paused => me.transition(VmState::Paused).await,
                    VmmEvent::Resumed => me.resumed().await,
                    VmmEvent::Shutdown { guest, .. } => {
                        if guest {
                            me.guest_shutdown.store(true, Ordering::SeqCst);
                        }
                    }
                    VmmEvent::Error { reason } => {
                        tracing::warn!(vm = %me.name, %reason, "vmm reported an error");
                    }
                }
            }
        }));
        let mut guard = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        guard.extend(tasks);
    }

    async fn on_ready(&self, ip: String) {
        let cur = self.state();
        if matches!(cur, VmState::Starting | VmState::Running) {
            self.transition(VmState::Ready { ip: ip.clone() }).await;
        }
        self.record.lock().await.ip = Some(ip);
    }

    async fn on_exit(&self, exit: ExitInfo) {
        // The backend's own account of the exit, when it keeps one (Cloud Hypervisor exits with
        // status 0 whether the guest powered off or a vCPU failed, and a fast guest power-off
        // can end the VMM before its event reaches the events task).
        let handle = self.record.lock().await.handle.clone();
        let reported = match &handle {
            Some(h) => self.driver.exit_reason(h).await.ok().flatten(),
            None => None,
        };
        let state = if self.stop_requested.load(Ordering::SeqCst)
            || self.guest_shutdown.load(Ordering::SeqCst)
            || serial_shows_power_off(&self.serial_log())
            || matches!(reported, Some(VmmEvent::Shutdown { .. }))
        {
            VmState::Stopped
        } else {
            let why = match reported {
                Some(VmmEvent::Error { reason }) => reason,
                _ => format!("exited unexpectedly ({exit})"),
            };
            VmState::Failed {
                reason: format!(
                    "{} {why}; see {}",
                    self.driver.kind(),
                    self.dir.join(files::VMM_LOG).display()
                ),
            }
        };
        // the VM is gone: remove its TAPs/bridges, leave switches, stop forwarders (before the
        // state is published, so whoever waits for the stop finds the host clean)
        if let Err(e) = crate::net::host::teardown_vm_dir(&self.dir).await {
            tracing::warn!(vm = %self.name, error = %e, "network teardown failed");
        }
        self.transition(state).await;
        for sock in ["qmp.sock", "qmp-events.sock"] {
            let _ = std::fs::remove_file(self.dir.join(sock));
        }
    }

    /// Apply a state change if the transition table allows it; persist and publish it.
    pub(super) async fn transition(&self, to: VmState) {
        let mut rec = self.record.lock().await;
        if rec.state == to {
            return;
        }
        if !rec.state.can_transition_to(&to) {
            tracing::debug!(vm = %self.name, from = %rec.state, to = %to, "ignoring invalid transition");
            return;
        }
        if let VmState::Ready { ip } = &to {
            rec.ip = Some(ip.clone());
        }
        if !to.is_live() {
            rec.finished_at = Some(now());
            rec.handle = None;
            *self.killer.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        rec.state = to.clone();
        // Publish first: waiters should not pay for the fsync. The record lock is still held,
        // so records are persisted in the order states are published.
        self.state_tx.send_replace(to);
        if self.retired.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = record::write_json_atomic(&self.dir.join(files::STATE), &*rec) {
            // the directory may have been removed (vm removed while tasks wind down)
            tracing::debug!(vm = %self.name, error = %e, "cannot persist state");
        }
    }

    /// Resumed: back to ready when the guest was ready before, else running.
    pub(super) async fn resumed(&self) {
        let ip = self.record.lock().await.ip.clone();
        match ip {
            Some(ip) => self.transition(VmState::Ready { ip }).await,
            None => self.transition(VmState::Running).await,
        }
    }

    pub(super) fn state(&self) -> VmState {
        self.state_tx.borrow().clone()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<VmState> {
        self.state_tx.subscribe()
    }

    pub(super) fn driver(&self) -> Arc<dyn VmDriver> {
        self.driver.clone()
    }

    pub(super) fn serial_log(&self) -> PathBuf {
        self.config
            .serial_log
            .clone()
            .unwrap_or_else(|| self.dir.join(files::SERIAL_LOG))
    }

    pub(super) async fn handle(&self) -> Option<VmHandle> {
        self.record.lock().await.handle.clone()
    }

    pub(super) async fn require_handle(&self, name: &str) -> Result<VmHandle, ManagerError> {
        self.handle().await.ok_or_else(|| ManagerError::NotRunning {
            name: name.to_string(),
            state: self.state(),
            serial_log: self.serial_log(),
        })
    }

    pub(super) fn set_stop_requested(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
    }

    pub(super) async fn kill(&self) -> Result<(), ProcessError> {
        let killer = self.killer.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match killer {
            Some(k) => k.kill(),
            None => Ok(()),
        }
    }

    /// Wait until the VM is no longer live; `None` on timeout.
    pub(super) async fn wait_finished(&self, timeout: Duration) -> Option<VmState> {
        let mut rx = self.subscribe();
        let fut = async {
            loop {
                let st = rx.borrow_and_update().clone();
                if !st.is_live() {
                    return st;
                }
                if rx.changed().await.is_err() {
                    return self.state();
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.ok()
    }

    /// Stop watching and stop writing records (the VM is being removed). Waits for an
    /// in-flight record write to finish, so the directory can be deleted afterwards.
    pub(super) async fn retire(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for t in tasks {
            t.abort();
        }
        let _rec = self.record.lock().await;
        self.retired.store(true, Ordering::SeqCst);
    }

    pub(super) async fn info(&self) -> super::VmInfo {
        let rec = self.record.lock().await.clone();
        super::VmInfo {
            name: self.name.clone(),
            ip: match &rec.state {
                VmState::Ready { ip } => Some(ip.clone()),
                s if s.is_live() => rec.ip.clone(),
                _ => None,
            },
            state: rec.state.clone(),
            backend: rec.backend,
            pid: rec.handle.as_ref().map(|h| h.pid),
            accel: rec.handle.as_ref().and_then(|h| h.accel.clone()),
            cpus: self.config.cpus,
            memory_mib: self.config.memory_mib,
            created_at: rec.created_at,
            started_at: rec.started_at,
            finished_at: rec.finished_at,
            dir: self.dir.clone(),
            serial_log: self.serial_log(),
            vmm_log: self.dir.join(files::VMM_LOG),
            config: self.config.clone(),
        }
    }
}
