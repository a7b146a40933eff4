//! The simulator's scenario TOML parser and validator (`Scenario::from_toml`).
//!
//! Contract: never a panic; a rejected scenario gets an error that names the field (or
//! the TOML position); an accepted one satisfies every documented bound (checked here
//! independently of `validate`), survives a TOML round trip unchanged, and (if it has a
//! `[deterministic]` table) runs a few steps of the deterministic simulator on a small
//! guest with no invariant violation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use revmap_hpt::hash::{MAX_HPT_ORDER, MIN_HPT_ORDER};
use revmap_sim::det::DeterministicRun;
use revmap_sim::scenario::{Scenario, ScenarioError};

/// The documented bounds of a valid scenario (`crates/sim/src/scenario.rs` docs and
/// `scenarios/default.toml`), restated.
fn assert_bounds(s: &Scenario) {
    let g = &s.guest;
    assert!(
        g.ram_mib > 0 && g.ram_mib.is_multiple_of(16) && g.ram_mib <= 1 << 20,
        "{g:?}"
    );
    assert!(
        g.vcpus >= 1 && g.vcpus < revmap_hpt::tlb::MAX_VCPUS,
        "{g:?}"
    );
    assert!(
        g.hpt_order == 0 || (MIN_HPT_ORDER..=MAX_HPT_ORDER).contains(&g.hpt_order),
        "{g:?}"
    );
    assert!([12, 16, 24].contains(&g.backing_page_shift), "{g:?}");
    assert!(s.duration_secs.is_finite() && s.duration_secs > 0.0);
    assert!(s.check_interval_ms > 0);
    let w = &s.workload;
    assert!([16, 24].contains(&w.linear_page_shift));
    assert!(w.mix.touch > 0);
    assert!(w.page_size_weights.iter().any(|&x| x > 0));
    assert!(w.max_processes > 0);
    assert!((1..=4096).contains(&w.pages_per_segment));
    assert!(w.store_per_mille <= 1000 && w.shared_per_mille <= 1000);
    for r in &s.resize {
        assert!((0.0..=1.0).contains(&r.at), "{r:?}");
        assert!(r.order_delta != 0 && r.order_delta.abs() <= 8, "{r:?}");
    }
    assert!(s.deterministic.steps > 0 && s.host.ops_per_tick > 0);
    let d = &s.deterministic;
    assert!(
        d.ram_mib > 0 && d.ram_mib.is_multiple_of(16) && d.ram_mib <= 1024,
        "{d:?}"
    );
    // Derived values.
    assert!((MIN_HPT_ORDER..=MAX_HPT_ORDER).contains(&s.hpt_order()));
    assert!(s.max_hpt_order() >= s.hpt_order() && s.max_hpt_order() <= MAX_HPT_ORDER);
    assert_eq!(s.ram_bytes(), g.ram_mib << 20);
    assert!(s.estimated_host_bytes() > 0);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let s = match Scenario::from_toml(text) {
        Ok(s) => s,
        Err(ScenarioError::Invalid { field, why }) => {
            assert!(!field.is_empty() && !why.is_empty());
            return;
        }
        Err(e @ ScenarioError::Parse(_)) => {
            assert!(e.to_string().starts_with("bad scenario: "), "{e}");
            return;
        }
        Err(e) => panic!("from_toml gave a file error for a string: {e}"),
    };
    assert_bounds(&s);
    s.validate().expect("an accepted scenario validates again");
    let again = toml::to_string(&s).expect("a scenario serialises");
    let back = Scenario::from_toml(&again).expect("a serialised scenario parses");
    assert_eq!(
        back, s,
        "round trip through TOML changed the scenario:\n{again}"
    );
    // A scenario with a `[deterministic]` table runs a few deterministic steps on a
    // small guest: the scenario drives the simulator (others only parse: a run costs
    // milliseconds).
    let runs = toml::from_str::<toml::Table>(text).is_ok_and(|t| t.contains_key("deterministic"));
    if !runs {
        return;
    }
    let mut small = s;
    small.deterministic.steps = small.deterministic.steps.min(8);
    small.deterministic.ram_mib = 16;
    small.guest.vcpus = small.guest.vcpus.min(2);
    let threads = revmap_fuzz::thread_count();
    let run = small.run_deterministic();
    // A resize worker of the run may outlive its VM: let it finish before the leak check.
    revmap_fuzz::wait_threads_at_most(threads);
    match run {
        Ok(r) => assert_eq!(r.verdict.invariant_violations, 0, "{r:?}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
