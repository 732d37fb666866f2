//! Disk, seed, key and download commands:
//!
//! ```text
//! vmrs disk create PATH --size 10G [--format raw|qcow2]
//! vmrs disk clone BASE TARGET [--overlay [--base-format raw|qcow2]] [--reflink auto|always|never]
//! vmrs disk info PATH
//! vmrs disk resize PATH --size 20G
//! vmrs disk catalog                      # known base images (built-in + image-catalog.json)
//! vmrs disk pull NAME                    # download + verify into the cache
//! vmrs disk prepare NAME TARGET [--mode overlay|clone] [--size 20G]
//! vmrs seed create OUT --hostname H [--ssh-key FILE].. [--user NAME].. [--net SPEC]..
//!                      [--runcmd JSON_ARGV].. [--write-file SRC:DEST[:MODE]].. [--mount SPEC]..
//! vmrs keygen [DIR]
//! vmrs download URL DEST --sha256 HEX
//! ```
//!
//! Every command takes `--json` for scripts; progress bars are drawn only on a terminal.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;
use vm_rs::config::DiskFormat;
use vm_rs::setup::{self, PrepareMode, PrepareOptions};
use vm_rs::storage::{self, ClonePolicy, DownloadOptions, ImageCatalog, Progress};
use vm_rs::storage::{SeedConfig, SeedFile, SeedMount, SeedNic, SeedUser};

/// Image format on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// Raw image.
    Raw,
    /// qcow2 image.
    Qcow2,
}

impl From<FormatArg> for DiskFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Raw => DiskFormat::Raw,
            FormatArg::Qcow2 => DiskFormat::Qcow2,
        }
    }
}

/// Reflink policy on the command line.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum ReflinkArg {
    /// Reflink when possible, else sparse copy.
    #[default]
    Auto,
    /// Fail unless the filesystem can reflink.
    Always,
    /// Always make a sparse copy.
    Never,
}

/// `vmrs disk ...`
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Create an empty disk (sparse raw, or qcow2).
    Create {
        /// Image to create (must not exist).
        path: PathBuf,
        /// Size, e.g. 10G, 512M.
        #[arg(long, short)]
        size: String,
        /// Image format.
        #[arg(long, short, value_enum, default_value = "raw")]
        format: FormatArg,
        /// Print a JSON result.
        #[arg(long)]
        json: bool,
    },
    /// Copy-on-write clone of a base image (reflink or sparse copy), or a qcow2 overlay.
    Clone {
        /// Base image (never modified).
        base: PathBuf,
        /// New image (must not exist).
        target: PathBuf,
        /// Make a qcow2 overlay backed by BASE instead of a copy.
        #[arg(long)]
        overlay: bool,
        /// Format of BASE, for --overlay (default: probed with qemu-img).
        #[arg(long, value_enum)]
        base_format: Option<FormatArg>,
        /// Reflink policy for copies.
        #[arg(long, value_enum, default_value = "auto")]
        reflink: ReflinkArg,
        /// Print a JSON result.
        #[arg(long)]
        json: bool,
    },
    /// Show an image's format, size and backing file.
    Info {
        /// The image.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow a disk (raw or qcow2, probed).
    Resize {
        /// The image.
        path: PathBuf,
        /// New size, e.g. 20G (never smaller than now).
        #[arg(long, short)]
        size: String,
    },
    /// List known base images.
    Catalog {
        /// Catalog file to merge (default $VMRS_HOME/image-catalog.json).
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a catalog image (or kernel/initrd) into the cache and verify its SHA-256.
    Pull {
        /// Catalog name, e.g. ubuntu-24.04.
        name: String,
        /// Catalog file to merge.
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Cache directory (default $VMRS_HOME/disk-images).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Print a JSON result.
        #[arg(long)]
        json: bool,
    },
    /// Pull a catalog image and make a VM disk from it.
    Prepare {
        /// Catalog name.
        name: String,
        /// VM disk to create.
        target: PathBuf,
        /// Overlay (qcow2 backed by the cached image) or a full clone.
        #[arg(long, value_enum, default_value = "overlay")]
        mode: ModeArg,
        /// Grow the VM disk to this size.
        #[arg(long, short)]
        size: Option<String>,
        /// Catalog file to merge.
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Cache directory.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Print a JSON result.
        #[arg(long)]
        json: bool,
    },
}

/// `prepare --mode`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// qcow2 overlay.
    Overlay,
    /// Reflink/sparse clone.
    Clone,
}

