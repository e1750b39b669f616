//! Kernel modules of an unpacked kernel package: find modules by name and list them together with
//! everything they depend on, in an order `insmod` can load them (dependencies first).
//!
//! Dependencies come from `modules.dep` when the tree has one (what `depmod` writes). Debian's
//! `linux-image-*` package does not ship it (its postinst runs depmod), so without it each module's
//! own `.modinfo` ELF section is read instead: its `depends=` line names the modules it needs,
//! the same data depmod turns into `modules.dep`.
//!
//! Module files may be compressed (`.ko.xz`, `.ko.zst`, `.ko.gz`); [`Module::load_bytes`] always
//! returns the plain ELF object, since busybox `insmod` cannot decompress.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors from reading a kernel module tree.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("cannot read the kernel module tree at {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel module `{0}` is not in the module tree (and not a dependency-free built-in)")]
    NotFound(String),
    #[error("kernel modules depend on each other in a cycle through `{0}`")]
    Cycle(String),
    #[error("{path} is not a loadable kernel module: {reason}")]
    BadModule { path: PathBuf, reason: &'static str },
    #[error("cannot decompress {path} with `{tool}` (is it installed?): {detail}")]
    Decompress {
        path: PathBuf,
        tool: &'static str,
        detail: String,
    },
}

/// One module file, resolved from a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Canonical module name (`kvm_amd`, dashes replaced by underscores).
    pub name: String,
    /// Absolute path of the file as the package has it (maybe compressed).
    pub path: PathBuf,
}

/// File name suffixes of kernel modules, with the tool that decompresses each.
const SUFFIXES: [(&str, Option<&str>); 4] = [
    (".ko", None),
    (".ko.xz", Some("xz")),
    (".ko.zst", Some("zstd")),
    (".ko.gz", Some("gzip")),
];

impl Module {
    /// The module's file name for an initramfs: always the uncompressed `<file>.ko`.
    pub fn file_name(&self) -> String {
        let base = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match strip_module_suffix(&base) {
            Some(stem) => format!("{stem}.ko"),
            None => base,
        }
    }

    /// The module as an uncompressed ELF object, decompressing on this machine if needed.
    pub fn load_bytes(&self) -> Result<Vec<u8>, KmodError> {
        read_module(&self.path)
    }
}

/// The modules of one kernel (`/lib/modules/<release>`), indexed by name.
#[derive(Debug)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// Canonical name -> path relative to `dir`.
    paths: HashMap<String, PathBuf>,
    /// Canonical name -> direct (or, from modules.dep, transitive) dependencies, when known
    /// up front. Without modules.dep they are read from each module's `.modinfo` on demand.
    deps: Option<HashMap<String, Vec<String>>>,
}

/// A module's canonical name: `kvm-amd.ko.xz` and `kvm_amd` both give `kvm_amd`.
pub fn canonical_name(name_or_file: &str) -> String {
    let base = name_or_file.rsplit('/').next().unwrap_or(name_or_file);
    strip_module_suffix(base).unwrap_or(base).replace('-', "_")
}

fn strip_module_suffix(file: &str) -> Option<&str> {
    // Longest suffixes first, so `.ko.xz` is not taken for a file ending in `.ko`.
    SUFFIXES
        .iter()
        .rev()
        .find_map(|(suffix, _)| file.strip_suffix(suffix))
}

impl ModuleIndex {
    /// Indexes the module tree at `dir` (`.../lib/modules/<release>`).
    pub fn open(dir: &Path) -> Result<Self, KmodError> {
        let dep_file = dir.join("modules.dep");
        match std::fs::read_to_string(&dep_file) {
            Ok(text) => Ok(Self::from_modules_dep(dir, &text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut paths = HashMap::new();
                scan_tree(dir, Path::new(""), &mut paths)?;
                Ok(Self {
                    dir: dir.to_path_buf(),
                    paths,
                    deps: None,
                })
            }
            Err(source) => Err(KmodError::Read {
                path: dep_file,
                source,
            }),
        }
    }

    /// An index from the text of a `modules.dep` file whose paths are relative to `dir`.
    /// Each line is `path: dep-path dep-path ...`; malformed lines are skipped.
    pub fn from_modules_dep(dir: &Path, text: &str) -> Self {
        let mut paths = HashMap::new();
        let mut deps = HashMap::new();
        for line in text.lines() {
            let Some((file, rest)) = line.split_once(':') else {
                continue;
            };
            let file = file.trim();
            if file.is_empty() {
                continue;
            }
            let name = canonical_name(file);
            let list = rest.split_whitespace().map(canonical_name).collect();
            paths.insert(name.clone(), PathBuf::from(file));
            deps.insert(name, list);
        }
        Self {
            dir: dir.to_path_buf(),
            paths,
            deps: Some(deps),
        }
    }

    /// Whether a module of that name exists in the tree.
    pub fn contains(&self, name: &str) -> bool {
        self.paths.contains_key(&canonical_name(name))
    }

    /// The modules `names` and all their dependencies, each once, in load order: every module
    /// comes after all the modules it depends on; otherwise the order of `names` is kept.
    pub fn resolve<S: AsRef<str>>(&self, names: &[S]) -> Result<Vec<Module>, KmodError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut visiting = HashSet::new();
        for name in names {
            self.visit(
                &canonical_name(name.as_ref()),
                &mut visiting,
                &mut done,
                &mut order,
            )?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        visiting: &mut HashSet<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), KmodError> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(KmodError::Cycle(name.to_string()));
        }
        let rel = self
            .paths
            .get(name)
            .ok_or_else(|| KmodError::NotFound(name.to_string()))?;
        let path = self.dir.join(rel);
        let deps = match &self.deps {
            Some(all) => all.get(name).cloned().unwrap_or_default(),
            None => modinfo_depends(&read_module(&path)?, &path)?,
        };
        for dep in &deps {
            self.visit(dep, visiting, done, order)?;
        }
        visiting.remove(name);
        done.insert(name.to_string());
        order.push(Module {
            name: name.to_string(),
            path,
        });
        Ok(())
    }
}

