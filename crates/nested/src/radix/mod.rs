//! The radix MMU model (ISA v3.0/v3.1, as POWER9/POWER10, KVM and QEMU use it).
//!
//! * [`table`]: PTCR and the partition table ([`Ptcr`], [`Pate`], [`PateDw0`], [`PateDw1`]);
//! * [`geometry`]: the 52-bit tree (RTS = 21), 4K and 64K base geometries, page sizes
//!   and their tlbie AP encodings;
//! * [`entry`]: directory and leaf entries ([`RadixPde`], [`RadixPte`]) with R/C and EAA;
//! * [`walk()`]: the walk with its failure causes ([`WalkError`], [`FaultCause`],
//!   [`Exit`]) over the [`GuestMemory`] trait, and [`read_pate`];
//! * [`mem`]: [`SparseMemory`], a simple guest memory; [`builder`]: [`RadixBuilder`],
//!   which builds trees in it.
//!
//! Invariants: the walker never writes memory; every value crossing these modules is a
//! typed word or a newtyped address; every layout is pinned by const assertions and tests
//! against the ISA's IBM bit numbers.

pub mod builder;
pub mod entry;
pub mod geometry;
pub mod mem;
pub mod table;
pub mod walk;

pub use builder::{write_pate, BuildError, RadixBuilder};
pub use entry::{Att, RadixEntry, RadixPde, RadixPte};
pub use geometry::{Geometry, Level, PageSize, RADIX_TREE_BITS};
pub use mem::{MemError, SparseMemory};
pub use table::{Pate, PateDw0, PateDw1, Ptcr};
pub use walk::{
    read_pate, walk, Access, Dsisr, Exit, FaultCause, GuestMemory, Translation, Unsupported,
    WalkError,
};
