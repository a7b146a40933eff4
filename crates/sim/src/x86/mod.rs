//! `revmap run --mmu x86`: the simulator on the x86 shadow MMU
//! ([`revmap_shadow::vm::ShadowVm`]).
//!
//! * [`guest`]: the Linux-like x86-64 guest (kernel direct map with 1 GiB and 2 MiB
//!   pages, processes with 4-level tables in guest memory, fork with copy-on-write,
//!   exec, exit, munmap, PTE updates with INVLPG, CR3 switches), checking every access
//!   against its own tables;
//! * [`run`]: the threaded run (vCPU threads, the host actors on their own threads,
//!   dirty-log rounds and the checker at quiescent points on the controller);
//! * [`det`]: the deterministic mode (one thread, seeded interleaving, the checker
//!   after every step) and [`det::minimise`];
//! * this module: the x86 scenario ([`X86Scenario`], TOML, embedded default
//!   `scenarios/x86.toml`), the VM's construction, the migration actor with its dirty
//!   logging passes ([`DirtyLogPasses`]) and the report ([`X86Report`]).
//!
//! # Invariants
//!
//! * [`X86Scenario::validate`] rejects what the simulator cannot run, naming the field.
//! * `invariant_violations` counts the shadow MMU checker's failures *and* the guest's
//!   mismatches (an access that did not land where the guest's tables say, a #PF the
//!   tables do not imply, an MMU error): a run is correct only if both are 0.

pub mod det;
pub mod guest;
pub mod run;

use crate::actors::{HostOps, Migration, MigrationEvent};
use crate::host::HostMmu;
use crate::report::Verdict;
use crate::run::{si_ns, write_interrupted, write_table, MigrationStats};
use crate::scenario::{
    check_timing, invalid, parse_validated, read_file, DeterministicSpec, HostActor, HostSpec,
    ScenarioError,
};
use guest::{KernelMap, X86Counters, X86Cpu, X86Workload};
use revmap_host::{Memslot, MemslotError, MemslotFlags};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_shadow::mmu::{ShadowError, ShadowStats};
use revmap_shadow::vm::ShadowVm;
use serde::{Deserialize, Serialize};

/// The default x86 scenario as TOML (the same as [`X86Scenario::default`]).
pub const DEFAULT_X86_SCENARIO_TOML: &str = include_str!("../../../../scenarios/x86.toml");

/// Host virtual address of guest RAM (1 GiB aligned).
const RAM_HVA: u64 = 0x7f00_0000_0000;

/// The x86 guest machine.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct X86GuestSpec {
    /// Guest RAM in MiB (a multiple of 2, at least 16).
    pub ram_mib: u64,
    /// vCPU threads.
    pub vcpus: usize,
    /// Host backing page shift of guest RAM: 12 (4 KiB), 21 (2 MiB, transparent huge
    /// pages) or 30 (1 GiB hugetlbfs). An SPTE is never larger than the host page.
    pub backing_page_shift: u32,
}

impl Default for X86GuestSpec {
    fn default() -> Self {
        Self {
            ram_mib: 1536,
            vcpus: 2,
            backing_page_shift: 21,
        }
    }
}

/// The migration actor on x86: dirty logging is switched on for `rounds` dirty-log
/// rounds (write-protecting every SPTE of the slot, huge pages split to 4 KiB), then off
/// for `pause_ticks` controller ticks (deterministic mode: actor steps), so huge SPTEs
/// come back in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct X86MigrationSpec {
    /// Dirty-log rounds per pass.
    pub rounds: u64,
    /// Ticks (steps) with dirty logging off between passes.
    pub pause_ticks: u64,
}

impl Default for X86MigrationSpec {
    fn default() -> Self {
        Self {
            rounds: 8,
            pause_ticks: 4,
        }
    }
}

