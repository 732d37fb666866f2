//! One watched VM ([`VmEntry`]): its state channel, persisted record and the tasks that watch
//! it — VMM process exit (pidfd / child wait), VMM events, and the serial console (inotify) for
//! the readiness marker. State changes go through [`VmEntry::transition`], which applies the
//! state machine's transition table (an illegal change is a [`StateError`] for the caller) and
//! persists the record.
//!
//! ## Why a VM ended
//!
//! Evidence about an exit arrives before the exit itself: a verb asked for it, the VMM reported
//! a guest shutdown or a guest panic. It is kept as one [`ExitCause`] per VM, and when the VMM
//! process is gone [`classify_exit`] turns it, the serial log and the backend's own account into
//! the final state. The guest runs with `panic=-1 reboot=t` and QEMU with `-no-reboot`, so a
//! kernel panic reaches the VMM as a guest reset; the serial log's `Kernel panic - not syncing`
//! line is what tells it from a reboot, and makes it `failed`.

use super::record::{self, files, now, ExitRequest, LiveChanges, VmRecord};
use super::{Drivers, ManagerError};
use crate::config::{BackendKind, VmConfig};
use crate::console::{LogFollower, ReadinessParser};
use crate::driver::{VmDriver, VmHandle, VmmEvent, VmmStatus};
use crate::process::{ExitInfo, ProcessError, VmmProcess};
use crate::state::{Operation, StateError, VmState};
use futures::StreamExt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Kernel message printed when the guest powers itself off.
const POWER_OFF_MARKERS: [&str; 2] = ["reboot: Power down", "vmrs-init: power off"];

/// What the kernel prints when it panics (then resets at once, `panic=-1`).
const PANIC_MARKER: &str = "Kernel panic - not syncing";

/// How long attaching waits for the VMM's status before calling it unresponsive.
pub(super) const STATUS_PROBE: Duration = Duration::from_millis(250);

/// How long an exit waits for the serial log's sidecar to write the log's end.
const CONSOLE_DRAIN: Duration = Duration::from_secs(1);

/// How much of the serial log's end is searched for the markers above.
const SERIAL_TAIL: usize = 64 * 1024;

/// What is known, before the VMM exits, about why it will: one value per VM, replaced only by
/// stronger evidence (see [`ExitCause::rank`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ExitCause {
    /// Nobody asked for an exit: one now is a failure unless the guest or the backend shows an
    /// orderly shutdown.
    Unrequested,
    /// The VMM reported a shutdown: the guest powered off or reset (`guest`), or someone asked
    /// the VMM to quit through its control socket. `reason` is the VMM's word for it.
    VmmShutdown {
        /// The guest initiated it.
        guest: bool,
        /// e.g. QEMU's `guest-shutdown`, `guest-reset`, `host-qmp-quit`.
        reason: String,
    },
    /// A manager verb (stop or kill) asked for the exit.
    Requested(Operation),
    /// The VMM reported a guest error (pvpanic, vCPU failure).
    GuestError {
        /// The VMM's description.
        reason: String,
    },
    /// A shared directory's daemon died while the VM ran, so the VMM was killed: every guest
    /// request on that share would wait forever (a FUSE request the device has taken is not
    /// interruptible), and so would the guest's shutdown.
    ShareLost {
        /// Which share, and how its daemon ended.
        reason: String,
    },
}

impl ExitCause {
    /// Strength of the evidence: a request outranks a shutdown event (stopping presses the
    /// power button, so the guest then shuts down), a guest error outranks both.
    fn rank(&self) -> u8 {
        match self {
            ExitCause::Unrequested => 0,
            ExitCause::VmmShutdown { .. } => 1,
            ExitCause::Requested(_) => 2,
            ExitCause::GuestError { .. } | ExitCause::ShareLost { .. } => 3,
        }
    }
}

