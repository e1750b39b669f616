//! virtio-vsock backed by the host kernel's vhost-vsock: the guest's vsock sockets reach the
//! host's AF_VSOCK sockets at the guest's context id (CID), with no data passing through the VMM.
//!
//! The VMM negotiates the device, hands the receive and transmit queues with their notification
//! eventfds to `/dev/vhost-vsock`, and keeps the event queue (used only for transport resets).
//! The kernel signals used buffers on a call eventfd per queue; a small worker turns each into
//! the transport's used-ring interrupt, so the driver sees the InterruptStatus bit it checks.

use std::sync::Arc;

use ::vhost::vhost_kern::vsock::Vsock;
use ::vhost::vsock::VhostVsock as _;
use ::vhost::VhostBackend;

use super::{
    device_type, features, vhost, ActiveQueue, Interrupt, VirtioDevice, VirtioError, Worker,
};
use crate::memory::GuestMemoryMmap;

/// Receive, transmit and event queues.
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];

/// Errors specific to vhost-vsock.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(
        "cannot use /dev/vhost-vsock: {0}; load the vhost_vsock module (`modprobe vhost_vsock`)"
    )]
    Open(::vhost::Error),
    #[error("vhost-vsock {op}: {source}")]
    Vhost {
        op: &'static str,
        source: ::vhost::Error,
    },
    #[error("vhost-vsock: {0}")]
    Setup(#[from] vhost::VhostError),
    #[error("vhost-vsock interrupt relay: {0}")]
    Relay(String),
}

impl From<VsockError> for VirtioError {
    fn from(e: VsockError) -> Self {
        VirtioError::Backend(e.to_string())
    }
}

fn vhost_op(op: &'static str) -> impl FnOnce(::vhost::Error) -> VsockError {
    move |source| VsockError::Vhost { op, source }
}

/// Whether this host can offer vhost-vsock devices (the module is loaded).
pub fn available() -> bool {
    std::path::Path::new("/dev/vhost-vsock").exists()
}

/// A virtio-vsock device with the context id `cid`.
pub struct VhostVsockDevice {
    cid: u64,
    acked_features: u64,
    /// Opened and claimed (owner, CID) up front, so a missing module or a CID in use fails the
    /// VM's build; reopened after a reset.
    backend: Option<Backend>,
    running: Option<Running>,
}

type Backend = Vsock<Arc<GuestMemoryMmap>>;

/// What exists while the driver uses the device.
struct Running {
    backend: Backend,
    _worker: Worker,
    _event_queue: ActiveQueue,
}

/// Opens `/dev/vhost-vsock` for `memory` and claims context id `cid`.
fn open_backend(memory: &GuestMemoryMmap, cid: u64) -> Result<Backend, VsockError> {
    let backend = Vsock::new(Arc::new(memory.clone())).map_err(VsockError::Open)?;
    backend.set_owner().map_err(vhost_op("SET_OWNER"))?;
    backend
        .set_guest_cid(cid)
        .map_err(vhost_op("SET_GUEST_CID (is another VM using this CID?)"))?;
    Ok(backend)
}

impl VhostVsockDevice {
    /// A device for context id `cid` (3 or more; 0-2 are reserved) over `memory`.
    pub fn new(cid: u64, memory: &GuestMemoryMmap) -> Result<Self, VsockError> {
        Ok(Self {
            cid,
            acked_features: 0,
            backend: Some(open_backend(memory, cid)?),
            running: None,
        })
    }

    /// The guest's context id.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    fn start(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<Running, VsockError> {
        let backend = match self.backend.take() {
            Some(b) => b,
            None => open_backend(&memory, self.cid)?,
        };
        let mut queues = queues;
        // The event queue comes last (the transport checked the count).
        let event_queue = queues.pop().ok_or(VsockError::Setup(vhost::VhostError {
            op: "event queue",
            source: ::vhost::Error::InvalidQueue,
        }))?;
        let calls = vhost::start_queues(&backend, &memory, self.acked_features, &queues)
            .map_err(VsockError::Setup)?;

        backend.start().map_err(vhost_op("SET_RUNNING"))?;
        let worker = vhost::interrupt_relay("vsock-irq", calls, interrupt)
            .map_err(|e| VsockError::Relay(e.to_string()))?;
        Ok(Running {
            backend,
            _worker: worker,
            _event_queue: event_queue,
        })
    }
}

impl VirtioDevice for VhostVsockDevice {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        features::VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), VirtioError> {
        self.reset();
        self.running = Some(self.start(memory, interrupt, queues)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.backend.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_the_cid_and_reads_past_it_as_zero() {
        let dev = VhostVsockDevice {
            cid: 0x1234_5678_9abc,
            acked_features: 0,
            backend: None,
            running: None,
        };
        let mut all = [0xffu8; 8];
        dev.read_config(0, &mut all);
        assert_eq!(u64::from_le_bytes(all), 0x1234_5678_9abc);
        let mut tail = [0xffu8; 4];
        dev.read_config(5, &mut tail);
        assert_eq!(tail, [0x12, 0, 0, 0]);
        let mut far = [0xffu8; 2];
        dev.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0, 0]);
    }

    #[test]
    fn without_vhost_vsock_the_error_says_which_module_to_load() {
        if available() {
            return; // this host has the module: the error path cannot be reached here
        }
        let mem = crate::memory::create(1 << 20).unwrap();
        let err = VhostVsockDevice::new(3, &mem)
            .err()
            .expect("no /dev/vhost-vsock here");
        assert!(err.to_string().contains("vhost_vsock"), "{err}");
    }

    #[test]
    fn offers_three_queues_and_the_transport_refuses_a_wrong_count() {
        let dev = VhostVsockDevice {
            cid: 3,
            acked_features: 0,
            backend: None,
            running: None,
        };
        assert_eq!(dev.device_type(), device_type::VSOCK);
        assert_eq!(dev.queue_max_sizes().len(), 3);
        assert!(super::super::check_queue_count(&dev, 3).is_ok());
        assert!(matches!(
            super::super::check_queue_count(&dev, 2),
            Err(VirtioError::QueueCount { got: 2, want: 3 })
        ));
    }
}
