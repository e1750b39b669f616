//! The source side of a process migration: refuse what cannot move, freeze the process, read
//! its [`ProcessImage`] and the guest-physical frames of its present pages.
//!
//! [`freeze`] first checks everything it can from `/proc` without touching the process
//! (openMosix's "cantmove"): each reason is a [`CantMove`]. Then it seizes the process with
//! ptrace, stops it, reads it, and checks again what may have changed in between (a new
//! thread, a new socket); a refusal then lets the process go on unchanged.
//!
//! The image's handler addresses, and the exact program break, exist only inside the process:
//! `rt_sigaction(sig, NULL, &old)` and `brk(0)` are run inside the stopped process on a
//! `syscall` instruction found in its vDSO (or its other executable mappings), in a page
//! mapped for the purpose and unmapped after. Its registers are put back after.
//!
//! ptrace binds the tracee to the *thread* that seized it, so a [`Frozen`] is not `Send`:
//! recheck, thaw or kill it on the thread that froze it. Dropping it thaws the process.
//!
//! Parsing of `/proc` files lives in pure functions (`parse_*`), tested on real samples.

use std::fs::{self, File};
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::clocks;
use super::image::{
    Clocks, Creds, FileKind, Mapping, MappingKind, MmLayout, OpenFile, PageRef, ProcessImage,
    Rlimit, SigAction, PAGE_SIZE, USER_REGS_LEN,
};
use crate::procfs;
use crate::sys::{self, UserRegs, WaitStatus};

/// `RLIM_NLIMITS`: the resource limits Linux has (0 = `RLIMIT_CPU` ... 15 = `RLIMIT_RTTIME`).
pub const RLIMIT_COUNT: u32 = 16;

/// How long the process may take to stop, or to run one injected system call.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How many pagemap entries are read at once.
const PAGEMAP_CHUNK: u64 = 64 * 1024;

/// Pagemap: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap: a file page or shared anonymous memory.
const PM_FILE: u64 = 1 << 61;
/// Pagemap: the frame number bits.
const PM_PFN: u64 = (1 << 55) - 1;

/// `PTRACE_EVENT_STOP`: an interrupt or group stop of a seized tracee.
const PTRACE_EVENT_STOP: i32 = 128;

// Register indices in `struct user_regs_struct`.
const RAX: usize = 10;
const RDX: usize = 12;
const RSI: usize = 13;
const RDI: usize = 14;
const ORIG_RAX: usize = 15;
const RIP: usize = 16;
const R10: usize = 7;
const R8: usize = 9;
const R9: usize = 8;

// x86-64 system call numbers the dump runs inside the process.
const SYS_MMAP: u64 = 9;
const SYS_MUNMAP: u64 = 11;
const SYS_BRK: u64 = 12;
const SYS_RT_SIGACTION: u64 = 13;
const SYS_RESTART_SYSCALL: u64 = 219;
const SYS_MUNLOCK: u64 = 150;
const SYS_PRCTL: u64 = 157;
const SYS_MLOCK2: u64 = 325;
/// `MLOCK_ONFAULT`: lock the pages present now and those faulted in later, populate nothing.
const MLOCK_ONFAULT: u64 = 1;

// Kernel-internal restart codes a stopped system call may hold in rax.
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

/// Why a process cannot move. Each says so in words a user understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CantMove {
    /// pid 1.
    #[error("pid 1 (init) cannot move")]
    Init,
    /// A kernel thread.
    #[error("pid {pid} ({comm}) is a kernel thread, which cannot move")]
    KernelThread {
        /// Its pid.
        pid: u32,
        /// Its name.
        comm: String,
    },
    /// The agent itself, or a process it runs under.
    #[error("pid {pid} ({comm}) is the ferry agent or one of its ancestors, which cannot move")]
    Agent {
        /// Its pid.
        pid: u32,
        /// Its name.
        comm: String,
    },
    /// A zombie or dead process.
    #[error("pid {pid} has already exited (state {state})")]
    Exited {
        /// Its pid.
        pid: u32,
        /// The state letter of `/proc/PID/stat`.
        state: char,
    },
    /// More than one thread.
    #[error("multi-threaded processes cannot move yet ({threads} threads)")]
    Threads {
        /// How many.
        threads: u32,
    },
    /// Traced by a debugger (or another migration).
    #[error("pid {pid} is being traced by pid {tracer} (a debugger?); detach it first")]
    Traced {
        /// The traced pid.
        pid: u32,
        /// The tracer's pid.
        tracer: u32,
    },
    /// A writable shared mapping, SysV shared memory, a shared memfd or shared anonymous
    /// memory: another process may see the same pages.
    #[error(
        "it shares memory with other processes ({what} at {start:#x}-{end:#x}), which cannot \
         move yet"
    )]
    SharedMemory {
        /// The mapping's start.
        start: u64,
        /// The mapping's end.
        end: u64,
        /// What is shared, e.g. `SysV shared memory`, `a writable shared mapping of /tmp/x`.
        what: String,
    },
    /// A device mapped into memory (other than `/dev/zero`).
    #[error("it maps the device {path} into memory (at {start:#x}), which cannot move")]
    DeviceMapping {
        /// The mapping's start.
        start: u64,
        /// The device.
        path: String,
    },
    /// A mapping of a file that no longer has a name (so the destination cannot open it).
    #[error("it maps the deleted file {path} (at {start:#x}), which the destination cannot open")]
    DeletedMapping {
        /// The mapping's start.
        start: u64,
        /// The path as maps shows it, with ` (deleted)`.
        path: String,
    },
    /// A special kernel mapping the destination cannot recreate.
    #[error("it has the special kernel mapping {name} (at {start:#x}), which cannot move")]
    SpecialMapping {
        /// The mapping's start.
        start: u64,
        /// Its name, e.g. `[uprobes]`.
        name: String,
    },
    /// An open socket.
    #[error("fd {fd} is a socket ({path}); processes with open sockets cannot move yet")]
    Socket {
        /// The descriptor.
        fd: u32,
        /// `socket:[inode]`.
        path: String,
    },
    /// A terminal on an fd other than 0-2.
    #[error(
        "fd {fd} is the terminal {path}; a terminal can only move on stdin, stdout or stderr \
         (it becomes /dev/null at the destination)"
    )]
    Tty {
        /// The descriptor.
        fd: u32,
        /// The terminal.
        path: String,
    },
    /// A pipe or FIFO on an fd other than 0-2.
    #[error(
        "fd {fd} is a pipe ({path}); a pipe can only move on stdin, stdout or stderr (it \
         becomes /dev/null at the destination)"
    )]
    Pipe {
        /// The descriptor.
        fd: u32,
        /// `pipe:[inode]` or the FIFO's path.
        path: String,
    },
    /// An open file that no longer has a name.
    #[error("fd {fd} is the deleted file {path}, which the destination cannot open")]
    DeletedFile {
        /// The descriptor.
        fd: u32,
        /// The path with ` (deleted)`.
        path: String,
    },
    /// A device other than `/dev/null`, `/dev/zero`, `/dev/full`, `/dev/random`,
    /// `/dev/urandom`.
    #[error("fd {fd} is the device {path}, which cannot move")]
    Device {
        /// The descriptor.
        fd: u32,
        /// The device.
        path: String,
    },
    /// Anything else on an fd: eventfd, epoll, signalfd, timerfd, inotify...
    #[error("fd {fd} is {path}, a kind of file that cannot move yet")]
    UnsupportedFile {
        /// The descriptor.
        fd: u32,
        /// What `readlink /proc/PID/fd/N` says, e.g. `anon_inode:[eventpoll]`.
        path: String,
    },
}

/// Errors of [`freeze`] and of a [`Frozen`] process's methods.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The process cannot move; it was left untouched (or let go unchanged).
    #[error("pid {pid} cannot move: {reason}")]
    CantMove {
        /// The process.
        pid: u32,
        /// Why.
        reason: CantMove,
    },
    /// No such process (or it exited meanwhile).
    #[error("no process with pid {0} (it may have exited)")]
    NoProcess(u32),
    /// Reading `/proc` failed.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// What was read.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A `/proc` file did not hold what it should.
    #[error("cannot make sense of {}: {what}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: &'static str,
    },
    /// A ptrace (or other system) call on the process failed.
    #[error("{op} on pid {pid} failed: {source}")]
    Sys {
        /// What was done, e.g. `PTRACE_SEIZE`.
        op: &'static str,
        /// The process.
        pid: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The process did not stop (or an injected system call did not finish) in time.
    #[error("pid {pid} did not {what} within {STOP_TIMEOUT:?}")]
    Timeout {
        /// The process.
        pid: u32,
        /// What it did not do, e.g. `stop`.
        what: &'static str,
    },
    /// A system call run inside the process failed.
    #[error("{call} inside pid {pid} failed: {source}")]
    Injected {
        /// The call, e.g. `rt_sigaction(2)`.
        call: String,
        /// The process.
        pid: u32,
        /// The error it returned.
        #[source]
        source: io::Error,
    },
    /// No `syscall` instruction in the process's executable memory to run calls with.
    #[error("pid {0} has no syscall instruction in its executable mappings to run calls with")]
    NoSyscallInsn(u32),
}

