//! The x86 shadow MMU (KVM's `arch/x86/kvm/mmu` with `pte_list` reverse maps).
//!
//! The shadow MMU itself:
//! * [`mmu`]: shadow pages over `pte_list` rmaps (role + gfn hash, roots and
//!   prev_roots, generations), the shadow page fault, write protection and write
//!   tracking of guest page tables, unsync/resync, emulated writes, zapping and
//!   eviction, the host-side walkers, and the section-8 invariant checker;
//! * [`vm`]: [`vm::ShadowVm`], the shadow MMU on the shared host layer (published
//!   memslots, lifecycle hooks, `mmu_lock`, the `HostMmu` trait);
//! * [`replay`]: real x86 walk traces replayed through the shadow MMU;
//! * [`access_shadow`]: the kvm-unit-tests `x86/access.c` space and sub-tests run
//!   through the shadow MMU, against the rules and the reference walker.
//!
//! And the parts it stands on:
//! * [`paging`]: the guest paging model, a pure reference walker over guest-physical
//!   memory for every x86 paging mode, with every permission rule, reserved bits by
//!   MAXPHYADDR, atomic A/D setting and the hardware #PF error code;
//! * [`access_test`]: the kvm-unit-tests `x86/access.c` conformance model (its 31 flag
//!   dimensions, expected-result rules, enumeration, seeded sampling and sub-tests), run
//!   against the walker;
//! * [`role`]: the shadow-page role word (`kvm_mmu_page_role`) with KVM's root and
//!   child rules, and the SPTE format;
//! * [`write_track`]: the offset arithmetic of emulated page-table writes (which SPTEs a
//!   store hits, misaligned writes, the flooding threshold);
//! * [`walk_check`]: the replay of real x86 walk traces (`traces/x86/`) through the
//!   walker, by the traces' normative rules: the ground truth for the shadow MMU.
//!
//! ```
//! use revmap_shadow::access_test::{AccessConfig, AccessRunner};
//! let cfg = AccessConfig::default();
//! let mut runner = AccessRunner::new(cfg);
//! let report = runner.run_sample(1, 1000);
//! assert_eq!(report.checked, 1000);
//! assert_eq!(report.mismatched, 0);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access_shadow;
pub mod access_test;
pub mod fixture;
pub mod mmu;
pub mod paging;
pub mod replay;
pub mod role;
pub mod vm;
pub mod walk_check;
pub mod write_track;
