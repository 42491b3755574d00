//! Benchmark placeholder, filled by its module's work.
fn main() {}
