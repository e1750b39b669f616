//! Running system calls inside a ptrace-stopped process ("injection"), the tool both sides of
//! a migration use: the source to read what only the process itself can ask the kernel
//! (e.g. `rt_sigaction`), the destination to build a process from inside.
//!
//! The classic technique: save the registers, point `rip` at a `syscall` instruction (bytes
//! `0f 05`) somewhere executable in the tracee, load `rax` and the arguments, run it with
//! PTRACE_SYSCALL to its entry and then its exit stop, read `rax`, and at the end put the
//! saved registers back. Memory is read and written through `/proc/PID/mem`, which a tracer
//! may write even where the mapping is read-only.
//!
//! A [`Tracee`] belongs to the thread that traces the process: ptrace answers only that
//! thread, so `Tracee` is neither `Send` nor `Sync`.

use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;

use crate::sys::{self, Resume};

/// The general registers (`struct user_regs_struct` of PTRACE_GETREGS).
pub type Regs = libc::user_regs_struct;

/// The `syscall` instruction.
pub const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

/// Signals that mean the injected code itself faulted.
const FAULTS: [i32; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
];

/// Bytes of a raw `struct user_regs_struct` (27 registers of 8 bytes).
pub const REGS_LEN: usize = 27 * 8;

/// `NT_X86_XSTATE`, the regset of the FPU/SSE/AVX state in XSAVE layout.
pub const NT_X86_XSTATE: u32 = 0x202;

/// `NT_PRFPREG`, the regset of the FPU/SSE state in FXSAVE layout, on CPUs without XSAVE.
pub const NT_PRFPREG: u32 = 2;

/// The size of an FXSAVE area: XSAVE areas are always larger.
pub const FXSAVE_LEN: usize = 512;

/// The kernel's internal "restart me" return values, which user space only ever sees in the
/// `rax` of a process stopped inside a system call.
pub const ERESTARTSYS: i64 = 512;
/// See [`ERESTARTSYS`].
pub const ERESTARTNOINTR: i64 = 513;
/// See [`ERESTARTSYS`].
pub const ERESTARTNOHAND: i64 = 514;
/// See [`ERESTARTSYS`].
pub const ERESTART_RESTARTBLOCK: i64 = 516;

/// Why an injection failed.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A ptrace request failed.
    #[error("ptrace {op} on process {pid}")]
    Ptrace {
        /// The request.
        op: &'static str,
        /// The tracee.
        pid: u32,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Waiting for the tracee failed.
    #[error("waiting for process {pid}")]
    Wait {
        /// The tracee.
        pid: u32,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The tracee ended while being driven.
    #[error("process {pid} ended while being driven by ptrace (wait status {status:#x})")]
    Gone {
        /// The tracee.
        pid: u32,
        /// The raw wait status.
        status: i32,
    },
    /// No `syscall` instruction at an executable address of the tracee.
    #[error("no syscall instruction found in an executable mapping of process {pid}")]
    NoSyscallInstruction {
        /// The tracee.
        pid: u32,
    },
    /// The address given as the `syscall` instruction does not hold one.
    #[error("process {pid} has no syscall instruction at {addr:#x}")]
    NotASyscall {
        /// The tracee.
        pid: u32,
        /// The address.
        addr: u64,
    },
    /// Reading or writing the tracee's memory failed.
    #[error("{op} {len} bytes at {addr:#x} in process {pid}")]
    Memory {
        /// "reading" or "writing".
        op: &'static str,
        /// The tracee.
        pid: u32,
        /// Where.
        addr: u64,
        /// How much.
        len: usize,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A file of the tracee's `/proc` directory could not be read.
    #[error("reading {path}")]
    Proc {
        /// The file.
        path: String,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// An injected system call returned an error.
    #[error("system call {nr} injected into process {pid} failed")]
    Syscall {
        /// The system call number.
        nr: i64,
        /// The tracee.
        pid: u32,
        /// The errno it returned.
        #[source]
        source: io::Error,
    },
    /// The tracee faulted instead of running the injected system call (e.g. the `syscall`
    /// instruction's page is gone).
    #[error(
        "process {pid} got signal {signal} at {rip:#x} instead of running an injected system call"
    )]
    Fault {
        /// The tracee.
        pid: u32,
        /// The signal (SIGSEGV, SIGBUS, ...).
        signal: i32,
        /// Where it was.
        rip: u64,
    },
    /// More scratch memory was asked for than the scratch area holds.
    #[error("{need} bytes asked of a {have}-byte scratch area in process {pid}")]
    ScratchTooSmall {
        /// The tracee.
        pid: u32,
        /// Bytes asked for.
        need: usize,
        /// Bytes available.
        have: usize,
    },
}

/// A scratch area in the tracee's memory, for the buffers that system calls point at.
#[derive(Debug, Clone, Copy)]
struct Scratch {
    addr: u64,
    len: usize,
    /// Mapped by [`Tracee::scratch`] (and unmapped by [`Tracee::finish`]), not given.
    owned: bool,
}

/// A process stopped under ptrace by the calling thread, into which system calls can be
/// injected. When done, [`Tracee::finish`] (or dropping it) puts the registers back; the
/// process stays stopped and traced, for the caller to detach or go on.
pub struct Tracee {
    pid: u32,
    original: Regs,
    syscall_at: u64,
    mem: File,
    /// Whether a system call was injected (the tracee then sits in a syscall-exit stop).
    injected: bool,
    scratch: Option<Scratch>,
    pending_signals: Vec<i32>,
    finished: bool,
    _tracer_thread: PhantomData<*const ()>,
}

impl std::fmt::Debug for Tracee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracee")
            .field("pid", &self.pid)
            .field("syscall_at", &format_args!("{:#x}", self.syscall_at))
            .field("injected", &self.injected)
            .field("pending_signals", &self.pending_signals)
            .finish_non_exhaustive()
    }
}

