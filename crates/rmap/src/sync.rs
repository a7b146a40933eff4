//! The one switch point for every synchronisation primitive used by revmap's libraries:
//! atomics and fences, `Arc`, `Mutex`, `RwLock`, `Condvar`, write-once cells
//! ([`OnceLock`], [`OnceBox`]), the swappable pointer [`ArcCell`], spin hints, yields and
//! threads.
//!
//! Three backends, chosen by `cfg`, never by a Cargo feature (a feature would swap every
//! atomic of a whole `--all-features` build):
//!
//! * **native** (no cfg): `core::sync::atomic`, `alloc::sync::Arc`, and with the `std`
//!   feature `std::sync` locks, `std::thread` and [`arc_swap`](https://docs.rs/arc-swap).
//! * **loom** (`RUSTFLAGS="--cfg loom"`): every primitive comes from [loom], which
//!   explores all interleavings and the weak-memory behaviours the C++11 model allows.
//! * **shuttle** (`RUSTFLAGS="--cfg shuttle"`): shuttle's randomized scheduler, which
//!   scales to more threads and operations than loom but runs every access
//!   sequentially consistent, so only loom checks orderings.
//!
//! No other module of the library crates may name `core::sync`, `std::sync`,
//! `std::thread`, `core::hint::spin_loop`, `once_cell` or `arc_swap` directly: go through
//! this module so that the model checkers see every shared access.
//!
//! The write-once cells and [`ArcCell`] have no loom/shuttle counterpart; under the
//! model checkers they are the native cell plus a model-checked flag (or lock) whose
//! `Release`/`Acquire` pair carries the publication, so the checker still sees the
//! ordering that matters.
//!
//! [loom]: https://docs.rs/loom

#[cfg(loom)]
pub use loom::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

#[cfg(all(shuttle, not(loom)))]
pub use shuttle::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

#[cfg(not(any(loom, shuttle)))]
pub use core::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

/// Native atomics under every backend, for process-global state that no model checker
/// may own: `static` items that must be const-constructible and usable outside a loom or
/// shuttle model, such as the counters of a test global allocator. Library code that
/// shares state between threads uses the switched atomics above, never these.
pub mod native {
    pub use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
}

/// `Arc`, from the same source as the atomics (alloc, loom or shuttle).
#[cfg(loom)]
pub use loom::sync::Arc;

/// `Arc`, from the same source as the atomics (alloc, loom or shuttle).
#[cfg(all(shuttle, not(loom)))]
pub use shuttle::sync::Arc;

/// `Arc`, from the same source as the atomics (alloc, loom or shuttle).
#[cfg(not(any(loom, shuttle)))]
pub use alloc::sync::Arc;

#[cfg(loom)]
pub use loom::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(all(shuttle, not(loom)))]
pub use shuttle::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Threads, from the same source as the atomics (std, loom or shuttle).
#[cfg(loom)]
pub use loom::thread;

/// Threads, from the same source as the atomics (std, loom or shuttle).
#[cfg(all(shuttle, not(loom)))]
pub use shuttle::thread;

/// Threads, from the same source as the atomics (std, loom or shuttle).
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub use std::thread;

/// Hint to the CPU (or to the model checker's scheduler) that we are busy-waiting.
///
/// Under loom and shuttle this yields to the scheduler: a spin loop that never yields
/// would be an infinite execution to a model checker.
#[inline(always)]
pub fn spin_loop() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(all(shuttle, not(loom)))]
    shuttle::thread::yield_now();
    #[cfg(not(any(loom, shuttle)))]
    core::hint::spin_loop();
}

/// Give up the CPU (std builds), or let the model checker schedule another thread.
/// Without std this is [`spin_loop`].
#[inline]
pub fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(all(shuttle, not(loom)))]
    shuttle::thread::yield_now();
    #[cfg(all(feature = "std", not(any(loom, shuttle))))]
    std::thread::yield_now();
    #[cfg(not(any(feature = "std", loom, shuttle)))]
    core::hint::spin_loop();
}

