//! Networking on the command line: the `--net`/`-p` flags of `vmrs run`, `vmrs network`
//! (switch networks and their per-port counters), and the hidden `vmrs net-sidecar` entry
//! point that serves a switch or a published port when the `vmrs-net` program is not
//! installed next to `vmrs`.

use clap::{Args, Subcommand};
use serde::Serialize;
use vm_rs::config::NetworkAttachment;
use vm_rs::net::{sidecar, spec};

/// Network flags of `vmrs run`.
#[derive(Debug, Args, Default, Clone)]
pub struct NetArgs {
    /// Attach a NIC (repeatable, in order eth0, eth1, ...). SPEC is one of
    /// `user[,ip=dhcp|CIDR][,mac=M][,via=vmm|slirp4netns]` (user-mode NAT, the default; the
    /// VMM's own, else slirp4netns on backends without one),
    /// `tap[=IFNAME][,host=CIDR][,ip=..][,dns=A+B][,netns=PATH]`,
    /// `bridge=NAME,gateway=CIDR[,nat][,ip=..][,dns=..][,netns=PATH]`,
    /// `switch=NETWORK[,subnet=CIDR][,ip=..]`, or `none`.
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,
    /// Publish a guest port on the host: `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]`
    /// (repeatable; on 127.0.0.1 unless HOST_IP is given). Goes to the first user-mode or
    /// bridge NIC.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub publish: Vec<String>,
}

/// The attachments `--net`/`-p` ask for: user-mode NAT when no `--net` is given, nothing
/// for `--net none`.
pub fn networks(a: &NetArgs) -> anyhow::Result<Vec<NetworkAttachment>> {
    let mut nets = Vec::new();
    if a.nets.is_empty() {
        nets.push(NetworkAttachment::user(Vec::new()));
    }
    for s in &a.nets {
        if let Some(n) = spec::parse_network(s)? {
            nets.push(n);
        }
    }
    let forwards = a
        .publish
        .iter()
        .map(|p| spec::parse_publish(p))
        .collect::<Result<Vec<_>, _>>()?;
    spec::attach_port_forwards(&mut nets, forwards)?;
    Ok(nets)
}

/// Published ports of a VM as `vmrs ps` shows them (`127.0.0.1:8080->80/tcp`).
pub fn ports(nets: &[NetworkAttachment]) -> Vec<String> {
    nets.iter()
        .flat_map(|n| n.port_forwards().iter().map(|p| p.to_string()))
        .collect()
}

/// `vmrs network ...`
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// List switch networks with their members and switch process.
    #[command(alias = "ls")]
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show a switch network's per-port counters as JSON.
    Inspect {
        /// Network name.
        name: String,
    },
}

#[derive(Debug, Serialize)]
struct NetworkRow {
    name: String,
    members: Vec<String>,
    switch_pid: Option<u32>,
    running: bool,
}

/// Run `vmrs network ...`.
pub async fn network(cmd: NetworkCommand) -> anyhow::Result<i32> {
    let dir = vm_rs::net::networks_dir(&vm_rs::paths::data_dir());
    match cmd {
        NetworkCommand::List { json } => {
            let mut rows: Vec<NetworkRow> = sidecar::networks(&dir)
                .into_iter()
                .map(|name| {
                    let rec = sidecar::switch_record(&dir, &name);
                    let mut members = sidecar::members(&dir, &name);
                    members.sort();
                    NetworkRow {
                        running: rec.as_ref().is_some_and(|r| r.is_alive()),
                        switch_pid: rec.map(|r| r.pid),
                        members,
                        name,
                    }
                })
                .collect();
            rows.sort_by(|a, b| a.name.cmp(&b.name));
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<20} {:<8} {:>8}  MEMBERS", "NETWORK", "SWITCH", "PID");
                for r in &rows {
                    println!(
                        "{:<20} {:<8} {:>8}  {}",
                        r.name,
                        if r.running { "running" } else { "down" },
                        r.switch_pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        r.members.join(",")
                    );
                }
            }
            Ok(0)
        }
        NetworkCommand::Inspect { name } => {
            vm_rs::net::validate_network_name(&name)?;
            let stats = sidecar::network_dir(&dir, &name).join("stats.json");
            if !sidecar::network_dir(&dir, &name).is_dir() {
                return Err(crate::exit::CliError::NotFound(format!("no switch network {name:?}")).into());
            }
            let ports = vm_rs::net::switch::server::read_stats(&stats).unwrap_or_default();
            println!("{}", serde_json::to_string_pretty(&ports)?);
            Ok(0)
        }
    }
}

/// Arguments of the hidden `vmrs net-sidecar` command (see [`sidecar::main`]).
#[derive(Debug, Args)]
pub struct SidecarArgs {
    /// `switch ...` or `forward ...`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Run the sidecar in this process.
pub async fn net_sidecar(a: SidecarArgs) -> anyhow::Result<i32> {
    Ok(sidecar::main(&a.args).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_user_mode_and_ports_attach_to_it() {
        let a = NetArgs {
            nets: vec![],
            publish: vec!["8080:80".into(), "127.0.0.1:5353:53/udp".into()],
        };
        let n = networks(&a).expect("nets");
        assert_eq!(n.len(), 1);
        assert_eq!(
            ports(&n),
            vec!["127.0.0.1:8080->80/tcp", "127.0.0.1:5353->53/udp"]
        );
        let none = NetArgs {
            nets: vec!["none".into()],
            publish: vec![],
        };
        assert!(networks(&none).expect("none").is_empty());
        let bad = NetArgs {
            nets: vec!["none".into()],
            publish: vec!["80:80".into()],
        };
        assert!(networks(&bad).is_err(), "ports without a user/bridge nic");
        let sw = NetArgs {
            nets: vec!["switch=lab".into(), "user".into()],
            publish: vec!["2222:22".into()],
        };
        let n = networks(&sw).expect("nets");
        assert_eq!(n[0].kind(), "switch");
        assert_eq!(n[1].port_forwards().len(), 1);
    }
}
