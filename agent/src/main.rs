//! The `baton-agent` binary.
fn main() {}
