//! How the guest ends the VM: ACPI sleep/reset registers (hardware-reduced ACPI, as described in
//! the FADT) and the shared exit request that devices and vCPUs raise.

use std::sync::{Condvar, Mutex};

use super::bus::{lock, BusDevice};

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042 pulse).
    Reset,
    /// The guest triple-faulted; the text is the vCPU's state at that moment.
    TripleFault(String),
    /// The VMM was asked to stop (signal, API).
    Stopped,
    /// A vCPU failed; the message says how.
    Error(String),
}

/// The first exit reason raised wins; the VMM waits on it.
#[derive(Default)]
pub struct ExitRequest {
    reason: Mutex<Option<VmExit>>,
    cond: Condvar,
}

impl ExitRequest {
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises `exit` unless another reason was raised first.
    pub fn request(&self, exit: VmExit) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            *r = Some(exit);
            self.cond.notify_all();
        }
    }

    /// The reason raised so far, if any.
    pub fn get(&self) -> Option<VmExit> {
        lock(&self.reason).clone()
    }

    /// Blocks until a reason is raised.
    pub fn wait(&self) -> VmExit {
        let mut r = lock(&self.reason);
        loop {
            if let Some(e) = r.clone() {
                return e;
            }
            r = self.cond.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until a reason is raised or `timeout` passes.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<VmExit> {
        let r = lock(&self.reason);
        let (r, _) = self
            .cond
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        r.clone()
    }
}

/// Sleep type the DSDT's `_S5` object announces; the guest writes it back to power off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN bit of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// Value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 1;

/// The hardware-reduced ACPI sleep control register (offset 0; status at offset 1, reads as
/// "woken") and, as a separate bus device, the reset register.
pub struct AcpiSleep {
    exit: std::sync::Arc<ExitRequest>,
}

impl AcpiSleep {
    pub fn new(exit: std::sync::Arc<ExitRequest>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS (bit 7) so a guest polling for wake-up never spins.
        data.fill(0);
        if offset == 1 {
            data[0] = 0x80;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 1 {
            let v = data[0];
            if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5_SLEEP_TYPE {
                self.exit.request(VmExit::PowerOff);
            }
        }
    }
}

/// The ACPI reset register.
pub struct AcpiReset {
    exit: std::sync::Arc<ExitRequest>,
}

impl AcpiReset {
    pub fn new(exit: std::sync::Arc<ExitRequest>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiReset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&RESET_VALUE) {
            self.exit.request(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn s5_with_slp_en_powers_off_and_other_values_do_not() {
        let exit = Arc::new(ExitRequest::new());
        let mut dev = AcpiSleep::new(exit.clone());
        dev.write(0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
        dev.write(0, &[(3 << 2) | SLP_EN]); // S3
        assert_eq!(exit.get(), None);
        dev.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit.get(), Some(VmExit::PowerOff));
    }

    #[test]
    fn first_exit_reason_wins() {
        let exit = Arc::new(ExitRequest::new());
        AcpiReset::new(exit.clone()).write(0, &[RESET_VALUE]);
        exit.request(VmExit::PowerOff);
        assert_eq!(exit.wait(), VmExit::Reset);
    }
}
