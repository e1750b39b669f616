//! The engines that move one process's pages: [`send`] at the source VMM, [`receive`] at the
//! destination VMM, over one already authenticated byte stream (see [`crate::protocol`] for
//! the frames and their order).
//!
//! The source reads each page straight out of its guest's memory by frame
//! ([`PageSource`]) into its place in a batch frame, and writes each batch (up to 1 MiB)
//! with one call. The destination reads each batch into one buffer and writes each page from
//! there into its frame ([`PageSink`]). Zero pages travel as markers.
//!
//! The destination is driven in steps, so its caller can talk to its guest agent between
//! them:
//!
//! ```text
//! let incoming = receive(&mut stream, &timeouts).await?;     // Hello and the vaddr list
//! // the agent builds the skeleton from incoming.image() and incoming.vaddrs(),
//! // and reports one frame per vaddr
//! let landed = incoming.land(&frames, zeroed, &guest_memory, |s| ...).await?;  // Ready, pages, Done
//! // the agent restores registers and files and resumes the process
//! landed.finish(Ok(())).await?;                               // Ack
//! ```
//!
//! Pre-copy: before [`send`], the source may call [`precopy`] for rounds of pages while the
//! process still runs, then [`send_after_precopy`] once it is frozen; pages whose held copy is
//! still good travel as markers. [`receive`] holds pre-copied pages until their marker comes.
//! Before the first round the source may send the running process's [`outline`]; a
//! destination that takes it ([`receive_early`]) builds the process meanwhile and lands each
//! held page in its frame as soon as both are there, so that after the freeze a marker for a
//! page already in place costs nothing.
//!
//! Both sides bound every wait ([`Timeouts`]): a dropped or silent connection is an error on
//! both sides, never a hang. A side that fails tells its peer why with [`Message::Abort`] (or,
//! after Done, [`Message::Ack`] with `ok: false`) when the connection still carries it.

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::checksum::{is_zero_page, page_digest, Checksum};
use crate::protocol::{
    bounded_text, Ack, BatchWriter, Done, FrameHeader, Hello, Message, MessageType, PageBatchView,
    PageKind, ProtocolError, HEADER_LEN, MAX_BATCH_PAGES, MAX_IMAGE, MAX_JOB_PAGES, MAX_PAGE_LIST,
    PAGE_SIZE,
};

/// Where the source reads pages: its guest's memory, by frame number.
pub trait PageSource {
    /// Fills `buf` ([`PAGE_SIZE`] bytes) with the page in guest frame `pfn` (guest-physical
    /// address `pfn * 4096`).
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> Result<(), PageError>;
}

/// Where the destination writes pages: its guest's memory, by frame number.
pub trait PageSink {
    /// Writes `data` ([`PAGE_SIZE`] bytes) into guest frame `pfn`.
    fn write_page(&self, pfn: u64, data: &[u8]) -> Result<(), PageError>;
}

/// Errors from reading or writing one page of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The frame lies outside the guest's memory (or its address overflows).
    #[error("frame {pfn:#x} is outside the guest's memory")]
    OutOfRange {
        /// The frame number.
        pfn: u64,
    },
    /// The buffer handed over is not one page.
    #[error("a page buffer must be {PAGE_SIZE} bytes, this one is {len}")]
    BufferSize {
        /// Its length.
        len: usize,
    },
    /// The memory backend refused the access.
    #[error("guest memory refused access to frame {pfn:#x}")]
    Access {
        /// The frame number.
        pfn: u64,
        /// What the backend said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Errors of a migration job, on either side. Every one but `Ack {ok: true}` at the source
/// means the process did not move: the source thaws the original.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The job cannot be sent as given (a caller's mistake; nothing was sent).
    #[error("invalid migration job: {0}")]
    InvalidJob(String),
    /// Reading from or writing to the peer failed.
    #[error("{during}: the connection to the peer failed")]
    Io {
        /// What the engine was doing.
        during: &'static str,
        /// The stream's error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection in the middle of the job.
    #[error("{during}: the peer closed the connection; see the peer node's log for why")]
    Closed {
        /// What the engine was doing.
        during: &'static str,
    },
    /// The peer sent nothing (or took nothing) for too long.
    #[error(
        "{during}: nothing moved for {after:?}; the peer hangs or the network is down \
         (raise the timeout if the peer is only slow)"
    )]
    Timeout {
        /// What the engine was waiting for.
        during: &'static str,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The peer sent a frame that does not decode.
    #[error("{during}: the peer sent an invalid frame")]
    Protocol {
        /// What the engine was doing.
        during: &'static str,
        /// What was wrong with it.
        #[source]
        source: ProtocolError,
    },
    /// The peer sent a valid message at the wrong point of the job.
    #[error("{during}: expected {expected}, the peer sent {got}")]
    Unexpected {
        /// What the engine was doing.
        during: &'static str,
        /// The message(s) that may come here.
        expected: &'static str,
        /// The message that came.
        got: MessageType,
    },
    /// The peer gave up on the job and said why.
    #[error("the peer gave up on the migration: {0}")]
    PeerAborted(String),
    /// The destination received everything but could not resume the process (its `Ack` said
    /// `ok: false`).
    #[error("the destination could not take over the process: {0}")]
    Destination(String),
    /// A page could not be read from the source guest's memory.
    #[error("reading page {vaddr:#x} from guest frame {pfn:#x}")]
    ReadPage {
        /// The page's virtual address in the process.
        vaddr: u64,
        /// The guest frame it was read from.
        pfn: u64,
        /// Why.
        #[source]
        source: PageError,
    },
    /// A page could not be written into the destination guest's memory.
    #[error("writing page {vaddr:#x} into guest frame {pfn:#x}")]
    WritePage {
        /// The page's virtual address in the process.
        vaddr: u64,
        /// The guest frame it was to land in.
        pfn: u64,
        /// Why.
        #[source]
        source: PageError,
    },
    /// A page arrived that is not the next one of the job's page list.
    #[error(
        "page {index} of the job should be {expected:#x}, the source sent {got:#x}; \
         the two nodes disagree on the protocol (run the same ferry build on both)"
    )]
    OutOfOrder {
        /// Its position in the job.
        index: u64,
        /// The vaddr the page list has there.
        expected: u64,
        /// The vaddr that came.
        got: u64,
    },
    /// The source's page counts in `Done` differ from what arrived.
    #[error(
        "the source reports {sent} pages ({sent_zero} zero) of {announced}, {landed} pages \
         ({landed_zero} zero) arrived"
    )]
    CountMismatch {
        /// Pages announced in Hello.
        announced: u64,
        /// Pages the source says it sent.
        sent: u64,
        /// Zero pages the source says it sent.
        sent_zero: u64,
        /// Pages that arrived.
        landed: u64,
        /// Zero pages that arrived.
        landed_zero: u64,
    },
    /// The source marked a page as held from pre-copy, and no copy of it is held here.
    #[error(
        "the source says page {vaddr:#x} was pre-copied, but no copy of it arrived; the two \
         nodes disagree on the protocol (run the same ferry build on both)"
    )]
    NotHeld {
        /// The page's virtual address.
        vaddr: u64,
    },
    /// Post-copy: a page named in a request or a lazy batch that is not one of the job's
    /// lazy pages, or a lazy page that arrived twice.
    #[error(
        "post-copy page {vaddr:#x} {what}; the two nodes disagree on the protocol (run the \
         same ferry build on both)"
    )]
    NotLazy {
        /// The page's virtual address.
        vaddr: u64,
        /// What is wrong with it.
        what: &'static str,
    },
    /// Post-copy: the destination's agent could not place pages into the process.
    #[error("placing pages into the resumed process: {0}")]
    Place(String),
    /// The pages that arrived do not hash to the source's checksum.
    #[error(
        "the pages that arrived have checksum {got:#018x}, the source sent {expected:#018x}; \
         a page was lost, repeated or damaged on the way"
    )]
    ChecksumMismatch {
        /// The source's checksum (from `Done`).
        expected: u64,
        /// The destination's.
        got: u64,
    },
}

