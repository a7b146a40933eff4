//! Conformance tests of the PAPR HPT hypercalls (H_ENTER, H_REMOVE, H_BULK_REMOVE,
//! H_PROTECT, H_READ, H_CLEAR_REF/MOD) and the rmap (resize: `revmap-resize`), in both
//! flavours where they differ. The invariant checker runs at the end of every test.
#![allow(clippy::needless_range_loop)]
use revmap_hpt::hash::{hpt_hash, primary_pteg, secondary_pteg, Segment, SegmentSize};
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::{Flavour, HcallResult, Vm, VmConfig};
use revmap_rmap::Gfn;

const BOTH: [Flavour; 2] = [Flavour::Kvm, Flavour::Qemu];
const REQ: u64 = 0x4000_0000_0000_0000;
const END: u64 = 0xC000_0000_0000_0000;
const AVPN_F: u64 = 0x0200_0000_0000_0000;
const ANDCOND_F: u64 = 0x0100_0000_0000_0000;

fn vm_order(f: Flavour, order: u32) -> Vm {
    Vm::new(VmConfig {
        ram_bytes: 64 << 20,
        hpt_order: order,
        flavour: f,
        backing_page_shift: 24,
    })
    .unwrap()
}

fn vm(f: Flavour) -> Vm {
    vm_order(f, 18)
}

/// QEMU's migration-dirty bit as seen in returned dword 0s.
fn d(f: Flavour) -> u64 {
    if f == Flavour::Qemu {
        0x40
    } else {
        0
    }
}

/// A valid 256M-segment 4K-page dword 0 with AVPN `tag`.
fn pteh(tag: u64) -> u64 {
    (tag << 7) & HpteV::AVPN | HpteV::VALID
}

/// A RAM dword 1 for 4K frame `gfn`: M, pp=2, R set.
fn ptel(gfn: u64) -> u64 {
    (gfn << 12) | HpteR::R | HpteR::M | 2
}

fn h(vm: &Vm, op: u64, args: &[u64]) -> HcallResult {
    vm.hcall(0, op, args)
}

fn enter(vm: &Vm, flags: u64, ptex: u64, v: u64, r: u64) -> HcallResult {
    h(vm, H_ENTER, &[flags, ptex, v, r])
}

fn read(vm: &Vm, p: u64) -> (u64, u64) {
    let r = h(vm, H_READ, &[0, p]);
    assert_eq!(r.ret, H_SUCCESS);
    (r.out[0], r.out[1])
}

fn check(vm: &Vm) {
    vm.check_invariants().unwrap();
}

#[test]
fn item01_ptex_range_for_orders_18_19_24() {
    for f in BOTH {
        for order in [18, 19, 24] {
            let vm = vm_order(f, order);
            let top = (1u64 << (order - 4)) - 1;
            assert_eq!(enter(&vm, H_EXACT, top, pteh(1), ptel(1)).ret, H_SUCCESS);
            assert_eq!(h(&vm, H_READ, &[0, top]).ret, H_SUCCESS);
            assert_eq!(h(&vm, H_PROTECT, &[2, top, 0]).ret, H_SUCCESS);
            let clear = if f == Flavour::Kvm {
                H_SUCCESS
            } else {
                H_FUNCTION
            };
            assert_eq!(h(&vm, H_CLEAR_REF, &[0, top]).ret, clear);
            assert_eq!(h(&vm, H_CLEAR_MOD, &[0, top]).ret, clear);
            assert_eq!(h(&vm, H_REMOVE, &[0, top, 0]).ret, H_SUCCESS);
            for bad in [top + 1, 1 << 63, u64::MAX] {
                assert_eq!(enter(&vm, 0, bad, pteh(1), ptel(1)).ret, H_PARAMETER);
                assert_eq!(enter(&vm, H_EXACT, bad, pteh(1), ptel(1)).ret, H_PARAMETER);
                assert_eq!(h(&vm, H_REMOVE, &[0, bad, 0]).ret, H_PARAMETER);
                assert_eq!(h(&vm, H_PROTECT, &[0, bad, 0]).ret, H_PARAMETER);
                assert_eq!(h(&vm, H_READ, &[0, bad]).ret, H_PARAMETER);
                assert_eq!(h(&vm, H_READ, &[H_READ_4, bad]).ret, H_PARAMETER);
                let clear = if f == Flavour::Kvm {
                    H_PARAMETER
                } else {
                    H_FUNCTION
                };
                assert_eq!(h(&vm, H_CLEAR_REF, &[0, bad]).ret, clear);
                assert_eq!(h(&vm, H_CLEAR_MOD, &[0, bad]).ret, clear);
            }
            check(&vm);
        }
    }
}

