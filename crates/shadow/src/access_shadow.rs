//! kvm-unit-tests `x86/access.c` run through the shadow MMU.
//!
//! [`ShadowAccessRunner`] runs each access.c case on a [`ShadowVm`] the way the test runs
//! in a KVM guest with shadow paging: the guest writes its PDPTE, PDE and PTE with
//! ordinary stores (which the shadow MMU routes through write protection: emulated
//! writes that zap SPTEs for the write-tracked upper tables, unsync for the leaf table),
//! switches CR0/CR4/EFER/PKRU (a role change resets the MMU context), executes INVLPG of
//! the test address (which resyncs the unsync leaf table's SPTE), then performs the
//! access: a hit in the shadow table, or a shadow page fault that walks the guest tables,
//! sets their A/D bits, links shadow pages and installs the SPTE, or injects the #PF.
//!
//! The outcome (fault, exact error code, the PTE and PDE after the access, the page
//! reached) is compared with access.c's expected-result rules
//! ([`crate::access_test::case_expected`]) **and** with the reference walker running the
//! same case on its own copy of the tables ([`AccessRunner`]); a case matches only if all
//! three agree. The section-8 invariant checker runs every `check_every` cases.
//!
//! Invariants:
//! * Tables and shadow pages persist across cases (kvm-unit-tests 73695c95): upper-level
//!   shadow pages survive, so a stale SPTE left by an earlier case shows up as a wrong
//!   hit in a later one.
//! * The guest never writes its tables behind the shadow MMU's back: every table write
//!   is [`ShadowVm::guest_store`].
//!
//! [`ShadowTables`] runs access.c's six sub-tests the same way
//! ([`crate::access_test::sub_tests_on`]).

use crate::access_test::{
    case_access, case_entries, case_mode, upper_entries, AcFlags, AccessConfig, AccessRunner,
    AccessSpace, CaseOutcome, Expected, SplitMix64, SubTestAccess, SubTestFailure, SubTestResults,
    SubTestTables, WalkerTables, PDE_AT, PDPTE_AT, PTE_AT, TARGET_PA, TEST_VA,
};
use crate::mmu::{AccessOutcome, ShadowError};
use crate::paging::{Access, CpuMode, Gpa, GuestPhysMemory, MemoryError};
use crate::vm::ShadowVm;
use core::fmt;
use revmap_host::{Memslot, MemslotError, MemslotFlags};
use revmap_rmap::{Gfn, Hva, SlotId};
use thiserror::Error;

/// Guest-physical frames of the test VM's one memslot (64 MiB: the tables, the
/// sub-tests' pages and the target page at 32 MiB).
pub const SLOT_PAGES: u64 = 16 << 10;
/// Host virtual address of the memslot.
const SLOT_HVA: u64 = 0x7f00_0000_0000;

/// Why a test VM could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ShadowAccessError {
    /// The memslot was refused.
    #[error("memslot: {0}")]
    Memslot(#[from] MemslotError),
    /// Guest memory could not be written.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// The shadow MMU refused a setup step.
    #[error("shadow MMU: {0}")]
    Shadow(#[from] ShadowError),
}

/// A VM with one 64 MiB memslot at gfn 0 backed by host pages of `backing_shift`, its
/// vCPU 0 in `mode`, guest memory holding `ret` at [`TARGET_PA`].
fn test_vm(backing_shift: u32, mode: CpuMode) -> Result<(ShadowVm, usize), ShadowAccessError> {
    let vm = ShadowVm::new();
    let slot = Memslot::new(
        SlotId(1),
        Gfn(0),
        SLOT_PAGES,
        backing_shift,
        MemslotFlags::empty(),
        Hva(SLOT_HVA),
    )?;
    vm.create_memslot(slot)?;
    vm.with_mmu(|m| m.mem.write_u64(Gpa(TARGET_PA), 0xc3))?;
    let v = vm.add_vcpu(mode);
    Ok((vm, v))
}

/// How a case writes a guest table entry.
type StoreFn = fn(&ShadowVm, u64, u64) -> Result<(), ShadowError>;

/// A guest store, routed by the shadow MMU's write protection.
fn guest_store(vm: &ShadowVm, gpa: u64, val: u64) -> Result<(), ShadowError> {
    vm.guest_store(gpa, val).map(|_| ())
}

/// What kind of result the shadow MMU gave an access (for mismatch reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowResult {
    /// A shadow-table hit.
    Hit,
    /// A shadow page fault installed the translation.
    Fixed,
    /// A #PF was injected.
    Fault,
    /// Anything else (`WriteProtected`, `Mmio`, `Retry`, or an MMU error): never right
    /// for an access.c case.
    Other,
}