impl DumpError {
    fn cant(pid: u32, reason: CantMove) -> Self {
        DumpError::CantMove { pid, reason }
    }
}

/// A process stopped under ptrace by [`freeze`], with its image and present pages.
#[derive(Debug)]
pub struct Frozen {
    image: ProcessImage,
    pages: Vec<PageRef>,
    /// The registers to set before letting it go, if the injected calls changed them.
    resume_regs: Option<UserRegs>,
    /// Signals that arrived while it was being stopped: delivered again when it goes on.
    pending_signals: Vec<i32>,
    /// Set once thawed or killed, so Drop does nothing more.
    released: bool,
    /// Whether the agent is its parent (its exit is then the agent's command waiter's).
    agent_child: bool,
    /// What [`Injector::hold_frames`] changed, undone when it thaws.
    held: Option<Held>,
    /// ptrace ties the tracee to the seizing thread: not `Send`.
    _thread_bound: PhantomData<*const ()>,
}

impl Frozen {
    /// The process image.
    pub fn image(&self) -> &ProcessImage {
        &self.image
    }

    /// Every present page at freeze time, in mapping order, with whether it is anonymous.
    pub fn pages(&self) -> &[PageRef] {
        &self.pages
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.image.pid
    }

    /// Re-reads pagemap: the pages whose frame changed since the freeze (the guest kernel
    /// moved them: compaction, THP, swap and back) or that became present, so the caller can
    /// send them again. Swapped-out pages are read back in first.
    pub fn recheck(&self) -> Result<Vec<PageRef>, DumpError> {
        let now = present_pages(self.image.pid, &self.image.mappings)?;
        let mut old = self.pages.iter().peekable();
        let mut moved = Vec::new();
        // Both lists are sorted by address.
        for page in now {
            while old.peek().is_some_and(|o| o.vaddr < page.vaddr) {
                old.next();
            }
            match old.peek() {
                Some(o) if o.vaddr == page.vaddr && o.pfn == page.pfn => {}
                _ => moved.push(page),
            }
        }
        Ok(moved)
    }

    /// Lets the process go on unchanged: registers put back, pending signals delivered,
    /// ptrace detached.
    pub fn thaw(mut self) -> Result<(), DumpError> {
        self.released = true;
        let pid = self.image.pid;
        if let Some(held) = self.held.take() {
            held.undo(pid);
        }
        let resume_regs = self.resume_regs.take();
        let signals = std::mem::take(&mut self.pending_signals);
        let_go(pid, resume_regs.as_ref(), &signals)
    }

    /// Kills the process (SIGKILL) and waits for it to die: collected as its tracer, or, for
    /// the agent's own child, left to the agent's command waiter.
    pub fn kill(mut self) -> Result<(), DumpError> {
        self.released = true;
        let pid = self.image.pid;
        sys::kill(pid, libc::SIGKILL);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if self.agent_child {
                let state = fs::read(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|t| procfs::parse_stat(&t))
                    .map(|s| s.state);
                if matches!(state, None | Some(b'Z' | b'X' | b'x')) {
                    return Ok(());
                }
            } else {
                match sys::waitpid_nohang(pid) {
                    Ok(WaitStatus::Exited(_) | WaitStatus::Signaled(_)) => return Ok(()),
                    // Collected by its parent (the agent's own command waiter) or gone.
                    Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return Ok(()),
                    Err(source) => {
                        return Err(DumpError::Sys {
                            op: "waitpid",
                            pid,
                            source,
                        })
                    }
                    Ok(_) => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(DumpError::Timeout { pid, what: "die" });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.released {
            self.released = true;
            if let Some(held) = self.held.take() {
                held.undo(self.image.pid);
            }
            let signals = std::mem::take(&mut self.pending_signals);
            if let Err(e) = let_go(self.image.pid, self.resume_regs.as_ref(), &signals) {
                crate::server::log(format_args!("cannot thaw pid {}: {e}", self.image.pid));
            }
        }
    }
}

/// Puts `regs` back (if any), detaches, and delivers `signals`.
fn let_go(pid: u32, regs: Option<&UserRegs>, signals: &[i32]) -> Result<(), DumpError> {
    let sys_err = |op| move |source| DumpError::Sys { op, pid, source };
    if let Some(regs) = regs {
        sys::ptrace_set_regs(pid, regs).map_err(sys_err("PTRACE_SETREGS"))?;
    }
    let first = signals.first().copied().unwrap_or(0);
    sys::ptrace_detach(pid, first).map_err(sys_err("PTRACE_DETACH"))?;
    for &s in signals.iter().skip(1) {
        sys::kill(pid, s);
    }
    Ok(())
}

/// Freezes `pid`: checks that it can move, stops it under ptrace, and reads its image and the
/// frames of its present pages. On any error the process goes on unchanged.
pub fn freeze(pid: u32) -> Result<Frozen, DumpError> {
    // Everything that can be refused is checked before the process is touched...
    let (facts, _, _) = check_running(pid)?;

    sys::ptrace_seize(pid).map_err(|source| match source.raw_os_error() {
        Some(libc::ESRCH) => DumpError::NoProcess(pid),
        _ => DumpError::Sys {
            op: "PTRACE_SEIZE",
            pid,
            source,
        },
    })?;
    let mut frozen = Frozen {
        image: ProcessImage {
            pid,
            comm: facts.comm.clone(),
            cmdline: Vec::new(),
            cwd: String::new(),
            creds: Creds::default(),
            regs: Vec::new(),
            xstate: Vec::new(),
            sigmask: 0,
            sigactions: Vec::new(),
            rlimits: Vec::new(),
            mm: MmLayout::default(),
            mappings: Vec::new(),
            files: Vec::new(),
            thp_disabled: false,
            clocks: Clocks::default(),
        },
        pages: Vec::new(),
        resume_regs: None,
        pending_signals: Vec::new(),
        released: false,
        agent_child: facts.ppid == std::process::id(),
        held: None,
        _thread_bound: PhantomData,
    };
    // From here on, dropping `frozen` on an error lets the process go.
    if let Err(source) = sys::ptrace_interrupt(pid) {
        return Err(DumpError::Sys {
            op: "PTRACE_INTERRUPT",
            pid,
            source,
        });
    }
    frozen.pending_signals = wait_event_stop(pid)?;
    read_image(&mut frozen)?;
    Ok(frozen)
}

/// Reads everything of the stopped process into `frozen`, checking again what may have
/// changed since the first checks.
fn read_image(frozen: &mut Frozen) -> Result<(), DumpError> {
    let pid = frozen.image.pid;
    let sys_err = |op| move |source| DumpError::Sys { op, pid, source };
    // ...and again now that it is stopped, for what changed in between.
    let facts = read_facts(pid)?;
    check_process(pid, &facts, &agent_lineage(), true)?;
    let maps = read_maps(pid)?;
    check_maps(&maps).map_err(|r| DumpError::cant(pid, r))?;
    let files = read_files(pid)?;
    check_files(&files).map_err(|r| DumpError::cant(pid, r))?;

    let regs = sys::ptrace_get_regs(pid).map_err(sys_err("PTRACE_GETREGS"))?;
    let xstate = sys::ptrace_get_xstate(pid).map_err(sys_err("PTRACE_GETREGSET"))?;
    let sigmask = sys::ptrace_get_sigmask(pid).map_err(sys_err("PTRACE_GETSIGMASK"))?;
    // The clocks as it stopped, for the destination to carry on from.
    let parts = read_parts(pid)?;

    // What only the process itself can tell: its handlers and its exact break.
    let mut injector = Injector::new(pid, regs, &maps)?;
    let result = injector.read_inside(facts.caught | facts.ignored);
    if result.is_ok() {
        frozen.held = Some(injector.hold_frames(&maps, &facts));
    }
    // Registers as they must be for it to go on (a stopped system call restarted).
    frozen.resume_regs = injector.touched.then(|| {
        let mut r = restart_syscall(&regs);
        r[ORIG_RAX] = u64::MAX;
        r
    });
    let (sigactions, brk) = result?;
    let Parts {
        clocks,
        rlimits,
        mut mm,
        cwd,
        cmdline,
    } = parts;
    mm.brk = brk;

    let mappings: Vec<Mapping> = maps.iter().map(|m| m.mapping.clone()).collect();
    frozen.pages = present_pages(pid, &mappings)?;
    frozen.image = ProcessImage {
        pid,
        comm: facts.comm,
        cmdline,
        cwd,
        creds: facts.creds,
        regs: restart_syscall(&regs)
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect(),
        xstate,
        sigmask,
        sigactions,
        rlimits,
        mm,
        mappings,
        files: files.into_iter().map(|f| f.file).collect(),
        thp_disabled: facts.thp_disabled,
        clocks,
    };
    debug_assert_eq!(frozen.image.regs.len(), USER_REGS_LEN);
    Ok(())
}

/// What an image holds that `/proc` tells without stopping the process.
struct Parts {
    clocks: Clocks,
    rlimits: Vec<Rlimit>,
    mm: MmLayout,
    cwd: String,
    cmdline: Vec<String>,
}

/// Reads the [`Parts`] of process `pid` (stopped or running: a running one's are a snapshot).
fn read_parts(pid: u32) -> Result<Parts, DumpError> {
    let clocks = clocks::of_process(pid).map_err(|source| DumpError::Read {
        path: PathBuf::from(format!("/proc/{pid}/timens_offsets")),
        source,
    })?;
    let mut rlimits = Vec::new();
    for resource in 0..RLIMIT_COUNT {
        match sys::prlimit_get(pid, resource) {
            Ok((cur, max)) => rlimits.push(Rlimit { resource, cur, max }),
            // A limit this kernel does not have.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => {
                return Err(DumpError::Sys {
                    op: "prlimit",
                    pid,
                    source,
                })
            }
        }
    }
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let stat_path = proc.join("stat");
    let stat = read_file(&stat_path)?;
    let mut mm = parse_stat_mm(&stat).ok_or(DumpError::Parse {
        path: stat_path,
        what: "not a stat line with 52 fields",
    })?;
    let auxv_path = proc.join("auxv");
    mm.auxv = parse_auxv(&read_file(&auxv_path)?).ok_or(DumpError::Parse {
        path: auxv_path,
        what: "not a list of 8-byte pairs",
    })?;
    let cwd = fs::read_link(proc.join("cwd")).map_err(|source| DumpError::Read {
        path: proc.join("cwd"),
        source,
    })?;
    let cmdline = procfs::parse_cmdline(&read_file(&proc.join("cmdline"))?, usize::MAX);
    Ok(Parts {
        clocks,
        rlimits,
        mm,
        cwd: cwd.to_string_lossy().into_owned(),
        cmdline,
    })
}

/// The registers with a stopped system call's restart applied, as the kernel would on its way
/// back to user space: rip back on the `syscall` instruction and rax the call again
/// (`restart_syscall` for a call that keeps its own restart state). Unchanged when not
/// stopped in a system call.
pub fn restart_syscall(regs: &UserRegs) -> UserRegs {
    let mut r = *regs;
    if (r[ORIG_RAX] as i64) < 0 {
        return r;
    }
    match r[RAX] as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r[RAX] = r[ORIG_RAX];
            r[RIP] = r[RIP].wrapping_sub(2);
        }
        ERESTART_RESTARTBLOCK => {
            r[RAX] = SYS_RESTART_SYSCALL;
            r[RIP] = r[RIP].wrapping_sub(2);
        }
        _ => {}
    }
    r
}

