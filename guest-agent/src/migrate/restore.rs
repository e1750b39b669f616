//! The destination side of a migration: rebuild a process from a [`ProcessImage`].
//!
//! [`build`] makes a *skeleton*: a child of the agent, stopped under ptrace, whose address
//! space, files, working directory, signal state, memory-layout fields and limits are the
//! image's, all done from inside it by injected system calls ([`super::inject`]). Its private
//! mappings are readable and writable while the pages arrive; [`Skeleton::frames`] faults the
//! pages that will receive data in, pins them (mlock) and reports their guest-physical frame
//! numbers, which the VMM writes into. [`Skeleton::resume`] gives every mapping its final
//! protection, unpins, switches to the image's credentials, puts the registers back and lets
//! the process run.
//!
//! The order of [`build`]:
//! 1. clone3 a child (with the source's pid if it is free here), which stops itself;
//! 2. drop the rseq area and robust-futex list it inherited from the agent, and turn
//!    transparent huge pages off for it until [`Skeleton::resume`] (see below);
//! 3. map a trampoline (a `syscall` instruction and scratch memory) where the image has
//!    nothing; enter a time namespace whose monotonic and boot-time clocks go on from the
//!    image's (see [`super::clocks`]; none when this node's agree), and unmap everything
//!    else but the kernel's `[vvar]`/`[vdso]`;
//! 4. move `[vvar]`/`[vdso]` to the image's addresses (mremap: the same kernel build on every
//!    node means the same vdso code);
//! 5. create every mapping at its address: anonymous private for anonymous, heap and stack
//!    (the stack grows down), files opened here by path and mapped at the same offset;
//! 6. the memory-layout fields, aux vector and `/proc/PID/exe` (PR_SET_MM_MAP);
//! 7. the files at their descriptor numbers, with their flags and offsets;
//! 8. the working directory, the signal dispositions and mask, the command name, the
//!    resource limits (RLIMIT_MEMLOCK waits for [`Skeleton::resume`]: pinning needs it open).
//!
//! Pre-copy builds in two parts, so that the pages can land while the process still runs at
//! the source: [`build_outline`] does steps 1 to 5 from the running process's outline (an
//! image without registers), and [`Skeleton::complete`] follows the mappings the process
//! changed until the freeze and does steps 6 to 8 from the frozen image. The time
//! namespace's offsets from the outline's clocks hold for the frozen image too: they are the
//! difference between two clocks that tick alike.
//!
//! Credentials are switched in [`Skeleton::resume`], just before the registers: pinning
//! (CAP_IPC_LOCK) and PR_SET_MM_MAP (CAP_SYS_RESOURCE) need the agent's root.
//!
//! The frames [`Skeleton::frames`] reports must stay the pages' frames until the VMM wrote
//! them: a frame the guest kernel gave to something else meanwhile would receive the
//! process's data in its place, corrupting the guest. mlock keeps the pages in memory but
//! does not stop the kernel from moving them. Two movers are shut out: khugepaged, which
//! copies small pages into a new huge page (`PR_SET_THP_DISABLE` on the skeleton until
//! the resume, when the image's own setting comes back), and compaction, which migrates
//! mlocked pages unless `vm.compact_unevictable_allowed` is 0 (the agent sets it at start,
//! [`super::keep_locked_pages_in_place`]).
//!
//! A [`Skeleton`] belongs to the thread that built it (the ptrace tracer), so it is neither
//! `Send` nor `Sync`. Dropping it kills and reaps the process.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::migrate::clocks::{self, Offsets};
use crate::migrate::image::{Clocks, FileKind, Mapping, MappingKind, ProcessImage, PAGE_SIZE};
use crate::migrate::inject::{self, parse_range, InjectError, Tracee};
use crate::sys::{self, Resume};

/// The trampoline's code page holds just `syscall` (then `int3`s).
const TRAMPOLINE_CODE: [u8; 4] = [0x0f, 0x05, 0xcc, 0xcc];

/// Scratch memory after the trampoline's code page, at least.
const MIN_SCRATCH: u64 = 16 * 1024;

/// The highest user address plus one of 4-level paging (x86-64's default address space).
const USER_TOP: u64 = 0x7fff_ffff_f000;

/// `PR_SET_MM` / `PR_SET_MM_MAP` and the size of `struct prctl_mm_map`.
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const PRCTL_MM_MAP_LEN: usize = 13 * 8;

/// `MADV_POPULATE_WRITE` (Linux 5.14+).
const MADV_POPULATE_WRITE: u64 = 23;

/// `RSEQ_FLAG_UNREGISTER`.
const RSEQ_FLAG_UNREGISTER: u64 = 1;

/// `__O_TMPFILE`, never passed on when reopening.
const O_TMPFILE_BIT: u32 = 0o20000000;

/// Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE_OR_SHARED: u64 = 1 << 61;
const PM_EXCLUSIVE: u64 = 1 << 56;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Why a process could not be rebuilt, or its pages not be pinned, or it not be resumed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The image cannot be rebuilt as it is.
    #[error("bad process image: {0}")]
    BadImage(String),
    /// The skeleton process could not be created.
    #[error("creating the skeleton process")]
    Spawn(#[source] io::Error),
    /// The skeleton did not stop itself as it should.
    #[error("skeleton process {pid} did not stop as asked (wait status {status:#x})")]
    NotStopped {
        /// The skeleton.
        pid: u32,
        /// The raw wait status.
        status: i32,
    },
    /// A file that a mapping needs is not on this node.
    #[error("{path} (mapped at {start:#x} in the process) does not exist on this node")]
    MissingFile {
        /// The file.
        path: String,
        /// Where the mapping starts.
        start: u64,
    },
    /// The image leaves no room for the trampoline.
    #[error("no free address range of {len:#x} bytes for the trampoline")]
    NoRoomForTrampoline {
        /// Bytes needed.
        len: u64,
    },
    /// The image's kernel mappings do not match this kernel's.
    #[error(
        "the image's [vvar]/[vdso] layout ({image}) does not match this kernel's ({here}): \
         every node must run the same kernel build"
    )]
    VdsoMismatch {
        /// The image's, as `start-end` lists.
        image: String,
        /// This kernel's.
        here: String,
    },
    /// The image's xstate area does not fit this machine's.
    #[error(
        "the image's xstate area has {image} bytes, this machine's {here}: the nodes' CPUs or \
         kernels differ"
    )]
    XstateSize {
        /// Bytes in the image.
        image: usize,
        /// Bytes here.
        here: usize,
    },
    /// A page asked of [`Skeleton::frames`] cannot receive data.
    #[error("page {vaddr:#x}: {reason}")]
    Page {
        /// The page's address in the process.
        vaddr: u64,
        /// Why.
        reason: String,
    },
    /// The image's mappings changed since the outline in a way the skeleton cannot follow
    /// (a mapping over the trampoline, a moved vdso, a trampoline too small): it must be built
    /// anew from the image.
    #[error("the skeleton built from the outline cannot take this image: {0}")]
    Outdated(String),
    /// A skeleton built from an outline was asked to resume before [`Skeleton::complete`].
    #[error("skeleton process {pid} was built from an outline and not completed")]
    Incomplete {
        /// The skeleton.
        pid: u32,
    },
    /// The skeleton was already resumed or aborted.
    #[error("the skeleton process {pid} is no longer under construction")]
    Finished {
        /// The process.
        pid: u32,
    },
    /// A step done inside the skeleton failed.
    #[error("{what}")]
    Step {
        /// The step.
        what: String,
        /// Why.
        #[source]
        source: InjectError,
    },
    /// A step done from outside failed.
    #[error("{what}")]
    Io {
        /// The step.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, RestoreError>;
}

