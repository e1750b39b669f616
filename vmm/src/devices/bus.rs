//! A bus maps address ranges (I/O ports or guest-physical MMIO addresses) to devices. A vCPU exit
//! for an address is passed to the device that owns it, with the offset into its range.

use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the start of the device's range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range at {base:#x} has zero length")]
    Empty { base: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping device ranges.
#[derive(Default, Clone)]
pub struct Bus {
    entries: Arc<Vec<Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`. Only valid while building (before vCPUs run).
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(BusError::Overlap { base, len });
        }
        let entries = Arc::get_mut(&mut self.entries).expect("bus is only extended while building");
        entries.push(Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        self.entries
            .iter()
            .find(|e| addr >= e.base && addr - e.base < e.len)
            .map(|e| (e, addr - e.base))
    }

    /// Routes a read; returns false (and fills `data` with 0xff, as an open bus reads) when no
    /// device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                lock(&e.device).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write; returns false when no device owns `addr` (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                lock(&e.device).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if another vCPU thread panicked while holding it (a device's
/// state stays usable; the panic itself is reported by that thread).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_owning_device_with_its_offset() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x2f8, 8).unwrap();
        assert!(bus.write(0x3fb, &[7]));
        assert!(bus.write(0x2f8, &[9]));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert_eq!(a.lock().unwrap().writes, vec![(3, vec![7])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0, vec![9])]);
    }

    #[test]
    fn unowned_addresses_read_as_open_bus_and_overlaps_are_refused() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0x10)
            .unwrap();
        let mut d = [0u8; 2];
        assert!(!bus.read(0x200, &mut d));
        assert_eq!(d, [0xff, 0xff]);
        assert!(!bus.write(0x110, &[1]));
        assert!(matches!(
            bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x300, 0),
            Err(BusError::Empty { .. })
        ));
    }
}