#[test]
fn item02_unknown_and_misaligned_opcodes_are_h_function() {
    for f in BOTH {
        let vm = vm(f);
        for op in [
            0,
            0x1,
            0x5,
            0x1c,
            H_PAGE_INIT,
            H_BLOCK_REMOVE,
            H_CLEAR_HPT,
            0x125,
            1 << 40,
            u64::MAX,
        ] {
            let r = h(&vm, op, &[1, 2, 3]);
            assert_eq!(r.ret, H_FUNCTION, "{f} op {op:#x}");
            assert_eq!(&r.out[..3], &[1, 2, 3], "registers untouched");
        }
        check(&vm);
    }
}

#[test]
fn item03_hash_vectors() {
    let vm = vm(Flavour::Kvm);
    let geo = vm.hpt().geometry();
    for (ssize, base, vsid, ea) in [
        (SegmentSize::S256M, 12, 0xabcdefu64, 0x0123_4000u64),
        (SegmentSize::S256M, 16, 0xabcdef, 0x0123_0000),
        (SegmentSize::S256M, 24, 0xabcdef, 0x0300_0000),
        (SegmentSize::S1T, 16, 0x12_3456_789a, 0xab_cdef_0000),
        (SegmentSize::S1T, 24, 0x12_3456_789a, 0xab_cd00_0000),
    ] {
        let seg = Segment {
            vsid,
            ssize,
            base_shift: base,
        };
        let off = ea & ssize.offset_mask();
        let want = match ssize {
            SegmentSize::S256M => vsid ^ (off >> base),
            SegmentSize::S1T => vsid ^ (vsid << 25) ^ (off >> base),
        } & 0x7F_FFFF_FFFF;
        let hash = hpt_hash(&seg, ea);
        assert_eq!(hash, want);
        assert_eq!(primary_pteg(geo, hash), want & geo.mask());
        assert_eq!(secondary_pteg(geo, hash), !want & geo.mask());
    }
}

#[test]
fn item04_empty_group_lands_in_slot_0() {
    for f in BOTH {
        let vm = vm(f);
        let r = enter(&vm, 0, 8 * 77 + 5, pteh(1), ptel(1));
        assert_eq!((r.ret, r.out[0]), (H_SUCCESS, 8 * 77));
        check(&vm);
    }
}

#[test]
fn item05_first_free_slot_and_reuse() {
    for f in BOTH {
        let vm = vm(f);
        let g = 8 * 100;
        for s in 0..3 {
            assert_eq!(enter(&vm, 0, g, pteh(s), ptel(s)).out[0], g + s);
        }
        assert_eq!(enter(&vm, 0, g + 7, pteh(3), ptel(3)).out[0], g + 3);
        assert_eq!(h(&vm, H_REMOVE, &[0, g, 0]).ret, H_SUCCESS);
        assert_eq!(enter(&vm, 0, g, pteh(9), ptel(9)).out[0], g);
        check(&vm);
    }
}

#[test]
fn item06_full_pteg_leaves_table_unchanged() {
    for f in BOTH {
        let vm = vm(f);
        let g = 8 * 5;
        for s in 0..8 {
            assert_eq!(enter(&vm, 0, g, pteh(s), ptel(s)).ret, H_SUCCESS);
        }
        let before: Vec<_> = (0..8).map(|s| read(&vm, g + s)).collect();
        let r = enter(&vm, 0, g + 3, pteh(99), ptel(99));
        assert_eq!(r.ret, H_PTEG_FULL);
        assert_eq!(
            &r.out[..4],
            &[0, g + 3, pteh(99), ptel(99)],
            "registers not written on failure"
        );
        let after: Vec<_> = (0..8).map(|s| read(&vm, g + s)).collect();
        assert_eq!(before, after);
        check(&vm);
    }
}

