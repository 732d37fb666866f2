//! [`VmManagerBuilder`] and where a manager's drivers come from ([`Drivers`]).
//!
//! A manager resolves a driver in two places: when it starts a VM (from the config's
//! [`BackendKind`], `Auto` included) and when it attaches to a recorded one (from the record's
//! concrete backend). Both go through the one [`Drivers`] value the builder sets, so a driver
//! injected for tests or by an embedder runs every VM of that manager, new or reattached.

use super::{ManagerError, VmManager};
use crate::config::{BackendKind, VmConfig};
use crate::driver::{self, DriverError, VmDriver};
use std::path::PathBuf;
use std::sync::Arc;

/// Where a manager's drivers come from.
#[derive(Debug, Clone)]
pub(super) enum Drivers {
    /// Probe the host: [`driver::detect`] for a start, [`driver::driver_for`] for a record.
    Host,
    /// One driver for every VM, whatever its config or record names.
    Injected(Arc<dyn VmDriver>),
}

impl Drivers {
    /// The driver to boot a new VM whose config asks for `kind`.
    pub(super) fn for_start(&self, kind: BackendKind) -> Result<Arc<dyn VmDriver>, DriverError> {
        match self {
            Drivers::Host => driver::detect(kind),
            Drivers::Injected(d) => Ok(d.clone()),
        }
    }

    /// The driver to reach a recorded VM that runs (or ran) on `kind`.
    pub(super) fn for_record(&self, kind: BackendKind) -> Result<Arc<dyn VmDriver>, DriverError> {
        match self {
            Drivers::Host => driver::driver_for(kind),
            Drivers::Injected(d) => Ok(d.clone()),
        }
    }
}

/// Builds a [`VmManager`] ([`VmManager::builder`]).
///
/// ```no_run
/// # async fn f() -> Result<(), vm_rs::ManagerError> {
/// let mgr = vm_rs::VmManager::builder().home("/tmp/vmrs-home").build().await?;
/// # let _ = mgr; Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct VmManagerBuilder {
    home: Option<PathBuf>,
    driver: Option<Arc<dyn VmDriver>>,
}

impl VmManagerBuilder {
    /// The data dir (default [`crate::paths::data_dir`]: `VMRS_HOME`, else the user's data
    /// dir).
    pub fn home(mut self, home: impl Into<PathBuf>) -> Self {
        self.home = Some(home.into());
        self
    }

    /// Run every VM of this manager — started by it or reattached from a record — on `driver`
    /// instead of the backend the host offers (default: detect per VM).
    pub fn driver(mut self, driver: Arc<dyn VmDriver>) -> Self {
        self.driver = Some(driver);
        self
    }

    /// Open the data dir and reattach to the VMs recorded in it.
    pub async fn build(self) -> Result<VmManager, ManagerError> {
        let home = self.home.unwrap_or_else(crate::paths::data_dir);
        let drivers = match self.driver {
            Some(d) => Drivers::Injected(d),
            None => Drivers::Host,
        };
        VmManager::open(home, drivers).await
    }
}

impl VmManager {
    /// The driver to boot `config` on (the builder's resolver).
    pub(super) fn start_driver(&self, config: &VmConfig) -> Result<Arc<dyn VmDriver>, ManagerError> {
        self.inner
            .drivers
            .for_start(config.backend)
            .map_err(ManagerError::driver(&config.name))
    }
}