/// `vmrs seed ...`
#[derive(Debug, Subcommand)]
pub enum SeedCommand {
    /// Write a cloud-init NoCloud seed image (vfat, label cidata).
    Create(SeedArgs),
}

/// Arguments of `vmrs seed create`.
#[derive(Debug, Args)]
pub struct SeedArgs {
    /// Seed image to write (replaced if it exists).
    pub output: PathBuf,
    /// Guest hostname.
    #[arg(long)]
    pub hostname: String,
    /// cloud-init instance id (default iid-HOSTNAME-<config hash>).
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Public key file for the default user (repeatable).
    #[arg(long = "ssh-key")]
    pub ssh_keys: Vec<PathBuf>,
    /// Extra user with passwordless sudo and the --ssh-key keys (repeatable).
    #[arg(long = "user")]
    pub users: Vec<String>,
    /// Interface: `NAME=dhcp` or `NAME=ADDR/PREFIX[,ADDR/PREFIX][,gw=IP][,dns=IP][,mac=MAC]`.
    #[arg(long = "net")]
    pub nets: Vec<String>,
    /// Command to run at first boot, as a JSON argv array: '["touch","/ok"]' (repeatable).
    #[arg(long = "runcmd")]
    pub runcmds: Vec<String>,
    /// Host file to write in the guest: `SRC:DEST[:MODE]` (MODE octal, repeatable).
    #[arg(long = "write-file")]
    pub write_files: Vec<String>,
    /// fstab entry: `SOURCE:MOUNTPOINT:FSTYPE[:OPTIONS]` (repeatable).
    #[arg(long = "mount")]
    pub mounts: Vec<String>,
    /// Print the rendered documents as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `vmrs keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Directory for id_ed25519 and id_ed25519.pub (default $VMRS_HOME/ssh).
    pub dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `vmrs download`.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// HTTP(S) URL.
    pub url: String,
    /// Destination file.
    pub dest: PathBuf,
    /// Expected SHA-256 (hex).
    #[arg(long)]
    pub sha256: String,
    /// Retries after a dropped connection (each resumes).
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Print a JSON result.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> Result<u64> {
    storage::parse_size(s).with_context(|| format!("--size {s:?}"))
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A progress callback: a bar on a terminal (unless `quiet`), nothing otherwise.
fn progress_bar(quiet: bool, what: &str) -> (Option<ProgressBar>, impl FnMut(Progress) + Send) {
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_message(what.to_string());
        b
    });
    let b2 = bar.clone();
    (bar, move |p: Progress| {
        if let Some(b) = &b2 {
            if let Some(t) = p.total {
                b.set_length(t);
            }
            b.set_position(p.downloaded);
        }
    })
}

fn load_catalog(path: Option<PathBuf>) -> Result<ImageCatalog> {
    let path = path.unwrap_or_else(ImageCatalog::default_user_file);
    ImageCatalog::load(&path).with_context(|| format!("load catalog {}", path.display()))
}

