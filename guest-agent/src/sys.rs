//! The few system calls the agent needs that std does not wrap. Every `unsafe` of the crate
//! lives here.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> io::Result<String> {
    // SAFETY: `utsname` is plain old data; all-zero bytes are a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname that outlives the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: uname(2) NUL-terminates every field, and the array outlives the borrow.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

/// The number of online CPUs (`sysconf(_SC_NPROCESSORS_ONLN)`), at least 1.
pub fn online_cpus() -> u32 {
    // SAFETY: sysconf only reads system state.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(1).max(1)
}

/// Clock ticks per second, the unit of `/proc` CPU times (`sysconf(_SC_CLK_TCK)`); 100 if
/// unknown.
pub fn clock_ticks_per_sec() -> u32 {
    // SAFETY: sysconf only reads system state.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u32::try_from(n).ok().filter(|&n| n > 0).unwrap_or(100)
}

/// `clock`'s current time in nanoseconds (`clock_gettime(2)`), as this process sees it.
pub fn clock_ns(clock: libc::clockid_t) -> io::Result<i64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ts.tv_sec * 1_000_000_000 + ts.tv_nsec)
}

/// The page size in bytes (`sysconf(_SC_PAGESIZE)`); 4096 if unknown.
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads system state.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Puts a terminal into raw mode (`cfmakeraw`: no echo, no line editing, no output processing,
/// 8 data bits), ignoring modem control lines so reads never wait for a carrier.
pub fn make_raw(tty: &impl AsRawFd) -> io::Result<()> {
    let fd = tty.as_raw_fd();
    // SAFETY: `termios` is plain old data; all-zero bytes are a valid value.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor borrowed from `tty`; `t` is valid and writable.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `t` is a valid termios filled in by tcgetattr.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: `fd` is open and `t` is a valid termios that outlives the call.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open; discarding unread input is harmless.
    unsafe { libc::tcflush(fd, libc::TCIFLUSH) };
    Ok(())
}

/// Stops every other process, flushes the file systems, remounts the root read-only (so an
/// ext4 root disk needs no journal replay at its next boot) and powers the machine off.
/// Returns only if the kernel refused (e.g. not running as root), with the reason.
pub fn power_off() -> io::Error {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: kill(2) with pid -1 signals every process but init and the caller; no memory.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    std::thread::sleep(std::time::Duration::from_millis(50));
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: the paths are NUL-terminated literals; a failed remount (an initramfs root, a
    // busy file system) changes nothing and is ignored.
    unsafe {
        libc::mount(
            c"/".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    // SAFETY: reboot(2) with a valid command; it either powers off or returns an error.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
    io::Error::last_os_error()
}

/// Sends `signal` (e.g. `libc::SIGTERM`) to a process.
pub fn kill(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a positive pid signals only that process; failure is harmless.
    unsafe { libc::kill(pid, signal) };
}

/// Makes `cmd` chroot into `root` and change to `cwd` (a path inside the new root) in the
/// child, just before it runs the program.
pub fn chroot_before_exec(cmd: &mut Command, root: &Path, cwd: &str) -> io::Result<()> {
    let invalid = |_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte");
    let root = CString::new(root.as_os_str().as_encoded_bytes()).map_err(invalid)?;
    let cwd = CString::new(cwd).map_err(invalid)?;
    let chroot = move || {
        // SAFETY: both are NUL-terminated strings owned by the closure; chroot(2) and chdir(2)
        // are async-signal-safe, so they may run between fork and exec.
        let rc = unsafe {
            if libc::chroot(root.as_ptr()) != 0 {
                -1
            } else {
                libc::chdir(cwd.as_ptr())
            }
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: the closure only makes async-signal-safe system calls and allocates nothing
    // (the error value for an OS error is not heap-allocated).
    unsafe { cmd.pre_exec(chroot) };
    Ok(())
}

/// Detaches the child of `cmd` just before it runs the program: the leader of a new session
/// (setsid(2): no controlling terminal, a process group of its own, out of reach of what is
/// sent to the agent's group), and every descriptor from 3 up marked close-on-exec, so that
/// nothing the agent's process happens to hold open (a socket, a pipe) is inherited and keeps
/// the program from migrating.
pub fn detach_before_exec(cmd: &mut Command) {
    let detach = || {
        // SAFETY: setsid(2) takes no arguments and is async-signal-safe.
        if unsafe { libc::setsid() } == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: close_range(2) with plain integer arguments; CLOSE_RANGE_CLOEXEC only sets
        // flags (std's own exec-error pipe is close-on-exec already). Kernels before 5.11 do
        // not know the flag: the descriptors are then left as they are.
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        Ok(())
    };
    // SAFETY: the closure makes only async-signal-safe system calls and allocates nothing
    // (the error value for an OS error is not heap-allocated).
    unsafe { cmd.pre_exec(detach) };
}

// --- migration: restore ---
// ptrace, waitpid, clone3 and prlimit for the destination side of a migration
// (`crate::migrate::inject` runs system calls inside a stopped tracee; `crate::migrate::restore`
// builds a process there). Every ptrace request must come from the thread that is the tracer.

/// How [`ptrace_resume`] lets a stopped tracee go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// PTRACE_SYSCALL: run until the next system-call entry or exit.
    Syscall,
    /// PTRACE_DETACH: stop tracing and run.
    Detach,
}

/// The rseq area the kernel knows for a thread (PTRACE_GET_RSEQ_CONFIGURATION).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqConfig {
    /// Address of the `struct rseq`; 0 if none is registered.
    pub pointer: u64,
    /// Its registered size.
    pub size: u32,
    /// The abort-handler signature it was registered with.
    pub signature: u32,
}

fn pid_arg(pid: u32) -> io::Result<libc::pid_t> {
    libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))
}

/// One ptrace(2) request whose result is 0 or -1 with errno.
fn ptrace_raw(request: libc::c_uint, pid: u32, addr: usize, data: usize) -> io::Result<()> {
    let pid = pid_arg(pid)?;
    // SAFETY: every caller passes, for its request, either plain integers or pointers to
    // buffers of the size that request reads or writes, which outlive the call.
    let rc = unsafe { libc::ptrace(request, pid, addr, data) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// PTRACE_GETREGS.
pub fn ptrace_getregs(pid: u32) -> io::Result<libc::user_regs_struct> {
    // SAFETY: `user_regs_struct` is plain old data; all-zero bytes are a valid value.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    ptrace_raw(
        libc::PTRACE_GETREGS,
        pid,
        0,
        &mut regs as *mut libc::user_regs_struct as usize,
    )?;
    Ok(regs)
}

/// PTRACE_SETREGS.
pub fn ptrace_setregs(pid: u32, regs: &libc::user_regs_struct) -> io::Result<()> {
    ptrace_raw(
        libc::PTRACE_SETREGS,
        pid,
        0,
        regs as *const libc::user_regs_struct as usize,
    )
}

/// PTRACE_GETREGSET of the register set `note` (e.g. `NT_X86_XSTATE`) into `buf`; returns
/// the bytes the kernel filled.
pub fn ptrace_getregset(pid: u32, note: u32, buf: &mut [u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    ptrace_raw(
        libc::PTRACE_GETREGSET,
        pid,
        note as usize,
        &mut iov as *mut libc::iovec as usize,
    )?;
    Ok(iov.iov_len)
}

/// PTRACE_SETREGSET of the register set `note` from `buf`.
pub fn ptrace_setregset(pid: u32, note: u32, buf: &[u8]) -> io::Result<()> {
    // The kernel only reads through `iov_base` for SETREGSET.
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    ptrace_raw(
        libc::PTRACE_SETREGSET,
        pid,
        note as usize,
        &mut iov as *mut libc::iovec as usize,
    )
}

/// PTRACE_SETOPTIONS (replaces all options).
pub fn ptrace_setoptions(pid: u32, options: u32) -> io::Result<()> {
    ptrace_raw(libc::PTRACE_SETOPTIONS, pid, 0, options as usize)
}

/// Lets a stopped tracee go on, delivering `signal` (0 for none).
pub fn ptrace_resume(pid: u32, how: Resume, signal: i32) -> io::Result<()> {
    let request = match how {
        Resume::Syscall => libc::PTRACE_SYSCALL,
        Resume::Detach => libc::PTRACE_DETACH,
    };
    let signal = usize::try_from(signal)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "negative signal"))?;
    ptrace_raw(request, pid, 0, signal)
}

/// PTRACE_GET_RSEQ_CONFIGURATION (Linux 5.13+).
pub fn ptrace_rseq_configuration(pid: u32) -> io::Result<RseqConfig> {
    // SAFETY: the struct is plain old data; all-zero bytes are a valid value.
    let mut conf: libc::ptrace_rseq_configuration = unsafe { std::mem::zeroed() };
    ptrace_raw(
        libc::PTRACE_GET_RSEQ_CONFIGURATION,
        pid,
        std::mem::size_of::<libc::ptrace_rseq_configuration>(),
        &mut conf as *mut libc::ptrace_rseq_configuration as usize,
    )?;
    Ok(RseqConfig {
        pointer: conf.rseq_abi_pointer,
        size: conf.rseq_abi_size,
        signature: conf.signature,
    })
}

/// waitpid(pid, __WALL) until it reports something; returns the raw status.
pub fn wait_status(pid: u32) -> io::Result<i32> {
    let pid = pid_arg(pid)?;
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid, writable int that outlives the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if rc == pid {
            return Ok(status);
        }
        let err = io::Error::last_os_error();
        if rc == -1 && err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Creates a child process that asks to be traced by the calling thread (PTRACE_TRACEME),
/// starts a session of its own, drops the alternate signal stack, closes every descriptor
/// and stops itself with SIGSTOP; the caller then waits for that stop and drives the child
/// by ptrace alone. Its address space is still a copy of this process's.
///
/// With `set_tid`, clone3(2) is asked for that pid in this pid namespace (root only; fails
/// with e.g. EEXIST if it is taken); without, clone3 (or clone(2) where clone3 is refused
/// with ENOSYS, as some seccomp profiles do) picks one. Returns the child's pid.
pub fn spawn_traced_stopped(set_tid: Option<u32>) -> io::Result<u32> {
    let tids: [libc::pid_t; 1] = [match set_tid {
        Some(t) => pid_arg(t)?,
        None => 0,
    }];
    // SAFETY: `clone_args` is plain old data; all-zero bytes are a valid value.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.exit_signal = libc::SIGCHLD as u64;
    if set_tid.is_some() {
        args.set_tid = tids.as_ptr() as u64;
        args.set_tid_size = 1;
    }
    // SAFETY: clone3 without CLONE_VM gives the child a copy of the address space, as fork
    // does, and returns in both processes on their own stacks; `args` and `tids` are valid
    // for the call. The child only runs `become_stopped_tracee`, which never returns.
    let mut rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if rc == -1
        && set_tid.is_none()
        && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS)
    {
        // SAFETY: as for clone3: a fork-like clone with no stack or TLS change.
        rc = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::SIGCHLD as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
            )
        };
    }
    match rc {
        0 => become_stopped_tracee(),
        -1 => Err(io::Error::last_os_error()),
        pid => u32::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "clone returned a bad pid")),
    }
}

