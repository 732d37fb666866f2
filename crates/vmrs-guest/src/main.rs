//! vmrs-init: PID 1 inside vm-rs guests (placeholder).
fn main() {
    println!("VMRS_READY 127.0.0.1");
}
