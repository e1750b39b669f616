//! A vCPU and its run loop: KVM_RUN, then route the exit to the buses or end the VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::{Bus, ExitRequest, VmExit};

/// Errors from running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_RUN on vCPU {index} failed: {source}")]
    Run {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index} stopped with an exit ferry does not handle: {exit}")]
    UnexpectedExit { index: u8, exit: String },
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
}

/// What one KVM_RUN ended with, once its exit was handled.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Handled (I/O, MMIO, interrupted); run again.
    Continue,
    /// The vCPU executed HLT and KVM gave it back to us (no in-kernel LAPIC).
    Halted,
    /// The VM must stop.
    Exit(VmExit),
}

/// One virtual CPU.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
}

/// The signal that interrupts a vCPU thread's KVM_RUN when the VM stops.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for [`kick_signal`], so that it interrupts KVM_RUN with EINTR
/// instead of killing the process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

impl Vcpu {
    pub fn new(index: u8, fd: VcpuFd, pio: Bus, mmio: Bus) -> Self {
        Self {
            index,
            fd,
            pio,
            mmio,
        }
    }

    /// Runs the guest until its next exit and handles it.
    pub fn step(&mut self) -> Result<Step, VcpuError> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(port as u64, data);
                Ok(Step::Continue)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.pio.read(port as u64, data);
                Ok(Step::Continue)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                Ok(Step::Continue)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.mmio.read(addr, data);
                Ok(Step::Continue)
            }
            Ok(VcpuExit::Hlt) => Ok(Step::Halted),
            Ok(VcpuExit::Shutdown) => Ok(Step::Exit(VmExit::TripleFault(self.describe_state()))),
            Ok(VcpuExit::SystemEvent(kind, _)) => Ok(Step::Exit(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                other => VmExit::Error(format!("vCPU {index}: system event {other}")),
            })),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Ok(Step::Continue),
            Ok(other) => Err(VcpuError::UnexpectedExit {
                index,
                exit: format!("{other:?}"),
            }),
            // EINTR: a signal (our kick, or the host's); EAGAIN: an AP's first run before its
            // INIT/SIPI arrived. Both mean "run again" (the caller checks for a stop first).
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(Step::Continue),
            Err(source) => Err(VcpuError::Run { index, source }),
        }
    }

    /// The registers that say where a vCPU was, for an error message.
    fn describe_state(&self) -> String {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        match (regs, sregs) {
            (Ok(r), Ok(s)) => format!(
                "vCPU {} at RIP={:#x} RSP={:#x} CR0={:#x} CR2={:#x} CR3={:#x} CR4={:#x} EFER={:#x}",
                self.index, r.rip, r.rsp, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            _ => format!("vCPU {} (registers unreadable)", self.index),
        }
    }

    /// Runs until the VM must stop, raising the reason on `exit`.
    fn run_loop(&mut self, exit: &ExitRequest, stop: &AtomicBool) {
        while !stop.load(Ordering::Acquire) {
            match self.step() {
                Ok(Step::Continue) => {}
                Ok(Step::Halted) => {
                    // With the in-kernel LAPIC, HLT never reaches us; without it a halted vCPU
                    // has nothing left to do.
                    exit.request(VmExit::Error(format!(
                        "vCPU {} halted with no interrupt controller to wake it",
                        self.index
                    )));
                    return;
                }
                Ok(Step::Exit(reason)) => {
                    exit.request(reason);
                    return;
                }
                Err(e) => {
                    exit.request(VmExit::Error(e.to_string()));
                    return;
                }
            }
        }
    }

    /// Runs this vCPU on its own thread.
    pub fn spawn(
        mut self,
        exit: Arc<ExitRequest>,
        stop: Arc<AtomicBool>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run_loop(&exit, &stop))
            .map_err(|source| VcpuError::Spawn { index, source })
    }
}