/// Waits for the interrupt stop after PTRACE_INTERRUPT. Signal-delivery stops on the way are
/// let through without their signal, which is returned to be delivered when the process goes
/// on.
fn wait_event_stop(pid: u32) -> Result<Vec<i32>, DumpError> {
    let mut signals = Vec::new();
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        wait_traced(pid, deadline, "stop")?;
        let (signo, code) = sys::ptrace_get_siginfo(pid).map_err(|source| DumpError::Sys {
            op: "PTRACE_GETSIGINFO",
            pid,
            source,
        })?;
        if code >> 8 == PTRACE_EVENT_STOP {
            return Ok(signals);
        }
        // A signal-delivery stop: keep the signal for later, go on to the interrupt stop.
        if signo > 0 && !signals.contains(&signo) {
            signals.push(signo);
        }
        sys::ptrace_cont(pid).map_err(|source| DumpError::Sys {
            op: "PTRACE_CONT",
            pid,
            source,
        })?;
    }
}

/// Waits until the tracee is in a ptrace stop (`t` in its stat). Reports are consumed with
/// waitpid where this thread gets them; when the tracee is the agent's own child, the
/// agent's command waiter may take them instead, so the state in `/proc` decides.
fn wait_traced(pid: u32, deadline: Instant, what: &'static str) -> Result<(), DumpError> {
    let stat_path = PathBuf::from(format!("/proc/{pid}/stat"));
    loop {
        match sys::waitpid_nohang(pid) {
            Ok(WaitStatus::Exited(_) | WaitStatus::Signaled(_)) => {
                return Err(DumpError::NoProcess(pid))
            }
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {}
            Err(source) => {
                return Err(DumpError::Sys {
                    op: "waitpid",
                    pid,
                    source,
                })
            }
        }
        let state = fs::read(&stat_path)
            .ok()
            .and_then(|t| procfs::parse_stat(&t))
            .map(|s| s.state);
        match state {
            Some(b't') => return Ok(()),
            None | Some(b'Z' | b'X' | b'x') => return Err(DumpError::NoProcess(pid)),
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(DumpError::Timeout { pid, what });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// What [`Injector::hold_frames`] changed in a frozen process, undone when it thaws.
#[derive(Debug)]
struct Held {
    /// The registers at the stop and a `syscall` instruction, to run the undoing calls.
    regs: UserRegs,
    syscall_at: u64,
    /// Ranges locked on fault.
    locked: Vec<(u64, u64)>,
    /// Transparent huge pages were turned off (they were on).
    thp_turned_off: bool,
}

impl Held {
    /// Unlocks what was locked and turns transparent huge pages back on. What fails is
    /// logged: the process goes on either way.
    fn undo(self, pid: u32) {
        let mut injector = Injector {
            pid,
            regs: self.regs,
            syscall_at: self.syscall_at,
            touched: false,
        };
        for (s, e) in self.locked {
            if let Err(e) = injector.call(SYS_MUNLOCK, [s, e - s, 0, 0, 0, 0], "munlock(2)") {
                crate::server::log(format_args!("pid {pid}: cannot unlock {s:#x}: {e}"));
            }
        }
        if self.thp_turned_off {
            let off = [libc::PR_SET_THP_DISABLE as u64, 0, 0, 0, 0, 0];
            if let Err(e) = injector.call(SYS_PRCTL, off, "prctl(PR_SET_THP_DISABLE)") {
                crate::server::log(format_args!(
                    "pid {pid}: cannot turn transparent huge pages back on: {e}"
                ));
            }
        }
    }
}

/// Runs system calls inside a stopped tracee.
struct Injector {
    pid: u32,
    /// The registers at the stop, the base of every call's registers.
    regs: UserRegs,
    /// The address of a `syscall` instruction in the process.
    syscall_at: u64,
    /// Whether registers were changed (so they must be put back).
    touched: bool,
}

impl Injector {
    fn new(pid: u32, regs: UserRegs, maps: &[MapsEntry]) -> Result<Self, DumpError> {
        let syscall_at = find_syscall_insn(pid, maps)?;
        Ok(Self {
            pid,
            regs,
            syscall_at,
            touched: false,
        })
    }

    /// The dispositions of the `signals` (a SigCgt|SigIgn mask) and the program break.
    fn read_inside(&mut self, signals: u64) -> Result<(Vec<SigAction>, u64), DumpError> {
        let brk = self.call(SYS_BRK, [0; 6], "brk(2)")?;
        let mut actions = Vec::new();
        if signals != 0 {
            let page = self.call(
                SYS_MMAP,
                [
                    0,
                    PAGE_SIZE,
                    (libc::PROT_READ | libc::PROT_WRITE) as u64,
                    (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                    u64::MAX,
                    0,
                ],
                "mmap(2)",
            )?;
            let result = self.sigactions(signals, page);
            let unmapped = self.call(SYS_MUNMAP, [page, PAGE_SIZE, 0, 0, 0, 0], "munmap(2)");
            actions = result?;
            unmapped?;
        }
        Ok((actions, brk))
    }

    /// Keeps the frozen process's pages in their frames while the VMM reads them by frame
    /// number (the final copy; post-copy's pages, for many seconds after the freeze): a frame
    /// the guest kernel moved a page out of may hold anything by the time it is read.
    /// khugepaged is kept out by `PR_SET_THP_DISABLE`; compaction by locking every private
    /// mapping on fault (`MLOCK_ONFAULT`: what is present is locked, nothing is populated),
    /// which compaction leaves alone in a guest whose agent set
    /// `vm.compact_unevictable_allowed = 0`. A process that locks memory itself is not
    /// locked (unlocking at the thaw would undo its own). Best effort: what the kernel
    /// refuses (RLIMIT_MEMLOCK for an unprivileged process) stays undone, logged.
    fn hold_frames(&mut self, maps: &[MapsEntry], facts: &Facts) -> Held {
        let pid = self.pid;
        let mut held = Held {
            regs: self.regs,
            syscall_at: self.syscall_at,
            locked: Vec::new(),
            thp_turned_off: false,
        };
        if !facts.thp_disabled {
            let off = [libc::PR_SET_THP_DISABLE as u64, 1, 0, 0, 0, 0];
            match self.call(SYS_PRCTL, off, "prctl(PR_SET_THP_DISABLE)") {
                Ok(_) => held.thp_turned_off = true,
                Err(e) => crate::server::log(format_args!(
                    "pid {pid}: cannot turn transparent huge pages off while it moves: {e}"
                )),
            }
        }
        if facts.locked_kib != 0 {
            return held;
        }
        // One call for each run of adjacent private mappings (each injected call costs the
        // frozen process time).
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let private = maps.iter().map(|m| &m.mapping).filter(|m| {
            !m.shared
                && matches!(
                    m.kind,
                    MappingKind::Anonymous
                        | MappingKind::File
                        | MappingKind::Heap
                        | MappingKind::Stack
                )
        });
        for m in private {
            match runs.last_mut() {
                Some(run) if run.1 == m.start => run.1 = m.end,
                _ => runs.push((m.start, m.end)),
            }
        }
        for (start, end) in runs {
            let args = [start, end - start, MLOCK_ONFAULT, 0, 0, 0];
            match self.call(SYS_MLOCK2, args, "mlock2(2)") {
                Ok(_) => held.locked.push((start, end)),
                Err(e) => {
                    crate::server::log(format_args!(
                        "pid {pid}: cannot lock its pages in place while it moves: {e}"
                    ));
                    break;
                }
            }
        }
        held
    }

    fn sigactions(&mut self, signals: u64, page: u64) -> Result<Vec<SigAction>, DumpError> {
        let mem_path = PathBuf::from(format!("/proc/{}/mem", self.pid));
        let mem = File::open(&mem_path).map_err(|source| DumpError::Read {
            path: mem_path.clone(),
            source,
        })?;
        let mut actions = Vec::new();
        for signo in 1..=64u32 {
            if signals & (1 << (signo - 1)) == 0
                || signo == libc::SIGKILL as u32
                || signo == libc::SIGSTOP as u32
            {
                continue;
            }
            self.call(
                SYS_RT_SIGACTION,
                [u64::from(signo), 0, page, 8, 0, 0],
                "rt_sigaction(2)",
            )?;
            let mut raw = [0u8; 32];
            mem.read_exact_at(&mut raw, page)
                .map_err(|source| DumpError::Read {
                    path: mem_path.clone(),
                    source,
                })?;
            let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap());
            actions.push(SigAction {
                signo,
                handler: word(0),
                flags: word(1),
                restorer: word(2),
                mask: word(3),
            });
        }
        Ok(actions)
    }

    /// Runs one system call: registers set on the `syscall` instruction, then to its entry
    /// stop and its exit stop. Returns its result, or the errno it failed with.
    fn call(&mut self, nr: u64, args: [u64; 6], name: &str) -> Result<u64, DumpError> {
        let pid = self.pid;
        let sys_err = |op| move |source| DumpError::Sys { op, pid, source };
        let mut r = self.regs;
        r[RAX] = nr;
        // No restart handling of the stopped call while it runs ours.
        r[ORIG_RAX] = u64::MAX;
        r[RIP] = self.syscall_at;
        r[RDI] = args[0];
        r[RSI] = args[1];
        r[RDX] = args[2];
        r[R10] = args[3];
        r[R8] = args[4];
        r[R9] = args[5];
        self.touched = true;
        sys::ptrace_set_regs(pid, &r).map_err(sys_err("PTRACE_SETREGS"))?;
        for (want, what) in [(1u8, "enter an injected system call"), (2, "finish it")] {
            sys::ptrace_syscall(pid).map_err(sys_err("PTRACE_SYSCALL"))?;
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                wait_traced(pid, deadline, what)?;
                let op = sys::ptrace_syscall_op(pid).map_err(sys_err("PTRACE_GET_SYSCALL_INFO"))?;
                if op == want {
                    break;
                }
                // Another stop first (a signal, a pending interrupt): go on to ours.
                if Instant::now() >= deadline {
                    return Err(DumpError::Timeout { pid, what });
                }
                sys::ptrace_syscall(pid).map_err(sys_err("PTRACE_SYSCALL"))?;
            }
        }
        let ret = sys::ptrace_get_regs(pid).map_err(sys_err("PTRACE_GETREGS"))?[RAX];
        let signed = ret as i64;
        if (-4095..0).contains(&signed) {
            return Err(DumpError::Injected {
                call: name.to_string(),
                pid,
                source: io::Error::from_raw_os_error(-signed as i32),
            });
        }
        Ok(ret)
    }
}

/// The address of a `syscall` instruction (0f 05) in the process: in its vDSO, else in its
/// other executable mappings.
fn find_syscall_insn(pid: u32, maps: &[MapsEntry]) -> Result<u64, DumpError> {
    let mem_path = PathBuf::from(format!("/proc/{pid}/mem"));
    let mem = File::open(&mem_path).map_err(|source| DumpError::Read {
        path: mem_path,
        source,
    })?;
    let mut candidates: Vec<&Mapping> = maps
        .iter()
        .map(|m| &m.mapping)
        .filter(|m| m.prot & 4 != 0 && m.kind != MappingKind::Vsyscall)
        .collect();
    candidates.sort_by_key(|m| m.kind != MappingKind::Vdso);
    const CHUNK: u64 = 64 * 1024;
    for m in candidates {
        let mut at = m.start;
        // At most 4 MiB of each mapping.
        let end = m.end.min(m.start.saturating_add(4 << 20));
        while at < end {
            let len = (end - at).min(CHUNK) as usize;
            let mut buf = vec![0u8; len];
            let Ok(n) = mem.read_at(&mut buf, at) else {
                break;
            };
            if let Some(i) = buf[..n].windows(2).position(|w| w == [0x0f, 0x05]) {
                return Ok(at + i as u64);
            }
            if n < 2 {
                break;
            }
            // Overlap one byte so an instruction across chunks is found.
            at += n as u64 - 1;
        }
    }
    Err(DumpError::NoSyscallInsn(pid))
}

/// Reads running process `pid` from `/proc` and checks everything that can be refused without
/// touching it: the process, its mappings and its files, as read.
fn check_running(pid: u32) -> Result<(Facts, Vec<MapsEntry>, Vec<FdEntry>), DumpError> {
    if !PathBuf::from(format!("/proc/{pid}")).exists() {
        return Err(DumpError::NoProcess(pid));
    }
    let facts = read_facts(pid)?;
    check_process(pid, &facts, &agent_lineage(), false)?;
    let maps = read_maps(pid)?;
    check_maps(&maps).map_err(|r| DumpError::cant(pid, r))?;
    let files = read_files(pid)?;
    check_files(&files).map_err(|r| DumpError::cant(pid, r))?;
    Ok((facts, maps, files))
}

/// Checks everything about running process `pid` that [`freeze`] checks before touching it,
/// and lists the frames of its present pages without stopping it: one pre-copy round. The
/// process runs on, so the list is a snapshot; the caller learns of later writes from KVM's
/// dirty log and of moved frames from the next survey (or the freeze's list).
pub fn survey(pid: u32) -> Result<Vec<PageRef>, DumpError> {
    let (_, maps, _) = check_running(pid)?;
    let mappings: Vec<Mapping> = maps.into_iter().map(|m| m.mapping).collect();
    present_pages(pid, &mappings)
}

/// Pre-copy's first look at running process `pid`: what [`survey`] checks and lists, and
/// its image as `/proc` shows it without stopping it: mappings, files, working directory,
/// credentials, limits, memory layout and clocks, but no registers, xstate, signal state or
/// exact program break (`regs` and `xstate` are empty), which only the freeze can read. The
/// destination builds the process's address space from it while the pages stream, and
/// completes it from the freeze's image.
pub fn outline(pid: u32) -> Result<(ProcessImage, Vec<PageRef>), DumpError> {
    let (facts, maps, files) = check_running(pid)?;
    let parts = read_parts(pid)?;
    let mappings: Vec<Mapping> = maps.into_iter().map(|m| m.mapping).collect();
    let pages = present_pages(pid, &mappings)?;
    let image = ProcessImage {
        pid,
        comm: facts.comm,
        cmdline: parts.cmdline,
        cwd: parts.cwd,
        creds: facts.creds,
        regs: Vec::new(),
        xstate: Vec::new(),
        sigmask: 0,
        sigactions: Vec::new(),
        rlimits: parts.rlimits,
        mm: parts.mm,
        mappings,
        files: files.into_iter().map(|f| f.file).collect(),
        thp_disabled: facts.thp_disabled,
        clocks: parts.clocks,
    };
    Ok((image, pages))
}

/// Every present page of `mappings` (except `[vvar]` and `[vsyscall]`), by address. Pages
/// swapped out are read back in through `/proc/PID/mem` first, so none is missed.
fn present_pages(pid: u32, mappings: &[Mapping]) -> Result<Vec<PageRef>, DumpError> {
    let path = PathBuf::from(format!("/proc/{pid}/pagemap"));
    let read_err = |path: &PathBuf| {
        let path = path.clone();
        move |source| DumpError::Read { path, source }
    };
    let pagemap = File::open(&path).map_err(read_err(&path))?;
    let mem_path = PathBuf::from(format!("/proc/{pid}/mem"));
    let mut pages = Vec::new();
    let mut raw = Vec::new();
    for m in mappings {
        if matches!(m.kind, MappingKind::Vvar | MappingKind::Vsyscall) {
            continue;
        }
        let mut vpn = m.start / PAGE_SIZE;
        let end = m.end / PAGE_SIZE;
        while vpn < end {
            let n = (end - vpn).min(PAGEMAP_CHUNK);
            read_pagemap(&pagemap, vpn, n, &mut raw).map_err(read_err(&path))?;
            if raw.iter().any(|e| e & PM_SWAPPED != 0) {
                // Fault the swapped pages back in, then read their entries again.
                let mem = File::open(&mem_path).map_err(read_err(&mem_path))?;
                for (i, e) in raw.iter().enumerate() {
                    if e & PM_SWAPPED != 0 {
                        let mut b = [0u8; 1];
                        let _ = mem.read_at(&mut b, (vpn + i as u64) * PAGE_SIZE);
                    }
                }
                read_pagemap(&pagemap, vpn, n, &mut raw).map_err(read_err(&path))?;
            }
            for (i, &e) in raw.iter().enumerate() {
                if let Some((pfn, anon)) = parse_pagemap_entry(e) {
                    pages.push(PageRef {
                        vaddr: (vpn + i as u64) * PAGE_SIZE,
                        pfn,
                        anon,
                    });
                }
            }
            vpn += n;
        }
    }
    Ok(pages)
}

fn read_pagemap(pagemap: &File, vpn: u64, n: u64, out: &mut Vec<u64>) -> io::Result<()> {
    let mut bytes = vec![0u8; n as usize * 8];
    pagemap.read_exact_at(&mut bytes, vpn * 8)?;
    out.clear();
    out.extend(
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))),
    );
    Ok(())
}

