//! VMM mechanics proven with tiny hand-made guests on the local KVM (PVM is fine for these: they
//! run a few instructions and exit on I/O). Each guest is a handful of bytes assembled from the
//! listing next to it.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use ferry_vmm::arch::regs;
use ferry_vmm::devices::i8042::I8042;
use ferry_vmm::devices::power::AcpiSleep;
use ferry_vmm::devices::serial::SerialPort;
use ferry_vmm::devices::{BusDevice, VmExit};
use ferry_vmm::layout::{ports, ZERO_PAGE_START};
use ferry_vmm::memory::MemoryError;
use ferry_vmm::vcpu::{Step, Vcpu};
use ferry_vmm::Machine;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 4 << 20;
const CODE: u64 = 0x3000;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);
impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An MMIO device that records writes and answers reads with a fixed pattern.
#[derive(Default)]
struct Probe {
    writes: Vec<(u64, Vec<u8>)>,
}
impl BusDevice for Probe {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let v = 0x1122_3344_5566_7788u64.to_le_bytes();
        data.copy_from_slice(&v[..data.len()]);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

fn machine(log_dirty: bool) -> Machine {
    Machine::new(MEM, log_dirty).expect(
        "these tests need /dev/kvm (any KVM, PVM included); open it as root or from the kvm group",
    )
}

fn serial(m: &mut Machine, port: u16) -> Capture {
    let out = Capture::default();
    let dev = SerialPort::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
    m.add_pio(Arc::new(Mutex::new(dev)), port, 8).unwrap();
    out
}

fn run_to_halt(vcpu: &mut Vcpu) {
    for _ in 0..10_000 {
        match vcpu.step().unwrap() {
            Step::Continue => {}
            Step::Halted => return,
            Step::Exit(e) => panic!("guest ended the VM unexpectedly: {e:?}"),
        }
    }
    panic!("guest did not halt");
}

/// Long-mode vCPU at `CODE`, set up exactly as for a Linux kernel.
fn long_mode_vcpu(m: &Machine, code: &[u8]) -> Vcpu {
    m.memory.write_slice(code, GuestAddress(CODE)).unwrap();
    regs::write_boot_tables(&m.memory).unwrap();
    let vcpu = m.create_vcpu(0).unwrap();
    regs::setup_boot_cpu(&vcpu.fd, CODE).unwrap();
    vcpu
}

#[test]
fn real_mode_port_io_reaches_the_serial_console() {
    let mut m = machine(false);
    let out = serial(&mut m, ports::COM1);
    // mov dx, 0x3f8; mov al, 'H'; out dx, al; mov al, 'i'; out dx, al; hlt
    let code = [0xba, 0xf8, 0x03, 0xb0, b'H', 0xee, 0xb0, b'i', 0xee, 0xf4];
    m.memory.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let mut vcpu = m.create_vcpu(0).unwrap();
    let mut sregs = vcpu.fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.fd.set_sregs(&sregs).unwrap();
    let mut r = vcpu.fd.get_regs().unwrap();
    r.rip = 0x1000;
    r.rflags = 2;
    vcpu.fd.set_regs(&r).unwrap();
    run_to_halt(&mut vcpu);
    assert_eq!(out.0.lock().unwrap().as_slice(), b"Hi");
}

#[test]
fn long_mode_boot_state_mmio_and_dirty_log() {
    let mut m = machine(true);
    let probe = Arc::new(Mutex::new(Probe::default()));
    m.mmio.insert(probe.clone(), 0xd000_0000, 0x1000).unwrap();
    let com2 = serial(&mut m, ports::COM2);
    // movabs rax, 0xd0000000; mov [rax], rsi; mov rcx, [rax+8]; mov [rax+16], rcx
    // mov rbx, 0x10000; mov byte [rbx], 1   (and the same for 0x11000 and 0x15000)
    // mov dx, 0x2f8; mov al, 'O'; out dx, al; hlt
    let code = [
        0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x48, 0x89, 0x30, 0x48, 0x8b,
        0x48, 0x08, 0x48, 0x89, 0x48, 0x10, 0x48, 0xc7, 0xc3, 0x00, 0x00, 0x01, 0x00, 0xc6, 0x03,
        0x01, 0x48, 0xc7, 0xc3, 0x00, 0x10, 0x01, 0x00, 0xc6, 0x03, 0x01, 0x48, 0xc7, 0xc3, 0x00,
        0x50, 0x01, 0x00, 0xc6, 0x03, 0x01, 0x66, 0xba, 0xf8, 0x02, 0xb0, 0x4f, 0xee, 0xf4,
    ];
    let mut vcpu = long_mode_vcpu(&m, &code);
    // Loading the code dirtied pages from the host side only: KVM logs guest writes alone.
    let before = m.dirty_pages().unwrap();
    assert!(!before.contains(&GuestAddress(0x10000)));
    run_to_halt(&mut vcpu);

    // The guest ran in 64-bit mode with paging, and RSI held the zero page, as Linux expects.
    let sregs = vcpu.fd.get_sregs().unwrap();
    assert_eq!(sregs.cs.l, 1);
    assert_ne!(sregs.efer & (1 << 10), 0, "EFER.LMA");
    let writes = &probe.lock().unwrap().writes;
    assert_eq!(writes[0], (0, ZERO_PAGE_START.to_le_bytes().to_vec()));
    // An MMIO read returned the device's answer, which the guest wrote back.
    assert_eq!(
        writes[1],
        (16, 0x1122_3344_5566_7788u64.to_le_bytes().to_vec())
    );
    assert_eq!(com2.0.lock().unwrap().as_slice(), b"O");

    let dirty = m.dirty_pages().unwrap();
    for page in [0x10000, 0x11000, 0x15000] {
        assert!(dirty.contains(&GuestAddress(page)), "{page:#x} written");
    }
    assert!(!dirty.contains(&GuestAddress(0x12000)), "0x12000 untouched");
    assert!(!dirty.contains(&GuestAddress(0x20000)), "0x20000 untouched");
    // The log is cleared by reading it.
    assert!(!m.dirty_pages().unwrap().contains(&GuestAddress(0x10000)));
}

#[test]
fn dirty_log_switched_on_while_the_vm_exists() {
    // A VM made without logging (as every node's is); a migration switches it on and off.
    let mut m = machine(false);
    let com2 = serial(&mut m, ports::COM2);
    // mov rbx, 0x10000; mov byte [rbx], 1; (0x11000, 0x15000 too); out 'O' to COM2; hlt
    let code = [
        0x48, 0xc7, 0xc3, 0x00, 0x00, 0x01, 0x00, 0xc6, 0x03, 0x01, 0x48, 0xc7, 0xc3, 0x00, 0x10,
        0x01, 0x00, 0xc6, 0x03, 0x01, 0x48, 0xc7, 0xc3, 0x00, 0x50, 0x01, 0x00, 0xc6, 0x03, 0x01,
        0x66, 0xba, 0xf8, 0x02, 0xb0, 0x4f, 0xee, 0xf4,
    ];
    let mut vcpu = long_mode_vcpu(&m, &code);
    let log = m.dirty_log();
    assert!(m.dirty_pages().is_err(), "no log before it is switched on");
    let tracking = log.start().unwrap();
    assert!(
        matches!(log.start(), Err(MemoryError::DirtyLogBusy)),
        "one tracker at a time"
    );
    assert!(tracking.take().unwrap().is_empty(), "nothing written yet");
    run_to_halt(&mut vcpu);
    assert_eq!(com2.0.lock().unwrap().as_slice(), b"O");
    let dirty = tracking.take().unwrap();
    for pfn in [0x10, 0x11, 0x15] {
        assert!(dirty.contains(&pfn), "frame {pfn:#x} written: {dirty:?}");
    }
    assert!(!dirty.contains(&0x12), "frame 0x12 untouched");
    assert!(
        tracking.take().unwrap().is_empty(),
        "reading clears the log"
    );
    drop(tracking);
    assert!(m.dirty_pages().is_err(), "switched off again");
    let again = log.start().expect("a new tracker once the first is gone");
    assert!(again.take().unwrap().is_empty());
}

#[test]
fn guest_power_off_through_the_acpi_sleep_register() {
    let mut m = machine(false);
    let exit = m.exit.clone();
    m.add_pio(
        Arc::new(Mutex::new(AcpiSleep::new(exit.clone()))),
        ports::ACPI_SLEEP,
        2,
    )
    .unwrap();
    // mov dx, 0x600; mov al, (5 << 2) | SLP_EN; out dx, al; hlt
    let mut vcpu = long_mode_vcpu(&m, &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4]);
    run_to_halt(&mut vcpu);
    assert_eq!(exit.get(), Some(VmExit::PowerOff));
}

