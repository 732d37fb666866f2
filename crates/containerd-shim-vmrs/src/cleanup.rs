//! `containerd-shim-vmrs-v1 delete`: what containerd runs after a shim died (or to undo a
//! failed start). It removes the container's VM (its VMM and sidecars with it), its root
//! image and the rootfs mount, and reports the task as killed.

use crate::bundle;
use containerd_shim::{DeleteResponse, Error};
use std::path::Path;

/// Remove everything of container `id` in namespace `ns` whose bundle is `bundle_dir`.
pub async fn delete(ns: &str, id: &str, bundle_dir: &Path) -> Result<DeleteResponse, Error> {
    // The mount first: it must go even when the VM's records cannot be read.
    let unmounted = bundle::unmount_rootfs(bundle_dir).map_err(|e| Error::Other(e.to_string()));
    let home = bundle::vmrs_home(ns);
    // a pod's container: its root in the pod directory (the VM is the sandbox's)
    if let Ok(spec) = bundle::load_spec(bundle_dir) {
        if let Ok(bundle::Role::InPod(sandbox)) = bundle::role(&spec, id) {
            if let (Ok(svm), Ok(_)) = (bundle::vm_name(&sandbox), bundle::vm_name(id)) {
                bundle::unmount_all(&bundle::pod_dir(&home, &svm).join(id))
                    .map_err(|e| Error::Other(e.to_string()))?;
            }
        }
    }
    if let Ok(vm) = bundle::vm_name(id) {
        if home.is_dir() {
            let mgr = vm_rs::VmManager::with_home(&home).await.map_err(|e| {
                Error::Other(format!(
                    "cannot open the vm-rs data dir {}: {}",
                    home.display(),
                    crate::service::chain(&e)
                ))
            })?;
            match mgr.remove(&vm, true).await {
                Ok(()) => {}
                Err(e) if e.kind() == vm_rs::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Other(format!(
                        "cannot remove vm {vm:?}: {}",
                        crate::service::chain(&e)
                    )))
                }
            }
        }
        let _ = std::fs::remove_file(bundle::root_image(&home, &vm));
        // a sandbox's pod directory (with any container roots still bound in it)
        bundle::unmount_all(&bundle::pod_dir(&home, &vm)).map_err(|e| Error::Other(e.to_string()))?;
    }
    unmounted?;
    let mut resp = DeleteResponse::new();
    resp.exit_status = 128 + libc::SIGKILL as u32;
    resp.exited_at = containerd_shim::protos::protobuf::MessageField::some(
        containerd_shim::util::timestamp().unwrap_or_default(),
    );
    Ok(resp)
}
