//! The host's view of a VM, as the host actors use it: the host layer's
//! [`HostMmu`] trait and [`SlotView`], re-exported.
//!
//! Actors touch a VM only through this trait (so they can be tested against a fake and
//! drive any MMU without a branch per MMU); [`revmap_hpt::Vm`] implements it in
//! `revmap-hpt`. See [`revmap_host::mmu`] for the contract.

pub use revmap_host::{HostMmu, SlotView};
