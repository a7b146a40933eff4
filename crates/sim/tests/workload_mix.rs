//! Calibration of the guest workload against the real traces: the hypercall mix of a
//! single-vCPU run of the default workload on a 1 GiB guest (the traces' guest size)
//! is compared with the mix of `traces/resize.txt.gz` (its steady workload dominates)
//! counted with the trace parser, and must be within [`TOLERANCE`] for every kind.

use revmap_hpt::mmu::VcpuMmu;
use revmap_hpt::{Flavour, VcpuId, Vm, VmConfig};
use revmap_sim::report::Mix;
use revmap_sim::workload::{GuestCpu, WorkloadConfig};

/// Largest allowed absolute difference of any hypercall's share (5 percentage points).
const TOLERANCE: f64 = 0.05;

fn trace(name: &str) -> String {
    format!("{}/../../traces/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn run(steps: u64, seed: u64) -> (Mix, u64) {
    let vm = Vm::new(VmConfig {
        ram_bytes: 1 << 30,
        hpt_order: 23,
        flavour: Flavour::Kvm,
        backing_page_shift: 24,
    })
    .unwrap();
    let mut cpu = GuestCpu::new(VcpuId::ZERO, seed, 1 << 30, WorkloadConfig::default()).unwrap();
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let mut run = vm.vcpu_run(VcpuId::ZERO);
    cpu.boot(&vm, &mut run);
    for _ in 0..steps {
        cpu.step(&vm, &mut mmu, &mut run);
    }
    drop(run);
    vm.check_invariants().unwrap();
    (cpu.stats.mix(), cpu.stats.guest.enter_errors)
}

#[test]
fn workload_mix_matches_the_resize_trace() {
    let real = Mix::of_trace(trace("resize.txt.gz")).unwrap();
    let boot = Mix::of_trace(trace("boot.txt.gz")).unwrap();
    let (ours, enter_errors) = run(300_000, 7);
    println!(
        "{:<14} {:>8} {:>8} {:>8}",
        "hcall", "boot", "resize", "model"
    );
    for ((name, b), ((_, r), (_, o))) in boot
        .rows()
        .iter()
        .zip(real.rows().iter().zip(ours.rows().iter()))
    {
        println!(
            "{name:<14} {:>7.2}% {:>7.2}% {:>7.2}%",
            b * 100.0,
            r * 100.0,
            o * 100.0
        );
    }
    println!(
        "calls: boot {} resize {} model {}",
        boot.calls, real.calls, ours.calls
    );
    assert_eq!(enter_errors, 0);
    let d = ours.max_abs_diff(&real);
    assert!(
        d <= TOLERANCE,
        "mix differs by {d:.3}: {ours:?} vs {real:?}"
    );
}

#[test]
fn bolted_linear_map_survives_the_workload_and_hidx_stays_usable() {
    use revmap_hpt::hpte::HpteV;
    let vm = Vm::new(VmConfig {
        ram_bytes: 256 << 20,
        hpt_order: 18,
        flavour: Flavour::Kvm,
        backing_page_shift: 24,
    })
    .unwrap();
    // Little churn, so that the resident set outgrows the table.
    let mut cfg = WorkloadConfig::default();
    cfg.mix.munmap_page = 5;
    cfg.mix.exec = 0;
    cfg.mix.exit = 0;
    let mut cpu = GuestCpu::new(VcpuId::ZERO, 3, 256 << 20, cfg).unwrap();
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let mut run = vm.vcpu_run(VcpuId::ZERO);
    cpu.boot(&vm, &mut run);
    // A small table (order 18, 16K slots) fills up: evictions must happen and must
    // never take a bolted entry.
    for _ in 0..60_000 {
        cpu.step(&vm, &mut mmu, &mut run);
    }
    drop(run);
    let bolted = vm
        .hpt()
        .slots()
        .iter()
        .filter(|s| {
            let v = s.load_v();
            v & HpteV::VALID != 0 && v & HpteV::BOLTED != 0
        })
        .count();
    assert_eq!(bolted, 16, "256 MiB / 16M linear-map pages");
    assert!(cpu.stats.guest.evictions > 0, "the small table must fill");
    assert_eq!(cpu.stats.guest.enter_errors, 0);
    assert!(cpu.stats.guest.touches > 10_000);
    // Every hypercall was well-formed: only H_SUCCESS, H_NOT_FOUND or H_PTEG_FULL.
    let odd: u64 = cpu.stats.other_ret.iter().sum();
    assert!(odd <= cpu.stats.count(revmap_trace::HcallKind::Enter) / 2);
    vm.check_invariants().unwrap();
}
