//! Post-copy: the process resumes at the destination as soon as its registers, mappings and
//! eager pages are in place; its private anonymous pages follow while it runs (see
//! [`crate::protocol`], "Post-copy").
//!
//! Source: [`send_postcopy`] sends the lazy list and moves the eager pages as [`crate::send`]
//! does, returning once the destination runs the process; [`serve_postcopy`] then streams the
//! lazy pages, those the destination asks for ([`Message::PageRequest`]) ahead of the rest,
//! which go in list order, until the destination acknowledges them all.
//!
//! Destination: after [`crate::Incoming::land`] and the resume, [`receive_postcopy`] writes
//! each arriving page into a staging frame of the guest (the agent's pinned buffer) and hands
//! the batch to the caller to place into the process ([`PlaceRequest`]); the pages the
//! process waits for (faults, from the caller) go to the source as requests, and a fault on
//! a page that is not in the list (never present at the source) is answered with zeros at
//! once.
//!
//! ```text
//! source: send_postcopy(...) -> the process runs at the destination -> serve_postcopy(...)
//! destination: receive -> land -> resume -> Landed::finish -> receive_postcopy(...)
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::timeout;

use crate::checksum::Checksum;
use crate::engine::{
    error_chain, farewell, farewell_on_error, flush, io_error, push_page, read_frame, read_message,
    send, unexpected_or_abort, write_message, Clock,
};
use crate::protocol::{
    bounded_text, Ack, BatchWriter, Done, Message, MessageType, PageBatchView, HEADER_LEN,
    LAZY_WINDOW, MAX_BATCH_PAGES, MAX_JOB_PAGES, MAX_PAGE_LIST, PAGE_SIZE,
};
use crate::{MigrationError, PageSink, PageSource, Stats, Timeouts};

/// Moves a post-copy job up to the resume: sends the vaddrs of the `lazy` pages
/// ([`Message::Postcopy`]), then the job as [`send`] does with the `eager` pages (`(vaddr,
/// pfn)` pairs). Returns once the destination's `Ack` says the process runs there; every
/// error means it does not (the caller thaws its frozen copy). Then call [`serve_postcopy`].
#[allow(clippy::too_many_arguments)]
pub async fn send_postcopy<S>(
    stream: &mut S,
    job_id: u64,
    image: &[u8],
    eager: &[(u64, u64)],
    lazy: &[(u64, u64)],
    source: &impl PageSource,
    timeouts: &Timeouts,
    progress: impl FnMut(&Stats),
) -> Result<Stats, MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const DESCRIBING: &str = "sending the post-copy page list";
    if lazy.len() as u64 > MAX_JOB_PAGES {
        return Err(MigrationError::InvalidJob(format!(
            "{} lazy pages, the protocol moves at most {MAX_JOB_PAGES} per job",
            lazy.len()
        )));
    }
    if let Some(&(vaddr, _)) = lazy.iter().find(|(v, _)| v % PAGE_SIZE as u64 != 0) {
        return Err(MigrationError::InvalidJob(format!(
            "page address {vaddr:#x} is not page-aligned"
        )));
    }
    let mut listed = Stats::default();
    for chunk in lazy.chunks(MAX_PAGE_LIST) {
        let list = Message::Postcopy(chunk.iter().map(|&(v, _)| v).collect());
        write_message(stream, &list, &mut listed, timeouts.io, DESCRIBING).await?;
    }
    let mut stats = send(stream, job_id, image, eager, source, timeouts, progress).await?;
    stats.bytes += listed.bytes;
    Ok(stats)
}

/// What the source still has to send, shared by its writer and its request reader.
#[derive(Debug, Default)]
struct Queue {
    /// Indexes into the lazy list that the destination asked for, oldest first.
    urgent: VecDeque<usize>,
    /// Batches the source may still send beyond those the destination placed: starts at
    /// [`LAZY_WINDOW`], one less per batch sent, one more per batch placed. Asked-for pages
    /// go regardless (it may drop below zero); the others wait while it is not positive.
    credit: i64,
}

