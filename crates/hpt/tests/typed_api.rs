//! The typed hypercall API (`Vm::h_enter`, ...) against the register-level one
//! (`Vm::hcall`): the same sequence of calls on two identical VMs, one through each API,
//! must give the same return codes, the same outputs and the same final table, in both
//! flavours. Also the vCPU id bounds of both APIs.
use proptest::prelude::*;
use revmap_hpt::hcall::*;
use revmap_hpt::papr::{
    BulkCode, BulkMatch, BulkRemoveRequest, EnterFlags, ProtectFlags, ReadFlags, RemoveFlags,
};
use revmap_hpt::{Flavour, HpteR, HpteV, PaprError, Ptex, VcpuId, Vm, VmConfig, MAX_VCPUS};

const BOTH: [Flavour; 2] = [Flavour::Kvm, Flavour::Qemu];

fn vm(flavour: Flavour) -> Vm {
    Vm::new(VmConfig {
        ram_bytes: 64 << 20,
        hpt_order: 18,
        flavour,
        backing_page_shift: 24,
    })
    .unwrap()
}

/// One hypercall with typed arguments.
#[derive(Clone, Debug)]
enum Op {
    Enter(EnterFlags, u32, u64, u64),
    Remove(RemoveFlags, u32, u64),
    Protect(ProtectFlags, u32, u64),
    Read(ReadFlags, u32),
    ClearRef(u32),
    ClearMod(u32),
    Bulk(Vec<BulkRemoveRequest>),
}

/// A register-level result: r3 and r4..r11.
type Regs = (i64, [u64; 8]);

/// Runs `op` through the typed API and renders the result as the register level
/// would (only the registers the call defines as outputs; `None` for the others).
fn typed(vm: &Vm, cpu: VcpuId, op: &Op) -> (i64, Vec<u64>) {
    fn code<T>(r: &Result<T, PaprError>) -> i64 {
        r.as_ref().err().map_or(H_SUCCESS, |e| e.code())
    }
    match op {
        Op::Enter(f, p, v, r) => {
            let x = vm.h_enter(cpu, *f, Ptex(*p), HpteV(*v), HpteR(*r));
            (
                code(&x),
                x.map(|p| vec![u64::from(p.0)]).unwrap_or_default(),
            )
        }
        Op::Remove(f, p, a) => {
            let x = vm.h_remove(cpu, *f, Ptex(*p), *a);
            (code(&x), x.map(|(v, r)| vec![v.0, r.0]).unwrap_or_default())
        }
        Op::Protect(f, p, a) => (code(&vm.h_protect(cpu, *f, Ptex(*p), *a)), vec![]),
        Op::Read(f, p) => {
            let x = vm.h_read(cpu, *f, Ptex(*p));
            let outs = x
                .map(|e| e.as_slice().iter().flat_map(|(v, r)| [v.0, r.0]).collect())
                .unwrap_or_default();
            (code(&x), outs)
        }
        Op::ClearRef(p) => {
            let x = vm.h_clear_ref(cpu, Ptex(*p));
            (code(&x), x.map(|r| vec![r.0]).unwrap_or_default())
        }
        Op::ClearMod(p) => {
            let x = vm.h_clear_mod(cpu, Ptex(*p));
            (code(&x), x.map(|r| vec![r.0]).unwrap_or_default())
        }
        Op::Bulk(q) => {
            let x = vm.h_bulk_remove(cpu, q);
            let outs = x
                .map(|b| b.responses().iter().map(|w| w.0).collect())
                .unwrap_or_default();
            (code(&x), outs)
        }
    }
}

/// Runs `op` through the register API; returns r3, the registers the typed API
/// reports on success, and the whole block.
fn raw(vm: &Vm, cpu: usize, op: &Op) -> ((i64, Vec<u64>), Regs) {
    let r = match op {
        Op::Enter(f, p, v, r) => vm.hcall(cpu, H_ENTER, &[f.bits(), u64::from(*p), *v, *r]),
        Op::Remove(f, p, a) => vm.hcall(cpu, H_REMOVE, &[f.bits(), u64::from(*p), *a]),
        Op::Protect(f, p, a) => vm.hcall(cpu, H_PROTECT, &[f.bits(), u64::from(*p), *a]),
        Op::Read(f, p) => vm.hcall(cpu, H_READ, &[f.bits(), u64::from(*p)]),
        Op::ClearRef(p) => vm.hcall(cpu, H_CLEAR_REF, &[0, u64::from(*p)]),
        Op::ClearMod(p) => vm.hcall(cpu, H_CLEAR_MOD, &[0, u64::from(*p)]),
        Op::Bulk(q) => {
            let mut a = [0u64; 8];
            if q.len() < 4 {
                a[2 * q.len()] = BulkTsh::END;
            }
            for (i, x) in q.iter().enumerate() {
                a[2 * i] = x.tsh().0;
                a[2 * i + 1] = x.avpn;
            }
            vm.hcall(cpu, H_BULK_REMOVE, &a)
        }
    };
    let n = match op {
        _ if r.ret != H_SUCCESS => 0,
        Op::Enter(..) | Op::ClearRef(_) | Op::ClearMod(_) => 1,
        Op::Remove(..) => 2,
        Op::Protect(..) => 0,
        Op::Read(f, _) if f.contains(ReadFlags::READ_4) => 8,
        Op::Read(..) => 2,
        Op::Bulk(q) => q.len(),
    };
    let outs = if let Op::Bulk(_) = op {
        (0..n).map(|i| r.out[2 * i]).collect()
    } else {
        r.out[..n].to_vec()
    };
    ((r.ret, outs), (r.ret, r.out))
}

