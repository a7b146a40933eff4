//! `revmap run --mmu nested`: the simulator on the nested-guest MMU
//! ([`revmap_nested::NestedVm`]). L1 hypervisor vCPU threads ([`l1::L1Cpu`]) each run
//! their own L2 guests: the L1 writes its partition table and the L2s' radix tables
//! into L1 memory, runs a Linux-like L2 workload through H_ENTER_NESTED, handles the
//! exits (faults pages in, sets R/C, restores write permission), remaps, write-protects
//! and ages L2 pages with the matching H_TLB_INVALIDATE, flushes LPIDs, and destroys and
//! re-creates its L2s; host actors (memory pressure, aging, the live-migration dirty-log
//! loop of [`crate::actors`]) work on L1 memory through [`crate::host::HostMmu`]; the
//! nested MMU's checker ([`revmap_nested::NestedVm::check`]) runs at quiescent points
//! ([`run::run_nested`]) or after every step ([`det::run_nested_deterministic_with`]).
//!
//! The hostile-L1 scenario ([`NestedScenario::hostile`]) maps one L1 page into
//! thousands of (lpid, L2 address) pairs and invalidates each after one access, without
//! L0 ever unmapping the page: the report's `rmap_entries_max_per_gfn` and
//! `rmap_bytes_max` show the nested rmap bound (64 entries per L1 gfn) holding.
//!
//! # Invariants
//!
//! * Guest-observable correctness: every completed L2 access lands on the L1 address
//!   L1's tables give (the L1 model knows what it mapped) and on the host frame that
//!   backs that L1 page now (the VM resolves the host address back through L0's
//!   current frames; a freed frame is [`revmap_nested::L2Result::StaleFrame`]). Every
//!   exit is one L1's tables imply. Anything else is a guest mismatch, counted in
//!   `invariant_violations`.
//! * Each L2 belongs to one L1 vCPU: only that thread changes its tables and runs it,
//!   so the L1 model of an L2 is never raced by another L1 vCPU.
//! * Every non-additive change of L1's tables (a cleared V, R, C or W, a new RPN, a
//!   cleared PATE) is followed by the matching H_TLB_INVALIDATE before the L2 runs again
//!   (the trace contract of `traces/nested/README.md`).

pub mod det;
pub mod l1;
pub mod run;

use crate::actors::HostOps;
use crate::report::Verdict;
use crate::run::{si_ns, write_table};
use crate::scenario::{
    check_timing, invalid, parse_validated, read_file, DeterministicSpec, HostActor, HostSpec,
    ScenarioError,
};
use revmap_nested::{NestedCounters, NestedVm, NestedVmConfig, NestedVmError};
use serde::{Deserialize, Serialize};

pub use det::{minimise_nested, run_nested_deterministic_with, NestedSoak};
pub use l1::{L1Counters, L1Cpu};
pub use run::run_nested;

/// The default nested scenario as TOML (the same as [`NestedScenario::default`]).
pub const DEFAULT_NESTED_TOML: &str = include_str!("../../../../scenarios/nested.toml");
/// The hostile-L1 scenario as TOML (the same as [`NestedScenario::hostile`]).
pub const HOSTILE_NESTED_TOML: &str = include_str!("../../../../scenarios/nested-hostile.toml");

/// The L1 hypervisor and the shape of its L2s.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct L1Spec {
    /// L1 RAM in MiB (one memslot; a multiple of 16, at least 64).
    pub ram_mib: u64,
    /// Shift of the host pages backing L1 RAM: 16 (64 KiB) or 21 (2 MiB, THP).
    pub backing_page_shift: u32,
    /// L1 vCPU threads; each runs its own L2s.
    pub vcpus: usize,
    /// L2 guests per L1 vCPU.
    pub l2s_per_vcpu: usize,
    /// 64 KiB pages of each L2's user memory (faulted in on demand by L1).
    pub l2_pages: u64,
    /// 2 MiB leaves of each L2's kernel linear map (mapped when L1 creates the L2).
    pub kernel_2m_leaves: u64,
    /// The nested rmap bound: entries per L1 gfn.
    pub rmap_cap: usize,
    /// Run the hostile L1 instead of the Linux-like one (see module docs).
    pub hostile: bool,
}

