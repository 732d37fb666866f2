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

/// The vm-rs VM name of container `id` (vm-rs names are at most 63 characters of
/// `[A-Za-z0-9_.-]`; container ids that are not are refused).
pub fn vm_name(id: &str) -> Result<String, BundleError> {
    let ok = !id.is_empty()
        && id.len() <= 60
        && !id.contains("..")
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        return Err(BundleError::Invalid(format!(
            "container id {id:?} cannot name a VM (at most 60 characters of letters, digits, '_', '.', '-')"
        )));
    }
    Ok(format!("c-{id}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names() {
        assert_eq!(vm_name("t1").unwrap(), "c-t1");
        assert!(vm_name("").is_err());
        assert!(vm_name("a/b").is_err());
        assert!(vm_name("a..b").is_err());
        assert!(vm_name(&"x".repeat(61)).is_err());
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
