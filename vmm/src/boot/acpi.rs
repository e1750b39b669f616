//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT, MADT and a DSDT.
//!
//! Debian's kernel finds the CPUs through the MADT, the UARTs through the DSDT (without them,
//! user-space console output is lost on a hardware-reduced machine), powers off through the FADT's
//! sleep control register with the `_S5` sleep type, and restarts through its reset register.
//! Virtio-mmio devices are DSDT devices too (`_HID "LNRO0005"`, window and interrupt in `_CRS`):
//! Debian's kernel ignores `virtio_mmio.device=` on the command line.

use acpi_tables::sdt::{GenericAddress, Sdt};
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::devices::power::{RESET_VALUE, S5_SLEEP_TYPE};
use crate::layout::{irqs, ports, MmioSlot, ACPI_START, APIC_START, HIMEM_START, IOAPIC_START};
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"FERRY ";
const OEM_TABLE_ID: [u8; 8] = *b"FERRYVMM";
const OEM_REVISION: u32 = 1;

/// Errors from writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooLarge(u64),
    #[error("writing ACPI tables into guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// A legacy UART as the DSDT describes it.
struct Uart {
    name: &'static str,
    port: u16,
    irq: u32,
}

const UARTS: [Uart; 2] = [
    Uart {
        name: "COM1",
        port: ports::COM1,
        irq: irqs::COM1,
    },
    Uart {
        name: "COM2",
        port: ports::COM2,
        irq: irqs::COM2,
    },
];

/// The `_HID` Linux's virtio_mmio driver matches in ACPI.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

fn dsdt(virtio: &[MmioSlot]) -> Sdt {
    let mut body: Vec<u8> = Vec::new();
    // \_S5: the sleep type value the guest writes to the sleep control register to power off.
    let s5_type = S5_SLEEP_TYPE;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_type, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    let objects: Vec<[aml::Name; 3]> = UARTS
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let io = aml::IO::new(u.port, u.port, 1, 8);
            let irq = aml::Interrupt::new(true, true, false, false, u.irq);
            [
                aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                aml::Name::new("_UID".into(), &(i as u8)),
                aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq])),
            ]
        })
        .collect();
    let devices: Vec<aml::Device> = UARTS
        .iter()
        .zip(&objects)
        .map(|(u, [hid, uid, crs])| aml::Device::new(u.name.into(), vec![hid, uid, crs]))
        .collect();
    // Virtio-mmio devices: VR00, VR01, ...
    let virtio_objects: Vec<[aml::Name; 3]> = virtio
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            // The window is in the 32-bit hole (MmioAllocator keeps it there).
            let mem = aml::Memory32Fixed::new(true, slot.base as u32, slot.len as u32);
            let irq = aml::Interrupt::new(true, true, false, false, slot.irq);
            [
                aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID),
                aml::Name::new("_UID".into(), &(i as u32)),
                aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&mem, &irq])),
            ]
        })
        .collect();
    let virtio_devices: Vec<aml::Device> = virtio_objects
        .iter()
        .enumerate()
        .map(|(i, [hid, uid, crs])| {
            aml::Device::new(format!("VR{i:02X}").as_str().into(), vec![hid, uid, crs])
        })
        .collect();
    let devices: Vec<&dyn Aml> = devices
        .iter()
        .chain(&virtio_devices)
        .map(|d| d as &dyn Aml)
        .collect();
    aml::Scope::new("\\_SB_".into(), devices).to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt
}

fn fadt(dsdt_addr: u64) -> Sdt {
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const RESET_REG_SUP: u32 = 1 << 10;
    const PWR_BUTTON: u32 = 1 << 4;
    const SLP_BUTTON: u32 = 1 << 5;
    const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
    const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

    let mut t = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(40, dsdt_addr as u32);
    t.write_u16(109, IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT);
    t.write_u32(
        112,
        HW_REDUCED_ACPI | RESET_REG_SUP | PWR_BUTTON | SLP_BUTTON,
    );
    t.write(
        116,
        GenericAddress::io_port_address::<u8>(ports::ACPI_RESET),
    );
    t.write_u8(128, RESET_VALUE);
    t.write_u64(140, dsdt_addr);
    t.write(
        244,
        GenericAddress::io_port_address::<u8>(ports::ACPI_SLEEP),
    );
    t.write(
        256,
        GenericAddress::io_port_address::<u8>(ports::ACPI_SLEEP + 1),
    );
    t.write_u64(268, u64::from_le_bytes(*b"FERRYVMM"));
    t
}

