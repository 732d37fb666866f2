//! VM lifecycle commands: run, ps, stop, kill, pause, resume, logs, inspect, rm.

use crate::exit::CliError;
use anyhow::Context;
use clap::Args;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use vm_rs::config::{Accel, BackendKind, DiskConfig};
use vm_rs::manager::{DamagedVm, ManagerError, VmListing};
use vm_rs::state::{Operation, StateError};
use vm_rs::{SharedDir, VmConfig, VmInfo, VmManager, VmState};

/// `vmrs run`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// VM name (default: a generated `vm-xxxxxx`).
    #[arg(long)]
    pub name: Option<String>,
    /// Return once the guest is ready, leaving the VM running.
    #[arg(short, long)]
    pub detach: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Memory: MiB, or with a unit (`512m`, `1G`, `1.5g`).
    #[arg(short, long, default_value = "256", value_parser = parse_memory_mib, value_name = "SIZE")]
    pub memory: u64,
    /// Kernel image (default: the built-in guest's, from `vmrs setup`).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (default: the built-in guest's when --kernel is not given).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Share a host directory into the guest over virtio-fs: HOST:GUEST[:ro] (repeatable, as
    /// docker's `-v`). A relative HOST is resolved against the current directory and must be
    /// an existing directory; GUEST is created in the guest and the share mounted there before
    /// the VM is ready. `:ro` is enforced by the host daemon.
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub volumes: Vec<String>,
    /// Attach a disk: PATH[,ro][,format=raw|qcow2][,cache=writeback|none|unsafe][,backing=deny|allow]
    /// (repeatable). A qcow2 image that names other host files (backing or data file) needs
    /// backing=allow.
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// Acceleration (auto: probe KVM, fall back to TCG).
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Backend (auto: the best one this host has).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// How the host reaches the guest agent (exec, cp, images): `serial` (virtio-serial) or
    /// `vsock` (on QEMU through a vhost-device-vsock sidecar). Default: the backend's own
    /// (virtio-serial on QEMU).
    #[arg(long, value_name = "serial|vsock", value_parser = parse_agent_transport)]
    pub agent_transport: Option<vm_rs::devices::AgentTransport>,
    /// Seconds to wait for the guest's readiness marker (with --detach).
    #[arg(long, default_value_t = 120)]
    pub ready_timeout: u64,
    /// Seconds a graceful stop waits before killing (foreground: Ctrl-C, SIGTERM, or the
    /// terminal closing).
    #[arg(long, default_value_t = 10)]
    pub stop_timeout: u64,
    /// Remove the VM when it stops, however the foreground run ends (not with --detach:
    /// nothing would be left to remove it).
    #[arg(long, conflicts_with = "detach")]
    pub rm: bool,
    /// Cap of the serial log (`serial.log`): bytes, or with a unit (`64k`, `8m`, `1g`);
    /// past it the output is dropped, keeping the head and, when the VM ends, the last 64 KiB.
    #[arg(long, value_parser = parse_bytes, value_name = "SIZE", default_value = "8m")]
    pub log_max: u64,
    /// Print the VM's details as JSON when detached. With IMAGE: also one JSON line on
    /// stderr before the command runs saying how the VM started (`"start":"restored"` from
    /// the warm-start cache, or `"booted"`).
    #[arg(long)]
    pub json: bool,
    /// With IMAGE: always boot; neither restore from nor save to the warm-start cache (a
    /// ready-state snapshot per image and machine that later runs restore instead of
    /// booting).
    #[arg(long)]
    pub no_snapshot_cache: bool,
    /// Networking (`--net`, `-p`).
    #[command(flatten)]
    pub net: super::net::NetArgs,
    /// With IMAGE: the size of the VM's root disk (`2G`, `512m`; bytes without a unit); the
    /// guest's root file system grows to fill it. Default: the image's with as much again, at
    /// least 1 GiB, free. The shared image cache is never changed.
    #[arg(long, value_parser = parse_bytes, value_name = "SIZE")]
    pub rootfs_size: Option<u64>,
    /// With IMAGE and -d: restart the image's process when it ends: `no`, `on-failure[:N]`
    /// (exit code not 0; at most N times, default 5) or `always[:N]` (default: no limit).
    /// Once it ends for good the VM stops and records its exit code.
    #[arg(long, value_parser = parse_restart, default_value = "no", value_name = "POLICY")]
    pub restart: vm_rs::agent::Restart,
    /// `-i`, `-t`: attach stdin / a guest terminal to the command (with IMAGE), or to a shell
    /// in the built-in guest (without IMAGE; then `-- CMD` replaces the shell).
    #[command(flatten)]
    pub stdio: super::agent::StdioArgs,
    /// Start the VM from this snapshot (`vmrs snapshot create`) instead of booting: its RAM,
    /// devices and disks as saved, a new identity. `--cpus`/`--memory`, when given, must be
    /// the snapshot's; kernel, disk and network options are the snapshot's.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["image", "kernel", "initrd", "disks"])]
    pub from: Option<String>,
    /// OCI image to run: its root filesystem becomes the VM's root, and its process (entrypoint
    /// + cmd, env, working dir, user) runs through the guest agent. Pulled when not stored.
    pub image: Option<String>,
    /// With IMAGE: the command replacing the image's cmd (without IMAGE, with -i or -t: the
    /// command to run instead of a shell).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// `--accel` values (mirrors [`Accel`], which does not depend on clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    /// Probe KVM and use it when usable, else TCG.
    Auto,
    /// Hardware virtualization; fails when KVM is not usable.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
    /// Apple's Hypervisor.framework (macOS hosts).
    Hvf,
}

