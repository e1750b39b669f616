//! Building a VM in one readable sequence (KVM VM, memory, interrupt controllers, devices,
//! kernel, ACPI, vCPUs) and running it until the guest powers off, resets or is stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::{cpuid, regs};
use crate::boot::{self, acpi, BootSpec};
use crate::devices::i8042::I8042;
use crate::devices::power::{AcpiReset, AcpiSleep};
use crate::devices::serial::{SerialOutput, SerialPort};
use crate::devices::virtio::block::{Block, BlockError, Disk};
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::net::VhostNetDevice;
use crate::devices::virtio::vsock::VhostVsockDevice;
use crate::devices::virtio::{VirtioDevice, VirtioError};
use crate::devices::{Bus, BusDevice, ExitRequest, VmExit};
use crate::layout::{irqs, ports, LayoutError, MmioAllocator, MmioSlot, KVM_TSS_ADDRESS};
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::vcpu::{self, Vcpu, VcpuError};

/// Errors from building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}; check that KVM is enabled and that you may use it (root, or the kvm group)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0} vCPUs requested; ferry supports 1 to {max}", max = MAX_VCPUS)]
    VcpuCount(u8),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("device setup: {0}")]
    Device(String),
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error("virtio device setup")]
    Virtio(#[from] VirtioError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Most vCPUs a VM may have (APIC IDs are one byte; the MADT lists each).
pub const MAX_VCPUS: u8 = 64;

/// A KVM VM with its memory and buses, but no devices or vCPUs yet: the base that both Linux
/// guests and the tests' tiny hand-made guests are built on.
pub struct Machine {
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub memory: GuestMemoryMmap,
    pub mem_size: u64,
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitRequest>,
    dirty_log: memory::DirtyLog,
}

impl Machine {
    /// Opens KVM, creates a VM and gives it `mem_size` bytes of RAM.
    pub fn new(mem_size: u64, log_dirty: bool) -> Result<Self, VmError> {
        let kvm_sys = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = Arc::new(kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?);
        let memory = memory::create(mem_size)?;
        memory::register(&fd, &memory, log_dirty)?;
        Ok(Self {
            kvm: kvm_sys,
            dirty_log: memory::DirtyLog::new(fd.clone(), memory.clone()),
            fd,
            memory,
            mem_size,
            pio: Bus::new(),
            mmio: Bus::new(),
            exit: Arc::new(ExitRequest::new()),
        })
    }

    /// Creates vCPU `index`, wired to this machine's buses.
    pub fn create_vcpu(&self, index: u8) -> Result<Vcpu, VmError> {
        let fd = self
            .fd
            .create_vcpu(index as u64)
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        Ok(Vcpu::new(index, fd, self.pio.clone(), self.mmio.clone()))
    }

    /// Adds a device on the I/O-port bus.
    pub fn add_pio(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u16,
        len: u16,
    ) -> Result<(), VmError> {
        self.pio
            .insert(dev, base as u64, len as u64)
            .map_err(|e| VmError::Device(e.to_string()))
    }

    /// Puts `device` behind a virtio-mmio window at `slot`: its interrupt line through an irqfd
    /// (needs the in-kernel irqchip), each queue's notifications through an ioeventfd on the
    /// QueueNotify register, and the window on the MMIO bus.
    pub fn add_virtio_mmio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        slot: MmioSlot,
    ) -> Result<Arc<Mutex<MmioTransport>>, VmError> {
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Device(format!("eventfd for IRQ {}: {e}", slot.irq)))?;
        self.fd
            .register_irqfd(&irqfd, slot.irq)
            .map_err(kvm("KVM_IRQFD"))?;
        let transport = MmioTransport::new(device, self.memory.clone(), irqfd)?;
        let notify = IoEventAddress::Mmio(slot.base + mmio::reg::QUEUE_NOTIFY);
        for (index, evt) in transport.notify_eventfds().iter().enumerate() {
            self.fd
                .register_ioevent(evt, &notify, index as u32)
                .map_err(kvm("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), slot.base, slot.len)
            .map_err(|e| VmError::Device(e.to_string()))?;
        Ok(transport)
    }

    /// A handle on KVM's dirty log of this machine's RAM, to switch it on while the VM runs.
    pub fn dirty_log(&self) -> memory::DirtyLog {
        self.dirty_log.clone()
    }

    /// Guest-physical addresses of the pages written since the last call (needs `log_dirty`).
    pub fn dirty_pages(&self) -> Result<Vec<GuestAddress>, VmError> {
        Ok(memory::dirty_pages(&self.fd, &self.memory)?)
    }
}

/// A disk for the guest: a raw image file behind virtio-blk (`/dev/vda`, `/dev/vdb`, ... in
/// the order given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: std::path::PathBuf,
    pub read_only: bool,
}

/// Everything needed to boot a Linux guest.
pub struct VmConfig {
    pub vcpus: u8,
    pub mem_size: u64,
    pub boot: BootSpec,
    /// Where the console (ttyS0) output goes.
    pub console: SerialOutput,
    /// Where the agent channel (ttyS1) output goes.
    pub agent: SerialOutput,
    /// Track written pages with KVM's dirty log.
    pub log_dirty: bool,
    /// Disks, in guest order.
    pub disks: Vec<DiskConfig>,
    /// A virtio-vsock device (vhost-vsock) with this context id, for the guest agent.
    pub vsock_cid: Option<u64>,
    /// Network interfaces (vhost-net on TAP devices), `eth0` first.
    pub nics: Vec<NicConfig>,
}

/// A guest network interface: the host TAP device it is connected to and its MAC address.
#[derive(Debug)]
pub struct NicConfig {
    /// An open TAP device with a 12-byte virtio-net header (see `ferry_net::Tap`).
    pub tap: std::fs::File,
    pub mac: [u8; 6],
}

/// A built Linux VM, not yet running.
pub struct Vm {
    machine: Machine,
    vcpus: Vec<Vcpu>,
    console: Arc<Mutex<SerialPort>>,
    agent: Arc<Mutex<SerialPort>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

impl Vm {
    /// Builds the VM. Nothing runs until [`Vm::start`]; on error nothing is left behind.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(config.vcpus));
        }
        // Validate the boot inputs before asking the kernel for anything.
        config.boot.check(config.mem_size)?;

        let mut m = Machine::new(config.mem_size, config.log_dirty)?;
        m.fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        m.fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        m.fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm("KVM_CREATE_PIT2"))?;

        let console = Arc::new(Mutex::new(Self::serial(&m, irqs::COM1, config.console)?));
        let agent = Arc::new(Mutex::new(Self::serial(&m, irqs::COM2, config.agent)?));
        m.add_pio(console.clone(), ports::COM1, 8)?;
        m.add_pio(agent.clone(), ports::COM2, 8)?;
        m.add_pio(
            Arc::new(Mutex::new(I8042::new(m.exit.clone()))),
            ports::I8042,
            5,
        )?;
        m.add_pio(
            Arc::new(Mutex::new(AcpiSleep::new(m.exit.clone()))),
            ports::ACPI_SLEEP,
            2,
        )?;
        m.add_pio(
            Arc::new(Mutex::new(AcpiReset::new(m.exit.clone()))),
            ports::ACPI_RESET,
            1,
        )?;

        // Disks are opened before anything runs, so a bad one fails the build of the VM.
        let mut slots = MmioAllocator::new();
        let mut placed = Vec::new();
        let mut virtio = Vec::new();
        for (i, disk) in config.disks.iter().enumerate() {
            let slot = slots.allocate()?;
            let device = Block::new(Disk::open(&disk.path, disk.read_only)?, &format!("blk{i}"));
            virtio.push(m.add_virtio_mmio(Box::new(device), slot)?);
            placed.push(slot);
        }
        for nic in config.nics {
            let slot = slots.allocate()?;
            let device = VhostNetDevice::new(nic.tap, nic.mac)
                .map_err(|e| VmError::Device(e.to_string()))?;
            virtio.push(m.add_virtio_mmio(Box::new(device), slot)?);
            placed.push(slot);
        }
        if let Some(cid) = config.vsock_cid {
            let slot = slots.allocate()?;
            let device = VhostVsockDevice::new(cid, &m.memory)
                .map_err(|e| VmError::Device(e.to_string()))?;
            virtio.push(m.add_virtio_mmio(Box::new(device), slot)?);
            placed.push(slot);
        }

        let rsdp = acpi::write_tables(&m.memory, config.vcpus, &placed)?;
        let entry = boot::load(&m.memory, config.mem_size, &config.boot, rsdp)?;
        regs::write_boot_tables(&m.memory)?;

        let supported = m
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let vcpu = m.create_vcpu(index)?;
            let mut cpuid = supported.clone();
            cpuid::configure(&mut cpuid, index, config.vcpus);
            vcpu.fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
            regs::setup_fpu(&vcpu.fd)?;
            regs::setup_lapic_lint(&vcpu.fd)?;
            if index == 0 {
                // The others wait for the guest's INIT/SIPI, which resets their registers.
                regs::setup_boot_cpu(&vcpu.fd, entry)?;
            }
            vcpus.push(vcpu);
        }
        Ok(Self {
            machine: m,
            vcpus,
            console,
            agent,
            virtio,
        })
    }

    fn serial(m: &Machine, irq: u32, out: SerialOutput) -> Result<SerialPort, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Device(format!("eventfd for IRQ {irq}: {e}")))?;
        m.fd.register_irqfd(&evt, irq).map_err(kvm("KVM_IRQFD"))?;
        Ok(SerialPort::new(evt, out))
    }

    /// The console UART, to queue keyboard input.
    pub fn console(&self) -> Arc<Mutex<SerialPort>> {
        self.console.clone()
    }

    /// The agent channel's UART, to queue requests.
    pub fn agent_port(&self) -> Arc<Mutex<SerialPort>> {
        self.agent.clone()
    }

    /// Starts every vCPU on its own thread.
    pub fn start(self) -> Result<RunningVm, VmError> {
        vcpu::install_kick_handler()
            .map_err(|e| VmError::Device(format!("vCPU kick signal handler: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let exit = self.machine.exit.clone();
        let mut running = RunningVm {
            machine: self.machine,
            threads: Vec::new(),
            stop: stop.clone(),
            virtio: self.virtio,
        };
        for vcpu in self.vcpus {
            match vcpu.spawn(exit.clone(), stop.clone()) {
                Ok(t) => running.threads.push(t),
                Err(e) => {
                    running.stop(VmExit::Stopped);
                    return Err(e.into());
                }
            }
        }
        Ok(running)
    }
}

/// A VM whose vCPUs are running.
pub struct RunningVm {
    machine: Machine,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

impl RunningVm {
    /// The shared exit request: raise it to stop the VM from elsewhere.
    pub fn exit_request(&self) -> Arc<ExitRequest> {
        self.machine.exit.clone()
    }

    /// The machine (memory, KVM VM) underneath.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Blocks until the guest (or anyone holding the exit request) ends the VM, then stops every
    /// vCPU and returns why.
    pub fn wait(mut self) -> VmExit {
        let reason = self.machine.exit.wait();
        self.stop(reason)
    }

    /// Stops every vCPU: raises `reason` if nothing was raised yet, then interrupts KVM_RUN on
    /// each thread until it has left its loop.
    pub fn stop(&mut self, reason: VmExit) -> VmExit {
        self.machine.exit.request(reason);
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            // A kick can land just before the thread enters KVM_RUN, so repeat until it ends.
            while !t.is_finished() {
                let _ = t.kill(vcpu::kick_signal());
                std::thread::sleep(Duration::from_millis(2));
            }
            let _ = t.join();
        }
        // With no vCPU left, stop the device threads (a reset joins them).
        for t in self.virtio.drain(..) {
            crate::devices::bus::lock(&t).reset();
        }
        self.machine
            .exit
            .get()
            .expect("an exit reason was raised above")
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.threads.is_empty() || !self.virtio.is_empty() {
            self.stop(VmExit::Stopped);
        }
    }
}
