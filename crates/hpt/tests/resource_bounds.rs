//! Resource bound under a hostile guest that enters one page everywhere: the guest
//! fills every HPTE slot of the table with a mapping of the same frame. The frame's
//! rmap ring lives in the revmap entries of those slots (no allocation per mapping), so
//! its length is bounded by the table: measured, it equals the number of slots, and
//! the next H_ENTER is refused with H_PTEG_FULL rather than growing anything.

use revmap_hpt::hcall::{H_ENTER, H_PTEG_FULL, H_SUCCESS};
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::{Flavour, Vm, VmConfig};
use revmap_rmap::Gfn;

const ORDER: u32 = 18;
const GFN: u64 = 0x42;

fn ring_len(vm: &Vm, gfn: u64) -> usize {
    let slots = vm.memslots();
    let slot = slots.lookup(Gfn(gfn)).unwrap();
    let rm = slot.rmap(Gfn(gfn)).unwrap();
    let g = rm.lock();
    vm.hpt().revmap().chain_len(&g)
}

#[test]
fn one_page_everywhere_fills_the_table_and_no_more() {
    for flavour in [Flavour::Kvm, Flavour::Qemu] {
        let vm = Vm::new(VmConfig {
            ram_bytes: 32 << 20,
            hpt_order: ORDER,
            flavour,
            backing_page_shift: 16,
        })
        .unwrap();
        let slots = (1u64 << ORDER) / 16;
        let ptel = (GFN << 12) | HpteR::M | HpteR::R | 2;
        let mut entered = 0u64;
        for ptex in (0..slots).step_by(8) {
            // Eight mappings per PTEG, each with its own AVPN.
            for k in 0..8u64 {
                let pteh = ((ptex + k) << 7) | HpteV::VALID;
                let r = vm.hcall(0, H_ENTER, &[0, ptex, pteh, ptel]);
                assert_eq!(r.ret, H_SUCCESS, "{flavour:?} ptex {ptex:#x}+{k}");
                entered += 1;
            }
            // The ninth mapping of a full PTEG is refused.
            let r = vm.hcall(
                0,
                H_ENTER,
                &[0, ptex, (ptex << 7) | 0x7f80 | HpteV::VALID, ptel],
            );
            assert_eq!(r.ret, H_PTEG_FULL, "{flavour:?} ptex {ptex:#x}");
        }
        assert_eq!(entered, slots);
        assert_eq!(
            ring_len(&vm, GFN) as u64,
            slots,
            "{flavour:?}: ring = every slot"
        );
        vm.check_invariants().unwrap();
    }
}
