//! `warpline-worker` binary (being written).
fn main() {}
