//! Post-copy at the destination: the pages of a migrated process that arrive after it runs.
//!
//! The skeleton's private anonymous mappings are registered with a userfaultfd
//! ([`super::restore::Skeleton::userfaultfd`]) and left empty; the process resumes at once. A
//! thread that touches a page nobody placed yet stops in the kernel, and the agent reads its
//! address from the userfaultfd ([`LazyPages::faults`]). The VMM writes arriving pages into a
//! pinned staging buffer of the agent whose guest frames it knows ([`LazyPages::frames`]),
//! then says which slot holds which page; the agent copies each into the process with
//! UFFDIO_COPY ([`LazyPages::place`]), which also wakes a thread waiting for it. A page
//! already there (placed before, or written by the process after a zero page was placed) is
//! left alone. Dropping a [`LazyPages`] closes the userfaultfd: pages never placed then read
//! as zeros, so the VMM ends post-copy only once every page of the process was placed.
//!
//! The process runs on meanwhile, and may move (mremap), drop (MADV_DONTNEED) or unmap its
//! memory. The userfaultfd reports each such change ([`sys::UffdEvent`]), and a [`Layout`]
//! follows them: the VMM keeps naming pages by their address in the image (their origin),
//! and each is placed where it is now, as zeros once the process dropped it, or not at all
//! once it was unmapped. A fault is reported by the origin of its page; one on a page the
//! process dropped, or on memory that was never the image's, is answered with zeros here.
//!
//! A child the process forks meanwhile misses the same pages: the kernel reports the fork
//! with a userfaultfd for the child ([`sys::UffdEvent::Fork`]), and from then on each page
//! is placed into the child too (where it is in the child's memory), and the child's faults
//! are reported like the process's. A child that exits or execs leaves the family.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::migrate::image::PAGE_SIZE;
use crate::sys::{self, PinnedBuffer, UffdEvent};

/// Slots of the staging buffer (1 MiB): one batch of the migration stream.
pub const STAGING_SLOTS: usize = 256;

/// The slot number that means "a page of zeros" in a [`Placement`].
pub const ZERO_SLOT: u32 = u32::MAX;

/// The most fault addresses one [`LazyPages::faults`] returns.
pub const MAX_FAULTS: usize = 1024;

