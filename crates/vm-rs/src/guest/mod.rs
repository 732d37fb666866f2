//! Guest assets: the kernel, its modules, busybox, the vm-rs init, and the initramfs built from
//! them.
//!
//! This module owns the assets directory ([`crate::paths::assets_dir`], `VMRS_ASSETS` overrides):
//!
//! ```text
//! assets/
//!   manifest.json          what is here: format version, kernel version, package versions,
//!                          sha256 of every file below, module load order
//!   vmlinuz                Debian's cloud kernel (bzImage)
//!   initramfs.img          uncompressed newc cpio: /init = vmrs-init, busybox, modules
//!   busybox                busybox-static
//!   vmrs-init              the copy of the init binary that went into initramfs.img
//!   kernel-config          the kernel's build config (for reference)
//!   modules/<kver>/...     every .ko of the kernel + modules.builtin/modules.order
//! ```
//!
//! [`setup`] fills it: `apt-get download` of `linux-image-cloud-amd64`, the versioned
//! `linux-image-*-cloud-amd64` it depends on (read from the meta-package's control file) and
//! `busybox-static` into a temporary directory — the only network access — then extracts the
//! files above in Rust ([`deb`]), resolves the module closure from each `.ko`'s `.modinfo`
//! ([`modules`]) and writes the initramfs ([`initramfs`], [`cpio`]). Everything is built in a
//! staging directory next to the assets dir and renamed into place, under an exclusive lock
//! (`.<dir name>.lock` beside it) so concurrent setups do not race. A second run whose manifest
//! matches is a no-op; when only the init binary changed, only the initramfs is rebuilt.
//!
//! Where the init binary comes from ([`find_init`]): the explicit path
//! ([`SetupOptions::init`], `vmrs setup --init PATH`), else `$VMRS_GUEST_INIT`, else a
//! `vmrs-init` next to the current executable, else
//! `target/x86_64-unknown-linux-gnu/release/vmrs-init` under the current directory (what
//! `scripts/build-guest.sh` produces). It must be statically linked.
//!
//! [`GuestAssets::load`] reads a prepared directory and says to run `vmrs setup` when it is not.

pub mod cpio;
pub mod deb;
pub mod initramfs;
pub mod modules;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use deb::PackageInfo;
pub use initramfs::{
    build_initramfs, build_initramfs_blocking, InitramfsBuilder, InitramfsReport, InitramfsSpec,
    OPTIONAL_MODULES, REQUIRED_MODULES,
};
pub use modules::{ModInfo, ModInfoError, ModuleEntry, ModuleIndex};

/// Format version of `manifest.json`.
pub const MANIFEST_VERSION: u32 = 1;
/// Version of the standard initramfs layout; bumping it makes [`setup`] rebuild the initramfs.
pub const INITRAMFS_LAYOUT: u32 = 2;
/// The kernel meta-package.
pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// The busybox package.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Environment variable naming the init binary.
pub const GUEST_INIT_ENV: &str = "VMRS_GUEST_INIT";
/// Where `scripts/build-guest.sh` puts the init, relative to the workspace root.
pub const BUILT_INIT_PATH: &str = "target/x86_64-unknown-linux-gnu/release/vmrs-init";

