//! The manager and its exit monitor with an injected [`VmDriver`]: a fake whose "VMM" is a real
//! child process (`sleep`), so pidfd waits, start-time identity and signals are exercised for
//! real, while the guest's side (serial console, VMM events) is written by the test.

use super::record::{self, files, PluggedDevice, VmRecord, RECORD_VERSION};
use super::{ManagerError, VmListing, VmManager};
use crate::config::{BackendKind, DiskConfig, VmConfig};
use crate::driver::{
    BootSpec, Counters, DriverError, EventStream, Launched, TapNetwork, VmDriver, VmHandle, VmmEvent,
    VmmStatus,
};
use crate::process::VmmProcess;
use crate::state::{Operation, StateError, StateKind, VmState};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const GUEST_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 2, 15));
const WAIT: Duration = Duration::from_secs(10);

/// What the fake guest does when the power button is pressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Button {
    /// Print the kernel's power-off line and let the VMM exit.
    PowerOff,
    /// Nothing (a hung guest): the manager must quit/kill the VMM.
    Ignore,
    /// A frozen VMM: the power button, quit and status never answer.
    Frozen,
}

#[derive(Debug)]
struct Fake {
    button: Button,
    /// Every call, in order (`boot`, `pause`, `resize 2 -`, ...).
    calls: Mutex<Vec<String>>,
    status: Mutex<VmmStatus>,
    events: tokio::sync::broadcast::Sender<VmmEvent>,
}

impl Fake {
    fn new(button: Button) -> Arc<Self> {
        Arc::new(Fake {
            button,
            calls: Mutex::new(Vec::new()),
            status: Mutex::new(VmmStatus::Running),
            events: tokio::sync::broadcast::channel(16).0,
        })
    }

    fn call(&self, c: impl Into<String>) {
        self.calls.lock().unwrap().push(c.into());
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn end_vmm(handle: &VmHandle) {
        if let Ok(p) = VmmProcess::attach(handle.pid, handle.start_time) {
            let _ = p.kill();
        }
    }
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[async_trait::async_trait]
impl VmDriver for Fake {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn capabilities(&self) -> crate::devices::Capabilities {
        crate::driver::qemu::QemuDriver::new().capabilities()
    }

    async fn boot(&self, spec: &BootSpec<'_>) -> Result<Launched, DriverError> {
        self.call("boot");
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("1000");
        let process = VmmProcess::spawn_owned(cmd, spec.vm_dir)?;
        append(&spec.serial_log, "[    0.1] booting\nVMRS_READY 10.0.2.15\n");
        Ok(Launched {
            handle: VmHandle {
                name: spec.config.name.clone(),
                backend: BackendKind::Qemu,
                pid: process.pid(),
                start_time: process.start_time(),
                api_socket: spec.vm_dir.join("fake.sock"),
                event_socket: None,
                serial_log: spec.serial_log.clone(),
                accel: Some("tcg".into()),
            },
            process,
        })
    }

    async fn status(&self, _: &VmHandle) -> Result<VmmStatus, DriverError> {
        if self.button == Button::Frozen {
            std::future::pending::<()>().await;
        }
        Ok(*self.status.lock().unwrap())
    }

    async fn pause(&self, _: &VmHandle) -> Result<(), DriverError> {
        self.call("pause");
        *self.status.lock().unwrap() = VmmStatus::Paused;
        Ok(())
    }

    async fn resume(&self, _: &VmHandle) -> Result<(), DriverError> {
        self.call("resume");
        *self.status.lock().unwrap() = VmmStatus::Running;
        Ok(())
    }

    async fn request_shutdown(&self, handle: &VmHandle) -> Result<(), DriverError> {
        self.call("power button");
        if self.button == Button::Frozen {
            std::future::pending::<()>().await;
        }
        if self.button == Button::PowerOff {
            append(&handle.serial_log, "reboot: Power down\n");
            Self::end_vmm(handle);
        }
        Ok(())
    }

    async fn quit(&self, handle: &VmHandle) -> Result<(), DriverError> {
        self.call("quit");
        if self.button == Button::Frozen {
            std::future::pending::<()>().await;
        }
        Self::end_vmm(handle);
        Ok(())
    }

    async fn events(&self, _: &VmHandle) -> Result<EventStream, DriverError> {
        let rx = self.events.subscribe();
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.ok().map(|ev| (ev, rx))
        })))
    }

    async fn snapshot(&self, _: &VmHandle, dir: &Path) -> Result<(), DriverError> {
        self.call(format!("snapshot {}", dir.display()));
        Ok(())
    }

    async fn resize(&self, _: &VmHandle, cpus: Option<u32>, mem: Option<u64>) -> Result<(), DriverError> {
        let show = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        self.call(format!(
            "resize {} {}",
            show(cpus.map(|c| c.to_string())),
            show(mem.map(|m| m.to_string()))
        ));
        Ok(())
    }

    async fn add_disk(&self, _: &VmHandle, disk: &DiskConfig) -> Result<String, DriverError> {
        self.call(format!("add disk {}", disk.path.display()));
        Ok("disk7".into())
    }

    async fn add_net(&self, _: &VmHandle, net: &TapNetwork) -> Result<String, DriverError> {
        self.call(format!("add net {:?}", net.tap));
        Ok("net3".into())
    }

    async fn remove_device(&self, _: &VmHandle, id: &str) -> Result<(), DriverError> {
        self.call(format!("remove {id}"));
        Ok(())
    }

    async fn counters(&self, _: &VmHandle) -> Result<Counters, DriverError> {
        let mut c = Counters::new();
        c.entry("disk7".into())
            .or_default()
            .insert("read_bytes".into(), 512);
        Ok(c)
    }
    // `info` keeps the trait's default: "not supported".
}

