//! The engines end to end over an in-memory stream, between two vm-memory "guests".

use std::cell::Cell;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{duplex, DuplexStream, ReadBuf};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::protocol::{PageBatch, PageEntry};

type Mem = GuestMemoryMmap<()>;

/// Source guest: 4 MiB from 0 (frames 0..1024).
fn source_guest() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

/// Destination guest: 1 MiB from 0 and 4 MiB from 16 MiB (frames 0x1000..0x1400), filled
/// with 0xaa so that pages not written stand out.
fn destination_guest() -> Mem {
    let mem = Mem::from_ranges(&[
        (GuestAddress(0), 1 << 20),
        (GuestAddress(16 << 20), 4 << 20),
    ])
    .unwrap();
    mem.write_slice(&vec![0xaa; 4 << 20], GuestAddress(16 << 20))
        .unwrap();
    mem
}

/// A page that holds no zero byte, different for every `i`.
fn pattern(i: usize) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|b| ((b * 7 + i * 13) % 251) as u8 + 1)
        .collect()
}

/// One job's layout: `n` pages at two vaddr ranges, source frames and destination frames
/// scattered (permutations), every fifth page zero.
struct Job {
    pages: Vec<(u64, u64)>,
    frames: Vec<u64>,
    zero: Vec<bool>,
    image: Vec<u8>,
}

impl Job {
    fn new(n: usize, source: &Mem) -> Job {
        assert!(n <= 1024);
        let mut job = Job {
            pages: Vec::new(),
            frames: Vec::new(),
            zero: Vec::new(),
            image: b"a process image, opaque to the engines".to_vec(),
        };
        for i in 0..n {
            let vaddr = if i < n / 2 {
                0x40_0000 + i as u64 * 4096
            } else {
                0x7fff_f000_0000 + i as u64 * 4096
            };
            let src = (i as u64 * 37) % 1024;
            let dst = 0x1000 + (i as u64 * 53) % 1024;
            let zero = i % 5 == 4;
            let data = if zero { vec![0; PAGE_SIZE] } else { pattern(i) };
            source.write_slice(&data, GuestAddress(src * 4096)).unwrap();
            job.pages.push((vaddr, src));
            job.frames.push(dst);
            job.zero.push(zero);
        }
        job
    }

    fn vaddrs(&self) -> Vec<u64> {
        self.pages.iter().map(|p| p.0).collect()
    }

    fn zero_pages(&self) -> u64 {
        self.zero.iter().filter(|z| **z).count() as u64
    }

    /// Checks that every page sits in its destination frame.
    fn check_landed(&self, dest: &Mem) {
        for (i, &pfn) in self.frames.iter().enumerate() {
            let mut got = vec![0; PAGE_SIZE];
            dest.read_slice(&mut got, GuestAddress(pfn * 4096)).unwrap();
            let want = if self.zero[i] {
                vec![0; PAGE_SIZE]
            } else {
                pattern(i)
            };
            assert!(got == want, "page {i} in frame {pfn:#x}");
        }
    }
}

const T: Timeouts = Timeouts {
    io: Duration::from_secs(10),
    skeleton: Duration::from_secs(10),
    resume: Duration::from_secs(10),
};

/// A stream that records what passes through its write side and can flip one byte of it.
struct Tap {
    inner: DuplexStream,
    written: Vec<u8>,
    corrupt_at: Option<usize>,
}

impl Tap {
    fn new(inner: DuplexStream) -> Self {
        Tap {
            inner,
            written: Vec::new(),
            corrupt_at: None,
        }
    }
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut data = buf.to_vec();
        let start = this.written.len();
        if let Some(at) = this.corrupt_at {
            if (start..start + data.len()).contains(&at) {
                data[at - start] ^= 0x01;
            }
        }
        let poll = Pin::new(&mut this.inner).poll_write(cx, &data);
        if let Poll::Ready(Ok(n)) = poll {
            this.written.extend_from_slice(&data[..n]);
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A sink that counts its writes.
struct CountingSink<'a> {
    mem: &'a Mem,
    writes: Cell<u64>,
}

impl PageSink for CountingSink<'_> {
    fn write_page(&self, pfn: u64, data: &[u8]) -> Result<(), PageError> {
        self.writes.set(self.writes.get() + 1);
        self.mem.write_page(pfn, data)
    }
}