impl MigrationError {
    /// The message and every cause under it on one line (`a: b: c`), for a log or an API
    /// answer that prints no error chain of its own: the messages here do not repeat their
    /// sources.
    pub fn chain(&self) -> String {
        error_chain(self)
    }
}

/// How long each side waits before it declares the peer gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// Each frame read or written while data flows (the destination waits this long for each
    /// next frame; the source for each batch to be taken).
    pub io: Duration,
    /// The source's wait for `Ready`: the destination's agent building the skeleton.
    pub skeleton: Duration,
    /// The source's wait for `Ack` after `Done`: the destination resuming the process.
    pub resume: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            io: Duration::from_secs(30),
            skeleton: Duration::from_secs(120),
            resume: Duration::from_secs(60),
        }
    }
}

/// The progress and outcome of one job, on either side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// The job's id.
    pub job_id: u64,
    /// Pages the job moves.
    pub total_pages: u64,
    /// Pages sent (source) or landed (destination) so far, zero pages included.
    pub pages: u64,
    /// Of `pages`, the zero pages (sent as markers, no data).
    pub zero_pages: u64,
    /// Of `pages`, those the destination already held from pre-copy (sent as markers).
    pub held_pages: u64,
    /// At the destination: of `held_pages`, those already in their frames, landed while the
    /// process still ran at the source (an [`Early`] skeleton): nothing to write after the
    /// freeze.
    pub early_pages: u64,
    /// At the destination: pages that arrived in pre-copy rounds (a page sent in several
    /// rounds counts each time).
    pub precopy_pages: u64,
    /// Post-copy, after the process resumed: of `pages`, those the destination asked for
    /// (its process waited for them) and that went ahead of the others.
    pub requested_pages: u64,
    /// Bytes of frames from source to destination so far, headers included: written by the
    /// source, read by the destination.
    pub bytes: u64,
    /// Time since the job started (Hello sent or received).
    pub elapsed: Duration,
    /// Of `elapsed`, the time before the page stream began: sending the job description and
    /// the destination building its skeleton (until `Ready`).
    pub setup: Duration,
    /// Page stream throughput: frame bytes since `Ready` over time since `Ready`, in MiB/s.
    pub throughput_mib_s: f64,
    /// At the source, once the job is done: what the destination said with its `Ack` (e.g. the
    /// process's pid there); empty otherwise.
    pub note: String,
}

impl Stats {
    /// Pages of the final stream that travelled with their data.
    pub fn data_pages(&self) -> u64 {
        self.pages - self.zero_pages - self.held_pages
    }

    /// Pages still to move.
    pub fn remaining_pages(&self) -> u64 {
        self.total_pages.saturating_sub(self.pages)
    }
}

/// Throughput bookkeeping for [`Stats`].
pub(crate) struct Clock {
    start: Instant,
    stream_start: Instant,
    stream_bytes_before: u64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let now = Instant::now();
        Clock {
            start: now,
            stream_start: now,
            stream_bytes_before: 0,
        }
    }

    /// The page stream starts now.
    pub(crate) fn streaming(&mut self, stats: &mut Stats) {
        self.stream_start = Instant::now();
        self.stream_bytes_before = stats.bytes;
        stats.setup = self.start.elapsed();
        stats.elapsed = stats.setup;
    }

    pub(crate) fn update(&self, stats: &mut Stats) {
        stats.elapsed = self.start.elapsed();
        let secs = self.stream_start.elapsed().as_secs_f64();
        if secs > 0.0 {
            let bytes = stats.bytes - self.stream_bytes_before;
            stats.throughput_mib_s = bytes as f64 / (1024.0 * 1024.0) / secs;
        }
    }
}

/// A zero page, written where the destination's frames are not known to be zero.
pub(crate) static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// The most a best-effort farewell (`Abort`, or an answer after a failed write) may take.
pub(crate) const FAREWELL: Duration = Duration::from_secs(2);

/// What the destination holds from a job's pre-copy rounds, as the source knows it: for each
/// page sent, the guest frame it was read from and its checksum digest.
#[derive(Debug, Default, Clone)]
pub struct Precopied {
    pages: HashMap<u64, (u64, u64)>,
}

impl Precopied {
    /// Nothing sent yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Pages the destination holds.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether nothing was pre-copied.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Whether the page at `vaddr`, now in guest frame `pfn`, must travel (again): it was never
    /// sent, it was sent from another frame (the guest kernel moved it), or it was forgotten
    /// as written since.
    pub fn stale(&self, vaddr: u64, pfn: u64) -> bool {
        self.digest(vaddr, pfn).is_none()
    }

    /// Forgets every page read from a frame in `dirty` (KVM's dirty log: written since).
    pub fn forget_dirty(&mut self, dirty: &HashSet<u64>) {
        if !dirty.is_empty() {
            self.pages.retain(|_, (pfn, _)| !dirty.contains(pfn));
        }
    }

