//! Commands that talk to the guest agent: `exec`, `cp`, and `run IMAGE`.

use crate::exit::CliError;
use anyhow::Context;
use clap::Args;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;
use vm_rs::agent::{ExecCommand, ExecEvent};
use vm_rs::oci::PullOptions;
use vm_rs::{ImageStore, VmManager};

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
    if !std::io::stdin().is_terminal() {
        let data = tokio::task::spawn_blocking(|| {
            let mut buf = Vec::new();
            std::io::stdin().lock().read_to_end(&mut buf).map(|_| buf)
        })
        .await
        .context("reading stdin")?
        .context("reading stdin")?;
        cmd = cmd.stdin(data);
    }
    let mgr = VmManager::new().await?;
    let process = mgr.exec_streaming(&name, cmd).await?;
    relay(process, &name).await
}

/// Copy a process's stdout/stderr to ours as it arrives; returns its shell exit code.
async fn relay(mut process: vm_rs::agent::ExecProcess, name: &str) -> anyhow::Result<i32> {
    let mut code = None;
    while let Some(ev) = process.next_event().await {
        match ev.with_context(|| format!("exec in {name}"))? {
            ExecEvent::Stdout(d) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&d)
                    .and_then(|()| out.flush())
                    .context("writing stdout")?;
            }
            ExecEvent::Stderr(d) => {
                let mut err = std::io::stderr().lock();
                err.write_all(&d)
                    .and_then(|()| err.flush())
                    .context("writing stderr")?;
            }
            ExecEvent::Exit(s) => code = Some(s.shell_code()),
        }
    }
    code.ok_or_else(|| anyhow::anyhow!("the guest agent ended the command without an exit status"))
}

/// `vmrs run IMAGE [-- CMD...]`: boot a VM whose root is the image and run its process.
/// Foreground: print the output, stop the VM (`--rm`: remove it), exit with the command's code.
/// `-d`: start the process detached and leave the VM running for `vmrs exec`.
pub async fn run_image(
    a: super::vm::RunArgs,
    image: String,
    mut signals: super::vm::StopSignals,
) -> anyhow::Result<i32> {
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
    let mgr = VmManager::new().await?;
    mgr.start_with_rootfs(config, &rootfs.path)
        .await
        .with_context(|| format!("cannot start vm {name:?}"))?;
    let work = async {
        mgr.wait_ready(&name, Duration::from_secs(a.ready_timeout))
            .await?;
        let process = mgr.exec_streaming(&name, cmd).await?;
        if a.detach {
            println!("{name}");
            return Ok(0);
        }
        relay(process, &name).await
    };
    // A stop signal ends the command's relay and stops the VM (a second one kills it), and
    // --rm still removes it; the exit code is then a shell's for that signal.
    let result = tokio::select! {
        r = work => r,
        sig = signals.recv() => {
            super::vm::say(format_args!("\nvmrs: {sig}: stopping {name} (again to kill)"));
            Err(crate::exit::CliError::Interrupted { signal: sig }.into())
        }
    };
    if a.detach && result.is_ok() {
        return result;
    }
    let stopped = signals
        .stop_vm(&mgr, &name, Duration::from_secs(a.stop_timeout))
        .await;
    if let Err(e) = stopped {
        tracing::warn!(vm = %name, error = %e, "stopping after run");
    }
    if a.rm {
        mgr.remove(&name, true)
            .await
            .with_context(|| format!("cannot remove vm {name:?}"))?;
    }
    result
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
