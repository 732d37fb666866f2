//! The OCI bundle: reading `config.json` into the guest command, the VM's name and data dir,
//! and mounting / unmounting `<bundle>/rootfs`.

use containerd_shim::protos::types::mount::Mount;
use oci_spec::runtime::Spec;
use std::path::{Path, PathBuf};
use vm_rs::agent::ExecCommand;

/// Errors reading a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// `config.json` is missing.
    #[error("bundle {} has no config.json", .0.display())]
    NoConfig(PathBuf),
    /// `config.json` does not parse as an OCI runtime spec.
    #[error("config.json of bundle {} is not a valid OCI runtime spec: {source}", path.display())]
    BadConfig {
        /// The bundle.
        path: PathBuf,
        /// Cause.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// The spec or a process spec is unusable for a reason given.
    #[error("{0}")]
    Invalid(String),
    /// Mounting or unmounting failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Mount {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Data dir of the shim's VMs for containerd namespace `ns`: `$VMRS_SHIM_HOME/<ns>`, default
/// `/var/lib/vmrs-shim/<ns>`.
pub fn vmrs_home(ns: &str) -> PathBuf {
    let base = std::env::var_os("VMRS_SHIM_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/vmrs-shim"));
    base.join(if ns.is_empty() { "default" } else { ns })
}

/// The vm-rs VM name of container `id`: `c-<id>`; an id longer than 60 characters (the CRI
/// plugin's are 64 hex digits; vm-rs names are at most 63 characters) is shortened to its
/// first 40 characters and 16 hex digits of its SHA-256. Ids that are empty, longer than 128
/// characters or not made of `[A-Za-z0-9_.-]` (or containing `..`) are refused: the id also
/// names a directory.
pub fn vm_name(id: &str) -> Result<String, BundleError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.contains("..")
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        return Err(BundleError::Invalid(format!(
            "container id {id:?} cannot name a VM (at most 128 characters of letters, digits, '_', '.', '-')"
        )));
    }
    if id.len() <= 60 {
        return Ok(format!("c-{id}"));
    }
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(id.as_bytes()));
    Ok(format!("c-{}-{}", &id[..40], &h[..16]))
}

/// Read and check `<bundle>/config.json`.
pub fn load_spec(bundle: &Path) -> Result<Spec, BundleError> {
    let path = bundle.join("config.json");
    if !path.is_file() {
        return Err(BundleError::NoConfig(bundle.to_path_buf()));
    }
    let spec = Spec::load(&path).map_err(|source| BundleError::BadConfig {
        path: bundle.to_path_buf(),
        source,
    })?;
    if let Some(root) = spec.root() {
        let p = root.path();
        // An absolute root.path is the spec's own choice (`ctr run --rootfs DIR`); a
        // relative one must stay inside the bundle.
        if p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(BundleError::Invalid(format!(
                "root.path {} escapes the bundle",
                p.display()
            )));
        }
    }
    Ok(spec)
}

/// The guest command of an OCI process.
pub fn command(process: &oci_spec::runtime::Process) -> Result<ExecCommand, BundleError> {
    let argv = process.args().clone().unwrap_or_default();
    if argv.is_empty() {
        return Err(BundleError::Invalid("the process has no args".into()));
    }
    let mut cmd = ExecCommand::new(argv);
    for kv in process.env().clone().unwrap_or_default() {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => cmd.env.push((k.to_string(), v.to_string())),
            _ => return Err(BundleError::Invalid(format!("env entry {kv:?} is not KEY=VALUE"))),
        }
    }
    let cwd = process.cwd();
    if !cwd.as_os_str().is_empty() {
        if !cwd.is_absolute() {
            return Err(BundleError::Invalid(format!(
                "cwd {} is not absolute",
                cwd.display()
            )));
        }
        cmd.cwd = Some(cwd.to_string_lossy().into_owned());
    }
    let user = process.user();
    cmd.user = Some(format!("{}:{}", user.uid(), user.gid()));
    Ok(cmd)
}