/// Errors of guest asset setup and loading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuestError {
    /// Guest assets are missing or incomplete.
    #[error("guest assets not found in {dir}: run `vmrs setup` first")]
    NotSetUp {
        /// The assets dir.
        dir: PathBuf,
    },
    /// The manifest could not be parsed.
    #[error("invalid guest asset manifest {path}")]
    BadManifest {
        /// The manifest path.
        path: PathBuf,
        /// Parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest was written by another vm-rs version.
    #[error("guest asset manifest {path} has format {found}, expected {expected}: run `vmrs setup --force`")]
    ManifestVersion {
        /// The manifest path.
        path: PathBuf,
        /// Version found.
        found: u32,
        /// Version expected.
        expected: u32,
    },
    /// A filesystem operation failed.
    #[error("i/o error on {path}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A program could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `apt-get download` failed.
    #[error("apt-get download {packages:?} failed (exit status {status:?}; is `apt-get update` needed?): {stderr}")]
    AptDownload {
        /// Requested packages.
        packages: Vec<String>,
        /// Exit code.
        status: Option<i32>,
        /// apt-get's stderr (truncated).
        stderr: String,
    },
    /// apt-get succeeded but the package file is not there.
    #[error("apt-get did not produce a .deb for {package}")]
    MissingPackageFile {
        /// The package.
        package: String,
    },
    /// A `.deb` is malformed.
    #[error("bad package {path}: {reason}")]
    BadPackage {
        /// The `.deb`.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The kernel meta-package does not depend on a kernel image.
    #[error("{package} does not depend on a linux-image package")]
    NoKernelDependency {
        /// The meta-package.
        package: String,
    },
    /// Something expected was not found in the packages.
    #[error("the downloaded packages contain no {what}")]
    MissingFromPackages {
        /// What is missing.
        what: &'static str,
    },
    /// A `.ko` file's modinfo could not be read.
    #[error("bad kernel module {path}")]
    BadModule {
        /// The module file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ModInfoError,
    },
    /// A module is neither loadable nor built in.
    #[error("unknown kernel module {name}{}", required_by.as_ref().map(|p| format!(" (needed by {p})")).unwrap_or_default())]
    UnknownModule {
        /// The module.
        name: String,
        /// The module that depends on it, if any.
        required_by: Option<String>,
    },
    /// Module dependencies form a cycle.
    #[error("kernel module dependency cycle through {name}")]
    ModuleCycle {
        /// A module on the cycle.
        name: String,
    },
    /// A path inside the initramfs is empty, or has `.`/`..` components.
    #[error("invalid guest path {path:?}")]
    BadGuestPath {
        /// The path.
        path: String,
    },
    /// A needed input file does not exist.
    #[error("missing file {path}")]
    MissingFile {
        /// The path.
        path: PathBuf,
    },
    /// No init binary was found.
    #[error("vmrs-init not found (tried {tried:?}): run scripts/build-guest.sh or pass --init PATH / set VMRS_GUEST_INIT")]
    InitNotFound {
        /// Paths tried in order.
        tried: Vec<PathBuf>,
    },
    /// The init binary is not a static x86-64 ELF executable.
    #[error("{path} is not a statically linked x86-64 executable (build it with scripts/build-guest.sh)")]
    InitNotStatic {
        /// The binary.
        path: PathBuf,
    },
    /// A blocking task failed.
    #[error("background task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl GuestError {
    /// What kind of failure this is (see [`crate::error`]).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            GuestError::NotSetUp { .. }
            | GuestError::InitNotFound { .. }
            | GuestError::MissingFile { .. } => K::NotFound,
            GuestError::BadManifest { .. } | GuestError::ManifestVersion { .. } => K::Invalid,
            GuestError::Spawn { .. } | GuestError::AptDownload { .. } => K::Backend,
            GuestError::MissingPackageFile { .. }
            | GuestError::BadPackage { .. }
            | GuestError::NoKernelDependency { .. }
            | GuestError::MissingFromPackages { .. }
            | GuestError::BadModule { .. }
            | GuestError::UnknownModule { .. }
            | GuestError::ModuleCycle { .. } => K::Backend,
            GuestError::BadGuestPath { .. } | GuestError::InitNotStatic { .. } => K::Invalid,
            GuestError::Io { .. } | GuestError::Task(_) => K::Other,
        }
    }
}

/// `manifest.json`: what an assets dir holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// [`INITRAMFS_LAYOUT`] the initramfs was built with.
    #[serde(default)]
    pub initramfs_layout: u32,
    /// Kernel version (`uname -r` in the guest).
    pub kernel_version: String,
    /// Downloaded packages.
    pub packages: Vec<PackageInfo>,
    /// sha256 of each file in the dir, by file name.
    pub files: BTreeMap<String, String>,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// Where the init binary was copied from.
    pub init_source: PathBuf,
}

