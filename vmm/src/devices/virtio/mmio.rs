//! The virtio-mmio transport, version 2 ("modern"; virtio 1.2, section 4.2.2): a 4 KiB register
//! window on the MMIO bus in front of one [`VirtioDevice`].
//!
//! The driver negotiates features, sets up each queue (size, descriptor table, available and used
//! rings, ready), then sets DRIVER_OK, which activates the device. Queue notifications arrive on
//! one eventfd per queue, registered with KVM as an ioeventfd on the QueueNotify register (with
//! the queue index as datamatch), so a kick never stops a vCPU; a notification that reaches this
//! window anyway (no ioeventfd) is forwarded to the same eventfd. Interrupts go through the
//! device's [`Interrupt`] (InterruptStatus plus an irqfd).
//!
//! Everything the guest writes here is checked: unknown registers, wrong access sizes, queue
//! indices out of range and configuration after DRIVER_OK are ignored.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{features, status, ActiveQueue, Interrupt, VirtioDevice, VirtioError};
use crate::devices::BusDevice;
use crate::memory::GuestMemoryMmap;

/// Size of one device's register window.
pub const WINDOW_SIZE: u64 = 0x1000;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// "virt", little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern transport.
pub const MMIO_VERSION: u32 = 2;
/// "FRRY", little-endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"FRRY");

