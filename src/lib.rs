//! The `ferry` command's library: everything above one VMM (guest images, the nested host, the
//! `run` command) lives here; the hypervisor itself is the `ferry-vmm` crate.

pub mod cluster;
pub mod cpio;
pub mod debian;
pub mod image;
pub mod kernel;
pub mod kmod;
pub mod nested;
pub mod node;
pub mod rootfs;
pub mod run;
pub mod signals;
pub mod sys;
pub mod terminal;
