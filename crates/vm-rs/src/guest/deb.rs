//! Fetching Debian packages with `apt-get download` and extracting the few files we use.
//!
//! A `.deb` is an `ar` archive holding `debian-binary`, `control.tar.*` and `data.tar.*`
//! (compressed with xz, zstd or gzip, or not at all). We read the control file of the kernel
//! meta-package to learn which versioned image package it depends on, and from the data archives
//! we take only: `boot/vmlinuz-*` (the bzImage), `boot/config-*`, `lib/modules/<kver>/**/*.ko`
//! plus the `modules.builtin`/`modules.order` metadata, and `bin/busybox`. Archive entries are
//! untrusted: only regular files are taken, their paths must consist of plain components, and
//! the destination path is built by us from those components under the output directory, so no
//! entry can write outside it. Sizes are bounded.

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use super::GuestError;

/// Largest member of a data archive we extract.
const MAX_FILE: u64 = 256 * 1024 * 1024;
/// Largest control file we read.
const MAX_CONTROL: u64 = 1024 * 1024;

/// Name and version of a downloaded package, from its control file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackageInfo {
    /// `Package:`.
    pub name: String,
    /// `Version:`.
    pub version: String,
    /// The `.deb` file's sha256.
    pub sha256: String,
}

/// Run `apt-get download PKG...` in `dir` (argument vector, no shell). Returns the `.deb` paths
/// that appeared, matched by package name.
pub(crate) async fn apt_download(dir: &Path, packages: &[&str]) -> Result<Vec<PathBuf>, GuestError> {
    let output = tokio::process::Command::new("apt-get")
        .arg("download")
        .args(packages)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| GuestError::Spawn {
            program: "apt-get".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(GuestError::AptDownload {
            packages: packages.iter().map(|s| s.to_string()).collect(),
            status: output.status.code(),
            stderr: String::from_utf8_lossy(&output.stderr)
                .chars()
                .take(4000)
                .collect(),
        });
    }
    let mut found = Vec::new();
    for pkg in packages {
        let prefix = format!("{pkg}_");
        let mut hit = None;
        let rd = std::fs::read_dir(dir).map_err(|source| GuestError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for ent in rd.flatten() {
            let name = ent.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".deb") {
                hit = Some(ent.path());
            }
        }
        found.push(hit.ok_or_else(|| GuestError::MissingPackageFile {
            package: pkg.to_string(),
        })?);
    }
    Ok(found)
}

/// Open the member of an ar archive whose name starts with `prefix` and hand a decompressing
/// reader to `f`.
fn with_member<T>(
    deb: &Path,
    prefix: &str,
    f: impl FnOnce(&mut dyn Read) -> Result<T, GuestError>,
) -> Result<T, GuestError> {
    let bad = |reason: String| GuestError::BadPackage {
        path: deb.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(deb).map_err(|source| GuestError::Io {
        path: deb.to_path_buf(),
        source,
    })?;
    let mut ar = ar::Archive::new(io::BufReader::new(file));
    while let Some(entry) = ar.next_entry() {
        let entry = entry.map_err(|e| bad(format!("ar: {e}")))?;
        let ident = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        let ident = ident.trim_end_matches('/');
        let Some(suffix) = ident.strip_prefix(prefix) else {
            continue;
        };
        let mut reader: Box<dyn Read> = match suffix {
            ".tar" => Box::new(entry),
            ".tar.xz" => crate::host::codec::xz(entry),
            ".tar.gz" => Box::new(flate2::read::GzDecoder::new(entry)),
            ".tar.zst" => crate::host::codec::zstd(std::io::BufReader::new(entry))
                .map_err(|e| bad(format!("zstd: {e}")))?,
            other => return Err(bad(format!("unsupported compression {prefix}{other}"))),
        };
        return f(&mut reader);
    }
    Err(bad(format!("no {prefix}.tar* member")))
}

/// Read `Package`, `Version` and `Depends` from a `.deb`'s control file.
pub(crate) fn read_control(deb: &Path) -> Result<(PackageInfo, Vec<String>), GuestError> {
    let text = with_member(deb, "control", |r| {
        let mut tar = tar::Archive::new(r);
        let entries = tar.entries().map_err(|e| GuestError::BadPackage {
            path: deb.to_path_buf(),
            reason: format!("control tar: {e}"),
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| GuestError::BadPackage {
                path: deb.to_path_buf(),
                reason: format!("control tar: {e}"),
            })?;
            let is_control = entry
                .path()
                .map(|p| {
                    p.components()
                        .filter(|c| *c != Component::CurDir)
                        .eq([Component::Normal("control".as_ref())])
                })
                .unwrap_or(false);
            if is_control {
                let mut s = String::new();
                entry
                    .take(MAX_CONTROL)
                    .read_to_string(&mut s)
                    .map_err(|e| GuestError::BadPackage {
                        path: deb.to_path_buf(),
                        reason: format!("control file: {e}"),
                    })?;
                return Ok(s);
            }
        }
        Err(GuestError::BadPackage {
            path: deb.to_path_buf(),
            reason: "no control file".into(),
        })
    })?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_string())
    };
    let name = field("Package").ok_or_else(|| GuestError::BadPackage {
        path: deb.to_path_buf(),
        reason: "control file lacks Package".into(),
    })?;
    let version = field("Version").unwrap_or_default();
    let depends = field("Depends")
        .map(|d| {
            d.split(',')
                .filter_map(|alt| alt.split('|').next())
                .filter_map(|dep| dep.split_whitespace().next())
                .map(|s| s.split(':').next().unwrap_or(s).to_string())
                .collect()
        })
        .unwrap_or_default();
    let sha256 = sha256_file(deb)?;
    Ok((
        PackageInfo {
            name,
            version,
            sha256,
        },
        depends,
    ))
}