    fn digest(&self, vaddr: u64, pfn: u64) -> Option<u64> {
        match self.pages.get(&vaddr) {
            Some(&(held_pfn, digest)) if held_pfn == pfn => Some(digest),
            _ => None,
        }
    }
}

/// Pre-copy, before the first round: sends the running process's outline (`image`, the
/// agent's encoded outline, opaque here) and the vaddrs of the pages the first round will
/// send, for the destination to build the process and pin those pages while the rounds go
/// on ([`Message::Outline`]).
pub async fn outline<S: AsyncWrite + Unpin>(
    stream: &mut S,
    job_id: u64,
    image: &[u8],
    vaddrs: &[u64],
    timeouts: &Timeouts,
) -> Result<(), MigrationError> {
    const OUTLINING: &str = "sending the process's outline";
    check_job(image, &[])?;
    let mut stats = Stats::default();
    let outline = Message::Outline(Hello {
        job_id,
        page_count: vaddrs.len() as u64,
        image: image.to_vec(),
    });
    write_message(stream, &outline, &mut stats, timeouts.io, OUTLINING).await?;
    for chunk in vaddrs.chunks(MAX_PAGE_LIST) {
        let list = Message::PageList(chunk.to_vec());
        write_message(stream, &list, &mut stats, timeouts.io, OUTLINING).await?;
    }
    flush(stream, timeouts.io, OUTLINING).await
}

/// One pre-copy round: sends the pages of `pages` (`(vaddr, pfn)` pairs, read from `source`
/// by frame while the process runs) in [`Message::Precopy`] frames, and records each in
/// `held`. Call it before the logged writes of the round are collected: a page written while
/// it is read is caught by the next round (or by the final [`send_after_precopy`]) through
/// its frame being dirty. `max_rate` (bytes per second) caps the round's pace. `progress`
/// gets the pages and bytes sent so far after each batch. Returns the bytes written.
pub async fn precopy<S: AsyncWrite + Unpin>(
    stream: &mut S,
    pages: &[(u64, u64)],
    source: &impl PageSource,
    held: &mut Precopied,
    timeouts: &Timeouts,
    max_rate: Option<u64>,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, MigrationError> {
    const PRECOPY: &str = "pre-copying pages";
    if let Some(&(vaddr, _)) = pages.iter().find(|(v, _)| v % PAGE_SIZE as u64 != 0) {
        return Err(MigrationError::InvalidJob(format!(
            "page address {vaddr:#x} is not page-aligned"
        )));
    }
    let mut batch = BatchWriter::precopy();
    let (mut sent, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    for chunk in pages.chunks(MAX_BATCH_PAGES) {
        batch.start(chunk.len());
        for &(vaddr, pfn) in chunk {
            let slot = batch.page_slot();
            source
                .read_page(pfn, slot)
                .map_err(|source| MigrationError::ReadPage { vaddr, pfn, source })?;
            held.pages.insert(vaddr, (pfn, page_digest(vaddr, slot)));
            let kind = if is_zero_page(slot) {
                PageKind::Zero
            } else {
                PageKind::Data
            };
            batch.push(vaddr, kind);
        }
        let frame = batch.finish();
        timeout(timeouts.io, stream.write_all(frame))
            .await
            .map_err(|_| MigrationError::Timeout {
                during: PRECOPY,
                after: timeouts.io,
            })?
            .map_err(|e| io_error(PRECOPY, e))?;
        sent += chunk.len() as u64;
        bytes += frame.len() as u64;
        progress(sent, bytes);
        if let Some(rate) = max_rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    flush(stream, timeouts.io, PRECOPY).await?;
    Ok(bytes)
}

/// Moves one process's pages to the destination: sends `Hello` (`job_id`, `image`: the
/// agent's encoded process image, opaque here) and the vaddr list, waits for `Ready`, streams
/// the pages of `pages` (`(vaddr, pfn)` pairs, read from `source` by frame) in batches, sends
/// `Done` and waits for the destination's `Ack`.
///
/// `progress` is called after each batch. Returns the job's statistics once the destination
/// has acknowledged that the process runs there; only then may the caller kill its frozen
/// copy. Every error means the process did not move (the caller thaws it):
/// [`MigrationError::Destination`] when the destination's `Ack` says `ok: false`,
/// [`MigrationError::PeerAborted`] when it gave up earlier.
pub async fn send<S>(
    stream: &mut S,
    job_id: u64,
    image: &[u8],
    pages: &[(u64, u64)],
    source: &impl PageSource,
    timeouts: &Timeouts,
    progress: impl FnMut(&Stats),
) -> Result<Stats, MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let none = Precopied::new();
    send_after_precopy(
        stream, job_id, image, pages, source, &none, timeouts, progress,
    )
    .await
}

/// [`send`] after [`precopy`] rounds: a page of `pages` that the destination holds from the
/// frame it is in now (see [`Precopied::stale`]; forget the frames written since the last
/// round first, with [`Precopied::forget_dirty`]) travels as a [`PageKind::Held`] marker.
#[allow(clippy::too_many_arguments)]
pub async fn send_after_precopy<S>(
    stream: &mut S,
    job_id: u64,
    image: &[u8],
    pages: &[(u64, u64)],
    source: &impl PageSource,
    held: &Precopied,
    timeouts: &Timeouts,
    mut progress: impl FnMut(&Stats),
) -> Result<Stats, MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    check_job(image, pages)?;
    let mut clock = Clock::new();
    let mut stats = Stats {
        job_id,
        total_pages: pages.len() as u64,
        ..Stats::default()
    };
    let (mut rd, mut wr) = tokio::io::split(stream);

    // The job description: Hello, then the vaddrs in list-sized frames.
    const DESCRIBING: &str = "sending the job description";
    let hello = Message::Hello(Hello {
        job_id,
        page_count: pages.len() as u64,
        image: image.to_vec(),
    });
    write_message(&mut wr, &hello, &mut stats, timeouts.io, DESCRIBING).await?;
    for chunk in pages.chunks(MAX_PAGE_LIST) {
        let list = Message::PageList(chunk.iter().map(|&(vaddr, _)| vaddr).collect());
        write_message(&mut wr, &list, &mut stats, timeouts.io, DESCRIBING).await?;
    }
    flush(&mut wr, timeouts.io, DESCRIBING).await?;

    const SKELETON: &str = "waiting for the destination's skeleton (Ready)";
    let mut answer_buf = Vec::new();
    let answer = timeout(
        timeouts.skeleton,
        read_message(&mut rd, &mut answer_buf, SKELETON),
    )
    .await
    .map_err(|_| MigrationError::Timeout {
        during: SKELETON,
        after: timeouts.skeleton,
    })??;
    match answer {
        Message::Ready => {}
        Message::Abort { reason } => return Err(MigrationError::PeerAborted(reason)),
        other => {
            return Err(MigrationError::Unexpected {
                during: SKELETON,
                expected: "Ready",
                got: other.message_type(),
            })
        }
    }
    clock.streaming(&mut stats);

    // The page stream. The destination says nothing until Done unless it gives up, so one
    // read of its next message stays pending across all batches: an early Abort (or a closed
    // connection) ends the stream at once.
    const STREAMING: &str = "streaming pages";
    let answer = read_message(&mut rd, &mut answer_buf, STREAMING);
    tokio::pin!(answer);
    let mut batch = BatchWriter::new();
    let mut checksum = Checksum::new();
    for chunk in pages.chunks(MAX_BATCH_PAGES) {
        if let Err(e) = fill_batch(&mut batch, chunk, source, held, &mut checksum, &mut stats) {
            farewell(
                &mut wr,
                &Message::Abort {
                    reason: bounded_text(&error_chain(&e)),
                },
            )
            .await;
            return Err(e);
        }
        let frame = batch.finish();
        let written = tokio::select! {
            biased;
            early = &mut answer => return Err(early_answer(early, STREAMING)),
            written = timeout(timeouts.io, wr.write_all(frame)) => written,
        };
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // The destination may have said why before it closed.
                if let Ok(Ok(Message::Abort { reason })) = timeout(FAREWELL, &mut answer).await {
                    return Err(MigrationError::PeerAborted(reason));
                }
                return Err(io_error(STREAMING, e));
            }
            Err(_) => {
                return Err(MigrationError::Timeout {
                    during: STREAMING,
                    after: timeouts.io,
                })
            }
        }
        stats.bytes += frame.len() as u64;
        clock.update(&mut stats);
        progress(&stats);
    }

    let done = Message::Done(Done {
        pages: stats.pages,
        zero_pages: stats.zero_pages,
        checksum: checksum.value(),
    });
    write_message(&mut wr, &done, &mut stats, timeouts.io, STREAMING).await?;
    flush(&mut wr, timeouts.io, STREAMING).await?;
    clock.update(&mut stats);

    const RESUME: &str = "waiting for the destination to resume the process (Ack)";
    let answer =
        timeout(timeouts.resume, &mut answer)
            .await
            .map_err(|_| MigrationError::Timeout {
                during: RESUME,
                after: timeouts.resume,
            })?;
    match answer {
        Ok(Message::Ack(Ack { ok: true, message })) => {
            clock.update(&mut stats);
            stats.note = message;
            Ok(stats)
        }
        Ok(Message::Ack(Ack { ok: false, message })) => Err(MigrationError::Destination(message)),
        other => Err(early_answer(other, RESUME)),
    }
}

