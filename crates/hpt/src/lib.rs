//! The PAPR hashed page table (HPT) of a Book3S guest, with KVM-style reverse maps.
//!
//! * [`hpte`]: the HPTE format (dword 0/1 in the pre-ISA-3.0 layout) and page-size
//!   decoders; [`hash`]: geometry and the 256M/1T hash functions.
//! * [`table`]: the table of atomic HPTEs with HVLOCK bit locks and the revmap.
//! * [`vm`]: a [`Vm`] with memslots, rmap chains and the hypercalls ([`Vm::hcall`]).
//! * [`flavour`]: every guest-visible difference between KVM and QEMU, and
//!   [`result_masks`] for comparing KVM-flavour results with QEMU traces.
//! * [`resize`]: what live resizing needs from the table: the swappable table with its
//!   vCPU gate, per-HPTE change tracking, and the [`HptResizer`] extension point for
//!   the two resize hypercalls (implemented by the `revmap-resize` crate; a VM without
//!   one answers them with H_FUNCTION).
//! * [`check`]: the whole-VM invariant checker ([`Vm::check_invariants`]).
//! * [`mmu`]: the "hardware": translation through the HPT with per-vCPU TLBs, setting
//!   R/C; [`tlb`]: the tlbie handshake and the MMU-notifier sequence.
//! * The host side: [`host`] (memslot lifecycle with the INVALID step, `mmu_ready`),
//!   [`notifier`] (MMU-notifier unmap/age walkers), [`dirty`] (dirty logging),
//!   [`fault`] (page-in of ABSENT entries, write upgrade).
//!
//! * [`pool`]: the bounded pool that keeps dropped HPT arrays mapped for reuse
//!   (KVM's CMA area), so tables made at steady state take no page fault.
//! * [`papr`]: the typed hypercalls ([`Vm::h_enter`], [`Vm::h_remove`], ...) over
//!   newtypes ([`VcpuId`], [`Ptex`], [`HpteV`], [`HpteR`], flag sets) with
//!   [`PaprError`] and its one table to and from PAPR return codes; the register-level
//!   [`Vm::hcall_regs`] and the vCPU run handles ([`VcpuRuns`]) implement the
//!   library's one hypercall trait, [`HypercallPort`].
//!
//! Lock order: HPTE lock (HVLOCK) -> rmap lock (bit 43). No hypercall allocates or takes
//! a global lock.
//!
//! The crate needs `std` (the published memslot set and the table generations); only `revmap-rmap` and `revmap-host` build without it.
//!
//! # Example
//!
//! A VMM creates a VM, makes typed hypercalls as one vCPU, drives another vCPU through
//! the generic hypercall port, and checks the whole-VM invariants:
//!
//! ```
//! use revmap_hpt::hcall::{H_READ, H_SUCCESS};
//! use revmap_hpt::papr::{EnterFlags, ProtectFlags, ReadFlags, RemoveFlags};
//! use revmap_hpt::{
//!     Flavour, HpteR, HpteV, HypercallPort, PaprError, Ptex, VcpuId, Vm, VmConfig,
//!     MAX_VCPUS,
//! };
//!
//! let vm = Vm::new(VmConfig {
//!     ram_bytes: 256 << 20,
//!     hpt_order: 20,
//!     flavour: Flavour::Kvm,
//!     backing_page_shift: 24,
//! })?;
//! let cpu0 = VcpuId::new(0)?;
//! assert!(VcpuId::new(MAX_VCPUS).is_err(), "no silent wrap-around of vCPU ids");
//!
//! // A 4 KiB page of guest RAM (gpa 0x7000, M bit, PP = 2), bolted in PTEG 5.
//! let v = HpteV(0x4000_0000_0000_0001 | HpteV::BOLTED);
//! let r = HpteR(0x7000 | HpteR::M | 0x2);
//! let at = vm.h_enter(cpu0, EnterFlags::empty(), Ptex(5 * 8), v, r)?;
//! assert_eq!(at.pteg(), 5);
//!
//! // Make it read-only, then read it back: the guest sees its own dword 1.
//! vm.h_protect(cpu0, ProtectFlags::PP1 | ProtectFlags::PP2, at, 0)?;
//! let seen = vm.h_read(cpu0, ReadFlags::empty(), at)?.as_slice()[0];
//! assert_eq!(seen.0, v);
//! assert_eq!(seen.1 .0 & 0x3, 0x3);
//!
//! // Failures are typed; each has exactly one PAPR return code.
//! let miss = vm.h_remove(cpu0, RemoveFlags::AVPN, at, 0x1234_0000);
//! assert_eq!(miss, Err(PaprError::NotFound));
//! assert_eq!(PaprError::from_code(PaprError::NotFound.code()), Some(PaprError::NotFound));
//!
//! // Another vCPU through the generic port: a run handle pinned for several calls.
//! fn read_raw(port: &mut impl HypercallPort, cpu: VcpuId, ptex: Ptex) -> (i64, u64) {
//!     let r = port.hcall(cpu, H_READ, &[0, u64::from(ptex.0)]);
//!     (r.ret, r.out[0])
//! }
//! let mut runs = vm.vcpu_runs();
//! assert_eq!(read_raw(&mut runs, VcpuId::new(7)?, at), (H_SUCCESS, v.0));
//! drop(runs);
//!
//! vm.h_remove(cpu0, RemoveFlags::empty(), at, 0)?;
//! let report = vm.check_invariants()?;
//! println!("{report:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(any(feature = "std", test)), no_std)]
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
pub mod papr;
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub mod pool;
pub mod resize;
pub mod run;
pub mod table;
pub mod tlb;
pub mod vm;

pub use check::CheckReport;
pub use error::{HostError, HptError, PaprError, Violation};
pub use fault::FaultOutcome;
pub use flavour::{result_masks, Flavour, ResultMask};
pub use host::MemslotSpec;
pub use hpte::{HpteR, HpteV};
pub use resize::HptResizer;
pub use revmap_host::port::HypercallPort;
pub use revmap_host::{HostMemory, HostMmu, MemslotFlags, SimHostMemory, SlotView};
pub use revmap_rmap::{Ptex, VcpuId, VcpuIdError, MAX_VCPUS};
pub use run::{VcpuRun, VcpuRuns};
pub use vm::{HcallResult, Vm, VmConfig};

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