/// The guest command of an exec's process spec (the JSON containerd sends in `ExecProcessRequest`).
pub fn exec_command(json: &[u8]) -> Result<ExecCommand, BundleError> {
    let process: oci_spec::runtime::Process = serde_json::from_slice(json)
        .map_err(|e| BundleError::Invalid(format!("the exec process spec is not valid: {e}")))?;
    command(&process)
}

/// `<bundle>/rootfs`.
pub fn rootfs_dir(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// The directory holding the container's root: the spec's `root.path` (relative to the
/// bundle unless absolute), else `<bundle>/rootfs`.
pub fn root_source(spec: &Spec, bundle: &Path) -> PathBuf {
    match spec.root() {
        Some(r) if r.path().is_absolute() => r.path().clone(),
        Some(r) => bundle.join(r.path()),
        None => rootfs_dir(bundle),
    }
}

/// Mount containerd's rootfs mounts at `<bundle>/rootfs`, in order. Returns whether anything
/// was mounted (no mounts: the bundle's rootfs directory is used as it is).
pub async fn mount_rootfs(bundle: &Path, mounts: &[Mount]) -> Result<bool, BundleError> {
    let target = rootfs_dir(bundle);
    if mounts.is_empty() {
        if !target.is_dir() {
            return Err(BundleError::Invalid(format!(
                "no rootfs mounts were passed and {} is not a directory",
                target.display()
            )));
        }
        return Ok(false);
    }
    std::fs::create_dir_all(&target).map_err(|source| BundleError::Mount {
        op: "create",
        path: target.clone(),
        source,
    })?;
    for m in mounts {
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, &target).await {
            let _ = unmount_rootfs(bundle);
            return Err(BundleError::Mount {
                op: "mount the rootfs at",
                path: target,
                source: std::io::Error::other(format!("{} mount of {:?}: {e}", m.type_, m.source)),
            });
        }
    }
    Ok(true)
}

/// Unmount everything at `<bundle>/rootfs` (lazily, until nothing is mounted there).
pub fn unmount_rootfs(bundle: &Path) -> Result<(), BundleError> {
    let target = rootfs_dir(bundle);
    for _ in 0..16 {
        match rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH) {
            Ok(()) => continue,
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => {
                return Err(BundleError::Mount {
                    op: "unmount",
                    path: target,
                    source: e.into(),
                })
            }
        }
    }
    Ok(())
}

/// Where the task's ext4 root disk is built: `<home>/bundles/<vm>.ext4`.
pub fn root_image(home: &Path, vm: &str) -> PathBuf {
    home.join("bundles").join(format!("{vm}.ext4"))
}

/// vCPUs for a CFS quota: `ceil(quota / period)` (period default 100 ms), at least 1 and at
/// most the host's CPUs; no quota (or -1, unlimited): 1.
pub fn cpus_for_quota(quota: Option<i64>, period: Option<u64>) -> u32 {
    let host = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    match quota {
        Some(q) if q > 0 => {
            let p = period.filter(|p| *p > 0).unwrap_or(100_000);
            (q as u64).div_ceil(p).clamp(1, host) as u32
        }
        _ => 1,
    }
}

/// Annotation the CRI plugin sets: `sandbox` for a pod's pause container, `container` for the
/// pod's other containers.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// Annotation the CRI plugin sets: the id of the pod (its sandbox container).
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Where a pod VM mounts its pod directory; container `<id>` runs chrooted in
/// `<POD_GUEST_DIR>/<id>`.
pub const POD_GUEST_DIR: &str = "/run/vmrs-pod";

/// What a container is to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not part of a pod (`ctr run`): a VM of its own on its own root disk.
    Alone,
    /// A pod's sandbox (pause) container: boots the pod's VM.
    Sandbox,
    /// A container of the pod whose sandbox has this id: runs in that VM.
    InPod(String),
}

