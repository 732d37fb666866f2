//! Kernel module metadata and dependency resolution.
//!
//! A loadable module (`.ko`) is an ELF relocatable object whose `.modinfo` section holds
//! NUL-separated `key=value` strings; `name=` is the module's name and `depends=` a
//! comma-separated list of the modules it needs loaded first. [`parse_modinfo`] reads those from
//! the ELF section table with every offset bounds-checked (the files come from a downloaded
//! package and are treated as untrusted). [`ModuleIndex`] scans a `lib/modules/<kver>` tree and
//! [`ModuleIndex::resolve`] turns a wanted set into a load order with dependencies first.
//!
//! Names are normalised the way the kernel does: `-` and `_` are the same character. Modules
//! listed in `modules.builtin` are compiled into the kernel and need no loading.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::GuestError;

/// Largest `.ko` file we read (the largest in Debian's cloud kernel is a few MiB).
const MAX_MODULE_SIZE: u64 = 64 * 1024 * 1024;

/// What a module's `.modinfo` says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModInfo {
    /// The module's name (`name=`), normalised to underscores; empty if absent.
    pub name: String,
    /// Modules this one depends on (`depends=`), normalised.
    pub depends: Vec<String>,
}

/// Why a `.ko` file's modinfo could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModInfoError {
    /// Not a 64-bit little-endian ELF file.
    #[error("not a 64-bit little-endian ELF object")]
    NotElf64,
    /// A header or section lies outside the file.
    #[error("ELF {what} out of bounds")]
    OutOfBounds {
        /// Which structure was out of bounds.
        what: &'static str,
    },
    /// There is no `.modinfo` section.
    #[error("no .modinfo section")]
    NoModinfo,
}

/// Normalise a module name: `-` → `_`.
pub fn normalize_name(name: &str) -> String {
    name.replace('-', "_")
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Parse the `.modinfo` section of an ELF64 little-endian kernel module.
pub fn parse_modinfo(elf: &[u8]) -> Result<ModInfo, ModInfoError> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(ModInfoError::NotElf64);
    }
    let oob = |what| ModInfoError::OutOfBounds { what };
    let shoff = u64_at(elf, 0x28).ok_or(oob("header"))?;
    let shentsize = u16_at(elf, 0x3a).ok_or(oob("header"))? as usize;
    let shnum = u16_at(elf, 0x3c).ok_or(oob("header"))? as usize;
    let shstrndx = u16_at(elf, 0x3e).ok_or(oob("header"))? as usize;
    if shentsize < 64 {
        return Err(oob("section header size"));
    }
    let shoff = usize::try_from(shoff).map_err(|_| oob("section table"))?;
    let section = |i: usize| -> Result<(u32, usize, usize), ModInfoError> {
        let base = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or(oob("section header"))?;
        let name = u32_at(elf, base).ok_or(oob("section header"))?;
        let offset = u64_at(elf, base + 24).ok_or(oob("section header"))?;
        let size = u64_at(elf, base + 32).ok_or(oob("section header"))?;
        let offset = usize::try_from(offset).map_err(|_| oob("section"))?;
        let size = usize::try_from(size).map_err(|_| oob("section"))?;
        if offset.checked_add(size).map_or(true, |end| end > elf.len()) {
            return Err(oob("section"));
        }
        Ok((name, offset, size))
    };
    if shstrndx >= shnum {
        return Err(oob("section name table index"));
    }
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = &elf[stroff..stroff + strsize];
    for i in 0..shnum {
        let (name_off, off, size) = section(i)?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return Ok(parse_modinfo_strings(&elf[off..off + size]));
        }
    }
    Err(ModInfoError::NoModinfo)
}

fn parse_modinfo_strings(data: &[u8]) -> ModInfo {
    let mut info = ModInfo {
        name: String::new(),
        depends: Vec::new(),
    };
    for item in data.split(|&b| b == 0) {
        let Ok(item) = std::str::from_utf8(item) else {
            continue;
        };
        if let Some(v) = item.strip_prefix("name=") {
            info.name = normalize_name(v);
        } else if let Some(v) = item.strip_prefix("depends=") {
            info.depends = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(normalize_name)
                .collect();
        }
    }
    info
}

