//! The Task service (containerd's `containerd.task.v2.Task`): one container, one VM.
//!
//! Create mounts the rootfs, builds its ext4 root disk and boots the VM (the task is then
//! `CREATED`, its pid the VMM's); Start runs the bundle's process through the guest agent;
//! Exec adds more processes to the same VM. Every process's exit is kept in a watch channel
//! that Wait, State and Delete read. Pause, Resume, Checkpoint, Update and Stats are answered
//! not-implemented (the generated defaults), never with a silent success.

use crate::bundle;
use crate::stdio::{self, Opened, Stdio};
use containerd_shim::api;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, TtrpcResult};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use vm_rs::agent::{ExecCommand, ExecControl, WinSize};
use vm_rs::VmManager;

/// How long the guest may take to boot to its agent.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// `e` and its causes, `: `-separated (what containerd shows the user).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

/// One process: the container's init (exec id "") or an exec.
#[derive(Debug)]
struct Proc {
    cmd: ExecCommand,
    stdio: Stdio,
    /// Guest pid once started.
    pid: Mutex<Option<u32>>,
    control: Mutex<Option<ExecControl>>,
    /// Its output FIFOs, opened when it was created; taken at start.
    opened: std::sync::Mutex<Opened>,
    /// Turned true by CloseIO: the client's input ended.
    stdin_closed: watch::Sender<bool>,
    /// Exit code and time, once exited.
    exit: watch::Sender<Option<(u32, Timestamp)>>,
}

impl Proc {
    fn new(cmd: ExecCommand, stdio: Stdio, opened: Opened) -> Arc<Proc> {
        Arc::new(Proc {
            cmd,
            stdio,
            pid: Mutex::new(None),
            control: Mutex::new(None),
            opened: std::sync::Mutex::new(opened),
            stdin_closed: watch::channel(false).0,
            exit: watch::channel(None).0,
        })
    }

    fn exited(&self) -> Option<(u32, Timestamp)> {
        self.exit.borrow().clone()
    }

    async fn status(&self) -> api::Status {
        if self.exited().is_some() {
            api::Status::STOPPED
        } else if self.pid.lock().await.is_some() {
            api::Status::RUNNING
        } else {
            api::Status::CREATED
        }
    }
}

#[derive(Debug)]
struct Container {
    id: String,
    bundle: PathBuf,
    vm: String,
    /// Host pid of the VMM (the task's pid as containerd sees it).
    pid: u32,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// Its part in a pod.
    pod: PodPart,
    /// Guest directory its processes run chrooted in (a pod's containers).
    root: Option<String>,
}

/// What a container holds of a pod.
#[derive(Debug, Clone)]
enum PodPart {
    /// Not in a pod: the VM is the container's own.
    Alone,
    /// The pod's sandbox: it owns the VM and the pod directory shared with it.
    Sandbox { dir: PathBuf },
    /// A container of the pod: its root is bind-mounted at `mount` in the pod directory.
    Member { mount: PathBuf },
}

/// The Task service of one shim.
#[derive(Clone)]
pub struct TaskService {
    namespace: String,
    home: PathBuf,
    mgr: Arc<Mutex<Option<VmManager>>>,
    containers: Arc<Mutex<HashMap<String, Arc<Container>>>>,
    publisher: Arc<RemotePublisher>,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("namespace", &self.namespace)
            .field("home", &self.home)
            .finish_non_exhaustive()
    }
}

impl TaskService {
    /// The service for containerd namespace `namespace`.
    pub fn new(namespace: String, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> TaskService {
        TaskService {
            home: bundle::vmrs_home(&namespace),
            namespace,
            mgr: Arc::new(Mutex::new(None)),
            containers: Arc::new(Mutex::new(HashMap::new())),
            publisher: Arc::new(publisher),
            exit,
        }
    }

    async fn mgr(&self) -> TtrpcResult<VmManager> {
        let mut m = self.mgr.lock().await;
        if let Some(m) = m.as_ref() {
            return Ok(m.clone());
        }
        let mgr = VmManager::with_home(&self.home).await.map_err(|e| {
            err(
                Code::INTERNAL,
                format!("cannot open vm-rs data dir {}: {e}", self.home.display()),
            )
        })?;
        *m = Some(mgr.clone());
        Ok(mgr)
    }

    async fn publish(&self, topic: &str, event: Box<dyn Event>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            log::warn!("cannot publish {topic}: {e}");
        }
    }

