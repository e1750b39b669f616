//! virtio-blk backed by a raw disk image file (virtio 1.2, section 5.2): read, write, flush and
//! get-id requests on one queue, served by a device thread.
//!
//! Every request is checked before any I/O: the descriptor chain's shape (a readable 16-byte
//! header first, a writable status byte last, data in between in the right direction), every
//! data buffer inside guest memory, the sector range inside the disk, writes refused on a
//! read-only disk. A request that fails a check completes with `VIRTIO_BLK_S_IOERR` or
//! `VIRTIO_BLK_S_UNSUPP`; a chain with no usable status byte is returned to the driver with
//! nothing written. A queue whose rings are broken is no longer served.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::{device_type, features, ActiveQueue, Interrupt, VirtioDevice, VirtioError, Worker};
use crate::memory::GuestMemoryMmap;

/// Bytes per sector, as virtio-blk counts them.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of a request header: type (u32), reserved (u32), sector (u64).
const HEADER_LEN: u32 = 16;
/// Largest piece of a request copied at once between the file and guest memory.
const CHUNK: usize = 128 << 10;

/// Errors from opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {0} is not a regular file")]
    NotRegularFile(PathBuf),
    #[error("disk {0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
}

/// A raw disk image.
pub struct Disk {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

impl Disk {
    /// Opens `path` (read-only when `read_only`). Its size, rounded down to whole sectors, is
    /// the disk's capacity.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        if !meta.is_file() {
            return Err(BlockError::NotRegularFile(path.to_path_buf()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let sectors = len / SECTOR_SIZE;
        if sectors == 0 {
            return Err(BlockError::TooSmall(path.to_path_buf()));
        }
        // The serial the guest sees (/dev/disk/by-id/virtio-<id>): the file name, cut to 20 bytes.
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Self {
            file,
            read_only,
            sectors,
            id,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// Why a request completed with an error status.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestFailure {
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("sectors {sector}+{bytes} bytes lie beyond the disk's end")]
    OutOfRange { sector: u64, bytes: u64 },
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("data buffer {index} has the wrong direction for this request")]
    WrongDirection { index: usize },
    #[error("data buffer {index} lies outside guest memory")]
    OutsideMemory { index: usize },
    #[error("I/O on the disk image: {0}")]
    Io(String),
}

impl RequestFailure {
    /// The status byte the driver gets.
    pub fn status(&self) -> u8 {
        match self {
            RequestFailure::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Why a descriptor chain could not even carry a status back.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("a request needs at least a header and a status descriptor; the chain has {0}")]
    TooFewDescriptors(usize),
    #[error("the header descriptor is write-only or shorter than 16 bytes")]
    BadHeader,
    #[error("reading the request header: {0}")]
    HeaderRead(GuestMemoryError),
    #[error("the status descriptor is not writable")]
    StatusNotWritable,
    #[error("writing the status byte: {0}")]
    StatusWrite(GuestMemoryError),
}

/// What a completed request returns to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The status byte written.
    pub status: u8,
    /// Bytes written into the chain's buffers (data plus the status byte): the used length.
    pub used_len: u32,
}

/// Serves one request: checks the chain, does the I/O, writes the status byte.
pub fn handle_chain<M>(
    chain: DescriptorChain<M>,
    disk: &Disk,
    buf: &mut Vec<u8>,
) -> Result<Completion, ChainError>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    // The iterator ends at the queue size, at a loop, or at a bad descriptor address.
    let descs: Vec<Descriptor> = chain.clone().collect();
    if descs.len() < 2 {
        return Err(ChainError::TooFewDescriptors(descs.len()));
    }
    let (header, rest) = descs.split_first().expect("two or more descriptors");
    let (status, data) = rest.split_last().expect("one or more after the header");
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(ChainError::BadHeader);
    }
    if !status.is_write_only() || status.len() < 1 {
        return Err(ChainError::StatusNotWritable);
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(ChainError::HeaderRead)?;
    let kind = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));

    let (code, written) = match execute(mem, disk, kind, sector, data, buf) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(failure) => (failure.status(), 0),
    };
    mem.write_obj(code, status.addr())
        .map_err(ChainError::StatusWrite)?;
    Ok(Completion {
        status: code,
        used_len: written.saturating_add(1),
    })
}

