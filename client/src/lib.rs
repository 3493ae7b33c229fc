//! Allium client crate.
