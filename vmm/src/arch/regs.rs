//! Register state for entering a 64-bit Linux kernel directly (the 64-bit boot protocol):
//! long mode with an identity map of the first 4 GiB, flat segments, RSI pointing at the zero
//! page. The same code sets up the tiny long-mode guests of the tests.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

/// Errors from setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot page tables or GDT into guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { op, source }
}

const CR0_PE: u64 = 1;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selectors the 64-bit boot protocol names (__BOOT_CS, __BOOT_DS) and the TSS.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// A GDT descriptor from flags, base and limit (the usual packed layout).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, code (0x10), data (0x18), TSS (0x20).
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The KVM segment that a GDT descriptor describes, loaded with `selector`.
fn segment(selector: u16) -> kvm_segment {
    let entry = GDT[(selector >> 3) as usize];
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity-mapping page tables (4 GiB, 2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPTE_START + gib * 8))?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            // Present, writable, 2 MiB page.
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// Long mode with paging, flat 64-bit segments, the boot GDT and page tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment(BOOT_CS);
    let data = segment(BOOT_DS);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(BOOT_TSS);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_PG) & !(CR0_CD | CR0_NW);
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Puts `vcpu` in long mode at `entry`, with RSI = the zero page, as the 64-bit boot protocol
/// asks. Boot tables must have been written with [`write_boot_tables`].
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// Default x87/SSE control state (as after FNINIT, with all SSE exceptions masked).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

/// LAPIC local interrupts as a PC has them: LINT0 ExtINT (the PIC), LINT1 NMI.
pub fn setup_lapic_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7 << 8;
    const DELIVERY_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        // The register page is declared as C chars; each register is 32-bit little-endian.
        let bytes = &mut lapic.regs[reg..reg + 4];
        let v = u32::from_le_bytes([0, 1, 2, 3].map(|i| bytes[i] as u8));
        let v = (v & !0x700) | mode;
        for (dst, src) in bytes.iter_mut().zip(v.to_le_bytes()) {
            *dst = src as std::os::raw::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn code_segment_is_64_bit_and_data_is_flat() {
        let cs = segment(BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.present, cs.s), (1, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        let ds = segment(BOOT_DS);
        assert_eq!((ds.base, ds.limit, ds.g, ds.db), (0, 0xffff_ffff, 1, 1));
        assert_eq!(segment(BOOT_TSS).type_, 0xb);
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = crate::memory::create(16 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        // Walk the address 3 GiB + 6 MiB + 0x123.
        let va: u64 = (3 << 30) + (6 << 20) + 0x123;
        let pdpte: u64 = mem
            .read_obj(GuestAddress(PDPTE_START + ((va >> 30) & 511) * 8))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
            .unwrap();
        assert_eq!(pde & 0x81, 0x81, "present 2 MiB page");
        assert_eq!((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff), va);
    }

    #[test]
    fn long_mode_sregs_enable_paging_pae_and_lma() {
        let s = long_mode_sregs(kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        });
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr0 & (CR0_CD | CR0_NW), 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
    }
}
