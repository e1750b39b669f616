//! Post-copy end to end over an in-memory stream, between two vm-memory "guests", with a
//! simulated destination agent that places staged pages and reports faults.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::duplex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::engine::receive;

type Mem = GuestMemoryMmap<()>;

fn pattern(i: usize) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|b| ((b * 7 + i * 13) % 251) as u8 + 1)
        .collect()
}

/// `(vaddr, pfn)` pairs.
type Pages = Vec<(u64, u64)>;

/// Source guest with `n` pages in frames 0..n: every seventh page zero. Returns the guest and
/// `(vaddr, pfn)` pairs: 8 eager pages at 0x40_0000, the rest lazy at 0x7f00_0000_0000.
fn source(n: usize) -> (Mem, Pages, Pages) {
    let mem = Mem::from_ranges(&[(GuestAddress(0), n * PAGE_SIZE)]).unwrap();
    let (mut eager, mut lazy) = (Vec::new(), Vec::new());
    for i in 0..n {
        let data = if i % 7 == 6 {
            vec![0; PAGE_SIZE]
        } else {
            pattern(i)
        };
        mem.write_slice(&data, GuestAddress((i * PAGE_SIZE) as u64))
            .unwrap();
        if i < 8 {
            eager.push((0x40_0000 + (i * PAGE_SIZE) as u64, i as u64));
        } else {
            lazy.push((0x7f00_0000_0000 + (i * PAGE_SIZE) as u64, i as u64));
        }
    }
    (mem, eager, lazy)
}

/// What the simulated agent did: every placement in order, with the page's data.
type Placed = Arc<Mutex<Vec<(u64, Option<Vec<u8>>)>>>;

/// The destination: lands the eager pages into frames 0x100.., "resumes", then receives the
/// lazy pages through 16 staging frames at 0x200.., which a simulated agent reads when asked
/// to place. `faults` are reported once post-copy starts.
async fn destination(
    mut stream: tokio::io::DuplexStream,
    faults: Vec<u64>,
    placed: Placed,
) -> Result<(Vec<u64>, Stats), MigrationError> {
    let dest = Mem::from_ranges(&[(GuestAddress(0), 0x300 * PAGE_SIZE)]).unwrap();
    let timeouts = Timeouts::default();
    let incoming = receive(&mut stream, &timeouts).await?;
    let lazy = incoming.lazy_vaddrs().to_vec();
    let frames: Vec<u64> = (0..incoming.vaddrs().len() as u64)
        .map(|i| 0x100 + i)
        .collect();
    let landed = incoming.land(&frames, false, &dest, |_| {}).await?;
    let (_, stream) = landed.resumed_postcopy("pid 7").await?;
    let staging: Vec<u64> = (0x200..0x210).collect();
    let (place_tx, mut place_rx) = mpsc::channel::<PlaceRequest>(1);
    let (fault_tx, fault_rx) = mpsc::unbounded_channel();
    fault_tx.send(faults).unwrap();
    let agent_mem = dest.clone();
    let agent_staging = staging.clone();
    let agent = tokio::spawn(async move {
        while let Some(req) = place_rx.recv().await {
            for (vaddr, slot) in req.pages {
                let data = slot.map(|s| {
                    let mut page = vec![0u8; PAGE_SIZE];
                    agent_mem
                        .read_slice(
                            &mut page,
                            GuestAddress(agent_staging[s as usize] * PAGE_SIZE as u64),
                        )
                        .unwrap();
                    page
                });
                placed.lock().unwrap().push((vaddr, data));
            }
            let _ = req.done.send(Ok(()));
        }
    });
    let target = LazyTarget {
        staging: &staging,
        place: place_tx,
        faults: fault_rx,
    };
    let stats = receive_postcopy(stream, &lazy, target, &dest, &timeouts, |_| {}).await;
    drop(fault_tx);
    agent.await.unwrap();
    Ok((lazy, stats?))
}

