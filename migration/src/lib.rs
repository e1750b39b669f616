//! ferry's VMM-to-VMM migration: the wire protocol and the engines that move one process's
//! pages from the source VMM's guest memory into the destination VMM's guest memory.
//!
//! - [`protocol`]: the frames on the wire and the order they come in, written down once.
//! - [`engine`]: [`engine::send`] (source) and [`engine::receive`] (destination) over any
//!   async byte stream (mutual TLS between nodes), with [`engine::precopy`] rounds before
//!   [`engine::send_after_precopy`] for a process that runs on meanwhile (the destination
//!   building it from its [`engine::outline`] and landing pages in it during the rounds,
//!   [`engine::receive_early`]); reading and writing
//!   guest pages through
//!   [`engine::PageSource`] and [`engine::PageSink`] (implemented for vm-memory's
//!   `GuestMemoryMmap`).
//! - [`postcopy`]: the process resumes at the destination first and its anonymous pages
//!   follow, those it waits for ahead of the rest ([`postcopy::send_postcopy`],
//!   [`postcopy::serve_postcopy`] at the source; [`postcopy::receive_postcopy`] at the
//!   destination, placing pages through the guest agent's staging buffer).
//! - [`checksum`]: the end-to-end checksum over a job's pages, and the zero-page test.

pub mod checksum;
pub mod engine;
pub mod postcopy;
pub mod protocol;

pub use engine::{
    outline, precopy, receive, receive_early, send, send_after_precopy, Early, Incoming, Landed,
    MigrationError, PageError, PageSink, PageSource, Precopied, Stats, Timeouts,
};
pub use postcopy::{receive_postcopy, send_postcopy, serve_postcopy, LazyTarget, PlaceRequest};
pub use protocol::PROTOCOL_VERSION;
