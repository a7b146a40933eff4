//! Hypercall benchmarks (in progress).
fn main() {}
