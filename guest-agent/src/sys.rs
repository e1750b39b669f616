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