/// A whole x86 simulation scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct X86Scenario {
    /// Name shown in reports.
    pub name: String,
    /// Seed of every random stream.
    pub seed: u64,
    /// Run length in seconds (not in deterministic mode).
    pub duration_secs: f64,
    /// If non-zero, the run ends after this many guest accesses (user and kernel;
    /// counted at the controller's 100 ms ticks) instead of after `duration_secs`.
    pub stop_after_accesses: u64,
    /// Invariant check interval (vCPUs and actors paused), in ms.
    pub check_interval_ms: u64,
    /// The guest machine.
    pub guest: X86GuestSpec,
    /// The guest workload.
    pub workload: X86Workload,
    /// The host actors (as in the HPT scenario).
    pub host: HostSpec,
    /// The migration actor's dirty-logging passes.
    pub migration: X86MigrationSpec,
    /// Deterministic mode (`ram_mib` a multiple of 2, at most 4096).
    pub deterministic: DeterministicSpec,
}

impl Default for X86Scenario {
    fn default() -> Self {
        Self {
            name: "x86-default".into(),
            seed: 1,
            duration_secs: 30.0,
            stop_after_accesses: 0,
            check_interval_ms: 2000,
            guest: X86GuestSpec::default(),
            workload: X86Workload::default(),
            host: HostSpec::default(),
            migration: X86MigrationSpec::default(),
            deterministic: DeterministicSpec {
                steps: 4000,
                ram_mib: 1088,
            },
        }
    }
}

impl X86Scenario {
    /// Parses and validates a TOML scenario.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        parse_validated(text, Self::validate)
    }

    /// Reads, parses and validates a scenario file; errors name the file; a file
    /// without `name` is named after the file (its stem).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ScenarioError> {
        read_file(path, Self::from_toml, |s| &mut s.name)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let ram_ok = |m: u64, max: u64| m >= 16 && m % 2 == 0 && m <= max;
        if !ram_ok(self.guest.ram_mib, 1 << 16) {
            return Err(invalid(
                "guest.ram_mib",
                "must be an even number of MiB, 16..=65536",
            ));
        }
        if self.guest.vcpus == 0 || self.guest.vcpus > 64 {
            return Err(invalid("guest.vcpus", "must be 1..=64"));
        }
        if ![12, 21, 30].contains(&self.guest.backing_page_shift) {
            return Err(invalid("guest.backing_page_shift", "must be 12, 21 or 30"));
        }
        check_timing(self.duration_secs, self.check_interval_ms)?;
        let w = &self.workload;
        if w.mix.touch == 0 {
            return Err(invalid("workload.mix.touch", "must be positive"));
        }
        if w.max_processes == 0 || w.max_processes > 4096 {
            return Err(invalid("workload.max_processes", "must be 1..=4096"));
        }
        if w.max_vma_pages == 0 || w.max_vma_pages > 1 << 18 {
            return Err(invalid("workload.max_vma_pages", "must be 1..=262144"));
        }
        if w.store_per_mille > 1000 || w.hot_per_mille > 1000 {
            return Err(invalid(
                "workload.store_per_mille / hot_per_mille",
                "must be at most 1000",
            ));
        }
        if self.host.ops_per_tick == 0 {
            return Err(invalid("host.ops_per_tick", "must be positive"));
        }
        if self.migration.rounds == 0 {
            return Err(invalid("migration.rounds", "must be positive"));
        }
        if self.deterministic.steps == 0 {
            return Err(invalid("deterministic.steps (--steps)", "must be positive"));
        }
        if !ram_ok(self.deterministic.ram_mib, 4096) {
            return Err(invalid(
                "deterministic.ram_mib",
                "must be an even number of MiB, 16..=4096",
            ));
        }
        Ok(())
    }
}

