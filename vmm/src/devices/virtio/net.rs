//! virtio-net backed by the host kernel's vhost-net and a TAP device: frames go between the
//! guest's rings and the TAP without passing through the VMM.
//!
//! Offloads: the device offers checksum and segmentation offloads both ways. vhost-net only
//! carries the virtio-net header between the rings and the TAP, so what it must implement
//! itself (the ring features, merged receive buffers, VERSION_1) is offered only as far as
//! VHOST_GET_FEATURES has it; the offloads are the TAP's work: the guest's large or
//! unchecksummed frames go to the TAP as they are (it takes them with a header whatever its
//! settings), and the TAP hands the guest large or unchecksummed frames only after
//! TUNSETOFFLOAD says the guest's driver takes them, which activation sets from the features
//! the driver accepted. A TAP that refuses an offload at probing is not offered it.

use std::fs::File;
use std::io;
use std::sync::Arc;

use ::vhost::net::VhostNet as _;
use ::vhost::vhost_kern::net::Net;
use ::vhost::VhostBackend;
use ferry_net::tap::{set_offload as set_tap_offload, set_vnet_hdr_len as set_tap_vnet_hdr_len};

use super::{
    device_type, features, vhost, ActiveQueue, Interrupt, VirtioDevice, VirtioError, Worker,
};
use crate::memory::GuestMemoryMmap;

/// Receive and transmit queues.
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Feature bits (virtio 1.2, section 5.1.3).
pub mod net_features {
    use virtio_bindings::virtio_net as n;

    const fn bit(b: u32) -> u64 {
        1 << b
    }
    /// The device takes frames with a partial checksum (the guest leaves it to the host).
    pub const CSUM: u64 = bit(n::VIRTIO_NET_F_CSUM);
    /// The driver takes frames with a partial checksum.
    pub const GUEST_CSUM: u64 = bit(n::VIRTIO_NET_F_GUEST_CSUM);
    /// The device has a MAC address in its configuration space.
    pub const MAC: u64 = bit(n::VIRTIO_NET_F_MAC);
    /// The driver takes TCP segmentation offload frames (IPv4, IPv6), with ECN, UDP
    /// fragmentation offload frames.
    pub const GUEST_TSO4: u64 = bit(n::VIRTIO_NET_F_GUEST_TSO4);
    pub const GUEST_TSO6: u64 = bit(n::VIRTIO_NET_F_GUEST_TSO6);
    pub const GUEST_ECN: u64 = bit(n::VIRTIO_NET_F_GUEST_ECN);
    pub const GUEST_UFO: u64 = bit(n::VIRTIO_NET_F_GUEST_UFO);
    /// The device takes the same from the driver.
    pub const HOST_TSO4: u64 = bit(n::VIRTIO_NET_F_HOST_TSO4);
    pub const HOST_TSO6: u64 = bit(n::VIRTIO_NET_F_HOST_TSO6);
    pub const HOST_ECN: u64 = bit(n::VIRTIO_NET_F_HOST_ECN);
    pub const HOST_UFO: u64 = bit(n::VIRTIO_NET_F_HOST_UFO);
    /// The driver may merge receive buffers.
    pub const MRG_RXBUF: u64 = bit(n::VIRTIO_NET_F_MRG_RXBUF);
}

use net_features as nf;

/// What vhost-net implements itself: offered only where VHOST_GET_FEATURES has it.
const VHOST_HANDLED: u64 =
    features::VERSION_1 | nf::MRG_RXBUF | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC;

/// Offloads of frames from the guest: the TAP takes them with any settings.
const HOST_OFFLOADS: u64 = nf::CSUM | nf::HOST_TSO4 | nf::HOST_TSO6 | nf::HOST_ECN | nf::HOST_UFO;

