//! Backend verbs beyond the lifecycle: resize, device hot-plug, counters and the VMM's
//! own view of the VM, each one [`VmManager`] verb (state checked, driver errors mapped, works on
//! VMs started by other processes). Backends without them (QEMU today) answer "not supported".

use clap::{Args, Subcommand};
use vm_rs::config::DiskConfig;
use vm_rs::driver::TapNetwork;
use vm_rs::VmManager;

/// A VM name.
#[derive(Debug, Args)]
pub struct NameArg {
    /// VM name.
    pub name: String,
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