/// Why an x86 run could not complete.
#[derive(Debug, thiserror::Error)]
pub enum X86RunError {
    /// The guest RAM's memslot could not be created.
    #[error("cannot create the guest's memory: {0}")]
    Memslot(#[from] MemslotError),
    /// The guest could not boot (its kernel tables or first process).
    #[error("cannot boot the guest: {0}")]
    Boot(#[from] ShadowError),
    /// A host actor panicked.
    #[error(transparent)]
    Actor(#[from] crate::actors::ActorPanicked),
    /// A vCPU thread panicked.
    #[error("vCPU thread {0} panicked")]
    Vcpu(usize),
}

/// The VM of a run: guest RAM as one memslot at gfn 0 on `backing_page_shift` host
/// pages, the kernel direct map booted, one guest per vCPU.
pub fn build(
    sc: &X86Scenario,
    ram_mib: u64,
) -> Result<(ShadowVm, KernelMap, Vec<X86Cpu>), X86RunError> {
    let vm = ShadowVm::new();
    let slot = Memslot::new(
        SlotId(0),
        Gfn(0),
        ram_mib << 8,
        sc.guest.backing_page_shift,
        MemslotFlags::empty(),
        Hva(RAM_HVA),
    )?;
    vm.create_memslot(slot)?;
    let kernel = KernelMap::boot(&vm, ram_mib << 20)?;
    let nv = sc.guest.vcpus;
    let cpus = (0..nv)
        .map(|v| X86Cpu::new(&vm, kernel, v, nv, sc.seed, sc.workload))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((vm, kernel, cpus))
}

/// The guests' counters summed, and their digests folded in vCPU order.
pub(crate) fn merge_cpus(cpus: &[X86Cpu]) -> (X86Counters, u64) {
    let mut guest = X86Counters::default();
    let mut digest = 0u64;
    for c in cpus {
        guest.merge(&c.counters);
        digest = crate::report::digest_word(digest, c.digest);
    }
    (guest, digest)
}

/// The migration actor on the shadow MMU: passes of dirty-log rounds with dirty logging
/// switched on (`KVM_MEM_LOG_DIRTY_PAGES`, which write-protects the slot) and off in
/// between ([`X86MigrationSpec`]).
#[derive(Debug)]
pub struct DirtyLogPasses {
    seed: u64,
    spec: X86MigrationSpec,
    /// The rounds of the current pass (dirty logging on), or `None` while off.
    logging: Option<Migration>,
    idle: u64,
    passes: u64,
    /// Dirty 4 KiB frames harvested per round.
    pub rounds: Vec<u64>,
    /// Host operations (dirty-log calls).
    pub ops: HostOps,
    /// Memslot flag changes that failed (must be 0).
    pub errors: u64,
}

impl DirtyLogPasses {
    /// A migration actor, dirty logging off, its first pass due at once.
    pub fn new(seed: u64, spec: X86MigrationSpec) -> Self {
        Self {
            seed,
            spec,
            logging: None,
            idle: 0,
            passes: 0,
            rounds: Vec::new(),
            ops: HostOps::default(),
            errors: 0,
        }
    }

    /// Passes started.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    fn set_logging(&mut self, vm: &ShadowVm, on: bool) {
        let flags = if on {
            MemslotFlags::LOG_DIRTY_PAGES
        } else {
            MemslotFlags::empty()
        };
        for s in vm.memslot_views() {
            if vm.set_memslot_flags(s.id, flags).is_err() {
                self.errors += 1;
            }
        }
    }

    /// One operation: while off, count down the pause then switch logging on; while
    /// on, one dirty-log call (`whole_round`: a whole round), switching logging off
    /// after the pass's last round. Returns a tag of what it did (for the digest).
    pub fn step(&mut self, vm: &ShadowVm, whole_round: bool) -> u64 {
        let Some(m) = self.logging.as_mut() else {
            if self.idle > 0 {
                self.idle -= 1;
                return 0;
            }
            self.set_logging(vm, true);
            self.passes += 1;
            self.logging = Some(Migration::new(self.seed, vm.memslot_views()));
            return 1;
        };
        let rounds = &mut self.rounds;
        let mut observe = |e: MigrationEvent<'_>| match e {
            MigrationEvent::RoundStart { .. } => rounds.push(0),
            MigrationEvent::Log { bitmap, .. } => {
                if let Some(last) = rounds.last_mut() {
                    *last += bitmap
                        .iter()
                        .map(|w| u64::from(w.count_ones()))
                        .sum::<u64>();
                }
            }
        };
        let tag = if whole_round {
            m.run_round(vm, &mut self.ops, &mut observe)
        } else {
            m.step(vm, &mut self.ops, &mut observe)
                .map_or(2, |op| match op {
                    crate::actors::HostOp::GetDirtyLog { round, .. } => round << 8 | 3,
                    _ => 4,
                })
        };
        if m.round() >= self.spec.rounds && m.at_round_start() {
            self.logging = None;
            self.idle = self.spec.pause_ticks;
            self.set_logging(vm, false);
        }
        tag ^ self.ops.dirty_pages << 16
    }
}

/// The shadow MMU's statistics at the end of a run (the `shadow` object of `--json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ShadowSummary {
    /// Shadow page faults (walks of the guest tables).
    pub page_faults: u64,
    /// Shadow-table hits (counted by the guest: `ShadowVm::access` serves a hit under
    /// the read lock, where the MMU keeps no counter).
    pub hits: u64,
    /// Guest frames write-protected because they are shadowed page tables (at the end).
    pub write_protected_gfns: u64,
    /// Shadow pages in use (at the end).
    pub shadow_pages: u64,
    /// Shadow pages created.
    pub sp_created: u64,
    /// Shadow pages zapped.
    pub sp_zapped: u64,
    /// Shadow pages evicted by the page limit.
    pub evicted: u64,
    /// Pages that went unsync.
    pub unsync: u64,
    /// Unsync pages resynced.
    pub synced: u64,
    /// Emulated guest page-table writes.
    pub emulated_writes: u64,
    /// Shadow pages zapped for write flooding.
    pub flooded: u64,
    /// Misaligned emulated writes.
    pub misaligned: u64,
    /// Guest writes that hit a write-protected page table.
    pub write_protected_faults: u64,
    /// CR3 switches served from the previous-roots cache.
    pub prev_root_hits: u64,
    /// Huge (2 MiB / 1 GiB) SPTEs installed.
    pub huge_sptes: u64,
    /// rmap entries added.
    pub rmap_adds: u64,
    /// rmaps zapped over the recycle threshold.
    pub rmap_recycled: u64,
    /// Remote TLB flushes requested.
    pub tlb_flushes: u64,
    /// Faults retried (invalidation, changed gpte, obsolete root).
    pub retries: u64,
}