    async fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id:?} does not exist")))
    }

    async fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<(Arc<Container>, Arc<Proc>)> {
        let c = self.container(id).await?;
        if exec_id.is_empty() {
            let p = c.init.clone();
            return Ok((c, p));
        }
        let p = c.execs.lock().await.get(exec_id).cloned().ok_or_else(|| {
            err(
                Code::NOT_FOUND,
                format!("exec {exec_id:?} of container {id:?} does not exist"),
            )
        })?;
        Ok((c, p))
    }

    /// A container of the pod whose sandbox is `sandbox`: its rootfs is bind-mounted into the
    /// pod directory the sandbox's VM shares, and its processes run chrooted there. No VM is
    /// booted. On error nothing is left.
    async fn create_in_pod(
        &self,
        req: &api::CreateTaskRequest,
        spec: &oci_spec::runtime::Spec,
        sandbox: &str,
    ) -> TtrpcResult<Container> {
        let invalid = |e: bundle::BundleError| err(Code::INVALID_ARGUMENT, e.to_string());
        let sb = self.container(sandbox).await.map_err(|_| {
            err(
                Code::FAILED_PRECONDITION,
                format!("the pod's sandbox {sandbox:?} does not run in this shim"),
            )
        })?;
        let PodPart::Sandbox { dir } = &sb.pod else {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {sandbox:?} is not a pod sandbox"),
            ));
        };
        if sb.init.exited().is_some() {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("the pod's sandbox {sandbox:?} has exited"),
            ));
        }
        bundle::vm_name(&req.id).map_err(invalid)?;
        let bundle_dir = PathBuf::from(&req.bundle);
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "config.json has no process"))?;
        let mut cmd = bundle::command(process).map_err(invalid)?;
        let root = format!("{}/{}", bundle::POD_GUEST_DIR, req.id);
        cmd.root = Some(root.clone());
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let opened = stdio.open_outputs();
        let mounted = bundle::mount_rootfs(&bundle_dir, &req.rootfs)
            .await
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        let root_src = bundle::root_source(spec, &bundle_dir);
        let mount = match bundle::bind_into_pod(dir, &req.id, &root_src) {
            Ok(m) => m,
            Err(e) => {
                if mounted {
                    let _ = bundle::unmount_rootfs(&bundle_dir);
                }
                return Err(err(Code::INTERNAL, e.to_string()));
            }
        };
        Ok(Container {
            id: req.id.clone(),
            bundle: bundle_dir,
            vm: sb.vm.clone(),
            pid: sb.pid,
            init: Proc::new(cmd, stdio, opened),
            execs: Mutex::new(HashMap::new()),
            pod: PodPart::Member { mount },
            root: Some(root),
        })
    }

    /// Boot the VM of a new container (of a pod's sandbox when `sandbox`: the VM then also
    /// shares the pod directory); on error nothing is left.
    async fn create_vm(&self, req: &api::CreateTaskRequest, sandbox: bool) -> TtrpcResult<Container> {
        let bundle_dir = PathBuf::from(&req.bundle);
        let invalid = |e: bundle::BundleError| err(Code::INVALID_ARGUMENT, e.to_string());
        let vm = bundle::vm_name(&req.id).map_err(invalid)?;
        let spec = bundle::load_spec(&bundle_dir).map_err(invalid)?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "config.json has no process"))?;
        let cmd = bundle::command(process).map_err(invalid)?;
        if req.terminal && !process.terminal().unwrap_or(false) {
            log::info!("terminal requested by containerd, not by the spec; using a terminal");
        }
        let memory_mib = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .filter(|l| *l > 0)
            .map(|l| (l as u64 >> 20).max(128))
            .unwrap_or(256);
        let cpus = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.cpu().as_ref())
            .map(|c| bundle::cpus_for_quota(c.quota(), c.period()))
            .unwrap_or(1);
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        // now, while the client waits on Create with its ends open (see stdio)
        let opened = stdio.open_outputs();
        let mgr = self.mgr().await?;
        let mounted = bundle::mount_rootfs(&bundle_dir, &req.rootfs)
            .await
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        let pod_dir = sandbox.then(|| bundle::pod_dir(&self.home, &vm));
        let undo = |image: Option<PathBuf>| {
            let b = bundle_dir.clone();
            let pod = pod_dir.clone();
            async move {
                if let Some(i) = image {
                    let _ = tokio::fs::remove_file(i).await;
                }
                if mounted {
                    let _ = bundle::unmount_rootfs(&b);
                }
                if let Some(p) = pod {
                    let _ = bundle::unmount_all(&p);
                }
            }
        };
        if let Some(p) = &pod_dir {
            if let Err(e) = bundle::make_pod_dir(p) {
                undo(None).await;
                return Err(err(Code::INTERNAL, e.to_string()));
            }
        }
        let image = bundle::root_image(&self.home, &vm);
        if let Err(e) = std::fs::create_dir_all(image.parent().unwrap_or(&self.home)) {
            undo(None).await;
            return Err(err(
                Code::INTERNAL,
                format!("cannot create {}: {e}", image.display()),
            ));
        }
        let root_src = bundle::root_source(&spec, &bundle_dir);
        if let Err(e) = vm_rs::rootfs::build_rootfs_from_dir(&root_src, &image).await {
            undo(Some(image)).await;
            return Err(err(
                Code::INTERNAL,
                format!("cannot build the root disk: {}", chain(&e)),
            ));
        }
        let assets = vm_rs::paths::assets_dir();
        let mut builder = vm_rs::VmConfig::builder(vm.clone())
            .cpus(cpus)
            .memory_mib(memory_mib)
            .kernel(assets.join("vmlinuz"))
            .initramfs(assets.join("initramfs.img"));
        if let Some(p) = &pod_dir {
            builder = builder.shared_dir(vm_rs::SharedDir::new(p, bundle::POD_GUEST_DIR, "vmrs-pod"));
        }
        let config = builder.build();
        let config = match config {
            Ok(c) => c,
            Err(e) => {
                undo(Some(image)).await;
                return Err(err(Code::INVALID_ARGUMENT, format!("vm configuration: {e}")));
            }
        };
        let booted = async {
            let info = mgr.start_with_rootfs(config, &image).await?;
            mgr.wait_ready(&vm, READY_TIMEOUT).await?;
            Ok::<_, vm_rs::ManagerError>(info)
        }
        .await;
        let info = match booted {
            Ok(i) => i,
            Err(e) => {
                let _ = mgr.remove(&vm, true).await;
                undo(Some(image)).await;
                return Err(err(
                    Code::INTERNAL,
                    format!("cannot boot vm {vm:?}: {}", chain(&e)),
                ));
            }
        };
        let pid = info.pid.unwrap_or(0);
        Ok(Container {
            id: req.id.clone(),
            bundle: bundle_dir,
            vm,
            pid,
            init: Proc::new(cmd, stdio, opened),
            execs: Mutex::new(HashMap::new()),
            pod: match pod_dir {
                Some(dir) => PodPart::Sandbox { dir },
                None => PodPart::Alone,
            },
            root: None,
        })
    }

    /// Start `p` in `c`'s VM, bridging its stdio; its exit is published when it ends.
    async fn start_proc(&self, c: &Arc<Container>, p: &Arc<Proc>, exec_id: &str) -> TtrpcResult<u32> {
        if p.pid.lock().await.is_some() || p.exited().is_some() {
            return Err(err(Code::FAILED_PRECONDITION, "the process was started already"));
        }
        let mgr = self.mgr().await?;
        let mut cmd = p.cmd.clone();
        cmd.interactive_stdin = !p.stdio.stdin.is_empty();
        if p.stdio.terminal {
            cmd.tty = Some(WinSize { rows: 24, cols: 80 });
        }
        let mut process = mgr
            .exec_streaming(&c.vm, cmd)
            .await
            .map_err(|e| err(Code::INTERNAL, format!("cannot start the process: {}", chain(&e))))?;
        let pid = process.pid();
        *p.pid.lock().await = Some(pid);
        *p.control.lock().await = Some(process.control());
        let (out, errout) = {
            let mut o = p.opened.lock().unwrap_or_else(|e| e.into_inner());
            (o.stdout.take(), o.stderr.take())
        };
        if let Some(stdin) = process.take_stdin() {
            stdio::pump_stdin(
                p.stdio.stdin.clone(),
                stdin,
                p.stdin_closed.subscribe(),
                p.exit.subscribe(),
            );
        }
        let (svc, c2, p2, exec_id) = (self.clone(), c.clone(), p.clone(), exec_id.to_string());
        tokio::spawn(async move {
            let code = stdio::pump_output(process, out, errout).await as u32;
            let at = now();
            p2.exit.send_replace(Some((code, at.clone())));
            let ev = TaskExit {
                container_id: c2.id.clone(),
                id: if exec_id.is_empty() {
                    c2.id.clone()
                } else {
                    exec_id
                },
                pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            };
            svc.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
        });
        Ok(pid)
    }
}

