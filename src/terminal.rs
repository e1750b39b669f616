//! The host terminal: raw mode while a guest console is attached, restored when the guard drops
//! or, on a fatal signal, through [`restore`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

/// The settings to put back, while some terminal is raw.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Puts a terminal in raw mode and restores its previous settings when dropped.
pub struct RawMode(());

impl RawMode {
    /// Raw mode on `fd` if it is a terminal; `None` if it is not one (a pipe, a file).
    pub fn enable(fd: &impl AsRawFd) -> io::Result<Option<Self>> {
        let fd = fd.as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; zeroed is a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios for the duration of the call.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios derived from the terminal's own settings.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, saved));
        Ok(Some(Self(())))
    }
}

/// Puts back the settings a [`RawMode`] replaced, if any (safe to call more than once).
pub fn restore() {
    if let Some((fd, saved)) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // SAFETY: restores settings read from this same descriptor by `RawMode::enable`.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}
