//! Post-copy on this machine, without VMs: a Python workload is frozen, rebuilt with its
//! anonymous memory registered with a userfaultfd (`Skeleton::userfaultfd`) and left empty,
//! and resumed at once; its other private pages are copied before. Then the test plays the
//! VMM: it reads the pages the process waits for (`LazyPages::faults`) and serves those
//! first, from the frozen source's memory through the agent's staging buffer
//! (`LazyPages::stage`, `LazyPages::place`), and pushes the rest in address order meanwhile.
//! The process must run before its pages arrived, wait for those it touches, and go on
//! counting with its 64 MiB buffer's checksum unchanged; one that drops and unmaps memory
//! while its pages still come must find the dropped page empty; a child one forks before
//! its buffer came must get the buffer too.
//!
//! Needs root and python3 (as `migrate_local`): skipped with a printed reason otherwise.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_guest_agent::migrate::dump;
use ferry_guest_agent::migrate::image::{Mapping, MappingKind, ProcessImage, PAGE_SIZE};
use ferry_guest_agent::migrate::lazy::{LazyPages, Placement, STAGING_SLOTS, ZERO_SLOT};
use ferry_guest_agent::migrate::restore;

mod common;
use common::{counts_on, dropped_page_bytes, read_lines, start_script, start_workload, Started};

/// The kind of the mapping holding `vaddr`, for a private mapping that is not the kernel's.
fn private_kind(image: &ProcessImage, vaddr: u64) -> Option<(MappingKind, u64, u64)> {
    image
        .mappings
        .iter()
        .find(|m| m.start <= vaddr && vaddr < m.end)
        .filter(|m| {
            !m.shared
                && !matches!(
                    m.kind,
                    MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
                )
        })
        .map(|m| (m.kind, m.start, m.end))
}