impl From<AccelArg> for Accel {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
            AccelArg::Hvf => Accel::Hvf,
        }
    }
}

/// `--agent-transport` values.
fn parse_agent_transport(s: &str) -> Result<vm_rs::devices::AgentTransport, String> {
    s.parse()
}

/// `--backend` values (mirrors [`BackendKind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// The best backend this host has.
    Auto,
    /// QEMU over QMP.
    Qemu,
    /// Cloud Hypervisor over its REST API.
    #[value(alias = "ch")]
    CloudHypervisor,
    /// Firecracker over its REST API.
    #[value(alias = "fc")]
    Firecracker,
    /// Apple's Virtualization.framework (macOS hosts).
    Vz,
}

impl From<BackendArg> for BackendKind {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => BackendKind::Auto,
            BackendArg::Qemu => BackendKind::Qemu,
            BackendArg::CloudHypervisor => BackendKind::CloudHypervisor,
            BackendArg::Firecracker => BackendKind::Firecracker,
            BackendArg::Vz => BackendKind::Vz,
        }
    }
}

/// A memory size in MiB: a bare number is MiB (docker would read bytes, but nobody means 256
/// bytes); `b` is bytes; `k`, `m`, `g`, `t` (optionally followed by `b` or `ib`, any case) are
/// binary units.
/// The result must be a whole number of MiB.
pub fn parse_memory_mib(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let t = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let bytes = t.len() != lower.len() && t.ends_with(|c: char| c.is_ascii_digit());
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let kib: f64 = match unit {
        "k" => 1.0,
        "" if bytes => 1.0 / 1024.0,
        "" | "m" => 1024.0,
        "g" => 1024.0 * 1024.0,
        "t" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("unknown unit in {s:?} (expected e.g. 256, 512m, 1G)")),
    };
    let value: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .ok_or_else(|| format!("{s:?} is not a size (expected e.g. 256, 512m, 1G)"))?;
    let mib = value * kib / 1024.0;
    if mib.fract() != 0.0 || mib > u32::MAX as f64 {
        return Err(format!("{s:?} is not a whole number of MiB"));
    }
    Ok(mib as u64)
}

