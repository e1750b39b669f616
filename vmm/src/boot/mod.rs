//! Loading Linux: the kernel (a bzImage, or the ELF vmlinux inside one), the initramfs, the
//! command line and the zero page with its E820 map, for the 64-bit boot protocol.

pub mod acpi;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout::{
    ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END,
    MMIO_GAP_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

/// Errors from inspecting or loading a kernel and its initramfs.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is neither a Linux bzImage nor an ELF vmlinux; pass a kernel image such as /boot/vmlinuz-*")]
    NotAKernel(PathBuf),
    #[error("{path} is a bzImage with boot protocol {version:#x}; ferry needs 2.12 or newer with a 64-bit entry point")]
    UnsupportedBzImage { path: PathBuf, version: u16 },
    #[error("guest memory of {have_mib} MiB is below what this kernel and initramfs need; use --memory {need_mib}M or more")]
    MemoryTooSmall { have_mib: u64, need_mib: u64 },
    #[error("loading the kernel: {0}")]
    Load(#[from] loader::Error),
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("writing boot data into guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Memory a booted kernel needs beyond its image and initramfs to reach user space.
const RUNTIME_HEADROOM: u64 = 48 << 20;
/// bzImage flag: the image has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

/// The two kernel formats ferry boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed bzImage, as distributions ship it (`/boot/vmlinuz-*`).
    BzImage,
    /// The uncompressed ELF kernel (as extracted from a bzImage), entered directly.
    Elf,
}

/// A kernel file, checked before anything is started.
#[derive(Debug, Clone)]
pub struct KernelImage {
    pub path: PathBuf,
    pub format: KernelFormat,
    /// Highest guest-physical address the kernel occupies while it starts.
    pub end: u64,
    /// Highest address an initramfs may end at.
    pub initrd_addr_max: u64,
}

impl KernelImage {
    /// Reads enough of `path` to know its format and its memory needs.
    pub fn inspect(path: &Path) -> Result<Self, BootError> {
        let mut f = File::open(path).map_err(read_err(path))?;
        let mut head = vec![0u8; 4096];
        let n = read_up_to(&mut f, &mut head).map_err(read_err(path))?;
        head.truncate(n);
        if head.starts_with(b"\x7fELF") {
            let end = elf_load_end(&mut f).map_err(read_err(path))?;
            return Ok(Self {
                path: path.to_path_buf(),
                format: KernelFormat::Elf,
                end: end.ok_or_else(|| BootError::NotAKernel(path.to_path_buf()))?,
                initrd_addr_max: 0x7fff_ffff,
            });
        }
        if head.len() < 0x268 || &head[0x202..0x206] != b"HdrS" {
            return Err(BootError::NotAKernel(path.to_path_buf()));
        }
        let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap());
        let version = u16_at(0x206);
        if version < 0x020c || u16_at(0x236) & XLF_KERNEL_64 == 0 {
            return Err(BootError::UnsupportedBzImage {
                path: path.to_path_buf(),
                version,
            });
        }
        let pref_address = u64::from_le_bytes(head[0x258..0x260].try_into().unwrap());
        let init_size = u32_at(0x260) as u64;
        Ok(Self {
            path: path.to_path_buf(),
            format: KernelFormat::BzImage,
            end: pref_address.max(HIMEM_START) + init_size,
            initrd_addr_max: u32_at(0x22c) as u64,
        })
    }

    /// Guest memory needed for this kernel with an initramfs of `initrd_size` bytes.
    pub fn required_memory(&self, initrd_size: u64) -> u64 {
        let need = self.end + initrd_size + RUNTIME_HEADROOM;
        need.div_ceil(1 << 20) << 20
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// End of the highest PT_LOAD segment of an ELF64 file (physical addresses), if it has any.
fn elf_load_end(f: &mut File) -> std::io::Result<Option<u64>> {
    let mut eh = [0u8; 64];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut eh)?;
    if eh[4] != 2 {
        return Ok(None); // not ELF64
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().unwrap());
    let phentsize = u16::from_le_bytes([eh[54], eh[55]]) as u64;
    let phnum = u16::from_le_bytes([eh[56], eh[57]]) as u64;
    if phentsize < 56 || phnum > 256 {
        return Ok(None);
    }
    let mut end = None;
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(phoff + i * phentsize))?;
        f.read_exact(&mut ph)?;
        if u32::from_le_bytes(ph[0..4].try_into().unwrap()) == 1 {
            let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap());
            let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap());
            end = Some(end.unwrap_or(0).max(paddr.saturating_add(memsz)));
        }
    }
    Ok(end)
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub kernel: KernelImage,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