/// One test at a time: two post-copies at once here (each a 64 MiB workload, its skeleton
/// and staging buffer) made the host's compaction move a locked staging page now and then,
/// which `LazyPages::place` refuses, as it should. (The agent in a guest stops compaction
/// from moving locked pages; these tests leave the host's setting alone.)
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A workload frozen, rebuilt with its anonymous memory left to come (registered with a
/// userfaultfd) and resumed, its other private pages copied; the frozen source still there.
struct Resumed {
    frozen: dump::Frozen,
    lazy: LazyPages,
    /// The anonymous pages still to come.
    lazy_pages: BTreeSet<u64>,
    /// The source's memory.
    src: File,
    eager: usize,
    t0: Instant,
    resumed_after: Duration,
}

/// A workload that forks once it finds a file `fork` next to its output: the child writes a
/// file `forked`, then the CRC-32 of the 64 MiB buffer into `child-crc`, and exits. The
/// parent never reads the buffer after its first CRC (each line's `crc`), and counts on.
const FORKING_WORKLOAD: &str = r#"
import os, random, sys, time, zlib
os.closerange(3, 65536)
random.seed(7)
buf = bytearray(random.randbytes(64 << 20))
crc = zlib.crc32(buf)
out = open(sys.argv[1], "a", buffering=1)
here = os.path.dirname(sys.argv[1])
n, acc, forked = 0, 1, False
while True:
    n += 1
    acc = (acc * 31 + n) % 1000000007
    if not forked and os.path.exists(os.path.join(here, "fork")):
        forked = True
        if os.fork() == 0:
            open(os.path.join(here, "forked"), "w").close()
            with open(os.path.join(here, "child-crc.part"), "w") as f:
                f.write("%d" % zlib.crc32(buf))
            os.rename(os.path.join(here, "child-crc.part"), os.path.join(here, "child-crc"))
            os._exit(0)
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass
    out.write("%d %d %d %d\n" % (n, acc, crc, time.monotonic() * 1000))
    time.sleep(0.1)
"#;

/// Freezes `source_pid` and resumes it as a new process whose anonymous pages come later;
/// `before_resume` runs just before the resume.
fn freeze_and_resume(
    source_pid: u32,
    cleanup: &mut common::Cleanup,
    before_resume: impl FnOnce(),
) -> Resumed {
    let t0 = Instant::now();
    let frozen = dump::freeze(source_pid).expect("freezing the workload");
    let image = frozen.image();
    let mut eager = Vec::new();
    let mut lazy_pages = BTreeSet::new();
    let mut ranges = BTreeSet::new();
    for p in frozen.pages() {
        match private_kind(image, p.vaddr) {
            Some((MappingKind::File, _, _)) if p.anon => eager.push(p.vaddr),
            Some((MappingKind::File, _, _)) | None => {}
            Some((_, start, end)) => {
                lazy_pages.insert(p.vaddr);
                ranges.insert((start, end));
            }
        }
    }
    assert!(
        lazy_pages.len() as u64 >= (64 << 20) / PAGE_SIZE,
        "only {} anonymous pages: the 64 MiB buffer is not among them",
        lazy_pages.len()
    );
    let ranges: Vec<(u64, u64)> = ranges.into_iter().collect();
    let mut skeleton = restore::build(image).expect("building the skeleton");
    let new_pid = skeleton.pid();
    let uffd = skeleton
        .userfaultfd(&ranges)
        .expect("registering the anonymous memory with a userfaultfd");
    let lazy = LazyPages::new(new_pid, uffd).expect("the staging buffer");
    assert_eq!(lazy.frames().len(), STAGING_SLOTS);
    assert!(
        lazy.frames().iter().all(|&f| f != 0),
        "a zero staging frame"
    );
    skeleton.frames(&eager).expect("frames of the eager pages");
    let src = File::open(format!("/proc/{source_pid}/mem")).unwrap();
    let dst = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{new_pid}/mem"))
        .unwrap();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for &v in &eager {
        src.read_exact_at(&mut page, v).unwrap();
        dst.write_all_at(&page, v).unwrap();
    }
    before_resume();
    let resumed = skeleton.resume().expect("resuming the skeleton");
    cleanup.moved = Some(resumed);
    Resumed {
        frozen,
        lazy,
        lazy_pages,
        src,
        eager: eager.len(),
        t0,
        resumed_after: t0.elapsed(),
    }
}

/// Starts `script` (None, the test skipped, without root or python3), then freezes it and
/// resumes it with its anonymous memory to come, a file `flag` written next to its output
/// just before the resume.
fn start_and_resume(
    name: &str,
    script: &str,
    flag: &str,
) -> Option<(common::Cleanup, PathBuf, Resumed)> {
    let Started {
        mut cleanup,
        pid,
        out,
        ..
    } = start_script(
        name,
        "ptrace, pagemap frames, userfaultfd of another process",
        &[],
        script,
    )?;
    let flag = out.with_file_name(flag);
    let resumed = freeze_and_resume(pid, &mut cleanup, || fs::write(&flag, b"").unwrap());
    Some((cleanup, out, resumed))
}

/// The `(start, end)` of the frozen image's private mapping that `is` picks.
fn mapping(r: &Resumed, what: &str, is: impl Fn(&Mapping) -> bool) -> (u64, u64) {
    r.frozen
        .image()
        .mappings
        .iter()
        .find(|m| !m.shared && is(m))
        .map(|m| (m.start, m.end))
        .expect(what)
}

/// What serving the pages took: pages asked for, faults on pages never at the source, when
/// the first fault came, children the process forked meanwhile.
struct Served {
    on_demand: u64,
    zero_faults: u64,
    first_fault: Option<Duration>,
    forks: u64,
}

/// Plays the VMM: serves what the process waits for first, then the rest in address order,
/// one staging buffer at a time, holding back (asked for or not) the pages of the range
/// `hold` names, asked before each batch, until it names none; then ends post-copy and kills
/// the frozen source.
fn serve(
    r: Resumed,
    cleanup: &mut common::Cleanup,
    mut hold: impl FnMut() -> Option<(u64, u64)>,
) -> Served {
    let Resumed {
        frozen,
        mut lazy,
        lazy_pages,
        src,
        t0,
        ..
    } = r;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut placed: HashSet<u64> = HashSet::new();
    let mut waiting: Vec<u64> = lazy_pages.iter().copied().collect();
    let mut served = Served {
        on_demand: 0,
        zero_faults: 0,
        first_fault: None,
        forks: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while placed.len() < lazy_pages.len() {
        assert!(Instant::now() < deadline, "post-copy did not end in 120 s");
        let faults = lazy.faults(2).expect("reading faults");
        let held = hold();
        let held = |v: u64| held.is_some_and(|(s, e)| (s..e).contains(&v));
        let mut batch: Vec<Placement> = Vec::new();
        let mut slot = 0u32;
        for f in faults {
            served.first_fault.get_or_insert_with(|| t0.elapsed());
            if placed.contains(&f) || batch.iter().any(|p| p.vaddr == f) || held(f) {
                continue;
            }
            if !lazy_pages.contains(&f) {
                // Never present at the source: zeros.
                served.zero_faults += 1;
                batch.push(Placement {
                    vaddr: f,
                    slot: ZERO_SLOT,
                });
                continue;
            }
            if (slot as usize) < STAGING_SLOTS {
                src.read_exact_at(&mut page, f).unwrap();
                lazy.stage(slot as usize, &page).unwrap();
                batch.push(Placement { vaddr: f, slot });
                slot += 1;
                served.on_demand += 1;
            }
        }
        let mut next = 0;
        while (slot as usize) < STAGING_SLOTS && next < waiting.len() {
            let v = waiting[next];
            if placed.contains(&v) || batch.iter().any(|p| p.vaddr == v) || held(v) {
                next += 1;
                continue;
            }
            src.read_exact_at(&mut page, v).unwrap();
            lazy.stage(slot as usize, &page).unwrap();
            batch.push(Placement { vaddr: v, slot });
            slot += 1;
            next += 1;
        }
        lazy.place(&batch).expect("placing pages");
        placed.extend(
            batch
                .iter()
                .filter(|p| p.slot != ZERO_SLOT)
                .map(|p| p.vaddr),
        );
        waiting.retain(|v| !placed.contains(v));
    }
    served.forks = lazy.forks();
    drop(lazy);
    frozen.kill().expect("killing the source");
    if let Some(mut c) = cleanup.source.take() {
        c.wait().expect("reaping the source");
    }
    served
}

#[test]
fn a_python_workload_runs_before_its_pages_arrive_and_keeps_counting() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(Started {
        mut cleanup,
        pid: source_pid,
        out,
        ..
    }) = start_workload(
        "postcopy-local",
        "ptrace, pagemap frames, userfaultfd of another process",
    )
    else {
        return;
    };
    let resumed = freeze_and_resume(source_pid, &mut cleanup, || {});
    let last_before = *read_lines(&out).last().unwrap();
    let (t0, resumed_after, eager, lazy_pages) = (
        resumed.t0,
        resumed.resumed_after,
        resumed.eager,
        resumed.lazy_pages.len(),
    );
    let new_pid = cleanup.moved.unwrap();
    let served = serve(resumed, &mut cleanup, || None);
    eprintln!(
        "post-copy of pid {source_pid} to {new_pid}: resumed after {resumed_after:?} with \
         {eager} eager pages, first fault at {:?}, {lazy_pages} lazy pages ({} on demand, \
         {} zero faults) all placed after {:?}",
        served.first_fault,
        served.on_demand,
        served.zero_faults,
        t0.elapsed()
    );
    assert!(
        served.on_demand > 0,
        "the process never waited for a page: it did not run before its pages arrived"
    );

    counts_on(&out, last_before, 10, Duration::from_secs(30));
}

/// The workload maps and unmaps memory all the time, and drops a page it wrote (255) as
/// soon as it runs at the destination, before that page arrived: the page arrives later
/// all the same, and must not bring 255 back (without following the process's
/// MADV_DONTNEED it did). Unmapped blocks' pages arrive too and are left out.
#[test]
fn a_page_dropped_before_it_arrived_reads_zero_and_unmapped_memory_stays_unmapped() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Once running (five lines) it has written its page (255) and mapped a few blocks.
    let Some((mut cleanup, out, resumed)) =
        start_and_resume("postcopy-churn", common::CHURNING_WORKLOAD, "drop")
    else {
        return;
    };
    let last_before = *read_lines(&out).last().unwrap();
    // The 1 MiB read-write-execute area that holds the page to drop.
    let area = mapping(&resumed, "the workload's rwx area", |m| {
        m.prot == 7 && m.len() == 1 << 20
    });
    assert!(
        resumed.lazy_pages.contains(&(area.0 + 5 * PAGE_SIZE)),
        "the page to drop is not among the pages to come"
    );
    // Its pages wait until the process has run a whole loop at the destination (and so
    // dropped the page).
    let served = serve(resumed, &mut cleanup, || {
        read_lines(&out)
            .last()
            .is_none_or(|l| l.n < last_before.n + 2)
            .then_some(area)
    });
    assert!(served.on_demand > 0, "the process never waited for a page");

    counts_on(&out, last_before, 10, Duration::from_secs(30));
    let bytes = dropped_page_bytes(&out);
    assert!(
        bytes.iter().all(|b| b == "0"),
        "the page dropped during post-copy reads {bytes:?}"
    );
}

