//! Simulation scenarios: guest size, vCPUs, duration, workload mix, host actors, seed
//! and resize schedule, read from TOML ([`Scenario::from_toml`]) or the embedded
//! default ([`Scenario::default`], equal to `scenarios/default.toml`).
//!
//! # Invariants
//!
//! * Parsing rejects unknown keys; [`Scenario::validate`] rejects values the simulator
//!   cannot run (zero vCPUs, more than the TLB domain holds, RAM not a multiple of
//!   16 MiB, an HPT order outside 18..=36, a resize point outside `[0, 1]`...), each
//!   with a message naming the field.
//! * Every field has a default, so a scenario file may set only what it changes.

use crate::actors::ActorKind;
use crate::workload::WorkloadConfig;
use revmap_hpt::hash::{MAX_HPT_ORDER, MIN_HPT_ORDER};
use revmap_resize::hpt_shift_for_ramsize;
use serde::{Deserialize, Serialize};

/// The default scenario as TOML (the same as [`Scenario::default`]).
pub const DEFAULT_SCENARIO_TOML: &str = include_str!("../../../scenarios/default.toml");

/// A host actor, as named in a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostActor {
    /// Memory pressure: unmap and page back in random ranges.
    MemoryPressure,
    /// The aging scan.
    Aging,
    /// The live-migration dirty-log loop (one round per controller tick).
    Migration,
}

impl HostActor {
    /// The actor kind of [`crate::actors`].
    pub fn kind(self) -> ActorKind {
        match self {
            HostActor::MemoryPressure => ActorKind::MemoryPressure,
            HostActor::Aging => ActorKind::Aging,
            HostActor::Migration => ActorKind::Migration,
        }
    }
}

/// The guest machine.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestSpec {
    /// Guest RAM in MiB (a multiple of 16).
    pub ram_mib: u64,
    /// vCPU threads.
    pub vcpus: usize,
    /// Initial HPT order; 0 = QEMU's default for the RAM size.
    pub hpt_order: u32,
    /// Host backing page shift of guest RAM (12, 16 or 24).
    pub backing_page_shift: u32,
}

impl Default for GuestSpec {
    /// A 4 GiB guest on 64 KiB host pages (a POWER host's base page) with a deliberately
    /// small HPT (order 20, 1 MiB, where QEMU would give 4 GiB order 25) so that HPTE
    /// groups fill and the guest evicts, as a guest under HPT pressure does.
    fn default() -> Self {
        Self {
            ram_mib: 4096,
            vcpus: 2,
            hpt_order: 20,
            backing_page_shift: 16,
        }
    }
}

/// The host side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostSpec {
    /// Which actors run.
    pub actors: Vec<HostActor>,
    /// Memory pressure pages its ranges back in (else the fault path does).
    pub page_in: bool,
    /// Memory pressure keeps at most this many ranges unmapped.
    pub max_outstanding: usize,
    /// Operations each actor performs per controller tick (100 ms).
    pub ops_per_tick: u64,
}

impl HostSpec {
    /// The host actors other than migration (which the controller or the scheduler
    /// runs itself): the threads of a threaded run.
    pub fn actor_kinds(&self) -> Vec<ActorKind> {
        self.actors
            .iter()
            .filter(|a| **a != HostActor::Migration)
            .map(|a| a.kind())
            .collect()
    }

    /// Whether the migration loop (dirty-log rounds) runs.
    pub fn migrates(&self) -> bool {
        self.actors.contains(&HostActor::Migration)
    }
}

impl Default for HostSpec {
    fn default() -> Self {
        Self {
            actors: vec![
                HostActor::MemoryPressure,
                HostActor::Aging,
                HostActor::Migration,
            ],
            page_in: true,
            max_outstanding: 8,
            ops_per_tick: 50,
        }
    }
}

/// One HPT resize: at `at` (fraction of the run), PREPARE to the current order plus
/// `order_delta` (polled while long-busy), then COMMIT with the vCPUs stopped.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeStep {
    /// When, as a fraction of the duration (0..=1).
    pub at: f64,
    /// Order change (+1 grows, -2 shrinks).
    pub order_delta: i32,
}

/// Deterministic mode parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeterministicSpec {
    /// Scheduler steps (one hypercall-level guest operation or one host operation each).
    pub steps: u64,
    /// Guest RAM in MiB for the deterministic run (small: the checker runs every step).
    pub ram_mib: u64,
}

impl Default for DeterministicSpec {
    fn default() -> Self {
        Self {
            steps: 4000,
            ram_mib: 64,
        }
    }
}