/// Does the I/O of one request; returns the bytes written into guest memory.
fn execute<M: GuestMemory + ?Sized>(
    mem: &M,
    disk: &Disk,
    kind: u32,
    sector: u64,
    data: &[Descriptor],
    buf: &mut Vec<u8>,
) -> Result<u32, RequestFailure> {
    let writable_data = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => true,
        VIRTIO_BLK_T_OUT => false,
        VIRTIO_BLK_T_FLUSH => {
            if !disk.read_only {
                disk.file
                    .sync_data()
                    .map_err(|e| RequestFailure::Io(e.to_string()))?;
            }
            return Ok(0);
        }
        other => return Err(RequestFailure::Unsupported(other)),
    };
    if kind == VIRTIO_BLK_T_OUT && disk.read_only {
        return Err(RequestFailure::ReadOnly);
    }
    let mut total: u64 = 0;
    for (index, d) in data.iter().enumerate() {
        if d.is_write_only() != writable_data {
            return Err(RequestFailure::WrongDirection { index });
        }
        let access = if writable_data {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(RequestFailure::OutsideMemory { index });
        }
        total += u64::from(d.len());
    }
    if kind == VIRTIO_BLK_T_GET_ID {
        let mut written = 0u32;
        let mut id: &[u8] = &disk.id;
        for d in data {
            let n = id.len().min(d.len() as usize);
            mem.write_slice(&id[..n], d.addr())
                .map_err(|_| RequestFailure::OutsideMemory { index: 0 })?;
            id = &id[n..];
            written += n as u32;
        }
        return Ok(written);
    }
    if !total.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestFailure::Unaligned(total));
    }
    let out_of_range = RequestFailure::OutOfRange {
        sector,
        bytes: total,
    };
    let start = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| out_of_range.clone())?;
    let end = start
        .checked_add(total)
        .ok_or_else(|| out_of_range.clone())?;
    if end > disk.sectors * SECTOR_SIZE {
        return Err(out_of_range);
    }
    let mut offset = start;
    for (index, d) in data.iter().enumerate() {
        let mut done = 0u64;
        let len = u64::from(d.len());
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            buf.resize(n, 0);
            let addr = GuestAddress(d.addr().0 + done);
            if kind == VIRTIO_BLK_T_IN {
                disk.file
                    .read_exact_at(&mut buf[..n], offset)
                    .map_err(|e| RequestFailure::Io(e.to_string()))?;
                mem.write_slice(&buf[..n], addr)
                    .map_err(|_| RequestFailure::OutsideMemory { index })?;
            } else {
                mem.read_slice(&mut buf[..n], addr)
                    .map_err(|_| RequestFailure::OutsideMemory { index })?;
                disk.file
                    .write_all_at(&buf[..n], offset)
                    .map_err(|e| RequestFailure::Io(e.to_string()))?;
            }
            done += n as u64;
            offset += n as u64;
        }
    }
    Ok(if kind == VIRTIO_BLK_T_IN {
        total as u32
    } else {
        0
    })
}

/// The state the device thread serves a queue with.
struct QueueServer {
    memory: GuestMemoryMmap,
    queue: Queue,
    disk: Arc<Disk>,
    interrupt: Arc<Interrupt>,
    buf: Vec<u8>,
    broken: bool,
}

impl QueueServer {
    /// Serves every available request, then interrupts the driver if it wants to know.
    fn serve(&mut self) {
        if self.broken {
            return;
        }
        let mem = &self.memory;
        let mut used_any = false;
        loop {
            if self.queue.disable_notification(mem).is_err() {
                self.broken = true;
                return;
            }
            let mut served = 0usize;
            loop {
                // An avail index more than a queue's length ahead is a broken ring.
                let chain = match self.queue.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(_) => {
                        self.broken = true;
                        return;
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let len = match handle_chain(chain, &self.disk, &mut self.buf) {
                    Ok(c) => c.used_len,
                    // Nothing could be written back: return the buffers empty.
                    Err(_) => 0,
                };
                if self.queue.add_used(mem, head, len).is_err() {
                    self.broken = true;
                    return;
                }
                served += 1;
                used_any = true;
            }
            match self.queue.enable_notification(mem) {
                // More requests arrived meanwhile. If none could be taken although the ring
                // says some are there (a head index out of range), the ring is broken.
                Ok(true) if served > 0 => continue,
                Ok(true) => {
                    self.broken = true;
                    break;
                }
                Ok(false) => break,
                Err(_) => {
                    self.broken = true;
                    return;
                }
            }
        }
        if used_any && self.queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
    }
}

/// A virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    queue_sizes: [u16; 1],
    acked: u64,
    name: String,
    worker: Option<Worker>,
}

