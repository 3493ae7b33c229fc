//! Allium relay crate.
