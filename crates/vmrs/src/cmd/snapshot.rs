//! `vmrs snapshot create|ls|inspect|rm` and `vmrs clone`: the snapshot verbs of [`VmManager`]
//! (see `vm_rs::snapshot`). `vmrs run --from SNAPSHOT` is in `vm`.

use anyhow::Context;
use clap::{Args, Subcommand};
use vm_rs::manager::SnapshotOptions;
use vm_rs::VmManager;

/// `vmrs snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a running or paused VM as a snapshot (the VM is left paused unless --leave-running).
    Create {
        /// VM name.
        name: String,
        /// Snapshot name.
        snapshot: String,
        /// Resume the VM once the snapshot is taken.
        #[arg(long)]
        leave_running: bool,
        /// Print the snapshot's details as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List snapshots.
    #[command(alias = "list")]
    Ls {
        /// Print JSON (an array).
        #[arg(long)]
        json: bool,
    },
    /// Show a snapshot's details as JSON.
    Inspect {
        /// Snapshot name.
        snapshot: String,
    },
    /// Remove snapshots (refused while VMs restored from one exist, unless --force).
    Rm {
        /// Snapshot names.
        #[arg(required = true)]
        snapshots: Vec<String>,
        /// Remove even when restored VMs still use its files.
        #[arg(short, long)]
        force: bool,
    },
}

/// `vmrs clone`
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// Snapshot name.
    pub snapshot: String,
    /// Number of VMs to start.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub count: usize,
    /// Name prefix: the VMs are PREFIX-1 .. PREFIX-COUNT (default: the snapshot's name).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Print the VMs' details as JSON (an array).
    #[arg(long)]
    pub json: bool,
}

/// `vmrs snapshot ...`
pub async fn snapshot(cmd: SnapshotCommand) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    match cmd {
        SnapshotCommand::Create {
            name,
            snapshot,
            leave_running,
            json,
        } => {
            let info = mgr
                .snapshot(&name, &snapshot, SnapshotOptions { leave_running })
                .await
                .with_context(|| format!("cannot snapshot vm {name:?} as {snapshot:?}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{snapshot}");
            }
        }
        SnapshotCommand::Ls { json } => {
            let list = mgr.list_snapshots().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!(
                "{:<24} {:<20} {:<8} {:>5} {:>8} {:>10}  CREATED",
                "NAME", "VM", "BACKEND", "CPUS", "MEMORY", "SIZE"
            );
            for s in list {
                println!(
                    "{:<24} {:<20} {:<8} {:>5} {:>7}M {:>9}M  {}",
                    s.meta.name,
                    s.meta.source_vm,
                    s.meta.backend.to_string(),
                    s.meta.cpus,
                    s.meta.memory_mib,
                    s.disk_usage / (1 << 20),
                    s.meta.created_at
                );
            }
        }
        SnapshotCommand::Inspect { snapshot } => {
            let info = mgr.inspect_snapshot(&snapshot).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        SnapshotCommand::Rm { snapshots, force } => {
            for s in snapshots {
                mgr.remove_snapshot(&s, force)
                    .await
                    .with_context(|| format!("cannot remove snapshot {s:?}"))?;
                println!("{s}");
            }
        }
    }
    Ok(0)
}

/// `vmrs clone`: returns when every clone is ready for exec.
pub async fn clone(a: CloneArgs) -> anyhow::Result<i32> {
    let mgr = VmManager::new().await?;
    let prefix = a.prefix.clone().unwrap_or_else(|| a.snapshot.clone());
    let vms = mgr
        .clone_snapshot(&a.snapshot, a.count, &prefix, Default::default())
        .await
        .with_context(|| format!("cannot clone snapshot {:?}", a.snapshot))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
    } else {
        for v in vms {
            println!("{}", v.name);
        }
    }
    Ok(0)
}