/// `--restart`: `no`, `on-failure[:N]`, `always[:N]`.
pub fn parse_restart(s: &str) -> Result<vm_rs::agent::Restart, String> {
    use vm_rs::agent::{Restart, RestartPolicy};
    let (policy, max) = match s.split_once(':') {
        Some((p, n)) => (
            p,
            Some(
                n.parse::<u32>()
                    .map_err(|_| format!("{s:?}: the restart count must be a number"))?,
            ),
        ),
        None => (s, None),
    };
    Ok(match policy {
        "no" if max.is_none() => Restart::default(),
        "on-failure" => Restart {
            policy: RestartPolicy::OnFailure,
            max: max.unwrap_or(5),
        },
        "always" => Restart {
            policy: RestartPolicy::Always,
            max: max.unwrap_or(u32::MAX),
        },
        _ => return Err(format!("{s:?}: expected no, on-failure[:N] or always[:N]")),
    })
}

/// A size in bytes: a bare number is bytes; `k`, `m`, `g` (optionally followed by `b` or `ib`,
/// any case) are binary units.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let t = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => return Err(format!("unknown unit in {s:?} (expected e.g. 65536, 64k, 8m)")),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size (expected e.g. 65536, 64k, 8m)"))
}

/// Built-in guest assets: the kernel and initramfs written by `vmrs setup`.
fn builtin_assets() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = vm_rs::paths::assets_dir();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.img");
    if !kernel.is_file() || !initrd.is_file() {
        return Err(CliError::NotFound(format!(
            "built-in guest not found in {}: run `vmrs setup` first (or pass --kernel)",
            dir.display()
        ))
        .into());
    }
    Ok((kernel, initrd))
}

fn generated_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "vm-{:06x}",
        (nanos ^ std::process::id().rotate_left(16)) & 0xff_ffff
    )
}

/// Build the VmConfig for `run` from its flags.
pub fn run_config(a: &RunArgs) -> anyhow::Result<VmConfig> {
    let (kernel, initrd) = match &a.kernel {
        Some(k) => (k.clone(), a.initrd.clone()),
        None => {
            let (k, i) = builtin_assets()?;
            (k, Some(a.initrd.clone().unwrap_or(i)))
        }
    };
    let mut b = VmConfig::builder(a.name.clone().unwrap_or_else(generated_name))
        .cpus(a.cpus)
        .memory_mib(a.memory)
        .kernel(kernel)
        .cmdline(a.cmdline.clone())
        .accel(a.accel.into())
        .backend(a.backend.into())
        .serial_log_max(a.log_max);
    if let Some(t) = a.agent_transport {
        b = b.agent_transport(t);
    }
    if let Some(i) = initrd {
        b = b.initramfs(i);
    }
    for d in &a.disks {
        b = b.disk(DiskConfig::parse(d)?);
    }
    for (i, v) in a.volumes.iter().enumerate() {
        b = b.shared_dir(SharedDir::parse_volume(v, i)?);
    }
    for n in super::net::networks(&a.net)? {
        b = b.network(n);
    }
    Ok(b.build()?)
}

/// What `--cpus`/`--memory` ask of a restore: only sizes that differ from the flags' defaults
/// were given (and must then match the snapshot).
pub fn restore_options(cpus: u32, memory_mib: u64) -> vm_rs::manager::RestoreOptions {
    vm_rs::manager::RestoreOptions {
        cpus: (cpus != 1).then_some(cpus),
        memory_mib: (memory_mib != 256).then_some(memory_mib),
    }
}

