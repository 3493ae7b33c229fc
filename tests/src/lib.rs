//! Whole-network test helpers for Allium.
