//! ferry's guest agent and the protocol it speaks with the host.
//!
//! - [`protocol`]: the frames on the wire, written down once.
//! - [`client`]: the host's side (used by the VMM over the serial port and by the nested host
//!   over TCP).
//! - [`server`]: the agent's side, which the `ferry-agent` binary runs in the guest.
//! - [`procfs`]: the guest's processes and load, read from `/proc` for the agent's answers.
//! - [`migrate`]: process migration: the process image, freezing at the source.
//! - [`vsock`]: AF_VSOCK streams, the guest-host channel when the VMM offers a vsock device.

pub mod client;
pub mod migrate;
pub mod procfs;
pub mod protocol;
pub mod server;
mod sys;
pub mod vsock;

pub use client::{AgentConnection, ClientError, Stream};
pub use protocol::{
    ExecRequest, Hello, LoadInfo, Message, ProcessInfo, ProcessList, PROTOCOL_VERSION,
};
pub use server::Agent;
pub use sys::make_raw;
