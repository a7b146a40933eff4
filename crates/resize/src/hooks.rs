//! Test hooks of the resize protocol: make a preparation's allocation fail, hold
//! the preparation worker, hold a pre-copy commit at a chosen point.
//!
//! They exist only with the `test-hooks` cargo feature (enabled by this workspace's
//! dev-dependencies, never by a production build): without it [`TestHooks`] is a
//! zero-sized type whose checks are constant no-ops, so `ResizeCtl` carries no test
//! locks or condition variables.

/// Where a pre-copy commit stops for a test (`ResizeCtl::hold_precopy_commit`, with the
/// `test-hooks` feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecopyHold {
    /// Do not hold.
    None = 0,
    /// After the first copy, before the re-copy rounds.
    BeforeRounds = 1,
    /// After the rounds, before the final stop.
    BeforeStop = 2,
}

#[cfg(feature = "test-hooks")]
pub(crate) use imp::TestHooks;
#[cfg(not(feature = "test-hooks"))]
pub(crate) use noop::TestHooks;

#[cfg(not(feature = "test-hooks"))]
mod noop {
    use super::PrecopyHold;

    /// No hooks: every check is a no-op.
    #[derive(Debug, Default)]
    pub(crate) struct TestHooks;

    impl TestHooks {
        /// No hooks.
        pub(crate) const fn new() -> Self {
            Self
        }

        /// Never fails an allocation.
        #[inline(always)]
        pub(crate) fn take_alloc_failure(&self) -> bool {
            false
        }
        /// Never holds a preparation worker.
        #[inline(always)]
        pub(crate) fn preparation_point(&self) {}
        /// Never holds a commit.
        #[inline(always)]
        pub(crate) fn precopy_point(&self, _here: PrecopyHold) {}
    }
}

#[cfg(feature = "test-hooks")]
mod imp {
    use super::PrecopyHold;
    use revmap_rmap::sync::{lock, wait, AtomicBool, Condvar, Mutex, Ordering};

    /// The hooks' state, shared by the controller and its preparation workers.
    #[derive(Debug, Default)]
    pub(crate) struct TestHooks {
        fail_next_alloc: AtomicBool,
        hold: Mutex<bool>,
        hold_cv: Condvar,
        /// (hold a pre-copy commit at this `PrecopyHold`, one is held now).
        hold_commit: Mutex<(u8, bool)>,
        hold_commit_cv: Condvar,
    }

    impl TestHooks {
        /// Hooks that hold nothing and fail nothing until a test sets them.
        pub(crate) fn new() -> Self {
            Self::default()
        }

        pub(crate) fn inject_alloc_failure(&self) {
            // ORDERING: Relaxed: read by the worker after it takes a job posted after
            // this call (the mailbox mutex synchronises).
            self.fail_next_alloc.store(true, Ordering::Relaxed);
        }

        /// The worker's side: consume an injected failure.
        pub(crate) fn take_alloc_failure(&self) -> bool {
            // ORDERING: Relaxed: see `inject_alloc_failure`.
            self.fail_next_alloc.swap(false, Ordering::Relaxed)
        }

        pub(crate) fn hold_preparation(&self, hold: bool) {
            *lock(&self.hold) = hold;
            self.hold_cv.notify_all();
        }

        /// The worker's side: wait while preparations are held.
        pub(crate) fn preparation_point(&self) {
            let mut h = lock(&self.hold);
            while *h {
                h = wait(&self.hold_cv, h);
            }
        }

        pub(crate) fn hold_precopy_commit(&self, at: PrecopyHold) {
            lock(&self.hold_commit).0 = at as u8;
            self.hold_commit_cv.notify_all();
        }

        pub(crate) fn wait_precopy_commit_held(&self) {
            let mut h = lock(&self.hold_commit);
            while !h.1 {
                h = wait(&self.hold_commit_cv, h);
            }
        }

        pub(crate) fn precopy_commit_held(&self) -> bool {
            lock(&self.hold_commit).1
        }

        /// The committer's side: stop at `here` while a test holds it.
        pub(crate) fn precopy_point(&self, here: PrecopyHold) {
            let mut h = lock(&self.hold_commit);
            if h.0 != here as u8 || here == PrecopyHold::None {
                return;
            }
            h.1 = true;
            self.hold_commit_cv.notify_all();
            while h.0 == here as u8 {
                h = wait(&self.hold_commit_cv, h);
            }
            h.1 = false;
        }
    }
}