/// Run `vmrs disk ...`.
pub async fn run_disk(cmd: DiskCommand) -> Result<()> {
    match cmd {
        DiskCommand::Create {
            path,
            size,
            format,
            json,
        } => {
            let bytes = parse_size(&size)?;
            storage::create_disk(&path, bytes, format.into()).await?;
            if json {
                print_json(&json!({"path": path, "size": bytes, "format": DiskFormat::from(format)}))?;
            } else {
                println!("{}", path.display());
            }
        }
        DiskCommand::Clone {
            base,
            target,
            overlay,
            base_format,
            reflink,
            json,
        } => {
            let method = if overlay {
                let fmt = match base_format {
                    Some(f) => f.into(),
                    None => storage::probe_disk(&base).await?.format,
                };
                storage::create_overlay(&base, fmt, &target).await?;
                "qcow2-overlay".to_string()
            } else {
                let policy = match reflink {
                    ReflinkArg::Auto => ClonePolicy::Auto,
                    ReflinkArg::Always => ClonePolicy::ReflinkOnly,
                    ReflinkArg::Never => ClonePolicy::CopyOnly,
                };
                storage::clone_disk_with(&base, &target, policy)
                    .await?
                    .to_string()
            };
            if json {
                print_json(&json!({"base": base, "target": target, "method": method}))?;
            } else {
                println!("{} ({method})", target.display());
            }
        }
        DiskCommand::Info { path, json } => {
            let info = storage::image_info(&path).await?;
            if json {
                print_json(&serde_json::to_value(&info)?)?;
            } else {
                println!("format:       {}", info.format);
                println!(
                    "virtual size: {} ({} bytes)",
                    storage::format_size(info.virtual_size),
                    info.virtual_size
                );
                if let Some(a) = info.actual_size {
                    println!("allocated:    {a} bytes");
                }
                if let Some(b) = &info.backing_filename {
                    println!("backing file: {b}");
                }
            }
        }
        DiskCommand::Resize { path, size } => {
            let bytes = parse_size(&size)?;
            let fmt = storage::probe_disk(&path).await?.format;
            storage::grow_disk(&path, fmt, bytes).await?;
        }
        DiskCommand::Catalog { catalog, json } => {
            let cat = load_catalog(catalog)?;
            if json {
                print_json(&serde_json::to_value(cat.entries())?)?;
            } else {
                println!("{:<22} {:<7} {:<7} DESCRIPTION", "NAME", "KIND", "FORMAT");
                for e in cat.entries() {
                    println!(
                        "{:<22} {:<7} {:<7} {}",
                        e.name,
                        e.kind,
                        e.format,
                        e.description.as_deref().unwrap_or(&e.url)
                    );
                }
            }
        }
        DiskCommand::Pull {
            name,
            catalog,
            cache_dir,
            json,
        } => {
            let mut opts = PrepareOptions {
                catalog: Some(load_catalog(catalog)?),
                ..PrepareOptions::default()
            };
            if let Some(c) = cache_dir {
                opts.cache_dir = c;
            }
            let (bar, mut cb) = progress_bar(json, &name);
            let out = setup::pull_image(&name, &opts, &mut cb).await;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let out = out?;
            if json {
                print_json(&json!({
                    "name": out.entry.name,
                    "kind": out.entry.kind,
                    "path": out.path,
                    "sha256": out.sha256,
                    "cached": out.cached,
                }))?;
            } else {
                println!("{} sha256:{}", out.path.display(), out.sha256);
            }
        }
        DiskCommand::Prepare {
            name,
            target,
            mode,
            size,
            catalog,
            cache_dir,
            json,
        } => {
            let mut opts = PrepareOptions {
                catalog: Some(load_catalog(catalog)?),
                mode: match mode {
                    ModeArg::Overlay => PrepareMode::Overlay,
                    ModeArg::Clone => PrepareMode::Clone,
                },
                size: size.as_deref().map(parse_size).transpose()?,
                ..PrepareOptions::default()
            };
            if let Some(c) = cache_dir {
                opts.cache_dir = c;
            }
            let (bar, mut cb) = progress_bar(json, &name);
            let out = setup::prepare_image(&name, &target, &opts, &mut cb).await?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if json {
                print_json(&serde_json::to_value(&out)?)?;
            } else {
                println!("{}", out.disk.path.display());
            }
        }
    }
    Ok(())
}

fn read_keys(paths: &[PathBuf]) -> Result<Vec<String>> {
    paths
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .with_context(|| format!("read {}", p.display()))
                .map(|s| s.trim().to_string())
        })
        .collect()
}

fn parse_net(spec: &str) -> Result<SeedNic> {
    let (name, rest) = spec
        .split_once('=')
        .with_context(|| format!("--net {spec:?}: expected NAME=dhcp or NAME=ADDR/PREFIX,..."))?;
    let mut nic = SeedNic {
        name: name.to_string(),
        ..SeedNic::default()
    };
    for part in rest.split(',') {
        match part.split_once('=') {
            None if part == "dhcp" || part == "dhcp4" => nic.dhcp4 = true,
            None => nic.addresses.push(part.to_string()),
            Some(("gw", v)) => nic.gateway = Some(v.parse().with_context(|| format!("gw {v:?}"))?),
            Some(("dns", v)) => nic
                .nameservers
                .push(v.parse().with_context(|| format!("dns {v:?}"))?),
            Some(("mac", v)) => nic.mac = Some(v.to_string()),
            Some((k, _)) => bail!("--net {spec:?}: unknown option {k:?}"),
        }
    }
    Ok(nic)
}