/// The child's side of [`spawn_traced_stopped`]. It is a copy of a possibly multi-threaded
/// process, so it makes raw system calls only: no allocation, no locks, no libc state.
fn become_stopped_tracee() -> ! {
    let no_stack = libc::stack_t {
        ss_sp: std::ptr::null_mut(),
        ss_flags: libc::SS_DISABLE,
        ss_size: 0,
    };
    // SAFETY: raw system calls with integer arguments or pointers to the local `no_stack`;
    // none allocates or takes a lock; _exit is exit_group(2) and ends the process.
    unsafe {
        if libc::syscall(
            libc::SYS_ptrace,
            libc::PTRACE_TRACEME as libc::c_long,
            0,
            0,
            0,
        ) == 0
        {
            libc::syscall(libc::SYS_setsid);
            libc::syscall(
                libc::SYS_sigaltstack,
                &no_stack as *const libc::stack_t,
                std::ptr::null_mut::<libc::stack_t>(),
            );
            libc::syscall(
                libc::SYS_close_range,
                0 as libc::c_long,
                libc::c_long::from(u32::MAX),
                0 as libc::c_long,
            );
            let me = libc::syscall(libc::SYS_getpid);
            libc::syscall(libc::SYS_kill, me, libc::SIGSTOP as libc::c_long);
        }
        libc::_exit(127)
    }
}

