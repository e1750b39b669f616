//! Post-copy on this machine, without VMs: a Python workload is frozen, rebuilt with its
//! anonymous memory registered with a userfaultfd (`Skeleton::userfaultfd`) and left empty,
//! and resumed at once; its other private pages are copied before. Then the test plays the
//! VMM: it reads the pages the process waits for (`LazyPages::faults`) and serves those
//! first, from the frozen source's memory through the agent's staging buffer
//! (`LazyPages::stage`, `LazyPages::place`), and pushes the rest in address order meanwhile.
//! The process must run before its pages arrived, wait for those it touches, and go on
//! counting with its 64 MiB buffer's checksum unchanged.
//!
//! Needs root and python3 (as `migrate_local`): skipped with a printed reason otherwise.

use std::collections::{BTreeSet, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use ferry_guest_agent::migrate::dump;
use ferry_guest_agent::migrate::image::{MappingKind, ProcessImage, PAGE_SIZE};
use ferry_guest_agent::migrate::lazy::{LazyPages, Placement, STAGING_SLOTS, ZERO_SLOT};
use ferry_guest_agent::migrate::restore;

mod common;
use common::{counts_on, read_lines, start_workload, Started};

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

#[test]
fn a_python_workload_runs_before_its_pages_arrive_and_keeps_counting() {
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

    let t0 = Instant::now();
    let frozen = dump::freeze(source_pid).expect("freezing the workload");
    let image = frozen.image();
    let last_before = *read_lines(&out).last().unwrap();
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
    let mut lazy = LazyPages::new(new_pid, uffd).expect("the staging buffer");
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
    let resumed = skeleton.resume().expect("resuming the skeleton");
    cleanup.moved = Some(resumed);
    let resumed_after = t0.elapsed();

    // Serve: what the process waits for first, then the rest in address order, one staging
    // buffer at a time.
    let mut placed: HashSet<u64> = HashSet::new();
    let mut background = lazy_pages.iter().copied().collect::<Vec<_>>().into_iter();
    let (mut on_demand, mut zero_faults, mut first_fault) = (0u64, 0u64, None);
    let deadline = Instant::now() + Duration::from_secs(120);
    while placed.len() < lazy_pages.len() {
        assert!(Instant::now() < deadline, "post-copy did not end in 120 s");
        let faults = lazy.faults(2).expect("reading faults");
        let mut batch: Vec<Placement> = Vec::new();
        let mut slot = 0u32;
        for f in faults {
            first_fault.get_or_insert_with(|| t0.elapsed());
            if placed.contains(&f) || batch.iter().any(|p| p.vaddr == f) {
                continue;
            }
            if !lazy_pages.contains(&f) {
                // Never present at the source: zeros.
                zero_faults += 1;
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
                on_demand += 1;
            }
        }
        while (slot as usize) < STAGING_SLOTS {
            let Some(v) = background.next() else { break };
            if placed.contains(&v) || batch.iter().any(|p| p.vaddr == v) {
                continue;
            }
            src.read_exact_at(&mut page, v).unwrap();
            lazy.stage(slot as usize, &page).unwrap();
            batch.push(Placement { vaddr: v, slot });
            slot += 1;
        }
        lazy.place(&batch).expect("placing pages");
        placed.extend(
            batch
                .iter()
                .filter(|p| p.slot != ZERO_SLOT)
                .map(|p| p.vaddr),
        );
    }
    let all_placed = t0.elapsed();
    drop(lazy);
    frozen.kill().expect("killing the source");
    if let Some(mut c) = cleanup.source.take() {
        c.wait().expect("reaping the source");
    }
    eprintln!(
        "post-copy of pid {source_pid} to {new_pid}: resumed after {resumed_after:?} with \
         {} eager pages, first fault at {first_fault:?}, {} lazy pages ({on_demand} on demand, \
         {zero_faults} zero faults) all placed after {all_placed:?}",
        eager.len(),
        lazy_pages.len()
    );
    assert!(
        on_demand > 0,
        "the process never waited for a page: it did not run before its pages arrived"
    );

    counts_on(&out, last_before, 10, Duration::from_secs(30));
}