fn join_pids(pids: &[u32]) -> String {
    pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// The serial log's end, as text.
/// The exit code the guest reported for its main process ([`vmrs_proto::MAIN_EXIT_MARKER`])
/// during the last boot in `serial` (a log keeps earlier boots: only what follows the last
/// kernel banner counts).
pub(super) fn main_exit_code(serial: &str) -> Option<i32> {
    let boot = serial.rfind("Linux version ").unwrap_or(0);
    serial[boot..].lines().rev().find_map(vmrs_proto::parse_main_exit)
}

fn serial_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(SERIAL_TAIL as u64)))
        .is_err()
    {
        return String::new();
    }
    let mut buf = Vec::with_capacity(SERIAL_TAIL);
    let _ = f.take(SERIAL_TAIL as u64).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The kernel's panic message in `serial` (`Kernel panic - not syncing: <this>`), if it
/// panicked.
pub(super) fn panic_message(serial: &str) -> Option<String> {
    let line = serial.lines().rev().find(|l| l.contains(PANIC_MARKER))?;
    let after = &line[line.find(PANIC_MARKER)? + PANIC_MARKER.len()..];
    let msg = after.trim_start_matches(':').trim().trim_end_matches('\r');
    Some(msg.chars().take(200).collect())
}

/// How the end of a VMM process was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SeenExit {
    /// A watcher saw it exit, with this status.
    Watched(ExitInfo),
    /// A manager attaching found the process `pid` gone (or its pid reused).
    Unwatched {
        /// The VMM's pid.
        pid: u32,
    },
}

/// The state a VM ends in once its VMM process is gone, from what was known before
/// (`cause`), the serial log's end, the backend's account (`reported`, see
/// [`VmDriver::exit_reason`]) and the exit status.
pub(super) fn classify_exit(
    cause: &ExitCause,
    serial: &str,
    reported: Option<&VmmEvent>,
    exit: SeenExit,
    backend: BackendKind,
    vmm_log: &Path,
) -> VmState {
    let failed = |why: String| VmState::Failed {
        reason: format!("{backend} {why}; see {}", vmm_log.display()),
    };
    let panic = panic_message(serial);
    match cause {
        ExitCause::ShareLost { reason } => {
            return VmState::Failed {
                reason: reason.clone(),
            }
        }
        ExitCause::GuestError { reason } => {
            return match panic {
                Some(p) => VmState::Failed {
                    reason: format!("guest kernel panic: {p}"),
                },
                None => failed(format!("reported a guest error: {reason}")),
            }
        }
        ExitCause::Requested(_) => return VmState::Stopped,
        ExitCause::VmmShutdown { .. } | ExitCause::Unrequested => {}
    }
    // the guest init said why it could not come up, then powered off
    if let Some(why) = crate::console::failure_message(serial) {
        return VmState::Failed {
            reason: format!("guest failed to boot: {why}"),
        };
    }
    if let Some(p) = panic {
        return VmState::Failed {
            reason: format!("guest kernel panic: {p}"),
        };
    }
    let orderly = matches!(cause, ExitCause::VmmShutdown { .. })
        || POWER_OFF_MARKERS.iter().any(|m| serial.contains(m))
        || matches!(reported, Some(VmmEvent::Shutdown { .. }));
    if orderly {
        return VmState::Stopped;
    }
    match (reported, exit) {
        (Some(VmmEvent::Error { reason }), _) => failed(reason.clone()),
        (_, SeenExit::Watched(status)) => failed(format!("exited unexpectedly ({status})")),
        (_, SeenExit::Unwatched { pid }) => failed(format!(
            "process (pid {pid}) exited while no vm-rs process was watching"
        )),
    }
}

