//! The source side of a process migration: refuse what cannot move, freeze, read the image.
