//! SIGINT and SIGTERM as an ordinary event: a handler writes the signal number into a pipe,
//! and a thread reads it and calls back, so the VMM can stop cleanly instead of dying.

use std::io::Read;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = num as u8;
        // SAFETY: write(2) is async-signal-safe; `b` lives on this stack frame for the call.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// Calls `f(signal)` on a background thread for every SIGINT or SIGTERM this process receives.
/// Installed once; later calls return an error.
pub fn on_terminate(f: impl Fn(i32) + Send + 'static) -> std::io::Result<()> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if PIPE_WRITE
        .compare_exchange(-1, fds[1], Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err(std::io::Error::other(
            "termination handler already installed",
        ));
    }
    // SAFETY: fds[0] was just created by pipe2 and is owned by nothing else.
    let mut reader = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            while reader.read_exact(&mut b).is_ok() {
                f(b[0] as i32);
            }
        })?;
    Ok(())
}