fn ts(t: Option<&Timestamp>) -> MessageField<Timestamp> {
    t.cloned().map(MessageField::some).unwrap_or_default()
}

#[async_trait::async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.containers.lock().await.contains_key(&req.id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {:?} exists", req.id),
            ));
        }
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(err(Code::UNIMPLEMENTED, "checkpoint restore is not supported"));
        }
        let spec = bundle::load_spec(std::path::Path::new(&req.bundle))
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let role = bundle::role(&spec, &req.id).map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let c = Arc::new(match role {
            bundle::Role::InPod(sandbox) => self.create_in_pod(&req, &spec, &sandbox).await?,
            bundle::Role::Sandbox => self.create_vm(&req, true).await?,
            bundle::Role::Alone => self.create_vm(&req, false).await?,
        });
        let pid = c.pid;
        self.containers.lock().await.insert(req.id.clone(), c);
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev)).await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let pid = self.start_proc(&c, &p, &req.exec_id).await?;
        if req.exec_id.is_empty() {
            let ev = TaskStart {
                container_id: c.id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev)).await;
        } else {
            let ev = TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
                .await;
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let exit = p.exited();
        let pid = if req.exec_id.is_empty() {
            c.pid
        } else {
            p.pid.lock().await.unwrap_or(0)
        };
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid,
            status: p.status().await.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.0).unwrap_or(0),
            exited_at: ts(exit.as_ref().map(|e| &e.1)),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (_c, p) = self.process(&req.id, &req.exec_id).await?;
        let mut rx = p.exit.subscribe();
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| err(Code::INTERNAL, "the process was dropped"))?
            .clone()
            .unwrap_or_default();
        Ok(api::WaitResponse {
            exit_status: exit.0,
            exited_at: MessageField::some(exit.1),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        if p.exited().is_some() {
            return Err(err(Code::NOT_FOUND, "the process has already exited"));
        }
        let control = p.control.lock().await.clone();
        match control {
            Some(control) => control
                .signal(req.signal as i32)
                .await
                .map_err(|e| err(Code::INTERNAL, format!("cannot signal the process: {e}")))?,
            None => {
                // Created, never started: there is no guest process; it ends as killed.
                let code = 128 + req.signal;
                let at = now();
                p.exit.send_replace(Some((code, at.clone())));
                let ev = TaskExit {
                    container_id: c.id.clone(),
                    id: if req.exec_id.is_empty() {
                        c.id.clone()
                    } else {
                        req.exec_id.clone()
                    },
                    pid: 0,
                    exit_status: code,
                    exited_at: MessageField::some(at),
                    ..Default::default()
                };
                self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
            }
        }
        Ok(api::Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        if p.status().await == api::Status::RUNNING {
            return Err(err(
                Code::FAILED_PRECONDITION,
                "the process is still running; kill it first",
            ));
        }
        let exit = p.exited().unwrap_or_else(|| (0, now()));
        if !req.exec_id.is_empty() {
            c.execs.lock().await.remove(&req.exec_id);
            return Ok(api::DeleteResponse {
                pid: p.pid.lock().await.unwrap_or(0),
                exit_status: exit.0,
                exited_at: MessageField::some(exit.1),
                ..Default::default()
            });
        }
        let mounts = |e: bundle::BundleError| err(Code::INTERNAL, e.to_string());
        if let PodPart::Member { mount } = &c.pod {
            // the VM is the sandbox's: only this container's root leaves it
            bundle::unmount_all(mount).map_err(mounts)?;
        } else {
            let mgr = self.mgr().await?;
            if let Err(e) = mgr.remove(&c.vm, true).await {
                if e.kind() != vm_rs::ErrorKind::NotFound {
                    return Err(err(Code::INTERNAL, format!("cannot remove vm {:?}: {e}", c.vm)));
                }
            }
            let _ = tokio::fs::remove_file(bundle::root_image(&self.home, &c.vm)).await;
            if let PodPart::Sandbox { dir } = &c.pod {
                bundle::unmount_all(dir).map_err(mounts)?;
            }
        }
        bundle::unmount_rootfs(&c.bundle).map_err(mounts)?;
        self.containers.lock().await.remove(&req.id);
        let ev = TaskDelete {
            container_id: c.id.clone(),
            id: c.id.clone(),
            pid: c.pid,
            exit_status: exit.0,
            exited_at: MessageField::some(exit.1.clone()),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev)).await;
        Ok(api::DeleteResponse {
            pid: c.pid,
            exit_status: exit.0,
            exited_at: MessageField::some(exit.1),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let c = self.container(&req.id).await?;
        let mut processes = vec![containerd_shim::protos::types::task::ProcessInfo {
            pid: c.pid,
            ..Default::default()
        }];
        for p in c.execs.lock().await.values() {
            if let Some(pid) = *p.pid.lock().await {
                if p.exited().is_none() {
                    processes.push(containerd_shim::protos::types::task::ProcessInfo {
                        pid,
                        ..Default::default()
                    });
                }
            }
        }
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id).await?;
        if req.exec_id.is_empty() {
            return Err(err(Code::INVALID_ARGUMENT, "an exec needs an exec id"));
        }
        if c.init.status().await != api::Status::RUNNING {
            return Err(err(Code::FAILED_PRECONDITION, "the container is not running"));
        }
        let spec = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        let mut cmd = bundle::exec_command(&spec).map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        cmd.root = c.root.clone();
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let opened = stdio.open_outputs();
        {
            let mut execs = c.execs.lock().await;
            if execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {:?} exists", req.exec_id),
                ));
            }
            execs.insert(req.exec_id.clone(), Proc::new(cmd, stdio, opened));
        }
        let ev = TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let (_c, p) = self.process(&req.id, &req.exec_id).await?;
        if !p.stdio.terminal {
            return Err(err(Code::FAILED_PRECONDITION, "the process has no terminal"));
        }
        let control = p.control.lock().await.clone();
        let control = control.ok_or_else(|| err(Code::FAILED_PRECONDITION, "the process has not started"))?;
        let size = WinSize {
            rows: req.height.min(u16::MAX as u32) as u16,
            cols: req.width.min(u16::MAX as u32) as u16,
        };
        control
            .resize(size)
            .await
            .map_err(|e| err(Code::INTERNAL, format!("cannot resize the terminal: {e}")))?;
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let (_c, p) = self.process(&req.id, &req.exec_id).await?;
        if req.stdin {
            // what the FIFO holds is still delivered, then stdin is closed (see stdio)
            p.stdin_closed.send_replace(true);
        }
        Ok(api::Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = match self.container(&req.id).await {
            Ok(c) => c.pid,
            Err(_) => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if !self.containers.lock().await.is_empty() {
            return Ok(api::Empty::new());
        }
        self.exit.signal();
        Ok(api::Empty::new())
    }
}
