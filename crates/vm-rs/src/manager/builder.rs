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

    /// The driver to boot a new VM whose config asks for `kind`, and why; `fits` says whether
    /// a driver can run the VM (see [`driver::choose`]).
    pub(super) fn choose_for_start(
        &self,
        kind: BackendKind,
        fits: &dyn Fn(&dyn VmDriver) -> Result<(), DriverError>,
    ) -> Result<driver::BackendChoice, DriverError> {
        match self {
            Drivers::Host => driver::choose(kind, fits),
            Drivers::Injected(d) => Ok(driver::BackendChoice {
                driver: d.clone(),
                reason: format!("{}: the manager's own driver", d.kind()),
            }),
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
    /// The driver to boot `config` on (the builder's resolver) and why: for `Auto`, the first
    /// backend whose capabilities cover the devices planned for it (see [`driver::choose`]).
    pub(super) fn start_driver(
        &self,
        config: &VmConfig,
        dir: &std::path::Path,
        opts: &super::StartOptions,
    ) -> Result<driver::BackendChoice, ManagerError> {
        let fits = |d: &dyn VmDriver| match super::plan_devices(config, dir, self.home(), opts, d) {
            Err(ManagerError::Driver {
                source: e @ DriverError::Unsupported { .. },
                ..
            }) => Err(e),
            // any other refusal is the config's, whatever the backend: reported by the real plan
            _ => Ok(()),
        };
        let choice = self
            .inner
            .drivers
            .choose_for_start(config.backend, &fits)
            .map_err(ManagerError::driver(&config.name))?;
        tracing::info!(vm = %config.name, backend = %choice.driver.kind(), reason = %choice.reason, "backend chosen");
        Ok(choice)
    }
}
