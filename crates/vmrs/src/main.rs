//! `vmrs`: run and manage lightweight Linux VMs from the terminal, with docker's habits.
//!
//! ```text
//! vmrs setup                      fetch the guest kernel/busybox and build the initramfs
//! vmrs run [-d] [--name N] [-m 512m] [--accel auto|kvm|tcg|hvf] [--backend auto|qemu|cloud-hypervisor|firecracker|vz] ...
//!                                 boot a VM (the built-in guest by default)
//! vmrs ps [-a] [-q] [--json]      list VMs (-q: names only)
//! vmrs stop|kill|pause|resume N   lifecycle (stop of a stopped VM is a no-op)
//! vmrs logs [-f] [-n|--tail N] N  serial console
//! vmrs inspect N                  JSON details
//! vmrs exec [-e K=V] [-w D] [-u U] N CMD...   run a command in a VM (flags after N are CMD's)
//! vmrs cp SRC DST                 copy files in/out (NAME:/path on one side)
//! vmrs rm [-f] N                  remove (-f: kill a running VM first)
//! vmrs pull REF [--platform P]     pull an OCI image into the store
//! vmrs images [--json]            list stored images
//! vmrs rmi REF... [--prune]       remove images (and unused blobs)
//! vmrs image inspect|gc|unpack    image details, garbage collection, unpack to a directory
//! vmrs snapshot create N SNAP     save a VM (paused after; --leave-running resumes it)
//! vmrs snapshot ls|inspect|rm     the snapshots
//! vmrs run --from SNAP [--name N] start a VM from a snapshot (-d, --rm)
//! vmrs clone SNAP -n N [--prefix] start N VMs from a snapshot, ready for exec
//! vmrs resize N --cpus/--memory   resize a running VM (Cloud Hypervisor)
//! vmrs device add-disk|add-net|remove N ...   hot-plug (Cloud Hypervisor)
//! vmrs counters|vmm-info N        device counters / the VMM's view, as JSON
//! vmrs version [--json]           versions and the backends found on this host
//! vmrs completion bash|zsh|fish   shell completion script
//! ```
//!
//! Global flags: `--home DIR` (`VMRS_HOME`), `--verbose` (twice: debug; `RUST_LOG` overrides).
//! There is no global `-v`: as in docker, `-v` is `run`'s volume flag (`-v HOST:GUEST[:ro]`).
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
    /// More log output (--verbose: info, twice: debug); RUST_LOG overrides. (No `-v`: that
    /// is docker's volume flag, `vmrs run -v HOST:GUEST[:ro]`.)
    #[arg(long, global = true, action = clap::ArgAction::Count)]
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::ExitCode::Usage
            } else {
                exit::ExitCode::Success // --help, --version
            };
            let _ = e.print();
            std::process::exit(code.code());
        }
    };
    init_tracing(cli.verbose);
    if let Some(home) = &cli.home {
        // The library reads VMRS_HOME; set it before any thread starts.
        std::env::set_var("VMRS_HOME", home);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(exit::ExitCode::Failure.code());
        }
    };
    let code = runtime.block_on(async {
        match cmd::dispatch(cli.command).await {
            Ok(code) => code,
            Err(err) => {
                exit::print_error(&err);
                exit::code_for(&err).code()
            }
        }
    });
    // Do not wait for background watcher tasks: the VMs keep running without us.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmrs").chain(args.iter().copied()))
    }

    #[test]
    fn exec_takes_everything_after_the_name_as_the_command() {
        let cli = parse(&["exec", "-e", "A=1", "web", "ls", "-e", "--all"]).expect("parse");
        let cmd::Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(a.env, ["A=1"]);
        assert_eq!(a.args, ["web", "ls", "-e", "--all"]);
        assert!(parse(&["exec", "web"]).is_err());
    }

    #[test]
    fn short_v_is_not_verbose_and_values_are_checked_by_clap() {
        assert!(parse(&["-v", "ps"]).is_err());
        assert_eq!(
            parse(&["--verbose", "--verbose", "ps"]).expect("parse").verbose,
            2
        );
        assert!(parse(&["run", "--accel", "warp"]).is_err());
        let cli = parse(&["run", "--backend", "ch", "--accel", "tcg", "-m", "1G"]).expect("parse");
        let cmd::Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.backend, cmd::vm::BackendArg::CloudHypervisor);
        assert_eq!(a.memory, 1024);
        for name in ["firecracker", "fc"] {
            let cli = parse(&["run", "--backend", name]).expect("parse");
            let cmd::Command::Run(a) = cli.command else {
                panic!("not run")
            };
            assert_eq!(
                vm_rs::BackendKind::from(a.backend),
                vm_rs::BackendKind::Firecracker
            );
        }
        // on run, -v is docker's volume flag (repeatable)
        let cli = parse(&["run", "-d", "-v", "/a:/b", "--volume", "/c:/d:ro", "img"]).expect("parse");
        let cmd::Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.volumes, ["/a:/b", "/c:/d:ro"]);
        assert_eq!(a.image.as_deref(), Some("img"));
        assert_eq!(cli.verbose, 0);
    }
}
