//! Long deterministic simulation (`revmap soak`): the deterministic simulator of an MMU
//! over many seeds in parallel, with the MMU's invariant checker after every step.
//!
//! Each seed is one deterministic run ([`SoakTarget::run_seed`]): a pure function of the
//! seed and the step count, so a failing seed reproduces exactly and is shrunk with
//! [`SoakTarget::minimise`] into a reproducer a user can run again. Seeds run on a rayon
//! pool of `jobs` threads (all cores by default); the report sums steps and checks and
//! lists every failing seed.
//!
//! ```
//! use revmap_sim::scenario::{Scenario, DEFAULT_SCENARIO_TOML};
//! use revmap_sim::soak::{soak, HptSoak, SoakOptions};
//!
//! let target = HptSoak::new(Scenario::from_toml(DEFAULT_SCENARIO_TOML)?);
//! let opts = SoakOptions { first_seed: 1, seeds: 2, steps: 50, jobs: 1 };
//! let report = soak(&target, &opts, |_| {});
//! assert_eq!(report.seeds, 2);
//! assert_eq!(report.steps, 100);
//! assert_eq!(report.checks, 100);
//! assert!(report.failures.is_empty() && report.errors.is_empty());
//! # Ok::<(), revmap_sim::scenario::ScenarioError>(())
//! ```

use crate::det::{minimise, run_deterministic_with};
use crate::run::{RunError, RunReport};
use crate::scenario::Scenario;
use rayon::prelude::*;
use revmap_rmap::sync::{AtomicU64, Ordering};
use serde::Serialize;
use std::time::Instant;

/// One MMU's deterministic simulator, as the soak drives it.
pub trait SoakTarget: Sync {
    /// The MMU's name in reports (`hpt`, `x86`, `nested`).
    fn name(&self) -> &'static str;

    /// Run `seed` for `steps` scheduler steps with the checker after every step.
    /// `Err` is a run that could not be set up or carried out (not a violation).
    fn run_seed(&self, seed: u64, steps: u64) -> Result<SeedOutcome, String>;

    /// Shrink the failing run of `seed` (`steps` steps) and describe the smallest
    /// failing case so that a user can re-run it.
    fn minimise(&self, seed: u64, steps: u64) -> Result<String, String>;
}

/// What one seed's run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedOutcome {
    /// Steps run (up to and including a failing one).
    pub steps: u64,
    /// Checker runs.
    pub checks: u64,
    /// The violation that stopped the run, if any.
    pub failure: Option<SeedFailure>,
}

/// A violation found by the checker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeedFailure {
    /// The step after which the checker failed.
    pub step: u64,
    /// The checker's description.
    pub violation: String,
}

/// What to soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoakOptions {
    /// The first seed; seeds `first_seed..first_seed + seeds` run.
    pub first_seed: u64,
    /// Number of seeds.
    pub seeds: u64,
    /// Scheduler steps per seed.
    pub steps: u64,
    /// Worker threads (0: one per core).
    pub jobs: usize,
}

/// A failing seed, minimised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedSeed {
    /// The seed.
    pub seed: u64,
    /// Where and what.
    pub failure: SeedFailure,
    /// The smallest failing case (or why it could not be shrunk).
    pub reproducer: String,
}

/// The outcome of a soak (also serialised as `--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SoakReport {
    /// The MMU.
    pub mmu: &'static str,
    /// Seeds run.
    pub seeds: u64,
    /// First seed.
    pub first_seed: u64,
    /// Steps per seed asked for.
    pub steps_per_seed: u64,
    /// Steps run in total.
    pub steps: u64,
    /// Checker runs in total.
    pub checks: u64,
    /// Worker threads used.
    pub jobs: usize,
    /// Failing seeds, minimised.
    pub failures: Vec<FailedSeed>,
    /// Seeds whose run could not be carried out: (seed, error).
    pub errors: Vec<(u64, String)>,
    /// Wall-clock seconds.
    pub elapsed_s: f64,
    /// Steps per second over all workers.
    pub steps_per_s: f64,
}

impl SoakReport {
    /// Whether every seed ran clean.
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.errors.is_empty()
    }
}

