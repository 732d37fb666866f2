//! The agent verbs of [`VmManager`]: exec (collected or streamed) and copying files in and out.
//!
//! Every QEMU VM the manager starts gets the agent's virtio-serial port with its host end at
//! `<vm dir>/agent.sock` ([`AGENT_SOCKET`]). The socket takes one connection at a time, so the
//! manager keeps one [`AgentClient`] per VM and clones it for every operation; a connection
//! that has ended (the VM restarted or stopped) is replaced on next use.

use super::{ManagerError, VmManager};
use crate::agent::{AgentClient, AgentError, ExecCommand, ExecOutput, ExecProcess, Restart};
use crate::state::Operation;
use std::path::Path;
use std::time::Duration;

/// File name of the agent socket in the VM directory.
pub(crate) const AGENT_SOCKET: &str = crate::vm_dir::VmDir::AGENT_SOCKET;

/// An image VM's main process as `main.json` records it (persisted state: unknown fields are
/// ignored, absent ones default).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct MainRecord {
    version: u32,
    argv: Vec<String>,
    #[serde(default)]
    env: Vec<(String, String)>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    user: Option<String>,
    /// `no`, `on-failure` or `always`.
    #[serde(default)]
    restart: String,
    #[serde(default)]
    restart_max: u32,
}

impl MainRecord {
    fn new(cmd: &ExecCommand, restart: Restart) -> Self {
        use crate::agent::RestartPolicy as P;
        MainRecord {
            version: 1,
            argv: cmd.argv.clone(),
            env: cmd.env.clone(),
            cwd: cmd.cwd.clone(),
            user: cmd.user.clone(),
            restart: match restart.policy {
                P::No => "no",
                P::OnFailure => "on-failure",
                P::Always => "always",
            }
            .to_string(),
            restart_max: restart.max,
        }
    }

    /// The command (detached, no stdin) and restart rule; an unknown policy is `no`.
    fn command(&self) -> (ExecCommand, Restart) {
        use crate::agent::RestartPolicy as P;
        let cmd = ExecCommand {
            argv: self.argv.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            detach: true,
            ..ExecCommand::default()
        };
        let policy = match self.restart.as_str() {
            "on-failure" => P::OnFailure,
            "always" => P::Always,
            _ => P::No,
        };
        (
            cmd,
            Restart {
                policy,
                max: self.restart_max,
            },
        )
    }
}