impl ShadowSummary {
    /// The statistics of `vm` now.
    pub fn of(vm: &ShadowVm) -> Self {
        vm.with_mmu_read(|m| {
            let s: &ShadowStats = &m.stats;
            Self {
                page_faults: s.page_faults,
                hits: s.hits,
                write_protected_gfns: m.write_protected_gfns(),
                shadow_pages: m.used_mmu_pages(),
                sp_created: s.sp_created,
                sp_zapped: s.sp_zapped,
                evicted: s.evicted,
                unsync: s.unsync,
                synced: s.synced,
                emulated_writes: s.emulated_writes,
                flooded: s.flooded,
                misaligned: s.misaligned,
                write_protected_faults: s.write_protected_faults,
                prev_root_hits: s.prev_root_hits,
                huge_sptes: s.huge_sptes,
                rmap_adds: s.rmap_adds,
                rmap_recycled: s.rmap_recycled,
                tlb_flushes: s.tlb_flushes,
                retries: s.retries,
            }
        })
    }
}

/// One sample of the run over time (cumulative counts; plots take differences).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct X86Sample {
    /// Seconds into the run (deterministic mode: the step).
    pub t: f64,
    /// Guest accesses so far.
    pub accesses: u64,
    /// Shadow page faults so far.
    pub page_faults: u64,
    /// Write-protected guest frames now.
    pub write_protected_gfns: u64,
    /// Shadow pages now.
    pub shadow_pages: u64,
}

