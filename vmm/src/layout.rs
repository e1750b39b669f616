//! Where things live in guest-physical memory (x86-64). One table, so that the boot code, the
//! E820 map and the ACPI tables agree.

/// Global descriptor table used for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty interrupt descriptor table (the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, then four page directories (4 GiB in 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we write (Debian's kernel accepts 2048 bytes).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM below it is usable, above it reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, starting with the RSDP (in the BIOS area where a search finds it too).
pub const ACPI_START: u64 = 0xe0000;
/// End of the legacy low-memory hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (up to 4 GiB): RAM beyond this is placed above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The in-kernel IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages, must be inside the MMIO hole).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// I/O ports of the legacy devices.
pub mod ports {
    /// First 8250 UART (ttyS0): the console.
    pub const COM1: u16 = 0x3f8;
    /// Second 8250 UART (ttyS1): the guest agent's channel.
    pub const COM2: u16 = 0x2f8;
    /// i8042 command/status port (0xfe here resets the machine).
    pub const I8042: u16 = 0x60;
    /// ACPI sleep control/status registers (hardware-reduced ACPI).
    pub const ACPI_SLEEP: u16 = 0x600;
    /// ACPI reset register.
    pub const ACPI_RESET: u16 = 0x604;
}

/// ISA interrupt lines of the legacy devices (same numbers as IOAPIC pins and GSIs).
pub mod irqs {
    pub const COM1: u32 = 4;
    pub const COM2: u32 = 3;
}

/// Where virtio-mmio devices go: 4 KiB register windows from [`VIRTIO_MMIO_BASE`] up, inside
/// the 32-bit MMIO hole, and one IOAPIC interrupt line each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First interrupt line for virtio devices (3 and 4 are the UARTs').
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last interrupt line (the IOAPIC has 24 pins).
pub const VIRTIO_IRQ_LAST: u32 = 23;

/// A virtio-mmio device's place: its register window and interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

/// Errors from placing devices.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("no interrupt line left for another virtio device (lines {VIRTIO_IRQ_BASE} to {VIRTIO_IRQ_LAST} are all taken)")]
    NoIrq,
}

/// Hands out [`MmioSlot`]s in order: windows one after the other, interrupt lines from
/// [`VIRTIO_IRQ_BASE`] up, never the UARTs' lines.
#[derive(Debug, Default)]
pub struct MmioAllocator {
    next: u32,
}

impl MmioAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next free slot.
    pub fn allocate(&mut self) -> Result<MmioSlot, LayoutError> {
        let irq = (VIRTIO_IRQ_BASE..=VIRTIO_IRQ_LAST)
            .filter(|i| *i != irqs::COM1 && *i != irqs::COM2)
            .nth(self.next as usize)
            .ok_or(LayoutError::NoIrq)?;
        let slot = MmioSlot {
            base: VIRTIO_MMIO_BASE + u64::from(self.next) * VIRTIO_MMIO_SIZE,
            len: VIRTIO_MMIO_SIZE,
            irq,
        };
        self.next += 1;
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_consecutive_windows_with_their_own_lines_in_the_mmio_hole() {
        let mut a = MmioAllocator::new();
        let slots: Vec<MmioSlot> = std::iter::from_fn(|| a.allocate().ok()).collect();
        assert_eq!(
            slots.len(),
            (VIRTIO_IRQ_LAST - VIRTIO_IRQ_BASE + 1) as usize
        );
        assert_eq!(
            slots[0],
            MmioSlot {
                base: 0xd000_0000,
                len: 0x1000,
                irq: 5
            }
        );
        for (i, s) in slots.iter().enumerate() {
            assert_eq!(s.base, VIRTIO_MMIO_BASE + i as u64 * 0x1000);
            assert!(s.base >= MMIO_GAP_START && s.base + s.len <= IOAPIC_START);
            assert!(![irqs::COM1, irqs::COM2].contains(&s.irq));
        }
        let mut irqs: Vec<u32> = slots.iter().map(|s| s.irq).collect();
        irqs.dedup();
        assert_eq!(irqs.len(), slots.len());
        assert!(matches!(a.allocate(), Err(LayoutError::NoIrq)));
    }
}
