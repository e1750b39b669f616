//! Process migration inside the guest: the image of a process ([`image`]), freezing and
//! reading it at the source ([`dump`]).

pub mod dump;
pub mod image;
pub mod inject;
pub mod lazy;
pub mod restore;