impl BootSpec {
    /// Size of the initramfs file, if any.
    pub fn initrd_size(&self) -> Result<u64, BootError> {
        match &self.initrd {
            Some(p) => Ok(std::fs::metadata(p).map_err(read_err(p))?.len()),
            None => Ok(0),
        }
    }

    /// Checks the spec against a memory size without touching any guest.
    pub fn check(&self, mem_size: u64) -> Result<(), BootError> {
        let need = self.kernel.required_memory(self.initrd_size()?);
        if mem_size < need {
            return Err(BootError::MemoryTooSmall {
                have_mib: mem_size >> 20,
                need_mib: need >> 20,
            });
        }
        Cmdline::try_from(&self.cmdline, CMDLINE_MAX_SIZE)?;
        Ok(())
    }
}

/// The E820 map for `mem_size` bytes of RAM laid out as [`crate::memory::ram_ranges`] does.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    const RAM: u32 = 1;
    const RESERVED: u32 = 2;
    let entry = |addr: u64, size: u64, type_: u32| boot_e820_entry {
        addr,
        size,
        r#type: type_,
    };
    let low_end = mem_size.min(MMIO_GAP_START);
    let mut map = vec![
        entry(0, EBDA_START, RAM),
        entry(ACPI_START, HIMEM_START - ACPI_START, RESERVED),
        entry(HIMEM_START, low_end - HIMEM_START, RAM),
    ];
    if mem_size > MMIO_GAP_START {
        map.push(entry(MMIO_GAP_END, mem_size - MMIO_GAP_START, RAM));
    }
    map
}