/// A prepared assets directory.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// The assets dir.
    pub dir: PathBuf,
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// Kernel version.
    pub kernel_version: String,
    /// busybox-static.
    pub busybox: PathBuf,
    /// The init binary inside the initramfs.
    pub init: PathBuf,
    /// `modules/<kver>`: every module of the kernel.
    pub modules_dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
}

impl GuestAssets {
    /// Read a prepared assets dir (reads only the manifest and checks that files exist).
    pub fn load(dir: impl AsRef<Path>) -> Result<GuestAssets, GuestError> {
        let dir = std::path::absolute(dir.as_ref()).map_err(io_err(dir.as_ref()))?;
        let manifest_path = dir.join("manifest.json");
        let text = match std::fs::read(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(GuestError::NotSetUp { dir }),
            Err(source) => {
                return Err(GuestError::Io {
                    path: manifest_path,
                    source,
                })
            }
        };
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|source| GuestError::BadManifest {
            path: manifest_path.clone(),
            source,
        })?;
        if manifest.version != MANIFEST_VERSION {
            return Err(GuestError::ManifestVersion {
                path: manifest_path,
                found: manifest.version,
                expected: MANIFEST_VERSION,
            });
        }
        if manifest.kernel_version.is_empty()
            || manifest.kernel_version.contains('/')
            || manifest.kernel_version.starts_with('.')
        {
            return Err(GuestError::NotSetUp { dir });
        }
        let assets = GuestAssets {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.img"),
            busybox: dir.join("busybox"),
            init: dir.join("vmrs-init"),
            modules_dir: dir.join("modules").join(&manifest.kernel_version),
            kernel_version: manifest.kernel_version.clone(),
            manifest,
            dir,
        };
        for f in [&assets.kernel, &assets.initramfs, &assets.busybox, &assets.init] {
            if !f.is_file() {
                return Err(GuestError::NotSetUp { dir: assets.dir });
            }
        }
        if !assets.modules_dir.is_dir() {
            return Err(GuestError::NotSetUp { dir: assets.dir });
        }
        Ok(assets)
    }

    /// Load from the default assets dir ([`crate::paths::assets_dir`]).
    pub fn load_default() -> Result<GuestAssets, GuestError> {
        Self::load(crate::paths::assets_dir())
    }

    /// A spec for building another initramfs from these assets (e.g. with extra files or
    /// modules), written to `output`.
    pub fn initramfs_spec(&self, output: impl Into<PathBuf>) -> InitramfsSpec {
        InitramfsSpec::new(
            &self.init,
            &self.busybox,
            &self.modules_dir,
            &self.kernel_version,
            output,
        )
    }
}

/// A step of [`setup`], reported to [`SetupOptions::progress`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SetupProgress {
    /// The assets are already complete and current.
    UpToDate,
    /// Running `apt-get download` for these packages.
    Downloading(Vec<String>),
    /// Extracting a downloaded package.
    Extracting(String),
    /// Building the initramfs.
    BuildingInitramfs,
    /// Done; the assets are ready.
    Done,
}

impl std::fmt::Display for SetupProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupProgress::UpToDate => write!(f, "guest assets are up to date"),
            SetupProgress::Downloading(p) => write!(f, "downloading {}", p.join(" ")),
            SetupProgress::Extracting(p) => write!(f, "extracting {p}"),
            SetupProgress::BuildingInitramfs => write!(f, "building initramfs"),
            SetupProgress::Done => write!(f, "guest assets ready"),
        }
    }
}

/// Progress callback type.
pub type ProgressFn = Arc<dyn Fn(&SetupProgress) + Send + Sync>;

