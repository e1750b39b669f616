//! One ferry node's hypervisor: a KVM virtual machine built from rust-vmm crates that boots an
//! unmodified Linux kernel.
//!
//! Reading order: [`vm`] assembles a VM (memory, interrupt controllers, devices, kernel, ACPI,
//! vCPUs) and runs it; [`vcpu`] is the run loop; [`boot`] loads the kernel and writes the zero
//! page and ACPI tables; [`arch`] holds the x86-64 CPU state; [`devices`] the emulated devices;
//! [`memory`] guest RAM and KVM's dirty log; [`layout`] the guest-physical map.
//!
//! Unsafe code is confined to [`memory`] (registering host mappings with KVM).

pub mod arch;
pub mod boot;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod vcpu;
pub mod vm;

pub use boot::{BootSpec, KernelFormat, KernelImage};
pub use devices::VmExit;
pub use vm::{Machine, NicConfig, RunningVm, Vm, VmConfig, VmError};