/// `vmrs run`
pub async fn run(a: RunArgs) -> anyhow::Result<i32> {
    // Before anything is started: from here on SIGINT, SIGTERM and SIGHUP no longer end this
    // process at once (which would leave a VM no foreground run owns), they stop the VM.
    let mut signals = StopSignals::install()?;
    let attach = a.stdio.interactive || a.stdio.tty;
    if attach && a.detach {
        return Err(CliError::Invalid(
            "-i/-t cannot be combined with -d (there is no attach); use `vmrs exec -it NAME sh` once it runs"
                .to_string(),
        )
        .into());
    }
    // the guest restarts an image's main process; nothing else has one to restart
    if a.restart != vm_rs::agent::Restart::default() && (a.image.is_none() || !a.detach) {
        return Err(CliError::Invalid(
            "--restart needs an IMAGE and -d (it restarts the image's process when it ends)".to_string(),
        )
        .into());
    }
    if let Some(image) = a.image.clone() {
        return super::agent::run_image(a, image, signals).await;
    }
    if attach {
        return run_attached(a, signals).await;
    }
    if !a.command.is_empty() {
        return Err(CliError::Invalid("a command after `--` needs an IMAGE (or -i/-t)".to_string()).into());
    }
    let mgr = VmManager::new().await?;
    let (name, info) = match &a.from {
        Some(snapshot) => {
            let name = a.name.clone().unwrap_or_else(generated_name);
            let info = mgr
                .restore(snapshot, &name, restore_options(a.cpus, a.memory))
                .await
                .with_context(|| format!("cannot start vm {name:?} from snapshot {snapshot:?}"))?;
            (name, info)
        }
        None => {
            let config = run_config(&a)?;
            let name = config.name.clone();
            let info = mgr
                .start(config)
                .await
                .with_context(|| format!("cannot start vm {name:?}"))?;
            (name, info)
        }
    };
    if a.detach {
        let ready = tokio::select! {
            r = mgr.wait_ready(&name, Duration::from_secs(a.ready_timeout)) => r.map_err(anyhow::Error::new),
            sig = signals.recv() => Err(CliError::Interrupted { signal: sig }.into()),
        };
        if let Err(e) = ready {
            let _ = mgr.kill(&name).await;
            // The console tail is usually what explains a guest that never got ready.
            let tail = vm_rs::console::tail_lines(&info.serial_log, 15);
            if !tail.is_empty() {
                eprintln!("vmrs: last console lines of {name}:\n{tail}");
            }
            return Err(e.context(format!("vm {name:?} did not become ready; it was killed")));
        }
        if a.json {
            println!("{}", serde_json::to_string_pretty(&mgr.inspect(&name).await?)?);
        } else {
            println!("{name}");
        }
        return Ok(0);
    }
    // Foreground: stream the console; the first stop signal stops gracefully, a second kills.
    say(format_args!(
        "vmrs: started {name} (pid {}); Ctrl-C stops it",
        info.pid.unwrap_or(0)
    ));
    let follow = tokio::spawn(follow_log(info.serial_log.clone(), 0));
    let mut rx = mgr.subscribe(&name).await?;
    let mut interrupts = 0;
    let final_state = loop {
        tokio::select! {
            changed = rx.changed() => {
                let st = rx.borrow_and_update().clone();
                if changed.is_err() || !st.is_live() { break st; }
            }
            sig = signals.recv() => {
                interrupts += 1;
                if interrupts == 1 {
                    say(format_args!("\nvmrs: {sig}: stopping {name} (again to kill)"));
                    let mgr = mgr.clone();
                    let n = name.clone();
                    let t = Duration::from_secs(a.stop_timeout);
                    tokio::spawn(async move { let _ = mgr.stop(&n, t).await; });
                } else {
                    say(format_args!("vmrs: {sig}: killing {name}"));
                    let _ = mgr.kill(&name).await;
                }
            }
        }
    };
    // let the follower print the last lines
    tokio::time::sleep(Duration::from_millis(100)).await;
    follow.abort();
    let code = match &final_state {
        VmState::Stopped => 0,
        VmState::Failed { reason } => {
            say(format_args!("vmrs: vm {name} failed: {reason}"));
            1
        }
        _ => 0,
    };
    if a.rm {
        mgr.remove(&name, true)
            .await
            .with_context(|| format!("cannot remove vm {name:?}"))?;
    }
    Ok(code)
}

