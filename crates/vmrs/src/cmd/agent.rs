//! Commands that talk to the guest agent: `exec`, `cp`, and `run IMAGE`.

use crate::exit::CliError;
use anyhow::Context;
use clap::Args;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;
use vm_rs::agent::session::{pump_stdin, terminal_size, RawTerminal};
use vm_rs::agent::{ExecCommand, ExecEvent, ExecProcess, WinSize};
use vm_rs::manager::ManagerError;
use vm_rs::oci::PullOptions;
use vm_rs::{ImageStore, VmManager};

/// `-i` and `-t`, shared by `exec` and `run`.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct StdioArgs {
    /// Keep stdin open and stream it to the command as it arrives (without -i the command's
    /// stdin is /dev/null).
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// Give the command a terminal in the guest (window size followed, this terminal in raw
    /// mode until the command ends).
    #[arg(short = 't', long = "tty")]
    pub tty: bool,
}

/// `vmrs exec`
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Set an environment variable (KEY=VAL, repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User in the guest: user, uid, user:group or uid:gid.
    #[arg(short = 'u', long = "user")]
    pub user: Option<String>,
    /// `-i`, `-t`.
    #[command(flatten)]
    pub stdio: StdioArgs,
    /// The VM name, then the command and its arguments. Everything after NAME belongs to the
    /// command, flags included (`vmrs exec web ls -l`); a `--` after NAME is accepted too.
    #[arg(
        required = true,
        num_args = 2..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_names = ["NAME", "COMMAND"]
    )]
    pub args: Vec<String>,
}

impl ExecArgs {
    /// The VM name and the command (without a leading `--`).
    fn split(mut self) -> Result<(String, Vec<String>, Self), CliError> {
        let mut rest = std::mem::take(&mut self.args).into_iter();
        let name = rest.next().unwrap_or_default();
        let mut command: Vec<String> = rest.collect();
        if command.first().is_some_and(|a| a == "--") {
            command.remove(0);
        }
        if command.is_empty() {
            return Err(CliError::Invalid(format!("exec {name}: no command given")));
        }
        Ok((name, command, self))
    }
}

/// `vmrs cp`
#[derive(Debug, Args)]
pub struct CpArgs {
    /// Source: a host path or NAME:/guest/path.
    pub src: String,
    /// Destination: a host path or NAME:/guest/path.
    pub dst: String,
}

/// Run a command in a VM; the exit code is the command's (128+signal when killed).
pub async fn exec(a: ExecArgs) -> anyhow::Result<i32> {
    let (name, command, a) = a.split()?;
    let mut cmd = ExecCommand::new(command);
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| CliError::Invalid(format!("--env {kv:?}: expected KEY=VAL")))?;
        cmd = cmd.env(k, v);
    }
    cmd.cwd = a.workdir;
    cmd.user = a.user;
    let stdio = a.stdio;
    let mut session = Session::prepare(stdio, &mut cmd)?;
    let mut signals = super::vm::StopSignals::install()?;
    let mgr = VmManager::new().await?;
    let process = match mgr.exec_streaming(&name, cmd).await {
        Ok(p) => p,
        Err(e) => return spawn_failure(e),
    };
    session
        .relay(process, &name, &mut signals, SignalPolicy::Forward)
        .await
}

/// A command whose program could not start exits like a shell's (127 not found, 126 not
/// executable) with the guest's message; any other error is an error.
fn spawn_failure(e: ManagerError) -> anyhow::Result<i32> {
    if let ManagerError::Agent { source, .. } = &e {
        if let Some(code) = source.shell_code() {
            super::vm::say(format_args!("vmrs: {source}"));
            return Ok(code);
        }
    }
    Err(e.into())
}

/// What a stop signal (SIGINT, SIGTERM, SIGHUP) does during a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignalPolicy {
    /// Forward each to the process (`exec`); the third gives up on it.
    Forward,
    /// Forward the first to the process; the second ends the relay as interrupted (`run IMAGE`
    /// then stops the VM).
    ForwardOnce,
}

/// The host side of one attached command: its terminal (raw while it runs) and stdin.
pub(crate) struct Session {
    stdio: StdioArgs,
    raw: Option<RawTerminal>,
}