/// A whole simulation scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Name shown in reports.
    pub name: String,
    /// Seed of every random stream.
    pub seed: u64,
    /// Run length in seconds (ignored in deterministic mode, which runs
    /// `deterministic.steps` scheduler steps).
    pub duration_secs: f64,
    /// If non-zero, the run ends after this many hypercalls (at least; counted at the
    /// controller's 100 ms ticks) instead of after `duration_secs`, and the resize
    /// schedule's `at` is a fraction of this count. Makes a run's size independent of
    /// the machine's speed.
    pub stop_after_hcalls: u64,
    /// Invariant check interval (vCPUs and actors paused), in ms.
    pub check_interval_ms: u64,
    /// The guest machine.
    pub guest: GuestSpec,
    /// The guest workload.
    pub workload: WorkloadConfig,
    /// The host actors.
    pub host: HostSpec,
    /// Resize schedule, in order.
    pub resize: Vec<ResizeStep>,
    /// Deterministic mode.
    pub deterministic: DeterministicSpec,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "default".into(),
            seed: 1,
            duration_secs: 30.0,
            stop_after_hcalls: 0,
            check_interval_ms: 5000,
            guest: GuestSpec::default(),
            // More processes than the calibration workload's 16 per vCPU, so that enough
            // pages are mapped at once to fill the small default HPT.
            workload: WorkloadConfig {
                max_processes: 64,
                ..WorkloadConfig::default()
            },
            host: HostSpec::default(),
            resize: vec![
                ResizeStep {
                    at: 0.35,
                    order_delta: 1,
                },
                ResizeStep {
                    at: 0.7,
                    order_delta: -2,
                },
            ],
            deterministic: DeterministicSpec::default(),
        }
    }
}

/// A scenario that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Not valid TOML for a scenario.
    #[error("bad scenario: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value out of range.
    #[error("bad scenario: {field}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The file could not be read.
    #[error("cannot read scenario {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A scenario file that cannot be used (parse or value error), with its path.
    #[error("{path}: {source}")]
    InFile {
        /// The path.
        path: String,
        /// What is wrong with it.
        source: Box<ScenarioError>,
    },
}

/// Parses a TOML scenario and checks it with `validate`.
pub(crate) fn parse_validated<S: serde::de::DeserializeOwned>(
    text: &str,
    validate: impl FnOnce(&S) -> Result<(), ScenarioError>,
) -> Result<S, ScenarioError> {
    let s: S = toml::from_str(text)?;
    validate(&s)?;
    Ok(s)
}

/// Reads a scenario file and parses it with `parse`; errors name the file; a file
/// without a top-level `name` is named (`name`) after the file's stem.
pub(crate) fn read_file<S>(
    path: &std::path::Path,
    parse: impl FnOnce(&str) -> Result<S, ScenarioError>,
    name: impl FnOnce(&mut S) -> &mut String,
) -> Result<S, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let in_file = |e: ScenarioError| ScenarioError::InFile {
        path: path.display().to_string(),
        source: Box::new(e),
    };
    let mut s = parse(&text).map_err(in_file)?;
    let named = toml::from_str::<toml::Table>(&text)
        .map(|t| t.contains_key("name"))
        .unwrap_or(true);
    if !named {
        if let Some(stem) = path.file_stem() {
            *name(&mut s) = stem.to_string_lossy().into_owned();
        }
    }
    Ok(s)
}

/// The run-length and check-interval rules every scenario shares.
pub(crate) fn check_timing(
    duration_secs: f64,
    check_interval_ms: u64,
) -> Result<(), ScenarioError> {
    if !(duration_secs.is_finite() && duration_secs > 0.0) {
        return Err(invalid(
            "duration_secs (--duration)",
            "must be a positive number of seconds",
        ));
    }
    if check_interval_ms == 0 {
        return Err(invalid("check_interval_ms", "must be positive"));
    }
    Ok(())
}

pub(crate) fn invalid(field: &'static str, why: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        field,
        why: why.into(),
    }
}