/// prlimit64(pid, resource, {cur, max}) from outside the process.
pub fn set_rlimit(pid: u32, resource: u32, cur: u64, max: u64) -> io::Result<()> {
    let pid = pid_arg(pid)?;
    let limit = libc::rlimit64 {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: `limit` is a valid rlimit64 that outlives the call; no old value is asked for.
    let rc = unsafe {
        libc::prlimit64(
            pid,
            resource as libc::__rlimit_resource_t,
            &limit,
            std::ptr::null_mut(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
// --- end migration: restore ---

// --- migration: dump ---

/// `PTRACE_GETREGS`.
const PTRACE_GETREGS: libc::c_long = 12;
/// `PTRACE_SETREGS`.
const PTRACE_SETREGS: libc::c_long = 13;
/// `PTRACE_DETACH`.
const PTRACE_DETACH: libc::c_long = 17;
/// `PTRACE_CONT`.
const PTRACE_CONT: libc::c_long = 7;
/// `PTRACE_SYSCALL`.
const PTRACE_SYSCALL: libc::c_long = 24;
/// `PTRACE_GETSIGINFO`.
const PTRACE_GETSIGINFO: libc::c_long = 0x4202;
/// `PTRACE_GETREGSET`.
const PTRACE_GETREGSET: libc::c_long = 0x4204;
/// `PTRACE_SEIZE`.
const PTRACE_SEIZE: libc::c_long = 0x4206;
/// `PTRACE_INTERRUPT`.
const PTRACE_INTERRUPT: libc::c_long = 0x4207;
/// `PTRACE_GETSIGMASK`.
const PTRACE_GETSIGMASK: libc::c_long = 0x420a;
/// `PTRACE_GET_SYSCALL_INFO` (Linux 5.3).
const PTRACE_GET_SYSCALL_INFO: libc::c_long = 0x420e;
/// `NT_X86_XSTATE`, the regset of the FPU/SSE/AVX state.
const NT_X86_XSTATE: libc::c_long = 0x202;
/// The largest xstate area asked for (AMX tiles make it about 11 KiB today).
const XSTATE_MAX: usize = 64 * 1024;

/// The 27 registers of x86-64's `struct user_regs_struct`, in its order (`r15` first,
/// `rax` at 10, `orig_rax` at 15, `rip` at 16, `rsp` at 19, `fs_base` at 21).
pub type UserRegs = [u64; 27];

/// A `pid_t` for `pid`, or EINVAL for one that does not fit.
fn pid_t(pid: u32) -> io::Result<libc::pid_t> {
    libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// ptrace(2) through syscall(2), so the request's type is the same on glibc and musl.
///
/// # Safety
///
/// `addr` and `data` must be what `request` expects: integers the kernel does not
/// dereference, or pointers to live buffers of the size the request reads or writes.
unsafe fn ptrace(
    request: libc::c_long,
    pid: u32,
    addr: *mut libc::c_void,
    data: *mut libc::c_void,
) -> io::Result<libc::c_long> {
    let pid = pid_t(pid)?;
    // SAFETY: the caller guarantees `addr` and `data` fit `request` (this fn's contract).
    let rc = unsafe { libc::syscall(libc::SYS_ptrace, request, pid, addr, data) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// PTRACE_SEIZE with PTRACE_O_TRACESYSGOOD (system-call stops tell themselves apart, which
/// PTRACE_GET_SYSCALL_INFO needs): the calling *thread* becomes the tracer, the process runs
/// on. Every later ptrace call for `pid` must come from this same thread.
pub fn ptrace_seize(pid: u32) -> io::Result<()> {
    let options = libc::PTRACE_O_TRACESYSGOOD as usize as *mut libc::c_void;
    // SAFETY: addr is 0 and data the options by value; nothing is dereferenced.
    unsafe { ptrace(PTRACE_SEIZE, pid, std::ptr::null_mut(), options).map(drop) }
}

/// PTRACE_INTERRUPT: asks a seized tracee to stop (an event stop).
pub fn ptrace_interrupt(pid: u32) -> io::Result<()> {
    // SAFETY: addr and data are 0; nothing is dereferenced.
    unsafe {
        ptrace(
            PTRACE_INTERRUPT,
            pid,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .map(drop)
    }
}

/// PTRACE_DETACH, delivering `signal` (0 for none) as the tracee resumes.
pub fn ptrace_detach(pid: u32, signal: i32) -> io::Result<()> {
    let data = signal as usize as *mut libc::c_void;
    // SAFETY: addr is 0 and data a signal number by value; nothing is dereferenced.
    unsafe { ptrace(PTRACE_DETACH, pid, std::ptr::null_mut(), data).map(drop) }
}

/// PTRACE_CONT without a signal (a signal-delivery stop's signal is suppressed).
pub fn ptrace_cont(pid: u32) -> io::Result<()> {
    // SAFETY: addr and data are 0; nothing is dereferenced.
    unsafe { ptrace(PTRACE_CONT, pid, std::ptr::null_mut(), std::ptr::null_mut()).map(drop) }
}

/// PTRACE_SYSCALL without a signal: run to the next system-call entry or exit stop.
pub fn ptrace_syscall(pid: u32) -> io::Result<()> {
    // SAFETY: addr and data are 0; nothing is dereferenced.
    unsafe {
        ptrace(
            PTRACE_SYSCALL,
            pid,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .map(drop)
    }
}

/// PTRACE_GETREGS.
pub fn ptrace_get_regs(pid: u32) -> io::Result<UserRegs> {
    let mut regs: UserRegs = [0; 27];
    // SAFETY: data points at 27 writable u64s, exactly `struct user_regs_struct` on x86-64.
    unsafe {
        ptrace(
            PTRACE_GETREGS,
            pid,
            std::ptr::null_mut(),
            regs.as_mut_ptr().cast(),
        )
    }?;
    Ok(regs)
}

/// PTRACE_SETREGS.
pub fn ptrace_set_regs(pid: u32, regs: &UserRegs) -> io::Result<()> {
    let mut copy = *regs;
    // SAFETY: data points at 27 u64s, exactly `struct user_regs_struct`; the kernel only reads it.
    unsafe {
        ptrace(
            PTRACE_SETREGS,
            pid,
            std::ptr::null_mut(),
            copy.as_mut_ptr().cast(),
        )
    }
    .map(drop)
}

/// The FPU/SSE/AVX state: PTRACE_GETREGSET NT_X86_XSTATE, as long as the kernel makes it; on
/// a CPU without XSAVE (the kernel answers ENODEV), the 512-byte FXSAVE area (NT_PRFPREG).
pub fn ptrace_get_xstate(pid: u32) -> io::Result<Vec<u8>> {
    match ptrace_get_regset_vec(pid, NT_X86_XSTATE) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => ptrace_get_regset_vec(pid, NT_PRFPREG),
        other => other,
    }
}

/// `NT_PRFPREG`, the regset of the FPU/SSE state in FXSAVE layout (512 bytes).
pub const NT_PRFPREG: libc::c_long = 2;

fn ptrace_get_regset_vec(pid: u32, note: libc::c_long) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: addr is the regset number by value; data points at an iovec describing `buf`, which
    // is writable for iov_len bytes. The kernel writes at most iov_len bytes and stores the
    // length it wrote back into iov_len.
    unsafe {
        ptrace(
            PTRACE_GETREGSET,
            pid,
            note as usize as *mut libc::c_void,
            (&mut iov as *mut libc::iovec).cast(),
        )
    }?;
    buf.truncate(iov.iov_len.min(XSTATE_MAX));
    Ok(buf)
}

/// PTRACE_GETSIGMASK: the blocked signals (bit `n - 1` for signal `n`).
pub fn ptrace_get_sigmask(pid: u32) -> io::Result<u64> {
    let mut mask: u64 = 0;
    // SAFETY: addr is sizeof(sigset_t) by value (8, the kernel's); data points at a writable u64.
    unsafe {
        ptrace(
            PTRACE_GETSIGMASK,
            pid,
            8usize as *mut libc::c_void,
            (&mut mask as *mut u64).cast(),
        )
    }?;
    Ok(mask)
}

/// PTRACE_GETSIGINFO: `(si_signo, si_code)` of the current stop.
pub fn ptrace_get_siginfo(pid: u32) -> io::Result<(i32, i32)> {
    // siginfo_t is 128 bytes: si_signo at 0, si_errno at 4, si_code at 8.
    let mut info = [0u8; 128];
    // SAFETY: data points at 128 writable bytes, the size of siginfo_t.
    unsafe {
        ptrace(
            PTRACE_GETSIGINFO,
            pid,
            std::ptr::null_mut(),
            info.as_mut_ptr().cast(),
        )
    }?;
    let word = |at: usize| i32::from_ne_bytes(info[at..at + 4].try_into().unwrap_or([0; 4]));
    Ok((word(0), word(8)))
}

/// PTRACE_GET_SYSCALL_INFO's `op`: 0 none (not a system-call stop), 1 entry, 2 exit,
/// 3 seccomp.
pub fn ptrace_syscall_op(pid: u32) -> io::Result<u8> {
    let mut info = [0u8; 88];
    // SAFETY: addr is the buffer's size by value; data points at that many writable bytes. The
    // kernel writes at most that many.
    unsafe {
        ptrace(
            PTRACE_GET_SYSCALL_INFO,
            pid,
            info.len() as *mut libc::c_void,
            info.as_mut_ptr().cast(),
        )
    }?;
    Ok(info[0])
}

/// One resource limit of another process, `(soft, hard)` (`u64::MAX` is infinity).
pub fn prlimit_get(pid: u32, resource: u32) -> io::Result<(u64, u64)> {
    let pid = pid_t(pid)?;
    let mut old = [0u64; 2];
    // SAFETY: prlimit64 with a NULL new limit only writes the old one into `old`, two
    // writable u64s laid out as `struct rlimit64`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            pid,
            resource as libc::c_long,
            std::ptr::null::<u64>(),
            old.as_mut_ptr(),
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok((old[0], old[1]))
}

/// What `waitpid` reported for a child or tracee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// Nothing to report yet.
    Nothing,
    /// Stopped: the signal and the ptrace event (`status >> 16`).
    Stopped {
        /// `WSTOPSIG`.
        signal: i32,
        /// The `PTRACE_EVENT_*`, 0 for a signal-delivery stop.
        event: i32,
    },
    /// Exited with a status.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
    /// Resumed (`WIFCONTINUED`).
    Continued,
}

/// `waitpid(pid, WNOHANG | __WALL)`: consumes one pending report for a child or tracee.
/// `ECHILD` when `pid` is neither (any more).
pub fn waitpid_nohang(pid: u32) -> io::Result<WaitStatus> {
    let p = pid_t(pid)?;
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid, writable int for the call.
    let rc = unsafe { libc::waitpid(p, &mut status, libc::WNOHANG | libc::__WALL) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    if rc == 0 {
        return Ok(WaitStatus::Nothing);
    }
    Ok(decode_wait_status(status))
}

/// Blocks until `pid` (a child) exits or is killed, skipping stop reports (a tracer in the
/// same process may stop it: ptrace stops are reported to every thread of the parent).
/// Returns the exit status as `waitpid` gives it.
pub fn wait_exit(pid: u32) -> io::Result<libc::c_int> {
    let p = pid_t(pid)?;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable int for the call.
        let rc = unsafe { libc::waitpid(p, &mut status, libc::__WALL) };
        if rc == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Ok(status);
        }
    }
}

fn decode_wait_status(status: libc::c_int) -> WaitStatus {
    if libc::WIFEXITED(status) {
        WaitStatus::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        WaitStatus::Signaled(libc::WTERMSIG(status))
    } else if libc::WIFSTOPPED(status) {
        WaitStatus::Stopped {
            signal: libc::WSTOPSIG(status),
            event: (status >> 16) & 0xff,
        }
    } else {
        WaitStatus::Continued
    }
}

// --- end migration: dump ---

// --- migration: post-copy ---

/// `UFFD_API`, the userfaultfd API version.
const UFFD_API: u64 = 0xaa;
/// `UFFDIO_API`: `_IOWR(0xaa, 0x3f, struct uffdio_api)`.
pub const UFFDIO_API: u64 = 0xc018_aa3f;
/// `UFFDIO_REGISTER`: `_IOWR(0xaa, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `UFFDIO_COPY`: `_IOWR(0xaa, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
/// `UFFDIO_ZEROPAGE`: `_IOWR(0xaa, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `UFFD_FEATURE_EVENT_FORK`: a fork is reported with a new userfaultfd for the child, whose
/// copies of the registered ranges stay registered (needs CAP_SYS_PTRACE of whoever does
/// UFFDIO_API).
const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP`: mremap of a registered range is reported, and the range
/// stays registered at its new place.
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_EVENT_REMOVE`: MADV_DONTNEED (or MADV_FREE, MADV_REMOVE) is reported.
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_EVENT_UNMAP`: munmap (and an mremap that shrinks) is reported.
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// `UFFD_EVENT_PAGEFAULT`.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_FORK`.
const UFFD_EVENT_FORK: u8 = 0x13;
/// `UFFD_EVENT_REMAP`.
const UFFD_EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_REMOVE`.
const UFFD_EVENT_REMOVE: u8 = 0x15;
/// `UFFD_EVENT_UNMAP`.
const UFFD_EVENT_UNMAP: u8 = 0x16;
/// Bytes of one `struct uffd_msg`.
const UFFD_MSG_LEN: usize = 32;

/// What a userfaultfd reports (`struct uffd_msg`). The process's threads that caused a
/// fork, remap, remove or unmap wait in the kernel until it is read, and UFFDIO_COPY answers
/// EAGAIN in the meantime.
#[derive(Debug)]
pub enum UffdEvent {
    /// A thread waits for the page at this (page-aligned) address.
    Fault(u64),
    /// The process forked: the child's userfaultfd (installed in this process by the read),
    /// for the child's copies of the registered ranges, whose missing pages are missing there
    /// too.
    Fork(std::os::fd::OwnedFd),
    /// `len` bytes moved from `from` to `to` (mremap), their pages with them.
    Remap { from: u64, to: u64, len: u64 },
    /// The pages of `start..end` were dropped (MADV_DONTNEED and the like): they read as
    /// zeros from now on.
    Remove { start: u64, end: u64 },
    /// `start..end` was unmapped.
    Unmap { start: u64, end: u64 },
}

/// Takes descriptor `fd` of process `pid` into this one (pidfd_open + pidfd_getfd, Linux
/// 5.6+; needs ptrace rights over it).
pub fn take_fd(pid: u32, fd: u64) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid = pid_arg(pid)?;
    // SAFETY: pidfd_open with integer arguments; the result is a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `pidfd` is a descriptor this call just opened and nothing else owns.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd with integer arguments; the result is a new descriptor or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `got` is a descriptor the call just installed here and nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(got as i32) })
}

/// The `struct uffdio_api` for [`UFFD_API`] asking for the remap, remove and unmap events,
/// and with `forks` the fork event (the bytes for UFFDIO_API inside another process):
/// without them the kernel would drop a moved range's registration, and its pages still to
/// come would read as zeros, a page the process dropped would come back with its old
/// contents, and a child forked meanwhile would read zeros where pages were still to come.
/// With the fork event, a fork waits until the event is read.
pub fn uffdio_api_bytes(forks: bool) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&UFFD_API.to_le_bytes());
    let mut features =
        UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;
    if forks {
        features |= UFFD_FEATURE_EVENT_FORK;
    }
    b[8..16].copy_from_slice(&features.to_le_bytes());
    b
}

/// A `struct uffdio_register` for `start..start+len` in missing-page mode.
pub fn uffdio_register_bytes(start: u64, len: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&start.to_le_bytes());
    b[8..16].copy_from_slice(&len.to_le_bytes());
    b[16..24].copy_from_slice(&UFFDIO_REGISTER_MODE_MISSING.to_le_bytes());
    b
}

/// Copies `len` bytes at `src` (this process's memory) into the registered range at `dst` of
/// the userfaultfd's process, waking any thread that waits for them. Returns the bytes
/// copied; on an error, the bytes copied before it and the error.
pub fn uffd_copy(uffd: &impl AsRawFd, dst: u64, src: &[u8]) -> Result<u64, (u64, io::Error)> {
    let mut arg = [0u64; 5];
    arg[0] = dst;
    arg[1] = src.as_ptr() as u64;
    arg[2] = src.len() as u64;
    // SAFETY: UFFDIO_COPY reads `src.len()` bytes from `src` (a live slice) and reads and
    // writes the 40-byte `struct uffdio_copy` at `arg`, valid and writable for the call; it
    // writes only into the other process's registered range.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, arg.as_mut_ptr()) };
    let copied = if (arg[4] as i64) > 0 { arg[4] } else { 0 };
    if rc != 0 {
        return Err((copied, io::Error::last_os_error()));
    }
    Ok(copied)
}

/// Maps the zero page at `dst..dst+len` of the userfaultfd's process, waking waiters.
pub fn uffd_zeropage(uffd: &impl AsRawFd, dst: u64, len: u64) -> Result<u64, (u64, io::Error)> {
    let mut arg = [dst, len, 0, 0];
    // SAFETY: UFFDIO_ZEROPAGE reads and writes the 32-byte `struct uffdio_zeropage` at
    // `arg`, valid and writable for the call.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE, arg.as_mut_ptr()) };
    let done = if (arg[3] as i64) > 0 { arg[3] } else { 0 };
    if rc != 0 {
        return Err((done, io::Error::last_os_error()));
    }
    Ok(done)
}

/// Waits up to `wait_ms` for any of `fds` to be readable (a signal ends the wait early).
pub fn wait_readable(fds: &[std::os::fd::BorrowedFd<'_>], wait_ms: i32) -> io::Result<()> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a live array of `pfds.len()` valid pollfds that outlives the call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// The events pending on a (non-blocking) userfaultfd, in order, about `max` at most; none
/// when nothing is pending (see [`wait_readable`]).
pub fn uffd_events(uffd: &impl AsRawFd, max: usize) -> io::Result<Vec<UffdEvent>> {
    let mut out = Vec::new();
    let mut buf = [0u8; UFFD_MSG_LEN * 64];
    while out.len() < max {
        // SAFETY: read(2) into `buf`, valid and writable for its whole length.
        let n = unsafe { libc::read(uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => break,
                Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
        if n == 0 {
            break;
        }
        for msg in buf[..n as usize].chunks_exact(UFFD_MSG_LEN) {
            let word = |at: usize| u64::from_le_bytes(msg[at..at + 8].try_into().expect("8 bytes"));
            out.push(match msg[0] {
                UFFD_EVENT_PAGEFAULT => UffdEvent::Fault(word(16) & !4095),
                UFFD_EVENT_FORK => {
                    use std::os::fd::FromRawFd;
                    let ufd = u32::from_le_bytes(msg[8..12].try_into().expect("4 bytes"));
                    // SAFETY: the kernel installed this descriptor in this process for the
                    // read that returned the event, and nothing else owns it.
                    UffdEvent::Fork(unsafe { std::os::fd::OwnedFd::from_raw_fd(ufd as i32) })
                }
                UFFD_EVENT_REMAP => UffdEvent::Remap {
                    from: word(8),
                    to: word(16),
                    len: word(24),
                },
                UFFD_EVENT_REMOVE => UffdEvent::Remove {
                    start: word(8),
                    end: word(16),
                },
                UFFD_EVENT_UNMAP => UffdEvent::Unmap {
                    start: word(8),
                    end: word(16),
                },
                _ => continue,
            });
        }
    }
    Ok(out)
}

/// Anonymous memory of this process that stays in place: mapped, every page faulted in,
/// locked (mlock) and kept out of transparent huge pages, so the guest frames behind it
/// stay the same while the VMM writes into them.
#[derive(Debug)]
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
}

impl PinnedBuffer {
    /// A buffer of `len` bytes (a multiple of the page size).
    pub fn new(len: usize) -> io::Result<Self> {
        let ptr = anonymous_mapping(len)?;
        let mut buf = PinnedBuffer {
            ptr: ptr.cast(),
            len,
        };
        // SAFETY: madvise and mlock over the mapping just made, which `buf` owns.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE);
            if libc::mlock(ptr, len) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // mlock faults every page in; write them so each is this process's own.
        for page in buf.as_slice_mut().chunks_mut(4096) {
            page[0] = 0;
        }
        Ok(buf)
    }

    /// The buffer's address in this process.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is a live read-write mapping that this value owns.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The buffer's bytes, for writing.
    pub fn as_slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`, borrowed mutably through `self`. (The VMM writes these
        // frames from outside the guest; the agent reads them only once the VMM said it is
        // done, by a request on the connection.)
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping this value owns; no reference to it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A new private anonymous read-write mapping of `len` bytes at an address of the kernel's
/// choosing, none of it touched yet; the caller owns it.
fn anonymous_mapping(len: usize) -> io::Result<*mut libc::c_void> {
    // SAFETY: a new anonymous private mapping; nothing else refers to it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(ptr)
}

/// For tests: a fresh private anonymous mapping of `len` bytes that nothing touched yet; it
/// stays for the life of the test process (tests reach it through /proc/self/mem, never by
/// a Rust reference).
#[cfg(test)]
pub(crate) fn untouched_mapping(len: usize) -> io::Result<u64> {
    anonymous_mapping(len).map(|p| p as u64)
}

/// For tests: the byte at `addr` of this process, read as a thread of the process would (so a
/// missing page of a registered range waits for the userfaultfd's answer).
#[cfg(test)]
pub(crate) fn read_byte(addr: u64) -> u8 {
    // SAFETY: tests pass an address inside a mapping they made and keep for the test's life
    // (`untouched_mapping`); a volatile read of one byte of it.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

/// For tests: madvise(MADV_DONTNEED) over `addr..addr+len` of this process.
#[cfg(test)]
pub(crate) fn drop_pages(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: tests pass a range of a mapping they made, which no Rust reference covers.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// For tests: moves `len` bytes of this process at `from` to `to` (mremap, MREMAP_FIXED).
#[cfg(test)]
pub(crate) fn move_pages(from: u64, len: u64, to: u64) -> io::Result<()> {
    // SAFETY: tests pass ranges of mappings they made, which no Rust reference covers; `to`
    // is replaced by the moved pages.
    let got = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            len as usize,
            len as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    if got == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// For tests: a userfaultfd of this process with `start..start+len` registered for missing
/// pages (what the skeleton does inside the migrated process by injected system calls).
#[cfg(test)]
pub(crate) fn own_userfaultfd(start: u64, len: u64) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: userfaultfd(2) with integer flags; the result is a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // Without the fork event: a fork of the test process (there is none meant) would wait
    // for a read nobody does.
    let mut api = uffdio_api_bytes(false);
    let mut reg = uffdio_register_bytes(start, len);
    for (request, arg) in [
        (UFFDIO_API, api.as_mut_ptr()),
        (UFFDIO_REGISTER, reg.as_mut_ptr()),
    ] {
        // SAFETY: UFFDIO_API and UFFDIO_REGISTER read and write their struct at `arg`, a live
        // byte array of the struct's size.
        if unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::c_ulong, arg) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

// --- end migration: post-copy ---

/// Where the kernel says whether compaction may migrate mlocked pages.
pub const COMPACT_UNEVICTABLE: &str = "/proc/sys/vm/compact_unevictable_allowed";

/// Stops compaction from moving mlocked pages (`vm.compact_unevictable_allowed = 0`), so
/// the frames a migration pins and reports to the VMM stay those pages' frames until the
/// VMM wrote them (see `crate::migrate::restore`). Reclaim never touches mlocked pages;
/// only compaction (on by default for them) would move them.
pub fn keep_locked_pages_in_place() -> io::Result<()> {
    std::fs::write(COMPACT_UNEVICTABLE, "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_matches_proc() {
        let proc = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(kernel_release().unwrap(), proc.trim());
    }

    #[test]
    fn online_cpus_is_at_least_one() {
        assert!(online_cpus() >= 1);
    }

    #[test]
    fn clock_ticks_and_page_size_are_plausible() {
        assert!((1..=10_000).contains(&clock_ticks_per_sec()));
        assert!(page_size() >= 4096 && page_size().is_power_of_two());
    }

    #[test]
    fn make_raw_rejects_a_non_terminal() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(make_raw(&f).is_err());
    }
}