/// The destination's ordinary course: accept, land, resume (`resumed`), answer.
async fn destination<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    job: &Job,
    zeroed: bool,
    sink: &impl PageSink,
    resumed: Result<(), String>,
) -> Result<Stats, MigrationError> {
    let incoming = receive(stream, &T).await?;
    assert_eq!(incoming.job_id(), 7);
    assert_eq!(incoming.image(), &job.image[..]);
    assert_eq!(incoming.vaddrs(), &job.vaddrs()[..]);
    let mut calls = 0;
    let landed = incoming
        .land(&job.frames, zeroed, sink, |_| calls += 1)
        .await?;
    assert_eq!(calls, job.pages.len().div_ceil(MAX_BATCH_PAGES));
    landed.finish(resumed).await
}

/// Parses the frames a source wrote: (data pages, zero pages) in its batches.
fn batch_kinds(wire: &[u8]) -> (u64, u64) {
    let (mut data, mut zero) = (0, 0);
    let mut rest = wire;
    while let Some((m, used)) = Message::decode_frame(rest).unwrap() {
        if let Message::PageBatch(b) = m {
            for e in b.entries {
                match e.kind {
                    PageKind::Data => data += 1,
                    PageKind::Zero => zero += 1,
                    PageKind::Held => {}
                }
            }
        }
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    (data, zero)
}

#[tokio::test]
async fn every_page_lands_in_its_frame() {
    let (src_mem, dst_mem) = (source_guest(), destination_guest());
    let job = Job::new(700, &src_mem);
    let (a, mut b) = duplex(256 * 1024);
    let mut a = Tap::new(a);
    let mut progress = Vec::new();
    let sink = CountingSink {
        mem: &dst_mem,
        writes: Cell::new(0),
    };
    let (sent, landed) = tokio::join!(
        send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |s| {
            progress.push(s.pages)
        }),
        destination(&mut b, &job, false, &sink, Ok(())),
    );
    let (sent, landed) = (sent.unwrap(), landed.unwrap());
    job.check_landed(&dst_mem);

    // Zero pages travel as markers only; without known-zero frames they are written.
    assert_eq!(
        batch_kinds(&a.written),
        (700 - job.zero_pages(), job.zero_pages())
    );
    assert_eq!(sink.writes.get(), 700);

    for s in [&sent, &landed] {
        assert_eq!(s.job_id, 7);
        assert_eq!(s.total_pages, 700);
        assert_eq!(s.pages, 700);
        assert_eq!(s.zero_pages, 140);
        assert_eq!(s.data_pages(), 560);
        assert_eq!(s.remaining_pages(), 0);
        assert!(s.setup <= s.elapsed);
        assert!(s.throughput_mib_s >= 0.0);
    }
    assert_eq!(sent.bytes, a.written.len() as u64);
    assert_eq!(landed.bytes, sent.bytes);
    assert_eq!(progress, vec![256, 512, 700]);
}

#[tokio::test]
async fn zero_pages_are_skipped_into_known_zero_frames() {
    let src_mem = source_guest();
    let dst_mem = Mem::from_ranges(&[(GuestAddress(16 << 20), 4 << 20)]).unwrap();
    let job = Job::new(300, &src_mem);
    let (mut a, mut b) = duplex(64 * 1024);
    let sink = CountingSink {
        mem: &dst_mem,
        writes: Cell::new(0),
    };
    let (sent, landed) = tokio::join!(
        send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |_| {}),
        destination(&mut b, &job, true, &sink, Ok(())),
    );
    sent.unwrap();
    assert_eq!(landed.unwrap().zero_pages, job.zero_pages());
    assert_eq!(sink.writes.get(), 300 - job.zero_pages());
    job.check_landed(&dst_mem);
}

