//! The host actors against the real `revmap_hpt::Vm`: they really unmap, age and
//! harvest, the checker finds nothing at pauses, and the guest's view of its HPT
//! (H_READ of every entry) is exactly what it was.

use revmap_hpt::hash::{hpt_hash, primary_pteg, Segment, SegmentSize};
use revmap_hpt::hcall::{H_ENTER, H_READ, H_SUCCESS};
use revmap_hpt::hpte::{encode_avpn, HpteR, HpteV};
use revmap_hpt::{Flavour, Vm, VmConfig};
use revmap_rmap::sync::thread;
use revmap_sim::actors::{ActorConfig, HostActors};
use revmap_sim::host::HostMmu;
use std::num::NonZeroU64;

const SEG: Segment = Segment {
    vsid: 0x2_5678,
    ssize: SegmentSize::S256M,
    base_shift: 12,
};

fn vm(flavour: Flavour) -> (Vm, Vec<u64>) {
    let vm = Vm::new(VmConfig {
        ram_bytes: 256 << 20,
        hpt_order: 18,
        flavour,
        backing_page_shift: 12,
    })
    .unwrap();
    let mut ptexes = Vec::new();
    for k in 0..2048u64 {
        let ea = k << 12;
        let group = primary_pteg(vm.hpt().geometry(), hpt_hash(&SEG, ea)) * 8;
        let pteh = encode_avpn(SEG.va(ea), 12, false) | HpteV::VALID;
        let gfn = (k * 29) % (256 << 8);
        let ptel = (gfn << 12) | HpteR::M | HpteR::R | HpteR::C | 2;
        let r = vm.hcall(0, H_ENTER, &[0, group, pteh, ptel]);
        if r.ret == H_SUCCESS {
            ptexes.push(r.out[0]);
        }
    }
    assert!(ptexes.len() > 1500);
    (vm, ptexes)
}

fn guest_view(vm: &Vm, ptexes: &[u64]) -> Vec<(u64, u64)> {
    ptexes
        .iter()
        .map(|&p| {
            let r = vm.hcall(0, H_READ, &[0, p]);
            assert_eq!(r.ret, H_SUCCESS);
            (r.out[0], r.out[1])
        })
        .collect()
}

#[test]
fn actors_work_the_real_vm_without_the_guest_noticing() {
    for flavour in [Flavour::Kvm, Flavour::Qemu] {
        let (vm, ptexes) = vm(flavour);
        let before = guest_view(&vm, &ptexes);
        let cfg = ActorConfig {
            ops_per_phase: NonZeroU64::new(10),
            ..ActorConfig::all(5)
        };
        let ops = thread::scope(|s| {
            let actors = HostActors::spawn(s, &vm, &cfg);
            for _ in 0..50 {
                actors.end_phase();
                actors.pause();
                vm.check_invariants().unwrap();
                assert_eq!(guest_view(&vm, &ptexes), before, "{flavour}");
                actors.resume();
            }
            actors.stop().unwrap()
        });
        assert!(ops.total() >= 1500, "{ops:?}");
        assert!(ops.hptes_unmapped > 0, "{flavour}: {ops:?}");
        assert!(ops.get_dirty_log >= 500 && ops.errors == 0, "{ops:?}");
        vm.check_invariants().unwrap();
        assert_eq!(guest_view(&vm, &ptexes), before, "{flavour}");
        assert_eq!(vm.memslot_views().len(), 1);
    }
}