/// Build a [`SeedConfig`] from `vmrs seed create` arguments.
pub fn seed_config(args: &SeedArgs) -> Result<SeedConfig> {
    let keys = read_keys(&args.ssh_keys)?;
    let mut cfg = SeedConfig::new(&args.hostname);
    cfg.instance_id = args.instance_id.clone();
    cfg.ssh_authorized_keys = keys.clone();
    cfg.users = args
        .users
        .iter()
        .map(|u| SeedUser::new(u, keys.clone()))
        .collect();
    cfg.network = args.nets.iter().map(|s| parse_net(s)).collect::<Result<_>>()?;
    for r in &args.runcmds {
        let argv: Vec<String> = serde_json::from_str(r)
            .with_context(|| format!("--runcmd {r:?}: expected a JSON array of strings"))?;
        cfg.runcmd.push(argv);
    }
    for w in &args.write_files {
        let mut it = w.splitn(3, ':');
        let (src, dest) = match (it.next(), it.next()) {
            (Some(s), Some(d)) => (s, d),
            _ => bail!("--write-file {w:?}: expected SRC:DEST[:MODE]"),
        };
        let permissions = it
            .next()
            .map(|m| u32::from_str_radix(m, 8).with_context(|| format!("mode {m:?}")))
            .transpose()?;
        cfg.write_files.push(SeedFile {
            path: dest.to_string(),
            content: std::fs::read(src).with_context(|| format!("read {src}"))?,
            permissions,
            owner: None,
        });
    }
    for m in &args.mounts {
        let parts: Vec<&str> = m.splitn(4, ':').collect();
        if parts.len() < 3 {
            bail!("--mount {m:?}: expected SOURCE:MOUNTPOINT:FSTYPE[:OPTIONS]");
        }
        cfg.mounts.push(SeedMount {
            source: parts[0].to_string(),
            mount_point: parts[1].to_string(),
            fstype: parts[2].to_string(),
            options: parts.get(3).unwrap_or(&"defaults,nofail").to_string(),
        });
    }
    Ok(cfg)
}

/// Run `vmrs seed ...`.
pub async fn run_seed(cmd: SeedCommand) -> Result<()> {
    match cmd {
        SeedCommand::Create(args) => {
            let cfg = seed_config(&args)?;
            let files = storage::write_seed_image(&args.output, &cfg).await?;
            if args.json {
                print_json(&json!({
                    "path": args.output,
                    "label": storage::seed::SEED_LABEL,
                    "meta_data": files.meta_data,
                    "user_data": files.user_data,
                    "network_config": files.network_config,
                }))?;
            } else {
                println!("{}", args.output.display());
            }
        }
    }
    Ok(())
}

/// Run `vmrs keygen`.
pub async fn run_keygen(args: KeygenArgs) -> Result<()> {
    let dir = args.dir.unwrap_or_else(|| vm_rs::paths::data_dir().join("ssh"));
    let pair = setup::generate_ssh_key(&dir).await?;
    if args.json {
        print_json(&serde_json::to_value(&pair)?)?;
    } else {
        println!("{}", pair.public_openssh);
    }
    Ok(())
}

/// Run `vmrs download`.
pub async fn run_download(args: DownloadArgs) -> Result<()> {
    let opts = DownloadOptions {
        retries: args.retries,
        ..DownloadOptions::default()
    };
    let (bar, mut cb) = progress_bar(args.json, "download");
    let out = storage::download_verified(&args.url, &args.dest, &args.sha256, &opts, &mut cb).await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let out = out?;
    if args.json {
        print_json(&serde_json::to_value(&out)?)?;
    } else {
        println!("{} sha256:{}", out.path.display(), out.sha256);
    }
    Ok(())
}