/// One module found in a modules tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Normalised name.
    pub name: String,
    /// Absolute path of the `.ko` file.
    pub path: PathBuf,
    /// Normalised dependency names.
    pub depends: Vec<String>,
}

/// All modules of one kernel (`lib/modules/<kver>`), by name.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    modules: HashMap<String, ModuleEntry>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    /// Scan `dir` (a `lib/modules/<kver>` tree) for `.ko` files and read `modules.builtin`.
    /// Blocking.
    pub fn scan(dir: &Path) -> Result<Self, GuestError> {
        let mut index = ModuleIndex::default();
        let builtin_path = dir.join("modules.builtin");
        match std::fs::read_to_string(&builtin_path) {
            Ok(text) => {
                for line in text.lines() {
                    if let Some(stem) = Path::new(line.trim())
                        .file_name()
                        .and_then(|f| f.to_str())
                        .and_then(|f| f.strip_suffix(".ko"))
                    {
                        index.builtin.insert(normalize_name(stem));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(GuestError::Io {
                    path: builtin_path,
                    source,
                })
            }
        }
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let rd = std::fs::read_dir(&d).map_err(|source| GuestError::Io {
                path: d.clone(),
                source,
            })?;
            for ent in rd {
                let ent = ent.map_err(|source| GuestError::Io {
                    path: d.clone(),
                    source,
                })?;
                let path = ent.path();
                let ft = ent.file_type().map_err(|source| GuestError::Io {
                    path: path.clone(),
                    source,
                })?;
                if ft.is_dir() {
                    stack.push(path);
                } else if ft.is_file() && path.extension().is_some_and(|e| e == "ko") {
                    let entry = read_module(&path)?;
                    index.modules.insert(entry.name.clone(), entry);
                }
            }
        }
        Ok(index)
    }

    /// Build an index from entries (mostly for tests).
    pub fn from_entries(
        entries: impl IntoIterator<Item = ModuleEntry>,
        builtin: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            modules: entries.into_iter().map(|e| (e.name.clone(), e)).collect(),
            builtin: builtin.into_iter().map(|b| normalize_name(&b)).collect(),
        }
    }

    /// Look a module up by (unnormalised) name.
    pub fn get(&self, name: &str) -> Option<&ModuleEntry> {
        self.modules.get(&normalize_name(name))
    }

    /// Whether a module is compiled into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize_name(name))
    }

    /// Number of loadable modules in the index.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether the index holds no loadable modules.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Resolve `required` (each must exist or be built in, else [`GuestError::UnknownModule`])
    /// and `optional` (skipped when absent) with their dependencies, into a load order in which
    /// every module comes after all of its dependencies. Built-in modules are left out.
    pub fn resolve(&self, required: &[&str], optional: &[&str]) -> Result<Vec<ModuleEntry>, GuestError> {
        let mut order = Vec::new();
        let mut state: BTreeMap<String, Mark> = BTreeMap::new();
        for (name, must) in required
            .iter()
            .map(|n| (n, true))
            .chain(optional.iter().map(|n| (n, false)))
        {
            let name = normalize_name(name);
            if self.is_builtin(&name) {
                continue;
            }
            if !self.modules.contains_key(&name) {
                if must {
                    return Err(GuestError::UnknownModule {
                        name,
                        required_by: None,
                    });
                }
                continue;
            }
            self.visit(&name, None, &mut state, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        parent: Option<&str>,
        state: &mut BTreeMap<String, Mark>,
        order: &mut Vec<ModuleEntry>,
    ) -> Result<(), GuestError> {
        match state.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::InProgress) => {
                return Err(GuestError::ModuleCycle {
                    name: name.to_string(),
                })
            }
            None => {}
        }
        if self.is_builtin(name) {
            state.insert(name.to_string(), Mark::Done);
            return Ok(());
        }
        let entry = self.modules.get(name).ok_or_else(|| GuestError::UnknownModule {
            name: name.to_string(),
            required_by: parent.map(str::to_string),
        })?;
        state.insert(name.to_string(), Mark::InProgress);
        for dep in &entry.depends {
            self.visit(dep, Some(name), state, order)?;
        }
        state.insert(name.to_string(), Mark::Done);
        order.push(entry.clone());
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    InProgress,
    Done,
}

