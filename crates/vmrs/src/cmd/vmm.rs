//! Backend verbs beyond the lifecycle: snapshot, resize, device hot-plug, counters and the VMM's
//! own view of the VM, each one [`VmManager`] verb (state checked, driver errors mapped, works on
//! VMs started by other processes). Backends without them (QEMU today) answer "not supported".

use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use vm_rs::config::DiskConfig;
use vm_rs::driver::TapNetwork;
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

/// `vmrs snapshot`
pub async fn snapshot(a: SnapshotArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    mgr.snapshot(&a.name, &a.dir)
        .await
        .with_context(|| format!("cannot snapshot vm {:?} into {}", a.name, a.dir.display()))?;
    println!("{}", a.dir.display());
    Ok(0)
}

/// `vmrs resize`
pub async fn resize(a: ResizeArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    mgr.resize(&a.name, a.cpus, a.memory).await?;
    Ok(0)
}

/// `vmrs device ...`
pub async fn device(c: DeviceCommand) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    match c {
        DeviceCommand::AddDisk { name, spec } => {
            let disk = DiskConfig::parse(&spec)?;
            println!("{}", mgr.add_disk(&name, disk).await?);
        }
        DeviceCommand::AddNet { name, tap, mac } => {
            println!("{}", mgr.add_net(&name, TapNetwork { tap, mac }).await?);
        }
        DeviceCommand::Remove { name, id } => mgr.remove_device(&name, &id).await?,
    }
    Ok(0)
}

/// `vmrs counters`
pub async fn counters(a: NameArg) -> anyhow::Result<i32> {
    let c = VmManager::new().await?.counters(&a.name).await?;
    println!("{}", serde_json::to_string_pretty(&c)?);
    Ok(0)
}

/// `vmrs vmm-info`
pub async fn vmm_info(a: NameArg) -> anyhow::Result<i32> {
    let info = VmManager::new().await?.vmm_info(&a.name).await?;
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(0)
}