impl<T> Ctx<T> for Result<T, InjectError> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, RestoreError> {
        self.map_err(|source| RestoreError::Step {
            what: what(),
            source,
        })
    }
}

impl<T> Ctx<T> for Result<T, io::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, RestoreError> {
        self.map_err(|source| RestoreError::Io {
            what: what(),
            source,
        })
    }
}

/// A mapping as the skeleton keeps it until [`Skeleton::resume`].
#[derive(Debug, Clone)]
struct Region {
    start: u64,
    end: u64,
    /// The final protection (`PROT_*`).
    prot: u8,
    /// Private, so readable and writable until resume and able to receive pages.
    fillable: bool,
    /// Private anonymous memory (anonymous, heap or stack): its pages may come later, on
    /// fault (post-copy, [`Skeleton::userfaultfd`]).
    anonymous: bool,
}

/// A process under construction: every mapping of the image in place, stopped under ptrace
/// by the thread that built it. See the module documentation.
#[derive(Debug)]
pub struct Skeleton {
    pid: u32,
    tracee: Option<Tracee>,
    regions: Vec<Region>,
    trampoline: (u64, u64),
    locked: Vec<(u64, u64)>,
    regs: inject::Regs,
    xstate: Vec<u8>,
    uid: [u32; 3],
    gid: [u32; 3],
    groups: Vec<u32>,
    memlock: Option<(u64, u64)>,
    /// The image's `PR_SET_THP_DISABLE`, set again at the resume.
    thp_disabled: bool,
    /// Built from an outline and not completed yet: the outline's mappings.
    outline: Option<Vec<Mapping>>,
    warnings: Vec<String>,
    /// Resumed or aborted: nothing left for `Drop` to do.
    done: bool,
}

/// Builds the skeleton of `image`'s process (see the module documentation). On error the
/// half-built process is killed and reaped.
pub fn build(image: &ProcessImage) -> Result<Skeleton, RestoreError> {
    let regs = image_regs(image)?;
    let mut sk = build_address_space(image)?;
    sk.finish_from(image, regs)?;
    Ok(sk)
}

/// Pre-copy: builds the address space of `outline`, the image of a process that still runs
/// at the source (no registers; see [`crate::migrate::dump::outline`]): steps 1 to 5 of
/// [`build`]. Its pages can be pinned and filled ([`Skeleton::frames`]) while the source's
/// rounds go on; [`Skeleton::complete`] finishes it from the freeze's image.
pub fn build_outline(outline: &ProcessImage) -> Result<Skeleton, RestoreError> {
    let mut sk = build_address_space(outline)?;
    sk.outline = Some(outline.mappings.clone());
    Ok(sk)
}

fn image_regs(image: &ProcessImage) -> Result<inject::Regs, RestoreError> {
    inject::regs_from_bytes(&image.regs).ok_or_else(|| {
        RestoreError::BadImage(format!(
            "{} bytes of registers, expected {}",
            image.regs.len(),
            inject::REGS_LEN
        ))
    })
}

/// Steps 1 to 5 of [`build`]: the stopped child with `image`'s clocks and mappings.
fn build_address_space(image: &ProcessImage) -> Result<Skeleton, RestoreError> {
    check_mappings(&image.mappings)?;
    let pid = spawn_stopped(image.pid)?;
    let mut sk = Skeleton {
        pid,
        tracee: None,
        regions: Vec::new(),
        trampoline: (0, 0),
        locked: Vec::new(),
        regs: inject::regs_from_bytes(&[0; inject::REGS_LEN]).expect("REGS_LEN bytes"),
        xstate: Vec::new(),
        uid: image.creds.uid,
        gid: image.creds.gid,
        groups: image.creds.groups.clone(),
        memlock: None,
        thp_disabled: image.thp_disabled,
        outline: None,
        warnings: Vec::new(),
        done: false,
    };
    // From here on an error drops `sk`, which kills and reaps the child.
    sk.tracee = Some(
        Tracee::new(pid, libc::PTRACE_O_EXITKILL as u32)
            .ctx(|| format!("taking over skeleton process {pid}"))?,
    );
    sk.drop_inherited_thread_state()?;
    sk.place_trampoline(image)?;
    sk.carry_clocks(&image.clocks)?;
    sk.clear_address_space()?;
    sk.move_vdso(&image.mappings)?;
    sk.map_all(&image.mappings)?;
    Ok(sk)
}

/// Scratch memory the trampoline needs for `image`: room for its longest path, its groups,
/// its `prctl_mm_map` and aux vector, and at least [`MIN_SCRATCH`].
fn scratch_len(image: &ProcessImage) -> u64 {
    let longest_path = image
        .mappings
        .iter()
        .filter_map(|m| m.path.as_ref().map(String::len))
        .chain(image.files.iter().map(|f| f.path.len()))
        .chain([image.cwd.len()])
        .max()
        .unwrap_or(0) as u64;
    [
        MIN_SCRATCH,
        image.creds.groups.len() as u64 * 4,
        PRCTL_MM_MAP_LEN as u64 + image.mm.auxv.len() as u64 * 8,
        longest_path + 1,
    ]
    .into_iter()
    .max()
    .unwrap_or(MIN_SCRATCH)
    .next_multiple_of(PAGE_SIZE)
}

/// Checks that the mappings are page-aligned, non-empty, ascending and disjoint, and that
/// file mappings have a path.
fn check_mappings(mappings: &[Mapping]) -> Result<(), RestoreError> {
    let mut prev_end = 0;
    for m in mappings {
        if !m.start.is_multiple_of(PAGE_SIZE)
            || !m.end.is_multiple_of(PAGE_SIZE)
            || m.end <= m.start
        {
            return Err(RestoreError::BadImage(format!(
                "mapping {:#x}-{:#x} is empty or not page-aligned",
                m.start, m.end
            )));
        }
        if m.start < prev_end {
            return Err(RestoreError::BadImage(format!(
                "mapping {:#x}-{:#x} overlaps the one before or is out of order",
                m.start, m.end
            )));
        }
        prev_end = m.end;
        if m.kind == MappingKind::File && m.path.is_none() {
            return Err(RestoreError::BadImage(format!(
                "file mapping {:#x}-{:#x} has no path",
                m.start, m.end
            )));
        }
        if m.kind != MappingKind::Vsyscall && m.end > USER_TOP {
            return Err(RestoreError::BadImage(format!(
                "mapping {:#x}-{:#x} lies above the 47-bit user address space",
                m.start, m.end
            )));
        }
    }
    Ok(())
}

/// A stopped, traced child, with pid `want` if that is free here, else any.
fn spawn_stopped(want: u32) -> Result<u32, RestoreError> {
    let pid = match want {
        2.. => sys::spawn_traced_stopped(Some(want)),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
    .or_else(|_| sys::spawn_traced_stopped(None))
    .map_err(RestoreError::Spawn)?;
    let status = sys::wait_status(pid).map_err(RestoreError::Spawn)?;
    if libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGSTOP {
        return Ok(pid);
    }
    if libc::WIFSTOPPED(status) {
        sys::kill(pid, libc::SIGKILL);
        let _ = sys::wait_status(pid);
    }
    Err(RestoreError::NotStopped { pid, status })
}

/// Whether a mapping is one of the kernel's own (`[vvar]`, `[vvar_vclock]`, `[vdso]`).
fn is_vdso_kind(kind: MappingKind) -> bool {
    matches!(kind, MappingKind::Vdso | MappingKind::Vvar)
}

/// The lines of `/proc/PID/maps` as (start, end, name).
fn read_maps(pid: u32) -> Result<Vec<(u64, u64, String)>, RestoreError> {
    let path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (start, end) = parse_range(f.next()?)?;
            let name = f.nth(4).unwrap_or("").to_string();
            Some((start, end, name))
        })
        .collect())
}