/// What [`extract_guest_files`] found.
#[derive(Debug, Default, Clone)]
pub(crate) struct Extracted {
    /// Kernel version (from `boot/vmlinuz-<kver>`).
    pub kernel_version: Option<String>,
    /// Number of module files written.
    pub modules: usize,
    /// Whether `bin/busybox` was found.
    pub busybox: bool,
}

/// Which of our outputs an archive path maps to.
fn classify(path: &[&str]) -> Option<(PathBuf, Option<String>)> {
    match path {
        ["boot", f] if f.starts_with("vmlinuz-") => {
            Some((PathBuf::from("vmlinuz"), Some(f["vmlinuz-".len()..].to_string())))
        }
        ["boot", f] if f.starts_with("config-") => Some((PathBuf::from("kernel-config"), None)),
        ["bin", "busybox"] => Some((PathBuf::from("busybox"), None)),
        ["lib", "modules", kver, rest @ ..] | ["usr", "lib", "modules", kver, rest @ ..] => {
            let file = rest.last()?;
            let wanted = file.ends_with(".ko")
                || matches!(
                    *file,
                    "modules.builtin" | "modules.order" | "modules.builtin.modinfo"
                );
            if !wanted {
                return None;
            }
            let mut p = PathBuf::from("modules");
            p.push(kver);
            for c in rest {
                p.push(c);
            }
            Some((p, None))
        }
        _ => None,
    }
}

/// Extract the files we use from a `.deb`'s data archive into `out`.
pub(crate) fn extract_guest_files(deb: &Path, out: &Path, found: &mut Extracted) -> Result<(), GuestError> {
    with_member(deb, "data", |r| {
        let bad = |e: io::Error| GuestError::BadPackage {
            path: deb.to_path_buf(),
            reason: format!("data tar: {e}"),
        };
        let mut tar = tar::Archive::new(r);
        for entry in tar.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry.path().map_err(bad)?.into_owned();
            let mut parts = Vec::new();
            let mut clean = true;
            for c in path.components() {
                match c {
                    Component::CurDir => {}
                    Component::Normal(s) => match s.to_str() {
                        Some(s) if !s.is_empty() => parts.push(s.to_string()),
                        _ => clean = false,
                    },
                    _ => clean = false,
                }
            }
            if !clean {
                continue;
            }
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            let Some((rel, kver)) = classify(&refs) else {
                continue;
            };
            let size = entry.header().size().map_err(bad)?;
            if size > MAX_FILE {
                return Err(GuestError::BadPackage {
                    path: deb.to_path_buf(),
                    reason: format!("{} is too large ({size} bytes)", path.display()),
                });
            }
            let dest = out.join(&rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|source| GuestError::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            let mut file = std::fs::File::create(&dest).map_err(|source| GuestError::Io {
                path: dest.clone(),
                source,
            })?;
            io::copy(&mut (&mut entry).take(MAX_FILE), &mut file).map_err(|source| GuestError::Io {
                path: dest.clone(),
                source,
            })?;
            // Keep the package's execute bits (busybox), nothing more permissive than 0755.
            let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|source| GuestError::Io {
                        path: dest.clone(),
                        source,
                    })?;
            }
            if let Some(kver) = kver {
                found.kernel_version = Some(kver);
            }
            if rel.starts_with("modules") && rel.extension().is_some_and(|e| e == "ko") {
                found.modules += 1;
            }
            if rel == Path::new("busybox") {
                found.busybox = true;
            }
        }
        Ok(())
    })
}

/// Hex sha256 of a file. Blocking.
pub(crate) fn sha256_file(path: &Path) -> Result<String, GuestError> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(|source| GuestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut hasher = sha2::Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(|source| GuestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn classify_picks_only_our_files() {
        assert_eq!(
            classify(&["boot", "vmlinuz-6.1.0-56-cloud-amd64"]),
            Some((PathBuf::from("vmlinuz"), Some("6.1.0-56-cloud-amd64".into())))
        );
        assert_eq!(
            classify(&["lib", "modules", "6.1", "kernel", "drivers", "virtio_mmio.ko"]),
            Some((PathBuf::from("modules/6.1/kernel/drivers/virtio_mmio.ko"), None))
        );
        assert_eq!(
            classify(&["usr", "lib", "modules", "6.1", "modules.builtin"]),
            Some((PathBuf::from("modules/6.1/modules.builtin"), None))
        );
        assert_eq!(
            classify(&["bin", "busybox"]),
            Some((PathBuf::from("busybox"), None))
        );
        assert_eq!(classify(&["usr", "share", "doc", "x"]), None);
        assert_eq!(classify(&["lib", "modules", "6.1", "modules.dep"]), None);
        assert_eq!(classify(&["etc", "passwd"]), None);
    }
}