/// A pagemap entry's frame and anonymity, if the page is present. A present page with frame
/// 0 means the PFN was hidden (the reader lacks CAP_SYS_ADMIN).
pub fn parse_pagemap_entry(entry: u64) -> Option<(u64, bool)> {
    (entry & PM_PRESENT != 0).then_some((entry & PM_PFN, entry & PM_FILE == 0))
}

// ---------------------------------------------------------------------------------------
// Checks (pure, on what was read from /proc).

/// What `/proc/PID/stat` and `/proc/PID/status` say about a process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    /// The command name.
    pub comm: String,
    /// The parent's pid.
    pub ppid: u32,
    /// The stat state letter.
    pub state: u8,
    /// The stat flags (`PF_*`).
    pub flags: u64,
    /// Threads.
    pub threads: u32,
    /// `TracerPid:`.
    pub tracer: u32,
    /// Ids.
    pub creds: Creds,
    /// `SigCgt:`, the caught signals.
    pub caught: u64,
    /// `SigIgn:`, the ignored signals.
    pub ignored: u64,
    /// `THP_enabled: 0`: the process turned transparent huge pages off
    /// (`PR_SET_THP_DISABLE`).
    pub thp_disabled: bool,
    /// `VmLck:`, KiB the process locked itself.
    pub locked_kib: u64,
}