/// The container's role, from the CRI annotations of its spec.
pub fn role(spec: &Spec, id: &str) -> Result<Role, BundleError> {
    let Some(a) = spec.annotations().as_ref() else {
        return Ok(Role::Alone);
    };
    match (a.get(CONTAINER_TYPE).map(String::as_str), a.get(SANDBOX_ID)) {
        (Some("sandbox"), _) => Ok(Role::Sandbox),
        (Some("container"), Some(s)) if s == id => Err(BundleError::Invalid(format!(
            "container {id:?} names itself as its sandbox"
        ))),
        (Some("container"), Some(s)) => {
            vm_name(s)?;
            Ok(Role::InPod(s.clone()))
        }
        (Some("container"), None) => Err(BundleError::Invalid(format!(
            "annotation {CONTAINER_TYPE}=container without {SANDBOX_ID}"
        ))),
        (Some(other), _) => Err(BundleError::Invalid(format!(
            "unknown {CONTAINER_TYPE} {other:?} (expected sandbox or container)"
        ))),
        (None, _) => Ok(Role::Alone),
    }
}

/// The shim grouping (one shim process per pod, as containerd's runc shim does): the sandbox
/// id for a pod's containers, else the container's own id. Read from `<bundle>/config.json`;
/// an unreadable spec groups by the id (Create then reports the spec's error).
pub fn grouping(bundle: &Path, id: &str) -> String {
    match load_spec(bundle).ok().map(|s| role(&s, id)) {
        Some(Ok(Role::InPod(s))) => s,
        _ => id.to_string(),
    }
}

/// The host directory a pod VM shares with its guest: `<home>/pods/<sandbox vm>`.
pub fn pod_dir(home: &Path, sandbox_vm: &str) -> PathBuf {
    home.join("pods").join(sandbox_vm)
}

fn mount_err(op: &'static str, path: &Path) -> impl FnOnce(rustix::io::Errno) -> BundleError {
    let path = path.to_path_buf();
    move |e| BundleError::Mount {
        op,
        path,
        source: e.into(),
    }
}

