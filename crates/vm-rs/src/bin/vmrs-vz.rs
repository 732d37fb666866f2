//! `vmrs-vz`: the per-VM host process of the Virtualization.framework backend (macOS).
//!
//! `vmrs-vz --plan <vm_dir>/vz-plan.json --control <vm_dir>/vz.sock [--restore STATE]` builds
//! the machine the plan describes, starts it (or restores a saved state and resumes it), serves the control socket (`vm_rs::driver::vz::control`) and
//! exits when the machine stops. The VZ driver launches it; it is not meant to be run by hand.
//! It must be signed with the `com.apple.security.virtualization` entitlement (docs/macos.md).
//! On other hosts it only says so and exits with status 2.

#[cfg(all(target_os = "macos", feature = "vz"))]
fn main() {
    use std::path::PathBuf;
    let mut plan: Option<PathBuf> = None;
    let mut control: Option<PathBuf> = None;
    let mut restore: Option<PathBuf> = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--plan") => plan = args.next().map(PathBuf::from),
            Some("--control") => control = args.next().map(PathBuf::from),
            Some("--restore") => restore = args.next().map(PathBuf::from),
            _ => {
                eprintln!("usage: vmrs-vz --plan PLAN.json --control SOCKET [--restore STATE.vzvmsave]");
                std::process::exit(2);
            }
        }
    }
    let (Some(plan_path), Some(control)) = (plan, control) else {
        eprintln!("usage: vmrs-vz --plan PLAN.json --control SOCKET [--restore STATE.vzvmsave]");
        std::process::exit(2);
    };
    let plan: vm_rs::driver::vz::plan::VzPlan = match std::fs::read(&plan_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vmrs-vz: cannot read {}: {e}", plan_path.display());
            std::process::exit(2);
        }
    };
    if plan.version != vm_rs::driver::vz::plan::PLAN_VERSION {
        eprintln!(
            "vmrs-vz: {} is plan version {}, this vmrs-vz reads {}",
            plan_path.display(),
            plan.version,
            vm_rs::driver::vz::plan::PLAN_VERSION
        );
        std::process::exit(2);
    }
    vm_rs::driver::vz::host::run(plan, &control, restore.as_deref())
}

#[cfg(not(all(target_os = "macos", feature = "vz")))]
fn main() {
    eprintln!("vmrs-vz runs only on macOS (built with the vz feature)");
    std::process::exit(2);
}