#[test]
fn item07_h_exact() {
    for f in BOTH {
        let vm = vm(f);
        let g = 8 * 9;
        let r = enter(&vm, H_EXACT, g + 6, pteh(1), ptel(1));
        assert_eq!((r.ret, r.out[0]), (H_SUCCESS, g + 6));
        assert_eq!(
            enter(&vm, H_EXACT, g + 6, pteh(2), ptel(2)).ret,
            H_PTEG_FULL
        );
        assert_eq!(read(&vm, g + 6).0, pteh(1) | d(f));
        check(&vm);
    }
}

#[test]
fn item08_page_size_encodings() {
    for f in BOTH {
        let vm = vm(f);
        let l = HpteV::LARGE;
        // Bad LP.
        assert_eq!(
            enter(&vm, 0, 0, pteh(1) | l, ptel(0) | 0x2000).ret,
            H_PARAMETER
        );
        // Each valid encoding (16G is larger than the 16M backing: H_PARAMETER).
        let mut g = 8;
        for (lp, shift) in [(0x7u64, 16u32), (0x38, 24), (0x1, 16), (0x8, 24), (0x0, 24)] {
            let gpa = 16 << 20; // 16M-aligned RAM address
            let r = enter(&vm, 0, g, pteh(g) | l, gpa | (lp << 12) | HpteR::M | 2);
            assert_eq!(r.ret, H_SUCCESS, "{f} lp {lp:#x}");
            let (v, rr) = read(&vm, r.out[0]);
            assert_eq!(v & HpteV::LARGE, l);
            assert_eq!(
                rr & ((1 << shift) - 1) & HpteR::RPN,
                lp << 12,
                "LP kept in the guest view"
            );
            g += 8;
        }
        assert_eq!(
            enter(&vm, 0, g, pteh(1) | l, (16 << 20) | 0x3000 | HpteR::M).ret,
            H_PARAMETER,
            "16G page on 16M backing"
        );
        // 16M with R[23:20] != 0.
        let want = if f == Flavour::Qemu {
            H_PARAMETER
        } else {
            H_SUCCESS
        };
        assert_eq!(
            enter(&vm, 0, g, pteh(2) | l, (16 << 20) | 0x20_0000 | HpteR::M).ret,
            want
        );
        check(&vm);
    }
}

#[test]
fn item09_wimg_rules() {
    let io = 1u64 << 40;
    let vq = vm(Flavour::Qemu);
    assert_eq!(
        enter(&vq, 0, 0, pteh(1), (1 << 12) | HpteR::M).ret,
        H_SUCCESS
    );
    assert_eq!(
        enter(&vq, 0, 0, pteh(1), (1 << 12) | HpteR::I).ret,
        H_PARAMETER
    );
    assert_eq!(enter(&vq, 0, 0, pteh(1), io | HpteR::I).ret, H_SUCCESS);
    assert_eq!(
        enter(&vq, 0, 0, pteh(1), io | HpteR::I | HpteR::G).ret,
        H_SUCCESS
    );
    assert_eq!(enter(&vq, 0, 0, pteh(1), io | HpteR::M).ret, H_PARAMETER);
    check(&vq);
    // KVM: RAM with I accepted, guest view keeps I, real HPTE made cacheable.
    let vk = vm(Flavour::Kvm);
    let r = enter(&vk, 0, 0, pteh(1), (1 << 12) | HpteR::I | 2);
    assert_eq!(r.ret, H_SUCCESS);
    assert_eq!(read(&vk, r.out[0]).1 & HpteR::WIMG, HpteR::I);
    let real = vk
        .hpt()
        .slot(revmap_rmap::Ptex(r.out[0] as u32))
        .unwrap()
        .load_r();
    assert_eq!(real & HpteR::WIMG, HpteR::M);
    assert_eq!(
        enter(&vk, 0, 0, pteh(1), io | HpteR::M).ret,
        H_SUCCESS,
        "no MMIO WIMG check"
    );
    check(&vk);
}

