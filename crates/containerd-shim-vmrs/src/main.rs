//! `containerd-shim-vmrs-v1`: a containerd runtime v2 shim (task API v2, containerd 1.6/1.7)
//! that runs every container in its own vm-rs microVM.
//!
//! containerd runs this binary three ways (the `containerd-shim` crate parses them):
//! `start` forks the long-lived shim and prints its ttrpc address; the shim then serves the
//! Task service ([`service`]); `delete` cleans up after a shim that died ([`cleanup`]).
//!
//! Mapping: the task's VM is an ordinary vm-rs VM ([`vm_rs::VmManager`]) in the data dir
//! [`bundle::vmrs_home`] (`$VMRS_SHIM_HOME/<namespace>`). The rootfs mounts containerd passes
//! are mounted at `<bundle>/rootfs`, copied into an ext4 root disk, and the container's
//! process (from the bundle's `config.json`) runs through the guest agent, its stdio bridged
//! to containerd's FIFOs.

mod bundle;
mod cleanup;
mod service;
mod stdio;

use containerd_shim::asynchronous::{run, spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, Error, Flags, StartOpts};
use std::sync::Arc;

/// The runtime name containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.vmrs.v1";

/// The shim process (one per container).
struct VmrsShim {
    id: String,
    namespace: String,
    bundle: std::path::PathBuf,
    exit: Arc<ExitSignal>,
}

impl std::fmt::Debug for VmrsShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmrsShim")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Shim for VmrsShim {
    type T = service::TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        // containerd runs the shim in the bundle directory; `-bundle` is passed to `delete`.
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            args.bundle.clone().into()
        };
        VmrsShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // one shim per pod: a pod's containers are served by the process that booted its VM
        let grouping = bundle::grouping(&self.bundle, &opts.id);
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd reconnects to a running shim after its own restart through the bundle's
        // `address` file (the crate writes it only when the socket was in use already).
        containerd_shim::asynchronous::util::write_str_to_file(self.bundle.join("address"), &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        cleanup::delete(&self.namespace, &self.id, &self.bundle).await
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::TaskService::new(self.namespace.clone(), publisher, self.exit.clone())
    }
}

#[tokio::main]
async fn main() {
    // vm-rs starts its sidecars (serial log, network switch) as `<this program> net-sidecar …`
    // (see `vm_rs::net::sidecar::program`), so the shim needs no other binary on the host.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "net-sidecar") {
        std::process::exit(vm_rs::net::sidecar::main(&args[1..]).await);
    }
    let config = Config {
        // vm-rs waits for its own children (the VMM, sidecars); a reaper calling waitpid(-1)
        // would take their exit statuses away from it.
        no_reaper: true,
        ..Config::default()
    };
    run::<VmrsShim>(RUNTIME_ID, Some(config)).await;
}