impl Scenario {
    /// Parses and validates a TOML scenario.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        parse_validated(text, Self::validate)
    }

    /// Reads, parses and validates a scenario file. Errors name the file; a file
    /// without `name` is named after the file (its stem).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ScenarioError> {
        read_file(path, Self::from_toml, |s| &mut s.name)
    }

    /// The largest HPT order the resize schedule can reach (from [`Self::hpt_order`]).
    pub fn max_hpt_order(&self) -> u32 {
        let mut order = i64::from(self.hpt_order());
        let mut max = order;
        for r in &self.resize {
            order = (order + i64::from(r.order_delta))
                .clamp(i64::from(MIN_HPT_ORDER), i64::from(MAX_HPT_ORDER));
            max = max.max(order);
        }
        u32::try_from(max).unwrap_or(MAX_HPT_ORDER)
    }

    /// An estimate of the host memory, in bytes, the simulated VM's tables need in the
    /// threaded run: the HPT and its revmap (16 bytes per HPTE slot each, at the
    /// largest order the resize schedule reaches, plus the new table while a resize is
    /// prepared), and per 4 KiB guest frame an rmap word (8 bytes) and the host and
    /// dirty-log bits. The CLI refuses a scenario whose estimate exceeds the memory the
    /// host has available, before allocating anything.
    pub fn estimated_host_bytes(&self) -> u64 {
        let slots = 1u64 << self.max_hpt_order().saturating_sub(4);
        let tables = slots.saturating_mul(32).saturating_mul(2);
        let frames = self.ram_bytes() >> 12;
        tables.saturating_add(frames.saturating_mul(9))
    }

    /// Guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.guest.ram_mib.saturating_mul(1 << 20)
    }

    /// The initial HPT order (QEMU's default for the RAM size unless set).
    pub fn hpt_order(&self) -> u32 {
        if self.guest.hpt_order != 0 {
            self.guest.hpt_order
        } else {
            hpt_shift_for_ramsize(self.ram_bytes()).clamp(MIN_HPT_ORDER, MAX_HPT_ORDER)
        }
    }

    /// Checks every value (module docs).
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let g = &self.guest;
        if g.ram_mib == 0 || g.ram_mib % 16 != 0 || g.ram_mib > (1 << 20) {
            return Err(invalid(
                "guest.ram_mib",
                "must be a positive multiple of 16, at most 1 TiB",
            ));
        }
        let max_vcpus = revmap_hpt::tlb::MAX_VCPUS - 1;
        if g.vcpus == 0 || g.vcpus > max_vcpus {
            return Err(invalid("guest.vcpus", format!("must be 1..={max_vcpus}")));
        }
        if g.hpt_order != 0 && !(MIN_HPT_ORDER..=MAX_HPT_ORDER).contains(&g.hpt_order) {
            return Err(invalid(
                "guest.hpt_order",
                format!("must be 0 (default) or {MIN_HPT_ORDER}..={MAX_HPT_ORDER}"),
            ));
        }
        if ![12, 16, 24].contains(&g.backing_page_shift) {
            return Err(invalid("guest.backing_page_shift", "must be 12, 16 or 24"));
        }
        check_timing(self.duration_secs, self.check_interval_ms)?;
        let w = &self.workload;
        if ![16, 24].contains(&w.linear_page_shift) {
            return Err(invalid("workload.linear_page_shift", "must be 16 or 24"));
        }
        if w.mix.touch == 0 {
            return Err(invalid(
                "workload.mix.touch",
                "must be positive: a guest that never touches memory makes no hypercalls",
            ));
        }
        if w.page_size_weights.iter().all(|&x| x == 0) {
            return Err(invalid(
                "workload.page_size_weights",
                "at least one weight must be positive",
            ));
        }
        if w.max_processes == 0 {
            return Err(invalid("workload.max_processes", "must be positive"));
        }
        if w.pages_per_segment == 0 || w.pages_per_segment > 1 << 12 {
            return Err(invalid("workload.pages_per_segment", "must be 1..=4096"));
        }
        if w.store_per_mille > 1000 || w.shared_per_mille > 1000 {
            return Err(invalid(
                "workload.store_per_mille / shared_per_mille",
                "must be at most 1000",
            ));
        }
        for r in &self.resize {
            if !(0.0..=1.0).contains(&r.at) {
                return Err(invalid("resize.at", "must be in 0..=1"));
            }
            if r.order_delta == 0 || r.order_delta.abs() > 8 {
                return Err(invalid("resize.order_delta", "must be non-zero, |d| <= 8"));
            }
        }
        if self.deterministic.steps == 0 {
            return Err(invalid("deterministic.steps (--steps)", "must be positive"));
        }
        if self.host.ops_per_tick == 0 {
            return Err(invalid("host.ops_per_tick", "must be positive"));
        }
        let d = &self.deterministic;
        if d.ram_mib == 0 || d.ram_mib % 16 != 0 || d.ram_mib > 1024 {
            return Err(invalid(
                "deterministic.ram_mib",
                "must be a positive multiple of 16, at most 1024",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_equals_the_shipped_file() {
        let file = Scenario::from_toml(DEFAULT_SCENARIO_TOML).unwrap();
        assert_eq!(file, Scenario::default());
    }

    #[test]
    fn default_round_trips_and_validates() {
        let s = Scenario::default();
        s.validate().unwrap();
        let text = toml::to_string(&s).unwrap();
        assert_eq!(Scenario::from_toml(&text).unwrap(), s);
        assert_eq!(s.hpt_order(), 20, "the default's deliberately small HPT");
        let qemu = Scenario {
            guest: GuestSpec {
                hpt_order: 0,
                ..s.guest
            },
            ..s.clone()
        };
        assert_eq!(qemu.hpt_order(), 25, "QEMU's default for 4 GiB");
    }

    #[test]
    fn partial_files_take_defaults_and_bad_ones_name_the_field() {
        let s = Scenario::from_toml("seed = 9\n[guest]\nvcpus = 1\n").unwrap();
        assert_eq!((s.seed, s.guest.vcpus, s.guest.ram_mib), (9, 1, 4096));
        let e = Scenario::from_toml("[guest]\nvcpus = 0\n").unwrap_err();
        assert!(e.to_string().contains("guest.vcpus"), "{e}");
        let e = Scenario::from_toml("bogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Scenario::from_toml("[[resize]]\nat = 2.0\norder_delta = 1\n").unwrap_err();
        assert!(e.to_string().contains("resize.at"), "{e}");
        let e = Scenario::from_toml("[host]\nactors = [\"nope\"]\n").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
