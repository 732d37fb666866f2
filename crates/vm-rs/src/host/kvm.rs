//! Whether KVM is *usable*, not just present.
//!
//! `/dev/kvm` existing is not enough: some hosts expose a software KVM that runs guests about a
//! thousand times slower than hardware and crashes on some instructions. [`probe`] therefore
//! runs a tiny real-mode guest through the KVM API — a counted loop of 200,000 iterations
//! ending in `hlt` — and accepts KVM only when the vCPU exits with HLT within
//! [`PROBE_BUDGET`]. On hardware KVM this takes about 0.2 ms; the software KVM seen on some CI
//! hosts needs about 200 ms, so the probe costs at most ~0.4 s (its timeout) per process.
//! [`usable`] caches the verdict per process and per boot.

use std::sync::OnceLock;
use std::time::Duration;

/// How long the probe loop may take before KVM is declared too slow.
pub const PROBE_BUDGET: Duration = Duration::from_millis(50);

/// Probe KVM once per process (the answer does not change while we run).
///
/// The verdict is also cached on disk (`<data dir>/cache/kvm-probe.json`) keyed by the kernel's
/// boot id, so short-lived CLI processes do not pay for the probe on every `run`; a reboot (or
/// deleting the file) probes again.
pub fn usable() -> Result<Duration, String> {
    static PROBE: OnceLock<Result<Duration, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let cache = crate::paths::data_dir().join("cache").join("kvm-probe.json");
            let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
            let boot_id = boot_id.trim();
            if let Some(cached) = read_cache(&cache, boot_id) {
                return cached;
            }
            let verdict = probe();
            if !boot_id.is_empty() {
                write_cache(&cache, boot_id, &verdict);
            }
            verdict
        })
        .clone()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ProbeCache {
    boot_id: String,
    usable: bool,
    elapsed_ns: u64,
    reason: String,
}

fn read_cache(path: &std::path::Path, boot_id: &str) -> Option<Result<Duration, String>> {
    let bytes = std::fs::read(path).ok()?;
    let c: ProbeCache = serde_json::from_slice(&bytes).ok()?;
    if boot_id.is_empty() || c.boot_id != boot_id {
        return None;
    }
    Some(if c.usable {
        Ok(Duration::from_nanos(c.elapsed_ns))
    } else {
        Err(c.reason)
    })
}

fn write_cache(path: &std::path::Path, boot_id: &str, verdict: &Result<Duration, String>) {
    let c = ProbeCache {
        boot_id: boot_id.to_string(),
        usable: verdict.is_ok(),
        elapsed_ns: verdict.as_ref().map(|d| d.as_nanos() as u64).unwrap_or(0),
        reason: verdict.as_ref().err().cloned().unwrap_or_default(),
    };
    if let Some(dir) = path.parent() {
        let _ = crate::paths::create_private_dir_all(dir);
    }
    // best effort: a failed cache write only costs a probe next time
    if let Ok(bytes) = serde_json::to_vec(&c) {
        let _ = crate::fsutil::write_atomic(path, &bytes);
    }
}

/// Run the probe guest. `Ok(elapsed)` when KVM ran it correctly and fast enough.
#[cfg(target_os = "linux")]
pub fn probe() -> Result<Duration, String> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    // Run on a helper thread so a hung software KVM cannot hang the caller.
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let _ = tx.send(run_probe_guest());
        });
    if let Err(e) = spawned {
        return Err(format!("cannot start probe thread: {e}"));
    }
    match rx.recv_timeout(PROBE_BUDGET * 8) {
        Ok(Ok(elapsed)) if elapsed <= PROBE_BUDGET => Ok(elapsed),
        Ok(Ok(elapsed)) => Err(format!(
            "/dev/kvm ran a 200k-iteration probe loop in {:.0} ms (hardware KVM takes ~0.2 ms; budget {} ms)",
            elapsed.as_secs_f64() * 1e3,
            PROBE_BUDGET.as_millis()
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "/dev/kvm probe did not finish within {} ms",
            (PROBE_BUDGET * 8).as_millis()
        )),
    }
}