impl Default for L1Spec {
    fn default() -> Self {
        Self {
            ram_mib: 512,
            backing_page_shift: 16,
            vcpus: 2,
            l2s_per_vcpu: 3,
            l2_pages: 1024,
            kernel_2m_leaves: 2,
            rmap_cap: revmap_rmap::nested::DEFAULT_NESTED_RMAP_CAP,
            hostile: false,
        }
    }
}

/// Relative weights of an L1 vCPU's operations, and the L2 workload's shape.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NestedWorkload {
    /// One L2 access through H_ENTER_NESTED (with the exits L1 handles).
    pub access: u32,
    /// L1 moves an L2 page to another L1 page (new RPN, page invalidation).
    pub remap: u32,
    /// L1 write-protects an L2 page (clears W and C, page invalidation).
    pub protect: u32,
    /// L1 ages an L2 page (clears R, page invalidation).
    pub age: u32,
    /// L1 unmaps an L2 page and frees its L1 page (clears V, page invalidation).
    pub unmap: u32,
    /// L1 flushes one L2's translations (H_TLB_INVALIDATE IS = 2, RIC = 0).
    pub flush_lpid: u32,
    /// L1 destroys an L2 (PATE cleared, IS = 2 RIC = 2 flush); it is re-created later.
    pub destroy: u32,
    /// Per mille of accesses that are stores.
    pub store_per_mille: u32,
    /// Per mille of accesses that are instruction fetches.
    pub fetch_per_mille: u32,
    /// Per mille of accesses to the kernel linear map (the rest go to user memory).
    pub kernel_per_mille: u32,
    /// Pages of an L2's user working set (most accesses fall in it; it drifts).
    pub hot_pages: u64,
}

impl Default for NestedWorkload {
    fn default() -> Self {
        Self {
            access: 1000,
            remap: 6,
            protect: 6,
            age: 6,
            unmap: 6,
            flush_lpid: 2,
            destroy: 1,
            store_per_mille: 300,
            fetch_per_mille: 100,
            kernel_per_mille: 300,
            hot_pages: 96,
        }
    }
}

/// A nested simulation scenario (TOML; every key optional).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NestedScenario {
    /// Name shown in reports.
    pub name: String,
    /// Seed of every random stream.
    pub seed: u64,
    /// Run length in seconds (threaded mode).
    pub duration_secs: f64,
    /// If non-zero, the threaded run ends after this many L2 accesses (H_ENTER_NESTED
    /// calls, counted at the controller's ticks) instead of after `duration_secs`.
    pub stop_after_accesses: u64,
    /// Invariant check interval (threaded mode; everything paused), in ms.
    pub check_interval_ms: u64,
    /// The L1 and its L2s.
    pub l1: L1Spec,
    /// The L1's operations and the L2 workload.
    pub workload: NestedWorkload,
    /// The host actors on L1 memory (`ops_per_tick` paces them in the threaded run).
    pub host: HostSpec,
    /// Deterministic mode: steps, and L1 RAM in MiB (`ram_mib`).
    pub deterministic: DeterministicSpec,
}

impl Default for NestedScenario {
    fn default() -> Self {
        Self {
            name: "nested".into(),
            seed: 1,
            duration_secs: 10.0,
            stop_after_accesses: 0,
            check_interval_ms: 2000,
            l1: L1Spec::default(),
            workload: NestedWorkload::default(),
            host: HostSpec::default(),
            deterministic: DeterministicSpec {
                steps: 4000,
                ram_mib: 128,
            },
        }
    }
}

/// Why a nested run could not complete.
#[derive(Debug, thiserror::Error)]
pub enum NestedRunError {
    /// The scenario does not fit the L1 memory layout.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// The nested VM could not be created.
    #[error("cannot create the nested VM: {0}")]
    Vm(#[from] NestedVmError),
    /// L1 could not build its tables (a store outside L1 RAM: a layout bug).
    #[error("L1 setup: {0}")]
    Setup(String),
    /// A host actor panicked.
    #[error(transparent)]
    Actor(#[from] crate::actors::ActorPanicked),
    /// An L1 vCPU thread panicked.
    #[error("L1 vCPU thread {0} panicked")]
    Vcpu(usize),
}

impl NestedScenario {
    /// The hostile-L1 scenario (`scenarios/nested-hostile.toml`): every L1 vCPU maps
    /// one L1 page into 16384 L2 addresses of each of its four L2s and invalidates
    /// each pair after one access; aging and migration only (L0 never unmaps the page).
    pub fn hostile() -> Self {
        Self {
            name: "nested-hostile".into(),
            l1: L1Spec {
                hostile: true,
                l2s_per_vcpu: 4,
                ..L1Spec::default()
            },
            host: HostSpec {
                actors: vec![HostActor::Aging, HostActor::Migration],
                ..HostSpec::default()
            },
            ..Self::default()
        }
    }

    /// An embedded scenario by name: `nested` (or `default`) and `hostile` (or
    /// `nested-hostile`).
    pub fn embedded(name: &str) -> Option<Self> {
        match name {
            "nested" | "default" => Some(Self::default()),
            "hostile" | "nested-hostile" => Some(Self::hostile()),
            _ => None,
        }
    }

    /// Parses and validates a TOML scenario.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        parse_validated(text, Self::validate)
    }

    /// Reads, parses and validates a scenario file. Errors name the file; a file
    /// without `name` is named after the file (its stem).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ScenarioError> {
        read_file(path, Self::from_toml, |s| &mut s.name)
    }

