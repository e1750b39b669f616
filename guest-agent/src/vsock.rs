//! AF_VSOCK stream sockets: the agent's channel between a guest and its host (the guest listens
//! on a port, the host connects to the guest's context id). std has no vsock support, so the
//! few socket calls live here, each behind a `// SAFETY:` comment.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::client::Stream;

/// The vsock port the agent listens on in every ferry guest.
pub const AGENT_PORT: u32 = 1024;

/// Context id meaning "any" (for binding a listener).
const VMADDR_CID_ANY: u32 = u32::MAX;

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value, completed below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A connected vsock stream.
pub struct VsockStream {
    file: File,
}

impl VsockStream {
    /// Connects to `port` of context `cid`.
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = new_socket()?;
        let addr = sockaddr(cid, port);
        // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
        check(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        Ok(Self {
            file: File::from(fd),
        })
    }

    /// Connects, retrying while nobody listens yet (a guest still booting), until `timeout`.
    pub fn connect_retrying(cid: u32, port: u32, timeout: Duration) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::connect(cid, port) {
                Ok(s) => return Ok(s),
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.raw_os_error(),
                            Some(
                                libc::ECONNREFUSED
                                    | libc::ECONNRESET
                                    | libc::ETIMEDOUT
                                    | libc::EINTR
                            )
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Shuts both directions down, waking up a reader on another handle.
    pub fn shutdown(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on a socket this stream owns.
        check(unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_RDWR) })
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Stream for VsockStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
        })
    }

    fn set_read_timeout_opt(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            Some(d) => libc::timeval {
                tv_sec: d.as_secs() as libc::time_t,
                tv_usec: d.subsec_micros().max(u32::from(d.is_zero())) as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: `tv` is a valid timeval and the length passed is its size.
        check(unsafe {
            libc::setsockopt(
                self.file.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        })
    }
}

/// A listening vsock socket.
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Listens on `port` for connections from any context (the host, in a guest).
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = new_socket()?;
        let addr = sockaddr(VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen(2) on the socket just bound.
        check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
        Ok(Self { fd })
    }

    /// Waits for the next connection; returns it with the peer's context id.
    pub fn accept(&self) -> io::Result<(VsockStream, u32)> {
        let mut addr = sockaddr(0, 0);
        let mut len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` and `len` are valid for writes of a sockaddr_vm; the new descriptor is
        // checked before use.
        let fd = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                (&mut addr as *mut libc::sockaddr_vm).cast(),
                &mut len,
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok((
            VsockStream {
                file: File::from(owned),
            },
            addr.svm_cid,
        ))
    }
}
