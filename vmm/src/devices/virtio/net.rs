//! virtio-net backed by the host kernel's vhost-net and a TAP device: frames go between the
//! guest's rings and the TAP without passing through the VMM.

use std::fs::File;
use std::sync::Arc;

use ::vhost::net::VhostNet as _;
use ::vhost::vhost_kern::net::Net;
use ::vhost::VhostBackend;

use super::{
    device_type, features, vhost, ActiveQueue, Interrupt, VirtioDevice, VirtioError, Worker,
};
use crate::memory::GuestMemoryMmap;

/// Receive and transmit queues.
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// The device has a MAC address in its configuration space.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The driver may merge receive buffers (vhost-net handles it).
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;

/// Errors specific to vhost-net.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot use /dev/vhost-net: {0}; load the vhost_net module (`modprobe vhost_net`)")]
    Open(::vhost::Error),
    #[error("vhost-net {op}: {source}")]
    Vhost {
        op: &'static str,
        source: ::vhost::Error,
    },
    #[error("vhost-net: {0}")]
    Setup(#[from] vhost::VhostError),
    #[error("vhost-net interrupt relay: {0}")]
    Relay(String),
}

impl From<NetError> for VirtioError {
    fn from(e: NetError) -> Self {
        VirtioError::Backend(e.to_string())
    }
}

/// Whether this host can offer vhost-net devices (the module is loaded).
pub fn available() -> bool {
    std::path::Path::new("/dev/vhost-net").exists()
}

/// A virtio-net device on TAP `tap` with MAC address `mac`.
pub struct VhostNetDevice {
    mac: [u8; 6],
    tap: File,
    acked_features: u64,
    running: Option<Running>,
}

struct Running {
    backend: Net<Arc<GuestMemoryMmap>>,
    _worker: Worker,
}

impl VhostNetDevice {
    /// A device whose frames go to and come from `tap` (opened with a 12-byte virtio-net header,
    /// as `ferry_net::Tap` does). Fails early if this host has no vhost-net.
    pub fn new(tap: File, mac: [u8; 6]) -> Result<Self, NetError> {
        if !available() {
            return Err(NetError::Open(::vhost::Error::VhostOpen(
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )));
        }
        Ok(Self {
            mac,
            tap,
            acked_features: 0,
            running: None,
        })
    }

    fn start(
        &self,
        memory: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<Running, NetError> {
        let backend = Net::new(Arc::new(memory.clone())).map_err(NetError::Open)?;
        backend.set_owner().map_err(|source| NetError::Vhost {
            op: "SET_OWNER",
            source,
        })?;
        let calls = vhost::start_queues(&backend, &memory, self.acked_features, &queues)?;
        for index in 0..queues.len() {
            backend
                .set_backend(index, Some(&self.tap))
                .map_err(|source| NetError::Vhost {
                    op: "NET_SET_BACKEND",
                    source,
                })?;
        }
        let worker = vhost::interrupt_relay("net-irq", calls, interrupt)
            .map_err(|e| NetError::Relay(e.to_string()))?;
        Ok(Running {
            backend,
            _worker: worker,
        })
    }
}

impl VirtioDevice for VhostNetDevice {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; ... }: only the MAC is offered.
        super::read_config_bytes(&self.mac, offset, data);
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), VirtioError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(VirtioError::QueueCount {
                got: queues.len(),
                want: QUEUE_SIZES.len(),
            });
        }
        self.reset();
        self.running = Some(self.start(memory, interrupt, queues)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(running) = self.running.take() {
            for index in 0..QUEUE_SIZES.len() {
                let _ = running.backend.set_backend(index, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> VhostNetDevice {
        VhostNetDevice {
            mac: [0x02, 0xfe, 10, 77, 0, 2],
            tap: File::open("/dev/null").unwrap(),
            acked_features: 0,
            running: None,
        }
    }

    #[test]
    fn config_space_holds_the_mac() {
        let dev = device();
        let mut mac = [0u8; 6];
        dev.read_config(0, &mut mac);
        assert_eq!(mac, [0x02, 0xfe, 10, 77, 0, 2]);
        let mut past = [0xffu8; 4];
        dev.read_config(4, &mut past);
        assert_eq!(past, [0, 2, 0, 0]);
        assert_ne!(dev.features() & VIRTIO_NET_F_MAC, 0);
        assert_ne!(dev.features() & features::VERSION_1, 0);
    }

    #[test]
    fn a_wrong_queue_count_is_refused() {
        let mut dev = device();
        let mem = crate::memory::create(1 << 20).unwrap();
        let irq = Arc::new(Interrupt::new(
            vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        ));
        assert!(matches!(
            dev.activate(mem, irq, Vec::new()),
            Err(VirtioError::QueueCount { got: 0, want: 2 })
        ));
    }
}
