//! The nested-guest MMU of a KVM-HV L0 (PowerPC Book3S, radix): the radix MMU model, the
//! nested-guest bookkeeping, and the thread-safe nested MMU ([`NestedVm`]) with its shadow
//! tables and the nested rmap (`revmap_rmap::nested`) on the shared host layer.
//!
//! * [`radix`]: PTCR and the partition table, PATE decoding, the 52-bit tree with 4K and
//!   64K base geometries, PDE/PTE words, R/C semantics, the walk and its failure causes
//!   (HDSISR/SRR1 bits), guest memory ([`radix::GuestMemory`], [`radix::SparseMemory`])
//!   and a tree builder for tests.
//! * [`access`]: what L1's tables make of one L2 access by KVM L0's rules;
//!   [`fault`]: the shadow leaf derived from L0's and L1's leaves (permissions, R/C,
//!   size, nested-rmap key) and the SET_RC decision.
//! * [`hcall`]: H_SET_PARTITION_TABLE, H_ENTER_NESTED and H_TLB_INVALIDATE argument
//!   decoding and checks, with their PAPR return codes.
//! * [`guest`]: per-L2 state and the registry of nested guests; [`lpid`]: shadow LPIDs.
//! * [`shadow`]: L0's shadow partition-scoped table for one L2 (single-threaded model)
//!   with `kvmppc_create_pte`'s insertion rules.
//!
//! * [`vm`]: [`NestedVm`], the thread-safe nested MMU on the shared host layer
//!   (`revmap_host`): L0's partition-scoped table for L1 over memslots and host memory,
//!   per-L2 state behind the per-L2 lock, `mmu_lock`, the nested fault with the
//!   invalidation retry, the nested rmap with its bound, the host-side `HostMmu`
//!   callbacks (unmap, aging, dirty log through the nested rmap), memslot delete/move,
//!   L2 destroy, and the invariant checker ([`NestedVm::check`]).
//! * [`port`]: the nested hypercalls through one typed API and the host layer's
//!   register-level `HypercallPort`; [`frames`]: host memory that hands out a new frame
//!   per page-in; [`replay`]: replay of nested traces through [`NestedVm`].
//!
//! `tests/replay_shadow.rs` is the single-threaded reference harness built from the
//! pure pieces; `tests/replay_vm.rs` replays the same traces through [`NestedVm`].
//! Concurrency is exercised by `tests/threads_vm.rs` (real threads),
//! `tests/loom_nested.rs` (`--cfg loom`) and `tests/shuttle_nested.rs`
//! (`--cfg shuttle`).
//!
//! Facts come from `nested-radix-mmu.md` (the reference digest of KVM's
//! `book3s_hv_nested.c` / `book3s_64_mmu_radix.c` and the ISA); no KVM code is copied.
//!
//! ```
//! use revmap_nested::access::{l1_translate, L1Layout, L2Outcome};
//! use revmap_nested::radix::{
//!     walk, write_pate, Access, Exit, Geometry, PageSize, Pate, PateDw1, Ptcr, RadixBuilder,
//!     RadixPte, SparseMemory,
//! };
//! use revmap_nested::NGpa;
//! use revmap_rmap::Gpa;
//!
//! // 4 GiB of L1 memory; L1 builds a 64K-geometry table for an L2 in [1 MiB, 2 MiB).
//! let mut mem = SparseMemory::new(4 << 30);
//! let mut b = RadixBuilder::new(&mut mem, Geometry::Base64K, 0x10_0000..0x20_0000)?;
//! let n_gpa = NGpa::new(0x3b9a_0000).ok_or("52-bit")?;
//! let flags = RadixPte::R | RadixPte::EAA_READ;
//! b.map(n_gpa, Gpa(0x1_0000_0000), PageSize::P64K, flags)?;
//! let root = b.root();
//! // ... and registers it as LPID 5 of its partition table at 64 KiB.
//! let ptcr = Ptcr(0x1_0000 | 4);
//! write_pate(&mut mem, ptcr, 5, Pate { dw0: root, dw1: PateDw1(0) })?;
//!
//! let t = walk(&mem, root, NGpa::new(0x3b9a_6018).ok_or("52-bit")?)?;
//! assert_eq!((t.raddr, t.size), (Gpa(0x1_0000_6018), PageSize::P64K));
//!
//! // A store: the leaf grants read only, so L1 gets an HDSI with PROTFAULT | ISSTORE.
//! let layout = L1Layout { ram_bytes: 4 << 30, l0_page_shift: 16 };
//! let out = l1_translate(&mem, root, n_gpa, Access::Store, layout);
//! let L2Outcome::Exit(Exit::Hdsi { hdsisr, asdr }) = out else { panic!("{out:?}") };
//! assert_eq!((hdsisr.bits(), asdr), (0x0a00_0000, 0x3b9a_0000));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod addr;
pub mod fault;
pub mod fixture;
pub mod frames;
pub mod guest;
pub mod hcall;
pub mod lpid;
pub mod port;
pub mod radix;
pub mod replay;
pub mod shadow;
pub mod vm;

pub use addr::{NGpa, ShadowLpid};
pub use guest::{GuestError, GuestId, NestedGuest, NestedGuests, Released};
pub use hcall::{HcallError, TlbInvalidate};
pub use lpid::{LpidError, ShadowLpidAllocator};
pub use vm::{L2Result, NestedCounters, NestedVm, NestedVmConfig, NestedVmError, Violation};