/// Refuses a job that the destination would refuse, before anything is sent.
fn check_job(image: &[u8], pages: &[(u64, u64)]) -> Result<(), MigrationError> {
    if image.len() > MAX_IMAGE {
        return Err(MigrationError::InvalidJob(format!(
            "the process image is {} bytes, the protocol carries at most {MAX_IMAGE}",
            image.len()
        )));
    }
    if pages.len() as u64 > MAX_JOB_PAGES {
        return Err(MigrationError::InvalidJob(format!(
            "{} pages, the protocol moves at most {MAX_JOB_PAGES} per job",
            pages.len()
        )));
    }
    if let Some(&(vaddr, _)) = pages.iter().find(|(v, _)| v % PAGE_SIZE as u64 != 0) {
        return Err(MigrationError::InvalidJob(format!(
            "page address {vaddr:#x} is not page-aligned"
        )));
    }
    Ok(())
}

/// Reads the pages of `chunk` into the batch, zero pages and pages `held` at the destination
/// as markers.
fn fill_batch(
    batch: &mut BatchWriter,
    chunk: &[(u64, u64)],
    source: &impl PageSource,
    held: &Precopied,
    checksum: &mut Checksum,
    stats: &mut Stats,
) -> Result<(), MigrationError> {
    batch.start(chunk.len());
    for &(vaddr, pfn) in chunk {
        if let Some(digest) = held.digest(vaddr, pfn) {
            checksum.add_digest(digest);
            stats.held_pages += 1;
            stats.pages += 1;
            batch.push(vaddr, PageKind::Held);
            continue;
        }
        push_page(batch, vaddr, pfn, source, checksum, stats)?;
    }
    Ok(())
}

/// Reads the page at `vaddr` from frame `pfn` into the batch (as a zero-page marker if it is
/// all zeros) and counts it in the checksum and the statistics.
pub(crate) fn push_page(
    batch: &mut BatchWriter,
    vaddr: u64,
    pfn: u64,
    source: &impl PageSource,
    checksum: &mut Checksum,
    stats: &mut Stats,
) -> Result<(), MigrationError> {
    let slot = batch.page_slot();
    source
        .read_page(pfn, slot)
        .map_err(|source| MigrationError::ReadPage { vaddr, pfn, source })?;
    let kind = if is_zero_page(slot) {
        checksum.add_zero_page(vaddr);
        stats.zero_pages += 1;
        PageKind::Zero
    } else {
        checksum.add_page(vaddr, slot);
        PageKind::Data
    };
    batch.push(vaddr, kind);
    stats.pages += 1;
    Ok(())
}

/// The error for a message from the destination in the middle of the stream (or instead of
/// its `Ack`).
fn early_answer(answer: Result<Message, MigrationError>, during: &'static str) -> MigrationError {
    match answer {
        Ok(Message::Abort { reason }) => MigrationError::PeerAborted(reason),
        Ok(Message::Ack(Ack { ok: false, message })) => MigrationError::Destination(message),
        Ok(other) => MigrationError::Unexpected {
            during,
            expected: "Abort or nothing until Done",
            got: other.message_type(),
        },
        Err(e) => e,
    }
}

/// A job arriving at the destination: its `Hello` and vaddr list are in, nothing has been
/// answered yet. Next: [`Incoming::land`] once the skeleton stands, or [`Incoming::reject`].
/// Dropping it drops the job (the source times out or sees the connection close).
pub struct Incoming<'s, S> {
    stream: &'s mut S,
    hello: Hello,
    held: HeldPages,
    vaddrs: Vec<u64>,
    /// Post-copy: the pages that come after the process resumed ([`Message::Postcopy`]).
    lazy: Vec<u64>,
    timeouts: Timeouts,
    buf: Vec<u8>,
    stats: Stats,
    clock_start: Instant,
}

