//! An 8250 UART (vm-superio) on the I/O-port bus, raising its interrupt through an irqfd.
//!
//! Input for the guest is buffered here and fed into the UART's 64-byte FIFO as the guest drains
//! it, so a host can hand over any amount of input at once without losing bytes.

use std::collections::VecDeque;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Raises the UART's interrupt line by writing to an eventfd registered with KVM as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// One UART with an input queue.
pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, SerialOutput>,
    pending: VecDeque<u8>,
}

impl SerialPort {
    pub fn new(irq: EventFd, output: SerialOutput) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), output),
            pending: VecDeque::new(),
        }
    }

    /// Queues bytes for the guest to read.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        self.refill();
    }

    /// Bytes queued for the guest that its FIFO has not taken yet.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// Moves queued input into the FIFO as far as it has room.
    fn refill(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let (front, _) = self.pending.as_slices();
            let n = front.len().min(self.uart.fifo_capacity());
            match self.uart.enqueue_raw_bytes(&front[..n]) {
                Ok(0) | Err(_) => break, // loopback mode, or the interrupt could not be raised
                Ok(sent) => {
                    self.pending.drain(..sent);
                }
            }
        }
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
        self.refill();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        // An output error (a closed pipe) must not stop the guest: the byte is dropped.
        let _ = self.uart.write(offset as u8, data[0]);
        self.refill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const RBR_THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let out = Shared::default();
        let mut port = SerialPort::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for b in b"ok\n" {
            port.write(RBR_THR, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"ok\n");
    }

    #[test]
    fn input_larger_than_the_fifo_arrives_whole_and_in_order() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        port.write(IER, &[1]); // enable the received-data interrupt
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        port.queue_input(&input);
        assert!(port.pending_input() > 0, "the FIFO holds only 64 bytes");
        assert!(irq.read().unwrap() >= 1, "the guest was interrupted");
        let mut got = Vec::new();
        loop {
            let mut lsr = [0u8];
            port.read(LSR, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            port.read(RBR_THR, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(port.pending_input(), 0);
    }

    #[test]
    fn wide_or_out_of_range_accesses_are_ignored() {
        let out = Shared::default();
        let mut port = SerialPort::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        port.write(RBR_THR, &[1, 2]);
        port.write(9, &[1]);
        let mut d = [0u8; 2];
        port.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