/// Maps a shadow MMU result to `(kind, fault, error code, gpa)`.
fn classify(r: &Result<AccessOutcome, ShadowError>) -> (ShadowResult, bool, u32, Option<u64>) {
    match r {
        Ok(AccessOutcome::Hit(g)) => (ShadowResult::Hit, false, 0, Some(g.0)),
        Ok(AccessOutcome::Fixed(g)) => (ShadowResult::Fixed, false, 0, Some(g.0)),
        Ok(AccessOutcome::Fault(pf)) => (ShadowResult::Fault, true, pf.error_code.bits(), None),
        Ok(_) | Err(_) => (ShadowResult::Other, true, u32::MAX, None),
    }
}

/// One case where the shadow MMU, the walker and the rules did not all agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowMismatch {
    /// The case.
    pub flags: AcFlags,
    /// What the rules expect.
    pub expected: Expected,
    /// What the reference walker did.
    pub walker: CaseOutcome,
    /// What the shadow MMU did.
    pub shadow: CaseOutcome,
    /// How the shadow MMU served the access.
    pub result: ShadowResult,
}

impl fmt::Display for ShadowMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] ({:#x}): rules {}; walker {}; shadow ({:?}) {}",
            self.flags, self.flags.0, self.expected, self.walker, self.result, self.shadow
        )
    }
}

/// Counts from a run of cases through the shadow MMU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShadowAccessReport {
    /// Cases run.
    pub checked: u64,
    /// Cases where the shadow MMU, the walker and the rules all agreed.
    pub matched: u64,
    /// Cases where they did not.
    pub mismatched: u64,
    /// Of the mismatches: the shadow MMU disagreed with the rules.
    pub shadow_vs_rules: u64,
    /// Of the mismatches: the walker disagreed with the rules.
    pub walker_vs_rules: u64,
    /// Of the mismatches: the shadow MMU disagreed with the walker.
    pub shadow_vs_walker: u64,
    /// Matched cases that faulted.
    pub faults: u64,
    /// Accesses served by a shadow-table hit (the case's access, not the `twice` read).
    pub hits: u64,
    /// Accesses that took a shadow page fault and installed an SPTE.
    pub fixed: u64,
    /// Invariant-checker runs.
    pub invariant_checks: u64,
    /// Checker runs that found a violation.
    pub invariant_violations: u64,
    /// The first mismatch.
    pub first_mismatch: Option<ShadowMismatch>,
    /// The first violation found by the checker, with the case it followed.
    pub first_violation: Option<String>,
}

impl ShadowAccessReport {
    /// Adds `o`'s counts (the first mismatch and violation of `self` win).
    pub fn merge(&mut self, o: ShadowAccessReport) {
        self.checked += o.checked;
        self.matched += o.matched;
        self.mismatched += o.mismatched;
        self.shadow_vs_rules += o.shadow_vs_rules;
        self.walker_vs_rules += o.walker_vs_rules;
        self.shadow_vs_walker += o.shadow_vs_walker;
        self.faults += o.faults;
        self.hits += o.hits;
        self.fixed += o.fixed;
        self.invariant_checks += o.invariant_checks;
        self.invariant_violations += o.invariant_violations;
        if self.first_mismatch.is_none() {
            self.first_mismatch = o.first_mismatch;
        }
        if self.first_violation.is_none() {
            self.first_violation = o.first_violation;
        }
    }

    /// Whether everything matched with no invariant violation.
    pub fn ok(&self) -> bool {
        self.mismatched == 0 && self.invariant_violations == 0
    }
}

/// Runs access.c cases through a [`ShadowVm`] and, on a copy of the tables, through the
/// reference walker (see the module docs).
#[derive(Debug)]
pub struct ShadowAccessRunner {
    cfg: AccessConfig,
    vm: ShadowVm,
    vcpu: usize,
    mode: CpuMode,
    walker: AccessRunner,
    check_every: u64,
    since_check: u64,
}

