//! The CPUID a guest sees: what KVM supports, plus the topology and hypervisor bits that KVM
//! leaves to the VMM.

use kvm_bindings::CpuId;

/// Leaf 1 ECX bit 31: "running under a hypervisor". KVM_GET_SUPPORTED_CPUID leaves it clear;
/// without it Linux looks for no kvm-clock and its TSC calibration goes wrong.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Adjusts the supported CPUID for vCPU `index` of `count`.
pub fn configure(cpuid: &mut CpuId, index: u8, count: u8) {
    let shift = if count <= 1 {
        0
    } else {
        (count as u32).next_power_of_two().trailing_zeros()
    };
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                // EBX: initial APIC ID [31:24], logical processors per package [23:16].
                entry.ebx = (entry.ebx & 0xffff) | ((index as u32) << 24) | ((count as u32) << 16);
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            0xb => {
                // Extended topology: level 0 = SMT (one thread per core), level 1 = cores.
                entry.edx = index as u32;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = shift;
                        entry.ebx = count as u32;
                        entry.ecx = (2 << 8) | 1;
                    }
                    i => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = i;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of cores - 1 in ECX[7:0], APIC ID size in ECX[15:12].
                entry.ecx = (entry.ecx & !0xf0ff) | (shift << 12) | (count as u32 - 1);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn sets_hypervisor_bit_apic_id_and_topology() {
        let mut cpuid = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
        ])
        .unwrap();
        configure(&mut cpuid, 1, 2);
        let e = cpuid.as_slice();
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(e[0].ebx >> 24, 1, "APIC ID of vCPU 1");
        assert_eq!((e[0].ebx >> 16) & 0xff, 2);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(e[1].edx, 1);
        assert_eq!(e[2].ebx, 2);
        assert_eq!(e[2].eax, 1);
        assert_eq!(e[3].ecx & 0xff, 1);
    }
}
