//! Image commands: pull, images, rmi, image inspect/gc/unpack.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use vm_rs::oci::{Credentials, Digest, ImageStore, PullOptions, PullProgress, RegistryTls, UnpackOptions};

/// `vmrs pull`
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference (`alpine`, `alpine:3.20`, `ghcr.io/o/r:tag`, `host:5000/x@sha256:…`).
    pub reference: String,
    /// Platform to pick from a multi-platform image (default: this host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
    /// Registry (`host:port`) to reach over plain HTTP (loopback registries always are).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure: Vec<String>,
    /// Reach registry HOST over HTTPS (also on loopback) trusting the CA certificates in the
    /// PEM file besides the system roots (repeatable).
    #[arg(long = "registry-ca", value_name = "HOST=PEM")]
    pub registry_ca: Vec<String>,
    /// User name for the registry (default: from ~/.docker/config.json, else anonymous).
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the password (or token) for --username from stdin.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Blobs downloaded at once.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// No progress output; print only the manifest digest.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `vmrs images`
#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `vmrs rmi`
#[derive(Debug, Args)]
pub struct RmiArgs {
    /// References (or manifest digest prefixes) to remove.
    #[arg(required_unless_present = "prune")]
    pub references: Vec<String>,
    /// Then delete every blob no image needs (like `vmrs image gc`). Root-filesystem caches
    /// no stored image or VM uses are deleted either way.
    #[arg(long)]
    pub prune: bool,
}

/// `vmrs image …`
#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Pull an image (same as `vmrs pull`).
    Pull(PullArgs),
    /// List images (same as `vmrs images`).
    #[command(alias = "ls")]
    List(ImagesArgs),
    /// Show an image's record, manifest and config as JSON.
    Inspect {
        /// Reference or manifest digest prefix.
        reference: String,
    },
    /// Remove images (same as `vmrs rmi`).
    Rm(RmiArgs),
    /// Delete blobs no image needs, and abandoned partial downloads.
    #[command(alias = "prune")]
    Gc,
    /// Unpack an image's layers into a directory.
    Unpack {
        /// Reference or manifest digest prefix.
        reference: String,
        /// Target directory (created if missing).
        target: PathBuf,
        /// Keep setuid/setgid bits.
        #[arg(long)]
        allow_setuid: bool,
        /// Create device nodes (root only).
        #[arg(long)]
        allow_devices: bool,
        /// Stop after writing this many MiB of file content.
        #[arg(long, value_name = "MIB")]
        max_size: Option<u64>,
    },
}

pub(crate) async fn store() -> anyhow::Result<ImageStore> {
    ImageStore::open_default()
        .await
        .context("cannot open the image store")
}