    /// L2 guests in all (lpids 1..=this).
    pub fn l2s(&self) -> usize {
        self.l1.vcpus.saturating_mul(self.l1.l2s_per_vcpu)
    }

    /// The nested VM of the scenario, L1 RAM `ram_mib` MiB.
    pub fn make_vm(&self, ram_mib: u64) -> Result<NestedVm, NestedRunError> {
        let mut cfg = NestedVmConfig::new(ram_mib << 20, self.l1.backing_page_shift);
        cfg.dirty_logging = self.host.migrates();
        cfg.rmap_cap = self.l1.rmap_cap;
        Ok(NestedVm::new(cfg)?)
    }

    /// Checks every value, and that the L1 memory layout fits both RAM sizes.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let l = &self.l1;
        for (field, mib) in [
            ("l1.ram_mib", l.ram_mib),
            ("deterministic.ram_mib", self.deterministic.ram_mib),
        ] {
            if !(64..=(64 << 10)).contains(&mib) || mib % 16 != 0 {
                return Err(invalid(field, "must be a multiple of 16 in 64..=65536"));
            }
        }
        if ![16, 21].contains(&l.backing_page_shift) {
            return Err(invalid("l1.backing_page_shift", "must be 16 or 21"));
        }
        if l.vcpus == 0 || l.vcpus > 64 {
            return Err(invalid("l1.vcpus", "must be 1..=64"));
        }
        if l.l2s_per_vcpu == 0 || self.l2s() > l1::MAX_L2S {
            return Err(invalid(
                "l1.l2s_per_vcpu",
                format!("must be positive, with at most {} L2s in all", l1::MAX_L2S),
            ));
        }
        if l.l2_pages == 0 || l.kernel_2m_leaves + l.l2_pages.div_ceil(32) > l1::MAX_PTE_TABLES {
            return Err(invalid(
                "l1.l2_pages / l1.kernel_2m_leaves",
                format!(
                    "l2_pages must be positive and kernel_2m_leaves + l2_pages / 32 at most {}",
                    l1::MAX_PTE_TABLES
                ),
            ));
        }
        if l.rmap_cap == 0 || l.rmap_cap > 4096 {
            return Err(invalid("l1.rmap_cap", "must be 1..=4096"));
        }
        let w = &self.workload;
        if w.access == 0 {
            return Err(invalid("workload.access", "must be positive"));
        }
        if w.store_per_mille + w.fetch_per_mille > 1000 || w.kernel_per_mille > 1000 {
            return Err(invalid(
                "workload.store_per_mille / fetch_per_mille / kernel_per_mille",
                "store + fetch and kernel must each be at most 1000",
            ));
        }
        if w.hot_pages == 0 {
            return Err(invalid("workload.hot_pages", "must be positive"));
        }
        check_timing(self.duration_secs, self.check_interval_ms)?;
        if self.deterministic.steps == 0 {
            return Err(invalid("deterministic.steps (--steps)", "must be positive"));
        }
        if self.host.ops_per_tick == 0 {
            return Err(invalid("host.ops_per_tick", "must be positive"));
        }
        for mib in [l.ram_mib, self.deterministic.ram_mib] {
            l1::Layout::new(self, mib << 20).map_err(|why| invalid("l1.ram_mib", why))?;
        }
        Ok(())
    }
}

