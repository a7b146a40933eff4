//! PAPR hypercall sequences against a `revmap_hpt::Vm` built with the resize extension
//! (`revmap_resize::new_vm`), KVM or QEMU flavour, stop-the-world or pre-copy resize
//! commits, with host operations (reclaim, aging, dirty log) interleaved.
//!
//! Contract checked after every step: no panic, every return code is a PAPR code
//! (`PaprError::from_code` or H_SUCCESS), and the whole-VM invariant checker passes.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::{Flavour, PaprError, Vm, VmConfig};
use revmap_resize::{ResizeMode, ResizeVmExt};
use revmap_rmap::{Gfn, Hva, SlotId};

/// Guest RAM: 32 MiB, 8192 frames.
const RAM: u64 = 32 << 20;
/// Initial HPT order (PAPR's minimum).
const ORDER: u32 = 18;
/// At most this many steps per input (keeps an execution short).
const MAX_STEPS: usize = 256;

#[path = "../../crates/hpt/tests/common/hcalls.rs"]
mod hcalls;
use hcalls::{GuestHpte, MMU_OPS, OPS};

#[derive(Arbitrary, Debug)]
struct Input {
    qemu: bool,
    stop_the_world: bool,
    backing: u8,
    steps: Vec<Step>,
}

/// One step: a guest-like hypercall (valid-looking registers over a few PTEGs), a
/// resize call, a hostile register block, or a host operation.
#[derive(Arbitrary, Debug)]
enum Step {
    Guestish {
        vcpu: u8,
        op: u8,
        flags: u8,
        ptex: u8,
        tag: u8,
        lp: u8,
        gfn: u16,
        rbits: u8,
        vbits: u8,
        avpn_raw: bool,
    },
    Bulk {
        vcpu: u8,
        ptex: u8,
        kinds: [u8; 4],
        tags: [u8; 4],
    },
    Prepare {
        flags: u8,
        /// 0 cancels; else an order around the current one.
        shift: u8,
        wait: bool,
    },
    Commit {
        flags: u8,
        shift: u8,
    },
    Raw {
        vcpu: u8,
        opcode: u64,
        regs: [u64; 8],
    },
    HostUnmap {
        gfn: u16,
        n: u16,
    },
    HostAge {
        gfn: u16,
        n: u16,
        test_only: bool,
    },
    DirtyLog,
}

fn flags_of(sel: u8) -> u64 {
    match sel % 8 {
        0 | 1 => 0,
        2 => H_EXACT,
        3 => H_AVPN,
        4 => H_ANDCOND,
        5 => H_READ_4,
        6 => u64::from(sel) << 2,
        _ => u64::from(sel).rotate_right(11),
    }
}

fn shift_of(sel: u8) -> u64 {
    match sel % 8 {
        0 => 0,
        1..=5 => 16 + u64::from(sel % 8), // 17..=21
        6 => u64::from(sel),
        _ => 46,
    }
}

fn regs_of(step: &Step) -> Option<(usize, u64, [u64; 8])> {
    let mut a = [0u64; 8];
    match *step {
        Step::Guestish {
            vcpu,
            op,
            flags,
            ptex,
            tag,
            lp,
            gfn,
            rbits,
            vbits,
            avpn_raw,
        } => {
            let op = MMU_OPS[usize::from(op) % MMU_OPS.len()];
            let tag = u64::from(tag % 4);
            let (l, lpbits) = [
                (0u64, 0u64),
                (HpteV::LARGE, 0x1000),
                (HpteV::LARGE, 0),
                (HpteV::LARGE, 0x7000),
            ][usize::from(lp % 4)];
            let gfn = match gfn >> 14 {
                0 | 1 => u64::from(gfn % 16),
                2 => u64::from(gfn & 0x3fff),
                _ => u64::from(gfn) << 16,
            };
            let rbits = match rbits % 4 {
                0 | 1 => HpteR::M | HpteR::R | 2,
                2 => HpteR::I | HpteR::G,
                _ => u64::from(rbits) << 1 & 0x1ff,
            };
            let vbits = match vbits % 4 {
                0 | 1 => HpteV::VALID,
                2 => HpteV::VALID | HpteV::BOLTED,
                _ => u64::from(vbits) & 0x7f,
            };
            let ptex = if ptex >= 0xf0 {
                u64::from(ptex) << 24
            } else {
                u64::from(ptex % 48)
            };
            let hpte = GuestHpte {
                tag,
                l,
                lpbits,
                gfn,
                rbits,
                vbits,
            };
            a[0] = flags_of(flags);
            a[1] = ptex;
            a[2] = if op == H_ENTER || avpn_raw {
                hpte.pteh()
            } else {
                hpte.avpn()
            };
            a[3] = hpte.ptel();
            Some((usize::from(vcpu % 3), op, a))
        }
        Step::Bulk {
            vcpu,
            ptex,
            kinds,
            tags,
        } => {
            for i in 0..4 {
                let ty = [
                    0x4000_0000_0000_0000u64,
                    0xC000_0000_0000_0000,
                    0,
                    0x4200_0000_0000_0000,
                    0x8000_0000_0000_0000,
                ][usize::from(kinds[i] % 5)];
                a[2 * i] = ty | ((u64::from(ptex) + i as u64) % 48);
                a[2 * i + 1] = u64::from(tags[i] % 4) << 7;
            }
            Some((usize::from(vcpu % 3), H_BULK_REMOVE, a))
        }
        Step::Prepare { flags, shift, .. } => {
            a[0] = if flags < 0xf0 { 0 } else { u64::from(flags) };
            a[1] = shift_of(shift);
            Some((0, H_RESIZE_HPT_PREPARE, a))
        }
        Step::Commit { flags, shift } => {
            a[0] = if flags < 0xf0 { 0 } else { u64::from(flags) };
            a[1] = shift_of(shift);
            Some((0, H_RESIZE_HPT_COMMIT, a))
        }
        Step::Raw { vcpu, opcode, regs } => {
            // Mostly real opcodes with hostile registers, sometimes any opcode.
            let opcode = if opcode >> 60 == 0xf {
                opcode
            } else {
                OPS[(opcode % OPS.len() as u64) as usize]
            };
            Some((usize::from(vcpu), opcode, regs))
        }
        _ => None,
    }
}