/// Default number of cases between two runs of the invariant checker.
pub const DEFAULT_CHECK_EVERY: u64 = 256;

impl ShadowAccessRunner {
    /// A runner for `cfg` whose memslot is backed by 2 MiB host pages (so 2 MiB guest
    /// leaves get huge SPTEs).
    pub fn new(cfg: AccessConfig) -> Result<Self, ShadowAccessError> {
        Self::with_backing(cfg, 21)
    }

    /// A runner whose memslot is backed by host pages of `backing_shift` (12: every
    /// guest 2 MiB leaf is split into a direct shadow page).
    pub fn with_backing(cfg: AccessConfig, backing_shift: u32) -> Result<Self, ShadowAccessError> {
        let mode = case_mode(&cfg, AcFlags(0), cfg.cr3());
        let (vm, vcpu) = test_vm(backing_shift, mode)?;
        vm.with_mmu(|m| {
            upper_entries()
                .into_iter()
                .try_for_each(|(at, v)| m.mem.write_u64(Gpa(at), v))
        })?;
        Ok(ShadowAccessRunner {
            cfg,
            vm,
            vcpu,
            mode,
            walker: AccessRunner::new(cfg),
            check_every: DEFAULT_CHECK_EVERY,
            since_check: 0,
        })
    }

    /// Runs the checker every `n` cases (at least 1).
    pub fn set_check_every(&mut self, n: u64) {
        self.check_every = n.max(1);
    }

    /// The VM (its statistics, the checker).
    pub fn vm(&self) -> &ShadowVm {
        &self.vm
    }

    /// The configuration.
    pub fn config(&self) -> &AccessConfig {
        &self.cfg
    }

    /// Sets case `f` up in the shadowed guest, writing each table entry with `store`,
    /// and performs its access.
    fn observe(&mut self, f: AcFlags, store: StoreFn) -> (ShadowResult, CaseOutcome) {
        let v = self.vcpu;
        let load = |vm: &ShadowVm, at: u64| vm.with_mmu_read(|m| m.mem.read_u64(Gpa(at)));
        let old = load(&self.vm, PDPTE_AT).unwrap_or(0);
        let (pdpte, pde, pte) = case_entries(f, old);
        let mut setup: Result<(), ShadowError> = [(PDPTE_AT, pdpte), (PDE_AT, pde), (PTE_AT, pte)]
            .into_iter()
            .try_for_each(|(at, val)| store(&self.vm, at, val));
        let mode = case_mode(&self.cfg, f, self.cfg.cr3());
        if setup.is_ok() && mode != self.mode {
            setup = self.vm.with_mmu(|m| m.set_mode(v, mode));
            self.mode = mode;
        }
        if setup.is_ok() {
            setup = self.vm.with_mmu(|m| m.invlpg(v, TEST_VA));
        }
        let r = match setup {
            Err(e) => Err(e),
            Ok(()) => {
                if f.has(AcFlags::ACCESS_TWICE) {
                    // access.c ignores the first access's outcome.
                    let _ = self.vm.access(v, TEST_VA, Access::empty());
                }
                self.vm.access(v, TEST_VA, case_access(f))
            }
        };
        let (kind, fault, error, gpa) = classify(&r);
        let out = CaseOutcome {
            fault,
            error,
            pte: load(&self.vm, PTE_AT).unwrap_or(0),
            pde: load(&self.vm, PDE_AT).unwrap_or(0),
            gpa,
        };
        (kind, out)
    }

    /// Runs one case, counting it into `rep`.
    pub fn run_case(&mut self, f: AcFlags, rep: &mut ShadowAccessReport) {
        self.run_case_with(f, rep, guest_store);
    }