#[test]
fn item10_software_bits_v0_and_reserved_b() {
    for f in BOTH {
        let vm = vm(f);
        let r = enter(&vm, 0, 0, pteh(1) | 0x60, ptel(1));
        assert_eq!(r.ret, H_SUCCESS);
        assert_eq!(
            read(&vm, r.out[0]).0,
            pteh(1) | d(f),
            "0x20/0x40 not stored"
        );
        // V = 0 in pteh.
        let r = enter(&vm, 0, 8, pteh(2) & !HpteV::VALID, ptel(2));
        assert_eq!(r.ret, H_SUCCESS);
        let (v, rr) = read(&vm, r.out[0]);
        match f {
            Flavour::Kvm => assert_eq!(v, pteh(2), "KVM forces valid"),
            Flavour::Qemu => {
                assert_eq!(
                    (v, rr),
                    ((pteh(2) & !1) | 0x40, ptel(2)),
                    "QEMU stores invalid"
                );
                assert_eq!(h(&vm, H_REMOVE, &[0, 8, 0]).ret, H_NOT_FOUND);
                assert_eq!(enter(&vm, 0, 8, pteh(3), ptel(3)).out[0], 8, "slot is free");
            }
        }
        // B = 2/3.
        for b in [2u64, 3] {
            let want = if f == Flavour::Kvm {
                H_PARAMETER
            } else {
                H_SUCCESS
            };
            assert_eq!(enter(&vm, 0, 16, pteh(4) | (b << 62), ptel(4)).ret, want);
        }
        check(&vm);
    }
}

#[test]
fn item11_secondary_insert_and_lookup() {
    use revmap_hpt::mmu::{Access, VcpuMmu};
    for f in BOTH {
        let vm = vm(f);
        let seg = Segment {
            vsid: 0x777,
            ssize: SegmentSize::S256M,
            base_shift: 12,
        };
        let ea = 0x0123_4000;
        let geo = vm.hpt().geometry();
        let sec = secondary_pteg(geo, hpt_hash(&seg, ea)) * 8;
        let v =
            revmap_hpt::hpte::encode_avpn(seg.va(ea), 12, false) | HpteV::SECONDARY | HpteV::VALID;
        let r = enter(&vm, 0, sec, v, ptel(0x33));
        assert_eq!(r.ret, H_SUCCESS);
        assert_eq!(read(&vm, r.out[0]).0, v | d(f));
        let mut mmu = VcpuMmu::new(&vm).unwrap();
        let t = mmu.translate(&seg, ea, Access::Load).unwrap();
        assert_eq!(
            u64::from(t.ptex.0),
            r.out[0],
            "found in the secondary group"
        );
        check(&vm);
    }
}

#[test]
fn item12_remove_returns_old_words_exactly() {
    for f in BOTH {
        let vm = vm(f);
        let v = pteh(0x1234) | HpteV::BOLTED;
        let r0 = ptel(5) | HpteR::C | 0x1000_0000_0000_0e00;
        let p = enter(&vm, 0, 64, v, r0).out[0];
        let r = h(&vm, H_REMOVE, &[0, p, 0]);
        assert_eq!(r.ret, H_SUCCESS);
        assert_eq!((r.out[0], r.out[1]), (v | d(f), r0));
        assert_eq!(read(&vm, p), (d(f), 0));
        check(&vm);
    }
}

#[test]
fn item13_remove_empty_and_twice() {
    for f in BOTH {
        let vm = vm(f);
        assert_eq!(h(&vm, H_REMOVE, &[0, 3, 0]).ret, H_NOT_FOUND);
        let p = enter(&vm, 0, 0, pteh(1), ptel(1)).out[0];
        assert_eq!(h(&vm, H_REMOVE, &[0, p, 0]).ret, H_SUCCESS);
        let r = h(&vm, H_REMOVE, &[0, p, 0]);
        assert_eq!((r.ret, r.out[0]), (H_NOT_FOUND, 0), "outputs not written");
        check(&vm);
    }
}