/// The TAP offload flags (TUNSETOFFLOAD) that let it hand the guest what `acked` (the driver's
/// features) says the driver takes. The TAP knows segmentation only with checksum offload,
/// and ECN only with segmentation, as the spec ties the features (virtio 1.2, 5.1.3.1).
pub fn tap_offloads(acked: u64) -> u32 {
    if acked & nf::GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if acked & nf::GUEST_TSO4 != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if acked & nf::GUEST_TSO6 != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    if acked & nf::GUEST_ECN != 0 && acked & (nf::GUEST_TSO4 | nf::GUEST_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if acked & nf::GUEST_UFO != 0 {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// The guest-receive features a TAP that accepted TUNSETOFFLOAD `flags` can serve.
pub fn guest_offloads(flags: u32) -> u64 {
    if flags & libc::TUN_F_CSUM == 0 {
        return 0;
    }
    let mut f = nf::GUEST_CSUM;
    if flags & libc::TUN_F_TSO4 != 0 {
        f |= nf::GUEST_TSO4;
    }
    if flags & libc::TUN_F_TSO6 != 0 {
        f |= nf::GUEST_TSO6;
    }
    if flags & libc::TUN_F_TSO_ECN != 0 && f & (nf::GUEST_TSO4 | nf::GUEST_TSO6) != 0 {
        f |= nf::GUEST_ECN;
    }
    if flags & libc::TUN_F_UFO != 0 {
        f |= nf::GUEST_UFO;
    }
    f
}

/// The features the device offers, given what vhost-net implements (`vhost`, from
/// VHOST_GET_FEATURES) and the offload flags the TAP accepted (`tap`).
pub fn offered_features(vhost: u64, tap: u32) -> u64 {
    nf::MAC | (vhost & VHOST_HANDLED) | HOST_OFFLOADS | guest_offloads(tap)
}

/// The virtio-net header in front of every frame with features `acked`: `struct
/// virtio_net_hdr_v1` (12 bytes) with VERSION_1 or merged receive buffers, the legacy 10-byte
/// `struct virtio_net_hdr` otherwise. vhost-net leaves it to the TAP, whose header size must
/// match.
pub fn vnet_hdr_len(acked: u64) -> i32 {
    if acked & (features::VERSION_1 | nf::MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

/// Every TUNSETOFFLOAD flag a guest may ask for.
const ALL_TAP_OFFLOADS: u32 =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN | libc::TUN_F_UFO;

/// The largest set of TUNSETOFFLOAD flags `tap` takes (all of them, or without UFO, which
/// kernels 4.14 to 4.19 refused, or checksums only, or none), left off afterwards: nothing
/// is offloaded to the guest before its driver says what it takes.
fn probe_tap_offloads(tap: &File) -> u32 {
    let candidates = [
        ALL_TAP_OFFLOADS,
        ALL_TAP_OFFLOADS & !libc::TUN_F_UFO,
        libc::TUN_F_CSUM,
    ];
    let accepted = candidates
        .into_iter()
        .find(|&flags| set_tap_offload(tap, flags).is_ok())
        .unwrap_or(0);
    let _ = set_tap_offload(tap, 0);
    accepted
}

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
    #[error("TAP {op}: {source}")]
    Tap { op: &'static str, source: io::Error },
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
    /// What the device offers ([`offered_features`]).
    offered: u64,
    acked_features: u64,
    running: Option<Running>,
}

struct Running {
    backend: Net<Arc<GuestMemoryMmap>>,
    _worker: Worker,
}

impl VhostNetDevice {
    /// A device whose frames go to and come from `tap` (opened with IFF_VNET_HDR, as
    /// `ferry_net::Tap` does; its header size is set at activation). Fails early if this host
    /// has no vhost-net. Asks vhost-net what it implements and the TAP which offloads it takes.
    pub fn new(tap: File, mac: [u8; 6]) -> Result<Self, NetError> {
        if !available() {
            return Err(NetError::Open(::vhost::Error::VhostOpen(
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )));
        }
        // VHOST_GET_FEATURES needs no owner and no memory table.
        let probe = Net::new(Arc::new(GuestMemoryMmap::new())).map_err(NetError::Open)?;
        let vhost_features = probe.get_features().map_err(|source| NetError::Vhost {
            op: "GET_FEATURES",
            source,
        })?;
        let offered = offered_features(vhost_features, probe_tap_offloads(&tap));
        Ok(Self {
            mac,
            tap,
            offered,
            acked_features: 0,
            running: None,
        })
    }

    /// Sets the TAP's header size and offloads for the features the driver accepted.
    fn configure_tap(&self) -> Result<(), NetError> {
        let tap = |op| move |source| NetError::Tap { op, source };
        set_tap_vnet_hdr_len(&self.tap, vnet_hdr_len(self.acked_features))
            .map_err(tap("TUNSETVNETHDRSZ"))?;
        set_tap_offload(&self.tap, tap_offloads(self.acked_features)).map_err(tap("TUNSETOFFLOAD"))
    }

    fn start(
        &self,
        memory: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<Running, NetError> {
        self.configure_tap()?;
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
        self.offered
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
        self.reset();
        self.running = Some(self.start(memory, interrupt, queues)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(running) = self.running.take() {
            for index in 0..QUEUE_SIZES.len() {
                let _ = running.backend.set_backend(index, None);
            }
            // The next driver may take fewer offloads.
            let _ = set_tap_offload(&self.tap, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What vhost-net's VHOST_GET_FEATURES returns on Linux 6.1 (VHOST_NET_FEATURES).
    const VHOST_6_1: u64 = 1 << 24
        | 1 << 27
        | 1 << 28
        | 1 << 29
        | 1 << 26
        | 1 << 32
        | 1 << 33
        | 1 << 40
        | 1 << 30
        | nf::MRG_RXBUF;

    fn device() -> VhostNetDevice {
        VhostNetDevice {
            mac: [0x02, 0xfe, 10, 77, 0, 2],
            tap: File::open("/dev/null").unwrap(),
            offered: offered_features(VHOST_6_1, ALL_TAP_OFFLOADS),
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
        assert_ne!(dev.features() & nf::MAC, 0);
        assert_ne!(dev.features() & features::VERSION_1, 0);
    }

    #[test]
    fn offers_every_offload_and_only_the_ring_features_vhost_has() {
        let f = offered_features(VHOST_6_1, ALL_TAP_OFFLOADS);
        for want in [
            nf::CSUM,
            nf::GUEST_CSUM,
            nf::GUEST_TSO4,
            nf::GUEST_TSO6,
            nf::GUEST_ECN,
            nf::GUEST_UFO,
            nf::HOST_TSO4,
            nf::HOST_TSO6,
            nf::HOST_ECN,
            nf::HOST_UFO,
            nf::MRG_RXBUF,
            nf::MAC,
            features::VERSION_1,
            features::RING_EVENT_IDX,
            features::RING_INDIRECT_DESC,
        ] {
            assert_ne!(f & want, 0, "feature {} missing", want.trailing_zeros());
        }
        // vhost's own bits (logging, any-layout, notify-on-empty, access-platform, ring
        // reset) are not the guest's business.
        assert_eq!(f & (1 << 24 | 1 << 26 | 1 << 27 | 1 << 33 | 1 << 40), 0);
        // A backend without merged buffers or event indices: not offered.
        let old = offered_features(features::VERSION_1, ALL_TAP_OFFLOADS);
        assert_eq!(old & (nf::MRG_RXBUF | features::RING_EVENT_IDX), 0);
        assert_ne!(old & nf::GUEST_TSO4, 0, "offloads are the TAP's");
    }

    #[test]
    fn guest_offloads_follow_what_the_tap_accepted() {
        let no_ufo = offered_features(VHOST_6_1, ALL_TAP_OFFLOADS & !libc::TUN_F_UFO);
        assert_eq!(no_ufo & nf::GUEST_UFO, 0);
        assert_ne!(no_ufo & nf::GUEST_TSO6, 0);
        let csum_only = offered_features(VHOST_6_1, libc::TUN_F_CSUM);
        assert_ne!(csum_only & nf::GUEST_CSUM, 0);
        assert_eq!(
            csum_only & (nf::GUEST_TSO4 | nf::GUEST_TSO6 | nf::GUEST_ECN | nf::GUEST_UFO),
            0
        );
        let none = offered_features(VHOST_6_1, 0);
        assert_eq!(none & nf::GUEST_CSUM, 0);
        // Frames from the guest: the TAP takes them whatever its flags.
        assert_ne!(none & (nf::CSUM | nf::HOST_TSO4 | nf::HOST_UFO), 0);
        // Segmentation without checksums is no TAP mode.
        assert_eq!(guest_offloads(libc::TUN_F_TSO4), 0);
    }

    #[test]
    fn tap_offloads_follow_the_drivers_features() {
        let all = nf::GUEST_CSUM | nf::GUEST_TSO4 | nf::GUEST_TSO6 | nf::GUEST_ECN | nf::GUEST_UFO;
        assert_eq!(tap_offloads(all), ALL_TAP_OFFLOADS);
        assert_eq!(tap_offloads(all | HOST_OFFLOADS), ALL_TAP_OFFLOADS);
        assert_eq!(tap_offloads(0), 0);
        // Only host-side offloads: the TAP hands the guest plain frames.
        assert_eq!(tap_offloads(HOST_OFFLOADS | nf::MRG_RXBUF), 0);
        assert_eq!(tap_offloads(nf::GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(nf::GUEST_CSUM | nf::GUEST_TSO4),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        );
        // A driver breaking the spec's dependencies gets no mode the TAP would refuse.
        assert_eq!(
            tap_offloads(nf::GUEST_TSO4 | nf::GUEST_TSO6 | nf::GUEST_UFO),
            0
        );
        assert_eq!(
            tap_offloads(nf::GUEST_CSUM | nf::GUEST_ECN),
            libc::TUN_F_CSUM,
            "ECN only with segmentation"
        );
        // Round trip: what the TAP accepted maps back to the same flags.
        for flags in [ALL_TAP_OFFLOADS, libc::TUN_F_CSUM, 0] {
            assert_eq!(tap_offloads(guest_offloads(flags)), flags);
        }
    }

    #[test]
    fn header_size_follows_the_features() {
        assert_eq!(vnet_hdr_len(features::VERSION_1), 12);
        assert_eq!(vnet_hdr_len(nf::MRG_RXBUF), 12);
        assert_eq!(vnet_hdr_len(features::VERSION_1 | nf::MRG_RXBUF), 12);
        assert_eq!(vnet_hdr_len(nf::CSUM), 10);
    }

    #[test]
    fn two_queues_and_the_transport_refuses_a_wrong_count() {
        let dev = device();
        assert_eq!(dev.queue_max_sizes().len(), 2);
        assert!(matches!(
            super::super::check_queue_count(&dev, 0),
            Err(VirtioError::QueueCount { got: 0, want: 2 })
        ));
    }

    /// A TAP with a virtio-net header, made in a network namespace of its own (on a thread of
    /// its own, so the host's network is never touched), as ferry makes them.
    fn with_tap<T: Send + 'static>(f: impl FnOnce(File) -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) only changes this thread's namespaces; no memory is involved.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return None; // not root: nothing to test on
            }
            let tap = ferry_net::Tap::create("ftest%d").expect("a TAP in a fresh namespace");
            Some(f(tap.into_file()))
        })
        .join()
        .expect("the namespace thread does not panic")
    }

    #[test]
    fn a_real_tap_takes_the_offloads_and_header_size_the_driver_asks_for() {
        let Some(()) = with_tap(|tap| {
            // This host's TAP takes every offload a guest may ask for.
            assert_eq!(probe_tap_offloads(&tap), ALL_TAP_OFFLOADS);
            let acked = offered_features(VHOST_6_1, ALL_TAP_OFFLOADS);
            set_tap_vnet_hdr_len(&tap, vnet_hdr_len(acked)).unwrap();
            assert_eq!(ferry_net::tap::vnet_hdr_len(&tap).unwrap(), 12);
            for acked in [acked, nf::GUEST_CSUM, 0, nf::GUEST_TSO6 | nf::GUEST_ECN] {
                set_tap_offload(&tap, tap_offloads(acked)).unwrap();
            }
            // What the mapping never asks for: segmentation without checksums.
            assert!(set_tap_offload(&tap, libc::TUN_F_TSO4).is_err());
        }) else {
            eprintln!("skipped: creating a TAP needs root");
            return;
        };
    }

    #[test]
    fn tap_ioctls_on_something_else_fail_cleanly() {
        let null = File::open("/dev/null").unwrap();
        assert!(set_tap_offload(&null, ALL_TAP_OFFLOADS).is_err());
        assert!(set_tap_vnet_hdr_len(&null, 12).is_err());
        assert_eq!(probe_tap_offloads(&null), 0);
    }
}
