//! `warpline` binary (being written).
fn main() {}