struct Home {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

impl Home {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"not booted by the fake").unwrap();
        Home { dir, kernel }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self, name: &str) -> VmConfig {
        VmConfig::builder(name)
            .kernel(&self.kernel)
            .memory_mib(64)
            .build_unchecked()
    }

    async fn manager(&self, fake: &Arc<Fake>) -> VmManager {
        VmManager::builder()
            .home(self.path())
            .driver(fake.clone())
            .build()
            .await
            .unwrap()
    }
}

/// Start `name` and wait until the fake guest's marker made it ready.
async fn started(mgr: &VmManager, home: &Home, name: &str) -> VmHandle {
    mgr.start(home.config(name)).await.unwrap();
    assert_eq!(mgr.wait_ready(name, WAIT).await.unwrap(), GUEST_IP);
    mgr.handle(name).await.unwrap().unwrap()
}

async fn finished(mgr: &VmManager, name: &str) -> VmState {
    let entry = mgr.entry(name).await.unwrap();
    entry.wait_finished(WAIT).await.expect("vm did not finish")
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn failed_reason(st: &VmState) -> &str {
    match st {
        VmState::Failed { reason } => reason,
        other => panic!("expected failed, got {other}"),
    }
}

fn alive(h: &VmHandle) -> bool {
    crate::process::is_same_process_alive(h.pid, h.start_time)
}

#[tokio::test]
async fn lifecycle_through_the_injected_driver() {
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    let h = started(&mgr, &home, "a").await;
    assert!(alive(&h));
    assert_eq!(mgr.state("a").await.unwrap(), VmState::Ready { ip: GUEST_IP });
    assert_eq!(mgr.inspect("a").await.unwrap().ip, Some(GUEST_IP));

    mgr.pause("a").await.unwrap();
    assert_eq!(mgr.state("a").await.unwrap(), VmState::Paused);
    let twice = mgr.pause("a").await.unwrap_err();
    assert!(
        matches!(
            twice,
            ManagerError::State(StateError::InvalidOperation {
                op: Operation::Pause,
                state: "paused",
                ..
            })
        ),
        "{twice:?}"
    );
    mgr.resume("a").await.unwrap();
    assert_eq!(mgr.state("a").await.unwrap(), VmState::Ready { ip: GUEST_IP });

    assert_eq!(mgr.stop("a", WAIT).await.unwrap(), VmState::Stopped);
    assert!(!alive(&h));
    assert_eq!(fake.calls(), ["boot", "pause", "resume", "power button"]);
    // persisted, and the record forgets the VMM
    let rec = record::load_record(&mgr.vm_dir("a")).unwrap();
    assert_eq!(rec.state, VmState::Stopped);
    assert!(rec.handle.is_none());
    assert!(matches!(mgr.resume("a").await, Err(ManagerError::State(_))));
    mgr.remove("a", false).await.unwrap();
    assert!(!mgr.vm_dir("a").exists());
}

#[tokio::test]
async fn a_hung_guest_is_quit_and_still_stopped() {
    let home = Home::new();
    let fake = Fake::new(Button::Ignore);
    let mgr = home.manager(&fake).await;
    let h = started(&mgr, &home, "hung").await;
    let st = mgr.stop("hung", Duration::from_millis(200)).await.unwrap();
    assert_eq!(st, VmState::Stopped);
    assert!(!alive(&h));
    assert_eq!(fake.calls(), ["boot", "power button", "quit"]);
}

#[tokio::test]
async fn a_frozen_vmm_is_listed_at_once_and_killed_on_time() {
    let home = Home::new();
    let fake = Fake::new(Button::Frozen);
    let mgr = home.manager(&fake).await;
    let h = started(&mgr, &home, "frz").await;
    // another process attaching: the status probe gives up quickly
    let t0 = std::time::Instant::now();
    let other = home.manager(&fake).await;
    let info = other.inspect("frz").await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert!(info.unresponsive, "{info:?}");
    assert_eq!(
        info.state,
        VmState::Ready { ip: GUEST_IP },
        "the recorded state is kept"
    );
    // stop: the power button and quit never answer; killed within timeout + QUIT_GRACE
    let t0 = std::time::Instant::now();
    let st = other.stop("frz", Duration::from_millis(500)).await.unwrap();
    let took = t0.elapsed();
    assert_eq!(st, VmState::Stopped);
    assert!(
        took < Duration::from_millis(500) + super::QUIT_GRACE + Duration::from_secs(1),
        "{took:?}"
    );
    assert!(!alive(&h));
    assert!(!other.inspect("frz").await.unwrap().unresponsive);
}

/// Eight frozen VMMs: a new manager attaches to them side by side, so opening it and
/// listing take about one status probe, not eight.
#[tokio::test]
async fn many_frozen_vmms_are_probed_side_by_side() {
    let home = Home::new();
    let fake = Fake::new(Button::Frozen);
    let mgr = home.manager(&fake).await;
    let names: Vec<String> = (0..8).map(|i| format!("frz{i}")).collect();
    let mut handles = Vec::new();
    for n in &names {
        handles.push(started(&mgr, &home, n).await);
    }
    let t0 = std::time::Instant::now();
    let other = home.manager(&fake).await;
    let listed = other.list().await.unwrap();
    let took = t0.elapsed();
    assert_eq!(listed.len(), names.len());
    for l in &listed {
        match l {
            VmListing::Vm(info) => assert!(info.unresponsive, "{info:?}"),
            VmListing::Damaged(d) => panic!("{d:?}"),
        }
    }
    // sequential probes would take 8 x STATUS_PROBE = 2 s
    assert!(
        took < super::monitor::STATUS_PROBE * 4,
        "open + list of 8 frozen VMMs took {took:?}"
    );
    for n in &names {
        other.kill(n).await.unwrap();
    }
    for h in &handles {
        assert!(!alive(h));
    }
}

#[tokio::test]
async fn kill_verb_is_stopped_but_kill_9_from_outside_is_failed() {
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    started(&mgr, &home, "k").await;
    assert_eq!(mgr.kill("k").await.unwrap(), VmState::Stopped);

    let h = started(&mgr, &home, "crash").await;
    // SAFETY: kill(2) on the pid of the fake VMM this test spawned and that is still alive
    // (checked through its start time just above by `started`).
    assert_eq!(unsafe { libc::kill(h.pid as i32, libc::SIGKILL) }, 0);
    let st = finished(&mgr, "crash").await;
    let reason = failed_reason(&st);
    assert!(
        reason.contains("exited unexpectedly") && reason.contains("SIGKILL"),
        "{reason}"
    );
}

#[tokio::test]
async fn guest_power_off_is_stopped_from_the_serial_log_or_the_vmm_event() {
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;

    // the kernel's own line on the console
    let h = started(&mgr, &home, "serial").await;
    append(&h.serial_log, "reboot: Power down\n");
    Fake::end_vmm(&h);
    assert_eq!(finished(&mgr, "serial").await, VmState::Stopped);

    // only the VMM's shutdown event (the console said nothing)
    let h = started(&mgr, &home, "event").await;
    wait_until("events subscriber", || fake.events.receiver_count() > 0).await;
    let entry = mgr.entry("event").await.unwrap();
    fake.events
        .send(VmmEvent::Shutdown {
            guest: true,
            reason: "guest-shutdown".into(),
        })
        .unwrap();
    wait_until("exit cause", || {
        matches!(
            entry.exit_cause(),
            super::monitor::ExitCause::VmmShutdown { guest: true, .. }
        )
    })
    .await;
    Fake::end_vmm(&h);
    assert_eq!(finished(&mgr, "event").await, VmState::Stopped);
}

#[tokio::test]
async fn guest_kernel_panic_is_failed_not_stopped() {
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    let h = started(&mgr, &home, "panic").await;
    wait_until("events subscriber", || fake.events.receiver_count() > 0).await;
    let entry = mgr.entry("panic").await.unwrap();
    // panic=-1 resets at once and QEMU -no-reboot reports the reset as a guest shutdown
    append(
        &h.serial_log,
        "[    0.52] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n\
         [    0.52] Rebooting in 1 seconds..\r\n",
    );
    fake.events
        .send(VmmEvent::Shutdown {
            guest: true,
            reason: "guest-reset".into(),
        })
        .unwrap();
    wait_until("exit cause", || {
        matches!(entry.exit_cause(), super::monitor::ExitCause::VmmShutdown { .. })
    })
    .await;
    Fake::end_vmm(&h);
    let st = finished(&mgr, "panic").await;
    assert_eq!(
        failed_reason(&st),
        "guest kernel panic: Attempted to kill init! exitcode=0x00000100"
    );
}

#[tokio::test]
async fn a_second_manager_reattaches_and_its_kill_is_a_stop_for_both() {
    let home = Home::new();
    let first = Fake::new(Button::PowerOff);
    let mgr1 = home.manager(&first).await;
    let h = started(&mgr1, &home, "r").await;
    let id = mgr1.add_disk("r", DiskConfig::new(&home.kernel)).await.unwrap();

    let second = Fake::new(Button::PowerOff);
    let mgr2 = home.manager(&second).await;
    assert_eq!(mgr2.state("r").await.unwrap(), VmState::Ready { ip: GUEST_IP });
    assert_eq!(mgr2.handle("r").await.unwrap(), Some(h.clone()));
    // what the first manager's verbs changed is known to the second
    let info = mgr2.inspect("r").await.unwrap();
    assert_eq!(info.devices.len(), 1);
    assert_eq!(info.devices[0].id(), id);
    // the second manager drives the VM through its own (injected) driver
    mgr2.pause("r").await.unwrap();
    assert_eq!(second.calls(), ["pause"]);
    assert!(!first.calls().contains(&"pause".to_string()));
    // a third one sees it paused (the VMM says so)
    let third = Fake::new(Button::PowerOff);
    *third.status.lock().unwrap() = VmmStatus::Paused;
    let mgr3 = home.manager(&third).await;
    assert_eq!(mgr3.state("r").await.unwrap(), VmState::Paused);

    assert_eq!(mgr2.kill("r").await.unwrap(), VmState::Stopped);
    assert!(!alive(&h));
    // the first manager's watcher saw a SIGKILL it did not send, yet records a stop
    assert_eq!(finished(&mgr1, "r").await, VmState::Stopped);
    assert_eq!(
        record::load_record(&mgr1.vm_dir("r")).unwrap().state,
        VmState::Stopped
    );
}

/// Write the records of a VM that was live when the last manager looked, with the VMM `handle`.
fn recorded_live(home: &Home, name: &str, handle: VmHandle, serial: &str) {
    let dir = crate::paths::vms_dir(home.path()).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = home.config(name);
    config.serial_log = Some(handle.serial_log.clone());
    std::fs::write(&handle.serial_log, serial).unwrap();
    record::write_json_atomic(&dir.join(files::CONFIG), &config).unwrap();
    let rec = VmRecord {
        version: RECORD_VERSION,
        name: name.into(),
        state: VmState::Ready { ip: GUEST_IP },
        backend: BackendKind::Qemu,
        handle: Some(handle),
        ip: Some(GUEST_IP),
        created_at: 1,
        started_at: Some(1),
        finished_at: None,
        exit_code: None,
    };
    record::write_json_atomic(&dir.join(files::STATE), &rec).unwrap();
}

#[tokio::test]
async fn vms_that_ended_unwatched_are_classified_on_attach() {
    let home = Home::new();
    // a real process that has exited: its pid + start time name nothing alive
    let mut cmd = tokio::process::Command::new("true");
    cmd.kill_on_drop(false);
    let mut gone = VmmProcess::spawn(cmd).unwrap();
    gone.wait().await.unwrap();
    let handle = |name: &str| VmHandle {
        name: name.into(),
        backend: BackendKind::Qemu,
        pid: gone.pid(),
        start_time: gone.start_time(),
        api_socket: home.path().join(format!("{name}.sock")),
        event_socket: None,
        serial_log: home.path().join(format!("{name}.log")),
        accel: None,
    };
    recorded_live(
        &home,
        "off",
        handle("off"),
        "VMRS_READY 10.0.2.15\nreboot: Power down\n",
    );
    recorded_live(
        &home,
        "panicked",
        handle("panicked"),
        "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n",
    );
    recorded_live(&home, "crashed", handle("crashed"), "VMRS_READY 10.0.2.15\n");
    // the pid is alive but belongs to another process (start time differs)
    // (a start time one tick past this process's own: nextest runs each test in a new process,
    // so `true` above can start within the same clock tick as this one — CI saw it)
    let mut reused = handle("reused");
    reused.pid = std::process::id();
    reused.start_time = crate::process::start_time(reused.pid)
        .unwrap()
        .expect("this process has a start time")
        + 1;
    recorded_live(&home, "reused", reused, "VMRS_READY 10.0.2.15\n");

    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    assert_eq!(mgr.state("off").await.unwrap(), VmState::Stopped);
    let st = mgr.state("panicked").await.unwrap();
    assert_eq!(
        failed_reason(&st),
        "guest kernel panic: VFS: Unable to mount root fs on unknown-block(0,0)"
    );
    for name in ["crashed", "reused"] {
        let st = mgr.state(name).await.unwrap();
        assert!(
            failed_reason(&st).contains("no vm-rs process was watching"),
            "{st}"
        );
        // and persisted
        assert_eq!(record::load_record(&mgr.vm_dir(name)).unwrap().state, st);
    }
    assert!(
        fake.calls().is_empty(),
        "nothing was signalled: {:?}",
        fake.calls()
    );
}

#[tokio::test]
async fn illegal_transitions_are_errors_and_change_nothing() {
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    started(&mgr, &home, "t").await;
    let entry = mgr.entry("t").await.unwrap();
    let err = entry.transition(VmState::Starting).await.unwrap_err();
    assert_eq!(
        err,
        StateError::IllegalTransition {
            vm: "t".into(),
            from: StateKind::Ready,
            to: StateKind::Starting
        }
    );
    assert_eq!(mgr.state("t").await.unwrap(), VmState::Ready { ip: GUEST_IP });
    // the same state again is a no-op, not an error
    entry.transition(VmState::Ready { ip: GUEST_IP }).await.unwrap();

    mgr.kill("t").await.unwrap();
    let before = std::fs::read(mgr.vm_dir("t").join(files::STATE)).unwrap();
    for to in [VmState::Paused, VmState::Running, VmState::Ready { ip: GUEST_IP }] {
        let err = entry.transition(to.clone()).await.unwrap_err();
        assert!(
            matches!(
                err,
                StateError::IllegalTransition {
                    from: StateKind::Stopped,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(mgr.state("t").await.unwrap(), VmState::Stopped);
    assert_eq!(std::fs::read(mgr.vm_dir("t").join(files::STATE)).unwrap(), before);
}

#[tokio::test]
async fn vmm_verbs_check_state_reach_the_driver_and_record_changes() {
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    started(&mgr, &home, "v").await;

    mgr.resize("v", Some(2), None).await.unwrap();
    mgr.resize("v", None, Some(128)).await.unwrap();
    assert!(matches!(
        mgr.resize("v", None, None).await,
        Err(ManagerError::InvalidRequest { .. })
    ));
    let info = mgr.inspect("v").await.unwrap();
    assert_eq!((info.cpus, info.memory_mib), (2, 128));

    let disk = mgr.add_disk("v", DiskConfig::new(&home.kernel)).await.unwrap();
    let nic = mgr
        .add_net(
            "v",
            TapNetwork {
                tap: Some("tap9".into()),
                mac: None,
            },
        )
        .await
        .unwrap();
    assert!(matches!(
        mgr.add_disk("v", DiskConfig::new(home.path().join("missing.img")))
            .await,
        Err(ManagerError::Io { .. })
    ));
    mgr.remove_device("v", &disk).await.unwrap();
    let info = mgr.inspect("v").await.unwrap();
    assert!(matches!(&info.devices[..], [PluggedDevice::Net { id, .. }] if *id == nic));
    let live = record::load_live(&mgr.vm_dir("v")).unwrap();
    assert_eq!((live.cpus, live.devices.len()), (Some(2), 1));

    assert_eq!(mgr.counters("v").await.unwrap()["disk7"]["read_bytes"], 512);
    let unsupported = mgr.vmm_info("v").await.unwrap_err();
    assert!(
        matches!(
            &unsupported,
            ManagerError::Driver {
                source: DriverError::Unsupported { feature: "info", .. },
                ..
            }
        ),
        "{unsupported:?}"
    );
    // a resized vm with a hot-plugged NIC cannot be restored as it runs: refused before the
    // driver is asked to pause anything
    let refused = mgr
        .snapshot("v", "snap", crate::manager::SnapshotOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &refused,
            ManagerError::Snapshot(crate::snapshot::SnapshotError::Refused { .. })
        ),
        "{refused:?}"
    );
    assert!(!mgr.snapshots_dir().join("snap").exists());
    mgr.pause("v").await.unwrap();
    assert_eq!(
        fake.calls()[1..],
        [
            "resize 2 -".to_string(),
            "resize - 128".into(),
            format!("add disk {}", home.kernel.display()),
            "add net Some(\"tap9\")".into(),
            format!("remove {disk}"),
            "pause".into(),
        ]
    );

    // the VMM's changes go with it
    mgr.kill("v").await.unwrap();
    let info = mgr.inspect("v").await.unwrap();
    assert_eq!((info.cpus, info.memory_mib, info.devices.len()), (1, 64, 0));
    assert!(!mgr.vm_dir("v").join(files::LIVE).exists());

    // stopped: every verb is refused by the state machine before the driver is called
    let calls = fake.calls().len();
    let refused: Vec<(Operation, ManagerError)> = vec![
        (
            Operation::Resize,
            mgr.resize("v", Some(1), None).await.unwrap_err(),
        ),
        (
            Operation::AddDevice,
            mgr.add_disk("v", DiskConfig::new(&home.kernel))
                .await
                .unwrap_err(),
        ),
        (
            Operation::AddDevice,
            mgr.add_net("v", TapNetwork::default()).await.unwrap_err(),
        ),
        (
            Operation::RemoveDevice,
            mgr.remove_device("v", "net3").await.unwrap_err(),
        ),
        (Operation::Counters, mgr.counters("v").await.unwrap_err()),
        (Operation::VmmInfo, mgr.vmm_info("v").await.unwrap_err()),
        (
            Operation::Snapshot,
            mgr.snapshot("v", "s", crate::manager::SnapshotOptions::default())
                .await
                .unwrap_err(),
        ),
        (Operation::Pause, mgr.pause("v").await.unwrap_err()),
        (Operation::Exec, mgr.agent("v").await.unwrap_err()),
    ];
    // Stopping a stopped VM is a no-op (docker's habit), not an error.
    assert_eq!(
        mgr.stop("v", WAIT).await.expect("stop of stopped"),
        VmState::Stopped
    );
    for (op, err) in refused {
        assert!(
            matches!(
                &err,
                ManagerError::State(StateError::InvalidOperation { op: o, state: "stopped", .. }) if *o == op
            ),
            "{op}: {err:?}"
        );
    }
    assert_eq!(
        fake.calls().len(),
        calls,
        "the driver was called for a stopped vm"
    );
}

#[tokio::test]
async fn a_vmm_whose_starter_died_before_recording_it_is_killed_and_the_vm_failed() {
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    let h = started(&mgr, &home, "o").await;
    // the record as a starter killed between spawning the VMM and recording it leaves it
    let dir = mgr.vm_dir("o");
    let mut rec = record::load_record(&dir).unwrap();
    rec.state = VmState::Starting;
    rec.handle = None;
    record::write_json_atomic(&dir.join(files::STATE), &rec).unwrap();
    let other = Fake::new(Button::PowerOff);
    let mgr2 = home.manager(&other).await;
    let st = mgr2.state("o").await.unwrap();
    let reason = failed_reason(&st);
    assert!(
        reason.contains(&format!("pid {}", h.pid)) && reason.contains("killed"),
        "{reason}"
    );
    assert!(!alive(&h), "the VMM no record named still runs");
    mgr2.remove("o", false).await.unwrap();
}

#[tokio::test]
async fn verbs_on_one_vm_wait_for_each_other_and_remove_wins_cleanly() {
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    let h = started(&mgr, &home, "l").await;
    // another process's verb holds the VM's lock: pause waits for it
    let held = super::VmLock::acquire("l", &mgr.vm_dir("l"), WAIT).await.unwrap();
    let pausing = tokio::spawn({
        let mgr = mgr.clone();
        async move { mgr.pause("l").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pausing.is_finished(), "pause did not wait for the lock");
    assert!(fake.calls().iter().all(|c| c != "pause"));
    drop(held);
    pausing.await.unwrap().unwrap();
    assert_eq!(mgr.state("l").await.unwrap(), VmState::Paused);
    // a remove and a kill race: whichever comes second finds the VM gone or stopped
    let (rm, kill) = tokio::join!(mgr.remove("l", true), mgr.kill("l"));
    rm.unwrap();
    assert!(
        matches!(kill, Ok(VmState::Stopped) | Err(ManagerError::NotFound { .. })),
        "{kill:?}"
    );
    assert!(!alive(&h));
    assert!(!mgr.vm_dir("l").exists());
}

#[tokio::test]
async fn a_damaged_record_is_listed_as_damaged_beside_the_others_and_removed() {
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    started(&mgr, &home, "good").await;
    let bad = started(&mgr, &home, "bad").await;
    std::fs::write(mgr.vm_dir("bad").join(files::CONFIG), b"{\"name\": ").unwrap();
    let fresh = home.manager(&fake).await;
    let list = fresh.list().await.unwrap();
    assert_eq!(list.len(), 2);
    match &list[0] {
        super::VmListing::Damaged(d) => {
            assert_eq!(d.name, "bad");
            assert!(d.reason.contains("config.json"), "{}", d.reason);
            assert_eq!(d.pids, vec![bad.pid]);
        }
        other => panic!("bad is not damaged: {other:?}"),
    }
    assert_eq!(
        list[1].info().map(|i| i.state.clone()),
        Some(VmState::Ready { ip: GUEST_IP })
    );
    assert!(matches!(
        fresh.inspect("bad").await,
        Err(ManagerError::Damaged { .. })
    ));
    // its VMM runs: only a forced remove takes it, and kills the VMM
    assert!(matches!(
        fresh.remove("bad", false).await,
        Err(ManagerError::InvalidRequest { .. })
    ));
    fresh.remove("bad", true).await.unwrap();
    assert!(!alive(&bad));
    assert!(!fresh.vm_dir("bad").exists());
    assert_eq!(fresh.list().await.unwrap().len(), 1);
    fresh.remove("good", true).await.unwrap();
}

#[tokio::test]
async fn a_corrupt_network_record_fails_a_plain_remove_and_never_a_forced_one() {
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    let h = started(&mgr, &home, "n").await;
    let net = mgr.vm_dir("n").join(crate::net::host::STATE_FILE);
    std::fs::write(&net, b"{\"version\": 1, \"vm_name\": ").unwrap();
    mgr.kill("n").await.unwrap();
    // a plain remove says what is wrong and leaves the VM as it was
    let err = mgr.remove("n", false).await.unwrap_err();
    assert!(matches!(err, ManagerError::Network { .. }), "{err:?}");
    assert!(mgr.vm_dir("n").exists());
    // a forced one removes it, of a live VM too
    mgr.remove("n", true).await.unwrap();
    assert!(!mgr.vm_dir("n").exists());
    assert!(!alive(&h));
    let h = started(&mgr, &home, "n2").await;
    std::fs::write(
        mgr.vm_dir("n2").join(crate::net::host::STATE_FILE),
        b"\x00garbage",
    )
    .unwrap();
    mgr.remove("n2", true).await.unwrap();
    assert!(!alive(&h), "the forced remove of a live VM left its VMM");
    assert!(!mgr.vm_dir("n2").exists());
    assert!(mgr.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn snapshot_pauses_publishes_whole_and_a_failed_restore_leaves_nothing() {
    use crate::manager::{RestoreOptions, SnapshotOptions};
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    started(&mgr, &home, "v").await;
    let info = mgr.snapshot("v", "s", SnapshotOptions::default()).await.unwrap();
    // paused for the backend, and left paused
    assert_eq!(mgr.state("v").await.unwrap(), VmState::Paused);
    let calls = fake.calls();
    let tmp = crate::snapshot::temp_dir(&mgr.snapshots_dir(), "s");
    assert_eq!(
        calls[calls.len() - 2..],
        ["pause".to_string(), format!("snapshot {}", tmp.display())]
    );
    // published under its name, sealed, with its metadata; no temp dir left
    assert_eq!(info.dir, mgr.snapshot_dir("s"));
    assert_eq!(info.meta.source_vm, "v");
    assert_eq!(info.meta.ip, Some(GUEST_IP));
    assert_eq!(info.meta.kernel.path, home.kernel);
    assert!(!tmp.exists());
    let names: Vec<_> = mgr
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.meta.name)
        .collect();
    assert_eq!(names, ["s"]);
    assert!(matches!(
        mgr.snapshot("v", "s", SnapshotOptions::default()).await,
        Err(ManagerError::Snapshot(
            crate::snapshot::SnapshotError::AlreadyExists { .. }
        ))
    ));
    // --leave-running resumes a VM that was running
    mgr.resume("v").await.unwrap();
    mgr.snapshot("v", "s2", SnapshotOptions { leave_running: true })
        .await
        .unwrap();
    assert_eq!(mgr.state("v").await.unwrap(), VmState::Ready { ip: GUEST_IP });
    // the fake cannot restore: the restore fails and leaves no VM behind
    let e = mgr
        .restore("s", "r", RestoreOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Unsupported, "{e:?}");
    assert!(!mgr.vm_dir("r").exists());
    mgr.remove_snapshot("s", false).await.unwrap();
    mgr.remove_snapshot("s2", false).await.unwrap();
    assert!(mgr.list_snapshots().await.unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(mgr.snapshots_dir()).unwrap().count(),
        0,
        "removed snapshots left files"
    );
    // the fake VMM (a sleep) goes with the VM, not with the test process
    assert_eq!(mgr.kill("v").await.unwrap(), VmState::Stopped);
}

#[tokio::test]
async fn a_backend_error_after_a_requested_kill_is_still_the_kill() {
    // Cloud Hypervisor's event stream ends with "exited without shutting down" once its process
    // is gone; that can reach the manager before the watcher's exit does.
    let home = Home::new();
    let fake = Fake::new(Button::PowerOff);
    let mgr = home.manager(&fake).await;
    let h = started(&mgr, &home, "k").await;
    wait_until("events subscriber", || fake.events.receiver_count() > 0).await;
    let entry = mgr.entry("k").await.unwrap();
    entry.request_exit(crate::state::Operation::Kill).await.unwrap();
    entry
        .on_event(VmmEvent::Error {
            reason: "exited without shutting down (killed or crashed)".into(),
        })
        .await;
    assert!(matches!(
        entry.exit_cause(),
        super::monitor::ExitCause::Requested(crate::state::Operation::Kill)
    ));
    Fake::end_vmm(&h);
    assert_eq!(finished(&mgr, "k").await, VmState::Stopped);
}