/// Lock `m`, ignoring poisoning: every user of this helper keeps its protected state
/// consistent at each panic point (one assignment per transition).
#[cfg(any(feature = "std", loom, shuttle))]
#[inline]
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Wait on `cv` with `g`, ignoring poisoning (see [`lock`]).
#[cfg(any(feature = "std", loom, shuttle))]
#[inline]
pub fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    match cv.wait(g) {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Read-lock `l`, ignoring poisoning (see [`lock`]).
#[cfg(any(feature = "std", loom, shuttle))]
#[inline]
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    match l.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Write-lock `l`, ignoring poisoning (see [`lock`]).
#[cfg(any(feature = "std", loom, shuttle))]
#[inline]
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    match l.write() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A write-once cell usable from `&self` (std's `OnceLock`).
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub use std::sync::OnceLock;

/// A write-once cell usable from `&self` (std's `OnceLock`), with its publication
/// carried by a model-checked flag.
#[cfg(any(loom, shuttle))]
#[derive(Debug)]
pub struct OnceLock<T> {
    ready: AtomicBool,
    cell: std::sync::OnceLock<T>,
}

#[cfg(any(loom, shuttle))]
impl<T> Default for OnceLock<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(any(loom, shuttle))]
impl<T> OnceLock<T> {
    /// An empty cell.
    pub fn new() -> Self {
        Self {
            ready: AtomicBool::new(false),
            cell: std::sync::OnceLock::new(),
        }
    }

    /// The value, if set (and its publication observed).
    pub fn get(&self) -> Option<&T> {
        // ORDERING: Acquire pairs with the Release in `set`: the value's contents
        // happen-before its use.
        if self.ready.load(Ordering::Acquire) {
            self.cell.get()
        } else {
            None
        }
    }

    /// Set the value; hands it back if the cell was already set.
    pub fn set(&self, value: T) -> Result<(), T> {
        self.cell.set(value)?;
        // ORDERING: Release: publishes the value (see `get`).
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Take the value out, leaving the cell empty.
    pub fn take(&mut self) -> Option<T> {
        // ORDERING: Relaxed: `&mut self`, no other thread sees the cell.
        self.ready.store(false, Ordering::Relaxed);
        self.cell.take()
    }
}

/// A write-once cell of a boxed value, lock-free and `no_std` (`once_cell`'s
/// `race::OnceBox`).
#[cfg(not(any(loom, shuttle)))]
pub use once_cell::race::OnceBox;

/// A write-once cell of a boxed value (`once_cell`'s `race::OnceBox`), with its
/// publication carried by a model-checked flag.
#[cfg(any(loom, shuttle))]
#[derive(Debug)]
pub struct OnceBox<T> {
    ready: AtomicBool,
    cell: once_cell::race::OnceBox<T>,
}

#[cfg(any(loom, shuttle))]
impl<T> Default for OnceBox<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(any(loom, shuttle))]
impl<T> OnceBox<T> {
    /// An empty cell.
    pub fn new() -> Self {
        Self {
            ready: AtomicBool::new(false),
            cell: once_cell::race::OnceBox::new(),
        }
    }

    /// The value, if set (and its publication observed).
    pub fn get(&self) -> Option<&T> {
        // ORDERING: Acquire pairs with the Release in `set`.
        if self.ready.load(Ordering::Acquire) {
            self.cell.get()
        } else {
            None
        }
    }

    /// Set the value; hands it back if the cell was already set.
    pub fn set(&self, value: alloc::boxed::Box<T>) -> Result<(), alloc::boxed::Box<T>> {
        self.cell.set(value)?;
        // ORDERING: Release: publishes the value (see `get`).
        self.ready.store(true, Ordering::Release);
        Ok(())
    }
}

/// An atomically replaceable `Arc<T>` (RCU's `rcu_assign_pointer`/`rcu_dereference`
/// on a reference-counted pointer). Native: [`arc_swap::ArcSwap`](https://docs.rs/arc-swap),
/// whose load writes only a thread-local debt slot; under loom/shuttle an
/// `RwLock<Arc<T>>` held only for the pointer clone.
#[cfg(any(feature = "std", loom, shuttle))]
pub struct ArcCell<T> {
    #[cfg(not(any(loom, shuttle)))]
    cell: arc_swap::ArcSwap<T>,
    #[cfg(any(loom, shuttle))]
    cell: RwLock<Arc<T>>,
}

/// A loaded [`ArcCell`] value: dereferences to `T`. Keep it short-lived: a writer's
/// grace period (waiting for the old `Arc`'s count to drop) waits for it.
#[cfg(any(feature = "std", loom, shuttle))]
pub struct ArcGuard<T> {
    #[cfg(not(any(loom, shuttle)))]
    held: arc_swap::Guard<Arc<T>>,
    #[cfg(any(loom, shuttle))]
    held: Arc<T>,
}

#[cfg(any(feature = "std", loom, shuttle))]
impl<T> core::ops::Deref for ArcGuard<T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.held
    }
}

#[cfg(any(feature = "std", loom, shuttle))]
impl<T> ArcCell<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Self {
        #[cfg(not(any(loom, shuttle)))]
        let cell = arc_swap::ArcSwap::from_pointee(value);
        #[cfg(any(loom, shuttle))]
        let cell = RwLock::new(Arc::new(value));
        Self { cell }
    }

    /// Load the current value (`rcu_dereference`).
    #[inline(always)]
    pub fn load(&self) -> ArcGuard<T> {
        #[cfg(not(any(loom, shuttle)))]
        let held = self.cell.load();
        #[cfg(any(loom, shuttle))]
        let held = Arc::clone(&read(&self.cell));
        ArcGuard { held }
    }

    /// A counted reference to the current value.
    pub fn load_full(&self) -> Arc<T> {
        #[cfg(not(any(loom, shuttle)))]
        return self.cell.load_full();
        #[cfg(any(loom, shuttle))]
        return Arc::clone(&read(&self.cell));
    }

    /// Replace the value, returning the previous one; every reader that loaded the
    /// previous value holds a counted reference to it from now on (arc-swap pays its
    /// debts here), so `Arc::strong_count(&old) == 1` means no reader is left.
    pub fn swap(&self, next: Arc<T>) -> Arc<T> {
        #[cfg(not(any(loom, shuttle)))]
        return self.cell.swap(next);
        #[cfg(any(loom, shuttle))]
        return core::mem::replace(&mut *write(&self.cell), next);
    }
}

#[cfg(any(feature = "std", loom, shuttle))]
impl<T: core::fmt::Debug> core::fmt::Debug for ArcCell<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("ArcCell").field(&*self.load()).finish()
    }
}

#[cfg(any(feature = "std", loom, shuttle))]
impl<T: core::fmt::Debug> core::fmt::Debug for ArcGuard<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("ArcGuard").field(&**self).finish()
    }
}
