//! Guest memory: anonymous host mappings (vm-memory) registered with KVM as memory slots, split
//! around the 32-bit MMIO hole, with optional dirty-page logging.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest RAM as host mappings.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors from creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Mmap {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused memory slot {slot}: {source}")]
    SetRegion {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("reading the dirty log of slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// The guest-physical RAM ranges for `size` bytes of memory: below the MMIO hole first, the rest
/// from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Maps `size` bytes of anonymous memory for a guest.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(size))
        .map_err(|source| MemoryError::Mmap { size, source })
}

/// Registers every region of `mem` with KVM, slot `i` for region `i`.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = mem
            .get_host_address(region.start_addr())
            .expect("a region's own start address is always mapped");
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [host, host + len) is a live mapping owned by `mem`, and the
        // caller keeps `mem` alive for as long as the VM (the `Vm` type holds both together).
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::SetRegion { slot, source })?;
    }
    Ok(())
}

/// Guest-physical addresses of the pages written since the last call, for every slot.
/// Needs the memory to have been registered with `log_dirty`.
pub fn dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<GuestAddress>, MemoryError> {
    const PAGE: u64 = 4096;
    let mut pages = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let bitmap = vm
            .get_dirty_log(slot, region.len() as usize)
            .map_err(|source| MemoryError::DirtyLog { slot, source })?;
        for (word_idx, word) in bitmap.iter().enumerate() {
            let mut w = *word;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                let page = word_idx as u64 * 64 + bit;
                pages.push(GuestAddress(region.start_addr().0 + page * PAGE));
            }
        }
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_from_zero() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }
}
