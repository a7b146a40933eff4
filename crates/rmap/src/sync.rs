//! The one switch point for every atomic, spin hint and thread used by revmap.
//!
//! Production builds use `core::sync::atomic`. Under `RUSTFLAGS="--cfg loom"` every
//! atomic comes from [loom], which explores all interleavings and weak-memory
//! behaviours allowed by the C++11 model; with the `shuttle` feature they come from
//! shuttle's randomized scheduler, which scales to more threads and operations (but runs
//! every access sequentially consistent, so only loom checks orderings).
//!
//! No other module of the workspace may name `core::sync::atomic`, `std::sync::atomic`,
//! `std::thread` or `core::hint::spin_loop` directly: go through this module so that
//! the model checkers see every shared access.
//!
//! [loom]: https://docs.rs/loom

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

#[cfg(all(not(loom), feature = "shuttle"))]
pub use shuttle::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

#[cfg(all(not(loom), not(feature = "shuttle")))]
pub use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Hint to the CPU (or to the model checker's scheduler) that we are busy-waiting.
///
/// Under loom and shuttle this yields to the scheduler: a spin loop that never yields
/// would be an infinite execution to a model checker.
#[inline(always)]
pub fn spin_loop() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(all(not(loom), feature = "shuttle"))]
    shuttle::thread::yield_now();
    #[cfg(all(not(loom), not(feature = "shuttle")))]
    core::hint::spin_loop();
}

/// Threads, from the same source as the atomics (std, loom or shuttle).
#[cfg(loom)]
pub use loom::thread;

/// Threads, from the same source as the atomics (std, loom or shuttle).
#[cfg(all(not(loom), feature = "shuttle"))]
pub use shuttle::thread;

/// Threads, from the same source as the atomics (std, loom or shuttle).
#[cfg(all(not(loom), not(feature = "shuttle"), feature = "std"))]
pub use std::thread;

/// `Arc`, from the same source as the atomics (alloc, loom or shuttle).
#[cfg(loom)]
pub use loom::sync::Arc;

/// `Arc`, from the same source as the atomics (alloc, loom or shuttle).
#[cfg(all(not(loom), feature = "shuttle"))]
pub use shuttle::sync::Arc;

/// `Arc`, from the same source as the atomics (alloc, loom or shuttle).
#[cfg(all(not(loom), not(feature = "shuttle")))]
pub use alloc::sync::Arc;
