//! `vmrs-net`: the networking sidecar of vm-rs, started by the library (see
//! `vm_rs::net::sidecar`), not by hand:
//!
//! ```text
//! vmrs-net switch --network NAME --socket PATH [--stats PATH]
//! vmrs-net forward --listen ADDR:PORT --to ADDR:PORT
//! vmrs-net serial-log --log PATH --max BYTES     (the capped serial console, socket on stdin)
//! ```
//!
//! Each runs until SIGTERM or SIGINT and then shuts down cleanly; `serial-log` also ends when
//! the VMM's connection does.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmrs-net: cannot start runtime: {e}");
            std::process::exit(1)
        }
    };
    let code = rt.block_on(vm_rs::net::sidecar::main(&args));
    std::process::exit(code)
}
