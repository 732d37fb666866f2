//! `vmrs`: the command-line interface to vm-rs.

mod cmd;

use clap::{Parser, Subcommand};

/// Create, boot and manage lightweight Linux VMs.
#[derive(Debug, Parser)]
#[command(name = "vmrs", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Disk images: create, clone, info, resize, catalog, pull, prepare.
    #[command(subcommand)]
    Disk(cmd::disk::DiskCommand),
    /// cloud-init NoCloud seed images.
    #[command(subcommand)]
    Seed(cmd::disk::SeedCommand),
    /// Generate (or show) the ed25519 SSH key pair for guest access.
    Keygen(cmd::disk::KeygenArgs),
    /// Download a file and verify its SHA-256 (resumable).
    Download(cmd::disk::DownloadArgs),
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("VMRS_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Disk(c) => cmd::disk::run_disk(c).await,
        Command::Seed(c) => cmd::disk::run_seed(c).await,
        Command::Keygen(a) => cmd::disk::run_keygen(a).await,
        Command::Download(a) => cmd::disk::run_download(a).await,
    };
    if let Err(e) = result {
        eprintln!("vmrs: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