#[test]
fn item14_avpn_matching() {
    for f in BOTH {
        let vm = vm(f);
        let v = pteh(0x5555) | HpteV::BOLTED | HpteV::SECONDARY;
        let p = enter(&vm, 0, 0, v, ptel(1)).out[0];
        let avpn = v & !0x7f;
        assert_eq!(
            h(&vm, H_REMOVE, &[H_AVPN, p, avpn ^ (1 << 7)]).ret,
            H_NOT_FOUND
        );
        assert_eq!(
            h(&vm, H_REMOVE, &[H_AVPN, p, avpn ^ (1 << 62)]).ret,
            H_NOT_FOUND
        );
        assert_eq!(read(&vm, p).0, v | d(f), "entry intact");
        let r = h(&vm, H_REMOVE, &[H_AVPN, p, avpn]);
        assert_eq!(r.ret, H_SUCCESS, "entry's low 7 bits are not compared");
        check(&vm);
    }
}

#[test]
fn item15_andcond_bolted() {
    for f in BOTH {
        let vm = vm(f);
        let pb = enter(&vm, 0, 0, pteh(1) | HpteV::BOLTED, ptel(1)).out[0];
        let pn = enter(&vm, 0, 0, pteh(2), ptel(2)).out[0];
        assert_eq!(
            h(&vm, H_REMOVE, &[H_ANDCOND, pb, HpteV::BOLTED]).ret,
            H_NOT_FOUND
        );
        assert_eq!(
            h(&vm, H_REMOVE, &[H_ANDCOND, pn, HpteV::BOLTED]).ret,
            H_SUCCESS
        );
        check(&vm);
    }
}

#[test]
fn item16_avpn_and_andcond_together() {
    for f in BOTH {
        let vm = vm(f);
        let v = pteh(7) | HpteV::BOLTED;
        let p = enter(&vm, 0, 0, v, ptel(1)).out[0];
        let both = H_AVPN | H_ANDCOND;
        // avpn = v & ~0x7f has no 0x10 bit: ANDCOND passes iff no AVPN bit overlaps v.
        assert_eq!(
            h(&vm, H_REMOVE, &[both, p, v & !0x7f]).ret,
            H_NOT_FOUND,
            "AND test fails"
        );
        let v2 = HpteV::VALID | HpteV::BOLTED; // AVPN 0
        let p2 = enter(&vm, 0, 8, v2, ptel(2)).out[0];
        assert_eq!(
            h(&vm, H_REMOVE, &[both, p2, 1 << 7]).ret,
            H_NOT_FOUND,
            "AVPN fails"
        );
        assert_eq!(h(&vm, H_REMOVE, &[both, p2, 0]).ret, H_SUCCESS, "both pass");
        check(&vm);
    }
}

fn bulk(vm: &Vm, pairs: [(u64, u64); 4]) -> HcallResult {
    let a: Vec<u64> = pairs.iter().flat_map(|&(x, y)| [x, y]).collect();
    h(vm, H_BULK_REMOVE, &a)
}

fn rc_shift(f: Flavour) -> u32 {
    if f == Flavour::Kvm {
        51
    } else {
        43
    }
}

#[test]
fn item17_bulk_four_avpn_requests() {
    for f in BOTH {
        let vm = vm(f);
        let ps: Vec<u64> = (0..4)
            .map(|i| enter(&vm, 0, 8 * i, pteh(i + 1), ptel(i) | HpteR::C).out[0])
            .collect();
        let pairs = [0, 1, 2, 3].map(|i| (REQ | AVPN_F | ps[i], pteh(i as u64 + 1) & !0x7f));
        let r = bulk(&vm, pairs);
        assert_eq!(r.ret, H_SUCCESS);
        for i in 0..4 {
            assert_eq!(
                r.out[2 * i],
                0x8000_0000_0000_0000 | AVPN_F | ps[i] | (HpteR::RC << rc_shift(f))
            );
            assert_eq!(r.out[2 * i + 1], pairs[i].1, "TSL unchanged");
            assert_eq!(read(&vm, ps[i]).0 & 1, 0);
        }
        check(&vm);
    }
}

