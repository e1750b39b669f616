//! Guest memory: anonymous host mappings (vm-memory) registered with KVM as memory slots, split
//! around the 32-bit MMIO hole, with optional dirty-page logging.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

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
    #[error("the dirty log is already in use (one pre-copy migration per node at a time)")]
    DirtyLogBusy,
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

/// Registers every region of `mem` with KVM, slot `i` for region `i`; called again with the
/// same memory, it switches dirty logging on or off.
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

/// KVM's dirty-page log of a VM's memory, switched on only while someone needs it (a pre-copy
/// migration): logging write-protects guest memory and splits huge mappings, a cost a guest
/// should not pay all the time. Clones share the VM; at most one [`DirtyTracking`] is live.
#[derive(Clone)]
pub struct DirtyLog {
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    busy: Arc<Mutex<bool>>,
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog").finish_non_exhaustive()
    }
}

impl DirtyLog {
    /// The log of the VM `vm` whose RAM is `memory` (registered by [`register`]).
    pub fn new(vm: Arc<VmFd>, memory: GuestMemoryMmap) -> Self {
        Self {
            vm,
            memory,
            busy: Arc::new(Mutex::new(false)),
        }
    }

    /// Starts logging guest writes: every page written from now on shows in
    /// [`DirtyTracking::take`]. Logging stops when the tracking is dropped.
    pub fn start(&self) -> Result<DirtyTracking, MemoryError> {
        {
            let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            if *busy {
                return Err(MemoryError::DirtyLogBusy);
            }
            *busy = true;
        }
        if let Err(e) = register(&self.vm, &self.memory, true) {
            let _ = register(&self.vm, &self.memory, false);
            *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = false;
            return Err(e);
        }
        Ok(DirtyTracking { log: self.clone() })
    }
}

/// Dirty logging switched on; dropping it switches logging off.
#[derive(Debug)]
pub struct DirtyTracking {
    log: DirtyLog,
}

impl DirtyTracking {
    /// The guest frames (guest-physical address / 4096) written since logging started or since
    /// the last call.
    pub fn take(&self) -> Result<HashSet<u64>, MemoryError> {
        Ok(dirty_pages(&self.log.vm, &self.log.memory)?
            .into_iter()
            .map(|a| a.0 / 4096)
            .collect())
    }
}

impl Drop for DirtyTracking {
    fn drop(&mut self) {
        // Only the flags change; the regions stay as they are. A failure leaves logging on,
        // which costs speed, not correctness.
        let _ = register(&self.log.vm, &self.log.memory, false);
        *self.log.busy.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }
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