impl Block {
    /// A device for `disk`; `name` names its thread.
    pub fn new(disk: Disk, name: &str) -> Self {
        Self {
            disk: Arc::new(disk),
            queue_sizes: [QUEUE_SIZE],
            acked: 0,
            name: name.to_string(),
            worker: None,
        }
    }

    fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.disk.sectors.to_le_bytes());
        // seg_max: the header and status take two descriptors of the queue.
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.disk.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), VirtioError> {
        // One queue: the transport checked the count.
        let Some(ActiveQueue { queue, notify }) = queues.into_iter().next() else {
            return Err(VirtioError::QueueCount { got: 0, want: 1 });
        };
        if !queue.ready() {
            return Err(VirtioError::QueueInvalid(0));
        }
        self.reset();
        let mut server = QueueServer {
            memory,
            queue,
            disk: self.disk.clone(),
            interrupt,
            buf: Vec::new(),
            broken: false,
        };
        // Requests made available before the driver set DRIVER_OK are served at once.
        server.serve();
        self.worker = Some(Worker::spawn(&self.name, vec![notify], move |_| {
            server.serve()
        })?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EventFd;

    const MEM: u64 = 16 << 20;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    struct Fixture {
        mem: GuestMemoryMmap,
        disk: Disk,
        _path: TempFile,
    }

    struct TempFile(PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp_disk(sectors: u64, read_only: bool, tag: &str) -> (Disk, TempFile) {
        let path = std::env::temp_dir().join(format!(
            "ferry-blk-{}-{tag}-{}",
            std::process::id(),
            sectors
        ));
        let bytes: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i / 512) as u8)
            .collect();
        std::fs::write(&path, bytes).unwrap();
        let disk = Disk::open(&path, read_only).unwrap();
        (disk, TempFile(path))
    }

    fn fixture(read_only: bool, tag: &str) -> Fixture {
        let (disk, path) = temp_disk(64, read_only, tag);
        Fixture {
            mem: crate::memory::create(MEM).unwrap(),
            disk,
            _path: path,
        }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn header(f: &Fixture, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        f.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        f.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    }

    fn run(f: &Fixture, descs: &[RawDescriptor]) -> Result<Completion, ChainError> {
        let q = MockSplitQueue::new(&f.mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        handle_chain(chain, &f.disk, &mut Vec::new())
    }

    fn status_byte(f: &Fixture) -> u8 {
        f.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn read_write_flush_and_get_id_work() {
        let f = fixture(false, "rw");
        header(&f, VIRTIO_BLK_T_IN, 3);
        let c = run(
            &f,
            &[desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)],
        )
        .unwrap();
        assert_eq!(
            c,
            Completion {
                status: 0,
                used_len: 1025
            }
        );
        let mut got = [0u8; 1024];
        f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));
        assert_eq!(status_byte(&f), 0);

        f.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        header(&f, VIRTIO_BLK_T_OUT, 63);
        let c = run(
            &f,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
        )
        .unwrap();
        assert_eq!(
            c,
            Completion {
                status: 0,
                used_len: 1
            }
        );
        let mut back = [0u8; 512];
        f.disk.file.read_exact_at(&mut back, 63 * 512).unwrap();
        assert_eq!(back, [0x5a; 512]);

        header(&f, VIRTIO_BLK_T_FLUSH, 0);
        let c = run(&f, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]).unwrap();
        assert_eq!(c.status, VIRTIO_BLK_S_OK as u8);

        header(&f, VIRTIO_BLK_T_GET_ID, 0);
        let c = run(
            &f,
            &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)],
        )
        .unwrap();
        assert_eq!(c.status, 0);
        let mut id = [0u8; 20];
        f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert!(id.starts_with(b"ferry-blk-"));
    }

    #[test]
    fn malformed_chains_are_errors_not_panics() {
        let f = fixture(false, "bad");
        header(&f, VIRTIO_BLK_T_IN, 0);
        // Only one descriptor.
        assert!(matches!(
            run(&f, &[desc(HDR, 16, 0)]),
            Err(ChainError::TooFewDescriptors(1))
        ));
        // Header write-only, or too short.
        assert!(matches!(
            run(&f, &[desc(HDR, 16, W), desc(STATUS, 1, W)]),
            Err(ChainError::BadHeader)
        ));
        assert!(matches!(
            run(&f, &[desc(HDR, 8, 0), desc(STATUS, 1, W)]),
            Err(ChainError::BadHeader)
        ));
        // Header outside guest memory.
        assert!(matches!(
            run(&f, &[desc(MEM + 0x1000, 16, 0), desc(STATUS, 1, W)]),
            Err(ChainError::HeaderRead(_))
        ));
        // Status descriptor not writable, or empty.
        assert!(matches!(
            run(
                &f,
                &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)]
            ),
            Err(ChainError::StatusNotWritable)
        ));
        assert!(matches!(
            run(&f, &[desc(HDR, 16, 0), desc(STATUS, 0, W)]),
            Err(ChainError::StatusNotWritable)
        ));
        // Status byte outside guest memory.
        assert!(matches!(
            run(&f, &[desc(HDR, 16, 0), desc(MEM, 1, W)]),
            Err(ChainError::StatusWrite(_))
        ));
        assert_eq!(status_byte(&f), 0xee, "nothing was written");
    }

    #[test]
    fn bad_requests_complete_with_an_error_status() {
        let f = fixture(false, "status");
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let cases: Vec<(u32, u64, Vec<RawDescriptor>, u8)> = vec![
            // Data beyond guest memory (partly, and entirely).
            (VIRTIO_BLK_T_IN, 0, vec![desc(MEM - 512, 1024, W)], ioerr),
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![desc(u64::MAX - 511, 512, W)],
                ioerr,
            ),
            (VIRTIO_BLK_T_OUT, 0, vec![desc(MEM + 4096, 512, 0)], ioerr),
            // Sector past the end, straddling the end, or overflowing.
            (VIRTIO_BLK_T_IN, 64, vec![desc(DATA, 512, W)], ioerr),
            (VIRTIO_BLK_T_IN, 63, vec![desc(DATA, 1024, W)], ioerr),
            (
                VIRTIO_BLK_T_OUT,
                u64::MAX / 256,
                vec![desc(DATA, 512, 0)],
                ioerr,
            ),
            (VIRTIO_BLK_T_IN, u64::MAX, vec![desc(DATA, 512, W)], ioerr),
            // Data in the wrong direction.
            (VIRTIO_BLK_T_IN, 0, vec![desc(DATA, 512, 0)], ioerr),
            (VIRTIO_BLK_T_OUT, 0, vec![desc(DATA, 512, W)], ioerr),
            // Not whole sectors.
            (VIRTIO_BLK_T_IN, 0, vec![desc(DATA, 100, W)], ioerr),
            // Unknown request types (discard, write zeroes, garbage).
            (11, 0, vec![desc(DATA, 16, 0)], VIRTIO_BLK_S_UNSUPP as u8),
            (13, 0, vec![], VIRTIO_BLK_S_UNSUPP as u8),
            (0xdead_beef, 0, vec![], VIRTIO_BLK_S_UNSUPP as u8),
        ];
        for (kind, sector, data, want) in cases {
            header(&f, kind, sector);
            let mut chain = vec![desc(HDR, 16, 0)];
            chain.extend(data.iter().copied());
            chain.push(desc(STATUS, 1, W));
            let c = run(&f, &chain).unwrap();
            assert_eq!(
                (c.status, c.used_len, status_byte(&f)),
                (want, 1, want),
                "type {kind:#x}, sector {sector}"
            );
        }
    }

    #[test]
    fn read_only_disks_refuse_writes_and_say_so() {
        let f = fixture(true, "ro");
        header(&f, VIRTIO_BLK_T_OUT, 0);
        let c = run(
            &f,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
        )
        .unwrap();
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR as u8);
        let mut back = [0u8; 512];
        f.disk.file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, [0; 512], "the image is unchanged");
        let blk = Block::new(f.disk, "t");
        assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn config_space_holds_the_capacity() {
        let (disk, _p) = temp_disk(100, false, "cfg");
        let blk = Block::new(disk, "t");
        assert_eq!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 100);
        let mut b = [0xffu8; 4];
        blk.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        blk.read_config(22, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn opening_refuses_directories_and_empty_files() {
        assert!(matches!(
            Disk::open(&std::env::temp_dir(), true),
            Err(BlockError::NotRegularFile(_))
        ));
        assert!(matches!(
            Disk::open(Path::new("/no/such/disk"), true),
            Err(BlockError::Open { .. })
        ));
        let p =
            TempFile(std::env::temp_dir().join(format!("ferry-blk-empty-{}", std::process::id())));
        std::fs::write(&p.0, b"short").unwrap();
        assert!(matches!(
            Disk::open(&p.0, true),
            Err(BlockError::TooSmall(_))
        ));
    }

    #[test]
    fn one_queue_and_the_transport_refuses_a_wrong_count() {
        let f = fixture(false, "count");
        let blk = Block::new(f.disk, "t-blk-count");
        assert_eq!(blk.queue_max_sizes().len(), 1);
        assert!(super::super::check_queue_count(&blk, 1).is_ok());
        assert!(matches!(
            super::super::check_queue_count(&blk, 2),
            Err(VirtioError::QueueCount { got: 2, want: 1 })
        ));
    }

    /// The device thread serves a queue the way the driver fills it, and a queue whose avail
    /// index runs ahead of its size is abandoned without a crash.
    #[test]
    fn activated_device_serves_the_queue_and_interrupts() {
        let f = fixture(false, "queue");
        let mq = MockSplitQueue::create(&f.mem, GuestAddress(0), 16);
        header(&f, VIRTIO_BLK_T_IN, 5);
        mq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(HDR, 16, 1, 1)),
                RawDescriptor::from(Descriptor::new(DATA, 512, 1 | W, 2)),
                RawDescriptor::from(Descriptor::new(STATUS, 1, W, 0)),
            ],
            0,
        )
        .unwrap();
        let queue: Queue = mq.create_queue().unwrap();
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irqfd.try_clone().unwrap()));
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = notify.try_clone().unwrap();
        let mut blk = Block::new(f.disk, "t-blk");
        blk.activate(
            f.mem.clone(),
            interrupt.clone(),
            vec![ActiveQueue { queue, notify }],
        )
        .unwrap();
        // The request made available before activation was served right away.
        assert_eq!(mq.used().idx().load(), 1);
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 5);
        assert_eq!(interrupt.status() & super::super::INT_USED_RING, 1);
        assert_eq!(irqfd.read().unwrap(), 1);

        // A head index beyond the queue: the ring is broken and no longer served.
        mq.avail().ring().ref_at(1).unwrap().store(200);
        mq.avail().idx().store(2);
        kick.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(mq.used().idx().load(), 1, "nothing more was used");
        // Even a valid request later is not served any more.
        mq.avail().ring().ref_at(1).unwrap().store(0);
        kick.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(mq.used().idx().load(), 1, "the broken queue stays stopped");
        blk.reset();

        // A fresh activation with an avail index far beyond the queue size.
        let f2 = fixture(false, "queue2");
        let mq = MockSplitQueue::create(&f2.mem, GuestAddress(0), 16);
        mq.avail().idx().store(1000);
        let queue: Queue = mq.create_queue().unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut blk = Block::new(f2.disk, "t-blk2");
        blk.activate(
            f2.mem.clone(),
            interrupt,
            vec![ActiveQueue { queue, notify }],
        )
        .unwrap();
        assert_eq!(mq.used().idx().load(), 0);
        blk.reset();
    }
}