impl<S> std::fmt::Debug for Incoming<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("job_id", &self.hello.job_id)
            .field("image_len", &self.hello.image.len())
            .field("pages", &self.vaddrs.len())
            .finish_non_exhaustive()
    }
}

/// Pages a destination holds from pre-copy rounds, by vaddr (a page sent again replaces its
/// copy in place), each with its checksum digest and the frame it already landed in, if any.
#[derive(Debug, Default)]
struct HeldPages {
    index: HashMap<u64, HeldPage>,
    data: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct HeldPage {
    /// The copy's slot in `data`; `None` for a zero page.
    slot: Option<usize>,
    /// Its [`page_digest`].
    digest: u64,
    /// The frame that holds this very copy (landed early), if any.
    frame: Option<u64>,
}

impl HeldPages {
    /// Holds `page` (`None`: a zero page) for `vaddr`, and lands it in `early` (its frame and
    /// where frames are written) when given.
    fn hold(
        &mut self,
        vaddr: u64,
        page: Option<&[u8]>,
        early: Option<(u64, &dyn PageSink)>,
    ) -> Result<(), MigrationError> {
        let data = page.unwrap_or(&ZERO_PAGE);
        let digest = page_digest(vaddr, data);
        let slot = match (page, self.index.get(&vaddr).and_then(|h| h.slot)) {
            (None, _) => None,
            (Some(page), Some(slot)) => {
                self.data[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].copy_from_slice(page);
                Some(slot)
            }
            (Some(page), None) => {
                self.data.extend_from_slice(page);
                Some(self.data.len() / PAGE_SIZE - 1)
            }
        };
        let mut frame = None;
        if let Some((pfn, sink)) = early {
            sink.write_page(pfn, data)
                .map_err(|source| MigrationError::WritePage { vaddr, pfn, source })?;
            frame = Some(pfn);
        }
        self.index.insert(
            vaddr,
            HeldPage {
                slot,
                digest,
                frame,
            },
        );
        Ok(())
    }

    /// Lands every held page that has a frame in `frames` and is not in it yet.
    fn land_early(
        &mut self,
        frames: &HashMap<u64, u64>,
        sink: &dyn PageSink,
    ) -> Result<u64, MigrationError> {
        let mut landed = 0;
        for (&vaddr, h) in self.index.iter_mut() {
            let Some(&pfn) = frames.get(&vaddr) else {
                continue;
            };
            if h.frame == Some(pfn) {
                continue;
            }
            let data = match h.slot {
                Some(s) => &self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE],
                None => &ZERO_PAGE[..],
            };
            sink.write_page(pfn, data)
                .map_err(|source| MigrationError::WritePage { vaddr, pfn, source })?;
            h.frame = Some(pfn);
            landed += 1;
        }
        Ok(landed)
    }

    /// The held copy of the page at `vaddr`.
    fn get(&self, vaddr: u64) -> Option<HeldCopy<'_>> {
        self.index.get(&vaddr).map(|h| HeldCopy {
            data: h
                .slot
                .map(|s| &self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE]),
            digest: h.digest,
            frame: h.frame,
        })
    }
}

/// A held page as [`HeldPages::get`] gives it.
struct HeldCopy<'a> {
    /// `None` for a zero page.
    data: Option<&'a [u8]>,
    digest: u64,
    /// The frame it landed in early, if any.
    frame: Option<u64>,
}

/// Pre-copy at the destination: building the process while the rounds go on. When the
/// source's [`Message::Outline`] arrives, [`receive_early`] hands it to `on_outline` (start
/// building from it, without blocking); once `frames` delivers the frames of (some of) the
/// outline's pages, every held page with a frame lands in it, and each later copy as it
/// arrives. A dropped `frames` sender means none: every page lands after the freeze.
pub struct Early<'a> {
    /// Gets the outline's image (the agent's encoded outline, opaque here) and the vaddrs of
    /// the first round's pages.
    pub on_outline: Box<dyn FnOnce(Vec<u8>, Vec<u64>) + Send + 'a>,
    /// The frames, as `(vaddr, pfn)`, once the process is built and they are pinned.
    pub frames: tokio::sync::oneshot::Receiver<Vec<(u64, u64)>>,
    /// Where the pages land.
    pub sink: &'a (dyn PageSink + Sync),
}

/// Accepts a job at the destination: holds the pages of any pre-copy rounds, then reads
/// `Hello` and the whole vaddr list (each frame within `timeouts.io`). A job that sends an
/// outline is refused: use [`receive_early`] to take one.
pub async fn receive<'s, S>(
    stream: &'s mut S,
    timeouts: &Timeouts,
) -> Result<Incoming<'s, S>, MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    receive_early(stream, timeouts, None).await
}