impl Tracee {
    /// Takes over `pid`, which the calling thread traces and which sits in a ptrace stop
    /// (a signal-delivery, group or event stop, or after a previous injection; not a
    /// syscall-entry stop). Sets the ptrace options to `options | PTRACE_O_TRACESYSGOOD`
    /// (PTRACE_SETOPTIONS replaces them all: pass those the caller wants kept), saves the
    /// registers and finds a `syscall` instruction: just before `rip` if the process stopped
    /// after one, else the first in its `[vdso]` or other executable mappings.
    pub fn new(pid: u32, options: u32) -> Result<Self, InjectError> {
        sys::ptrace_setoptions(pid, options | libc::PTRACE_O_TRACESYSGOOD as u32)
            .map_err(|source| ptrace_err("SETOPTIONS", pid, source))?;
        let original =
            sys::ptrace_getregs(pid).map_err(|source| ptrace_err("GETREGS", pid, source))?;
        let mem_path = format!("/proc/{pid}/mem");
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mem_path)
            .map_err(|source| InjectError::Proc {
                path: mem_path,
                source,
            })?;
        let mut tracee = Tracee {
            pid,
            original,
            syscall_at: 0,
            mem,
            injected: false,
            scratch: None,
            pending_signals: Vec::new(),
            finished: false,
            _tracer_thread: PhantomData,
        };
        tracee.syscall_at = tracee.find_syscall_insn()?;
        Ok(tracee)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The registers as they were when this `Tracee` took over.
    pub fn original_regs(&self) -> &Regs {
        &self.original
    }

    /// Where the injected system calls run.
    pub fn syscall_address(&self) -> u64 {
        self.syscall_at
    }

    /// Runs injected system calls from the `syscall` instruction at `addr` from now on
    /// (checked).
    pub fn set_syscall_address(&mut self, addr: u64) -> Result<(), InjectError> {
        let mut insn = [0u8; 2];
        self.read_mem(addr, &mut insn)?;
        if insn != SYSCALL_INSN {
            return Err(InjectError::NotASyscall {
                pid: self.pid,
                addr,
            });
        }
        self.syscall_at = addr;
        Ok(())
    }