fn is_vdso_name(name: &str) -> bool {
    name == "[vdso]" || name.starts_with("[vvar")
}

fn ranges_text(r: &[(u64, u64)]) -> String {
    let parts: Vec<String> = r.iter().map(|(s, e)| format!("{s:x}-{e:x}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn prot_bits(prot: u8) -> u64 {
    u64::from(prot & 7)
}

impl Skeleton {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What had to be done differently from the source, one sentence each: descriptors
    /// reconnected to `/dev/null`, shared anonymous memory made private, `/proc/PID/exe`
    /// left unchanged...
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The trampoline's address range (unmapped again by [`Skeleton::resume`]).
    pub fn trampoline(&self) -> (u64, u64) {
        self.trampoline
    }

    fn t(&mut self) -> Result<&mut Tracee, RestoreError> {
        let pid = self.pid;
        self.tracee.as_mut().ok_or(RestoreError::Finished { pid })
    }

    /// Runs `nr` in the skeleton; `what` names the step for an error.
    fn call(
        &mut self,
        nr: i64,
        args: [u64; 6],
        what: impl FnOnce() -> String,
    ) -> Result<u64, RestoreError> {
        self.t()?.checked_syscall(nr, args).ctx(what)
    }

    /// `openat(AT_FDCWD, path, flags)` in the skeleton: the descriptor, or the errno.
    fn open(&mut self, path: &str, flags: u32) -> Result<Result<u64, i32>, RestoreError> {
        let t = self.t()?;
        let p = t
            .write_scratch_cstr(path)
            .ctx(|| format!("writing the path {path}"))?;
        let rc = t
            .syscall(
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, p, u64::from(flags), 0, 0, 0],
            )
            .ctx(|| format!("opening {path}"))?;
        Ok(if (-4095..0).contains(&rc) {
            Err(-rc as i32)
        } else {
            Ok(rc as u64)
        })
    }

    fn close(&mut self, fd: u64) -> Result<(), RestoreError> {
        self.call(libc::SYS_close, [fd, 0, 0, 0, 0, 0], || {
            format!("closing descriptor {fd}")
        })
        .map(drop)
    }

    /// Steps 6 to 8 of [`build`], and what [`Skeleton::resume`] will need, from `image`.
    fn finish_from(
        &mut self,
        image: &ProcessImage,
        regs: inject::Regs,
    ) -> Result<(), RestoreError> {
        self.regs = regs;
        self.xstate = image.xstate.clone();
        self.uid = image.creds.uid;
        self.gid = image.creds.gid;
        self.groups = image.creds.groups.clone();
        self.thp_disabled = image.thp_disabled;
        self.check_xstate()?;
        self.set_mm(image)?;
        self.set_files(image)?;
        self.set_cwd(&image.cwd)?;
        self.set_signals(image)?;
        self.set_comm(&image.comm)?;
        self.set_rlimits(image)
    }

    /// Pre-copy: completes a skeleton built from an outline ([`build_outline`]) with the
    /// frozen process's `image`. Mappings the process dropped or changed since the outline
    /// are unmapped, and those it made are mapped; then everything else is set as [`build`]
    /// does. Returns the ranges whose frames, reported before, no longer hold (the changed
    /// mappings'); elsewhere the pages pinned and filled meanwhile stay as they are.
    ///
    /// [`RestoreError::Outdated`] means the skeleton cannot follow (it is left as it was):
    /// build it anew with [`build`]. Any other error leaves it half-done: abort it.
    pub fn complete(&mut self, image: &ProcessImage) -> Result<Vec<(u64, u64)>, RestoreError> {
        let pid = self.pid;
        let outline = self.outline.clone().ok_or_else(|| {
            RestoreError::BadImage(format!(
                "skeleton process {pid} was not built from an outline"
            ))
        })?;
        let regs = image_regs(image)?;
        check_mappings(&image.mappings)?;
        let kernel = |ms: &[Mapping]| -> Vec<Mapping> {
            ms.iter()
                .filter(|m| is_vdso_kind(m.kind) || m.kind == MappingKind::Vsyscall)
                .cloned()
                .collect()
        };
        if kernel(&outline) != kernel(&image.mappings) {
            return Err(RestoreError::Outdated("its [vvar]/[vdso] moved".into()));
        }
        let (ts, te) = self.trampoline;
        if PAGE_SIZE + scratch_len(image) > te - ts {
            return Err(RestoreError::Outdated(
                "the trampoline's scratch memory is too small for it".into(),
            ));
        }
        let gone: Vec<&Mapping> = outline
            .iter()
            .filter(|m| !image.mappings.contains(m))
            .collect();
        let new: Vec<Mapping> = image
            .mappings
            .iter()
            .filter(|m| !outline.contains(m))
            .cloned()
            .collect();
        // One free page either side of the trampoline, as it was placed.
        if let Some(m) = new
            .iter()
            .find(|m| m.start < te + PAGE_SIZE && ts < m.end + PAGE_SIZE)
        {
            return Err(RestoreError::Outdated(format!(
                "a new mapping at {:#x}-{:#x} meets the trampoline at {ts:#x}-{te:#x}",
                m.start, m.end
            )));
        }
        let mut stale = Vec::new();
        for m in gone {
            let (s, e) = (m.start, m.end);
            self.call(libc::SYS_munmap, [s, e - s, 0, 0, 0, 0], || {
                format!("unmapping {s:#x}-{e:#x}, gone since the outline")
            })?;
            self.regions.retain(|r| r.end <= s || e <= r.start);
            self.locked.retain(|&(ls, le)| le <= s || e <= ls);
            stale.push((s, e));
        }
        stale.extend(new.iter().map(|m| (m.start, m.end)));
        self.map_all(&new)?;
        self.outline = None;
        self.finish_from(image, regs)?;
        Ok(stale)
    }

    fn check_xstate(&mut self) -> Result<(), RestoreError> {
        let pid = self.pid;
        let here = self
            .t()?
            .xstate()
            .ctx(|| format!("reading the xstate of {pid}"))?
            .len();
        if here != self.xstate.len() {
            return Err(RestoreError::XstateSize {
                image: self.xstate.len(),
                here,
            });
        }
        Ok(())
    }

    /// The child is a copy of an agent thread: its rseq area and robust-futex list point
    /// into memory that is about to go (the kernel would write to the rseq area on every
    /// return to user space, and SIGSEGV the process once it is unmapped).
    fn drop_inherited_thread_state(&mut self) -> Result<(), RestoreError> {
        if let Ok(rseq) = sys::ptrace_rseq_configuration(self.pid) {
            if rseq.pointer != 0 {
                self.call(
                    libc::SYS_rseq,
                    [
                        rseq.pointer,
                        u64::from(rseq.size),
                        RSEQ_FLAG_UNREGISTER,
                        u64::from(rseq.signature),
                        0,
                        0,
                    ],
                    || "unregistering the inherited rseq area".into(),
                )?;
            }
        }
        // sizeof(struct robust_list_head)
        self.call(libc::SYS_set_robust_list, [0, 24, 0, 0, 0, 0], || {
            "dropping the inherited robust-futex list".into()
        })?;
        // Small pages only while the VMM writes into their frames: khugepaged would copy
        // them into a huge page and free the frames it was told (see the module's notes).
        self.set_thp_disabled(true)
    }

    fn set_thp_disabled(&mut self, off: bool) -> Result<(), RestoreError> {
        self.call(
            libc::SYS_prctl,
            [libc::PR_SET_THP_DISABLE as u64, u64::from(off), 0, 0, 0, 0],
            || format!("setting PR_SET_THP_DISABLE to {}", u8::from(off)),
        )
        .map(drop)
    }

    /// Puts the skeleton into a new time namespace whose offsets carry `image`'s monotonic
    /// and boot-time clocks on (see [`super::clocks`]): unshare(CLONE_NEWTIME) makes the
    /// namespace its children would get, the agent writes its offsets, and setns enters it
    /// (the kernel then maps the namespace's clock page in place of `[vvar]`'s). Nothing when
    /// this node's clocks already agree; a warning when this kernel has no time namespaces.
    fn carry_clocks(&mut self, image: &Clocks) -> Result<(), RestoreError> {
        let here = clocks::here().ctx(|| "reading this node's clocks".into())?;
        let offsets = Offsets::between(image, &here);
        if offsets.negligible() {
            return Ok(());
        }
        let rc = self
            .t()?
            .syscall(
                libc::SYS_unshare,
                [libc::CLONE_NEWTIME as u64, 0, 0, 0, 0, 0],
            )
            .ctx(|| "creating a time namespace".into())?;
        match rc {
            0 => {}
            rc if rc == -i64::from(libc::EINVAL) => {
                self.warnings.push(format!(
                    "this kernel has no time namespaces (CONFIG_TIME_NS): the process's clocks \
                     are this node's, which differ from the source's by {offsets}"
                ));
                return Ok(());
            }
            rc => {
                return Err(RestoreError::Io {
                    what: "creating a time namespace".into(),
                    source: io::Error::from_raw_os_error(-rc as i32),
                })
            }
        }
        let path = format!("/proc/{}/timens_offsets", self.pid);
        std::fs::write(&path, offsets.proc_text())
            .ctx(|| format!("setting the time namespace's offsets ({offsets}) in {path}"))?;
        let ns = "/proc/self/ns/time_for_children";
        let fd = self
            .open(ns, (libc::O_RDONLY | libc::O_CLOEXEC) as u32)?
            .map_err(|errno| RestoreError::Io {
                what: format!("opening {ns}"),
                source: io::Error::from_raw_os_error(errno),
            })?;
        let entered = self.call(
            libc::SYS_setns,
            [fd, libc::CLONE_NEWTIME as u64, 0, 0, 0, 0],
            || format!("entering the time namespace ({offsets})"),
        );
        self.close(fd)?;
        entered.map(drop)
    }

    /// Maps the trampoline where neither the image nor the child has anything: one code page
    /// (`syscall`) and scratch pages after it, and makes the tracee use both.
    fn place_trampoline(&mut self, image: &ProcessImage) -> Result<(), RestoreError> {
        let scratch = scratch_len(image);
        let len = PAGE_SIZE + scratch;

        let mut busy: Vec<(u64, u64)> = image
            .mappings
            .iter()
            .filter(|m| m.kind != MappingKind::Vsyscall)
            .map(|m| (m.start, m.end))
            .collect();
        busy.extend(read_maps(self.pid)?.into_iter().map(|(s, e, _)| (s, e)));
        busy.sort_unstable();
        let floor = std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(65536)
            .max(0x10000)
            .next_multiple_of(PAGE_SIZE);
        // A free page on either side, so nothing merges with the trampoline.
        let mut at = floor + PAGE_SIZE;
        for &(s, e) in &busy {
            if e.saturating_add(PAGE_SIZE) <= at {
                continue;
            }
            if s >= at + len + PAGE_SIZE {
                break;
            }
            at = at.max(e + PAGE_SIZE);
        }
        if at + len + PAGE_SIZE > USER_TOP {
            return Err(RestoreError::NoRoomForTrampoline { len });
        }
        self.call(
            libc::SYS_mmap,
            [
                at,
                len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
                u64::MAX,
                0,
            ],
            || format!("mapping the trampoline at {at:#x}"),
        )?;
        self.trampoline = (at, at + len);
        let t = self.t()?;
        t.write_mem(at, &TRAMPOLINE_CODE)
            .ctx(|| "writing the trampoline".into())?;
        self.call(
            libc::SYS_mprotect,
            [
                at,
                PAGE_SIZE,
                (libc::PROT_READ | libc::PROT_EXEC) as u64,
                0,
                0,
                0,
            ],
            || "making the trampoline executable".into(),
        )?;
        let t = self.t()?;
        t.set_syscall_address(at)
            .ctx(|| "switching to the trampoline".into())?;
        t.set_scratch(at + PAGE_SIZE, scratch as usize)
            .ctx(|| "switching to the trampoline's scratch memory".into())?;
        Ok(())
    }

    /// Unmaps everything but the trampoline and the kernel's `[vvar]`/`[vdso]`.
    fn clear_address_space(&mut self) -> Result<(), RestoreError> {
        let mut keep: Vec<(u64, u64)> = read_maps(self.pid)?
            .into_iter()
            .filter(|(_, _, name)| is_vdso_name(name))
            .map(|(s, e, _)| (s, e))
            .collect();
        keep.push(self.trampoline);
        keep.sort_unstable();
        let mut from = 0;
        for (s, e) in keep.into_iter().chain([(USER_TOP, USER_TOP)]) {
            if s > from {
                self.call(libc::SYS_munmap, [from, s - from, 0, 0, 0, 0], || {
                    format!("unmapping {from:#x}-{s:#x}")
                })?;
            }
            from = from.max(e);
        }
        // Anything left above the 47-bit space (a process that asked for 5-level addresses).
        for (s, e, name) in read_maps(self.pid)? {
            let (ts, te) = self.trampoline;
            let kept = is_vdso_name(&name) || (ts <= s && e <= te) || s >= 1 << 63;
            if !kept {
                self.call(libc::SYS_munmap, [s, e - s, 0, 0, 0, 0], || {
                    format!("unmapping {s:#x}-{e:#x}")
                })?;
            }
        }
        Ok(())
    }

    /// Moves this kernel's `[vvar]`/`[vdso]` to where the image has them, keeping their
    /// relative layout (the vdso finds its data by offset), or unmaps them if the image has
    /// none.
    fn move_vdso(&mut self, mappings: &[Mapping]) -> Result<(), RestoreError> {
        let here: Vec<(u64, u64)> = read_maps(self.pid)?
            .into_iter()
            .filter(|(_, _, name)| is_vdso_name(name))
            .map(|(s, e, _)| (s, e))
            .collect();
        let wanted: Vec<(u64, u64)> = mappings
            .iter()
            .filter(|m| is_vdso_kind(m.kind))
            .map(|m| (m.start, m.end))
            .collect();
        if wanted.is_empty() {
            for (s, e) in here {
                self.call(libc::SYS_munmap, [s, e - s, 0, 0, 0, 0], || {
                    format!("unmapping this kernel's vdso/vvar at {s:#x}")
                })?;
            }
            return Ok(());
        }
        let mismatch = || RestoreError::VdsoMismatch {
            image: ranges_text(&wanted),
            here: ranges_text(&here),
        };
        if wanted.len() != here.len() || here.is_empty() {
            return Err(mismatch());
        }
        let delta = wanted[0].0.wrapping_sub(here[0].0);
        let same_shape = wanted
            .iter()
            .zip(&here)
            .all(|(w, h)| w.0.wrapping_sub(h.0) == delta && w.1.wrapping_sub(h.1) == delta);
        if !same_shape {
            return Err(mismatch());
        }
        if delta == 0 {
            return Ok(());
        }
        // Move the one on the side of the move first, so no destination covers a mapping
        // still to be moved.
        let mut order: Vec<usize> = (0..here.len()).collect();
        if (delta as i64) > 0 {
            order.reverse();
        }
        for i in order {
            let (s, e) = here[i];
            let to = wanted[i].0;
            self.call(
                libc::SYS_mremap,
                [
                    s,
                    e - s,
                    e - s,
                    (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                    to,
                    0,
                ],
                || format!("moving this kernel's vdso/vvar from {s:#x} to {to:#x}"),
            )?;
        }
        Ok(())
    }

    /// Creates every mapping of the image (but the kernel's) at its address.
    fn map_all(&mut self, mappings: &[Mapping]) -> Result<(), RestoreError> {
        let mut fds: HashMap<(String, bool), u64> = HashMap::new();
        let result = self.map_each(mappings, &mut fds);
        for (_, fd) in fds {
            self.close(fd)?;
        }
        result
    }

    fn map_each(
        &mut self,
        mappings: &[Mapping],
        fds: &mut HashMap<(String, bool), u64>,
    ) -> Result<(), RestoreError> {
        for m in mappings {
            if is_vdso_kind(m.kind) || m.kind == MappingKind::Vsyscall {
                continue;
            }
            let len = m.end - m.start;
            let writable = m.prot & libc::PROT_WRITE as u8 != 0;
            let file_shared = m.kind == MappingKind::File && m.shared;
            let fill_prot = if file_shared {
                prot_bits(m.prot)
            } else {
                (libc::PROT_READ | libc::PROT_WRITE) as u64
            };
            let mut flags = libc::MAP_FIXED_NOREPLACE as u64;
            if !writable {
                // Writable only for the fill: not committed memory, as at the source.
                flags |= libc::MAP_NORESERVE as u64;
            }
            let (fd, offset) = match m.kind {
                MappingKind::File => {
                    let path = m.path.clone().unwrap_or_default();
                    let key = (path.clone(), file_shared && writable);
                    let fd = match fds.get(&key) {
                        Some(&fd) => fd,
                        None => {
                            let mode = if key.1 { libc::O_RDWR } else { libc::O_RDONLY };
                            let fd = match self.open(&path, (mode | libc::O_CLOEXEC) as u32)? {
                                Ok(fd) => fd,
                                Err(libc::ENOENT) | Err(libc::ENOTDIR) => {
                                    return Err(RestoreError::MissingFile {
                                        path,
                                        start: m.start,
                                    })
                                }
                                Err(errno) => {
                                    return Err(RestoreError::Step {
                                        what: format!("opening {path} to map it at {:#x}", m.start),
                                        source: InjectError::Syscall {
                                            nr: libc::SYS_openat,
                                            pid: self.pid,
                                            source: io::Error::from_raw_os_error(errno),
                                        },
                                    })
                                }
                            };
                            fds.insert(key, fd);
                            fd
                        }
                    };
                    flags |= if m.shared {
                        libc::MAP_SHARED
                    } else {
                        libc::MAP_PRIVATE
                    } as u64;
                    (fd, m.offset)
                }
                _ => {
                    if m.shared {
                        self.warnings.push(format!(
                            "shared anonymous memory at {:#x}-{:#x} was made private",
                            m.start, m.end
                        ));
                    }
                    flags |= (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
                    if m.kind == MappingKind::Stack {
                        flags |= libc::MAP_GROWSDOWN as u64;
                    }
                    (u64::MAX, 0)
                }
            };
            let what = || {
                format!(
                    "mapping {} at {:#x}-{:#x}",
                    m.path.as_deref().unwrap_or("anonymous memory"),
                    m.start,
                    m.end
                )
            };
            let got = self.call(
                libc::SYS_mmap,
                [m.start, len, fill_prot, flags, fd, offset],
                what,
            )?;
            if got != m.start {
                return Err(RestoreError::BadImage(format!(
                    "{} landed at {got:#x}",
                    what()
                )));
            }
            self.regions.push(Region {
                start: m.start,
                end: m.end,
                prot: m.prot,
                fillable: !file_shared,
                anonymous: m.kind != MappingKind::File,
            });
        }
        Ok(())
    }

    /// PR_SET_MM_MAP: code, data, heap, stack, argument and environment bounds, the aux
    /// vector and `/proc/PID/exe` (the file mapped at `start_code`).
    fn set_mm(&mut self, image: &ProcessImage) -> Result<(), RestoreError> {
        let mm = &image.mm;
        let exe = image
            .mappings
            .iter()
            .find(|m| {
                m.kind == MappingKind::File && m.start <= mm.start_code && mm.start_code < m.end
            })
            .and_then(|m| m.path.clone());
        let mut exe_fd = u32::MAX;
        if let Some(path) = &exe {
            match self.open(path, (libc::O_RDONLY | libc::O_CLOEXEC) as u32)? {
                Ok(fd) => exe_fd = fd as u32,
                Err(errno) => self.warnings.push(format!(
                    "/proc/PID/exe left unchanged: opening {path}: {}",
                    io::Error::from_raw_os_error(errno)
                )),
            }
        }
        let mut rc = self.prctl_mm_map(image, exe_fd)?;
        if rc < 0 && exe_fd != u32::MAX {
            // E.g. EBUSY when the agent's own binary is the exe of both.
            self.warnings.push(format!(
                "/proc/PID/exe left unchanged: the kernel refused {} ({})",
                exe.as_deref().unwrap_or(""),
                io::Error::from_raw_os_error(-rc as i32)
            ));
            rc = self.prctl_mm_map(image, u32::MAX)?;
        }
        if exe_fd != u32::MAX {
            self.close(u64::from(exe_fd))?;
        }
        if rc < 0 {
            return Err(RestoreError::Step {
                what: format!(
                    "setting the memory layout (PR_SET_MM_MAP: code {:#x}-{:#x}, data \
                     {:#x}-{:#x}, brk {:#x}-{:#x}, stack {:#x}, args {:#x}-{:#x}, env \
                     {:#x}-{:#x}, {} auxv words)",
                    mm.start_code,
                    mm.end_code,
                    mm.start_data,
                    mm.end_data,
                    mm.start_brk,
                    mm.brk,
                    mm.start_stack,
                    mm.arg_start,
                    mm.arg_end,
                    mm.env_start,
                    mm.env_end,
                    mm.auxv.len()
                ),
                source: InjectError::Syscall {
                    nr: libc::SYS_prctl,
                    pid: self.pid,
                    source: io::Error::from_raw_os_error(-rc as i32),
                },
            });
        }
        Ok(())
    }

    /// prctl(PR_SET_MM, PR_SET_MM_MAP) with `exe_fd`; the raw result.
    fn prctl_mm_map(&mut self, image: &ProcessImage, exe_fd: u32) -> Result<i64, RestoreError> {
        let mm = &image.mm;
        let t = self.t()?;
        let scratch = t
            .scratch(PRCTL_MM_MAP_LEN + mm.auxv.len() * 8)
            .ctx(|| "scratch memory for PR_SET_MM_MAP".into())?;
        let auxv_addr = if mm.auxv.is_empty() {
            0
        } else {
            scratch + PRCTL_MM_MAP_LEN as u64
        };
        let mut buf = Vec::with_capacity(PRCTL_MM_MAP_LEN + mm.auxv.len() * 8);
        for v in mm.addresses().into_iter().chain([auxv_addr]) {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf.extend_from_slice(&((mm.auxv.len() * 8) as u32).to_le_bytes());
        buf.extend_from_slice(&exe_fd.to_le_bytes());
        for v in &mm.auxv {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        t.write_mem(scratch, &buf)
            .ctx(|| "writing the PR_SET_MM_MAP argument".into())?;
        t.syscall(
            libc::SYS_prctl,
            [
                PR_SET_MM,
                PR_SET_MM_MAP,
                scratch,
                PRCTL_MM_MAP_LEN as u64,
                0,
                0,
            ],
        )
        .ctx(|| "setting the memory layout (PR_SET_MM_MAP)".into())
    }

    /// Opens every file at its descriptor number with its flags and offset. Terminals,
    /// pipes, sockets and files missing here become `/dev/null`; nothing is ever created.
    fn set_files(&mut self, image: &ProcessImage) -> Result<(), RestoreError> {
        let strip =
            (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY) as u32 | O_TMPFILE_BIT;
        let mut files: Vec<_> = image.files.iter().collect();
        files.sort_by_key(|f| f.fd);
        for f in files {
            let cloexec = f.flags & libc::O_CLOEXEC as u32;
            let to_null_flags = (f.flags & libc::O_ACCMODE as u32) | cloexec;
            let by_path = matches!(
                f.kind,
                FileKind::Regular | FileKind::Directory | FileKind::CharDevice
            );
            let mut opened = None;
            if by_path {
                match self.open(&f.path, f.flags & !strip)? {
                    Ok(fd) => opened = Some(fd),
                    Err(errno @ (libc::ENOENT | libc::ENOTDIR | libc::ENXIO)) => {
                        self.warnings.push(format!(
                            "descriptor {} ({}) now refers to /dev/null: {}",
                            f.fd,
                            f.path,
                            io::Error::from_raw_os_error(errno)
                        ))
                    }
                    Err(errno) => {
                        return Err(RestoreError::Step {
                            what: format!("reopening {} as descriptor {}", f.path, f.fd),
                            source: InjectError::Syscall {
                                nr: libc::SYS_openat,
                                pid: self.pid,
                                source: io::Error::from_raw_os_error(errno),
                            },
                        })
                    }
                }
            } else if f.fd > 2 || !matches!(f.kind, FileKind::Tty | FileKind::Pipe) {
                self.warnings.push(format!(
                    "descriptor {} ({}) now refers to /dev/null",
                    f.fd, f.path
                ));
            }
            let fd = match opened {
                Some(fd) => fd,
                None => match self.open("/dev/null", to_null_flags)? {
                    Ok(fd) => fd,
                    Err(errno) => {
                        return Err(RestoreError::Step {
                            what: format!("opening /dev/null as descriptor {}", f.fd),
                            source: InjectError::Syscall {
                                nr: libc::SYS_openat,
                                pid: self.pid,
                                source: io::Error::from_raw_os_error(errno),
                            },
                        })
                    }
                },
            };
            let target = u64::from(f.fd);
            if fd != target {
                self.call(
                    libc::SYS_dup3,
                    [fd, target, u64::from(cloexec), 0, 0, 0],
                    || format!("moving {} to descriptor {}", f.path, f.fd),
                )?;
                self.close(fd)?;
            }
            if opened.is_some() && matches!(f.kind, FileKind::Regular | FileKind::Directory) {
                let rc = self.t()?.syscall(
                    libc::SYS_lseek,
                    [target, f.offset, libc::SEEK_SET as u64, 0, 0, 0],
                );
                let rc = rc.ctx(|| format!("seeking {}", f.path))?;
                if rc < 0 && f.kind == FileKind::Regular {
                    return Err(RestoreError::Step {
                        what: format!("seeking {} to {}", f.path, f.offset),
                        source: InjectError::Syscall {
                            nr: libc::SYS_lseek,
                            pid: self.pid,
                            source: io::Error::from_raw_os_error(-rc as i32),
                        },
                    });
                }
            }
        }
        Ok(())
    }

    fn set_cwd(&mut self, cwd: &str) -> Result<(), RestoreError> {
        let t = self.t()?;
        let p = t
            .write_scratch_cstr(cwd)
            .ctx(|| format!("writing the path {cwd}"))?;
        self.call(libc::SYS_chdir, [p, 0, 0, 0, 0, 0], || {
            format!("changing to the working directory {cwd}")
        })
        .map(drop)
    }

    /// Every signal's disposition (the image's, else the default) and the blocked mask.
    fn set_signals(&mut self, image: &ProcessImage) -> Result<(), RestoreError> {
        let by_signo: HashMap<u32, _> = image.sigactions.iter().map(|a| (a.signo, a)).collect();
        for signo in 1..=64u32 {
            if signo == libc::SIGKILL as u32 || signo == libc::SIGSTOP as u32 {
                continue;
            }
            let (handler, flags, restorer, mask) = match by_signo.get(&signo) {
                Some(a) => (a.handler, a.flags, a.restorer, a.mask),
                None => (0, 0, 0, 0),
            };
            let mut act = Vec::with_capacity(32);
            for v in [handler, flags, restorer, mask] {
                act.extend_from_slice(&v.to_le_bytes());
            }
            let t = self.t()?;
            let p = t.write_scratch(&act).ctx(|| "writing a sigaction".into())?;
            self.call(
                libc::SYS_rt_sigaction,
                [u64::from(signo), p, 0, 8, 0, 0],
                || format!("setting the action of signal {signo}"),
            )?;
        }
        let t = self.t()?;
        let p = t
            .write_scratch(&image.sigmask.to_le_bytes())
            .ctx(|| "writing the signal mask".into())?;
        self.call(
            libc::SYS_rt_sigprocmask,
            [libc::SIG_SETMASK as u64, p, 0, 8, 0, 0],
            || "setting the blocked signals".into(),
        )
        .map(drop)
    }

    fn set_comm(&mut self, comm: &str) -> Result<(), RestoreError> {
        let mut end = comm.len().min(15);
        while !comm.is_char_boundary(end) {
            end -= 1;
        }
        let t = self.t()?;
        let p = t
            .write_scratch_cstr(&comm[..end])
            .ctx(|| "writing the command name".into())?;
        self.call(
            libc::SYS_prctl,
            [libc::PR_SET_NAME as u64, p, 0, 0, 0, 0],
            || format!("setting the command name {comm}"),
        )
        .map(drop)
    }

    /// Every resource limit but RLIMIT_MEMLOCK, which [`Skeleton::resume`] sets.
    fn set_rlimits(&mut self, image: &ProcessImage) -> Result<(), RestoreError> {
        for r in &image.rlimits {
            if r.resource == libc::RLIMIT_MEMLOCK {
                self.memlock = Some((r.cur, r.max));
                continue;
            }
            sys::set_rlimit(self.pid, r.resource, r.cur, r.max).ctx(|| {
                format!(
                    "setting resource limit {} to {}/{}",
                    r.resource, r.cur, r.max
                )
            })?;
        }
        Ok(())
    }

    fn fillable_region(&self, vaddr: u64) -> Result<&Region, RestoreError> {
        let page_err = |reason: &str| RestoreError::Page {
            vaddr,
            reason: reason.into(),
        };
        if !vaddr.is_multiple_of(PAGE_SIZE) {
            return Err(page_err("not page-aligned"));
        }
        let r = self
            .regions
            .iter()
            .find(|r| r.start <= vaddr && vaddr < r.end)
            .ok_or_else(|| page_err("not in a mapping of the image that receives pages"))?;
        if !r.fillable {
            return Err(page_err(
                "in a shared file mapping, whose pages are the file's",
            ));
        }
        Ok(r)
    }

    /// Faults in each page of `vaddrs` (page addresses in private mappings) for writing,
    /// pins them (mlock) and returns each one's guest-physical frame number, in the order
    /// asked. A page that is not present, not exclusively this process's, or a page-cache
    /// page afterwards is refused with an error naming it.
    pub fn frames(&mut self, vaddrs: &[u64]) -> Result<Vec<u64>, RestoreError> {
        if self.tracee.is_none() {
            return Err(RestoreError::Finished { pid: self.pid });
        }
        // Contiguous runs inside one region.
        let mut sorted = Vec::with_capacity(vaddrs.len());
        for &v in vaddrs {
            let r = self.fillable_region(v)?;
            sorted.push((v, r.start));
        }
        sorted.sort_unstable();
        sorted.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut last_region = u64::MAX;
        for &(v, region) in &sorted {
            match runs.last_mut() {
                Some(run) if run.1 == v && region == last_region => run.1 = v + PAGE_SIZE,
                _ => runs.push((v, v + PAGE_SIZE)),
            }
            last_region = region;
        }
        for &(s, e) in &runs {
            self.populate_for_write(s, e)?;
            self.call(libc::SYS_mlock, [s, e - s, 0, 0, 0, 0], || {
                format!("pinning {s:#x}-{e:#x}")
            })?;
            self.locked.push((s, e));
        }
        let path = format!("/proc/{}/pagemap", self.pid);
        let pagemap = File::open(&path).ctx(|| format!("opening {path}"))?;
        let mut entries: HashMap<u64, u64> = HashMap::with_capacity(sorted.len());
        for &(s, e) in &runs {
            let pages = ((e - s) / PAGE_SIZE) as usize;
            let mut buf = vec![0u8; pages * 8];
            pagemap
                .read_exact_at(&mut buf, s / PAGE_SIZE * 8)
                .ctx(|| format!("reading {path} for {s:#x}-{e:#x}"))?;
            for (i, c) in buf.chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes(c.try_into().expect("8-byte chunk"));
                entries.insert(s + i as u64 * PAGE_SIZE, entry);
            }
        }
        vaddrs
            .iter()
            .map(|&v| {
                let e = entries.get(&v).copied().unwrap_or(0);
                let reason = if e & PM_PRESENT == 0 {
                    "not present after faulting it in"
                } else if e & PM_FILE_OR_SHARED != 0 {
                    "a page-cache or shared page, not a private one"
                } else if e & PM_EXCLUSIVE == 0 {
                    "not mapped exclusively by this process"
                } else if e & PM_PFN_MASK == 0 {
                    "no frame number in pagemap (the agent lacks CAP_SYS_ADMIN)"
                } else {
                    return Ok(e & PM_PFN_MASK);
                };
                Err(RestoreError::Page {
                    vaddr: v,
                    reason: reason.into(),
                })
            })
            .collect()
    }

    /// Pre-copy: drops pages pinned (and filled) from the outline that the frozen process
    /// no longer has: unpinned, then `MADV_DONTNEED`, so that they read as at the source
    /// (zeros in anonymous memory, the file's contents in a private file mapping).
    pub fn discard(&mut self, vaddrs: &[u64]) -> Result<(), RestoreError> {
        let mut sorted = Vec::with_capacity(vaddrs.len());
        for &v in vaddrs {
            self.fillable_region(v)?;
            sorted.push(v);
        }
        sorted.sort_unstable();
        sorted.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for v in sorted {
            match runs.last_mut() {
                Some(run) if run.1 == v => run.1 = v + PAGE_SIZE,
                _ => runs.push((v, v + PAGE_SIZE)),
            }
        }
        for (s, e) in runs {
            self.call(libc::SYS_munlock, [s, e - s, 0, 0, 0, 0], || {
                format!("unpinning {s:#x}-{e:#x}, gone since the outline")
            })?;
            self.call(
                libc::SYS_madvise,
                [s, e - s, libc::MADV_DONTNEED as u64, 0, 0, 0],
                || format!("dropping {s:#x}-{e:#x}, gone since the outline"),
            )?;
        }
        Ok(())
    }

    /// Post-copy: creates a userfaultfd inside the process, registers `ranges` (each inside
    /// one private anonymous mapping of the image) for missing-page faults, and takes the
    /// descriptor into the agent (pidfd_getfd); the process keeps none. From then on a page
    /// of those ranges that nobody placed ([`super::lazy::LazyPages::place`]) stops the
    /// thread that touches it until one is. Pages asked of [`Skeleton::frames`] must lie
    /// outside `ranges`.
    pub fn userfaultfd(
        &mut self,
        ranges: &[(u64, u64)],
    ) -> Result<std::os::fd::OwnedFd, RestoreError> {
        for &(s, e) in ranges {
            let inside = self
                .regions
                .iter()
                .any(|r| r.fillable && r.anonymous && r.start <= s && e <= r.end && s < e);
            if !inside || !s.is_multiple_of(PAGE_SIZE) || !e.is_multiple_of(PAGE_SIZE) {
                return Err(RestoreError::BadImage(format!(
                    "post-copy range {s:#x}-{e:#x} is not inside one private anonymous mapping \
                     of the image"
                )));
            }
        }
        let rc = self.t()?.syscall(
            libc::SYS_userfaultfd,
            [(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64, 0, 0, 0, 0, 0],
        );
        let rc = rc.ctx(|| "creating a userfaultfd".into())?;
        if (-4095..0).contains(&rc) {
            let e = io::Error::from_raw_os_error(-rc as i32);
            return Err(RestoreError::Io {
                what: format!(
                    "this guest's kernel gives no userfaultfd ({e}), which post-copy needs; \
                     use precopy or stop"
                ),
                source: e,
            });
        }
        let fd = rc as u64;
        let taken = self.register_and_take(fd, ranges);
        let closed = self.close(fd);
        let taken = taken?;
        closed?;
        Ok(taken)
    }

    fn register_and_take(
        &mut self,
        fd: u64,
        ranges: &[(u64, u64)],
    ) -> Result<std::os::fd::OwnedFd, RestoreError> {
        let t = self.t()?;
        let p = t
            .write_scratch(&sys::uffdio_api_bytes(true))
            .ctx(|| "writing a uffdio_api".into())?;
        self.call(libc::SYS_ioctl, [fd, sys::UFFDIO_API, p, 0, 0, 0], || {
            "UFFDIO_API on the process's userfaultfd".into()
        })?;
        for &(s, e) in ranges {
            let t = self.t()?;
            let p = t
                .write_scratch(&sys::uffdio_register_bytes(s, e - s))
                .ctx(|| "writing a uffdio_register".into())?;
            self.call(
                libc::SYS_ioctl,
                [fd, sys::UFFDIO_REGISTER, p, 0, 0, 0],
                || format!("registering {s:#x}-{e:#x} for post-copy faults"),
            )?;
        }
        let pid = self.pid;
        sys::take_fd(pid, fd).ctx(|| format!("taking the userfaultfd of {pid} (pidfd_getfd)"))
    }

    /// Makes every page of `s..e` present, private and writable: MADV_POPULATE_WRITE, or
    /// where the kernel lacks it, rewriting one byte of each page through /proc/PID/mem.
    fn populate_for_write(&mut self, s: u64, e: u64) -> Result<(), RestoreError> {
        let t = self.t()?;
        let rc = t
            .syscall(libc::SYS_madvise, [s, e - s, MADV_POPULATE_WRITE, 0, 0, 0])
            .ctx(|| format!("faulting in {s:#x}-{e:#x}"))?;
        if rc == 0 {
            return Ok(());
        }
        if rc != -(libc::EINVAL as i64) {
            return Err(RestoreError::Step {
                what: format!("faulting in {s:#x}-{e:#x} for writing"),
                source: InjectError::Syscall {
                    nr: libc::SYS_madvise,
                    pid: self.pid,
                    source: io::Error::from_raw_os_error(-rc as i32),
                },
            });
        }
        let mut byte = [0u8; 1];
        let mut v = s;
        while v < e {
            t.read_mem(v, &mut byte)
                .and_then(|()| t.write_mem(v, &byte))
                .ctx(|| format!("faulting in {v:#x} for writing"))?;
            v += PAGE_SIZE;
        }
        Ok(())
    }

    /// Gives every mapping its final protection, unpins the pages, sets RLIMIT_MEMLOCK and the
    /// credentials, unmaps the trampoline, loads the xstate and the registers (an interrupted
    /// system call set up to restart as the kernel would: `-ERESTART_RESTARTBLOCK`, whose
    /// restart state stayed at the source, becomes `-EINTR`) and lets the process run.
    /// Returns its pid. On error the process is killed and reaped.
    pub fn resume(mut self) -> Result<u32, RestoreError> {
        self.resume_inner()?;
        self.done = true;
        Ok(self.pid)
    }

    fn resume_inner(&mut self) -> Result<(), RestoreError> {
        let pid = self.pid;
        if self.outline.is_some() {
            return Err(RestoreError::Incomplete { pid });
        }
        for r in self.regions.clone() {
            if r.fillable {
                self.call(
                    libc::SYS_mprotect,
                    [r.start, r.end - r.start, prot_bits(r.prot), 0, 0, 0],
                    || format!("protecting {:#x}-{:#x}", r.start, r.end),
                )?;
            }
        }
        for (s, e) in std::mem::take(&mut self.locked) {
            self.call(libc::SYS_munlock, [s, e - s, 0, 0, 0, 0], || {
                format!("unpinning {s:#x}-{e:#x}")
            })?;
        }
        self.set_thp_disabled(self.thp_disabled)?;
        if let Some((cur, max)) = self.memlock {
            sys::set_rlimit(pid, libc::RLIMIT_MEMLOCK, cur, max)
                .ctx(|| format!("setting RLIMIT_MEMLOCK to {cur}/{max}"))?;
        }
        self.set_creds()?;
        let (ts, te) = self.trampoline;
        // The tracee stops at this call's exit, before returning into the unmapped page.
        self.call(libc::SYS_munmap, [ts, te - ts, 0, 0, 0, 0], || {
            "unmapping the trampoline".into()
        })?;
        let regs = self.final_regs()?;
        let xstate = std::mem::take(&mut self.xstate);
        let tracee = self.tracee.take().ok_or(RestoreError::Finished { pid })?;
        tracee
            .set_xstate(&xstate)
            .ctx(|| "loading the xstate".into())?;
        tracee
            .finish_with(&regs)
            .ctx(|| "loading the registers".into())?;
        sys::ptrace_resume(pid, Resume::Detach, 0).ctx(|| format!("detaching from {pid}"))
    }

    /// The image's registers, with a system call that was stopped at the source set up to
    /// restart as the kernel would ([`inject::restart_adjusted`]). A call the source already
    /// turned into `restart_syscall` (rip back on a `syscall` instruction, `rax` =
    /// `restart_syscall`) returns `-EINTR` instead: its restart state stayed in the source's
    /// kernel, and this process's is a stale copy of the agent thread's.
    fn final_regs(&mut self) -> Result<inject::Regs, RestoreError> {
        let mut regs = inject::restart_adjusted(&self.regs, false);
        if (regs.orig_rax as i64) >= 0 && regs.rax == libc::SYS_restart_syscall as u64 {
            let mut insn = [0u8; 2];
            let rip = regs.rip;
            self.t()?
                .read_mem(rip, &mut insn)
                .ctx(|| format!("reading the instruction at {rip:#x}"))?;
            if insn == inject::SYSCALL_INSN {
                regs.rax = (-libc::EINTR) as i64 as u64;
                regs.rip += 2;
                regs.orig_rax = u64::MAX;
            }
        }
        Ok(regs)
    }

    /// Supplementary groups, then group ids, then user ids (after which the process has the
    /// image's privileges, not the agent's).
    fn set_creds(&mut self) -> Result<(), RestoreError> {
        let groups: Vec<u8> = self.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
        let n = self.groups.len() as u64;
        let t = self.t()?;
        let p = t
            .write_scratch(&groups)
            .ctx(|| "writing the supplementary groups".into())?;
        self.call(libc::SYS_setgroups, [n, p, 0, 0, 0, 0], || {
            "setting the supplementary groups".into()
        })?;
        let [rg, eg, sg] = self.gid.map(u64::from);
        self.call(libc::SYS_setresgid, [rg, eg, sg, 0, 0, 0], || {
            format!("setting the group ids {rg}/{eg}/{sg}")
        })?;
        let [ru, eu, su] = self.uid.map(u64::from);
        self.call(libc::SYS_setresuid, [ru, eu, su, 0, 0, 0], || {
            format!("setting the user ids {ru}/{eu}/{su}")
        })?;
        if self.uid != [0; 3] || self.gid != [0; 3] {
            // Changing ids made the process non-dumpable; the source was not.
            self.call(
                libc::SYS_prctl,
                [libc::PR_SET_DUMPABLE as u64, 1, 0, 0, 0, 0],
                || "making the process dumpable again".into(),
            )?;
        }
        Ok(())
    }

    /// Kills the process and reaps it.
    pub fn abort(mut self) {
        self.abort_inner();
    }

    fn abort_inner(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        sys::kill(self.pid, libc::SIGKILL);
        // Its registers no longer matter; dropping the tracee after the kill costs nothing.
        drop(self.tracee.take());
        while let Ok(status) = sys::wait_status(self.pid) {
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                break;
            }
        }
    }
}

impl Drop for Skeleton {
    fn drop(&mut self) {
        self.abort_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(start: u64, end: u64, kind: MappingKind, path: Option<&str>) -> Mapping {
        Mapping {
            start,
            end,
            prot: 3,
            shared: false,
            offset: 0,
            kind,
            path: path.map(String::from),
        }
    }

    #[test]
    fn mappings_are_checked() {
        let ok = [
            mapping(0x1000, 0x3000, MappingKind::Anonymous, None),
            mapping(0x3000, 0x4000, MappingKind::File, Some("/bin/sh")),
        ];
        assert!(check_mappings(&ok).is_ok());
        let overlap = [
            mapping(0x1000, 0x3000, MappingKind::Anonymous, None),
            mapping(0x2000, 0x4000, MappingKind::Anonymous, None),
        ];
        assert!(check_mappings(&overlap).is_err());
        let unaligned = [mapping(0x1000, 0x1800, MappingKind::Anonymous, None)];
        assert!(check_mappings(&unaligned).is_err());
        let no_path = [mapping(0x1000, 0x2000, MappingKind::File, None)];
        assert!(matches!(
            check_mappings(&no_path),
            Err(RestoreError::BadImage(_))
        ));
    }
}