impl X86Sample {
    /// A sample of `vm` at `t` with `accesses` so far.
    pub fn of(vm: &ShadowVm, t: f64, accesses: u64) -> Self {
        vm.with_mmu_read(|m| Self {
            t,
            accesses,
            page_faults: m.stats.page_faults,
            write_protected_gfns: m.write_protected_gfns(),
            shadow_pages: m.used_mmu_pages(),
        })
    }
}

/// The direct map's pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirectMap {
    /// 1 GiB pages.
    pub pages_1g: u64,
    /// 2 MiB pages.
    pub pages_2m: u64,
}

/// The outcome of an x86 run (also serialised as `--json`).
#[derive(Clone, Debug, Serialize)]
pub struct X86Report {
    /// Always "x86".
    pub mmu: &'static str,
    /// Scenario name.
    pub scenario: String,
    /// Stopped early (SIGINT); the checker still ran at the end.
    pub interrupted: bool,
    /// Seed.
    pub seed: u64,
    /// Deterministic mode.
    pub deterministic: bool,
    /// Deterministic mode: steps run.
    pub steps: u64,
    /// Seconds run.
    pub elapsed_s: f64,
    /// vCPUs.
    pub vcpus: usize,
    /// Guest RAM bytes.
    pub ram_bytes: u64,
    /// Host backing page shift.
    pub backing_page_shift: u32,
    /// The kernel direct map.
    pub direct_map: DirectMap,
    /// Guest accesses (user and kernel).
    pub accesses: u64,
    /// Guest accesses per second.
    pub accesses_per_s: f64,
    /// Guest-side counters.
    pub guest: X86Counters,
    /// The shadow MMU's statistics.
    pub shadow: ShadowSummary,
    /// The host actors that ran.
    pub host_actors: Vec<HostActor>,
    /// Host operations.
    pub host_ops: HostOps,
    /// Host operations per second.
    pub host_ops_per_s: f64,
    /// Dirty-logging passes (logging switched on, rounds, switched off).
    pub dirty_logging_passes: u64,
    /// Migration dirty-log rounds.
    pub migration: MigrationStats,
    /// Whether the run was clean (each check: the shadow MMU checker, at a quiescent
    /// point), and its event digest.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Samples over time.
    pub timeline: Vec<X86Sample>,
}

/// What a run collected, for [`X86Report::assemble`].
#[derive(Debug)]
pub(crate) struct Collected {
    pub(crate) deterministic: bool,
    pub(crate) steps: u64,
    pub(crate) elapsed: f64,
    pub(crate) ram_mib: u64,
    pub(crate) kernel: KernelMap,
    pub(crate) guest: X86Counters,
    pub(crate) digest: u64,
    pub(crate) host_ops: HostOps,
    pub(crate) migration: DirtyLogPasses,
    /// The shadow MMU checker's tally (its first failure as the report shows it).
    pub(crate) checks: run::Checks,
    pub(crate) timeline: Vec<X86Sample>,
}

