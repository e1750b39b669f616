//! Virtio devices and their transport.
//!
//! A device ([`VirtioDevice`]) knows its type, queues, feature bits and configuration space, and
//! serves its queues once the driver has set them up; the transport ([`mmio::MmioTransport`],
//! virtio-mmio version 2) owns the register window, the queue configuration, the status
//! handshake and the notification and interrupt plumbing (an ioeventfd per queue, an irqfd).
//!
//! On activation a device receives, per queue, the [`virtio_queue::Queue`] the driver configured
//! and the eventfd that fires when the driver notifies it, plus the [`Interrupt`] to raise. An
//! emulated device serves them on its own thread ([`Worker`]); a device with an in-kernel or
//! external backend (vhost) hands the same eventfds and the interrupt's irqfd to that backend.
//!
//! - [`mmio`]: the virtio-mmio register window on the MMIO bus.
//! - [`block`]: virtio-blk backed by a raw file.
//! - [`vsock`]: virtio-vsock served by the host kernel's vhost-vsock.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vhost;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

/// Device types (virtio 1.2, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const VSOCK: u32 = 19;
}

/// Device-independent feature bits (virtio 1.2, section 6).
pub mod features {
    /// Descriptors may point to indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// The used and available rings carry event indices (notification suppression).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// The device follows virtio 1.0 or later (required by the modern mmio transport).
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// InterruptStatus bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Errors of virtio devices and their transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot set up the device thread's epoll: {0}")]
    Epoll(std::io::Error),
    #[error("cannot start the device thread {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("the device got {got} queues; it needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("queue {0} is not ready or not valid in guest memory")]
    QueueInvalid(usize),
    #[error("device backend: {0}")]
    Backend(String),
}

/// How a device interrupts its driver: a bit in the transport's InterruptStatus register, and
/// an edge on the device's interrupt line through an irqfd registered with KVM.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tells the driver that a queue's used ring has new entries.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        // A failed write (counter overflow) means an interrupt is pending anyway.
        let _ = self.irqfd.write(1);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The irqfd, for a backend that raises the interrupt itself (vhost's call fd).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// Copies a device's configuration space `config` from `offset` into `data`; bytes past its end
/// read as 0, as [`VirtioDevice::read_config`] promises.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// One queue handed to a device at activation.
pub struct ActiveQueue {
    /// The queue as the driver configured it.
    pub queue: Queue,
    /// Fires when the driver notifies this queue (the ioeventfd registered with KVM).
    pub notify: EventFd,
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (including [`features::VERSION_1`]).
    fn features(&self) -> u64;

    /// The features the driver accepted (a subset of [`VirtioDevice::features`]), before
    /// activation.
    fn ack_features(&mut self, _features: u64) {}

    /// Reads the device's configuration space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device's configuration space (ignored where it is read-only).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Starts serving the queues (the driver set DRIVER_OK). `queues` holds one queue per
    /// entry of [`VirtioDevice::queue_max_sizes`], in that order: the transport checks
    /// ([`check_queue_count`]) before calling.
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: std::sync::Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), VirtioError>;

    /// Stops serving the queues and forgets them (the driver wrote 0 to Status, or the VM
    /// stops). The device can be activated again afterwards.
    fn reset(&mut self);
}

/// Refuses `got` queues for `device` unless it is one per entry of its
/// [`VirtioDevice::queue_max_sizes`]: what a transport checks before [`VirtioDevice::activate`].
pub fn check_queue_count(device: &dyn VirtioDevice, got: usize) -> Result<(), VirtioError> {
    let want = device.queue_max_sizes().len();
    if got != want {
        return Err(VirtioError::QueueCount { got, want });
    }
    Ok(())
}

/// A device thread: waits on the queues' notification eventfds and calls a handler with the
/// index of each queue that was notified, until stopped.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts thread `name`, calling `handler(queue_index)` for each notification on
    /// `notify[queue_index]`.
    pub fn spawn<F>(name: &str, notify: Vec<EventFd>, mut handler: F) -> Result<Self, VirtioError>
    where
        F: FnMut(usize) + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
        let epoll = Epoll::new().map_err(VirtioError::Epoll)?;
        let stop_token = notify.len() as u64;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(VirtioError::Epoll)
        };
        use std::os::fd::AsRawFd;
        add(stop.as_raw_fd(), stop_token)?;
        for (i, evt) in notify.iter().enumerate() {
            add(evt.as_raw_fd(), i as u64)?;
        }
        let stop_thread = stop.try_clone().map_err(VirtioError::EventFd)?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _keep = stop_thread;
                let mut events = vec![EpollEvent::default(); notify.len() + 1];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    for ev in &events[..n] {
                        let token = ev.data();
                        if token == stop_token {
                            return;
                        }
                        if let Some(evt) = notify.get(token as usize) {
                            // Drain the counter; kicks that arrive meanwhile fire again.
                            let _ = evt.read();
                            handler(token as usize);
                        }
                    }
                }
            })
            .map_err(|source| VirtioError::Spawn {
                name: name.to_string(),
                source,
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn worker_calls_the_handler_per_notified_queue_and_stops() {
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let kick1 = evts[1].try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        let mut w = Worker::spawn("test-worker", evts, move |q| {
            let _ = tx.send(q);
        })
        .unwrap();
        kick1.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(1));
        w.stop();
        // The handler (and its sender) are gone with the thread.
        assert!(rx.recv_timeout(Duration::from_secs(1)).is_err());
    }

    #[test]
    fn interrupt_status_is_raised_and_acked() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Interrupt::new(fd.try_clone().unwrap());
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), INT_USED_RING | INT_CONFIG_CHANGE);
        assert_eq!(fd.read().unwrap(), 2);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG_CHANGE);
    }
}