    /// Signals that arrived while system calls were injected. They were held back; the
    /// caller decides whether to deliver them (e.g. with PTRACE_DETACH's signal).
    pub fn take_pending_signals(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.pending_signals)
    }

    /// Reads the tracee's memory at `addr` into `buf`.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), InjectError> {
        self.mem
            .read_exact_at(buf, addr)
            .map_err(|source| InjectError::Memory {
                op: "reading",
                pid: self.pid,
                addr,
                len: buf.len(),
                source,
            })
    }

    /// Writes `data` into the tracee's memory at `addr` (even into read-only mappings).
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<(), InjectError> {
        self.mem
            .write_all_at(data, addr)
            .map_err(|source| InjectError::Memory {
                op: "writing",
                pid: self.pid,
                addr,
                len: data.len(),
                source,
            })
    }

    /// Uses `len` bytes at `addr` (readable and writable in the tracee, and left alone by the
    /// caller's system calls) as the scratch area instead of mapping one.
    pub fn set_scratch(&mut self, addr: u64, len: usize) -> Result<(), InjectError> {
        self.release_scratch()?;
        self.scratch = Some(Scratch {
            addr,
            len,
            owned: false,
        });
        Ok(())
    }

    /// The address of a scratch area of at least `len` bytes in the tracee, for the buffers
    /// system calls point at. Unless [`Tracee::set_scratch`] gave one, the first call maps
    /// one (anonymous, read-write, where the kernel likes) that [`Tracee::finish`] unmaps
    /// again; a larger request later replaces it.
    pub fn scratch(&mut self, len: usize) -> Result<u64, InjectError> {
        if let Some(s) = self.scratch {
            if s.len >= len {
                return Ok(s.addr);
            }
            if !s.owned {
                return Err(InjectError::ScratchTooSmall {
                    pid: self.pid,
                    need: len,
                    have: s.len,
                });
            }
            self.release_scratch()?;
        }
        let size = len.max(1).next_multiple_of(4096);
        let addr = self.checked_syscall(
            libc::SYS_mmap,
            [
                0,
                size as u64,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        self.scratch = Some(Scratch {
            addr,
            len: size,
            owned: true,
        });
        Ok(addr)
    }

    /// Writes `data` at the start of the scratch area; returns its address in the tracee.
    pub fn write_scratch(&mut self, data: &[u8]) -> Result<u64, InjectError> {
        let addr = self.scratch(data.len())?;
        self.write_mem(addr, data)?;
        Ok(addr)
    }

    /// Writes `s` and a NUL at the start of the scratch area (for a path argument); returns
    /// its address in the tracee.
    pub fn write_scratch_cstr(&mut self, s: &str) -> Result<u64, InjectError> {
        let mut bytes = Vec::with_capacity(s.len() + 1);
        bytes.extend_from_slice(s.as_bytes());
        bytes.push(0);
        self.write_scratch(&bytes)
    }

    /// Runs system call `nr` with `args` in the tracee; returns what the kernel put in `rax`
    /// (a negative errno on failure). Signals that arrive meanwhile are held back (see
    /// [`Tracee::take_pending_signals`]).
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, InjectError> {
        let pid = self.pid;
        let mut regs = self.original;
        regs.rax = nr as u64;
        // Not inside a system call: no restart handling may touch these registers.
        regs.orig_rax = u64::MAX;
        regs.rip = self.syscall_at;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        // No single-stepping trap in the way.
        regs.eflags &= !0x100;
        sys::ptrace_setregs(pid, &regs).map_err(|source| ptrace_err("SETREGS", pid, source))?;
        self.injected = true;
        self.run_to_syscall_stop()?; // entry
        self.run_to_syscall_stop()?; // exit
        let after =
            sys::ptrace_getregs(pid).map_err(|source| ptrace_err("GETREGS", pid, source))?;
        Ok(after.rax as i64)
    }

    /// [`Tracee::syscall`], with a negative errno turned into [`InjectError::Syscall`].
    pub fn checked_syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<u64, InjectError> {
        let rc = self.syscall(nr, args)?;
        if (-4095..0).contains(&rc) {
            return Err(InjectError::Syscall {
                nr,
                pid: self.pid,
                source: io::Error::from_raw_os_error(-rc as i32),
            });
        }
        Ok(rc as u64)
    }

    /// Unmaps a scratch area it mapped, and puts the original registers back (if the process
    /// had stopped inside an interrupted system call, set up to restart it as the kernel
    /// would have, see [`restart_adjusted`]). The process stays stopped and traced.
    pub fn finish(mut self) -> Result<(), InjectError> {
        let regs = if self.injected {
            restart_adjusted(&self.original, true)
        } else {
            self.original
        };
        self.finish_inner(&regs)
    }

    /// Like [`Tracee::finish`], but leaves the process with `regs` (taken as they are).
    pub fn finish_with(mut self, regs: &Regs) -> Result<(), InjectError> {
        self.finish_inner(regs)
    }

    fn finish_inner(&mut self, regs: &Regs) -> Result<(), InjectError> {
        self.finished = true;
        self.release_scratch()?;
        sys::ptrace_setregs(self.pid, regs)
            .map_err(|source| ptrace_err("SETREGS", self.pid, source))
    }

    /// Reads the xstate (FPU/SSE/AVX, NT_X86_XSTATE) area; on a CPU without XSAVE, the
    /// 512-byte FXSAVE area (NT_PRFPREG), as the source's dump does.
    pub fn xstate(&self) -> Result<Vec<u8>, InjectError> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = match sys::ptrace_getregset(self.pid, NT_X86_XSTATE, &mut buf) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                sys::ptrace_getregset(self.pid, NT_PRFPREG, &mut buf)
                    .map_err(|source| ptrace_err("GETREGSET NT_PRFPREG", self.pid, source))?
            }
            other => {
                other.map_err(|source| ptrace_err("GETREGSET NT_X86_XSTATE", self.pid, source))?
            }
        };
        buf.truncate(n);
        Ok(buf)
    }

    /// Sets the xstate area (which must have the size this kernel and CPU use): an FXSAVE
    /// area ([`FXSAVE_LEN`] bytes) through NT_PRFPREG, anything else through NT_X86_XSTATE.
    pub fn set_xstate(&self, xstate: &[u8]) -> Result<(), InjectError> {
        if xstate.len() == FXSAVE_LEN {
            return sys::ptrace_setregset(self.pid, NT_PRFPREG, xstate)
                .map_err(|source| ptrace_err("SETREGSET NT_PRFPREG", self.pid, source));
        }
        sys::ptrace_setregset(self.pid, NT_X86_XSTATE, xstate)
            .map_err(|source| ptrace_err("SETREGSET NT_X86_XSTATE", self.pid, source))
    }

    fn release_scratch(&mut self) -> Result<(), InjectError> {
        if let Some(s) = self.scratch.take() {
            if s.owned {
                self.checked_syscall(libc::SYS_munmap, [s.addr, s.len as u64, 0, 0, 0, 0])?;
            }
        }
        Ok(())
    }

    /// PTRACE_SYSCALL until the next syscall stop, holding back signals on the way.
    fn run_to_syscall_stop(&mut self) -> Result<(), InjectError> {
        let pid = self.pid;
        let mut stops = 0u32;
        loop {
            sys::ptrace_resume(pid, Resume::Syscall, 0)
                .map_err(|source| ptrace_err("SYSCALL", pid, source))?;
            let status =
                sys::wait_status(pid).map_err(|source| InjectError::Wait { pid, source })?;
            if !libc::WIFSTOPPED(status) {
                return Err(InjectError::Gone { pid, status });
            }
            let sig = libc::WSTOPSIG(status);
            if sig == libc::SIGTRAP | 0x80 {
                return Ok(());
            }
            // An event stop (status >> 16 != 0, e.g. a group stop under PTRACE_SEIZE) just
            // goes on; a signal-delivery stop's signal is held back, unless it is a fault of
            // the injected code itself, which would only come again.
            if status >> 16 == 0 {
                if FAULTS.contains(&sig) {
                    let rip = sys::ptrace_getregs(pid).map(|r| r.rip).unwrap_or(0);
                    return Err(InjectError::Fault {
                        pid,
                        signal: sig,
                        rip,
                    });
                }
                self.pending_signals.push(sig);
            }
            stops += 1;
            if stops > 10_000 {
                return Err(InjectError::Gone { pid, status });
            }
        }
    }

    fn find_syscall_insn(&self) -> Result<u64, InjectError> {
        let rip = self.original.rip;
        let mut insn = [0u8; 2];
        if rip >= 2 && self.read_mem(rip - 2, &mut insn).is_ok() && insn == SYSCALL_INSN {
            return Ok(rip - 2);
        }
        let maps_path = format!("/proc/{}/maps", self.pid);
        let maps = std::fs::read_to_string(&maps_path).map_err(|source| InjectError::Proc {
            path: maps_path,
            source,
        })?;
        let mut candidates: Vec<(u64, u64, bool)> = Vec::new();
        for line in maps.lines() {
            let mut fields = line.split_whitespace();
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some((start, end)) = parse_range(range) else {
                continue;
            };
            if perms.as_bytes().get(2) != Some(&b'x') || start >= 1 << 63 {
                continue;
            }
            let vdso = line.ends_with("[vdso]");
            candidates.push((start, end, vdso));
        }
        candidates.sort_by_key(|&(_, _, vdso)| !vdso);
        let mut buf = vec![0u8; 1 << 20];
        for (start, end, _) in candidates {
            let mut at = start;
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                if self.read_mem(at, &mut buf[..n]).is_err() {
                    break;
                }
                if let Some(i) = buf[..n].windows(2).position(|w| w == SYSCALL_INSN) {
                    return Ok(at + i as u64);
                }
                // Keep one byte of overlap so an instruction across the boundary is found.
                at += n.saturating_sub(1).max(1) as u64;
            }
        }
        Err(InjectError::NoSyscallInstruction { pid: self.pid })
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if !self.finished {
            let regs = if self.injected {
                restart_adjusted(&self.original, true)
            } else {
                self.original
            };
            let _ = self.finish_inner(&regs);
        }
    }
}

