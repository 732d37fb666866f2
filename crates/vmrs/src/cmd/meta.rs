//! Commands about `vmrs` itself: `version` and `completion`.

use clap::{Args, CommandFactory};
use serde::Serialize;
use std::path::PathBuf;
use vm_rs::agent::proto;
use vm_rs::driver::{cloud_hypervisor, qemu};

/// `vmrs version`
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// What `vmrs version` reports.
#[derive(Debug, Serialize)]
pub struct VersionInfo {
    /// The CLI's (and library's) version.
    pub version: &'static str,
    /// Guest agent protocol version.
    pub agent_protocol: u16,
    /// Host OS and architecture.
    pub os: &'static str,
    /// Host architecture.
    pub arch: &'static str,
    /// The QEMU binary `--backend qemu` would run, if found.
    pub qemu: Option<PathBuf>,
    /// The Cloud Hypervisor binary `--backend cloud-hypervisor` would run, if found.
    pub cloud_hypervisor: Option<PathBuf>,
    /// The Firecracker binary `--backend firecracker` would run, if found.
    pub firecracker: Option<PathBuf>,
}

impl VersionInfo {
    fn gather() -> Self {
        VersionInfo {
            version: env!("CARGO_PKG_VERSION"),
            agent_protocol: proto::VERSION,
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
            qemu: qemu::QemuDriver::new().find_binary().ok(),
            cloud_hypervisor: cloud_hypervisor::find_binary(None).ok(),
            firecracker: vm_rs::driver::firecracker::find_binary(None).ok(),
        }
    }
}

/// `vmrs version`
pub fn version(a: VersionArgs) -> anyhow::Result<i32> {
    let v = VersionInfo::gather();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let found = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "not found".into())
    };
    println!("vmrs {}", v.version);
    println!("agent protocol:   {}", v.agent_protocol);
    println!("os/arch:          {}/{}", v.os, v.arch);
    println!("qemu:             {}", found(&v.qemu));
    println!("cloud-hypervisor: {}", found(&v.cloud_hypervisor));
    println!("firecracker:      {}", found(&v.firecracker));
    Ok(0)
}

/// `vmrs completion`
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell to write a completion script for.
    pub shell: clap_complete::Shell,
}

/// `vmrs completion SHELL`: the script on stdout (e.g. `vmrs completion bash > /etc/bash_completion.d/vmrs`).
pub fn completion(a: CompletionArgs) -> anyhow::Result<i32> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "vmrs", &mut std::io::stdout());
    Ok(0)
}
