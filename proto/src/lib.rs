//! Allium proto crate.