/// `vmrs run -it [-- CMD]` of the built-in guest: boot it, attach a shell (or CMD) through the
/// agent, and stop it (`--rm`: remove it) when that ends; the exit code is the command's.
async fn run_attached(a: RunArgs, mut signals: StopSignals) -> anyhow::Result<i32> {
    let config = run_config(&a)?;
    let name = config.name.clone();
    let argv = if a.command.is_empty() {
        vec!["/bin/sh".to_string()]
    } else {
        a.command.clone()
    };
    let mut cmd = vm_rs::agent::ExecCommand::new(argv);
    let mut session = super::agent::Session::prepare(a.stdio, &mut cmd)?;
    let mgr = VmManager::new().await?;
    mgr.start(config)
        .await
        .with_context(|| format!("cannot start vm {name:?}"))?;
    let result = super::agent::attach_when_ready(&mgr, &name, cmd, &a, &mut session, &mut signals).await;
    if let Err(e) = signals
        .stop_vm(&mgr, &name, Duration::from_secs(a.stop_timeout))
        .await
    {
        tracing::warn!(vm = %name, error = %e, "stopping after run");
    }
    if a.rm {
        mgr.remove(&name, true)
            .await
            .with_context(|| format!("cannot remove vm {name:?}"))?;
    }
    result
}

