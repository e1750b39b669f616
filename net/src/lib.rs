//! The host side of guest networking: a TAP device per guest NIC ([`tap`]), plugged into a
//! bridge per local network with the host's address on it ([`bridge`]), and the addresses
//! ferry gives guests ([`addr`]).

pub mod addr;
pub mod bridge;
pub mod tap;

pub use addr::Ipv4Cidr;
pub use bridge::Bridge;
pub use tap::Tap;