/// Pagemap bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Why post-copy could not be set up or a page not be placed.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The staging buffer could not be made.
    #[error("setting up the post-copy staging buffer ({slots} pages)")]
    Staging {
        /// Its size in pages.
        slots: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A staging page has no frame (not present, or the agent cannot read frame numbers), or
    /// the guest kernel moved it since the VMM learnt its frame.
    #[error("staging slot {slot}: {reason}")]
    Frame {
        /// The slot.
        slot: usize,
        /// What is wrong with its frame.
        reason: String,
    },
    /// A placement names a slot past the staging buffer, or an unaligned address.
    #[error("bad placement of page {vaddr:#x} from slot {slot}: {reason}")]
    BadPlacement {
        /// The page's address in the process.
        vaddr: u64,
        /// The slot named.
        slot: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The kernel refused to place a page.
    #[error("placing page {vaddr:#x} into process {pid}{}", child_note(.child))]
    Place {
        /// The migrated process.
        pid: u32,
        /// Into a child it forked during post-copy.
        child: bool,
        /// The first page of the refused run.
        vaddr: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// Reading the process's faults failed.
    #[error("reading the page faults of process {pid}")]
    Faults {
        /// The process.
        pid: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// How a [`LazyError::Place`] names a child of the migrated process.
fn child_note(child: &bool) -> &'static str {
    if *child {
        "'s child (forked during post-copy)"
    } else {
        ""
    }
}

/// One page to place: its address in the process and the staging slot that holds it, or
/// [`ZERO_SLOT`] for a page of zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The page's address in the process (page-aligned).
    pub vaddr: u64,
    /// The staging slot with its data, or [`ZERO_SLOT`].
    pub slot: u32,
}

/// A run of placements one ioctl does: consecutive pages from consecutive slots, or
/// consecutive zero pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The first page's address.
    pub vaddr: u64,
    /// The first slot, or [`ZERO_SLOT`] for zeros.
    pub slot: u32,
    /// Pages in the run.
    pub pages: u32,
}

/// Groups placements into runs, in the order given.
pub fn runs(pages: &[Placement]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for p in pages {
        if let Some(r) = out.last_mut() {
            let next_vaddr = r.vaddr + u64::from(r.pages) * PAGE_SIZE;
            let slot_follows = if r.slot == ZERO_SLOT {
                p.slot == ZERO_SLOT
            } else {
                p.slot != ZERO_SLOT && r.slot.checked_add(r.pages) == Some(p.slot)
            };
            if p.vaddr == next_vaddr && slot_follows {
                r.pages += 1;
                continue;
            }
        }
        out.push(Run {
            vaddr: p.vaddr,
            slot: p.slot,
            pages: 1,
        });
    }
    out
}

/// The page addresses of `start..end`.
fn pages_of(start: u64, end: u64) -> impl Iterator<Item = u64> {
    (start - start % PAGE_SIZE..end).step_by(PAGE_SIZE as usize)
}

/// Where the lazy pages are now, after the process moved, dropped or unmapped memory during
/// post-copy. A page is named by its origin, its address in the image.
#[derive(Debug, Default, Clone)]
struct Layout {
    /// Origin to current address, for the pages mremap moved.
    moved_to: HashMap<u64, u64>,
    /// Current address to origin, for the same pages.
    moved_from: HashMap<u64, u64>,
    /// Origins of pages the process dropped: they read as zeros.
    dropped: HashSet<u64>,
    /// Origins of pages the process unmapped: nothing is placed for them.
    gone: HashSet<u64>,
}

impl Layout {
    /// The origin of the page at address `at`: a page that moved there, or the one whose
    /// address it is, if that neither moved away nor was unmapped.
    fn origin(&self, at: u64) -> Option<u64> {
        if let Some(&o) = self.moved_from.get(&at) {
            return Some(o);
        }
        (!self.moved_to.contains_key(&at) && !self.gone.contains(&at)).then_some(at)
    }

    /// Where `p` goes now: its page's current address, with zeros if the process dropped
    /// it; None if the page is gone.
    fn target(&self, p: Placement) -> Option<Placement> {
        if self.gone.contains(&p.vaddr) {
            return None;
        }
        let vaddr = self.moved_to.get(&p.vaddr).copied().unwrap_or(p.vaddr);
        let slot = if self.dropped.contains(&p.vaddr) {
            ZERO_SLOT
        } else {
            p.slot
        };
        Some(Placement { vaddr, slot })
    }

    /// The page at `at` no longer exists.
    fn forget(&mut self, at: u64) {
        if let Some(o) = self.origin(at) {
            self.gone.insert(o);
            self.moved_to.remove(&o);
            self.moved_from.remove(&at);
        }
    }

    /// Follows one change the process made.
    fn apply(&mut self, event: &UffdEvent) {
        match *event {
            UffdEvent::Fault(_) | UffdEvent::Fork(_) => {}
            UffdEvent::Remove { start, end } => {
                for at in pages_of(start, end) {
                    if let Some(o) = self.origin(at) {
                        self.dropped.insert(o);
                    }
                }
            }
            UffdEvent::Unmap { start, end } => pages_of(start, end).for_each(|at| self.forget(at)),
            UffdEvent::Remap { from, to, len } => {
                let moving: Vec<(u64, u64)> = pages_of(from, from + len)
                    .filter_map(|at| Some((at - from, self.origin(at)?)))
                    .collect();
                for &(offset, o) in &moving {
                    self.moved_to.remove(&o);
                    self.moved_from.remove(&(from + offset));
                }
                // The pages land where nothing of the image can be any more.
                pages_of(to, to + len).for_each(|at| self.forget(at));
                for (offset, o) in moving {
                    let at = to + offset;
                    self.gone.remove(&o);
                    if at != o {
                        self.moved_to.insert(o, at);
                        self.moved_from.insert(at, o);
                    }
                }
            }
        }
    }
}

/// How far [`place_run`] got.
struct RunOutcome {
    /// Pages placed.
    placed: u64,
    /// Pages of the run dealt with (placed, already there, or no longer mapped).
    done: usize,
    /// The kernel answered EAGAIN: the process changed its memory, and the events saying
    /// how wait to be read before anything more is placed.
    changing: bool,
    /// The process's memory is gone (it exited, or exec'd another program): nothing more
    /// goes there.
    gone: bool,
}

/// Places one run through `uffd`, from `staging`; on an error the kernel's, with the address
/// of the page it refused.
fn place_run(
    uffd: &OwnedFd,
    staging: &PinnedBuffer,
    run: Run,
) -> Result<RunOutcome, (u64, io::Error)> {
    let len = u64::from(run.pages) * PAGE_SIZE;
    let mut done = 0u64;
    let mut placed = 0u64;
    // The kernel answers ENOENT for a whole range that is not inside one registered
    // mapping: a run across two mappings (or into an unmapped hole) goes on page by page,
    // so that only the pages really gone are left out.
    let mut page_by_page = false;
    let mut changing = false;
    let mut gone = false;
    while done < len && !changing && !gone {
        let dst = run.vaddr + done;
        let want = if page_by_page { PAGE_SIZE } else { len - done };
        let result = if run.slot == ZERO_SLOT {
            sys::uffd_zeropage(uffd, dst, want)
        } else {
            let from = run.slot as usize * PAGE_SIZE as usize + done as usize;
            let src = &staging.as_slice()[from..from + want as usize];
            sys::uffd_copy(uffd, dst, src)
        };
        match result {
            Ok(n) if n > 0 => {
                done += n;
                placed += n / PAGE_SIZE;
            }
            // Nothing copied without an error: try the rest again.
            Ok(_) => {}
            Err((n, e)) => {
                done += n;
                placed += n / PAGE_SIZE;
                match e.raw_os_error() {
                    Some(libc::ENOENT) if want > PAGE_SIZE => page_by_page = true,
                    // Already there, or no longer mapped: leave that page.
                    Some(libc::EEXIST) | Some(libc::ENOENT) => done += PAGE_SIZE,
                    Some(libc::EAGAIN) => changing = true,
                    Some(libc::ESRCH) => gone = true,
                    Some(libc::EINTR) => {}
                    _ => return Err((run.vaddr + done, e)),
                }
            }
        }
    }
    Ok(RunOutcome {
        placed,
        done: (done / PAGE_SIZE) as usize,
        changing,
        gone,
    })
}

/// One process whose pages post-copy places: the migrated one, or a child it forked while
/// pages still came, whose copies of the lazy ranges miss the same pages (the kernel gives
/// each child a userfaultfd of its own, [`UffdEvent::Fork`]).
#[derive(Debug)]
struct Member {
    uffd: OwnedFd,
    layout: Layout,
    /// Addresses its threads wait at that read as zeros, not yet answered.
    zeros_due: Vec<u64>,
    /// The migrated process itself, not a child.
    original: bool,
    /// Its memory is gone (exit, exec): it leaves the family.
    gone: bool,
}

impl Member {
    fn new(uffd: OwnedFd, layout: Layout, original: bool) -> Self {
        Member {
            uffd,
            layout,
            zeros_due: Vec::new(),
            original,
            gone: false,
        }
    }
}

/// A resumed (or about to be resumed) process whose anonymous pages come later.
#[derive(Debug)]
pub struct LazyPages {
    pid: u32,
    /// The migrated process, and the children it forked during post-copy that still live.
    family: Vec<Member>,
    staging: PinnedBuffer,
    frames: Vec<u64>,
    placed: u64,
    forks: u64,
    /// Origins of pages a member waits for, not yet reported.
    asks: Vec<u64>,
}

impl LazyPages {
    /// Takes over process `pid`'s userfaultfd and makes the staging buffer ([`STAGING_SLOTS`]
    /// pages, pinned), whose frames [`LazyPages::frames`] gives.
    pub fn new(pid: u32, uffd: OwnedFd) -> Result<Self, LazyError> {
        let slots = STAGING_SLOTS;
        let staging = PinnedBuffer::new(slots * PAGE_SIZE as usize)
            .map_err(|source| LazyError::Staging { slots, source })?;
        let mut lazy = LazyPages {
            pid,
            family: vec![Member::new(uffd, Layout::default(), true)],
            staging,
            frames: Vec::new(),
            placed: 0,
            forks: 0,
            asks: Vec::new(),
        };
        lazy.frames = lazy.read_frames()?;
        Ok(lazy)
    }

    /// The process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The guest frame of each staging slot.
    pub fn frames(&self) -> &[u64] {
        &self.frames
    }

    /// The staging buffer's address in this process (slot `i` at `+ i * 4096`).
    pub fn staging_addr(&self) -> u64 {
        self.staging.addr()
    }

    /// Pages placed so far into the migrated process (zero pages included, pages already
    /// there not).
    pub fn placed(&self) -> u64 {
        self.placed
    }

    /// Children the process forked while its pages still came (each got them too).
    pub fn forks(&self) -> u64 {
        self.forks
    }

    /// Writes a page into staging slot `slot` from inside the guest (the VMM writes the
    /// frames directly instead).
    pub fn stage(&mut self, slot: usize, data: &[u8]) -> Result<(), LazyError> {
        let at = slot * PAGE_SIZE as usize;
        let page = self
            .staging
            .as_slice_mut()
            .get_mut(at..at + PAGE_SIZE as usize)
            .filter(|_| data.len() == PAGE_SIZE as usize)
            .ok_or(LazyError::BadPlacement {
                vaddr: 0,
                slot: slot as u32,
                reason: "no such staging slot, or not one page of data",
            })?;
        page.copy_from_slice(data);
        Ok(())
    }

    fn read_frames(&self) -> Result<Vec<u64>, LazyError> {
        let path = "/proc/self/pagemap";
        let slots = self.staging.as_slice().len() / PAGE_SIZE as usize;
        let frame_err = |slot, reason: String| LazyError::Frame { slot, reason };
        let pagemap = File::open(path).map_err(|e| frame_err(0, format!("opening {path}: {e}")))?;
        let mut buf = vec![0u8; slots * 8];
        pagemap
            .read_exact_at(&mut buf, self.staging.addr() / PAGE_SIZE * 8)
            .map_err(|e| frame_err(0, format!("reading {path}: {e}")))?;
        buf.chunks_exact(8)
            .enumerate()
            .map(|(slot, c)| {
                let e = u64::from_le_bytes(c.try_into().expect("8-byte chunk"));
                if e & PM_PRESENT == 0 {
                    Err(frame_err(slot, "not present although locked".into()))
                } else if e & PM_PFN_MASK == 0 {
                    Err(frame_err(
                        slot,
                        "no frame number in pagemap (the agent lacks CAP_SYS_ADMIN)".into(),
                    ))
                } else {
                    Ok(e & PM_PFN_MASK)
                }
            })
            .collect()
    }

    /// Copies each placement's page (from its staging slot, or zeros) into the process, and
    /// into each child it forked meanwhile, and wakes the threads waiting for them. A
    /// placement names its page by its origin; the page goes where it is now in each of them
    /// ([`Layout`]). A page already present is skipped, and so is one whose memory was
    /// unmapped meanwhile. Returns the pages placed into the process. First checks that the
    /// staging frames are still the ones the VMM wrote (the guest kernel may move even
    /// locked pages, e.g. compaction): if one moved, nothing is placed.
    pub fn place(&mut self, pages: &[Placement]) -> Result<u64, LazyError> {
        let slots = self.frames.len() as u32;
        for p in pages {
            if !p.vaddr.is_multiple_of(PAGE_SIZE) {
                return Err(LazyError::BadPlacement {
                    vaddr: p.vaddr,
                    slot: p.slot,
                    reason: "address not page-aligned",
                });
            }
            if p.slot != ZERO_SLOT && p.slot >= slots {
                return Err(LazyError::BadPlacement {
                    vaddr: p.vaddr,
                    slot: p.slot,
                    reason: "no such staging slot",
                });
            }
        }
        if pages.iter().any(|p| p.slot != ZERO_SLOT) {
            let now = self.read_frames()?;
            if let Some(slot) = (0..now.len()).find(|&i| now[i] != self.frames[i]) {
                return Err(LazyError::Frame {
                    slot,
                    reason: format!(
                        "the guest kernel moved it from frame {:#x} to {:#x}",
                        self.frames[slot], now[slot]
                    ),
                });
            }
        }
        let mut placed = 0;
        // A child forked while this goes on joins the family, and gets the pages too.
        let mut member = 0;
        while member < self.family.len() {
            let n = self.place_into(member, pages)?;
            if self.family[member].original {
                placed += n;
            }
            member += 1;
        }
        self.family.retain(|m| !m.gone);
        self.placed += placed;
        Ok(placed)
    }

    /// [`LazyPages::place`] for one member of the family: the pages placed.
    fn place_into(&mut self, member: usize, pages: &[Placement]) -> Result<u64, LazyError> {
        let mut placed = 0;
        // The first placement not dealt with yet.
        let mut from = 0;
        while from < pages.len() {
            let m = &self.family[member];
            // (index in `pages`, where it goes now)
            let targets: Vec<(usize, Placement)> = (from..pages.len())
                .filter_map(|i| Some((i, m.layout.target(pages[i])?)))
                .collect();
            let list: Vec<Placement> = targets.iter().map(|t| t.1).collect();
            let mut at = 0;
            let mut interrupted = None;
            for run in runs(&list) {
                let outcome = self.run_into(member, run)?;
                placed += outcome.placed;
                if outcome.gone {
                    return Ok(placed);
                }
                if outcome.changing {
                    interrupted = Some(at + outcome.done);
                    break;
                }
                at += run.pages as usize;
            }
            let Some(next) = interrupted else {
                break;
            };
            // The process changed its memory: follow that, then place the rest where it now
            // belongs.
            self.take_events(0)?;
            from = targets.get(next).map_or(pages.len(), |t| t.0);
        }
        Ok(placed)
    }

    /// Places one run into a member; one whose memory is gone is marked so.
    fn run_into(&mut self, member: usize, run: Run) -> Result<RunOutcome, LazyError> {
        let m = &mut self.family[member];
        let outcome =
            place_run(&m.uffd, &self.staging, run).map_err(|(vaddr, source)| LazyError::Place {
                pid: self.pid,
                child: !m.original,
                vaddr,
                source,
            })?;
        m.gone |= outcome.gone;
        Ok(outcome)
    }

    /// Reads what the family's userfaultfds have to say, waiting up to `wait_ms` for the
    /// first event: changes to a member's memory go into its layout, in order; a fork adds
    /// the child, with the layout its parent had; each fault becomes the origin to ask the
    /// VMM for, or an address to answer with zeros here.
    fn take_events(&mut self, wait_ms: u32) -> Result<(), LazyError> {
        let failed = |pid| move |source| LazyError::Faults { pid, source };
        if wait_ms > 0 {
            let fds: Vec<BorrowedFd<'_>> = self.family.iter().map(|m| m.uffd.as_fd()).collect();
            let wait = i32::try_from(wait_ms).unwrap_or(i32::MAX);
            sys::wait_readable(&fds, wait).map_err(failed(self.pid))?;
        }
        // Children that join here are read too.
        let mut member = 0;
        while member < self.family.len() {
            let events = sys::uffd_events(&self.family[member].uffd, MAX_FAULTS)
                .map_err(failed(self.pid))?;
            for event in events {
                let m = &mut self.family[member];
                match event {
                    UffdEvent::Fault(at) => match m.layout.origin(at) {
                        Some(o) if !m.layout.dropped.contains(&o) => self.asks.push(o),
                        _ => m.zeros_due.push(at),
                    },
                    UffdEvent::Fork(uffd) => {
                        let layout = m.layout.clone();
                        self.family.push(Member::new(uffd, layout, false));
                        self.forks += 1;
                    }
                    UffdEvent::Remap { to, len, .. } => {
                        // Zeros due where the moved pages land would overwrite them.
                        m.zeros_due.retain(|&z| !(to..to + len).contains(&z));
                        m.layout.apply(&event);
                    }
                    UffdEvent::Unmap { start, end } => {
                        m.zeros_due.retain(|&z| !(start..end).contains(&z));
                        m.layout.apply(&event);
                    }
                    UffdEvent::Remove { .. } => m.layout.apply(&event),
                }
            }
            member += 1;
        }
        Ok(())
    }

    /// The pages the process's (and its children's) threads wait for, by origin, waiting up
    /// to `wait_ms` for the first (at most about [`MAX_FAULTS`] from each; a page may come
    /// more than once). Faults on pages that read as zeros are answered here and not
    /// returned.
    pub fn faults(&mut self, wait_ms: u32) -> Result<Vec<u64>, LazyError> {
        let pending = !self.asks.is_empty() || self.family.iter().any(|m| !m.zeros_due.is_empty());
        self.take_events(if pending { 0 } else { wait_ms })?;
        for member in 0..self.family.len() {
            let mut due = std::mem::take(&mut self.family[member].zeros_due);
            due.sort_unstable();
            due.dedup();
            for (i, &at) in due.iter().enumerate() {
                let run = Run {
                    vaddr: at,
                    slot: ZERO_SLOT,
                    pages: 1,
                };
                let outcome = self.run_into(member, run)?;
                if self.family[member].original {
                    self.placed += outcome.placed;
                }
                if outcome.gone {
                    break;
                }
                if outcome.changing {
                    // Answered on the next call, after the events that wait.
                    self.family[member].zeros_due.extend_from_slice(&due[i..]);
                    break;
                }
            }
        }
        self.family.retain(|m| !m.gone);
        Ok(std::mem::take(&mut self.asks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(vaddr: u64, slot: u32) -> Placement {
        Placement { vaddr, slot }
    }

    #[test]
    fn consecutive_pages_from_consecutive_slots_make_one_run() {
        let r = runs(&[
            p(0x1000, 0),
            p(0x2000, 1),
            p(0x3000, 2),
            p(0x5000, 3),
            p(0x6000, ZERO_SLOT),
            p(0x7000, ZERO_SLOT),
            p(0x8000, 4),
            p(0x9000, 6),
        ]);
        assert_eq!(
            r,
            vec![
                Run {
                    vaddr: 0x1000,
                    slot: 0,
                    pages: 3
                },
                Run {
                    vaddr: 0x5000,
                    slot: 3,
                    pages: 1
                },
                Run {
                    vaddr: 0x6000,
                    slot: ZERO_SLOT,
                    pages: 2
                },
                Run {
                    vaddr: 0x8000,
                    slot: 4,
                    pages: 1
                },
                Run {
                    vaddr: 0x9000,
                    slot: 6,
                    pages: 1
                },
            ]
        );
        assert!(runs(&[]).is_empty());
    }

    /// A run of four pages of which only the first two lie in the registered mapping (the
    /// kernel refuses the whole range with ENOENT): those two are placed, with their data,
    /// and the other two are left out, not the whole run.
    #[test]
    fn a_run_into_an_unregistered_mapping_places_the_registered_pages() {
        // Frame numbers in /proc/self/pagemap need CAP_SYS_ADMIN.
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let page = PAGE_SIZE;
        let base = sys::untouched_mapping(4 * page as usize).unwrap();
        let mut lazy = own_lazy(base, 2, 4);
        let pages: Vec<Placement> = (0..4).map(|i| p(base + i * page, i as u32)).collect();
        assert_eq!(runs(&pages).len(), 1);
        assert_eq!(lazy.place(&pages).unwrap(), 2);
        let mem = File::open("/proc/self/mem").unwrap();
        let mut got = vec![0u8; PAGE_SIZE as usize];
        for (i, want) in [(0u64, 1u8), (1, 2)] {
            mem.read_exact_at(&mut got, base + i * page).unwrap();
            assert!(got.iter().all(|&b| b == want), "page {i}");
        }
    }

    /// This process's memory at `base`, its first `registered` pages registered with a
    /// userfaultfd, taken over; staging slot `i` (of the first `slots`) filled with `i + 1`.
    fn own_lazy(base: u64, registered: u64, slots: u8) -> LazyPages {
        let uffd = sys::own_userfaultfd(base, registered * PAGE_SIZE).unwrap();
        let mut lazy = LazyPages::new(std::process::id(), uffd).unwrap();
        for slot in 0..slots {
            lazy.stage(usize::from(slot), &[slot + 1; PAGE_SIZE as usize])
                .unwrap();
        }
        lazy
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    }

    #[test]
    fn the_layout_follows_moves_drops_and_unmaps_by_origin() {
        let page = PAGE_SIZE;
        let (a, b, c) = (0x10_0000u64, 0x50_0000u64, 0x90_0000u64);
        let mut l = Layout::default();
        l.apply(&UffdEvent::Remap {
            from: a,
            to: b,
            len: 2 * page,
        });
        assert_eq!(l.target(p(a + page, 3)), Some(p(b + page, 3)));
        assert_eq!(l.origin(b + page), Some(a + page));
        assert_eq!(
            l.origin(a),
            None,
            "the old place holds nothing of the image"
        );
        // Not moved: where it always was.
        assert_eq!(l.target(p(a + 2 * page, 1)), Some(p(a + 2 * page, 1)));

        l.apply(&UffdEvent::Remove {
            start: b + page,
            end: b + 2 * page,
        });
        assert_eq!(l.target(p(a + page, 3)), Some(p(b + page, ZERO_SLOT)));
        // Moved again, still zeros.
        l.apply(&UffdEvent::Remap {
            from: b + page,
            to: c,
            len: page,
        });
        assert_eq!(l.target(p(a + page, 3)), Some(p(c, ZERO_SLOT)));
        assert_eq!(l.origin(c), Some(a + page));

        l.apply(&UffdEvent::Unmap {
            start: b,
            end: b + page,
        });
        assert_eq!(l.target(p(a, 0)), None, "unmapped: nothing placed");

        // Back where it came from: itself again.
        let mut l = Layout::default();
        l.apply(&UffdEvent::Remap {
            from: a,
            to: b,
            len: page,
        });
        l.apply(&UffdEvent::Remap {
            from: b,
            to: a,
            len: page,
        });
        assert_eq!(l.target(p(a, 0)), Some(p(a, 0)));
        assert!(l.moved_to.is_empty() && l.moved_from.is_empty());

        // Pages moved over an address that was the image's: that page is gone.
        let mut l = Layout::default();
        l.apply(&UffdEvent::Remap {
            from: a,
            to: c,
            len: page,
        });
        assert_eq!(l.target(p(c, 0)), None);
        assert_eq!(l.target(p(a, 0)), Some(p(c, 0)));
    }

    /// The process drops one lazy page and moves two others (mremap) while it runs: the
    /// dropped page reads as zeros, even when its data arrives later and when a thread
    /// touches it first (answered here, not asked of the VMM); a thread touching a moved
    /// page is reported by the page's origin, and the moved pages land at their new place.
    #[test]
    fn pages_go_where_the_process_moved_them_and_dropped_ones_read_zero() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let page = PAGE_SIZE;
        let base = sys::untouched_mapping(6 * page as usize).unwrap();
        let dst = sys::untouched_mapping(2 * page as usize).unwrap();
        let mut lazy = own_lazy(base, 6, 6);
        // Each call waits in the kernel until its event is read.
        let changes = std::thread::spawn(move || {
            sys::drop_pages(base + 2 * page, page)?;
            sys::move_pages(base + 4 * page, 2 * page, dst)
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !changes.is_finished() {
            assert!(lazy.faults(50).unwrap().is_empty());
            assert!(
                std::time::Instant::now() < deadline,
                "the changes never ended"
            );
        }
        changes.join().unwrap().unwrap();

        let moved = std::thread::spawn(move || sys::read_byte(dst));
        let dropped = std::thread::spawn(move || sys::read_byte(base + 2 * page));
        let mut asked = Vec::new();
        while !asked.contains(&(base + 4 * page)) || !dropped.is_finished() {
            asked.extend(lazy.faults(50).unwrap());
            assert!(
                std::time::Instant::now() < deadline,
                "asked only {asked:x?}"
            );
        }
        assert_eq!(dropped.join().unwrap(), 0);
        assert!(
            !asked.contains(&(base + 2 * page)),
            "a dropped page was asked for"
        );

        let all: Vec<Placement> = (0..6).map(|i| p(base + i * page, i as u32)).collect();
        lazy.place(&all).unwrap();
        assert_eq!(moved.join().unwrap(), 5);
        let mem = File::open("/proc/self/mem").unwrap();
        let mut got = vec![0u8; PAGE_SIZE as usize];
        for (at, want) in [
            (base, 1u8),
            (base + page, 2),
            (base + 2 * page, 0),
            (base + 3 * page, 4),
            (dst, 5),
            (dst + page, 6),
        ] {
            mem.read_exact_at(&mut got, at).unwrap();
            assert!(got.iter().all(|&b| b == want), "{at:#x} should hold {want}");
        }
    }

    #[test]
    fn a_zero_page_after_data_starts_a_new_run() {
        let r = runs(&[p(0x1000, 0), p(0x2000, ZERO_SLOT), p(0x3000, 1)]);
        assert_eq!(r.len(), 3);
    }
}
