//! `vmrs system df` and `vmrs system prune`: what the data directory holds, and deleting what
//! nothing uses.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;
use vm_rs::storage::disk_usage;
use vm_rs::VmManager;

use super::image::{human, store};

/// `vmrs system …`
#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Show what images, root caches, snapshots and VMs take on disk (allocated bytes, as `du`
    /// counts them) and how much `system prune` would free.
    Df(DfArgs),
    /// Delete what nothing uses: image warm-start snapshots no VM was restored from, blobs no
    /// stored image needs, partial downloads, and root filesystem caches no stored image or
    /// VM uses. VMs, images and named snapshots are kept.
    Prune,
}

/// `vmrs system df`
#[derive(Debug, Args)]
pub struct DfArgs {
    /// Print JSON: one object per type.
    #[arg(long)]
    pub json: bool,
}

/// One `system df` row.
#[derive(Debug, Serialize)]
pub struct DfRow {
    /// `images`, `rootfs-caches`, `warm-cache` (image warm-start snapshots), `snapshots`
    /// (named ones) or `vms`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// How many.
    pub count: usize,
    /// Allocated bytes.
    pub bytes: u64,
    /// Bytes `system prune` would free.
    pub reclaimable: u64,
    /// The directory measured.
    pub path: std::path::PathBuf,
}

/// Run a `vmrs system` command.
pub async fn system(c: SystemCommand) -> anyhow::Result<i32> {
    match c {
        SystemCommand::Df(a) => df(a).await,
        SystemCommand::Prune => {
            let mgr = VmManager::new().await?;
            // first: an entry holds on to the root filesystem cache its disk is over
            let warm = mgr
                .prune_warm()
                .await
                .context("cannot clean the warm-start cache")?;
            if !warm.is_empty() {
                println!(
                    "deleted {} warm-start snapshots, freed {}",
                    warm.len(),
                    human(warm.iter().map(|w| w.disk_usage).sum())
                );
            }
            super::image::gc_with(&store().await?).await?;
            Ok(0)
        }
    }
}

async fn df(a: DfArgs) -> anyhow::Result<i32> {
    let home = vm_rs::paths::data_dir();
    let store = store().await?;
    let images = store.list().await?;
    let preview = store.gc_preview().await?;
    let caches = vm_rs::rootfs::cache_usage(&home, &store)
        .await
        .context("cannot measure the root filesystem caches")?;
    let mgr = VmManager::new().await?;
    let vms = mgr.list().await?;
    let measure = |p: std::path::PathBuf| -> anyhow::Result<(u64, std::path::PathBuf)> {
        Ok((
            disk_usage(&p).with_context(|| format!("cannot measure {}", p.display()))?,
            p,
        ))
    };
    let snapshots_dir = home.join("snapshots");
    let snapshots = std::fs::read_dir(&snapshots_dir)
        .map(|rd| rd.flatten().count())
        .unwrap_or(0);
    let mut current = std::collections::HashMap::new();
    for i in &images {
        current.insert(i.record.reference.clone(), i.record.manifest.to_string());
    }
    let warm = mgr
        .list_warm(|r| {
            vm_rs::oci::ImageReference::parse(r)
                .ok()
                .and_then(|p| current.get(&p.canonical()).cloned())
        })
        .await
        .context("cannot list the warm-start cache")?;
    let warm_bytes: u64 = warm.iter().map(|w| w.snapshot.disk_usage).sum();
    let (img_bytes, img_path) = measure(store.root().to_path_buf())?;
    let (cache_bytes, cache_path) = measure(vm_rs::rootfs::cache_dir(&home))?;
    let (snap_bytes, snap_path) = measure(snapshots_dir)?;
    let (vm_bytes, vm_path) = measure(home.join("vms"))?;
    let rows = vec![
        DfRow {
            kind: "images",
            count: images.len(),
            bytes: img_bytes,
            reclaimable: preview.freed_bytes,
            path: img_path,
        },
        DfRow {
            kind: "rootfs-caches",
            count: caches.entries.len(),
            bytes: cache_bytes,
            reclaimable: caches.unused().map(|e| e.bytes).sum(),
            path: cache_path,
        },
        DfRow {
            kind: "warm-cache",
            count: warm.len(),
            bytes: warm_bytes,
            reclaimable: warm
                .iter()
                .filter(|w| w.users.is_empty())
                .map(|w| w.snapshot.disk_usage)
                .sum(),
            path: snap_path.clone(),
        },
        DfRow {
            kind: "snapshots",
            count: snapshots.saturating_sub(warm.len()),
            bytes: snap_bytes.saturating_sub(warm_bytes),
            reclaimable: 0,
            path: snap_path,
        },
        DfRow {
            kind: "vms",
            count: vms.len(),
            bytes: vm_bytes,
            reclaimable: 0,
            path: vm_path,
        },
    ];
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!(
        "{:<14} {:>6} {:>10} {:>12}",
        "TYPE", "COUNT", "SIZE", "RECLAIMABLE"
    );
    for r in &rows {
        println!(
            "{:<14} {:>6} {:>10} {:>12}",
            r.kind,
            r.count,
            human(r.bytes),
            human(r.reclaimable)
        );
    }
    Ok(0)
}
