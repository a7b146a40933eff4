//! Reverse-map structures of a hypervisor MMU, modelled on Linux KVM.
//!
//! * [`ring`]: the PowerPC Book3S HV design: one 64-bit rmap word per guest frame
//!   heading a circular doubly linked ring of 32-bit HPTE indices threaded through the
//!   revmap array beside the hashed page table.
//! * [`pte_list`]: the x86 shadow-MMU design: a tagged head word over 128-byte
//!   descriptors of 14 entries.
//! * [`nested`]: the PowerPC nested-guest rmap: (LPID, frame) entries kept inline in the
//!   word or in a list whose last link holds the tagged inline value.
//! * [`bitlock`]: the bit locks all of them use; [`sync`]: the single switch point of
//!   every atomic, lock, once-cell and thread of the workspace's libraries, routed to
//!   loom (`--cfg loom`) or shuttle (`--cfg shuttle`) under model checking.
//!
//! The crate is `no_std` + `alloc`; the `std` feature (default) adds the locks,
//! threads and thread helpers of [`sync`].
//!
//! # Example
//!
//! The ring first: lock a guest frame's rmap word, link two HPTEs into its ring (as
//! H_ENTER does, `kvmppc_add_revmap_chain`), walk it, unlink one (as H_REMOVE does).
//! Then the x86 `pte_list`: a head word growing from one inline entry into a descriptor.
//!
//! ```
//! use revmap_rmap::pte_list::{DescCache, DescPool, PteListHead, SpteHandle};
//! use revmap_rmap::ring::check_rmaps;
//! use revmap_rmap::{Revmap, Rmap};
//!
//! // One rmap word per guest frame; one revmap entry per HPTE (a 2^18-byte HPT here).
//! let rmaps = Rmap::new_array(4)?;
//! let revmap = Revmap::for_hpt_order(18)?;
//!
//! // `link` consumes the guard: it always unlocks (Release) after linking.
//! revmap.try_link(rmaps[2].lock(), 0x40)?;
//! let word = revmap.try_link(rmaps[2].lock(), 0x41)?;
//! assert_eq!(word.head(), Some(0x40));
//!
//! let mut g = rmaps[2].lock();
//! assert_eq!(revmap.iter(&g).collect::<Vec<_>>(), [0x40, 0x41]);
//! assert!(revmap.try_unlink(&mut g, 0x40)?);
//! assert_eq!(g.word().head(), Some(0x41));
//! drop(g);
//! assert_eq!(check_rmaps(&rmaps[..], &revmap, |_, _| Ok(()))?.members, 1);
//!
//! // pte_list: top up the descriptor cache first, never under the lock.
//! let pool = DescPool::new();
//! let head = PteListHead::new();
//! let mut cache = DescCache::new(&pool);
//! cache.reserve(1)?;
//! let mut g = head.lock();
//! g.add(&mut cache, SpteHandle::new(0x1000)?)?;
//! g.add(&mut cache, SpteHandle::new(0x1008)?)?;
//! assert_eq!(g.count(&pool)?, 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(any(feature = "std", loom, shuttle, test)), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

extern crate alloc;

pub mod addr;
#[cfg(feature = "baselines")]
pub mod baseline;
pub mod bitlock;
pub mod error;
pub mod nested;
pub mod pool;
pub mod pte_list;
pub mod ring;
pub mod sync;
mod word;

pub use addr::{
    Gfn, Gpa, Hva, Lpid, Ptex, SlotId, VcpuId, VcpuIdError, MAX_VCPUS, PAGE_SHIFT, PAGE_SIZE,
};
pub use error::RmapError;
pub use nested::{
    check_nested_rmap, check_nested_rmaps, DetachedNestedList, Inserted, NestedCache, NestedError,
    NestedGuard, NestedLimits, NestedPool, NestedRmap, NestedRmapEntry,
};
pub use pool::{NodeCache, NodeIdx, Pool, PoolCursor, PoolError, PoolNode};
pub use pte_list::{
    check_pte_list, check_pte_lists, check_rmap_head, DescCache, DescPool, PteListError,
    PteListGuard, PteListHead, RmapAdd, SpteHandle, RMAP_RECYCLE_THRESHOLD,
};
pub use ring::{HpteLocks, Revmap, Rmap, RmapGuard, RmapWord, Visit};
