//! Backend verbs beyond the lifecycle: snapshot, resize, device hot-plug, counters and the VMM's
//! own view of the VM. They go to the VMM through the VM's persisted handle, so they work on VMs
//! started by other processes. Backends without them (QEMU today) answer "not supported".

use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use vm_rs::config::DiskConfig;
use vm_rs::driver::{self, DriverError, TapNetwork, VmDriver, VmHandle};
use vm_rs::manager::ManagerError;
use vm_rs::state::Operation;
use vm_rs::VmManager;

/// A VM name.
#[derive(Debug, Args)]
pub struct NameArg {
    /// VM name.
    pub name: String,
}

/// `vmrs snapshot`
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// VM name (the VM must be paused).
    pub name: String,
    /// Directory to write the snapshot into.
    pub dir: PathBuf,
}

/// `vmrs resize`
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// VM name.
    pub name: String,
    /// New number of vCPUs.
    #[arg(long)]
    pub cpus: Option<u32>,
    /// New memory size: MiB, or with a unit (`512m`, `1G`).
    #[arg(long, value_parser = super::vm::parse_memory_mib, value_name = "SIZE")]
    pub memory: Option<u64>,
}

/// `vmrs device ...`
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Hot-plug a disk: PATH[,ro][,format=raw|qcow2][,cache=writeback|none]; prints its id.
    AddDisk {
        /// VM name.
        name: String,
        /// Disk spec.
        spec: String,
    },
    /// Hot-plug a NIC on a host TAP device (created by the VMM without --tap); prints its id.
    AddNet {
        /// VM name.
        name: String,
        /// Existing TAP interface.
        #[arg(long)]
        tap: Option<String>,
        /// Guest MAC address.
        #[arg(long)]
        mac: Option<String>,
    },
    /// Unplug a device by the id `add-disk`/`add-net` printed.
    Remove {
        /// VM name.
        name: String,
        /// Device id.
        id: String,
    },
}

/// The live VM's handle and its driver.
async fn live(name: &str) -> anyhow::Result<(VmHandle, std::sync::Arc<dyn VmDriver>)> {
    let mgr = VmManager::new().await?;
    live_in(&mgr, name).await
}

async fn live_in(mgr: &VmManager, name: &str) -> anyhow::Result<(VmHandle, std::sync::Arc<dyn VmDriver>)> {
    let info = mgr.inspect(name).await?;
    let handle = mgr.handle(name).await?.ok_or_else(|| ManagerError::NotRunning {
        name: name.to_string(),
        state: info.state.clone(),
        serial_log: info.serial_log.clone(),
    })?;
    let drv = driver::driver_for(handle.backend).map_err(|e| wrap(name, e))?;
    Ok((handle, drv))
}

fn wrap(name: &str, source: DriverError) -> ManagerError {
    ManagerError::Driver {
        name: name.to_string(),
        source,
    }
}

/// `vmrs snapshot`
pub async fn snapshot(a: SnapshotArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    mgr.state(&a.name).await?.check(&a.name, Operation::Snapshot)?;
    let (handle, drv) = live_in(&mgr, &a.name).await?;
    drv.snapshot(&handle, &a.dir)
        .await
        .map_err(|e| wrap(&a.name, e))
        .with_context(|| format!("cannot snapshot vm {:?} into {}", a.name, a.dir.display()))?;
    println!("{}", a.dir.display());
    Ok(0)
}

/// `vmrs resize`
pub async fn resize(a: ResizeArgs) -> anyhow::Result<i32> {
    if a.cpus.is_none() && a.memory.is_none() {
        return Err(crate::exit::CliError::Invalid("resize needs --cpus and/or --memory".into()).into());
    }
    let (handle, drv) = live(&a.name).await?;
    drv.resize(&handle, a.cpus, a.memory)
        .await
        .map_err(|e| wrap(&a.name, e))?;
    Ok(0)
}

/// `vmrs device ...`
pub async fn device(c: DeviceCommand) -> anyhow::Result<i32> {
    match c {
        DeviceCommand::AddDisk { name, spec } => {
            let disk = DiskConfig::parse(&spec)?;
            let (handle, drv) = live(&name).await?;
            let id = drv.add_disk(&handle, &disk).await.map_err(|e| wrap(&name, e))?;
            println!("{id}");
        }
        DeviceCommand::AddNet { name, tap, mac } => {
            let (handle, drv) = live(&name).await?;
            let id = drv
                .add_net(&handle, &TapNetwork { tap, mac })
                .await
                .map_err(|e| wrap(&name, e))?;
            println!("{id}");
        }
        DeviceCommand::Remove { name, id } => {
            let (handle, drv) = live(&name).await?;
            drv.remove_device(&handle, &id)
                .await
                .map_err(|e| wrap(&name, e))?;
        }
    }
    Ok(0)
}

/// `vmrs counters`
pub async fn counters(a: NameArg) -> anyhow::Result<i32> {
    let (handle, drv) = live(&a.name).await?;
    let c = drv.counters(&handle).await.map_err(|e| wrap(&a.name, e))?;
    println!("{}", serde_json::to_string_pretty(&c)?);
    Ok(0)
}

/// `vmrs vmm-info`
pub async fn vmm_info(a: NameArg) -> anyhow::Result<i32> {
    let (handle, drv) = live(&a.name).await?;
    let info = drv.info(&handle).await.map_err(|e| wrap(&a.name, e))?;
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(0)
}
