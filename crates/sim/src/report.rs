//! Statistics of a simulation run: per-hypercall counts and results, latency
//! histograms ([`HcallStats`]), and the hypercall mix compared with the real traces
//! ([`Mix`]).
//!
//! # Invariants
//!
//! * Counts are indexed by [`HcallKind`] (`HcallKind::ALL` order); an opcode outside
//!   it is counted in `other`.
//! * The event digest is an order-sensitive FNV-1a hash of (vCPU, opcode, arguments,
//!   return code, outputs) of every hypercall recorded, never of a latency, so that
//!   it is a pure function of the sequence of calls and results.
//! * `merge` is associative and commutative for counts and histograms (the digest of a
//!   merged set is a combination, meaningful only for one-thread runs).

use crate::run::GuestCounters;
use hdrhistogram::{CreationError, Histogram};
use revmap_hpt::hcall::{H_NOT_FOUND, H_SUCCESS};
use revmap_hpt::HcallResult;
use revmap_trace::{HcallKind, Record, TraceReader};
use serde::Serialize;
use std::path::Path;

/// Whether a run was clean, and its event digest: the part every simulator's report
/// (HPT, x86 and nested) shares. The reports flatten it (`#[serde(flatten)]`), so its
/// fields are top-level keys of their JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Invariant checks run.
    pub invariant_checks: u64,
    /// Invariant violations: checker failures plus guest mismatches (must be 0).
    pub invariant_violations: u64,
    /// The first violation, if any.
    pub first_violation: Option<String>,
    /// Deterministic mode: the step after which the first violation was found.
    pub failing_step: Option<u64>,
    /// Event digest, in hex (reproducible in deterministic mode).
    pub digest: String,
}

impl Verdict {
    /// The verdict of `checks` checks that found `violations` violations, the first
    /// being `first_violation`, over events of digest `digest` (no failing step: a
    /// deterministic run sets it).
    pub fn new(checks: u64, violations: u64, first_violation: Option<String>, digest: u64) -> Self {
        Self {
            invariant_checks: checks,
            invariant_violations: violations,
            first_violation,
            failing_step: None,
            digest: format!("{digest:016x}"),
        }
    }

    /// Appends the human summary's last lines: the checks and violations (`what` says
    /// what the violations count besides the checker's, if anything), then the digest.
    pub fn write_summary(&self, o: &mut String, what: &str) {
        use std::fmt::Write as _;
        let first = self
            .first_violation
            .as_ref()
            .map_or(String::new(), |v| format!(" (first: {v})"));
        let _ = writeln!(
            o,
            "invariant_checks {}  invariant_violations {}{what}{first}",
            self.invariant_checks, self.invariant_violations
        );
        let _ = writeln!(
            o,
            "digest {} (same seed, same digest in --deterministic mode)",
            self.digest
        );
    }
}

/// Highest latency the histograms track (60 s, in ns); larger values are clamped.
pub const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// A latency histogram: 1 ns .. [`MAX_LATENCY_NS`], 2 significant digits.
pub fn new_hist() -> Result<Histogram<u64>, CreationError> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 2)
}

const NKINDS: usize = HcallKind::ALL.len();

fn kind_index(opcode: u64) -> Option<usize> {
    HcallKind::ALL.iter().position(|k| k.opcode() == opcode)
}

/// Hypercall statistics of one or more guest cpus.
#[derive(Debug, Clone)]
pub struct HcallStats {
    /// Calls per kind.
    pub counts: [u64; NKINDS],
    /// Calls per kind that returned H_NOT_FOUND.
    pub not_found: [u64; NKINDS],
    /// Calls per kind that returned neither H_SUCCESS nor H_NOT_FOUND.
    pub other_ret: [u64; NKINDS],
    /// Calls with an opcode outside [`HcallKind`].
    pub other: u64,
    /// Latency of every call, in ns.
    pub latency: Histogram<u64>,
    /// Latency per kind, in ns.
    pub latency_by_kind: Vec<Histogram<u64>>,
    /// Event digest (module docs).
    pub digest: u64,
    /// Guest-side counters (accesses, faults, evictions, process events).
    pub guest: GuestCounters,
}