#[test]
fn guest_reset_through_the_i8042() {
    let mut m = machine(false);
    let exit = m.exit.clone();
    m.add_pio(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        ports::I8042,
        5,
    )
    .unwrap();
    // mov al, 0xfe; out 0x64, al; hlt
    let mut vcpu = long_mode_vcpu(&m, &[0xb0, 0xfe, 0xe6, 0x64, 0xf4]);
    run_to_halt(&mut vcpu);
    assert_eq!(exit.get(), Some(VmExit::Reset));
}

/// A virtio-mmio window reached through real vCPU MMIO exits: the guest reads the magic value
/// through a VM exit, and its queue notification is caught by KVM's ioeventfd (no exit at all)
/// and lands on the queue's eventfd.
#[test]
fn virtio_mmio_window_answers_and_queue_kicks_skip_the_vmm() {
    use ferry_vmm::devices::virtio::block::{Block, Disk};
    use ferry_vmm::layout::MmioAllocator;

    let mut m = machine(false);
    m.fd.create_irq_chip().unwrap();
    let disk_path = std::env::temp_dir().join(format!("ferry-tiny-blk-{}", std::process::id()));
    std::fs::write(&disk_path, vec![0u8; 4096]).unwrap();
    let disk = Disk::open(&disk_path, true).unwrap();
    let _ = std::fs::remove_file(&disk_path);
    let slot = MmioAllocator::new().allocate().unwrap();
    assert_eq!(slot.base, 0xd000_0000);
    let transport = m
        .add_virtio_mmio(Box::new(Block::new(disk, "tiny-blk")), slot)
        .unwrap();
    let com2 = serial(&mut m, ports::COM2);
    // movabs rax, 0xd0000000; mov ecx, [rax]; mov rbx, 0x10000; mov [rbx], ecx
    // mov dword [rax+0x50], 0   (QueueNotify, queue 0)
    // mov dx, 0x2f8; mov al, 'O'; out dx, al; hlt
    let code = [
        0x48, 0xb8, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x8b, 0x08, 0x48, 0xc7, 0xc3,
        0x00, 0x00, 0x01, 0x00, 0x89, 0x0b, 0xc7, 0x40, 0x50, 0x00, 0x00, 0x00, 0x00, 0x66, 0xba,
        0xf8, 0x02, 0xb0, 0x4f, 0xee, 0xf4,
    ];
    let mut vcpu = long_mode_vcpu(&m, &code);
    // With the in-kernel irqchip HLT stays in KVM: run until the port write instead.
    let mut exits = 0;
    while com2.0.lock().unwrap().is_empty() {
        assert_eq!(vcpu.step().unwrap(), Step::Continue);
        exits += 1;
        assert!(exits < 100, "the guest never reached its port write");
    }
    let magic: u32 = m.memory.read_obj(GuestAddress(0x10000)).unwrap();
    assert_eq!(
        magic, 0x7472_6976,
        "the guest read \"virt\" from the window"
    );
    // One exit for the MMIO read, one for the port write: the notification made none.
    assert_eq!(exits, 2);
    let t = transport.lock().unwrap();
    assert_eq!(
        t.notify_eventfds()[0].read().unwrap(),
        1,
        "the kick reached the eventfd"
    );
}