#[test]
fn item18_bulk_end() {
    for f in BOTH {
        let vm = vm(f);
        let p = enter(&vm, 0, 0, pteh(1), ptel(1)).out[0];
        let r = bulk(&vm, [(END, 0), (REQ | p, 0), (0, 0), (0, 0)]);
        assert_eq!(r.ret, H_SUCCESS);
        assert_eq!(r.out[2], REQ | p, "after END untouched");
        assert_eq!(read(&vm, p).0 & 1, 1);
        let q = enter(&vm, 0, 8, pteh(2), ptel(2)).out[0];
        let r = bulk(&vm, [(REQ | p, 0), (REQ | q, 0), (END, 0), (REQ | 77, 5)]);
        assert_eq!(r.ret, H_SUCCESS);
        assert_eq!(&r.out[4..], &[END, 0, REQ | 77, 5]);
        check(&vm);
    }
}

#[test]
fn item19_bulk_mixed_codes() {
    for f in BOTH {
        let vm = vm(f);
        let a = enter(&vm, 0, 0, pteh(1), ptel(1)).out[0];
        let b = enter(&vm, 0, 8, pteh(2), ptel(2)).out[0];
        let c = enter(&vm, 0, 16, pteh(3), ptel(3)).out[0];
        let r = bulk(
            &vm,
            [
                (REQ | AVPN_F | a, pteh(1) & !0x7f),
                (REQ | AVPN_F | 100, 0),
                (REQ | AVPN_F | b, pteh(9) & !0x7f),
                (REQ | c, 0),
            ],
        );
        assert_eq!(r.ret, H_SUCCESS);
        let code = |w: u64| (w >> 60) & 3;
        assert_eq!(
            [r.out[0], r.out[2], r.out[4], r.out[6]].map(code),
            [0, 1, 1, 0]
        );
        assert_eq!(read(&vm, b).0 & 1, 1);
        check(&vm);
    }
}

#[test]
fn item20_bulk_flags_3_stops() {
    for f in BOTH {
        let vm = vm(f);
        let ps: Vec<u64> = (0..4)
            .map(|i| enter(&vm, 0, 8 * i, pteh(i), ptel(i)).out[0])
            .collect();
        let r = bulk(
            &vm,
            [
                (REQ | ps[0], 0),
                (REQ | 0x0300_0000_0000_0000 | ps[1], 0),
                (REQ | ps[2], 0),
                (REQ | ps[3], 0),
            ],
        );
        assert_eq!(r.ret, H_PARAMETER);
        assert_eq!(r.out[0] >> 60, 0x8, "pair 0 removed");
        assert_eq!(r.out[2], 0xA300_0000_0000_0000 | ps[1]);
        assert_eq!((r.out[4], r.out[6]), (REQ | ps[2], REQ | ps[3]));
        assert_eq!(
            [ps[0], ps[1], ps[2], ps[3]].map(|p| read(&vm, p).0 & 1),
            [0, 1, 1, 1]
        );
        check(&vm);
    }
}

#[test]
fn item21_bulk_out_of_range_and_bad_type() {
    for f in BOTH {
        let vm = vm(f);
        let npte = vm.hpt().geometry().npte();
        let r = bulk(&vm, [(REQ | npte, 0), (0, 0), (0, 0), (0, 0)]);
        assert_eq!(
            (r.ret, r.out[0]),
            (H_PARAMETER, 0xA000_0000_0000_0000 | npte)
        );
        let p = enter(&vm, 0, 0, pteh(1), ptel(1)).out[0];
        for ty in [0u64, 0x8000_0000_0000_0000] {
            let tsh = ty | AVPN_F | p;
            let r = bulk(&vm, [(tsh, 0), (0, 0), (0, 0), (0, 0)]);
            assert_eq!(r.ret, H_PARAMETER);
            let want = if f == Flavour::Kvm {
                0xA000_0000_0000_0000 | AVPN_F | p
            } else {
                tsh
            };
            assert_eq!(r.out[0], want, "{f}");
        }
        assert_eq!(read(&vm, p).0 & 1, 1);
        check(&vm);
    }
}

