//! Just enough of the i8042 keyboard controller for `reboot=k`: the command port answers "no
//! data", and command 0xfe (pulse the reset line) resets the machine.

use std::sync::Arc;

use super::bus::BusDevice;
use super::power::{ExitRequest, VmExit};

/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    exit: Arc<ExitRequest>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitRequest>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so a guest never waits on us.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_resets() {
        let exit = Arc::new(ExitRequest::new());
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[CMD_RESET_CPU]); // data port: ignored
        assert_eq!(exit.get(), None);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.get(), Some(VmExit::Reset));
    }
}