/// The size to give a new guest terminal: this process's terminal's (stdout's, else stdin's),
/// else 24x80.
fn host_size() -> WinSize {
    terminal_size(std::io::stdout().as_fd())
        .or_else(|| terminal_size(std::io::stdin().as_fd()))
        .filter(|s| s.rows > 0 && s.cols > 0)
        .unwrap_or(WinSize { rows: 24, cols: 80 })
}

/// A signal's name for the guest: the number (the guest is Linux, as the host).
fn signo(name: &str) -> i32 {
    match name {
        "SIGINT" => libc::SIGINT,
        "SIGHUP" => libc::SIGHUP,
        _ => libc::SIGTERM,
    }
}

impl Session {
    /// Apply `-i`/`-t` to `cmd` (a terminal of this terminal's size, `TERM` passed on).
    pub(crate) fn prepare(stdio: StdioArgs, cmd: &mut ExecCommand) -> anyhow::Result<Session> {
        if stdio.tty && stdio.interactive && !std::io::stdin().is_terminal() {
            return Err(
                CliError::Invalid("the input device is not a TTY (drop -t to pipe input)".into()).into(),
            );
        }
        cmd.interactive_stdin = stdio.interactive;
        if stdio.tty {
            cmd.tty = Some(host_size());
            if !cmd.env.iter().any(|(k, _)| k == "TERM") {
                let term = std::env::var("TERM")
                    .ok()
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| "xterm".into());
                cmd.env.push(("TERM".into(), term));
            }
        }
        Ok(Session { stdio, raw: None })
    }

    /// Relay a started process: stdin in (with -i), output out, signals forwarded, the window
    /// size followed (with -t); returns its shell exit code. The host terminal is raw from
    /// here until this returns, however it returns.
    pub(crate) async fn relay(
        &mut self,
        mut process: ExecProcess,
        name: &str,
        signals: &mut super::vm::StopSignals,
        policy: SignalPolicy,
    ) -> anyhow::Result<i32> {
        if self.stdio.tty && std::io::stdin().is_terminal() {
            self.raw = Some(RawTerminal::enter(std::io::stdin().as_fd())?);
        }
        let control = process.control();
        let pump = process
            .take_stdin()
            .filter(|_| self.stdio.interactive)
            .map(|stdin| {
                tokio::spawn(async move {
                    if let Err(e) = pump_stdin(tokio::io::stdin(), stdin).await {
                        tracing::debug!(error = %e, "stdin");
                    }
                })
            });
        let mut winch = if self.stdio.tty {
            Some(tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::window_change(),
            )?)
        } else {
            None
        };
        let mut forwarded = 0;
        let result = loop {
            tokio::select! {
                ev = process.next_event() => match ev {
                    None => break Err(anyhow::anyhow!("the guest agent ended the command without an exit status")),
                    Some(Err(e)) => break Err(anyhow::Error::new(e).context(format!("exec in {name}"))),
                    Some(Ok(ExecEvent::Exit(s))) => break Ok(s.shell_code()),
                    Some(Ok(ExecEvent::Stdout(d))) => {
                        if let Err(e) = write_out(&mut std::io::stdout().lock(), &d) {
                            break closed_output(e, &control, "stdout").await;
                        }
                    }
                    Some(Ok(ExecEvent::Stderr(d))) => {
                        if let Err(e) = write_out(&mut std::io::stderr().lock(), &d) {
                            break closed_output(e, &control, "stderr").await;
                        }
                    }
                },
                sig = signals.recv() => {
                    forwarded += 1;
                    let give_up = match policy {
                        SignalPolicy::Forward => forwarded >= 3,
                        SignalPolicy::ForwardOnce => forwarded >= 2,
                    };
                    if give_up {
                        break Err(CliError::Interrupted { signal: sig }.into());
                    }
                    let _ = control.signal(signo(sig)).await;
                }
                Some(()) = async { match winch.as_mut() { Some(w) => w.recv().await, None => None } } => {
                    let _ = control.resize(host_size()).await;
                }
            }
        };
        if let Some(p) = pump {
            p.abort();
        }
        self.raw = None;
        result
    }
}