/// A line on stderr that may go nowhere: after SIGHUP the terminal is gone, and `eprintln!`
/// would panic on the failed write instead of letting the run clean up.
pub(crate) fn say(msg: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// The signals that end a foreground run: SIGINT (Ctrl-C), SIGTERM (`kill`, a service
/// manager) and SIGHUP (the terminal closed). Installing them replaces their default action
/// (ending the process at once) for the rest of the process's life; each arrival is then
/// delivered by [`recv`](Self::recv), including one that came while nobody was waiting.
pub(crate) struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Take over SIGINT, SIGTERM and SIGHUP.
    pub(crate) fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let on = |kind: SignalKind, what: &str| {
            signal(kind).with_context(|| format!("cannot install a {what} handler"))
        };
        Ok(StopSignals {
            int: on(SignalKind::interrupt(), "SIGINT")?,
            term: on(SignalKind::terminate(), "SIGTERM")?,
            hup: on(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Stop `name` gracefully within `timeout`; a stop signal meanwhile kills it instead.
    pub(crate) async fn stop_vm(
        &mut self,
        mgr: &VmManager,
        name: &str,
        timeout: Duration,
    ) -> Result<VmState, ManagerError> {
        tokio::select! {
            r = mgr.stop(name, timeout) => r,
            sig = self.recv() => {
                say(format_args!("vmrs: {sig}: killing {name}"));
                mgr.kill(name).await
            }
        }
    }

    /// The next stop signal's name.
    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

async fn follow_log(path: PathBuf, offset: u64) -> std::io::Result<()> {
    let mut f = vm_rs::console::LogFollower::open(&path, offset).await?;
    let mut buf = vec![0u8; 16384];
    let mut out = std::io::stdout();
    while let Some(n) = f.next_chunk(&mut buf).await? {
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    Ok(())
}

/// `vmrs ps`
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Show all VMs (default: only live ones).
    #[arg(short, long)]
    pub all: bool,
    /// JSON output: an array of objects.
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,
    /// Only names, one per line.
    #[arg(short, long)]
    pub quiet: bool,
}

/// One `ps --json` row.
#[derive(Debug, Serialize)]
pub struct PsRow {
    /// Name.
    pub name: String,
    /// `starting`, `running`, `ready`, `paused`, `stopped`, `failed`, or `damaged` (its
    /// records cannot be read; `rm -f` removes it).
    pub state: &'static str,
    /// Why it failed or is damaged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// An image VM stopped because its process ended: that process's exit code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The VMM runs but did not answer a short probe (frozen or wedged); `state` is the last
    /// one recorded.
    pub unresponsive: bool,
    /// Address from the readiness marker.
    pub ip: Option<String>,
    /// Backend (unknown for a damaged VM).
    pub backend: Option<BackendKind>,
    /// VMM pid (for a damaged VM: a process its directory owns).
    pub pid: Option<u32>,
    /// Acceleration used.
    pub accel: Option<String>,
    /// vCPUs.
    pub cpus: u32,
    /// Memory (MiB).
    pub memory_mib: u64,
    /// Unix time created.
    pub created_at: u64,
    /// Published ports (`127.0.0.1:8080->80/tcp`).
    pub ports: Vec<String>,
    /// Shared directories (`-v`), each with whether its daemon still serves it.
    pub mounts: Vec<vm_rs::virtiofs::MountInfo>,
}

impl PsRow {
    /// The mounts column: `HOST:GUEST[:ro]`, with `(down)` for a live VM's share whose
    /// daemon died.
    fn mounts_column(&self) -> String {
        let live = matches!(self.state, "starting" | "running" | "ready" | "paused");
        self.mounts
            .iter()
            .map(|m| {
                if live && !m.serving {
                    format!("{} (down)", m.spec())
                } else {
                    m.spec()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl From<&VmInfo> for PsRow {
    fn from(i: &VmInfo) -> Self {
        PsRow {
            name: i.name.clone(),
            state: i.state.name(),
            reason: match &i.state {
                VmState::Failed { reason } => Some(reason.clone()),
                _ => None,
            },
            exit_code: i.exit_code,
            unresponsive: i.unresponsive,
            ip: i.ip.map(|ip| ip.to_string()),
            backend: Some(i.backend),
            pid: i.pid,
            accel: i.accel.clone(),
            cpus: i.cpus,
            memory_mib: i.memory_mib,
            created_at: i.created_at,
            ports: super::net::ports(&i.config.networks),
            mounts: i.mounts.clone(),
        }
    }
}

impl From<&DamagedVm> for PsRow {
    fn from(d: &DamagedVm) -> Self {
        PsRow {
            name: d.name.clone(),
            state: "damaged",
            reason: Some(d.reason.clone()),
            exit_code: None,
            ip: None,
            backend: None,
            pid: d.pids.first().copied(),
            accel: None,
            cpus: 0,
            memory_mib: 0,
            created_at: 0,
            ports: Vec::new(),
            mounts: Vec::new(),
            unresponsive: false,
        }
    }
}

impl From<&VmListing> for PsRow {
    fn from(l: &VmListing) -> Self {
        match l {
            VmListing::Vm(i) => PsRow::from(&**i),
            VmListing::Damaged(d) => PsRow::from(d),
        }
    }
}

fn ago(ts: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(ts);
    let s = now.saturating_sub(ts);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// `vmrs ps`
pub async fn ps(a: PsArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    // A damaged VM is always shown: it needs attention (`rm -f`).
    let vms: Vec<VmListing> = mgr
        .list()
        .await?
        .into_iter()
        .filter(|l| a.all || l.info().map_or(true, |v| v.state.is_live()))
        .collect();
    let rows: Vec<PsRow> = vms.iter().map(PsRow::from).collect();
    if a.quiet {
        for r in &rows {
            println!("{}", r.name);
        }
        return Ok(0);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!(
        "{:<20} {:<9} {:<16} {:<7} {:>8} {:>4} {:>7}  {:<14} {:<24} MOUNTS",
        "NAME", "STATE", "IP", "BACKEND", "PID", "CPUS", "MEM", "CREATED", "PORTS"
    );
    for r in &rows {
        if r.state == "damaged" {
            println!(
                "{:<20} {:<9} {}",
                r.name,
                r.state,
                r.reason.as_deref().unwrap_or_default()
            );
            continue;
        }
        let state = match (r.unresponsive, r.exit_code) {
            (true, _) => format!("{} (unresponsive)", r.state),
            (false, Some(code)) if r.state == "stopped" => format!("exited ({code})"),
            _ => r.state.to_string(),
        };
        let line = format!(
            "{:<20} {:<9} {:<16} {:<7} {:>8} {:>4} {:>6}M  {:<14} {:<24} {}",
            r.name,
            state,
            r.ip.as_deref().unwrap_or("-"),
            r.backend.map_or_else(|| "-".to_string(), |b| b.to_string()),
            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            r.cpus,
            r.memory_mib,
            ago(r.created_at),
            r.ports.join(", "),
            r.mounts_column()
        );
        println!("{}", line.trim_end());
    }
    Ok(0)
}

/// Commands that take VM names.
#[derive(Debug, Args)]
pub struct NamesArgs {
    /// VM names.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `vmrs stop`
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Seconds to wait for the guest to power off before killing it.
    #[arg(short, long, default_value_t = 10)]
    pub timeout: u64,
    /// VM names.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `vmrs start`
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Seconds to wait for each guest's readiness marker.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout: u64,
    /// Stopped or failed VMs to boot again.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `vmrs start`: boot stopped VMs again with their saved configuration, disks and networks
/// (an image VM started with `run -d` also runs its process again); returns once each is ready (a VM that does not get ready in time is killed, as with
/// `run -d`).
pub async fn start(a: StartArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    let t = Duration::from_secs(a.ready_timeout);
    each(&a.names, |n| {
        let mgr = mgr.clone();
        async move {
            mgr.start_existing(&n)
                .await
                .with_context(|| format!("cannot start vm {n:?}"))?;
            if let Err(e) = mgr.wait_ready(&n, t).await {
                let _ = mgr.kill(&n).await;
                return Err(
                    anyhow::Error::new(e).context(format!("vm {n:?} did not become ready; it was killed"))
                );
            }
            // An image VM runs its main process again (docker start), with its restart rule.
            mgr.rerun_main(&n)
                .await
                .with_context(|| format!("vm {n:?} started, but its process did not"))?;
            Ok(())
        }
    })
    .await
}

/// Run `op` on each name, printing the name on success; the first error is returned after
/// trying all of them.
async fn each<F, Fut>(names: &[String], op: F) -> anyhow::Result<i32>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut first_err = None;
    for n in names {
        match op(n.clone()).await {
            Ok(()) => println!("{n}"),
            Err(e) => {
                if first_err.is_some() {
                    crate::exit::print_error(&e);
                } else {
                    first_err = Some(e);
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(0),
    }
}

/// `vmrs stop`
pub async fn stop(a: StopArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    let t = Duration::from_secs(a.timeout);
    each(&a.names, |n| {
        let mgr = mgr.clone();
        async move { mgr.stop(&n, t).await.map(drop).map_err(Into::into) }
    })
    .await
}

/// `vmrs kill`
pub async fn kill(a: NamesArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    each(&a.names, |n| {
        let mgr = mgr.clone();
        async move { mgr.kill(&n).await.map(drop).map_err(Into::into) }
    })
    .await
}

/// `vmrs pause`
pub async fn pause(a: NamesArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    each(&a.names, |n| {
        let mgr = mgr.clone();
        async move { mgr.pause(&n).await.map_err(Into::into) }
    })
    .await
}

/// `vmrs resume`
pub async fn resume(a: NamesArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    each(&a.names, |n| {
        let mgr = mgr.clone();
        async move { mgr.resume(&n).await.map_err(Into::into) }
    })
    .await
}

/// `vmrs logs`
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep following until the VM stops.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines (then follow, with -f).
    #[arg(short = 'n', long, value_name = "N")]
    pub tail: Option<usize>,
    /// The serial console (kernel and init messages) even for an image VM, whose logs are
    /// otherwise its process's output.
    #[arg(long)]
    pub console: bool,
    /// VM name.
    pub name: String,
}

/// `vmrs logs`
pub async fn logs(a: LogsArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    let info = mgr.inspect(&a.name).await?;
    let process_log = info.dir.join(vm_rs::vm_dir::VmDir::PROCESS_LOG);
    let log = if !a.console && process_log.exists() {
        process_log
    } else {
        info.serial_log.clone()
    };
    let bytes = std::fs::read(&log).with_context(|| format!("cannot read {}", log.display()))?;
    let start = a.tail.map_or(0, |n| tail_start(&bytes, n));
    if !a.follow || !info.state.is_live() {
        std::io::stdout().write_all(&bytes[start..])?;
        return Ok(0);
    }
    let follow = tokio::spawn(follow_log(log, start as u64));
    let mut rx = mgr.subscribe(&a.name).await?;
    loop {
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() || !rx.borrow_and_update().is_live() { break; }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    follow.abort();
    Ok(0)
}

/// Byte offset where the last `n` lines of `bytes` start (a final newline ends the last line,
/// it does not start an empty one).
fn tail_start(bytes: &[u8], n: usize) -> usize {
    if n == 0 {
        return bytes.len();
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(n - 1)
        .map_or(0, |(i, _)| i + 1)
}

/// `vmrs wait`: block until each VM is no longer live; print its exit code (an image VM's
/// process's, else 0 for a stop and 1 for a failure) and exit with the last one.
pub async fn wait(a: NamesArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    let mut last = 0;
    for n in &a.names {
        let mut rx = mgr.subscribe(n).await?;
        loop {
            if !rx.borrow_and_update().is_live() {
                break;
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
        let info = mgr.inspect(n).await?;
        last = match (&info.state, info.exit_code) {
            (_, Some(code)) => code,
            (VmState::Failed { .. }, None) => 1,
            _ => 0,
        };
        println!("{last}");
    }
    Ok(last)
}

/// `vmrs inspect`
pub async fn inspect(a: NamesArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    let mut out = Vec::new();
    for n in &a.names {
        // a damaged VM shows as `{"name", "state": "damaged", "reason", "dir", "pids"}`
        out.push(match mgr.listing(n).await? {
            VmListing::Vm(i) => serde_json::to_value(&i)?,
            VmListing::Damaged(d) => {
                let mut v = serde_json::to_value(&d)?;
                v["state"] = "damaged".into();
                v
            }
        });
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

/// `vmrs rm`
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Kill and remove running VMs too.
    #[arg(short, long)]
    pub force: bool,
    /// VM names.
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// `vmrs rm`
pub async fn rm(a: RmArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    let force = a.force;
    each(&a.names, |n| {
        let mgr = mgr.clone();
        async move {
            mgr.remove(&n, force).await.map_err(|e| match e {
                ManagerError::State(StateError::InvalidOperation {
                    op: Operation::Remove,
                    state,
                    ..
                }) => CliError::RemoveLive {
                    name: n.clone(),
                    state,
                }
                .into(),
                other => other.into(),
            })
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_read_like_docker_with_mib_as_the_bare_unit() {
        for (input, mib) in [
            ("256", 256),
            ("512m", 512),
            ("512M", 512),
            ("512MiB", 512),
            ("1G", 1024),
            ("1gb", 1024),
            ("1.5g", 1536),
            ("2048k", 2),
            ("1048576b", 1),
        ] {
            assert_eq!(parse_memory_mib(input), Ok(mib), "{input}");
        }
        for bad in [
            "",
            "m",
            "1b",
            "1.5",
            "100k",
            "12q",
            "-1",
            "1e3",
            "99999999999g",
            "1.2.3m",
        ] {
            assert!(parse_memory_mib(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn restart_policies() {
        use vm_rs::agent::{Restart, RestartPolicy};
        assert_eq!(parse_restart("no"), Ok(Restart::default()));
        assert_eq!(
            parse_restart("on-failure"),
            Ok(Restart {
                policy: RestartPolicy::OnFailure,
                max: 5
            })
        );
        assert_eq!(parse_restart("on-failure:2").map(|r| r.max), Ok(2));
        assert_eq!(parse_restart("always").map(|r| r.max), Ok(u32::MAX));
        for bad in ["", "sometimes", "no:3", "on-failure:x", "always:-1"] {
            assert!(parse_restart(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn byte_sizes() {
        for (input, bytes) in [
            ("65536", 65536),
            ("64k", 65536),
            ("8m", 8 << 20),
            ("1GiB", 1 << 30),
        ] {
            assert_eq!(parse_bytes(input), Ok(bytes), "{input}");
        }
        for bad in ["", "k", "1.5m", "-1", "12q", "99999999999999g"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tail_starts_at_the_last_n_lines() {
        let log = b"one\ntwo\nthree\n";
        assert_eq!(&log[tail_start(log, 1)..], b"three\n");
        assert_eq!(&log[tail_start(log, 2)..], b"two\nthree\n");
        assert_eq!(&log[tail_start(log, 9)..], &log[..]);
        assert_eq!(&log[tail_start(log, 0)..], b"");
        assert_eq!(&b"no newline"[tail_start(b"no newline", 1)..], b"no newline");
        assert_eq!(&b"a\nb"[tail_start(b"a\nb", 1)..], b"b");
        assert_eq!(tail_start(b"", 3), 0);
    }
}
