//! The few system calls the `ferry` command makes that std does not wrap. Each is a thin,
//! memory-free call; this is the only module of the `ferry` library, with `terminal` and
//! `signals`, that holds `unsafe` code.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Whether this process runs as root (effective user id 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Takes an flock(2) lock (`libc::LOCK_SH` or `LOCK_EX`, optionally `| LOCK_NB`) on `file`,
/// retrying on EINTR. Returns false if `LOCK_NB` was given and the lock is held elsewhere.
pub fn flock(file: &impl AsRawFd, op: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: flock on a descriptor the caller owns; it only changes the lock state.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// Sends `signal` to every process of the process group `pgid`.
pub fn kill_process_group(pgid: i32, signal: libc::c_int) -> io::Result<()> {
    if pgid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill(2) takes plain integers; a negative pid names a process group.
    if unsafe { libc::kill(-pgid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `signal` to process `pid` (a positive pid: that process only). Failure (the process
/// is gone) is not an error worth reporting to the callers, which check liveness themselves.
pub fn kill(pid: i32, signal: libc::c_int) {
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) takes plain integers; a positive pid names one process.
    unsafe { libc::kill(pid, signal) };
}

/// Makes `cmd`'s program inherit no descriptor of this process beyond 0, 1 and 2: a program
/// that outlives ferry (the nested host's QEMU, a node daemon) would otherwise hold whatever
/// its starter had open, such as a lock taken with flock(1) around `ferry up` or a pipe a
/// caller waits to see closed. Marks them close-on-exec in the child (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`, Linux 5.11+; on an older kernel the child inherits them as before).
pub fn no_inherited_fds(cmd: &mut Command) -> &mut Command {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: the closure runs in the child between fork and exec and makes one raw system
    // call with integer arguments: async-signal-safe, no allocation, no lock. Marking the
    // descriptors close-on-exec (rather than closing them) leaves std's own exec-error pipe
    // working until the exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The descriptors `sh` sees as its own, besides the one `ls` opens to list them.
    fn fds_of_child(cmd: &mut Command) -> Vec<i32> {
        let out = cmd.args(["-c", "ls /proc/$$/fd"]).output().expect("run sh");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect()
    }

    #[test]
    fn started_programs_inherit_only_the_standard_descriptors() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        // SAFETY: dup of a descriptor this test owns; the copy is inheritable (no O_CLOEXEC),
        // as a descriptor from flock(1) or a caller's pipe would be. Closed below.
        let leaked = unsafe { libc::dup(file.as_raw_fd()) };
        assert!(leaked > 2);
        let plain = fds_of_child(&mut Command::new("sh"));
        assert!(
            plain.contains(&leaked),
            "{leaked} not inherited without the fix: {plain:?}"
        );
        let mut cmd = Command::new("sh");
        let fixed = fds_of_child(no_inherited_fds(&mut cmd));
        assert!(!fixed.contains(&leaked), "{leaked} inherited: {fixed:?}");
        assert!(fixed.contains(&1), "stdout is kept: {fixed:?}");
        // SAFETY: closes the copy made above, once.
        unsafe { libc::close(leaked) };
    }
}
