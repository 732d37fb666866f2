//! Print whether KVM is usable on this host and why (the same probe `accel=auto` uses).
fn main() {
    match vm_rs::host::kvm::probe() {
        Ok(t) => println!("kvm usable: probe loop ran in {:.3} ms", t.as_secs_f64() * 1e3),
        Err(reason) => println!("kvm not usable: {reason}"),
    }
}
