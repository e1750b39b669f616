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
