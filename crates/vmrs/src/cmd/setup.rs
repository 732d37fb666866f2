//! `vmrs setup`: download the guest kernel and busybox and build the initramfs.

use std::path::PathBuf;
use std::sync::Arc;

use vm_rs::guest::{setup, SetupOptions, SetupProgress};

/// Arguments of `vmrs setup`.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// The static vmrs-init binary (default: $VMRS_GUEST_INIT, a vmrs-init next to vmrs, or
    /// target/x86_64-unknown-linux-gnu/release/vmrs-init from scripts/build-guest.sh).
    #[arg(long, value_name = "PATH")]
    pub init: Option<PathBuf>,
    /// Re-download and rebuild even when the assets are up to date.
    #[arg(long)]
    pub force: bool,
    /// Print the resulting assets as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Assets directory (default: $VMRS_ASSETS, else <data dir>/assets).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Run `vmrs setup`; progress goes to stderr.
pub async fn run(args: SetupArgs) -> anyhow::Result<()> {
    let opts = SetupOptions {
        dir: args.dir.unwrap_or_else(vm_rs::paths::assets_dir),
        init: args.init,
        force: args.force,
        progress: Some(Arc::new(|p: &SetupProgress| eprintln!("vmrs setup: {p}"))),
    };
    let assets = setup(&opts).await?;
    if args.json {
        let value = serde_json::json!({
            "dir": assets.dir,
            "kernel": assets.kernel,
            "initramfs": assets.initramfs,
            "kernel_version": assets.kernel_version,
            "modules": assets.manifest.modules,
            "packages": assets.manifest.packages,
            "files": assets.manifest.files,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("kernel:    {}", assets.kernel.display());
        println!("initramfs: {}", assets.initramfs.display());
        println!("version:   {}", assets.kernel_version);
    }
    Ok(())
}