/// The workload forks as soon as it runs at the destination, while its 64 MiB buffer is
/// still held back at the source: the child must get the buffer's pages as they arrive, and
/// read it whole (without following the fork, it would read zeros there, or die on a page
/// of its heap that never came).
#[test]
fn a_child_forked_before_the_pages_arrived_gets_them_too() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((mut cleanup, out, resumed)) =
        start_and_resume("postcopy-fork", FORKING_WORKLOAD, "fork")
    else {
        return;
    };
    let (forked, child_crc) = (
        out.with_file_name("forked"),
        out.with_file_name("child-crc"),
    );
    let last_before = *read_lines(&out).last().unwrap();
    // The buffer: the one anonymous mapping of 64 MiB or more.
    let buffer = mapping(&resumed, "the workload's 64 MiB buffer", |m| {
        m.kind == MappingKind::Anonymous && m.len() >= 64 << 20
    });
    // The buffer's pages wait until the child runs (or 30 s).
    let hold_until = Instant::now() + Duration::from_secs(30);
    let mut forked_while_held = false;
    let served = serve(resumed, &mut cleanup, || {
        if forked_while_held || Instant::now() > hold_until {
            return None;
        }
        forked_while_held = forked.exists();
        (!forked_while_held).then_some(buffer)
    });
    assert!(
        forked_while_held,
        "the child did not run within 30 s of the resume (its pages were served all the same)"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while !child_crc.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = fs::read_to_string(&child_crc).expect("the child's checksum of the buffer");
    assert_eq!(
        got,
        last_before.crc.to_string(),
        "the child read another buffer than the one the process had"
    );
    assert_eq!(served.forks, 1, "children followed");
    counts_on(&out, last_before, 10, Duration::from_secs(30));
}
