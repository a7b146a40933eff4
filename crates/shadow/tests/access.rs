//! kvm-unit-tests `x86/access.c` conformance of the reference walker and of the shadow
//! MMU.

use revmap_shadow::access_shadow::{ShadowAccessReport, ShadowAccessRunner, DEFAULT_CHECK_EVERY};
use revmap_shadow::access_test::{
    expected, is_legal, pde_value, pte_value, sub_tests, AcFlags, AccessConfig, AccessRunner,
    AccessSpace,
};

fn show(rep: &revmap_shadow::access_test::AccessReport) -> String {
    rep.first_mismatch
        .map(|m| m.to_string())
        .unwrap_or_default()
}

#[test]
fn seeded_sample_of_a_million_matches_access_c_rules() {
    for la57 in [false, true] {
        let cfg = AccessConfig {
            la57,
            ..AccessConfig::default()
        };
        let mut r = AccessRunner::new(cfg);
        let n = if la57 { 200_000 } else { 1_000_000 };
        let rep = r.run_sample(0x5eed + u64::from(la57), n);
        assert_eq!(rep.checked, n);
        assert_eq!(rep.mismatched, 0, "first: {}", show(&rep));
        // About 92% of the space faults (17.64 M of 19.17 M).
        let frac = rep.faults as f64 / rep.checked as f64;
        assert!((0.90..0.94).contains(&frac), "fault fraction {frac}");
    }
}

#[test]
fn reduced_maxphyaddr_sample_exercises_bit_36() {
    let cfg = AccessConfig {
        maxphyaddr: 36,
        pku: false,
        ..AccessConfig::default()
    };
    let mut r = AccessRunner::new(cfg);
    let rep = r.run_sample(7, 100_000);
    assert_eq!(rep.mismatched, 0, "first: {}", show(&rep));
    // Bit-36 cases are legal here and reserved.
    let f = AcFlags(AcFlags::PDE_PRESENT | AcFlags::PTE_PRESENT | AcFlags::PTE_BIT36);
    assert!(is_legal(f));
    assert_eq!(r.run_case(f), Ok(true));
}

#[test]
fn enumeration_follows_ac_test_bump() {
    let cfg = AccessConfig::default();
    let mut space = AccessSpace::new(&cfg);
    let first: Vec<_> = space.by_ref().take(3).collect();
    assert_eq!(first, vec![AcFlags(0), AcFlags(1), AcFlags(2)]);
    let invalid = cfg.invalid_mask();
    for f in space.take(200_000) {
        assert_eq!(f.0 & invalid, 0);
        assert!(is_legal(f));
    }
}

#[test]
fn rules_give_the_documented_error_codes() {
    let p = AcFlags::PDE_PRESENT | AcFlags::PTE_PRESENT | AcFlags::PDE_WRITABLE;
    // Reserved bit 51 in the PTE: P|RSVD|W.
    let f = AcFlags(p | AcFlags::PTE_BIT51 | AcFlags::ACCESS_WRITE);
    let e = expected(f, pde_value(f, 0x1000, 0), pte_value(f, 0x2000));
    assert!(e.fault);
    assert_eq!(e.error, 0xb);
    // Not-present PDE, user fetch without NXE/SMEP: U only.
    let f = AcFlags(AcFlags::ACCESS_USER | AcFlags::ACCESS_FETCH);
    let e = expected(f, pde_value(f, 0x1000, 0), pte_value(f, 0x2000));
    assert_eq!((e.fault, e.error), (true, 0x4));
    // PKRU.AD on a user page under PKE: P|PK|U.
    let f = AcFlags(
        p | AcFlags::PDE_USER
            | AcFlags::PTE_USER
            | AcFlags::ACCESS_USER
            | AcFlags::PKU_PKEY
            | AcFlags::PKU_AD
            | AcFlags::CR4_PKE,
    );
    let e = expected(f, pde_value(f, 0x1000, 0), pte_value(f, 0x2000));
    assert_eq!((e.fault, e.error), (true, 0x25));
    let mut r = AccessRunner::new(AccessConfig::default());
    assert_eq!(r.run_case(f), Ok(true));
}

#[test]
fn six_sub_tests_pass() {
    for (name, res) in sub_tests() {
        assert_eq!(res, Ok(()), "{name}");
    }
}

#[test]
fn space_sizes_match_the_reference_counts() {
    // The reference's brute-force counts per paging depth (x86-shadow-mmu.md, access.c size).
    let cases = [
        (AccessConfig::default(), 19_169_280u64),
        (
            AccessConfig {
                pku: false,
                ..AccessConfig::default()
            },
            1_916_928,
        ),
        (
            AccessConfig {
                maxphyaddr: 36,
                pku: false,
                ..AccessConfig::default()
            },
            2_899_968,
        ),
        (
            AccessConfig {
                maxphyaddr: 52,
                ..AccessConfig::default()
            },
            9_338_880,
        ),
        (
            AccessConfig {
                fep: true,
                ..AccessConfig::default()
            },
            38_338_560,
        ),
    ];
    for (cfg, want) in cases {
        assert_eq!(AccessSpace::new(&cfg).count() as u64, want, "{cfg:?}");
    }
}

/// The shadow MMU's report, shown on failure.
fn show_shadow(rep: &ShadowAccessReport) -> String {
    format!(
        "{:?} / {:?}",
        rep.first_mismatch.map(|m| m.to_string()),
        rep.first_violation
    )
}

#[test]
fn seeded_sample_through_the_shadow_mmu_matches_rules_and_walker() {
    // Both paging depths, both host page sizes (2 MiB backing gives huge SPTEs for the
    // PSE cases, 4 KiB splits them into direct shadow pages), and MAXPHYADDR 36 where
    // the bit-36 cases are legal.
    let configs = [
        (AccessConfig::default(), 21),
        (
            AccessConfig {
                la57: true,
                ..AccessConfig::default()
            },
            12,
        ),
        (
            AccessConfig {
                maxphyaddr: 36,
                pku: false,
                ..AccessConfig::default()
            },
            21,
        ),
    ];
    for (seed, (cfg, backing)) in configs.into_iter().enumerate() {
        let mut r = ShadowAccessRunner::with_backing(cfg, backing).unwrap();
        let rep = r.run_sample(seed as u64 + 11, 100_000);
        assert_eq!(rep.checked, 100_000);
        assert!(rep.ok(), "{cfg:?}: {}", show_shadow(&rep));
        assert_eq!(rep.matched, 100_000);
        // The faults agree with the walker's own run of the same sample, and some
        // accesses are served from the shadow table, some by shadow faults.
        let walker = AccessRunner::new(cfg).run_sample(seed as u64 + 11, 100_000);
        assert_eq!(rep.faults, walker.faults);
        assert!(rep.hits > 0 && rep.fixed > 0, "{rep:?}");
        assert!(rep.invariant_checks >= 100_000 / DEFAULT_CHECK_EVERY);
    }
}

#[test]
fn a_stretch_of_the_enumeration_through_the_shadow_mmu() {
    // access.c's own order: neighbouring cases differ in the low (PTE) bits, so SPTEs of
    // one case meet the next case's rewritten entries.
    let cfg = AccessConfig::default();
    let mut r = ShadowAccessRunner::new(cfg).unwrap();
    let rep = r.run(AccessSpace::from(&cfg, 0x0440_0000).take(150_000));
    assert!(rep.ok(), "{}", show_shadow(&rep));
    assert_eq!(rep.checked, 150_000);
}
