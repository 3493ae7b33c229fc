//! Link transport throughput (filled in below).
fn main() {}