/// Non-Linux hosts have no KVM.
#[cfg(not(target_os = "linux"))]
pub fn probe() -> Result<Duration, String> {
    Err("KVM exists only on Linux".into())
}

#[cfg(target_os = "linux")]
fn run_probe_guest() -> Result<Duration, String> {
    use kvm_ioctls::{Kvm, VcpuExit};

    const MEM_SIZE: usize = 0x4000;
    const CODE_ADDR: u64 = 0x1000;
    // Real mode: mov ecx, 200_000 ; 1: dec ecx ; jnz 1b ; hlt
    const CODE: [u8; 11] = [0x66, 0xB9, 0x40, 0x0D, 0x03, 0x00, 0x66, 0x49, 0x75, 0xFC, 0xF4];

    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let mem = rustix::mm::MapFlags::PRIVATE;
    // SAFETY: anonymous private mapping with no address hint; the returned region is owned by
    // this function and unmapped below after the VM (which references it) is dropped.
    let host = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            MEM_SIZE,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            mem,
        )
    }
    .map_err(|e| format!("mmap failed: {e}"))?;
    let result = (|| {
        let vm = kvm
            .create_vm()
            .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
        // SAFETY: `host` points to MEM_SIZE writable bytes; CODE fits at offset CODE_ADDR.
        unsafe {
            std::ptr::copy_nonoverlapping(
                CODE.as_ptr(),
                (host as *mut u8).add(CODE_ADDR as usize),
                CODE.len(),
            );
        }
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: the region describes a live mapping of MEM_SIZE bytes that outlives the VM.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION failed: {e}"))?;
        let mut vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS failed: {e}"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)
            .map_err(|e| format!("KVM_SET_SREGS failed: {e}"))?;
        let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS failed: {e}"))?;
        regs.rip = CODE_ADDR;
        regs.rflags = 2;
        vcpu.set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS failed: {e}"))?;
        let start = std::time::Instant::now();
        loop {
            match vcpu.run() {
                Ok(VcpuExit::Hlt) => break,
                Ok(VcpuExit::Intr) => continue,
                Ok(other) => return Err(format!("probe guest exited unexpectedly: {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(format!("KVM_RUN failed: {e}")),
            }
        }
        let elapsed = start.elapsed();
        let regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS failed: {e}"))?;
        if regs.rcx & 0xffff_ffff != 0 {
            return Err(format!(
                "probe guest computed a wrong result (ecx={:#x})",
                regs.rcx
            ));
        }
        Ok(elapsed)
    })();
    // SAFETY: `host` was returned by mmap above with MEM_SIZE; the VM using it has been dropped
    // at the end of the closure.
    let _ = unsafe { rustix::mm::munmap(host, MEM_SIZE) };
    result
}

/// Whether `/dev/kvm` can be opened and a VM created on it (says nothing about speed).
#[cfg(target_os = "linux")]
pub fn opens() -> Result<(), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(format!("unexpected KVM API version {version}"));
    }
    kvm.create_vm()
        .map_err(|e| format!("cannot create a KVM VM: {e}"))?;
    Ok(())
}

/// Non-Linux hosts have no KVM.
#[cfg(not(target_os = "linux"))]
pub fn opens() -> Result<(), String> {
    Err("KVM exists only on Linux".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_cache_is_keyed_by_boot_id() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("c.json");
        write_cache(&p, "boot-a", &Err("slow".into()));
        assert_eq!(read_cache(&p, "boot-a"), Some(Err("slow".to_string())));
        assert_eq!(read_cache(&p, "boot-b"), None);
        write_cache(&p, "boot-a", &Ok(Duration::from_micros(200)));
        assert_eq!(read_cache(&p, "boot-a"), Some(Ok(Duration::from_micros(200))));
        std::fs::write(&p, b"garbage").expect("w");
        assert_eq!(read_cache(&p, "boot-a"), None);
    }
}