/// Streams the lazy pages after [`send_postcopy`]: those the destination asks for first,
/// the others in list order meanwhile, each exactly once, read from `source` by frame; then
/// `Done` and the destination's `Ack`. `progress` is called after each batch. Returns the
/// statistics of this phase (its [`Stats::requested_pages`]: pages sent because the process
/// waited for them). The process runs at the destination throughout: an error here means it
/// is lost there.
pub async fn serve_postcopy<S>(
    stream: &mut S,
    lazy: &[(u64, u64)],
    source: &impl PageSource,
    timeouts: &Timeouts,
    mut progress: impl FnMut(&Stats),
) -> Result<Stats, MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const STREAMING: &str = "streaming post-copy pages";
    const REQUESTS: &str = "reading the destination's page requests";
    const ACK: &str = "waiting for the destination to confirm every page (Ack)";
    const PLACED: &str =
        "waiting for the destination to place the pages sent so far (Placed), to send more";
    let index: HashMap<u64, usize> = lazy.iter().enumerate().map(|(i, &(v, _))| (v, i)).collect();
    let queue = Mutex::new(Queue {
        credit: i64::from(LAZY_WINDOW),
        ..Queue::default()
    });
    // Wakes the writer when a request or a credit came.
    let wake = Notify::new();
    // Set when the reader fails: the writer stops at the next frame boundary.
    let stopping = std::sync::atomic::AtomicBool::new(false);
    let (mut rd, mut wr) = tokio::io::split(stream);

    // The destination's messages: requests until its Ack.
    let reader = async {
        let mut buf = Vec::new();
        loop {
            match read_message(&mut rd, &mut buf, REQUESTS).await? {
                Message::PageRequest(vaddrs) => {
                    let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                    for v in vaddrs {
                        let Some(&i) = index.get(&v) else {
                            return Err(MigrationError::NotLazy {
                                vaddr: v,
                                what: "was asked for but is not one of the job's lazy pages",
                            });
                        };
                        q.urgent.push_back(i);
                    }
                    wake.notify_one();
                }
                Message::Placed { batches } => {
                    queue.lock().unwrap_or_else(|p| p.into_inner()).credit += i64::from(batches);
                    wake.notify_one();
                }
                Message::Ack(ack) => return Ok(ack),
                other => return Err(unexpected_or_abort(other, REQUESTS, "PageRequest or Ack")),
            }
        }
    };

    // The pages, then Done.
    let writer = async {
        let mut clock = Clock::new();
        let mut stats = Stats {
            total_pages: lazy.len() as u64,
            ..Stats::default()
        };
        clock.streaming(&mut stats);
        let mut sent = vec![false; lazy.len()];
        let mut next = 0usize;
        let mut batch = BatchWriter::lazy();
        let mut checksum = Checksum::new();
        let mut picked: Vec<(usize, bool)> = Vec::with_capacity(MAX_BATCH_PAGES);
        while stats.pages < lazy.len() as u64 {
            if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(MigrationError::InvalidJob("stopped".into()));
            }
            picked.clear();
            let may_stream = {
                let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                while picked.len() < MAX_BATCH_PAGES {
                    let Some(i) = q.urgent.pop_front() else { break };
                    if !sent[i] {
                        sent[i] = true;
                        picked.push((i, true));
                    }
                }
                let may = picked.is_empty() && q.credit > 0;
                if !picked.is_empty() || may {
                    q.credit -= 1;
                }
                may
            };
            // A batch of requested pages goes out alone, at once; the others within the
            // window.
            if picked.is_empty() {
                if !may_stream {
                    // A destination that stops placing what it was sent (its guest died, its
                    // agent hangs) fails the job here, instead of holding it for good.
                    timeout(timeouts.io, wake.notified()).await.map_err(|_| {
                        MigrationError::Timeout {
                            during: PLACED,
                            after: timeouts.io,
                        }
                    })?;
                    continue;
                }
                while picked.len() < MAX_BATCH_PAGES && next < lazy.len() {
                    if !sent[next] {
                        sent[next] = true;
                        picked.push((next, false));
                    }
                    next += 1;
                }
            }
            batch.start(picked.len());
            for &(i, requested) in &picked {
                let (vaddr, pfn) = lazy[i];
                push_page(&mut batch, vaddr, pfn, source, &mut checksum, &mut stats)?;
                stats.requested_pages += u64::from(requested);
            }
            let frame = batch.finish();
            timeout(timeouts.io, wr.write_all(frame))
                .await
                .map_err(|_| MigrationError::Timeout {
                    during: STREAMING,
                    after: timeouts.io,
                })?
                .map_err(|e| io_error(STREAMING, e))?;
            stats.bytes += frame.len() as u64;
            if picked.iter().any(|&(_, requested)| requested) {
                flush(&mut wr, timeouts.io, STREAMING).await?;
            }
            clock.update(&mut stats);
            progress(&stats);
            // Let the request reader run between batches.
            tokio::task::yield_now().await;
        }
        let done = Message::Done(Done {
            pages: stats.pages,
            zero_pages: stats.zero_pages,
            checksum: checksum.value(),
        });
        write_message(&mut wr, &done, &mut stats, timeouts.io, STREAMING).await?;
        flush(&mut wr, timeouts.io, STREAMING).await?;
        Ok::<_, MigrationError>((stats, clock))
    };

    let outcome = async {
        tokio::pin!(reader, writer);
        let mut written = None;
        loop {
            tokio::select! {
                w = &mut writer, if written.is_none() => written = Some(w?),
                a = &mut reader => {
                    let ack = match a {
                        Ok(ack) => ack,
                        Err(e) => {
                            // Let a frame being written end, so a farewell can follow it.
                            stopping.store(true, std::sync::atomic::Ordering::SeqCst);
                            wake.notify_one();
                            if written.is_none() {
                                let _ = timeout(timeouts.io, &mut writer).await;
                            }
                            return Err(e);
                        }
                    };
                    return match written {
                        Some((mut stats, clock)) => {
                            clock.update(&mut stats);
                            Ok((ack, stats))
                        }
                        None => Err(MigrationError::Unexpected {
                            during: STREAMING,
                            expected: "PageRequest or nothing until Done",
                            got: MessageType::Ack,
                        }),
                    };
                }
                () = tokio::time::sleep(timeouts.resume), if written.is_some() => {
                    return Err(MigrationError::Timeout { during: ACK, after: timeouts.resume });
                }
            }
        }
    }
    .await;
    let (ack, mut stats) = match outcome {
        Ok(v) => v,
        Err(e) => {
            if !matches!(
                e,
                MigrationError::Io { .. }
                    | MigrationError::Closed { .. }
                    | MigrationError::Timeout { .. }
                    | MigrationError::PeerAborted(_)
            ) {
                farewell(
                    &mut wr,
                    &Message::Abort {
                        reason: bounded_text(&error_chain(&e)),
                    },
                )
                .await;
            }
            return Err(e);
        }
    };
    match ack {
        Ack { ok: true, message } => {
            stats.note = message;
            Ok(stats)
        }
        Ack { ok: false, message } => Err(MigrationError::Destination(message)),
    }
}