fn scan_tree(root: &Path, rel: &Path, out: &mut HashMap<String, PathBuf>) -> Result<(), KmodError> {
    let dir = root.join(rel);
    let entries = std::fs::read_dir(&dir).map_err(|source| KmodError::Read {
        path: dir.clone(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| KmodError::Read {
            path: dir.clone(),
            source,
        })?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let file_type = entry.file_type().map_err(|source| KmodError::Read {
            path: entry.path(),
            source,
        })?;
        if file_type.is_dir() {
            scan_tree(root, &rel.join(&file_name), out)?;
        } else if strip_module_suffix(&file_name).is_some() {
            out.insert(canonical_name(&file_name), rel.join(&file_name));
        }
    }
    Ok(())
}

fn read_module(path: &Path) -> Result<Vec<u8>, KmodError> {
    let file = path.to_string_lossy();
    let tool = SUFFIXES
        .iter()
        .rev()
        .find(|(suffix, _)| file.ends_with(suffix))
        .and_then(|(_, tool)| *tool);
    let Some(tool) = tool else {
        return std::fs::read(path).map_err(|source| KmodError::Read {
            path: path.to_path_buf(),
            source,
        });
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| KmodError::Decompress {
            path: path.to_path_buf(),
            tool,
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(KmodError::Decompress {
            path: path.to_path_buf(),
            tool,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// The module names on the `depends=` line of a module's `.modinfo` section.
pub fn modinfo_depends(elf: &[u8], path: &Path) -> Result<Vec<String>, KmodError> {
    let info = elf_section(elf, ".modinfo").map_err(|reason| KmodError::BadModule {
        path: path.to_path_buf(),
        reason,
    })?;
    let mut deps = Vec::new();
    for list in info
        .split(|b| *b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
    {
        let list = String::from_utf8_lossy(list);
        deps.extend(
            list.split(',')
                .filter(|d| !d.is_empty())
                .map(canonical_name),
        );
    }
    Ok(deps)
}

/// The contents of the named section of a 64-bit little-endian ELF file.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<&'a [u8], &'static str> {
    let u16_at = |off: usize| -> Option<u16> {
        elf.get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |off: usize| -> Option<u32> {
        elf.get(off..off + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u64_at = |off: usize| -> Option<u64> {
        elf.get(off..off + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    if elf.get(0..6) != Some(b"\x7fELF\x02\x01") {
        return Err("not a 64-bit little-endian ELF file");
    }
    const TRUNCATED: &str = "truncated ELF section table";
    let shoff = u64_at(0x28).ok_or(TRUNCATED)? as usize;
    let shentsize = u16_at(0x3a).ok_or(TRUNCATED)? as usize;
    let shnum = u16_at(0x3c).ok_or(TRUNCATED)? as usize;
    let shstrndx = u16_at(0x3e).ok_or(TRUNCATED)? as usize;
    if shentsize < 0x40 {
        return Err("ELF section headers too small");
    }
    let section = |i: usize| -> Option<(u32, &'a [u8])> {
        let hdr = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(hdr)?;
        let off = u64_at(hdr + 0x18)? as usize;
        let size = u64_at(hdr + 0x20)? as usize;
        Some((name, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx).ok_or(TRUNCATED)?;
    for i in 0..shnum {
        let (name_off, data) = section(i).ok_or(TRUNCATED)?;
        let name = names
            .get(name_off as usize..)
            .and_then(|s| s.split(|b| *b == 0).next())
            .unwrap_or_default();
        if name == wanted.as_bytes() {
            return Ok(data);
        }
    }
    Err("no .modinfo section")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/arch/x86/kvm/kvm-amd.ko.xz: kernel/arch/x86/kvm/kvm.ko.xz kernel/virt/lib/irqbypass.ko.xz kernel/drivers/crypto/ccp/ccp.ko.xz
kernel/arch/x86/kvm/kvm.ko.xz: kernel/virt/lib/irqbypass.ko.xz
kernel/virt/lib/irqbypass.ko.xz:
kernel/drivers/crypto/ccp/ccp.ko.xz:
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
garbage line without colon
";

    fn names(mods: &[Module]) -> Vec<&str> {
        mods.iter().map(|m| m.name.as_str()).collect()
    }

    fn assert_deps_first(order: &[&str], before: &str, after: &str) {
        let b = order.iter().position(|n| *n == before).unwrap();
        let a = order.iter().position(|n| *n == after).unwrap();
        assert!(b < a, "{before} must load before {after}: {order:?}");
    }

    #[test]
    fn canonical_names_ignore_dashes_directories_and_compression() {
        assert_eq!(canonical_name("kvm-amd"), "kvm_amd");
        assert_eq!(
            canonical_name("kernel/arch/x86/kvm/kvm-amd.ko.xz"),
            "kvm_amd"
        );
        assert_eq!(canonical_name("9pnet_virtio.ko"), "9pnet_virtio");
        assert_eq!(canonical_name("virtio.ko.zst"), "virtio");
    }

    #[test]
    fn resolves_dependencies_before_dependents_each_once() {
        let idx = ModuleIndex::from_modules_dep(Path::new("/m"), DEP);
        let order = idx.resolve(&["kvm-amd", "9p", "kvm", "fscache"]).unwrap();
        let order = names(&order);
        assert_eq!(order.len(), 8);
        assert_deps_first(&order, "irqbypass", "kvm");
        assert_deps_first(&order, "kvm", "kvm_amd");
        assert_deps_first(&order, "ccp", "kvm_amd");
        assert_deps_first(&order, "netfs", "fscache");
        assert_deps_first(&order, "fscache", "9p");
        assert_deps_first(&order, "9pnet", "9p");
        // Requested order is kept where dependencies allow: the KVM group comes first.
        assert_deps_first(&order, "kvm_amd", "9p");
    }

    #[test]
    fn resolved_paths_are_under_the_tree_and_named_uncompressed() {
        let idx = ModuleIndex::from_modules_dep(Path::new("/m"), DEP);
        let order = idx.resolve(&["kvm"]).unwrap();
        assert_eq!(
            order[0].path,
            Path::new("/m/kernel/virt/lib/irqbypass.ko.xz")
        );
        assert_eq!(order[0].file_name(), "irqbypass.ko");
        assert_eq!(order[1].file_name(), "kvm.ko");
    }

    #[test]
    fn unknown_module_is_an_error_naming_it() {
        let idx = ModuleIndex::from_modules_dep(Path::new("/m"), DEP);
        let err = idx.resolve(&["kvm", "nosuch"]).unwrap_err();
        assert!(
            matches!(err, KmodError::NotFound(ref n) if n == "nosuch"),
            "{err}"
        );
    }

    #[test]
    fn dependency_cycles_are_reported() {
        let idx = ModuleIndex::from_modules_dep(Path::new("/m"), "a.ko: b.ko\nb.ko: a.ko\n");
        assert!(matches!(idx.resolve(&["a"]), Err(KmodError::Cycle(_))));
    }

    /// A minimal ELF64 file with a section-name table and a `.modinfo` section.
    fn tiny_elf(modinfo: &[u8]) -> Vec<u8> {
        let shstr = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 0x40];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        let shstr_off = elf.len();
        elf.extend_from_slice(shstr);
        let shoff = elf.len();
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 0x40];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, shstr_off, shstr.len());
        sh(11, modinfo_off, modinfo.len());
        elf
    }

    #[test]
    fn modinfo_depends_are_read_from_the_elf_section() {
        let elf = tiny_elf(b"license=GPL\0depends=kvm,ccp\0name=kvm_amd\0");
        let deps = modinfo_depends(&elf, Path::new("x.ko")).unwrap();
        assert_eq!(deps, ["kvm", "ccp"]);
        let none = tiny_elf(b"depends=\0name=ccp\0");
        assert!(modinfo_depends(&none, Path::new("x.ko"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn hostile_elf_input_is_rejected_not_panicking() {
        let elf = tiny_elf(b"depends=a\0");
        for len in 0..elf.len() {
            let _ = modinfo_depends(&elf[..len], Path::new("x.ko"));
        }
        let mut bad = elf.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(modinfo_depends(&bad, Path::new("x.ko")).is_err());
        assert!(modinfo_depends(b"not elf", Path::new("x.ko")).is_err());
    }

    #[test]
    fn tree_without_modules_dep_reads_modinfo() {
        let dir = std::env::temp_dir().join(format!("ferry-kmod-test-{}", std::process::id()));
        let sub = dir.join("kernel/x");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("a-b.ko"), tiny_elf(b"depends=c\0")).unwrap();
        std::fs::write(sub.join("c.ko"), tiny_elf(b"depends=\0")).unwrap();
        let idx = ModuleIndex::open(&dir).unwrap();
        let order = idx.resolve(&["a_b"]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names(&order), ["c", "a_b"]);
    }
}
