//! TAP devices: a guest NIC's frames as a file descriptor on the host. Opened with a virtio-net
//! header in front of every frame, which is what the guest's driver and vhost-net exchange.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Errors creating a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}; load the tun module (`modprobe tun`) and run as root")]
    Open(io::Error),
    #[error("cannot create TAP device `{name}`: {source}; creating TAP devices needs CAP_NET_ADMIN (root)")]
    Create { name: String, source: io::Error },
    #[error("TAP device name `{0}` is longer than 15 bytes")]
    Name(String),
    #[error("cannot set the virtio-net header size of `{name}`: {source}")]
    VnetHeader { name: String, source: io::Error },
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// The virtio-net header of a virtio 1.0 device (`struct virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: libc::c_int = 12;

/// An open TAP device. The kernel removes the device when the last descriptor closes.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Creates a TAP device. `name` may hold `%d` for the kernel to pick a free number
    /// (`ferrytap%d`).
    pub fn create(name: &str) -> Result<Self, TapError> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out (name,
        // flags, padding to the union's size); it lives for the whole call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Create {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(libc::IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        let size = VNET_HDR_LEN;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is, for the call's duration.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(TapError::VnetHeader {
                name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { file, name })
    }

    /// The interface name the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor, for the VMM (vhost-net takes it as its backend).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives up the descriptor.
    pub fn into_file(self) -> File {
        self.file
    }
}

/// TUNSETOFFLOAD: the offloads (`TUN_F_*` flags) that the reader of the TAP `tap` takes
/// (vhost-net, on behalf of the guest's driver).
pub fn set_offload(tap: &impl AsRawFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags) and touches
    // no memory of ours; the kernel checks the descriptor is a TUN/TAP device.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// TUNSETVNETHDRSZ: the size of the virtio-net header in front of each frame on `tap`.
pub fn set_vnet_hdr_len(tap: &impl AsRawFd, len: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which `len` is, alive for the
    // whole call.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETVNETHDRSZ, &len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// TUNGETVNETHDRSZ: the size of the virtio-net header in front of each frame on `tap`.
pub fn vnet_hdr_len(tap: &impl AsRawFd) -> io::Result<libc::c_int> {
    let mut len: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int through the pointer, which `len` is, alive for the
    // whole call.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), TUNGETVNETHDRSZ, &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len)
}