#[tokio::test]
async fn lazy_pages_arrive_after_the_resume_asked_ones_first() {
    let (mem, eager, lazy) = source(1000);
    // A small pipe: the source's batches wait for the destination, as over a network.
    let (mut a, b) = duplex(64 * 1024);
    let asked = lazy[980].0;
    let never_present = 0x7f00_1000_0000;
    let placed: Placed = Arc::default();
    let dest = tokio::spawn(destination(b, vec![asked, never_present], placed.clone()));
    let timeouts = Timeouts::default();
    let first = send_postcopy(&mut a, 9, b"image", &eager, &lazy, &mem, &timeouts, |_| {})
        .await
        .expect("the process resumes at the destination");
    assert_eq!(first.note, "pid 7");
    assert_eq!(first.pages, eager.len() as u64);
    assert!(
        placed.lock().unwrap().iter().all(|(_, d)| d.is_none()),
        "lazy pages with data placed before the resume"
    );
    let after = serve_postcopy(&mut a, &lazy, &mem, &timeouts, |_| {})
        .await
        .expect("every lazy page confirmed");
    let (listed, dstats) = dest.await.unwrap().expect("destination");

    assert_eq!(listed, lazy.iter().map(|p| p.0).collect::<Vec<_>>());
    assert_eq!(after.pages, lazy.len() as u64);
    assert_eq!(after.requested_pages, 1);
    assert_eq!(dstats.pages, lazy.len() as u64);
    assert_eq!(dstats.requested_pages, 1);
    assert_eq!(after.zero_pages, dstats.zero_pages);
    assert!(after.zero_pages > 100);

    let placed = placed.lock().unwrap();
    let order: HashMap<u64, usize> = placed
        .iter()
        .enumerate()
        .map(|(i, (v, _))| (*v, i))
        .collect();
    // The asked page went ahead of the background stream, which reaches it last.
    assert!(
        order[&asked] < 600,
        "the asked page was placed {}th of {}",
        order[&asked],
        placed.len()
    );
    // A fault where the source had no page is answered with zeros.
    assert_eq!(
        placed.iter().find(|(v, _)| *v == never_present),
        Some(&(never_present, None))
    );
    // Every lazy page placed once, with its data.
    assert_eq!(placed.len(), lazy.len() + 1);
    for (i, &(vaddr, pfn)) in lazy.iter().enumerate() {
        let mut want = vec![0u8; PAGE_SIZE];
        mem.read_slice(&mut want, GuestAddress(pfn * PAGE_SIZE as u64))
            .unwrap();
        let got = &placed[order[&vaddr]].1;
        match got {
            None => assert!(
                want.iter().all(|&b| b == 0),
                "lazy page {i} placed as zeros"
            ),
            Some(d) => assert_eq!(d, &want, "lazy page {i} differs"),
        }
    }
}

#[tokio::test]
async fn a_destination_gone_after_the_resume_fails_the_source() {
    let (mem, eager, lazy) = source(600);
    let (mut a, mut b) = duplex(64 * 1024);
    let dest = tokio::spawn(async move {
        let timeouts = Timeouts::default();
        let incoming = receive(&mut b, &timeouts).await.unwrap();
        let dest = Mem::from_ranges(&[(GuestAddress(0), 0x100 * PAGE_SIZE)]).unwrap();
        let frames: Vec<u64> = (0..incoming.vaddrs().len() as u64).collect();
        let landed = incoming.land(&frames, false, &dest, |_| {}).await.unwrap();
        landed.finish(Ok(())).await.unwrap();
        // The destination dies now.
        drop(b);
    });
    let timeouts = Timeouts::default();
    send_postcopy(&mut a, 1, b"image", &eager, &lazy, &mem, &timeouts, |_| {})
        .await
        .unwrap();
    dest.await.unwrap();
    let e = serve_postcopy(&mut a, &lazy, &mem, &timeouts, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(e, MigrationError::Closed { .. } | MigrationError::Io { .. }),
        "{e}"
    );
}

#[tokio::test]
async fn a_destination_that_stops_placing_pages_fails_the_source_within_the_io_limit() {
    let (mem, _, lazy) = source(8 + 10 * MAX_BATCH_PAGES);
    let (mut a, mut b) = duplex(64 << 20);
    // Takes what it is sent and never answers, its end of the stream held open: a
    // destination whose guest died while its daemon lives on.
    let peer = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut batches = 0;
        while let Ok(m) = read_message(&mut b, &mut buf, "test").await {
            match m {
                Message::LazyBatch(_) => batches += 1,
                other => panic!("{other:?} from a source with no credit left"),
            }
        }
        batches
    });
    let timeouts = Timeouts {
        io: std::time::Duration::from_millis(300),
        ..Timeouts::default()
    };
    let e = timeout(
        std::time::Duration::from_secs(20),
        serve_postcopy(&mut a, &lazy, &mem, &timeouts, |_| {}),
    )
    .await
    .expect("the source gives up by itself, long before the test's own limit")
    .unwrap_err();
    assert!(
        matches!(e, MigrationError::Timeout { during, .. } if during.contains("(Placed)")),
        "{e}"
    );
    drop(a);
    assert_eq!(peer.await.unwrap(), LAZY_WINDOW as usize);
}

