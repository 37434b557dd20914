//! The `kvpark` command line.
fn main() {}
