//! Builds OCI image layouts offline (layers written with the `tar` crate), to push to the
//! test registry with skopeo or to feed the unpacker directly.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// Layer compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

/// A finished layer blob.
#[derive(Clone, Debug)]
pub struct Layer {
    pub blob: Vec<u8>,
    pub media_type: &'static str,
    pub diff_id: String,
    pub digest: String,
}

pub fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Writes tar entries; `finish` compresses.
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
    mtime: u64,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
            mtime: 1_600_000_000,
        }
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(self.mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = self.header(tar::EntryType::Directory, mode, 0);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(self, path: &str, content: &[u8], mode: u32) -> Self {
        self.file_owned(path, content, mode, 0, 0)
    }

    pub fn file_owned(mut self, path: &str, content: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = self.header(tar::EntryType::Regular, mode, content.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.b.append_data(&mut h, path, content).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = self.header(tar::EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = self.header(tar::EntryType::Link, 0o644, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn whiteout(self, dir: &str, name: &str) -> Self {
        let p = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&p, b"", 0o644)
    }

    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// An entry whose name/link bytes are written raw into the header (no validation), for
    /// hostile layers.
    pub fn raw(mut self, kind: tar::EntryType, name: &[u8], link: &[u8], mode: u32, content: &[u8]) -> Self {
        let mut h = self.header(kind, mode, content.len() as u64);
        {
            let old = h.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name);
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_cksum();
        self.b.append(&h, content).unwrap();
        self
    }

    /// A device node entry.
    pub fn device(mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
        let mut h = self.header(kind, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn tar(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }

    pub fn finish(self, comp: Comp) -> Layer {
        layer_from_tar(self.tar(), comp)
    }
}

pub fn compress(tar: &[u8], comp: Comp) -> Vec<u8> {
    match comp {
        Comp::None => tar.to_vec(),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Comp::Zstd => zstd::stream::encode_all(tar, 3).unwrap(),
    }
}

pub fn layer_from_tar(tar: Vec<u8>, comp: Comp) -> Layer {
    let blob = compress(&tar, comp);
    Layer {
        media_type: match comp {
            Comp::None => "application/vnd.oci.image.layer.v1.tar",
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        },
        diff_id: sha(&tar),
        digest: sha(&blob),
        blob,
    }
}

/// A busybox rootfs layer: /bin/busybox plus applet symlinks and a few files.
pub fn busybox_layer(comp: Comp) -> (Layer, Vec<u8>) {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
    let mut b = LayerBuilder::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("tmp", 0o1777)
        .file("bin/busybox", &busybox, 0o755);
    for applet in ["sh", "ls", "cat", "echo", "mkdir"] {
        b = b.symlink(&format!("bin/{applet}"), "busybox");
    }
    b = b.file("etc/hostname", b"vmrs-test\n", 0o644).file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    );
    (b.finish(comp), busybox)
}

fn put_blob(layout: &Path, bytes: &[u8]) -> String {
    let d = sha(bytes);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&d[7..]), bytes).unwrap();
    d
}

/// Writes one image (config + layers + manifest) into `layout`; returns the manifest
/// descriptor (JSON) for an index.
pub fn write_image(
    layout: &Path,
    layers: &[Layer],
    run_config: serde_json::Value,
    os: &str,
    arch: &str,
) -> serde_json::Value {
    let config = serde_json::json!({
        "architecture": arch,
        "os": os,
        "created": "2024-05-01T12:00:00Z",
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = put_blob(layout, &config_bytes);
    for l in layers {
        put_blob(layout, &l.blob);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
        "layers": layers.iter().map(|l| serde_json::json!({"mediaType": l.media_type, "digest": l.digest, "size": l.blob.len()})).collect::<Vec<_>>(),
    });
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let md = put_blob(layout, &mbytes);
    serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md,
        "size": mbytes.len(),
        "platform": {"os": os, "architecture": arch},
    })
}

/// Writes `index.json` of the layout. With `nested_index`, the tag points at an image index
/// blob listing `manifests` (multi-platform); else the tag points at the single manifest.
pub fn write_layout_index(
    layout: &Path,
    tag: &str,
    manifests: Vec<serde_json::Value>,
    nested_index: bool,
) -> String {
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let entry = if nested_index {
        let idx = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let bytes = serde_json::to_vec(&idx).unwrap();
        let d = put_blob(layout, &bytes);
        serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": bytes.len()})
    } else {
        let mut m = manifests.into_iter().next().unwrap();
        m.as_object_mut().unwrap().remove("platform");
        m
    };
    let digest = entry["digest"].as_str().unwrap().to_owned();
    let mut entry = entry;
    entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let top = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [entry]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    digest
}

/// One-image layout: writes it and returns the manifest digest.
pub fn single_image_layout(
    layout: &Path,
    tag: &str,
    layers: &[Layer],
    run_config: serde_json::Value,
) -> String {
    let m = write_image(layout, layers, run_config, "linux", "amd64");
    write_layout_index(layout, tag, vec![m], false)
}
