//! x86-64 CPU state for booting Linux: CPUID, registers, descriptor and page tables, LAPIC.

pub mod cpuid;
pub mod regs;
