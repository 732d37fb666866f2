//! The verbs that talk to a running VMM and leave the lifecycle state as it is: resize, device hot-plug, counters and the VMM's own view of the VM.
//!
//! Each checks the state ([`VmState::check`](crate::state::VmState::check) — the VMM must be
//! up), takes the VM's handle through its entry (so it works on VMs other processes started),
//! calls the VM's driver and maps its error; a backend without the feature answers
//! [`DriverError::Unsupported`](crate::driver::DriverError::Unsupported) inside
//! [`ManagerError::Driver`]. What changes the running VM (sizes, devices) is recorded in
//! `live.json` and shown by [`VmManager::inspect`] until the VMM exits.

use super::record::PluggedDevice;
use super::{ManagerError, VmManager};
use crate::config::DiskConfig;
use crate::driver::{Counters, TapNetwork, VmDriver, VmHandle};
use crate::state::Operation;
use std::sync::Arc;

impl VmManager {
    /// The entry, state check and handle every verb here starts with.
    async fn vmm_for(
        &self,
        name: &str,
        op: Operation,
    ) -> Result<(Arc<super::VmEntry>, Arc<dyn VmDriver>, VmHandle), ManagerError> {
        let entry = self.entry(name).await?;
        entry.state().check(name, op)?;
        let handle = entry.require_handle(name).await?;
        let driver = entry.driver();
        Ok((entry, driver, handle))
    }

    /// Change the running VM's vCPUs and/or memory (at least one). The new sizes show in
    /// [`VmInfo`](super::VmInfo) until the VMM exits; the saved config is not changed.
    pub async fn resize(
        &self,
        name: &str,
        cpus: Option<u32>,
        memory_mib: Option<u64>,
    ) -> Result<(), ManagerError> {
        if cpus.is_none() && memory_mib.is_none() {
            return Err(ManagerError::InvalidRequest {
                name: name.to_string(),
                reason: "a resize needs a vcpu count, a memory size or both",
            });
        }
        if cpus == Some(0) || memory_mib == Some(0) {
            return Err(ManagerError::InvalidRequest {
                name: name.to_string(),
                reason: "a vm needs at least one vcpu and some memory",
            });
        }
        let (entry, driver, handle) = self.vmm_for(name, Operation::Resize).await?;
        driver
            .resize(&handle, cpus, memory_mib)
            .await
            .map_err(ManagerError::driver(name))?;
        entry
            .update_live(|live| {
                if cpus.is_some() {
                    live.cpus = cpus;
                }
                if memory_mib.is_some() {
                    live.memory_mib = memory_mib;
                }
            })
            .await
    }

    /// Hot-plug `disk` (a relative path is taken from the current directory); returns the
    /// backend's device id, for [`remove_device`](Self::remove_device).
    pub async fn add_disk(&self, name: &str, disk: DiskConfig) -> Result<String, ManagerError> {
        let mut disk = disk;
        disk.path = std::path::absolute(&disk.path).map_err(|source| ManagerError::Io {
            path: disk.path.clone(),
            source,
        })?;
        if !disk.path.exists() {
            return Err(ManagerError::Io {
                path: disk.path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let (entry, driver, handle) = self.vmm_for(name, Operation::AddDevice).await?;
        let id = driver
            .add_disk(&handle, &disk)
            .await
            .map_err(ManagerError::driver(name))?;
        let plugged = PluggedDevice::Disk { id: id.clone(), disk };
        entry.update_live(|live| live.devices.push(plugged)).await?;
        Ok(id)
    }

    /// Hot-plug a NIC on a host TAP device; returns the backend's device id.
    pub async fn add_net(&self, name: &str, net: TapNetwork) -> Result<String, ManagerError> {
        let (entry, driver, handle) = self.vmm_for(name, Operation::AddDevice).await?;
        let id = driver
            .add_net(&handle, &net)
            .await
            .map_err(ManagerError::driver(name))?;
        let plugged = PluggedDevice::Net { id: id.clone(), net };
        entry.update_live(|live| live.devices.push(plugged)).await?;
        Ok(id)
    }

    /// Hot-unplug the device `id` (as [`add_disk`](Self::add_disk)/[`add_net`](Self::add_net)
    /// returned it, or a device the backend names itself).
    pub async fn remove_device(&self, name: &str, id: &str) -> Result<(), ManagerError> {
        let (entry, driver, handle) = self.vmm_for(name, Operation::RemoveDevice).await?;
        driver
            .remove_device(&handle, id)
            .await
            .map_err(ManagerError::driver(name))?;
        entry
            .update_live(|live| live.devices.retain(|d| d.id() != id))
            .await
    }

    /// Per-device counters (bytes/ops per disk and NIC).
    pub async fn counters(&self, name: &str) -> Result<Counters, ManagerError> {
        let (_, driver, handle) = self.vmm_for(name, Operation::Counters).await?;
        driver.counters(&handle).await.map_err(ManagerError::driver(name))
    }

    /// The VMM's own description of the VM (backend-specific JSON).
    pub async fn vmm_info(&self, name: &str) -> Result<serde_json::Value, ManagerError> {
        let (_, driver, handle) = self.vmm_for(name, Operation::VmmInfo).await?;
        driver.info(&handle).await.map_err(ManagerError::driver(name))
    }
}
