//! The PAPR hashed page table (HPT) of a Book3S guest, with KVM-style reverse maps.
//!
//! * [`hpte`]: the HPTE format (dword 0/1 in the pre-ISA-3.0 layout) and page-size
//!   decoders; [`hash`]: geometry and the 256M/1T hash functions.
//! * [`table`]: the table of atomic HPTEs with HVLOCK bit locks and the revmap.
//! * [`vm`]: a [`Vm`] with memslots, rmap chains and the hypercalls ([`Vm::hcall`]).
//! * [`flavour`]: every guest-visible difference between KVM and QEMU, and
//!   [`result_masks`] for comparing KVM-flavour results with QEMU traces.
//! * [`resize`]: live HPT resizing (PREPARE/COMMIT, rehash, pivot) and the swappable
//!   table with its vCPU gate.
//! * [`check`]: the whole-VM invariant checker ([`Vm::check_invariants`]).
//! * [`mmu`]: the "hardware": translation through the HPT with per-vCPU TLBs, setting
//!   R/C; [`tlb`]: the tlbie handshake and the MMU-notifier sequence.
//! * The host side: [`host`] (memslot lifecycle with the INVALID step, `mmu_ready`),
//!   [`notifier`] (MMU-notifier unmap/age walkers), [`dirty`] (dirty logging),
//!   [`fault`] (page-in of ABSENT entries, write upgrade).
//!
//! Lock order: HPTE lock (HVLOCK) -> rmap lock (bit 43). No hypercall allocates or takes
//! a global lock.
//!
//! The crate needs `std` (the published memslot set and the resize protocol block on
//! locks); only `revmap-rmap` and `revmap-host` build without it.
#![deny(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod check;
pub mod dirty;
pub mod error;
pub mod fault;
pub mod flavour;
pub mod hash;
pub mod hcall;
pub mod host;
pub mod hpte;
pub mod hw;
pub mod mmu;
pub mod notifier;
pub mod resize;
pub mod run;
pub mod table;
pub mod tlb;
pub mod vm;

pub use check::CheckReport;
pub use error::{HostError, HptError, Violation};
pub use fault::FaultOutcome;
pub use flavour::{result_masks, Flavour, ResultMask};
pub use host::MemslotSpec;
pub use revmap_host::{HostMemory, HostMmu, MemslotFlags, SimHostMemory, SlotView};
pub use run::{VcpuRun, VcpuRuns};
pub use vm::{HcallResult, Vm, VmConfig};

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