/// How long connecting to a ready VM's agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl VmManager {
    /// Path of `name`'s agent socket.
    pub fn agent_socket(&self, name: &str) -> std::path::PathBuf {
        self.vm_dir(name).join(AGENT_SOCKET)
    }

    /// The agent connection of a ready VM (connecting on first use).
    pub async fn agent(&self, name: &str) -> Result<AgentClient, ManagerError> {
        let entry = self.entry(name).await?;
        entry.state().check(name, Operation::Exec)?;
        let mut agents = self.inner.agents.lock().await;
        if let Some(a) = agents.get(name) {
            if !a.is_closed() {
                return Ok(a.clone());
            }
        }
        agents.remove(name);
        // the channel the running VMM was started with (devices.json): a new process
        // reattaching speaks the same transport
        let devices: crate::devices::DeviceSet =
            super::record::load_json_or_default(&self.vm_dir(name).join(crate::vm_dir::VmDir::DEVICES))
                .unwrap_or_default();
        let client = match devices.agent {
            Some(crate::devices::AgentChannel::Vsock { socket, port, .. }) => {
                AgentClient::connect_vsock_timeout(socket, port, CONNECT_TIMEOUT).await
            }
            _ => AgentClient::connect_timeout(self.agent_socket(name), CONNECT_TIMEOUT).await,
        }
        .map_err(agent_err(name))?;
        agents.insert(name.to_string(), client.clone());
        Ok(client)
    }

    /// Run `cmd` in VM `name` to completion, collecting its output. In an image VM the
    /// image's working directory, environment and user are the defaults
    /// ([`crate::agent::ImageProcess::apply_defaults`]).
    pub async fn exec(&self, name: &str, cmd: ExecCommand) -> Result<ExecOutput, ManagerError> {
        let agent = self.agent(name).await?;
        let cmd = self.with_image_context(name, cmd);
        agent.exec(cmd).await.map_err(agent_err(name))
    }

    /// Start `cmd` in VM `name` and stream its output and exit status ([`ExecProcess`]); image
    /// defaults as for [`exec`](Self::exec).
    pub async fn exec_streaming(&self, name: &str, cmd: ExecCommand) -> Result<ExecProcess, ManagerError> {
        let agent = self.agent(name).await?;
        let cmd = self.with_image_context(name, cmd);
        agent.spawn(cmd).await.map_err(agent_err(name))
    }

    /// `cmd` with the defaults of VM `name`'s image, if it is an image VM.
    fn with_image_context(&self, name: &str, mut cmd: ExecCommand) -> ExecCommand {
        let start = self.vm_dir(name).join(crate::vm_dir::VmDir::START);
        let opts: super::StartOptions = super::record::load_json_or_default(&start).unwrap_or_default();
        if let Some(image) = &opts.image {
            image.process.apply_defaults(&mut cmd);
        }
        cmd
    }

    /// Start `cmd` as VM `name`'s main process ([`AgentClient::spawn_main`]): when it ends for
    /// good the VM powers off and records its exit code ([`super::VmInfo::exit_code`]). The
    /// command and its restart rule are recorded in the VM directory, so that a later start
    /// of the stopped VM runs it again ([`rerun_main`](Self::rerun_main), docker's
    /// `docker start` habit).
    pub async fn exec_main(
        &self,
        name: &str,
        cmd: &ExecCommand,
        restart: Restart,
    ) -> Result<u32, ManagerError> {
        let agent = self.agent(name).await?;
        let pid = agent.spawn_main(cmd, restart).await.map_err(agent_err(name))?;
        let path = self.vm_dir(name).join(crate::vm_dir::VmDir::MAIN);
        super::record::write_json_atomic(&path, &MainRecord::new(cmd, restart))?;
        Ok(pid)
    }

    /// Run VM `name`'s recorded main process again ([`exec_main`](Self::exec_main) recorded
    /// it), after a start of the stopped VM; `Ok(None)` if it has none. The VM must be ready.
    pub async fn rerun_main(&self, name: &str) -> Result<Option<u32>, ManagerError> {
        let path = self.vm_dir(name).join(crate::vm_dir::VmDir::MAIN);
        let Some(rec) = super::record::load_json_or_default::<Option<MainRecord>>(&path)? else {
            return Ok(None);
        };
        let (cmd, restart) = rec.command();
        let agent = self.agent(name).await?;
        agent
            .spawn_main(&cmd, restart)
            .await
            .map(Some)
            .map_err(agent_err(name))
    }

    /// Copy the host file or directory `host_path` into VM `name` at `guest_path` (`docker cp`
    /// rules; modes kept).
    pub async fn copy_to(&self, name: &str, host_path: &Path, guest_path: &str) -> Result<(), ManagerError> {
        let agent = self.agent(name).await?;
        agent
            .copy_to(host_path, guest_path)
            .await
            .map_err(agent_err(name))
    }

    /// Copy the file or directory `guest_path` out of VM `name` to `host_path` on the host
    /// (every path the guest sends stays inside `host_path`).
    pub async fn copy_from(
        &self,
        name: &str,
        guest_path: &str,
        host_path: &Path,
    ) -> Result<(), ManagerError> {
        let agent = self.agent(name).await?;
        agent
            .copy_from(guest_path, host_path)
            .await
            .map_err(agent_err(name))
    }

    /// Forget the cached agent connection of `name` (it stopped or is being removed).
    pub(super) async fn drop_agent(&self, name: &str) {
        self.inner.agents.lock().await.remove(name);
    }
}

fn agent_err(name: &str) -> impl FnOnce(AgentError) -> ManagerError + '_ {
    move |source| ManagerError::Agent {
        name: name.to_string(),
        source,
    }
}
