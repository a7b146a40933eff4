//! Per-hypercall cost of the hot paths the trace replay exercises: an H_ENTER +
//! H_REMOVE pair (with rmap link/unlink and a tlbie), H_READ with H_READ_4, and
//! H_PROTECT (which rewrites dword 1 behind a tlbie), in both flavours.
use criterion::{criterion_group, criterion_main, Criterion};
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::{Flavour, Vm, VmConfig};
use std::hint::black_box;

fn vm(f: Flavour) -> Vm {
    Vm::new(VmConfig {
        ram_bytes: 1 << 30,
        hpt_order: 23,
        flavour: f,
        backing_page_shift: 24,
    })
    .unwrap()
}

fn benches(c: &mut Criterion) {
    for f in [Flavour::Kvm, Flavour::Qemu] {
        let vm = vm(f);
        let npteg = vm.hpt().geometry().npteg();
        let v = (0x0040_0928_7a77_u64 << 24) | HpteV::LARGE | HpteV::VALID;
        let r = 0x1000 | HpteR::M | HpteR::R | 2; // 64K page
        let mut i = 0u64;
        let mut k = 0u64;
        c.bench_function(&format!("{f}/h_enter+h_remove hot (1024 PTEGs)"), |b| {
            b.iter(|| {
                k = (k + 1) % 1024;
                let e = vm.hcall(0, H_ENTER, &[0, k * 8, v, r | (k << 16)]);
                let x = vm.hcall(0, H_REMOVE, &[H_AVPN, e.out[0], v & !0x7f]);
                black_box(x)
            })
        });
        c.bench_function(
            &format!("{f}/h_enter+h_remove random PTEG (cache-missing)"),
            |b| {
                b.iter(|| {
                    i = (i + 0x9e37) % npteg;
                    let e = vm.hcall(0, H_ENTER, &[0, i * 8, v, r | ((i & 0x3fff) << 16)]);
                    let x = vm.hcall(0, H_REMOVE, &[H_AVPN, e.out[0], v & !0x7f]);
                    black_box(x)
                })
            },
        );
        // Populate some entries for read/protect.
        for g in 0..1024u64 {
            vm.hcall(0, H_ENTER, &[0, g * 8, v, r | (g << 16)]);
        }
        let mut g = 0u64;
        c.bench_function(&format!("{f}/h_read_4"), |b| {
            b.iter(|| {
                g = (g + 1) % 1024;
                black_box(vm.hcall(0, H_READ, &[H_READ_4, g * 8]))
            })
        });
        let mut pp = 0u64;
        c.bench_function(&format!("{f}/h_protect"), |b| {
            b.iter(|| {
                g = (g + 1) % 1024;
                pp ^= 1;
                black_box(vm.hcall(0, H_PROTECT, &[H_AVPN | 2 | pp, g * 8, v & !0x7f]))
            })
        });
    }
}

mod group {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(hcall, benches);
}
criterion_main!(group::hcall);