impl X86Report {
    pub(crate) fn assemble(sc: &X86Scenario, vm: &ShadowVm, c: Collected) -> Self {
        let secs = c.elapsed.max(1e-9);
        let mut host_ops = c.host_ops;
        host_ops.merge(&c.migration.ops);
        let rounds = c.migration.rounds;
        let n = rounds.len() as u64;
        let sum: u64 = rounds.iter().sum();
        let migration = MigrationStats {
            rounds: n,
            frames_per_backing_page: 1u64 << sc.guest.backing_page_shift.saturating_sub(12),
            guest_frames: c.ram_mib << 8,
            mean_dirty_pages: if n == 0 { 0.0 } else { sum as f64 / n as f64 },
            max_dirty_pages: rounds.iter().copied().max().unwrap_or(0),
            dirty_pages_per_round: rounds,
        };
        let accesses = c.guest.accesses + c.guest.kernel_accesses;
        let first_violation = c.checks.first.or_else(|| c.guest.first_mismatch.clone());
        let verdict = Verdict::new(
            c.checks.checks,
            c.checks.failures + c.guest.mismatches + c.migration.errors,
            first_violation,
            c.digest,
        );
        Self {
            mmu: "x86",
            scenario: sc.name.clone(),
            interrupted: false,
            seed: sc.seed,
            deterministic: c.deterministic,
            steps: c.steps,
            elapsed_s: c.elapsed,
            vcpus: sc.guest.vcpus,
            ram_bytes: c.ram_mib << 20,
            backing_page_shift: sc.guest.backing_page_shift,
            direct_map: DirectMap {
                pages_1g: c.kernel.pages_1g,
                pages_2m: c.kernel.pages_2m,
            },
            accesses,
            accesses_per_s: accesses as f64 / secs,
            shadow: ShadowSummary {
                hits: c.guest.shadow_hits,
                ..ShadowSummary::of(vm)
            },
            guest: c.guest,
            host_actors: sc.host.actors.clone(),
            host_ops_per_s: host_ops.total() as f64 / secs,
            host_ops,
            dirty_logging_passes: c.migration.passes,
            migration,
            verdict,
            timeline: c.timeline,
        }
    }