/// Loads kernel, initramfs and command line into `mem` and writes the zero page.
/// Returns the address the boot vCPU starts at.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    spec: &BootSpec,
    rsdp: GuestAddress,
) -> Result<u64, BootError> {
    spec.check(mem_size)?;
    let kpath = &spec.kernel.path;
    let mut kernel = File::open(kpath).map_err(read_err(kpath))?;
    let (entry, mut hdr) = match spec.kernel.format {
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))?;
            let hdr = r
                .setup_header
                .expect("BzImage::load always returns the setup header");
            (r.kernel_load.0 + 0x200, hdr)
        }
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))?;
            // An ELF kernel carries no setup header: give it the one a boot loader would.
            let hdr = setup_header {
                boot_flag: 0xaa55,
                header: 0x5372_6448, // "HdrS"
                version: 0x020f,
                kernel_alignment: 0x100_0000,
                initrd_addr_max: spec.kernel.initrd_addr_max as u32,
                ..Default::default()
            };
            (r.kernel_load.0, hdr)
        }
    };

    let cmdline = Cmdline::try_from(&spec.cmdline, CMDLINE_MAX_SIZE)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)?;
    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = spec.cmdline.len() as u32 + 1;

    if let Some(initrd) = &spec.initrd {
        let size = spec.initrd_size()?;
        let top = mem_size
            .min(MMIO_GAP_START)
            .min(spec.kernel.initrd_addr_max + 1);
        let addr = (top - size) & !0xfff;
        let mut f = File::open(initrd).map_err(read_err(initrd))?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp.0,
        ..Default::default()
    };
    let map = e820_map(mem_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A minimal bzImage header: protocol 2.15, 64-bit entry, init_size 32 MiB.
    fn fake_bzimage(version: u16, xlf: u16) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[0x1f1] = 1; // setup_sects
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        b[0x211] = 1; // loadflags: LOADED_HIGH
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[0x236..0x238].copy_from_slice(&xlf.to_le_bytes());
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&(32u32 << 20).to_le_bytes());
        b
    }

    #[test]
    fn a_text_file_is_not_a_kernel() {
        let p = temp_file("notes.txt", b"hello, this is not a kernel\n");
        assert!(matches!(
            KernelImage::inspect(&p),
            Err(BootError::NotAKernel(_))
        ));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = KernelImage::inspect(Path::new("/nonexistent/vmlinuz")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinuz"));
    }

    #[test]
    fn old_or_32_bit_bzimages_are_refused() {
        let p = temp_file("old", &fake_bzimage(0x0208, 1));
        assert!(matches!(
            KernelImage::inspect(&p),
            Err(BootError::UnsupportedBzImage { .. })
        ));
        let p = temp_file("k32", &fake_bzimage(0x020f, 0));
        assert!(matches!(
            KernelImage::inspect(&p),
            Err(BootError::UnsupportedBzImage { .. })
        ));
    }

    #[test]
    fn memory_need_counts_kernel_initrd_and_headroom() {
        let p = temp_file("bz", &fake_bzimage(0x020f, 1));
        let k = KernelImage::inspect(&p).unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.end, (16 << 20) + (32 << 20));
        let spec = BootSpec {
            kernel: k,
            initrd: Some(temp_file("initrd", &vec![0u8; 3 << 20])),
            cmdline: "console=ttyS0".into(),
        };
        let need = (48 + 3 + 48) << 20;
        assert_eq!(spec.kernel.required_memory(3 << 20), need);
        assert!(matches!(
            spec.check(need - (1 << 20)),
            Err(BootError::MemoryTooSmall { need_mib: 99, .. })
        ));
        spec.check(need).unwrap();
    }

    #[test]
    fn e820_leaves_the_bios_area_and_mmio_hole_out_of_ram() {
        let map = e820_map(6 << 30);
        let ram: Vec<_> = map.iter().filter(|e| e.r#type == 1).collect();
        assert_eq!(ram.len(), 3);
        let total: u64 = ram.iter().map(|e| e.size).sum();
        assert_eq!(total, (6 << 30) - HIMEM_START + EBDA_START);
        assert!(ram
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn zero_page_points_at_cmdline_initrd_and_rsdp() {
        // An ELF "kernel" with one PT_LOAD of 16 bytes at 2 MiB, entry at 2 MiB.
        let mut elf = vec![0u8; 0x200];
        elf[0..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little endian
        elf[6] = 1;
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // entry
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes()); // offset
        elf[ph + 16..ph + 24].copy_from_slice(&0x20_0000u64.to_le_bytes()); // vaddr
        elf[ph + 24..ph + 32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // paddr
        elf[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes()); // filesz
        elf[ph + 40..ph + 48].copy_from_slice(&16u64.to_le_bytes()); // memsz
        elf[0x100..0x110].copy_from_slice(b"KERNEL-CODE-HERE");
        let kernel = KernelImage::inspect(&temp_file("vmlinux", &elf)).unwrap();
        assert_eq!(kernel.format, KernelFormat::Elf);
        assert_eq!(kernel.end, 0x20_0010);
        let spec = BootSpec {
            kernel,
            initrd: Some(temp_file("rd", b"INITRAMFS")),
            cmdline: "console=ttyS0 quiet".into(),
        };
        let size = 128 << 20;
        let mem = crate::memory::create(size).unwrap();
        let entry = load(&mem, size, &spec, GuestAddress(ACPI_START)).unwrap();
        assert_eq!(entry, 0x20_0000);
        let mut code = [0u8; 16];
        mem.read_slice(&mut code, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&code, b"KERNEL-CODE-HERE");
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.acpi_rsdp_addr }, ACPI_START);
        let hdr = params.hdr;
        assert_eq!({ hdr.cmd_line_ptr } as u64, CMDLINE_START);
        let mut cl = vec![0u8; { hdr.cmdline_size } as usize];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(cl, b"console=ttyS0 quiet\0");
        let mut rd = [0u8; 9];
        mem.read_slice(&mut rd, GuestAddress({ hdr.ramdisk_image } as u64))
            .unwrap();
        assert_eq!(&rd, b"INITRAMFS");
        assert_eq!({ hdr.ramdisk_size }, 9);
        assert_eq!({ hdr.ramdisk_image } % 4096, 0);
        assert_eq!(params.e820_entries, 3);
    }
}