/// Options of [`setup`].
#[derive(Clone)]
pub struct SetupOptions {
    /// The assets dir. Default: [`crate::paths::assets_dir`].
    pub dir: PathBuf,
    /// The init binary; default: see [`find_init`].
    pub init: Option<PathBuf>,
    /// Re-download and rebuild even when up to date. Default false.
    pub force: bool,
    /// Called at each step. Default none.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for SetupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetupOptions")
            .field("dir", &self.dir)
            .field("init", &self.init)
            .field("force", &self.force)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl Default for SetupOptions {
    fn default() -> Self {
        Self {
            dir: crate::paths::assets_dir(),
            init: None,
            force: false,
            progress: None,
        }
    }
}

impl SetupOptions {
    fn report(&self, p: SetupProgress) {
        if let Some(cb) = &self.progress {
            cb(&p);
        }
    }
}

/// Find the init binary: `explicit`, else `$VMRS_GUEST_INIT`, else a statically linked
/// `vmrs-init` next to the current executable, else [`BUILT_INIT_PATH`] under the current
/// directory.
pub fn find_init(explicit: Option<&Path>) -> Result<PathBuf, GuestError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(GuestError::InitNotFound {
                tried: vec![p.to_path_buf()],
            })
        };
    }
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os(GUEST_INIT_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        // An explicit environment setting that is wrong is an error, not a fallthrough.
        return if p.is_file() {
            Ok(p)
        } else {
            Err(GuestError::InitNotFound { tried: vec![p] })
        };
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        tried.push(dir.join("vmrs-init"));
    }
    if let Ok(cwd) = std::env::current_dir() {
        tried.push(cwd.join(BUILT_INIT_PATH));
    }
    // A dynamically linked `vmrs-init` (e.g. from a plain `cargo build`) is skipped.
    tried
        .iter()
        .find(|p| p.is_file() && check_static_elf(p).is_ok())
        .cloned()
        .ok_or(GuestError::InitNotFound { tried })
}

/// Check that `path` is an x86-64 ELF executable without a `PT_INTERP` program header (i.e.
/// statically linked: the initramfs has no dynamic loader).
pub fn check_static_elf(path: &Path) -> Result<(), GuestError> {
    let bytes = std::fs::read(path).map_err(|source| GuestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if is_static_x86_64(&bytes) {
        Ok(())
    } else {
        Err(GuestError::InitNotStatic {
            path: path.to_path_buf(),
        })
    }
}

fn is_static_x86_64(b: &[u8]) -> bool {
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if b.get(..4) != Some(b"\x7fELF") || b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return false;
    }
    // e_machine EM_X86_64 = 62; e_type ET_EXEC = 2 or ET_DYN = 3 (static-pie).
    if u16_at(0x12) != Some(62) || !matches!(u16_at(0x10), Some(2 | 3)) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    for i in 0..phnum as usize {
        let Some(off) = i
            .checked_mul(phentsize as usize)
            .and_then(|x| x.checked_add(phoff))
        else {
            return false;
        };
        match u32_at(off) {
            Some(3) => return false, // PT_INTERP
            Some(_) => {}
            None => return false,
        }
    }
    true
}

/// Prepare the assets dir: download and extract the packages if needed, copy the init binary
/// and build the initramfs. Idempotent: returns quickly when the manifest matches.
pub async fn setup(opts: &SetupOptions) -> Result<GuestAssets, GuestError> {
    let mut opts = opts.clone();
    opts.dir = std::path::absolute(&opts.dir).map_err(io_err(&opts.dir))?;
    let opts = &opts;
    let init = find_init(opts.init.as_deref())?;
    let dir = opts.dir.clone();
    let init2 = init.clone();
    let (init_sha, _lock) = blocking(move || {
        check_static_elf(&init2)?;
        let lock = lock_dir(&dir)?;
        Ok((deb::sha256_file(&init2)?, lock))
    })
    .await?;

    if !opts.force {
        if let Ok(assets) = GuestAssets::load(&opts.dir) {
            let current = assets.manifest.initramfs_layout == INITRAMFS_LAYOUT
                && assets.manifest.files.get("vmrs-init") == Some(&init_sha);
            if current {
                opts.report(SetupProgress::UpToDate);
                return Ok(assets);
            }
            opts.report(SetupProgress::BuildingInitramfs);
            let assets = blocking(move || rebuild_initramfs(assets, &init)).await?;
            opts.report(SetupProgress::Done);
            return Ok(assets);
        }
    }
    full_setup(opts, &init).await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, GuestError> + Send + 'static,
) -> Result<T, GuestError> {
    tokio::task::spawn_blocking(f).await.map_err(GuestError::Task)?
}

