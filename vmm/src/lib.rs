//! One ferry node's hypervisor.