/// The fields of `/proc/PID/status` the dump uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// `Threads:`.
    pub threads: u32,
    /// `TracerPid:`.
    pub tracer: u32,
    /// `Uid:`, `Gid:`, `Groups:`.
    pub creds: Creds,
    /// `SigCgt:`.
    pub caught: u64,
    /// `SigIgn:`.
    pub ignored: u64,
    /// `THP_enabled:` is 0 (Linux 5.0+; absent means enabled).
    pub thp_disabled: bool,
    /// `VmLck:` in KiB: memory the process locked itself.
    pub locked_kib: u64,
}

/// Parses `/proc/PID/status`; `None` if a field is missing or malformed.
pub fn parse_status(text: &str) -> Option<Status> {
    let mut s = Status::default();
    let mut seen = 0u8;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let ids = |v: &str| -> Option<[u32; 3]> {
            let mut it = v.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some([it.next()??, it.next()??, it.next()??])
        };
        match key {
            "Threads" => {
                s.threads = value.parse().ok()?;
                seen |= 1;
            }
            "TracerPid" => {
                s.tracer = value.parse().ok()?;
                seen |= 2;
            }
            "Uid" => {
                s.creds.uid = ids(value)?;
                seen |= 4;
            }
            "Gid" => {
                s.creds.gid = ids(value)?;
                seen |= 8;
            }
            "Groups" => {
                s.creds.groups = value
                    .split_whitespace()
                    .map(|g| g.parse().ok())
                    .collect::<Option<_>>()?;
            }
            "SigCgt" => {
                s.caught = u64::from_str_radix(value, 16).ok()?;
                seen |= 16;
            }
            "SigIgn" => {
                s.ignored = u64::from_str_radix(value, 16).ok()?;
                seen |= 32;
            }
            "THP_enabled" => s.thp_disabled = value == "0",
            "VmLck" => {
                s.locked_kib = value.trim_end_matches("kB").trim().parse().ok()?;
            }
            _ => {}
        }
    }
    (seen == 63).then_some(s)
}

/// Parses the memory-layout fields of `/proc/PID/stat` (26-28 and 45-51); `brk` is set to
/// `start_brk` and `auxv` left empty. `None` if there are fewer than 51 fields.
pub fn parse_stat_mm(text: &[u8]) -> Option<MmLayout> {
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&text[close + 1..]).ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state).
    let f = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let start_brk = f(47)?;
    Some(MmLayout {
        start_code: f(26)?,
        end_code: f(27)?,
        start_stack: f(28)?,
        start_data: f(45)?,
        end_data: f(46)?,
        start_brk,
        brk: start_brk,
        arg_start: f(48)?,
        arg_end: f(49)?,
        env_start: f(50)?,
        env_end: f(51)?,
        auxv: Vec::new(),
    })
}

/// Parses `/proc/PID/auxv` into its words; `None` if its length is not a multiple of 16.
pub fn parse_auxv(bytes: &[u8]) -> Option<Vec<u64>> {
    if !bytes.len().is_multiple_of(16) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
    )
}

/// One line of `/proc/PID/maps` with what the checks need beyond the [`Mapping`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    /// The mapping as the image carries it.
    pub mapping: Mapping,
    /// The path column as the kernel wrote it (with ` (deleted)`, `[heap]`, ...); empty for
    /// anonymous memory.
    pub name: String,
    /// The inode column.
    pub inode: u64,
}

/// Parses `/proc/PID/maps`; `None` if a line is malformed. A path may hold spaces.
pub fn parse_maps(text: &str) -> Option<Vec<MapsEntry>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut rest = line;
        let mut field = || {
            let s = rest.trim_start();
            let end = s.find(' ').unwrap_or(s.len());
            let (f, r) = s.split_at(end);
            rest = r;
            f
        };
        let range = field();
        let perms = field().as_bytes();
        let offset = field();
        let _dev = field();
        let inode = field();
        let name = rest.trim_start().to_string();
        let (start, end) = range.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        if perms.len() != 4 || end < start {
            return None;
        }
        let mut prot = 0;
        if perms[0] == b'r' {
            prot |= 1;
        }
        if perms[1] == b'w' {
            prot |= 2;
        }
        if perms[2] == b'x' {
            prot |= 4;
        }
        let kind = match name.as_str() {
            "" => MappingKind::Anonymous,
            "[heap]" => MappingKind::Heap,
            "[stack]" => MappingKind::Stack,
            "[vdso]" => MappingKind::Vdso,
            "[vvar]" | "[vvar_vclock]" => MappingKind::Vvar,
            "[vsyscall]" => MappingKind::Vsyscall,
            n if n.starts_with("[anon:") || n.starts_with("[anon_shmem:") => MappingKind::Anonymous,
            n if n.starts_with('[') => MappingKind::Anonymous,
            _ => MappingKind::File,
        };
        out.push(MapsEntry {
            mapping: Mapping {
                start,
                end,
                prot,
                shared: perms[3] == b's',
                offset: u64::from_str_radix(offset, 16).ok()?,
                kind,
                path: (kind == MappingKind::File).then(|| name.clone()),
            },
            inode: inode.parse().ok()?,
            name,
        });
    }
    Some(out)
}

/// The first mapping that cannot move, if any.
pub fn check_maps(maps: &[MapsEntry]) -> Result<(), CantMove> {
    for e in maps {
        let m = &e.mapping;
        let name = e.name.as_str();
        let shared = |what: String| CantMove::SharedMemory {
            start: m.start,
            end: m.end,
            what,
        };
        if name.starts_with("/SYSV") {
            return Err(shared("SysV shared memory".into()));
        }
        if m.shared && name.starts_with("/memfd:") {
            return Err(shared(format!("the shared memfd {name}")));
        }
        if m.shared && (name.starts_with("/dev/zero") || name.starts_with("[anon_shmem:")) {
            return Err(shared("shared anonymous memory".into()));
        }
        if m.shared && m.prot & 2 != 0 {
            return Err(shared(format!("a writable shared mapping of {name}")));
        }
        if name.starts_with("/dev/") && name != "/dev/zero" {
            return Err(CantMove::DeviceMapping {
                start: m.start,
                path: name.to_string(),
            });
        }
        if m.kind == MappingKind::File && name.ends_with(" (deleted)") {
            return Err(CantMove::DeletedMapping {
                start: m.start,
                path: name.to_string(),
            });
        }
        if name.starts_with('[')
            && m.kind == MappingKind::Anonymous
            && !name.starts_with("[anon:")
            && !name.starts_with("[anon_shmem:")
        {
            return Err(CantMove::SpecialMapping {
                start: m.start,
                name: name.to_string(),
            });
        }
    }
    Ok(())
}