fn madt(vcpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 4, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, APIC_START as u32);
    t.write_u32(40, 1); // PCAT_COMPAT: dual 8259s present (KVM emulates them)
    let mut entries = Vec::new();
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, ACPI id, APIC id, flags (enabled).
        entries.extend_from_slice(&[0, 8, id, id]);
        entries.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base 0.
    entries.extend_from_slice(&[1, 12, 0, 0]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override: ISA IRQ 0 (the PIT) is GSI 2, as on every PC.
    entries.extend_from_slice(&[2, 10, 0, 0]);
    entries.extend_from_slice(&2u32.to_le_bytes());
    entries.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI: all processors, LINT1.
    entries.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.append_slice(&entries);
    t
}

fn xsdt(tables: &[u64]) -> Sdt {
    let mut t = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in tables {
        t.append_slice(&addr.to_le_bytes());
    }
    t
}

/// The ACPI 2.0 root pointer.
fn rsdp(xsdt_addr: u64) -> [u8; 36] {
    let mut r = [0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2; // revision: ACPI 2.0+
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    r[8] = checksum(&r[0..20]);
    r[32] = checksum(&r);
    r
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Writes all tables at [`ACPI_START`] and returns the RSDP's address. `virtio` lists the
/// virtio-mmio devices to describe.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    virtio: &[MmioSlot],
) -> Result<GuestAddress, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let mut next = align(rsdp_addr + 36);
    let mut place = |t: &Sdt| -> Result<u64, AcpiError> {
        let at = next;
        mem.write_slice(t.as_slice(), GuestAddress(at))?;
        next = align(at + t.len() as u64);
        if next > HIMEM_START {
            return Err(AcpiError::TooLarge(next - ACPI_START));
        }
        Ok(at)
    };
    let dsdt_addr = place(&dsdt(virtio))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(vcpus))?;
    let xsdt_addr = place(&xsdt(&[fadt_addr, madt_addr]))?;
    mem.write_slice(&rsdp(xsdt_addr), GuestAddress(rsdp_addr))?;
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    #[test]
    fn tables_chain_from_rsdp_and_checksums_hold() {
        let mem = crate::memory::create(16 << 20).unwrap();
        let virtio = [
            MmioSlot {
                base: 0xd000_0000,
                len: 0x1000,
                irq: 5,
            },
            MmioSlot {
                base: 0xd000_1000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let rsdp = write_tables(&mem, 3, &virtio).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(sum(&r[0..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt = read_table(&mem, u64::from_le_bytes(r[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let ptrs: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = read_table(&mem, ptrs[0]);
        let madt = read_table(&mem, ptrs[1]);
        assert_eq!((&fadt[0..4], sum(&fadt)), (&b"FACP"[..], 0));
        assert_eq!((&madt[0..4], sum(&madt)), (&b"APIC"[..], 0));
        let dsdt = read_table(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!((&dsdt[0..4], sum(&dsdt)), (&b"DSDT"[..], 0));
        // Hardware-reduced, with the sleep control register on our port.
        assert_ne!(
            u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
            0
        );
        assert_eq!(fadt[244], 1, "system I/O space");
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            ports::ACPI_SLEEP as u64
        );
        // One enabled local APIC entry per vCPU.
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[52..56], &[0, 8, 1, 1]);
        assert_eq!(&madt[60..64], &[0, 8, 2, 2]);
        // The DSDT names the sleep state and both UARTs.
        let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"_S5_"));
        assert!(find(b"COM1") && find(b"COM2"));
        // Each virtio device with its HID, window (Memory32Fixed: 0x86, 9 bytes) and edge
        // interrupt (extended interrupt descriptor 0x89, consumer + edge = flags 0x03).
        assert!(find(b"VR00") && find(b"VR01") && !find(b"VR02"));
        assert!(find(b"LNRO0005\0"));
        for (base, irq) in [(0xd000_0000u32, 5u32), (0xd000_1000, 6)] {
            let mut mem32 = vec![0x86, 9, 0, 1];
            mem32.extend_from_slice(&base.to_le_bytes());
            mem32.extend_from_slice(&0x1000u32.to_le_bytes());
            assert!(find(&mem32), "window {base:#x}");
            let mut int = vec![0x89, 6, 0, 0x03, 1];
            int.extend_from_slice(&irq.to_le_bytes());
            assert!(find(&int), "irq {irq}");
        }
    }
}