    fn run_case_with(&mut self, f: AcFlags, rep: &mut ShadowAccessReport, store: StoreFn) {
        let (exp, walker) = self.walker.observe(f);
        let (result, shadow) = self.observe(f, store);
        let shadow_ok = shadow.matches(&exp);
        let walker_ok = walker.matches(&exp);
        let agree = shadow == walker;
        rep.checked += 1;
        match result {
            ShadowResult::Hit => rep.hits += 1,
            ShadowResult::Fixed => rep.fixed += 1,
            _ => {}
        }
        if shadow_ok && walker_ok && agree {
            rep.matched += 1;
            rep.faults += u64::from(exp.fault);
        } else {
            rep.mismatched += 1;
            rep.shadow_vs_rules += u64::from(!shadow_ok);
            rep.walker_vs_rules += u64::from(!walker_ok);
            rep.shadow_vs_walker += u64::from(!agree);
            rep.first_mismatch.get_or_insert(ShadowMismatch {
                flags: f,
                expected: exp,
                walker,
                shadow,
                result,
            });
        }
        self.since_check += 1;
        if self.since_check >= self.check_every {
            self.check(f, rep);
        }
    }

    /// Runs the invariant checker now, after case `after`.
    fn check(&mut self, after: AcFlags, rep: &mut ShadowAccessReport) {
        self.since_check = 0;
        rep.invariant_checks += 1;
        if let Err(v) = self.vm.check() {
            rep.invariant_violations += 1;
            rep.first_violation
                .get_or_insert_with(|| format!("after [{after}]: {v}"));
        }
    }

    /// Runs every case of `cases` (and the checker once at the end).
    pub fn run(&mut self, cases: impl IntoIterator<Item = AcFlags>) -> ShadowAccessReport {
        let mut rep = ShadowAccessReport::default();
        let mut last = AcFlags(0);
        for f in cases {
            self.run_case(f, &mut rep);
            last = f;
        }
        self.check(last, &mut rep);
        rep
    }

    /// Runs `n` uniformly sampled legal cases from `seed` (the same cases
    /// [`AccessRunner::run_sample`] runs).
    pub fn run_sample(&mut self, seed: u64, n: u64) -> ShadowAccessReport {
        let cfg = self.cfg;
        let mut rng = SplitMix64::new(seed);
        self.run((0..n).map(|_| rng.legal_case(&cfg)))
    }

    /// Runs the whole space of the configuration.
    pub fn run_all(&mut self) -> ShadowAccessReport {
        let space = AccessSpace::new(&self.cfg);
        self.run(space)
    }
}

/// The sub-tests' guest on the shadow MMU, checked against the reference walker on a
/// copy of its tables after every access (and by the invariant checker).
#[derive(Debug)]
pub struct ShadowTables {
    vm: ShadowVm,
    vcpu: usize,
    mode: CpuMode,
    walker: WalkerTables,
}

impl ShadowTables {
    /// Empty tables in a VM whose memslot is backed by host pages of `backing_shift`.
    pub fn new(backing_shift: u32) -> Result<Self, ShadowAccessError> {
        // A placeholder mode: the first access switches to the sub-test's.
        let mode = CpuMode::long4(0);
        let (vm, vcpu) = test_vm(backing_shift, mode)?;
        Ok(ShadowTables {
            vm,
            vcpu,
            mode,
            walker: WalkerTables::new(),
        })
    }

    /// The VM.
    pub fn vm(&self) -> &ShadowVm {
        &self.vm
    }
}

impl SubTestTables for ShadowTables {
    fn store(&mut self, gpa: u64, va: u64, value: u64) {
        let v = self.vcpu;
        // A failed store shows up as a disagreement with the walker's copy.
        let _ = self.vm.guest_store(gpa, value);
        let _ = self.vm.with_mmu(|m| m.invlpg(v, va));
        self.walker.store(gpa, va, value);
    }

    fn load(&self, gpa: u64) -> u64 {
        self.vm
            .with_mmu_read(|m| m.mem.read_u64(Gpa(gpa)))
            .unwrap_or(0)
    }

    fn access(&mut self, mode: &CpuMode, va: u64, access: Access) -> SubTestAccess {
        let v = self.vcpu;
        if *mode != self.mode {
            self.vm
                .with_mmu(|m| m.set_mode(v, *mode))
                .map_err(|e| failure("set_mode", "Ok", e))?;
            self.mode = *mode;
        }
        let (_, fault, error, _) = classify(&self.vm.access(v, va, access));
        let want = self.walker.access(mode, va, access)?;
        if (fault, error) != want {
            return Err(failure(
                "shadow MMU against the reference walker",
                format!("fault={} ec={:#x}", want.0, want.1),
                format!("fault={fault} ec={error:#x}"),
            ));
        }
        self.vm
            .check()
            .map_err(|e| failure("invariant checker", "no violation", e))?;
        Ok((fault, error))
    }
}

