//! Property tests: random hypercall sequences in both flavours, with the whole-VM
//! invariant checker after every call, a plain model of which slots are in use, and
//! arbitrary (hostile) arguments that must never panic.
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::{Flavour, Vm, VmConfig};

#[path = "common/hcalls.rs"]
mod hcalls;

/// The hypercalls drawn: all but H_RESIZE_HPT_COMMIT.
const OPS: &[u64] = hcalls::OPS.split_at(8).0;
use hcalls::GuestHpte;

fn small_vm(f: Flavour) -> Vm {
    Vm::new(VmConfig {
        ram_bytes: 32 << 20,
        hpt_order: 18,
        flavour: f,
        backing_page_shift: 24,
    })
    .unwrap()
}

/// A guest-like argument: ptex in a few groups, RAM or I/O addresses, various sizes.
fn guestish() -> impl Strategy<Value = (u64, [u64; 8])> {
    let ptex = prop_oneof![0u64..32, (0u64..4).prop_map(|g| g * 8), any::<u64>()];
    let flags = prop_oneof![
        Just(0u64),
        Just(H_EXACT),
        Just(H_AVPN),
        Just(H_ANDCOND),
        Just(H_READ_4),
        0u64..0x4000,
        any::<u64>()
    ];
    let tag = 0u64..4;
    let lp = prop_oneof![
        Just((0u64, 0u64)),
        Just((HpteV::LARGE, 0x1000)),
        Just((HpteV::LARGE, 0)),
        Just((HpteV::LARGE, 0x7000))
    ];
    let gfn = prop_oneof![0u64..16, Just(1 << 28), any::<u64>()];
    let rbits = prop_oneof![
        Just(HpteR::M | HpteR::R | 2),
        Just(HpteR::I | HpteR::G),
        0u64..0x200
    ];
    let vbits = prop_oneof![
        Just(HpteV::VALID),
        Just(HpteV::VALID | HpteV::BOLTED),
        0u64..0x80,
        Just(0x8000_0000_0000_0001u64)
    ];
    // Drawn in the order the fields of the tuple below always were.
    let hpte =
        (tag, lp, gfn, rbits, vbits).prop_map(|(tag, (l, lpbits), gfn, rbits, vbits)| GuestHpte {
            tag,
            l,
            lpbits,
            gfn,
            rbits,
            vbits,
        });
    (
        prop::sample::select(OPS.to_vec()),
        flags,
        ptex,
        hpte,
        prop::array::uniform4(0u64..4),
    )
        .prop_map(|(op, flags, ptex, hpte, bulk)| {
            let args = if op == H_BULK_REMOVE {
                let mut a = [0u64; 8];
                for (i, k) in bulk.iter().enumerate() {
                    let ty = [
                        0x4000_0000_0000_0000u64,
                        0xC000_0000_0000_0000,
                        0,
                        0x4200_0000_0000_0000,
                    ][*k as usize];
                    a[2 * i] = ty | (ptex.wrapping_add(i as u64) & 0x1f);
                    a[2 * i + 1] = hpte.tag << 7;
                }
                a
            } else {
                [
                    flags,
                    ptex,
                    if op == H_ENTER {
                        hpte.pteh()
                    } else {
                        hpte.avpn()
                    },
                    hpte.ptel(),
                    0,
                    0,
                    0,
                    0,
                ]
            };
            (op, args)
        })
}

fn hostile() -> impl Strategy<Value = (u64, Vec<u64>)> {
    (
        prop_oneof![prop::sample::select(OPS.to_vec()), any::<u64>()],
        prop::collection::vec(any::<u64>(), 0..10),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))), ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_every_invariant(
        kvm in any::<bool>(),
        calls in prop::collection::vec(guestish(), 1..60),
    ) {
        let f = if kvm { Flavour::Kvm } else { Flavour::Qemu };
        let vm = small_vm(f);
        // Plain model: which of the first 64 slots the guest sees valid.
        let mut used = [false; 64];
        for (op, args) in calls {
            let r = vm.hcall(0, op, &args);
            vm.check_invariants().map_err(|e| TestCaseError::fail(format!("{op:#x} {args:x?}: {e}")))?;
            match (op, r.ret) {
                (H_ENTER, H_SUCCESS) => {
                    let p = r.out[0] as usize;
                    prop_assert!(p < 64 || args[1] >= 64);
                    let valid = f == Flavour::Kvm || args[2] & HpteV::VALID != 0;
                    if p < 64 {
                        prop_assert!(!used[p], "H_ENTER reused an in-use slot {p}");
                        used[p] = valid;
                    }
                }
                (H_REMOVE, H_SUCCESS) => {
                    let p = args[1] as usize;
                    prop_assert!(used[p], "removed a slot the model thinks is free");
                    used[p] = false;
                }
                (H_REMOVE | H_PROTECT, H_NOT_FOUND) if args[0] & (H_AVPN | H_ANDCOND) == 0 => {
                    prop_assert!(!used[args[1] as usize]);
                }
                (H_BULK_REMOVE, _) => {
                    for i in 0..4 {
                        // Success responses: TYPE = RESPONSE, CODE = 0. (QEMU puts R/C at
                        // bits 51/50, inside PTEX, so take the index from the request.)
                        let p = args[2 * i] & 0x00ff_ffff_ffff_ffff;
                        if r.out[2 * i] >> 60 == 0x8 && p < 64 {
                            used[p as usize] = false;
                        }
                    }
                }
                // No resizer is installed (`revmap-resize`): the optional function set
                // is absent, and the table never changes under the model.
                (H_RESIZE_HPT_PREPARE, ret) => prop_assert_eq!(ret, H_FUNCTION),
                (H_CLEAR_REF | H_CLEAR_MOD, ret) if f == Flavour::Qemu => prop_assert_eq!(ret, H_FUNCTION),
                _ => {}
            }
            // The model agrees with H_READ on every modelled slot.
            for (g, chunk) in used.chunks(4).enumerate() {
                let rr = vm.hcall(0, H_READ, &[H_READ_4, 4 * g as u64]);
                for (k, u) in chunk.iter().enumerate() {
                    prop_assert_eq!(rr.out[2 * k] & 1 != 0, *u, "slot {}", 4 * g + k);
                }
            }
        }
    }

    #[test]
    fn arbitrary_arguments_never_panic(kvm in any::<bool>(), calls in prop::collection::vec(hostile(), 1..40)) {
        let vm = small_vm(if kvm { Flavour::Kvm } else { Flavour::Qemu });
        for (op, args) in calls {
            let r = vm.hcall(0, op, &args);
            let resize = matches!(op, H_RESIZE_HPT_PREPARE | H_RESIZE_HPT_COMMIT);
            prop_assert!(
                r.ret <= H_SUCCESS
                    || (resize && (is_long_busy(r.ret) || matches!(r.ret, H_BUSY | H_CLOSED))),
                "unexpected return {}", r.ret
            );
        }
        vm.check_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}