/// The nested MMU's counters in the report (`nested` object): the VM's counters and
/// the bound and rmap size at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NestedStats {
    /// [`NestedVm::counters`] (flattened into the object).
    #[serde(flatten)]
    pub counters: NestedCounters,
    /// The bound (entries per L1 gfn).
    pub rmap_bound: u64,
    /// Nested rmap entries at the end.
    pub rmap_entries_end: u64,
    /// Non-empty nested rmap words at the end.
    pub rmap_words_end: u64,
}

impl NestedStats {
    /// The VM's counters now.
    pub fn of(vm: &NestedVm) -> Self {
        let (entries, words) = vm.rmap_totals();
        Self {
            counters: vm.counters(),
            rmap_bound: vm.config().rmap_cap as u64,
            rmap_entries_end: entries,
            rmap_words_end: words,
        }
    }
}

/// One sample of the run over time (threaded: per tick; deterministic: per 1% of the
/// steps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct NestedSample {
    /// Seconds into the run (deterministic mode: the step).
    pub t: f64,
    /// L2 accesses per second over the last interval (deterministic: per step).
    pub accesses_per_s: f64,
    /// Nested faults per second over the last interval (deterministic: per step).
    pub faults_per_s: f64,
    /// Nested rmap entries now.
    pub rmap_entries: u64,
    /// Nested rmap memory high-water mark so far.
    pub rmap_bytes_max: u64,
    /// Longest nested rmap list so far.
    pub rmap_entries_max_per_gfn: u64,
}

/// The outcome of a nested run (also serialised as `--json`).
#[derive(Clone, Debug, Serialize)]
pub struct NestedRunReport {
    /// Always `"nested"`.
    pub mmu: &'static str,
    /// Scenario name.
    pub scenario: String,
    /// The hostile L1 ran.
    pub hostile: bool,
    /// The run was stopped early (SIGINT).
    pub interrupted: bool,
    /// Seed.
    pub seed: u64,
    /// Deterministic mode.
    pub deterministic: bool,
    /// Seconds run.
    pub elapsed_s: f64,
    /// Deterministic mode: steps run.
    pub steps: u64,
    /// L1 vCPU threads.
    pub vcpus: usize,
    /// L2 guests (lpids).
    pub l2s: usize,
    /// L1 RAM bytes.
    pub l1_ram_bytes: u64,
    /// L2 accesses (H_ENTER_NESTED calls, L1's retries after an exit included).
    pub accesses: u64,
    /// L2 accesses per second.
    pub accesses_per_s: f64,
    /// The L1's operations and what its L2s saw.
    pub l1: L1Counters,
    /// Host operations on L1 memory.
    pub host_ops: HostOps,
    /// Host operations per second.
    pub host_ops_per_s: f64,
    /// The nested MMU.
    pub nested: NestedStats,
    /// Whether the run was clean, and its event digest.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Samples over time (for the plots).
    pub timeline: Vec<NestedSample>,
}