fn ptrace_err(op: &'static str, pid: u32, source: io::Error) -> InjectError {
    InjectError::Ptrace { op, pid, source }
}

/// `start-end` of a maps line, hexadecimal.
pub(crate) fn parse_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

/// `regs` as they must be to let the process go on without passing through the kernel's
/// signal-return path: if it stopped inside a system call that the kernel was going to
/// restart (`orig_rax >= 0`, `rax` one of the `-ERESTART*` values), the call is set up to
/// run again (`rax = orig_rax`, `rip -= 2`); `-ERESTART_RESTARTBLOCK` becomes
/// `restart_syscall` if `restart_block_valid` (the same kernel task still holds the
/// restart state), else `-EINTR`, which is what `restart_syscall` would return without it.
/// `orig_rax` then becomes -1 so the kernel does not adjust the registers a second time;
/// other registers are returned unchanged.
pub fn restart_adjusted(regs: &Regs, restart_block_valid: bool) -> Regs {
    let mut r = *regs;
    if (r.orig_rax as i64) < 0 {
        return r;
    }
    match -(r.rax as i64) {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = r.orig_rax;
            r.rip = r.rip.wrapping_sub(2);
        }
        ERESTART_RESTARTBLOCK if restart_block_valid => {
            r.rax = libc::SYS_restart_syscall as u64;
            r.rip = r.rip.wrapping_sub(2);
        }
        ERESTART_RESTARTBLOCK => r.rax = (-libc::EINTR) as i64 as u64,
        _ => return r,
    }
    r.orig_rax = u64::MAX;
    r
}