/// Pages for the destination's agent to copy into the process: each page's vaddr and the
/// staging slot it was written to (`None`: a page of zeros). Answer on `done` once they are
/// in place (or why not); the staging slots are reused after that.
#[derive(Debug)]
pub struct PlaceRequest {
    /// `(vaddr, slot)` pairs.
    pub pages: Vec<(u64, Option<u32>)>,
    /// Where the outcome goes.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// How the destination's side of post-copy reaches its process: `place` takes batches of
/// staged pages to copy in, `faults` brings the pages the process waits for.
#[derive(Debug)]
pub struct LazyTarget<'a> {
    /// The guest frames of the staging slots (at least one).
    pub staging: &'a [u64],
    /// Batches of pages to place.
    pub place: mpsc::Sender<PlaceRequest>,
    /// Pages the process waits for (repeats allowed).
    pub faults: mpsc::UnboundedReceiver<Vec<u64>>,
}

/// The destination's lazy pages, shared by its reader and its requester.
#[derive(Debug)]
struct Arrivals {
    /// Per lazy page: arrived (and placed).
    arrived: Vec<bool>,
    /// Per lazy page: asked for already.
    asked: Vec<bool>,
}

/// Receives the lazy pages of a post-copy job after the process resumed (and after the
/// first `Ack`, [`crate::Landed::finish_with_note`]): each batch is written into the staging
/// frames through `sink` and placed by the caller ([`LazyTarget::place`]) before the next is
/// read; faults ([`LazyTarget::faults`]) on pages still to come are asked for, faults on
/// pages not in the list are placed as zeros. Checks `Done` and answers `Ack`. Returns the
/// phase's statistics (pages, zero pages, [`Stats::requested_pages`]: pages asked for). On
/// error the source was told where the connection allowed; the process cannot go on then.
pub async fn receive_postcopy<S>(
    stream: &mut S,
    lazy: &[u64],
    target: LazyTarget<'_>,
    sink: &impl PageSink,
    timeouts: &Timeouts,
    mut progress: impl FnMut(&Stats),
) -> Result<Stats, MigrationError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const RECEIVING: &str = "receiving post-copy pages";
    const ASKING: &str = "asking the source for pages the process waits for";
    let LazyTarget {
        staging,
        place,
        mut faults,
    } = target;
    if staging.is_empty() {
        return Err(MigrationError::InvalidJob(
            "post-copy needs at least one staging frame".into(),
        ));
    }
    let mut clock = Clock::new();
    let mut stats = Stats {
        total_pages: lazy.len() as u64,
        ..Stats::default()
    };
    clock.streaming(&mut stats);
    let index: HashMap<u64, usize> = lazy.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let state = Mutex::new(Arrivals {
        arrived: vec![false; lazy.len()],
        asked: vec![false; lazy.len()],
    });
    let stop = Notify::new();
    // Batches placed, for the requester to report (Placed).
    let (placed_tx, mut placed_rx) = mpsc::unbounded_channel::<u32>();
    let placer = place.clone();
    let (mut rd, mut wr) = tokio::io::split(stream);

    let place_pages = |pages: Vec<(u64, Option<u32>)>| {
        let placer = placer.clone();
        async move {
            let (done, outcome) = oneshot::channel();
            placer
                .send(PlaceRequest { pages, done })
                .await
                .map_err(|_| MigrationError::Place("the agent's thread ended".into()))?;
            outcome
                .await
                .map_err(|_| MigrationError::Place("the agent's thread ended".into()))?
                .map_err(MigrationError::Place)
        }
    };

    let reader = async {
        let mut buf = Vec::new();
        let mut checksum = Checksum::new();
        let result = async {
            loop {
                let header = timeout(timeouts.io, read_frame(&mut rd, &mut buf, RECEIVING))
                    .await
                    .map_err(|_| MigrationError::Timeout {
                        during: RECEIVING,
                        after: timeouts.io,
                    })??;
                stats.bytes += (HEADER_LEN + header.len) as u64;
                let payload = &buf[..header.len];
                let protocol = |source| MigrationError::Protocol {
                    during: RECEIVING,
                    source,
                };
                if header.message != MessageType::LazyBatch {
                    match Message::decode(header.message, payload).map_err(protocol)? {
                        Message::Done(done) => {
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
                            if done.checksum != checksum.value() {
                                return Err(MigrationError::ChecksumMismatch {
                                    expected: done.checksum,
                                    got: checksum.value(),
                                });
                            }
                            return Ok(());
                        }
                        other => {
                            return Err(unexpected_or_abort(other, RECEIVING, "LazyBatch or Done"))
                        }
                    }
                }
                let batch =
                    PageBatchView::parse_as(MessageType::LazyBatch, payload).map_err(protocol)?;
                let pages: Vec<_> = batch.pages().collect();
                for chunk in pages.chunks(staging.len()) {
                    let mut placements = Vec::with_capacity(chunk.len());
                    let mut indexes = Vec::with_capacity(chunk.len());
                    for (slot, page) in chunk.iter().enumerate() {
                        let Some(&i) = index.get(&page.vaddr) else {
                            return Err(MigrationError::NotLazy {
                                vaddr: page.vaddr,
                                what: "arrived but is not one of the job's lazy pages",
                            });
                        };
                        if state.lock().unwrap_or_else(|p| p.into_inner()).arrived[i]
                            || indexes.contains(&i)
                        {
                            return Err(MigrationError::NotLazy {
                                vaddr: page.vaddr,
                                what: "arrived twice",
                            });
                        }
                        indexes.push(i);
                        match page.data {
                            Some(data) => {
                                checksum.add_page(page.vaddr, data);
                                let pfn = staging[slot];
                                sink.write_page(pfn, data).map_err(|source| {
                                    MigrationError::WritePage {
                                        vaddr: page.vaddr,
                                        pfn,
                                        source,
                                    }
                                })?;
                                placements.push((page.vaddr, Some(slot as u32)));
                            }
                            None => {
                                checksum.add_zero_page(page.vaddr);
                                stats.zero_pages += 1;
                                placements.push((page.vaddr, None));
                            }
                        }
                    }
                    place_pages(placements).await?;
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    for &i in &indexes {
                        st.arrived[i] = true;
                        stats.requested_pages += u64::from(st.asked[i]);
                    }
                    stats.pages += indexes.len() as u64;
                }
                let _ = placed_tx.send(1);
                clock.update(&mut stats);
                progress(&stats);
            }
        }
        .await;
        stop.notify_one();
        result
    };

    let requester = async {
        let mut counted = Stats::default();
        let mut reporting = true;
        loop {
            let vaddrs = tokio::select! {
                biased;
                () = stop.notified() => return Ok(()),
                Some(n) = placed_rx.recv() => {
                    let mut batches = n;
                    while let Ok(more) = placed_rx.try_recv() {
                        batches += more;
                    }
                    let placed = Message::Placed { batches };
                    write_message(&mut wr, &placed, &mut counted, timeouts.io, ASKING).await?;
                    flush(&mut wr, timeouts.io, ASKING).await?;
                    continue;
                }
                f = faults.recv(), if reporting => match f {
                    Some(v) => v,
                    // The caller stopped reporting faults.
                    None => {
                        reporting = false;
                        continue;
                    }
                },
            };
            let (mut ask, mut zeros) = (Vec::new(), Vec::new());
            {
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                for v in vaddrs {
                    let v = v - v % PAGE_SIZE as u64;
                    match index.get(&v) {
                        Some(&i) if !st.arrived[i] && !st.asked[i] => {
                            st.asked[i] = true;
                            ask.push(v);
                        }
                        Some(_) => {}
                        None if !zeros.iter().any(|&(z, _)| z == v) => zeros.push((v, None)),
                        None => {}
                    }
                }
            }
            if !zeros.is_empty() {
                place_pages(zeros).await?;
            }
            for chunk in ask.chunks(MAX_PAGE_LIST) {
                let request = Message::PageRequest(chunk.to_vec());
                write_message(&mut wr, &request, &mut counted, timeouts.io, ASKING).await?;
                flush(&mut wr, timeouts.io, ASKING).await?;
            }
        }
    };

    let (received, asked) = tokio::join!(reader, requester);
    drop(place);
    let result = received.and(asked);
    const ANSWERING: &str = "telling the source every page arrived (Ack)";
    match result {
        Ok(()) => {
            let ack = Message::Ack(Ack {
                ok: true,
                message: String::new(),
            });
            let mut written = Stats::default();
            write_message(&mut wr, &ack, &mut written, timeouts.io, ANSWERING).await?;
            flush(&mut wr, timeouts.io, ANSWERING).await?;
            clock.update(&mut stats);
            Ok(stats)
        }
        Err(e) => {
            farewell_on_error(&mut wr, &e).await;
            Err(e)
        }
    }
}

/// The `(start, end)` ranges among `mappings` (`(start, end)` of the process's private
/// anonymous mappings, in any order) that hold at least one of `lazy` (vaddrs); `Err` names a
/// vaddr that is in none of them.
pub fn lazy_ranges(mappings: &[(u64, u64)], lazy: &[u64]) -> Result<Vec<(u64, u64)>, u64> {
    let mut sorted = mappings.to_vec();
    sorted.sort_unstable();
    let mut used = vec![false; sorted.len()];
    for &v in lazy {
        let i = sorted.partition_point(|&(s, _)| s <= v);
        match i.checked_sub(1) {
            Some(i) if v < sorted[i].1 => used[i] = true,
            _ => return Err(v),
        }
    }
    Ok(sorted
        .into_iter()
        .zip(used)
        .filter_map(|(r, u)| u.then_some(r))
        .collect())
}

#[cfg(test)]
mod tests;
