//! Process migration inside the guest: the image of a process ([`image`]), freezing and
//! reading it at the source ([`dump`]), rebuilding it at the destination ([`restore`], by
//! system calls run inside it: [`inject`]), its clocks carried on across nodes that booted
//! at different times ([`clocks`]), and post-copy's pages that arrive after it resumed
//! ([`lazy`]).

pub mod clocks;
pub mod dump;
pub mod image;
pub mod inject;
pub mod lazy;
pub mod restore;

pub use crate::sys::{keep_locked_pages_in_place, COMPACT_UNEVICTABLE};