    /// The human summary.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let secs = self.elapsed_s.max(1e-9);
        let _ = writeln!(
            o,
            "revmap run --mmu x86: scenario {:?}, seed {}, {} vCPU(s), {} MiB guest on {} KiB \
             host pages, direct map {} x 1 GiB + {} x 2 MiB{}",
            self.scenario,
            self.seed,
            self.vcpus,
            self.ram_bytes >> 20,
            1u64 << self.backing_page_shift.saturating_sub(10),
            self.direct_map.pages_1g,
            self.direct_map.pages_2m,
            if self.deterministic {
                format!(" (deterministic, {} steps)", self.steps)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            o,
            "ran {:.1} s: {} guest accesses ({:.0}/s, {} per access{}), {} host operations \
             ({:.0}/s)",
            self.elapsed_s,
            self.accesses,
            self.accesses_per_s,
            si_ns((secs * 1e9 / self.accesses.max(1) as f64) as u64),
            if self.deterministic {
                ", the checker after every step included"
            } else {
                ""
            },
            self.host_ops.total(),
            self.host_ops_per_s
        );
        if self.interrupted {
            write_interrupted(&mut o);
        }
        let g = &self.guest;
        let _ = writeln!(o, "\nguest (Linux-like, 4-level paging)");
        let rate = |n: u64| format!("{:.0}", n as f64 / secs);
        let row = |k: &str, n: u64, what: &str| {
            vec![k.to_owned(), n.to_string(), rate(n), what.to_owned()]
        };
        let rows = vec![
            row(
                "user accesses",
                g.accesses,
                "loads, stores, fetches of the running process",
            ),
            row(
                "kernel accesses",
                g.kernel_accesses,
                "through the direct map",
            ),
            row(
                "shadow hits",
                g.shadow_hits,
                "translated by the shadow table",
            ),
            row(
                "shadow faults fixed",
                g.shadow_fixed,
                "invisible to the guest",
            ),
            row(
                "emulated stores",
                g.emulated_accesses,
                "to write-protected frames",
            ),
            row(
                "#PF not present",
                g.pf_not_present,
                "injected; demand paging",
            ),
            row("#PF protection", g.pf_protection, "injected; copy-on-write"),
            row("cow breaks", g.cow_breaks, ""),
            row("forks", g.forks, ""),
            row("execs", g.execs, ""),
            row("exits", g.exits, ""),
            row("mmaps", g.mmaps, ""),
            row("munmaps", g.munmaps, ""),
            row(
                "pte updates",
                g.pte_updates,
                "DONTNEED, migration, write-protect",
            ),
            row(
                "page-table stores",
                g.pte_writes,
                &format!("{} emulated", g.pte_writes_emulated),
            ),
            row("INVLPG", g.invlpgs, ""),
            row(
                "CR3 switches",
                g.cr3_switches,
                &format!("{} same-CR3 flushes", g.tlb_flushes),
            ),
        ];
        write_table(&mut o, &["event", "count", "per s", "note"], &rows);
        let s = &self.shadow;
        let _ = writeln!(o, "\nshadow MMU");
        let rows = vec![
            row("page_faults", s.page_faults, "walks of the guest tables"),
            row("hits", s.hits, ""),
            row(
                "sp_created",
                s.sp_created,
                &format!("{} in use at the end", s.shadow_pages),
            ),
            row(
                "sp_zapped",
                s.sp_zapped,
                &format!("{} flooded, {} evicted", s.flooded, s.evicted),
            ),
            row("unsync", s.unsync, &format!("{} resynced", s.synced)),
            row(
                "emulated_writes",
                s.emulated_writes,
                &format!("{} misaligned", s.misaligned),
            ),
            row(
                "prev_root_hits",
                s.prev_root_hits,
                "CR3 switches to a cached root",
            ),
            row("huge_sptes", s.huge_sptes, "2 MiB / 1 GiB SPTEs installed"),
            row(
                "rmap_adds",
                s.rmap_adds,
                &format!("{} recycled", s.rmap_recycled),
            ),
            row(
                "tlb_flushes",
                s.tlb_flushes,
                &format!("{} retried faults", s.retries),
            ),
        ];
        write_table(&mut o, &["counter", "count", "per s", "note"], &rows);
        let _ = writeln!(
            o,
            "write_protected_gfns {} (guest page tables shadowed at the end)",
            s.write_protected_gfns
        );
        let h = &self.host_ops;
        let _ = writeln!(
            o,
            "\nhost: {} ({} young), get_dirty_log {}, clear_dirty_log {}, errors {}",
            h.unmap_and_aging("SPTEs zapped"),
            h.test_age_gfn_young,
            h.get_dirty_log,
            h.clear_dirty_log,
            h.errors
        );
        let mg = &self.migration;
        let _ = writeln!(
            o,
            "migration: {} dirty-logging passes, {} rounds; dirty 4 KiB frames per round: mean \
             {:.0}, max {} of {}",
            self.dirty_logging_passes,
            mg.rounds,
            mg.mean_dirty_pages,
            mg.max_dirty_pages,
            mg.guest_frames
        );
        let what = format!(" (checker + {} guest mismatches)", self.guest.mismatches);
        self.verdict.write_summary(&mut o, &what);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_equals_the_shipped_file() {
        let file = X86Scenario::from_toml(DEFAULT_X86_SCENARIO_TOML).unwrap();
        assert_eq!(file, X86Scenario::default());
    }

    #[test]
    fn partial_files_take_defaults_and_bad_ones_name_the_field() {
        let s = X86Scenario::from_toml("seed = 9\n[guest]\nvcpus = 1\n").unwrap();
        assert_eq!((s.seed, s.guest.vcpus, s.guest.ram_mib), (9, 1, 1536));
        let e = X86Scenario::from_toml("[guest]\nbacking_page_shift = 16\n").unwrap_err();
        assert!(e.to_string().contains("guest.backing_page_shift"), "{e}");
        let e = X86Scenario::from_toml("[workload]\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = X86Scenario::from_toml("[deterministic]\nram_mib = 15\n").unwrap_err();
        assert!(e.to_string().contains("deterministic.ram_mib"), "{e}");
    }
}
