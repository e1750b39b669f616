//! Emulated devices and the bus that routes port-I/O and MMIO exits to them.

pub mod bus;
pub mod i8042;
pub mod power;
pub mod serial;

pub use bus::{Bus, BusDevice};
pub use power::{ExitRequest, VmExit};