fn write_out(out: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    out.write_all(data)?;
    out.flush()
}

/// Our stdout or stderr went away: a closed pipe (`| head -1`) ends quietly with a shell's
/// code for SIGPIPE and the process gets SIGPIPE too; any other write error is an error.
async fn closed_output(
    e: std::io::Error,
    control: &vm_rs::agent::ExecControl,
    what: &str,
) -> anyhow::Result<i32> {
    let _ = control.signal(libc::SIGPIPE).await;
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return Ok(128 + libc::SIGPIPE);
    }
    Err(anyhow::Error::new(e).context(format!("writing {what}")))
}

/// `vmrs run IMAGE [-- CMD...]`: boot a VM whose root is the image and run its process.
/// Foreground: print the output, stop the VM (`--rm`: remove it), exit with the command's code.
/// `-d`: start the process detached and leave the VM running for `vmrs exec`.
pub async fn run_image(
    a: super::vm::RunArgs,
    image: String,
    mut signals: super::vm::StopSignals,
) -> anyhow::Result<i32> {
    let t0 = std::time::Instant::now();
    let config = super::vm::run_config(&a)?;
    let name = config.name.clone();
    let store = ImageStore::open_default().await?;
    if store.resolve(&image).await.is_err() {
        store
            .pull(&image, &PullOptions::default())
            .await
            .with_context(|| format!("cannot pull {image}"))?;
    }
    let rootfs = vm_rs::rootfs::build_rootfs(&store, &vm_rs::paths::data_dir(), &image)
        .await
        .with_context(|| format!("cannot build the root filesystem of {image}"))?;
    let override_cmd = (!a.command.is_empty()).then_some(a.command.as_slice());
    let mut cmd = rootfs.process.command(override_cmd)?;
    cmd.detach = a.detach;
    let mut session = Session::prepare(a.stdio, &mut cmd)?;
    tracing::debug!(ms = t0.elapsed().as_millis(), "image and root filesystem ready");
    let mgr = VmManager::new().await?;
    let entry = warm_entry(&a, &config, &rootfs);
    let mut how = WarmReport {
        vm: name.clone(),
        start: "booted",
        cache: entry.clone(),
        saved: false,
    };
    let restored = match &entry {
        Some(e) => try_restore(&mgr, e, &name, &a).await,
        None => false,
    };
    if restored {
        how.start = "restored";
    } else {
        mgr.start_image(config, &rootfs, &image, a.rootfs_size)
            .await
            .with_context(|| format!("cannot start vm {name:?}"))?;
        if let Some(e) = &entry {
            let ready = tokio::select! {
                r = mgr.wait_ready(&name, Duration::from_secs(a.ready_timeout)) => Ok(r.is_ok()),
                sig = signals.recv() => Err(sig),
            };
            match ready {
                Ok(true) => how.saved = save_warm(&mgr, &name, e).await,
                // not ready: attach_when_ready reports it the usual way
                Ok(false) => {}
                Err(signal) => {
                    super::vm::say(format_args!("\nvmrs: {signal}: stopping {name} (again to kill)"));
                    let _ = signals
                        .stop_vm(&mgr, &name, Duration::from_secs(a.stop_timeout))
                        .await;
                    if a.rm {
                        let _ = mgr.remove(&name, true).await;
                    }
                    return Err(CliError::Interrupted { signal }.into());
                }
            }
        }
    }
    match how.start {
        "restored" => {
            tracing::info!(vm = %name, cache = ?how.cache, "warm start: restored from the image snapshot cache")
        }
        _ => tracing::info!(vm = %name, cache = ?how.cache, saved = how.saved, "cold start: booted"),
    }
    if a.json {
        super::vm::say(format_args!("{}", serde_json::to_string(&how)?));
    }
    tracing::debug!(ms = t0.elapsed().as_millis(), "vm started");
    let result = attach_when_ready(&mgr, &name, cmd, &a, &mut session, &mut signals).await;
    tracing::debug!(ms = t0.elapsed().as_millis(), "command ended");
    if a.detach && matches!(result, Ok(0)) {
        return result;
    }
    let stopped = signals
        .stop_vm(&mgr, &name, Duration::from_secs(a.stop_timeout))
        .await;
    if let Err(e) = stopped {
        tracing::warn!(vm = %name, error = %e, "stopping after run");
    }
    tracing::debug!(ms = t0.elapsed().as_millis(), "vm stopped");
    if a.rm {
        mgr.remove(&name, true)
            .await
            .with_context(|| format!("cannot remove vm {name:?}"))?;
    }
    tracing::debug!(ms = t0.elapsed().as_millis(), "done");
    result
}