/// Every entry of the table as H_READ_4 returns it.
fn table(vm: &Vm) -> Vec<u64> {
    let n = 1u64 << (vm.hpt_order() - 4);
    (0..n)
        .step_by(4)
        .flat_map(|p| vm.hcall(0, H_READ, &[H_READ_4, p]).out)
        .collect()
}

fn op() -> impl Strategy<Value = Op> {
    // Eight PTEGs plus indices at and past the end of an order-18 table (16384 HPTEs).
    let ptex = prop_oneof![8 => 0u32..64, 1 => Just(16383u32), 1 => 16384u32..20000];
    let tag = 0u64..4;
    let v = (tag.clone(), any::<bool>())
        .prop_map(|(t, valid)| 0x4000_0000_0000_0000 | (t << 7) | u64::from(valid));
    // RAM (4K pages of the first 64 MiB, M bit, any R/C) or MMIO beyond RAM (I|G).
    let r = prop_oneof![
        (0u64..16, 0u64..4, 0u64..4).prop_map(|(pg, pp, rc)| (pg << 12) | (rc << 7) | 0x10 | pp),
        (0u64..4).prop_map(|pg| (1 << 40) | (pg << 12) | 0x28),
    ];
    let avpn = (tag.clone(), any::<bool>()).prop_map(|(t, and)| {
        if and {
            1
        } else {
            0x4000_0000_0000_0000 | (t << 7)
        }
    });
    let remove_flags = prop_oneof![
        Just(RemoveFlags::empty()),
        Just(RemoveFlags::AVPN),
        Just(RemoveFlags::ANDCOND)
    ];
    let bulk = prop::collection::vec(
        (
            ptex.clone(),
            prop_oneof![
                Just(BulkMatch::Absolute),
                Just(BulkMatch::Avpn),
                Just(BulkMatch::AndCond)
            ],
            avpn.clone(),
        )
            .prop_map(|(p, m, a)| BulkRemoveRequest {
                ptex: Ptex(p),
                matching: m,
                avpn: a,
            }),
        0..=4,
    );
    prop_oneof![
        4 => (any::<bool>(), ptex.clone(), v, r).prop_map(|(e, p, v, r)| {
            let f = if e { EnterFlags::EXACT } else { EnterFlags::empty() };
            Op::Enter(f, p, v, r)
        }),
        2 => (remove_flags, ptex.clone(), avpn.clone()).prop_map(|(f, p, a)| Op::Remove(f, p, a)),
        2 => (0u64..8, any::<bool>(), ptex.clone(), avpn).prop_map(|(pp, m, p, a)| {
            let mut f = ProtectFlags::from_bits_retain(pp & 7);
            f.set(ProtectFlags::AVPN, m);
            Op::Protect(f, p, a)
        }),
        2 => (any::<bool>(), ptex.clone()).prop_map(|(four, p)| {
            Op::Read(if four { ReadFlags::READ_4 } else { ReadFlags::empty() }, p)
        }),
        2 => ptex.clone().prop_map(Op::ClearRef),
        2 => ptex.prop_map(Op::ClearMod),
        2 => bulk.prop_map(Op::Bulk),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random call sequences give the same results and the same table through both APIs.
    #[test]
    fn typed_and_register_apis_agree(ops in prop::collection::vec(op(), 1..60), kvm in any::<bool>()) {
        let f = if kvm { Flavour::Kvm } else { Flavour::Qemu };
        let (a, b) = (vm(f), vm(f));
        let cpu = VcpuId::new(3).unwrap();
        for (i, op) in ops.iter().enumerate() {
            let t = typed(&a, cpu, op);
            let (r, _) = raw(&b, 3, op);
            prop_assert_eq!(&t, &r, "call {} {:?} ({})", i, op, f);
        }
        prop_assert_eq!(table(&a), table(&b));
        a.check_invariants().unwrap();
        b.check_invariants().unwrap();
    }
}

#[test]
fn each_hypercall_agrees_on_success_and_failure() {
    for f in BOTH {
        let (a, b) = (vm(f), vm(f));
        let cpu = VcpuId::ZERO;
        let v = 0x4000_0000_0000_0001;
        let ops = [
            Op::Enter(EnterFlags::empty(), 8, v, 0x3000 | 0x12),
            Op::Enter(EnterFlags::EXACT, 9, v | 0x80, 0x4000 | 0x192), // R and C set
            Op::Enter(EnterFlags::EXACT, 9, v, 0x5000 | 0x12),         // taken: PTEG full
            Op::Enter(EnterFlags::empty(), 1 << 20, v, 0x12),          // out of range
            Op::Read(ReadFlags::empty(), 8),
            Op::Read(ReadFlags::READ_4, 9),
            Op::Read(ReadFlags::empty(), 1 << 20),
            Op::Protect(ProtectFlags::PP2 | ProtectFlags::N, 8, 0),
            Op::Protect(ProtectFlags::AVPN, 8, 0x1234_0000), // mismatch
            Op::ClearRef(8),
            Op::ClearMod(9),
            Op::ClearRef(12), // free: not found (KVM), H_FUNCTION (QEMU)
            Op::Remove(RemoveFlags::AVPN, 8, v & !0x7f),
            Op::Remove(RemoveFlags::empty(), 8, 0), // gone
            Op::Bulk(vec![
                BulkRemoveRequest {
                    ptex: Ptex(9),
                    matching: BulkMatch::Absolute,
                    avpn: 0,
                },
                BulkRemoveRequest {
                    ptex: Ptex(10),
                    matching: BulkMatch::Absolute,
                    avpn: 0,
                },
            ]),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for op in &ops {
            let t = typed(&a, cpu, op);
            let (r, _) = raw(&b, 0, op);
            assert_eq!(t, r, "{op:?} ({f})");
            seen.insert(t.0);
        }
        // The sequence exercised success and each failure it was written for.
        for want in [H_SUCCESS, H_PTEG_FULL, H_PARAMETER, H_NOT_FOUND] {
            assert!(seen.contains(&want), "{f}: {want} not exercised");
        }
        assert_eq!(table(&a), table(&b));
        a.check_invariants().unwrap();
    }
}

#[test]
fn bulk_remove_responses_decode() {
    let vm = vm(Flavour::Kvm);
    let cpu = VcpuId::ZERO;
    let v = HpteV(0x4000_0000_0000_0001);
    let at = vm
        .h_enter(cpu, EnterFlags::empty(), Ptex(16), v, HpteR(0x2000 | 0x12))
        .unwrap();
    let req = |p, m| BulkRemoveRequest {
        ptex: p,
        matching: m,
        avpn: 0,
    };
    let out = vm
        .h_bulk_remove(
            cpu,
            &[
                req(at, BulkMatch::Absolute),
                req(Ptex(17), BulkMatch::Absolute),
            ],
        )
        .unwrap();
    let codes: Vec<_> = out.responses().iter().map(|w| w.code()).collect();
    assert_eq!(codes, [BulkCode::Success, BulkCode::NotFound]);
    assert_eq!(out.responses()[0].ptex_index(), Some(at));
    // Five requests do not fit one call.
    let five = [req(at, BulkMatch::Absolute); 5];
    assert_eq!(vm.h_bulk_remove(cpu, &five), Err(PaprError::Parameter));
    vm.check_invariants().unwrap();
}

#[test]
fn resize_calls_without_a_resizer_are_unsupported_functions() {
    // A VM of this crate alone has no resizer (`revmap-resize` installs one): both
    // calls answer H_FUNCTION through both APIs, and the table stays as it was.
    for f in BOTH {
        let vm = vm(f);
        assert!(vm.resizer().is_none());
        assert_eq!(vm.h_resize_hpt_prepare(19), Err(PaprError::Function));
        assert_eq!(vm.h_resize_hpt_commit(19), Err(PaprError::Function));
        assert_eq!(vm.hcall(0, H_RESIZE_HPT_PREPARE, &[0, 19]).ret, H_FUNCTION);
        assert_eq!(vm.hcall(0, H_RESIZE_HPT_COMMIT, &[0, 19]).ret, H_FUNCTION);
        assert_eq!(vm.hpt_order(), 18);
    }
}

#[test]
fn vcpu_ids_past_the_supported_count_are_errors_not_aliases() {
    assert!(VcpuId::new(MAX_VCPUS - 1).is_ok());
    let e = VcpuId::new(MAX_VCPUS).unwrap_err();
    assert_eq!((e.id, e.max), (MAX_VCPUS as u64, MAX_VCPUS));
    let vm = vm(Flavour::Kvm);
    let args = [0, 0, 0x4000_0000_0000_0001, 0x1000 | 0x12];
    // Past the end: H_PARAMETER with the registers untouched, and nothing entered
    // (before, id 64 silently ran as vCPU 0).
    for id in [MAX_VCPUS, MAX_VCPUS + 1, usize::MAX] {
        let r = vm.hcall(id, H_ENTER, &args);
        assert_eq!(r.ret, H_PARAMETER, "vcpu {id}");
        assert_eq!(&r.out[..4], &args[..]);
    }
    assert_eq!(vm.hcall(0, H_READ, &[0, 0]).out[0], 0, "no entry was made");
    // The last valid id works.
    assert_eq!(vm.hcall(MAX_VCPUS - 1, H_ENTER, &args).ret, H_SUCCESS);
    vm.check_invariants().unwrap();
}