fn read_module(path: &Path) -> Result<ModuleEntry, GuestError> {
    let io = |source| GuestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_MODULE_SIZE {
        return Err(GuestError::BadModule {
            path: path.to_path_buf(),
            source: ModInfoError::OutOfBounds { what: "file size" },
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let info = parse_modinfo(&bytes).map_err(|source| GuestError::BadModule {
        path: path.to_path_buf(),
        source,
    })?;
    let name = if info.name.is_empty() {
        // Old modules lack `name=`: fall back to the file stem.
        normalize_name(path.file_stem().and_then(|s| s.to_str()).unwrap_or_default())
    } else {
        info.name
    };
    Ok(ModuleEntry {
        name,
        path: path.to_path_buf(),
        depends: info.depends,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal ELF64 object with a `.shstrtab` and a `.modinfo` section.
    pub(crate) fn fake_ko(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let str_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let mi_off = elf.len();
        elf.extend_from_slice(modinfo);
        while elf.len() % 8 != 0 {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, str_off, shstrtab.len());
        sh(11, mi_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn parses_name_and_depends() {
        let ko = fake_ko(b"license=GPL\0depends=virtio,virtio-ring\0name=virtio-blk\0\0\0");
        let info = parse_modinfo(&ko).unwrap();
        assert_eq!(info.name, "virtio_blk");
        assert_eq!(info.depends, vec!["virtio", "virtio_ring"]);
        let ko = fake_ko(b"depends=\0name=failover\0");
        assert!(parse_modinfo(&ko).unwrap().depends.is_empty());
    }

    #[test]
    fn rejects_non_elf_and_missing_section() {
        assert_eq!(parse_modinfo(b"hello"), Err(ModInfoError::NotElf64));
        let mut ko = fake_ko(b"name=x\0");
        // Rename the section so it is not found.
        let pos = ko.windows(8).position(|w| w == b".modinfo").unwrap();
        ko[pos + 1] = b'X';
        assert_eq!(parse_modinfo(&ko), Err(ModInfoError::NoModinfo));
    }

    fn entry(name: &str, deps: &[&str]) -> ModuleEntry {
        ModuleEntry {
            name: name.into(),
            path: PathBuf::from(format!("/m/{name}.ko")),
            depends: deps.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn resolves_dependencies_first() {
        let idx = ModuleIndex::from_entries(
            [
                entry("virtio_net", &["net_failover", "virtio", "virtio_ring"]),
                entry("net_failover", &["failover"]),
                entry("failover", &[]),
                entry("virtio", &[]),
                entry("virtio_ring", &[]),
                entry("virtio_blk", &["virtio", "virtio_ring"]),
            ],
            ["ext4".to_string()],
        );
        let order = idx
            .resolve(&["virtio-net", "virtio_blk", "ext4"], &["erofs"])
            .unwrap();
        let names: Vec<_> = order.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names.len(), 6);
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        for e in &order {
            for d in &e.depends {
                assert!(pos(d) < pos(&e.name), "{d} before {}", e.name);
            }
        }
    }

    #[test]
    fn unknown_and_cyclic_modules_are_errors() {
        let idx = ModuleIndex::from_entries(
            [entry("a", &["b"]), entry("b", &["a"]), entry("c", &["missing"])],
            [],
        );
        assert!(matches!(
            idx.resolve(&["nope"], &[]),
            Err(GuestError::UnknownModule { .. })
        ));
        assert!(matches!(
            idx.resolve(&["c"], &[]),
            Err(GuestError::UnknownModule { required_by: Some(p), .. }) if p == "c"
        ));
        assert!(matches!(
            idx.resolve(&["a"], &[]),
            Err(GuestError::ModuleCycle { .. })
        ));
    }

    proptest! {
        #[test]
        fn modinfo_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_modinfo(&data);
        }

        #[test]
        fn modinfo_parser_survives_corrupted_modules(
            flips in proptest::collection::vec((0usize..400, any::<u8>()), 1..8)
        ) {
            let mut ko = fake_ko(b"depends=a,b\0name=x\0");
            for (pos, byte) in flips {
                let len = ko.len();
                ko[pos % len] = byte;
            }
            let _ = parse_modinfo(&ko);
        }
    }
}
