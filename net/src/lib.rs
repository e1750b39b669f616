//! The host side of guest networking: a TAP device per guest NIC ([`tap`]), plugged into a
//! bridge per local network with the host's address on it ([`bridge`]), and the addresses
//! ferry gives guests ([`addr`]); and the transport between nodes: the cluster's certificate
//! authority ([`pki`]) and mutual TLS with its certificates ([`tls`]).

pub mod addr;
pub mod bridge;
pub mod pki;
pub mod tap;
pub mod tls;

pub use addr::Ipv4Cidr;
pub use bridge::Bridge;
pub use tap::Tap;