impl HcallStats {
    /// Empty statistics (fails only if the histogram bounds are rejected).
    pub fn new() -> Result<Self, CreationError> {
        let latency = new_hist()?;
        Ok(Self {
            counts: [0; NKINDS],
            not_found: [0; NKINDS],
            other_ret: [0; NKINDS],
            other: 0,
            latency_by_kind: (0..NKINDS).map(|_| Histogram::new_from(&latency)).collect(),
            latency,
            digest: FNV_OFFSET,
            guest: GuestCounters::default(),
        })
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Folds `x` into an FNV-1a style digest (word at a time).
#[inline]
pub fn digest_word(d: u64, x: u64) -> u64 {
    (d ^ x).wrapping_mul(FNV_PRIME)
}

impl HcallStats {
    /// Records one call.
    pub fn record(&mut self, vcpu: usize, opcode: u64, args: &[u64], r: &HcallResult, ns: u64) {
        let mut d = digest_word(self.digest, vcpu as u64);
        d = digest_word(d, opcode);
        for &a in args {
            d = digest_word(d, a);
        }
        d = digest_word(d, r.ret as u64);
        for &o in &r.out {
            d = digest_word(d, o);
        }
        self.digest = d;
        let ns = ns.clamp(1, MAX_LATENCY_NS);
        let _ = self.latency.record(ns);
        let Some(k) = kind_index(opcode) else {
            self.other += 1;
            return;
        };
        if let Some(c) = self.counts.get_mut(k) {
            *c += 1;
        }
        if r.ret == H_NOT_FOUND {
            if let Some(c) = self.not_found.get_mut(k) {
                *c += 1;
            }
        } else if r.ret != H_SUCCESS {
            if let Some(c) = self.other_ret.get_mut(k) {
                *c += 1;
            }
        }
        if let Some(h) = self.latency_by_kind.get_mut(k) {
            let _ = h.record(ns);
        }
    }

    /// Total calls.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.other
    }

    /// Count of `kind`.
    pub fn count(&self, kind: HcallKind) -> u64 {
        kind_index(kind.opcode())
            .and_then(|k| self.counts.get(k).copied())
            .unwrap_or(0)
    }

    /// The hypercall mix of these calls.
    pub fn mix(&self) -> Mix {
        Mix::from_counts(HcallKind::ALL.iter().map(|&k| (k, self.count(k))))
    }

    /// Adds `o` (digests are folded together).
    pub fn merge(&mut self, o: &HcallStats) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
        for (a, b) in self.not_found.iter_mut().zip(o.not_found.iter()) {
            *a += b;
        }
        for (a, b) in self.other_ret.iter_mut().zip(o.other_ret.iter()) {
            *a += b;
        }
        self.other += o.other;
        let _ = self.latency.add(&o.latency);
        for (a, b) in self
            .latency_by_kind
            .iter_mut()
            .zip(o.latency_by_kind.iter())
        {
            let _ = a.add(b);
        }
        self.digest = digest_word(self.digest, o.digest);
        self.guest.merge(&o.guest);
    }
}

/// Latency percentiles in ns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
}

impl Percentiles {
    /// Percentiles of `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The guest-MMU hypercall mix: fractions of H_ENTER, H_REMOVE, H_BULK_REMOVE,
/// H_PROTECT and H_READ among those five (the resize calls are excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Mix {
    /// Calls counted.
    pub calls: u64,
    /// H_ENTER fraction.
    pub enter: f64,
    /// H_REMOVE fraction.
    pub remove: f64,
    /// H_BULK_REMOVE fraction.
    pub bulk_remove: f64,
    /// H_PROTECT fraction.
    pub protect: f64,
    /// H_READ fraction.
    pub read: f64,
}

impl Mix {
    /// The mix of `(kind, count)` pairs.
    pub fn from_counts(counts: impl IntoIterator<Item = (HcallKind, u64)>) -> Self {
        let mut c = [0u64; 5];
        for (k, n) in counts {
            let i = match k {
                HcallKind::Enter => 0,
                HcallKind::Remove => 1,
                HcallKind::BulkRemove => 2,
                HcallKind::Protect => 3,
                HcallKind::Read => 4,
                _ => continue,
            };
            if let Some(x) = c.get_mut(i) {
                *x += n;
            }
        }
        let total: u64 = c.iter().sum();
        let f = |n: u64| {
            if total == 0 {
                0.0
            } else {
                n as f64 / total as f64
            }
        };
        Self {
            calls: total,
            enter: f(c[0]),
            remove: f(c[1]),
            bulk_remove: f(c[2]),
            protect: f(c[3]),
            read: f(c[4]),
        }
    }

    /// The mix of a trace file, counted with the trace parser.
    pub fn of_trace(path: impl AsRef<Path>) -> Result<Self, revmap_trace::TraceError> {
        let reader = TraceReader::open(path)?;
        let mut counts = [0u64; NKINDS];
        for rec in reader {
            if let Record::Hcall(h) = rec? {
                if let Some(c) = kind_index(h.opcode()).and_then(|k| counts.get_mut(k)) {
                    *c += 1;
                }
            }
        }
        Ok(Self::from_counts(
            HcallKind::ALL.iter().copied().zip(counts),
        ))
    }

    /// The largest absolute difference of a fraction between `self` and `o`.
    pub fn max_abs_diff(&self, o: &Mix) -> f64 {
        [
            self.enter - o.enter,
            self.remove - o.remove,
            self.bulk_remove - o.bulk_remove,
            self.protect - o.protect,
            self.read - o.read,
        ]
        .iter()
        .fold(0.0, |m, d| m.max(d.abs()))
    }

    /// One row per kind: name and fraction.
    pub fn rows(&self) -> [(&'static str, f64); 5] {
        [
            ("H_ENTER", self.enter),
            ("H_REMOVE", self.remove),
            ("H_BULK_REMOVE", self.bulk_remove),
            ("H_PROTECT", self.protect),
            ("H_READ", self.read),
        ]
    }
}
