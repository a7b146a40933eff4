//! The revmap simulator crate: the [`replay`] engine, which replays real-guest HPT
//! hypercall traces against a VM and compares every result; the host [`actors`]
//! (memory pressure, aging, live migration) behind the [`host::HostMmu`] trait; and
//! [`interference`], replay with the actors running concurrently; the guest
//! [`workload`] model, [`scenario`]s, the [`run`] simulator with its [`report`], and
//! the single-threaded deterministic mode [`det`].
//!
//! Invariants: this crate contains no unsafe code; its atomics and threads come only
//! from `revmap_rmap::sync`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod actors;
pub mod det;
pub mod host;
pub mod interference;
pub mod replay;
pub mod report;
pub mod run;
pub mod scenario;
pub mod workload;

#[cfg(test)]
pub(crate) mod testutil;
