//! Emulated devices and the bus that routes port-I/O and MMIO exits to them; [`virtio`] holds the
//! virtio-mmio transport and the virtio devices.

pub mod bus;
pub mod i8042;
pub mod power;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};
pub use power::{ExitRequest, VmExit};