/// [`receive`], landing pre-copied pages early when the source sends an outline and `early`
/// is given (see [`Early`]).
pub async fn receive_early<'s, S>(
    stream: &'s mut S,
    timeouts: &Timeouts,
    early: Option<Early<'_>>,
) -> Result<Incoming<'s, S>, MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const DESCRIBING: &str = "receiving the job description";
    let clock_start = Instant::now();
    let mut buf = Vec::new();
    let mut stats = Stats::default();
    let mut held = HeldPages::default();
    let mut lazy = Vec::new();
    let (mut on_outline, mut pending, sink) = match early {
        Some(e) => (Some(e.on_outline), Some(e.frames), Some(e.sink)),
        None => (None, None, None),
    };
    let mut frames: HashMap<u64, u64> = HashMap::new();
    // Takes the early frames once they are known, and lands what is held in them.
    let mut take_frames =
        |held: &mut HeldPages, frames: &mut HashMap<u64, u64>| -> Result<(), MigrationError> {
            let (Some(rx), Some(sink)) = (pending.as_mut(), sink) else {
                return Ok(());
            };
            match rx.try_recv() {
                Ok(list) => {
                    pending = None;
                    *frames = list.into_iter().collect();
                    held.land_early(frames, sink)?;
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => pending = None,
            }
            Ok(())
        };
    let result = async {
        const PRECOPY: &str = "receiving pre-copied pages";
        let hello = loop {
            take_frames(&mut held, &mut frames)?;
            let header = timeout(timeouts.io, read_frame(stream, &mut buf, PRECOPY))
                .await
                .map_err(|_| MigrationError::Timeout {
                    during: PRECOPY,
                    after: timeouts.io,
                })??;
            stats.bytes += (HEADER_LEN + header.len) as u64;
            let payload = &buf[..header.len];
            let protocol = |source| MigrationError::Protocol {
                during: DESCRIBING,
                source,
            };
            if header.message == MessageType::Precopy {
                let batch =
                    PageBatchView::parse_as(MessageType::Precopy, payload).map_err(protocol)?;
                for page in batch.pages() {
                    let early = match (sink, frames.get(&page.vaddr)) {
                        (Some(sink), Some(&pfn)) => Some((pfn, sink as &dyn PageSink)),
                        _ => None,
                    };
                    held.hold(page.vaddr, page.data, early)?;
                }
                stats.precopy_pages += batch.len() as u64;
                continue;
            }
            match Message::decode(header.message, payload).map_err(protocol)? {
                Message::Hello(h) => break h,
                Message::Outline(o) if on_outline.is_some() => {
                    let vaddrs =
                        read_page_list(stream, &mut buf, &mut stats, timeouts.io, o.page_count)
                            .await?;
                    if let Some(f) = on_outline.take() {
                        f(o.image, vaddrs);
                    }
                }
                Message::Postcopy(list) => {
                    if lazy.len() + list.len() > MAX_JOB_PAGES as usize {
                        return Err(protocol(ProtocolError::TooMany {
                            message: MessageType::Postcopy,
                            what: "vaddrs in all",
                            count: (lazy.len() + list.len()) as u64,
                            max: MAX_JOB_PAGES,
                        }));
                    }
                    lazy.extend(list);
                }
                other => {
                    return Err(unexpected_or_abort(
                        other,
                        DESCRIBING,
                        "Precopy, Postcopy or Hello",
                    ))
                }
            }
        };
        // Frames that came with the last round.
        take_frames(&mut held, &mut frames)?;
        let vaddrs =
            read_page_list(stream, &mut buf, &mut stats, timeouts.io, hello.page_count).await?;
        Ok((hello, vaddrs))
    }
    .await;
    let (hello, vaddrs) = match result {
        Ok(v) => v,
        Err(e) => {
            farewell_on_error(stream, &e).await;
            return Err(e);
        }
    };
    stats.job_id = hello.job_id;
    stats.total_pages = hello.page_count;
    Ok(Incoming {
        stream,
        hello,
        held,
        vaddrs,
        lazy,
        timeouts: timeouts.clone(),
        buf,
        stats,
        clock_start,
    })
}

/// Reads the `announced` vaddrs of the PageList frames after a Hello or an Outline.
async fn read_page_list<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    stats: &mut Stats,
    io: Duration,
    announced: u64,
) -> Result<Vec<u64>, MigrationError> {
    const DESCRIBING: &str = "receiving the job description";
    // The list grows with what arrives, not with what was announced.
    let announced = announced as usize;
    let mut vaddrs = Vec::with_capacity(announced.min(MAX_PAGE_LIST));
    while vaddrs.len() < announced {
        match read_counted(stream, buf, stats, io, DESCRIBING).await? {
            Message::PageList(list) => {
                if vaddrs.len() + list.len() > announced {
                    return Err(MigrationError::Protocol {
                        during: DESCRIBING,
                        source: ProtocolError::TooMany {
                            message: MessageType::PageList,
                            what: "vaddrs in all",
                            count: (vaddrs.len() + list.len()) as u64,
                            max: announced as u64,
                        },
                    });
                }
                vaddrs.extend(list);
            }
            other => return Err(unexpected_or_abort(other, DESCRIBING, "PageList")),
        }
    }
    Ok(vaddrs)
}