/// Create the pod directory as a shared bind mount of itself, so that the container roots
/// bind-mounted into it later reach the virtio-fs daemon, whose own mount namespace is a
/// slave of the host's.
pub fn make_pod_dir(dir: &Path) -> Result<(), BundleError> {
    std::fs::create_dir_all(dir).map_err(|source| BundleError::Mount {
        op: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    rustix::mount::mount_bind(dir, dir).map_err(mount_err("bind-mount", dir))?;
    if let Err(e) = rustix::mount::mount_change(dir, rustix::mount::MountPropagationFlags::SHARED) {
        let _ = unmount_all(dir);
        return Err(mount_err("make shared", dir)(e));
    }
    Ok(())
}

/// Bind-mount a container's root (`<bundle>/rootfs`) into the pod directory as `<id>`.
pub fn bind_into_pod(pod: &Path, id: &str, root: &Path) -> Result<PathBuf, BundleError> {
    vm_name(id)?;
    let target = pod.join(id);
    std::fs::create_dir(&target).map_err(|source| BundleError::Mount {
        op: "create",
        path: target.clone(),
        source,
    })?;
    if let Err(e) = rustix::mount::mount_bind_recursive(root, &target) {
        let _ = std::fs::remove_dir(&target);
        return Err(mount_err("bind-mount the container root at", &target)(e));
    }
    Ok(target)
}

/// Lazily unmount everything at `path` (with what is mounted beneath it), then remove the
/// directory if it is empty. A path that is not there is fine.
pub fn unmount_all(path: &Path) -> Result<(), BundleError> {
    for _ in 0..16 {
        match rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH) {
            Ok(()) => continue,
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => break,
            Err(e) => return Err(mount_err("unmount", path)(e)),
        }
    }
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // not empty: something of ours that is not a mount is left; keep it, say nothing
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(annotations: &[(&str, &str)]) -> Spec {
        let mut spec = Spec::default();
        let a: std::collections::HashMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        spec.set_annotations(if a.is_empty() { None } else { Some(a) });
        spec
    }

    #[test]
    fn cri_annotations_give_the_role_and_the_shim_grouping() {
        assert_eq!(role(&spec_with(&[]), "a").unwrap(), Role::Alone);
        assert_eq!(
            role(&spec_with(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "p")]), "p").unwrap(),
            Role::Sandbox
        );
        assert_eq!(
            role(
                &spec_with(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "p")]),
                "c"
            )
            .unwrap(),
            Role::InPod("p".into())
        );
        for bad in [
            spec_with(&[(CONTAINER_TYPE, "container")]),
            spec_with(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "c")]),
            spec_with(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "../x")]),
            spec_with(&[(CONTAINER_TYPE, "sidecar"), (SANDBOX_ID, "p")]),
        ] {
            let e = role(&bad, "c").expect_err("refused");
            assert!(!e.to_string().is_empty());
        }
        // the grouping reads the bundle; a bundle without config.json groups by the id
        let d = tempfile::tempdir().unwrap();
        assert_eq!(grouping(d.path(), "c"), "c");
        spec_with(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "p")])
            .save(d.path().join("config.json"))
            .unwrap();
        assert_eq!(grouping(d.path(), "c"), "p");
    }

    #[test]
    fn a_cpu_quota_sizes_the_vcpus() {
        assert_eq!(cpus_for_quota(None, None), 1);
        assert_eq!(cpus_for_quota(Some(-1), Some(100_000)), 1);
        assert_eq!(cpus_for_quota(Some(50_000), Some(100_000)), 1);
        let host = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        assert_eq!(cpus_for_quota(Some(150_000), None), 2.min(host));
        assert_eq!(cpus_for_quota(Some(i64::MAX), Some(1)), host);
        assert_eq!(cpus_for_quota(Some(100_000), Some(0)), 1);
    }

    #[test]
    fn vm_names() {
        assert_eq!(vm_name("t1").unwrap(), "c-t1");
        assert!(vm_name("").is_err());
        assert!(vm_name("a/b").is_err());
        assert!(vm_name("a..b").is_err());
        assert!(vm_name(&"x".repeat(129)).is_err());
        let long = "ab".repeat(32);
        let n = vm_name(&long).unwrap();
        assert!(n.len() <= 63 && n.starts_with("c-abab"), "{n}");
        assert_ne!(n, vm_name(&format!("{}cd", &long[..62])).unwrap());
    }

    #[test]
    fn bundle_specs() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_spec(dir.path()).unwrap_err();
        assert!(e.to_string().contains("has no config.json"), "{e}");
        std::fs::write(dir.path().join("config.json"), b"{\"ociVersion\": ").unwrap();
        let e = load_spec(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a valid OCI runtime spec"), "{e}");
        std::fs::write(
            dir.path().join("config.json"),
            br#"{"ociVersion":"1.0.2","root":{"path":"/etc"},"process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap();
        let e = load_spec(dir.path());
        assert!(e.is_ok(), "an absolute root.path is allowed (ctr run --rootfs)");
        std::fs::write(
            dir.path().join("config.json"),
            br#"{"ociVersion":"1.0.2","root":{"path":"../x"},"process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap();
        assert!(load_spec(dir.path()).unwrap_err().to_string().contains("escapes"));
        std::fs::write(
            dir.path().join("config.json"),
            br#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap();
        let spec = load_spec(dir.path()).unwrap();
        assert_eq!(command(spec.process().as_ref().unwrap()).unwrap().argv, ["true"]);
    }

    #[test]
    fn exec_spec() {
        let cmd = exec_command(
            br#"{"args":["sh","-c","echo hi"],"env":["A=1"],"cwd":"/tmp","user":{"uid":5,"gid":6}}"#,
        )
        .unwrap();
        assert_eq!(cmd.argv, ["sh", "-c", "echo hi"]);
        assert_eq!(cmd.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(cmd.cwd.as_deref(), Some("/tmp"));
        assert_eq!(cmd.user.as_deref(), Some("5:6"));
        assert!(exec_command(br#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#).is_err());
        assert!(
            exec_command(br#"{"args":["x"],"env":["NOEQ"],"cwd":"/","user":{"uid":0,"gid":0}}"#).is_err()
        );
        assert!(exec_command(b"{not json").is_err());
    }
}