#[tokio::test]
async fn an_empty_job_moves() {
    let (src_mem, dst_mem) = (source_guest(), destination_guest());
    let job = Job::new(0, &src_mem);
    let (mut a, mut b) = duplex(4096);
    let (sent, landed) = tokio::join!(
        send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |_| {}),
        destination(&mut b, &job, false, &dst_mem, Ok(())),
    );
    assert_eq!(sent.unwrap().pages, 0);
    assert_eq!(landed.unwrap().pages, 0);
}

#[tokio::test]
async fn a_byte_corrupted_in_flight_fails_the_checksum_on_both_sides() {
    let (src_mem, dst_mem) = (source_guest(), destination_guest());
    let job = Job::new(300, &src_mem);
    let hello = Message::Hello(Hello {
        job_id: 7,
        page_count: 300,
        image: job.image.clone(),
    });
    let list = Message::PageList(job.vaddrs());
    let description = hello.encode().unwrap().len() + list.encode().unwrap().len();
    // A byte inside the first batch's first page (a data page).
    let first_data = description + HEADER_LEN + 4 + MAX_BATCH_PAGES * 9;
    let (a, mut b) = duplex(64 * 1024);
    let mut a = Tap::new(a);
    a.corrupt_at = Some(first_data + 100);
    let (sent, landed) = tokio::join!(
        send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |_| {}),
        destination(&mut b, &job, false, &dst_mem, Ok(())),
    );
    assert!(
        matches!(landed, Err(MigrationError::ChecksumMismatch { .. })),
        "{landed:?}"
    );
    match sent {
        Err(MigrationError::Destination(message)) => {
            assert!(message.contains("checksum"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_failed_resume_is_an_error_at_the_source() {
    let (src_mem, dst_mem) = (source_guest(), destination_guest());
    let job = Job::new(10, &src_mem);
    let (mut a, mut b) = duplex(64 * 1024);
    let (sent, landed) = tokio::join!(
        send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |_| {}),
        destination(
            &mut b,
            &job,
            false,
            &dst_mem,
            Err("the agent could not restore registers".into())
        ),
    );
    landed.unwrap();
    match sent {
        Err(e @ MigrationError::Destination(_)) => assert_eq!(
            e.to_string(),
            "the destination could not take over the process: the agent could not restore \
             registers"
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_rejected_job_is_an_error_at_the_source() {
    let src_mem = source_guest();
    let job = Job::new(10, &src_mem);
    let (mut a, mut b) = duplex(64 * 1024);
    let dst = async {
        let incoming = receive(&mut b, &T).await.unwrap();
        incoming.reject("no memory for the skeleton").await.unwrap();
    };
    let (sent, ()) = tokio::join!(
        send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |_| {}),
        dst
    );
    match sent {
        Err(MigrationError::PeerAborted(reason)) => {
            assert_eq!(reason, "no memory for the skeleton")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_destination_that_drops_the_stream_fails_the_source() {
    let src_mem = source_guest();
    let job = Job::new(10, &src_mem);
    // Before Ready.
    let (mut a, mut b) = duplex(64 * 1024);
    let dst = async move {
        let incoming = receive(&mut b, &T).await.unwrap();
        drop(incoming);
        drop(b);
    };
    let (sent, ()) = tokio::join!(
        send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |_| {}),
        dst
    );
    assert!(
        matches!(sent, Err(MigrationError::Closed { .. })),
        "{sent:?}"
    );

    // In the middle of the page stream: the destination stops after its first batch.
    let job = Job::new(1000, &src_mem);
    let dst_mem = destination_guest();
    let (mut a, mut b) = duplex(64 * 1024);
    let dst = async move {
        let incoming = receive(&mut b, &T).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut tx = Some(tx);
        let land = incoming.land(&job.frames, false, &dst_mem, |_| {
            if let Some(tx) = tx.take() {
                let _ = tx.send(());
            }
        });
        tokio::select! {
            _ = land => panic!("the landing should have been cut"),
            _ = rx => {}
        }
        drop(b);
    };
    let job = Job::new(1000, &src_mem);
    let (sent, ()) = tokio::join!(
        send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |_| {}),
        dst
    );
    assert!(
        matches!(sent, Err(MigrationError::Closed { .. })),
        "{sent:?}"
    );
}

#[tokio::test]
async fn a_source_that_drops_the_stream_fails_the_destination() {
    let (src_mem, dst_mem) = (source_guest(), destination_guest());
    let job = Job::new(1000, &src_mem);
    let (mut a, mut b) = duplex(64 * 1024);
    let src = async move {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut tx = Some(tx);
        let sending = send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |_| {
            if let Some(tx) = tx.take() {
                let _ = tx.send(());
            }
        });
        tokio::select! {
            _ = sending => panic!("the stream should have been cut"),
            _ = rx => {}
        }
        drop(a);
    };
    let job = Job::new(1000, &source_guest());
    let (landed, ()) = tokio::join!(destination(&mut b, &job, false, &dst_mem, Ok(())), src);
    assert!(
        matches!(landed, Err(MigrationError::Closed { .. })),
        "{landed:?}"
    );
}

#[tokio::test]
async fn silence_times_out_on_both_sides() {
    let src_mem = source_guest();
    let job = Job::new(10, &src_mem);
    let short = Timeouts {
        io: Duration::from_millis(100),
        skeleton: Duration::from_millis(100),
        resume: Duration::from_millis(100),
    };
    // A destination that never answers Hello.
    let (mut a, _b) = duplex(64 * 1024);
    let sent = send(&mut a, 7, &job.image, &job.pages, &src_mem, &short, |_| {}).await;
    assert!(
        matches!(sent, Err(MigrationError::Timeout { .. })),
        "{sent:?}"
    );
    // A source that never sends.
    let (_a, mut b) = duplex(64 * 1024);
    let got = receive(&mut b, &short).await;
    assert!(
        matches!(got, Err(MigrationError::Timeout { .. })),
        "{got:?}"
    );
}

#[tokio::test]
async fn a_frame_the_source_cannot_read_aborts_the_job() {
    let src_mem = source_guest();
    let mut job = Job::new(300, &src_mem);
    job.pages[270].1 = 5000; // beyond the source guest's 1024 frames
    let (mut a, mut b) = duplex(64 * 1024);
    let dst_mem = destination_guest();
    let (sent, landed) = tokio::join!(
        send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |_| {}),
        destination(&mut b, &job, false, &dst_mem, Ok(())),
    );
    match sent {
        Err(MigrationError::ReadPage {
            vaddr,
            pfn: 5000,
            source: PageError::OutOfRange { pfn: 5000 },
        }) => assert_eq!(vaddr, job.pages[270].0),
        other => panic!("{other:?}"),
    }
    match landed {
        Err(MigrationError::PeerAborted(reason)) => {
            assert!(reason.contains("frame 0x1388"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn invalid_jobs_are_refused_before_anything_is_sent() {
    let src_mem = source_guest();
    let (a, _b) = duplex(1024);
    let mut a = Tap::new(a);
    let unaligned = [(0x40_0010, 1)];
    let sent = send(&mut a, 7, b"", &unaligned, &src_mem, &T, |_| {}).await;
    assert!(
        matches!(sent, Err(MigrationError::InvalidJob(_))),
        "{sent:?}"
    );
    let big = vec![0; crate::protocol::MAX_IMAGE + 1];
    let sent = send(&mut a, 7, &big, &[], &src_mem, &T, |_| {}).await;
    assert!(
        matches!(sent, Err(MigrationError::InvalidJob(_))),
        "{sent:?}"
    );
    assert!(a.written.is_empty());
}

#[tokio::test]
async fn a_destination_with_the_wrong_number_of_frames_aborts() {
    let src_mem = source_guest();
    let job = Job::new(10, &src_mem);
    let dst_mem = destination_guest();
    let (mut a, mut b) = duplex(64 * 1024);
    let dst = async {
        let incoming = receive(&mut b, &T).await.unwrap();
        incoming
            .land(&job.frames[..9], false, &dst_mem, |_| {})
            .await
    };
    let (sent, landed) = tokio::join!(
        send(&mut a, 7, &job.image, &job.pages, &src_mem, &T, |_| {}),
        dst
    );
    assert!(
        matches!(landed, Err(MigrationError::InvalidJob(_))),
        "{landed:?}"
    );
    assert!(
        matches!(sent, Err(MigrationError::PeerAborted(_))),
        "{sent:?}"
    );
}

/// A hand-written source that breaks the rules; returns the destination's error and what it
/// answered.
async fn hostile_source(frames: Vec<Message>, pages: usize) -> (MigrationError, Vec<Message>) {
    let dst_mem = destination_guest();
    let (mut a, mut b) = duplex(1 << 20);
    for m in &frames {
        a.write_all(&m.encode().unwrap()).await.unwrap();
    }
    let dst_frames: Vec<u64> = (0..pages as u64).map(|i| 0x1000 + i).collect();
    let result = async {
        let incoming = receive(&mut b, &T).await?;
        incoming
            .land(&dst_frames, false, &dst_mem, |_| {})
            .await
            .map(|_| ())
    }
    .await;
    drop(b);
    let mut answers = Vec::new();
    let mut wire = Vec::new();
    a.read_to_end(&mut wire).await.unwrap();
    let mut rest = &wire[..];
    while let Some((m, used)) = Message::decode_frame(rest).unwrap() {
        answers.push(m);
        rest = &rest[used..];
    }
    (result.expect_err("the destination must refuse"), answers)
}

fn hello(pages: u64) -> Message {
    Message::Hello(Hello {
        job_id: 1,
        page_count: pages,
        image: vec![],
    })
}

fn data_batch(vaddrs: &[u64]) -> Message {
    Message::PageBatch(PageBatch {
        entries: vaddrs
            .iter()
            .map(|&vaddr| PageEntry {
                vaddr,
                kind: PageKind::Data,
            })
            .collect(),
        data: vaddrs.iter().flat_map(|_| pattern(1)).collect(),
    })
}

#[tokio::test]
async fn a_destination_refuses_a_source_that_breaks_the_rules() {
    // A page out of list order.
    let (e, answers) = hostile_source(
        vec![
            hello(2),
            Message::PageList(vec![0x1000, 0x2000]),
            data_batch(&[0x2000, 0x1000]),
        ],
        2,
    )
    .await;
    assert!(
        matches!(
            e,
            MigrationError::OutOfOrder {
                index: 0,
                expected: 0x1000,
                got: 0x2000
            }
        ),
        "{e:?}"
    );
    assert_eq!(answers[0], Message::Ready);
    assert!(matches!(answers[1], Message::Abort { .. }), "{answers:?}");

    // More pages than announced.
    let (e, _) = hostile_source(
        vec![
            hello(1),
            Message::PageList(vec![0x1000]),
            data_batch(&[0x1000, 0x2000]),
        ],
        1,
    )
    .await;
    assert!(matches!(e, MigrationError::Protocol { .. }), "{e:?}");

    // A longer page list than announced.
    let (e, answers) =
        hostile_source(vec![hello(1), Message::PageList(vec![0x1000, 0x2000])], 1).await;
    assert!(matches!(e, MigrationError::Protocol { .. }), "{e:?}");
    assert!(matches!(answers[0], Message::Abort { .. }), "{answers:?}");

    // Done before every page arrived: the answer is an Ack saying no.
    let (e, answers) = hostile_source(
        vec![
            hello(2),
            Message::PageList(vec![0x1000, 0x2000]),
            data_batch(&[0x1000]),
            Message::Done(Done {
                pages: 1,
                zero_pages: 0,
                checksum: 0,
            }),
        ],
        2,
    )
    .await;
    assert!(matches!(e, MigrationError::CountMismatch { .. }), "{e:?}");
    assert!(
        matches!(&answers[1], Message::Ack(Ack { ok: false, .. })),
        "{answers:?}"
    );

    // A source that gives up.
    let (e, answers) = hostile_source(
        vec![
            hello(1),
            Message::PageList(vec![0x1000]),
            Message::Abort {
                reason: "the user cancelled".into(),
            },
        ],
        1,
    )
    .await;
    assert!(
        matches!(&e, MigrationError::PeerAborted(r) if r == "the user cancelled"),
        "{e:?}"
    );
    assert_eq!(answers, vec![Message::Ready]);

    // A message that belongs to the other direction.
    let (e, _) = hostile_source(vec![Message::Ready], 0).await;
    assert!(
        matches!(
            e,
            MigrationError::Unexpected {
                got: MessageType::Ready,
                ..
            }
        ),
        "{e:?}"
    );
}

/// Parses the frames a source wrote: (Precopy pages, final data pages, final held markers).
fn precopy_kinds(wire: &[u8]) -> (u64, u64, u64) {
    let (mut pre, mut data, mut held) = (0, 0, 0);
    let mut rest = wire;
    while let Some((m, used)) = Message::decode_frame(rest).unwrap() {
        match m {
            Message::Precopy(b) => pre += b.entries.len() as u64,
            Message::PageBatch(b) => {
                for e in b.entries {
                    match e.kind {
                        PageKind::Data => data += 1,
                        PageKind::Held => held += 1,
                        PageKind::Zero => {}
                    }
                }
            }
            _ => {}
        }
        rest = &rest[used..];
    }
    (pre, data, held)
}

#[tokio::test]
async fn precopied_pages_travel_again_only_when_written_or_moved() {
    let (src_mem, dst_mem) = (source_guest(), destination_guest());
    let job = Job::new(500, &src_mem);
    // Where the source finds each page; the guest kernel may move one.
    let mut pages = job.pages.clone();
    let (a, mut b) = duplex(256 * 1024);
    let mut a = Tap::new(a);
    let mut want: Vec<Vec<u8>> = (0..500)
        .map(|i| {
            if job.zero[i] {
                vec![0; PAGE_SIZE]
            } else {
                pattern(i)
            }
        })
        .collect();
    let source = async {
        let mut held = Precopied::new();
        let mut rounds = Vec::new();
        // Round 1: every page, while the process runs.
        precopy(&mut a, &pages, &src_mem, &mut held, &T, None, |p, _| {
            rounds.push(p)
        })
        .await
        .unwrap();
        assert_eq!(held.len(), 500);
        // Meanwhile the process wrote pages 0..50 (the dirty log has their frames), and the
        // guest kernel moved page 100 to a frame no page of the job used.
        let mut dirty = HashSet::new();
        for (i, page) in want.iter_mut().enumerate().take(50) {
            *page = pattern(i + 1000);
            src_mem
                .write_slice(page, GuestAddress(pages[i].1 * 4096))
                .unwrap();
            dirty.insert(pages[i].1);
        }
        let spare = (600 * 37) % 1024;
        src_mem
            .write_slice(&want[100], GuestAddress(spare * 4096))
            .unwrap();
        pages[100].1 = spare;
        held.forget_dirty(&dirty);
        let again: Vec<(u64, u64)> = pages
            .iter()
            .copied()
            .filter(|&(v, f)| held.stale(v, f))
            .collect();
        assert_eq!(again.len(), 51, "the written pages and the moved one");
        precopy(&mut a, &again, &src_mem, &mut held, &T, None, |_, _| {})
            .await
            .unwrap();
        // Frozen: page 7 was written once more after the last round.
        want[7] = pattern(2000);
        src_mem
            .write_slice(&want[7], GuestAddress(pages[7].1 * 4096))
            .unwrap();
        held.forget_dirty(&HashSet::from([pages[7].1]));
        let stats =
            send_after_precopy(&mut a, 7, &job.image, &pages, &src_mem, &held, &T, |_| {}).await;
        (stats, rounds)
    };
    let ((sent, rounds), landed) =
        tokio::join!(source, destination(&mut b, &job, false, &dst_mem, Ok(())));
    let (sent, landed) = (sent.unwrap(), landed.unwrap());
    assert_eq!(rounds, vec![256, 500]);
    for (i, page) in want.iter().enumerate() {
        let mut got = vec![0; PAGE_SIZE];
        dst_mem
            .read_slice(&mut got, GuestAddress(job.frames[i] * 4096))
            .unwrap();
        assert!(&got == page, "page {i} holds what the process last wrote");
    }
    // Final stream: only page 7 with its data; the rest as held markers.
    assert_eq!(precopy_kinds(&a.written), (551, 1, 499));
    assert_eq!((sent.held_pages, landed.held_pages), (499, 499));
    assert_eq!(landed.precopy_pages, 551);
    assert_eq!(sent.data_pages(), 1);
    assert_eq!(landed.bytes, a.written.len() as u64);
}

#[tokio::test]
async fn with_an_outline_held_pages_land_during_precopy_and_only_changes_land_after() {
    let (src_mem, dst_mem) = (source_guest(), destination_guest());
    let job = Job::new(500, &src_mem);
    let pages = job.pages.clone();
    let (a, mut b) = duplex(256 * 1024);
    let mut want: Vec<Vec<u8>> = (0..500)
        .map(|i| {
            if job.zero[i] {
                vec![0; PAGE_SIZE]
            } else {
                pattern(i)
            }
        })
        .collect();
    let mut a = a;
    let source = async {
        let mut held = Precopied::new();
        outline(&mut a, 7, b"an outline", &job.vaddrs(), &T)
            .await
            .unwrap();
        precopy(&mut a, &pages, &src_mem, &mut held, &T, None, |_, _| {})
            .await
            .unwrap();
        // Written while it ran: pages 0..50, sent again.
        let mut dirty = HashSet::new();
        for (i, page) in want.iter_mut().enumerate().take(50) {
            *page = pattern(i + 1000);
            src_mem
                .write_slice(page, GuestAddress(pages[i].1 * 4096))
                .unwrap();
            dirty.insert(pages[i].1);
        }
        held.forget_dirty(&dirty);
        let again: Vec<(u64, u64)> = pages[..50].to_vec();
        precopy(&mut a, &again, &src_mem, &mut held, &T, None, |_, _| {})
            .await
            .unwrap();
        // Frozen: page 7 written once more.
        want[7] = pattern(2000);
        src_mem
            .write_slice(&want[7], GuestAddress(pages[7].1 * 4096))
            .unwrap();
        held.forget_dirty(&HashSet::from([pages[7].1]));
        send_after_precopy(&mut a, 7, &job.image, &pages, &src_mem, &held, &T, |_| {}).await
    };
    let sink = CountingSink {
        mem: &dst_mem,
        writes: Cell::new(0),
    };
    let destination = async {
        // The "agent" has frames for the first 400 pages of the outline as soon as it comes.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let seen = std::sync::Mutex::new(None);
        let frames: Vec<(u64, u64)> = job.vaddrs()[..400]
            .iter()
            .copied()
            .zip(job.frames.iter().copied())
            .collect();
        let early = Early {
            on_outline: Box::new(|image, vaddrs| {
                *seen.lock().unwrap() = Some((image, vaddrs));
                let _ = tx.send(frames);
            }),
            frames: rx,
            sink: &dst_mem,
        };
        let mut incoming = receive_early(&mut b, &T, Some(early)).await.unwrap();
        let (image, vaddrs) = seen.lock().unwrap().take().expect("the outline arrived");
        assert_eq!((&image[..], vaddrs), (&b"an outline"[..], job.vaddrs()));
        // The mapping of pages 0..10 changed since the outline: they land again.
        incoming.forget_early(&[(0x40_0000, 0x40_0000 + 10 * 4096)]);
        let landed = incoming
            .land(&job.frames, false, &sink, |_| {})
            .await
            .unwrap();
        landed.finish(Ok(())).await
    };
    let (sent, landed) = tokio::join!(source, destination);
    let (sent, landed) = (sent.unwrap(), landed.unwrap());
    for (i, page) in want.iter().enumerate() {
        let mut got = vec![0; PAGE_SIZE];
        dst_mem
            .read_slice(&mut got, GuestAddress(job.frames[i] * 4096))
            .unwrap();
        assert!(&got == page, "page {i} holds what the process last wrote");
    }
    assert_eq!((sent.held_pages, landed.held_pages), (499, 499));
    // In place already: every held page with an early frame (0..400) but the 9 forgotten.
    assert_eq!(landed.early_pages, 400 - 1 - 9);
    // Written after the freeze: page 7, the 9 forgotten, the 100 without an early frame.
    assert_eq!(sink.writes.get(), 1 + 9 + 100);
}

#[tokio::test]
async fn a_held_marker_for_a_page_never_precopied_is_refused() {
    let held_batch = Message::PageBatch(PageBatch {
        entries: vec![
            PageEntry {
                vaddr: 0x1000,
                kind: PageKind::Held,
            },
            PageEntry {
                vaddr: 0x2000,
                kind: PageKind::Held,
            },
        ],
        data: vec![],
    });
    let precopied = Message::Precopy(PageBatch {
        entries: vec![PageEntry {
            vaddr: 0x1000,
            kind: PageKind::Data,
        }],
        data: pattern(1),
    });
    let (e, answers) = hostile_source(
        vec![
            precopied,
            hello(2),
            Message::PageList(vec![0x1000, 0x2000]),
            held_batch,
        ],
        2,
    )
    .await;
    assert!(
        matches!(e, MigrationError::NotHeld { vaddr: 0x2000 }),
        "{e:?}"
    );
    assert!(matches!(answers[1], Message::Abort { .. }), "{answers:?}");

    // A source that gives up during pre-copy (a cancelled job).
    let (e, _) = hostile_source(
        vec![
            Message::Precopy(PageBatch::default()),
            Message::Abort {
                reason: "cancelled by the user".into(),
            },
        ],
        0,
    )
    .await;
    assert!(matches!(e, MigrationError::PeerAborted(_)), "{e:?}");
}

#[test]
fn guest_memory_adapters_refuse_frames_outside_memory() {
    let mem = destination_guest();
    let mut page = vec![0; PAGE_SIZE];
    // Frames in the hole between the two ranges, past the end, and overflowing the address.
    for pfn in [0x100, 0xfff, 0x1400, u64::MAX / 4096, u64::MAX] {
        assert!(
            matches!(mem.read_page(pfn, &mut page), Err(PageError::OutOfRange { pfn: p }) if p == pfn),
            "{pfn:#x}"
        );
        assert!(
            matches!(
                mem.write_page(pfn, &page),
                Err(PageError::OutOfRange { .. })
            ),
            "{pfn:#x}"
        );
    }
    assert!(matches!(
        mem.read_page(0, &mut page[..100]),
        Err(PageError::BufferSize { len: 100 })
    ));
    // The first and last frames of each range work.
    for pfn in [0, 0xff, 0x1000, 0x13ff] {
        mem.write_page(pfn, &pattern(pfn as usize)).unwrap();
        mem.read_page(pfn, &mut page).unwrap();
        assert_eq!(page, pattern(pfn as usize));
    }
}

#[test]
fn chain_prints_every_cause_once() {
    let e = MigrationError::ReadPage {
        vaddr: 0x40_0000,
        pfn: 0x1388,
        source: PageError::OutOfRange { pfn: 0x1388 },
    };
    assert_eq!(
        e.to_string(),
        "reading page 0x400000 from guest frame 0x1388"
    );
    assert_eq!(
        e.chain(),
        "reading page 0x400000 from guest frame 0x1388: frame 0x1388 is outside the guest's memory"
    );
}