/// What an fd's target is, as `stat` on `/proc/PID/fd/N` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdType {
    /// `S_IFREG`.
    Regular,
    /// `S_IFDIR`.
    Directory,
    /// `S_IFCHR` with the device's major number.
    Char {
        /// The major number.
        major: u32,
    },
    /// `S_IFBLK`.
    Block,
    /// `S_IFIFO`.
    Fifo,
    /// `S_IFSOCK`.
    Socket,
    /// No file type (anon inodes), or unreadable.
    Unknown,
}

/// The kind of an fd from its target's type and its link text.
pub fn classify_fd(ty: FdType, link: &str) -> FileKind {
    match ty {
        FdType::Regular if link.starts_with("anon_inode:") => FileKind::Other,
        FdType::Regular => FileKind::Regular,
        FdType::Directory => FileKind::Directory,
        FdType::Char { major } => {
            let tty_major = matches!(major, 4 | 5 | 136..=143 | 204 | 229);
            let tty_path = ["/dev/tty", "/dev/pts/", "/dev/console", "/dev/hvc"]
                .iter()
                .any(|p| link.starts_with(p));
            if tty_major || tty_path {
                FileKind::Tty
            } else {
                FileKind::CharDevice
            }
        }
        FdType::Fifo => FileKind::Pipe,
        FdType::Socket => FileKind::Socket,
        FdType::Block | FdType::Unknown => {
            if link.starts_with("socket:[") {
                FileKind::Socket
            } else if link.starts_with("pipe:[") {
                FileKind::Pipe
            } else {
                FileKind::Other
            }
        }
    }
}

/// The character devices a process may have open and still move (reopened by path).
pub const MOVABLE_DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// An open fd as read, before the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdEntry {
    /// The fd as the image carries it.
    pub file: OpenFile,
    /// Its target's type.
    pub ty: FdType,
}

/// The first fd that cannot move, if any. Terminals and pipes are accepted on fds 0-2 (the
/// destination connects those to `/dev/null`).
pub fn check_files(files: &[FdEntry]) -> Result<(), CantMove> {
    for e in files {
        let f = &e.file;
        let (fd, path) = (f.fd, f.path.clone());
        match f.kind {
            FileKind::Socket => return Err(CantMove::Socket { fd, path }),
            FileKind::Tty if fd > 2 => return Err(CantMove::Tty { fd, path }),
            FileKind::Pipe if fd > 2 => return Err(CantMove::Pipe { fd, path }),
            FileKind::Tty | FileKind::Pipe => {}
            FileKind::Other if e.ty == FdType::Block => return Err(CantMove::Device { fd, path }),
            FileKind::Other => return Err(CantMove::UnsupportedFile { fd, path }),
            FileKind::CharDevice if !MOVABLE_DEVICES.contains(&path.as_str()) => {
                return Err(CantMove::Device { fd, path })
            }
            FileKind::Regular | FileKind::Directory if path.ends_with(" (deleted)") => {
                return Err(CantMove::DeletedFile { fd, path })
            }
            FileKind::CharDevice | FileKind::Regular | FileKind::Directory => {}
        }
    }
    Ok(())
}

/// Parses `/proc/PID/fdinfo/N`: `(pos, flags)`; `None` if either is missing.
pub fn parse_fdinfo(text: &str) -> Option<(u64, u32)> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = u32::from_str_radix(v.trim(), 8).ok();
        }
    }
    Some((pos?, flags?))
}