impl<'s, S> Incoming<'s, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The job's id, as the source chose it.
    pub fn job_id(&self) -> u64 {
        self.hello.job_id
    }

    /// The process image (the agent's encoded `ProcessImage`), as the source sent it.
    pub fn image(&self) -> &[u8] {
        &self.hello.image
    }

    /// The vaddrs of the pages that will arrive, in arrival order (what the agent needs to
    /// build the skeleton); [`Incoming::land`] takes one frame per vaddr in this order.
    pub fn vaddrs(&self) -> &[u64] {
        &self.vaddrs
    }

    /// Post-copy: the vaddrs of the pages that arrive only after the process resumed here
    /// (see [`crate::postcopy`]); empty for any other job.
    pub fn lazy_vaddrs(&self) -> &[u64] {
        &self.lazy
    }

    /// Forgets that held pages in `ranges` (`(start, end)` vaddrs) landed early: their frames
    /// changed (the process's mappings there changed since its outline), so they land again.
    pub fn forget_early(&mut self, ranges: &[(u64, u64)]) {
        for (&vaddr, h) in self.held.index.iter_mut() {
            if ranges.iter().any(|&(s, e)| s <= vaddr && vaddr < e) {
                h.frame = None;
            }
        }
    }

    /// Refuses the job (e.g. the skeleton could not be built): sends `Abort` with `reason`,
    /// which the source reports as [`MigrationError::PeerAborted`].
    pub async fn reject(self, reason: &str) -> Result<(), MigrationError> {
        const REJECTING: &str = "refusing the job";
        let abort = Message::Abort {
            reason: bounded_text(reason),
        };
        let mut stats = Stats::default();
        write_message(self.stream, &abort, &mut stats, self.timeouts.io, REJECTING).await?;
        flush(self.stream, self.timeouts.io, REJECTING).await
    }

    /// Lands the pages: sends `Ready`, writes every arriving page into its frame through
    /// `sink` (`frames[i]` for `vaddrs()[i]`), and checks `Done`'s counts and checksum.
    /// `progress` is called after each batch.
    ///
    /// `frames_zeroed` says the destination frames are known to hold zeros (fresh pages from
    /// the skeleton); zero pages are then skipped, otherwise zeros are written.
    ///
    /// On success the pages are in place and the source waits for the outcome: resume the
    /// process, then [`Landed::finish`]. On failure the source has been told (`Abort`, or
    /// `Ack {ok: false}` for a bad `Done`) where the connection allowed.
    pub async fn land(
        mut self,
        frames: &[u64],
        frames_zeroed: bool,
        sink: &impl PageSink,
        mut progress: impl FnMut(&Stats),
    ) -> Result<Landed<'s, S>, MigrationError> {
        if frames.len() != self.vaddrs.len() {
            let e = MigrationError::InvalidJob(format!(
                "the destination has {} frames for the {} pages of the job",
                frames.len(),
                self.vaddrs.len()
            ));
            farewell_on_error(self.stream, &e).await;
            return Err(e);
        }
        let mut clock = Clock {
            start: self.clock_start,
            stream_start: Instant::now(),
            stream_bytes_before: 0,
        };
        const READY: &str = "telling the source the skeleton stands (Ready)";
        let io = self.timeouts.io;
        let mut written = Stats::default();
        write_message(self.stream, &Message::Ready, &mut written, io, READY).await?;
        flush(self.stream, io, READY).await?;
        clock.streaming(&mut self.stats);

        let landing = self.land_pages(frames, frames_zeroed, sink, &clock, &mut progress);
        match landing.await {
            Ok(()) => {}
            Err(e) => {
                farewell_on_error(self.stream, &e).await;
                return Err(e);
            }
        }
        clock.update(&mut self.stats);
        Ok(Landed {
            stream: self.stream,
            timeouts: self.timeouts,
            stats: self.stats,
        })
    }

    async fn land_pages(
        &mut self,
        frames: &[u64],
        frames_zeroed: bool,
        sink: &impl PageSink,
        clock: &Clock,
        progress: &mut impl FnMut(&Stats),
    ) -> Result<(), MigrationError> {
        const LANDING: &str = "receiving pages";
        let io = self.timeouts.io;
        let stats = &mut self.stats;
        let mut checksum = Checksum::new();
        let mut next = 0usize;
        loop {
            let header = timeout(io, read_frame(self.stream, &mut self.buf, LANDING))
                .await
                .map_err(|_| MigrationError::Timeout {
                    during: LANDING,
                    after: io,
                })??;
            stats.bytes += (HEADER_LEN + header.len) as u64;
            let payload = &self.buf[..header.len];
            let protocol = |source| MigrationError::Protocol {
                during: LANDING,
                source,
            };
            if header.message != MessageType::PageBatch {
                match Message::decode(header.message, payload).map_err(protocol)? {
                    Message::Done(done) => {
                        return check_done(&done, stats, checksum.value());
                    }
                    other => return Err(unexpected_or_abort(other, LANDING, "PageBatch or Done")),
                }
            }
            let batch = PageBatchView::parse(payload).map_err(protocol)?;
            if next + batch.len() > self.vaddrs.len() {
                return Err(protocol(ProtocolError::TooMany {
                    message: MessageType::PageBatch,
                    what: "pages in all",
                    count: (next + batch.len()) as u64,
                    max: self.vaddrs.len() as u64,
                }));
            }
            for (page, (&expected, &pfn)) in batch
                .pages()
                .zip(self.vaddrs[next..].iter().zip(&frames[next..]))
            {
                if page.vaddr != expected {
                    return Err(MigrationError::OutOfOrder {
                        index: next as u64,
                        expected,
                        got: page.vaddr,
                    });
                }
                // A held page's digest is known; one that landed early in this very frame
                // is in place already.
                let (data, digest, in_place) = match page.kind() {
                    PageKind::Held => match self.held.get(page.vaddr) {
                        Some(h) => (h.data, Some(h.digest), h.frame == Some(pfn)),
                        None => return Err(MigrationError::NotHeld { vaddr: page.vaddr }),
                    },
                    _ => (page.data, None, false),
                };
                stats.held_pages += u64::from(digest.is_some());
                stats.early_pages += u64::from(in_place);
                match (digest, data) {
                    (Some(d), _) => checksum.add_digest(d),
                    (None, Some(data)) => checksum.add_page(page.vaddr, data),
                    (None, None) => {
                        checksum.add_zero_page(page.vaddr);
                        stats.zero_pages += 1;
                    }
                }
                let data = match data {
                    _ if in_place => None,
                    Some(data) => Some(data),
                    None => (!frames_zeroed).then_some(&ZERO_PAGE[..]),
                };
                if let Some(data) = data {
                    sink.write_page(pfn, data)
                        .map_err(|source| MigrationError::WritePage {
                            vaddr: page.vaddr,
                            pfn,
                            source,
                        })?;
                }
                next += 1;
            }
            stats.pages = next as u64;
            clock.update(stats);
            progress(stats);
        }
    }
}

/// Checks `Done` against what arrived.
fn check_done(done: &Done, stats: &Stats, checksum: u64) -> Result<(), MigrationError> {
    if done.pages != stats.pages
        || done.zero_pages != stats.zero_pages
        || stats.pages != stats.total_pages
    {
        return Err(MigrationError::CountMismatch {
            announced: stats.total_pages,
            sent: done.pages,
            sent_zero: done.zero_pages,
            landed: stats.pages,
            landed_zero: stats.zero_pages,
        });
    }
    if done.checksum != checksum {
        return Err(MigrationError::ChecksumMismatch {
            expected: done.checksum,
            got: checksum,
        });
    }
    Ok(())
}

/// Every page of a job is in place at the destination; the source waits for the outcome.
/// Resume the process, then call [`Landed::finish`]. Dropping it unanswered leaves the source
/// to time out (and thaw its copy).
pub struct Landed<'s, S> {
    stream: &'s mut S,
    timeouts: Timeouts,
    stats: Stats,
}

impl<S> std::fmt::Debug for Landed<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Landed")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<S> Landed<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// What arrived.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Tells the source the outcome (`Ack`): `Ok(())` when the process runs here (the source
    /// then kills its frozen copy), `Err(message)` when it could not be resumed (the source
    /// thaws its copy and reports `message`). Returns the job's statistics once the answer is
    /// on its way.
    pub async fn finish(self, resumed: Result<(), String>) -> Result<Stats, MigrationError> {
        self.finish_with_note(resumed.map(|()| String::new())).await
    }

    /// [`Landed::finish`] with a note for the source on success (it arrives in the source's
    /// [`Stats::note`]), e.g. the process's pid here.
    pub async fn finish_with_note(
        self,
        resumed: Result<String, String>,
    ) -> Result<Stats, MigrationError> {
        const ANSWERING: &str = "telling the source the outcome (Ack)";
        let ack = Message::Ack(match resumed {
            Ok(note) => Ack {
                ok: true,
                message: bounded_text(&note),
            },
            Err(message) => Ack {
                ok: false,
                message: bounded_text(&message),
            },
        });
        let mut written = Stats::default();
        write_message(self.stream, &ack, &mut written, self.timeouts.io, ANSWERING).await?;
        flush(self.stream, self.timeouts.io, ANSWERING).await?;
        Ok(self.stats)
    }
}

