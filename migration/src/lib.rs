//! ferry's VMM-to-VMM migration: the wire protocol and the engines that move one process's
//! pages from the source VMM's guest memory into the destination VMM's guest memory.
//!
//! - [`protocol`]: the frames on the wire and the order they come in, written down once.
//! - [`checksum`]: the end-to-end checksum over a job's pages, and the zero-page test.

pub mod checksum;
pub mod protocol;

pub use protocol::PROTOCOL_VERSION;