/// The refusals about the process as a whole: init, kernel threads, the agent and its
/// ancestors (`lineage`), zombies, threads, tracers (unless `seized`: then the tracer is us).
pub fn check_process(
    pid: u32,
    facts: &Facts,
    lineage: &[u32],
    seized: bool,
) -> Result<(), DumpError> {
    let cant = |reason| Err(DumpError::cant(pid, reason));
    if pid == 1 {
        return cant(CantMove::Init);
    }
    if facts.flags & procfs::PF_KTHREAD != 0 {
        return cant(CantMove::KernelThread {
            pid,
            comm: facts.comm.clone(),
        });
    }
    if lineage.contains(&pid) {
        return cant(CantMove::Agent {
            pid,
            comm: facts.comm.clone(),
        });
    }
    if matches!(facts.state, b'Z' | b'X' | b'x') {
        return cant(CantMove::Exited {
            pid,
            state: facts.state as char,
        });
    }
    if facts.threads > 1 {
        return cant(CantMove::Threads {
            threads: facts.threads,
        });
    }
    if facts.tracer != 0 && !seized {
        return cant(CantMove::Traced {
            pid,
            tracer: facts.tracer,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reading /proc.

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, DumpError> {
    fs::read(path).map_err(|source| DumpError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_facts(pid: u32) -> Result<Facts, DumpError> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let gone = |_| DumpError::NoProcess(pid);
    let stat_path = proc.join("stat");
    let stat = fs::read(&stat_path).map_err(gone)?;
    let stat = procfs::parse_stat(&stat).ok_or(DumpError::Parse {
        path: stat_path,
        what: "not a stat line",
    })?;
    let status_path = proc.join("status");
    let status = fs::read_to_string(&status_path).map_err(gone)?;
    let status = parse_status(&status).ok_or(DumpError::Parse {
        path: status_path,
        what: "missing Threads, TracerPid, Uid, Gid, SigCgt or SigIgn",
    })?;
    let comm = fs::read_to_string(proc.join("comm"))
        .map(|c| c.trim_end_matches('\n').to_string())
        .unwrap_or(stat.comm);
    Ok(Facts {
        comm,
        ppid: stat.ppid,
        state: stat.state,
        flags: stat.flags,
        threads: status.threads.max(stat.num_threads),
        tracer: status.tracer,
        creds: status.creds,
        caught: status.caught,
        ignored: status.ignored,
        thp_disabled: status.thp_disabled,
        locked_kib: status.locked_kib,
    })
}

/// The agent's pid and every ancestor's, up to pid 1.
fn agent_lineage() -> Vec<u32> {
    let mut out = vec![std::process::id()];
    let mut pid = std::process::id();
    for _ in 0..4096 {
        let Some(stat) = fs::read(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|t| procfs::parse_stat(&t))
        else {
            break;
        };
        if stat.ppid == 0 || out.contains(&stat.ppid) {
            break;
        }
        out.push(stat.ppid);
        pid = stat.ppid;
    }
    out
}

fn read_maps(pid: u32) -> Result<Vec<MapsEntry>, DumpError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let text = fs::read_to_string(&path).map_err(|source| DumpError::Read {
        path: path.clone(),
        source,
    })?;
    let maps = parse_maps(&text).ok_or(DumpError::Parse {
        path,
        what: "a malformed line",
    })?;
    if maps.is_empty() {
        // Kernel threads have no maps; a user process always has some.
        return Err(DumpError::cant(
            pid,
            CantMove::KernelThread {
                pid,
                comm: String::new(),
            },
        ));
    }
    Ok(maps)
}

fn read_files(pid: u32) -> Result<Vec<FdEntry>, DumpError> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = fs::read_dir(&dir).map_err(|source| DumpError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut fds: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let mut out = Vec::new();
    for fd in fds {
        let link_path = dir.join(fd.to_string());
        // An fd closed meanwhile is simply not there.
        let Ok(link) = fs::read_link(&link_path) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let ty = match fs::metadata(&link_path) {
            Ok(md) => {
                let ft = md.file_type();
                if ft.is_file() {
                    FdType::Regular
                } else if ft.is_dir() {
                    FdType::Directory
                } else if ft.is_char_device() {
                    FdType::Char {
                        major: libc::major(md.rdev()),
                    }
                } else if ft.is_block_device() {
                    FdType::Block
                } else if ft.is_fifo() {
                    FdType::Fifo
                } else if ft.is_socket() {
                    FdType::Socket
                } else {
                    FdType::Unknown
                }
            }
            Err(_) => FdType::Unknown,
        };
        let info_path = PathBuf::from(format!("/proc/{pid}/fdinfo/{fd}"));
        let Ok(info) = fs::read_to_string(&info_path) else {
            continue;
        };
        let (offset, flags) = parse_fdinfo(&info).ok_or(DumpError::Parse {
            path: info_path,
            what: "missing pos or flags",
        })?;
        out.push(FdEntry {
            file: OpenFile {
                fd,
                kind: classify_fd(ty, &link),
                path: link,
                flags,
                offset,
            },
            ty,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/PID/maps` of `python3 -c 'import time; time.sleep(100)'` on Debian 12, trimmed,
    /// with a few lines added for the refusals' tests.
    const MAPS: &str = "\
55d4c3a00000-55d4c3a6b000 r--p 00000000 fe:01 1311032                    /usr/bin/python3.11
55d4c3a6b000-55d4c3d54000 r-xp 0006b000 fe:01 1311032                    /usr/bin/python3.11
55d4c4ff5000-55d4c50b4000 rw-p 00000000 00:00 0                          [heap]
7f5f1c400000-7f5f1c6e8000 r--p 00000000 fe:01 1308011                    /usr/lib/locale/locale-archive
7f5f1c7e7000-7f5f1c7ea000 rw-p 00000000 00:00 0 
7f5f1ca00000-7f5f1ca01000 r--s 00000000 fe:01 1308012                    /var/cache/my file with spaces
7ffd7e0a6000-7ffd7e0c7000 rw-p 00000000 00:00 0                          [stack]
7ffd7e1c5000-7ffd7e1c9000 r--p 00000000 00:00 0                          [vvar]
7ffd7e1c9000-7ffd7e1cb000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn maps_parse() {
        let maps = parse_maps(MAPS).unwrap();
        assert_eq!(maps.len(), 10);
        let text = &maps[1].mapping;
        assert_eq!(
            (text.start, text.end, text.prot, text.shared, text.offset),
            (0x55d4c3a6b000, 0x55d4c3d54000, 5, false, 0x6b000)
        );
        assert_eq!(text.kind, MappingKind::File);
        assert_eq!(text.path.as_deref(), Some("/usr/bin/python3.11"));
        assert_eq!(maps[1].inode, 1311032);
        assert_eq!(maps[2].mapping.kind, MappingKind::Heap);
        assert_eq!(maps[2].mapping.path, None);
        assert_eq!(maps[4].mapping.kind, MappingKind::Anonymous);
        assert_eq!(maps[4].mapping.prot, 3);
        assert_eq!(
            maps[5].mapping.path.as_deref(),
            Some("/var/cache/my file with spaces")
        );
        assert!(maps[5].mapping.shared);
        assert_eq!(maps[6].mapping.kind, MappingKind::Stack);
        assert_eq!(maps[7].mapping.kind, MappingKind::Vvar);
        assert_eq!(maps[8].mapping.kind, MappingKind::Vdso);
        assert_eq!(maps[9].mapping.kind, MappingKind::Vsyscall);
        assert_eq!(maps[9].mapping.prot, 4);
        // Read-only shared file mappings are fine.
        assert_eq!(check_maps(&maps), Ok(()));
    }

    #[test]
    fn malformed_maps_are_none() {
        for bad in [
            "zz-10 rw-p 0 00:00 0\n",
            "10-20 rw-p\n",
            "20-10 rw-p 0 00:00 0\n",
            "10-20 rw 0 00:00 0\n",
            "10-20 rw-p 0 00:00 x\n",
        ] {
            assert_eq!(parse_maps(bad), None, "{bad}");
        }
        assert_eq!(parse_maps(""), Some(vec![]));
    }

    fn refusal(line: &str) -> Result<(), CantMove> {
        check_maps(&parse_maps(line).unwrap())
    }

    #[test]
    fn maps_refusals() {
        assert!(matches!(
            refusal("7f0000000000-7f0000001000 rw-s 00000000 00:01 32770 /SYSV00000000 (deleted)\n"),
            Err(CantMove::SharedMemory { what, .. }) if what == "SysV shared memory"
        ));
        assert!(matches!(
            refusal(
                "7f0000000000-7f0000001000 r--s 00000000 00:01 32770 /SYSV00000000 (deleted)\n"
            ),
            Err(CantMove::SharedMemory { .. })
        ));
        assert!(matches!(
            refusal("7f0000000000-7f0000001000 rw-s 00000000 00:01 5 /memfd:buf (deleted)\n"),
            Err(CantMove::SharedMemory { what, .. }) if what.contains("memfd")
        ));
        assert!(matches!(
            refusal("7f0000000000-7f0000001000 rw-s 00000000 00:01 5 /dev/zero (deleted)\n"),
            Err(CantMove::SharedMemory { what, .. }) if what == "shared anonymous memory"
        ));
        let err =
            refusal("7f0000000000-7f0000001000 rw-s 00000000 fe:01 77 /tmp/data\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "it shares memory with other processes (a writable shared mapping of /tmp/data at \
             0x7f0000000000-0x7f0000001000), which cannot move yet"
        );
        assert!(matches!(
            refusal("7f0000000000-7f0000001000 rw-s 00000000 00:05 9 /dev/fb0\n"),
            Err(CantMove::SharedMemory { .. })
        ));
        assert_eq!(
            refusal("7f0000000000-7f0000001000 r--s 00000000 00:05 9 /dev/mem\n"),
            Err(CantMove::DeviceMapping {
                start: 0x7f0000000000,
                path: "/dev/mem".into()
            })
        );
        assert_eq!(
            refusal("7f0000000000-7f0000001000 rw-p 00000000 00:05 9 /dev/zero\n"),
            Ok(())
        );
        assert!(matches!(
            refusal("7f0000000000-7f0000001000 r-xp 00000000 fe:01 9 /usr/lib/libx.so (deleted)\n"),
            Err(CantMove::DeletedMapping { .. })
        ));
        assert!(matches!(
            refusal("7f0000000000-7f0000001000 rw-p 00000000 00:01 5 /memfd:jit (deleted)\n"),
            Err(CantMove::DeletedMapping { .. })
        ));
        assert!(matches!(
            refusal("7f0000000000-7f0000001000 r-xp 00000000 00:00 0 [uprobes]\n"),
            Err(CantMove::SpecialMapping { .. })
        ));
        assert_eq!(
            refusal("7f0000000000-7f0000001000 rw-p 00000000 00:00 0 [anon:glibc malloc]\n"),
            Ok(())
        );
    }

    /// `/proc/PID/status` of a bash on Debian 12 (6.1), trimmed.
    const STATUS: &str = "\
Name:\tbash
Umask:\t0022
State:\tS (sleeping)
Tgid:\t1234
Ngid:\t0
Pid:\t1234
PPid:\t1200
TracerPid:\t0
Uid:\t1000\t1001\t1002\t1003
Gid:\t100\t101\t102\t103
FDSize:\t256
Groups:\t24 25 27 
NStgid:\t1234
VmRSS:\t    5120 kB
Threads:\t1
SigQ:\t0/31503
SigPnd:\t0000000000000000
ShdPnd:\t0000000000000000
SigBlk:\t0000000000010000
SigIgn:\t0000000000380004
SigCgt:\t000000004b817efb
CapInh:\t0000000000000000
";

    #[test]
    fn status_parses() {
        let s = parse_status(STATUS).unwrap();
        assert_eq!(s.threads, 1);
        assert_eq!(s.tracer, 0);
        assert_eq!(s.creds.uid, [1000, 1001, 1002]);
        assert_eq!(s.creds.gid, [100, 101, 102]);
        assert_eq!(s.creds.groups, vec![24, 25, 27]);
        assert_eq!(s.ignored, 0x380004);
        assert_eq!(s.caught, 0x4b817efb);
        // Empty Groups.
        let t = STATUS.replace("Groups:\t24 25 27 ", "Groups:\t");
        assert_eq!(parse_status(&t).unwrap().creds.groups, Vec::<u32>::new());
        assert!(!s.thp_disabled, "no THP_enabled line: enabled");
        let t = STATUS.replace("Threads:\t1\n", "Threads:\t1\nTHP_enabled:\t0\n");
        assert!(parse_status(&t).unwrap().thp_disabled);
        // Missing or malformed fields.
        assert_eq!(parse_status(&STATUS.replace("Threads:\t1\n", "")), None);
        assert_eq!(
            parse_status(&STATUS.replace("SigCgt:\t0000", "SigCgt:\tzz")),
            None
        );
        assert_eq!(
            parse_status(&STATUS.replace("Uid:\t1000\t", "Uid:\t")),
            Some({
                // Three ids are still there (1001 1002 1003).
                let mut s = parse_status(STATUS).unwrap();
                s.creds.uid = [1001, 1002, 1003];
                s
            })
        );
        assert_eq!(
            parse_status(&STATUS.replace("Uid:\t1000\t1001\t1002\t1003", "Uid:\t1")),
            None
        );
        assert_eq!(parse_status(""), None);
    }

    /// `/proc/PID/stat` of a sleep on 6.1, with a comm holding `) (`.
    const STAT: &[u8] = b"4242 (a) (b) S 1 4242 4242 0 -1 4194304 97 0 0 0 0 0 0 0 20 0 1 0 \
        1536 2273280 130 18446744073709551615 94433497276416 94433497293201 140725000000000 0 0 \
        0 0 0 0 0 0 0 17 1 0 0 0 0 0 94433497308080 94433497309344 94433512873984 \
        140725000001000 140725000001020 140725000001020 140725000001500 0\n";

    #[test]
    fn stat_mm_parses() {
        let mm = parse_stat_mm(STAT).unwrap();
        assert_eq!(mm.start_code, 94433497276416);
        assert_eq!(mm.end_code, 94433497293201);
        assert_eq!(mm.start_stack, 140725000000000);
        assert_eq!(mm.start_data, 94433497308080);
        assert_eq!(mm.end_data, 94433497309344);
        assert_eq!(mm.start_brk, 94433512873984);
        assert_eq!(mm.brk, mm.start_brk);
        assert_eq!(mm.arg_start, 140725000001000);
        assert_eq!(mm.arg_end, 140725000001020);
        assert_eq!(mm.env_start, 140725000001020);
        assert_eq!(mm.env_end, 140725000001500);
        let cut = &STAT[..STAT.len() - 20];
        assert_eq!(parse_stat_mm(cut), None);
        assert_eq!(parse_stat_mm(b"no parenthesis"), None);
    }

    #[test]
    fn stat_mm_of_this_process() {
        let stat = fs::read("/proc/self/stat").unwrap();
        let mm = parse_stat_mm(&stat).unwrap();
        assert!(mm.start_code < mm.end_code);
        assert!(mm.arg_start < mm.arg_end);
        assert!(mm.env_start <= mm.env_end);
        let auxv = parse_auxv(&fs::read("/proc/self/auxv").unwrap()).unwrap();
        // AT_PAGESZ (6) is 4096, and the vector ends with AT_NULL.
        let pagesz = auxv.chunks(2).find(|p| p[0] == 6).unwrap();
        assert_eq!(pagesz[1], 4096);
        assert_eq!(&auxv[auxv.len() - 2..], &[0, 0]);
        assert_eq!(parse_auxv(&[0; 15]), None);
    }

    #[test]
    fn fdinfo_parses() {
        let text = "pos:\t4096\nflags:\t02100002\nmnt_id:\t29\nino:\t1234\n";
        assert_eq!(parse_fdinfo(text), Some((4096, 0o2100002)));
        assert_eq!(parse_fdinfo("pos:\t1\n"), None);
        assert_eq!(parse_fdinfo("pos:\tx\nflags:\t0\n"), None);
        assert_eq!(parse_fdinfo("pos:\t0\nflags:\t9\n"), None);
    }

    #[test]
    fn fds_classify() {
        assert_eq!(
            classify_fd(FdType::Regular, "/etc/passwd"),
            FileKind::Regular
        );
        assert_eq!(classify_fd(FdType::Directory, "/"), FileKind::Directory);
        assert_eq!(
            classify_fd(FdType::Char { major: 1 }, "/dev/null"),
            FileKind::CharDevice
        );
        assert_eq!(
            classify_fd(FdType::Char { major: 136 }, "/dev/pts/3"),
            FileKind::Tty
        );
        assert_eq!(
            classify_fd(FdType::Char { major: 4 }, "/dev/ttyS0"),
            FileKind::Tty
        );
        assert_eq!(
            classify_fd(FdType::Char { major: 5 }, "/dev/console"),
            FileKind::Tty
        );
        assert_eq!(classify_fd(FdType::Fifo, "pipe:[123]"), FileKind::Pipe);
        assert_eq!(classify_fd(FdType::Socket, "socket:[9]"), FileKind::Socket);
        assert_eq!(classify_fd(FdType::Unknown, "socket:[9]"), FileKind::Socket);
        assert_eq!(
            classify_fd(FdType::Unknown, "anon_inode:[eventfd]"),
            FileKind::Other
        );
        assert_eq!(
            classify_fd(FdType::Regular, "anon_inode:[eventpoll]"),
            FileKind::Other
        );
    }

    fn fd(fd: u32, kind: FileKind, path: &str, ty: FdType) -> FdEntry {
        FdEntry {
            file: OpenFile {
                fd,
                kind,
                path: path.into(),
                flags: 2,
                offset: 0,
            },
            ty,
        }
    }

    #[test]
    fn file_refusals() {
        let ok = vec![
            fd(0, FileKind::Tty, "/dev/pts/0", FdType::Char { major: 136 }),
            fd(1, FileKind::Pipe, "pipe:[1]", FdType::Fifo),
            fd(
                2,
                FileKind::CharDevice,
                "/dev/null",
                FdType::Char { major: 1 },
            ),
            fd(3, FileKind::Regular, "/tmp/log", FdType::Regular),
            fd(4, FileKind::Directory, "/tmp", FdType::Directory),
            fd(
                5,
                FileKind::CharDevice,
                "/dev/urandom",
                FdType::Char { major: 1 },
            ),
        ];
        assert_eq!(check_files(&ok), Ok(()));
        let cases = [
            (
                fd(3, FileKind::Socket, "socket:[77]", FdType::Socket),
                "fd 3 is a socket (socket:[77]); processes with open sockets cannot move yet",
            ),
            (
                fd(5, FileKind::Tty, "/dev/pts/1", FdType::Char { major: 136 }),
                "fd 5 is the terminal /dev/pts/1; a terminal can only move on stdin, stdout or \
                 stderr (it becomes /dev/null at the destination)",
            ),
            (
                fd(4, FileKind::Pipe, "pipe:[5]", FdType::Fifo),
                "fd 4 is a pipe (pipe:[5]); a pipe can only move on stdin, stdout or stderr (it \
                 becomes /dev/null at the destination)",
            ),
            (
                fd(3, FileKind::Regular, "/tmp/x (deleted)", FdType::Regular),
                "fd 3 is the deleted file /tmp/x (deleted), which the destination cannot open",
            ),
            (
                fd(
                    3,
                    FileKind::CharDevice,
                    "/dev/kvm",
                    FdType::Char { major: 10 },
                ),
                "fd 3 is the device /dev/kvm, which cannot move",
            ),
            (
                fd(3, FileKind::Other, "/dev/vda", FdType::Block),
                "fd 3 is the device /dev/vda, which cannot move",
            ),
            (
                fd(
                    7,
                    FileKind::Other,
                    "anon_inode:[eventpoll]",
                    FdType::Unknown,
                ),
                "fd 7 is anon_inode:[eventpoll], a kind of file that cannot move yet",
            ),
        ];
        for (bad, message) in cases {
            let mut files = ok.clone();
            files.push(bad);
            assert_eq!(check_files(&files).unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn process_refusals() {
        let good = Facts {
            comm: "sleep".into(),
            state: b'S',
            threads: 1,
            ..Facts::default()
        };
        let msg = |pid, f: &Facts, lineage: &[u32]| {
            check_process(pid, f, lineage, false)
                .unwrap_err()
                .to_string()
        };
        assert!(check_process(42, &good, &[7, 1], false).is_ok());
        assert_eq!(
            msg(1, &good, &[]),
            "pid 1 cannot move: pid 1 (init) cannot move"
        );
        let kthread = Facts {
            flags: procfs::PF_KTHREAD,
            comm: "kworker/0:1".into(),
            ..good.clone()
        };
        assert!(msg(2, &kthread, &[]).contains("kernel thread"));
        assert!(msg(7, &good, &[9, 7, 1]).contains("ferry agent or one of its ancestors"));
        let threads = Facts {
            threads: 4,
            ..good.clone()
        };
        assert_eq!(
            msg(42, &threads, &[]),
            "pid 42 cannot move: multi-threaded processes cannot move yet (4 threads)"
        );
        let traced = Facts {
            tracer: 99,
            ..good.clone()
        };
        assert!(msg(42, &traced, &[]).contains("traced by pid 99"));
        assert!(check_process(42, &traced, &[], true).is_ok());
        let zombie = Facts {
            state: b'Z',
            ..good
        };
        assert!(msg(42, &zombie, &[]).contains("already exited"));
    }

    #[test]
    fn pagemap_entries() {
        assert_eq!(parse_pagemap_entry(0), None);
        assert_eq!(parse_pagemap_entry(PM_SWAPPED | 5), None);
        assert_eq!(
            parse_pagemap_entry(PM_PRESENT | 0x1234),
            Some((0x1234, true))
        );
        assert_eq!(
            parse_pagemap_entry(PM_PRESENT | PM_FILE | (1 << 55) | 0x99),
            Some((0x99, false))
        );
    }

    #[test]
    fn restart_is_applied_only_to_stopped_calls() {
        let mut r: UserRegs = [0; 27];
        r[RIP] = 0x1002;
        r[ORIG_RAX] = 35; // nanosleep
        r[RAX] = ERESTART_RESTARTBLOCK as u64;
        let x = restart_syscall(&r);
        assert_eq!((x[RIP], x[RAX]), (0x1000, SYS_RESTART_SYSCALL));
        r[RAX] = ERESTARTSYS as u64;
        r[ORIG_RAX] = 0; // read
        let x = restart_syscall(&r);
        assert_eq!((x[RIP], x[RAX]), (0x1000, 0));
        r[RAX] = (-4i64) as u64; // EINTR: no restart
        assert_eq!(restart_syscall(&r), r);
        r[ORIG_RAX] = u64::MAX; // not in a system call
        r[RAX] = ERESTARTSYS as u64;
        assert_eq!(restart_syscall(&r), r);
    }
}