fn failure(
    step: &'static str,
    expected: impl fmt::Display,
    got: impl fmt::Display,
) -> SubTestFailure {
    SubTestFailure {
        step,
        expected: expected.to_string(),
        got: got.to_string(),
    }
}

/// The six sub-tests through the shadow MMU, each in a fresh VM whose memslot is
/// backed by host pages of `backing_shift`.
pub fn shadow_sub_tests(backing_shift: u32) -> Result<SubTestResults, ShadowAccessError> {
    let t = || ShadowTables::new(backing_shift);
    Ok(crate::access_test::sub_tests_on([
        t()?,
        t()?,
        t()?,
        t()?,
        t()?,
        t()?,
    ]))
}

/// The whole space's index range split in chunks for parallel runs: ranges of flag
/// values `[lo, hi)` sharing their high bits, skipping ranges whose high bits hold an
/// invalid-mask flag.
pub fn space_chunks(cfg: &AccessConfig) -> Vec<(u32, u32)> {
    const SHIFT: u32 = 22;
    let invalid = cfg.invalid_mask();
    (0..(1u32 << (31 - SHIFT)))
        .map(|k| (k << SHIFT, (k + 1) << SHIFT))
        .filter(|&(lo, _)| lo & invalid == 0)
        .collect()
}

/// The legal cases of `cfg` with flag values in `[lo, hi)`, in access.c's order; `lo`
/// must have no invalid-mask flag set (as [`space_chunks`] guarantees).
pub fn space_range(cfg: &AccessConfig, lo: u32, hi: u32) -> impl Iterator<Item = AcFlags> {
    AccessSpace::from(cfg, lo).take_while(move |f| f.0 < hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_space_exactly() {
        let cfg = AccessConfig {
            pku: false,
            ..AccessConfig::default()
        };
        let n: usize = space_chunks(&cfg)
            .into_iter()
            .map(|(lo, hi)| space_range(&cfg, lo, hi).count())
            .sum();
        assert_eq!(n, AccessSpace::new(&cfg).count());
    }

    #[test]
    fn stores_behind_the_shadow_mmus_back_are_caught() {
        // The same sample with table writes that bypass write protection (as a broken
        // emulated-write path would): the shadow MMU keeps stale SPTEs for rewritten
        // PDPTEs/PDEs, and the runner must report them against both the rules and the
        // walker, while the walker stays right.
        fn behind_back(vm: &ShadowVm, gpa: u64, val: u64) -> Result<(), ShadowError> {
            Ok(vm.with_mmu(|m| m.mem.write_u64(Gpa(gpa), val))?)
        }
        let cfg = AccessConfig::default();
        let mut rng = SplitMix64::new(3);
        let cases: Vec<AcFlags> = (0..20_000).map(|_| rng.legal_case(&cfg)).collect();
        let mut good = ShadowAccessRunner::new(cfg).unwrap();
        let rep = good.run(cases.iter().copied());
        assert!(rep.ok(), "{:?}", rep.first_mismatch.map(|m| m.to_string()));
        assert_eq!(rep.matched, 20_000);
        assert!(rep.hits > 0 && rep.fixed > 0, "{rep:?}");
        let mut bad = ShadowAccessRunner::new(cfg).unwrap();
        let mut rep = ShadowAccessReport::default();
        for &f in &cases {
            bad.run_case_with(f, &mut rep, behind_back);
        }
        assert_eq!(rep.walker_vs_rules, 0);
        assert!(
            rep.shadow_vs_rules > 0 && rep.shadow_vs_walker > 0,
            "{rep:?}"
        );
    }

    #[test]
    fn six_sub_tests_through_the_shadow_mmu() {
        for backing in [12, 21] {
            for (name, res) in shadow_sub_tests(backing).unwrap() {
                assert_eq!(res, Ok(()), "{name} (backing shift {backing})");
            }
        }
    }
}
