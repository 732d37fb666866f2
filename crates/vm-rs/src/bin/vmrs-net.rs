//! `vmrs-net`: the networking sidecar of vm-rs. Started by the library (see
//! `vm_rs::net::sidecar`), not by hand:
//!
//! ```text
//! vmrs-net switch --network NAME --socket PATH [--stats PATH]
//! vmrs-net forward --listen ADDR:PORT --to ADDR:PORT
//! ```
//!
//! Both run until SIGTERM or SIGINT and then shut down cleanly.

use std::path::PathBuf;
use vm_rs::net::switch::server::{serve, ServeOptions};
use vm_rs::net::{PortForwarder, SwitchConfig};

fn usage() -> ! {
    eprintln!(
        "usage: vmrs-net switch --network NAME --socket PATH [--stats PATH]\n       vmrs-net forward --listen ADDR:PORT --to ADDR:PORT"
    );
    std::process::exit(2)
}

fn opt(args: &[String], name: &str) -> Option<String> {
    args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone())
}

async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn main() {
    tracing_subscriber_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first().cloned() else {
        usage()
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmrs-net: cannot start runtime: {e}");
            std::process::exit(1)
        }
    };
    let code = rt.block_on(async move {
        match mode.as_str() {
            "switch" => {
                let (Some(network), Some(socket)) = (opt(&args, "--network"), opt(&args, "--socket")) else {
                    usage()
                };
                let opts = ServeOptions {
                    network,
                    socket: PathBuf::from(socket),
                    config: SwitchConfig::default(),
                    stats: opt(&args, "--stats").map(PathBuf::from),
                };
                match serve(opts, terminated()).await {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("vmrs-net switch: {e}: {}", source_chain(&e));
                        1
                    }
                }
            }
            "forward" => {
                let (Some(listen), Some(to)) = (opt(&args, "--listen"), opt(&args, "--to")) else {
                    usage()
                };
                let (Ok(listen), Ok(to)) = (listen.parse(), to.parse()) else {
                    usage()
                };
                match PortForwarder::bind(listen, to).await {
                    Ok(f) => {
                        terminated().await;
                        f.stop().await;
                        0
                    }
                    Err(e) => {
                        eprintln!("vmrs-net forward: {e}: {}", source_chain(&e));
                        1
                    }
                }
            }
            _ => usage(),
        }
    });
    std::process::exit(code)
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

fn tracing_subscriber_init() {
    // quiet unless VMRS_LOG is set; the sidecar's stderr goes to its log file
    if std::env::var_os("VMRS_LOG").is_some() {
        eprintln!("vmrs-net: logging via VMRS_LOG is not wired in this build");
    }
}
