//! Calibration of the guest workload against the real traces: the hypercall mix of a
//! single-vCPU run of the default workload on a 1 GiB guest (the traces' guest size)
//! is compared with the mix of `traces/resize.txt.gz` (its steady workload dominates)
//! counted with the trace parser, and must be within [`TOLERANCE`] for every kind.

use revmap_hpt::mmu::VcpuMmu;
use revmap_hpt::{Flavour, Vm, VmConfig};
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
    let mut cpu = GuestCpu::new(0, seed, 1 << 30, WorkloadConfig::default()).unwrap();
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let mut run = vm.vcpu_run(0);
    cpu.boot(&vm, &mut run);
    for _ in 0..steps {
        cpu.step(&vm, &mut mmu, &mut run);
    }
    drop(run);
    vm.check_invariants().unwrap();
    (cpu.stats.mix(), cpu.stats.enter_errors)
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
