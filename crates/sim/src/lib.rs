//! The revmap simulator crate: the [`replay`] engine, which replays real-guest HPT
//! hypercall traces against a VM and compares every result; the host [`actors`]
//! (memory pressure, aging, live migration) behind the [`host::HostMmu`] trait; and
//! [`interference`], replay with the actors running concurrently; the guest
//! [`workload`] model, [`scenario`]s, the [`run`] simulator with its [`report`], and
//! the single-threaded deterministic mode [`det`].
//!
//! # Example
//!
//! Run the default scenario in deterministic mode for a few hundred steps on a small
//! guest; the checker runs after every step, and the same seed always gives the same
//! event digest.
//!
//! ```
//! use revmap_sim::det::DeterministicRun;
//! use revmap_sim::scenario::Scenario;
//!
//! let mut sc = Scenario {
//!     seed: 7,
//!     ..Scenario::default()
//! };
//! sc.deterministic.steps = 200;
//! sc.deterministic.ram_mib = 64;
//! let report = sc.run_deterministic()?;
//! assert_eq!(report.verdict.invariant_checks, 200);
//! assert_eq!(report.verdict.invariant_violations, 0);
//! assert_eq!(sc.run_deterministic()?.verdict.digest, report.verdict.digest);
//! println!("{} hypercalls, digest {}", report.hcalls_total, report.verdict.digest);
//! # Ok::<(), revmap_sim::run::RunError>(())
//! ```
//!
//! Invariants: this crate contains no unsafe code; its atomics and threads come only
//! from `revmap_rmap::sync`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod actors;
pub mod det;
pub mod host;
pub mod interference;
pub mod nested;
pub mod replay;
pub mod report;
pub mod run;
pub mod scenario;
pub mod soak;
pub mod workload;
pub mod x86;

#[cfg(test)]
pub(crate) mod testutil;