#[tokio::test]
async fn a_request_for_a_page_outside_the_list_is_refused() {
    let (mem, _, lazy) = source(300);
    let (mut a, mut b) = duplex(64 * 1024);
    let peer = tokio::spawn(async move {
        let req = Message::PageRequest(vec![0x1000]).encode().unwrap();
        b.write_all(&req).await.unwrap();
        // Drain what the source sends until it gives up.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        while let Ok(m) = read_message(&mut b, &mut buf, "test").await {
            got.push(m.message_type());
        }
        got
    });
    let e = serve_postcopy(&mut a, &lazy, &mem, &Timeouts::default(), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(e, MigrationError::NotLazy { vaddr: 0x1000, .. }),
        "{e}"
    );
    drop(a);
    let got = peer.await.unwrap();
    assert_eq!(got.last(), Some(&MessageType::Abort), "{got:?}");
}

#[test]
fn lazy_ranges_are_the_mappings_with_lazy_pages() {
    let maps = [(0x7000, 0x9000), (0x1000, 0x3000), (0x4000, 0x5000)];
    assert_eq!(
        lazy_ranges(&maps, &[0x1000, 0x2000, 0x8000]),
        Ok(vec![(0x1000, 0x3000), (0x7000, 0x9000)])
    );
    assert_eq!(lazy_ranges(&maps, &[0x3000]), Err(0x3000));
    assert_eq!(lazy_ranges(&maps, &[0x0]), Err(0x0));
    assert_eq!(lazy_ranges(&maps, &[]), Ok(vec![]));
}

#[tokio::test]
async fn the_source_keeps_within_the_window_but_sends_asked_pages_at_once() {
    let (mem, _, lazy) = source(8 + 10 * MAX_BATCH_PAGES);
    // A pipe far larger than the job: only the window holds the source back.
    let (mut a, mut b) = duplex(64 << 20);
    let last = lazy.last().unwrap().0;
    let peer = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut batches = Vec::new();
        while let Ok(m) = next(&mut b, &mut buf).await {
            match m.unwrap() {
                Message::LazyBatch(batch) => batches.push(batch.entries.len()),
                other => panic!("{other:?} before Done"),
            }
        }
        let within_window = batches.len();
        b.write_all(&Message::PageRequest(vec![last]).encode().unwrap())
            .await
            .unwrap();
        let asked = match next(&mut b, &mut buf).await.unwrap().unwrap() {
            Message::LazyBatch(batch) => batch.entries.iter().map(|e| e.vaddr).collect(),
            other => panic!("{other:?} instead of the asked page"),
        };
        b.write_all(&Message::Placed { batches: 100 }.encode().unwrap())
            .await
            .unwrap();
        let mut rest = 0;
        loop {
            match next(&mut b, &mut buf).await.unwrap().unwrap() {
                Message::LazyBatch(batch) => rest += batch.entries.len(),
                Message::Done(_) => break,
                other => panic!("{other:?}"),
            }
        }
        let ack = Message::Ack(Ack {
            ok: true,
            message: String::new(),
        });
        b.write_all(&ack.encode().unwrap()).await.unwrap();
        (within_window, asked, rest)
    });
    let stats = serve_postcopy(&mut a, &lazy, &mem, &Timeouts::default(), |_| {})
        .await
        .unwrap();
    let (within_window, asked, rest): (usize, Vec<u64>, usize) = peer.await.unwrap();
    assert_eq!(within_window, LAZY_WINDOW as usize);
    assert_eq!(asked, vec![last]);
    assert_eq!(
        LAZY_WINDOW as usize * MAX_BATCH_PAGES + 1 + rest,
        lazy.len()
    );
    assert_eq!(stats.requested_pages, 1);
}

/// The next message within 300 ms.
async fn next(
    b: &mut tokio::io::DuplexStream,
    buf: &mut Vec<u8>,
) -> Result<Result<Message, MigrationError>, tokio::time::error::Elapsed> {
    timeout(
        std::time::Duration::from_millis(300),
        read_message(b, buf, "test"),
    )
    .await
}