macro_rules! regs_fields {
    ($m:ident) => {
        $m!(
            r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip,
            cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
        )
    };
}

/// The registers from the raw `struct user_regs_struct` bytes of an image ([`REGS_LEN`]
/// bytes, little-endian); `None` for another length.
pub fn regs_from_bytes(bytes: &[u8]) -> Option<Regs> {
    if bytes.len() != REGS_LEN {
        return None;
    }
    let mut words = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")));
    macro_rules! build {
        ($($f:ident),*) => {
            Regs { $($f: words.next()?),* }
        };
    }
    Some(regs_fields!(build))
}

/// The raw `struct user_regs_struct` bytes of `regs` ([`REGS_LEN`] bytes).
pub fn regs_to_bytes(regs: &Regs) -> Vec<u8> {
    let mut out = Vec::with_capacity(REGS_LEN);
    macro_rules! push {
        ($($f:ident),*) => {
            $(out.extend_from_slice(&regs.$f.to_le_bytes());)*
        };
    }
    regs_fields!(push);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero_regs() -> Regs {
        regs_from_bytes(&[0u8; REGS_LEN]).unwrap()
    }

    #[test]
    fn regs_round_trip_in_field_order() {
        let bytes: Vec<u8> = (0..REGS_LEN as u32).map(|i| i as u8).collect();
        let regs = regs_from_bytes(&bytes).unwrap();
        assert_eq!(
            regs.r15,
            u64::from_le_bytes(bytes[0..8].try_into().unwrap())
        );
        assert_eq!(
            regs.rip,
            u64::from_le_bytes(bytes[16 * 8..17 * 8].try_into().unwrap())
        );
        assert_eq!(regs_to_bytes(&regs), bytes);
        assert!(regs_from_bytes(&bytes[1..]).is_none());
    }

    #[test]
    fn restart_adjustment_follows_the_kernel() {
        let mut r = zero_regs();
        r.orig_rax = 230; // clock_nanosleep
        r.rip = 0x1002;
        for code in [ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND] {
            r.rax = (-code) as u64;
            let a = restart_adjusted(&r, false);
            assert_eq!((a.rax, a.rip, a.orig_rax as i64), (230, 0x1000, -1));
        }
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        let a = restart_adjusted(&r, true);
        assert_eq!((a.rax, a.rip), (libc::SYS_restart_syscall as u64, 0x1000));
        let a = restart_adjusted(&r, false);
        assert_eq!((a.rax as i64, a.rip), (-(libc::EINTR as i64), 0x1002));
        // A finished call, or no call at all, is left alone.
        r.rax = 0;
        let a = restart_adjusted(&r, false);
        assert_eq!((a.rip, a.orig_rax), (0x1002, 230));
        r.orig_rax = u64::MAX;
        r.rax = (-ERESTARTSYS) as u64;
        let a = restart_adjusted(&r, false);
        assert_eq!((a.rax, a.rip), (r.rax, 0x1002));
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
            .unwrap_or(false)
    }

    /// A stopped, traced copy of this test process, killed and reaped on drop.
    struct Child(u32);

    impl Child {
        fn spawn() -> Child {
            let pid = sys::spawn_traced_stopped(None).unwrap();
            let status = sys::wait_status(pid).unwrap();
            assert!(libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGSTOP);
            Child(pid)
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            sys::kill(self.0, libc::SIGKILL);
            let _ = sys::wait_status(self.0);
        }
    }

    #[test]
    fn injects_system_calls_and_puts_the_registers_back() {
        if !is_root() {
            eprintln!("skipped: needs root for ptrace of a child with a changed layout");
            return;
        }
        let child = Child::spawn();
        let mut t = Tracee::new(child.0, libc::PTRACE_O_EXITKILL as u32).unwrap();
        let before = *t.original_regs();
        assert_eq!(t.syscall(libc::SYS_getpid, [0; 6]).unwrap(), child.0 as i64);
        // A path through scratch memory: the child's cwd is ours.
        let path = t.write_scratch_cstr("/proc/self/status").unwrap();
        let fd = t
            .checked_syscall(
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, path, libc::O_RDONLY as u64, 0, 0, 0],
            )
            .unwrap();
        assert!(fd < 1024);
        t.checked_syscall(libc::SYS_close, [fd, 0, 0, 0, 0, 0])
            .unwrap();
        let missing = t.write_scratch_cstr("/nonexistent/ferry").unwrap();
        match t.checked_syscall(
            libc::SYS_openat,
            [
                libc::AT_FDCWD as u64,
                missing,
                libc::O_RDONLY as u64,
                0,
                0,
                0,
            ],
        ) {
            Err(InjectError::Syscall { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT))
            }
            other => panic!("expected ENOENT, got {other:?}"),
        }
        // Memory written through /proc/PID/mem reads back.
        let scratch = t.scratch(16).unwrap();
        t.write_mem(scratch, b"ferry").unwrap();
        let mut back = [0u8; 5];
        t.read_mem(scratch, &mut back).unwrap();
        assert_eq!(&back, b"ferry");
        let x = t.xstate().unwrap();
        assert!(x.len() >= 512);
        t.set_xstate(&x).unwrap();
        t.finish().unwrap();
        let after = sys::ptrace_getregs(child.0).unwrap();
        assert_eq!(regs_to_bytes(&after), regs_to_bytes(&before));
        // The scratch mapping is gone again.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.0)).unwrap();
        assert!(!maps.contains(&format!("{scratch:x}-")));
    }

    #[test]
    fn parses_maps_ranges() {
        assert_eq!(parse_range("1000-2000"), Some((0x1000, 0x2000)));
        assert_eq!(parse_range("zz-2000"), None);
    }
}
