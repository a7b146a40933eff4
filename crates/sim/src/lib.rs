//! The revmap simulator crate. For now: the [`replay`] engine, which replays real-guest
//! HPT hypercall traces against a VM and compares every result.
//!
//! Invariants: this crate contains no unsafe code and no atomics of its own.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod replay;
