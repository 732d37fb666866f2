//! Subcommands. Each area has its own module; [`Command`] lists them all.

pub mod agent;
pub mod disk;
pub mod image;
pub mod meta;
pub mod net;
pub mod setup;
pub mod snapshot;
pub mod system;
pub mod vm;
pub mod vmm;

use clap::Subcommand;

/// All subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch the guest kernel and busybox and build the initramfs (the built-in guest).
    Setup(setup::SetupArgs),
    /// Boot a VM (the built-in guest unless --kernel is given).
    Run(vm::RunArgs),
    /// List VMs.
    #[command(alias = "ls")]
    Ps(vm::PsArgs),
    /// Boot stopped VMs again with their saved configuration, disks and networks.
    Start(vm::StartArgs),
    /// Stop VMs gracefully (power button), killing them after --timeout.
    Stop(vm::StopArgs),
    /// Kill VMs immediately.
    Kill(vm::NamesArgs),
    /// Pause VMs (stop their vCPUs).
    Pause(vm::NamesArgs),
    /// Resume paused VMs.
    Resume(vm::NamesArgs),
    /// Show a VM's output: an image VM's process output, else (or with --console) the serial
    /// console.
    Logs(vm::LogsArgs),
    /// Wait until VMs stop; prints each one's exit code (an image VM's process's) and exits
    /// with the last.
    Wait(vm::NamesArgs),
    /// Show details of VMs as JSON.
    Inspect(vm::NamesArgs),
    /// Remove stopped VMs (-f: also running ones).
    Rm(vm::RmArgs),
    /// Run a command in a ready VM (exit code = the command's).
    Exec(agent::ExecArgs),
    /// Copy files between the host and a VM (NAME:/path on one side).
    Cp(agent::CpArgs),
    /// Pull an OCI image into the local store.
    Pull(image::PullArgs),
    /// List stored images.
    Images(image::ImagesArgs),
    /// Remove images (--prune: then delete unused blobs).
    Rmi(image::RmiArgs),
    /// Image commands: inspect, gc, unpack, ls, rm, pull.
    Image(image::ImageArgs),
    /// Disk images: create, clone, info, resize, catalog, pull, prepare.
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// cloud-init NoCloud seed images.
    #[command(subcommand)]
    Seed(disk::SeedCommand),
    /// Generate (or show) the ed25519 SSH key pair for guest access.
    Keygen(disk::KeygenArgs),
    /// Download a file and verify its SHA-256 (resumable).
    Download(disk::DownloadArgs),
    /// Switch networks: list them, show per-port counters.
    #[command(subcommand)]
    Network(net::NetworkCommand),
    /// Serve a switch network or a published port (started by vm-rs itself).
    #[command(hide = true)]
    NetSidecar(net::SidecarArgs),
    /// Snapshots: create (save a VM), ls, inspect, rm; start one with `run --from`.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Start N VMs from a snapshot at once (PREFIX-1 .. PREFIX-N), ready for exec.
    Clone(snapshot::CloneArgs),
    /// Change a running VM's vCPUs and/or memory (Cloud Hypervisor).
    Resize(vmm::ResizeArgs),
    /// Hot-plug disks and NICs, unplug devices (Cloud Hypervisor).
    #[command(subcommand)]
    Device(vmm::DeviceCommand),
    /// Show a VM's device counters as JSON (Cloud Hypervisor).
    Counters(vmm::NameArg),
    /// Show the VMM's own description of a VM as JSON (Cloud Hypervisor).
    VmmInfo(vmm::NameArg),
    /// Disk usage (`system df`) and cleanup of what nothing uses (`system prune`).
    #[command(subcommand)]
    System(system::SystemCommand),
    /// Show the version, the agent protocol and the backends found on this host.
    Version(meta::VersionArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion(meta::CompletionArgs),
}

/// Run a subcommand; returns the process exit code.
pub async fn dispatch(cmd: Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Setup(a) => setup::run(a).await.map(|()| 0),
        Command::Run(a) => vm::run(a).await,
        Command::Ps(a) => vm::ps(a).await,
        Command::Start(a) => vm::start(a).await,
        Command::Stop(a) => vm::stop(a).await,
        Command::Kill(a) => vm::kill(a).await,
        Command::Pause(a) => vm::pause(a).await,
        Command::Resume(a) => vm::resume(a).await,
        Command::Logs(a) => vm::logs(a).await,
        Command::Wait(a) => vm::wait(a).await,
        Command::Inspect(a) => vm::inspect(a).await,
        Command::Rm(a) => vm::rm(a).await,
        Command::Exec(a) => agent::exec(a).await,
        Command::Cp(a) => agent::cp(a).await,
        Command::Pull(a) => image::pull(a).await,
        Command::Images(a) => image::images(a).await,
        Command::Rmi(a) => image::rmi(a).await,
        Command::Image(a) => image::image(a).await,
        Command::Disk(c) => disk::run_disk(c).await.map(|()| 0),
        Command::Seed(c) => disk::run_seed(c).await.map(|()| 0),
        Command::Keygen(a) => disk::run_keygen(a).await.map(|()| 0),
        Command::Download(a) => disk::run_download(a).await.map(|()| 0),
        Command::Network(c) => net::network(c).await,
        Command::NetSidecar(a) => net::net_sidecar(a).await,
        Command::Snapshot(c) => snapshot::snapshot(c).await,
        Command::Clone(a) => snapshot::clone(a).await,
        Command::Resize(a) => vmm::resize(a).await,
        Command::Device(c) => vmm::device(c).await,
        Command::Counters(a) => vmm::counters(a).await,
        Command::VmmInfo(a) => vmm::vmm_info(a).await,
        Command::System(c) => system::system(c).await,
        Command::Version(a) => meta::version(a),
        Command::Completion(a) => meta::completion(a),
    }
}
