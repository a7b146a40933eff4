//! Hardware reference/change updates, as real-guest traces record them
//! (`HW_SET_R` / `HW_SET_C`).
//!
//! A real MMU sets R in an HPTE on every translation through it and C on every store;
//! a trace records each such update. [`Vm::hw_set_rc`] re-applies one the way the MMU
//! model ([`crate::mmu`]) does: R/C are ORed into the real dword 1 of a VALID entry (where
//! the hypercalls harvest them after their invalidation), or into the
//! guest view of an ABSENT one (a paged-out or emulated-MMIO entry: the real access would
//! fault and the bit would land in the revalidated entry; the guest sees the same).
//!
//! Invariants: only R and C change; an entry that is not guest-valid (neither VALID nor
//! ABSENT) is left alone and the update is refused, as hardware cannot translate
//! through it. The update runs under the HPTE lock, inside the resize gate.

use crate::hpte::{HpteR, HpteV};
use crate::vm::Vm;
use revmap_rmap::Ptex;

impl Vm {
    /// The MMU sets `bits` (`HpteR::R` and/or `HpteR::C`; other bits are ignored) in HPTE
    /// `ptex`. Returns dword 1 as the guest now sees it (what H_READ would return), or
    /// `None` if `ptex` is out of range or the entry is not guest-valid.
    pub fn hw_set_rc(&self, ptex: Ptex, bits: u64) -> Option<u64> {
        let bits = bits & HpteR::RC;
        let access = self.host_access();
        let hpt = access.hpt();
        let p = hpt.geometry().ptex(u64::from(ptex.0))?;
        let g = hpt.lock(p)?;
        let v = g.v();
        if !HpteV(v).is_used() {
            return None;
        }
        let rev = hpt.revmap();
        if v & HpteV::VALID != 0 {
            hpt.slot(p)?.hw_set_rc(bits);
        } else {
            rev.set_guest_rpte(p.0, rev.guest_rpte(p.0) | bits);
        }
        let r = self
            .flavour()
            .present_r(rev.guest_rpte(p.0) | (g.r() & HpteR::RC));
        drop(g);
        Some(r)
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use crate::hcall::{H_ENTER, H_READ, H_REMOVE, H_SUCCESS};
    use crate::hpte::HpteR;
    use crate::{Flavour, Vm, VmConfig};
    use revmap_rmap::Ptex;

    fn vm(flavour: Flavour) -> Vm {
        Vm::new(VmConfig {
            flavour,
            ..VmConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn set_c_shows_in_h_read_and_in_h_remove() {
        for f in [Flavour::Kvm, Flavour::Qemu] {
            let vm = vm(f);
            // A RAM page (M) entered with R only.
            let r = vm.hcall(0, H_ENTER, &[0, 8, 0x4000_0000_0000_0001, 0x5000 | 0x110]);
            assert_eq!(r.ret, H_SUCCESS);
            let p = r.out[0];
            let after = vm.hw_set_rc(Ptex(p as u32), HpteR::C).expect("guest-valid");
            assert_eq!(after & HpteR::RC, HpteR::RC, "{f}");
            assert_eq!(vm.hcall(0, H_READ, &[0, p]).out[1], after, "{f}");
            let rm = vm.hcall(0, H_REMOVE, &[0, p, 0]);
            assert_eq!(rm.ret, H_SUCCESS);
            assert_ne!(rm.out[1] & HpteR::C, 0, "{f}: C harvested at removal");
            assert_eq!(
                vm.hw_set_rc(Ptex(p as u32), HpteR::R),
                None,
                "{f}: free slot refused"
            );
            vm.check_invariants().unwrap();
        }
    }

    #[test]
    fn set_r_on_mmio_entry_goes_to_the_guest_view() {
        let vm = vm(Flavour::Kvm);
        // Beyond RAM: emulated MMIO (ABSENT, key 31, cache-inhibited).
        let r = vm.hcall(
            0,
            H_ENTER,
            &[0, 16, 0x4000_0000_0000_0101, (1 << 40) | 0x20],
        );
        assert_eq!(r.ret, H_SUCCESS);
        let after = vm.hw_set_rc(Ptex(r.out[0] as u32), HpteR::R).unwrap();
        assert_ne!(after & HpteR::R, 0);
        assert_eq!(vm.hcall(0, H_READ, &[0, r.out[0]]).out[1], after);
        assert_eq!(vm.hw_set_rc(Ptex(1 << 30), HpteR::R), None, "out of range");
        vm.check_invariants().unwrap();
    }
}