#[derive(Debug)]
pub(super) struct VmEntry {
    name: String,
    dir: PathBuf,
    config: VmConfig,
    driver: Arc<dyn VmDriver>,
    record: tokio::sync::Mutex<VmRecord>,
    /// What verbs changed in the running VMM (`live.json`); emptied when it exits.
    live: tokio::sync::Mutex<LiveChanges>,
    state_tx: watch::Sender<VmState>,
    /// A pidfd-based handle for signalling (the exit task owns the waitable one).
    killer: std::sync::Mutex<Option<Arc<VmmProcess>>>,
    exit_cause: std::sync::Mutex<ExitCause>,
    /// Set (under the record lock) when the VM's directory is being removed: no more writes.
    retired: AtomicBool,
    /// The VMM process is alive but did not answer the status probe when attaching.
    unresponsive: AtomicBool,
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

impl VmEntry {
    fn new(
        dir: PathBuf,
        config: VmConfig,
        record: VmRecord,
        live: LiveChanges,
        driver: Arc<dyn VmDriver>,
    ) -> Arc<Self> {
        let (state_tx, _) = watch::channel(record.state.clone());
        Arc::new(VmEntry {
            name: record.name.clone(),
            dir,
            config,
            driver,
            record: tokio::sync::Mutex::new(record),
            live: tokio::sync::Mutex::new(live),
            state_tx,
            killer: std::sync::Mutex::new(None),
            exit_cause: std::sync::Mutex::new(ExitCause::Unrequested),
            retired: AtomicBool::new(false),
            unresponsive: AtomicBool::new(false),
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
        let entry = Self::new(dir, config, record, LiveChanges::default(), driver);
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
        drivers: &Drivers,
    ) -> Result<Arc<Self>, ManagerError> {
        let driver = drivers
            .for_record(record.backend)
            .map_err(|source| ManagerError::Driver {
                name: record.name.clone(),
                source,
            })?;
        let handle = record.handle.clone();
        let live = record.state.is_live();
        let changes = if live {
            record::load_live(&dir)?
        } else {
            LiveChanges::default()
        };
        let entry = Self::new(dir, config, record, changes, driver);
        let Some(handle) = handle.filter(|_| live) else {
            // Live without a VMM recorded: either another process is starting it right now
            // (it holds the start lock) or that process died mid-start — maybe after its VMM
            // was spawned, which the VMM's owner marker tells.
            let Some(_no_start) = super::no_start_in_progress(&entry.dir) else {
                return Ok(entry);
            };
            let strays = crate::process::kill_owned_by(&entry.dir);
            if live {
                let reason = match strays.as_slice() {
                    [] => "the process starting it exited before the vmm ran".to_string(),
                    pids => format!(
                        "the process starting it exited before recording its vmm (pid {}, killed)",
                        join_pids(pids)
                    ),
                };
                entry.transition(VmState::Failed { reason }).await?;
            } else if !strays.is_empty() {
                // not live, yet its directory owned a process: one no record tracked
                tracing::warn!(vm = %entry.name, pids = ?strays, "killed processes no record tracked");
            }
            return Ok(entry);
        };
        match VmmProcess::attach(handle.pid, handle.start_time) {
            Ok(mut process) => {
                // A share's daemon died while no vm-rs process watched: the guest hangs on it
                // for good, so the VM is ended here (by this process, so the reason is kept).
                if let Some(dead) = crate::virtiofs::first_dead(&entry.dir)
                    .filter(|_| entry.requested_exit(&handle).is_none())
                {
                    let reason = crate::virtiofs::lost_reason(&dead, None);
                    tracing::warn!(vm = %entry.name, %reason, "shared directory lost");
                    let _ = process.kill();
                    let _ = tokio::time::timeout(Duration::from_secs(5), process.wait()).await;
                    crate::virtiofs::stop(&entry.dir);
                    crate::vsock::stop(&entry.dir);
                    entry.transition(VmState::Failed { reason }).await?;
                    return Ok(entry);
                }
                if let Ok(k) = VmmProcess::attach(handle.pid, handle.start_time) {
                    *entry.killer.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(k));
                }
                // What is the guest doing right now? Asked briefly: attaching is on the path of
                // every verb (`ps` included), and a frozen VMM must not hold them up. One that
                // does not answer keeps its recorded state and is shown as unresponsive.
                let status = tokio::time::timeout(STATUS_PROBE, entry.driver.status(&handle))
                    .await
                    .ok()
                    .and_then(|r| r.ok());
                entry.unresponsive.store(status.is_none(), Ordering::SeqCst);
                let ready_ip = crate::console::scan_log(&handle.serial_log).ok().flatten();
                // Bring the record up to what the VMM says, where the table has an edge for it
                // (a VM recorded paused that runs again resumes; one recorded ready stays ready).
                let now = entry.state();
                let seen = match (status, ready_ip) {
                    (Some(VmmStatus::Paused), _) => Some(VmState::Paused),
                    (Some(VmmStatus::Running), Some(ip)) => Some(VmState::Ready { ip }),
                    (Some(VmmStatus::Running), None) => Some(VmState::Running),
                    _ => None,
                };
                if let Some(seen) = seen.filter(|s| *s != now && now.can_transition_to(s)) {
                    entry.transition(seen).await?;
                }
                if let Some(ip) = ready_ip {
                    entry.record.lock().await.ip = Some(ip);
                }
                let follow_console = ready_ip.is_none();
                entry.spawn_watchers(process, handle, follow_console);
            }
            Err(ProcessError::Gone { .. }) | Err(ProcessError::Reused { .. }) => {
                // the VMM died unwatched: its shares' daemons go too
                crate::virtiofs::stop(&entry.dir);
                crate::vsock::stop(&entry.dir);
                let reported = entry.driver.exit_reason(&handle).await.ok().flatten();
                let cause = entry.requested_exit(&handle).unwrap_or(ExitCause::Unrequested);
                let state = classify_exit(
                    &cause,
                    &serial_tail(&handle.serial_log),
                    reported.as_ref(),
                    SeenExit::Unwatched { pid: handle.pid },
                    entry.driver.kind(),
                    &entry.dir.join(files::VMM_LOG),
                );
                entry.transition(state).await?;
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
                                me.on_ready(ip).await;
                                break;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(vm = %me.name, error = %e, "cannot follow serial log"),
                }
            }));
        }
        // 3. the shared directories' daemons: one that dies while its VMM runs (and no exit was
        // asked for) leaves every guest access to the share hanging for good, so the VM is
        // killed and failed with the reason (see `ExitCause::ShareLost`). A daemon found dead
        // when attaching counts the same.
        for d in crate::virtiofs::load(&self.dir).daemons {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                let status = match VmmProcess::attach(d.pid, d.start_time) {
                    Ok(mut p) => p.wait().await.unwrap_or(ExitInfo::Unknown),
                    Err(_) => ExitInfo::Unknown,
                };
                // the VMM exiting first ends its daemons: that is not a lost share
                if !me.state().is_live() || me.exit_cause() != ExitCause::Unrequested || !me.vmm_alive() {
                    return;
                }
                let how = (status != ExitInfo::Unknown).then(|| status.to_string());
                let reason = crate::virtiofs::lost_reason(&d, how.as_deref());
                tracing::warn!(vm = %me.name, %reason, "shared directory lost");
                me.note_exit(ExitCause::ShareLost { reason });
                if let Err(e) = me.kill().await {
                    tracing::warn!(vm = %me.name, error = %e, "cannot kill the vmm of a lost share");
                }
            }));
        }
        // 4. VMM events (best effort: another process may hold the event socket)
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            let events = tokio::time::timeout(Duration::from_secs(2), me.driver.events(&handle)).await;
            let Ok(Ok(mut events)) = events else { return };
            while let Some(ev) = events.next().await {
                me.on_event(ev).await;
            }
        }));
        let mut guard = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        guard.extend(tasks);
    }

    /// The readiness marker appeared on the console.
    async fn on_ready(&self, ip: IpAddr) {
        // Paused in between (the marker was read late): the address is kept for the resume.
        let result = match self.state() {
            VmState::Starting | VmState::Running | VmState::Ready { .. } => {
                self.transition(VmState::Ready { ip }).await
            }
            _ => Ok(()),
        };
        self.settle("readiness marker", result);
        self.record.lock().await.ip = Some(ip);
    }

    /// An event from the VMM's event channel.
    pub(super) async fn on_event(&self, ev: VmmEvent) {
        match ev {
            VmmEvent::Paused => {
                let result = match self.state() {
                    VmState::Running | VmState::Ready { .. } => self.transition(VmState::Paused).await,
                    _ => Ok(()),
                };
                self.settle("vmm paused event", result);
            }
            VmmEvent::Resumed => {
                if self.state() == VmState::Paused {
                    let result = self.resumed().await;
                    self.settle("vmm resumed event", result);
                }
            }
            VmmEvent::Shutdown { guest, reason } => self.note_exit(ExitCause::VmmShutdown { guest, reason }),
            VmmEvent::Error { reason } => {
                tracing::warn!(vm = %self.name, %reason, "vmm reported a guest error");
                self.note_exit(ExitCause::GuestError { reason });
            }
        }
    }

    /// The watchers check the state before asking for a change; one still refused lost a race
    /// with another change (usually the exit) and is moot, but worth a warning.
    fn settle(&self, what: &'static str, result: Result<(), StateError>) {
        if let Err(e) = result {
            tracing::warn!(vm = %self.name, error = %e, "{what} not applied");
        }
    }

    /// Record evidence about a coming exit (kept unless the new evidence is stronger).
    ///
    /// A requested kill is final: what the backend says after it (Cloud Hypervisor's event
    /// stream ends with "exited without shutting down" once the process is gone, which can
    /// arrive before the watcher's exit) is the kill's doing, not a guest error.
    pub(super) fn note_exit(&self, cause: ExitCause) {
        let mut cur = self.exit_cause.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*cur, ExitCause::Requested(Operation::Kill)) {
            return;
        }
        if cause.rank() >= cur.rank() {
            *cur = cause;
        }
    }

    /// A verb asks for the exit (`Stop` or `Kill`): noted here and recorded for the other
    /// processes watching the VM.
    pub(super) async fn request_exit(&self, op: Operation) -> Result<(), ManagerError> {
        self.note_exit(ExitCause::Requested(op));
        let Some(handle) = self.handle().await else {
            return Ok(());
        };
        let req = ExitRequest {
            pid: handle.pid,
            start_time: handle.start_time,
            kill: op == Operation::Kill,
        };
        record::write_json_atomic(&self.dir.join(files::EXIT_REQUEST), &req)?;
        Ok(())
    }

    /// The exit some process asked for of the VMM `handle` names, from the VM directory.
    fn requested_exit(&self, handle: &VmHandle) -> Option<ExitCause> {
        let req = record::load_exit_request(&self.dir).filter(|r| r.is_for(handle))?;
        Some(ExitCause::Requested(if req.kill {
            Operation::Kill
        } else {
            Operation::Stop
        }))
    }

    pub(super) fn exit_cause(&self) -> ExitCause {
        self.exit_cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
        // another process may have asked for this exit
        if let Some(cause) = handle.as_ref().and_then(|h| self.requested_exit(h)) {
            self.note_exit(cause);
        }
        // a capped log gets its last output (how the guest ended) once the VMM is gone
        crate::console::capture::wait_done(&self.dir, CONSOLE_DRAIN).await;
        let state = classify_exit(
            &self.exit_cause(),
            &serial_tail(&self.serial_log()),
            reported.as_ref(),
            SeenExit::Watched(exit),
            self.driver.kind(),
            &self.dir.join(files::VMM_LOG),
        );
        // the VM is gone: remove its TAPs/bridges, leave switches, stop forwarders (before the
        // state is published, so whoever waits for the stop finds the host clean)
        if let Err(e) = crate::net::host::teardown_vm_dir(&self.dir).await {
            tracing::warn!(vm = %self.name, error = %e, "network teardown failed");
        }
        // shared directories' daemons end with their VMM; any still running are killed
        crate::virtiofs::stop(&self.dir);
        crate::vsock::stop(&self.dir);
        let result = match self.state() {
            s if s.is_live() => self.transition(state).await,
            // already recorded as ended (e.g. found dead by an attach racing this task)
            _ => Ok(()),
        };
        self.settle("exit", result);
        crate::vm_dir::VmDir::new(&self.dir).remove_vmm_sockets();
    }

    /// Apply a state change the transition table allows; persist and publish it. Asking for
    /// the state the VM is in already is a no-op; a change the table has no edge for is
    /// refused with [`StateError::IllegalTransition`] and changes nothing.
    pub(super) async fn transition(&self, to: VmState) -> Result<(), StateError> {
        let mut rec = self.record.lock().await;
        if rec.state == to {
            return Ok(());
        }
        if !rec.state.can_transition_to(&to) {
            return Err(StateError::IllegalTransition {
                vm: self.name.clone(),
                from: rec.state.kind(),
                to: to.kind(),
            });
        }
        if let VmState::Ready { ip } = &to {
            rec.ip = Some(*ip);
        }
        if !to.is_live() {
            rec.finished_at = Some(now());
            rec.handle = None;
            rec.exit_code = main_exit_code(&serial_tail(&self.serial_log()));
            *self.killer.lock().unwrap_or_else(|p| p.into_inner()) = None;
            // the VMM's devices and sizes went with it
            *self.live.lock().await = LiveChanges::default();
            if !self.retired.load(Ordering::SeqCst) {
                let _ = std::fs::remove_file(self.dir.join(files::LIVE));
            }
        }
        rec.state = to.clone();
        // Publish first: waiters should not pay for the fsync. The record lock is still held,
        // so records are persisted in the order states are published.
        self.state_tx.send_replace(to);
        if self.retired.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Err(e) = record::write_json_atomic(&self.dir.join(files::STATE), &*rec) {
            // the directory may have been removed (vm removed while tasks wind down)
            tracing::debug!(vm = %self.name, error = %e, "cannot persist state");
        }
        Ok(())
    }

    /// Resumed: back to ready when the guest was ready before, else running.
    pub(super) async fn resumed(&self) -> Result<(), StateError> {
        let ip = self.record.lock().await.ip;
        match ip {
            Some(ip) => self.transition(VmState::Ready { ip }).await,
            None => self.transition(VmState::Running).await,
        }
    }

    /// Change what verbs record about the running VMM and persist it (`live.json`).
    pub(super) async fn update_live(
        &self,
        change: impl FnOnce(&mut LiveChanges),
    ) -> Result<(), ManagerError> {
        let mut live = self.live.lock().await;
        change(&mut live);
        record::write_json_atomic(&self.dir.join(files::LIVE), &*live)?;
        Ok(())
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

    /// Whether the VMM this entry watches still runs.
    fn vmm_alive(&self) -> bool {
        self.killer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|k| k.is_alive())
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
        let live = self.live.lock().await.clone();
        // What the start added (an unreadable start.json only hides the image details here).
        let opts: super::StartOptions =
            record::load_json_or_default(&self.dir.join(files::START)).unwrap_or_default();
        super::VmInfo {
            name: self.name.clone(),
            ip: match &rec.state {
                VmState::Ready { ip } => Some(*ip),
                s if s.is_live() => rec.ip,
                _ => None,
            },
            unresponsive: rec.state.is_live() && self.unresponsive.load(Ordering::SeqCst),
            state: rec.state.clone(),
            backend: rec.backend,
            backend_reason: super::record::load_backend_choice(&self.dir).map(|c| c.reason),
            pid: rec.handle.as_ref().map(|h| h.pid),
            accel: rec.handle.as_ref().and_then(|h| h.accel.clone()),
            cpus: live.cpus.unwrap_or(self.config.cpus),
            memory_mib: live.memory_mib.unwrap_or(self.config.memory_mib),
            devices: live.devices,
            mounts: crate::virtiofs::mounts(&self.dir, &self.config.shared_dirs, rec.state.is_live()),
            created_at: rec.created_at,
            started_at: rec.started_at,
            finished_at: rec.finished_at,
            exit_code: rec.exit_code.filter(|_| !rec.state.is_live()),
            image: opts.image,
            root_disk: opts
                .rootfs
                .is_some()
                .then(|| crate::rootfs::root_disk(&self.dir).path),
            dir: self.dir.clone(),
            serial_log: self.serial_log(),
            vmm_log: self.dir.join(files::VMM_LOG),
            config: self.config.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(cause: ExitCause, serial: &str, reported: Option<VmmEvent>, exit: SeenExit) -> VmState {
        classify_exit(
            &cause,
            serial,
            reported.as_ref(),
            exit,
            BackendKind::Qemu,
            Path::new("/vm/vmm.log"),
        )
    }

    #[test]
    fn the_main_exit_of_the_last_boot_counts() {
        let one = "Linux version 6.1\nvmrs-init: main process exited: code=3 restarts=0\n";
        assert_eq!(main_exit_code(one), Some(3));
        let two = format!("{one}reboot: Power down\nLinux version 6.1\nvmrs-init: ready\n");
        assert_eq!(
            main_exit_code(&two),
            None,
            "an earlier boot's exit is not this one's"
        );
        assert_eq!(
            main_exit_code("junk\nvmrs-init: main process exited: signal=9 restarts=2\r\n"),
            Some(137)
        );
        assert_eq!(main_exit_code(""), None);
    }

    const PANIC: &str = "[ 1.0] Kernel panic - not syncing: No working init found.  Try passing init=\r\n";
    const KILLED: SeenExit = SeenExit::Watched(ExitInfo::Signal(libc::SIGKILL));
    const CLEAN: SeenExit = SeenExit::Watched(ExitInfo::Code(0));

    fn reset() -> ExitCause {
        ExitCause::VmmShutdown {
            guest: true,
            reason: "guest-reset".into(),
        }
    }

    #[test]
    fn exit_classification() {
        use VmState::{Failed, Stopped};
        let stop = ExitCause::Requested(Operation::Stop);
        let kill = ExitCause::Requested(Operation::Kill);
        assert_eq!(classify(stop.clone(), "", None, KILLED), Stopped);
        assert_eq!(classify(kill, "", None, KILLED), Stopped);
        assert_eq!(
            classify(ExitCause::Unrequested, "reboot: Power down\n", None, CLEAN),
            Stopped
        );
        assert_eq!(
            classify(reset(), "", None, CLEAN),
            Stopped,
            "a guest reboot without a panic"
        );
        let panic = Failed {
            reason: "guest kernel panic: No working init found.  Try passing init=".into(),
        };
        assert_eq!(classify(reset(), PANIC, None, CLEAN), panic);
        assert_eq!(classify(ExitCause::Unrequested, PANIC, None, CLEAN), panic);
        assert_eq!(
            classify(
                ExitCause::Unrequested,
                "reboot: Power down\n",
                Some(shutdown()),
                CLEAN
            ),
            Stopped
        );
        let crash = classify(ExitCause::Unrequested, "booting\n", None, KILLED);
        assert_eq!(
            crash,
            Failed {
                reason: "qemu exited unexpectedly (killed by signal 9 (SIGKILL)); see /vm/vmm.log".into()
            }
        );
        // the backend's account of an unrequested exit
        let vcpu = VmmEvent::Error {
            reason: "vcpu failed: internal error".into(),
        };
        assert!(matches!(
            classify(ExitCause::Unrequested, "", Some(vcpu), CLEAN),
            Failed { reason } if reason.contains("vcpu failed")
        ));
        // a pvpanic-style event outranks a stop that raced it
        let mut cause = stop;
        for next in [
            ExitCause::GuestError {
                reason: "guest kernel panicked".into(),
            },
            reset(),
            ExitCause::Unrequested,
        ] {
            if next.rank() >= cause.rank() {
                cause = next;
            }
        }
        assert!(
            matches!(classify(cause, "", None, CLEAN), Failed { reason } if reason.contains("guest error"))
        );
        // a guest that could not mount a share powers off after saying why
        assert_eq!(
            classify(
                reset(),
                "VMRS_FAILED cannot mount share vmrs0 at /data: x\nvmrs-init: power off\nreboot: Power down\n",
                Some(shutdown()),
                CLEAN
            ),
            Failed {
                reason: "guest failed to boot: cannot mount share vmrs0 at /data: x".into()
            }
        );
        assert!(matches!(
            classify(ExitCause::Unrequested, "", None, SeenExit::Unwatched { pid: 7 }),
            Failed { reason } if reason.contains("pid 7") && reason.contains("no vm-rs process was watching")
        ));
    }

    fn shutdown() -> VmmEvent {
        VmmEvent::Shutdown {
            guest: true,
            reason: "guest powered off".into(),
        }
    }

    #[test]
    fn panic_message_is_the_last_panic_line() {
        assert_eq!(panic_message("ok\nall fine\n"), None);
        let two = "Kernel panic - not syncing: first\nKernel panic - not syncing: second\r\n";
        assert_eq!(panic_message(two).as_deref(), Some("second"));
        assert_eq!(panic_message("Kernel panic - not syncing").as_deref(), Some(""));
    }
}
