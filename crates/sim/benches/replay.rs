//! Pre-parsed boot-trace replay on a fresh `revmap_hpt::Vm`: hypercalls per second.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use revmap_sim::replay::{new_vm, replay_preparsed, Flavour, PreparsedTrace, ReplayOptions};

fn replay(c: &mut Criterion) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../traces/boot.txt.gz");
    let trace = PreparsedTrace::open(path).expect("vendored boot trace");
    let opts = ReplayOptions::default();
    let mut g = c.benchmark_group("replay");
    g.throughput(Throughput::Elements(trace.calls()));
    for flavour in [Flavour::Kvm, Flavour::Qemu] {
        g.bench_function(format!("boot/{flavour}"), |b| {
            b.iter_batched(
                || new_vm(flavour, trace.vm_spec()).expect("vm"),
                |vm| {
                    let rep = replay_preparsed(&trace, &vm, &opts);
                    assert_eq!(rep.mismatched, 0);
                    (rep.calls, vm)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, replay);
criterion_main!(benches);