impl NestedRunReport {
    /// The human summary.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let secs = self.elapsed_s.max(1e-9);
        let _ = writeln!(
            o,
            "revmap run --mmu nested: scenario {:?}{}, seed {}, {} L1 vCPU(s) running {} L2s, \
             {} MiB L1{}",
            self.scenario,
            if self.hostile { " (hostile L1)" } else { "" },
            self.seed,
            self.vcpus,
            self.l2s,
            self.l1_ram_bytes >> 20,
            if self.deterministic {
                format!(" (deterministic, {} steps)", self.steps)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            o,
            "ran {:.1} s: {} L2 accesses ({:.0}/s), {} host operations ({:.0}/s)",
            self.elapsed_s,
            self.accesses,
            self.accesses_per_s,
            self.host_ops.total(),
            self.host_ops_per_s
        );
        if self.interrupted {
            let _ = writeln!(
                o,
                "INTERRUPTED: stopped early (SIGINT); the checker still ran"
            );
        }
        let l = &self.l1;
        let _ = writeln!(o, "\nL2 accesses (what H_ENTER_NESTED came to)");
        let rate = |n: u64| format!("{:.0}", n as f64 / secs);
        let rows = vec![
            vec!["completed".into(), l.ok.to_string(), rate(l.ok)],
            vec![
                "hdsi NOHPTE (L1 faults the page in)".into(),
                l.exit_nohpte.to_string(),
                rate(l.exit_nohpte),
            ],
            vec![
                "hdsi SET_RC (L1 sets R/C)".into(),
                l.exit_set_rc.to_string(),
                rate(l.exit_set_rc),
            ],
            vec![
                "hdsi PROTFAULT (L1 restores W)".into(),
                l.exit_protfault.to_string(),
                rate(l.exit_protfault),
            ],
            vec![
                "guest mismatches".into(),
                l.mismatches.to_string(),
                rate(l.mismatches),
            ],
        ];
        write_table(&mut o, &["outcome", "count", "per s"], &rows);
        let _ = writeln!(o, "\nL1 operations");
        let rows: Vec<Vec<String>> = [
            ("map (fault-in)", l.maps),
            ("remap (new RPN)", l.remaps),
            ("write-protect", l.protects),
            ("age (clear R)", l.ages),
            ("unmap", l.unmaps),
            ("reclaim (L1 out of pages)", l.reclaims),
            ("H_TLB_INVALIDATE page", l.page_invalidations),
            ("H_TLB_INVALIDATE lpid", l.lpid_flushes),
            ("L2 created by L1", l.l2_created),
            ("L2 destroyed by L1", l.l2_destroyed),
            ("hostile (lpid, L2 address) pairs", l.hostile_pairs),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| vec![(*k).to_owned(), n.to_string(), rate(*n)])
        .collect();
        write_table(&mut o, &["operation", "count", "per s"], &rows);
        let h = &self.host_ops;
        let _ = writeln!(
            o,
            "\nhost operations on L1 memory: {}, get_dirty_log {} ({} dirty 4 KiB frames over {} \
             rounds), clear_dirty_log {}",
            h.unmap_and_aging("translations removed"),
            h.get_dirty_log,
            h.dirty_pages,
            h.dirty_log_rounds,
            h.clear_dirty_log
        );
        let n = &self.nested.counters;
        let (bound, entries_end, words_end) = (
            self.nested.rmap_bound,
            self.nested.rmap_entries_end,
            self.nested.rmap_words_end,
        );
        let _ = writeln!(
            o,
            "nested MMU: {} nested faults ({} per access), {} shadow hits, {} fault retries \
             (host invalidation raced), {} shadow flushes, L2 objects {} created / {} released",
            n.nested_faults,
            if self.accesses == 0 {
                "0".into()
            } else {
                format!("{:.2}", n.nested_faults as f64 / self.accesses as f64)
            },
            n.shadow_hits,
            n.fault_retries,
            n.shadow_flushes,
            n.l2_created,
            n.l2_released
        );
        let _ = writeln!(
            o,
            "nested rmap: {} shadow PTEs removed through it (rmap_invalidations), {} stale \
             entries skipped, {} reclaimed at the bound, {} inserts refused; \
             rmap_entries_max_per_gfn {} (bound {}), rmap_bytes_max {} B; at the end {} \
             entries in {} words",
            n.rmap_invalidations,
            n.rmap_stale_skipped,
            n.rmap_reclaimed,
            n.rmap_refused,
            n.rmap_entries_max_per_gfn,
            bound,
            n.rmap_bytes_max,
            entries_end,
            words_end
        );
        if self.hostile {
            let half = self
                .timeline
                .get(self.timeline.len() / 2)
                .map_or(0, |s| s.rmap_bytes_max);
            let _ = writeln!(
                o,
                "hostile L1: {} (lpid, L2 address) pairs mapped one L1 page and were \
                 invalidated without L0 unmapping it; the rmap high-water mark was {} B \
                 halfway and {} B at the end (an unbounded rmap would hold every pair)",
                l.hostile_pairs, half, n.rmap_bytes_max
            );
        }
        if self.accesses > 0 && !self.deterministic {
            let _ = writeln!(
                o,
                "mean wall time per L2 access (all L1 vCPUs): {}",
                si_ns((self.elapsed_s * 1e9 * self.vcpus as f64 / self.accesses as f64) as u64)
            );
        }
        self.verdict.write_summary(&mut o, "");
        o
    }
}

/// Records the first violation and counts it.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    pub(crate) checks: u64,
    pub(crate) violations: u64,
    pub(crate) first: Option<String>,
}

impl Checks {
    /// Runs the nested MMU's checker (callers quiesce first).
    pub(crate) fn check(&mut self, vm: &NestedVm) {
        self.checks += 1;
        if let Err(v) = vm.check() {
            self.violations += 1;
            if self.first.is_none() {
                self.first = v.first().map(|x| x.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests;