#[test]
fn item22_bulk_same_ptex_twice_and_absolute_on_bolted() {
    for f in BOTH {
        let vm = vm(f);
        let p = enter(&vm, 0, 0, pteh(1) | HpteV::BOLTED, ptel(1)).out[0];
        let r = bulk(&vm, [(REQ | p, 0), (REQ | p, 0), (END, 0), (0, 0)]);
        assert_eq!(r.ret, H_SUCCESS);
        assert_eq!(((r.out[0] >> 60) & 3, (r.out[2] >> 60) & 3), (0, 1));
        let q = enter(&vm, 0, 0, pteh(2) | HpteV::BOLTED, ptel(2)).out[0];
        let r = bulk(
            &vm,
            [
                (REQ | ANDCOND_F | q, HpteV::BOLTED),
                (END, 0),
                (0, 0),
                (0, 0),
            ],
        );
        assert_eq!((r.out[0] >> 60) & 3, 1, "ANDCOND protects bolted");
        check(&vm);
    }
}

#[test]
fn item23_protect_changes_only_protection_bits() {
    for f in BOTH {
        let vm = vm(f);
        let r0 = ptel(9) | HpteR::C;
        let p = enter(&vm, 0, 0, pteh(1), r0).out[0];
        // PP0 (0x100), key hi (0x3000), key lo (0xe00), N, pp=1.
        let flags = 0x100 | 0x3000 | 0xe00 | H_N | 1;
        assert_eq!(h(&vm, H_PROTECT, &[flags, p, 0]).ret, H_SUCCESS);
        let (_, r) = read(&vm, p);
        let keep = HpteR::RPN | HpteR::WIMG | HpteR::RC;
        assert_eq!(r & keep, r0 & keep, "RPN, WIMG, R, C unchanged");
        assert_eq!(
            r & HpteR::PROTECT_MASK,
            HpteR::PP0 | HpteR::KEY | HpteR::N | 1
        );
        check(&vm);
    }
}

#[test]
fn item24_protect_not_found_cases_and_ignored_flags() {
    for f in BOTH {
        let vm = vm(f);
        assert_eq!(h(&vm, H_PROTECT, &[0, 5, 0]).ret, H_NOT_FOUND);
        let p = enter(&vm, 0, 0, pteh(1), ptel(1)).out[0];
        assert_eq!(h(&vm, H_PROTECT, &[H_AVPN, p, 2 << 7]).ret, H_NOT_FOUND);
        assert_eq!(
            h(&vm, H_PROTECT, &[H_ANDCOND | 2, p, u64::MAX]).ret,
            H_SUCCESS,
            "ANDCOND ignored"
        );
        let before = read(&vm, p).1;
        assert_eq!(h(&vm, H_PROTECT, &[2 | HpteR::G, p, 0]).ret, H_SUCCESS);
        assert_eq!(read(&vm, p).1, before, "G flag has no effect");
        check(&vm);
    }
}

#[test]
fn item25_read_4() {
    for f in BOTH {
        let vm = vm(f);
        let g = 8 * 3;
        let ps: Vec<u64> = (0..3)
            .map(|i| enter(&vm, H_EXACT, g + 4 + i, pteh(i + 1), ptel(i)).out[0])
            .collect();
        let r = h(&vm, H_READ, &[H_READ_4, g + 7]);
        assert_eq!(r.ret, H_SUCCESS);
        for i in 0..3 {
            assert_eq!((r.out[2 * i], r.out[2 * i + 1]), read(&vm, ps[i]));
        }
        assert_eq!(
            (r.out[6], r.out[7]),
            (d(f), 0),
            "invalid entry read without error"
        );
        let top = vm.hpt().geometry().npte() - 1;
        let r = h(&vm, H_READ, &[H_READ_4, top]);
        assert_eq!(r.ret, H_SUCCESS);
        assert_eq!(r.out, [d(f), 0, d(f), 0, d(f), 0, d(f), 0]);
        check(&vm);
    }
}

