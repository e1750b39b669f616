//! What every device served by a vhost kernel backend (vhost-vsock, vhost-net) does the same
//! way: give the backend the guest's memory map, hand it each queue with its notification
//! eventfd, and turn its "used buffers" signals into the transport's interrupt.

use std::sync::Arc;

use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, Interrupt, VirtioError, Worker};
use crate::memory::GuestMemoryMmap;

/// A vhost setup step that failed.
#[derive(Debug, thiserror::Error)]
#[error("vhost {op}: {source}")]
pub struct VhostError {
    pub op: &'static str,
    #[source]
    pub source: vhost::Error,
}

fn step(op: &'static str) -> impl FnOnce(vhost::Error) -> VhostError {
    move |source| VhostError { op, source }
}

/// Tells the backend where guest memory lives in this process.
pub fn set_mem_table(
    backend: &impl VhostBackend,
    memory: &GuestMemoryMmap,
) -> Result<(), VhostError> {
    let regions: Vec<VhostUserMemoryRegionInfo> = memory
        .iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: memory
                .get_host_address(r.start_addr())
                .map_or(0, |p| p as u64),
            mmap_offset: 0,
            mmap_handle: -1,
        })
        .collect();
    backend
        .set_mem_table(&regions)
        .map(|_| ())
        .map_err(step("SET_MEM_TABLE"))
}

/// Negotiates `acked` features (as far as the backend offers them), sets the memory table and
/// hands over each of `queues` (index = position): size, ring addresses, next index, the
/// notification eventfd as its kick, and a new call eventfd, which is returned.
pub fn start_queues(
    backend: &impl VhostBackend,
    memory: &GuestMemoryMmap,
    acked: u64,
    queues: &[ActiveQueue],
) -> Result<Vec<EventFd>, VhostError> {
    let offered = backend.get_features().map_err(step("GET_FEATURES"))?;
    backend
        .set_features(acked & offered)
        .map_err(step("SET_FEATURES"))?;
    set_mem_table(backend, memory)?;
    let mut calls = Vec::with_capacity(queues.len());
    for (index, ActiveQueue { queue, notify }) in queues.iter().enumerate() {
        let config = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: queue.desc_table(),
            used_ring_addr: queue.used_ring(),
            avail_ring_addr: queue.avail_ring(),
            log_addr: None,
        };
        let call = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| step("eventfd")(vhost::Error::IOError(e)))?;
        backend
            .set_vring_num(index, queue.size())
            .map_err(step("SET_VRING_NUM"))?;
        backend
            .set_vring_addr(index, &config)
            .map_err(step("SET_VRING_ADDR"))?;
        backend
            .set_vring_base(index, queue.next_avail())
            .map_err(step("SET_VRING_BASE"))?;
        backend
            .set_vring_call(index, &call)
            .map_err(step("SET_VRING_CALL"))?;
        backend
            .set_vring_kick(index, notify)
            .map_err(step("SET_VRING_KICK"))?;
        calls.push(call);
    }
    Ok(calls)
}

/// A thread that raises the transport's used-ring interrupt whenever the backend signals one of
/// `calls` (the driver checks InterruptStatus, which a bare irqfd would not set).
pub fn interrupt_relay(
    name: &str,
    calls: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
) -> Result<Worker, VirtioError> {
    Worker::spawn(name, calls, move |_| interrupt.signal_used_queue())
}