impl<'s, S> Landed<'s, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Post-copy: tells the source the process runs here (`Ack {ok: true}` with `note`) and
    /// hands the stream back for [`crate::receive_postcopy`], which receives the pages that
    /// follow.
    pub async fn resumed_postcopy(self, note: &str) -> Result<(Stats, &'s mut S), MigrationError> {
        const ANSWERING: &str = "telling the source the process runs here (Ack)";
        let ack = Message::Ack(Ack {
            ok: true,
            message: bounded_text(note),
        });
        let mut written = Stats::default();
        write_message(self.stream, &ack, &mut written, self.timeouts.io, ANSWERING).await?;
        flush(self.stream, self.timeouts.io, ANSWERING).await?;
        Ok((self.stats, self.stream))
    }
}

/// The error for a message other than the expected one (the peer's `Abort` carries its reason).
pub(crate) fn unexpected_or_abort(
    got: Message,
    during: &'static str,
    expected: &'static str,
) -> MigrationError {
    match got {
        Message::Abort { reason } => MigrationError::PeerAborted(reason),
        other => MigrationError::Unexpected {
            during,
            expected,
            got: other.message_type(),
        },
    }
}

/// Tells the source why the destination gives up, where that can still reach it: `Ack {ok:
/// false}` for a bad `Done` (the source waits for an Ack), `Abort` otherwise. Nothing when the
/// peer gave up itself or the connection is gone.
pub(crate) async fn farewell_on_error<W: AsyncWrite + Unpin>(stream: &mut W, e: &MigrationError) {
    let message = bounded_text(&error_chain(e));
    let farewell_message = match e {
        MigrationError::PeerAborted(_)
        | MigrationError::Closed { .. }
        | MigrationError::Io { .. }
        | MigrationError::Timeout { .. } => return,
        MigrationError::CountMismatch { .. } | MigrationError::ChecksumMismatch { .. } => {
            Message::Ack(Ack { ok: false, message })
        }
        _ => Message::Abort { reason: message },
    };
    farewell(stream, &farewell_message).await;
}

/// Sends a last message, best effort and briefly.
pub(crate) async fn farewell<W: AsyncWrite + Unpin>(stream: &mut W, message: &Message) {
    if let Ok(frame) = message.encode() {
        let _ = timeout(FAREWELL, async {
            stream.write_all(&frame).await?;
            stream.flush().await
        })
        .await;
    }
}

/// An error and its sources, one line, for the peer.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub(crate) fn io_error(during: &'static str, e: io::Error) -> MigrationError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => MigrationError::Closed { during },
        _ => MigrationError::Io { during, source: e },
    }
}

/// Reads one frame into `buf` (grown to the payload, which the header has bounded); returns its
/// header, the payload being `buf[..header.len]`.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    during: &'static str,
) -> Result<FrameHeader, MigrationError> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)
        .await
        .map_err(|e| io_error(during, e))?;
    let header = FrameHeader::decode(&header)
        .map_err(|source| MigrationError::Protocol { during, source })?;
    if buf.len() < header.len {
        buf.resize(header.len, 0);
    }
    r.read_exact(&mut buf[..header.len])
        .await
        .map_err(|e| io_error(during, e))?;
    Ok(header)
}

/// Reads and decodes one frame.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    during: &'static str,
) -> Result<Message, MigrationError> {
    let header = read_frame(r, buf, during).await?;
    Message::decode(header.message, &buf[..header.len])
        .map_err(|source| MigrationError::Protocol { during, source })
}

/// Reads and decodes one frame within `limit`, counting its bytes.
async fn read_counted<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    stats: &mut Stats,
    limit: Duration,
    during: &'static str,
) -> Result<Message, MigrationError> {
    let header = timeout(limit, read_frame(r, buf, during))
        .await
        .map_err(|_| MigrationError::Timeout {
            during,
            after: limit,
        })??;
    stats.bytes += (HEADER_LEN + header.len) as u64;
    Message::decode(header.message, &buf[..header.len])
        .map_err(|source| MigrationError::Protocol { during, source })
}

/// Encodes and writes one message within `limit`, counting its bytes.
pub(crate) async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    message: &Message,
    stats: &mut Stats,
    limit: Duration,
    during: &'static str,
) -> Result<(), MigrationError> {
    let frame = message
        .encode()
        .map_err(|source| MigrationError::Protocol { during, source })?;
    timeout(limit, w.write_all(&frame))
        .await
        .map_err(|_| MigrationError::Timeout {
            during,
            after: limit,
        })?
        .map_err(|e| io_error(during, e))?;
    stats.bytes += frame.len() as u64;
    Ok(())
}

pub(crate) async fn flush<W: AsyncWrite + Unpin>(
    w: &mut W,
    limit: Duration,
    during: &'static str,
) -> Result<(), MigrationError> {
    timeout(limit, w.flush())
        .await
        .map_err(|_| MigrationError::Timeout {
            during,
            after: limit,
        })?
        .map_err(|e| io_error(during, e))
}

/// The guest-physical address of frame `pfn`, if a whole page there is guest memory.
fn frame_address<M: GuestMemoryBackend>(
    mem: &M,
    pfn: u64,
    len: usize,
) -> Result<GuestAddress, PageError> {
    if len != PAGE_SIZE {
        return Err(PageError::BufferSize { len });
    }
    let addr = pfn
        .checked_mul(PAGE_SIZE as u64)
        .map(GuestAddress)
        .ok_or(PageError::OutOfRange { pfn })?;
    if !mem.check_range(addr, PAGE_SIZE) {
        return Err(PageError::OutOfRange { pfn });
    }
    Ok(addr)
}

impl<B: Bitmap> PageSource for GuestMemoryMmap<B> {
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> Result<(), PageError> {
        let addr = frame_address(self, pfn, buf.len())?;
        self.read_slice(buf, addr).map_err(|e| PageError::Access {
            pfn,
            source: Box::new(e),
        })
    }
}

impl<B: Bitmap> PageSink for GuestMemoryMmap<B> {
    fn write_page(&self, pfn: u64, data: &[u8]) -> Result<(), PageError> {
        let addr = frame_address(self, pfn, data.len())?;
        self.write_slice(data, addr).map_err(|e| PageError::Access {
            pfn,
            source: Box::new(e),
        })
    }
}

#[cfg(test)]
mod tests;
