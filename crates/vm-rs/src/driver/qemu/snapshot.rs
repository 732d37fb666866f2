//! Saving and loading a QEMU VM's state through migration (see [`crate::snapshot`]).
//!
//! Save (VM paused): read the RAM backend's `share` and `mem-path` properties; with a shared
//! file, set `x-ignore-shared` (the stream skips RAM) and copy the file to
//! [`SnapshotDir::MEMORY`] once the stream is complete; otherwise the stream carries the RAM.
//! The stream goes to a file we open and hand QEMU over QMP (`getfd`, `migrate fd:NAME`), so no
//! shell and no path is on QEMU's side. Load: QEMU started with `-incoming defer`, the same
//! capability set when the snapshot has a RAM file, the stream handed over the same way
//! (`migrate-incoming fd:NAME`), then `cont`.
//!
//! After a save QEMU stays in `postmigrate` with its disks flushed and inactive; `cont`
//! (resume) reactivates them. QEMU will not migrate a VM in `postmigrate` again, so saving one
//! first resumes and stops it.

use super::{QemuDriver, QMP_TIMEOUT};
use crate::driver::{DriverError, VmHandle};
use crate::snapshot::SnapshotDir;
use serde_json::json;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// QEMU id of the guest RAM object (see `args`).
const MEMORY_OBJECT: &str = "/objects/vmrs-mem";
/// How long a migration may take (a stream with RAM is as large as the guest's RAM).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |source| DriverError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Save the paused VM's state into `dir`.
pub(super) async fn save(driver: &QemuDriver, handle: &VmHandle, dir: &Path) -> Result<(), DriverError> {
    let mut q = driver.qmp(handle).await?;
    // QEMU refuses to migrate a VM still stopped by its previous migration (a VM left paused
    // by the last snapshot): let it run for a moment, which is what resuming it would do
    let status = q.execute("query-status", None).await?;
    if status.get("status").and_then(|s| s.as_str()) == Some("postmigrate") {
        q.execute("cont", None).await?;
        q.execute("stop", None).await?;
    }
    let share = q
        .execute(
            "qom-get",
            Some(json!({"path": MEMORY_OBJECT, "property": "share"})),
        )
        .await
        .ok()
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let mem_path = match share {
        true => {
            let p = q
                .execute(
                    "qom-get",
                    Some(json!({"path": MEMORY_OBJECT, "property": "mem-path"})),
                )
                .await
                .ok()
                .and_then(|v| v.as_str().map(std::path::PathBuf::from));
            // shared RAM that is not a file (memfd, for a vhost-user sidecar) cannot be copied
            Some(p.ok_or(DriverError::Unsupported {
                backend: crate::config::BackendKind::Qemu,
                feature: "snapshots of vms whose memory is shared with a sidecar",
            })?)
        }
        false => None,
    };
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": mem_path.is_some()}]})),
    )
    .await?;
    let state = dir.join(SnapshotDir::DEVICE_STATE);
    let file = crate::paths::private_file()
        .write(true)
        .create_new(true)
        .open(&state)
        .map_err(io(&state))?;
    q.send_fd("vmrs-snapshot", file.as_fd()).await?;
    q.execute("migrate", Some(json!({"uri": "fd:vmrs-snapshot"})))
        .await?;
    wait_migration(&mut q, "migrate").await?;
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(|e| DriverError::Protocol(format!("fsync task: {e}")))?
        .map_err(io(&state))?;
    if let Some(mem) = mem_path {
        let dest = dir.join(SnapshotDir::MEMORY);
        crate::storage::clone::clone_disk(&mem, &dest)
            .await
            .map_err(|e| DriverError::Io {
                path: mem.clone(),
                source: std::io::Error::other(e),
            })?;
    }
    Ok(())
}

/// Feed a QEMU started with `-incoming defer` the snapshot in `dir` and resume it.
pub(super) async fn load(driver: &QemuDriver, handle: &VmHandle, dir: &Path) -> Result<(), DriverError> {
    let mut q = driver.qmp(handle).await?;
    let has_memory = dir.join(SnapshotDir::MEMORY).is_file();
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": has_memory}]})),
    )
    .await?;
    let state = dir.join(SnapshotDir::DEVICE_STATE);
    let file = std::fs::File::open(&state).map_err(io(&state))?;
    q.send_fd("vmrs-incoming", file.as_fd()).await?;
    drop(file);
    q.execute("migrate-incoming", Some(json!({"uri": "fd:vmrs-incoming"})))
        .await?;
    wait_migration(&mut q, "migrate-incoming").await?;
    q.execute("cont", None).await?;
    Ok(())
}

/// Poll `query-migrate` until the migration completed (or failed, with QEMU's words).
async fn wait_migration(q: &mut super::qmp::Qmp, command: &str) -> Result<(), DriverError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let v = q.execute("query-migrate", None).await?;
        match v.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let desc = v
                    .get("error-desc")
                    .and_then(|d| d.as_str())
                    .unwrap_or("no reason given (see the vmm log)");
                return Err(DriverError::Command {
                    command: command.to_string(),
                    message: desc.to_string(),
                });
            }
            _ => {}
        }
        if started.elapsed() > MIGRATION_TIMEOUT {
            return Err(DriverError::Timeout {
                what: format!("QEMU to finish {command}"),
                secs: MIGRATION_TIMEOUT.as_secs_f64(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(QMP_TIMEOUT / 50);
    }
}