/// Run `opts.seeds` seeds of `target` in parallel; `progress` is called with the number
/// of seeds finished after each one (from the worker threads).
pub fn soak(
    target: &dyn SoakTarget,
    opts: &SoakOptions,
    progress: impl Fn(u64) + Sync,
) -> SoakReport {
    let t0 = Instant::now();
    let done = AtomicU64::new(0);
    let run = || {
        (opts.first_seed..opts.first_seed.saturating_add(opts.seeds))
            .into_par_iter()
            .map(|seed| {
                let r = target.run_seed(seed, opts.steps);
                // ORDERING: Relaxed: a progress count; nothing is published through it.
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                progress(n);
                (seed, r)
            })
            .collect::<Vec<_>>()
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs)
        .thread_name(|i| format!("soak-{i}"))
        .build();
    let (jobs, outcomes) = match pool {
        Ok(p) => (p.current_num_threads(), p.install(run)),
        // No pool (threads refused): the global one.
        Err(_) => (rayon::current_num_threads(), run()),
    };
    let mut rep = SoakReport {
        mmu: target.name(),
        seeds: opts.seeds,
        first_seed: opts.first_seed,
        steps_per_seed: opts.steps,
        steps: 0,
        checks: 0,
        jobs,
        failures: Vec::new(),
        errors: Vec::new(),
        elapsed_s: 0.0,
        steps_per_s: 0.0,
    };
    for (seed, r) in outcomes {
        match r {
            Ok(o) => {
                rep.steps += o.steps;
                rep.checks += o.checks;
                if let Some(failure) = o.failure {
                    let reproducer = target
                        .minimise(seed, opts.steps)
                        .unwrap_or_else(|e| format!("cannot minimise: {e}"));
                    rep.failures.push(FailedSeed {
                        seed,
                        failure,
                        reproducer,
                    });
                }
            }
            Err(e) => rep.errors.push((seed, e)),
        }
    }
    rep.elapsed_s = t0.elapsed().as_secs_f64();
    rep.steps_per_s = rep.steps as f64 / rep.elapsed_s.max(1e-9);
    rep
}

/// A deterministic simulator's scenario, as [`DetSoak`] runs it for each seed.
pub trait SoakScenario: Clone + Serialize + Sync {
    /// The MMU's name in reports (`hpt`, `x86`, `nested`).
    const MMU: &'static str;
    /// The `revmap run` flags that re-run a scenario file of this kind.
    const RERUN: &'static str;
    /// Sets the seed and the number of scheduler steps.
    fn reseed(&mut self, seed: u64, steps: u64);
    /// One deterministic run with the checker after every step.
    fn run_det(&self) -> Result<SeedOutcome, String>;
    /// The smallest failing scenario found by shrinking this one (`None` if it does
    /// not fail).
    fn shrink_det(&self) -> Result<Option<Self>, String>;
}

impl SeedOutcome {
    /// The outcome of a deterministic run of `steps` steps with `checks` checker runs
    /// that failed after `failing_step` with `violation` (if it failed).
    pub fn of(steps: u64, checks: u64, failing_step: Option<u64>, violation: Option<&str>) -> Self {
        let failure = failing_step.map(|step| SeedFailure {
            step,
            violation: violation.unwrap_or("violation").to_owned(),
        });
        Self {
            steps: failure.as_ref().map_or(steps, |f| f.step + 1),
            checks,
            failure,
        }
    }
}

/// An MMU's deterministic simulator over a base scenario whose seed and step count
/// each soak run replaces ([`HptSoak`], `x86::det::X86Soak`,
/// `nested::det::NestedSoak`).
#[derive(Debug, Clone)]
pub struct DetSoak<S> {
    base: S,
}

/// The HPT MMU's deterministic simulator ([`crate::det`]) as a soak target.
pub type HptSoak = DetSoak<Scenario>;

impl<S: SoakScenario> DetSoak<S> {
    /// Soak `base` (its seed and step count are set per run).
    pub fn new(base: S) -> Self {
        Self { base }
    }

    fn scenario(&self, seed: u64, steps: u64) -> S {
        let mut sc = self.base.clone();
        sc.reseed(seed, steps);
        sc
    }
}

impl<S: SoakScenario> SoakTarget for DetSoak<S> {
    fn name(&self) -> &'static str {
        S::MMU
    }

    fn run_seed(&self, seed: u64, steps: u64) -> Result<SeedOutcome, String> {
        self.scenario(seed, steps).run_det()
    }

    fn minimise(&self, seed: u64, steps: u64) -> Result<String, String> {
        match self.scenario(seed, steps).shrink_det()? {
            Some(small) => toml::to_string(&small)
                .map(|t| format!("revmap run {} --scenario FILE, with FILE:\n{t}", S::RERUN))
                .map_err(|e| e.to_string()),
            None => Ok("the failure did not reproduce when re-run".into()),
        }
    }
}

