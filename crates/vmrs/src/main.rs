//! `vmrs`: run and manage lightweight Linux VMs from the terminal, with docker's habits.
//!
//! ```text
//! vmrs setup                      fetch the guest kernel/busybox and build the initramfs
//! vmrs run [-d] [--name N] ...    boot a VM (the built-in guest by default)
//! vmrs ps [-a] [--json]           list VMs
//! vmrs stop|kill|pause|resume N   lifecycle
//! vmrs logs [-f] N                serial console
//! vmrs inspect N                  JSON details
//! vmrs exec [-e K=V] [-w D] [-u U] N -- CMD...   run a command in a VM
//! vmrs cp SRC DST                 copy files in/out (NAME:/path on one side)
//! vmrs rm [-f] N                  remove
//! vmrs pull REF [--platform P]     pull an OCI image into the store
//! vmrs images [--json]            list stored images
//! vmrs rmi REF... [--prune]       remove images (and unused blobs)
//! vmrs image inspect|gc|unpack    image details, garbage collection, unpack to a directory
//! vmrs snapshot N DIR             save a paused VM (Cloud Hypervisor)
//! vmrs resize N --cpus/--memory   resize a running VM (Cloud Hypervisor)
//! vmrs device add-disk|add-net|remove N ...   hot-plug (Cloud Hypervisor)
//! vmrs counters|vmm-info N        device counters / the VMM's view, as JSON
//! ```
//!
//! Exit codes: see [`exit`].

// Doc comments on the argument structs are clap help text (`PATH[,ro]`, `<hash>`), not rustdoc.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

mod cmd;
mod exit;

use clap::Parser;

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(
    name = "vmrs",
    version,
    about = "Run and manage lightweight Linux microVMs",
    propagate_version = true
)]
struct Cli {
    /// Data directory (VMs, images, guest assets).
    #[arg(long, global = true, env = "VMRS_HOME", value_name = "DIR")]
    home: Option<std::path::PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: cmd::Command,
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,vm_rs=info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn main() {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    if let Some(home) = &cli.home {
        // The library reads VMRS_HOME; set it before any thread starts.
        std::env::set_var("VMRS_HOME", home);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(exit::GENERAL);
        }
    };
    let code = runtime.block_on(async {
        match cmd::dispatch(cli.command).await {
            Ok(code) => code,
            Err(err) => {
                exit::print_error(&err);
                exit::code_for(&err)
            }
        }
    });
    // Do not wait for background watcher tasks: the VMs keep running without us.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}
