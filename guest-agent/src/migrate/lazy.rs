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

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use crate::migrate::image::PAGE_SIZE;
use crate::sys::{self, PinnedBuffer};

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
    #[error("placing page {vaddr:#x} into process {pid}")]
    Place {
        /// The process.
        pid: u32,
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

/// A resumed (or about to be resumed) process whose anonymous pages come later.
#[derive(Debug)]
pub struct LazyPages {
    pid: u32,
    uffd: OwnedFd,
    staging: PinnedBuffer,
    frames: Vec<u64>,
    placed: u64,
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
            uffd,
            staging,
            frames: Vec::new(),
            placed: 0,
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

    /// Pages placed so far (zero pages included, pages already there not).
    pub fn placed(&self) -> u64 {
        self.placed
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

    /// Copies each placement's page (from its staging slot, or zeros) into the process and
    /// wakes the threads waiting for them. A page already present is skipped, and so is one
    /// whose memory the process unmapped meanwhile. Returns the pages placed. First checks
    /// that the staging frames are still the ones the VMM wrote (the guest kernel may move
    /// even locked pages, e.g. compaction): if one moved, nothing is placed.
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
        for run in runs(pages) {
            placed += self.place_run(run)?;
        }
        self.placed += placed;
        Ok(placed)
    }

    fn place_run(&mut self, run: Run) -> Result<u64, LazyError> {
        let len = u64::from(run.pages) * PAGE_SIZE;
        let mut done = 0u64;
        let mut placed = 0u64;
        // The kernel answers ENOENT for a whole range that is not inside one registered
        // mapping: a run across two mappings (or into an unmapped hole) goes on page by page,
        // so that only the pages really gone are left out.
        let mut page_by_page = false;
        while done < len {
            let dst = run.vaddr + done;
            let want = if page_by_page { PAGE_SIZE } else { len - done };
            let result = if run.slot == ZERO_SLOT {
                sys::uffd_zeropage(&self.uffd, dst, want)
            } else {
                let from = run.slot as usize * PAGE_SIZE as usize + done as usize;
                let src = &self.staging.as_slice()[from..from + want as usize];
                sys::uffd_copy(&self.uffd, dst, src)
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
                        Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                        _ => {
                            return Err(LazyError::Place {
                                pid: self.pid,
                                vaddr: dst,
                                source: e,
                            })
                        }
                    }
                }
            }
        }
        Ok(placed)
    }

    /// The pages the process's threads wait for, waiting up to `wait_ms` for the first (at
    /// most [`MAX_FAULTS`]; a page may come more than once).
    pub fn faults(&self, wait_ms: u32) -> Result<Vec<u64>, LazyError> {
        let wait = i32::try_from(wait_ms).unwrap_or(i32::MAX);
        sys::uffd_faults(&self.uffd, wait, MAX_FAULTS).map_err(|source| LazyError::Faults {
            pid: self.pid,
            source,
        })
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
        if !std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        {
            eprintln!("skipped: needs root");
            return;
        }
        let page = PAGE_SIZE;
        let base = sys::untouched_mapping(4 * page as usize).unwrap();
        let uffd = sys::own_userfaultfd(base, 2 * page).unwrap();
        let mut lazy = LazyPages::new(std::process::id(), uffd).unwrap();
        for slot in 0..4u8 {
            lazy.stage(usize::from(slot), &[slot + 1; PAGE_SIZE as usize])
                .unwrap();
        }
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

    #[test]
    fn a_zero_page_after_data_starts_a_new_run() {
        let r = runs(&[p(0x1000, 0), p(0x2000, ZERO_SLOT), p(0x3000, 1)]);
        assert_eq!(r.len(), 3);
    }
}