fn check(vm: &Vm, i: usize, step: &Step) {
    if let Err(v) = vm.check_invariants() {
        panic!("step {i} {step:?}: invariant violation: {v}");
    }
}

fuzz_target!(|input: Input| {
    let threads = revmap_fuzz::thread_count();
    let cfg = VmConfig {
        ram_bytes: RAM,
        hpt_order: ORDER,
        flavour: if input.qemu {
            Flavour::Qemu
        } else {
            Flavour::Kvm
        },
        backing_page_shift: [12, 16, 24][usize::from(input.backing % 3)],
    };
    let vm = revmap_resize::new_vm(cfg).expect("a valid configuration");
    let ctl = vm.resize_ctl().expect("resizer installed");
    if input.stop_the_world {
        ctl.set_mode(ResizeMode::StopTheWorld);
    }
    let slot_pages = RAM >> 12;
    for (i, step) in input.steps.iter().take(MAX_STEPS).enumerate() {
        if let Some((vcpu, opcode, regs)) = regs_of(step) {
            let r = vm.hcall(vcpu, opcode, &regs);
            assert!(
                r.ret == H_SUCCESS || PaprError::from_code(r.ret).is_some(),
                "step {i} {step:?}: return code {} is not a PAPR code",
                r.ret
            );
            if let Step::Prepare { wait: true, .. } = step {
                // Let the preparation finish so the next PREPARE/COMMIT sees Ready.
                ctl.wait_prepared();
            }
        } else {
            match *step {
                Step::HostUnmap { gfn, n } => {
                    let start = u64::from(gfn) % slot_pages;
                    let end = (start + u64::from(n % 1024) + 1).min(slot_pages);
                    let (a, b) = (
                        Hva(revmap_hpt::vm::RAM_HVA_BASE + (start << 12)),
                        Hva(revmap_hpt::vm::RAM_HVA_BASE + (end << 12)),
                    );
                    vm.invalidate_range_start(a, b);
                    vm.unmap_hva_range(a, b);
                    vm.invalidate_range_end(a, b);
                    vm.host_page_in(a, b);
                }
                Step::HostAge { gfn, n, test_only } => {
                    let start = u64::from(gfn) % slot_pages;
                    let end = (start + u64::from(n % 1024) + 1).min(slot_pages);
                    if test_only {
                        vm.test_age_gfn(SlotId(0), Gfn(start), Gfn(end));
                    } else {
                        vm.age_gfn(SlotId(0), Gfn(start), Gfn(end));
                    }
                }
                Step::DirtyLog => {
                    if let Err(e) = vm.get_dirty_log(SlotId(0)) {
                        panic!("step {i}: dirty log of the RAM slot failed: {e}");
                    }
                }
                _ => {}
            }
        }
        check(&vm, i, step);
    }
    // Leave no preparation worker behind for the next input.
    ctl.wait_workers();
    drop(vm);
    revmap_fuzz::wait_threads_at_most(threads);
});
