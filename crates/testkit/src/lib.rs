//! Dev-only fixtures of the revmap workspace (`publish = false`): benchmark set-ups that
//! the production crates do not carry.
//!
//! * [`host`]: a fully mapped slot to unmap, a slot with k mappings per frame to harvest
//!   dirty logs from, and the plain scan they are compared with (`benches/host.rs` of
//!   `revmap-hpt`, `revmap bench host`).
//! * [`resize`]: the commit-pause benchmark of live HPT resizing (`revmap bench resize`).
//! * [`failalloc`]: a global allocator that fails the k-th allocation, and the sweep
//!   that runs a representative MMU run once for every k (the allocation-failure tests).
//!
//! Test hooks of the resize protocol are a cargo feature of `revmap-resize`
//! (`test-hooks`), enabled only by dev-dependencies.
//!
//! ```
//! use revmap_testkit::host::UnmapFixture;
//!
//! // 64 MiB of guest RAM fully mapped with 64 KiB pages; unmapping it all through the
//! // MMU notifier removes every mapping once.
//! let fx = UnmapFixture::new(64 << 20, 16)?;
//! assert_eq!(fx.unmap_all(), (64 << 20) >> 16);
//! # Ok::<(), revmap_testkit::FixtureError>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[allow(unsafe_code)] // a global allocator is an `unsafe impl` by definition
pub mod failalloc;
pub mod host;
pub mod resize;

use revmap_hpt::HptError;

/// Why a fixture could not be built or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FixtureError {
    /// The VM refused an operation.
    #[error(transparent)]
    Hpt(#[from] HptError),
    /// Memory for the fixture could not be reserved.
    #[error(transparent)]
    Alloc(#[from] revmap_rmap::RmapError),
    /// H_ENTER of a fixture mapping failed.
    #[error("benchmark fixture: H_ENTER at HPTE {ptex} returned {ret}")]
    Enter {
        /// The HPTE index asked for (H_EXACT).
        ptex: u64,
        /// The hypercall's return code.
        ret: i64,
    },
    /// Unmap-fixture pages must be 4 KiB or 64 KiB.
    #[error("benchmark fixture: page shift {shift} is neither 12 nor 16")]
    PageShift {
        /// The shift asked for.
        shift: u32,
    },
}