/// An exclusive lock on `.<name>.lock` next to `dir`, held until dropped.
fn lock_dir(dir: &Path) -> Result<std::fs::File, GuestError> {
    let parent = parent_of(dir);
    std::fs::create_dir_all(&parent).map_err(|source| GuestError::Io {
        path: parent.clone(),
        source,
    })?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "assets".into());
    let path = parent.join(format!(".{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| GuestError::Io {
            path: path.clone(),
            source,
        })?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| GuestError::Io {
        path,
        source: e.into(),
    })?;
    Ok(file)
}

fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GuestError {
    let path = path.to_path_buf();
    move |source| GuestError::Io { path, source }
}

/// Copy `src` to `dest` atomically with mode 0755.
fn install_executable(src: &Path, dest: &Path) -> Result<(), GuestError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent_of(dest);
    let mut tmp = tempfile::Builder::new()
        .prefix(".install-")
        .tempfile_in(&dir)
        .map_err(io_err(&dir))?;
    let mut f = std::fs::File::open(src).map_err(io_err(src))?;
    std::io::copy(&mut f, tmp.as_file_mut()).map_err(io_err(dest))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o755))
        .map_err(io_err(dest))?;
    tmp.as_file().sync_all().map_err(io_err(dest))?;
    tmp.persist(dest).map_err(|e| GuestError::Io {
        path: dest.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), GuestError> {
    let path = dir.join("manifest.json");
    let json = serde_json::to_vec_pretty(manifest).map_err(|source| GuestError::BadManifest {
        path: path.clone(),
        source,
    })?;
    crate::fsutil::write_atomic_mode(&path, &json, 0o644).map_err(io_err(&path))
}

/// Copy the init in, rebuild the initramfs and update the manifest (assets dir in place).
fn rebuild_initramfs(assets: GuestAssets, init: &Path) -> Result<GuestAssets, GuestError> {
    install_executable(init, &assets.init)?;
    let report = build_initramfs_blocking(&assets.initramfs_spec(&assets.initramfs))?;
    let mut manifest = assets.manifest.clone();
    manifest.initramfs_layout = INITRAMFS_LAYOUT;
    manifest.modules = report.modules;
    manifest.init_source = init.to_path_buf();
    for name in ["vmrs-init", "initramfs.img"] {
        manifest
            .files
            .insert(name.into(), deb::sha256_file(&assets.dir.join(name))?);
    }
    write_manifest(&assets.dir, &manifest)?;
    GuestAssets::load(&assets.dir)
}

async fn full_setup(opts: &SetupOptions, init: &Path) -> Result<GuestAssets, GuestError> {
    let parent = parent_of(&opts.dir);
    let downloads = tempfile::Builder::new()
        .prefix(".vmrs-debs-")
        .tempdir_in(&parent)
        .map_err(io_err(&parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".vmrs-assets-staging-")
        .tempdir_in(&parent)
        .map_err(io_err(&parent))?;

    opts.report(SetupProgress::Downloading(vec![
        KERNEL_PACKAGE.into(),
        BUSYBOX_PACKAGE.into(),
    ]));
    let first = deb::apt_download(downloads.path(), &[KERNEL_PACKAGE, BUSYBOX_PACKAGE]).await?;
    let (meta_deb, busybox_deb) = (first[0].clone(), first[1].clone());
    let meta_deb2 = meta_deb.clone();
    let (meta_info, meta_deps) = blocking(move || deb::read_control(&meta_deb2)).await?;
    let image_pkg = meta_deps
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| GuestError::NoKernelDependency {
            package: KERNEL_PACKAGE.into(),
        })?;
    opts.report(SetupProgress::Downloading(vec![image_pkg.clone()]));
    let image_deb = deb::apt_download(downloads.path(), &[image_pkg.as_str()])
        .await?
        .remove(0);

    let out = staging.path().to_path_buf();
    let progress = opts.clone();
    let init = init.to_path_buf();
    let final_dir = opts.dir.clone();
    blocking(move || {
        let mut packages = vec![meta_info];
        let mut found = deb::Extracted::default();
        for deb_path in [&image_deb, &busybox_deb] {
            let (info, _) = deb::read_control(deb_path)?;
            progress.report(SetupProgress::Extracting(format!(
                "{} {}",
                info.name, info.version
            )));
            deb::extract_guest_files(deb_path, &out, &mut found)?;
            packages.push(info);
        }
        let kernel_version = found
            .kernel_version
            .ok_or(GuestError::MissingFromPackages { what: "kernel" })?;
        if !found.busybox {
            return Err(GuestError::MissingFromPackages { what: "busybox" });
        }
        if found.modules == 0 {
            return Err(GuestError::MissingFromPackages {
                what: "kernel modules",
            });
        }
        install_executable(&init, &out.join("vmrs-init"))?;
        progress.report(SetupProgress::BuildingInitramfs);
        let spec = InitramfsSpec::new(
            out.join("vmrs-init"),
            out.join("busybox"),
            out.join("modules").join(&kernel_version),
            &kernel_version,
            out.join("initramfs.img"),
        );
        let report = build_initramfs_blocking(&spec)?;
        let mut files = BTreeMap::new();
        for name in ["vmlinuz", "initramfs.img", "busybox", "vmrs-init"] {
            files.insert(name.to_string(), deb::sha256_file(&out.join(name))?);
        }
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            initramfs_layout: INITRAMFS_LAYOUT,
            kernel_version,
            packages,
            files,
            modules: report.modules,
            init_source: init,
        };
        write_manifest(&out, &manifest)?;
        // Swap the staging dir into place.
        let staged = staging.keep();
        let old = if final_dir.exists() {
            let old = parent_of(&final_dir).join(format!(
                ".vmrs-assets-old-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            std::fs::rename(&final_dir, &old).map_err(io_err(&final_dir))?;
            Some(old)
        } else {
            None
        };
        std::fs::rename(&staged, &final_dir).map_err(io_err(&final_dir))?;
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(())
    })
    .await?;
    drop(downloads);
    opts.report(SetupProgress::Done);
    GuestAssets::load(&opts.dir)
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn load_missing_dir_says_run_setup() {
        let dir = tempfile::tempdir().unwrap();
        let err = GuestAssets::load(dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, GuestError::NotSetUp { .. }));
        assert!(err.to_string().contains("vmrs setup"));
    }

    #[test]
    fn load_rejects_bad_manifest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("manifest.json"), b"{not json").unwrap();
        assert!(matches!(
            GuestAssets::load(dir.path()),
            Err(GuestError::BadManifest { .. })
        ));
    }

    #[test]
    fn static_elf_check() {
        // The test binary itself is dynamically linked.
        let exe = std::env::current_exe().unwrap();
        assert!(matches!(
            check_static_elf(&exe),
            Err(GuestError::InitNotStatic { .. })
        ));
        assert!(!is_static_x86_64(b"#!/bin/sh\n"));
    }

    #[test]
    fn explicit_init_must_exist() {
        assert!(matches!(
            find_init(Some(Path::new("/nonexistent/vmrs-init"))),
            Err(GuestError::InitNotFound { .. })
        ));
    }
}