/// Per-blob progress bars on stderr (hidden when stderr is not a terminal or with --quiet).
fn progress(quiet: bool) -> vm_rs::oci::pull::ProgressFn {
    let multi = MultiProgress::with_draw_target(if quiet || !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let style = ProgressStyle::with_template("{prefix:.bold} {bar:30} {bytes:>10}/{total_bytes:10} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bars: Mutex<HashMap<Digest, ProgressBar>> = Mutex::new(HashMap::new());
    Arc::new(move |ev: &PullProgress| {
        let Ok(mut bars) = bars.lock() else { return };
        match ev {
            PullProgress::Resolved { blobs, .. } => {
                for (d, size) in blobs {
                    bars.entry(d.clone()).or_insert_with(|| {
                        let b = multi.add(ProgressBar::new(*size));
                        b.set_style(style.clone());
                        b.set_prefix(d.short().to_owned());
                        b.set_message("waiting");
                        b
                    });
                }
            }
            PullProgress::Started { digest, offset, .. } => {
                if let Some(b) = bars.get(digest) {
                    b.set_position(*offset);
                    b.set_message(if *offset > 0 { "resuming" } else { "downloading" });
                }
            }
            PullProgress::Progress { digest, done, .. } => {
                if let Some(b) = bars.get(digest) {
                    b.set_position(*done);
                }
            }
            PullProgress::Done { digest, cached } => {
                if let Some(b) = bars.get(digest) {
                    b.finish_with_message(if *cached { "already stored" } else { "verified" });
                }
            }
            _ => {}
        }
    })
}

/// `vmrs pull`
pub async fn pull(a: PullArgs) -> anyhow::Result<i32> {
    let store = store().await?;
    let credentials = match (&a.username, a.password_stdin) {
        (Some(u), true) => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("cannot read the password from stdin")?;
            Some(Credentials::Basic {
                username: u.clone(),
                password: password.trim_end_matches(['\n', '\r']).to_owned(),
            })
        }
        _ => None,
    };
    let platform = match &a.platform {
        Some(p) => Some(
            p.parse()
                .map_err(|e| crate::exit::CliError::Invalid(format!("{e}")))?,
        ),
        None => None,
    };
    let mut registry_tls: Vec<RegistryTls> = Vec::new();
    for spec in &a.registry_ca {
        let Some((host, pem)) = spec
            .split_once('=')
            .filter(|(h, p)| !h.is_empty() && !p.is_empty())
        else {
            return Err(crate::exit::CliError::Invalid(format!(
                "--registry-ca {spec:?}: expected HOST=PEM-FILE"
            ))
            .into());
        };
        match registry_tls.iter_mut().find(|t| t.registry == host) {
            Some(t) => t.ca_certificates.push(pem.into()),
            None => registry_tls.push(RegistryTls::with_ca(host, pem)),
        }
    }
    let opts = PullOptions {
        platform,
        credentials,
        insecure_registries: a.insecure,
        registry_tls,
        max_concurrent_downloads: a.jobs.max(1),
        progress: Some(progress(a.quiet)),
        ..PullOptions::default()
    };
    let pulled = store.pull(&a.reference, &opts).await?;
    if a.quiet {
        println!("{}", pulled.record.manifest);
    } else {
        println!(
            "{}: {} ({}, {} downloaded)",
            pulled.record.reference,
            pulled.record.manifest,
            human(pulled.record.size),
            human(pulled.downloaded_bytes)
        );
    }
    Ok(0)
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `vmrs images`
pub async fn images(a: ImagesArgs) -> anyhow::Result<i32> {
    let list = store().await?.list().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    let width = list
        .iter()
        .map(|i| i.record.reference.len())
        .max()
        .unwrap_or(0)
        .max(9);
    println!(
        "{:<width$}  {:<12}  {:<14}  {:>9}  CREATED",
        "REFERENCE", "DIGEST", "PLATFORM", "SIZE"
    );
    for i in list {
        let platform = i
            .record
            .platform
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        println!(
            "{:<width$}  {:<12}  {:<14}  {:>9}  {}",
            i.record.reference,
            i.record.manifest.short(),
            platform,
            human(i.record.size),
            i.created.as_deref().unwrap_or("-")
        );
    }
    Ok(0)
}

/// `vmrs rmi`
pub async fn rmi(a: RmiArgs) -> anyhow::Result<i32> {
    let store = store().await?;
    for r in &a.references {
        let removed = store.remove(r).await?;
        println!("removed {}", removed.reference);
    }
    if a.prune {
        gc_with(&store).await?;
    } else {
        gc_caches(&store).await?;
    }
    Ok(0)
}

/// Delete the blobs no image needs and the root caches nothing uses.
pub(crate) async fn gc_with(store: &ImageStore) -> anyhow::Result<()> {
    let report = store.gc().await?;
    println!(
        "deleted {} blobs and {} partial downloads, freed {}",
        report.removed_blobs,
        report.removed_partials,
        human(report.freed_bytes)
    );
    gc_caches(store).await
}

/// Delete the root-filesystem caches no stored image or VM uses.
async fn gc_caches(store: &ImageStore) -> anyhow::Result<()> {
    let removed = vm_rs::rootfs::gc_caches(&vm_rs::paths::data_dir(), store)
        .await
        .context("cannot clean the root filesystem caches")?;
    if !removed.is_empty() {
        println!(
            "deleted {} root filesystem caches, freed {}",
            removed.len(),
            human(removed.iter().map(|e| e.bytes).sum())
        );
    }
    Ok(())
}

/// `vmrs image …`
pub async fn image(a: ImageArgs) -> anyhow::Result<i32> {
    match a.command {
        ImageCommand::Pull(p) => pull(p).await,
        ImageCommand::List(l) => images(l).await,
        ImageCommand::Rm(r) => rmi(r).await,
        ImageCommand::Gc => {
            gc_with(&store().await?).await?;
            Ok(0)
        }
        ImageCommand::Inspect { reference } => {
            let img = store().await?.image(&reference).await?;
            let out = serde_json::json!({
                "reference": img.record.reference,
                "digest": img.record.manifest,
                "index": img.record.index,
                "platform": img.record.platform,
                "size": img.record.size,
                "pulled_at": img.record.pulled_at,
                "manifest": {
                    "mediaType": img.manifest.media_type,
                    "config": img.manifest.config,
                    "layers": img.manifest.layers,
                },
                "config": img.config,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(0)
        }
        ImageCommand::Unpack {
            reference,
            target,
            allow_setuid,
            allow_devices,
            max_size,
        } => {
            let mut opts = UnpackOptions {
                allow_setuid,
                allow_devices,
                ..UnpackOptions::default()
            };
            if let Some(mib) = max_size {
                opts.max_bytes = mib.saturating_mul(1 << 20);
            }
            let report = store().await?.unpack(&reference, &target, &opts).await?;
            for s in &report.skipped {
                eprintln!("skipped {} ({:?})", s.path, s.reason);
            }
            println!(
                "unpacked {} layers, {} entries, {} into {}",
                report.layers,
                report.entries,
                human(report.bytes),
                target.display()
            );
            Ok(0)
        }
    }
}
