//! Allium directory crate.
