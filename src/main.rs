//! The `allium` binary.
fn main() {}