/// Which start path `run IMAGE` took (printed with `--json` on stderr, before the command's
/// output).
#[derive(Debug, serde::Serialize)]
struct WarmReport {
    vm: String,
    /// `restored` (from the warm-start cache) or `booted`.
    start: &'static str,
    /// The cache entry (snapshot name) for this machine, when the run can use the cache.
    cache: Option<String>,
    /// A booted run saved the cache entry.
    saved: bool,
}

/// The warm-start cache entry for this run, or `None` when it cannot use one: opted out,
/// a machine a snapshot cannot hold (shared dirs, extra disks, networks other than the
/// default user-mode NAT, published ports), or the kernel cannot be read.
fn warm_entry(
    a: &super::vm::RunArgs,
    config: &vm_rs::VmConfig,
    rootfs: &vm_rs::rootfs::Rootfs,
) -> Option<String> {
    let why_not = if a.no_snapshot_cache {
        Some("--no-snapshot-cache")
    } else if !config.shared_dirs.is_empty() {
        Some("shared directories")
    } else if !config.disks.is_empty() {
        Some("extra disks")
    } else if !a.net.nets.is_empty() || !a.net.publish.is_empty() {
        Some("--net/-p")
    } else {
        None
    };
    if let Some(why) = why_not {
        tracing::info!(reason = why, "no warm start: booting");
        return None;
    }
    let ident = |p: &std::path::Path| vm_rs::manager::FileIdentity::of(p);
    let key = vm_rs::manager::WarmKey {
        manifest: rootfs.manifest.to_string(),
        kernel: ident(&config.kernel).ok()?,
        initramfs: match &config.initramfs {
            Some(i) => Some(ident(i).ok()?),
            None => None,
        },
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        rootfs_size: a.rootfs_size,
        backend: format!("{:?}", config.backend),
        accel: format!("{:?}", config.accel),
        cmdline: config.cmdline.clone(),
        log_max: a.log_max,
    };
    Some(key.entry_name())
}

/// Restore `name` from the warm-start entry when it exists; false (and nothing left behind)
/// when it does not or cannot be restored.
async fn try_restore(mgr: &VmManager, entry: &str, name: &str, a: &super::vm::RunArgs) -> bool {
    if !mgr
        .snapshot_dir(entry)
        .join(vm_rs::snapshot::SnapshotDir::META)
        .is_file()
    {
        tracing::info!(cache = entry, "no warm-start entry yet: booting and saving one");
        return false;
    }
    let opts = vm_rs::manager::RestoreOptions {
        cpus: Some(a.cpus),
        memory_mib: Some(a.memory),
    };
    match mgr.restore(entry, name, opts).await {
        Ok(_) => true,
        Err(e) => {
            tracing::info!(cache = entry, error = %e, "cannot restore the warm-start entry: booting");
            false
        }
    }
}

/// Save the ready VM `name` as warm-start entry `entry` and let it run on; false when it
/// was not saved (another run saved it first, or the backend cannot snapshot).
async fn save_warm(mgr: &VmManager, name: &str, entry: &str) -> bool {
    let opts = vm_rs::manager::SnapshotOptions { leave_running: true };
    match mgr.snapshot(name, entry, opts).await {
        Ok(_) => true,
        Err(e) => {
            tracing::info!(vm = %name, cache = entry, error = %e, "warm-start entry not saved");
            false
        }
    }
}