#[test]
fn item26_clear_ref_and_clear_mod() {
    let vq = vm(Flavour::Qemu);
    let p = enter(&vq, 0, 0, pteh(1), ptel(1) | HpteR::C).out[0];
    assert_eq!(h(&vq, H_CLEAR_REF, &[0, p]).ret, H_FUNCTION);
    assert_eq!(h(&vq, H_CLEAR_MOD, &[0, p]).ret, H_FUNCTION);
    let vk = vm(Flavour::Kvm);
    let p = enter(&vk, 0, 0, pteh(1), ptel(1) | HpteR::C).out[0];
    let r = h(&vk, H_CLEAR_REF, &[0, p]);
    assert_eq!((r.ret, r.out[0] & HpteR::RC), (H_SUCCESS, HpteR::RC));
    assert_eq!(read(&vk, p).1 & HpteR::RC, HpteR::C);
    let r = h(&vk, H_CLEAR_MOD, &[0, p]);
    assert_eq!((r.ret, r.out[0] & HpteR::RC), (H_SUCCESS, HpteR::C));
    assert_eq!(read(&vk, p).1 & HpteR::RC, 0);
    assert_eq!(h(&vk, H_CLEAR_REF, &[0, 9]).ret, H_NOT_FOUND);
    assert_eq!(h(&vk, H_CLEAR_MOD, &[0, 9]).ret, H_NOT_FOUND);
    check(&vk);
    check(&vq);
}

#[test]
fn item38_rmap_rings_for_aliased_frames() {
    use revmap_hpt::mmu::{Access, VcpuMmu};
    for f in BOTH {
        let vm = vm(f);
        let slot = vm.memslots().lookup(Gfn(0x42)).unwrap().clone();
        let rmap = slot.rmap(Gfn(0x42)).unwrap();
        let rev = vm.hpt().revmap();
        let members = || {
            let g = rmap.lock();
            rev.iter(&g).collect::<Vec<_>>()
        };
        let ps: Vec<u64> = (0..4)
            .map(|i| enter(&vm, 0, 8 * (i + 1), pteh(i), ptel(0x42)).out[0])
            .collect();
        assert_eq!(members(), ps.iter().map(|&p| p as u32).collect::<Vec<_>>());
        assert_eq!(check_report(&vm).chain_members, 4);
        // Hardware dirties the page through entry 2 (segment vsid 0, ea = tag << 12
        // maps the AVPN used by pteh(2) = tag 2 << 7 -> VA >> 23 = 2).
        let seg = Segment {
            vsid: 0,
            ssize: SegmentSize::S256M,
            base_shift: 12,
        };
        let ea = 2u64 << 23;
        // Place a fresh entry where the MMU will look for `ea`, on the same frame.
        let grp = primary_pteg(vm.hpt().geometry(), hpt_hash(&seg, ea)) * 8;
        let pm = enter(&vm, 0, grp, pteh(2), ptel(0x42)).out[0];
        let mut mmu = VcpuMmu::new(&vm).unwrap();
        mmu.translate(&seg, ea, Access::Store).unwrap();
        // Remove the head: head moves to the next member.
        assert_eq!(h(&vm, H_REMOVE, &[0, ps[0], 0]).ret, H_SUCCESS);
        assert_eq!(rmap.load().head(), Some(ps[1] as u32));
        // Remove from the middle, then the MMU-dirtied one: C harvested into the rmap.
        assert_eq!(h(&vm, H_REMOVE, &[0, ps[2], 0]).ret, H_SUCCESS);
        let r = h(&vm, H_REMOVE, &[0, pm, 0]);
        assert_eq!(r.out[1] & HpteR::C, HpteR::C);
        assert!(rmap.load().changed() && slot.is_dirty(Gfn(0x42)));
        assert_eq!(members(), vec![ps[1] as u32, ps[3] as u32]);
        for p in [ps[3], ps[1]] {
            assert_eq!(h(&vm, H_REMOVE, &[0, p, 0]).ret, H_SUCCESS);
        }
        assert!(
            !rmap.load().is_present(),
            "present cleared with the last member"
        );
        assert_eq!(rmap.load().index(), 0);
        assert_eq!(check_report(&vm).chain_members, 0);
    }
}

fn check_report(vm: &Vm) -> revmap_hpt::CheckReport {
    vm.check_invariants().unwrap()
}