/// One device's virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    /// A transport for `device`, raising interrupts through `irqfd` (an eventfd the caller
    /// registers with KVM for the device's interrupt line).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        irqfd: EventFd,
    ) -> Result<Self, VirtioError> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for &max in device.queue_max_sizes() {
            // Queue::new only refuses sizes that are not a power of two or above 32768: a
            // device bug, reported as an invalid queue.
            let q = Queue::new(max).map_err(|_| VirtioError::QueueInvalid(queues.len()))?;
            queues.push(q);
            notify.push(EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?);
        }
        Ok(Self {
            device,
            memory,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            notify,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// The per-queue notification eventfds, in queue order, to register as ioeventfds on
    /// [`reg::QUEUE_NOTIFY`] with the queue index as datamatch.
    pub fn notify_eventfds(&self) -> &[EventFd] {
        &self.notify
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is serving its queues.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Resets the device and the transport (the driver wrote 0 to Status, or the VM stops):
    /// device threads are stopped and joined.
    pub fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn device_features_word(&self) -> u32 {
        let f = self.device.features();
        match self.device_features_sel {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => self.device_features_word(),
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc_table() as u32),
            reg::QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc_table() >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => queue.map_or(0, |q| q.avail_ring() as u32),
            reg::QUEUE_DRIVER_HIGH => queue.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => queue.map_or(0, |q| q.used_ring() as u32),
            reg::QUEUE_DEVICE_HIGH => queue.map_or(0, |q| (q.used_ring() >> 32) as u32),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: a length of all ones says "none".
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let configurable = self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if configurable => {
                // virtio-queue ignores sizes that are not a power of two or above the maximum;
                // activation then finds the queue invalid.
                if let Some(q) = self.selected_queue() {
                    q.set_size(v.min(u32::from(u16::MAX)) as u16);
                }
            }
            reg::QUEUE_READY if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if configurable => {
                let high = offset == reg::QUEUE_DESC_HIGH;
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address((!high).then_some(v), high.then_some(v));
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH if configurable => {
                let high = offset == reg::QUEUE_DRIVER_HIGH;
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address((!high).then_some(v), high.then_some(v));
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH if configurable => {
                let high = offset == reg::QUEUE_DEVICE_HIGH;
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address((!high).then_some(v), high.then_some(v));
                }
            }
            reg::QUEUE_NOTIFY => {
                if let Some(evt) = self.notify.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = v;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & features::VERSION_1 != 0;
            if ok {
                self.device.ack_features(self.driver_features);
            } else {
                // The driver reads Status back and gives up on the device.
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if new & status::FEATURES_OK == 0 {
                new &= !status::DRIVER_OK;
            } else if let Err(_e) = self.activate() {
                new |= status::DEVICE_NEEDS_RESET;
                self.status = new;
                self.interrupt.signal_config_change();
                return;
            }
        }
        self.status = new;
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.memory) {
                return Err(VirtioError::QueueInvalid(i));
            }
        }
        let mut active = Vec::with_capacity(self.queues.len());
        for (q, evt) in self.queues.iter().zip(&self.notify) {
            active.push(ActiveQueue {
                // The device gets its own copy; the transport keeps the registers' values.
                queue: Queue::try_from(q.state())
                    .map_err(|_| VirtioError::QueueInvalid(active.len()))?,
                notify: evt.try_clone().map_err(VirtioError::EventFd)?,
            });
        }
        super::check_queue_count(self.device.as_ref(), active.len())?;
        self.device
            .activate(self.memory.clone(), self.interrupt.clone(), active)?;
        self.active = true;
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            data.fill(0);
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset.is_multiple_of(4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what the transport does to it.
    #[derive(Default)]
    struct Log {
        acked: Option<u64>,
        activated: Vec<(usize, u16, u64, u64, u64)>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct Fake {
        log: Arc<Mutex<Log>>,
        sizes: Vec<u16>,
        /// Once set, the device reports `grown` as its queues (a device bug the transport
        /// must catch).
        grow: Arc<std::sync::atomic::AtomicBool>,
        grown: Vec<u16>,
    }

    const FAKE_FEATURES: u64 = features::VERSION_1 | 1 << 3;

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            if self.grow.load(std::sync::atomic::Ordering::Relaxed) {
                &self.grown
            } else {
                &self.sizes
            }
        }
        fn features(&self) -> u64 {
            FAKE_FEATURES
        }
        fn ack_features(&mut self, f: u64) {
            self.log.lock().unwrap().acked = Some(f);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8).wrapping_add(0xa0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _m: GuestMemoryMmap,
            _i: Arc<Interrupt>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), VirtioError> {
            let mut log = self.log.lock().unwrap();
            for (i, q) in queues.iter().enumerate() {
                let q = &q.queue;
                if q.ready() {
                    log.activated.push((
                        i,
                        q.size(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring(),
                    ));
                }
            }
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Log>>, EventFd) {
        let (t, log, irq, _) = growing_transport();
        (t, log, irq)
    }

    /// A transport whose device reports a third queue once the flag is set.
    fn growing_transport() -> (
        MmioTransport,
        Arc<Mutex<Log>>,
        EventFd,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let log = Arc::new(Mutex::new(Log::default()));
        let mem = crate::memory::create(1 << 20).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let grow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = MmioTransport::new(
            Box::new(Fake {
                log: log.clone(),
                sizes: vec![256, 16],
                grow: grow.clone(),
                grown: vec![256, 16, 16],
            }),
            mem,
            irq.try_clone().unwrap(),
        )
        .unwrap();
        (t, log, irq, grow)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// The Linux driver's sequence: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, driver_features: u64) -> u32 {
        wr(t, reg::STATUS, 0);
        wr(t, reg::STATUS, status::ACKNOWLEDGE);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, driver_features as u32);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (driver_features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(t, reg::STATUS, s);
        rd(t, reg::STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        wr(t, reg::QUEUE_SEL, index);
        wr(t, reg::QUEUE_NUM, size);
        wr(t, reg::QUEUE_DESC_LOW, base as u32);
        wr(t, reg::QUEUE_DESC_HIGH, 0);
        wr(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        wr(t, reg::QUEUE_DRIVER_HIGH, 0);
        wr(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        wr(t, reg::QUEUE_DEVICE_HIGH, 0);
        wr(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), FAKE_FEATURES as u32);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 16);
        wr(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");
        assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX, "no shared memory");
        // Narrow register reads give nothing; config space may be read bytewise.
        let mut b = [0xffu8; 1];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0]);
        t.read(reg::CONFIG + 2, &mut b);
        assert_eq!(b, [0xa2]);
        t.write(reg::CONFIG + 1, &[9, 8]);
    }

    #[test]
    fn features_ok_only_for_a_subset_with_version_1() {
        let (mut t, log, _) = transport();
        // Without VERSION_1: refused (a legacy driver).
        assert_eq!(negotiate(&mut t, 1 << 3) & status::FEATURES_OK, 0);
        // A feature the device never offered: refused.
        assert_eq!(
            negotiate(&mut t, FAKE_FEATURES | 1 << 5) & status::FEATURES_OK,
            0
        );
        assert_eq!(log.lock().unwrap().acked, None);
        // A proper subset: accepted and passed to the device.
        assert_ne!(
            negotiate(&mut t, features::VERSION_1) & status::FEATURES_OK,
            0
        );
        assert_eq!(log.lock().unwrap().acked, Some(features::VERSION_1));
        // Features cannot change once FEATURES_OK is set.
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 1 << 3);
        assert_eq!(t.driver_features, features::VERSION_1);
    }

    #[test]
    fn driver_ok_activates_with_the_queues_as_configured_and_zero_resets() {
        let (mut t, log, irq) = transport();
        let s = negotiate(&mut t, FAKE_FEATURES);
        setup_queue(&mut t, 0, 128, 0x10000);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        assert_eq!(rd(&mut t, reg::QUEUE_DESC_LOW), 0x10000);
        assert_eq!(rd(&mut t, reg::QUEUE_DEVICE_LOW), 0x12000);
        wr(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert_eq!(rd(&mut t, reg::STATUS), s | status::DRIVER_OK);
        assert!(t.is_active());
        assert_eq!(
            log.lock().unwrap().activated,
            vec![(0, 128, 0x10000, 0x11000, 0x12000)]
        );
        // After DRIVER_OK the queues are fixed.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(rd(&mut t, reg::QUEUE_DESC_LOW), 0x10000);
        // A notification written to the window reaches the queue's eventfd.
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(t.notify_eventfds()[0].read().unwrap(), 1);
        wr(&mut t, reg::QUEUE_NOTIFY, 9); // no such queue: ignored
                                          // Interrupt status and acknowledge.
        t.interrupt.signal_used_queue();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 1);
        wr(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        // Reset.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert!(!t.is_active());
        assert_eq!(log.lock().unwrap().resets, 1);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn driver_ok_without_features_ok_or_with_a_bad_queue_does_not_activate() {
        let (mut t, log, _) = transport();
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS) & status::DRIVER_OK, 0);
        assert!(!t.is_active());

        // A ready queue whose rings lie outside guest memory (1 MiB here).
        let s = negotiate(&mut t, FAKE_FEATURES);
        setup_queue(&mut t, 0, 128, 0x4000_0000);
        wr(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!t.is_active());
        assert!(log.lock().unwrap().activated.is_empty());

        // A queue size that is not a power of two is not taken.
        let s = negotiate(&mut t, FAKE_FEATURES);
        setup_queue(&mut t, 0, 100, 0x10000);
        wr(&mut t, reg::STATUS, s | status::DRIVER_OK);
        let activated = &log.lock().unwrap().activated;
        assert!(activated.iter().all(|a| a.1 != 100), "{activated:?}");
    }

    #[test]
    fn a_device_is_activated_only_with_one_queue_per_declared_size() {
        let (mut t, log, _, grow) = growing_transport();
        let s = negotiate(&mut t, FAKE_FEATURES);
        setup_queue(&mut t, 0, 128, 0x10000);
        grow.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(
            t.activate(),
            Err(VirtioError::QueueCount { got: 2, want: 3 })
        ));
        wr(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!t.is_active());
        assert!(log.lock().unwrap().activated.is_empty());
    }

    #[test]
    fn garbage_accesses_do_not_disturb_the_transport() {
        let (mut t, _, _) = transport();
        for off in (0..reg::CONFIG).step_by(2) {
            t.write(off, &[0xff, 0xff, 0xff, 0xff]);
            t.write(off, &[0xff]);
            t.write(off, &[0xff; 8]);
            let mut d = [0u8; 8];
            t.read(off, &mut d);
        }
        // Still identifies itself, and a fresh reset brings it back to a clean state.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
    }
}
