//! The few system calls the `ferry` command makes that std does not wrap. Each is a thin,
//! memory-free call; this is the only module of the `ferry` library, with `terminal` and
//! `signals`, that holds `unsafe` code.

use std::io;
use std::os::fd::AsRawFd;

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