/// Wait until `name` is ready, start `cmd` in it and (unless detached) relay it; the exit
/// code is the command's. A stop signal before the command started ends the run as
/// interrupted; once it runs, the first is forwarded to it and the second interrupts.
pub(crate) async fn attach_when_ready(
    mgr: &VmManager,
    name: &str,
    cmd: ExecCommand,
    a: &super::vm::RunArgs,
    session: &mut Session,
    signals: &mut super::vm::StopSignals,
) -> anyhow::Result<i32> {
    let start = async {
        mgr.wait_ready(name, Duration::from_secs(a.ready_timeout)).await?;
        if a.detach && a.image.is_some() {
            return start_main(mgr, name, cmd, a.restart).await.map(|()| None);
        }
        mgr.exec_streaming(name, cmd).await.map(Some)
    };
    let started = tokio::select! {
        r = start => r,
        sig = signals.recv() => {
            super::vm::say(format_args!("\nvmrs: {sig}: stopping {name} (again to kill)"));
            return Err(CliError::Interrupted { signal: sig }.into());
        }
    };
    let process = match started {
        Ok(Some(p)) => p,
        Ok(None) => {
            println!("{name}");
            return Ok(0);
        }
        Err(e) => return spawn_failure(e),
    };
    let r = session
        .relay(process, name, signals, SignalPolicy::ForwardOnce)
        .await;
    if let Err(e) = &r {
        if let Some(CliError::Interrupted { signal }) = e.downcast_ref::<CliError>() {
            super::vm::say(format_args!("\nvmrs: {signal}: stopping {name} (again to kill)"));
        }
    }
    r
}

/// Start an image VM's process as its main process (its end stops the VM, with its exit code
/// recorded); a guest too old for that gets a plain detached exec.
async fn start_main(
    mgr: &VmManager,
    name: &str,
    cmd: ExecCommand,
    restart: vm_rs::agent::Restart,
) -> Result<(), ManagerError> {
    match mgr.exec_main(name, &cmd, restart).await {
        Err(ManagerError::Agent {
            source: vm_rs::agent::AgentError::Unsupported { .. },
            ..
        }) => {
            tracing::warn!(vm = %name, "the guest agent is too old to report the process's exit (run `vmrs setup`)");
            let mut cmd = cmd;
            cmd.detach = true;
            mgr.exec_streaming(name, cmd).await.map(drop)
        }
        r => r.map(drop),
    }
}

/// One side of `vmrs cp`.
#[derive(Debug, PartialEq, Eq)]
enum Location {
    Host(PathBuf),
    Guest { vm: String, path: String },
}

/// docker's rule: `NAME:PATH` names a VM path unless the argument starts with `/` or `.`
/// (a host path that happens to contain a colon).
fn parse_location(s: &str) -> Location {
    if !s.starts_with('/') && !s.starts_with('.') {
        if let Some((vm, path)) = s.split_once(':') {
            if vm_rs::config::validate_name(vm).is_ok() {
                let path = if path.is_empty() { "/" } else { path };
                return Location::Guest {
                    vm: vm.to_string(),
                    path: path.to_string(),
                };
            }
        }
    }
    Location::Host(PathBuf::from(s))
}

/// Copy files between the host and a VM.
pub async fn cp(a: CpArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    match (parse_location(&a.src), parse_location(&a.dst)) {
        (Location::Host(src), Location::Guest { vm, path }) => {
            mgr.copy_to(&vm, &src, &path).await?;
        }
        (Location::Guest { vm, path }, Location::Host(dst)) => {
            mgr.copy_from(&vm, &path, &dst).await?;
        }
        _ => {
            return Err(CliError::Invalid("exactly one of SRC and DST must be NAME:/path".to_string()).into())
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_follow_docker_rules() {
        assert_eq!(
            parse_location("web:/etc/hosts"),
            Location::Guest {
                vm: "web".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(
            parse_location("web:"),
            Location::Guest {
                vm: "web".into(),
                path: "/".into()
            }
        );
        assert_eq!(parse_location("./a:b"), Location::Host("./a:b".into()));
        assert_eq!(parse_location("/x:y"), Location::Host("/x:y".into()));
        assert_eq!(parse_location("plain"), Location::Host("plain".into()));
    }
}