/// Implements [`crate::det::DeterministicRun`] (with `$run`, the deterministic run
/// with a progress callback, giving `$report` or `$error`) and [`SoakScenario`] for a
/// scenario type with `seed` and `deterministic.steps` fields, whose minimiser
/// (`$minimise`) give reports with a `verdict` ([`crate::report::Verdict`]).
macro_rules! soak_scenario {
    (
        $scenario:ty,
        $mmu:literal,
        $rerun:literal,
        $report:ty,
        $error:ty,
        $run:path,
        $minimise:path
    ) => {
        impl $crate::det::DeterministicRun for $scenario {
            type Report = $report;
            type Error = $error;

            fn run_deterministic_with(
                &self,
                progress: &mut dyn FnMut(&$crate::run::Progress) -> std::ops::ControlFlow<()>,
            ) -> Result<$report, $error> {
                $run(self, progress)
            }
        }

        impl $crate::soak::SoakScenario for $scenario {
            const MMU: &'static str = $mmu;
            const RERUN: &'static str = $rerun;

            fn reseed(&mut self, seed: u64, steps: u64) {
                self.seed = seed;
                self.deterministic.steps = steps;
            }

            fn run_det(&self) -> Result<$crate::soak::SeedOutcome, String> {
                let r = $crate::det::DeterministicRun::run_deterministic(self)
                    .map_err(|e| e.to_string())?;
                Ok($crate::soak::SeedOutcome::of(
                    self.deterministic.steps,
                    r.verdict.invariant_checks,
                    r.verdict.failing_step,
                    r.verdict.first_violation.as_deref(),
                ))
            }

            fn shrink_det(&self) -> Result<Option<Self>, String> {
                $minimise(self)
                    .map(|m| m.map(|(small, _)| small))
                    .map_err(|e| e.to_string())
            }
        }
    };
}
pub(crate) use soak_scenario;

soak_scenario!(
    Scenario,
    "hpt",
    "--deterministic",
    RunReport,
    RunError,
    run_deterministic_with,
    minimise
);

/// Soaks `target` over three seeds of 200 steps and checks that every step ran clean
/// and was checked.
#[cfg(test)]
pub(crate) fn assert_soaks_clean(target: &dyn SoakTarget) {
    let opts = SoakOptions {
        first_seed: 11,
        seeds: 3,
        steps: 200,
        jobs: 1,
    };
    let r = soak(target, &opts, |_| {});
    assert_eq!((r.seeds, r.steps, r.checks), (3, 600, 600));
    assert!(r.failures.is_empty() && r.errors.is_empty(), "{r:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails every seed divisible by 5 after step `seed % 7`; seed 13 cannot run.
    struct Planted;

    impl SoakTarget for Planted {
        fn name(&self) -> &'static str {
            "planted"
        }
        fn run_seed(&self, seed: u64, steps: u64) -> Result<SeedOutcome, String> {
            if seed == 13 {
                return Err("no VM".into());
            }
            let failure = (seed % 5 == 0).then(|| SeedFailure {
                step: seed % 7,
                violation: format!("planted at seed {seed}"),
            });
            let steps = failure.as_ref().map_or(steps, |f| f.step + 1);
            Ok(SeedOutcome {
                steps,
                checks: steps,
                failure,
            })
        }
        fn minimise(&self, seed: u64, _steps: u64) -> Result<String, String> {
            Ok(format!("seed {seed}, 1 step"))
        }
    }

    #[test]
    fn failing_seeds_are_listed_minimised_and_steps_summed() {
        let opts = SoakOptions {
            first_seed: 1,
            seeds: 20,
            steps: 100,
            jobs: 2,
        };
        let seen = AtomicU64::new(0);
        let r = soak(&Planted, &opts, |n| {
            seen.fetch_max(n, Ordering::Relaxed);
        });
        assert_eq!(seen.load(Ordering::Relaxed), 20);
        let failed: Vec<u64> = r.failures.iter().map(|f| f.seed).collect();
        assert_eq!(failed, [5, 10, 15, 20]);
        assert_eq!(r.failures[1].failure.step, 3);
        assert_eq!(r.failures[1].reproducer, "seed 10, 1 step");
        assert_eq!(r.errors, [(13, "no VM".to_string())]);
        // 15 clean seeds of 100 steps, and the failing ones up to their step.
        let failing_steps: u64 = [5u64, 10, 15, 20].iter().map(|s| s % 7 + 1).sum();
        assert_eq!(r.steps, 15 * 100 + failing_steps);
        assert_eq!(r.checks, r.steps);
        assert!(!r.passed());
        assert_eq!(r.jobs, 2);
    }

    #[test]
    fn hpt_seeds_are_deterministic_and_clean() {
        let sc = Scenario::from_toml(crate::scenario::DEFAULT_SCENARIO_TOML)
            .unwrap_or_else(|e| panic!("{e}"));
        let t = HptSoak::new(sc);
        let a = t.run_seed(7, 300).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.failure, None);
        assert_eq!((a.steps, a.checks), (300, 300));
        let b = t.run_seed(7, 300).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, b);
    }
}
