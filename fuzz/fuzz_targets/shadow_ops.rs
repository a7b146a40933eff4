//! x86 shadow-MMU operation sequences through `revmap_shadow::ShadowVm`: guest
//! page-table stores, accesses, CR3 loads, mode (CR0/CR4/EFER) changes, INVLPG, guest
//! TLB flushes, and host reclaim, page-in, aging and dirty logging through the
//! `HostMmu` interface. The shapes follow `crates/shadow/tests/shadow_props.rs`, with
//! hostile variants (any store, any address, any CR3, any mode bits).
//!
//! Contract checked after every step: no panic, the section-8 invariant checker passes;
//! every access the reference walker completes gives the walker's address or #PF error
//! code and leaves the same A/D bits in the guest tables (or a clean error when the mode
//! is not shadowed or no shadow page is free), and aging agrees with test-aging.
#![no_main]

#[path = "../../crates/shadow/tests/common/mem.rs"]
mod mem;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mem::{slot0, Limited, HVA};
use revmap_host::{HostMmu, MemslotFlags};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_shadow::mmu::{AccessOutcome, ShadowError};
use revmap_shadow::paging::{
    walk, Access, CpuMode, Gpa, GuestPhysMemory, Gva, CR0_WP, CR4_LA57, CR4_PKE, CR4_PSE, CR4_SMAP,
    CR4_SMEP, EFER_NXE, PT64_NX, PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE, PT_PRESENT, PT_USER,
    PT_WRITABLE,
};
use revmap_shadow::vm::ShadowVm;

const SLOT_PAGES: u64 = 4096;
const TABLES: u64 = 12; // guest tables live in frames 1..=TABLES
const IDX: u64 = 3; // entries 0..IDX of each table are used
const MAX_STEPS: usize = 160;

#[derive(Arbitrary, Debug)]
struct Input {
    huge_backing: bool,
    max_pages: Option<u8>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Store {
        table: u8,
        idx: u8,
        flags: u8,
        target: u8,
    },
    StoreAny {
        gpa: u32,
        val: u64,
    },
    Access {
        cpu: bool,
        va: Va,
        acc: u8,
    },
    Cr3 {
        cpu: bool,
        table: u8,
    },
    Cr3Any {
        cpu: bool,
        cr3: u64,
    },
    Invlpg {
        cpu: bool,
        va: Va,
    },
    Flush {
        cpu: bool,
    },
    Mode {
        cpu: bool,
        bits: u8,
    },
    Unmap {
        gfn: u16,
        n: u16,
    },
    PageIn {
        gfn: u16,
        n: u16,
    },
    Age {
        gfn: u16,
        n: u16,
    },
    DirtyLog {
        on: bool,
        manual: bool,
    },
    GetDirty,
}

/// A guest virtual address: through the small used part of the tables, or any.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Va {
    Used([u8; 4], u16),
    Any(u64),
}

impl Va {
    fn get(self) -> u64 {
        match self {
            Va::Used(i, o) => {
                let i = i.map(|x| u64::from(x) % IDX);
                (i[0] << 39) | (i[1] << 30) | (i[2] << 21) | (i[3] << 12) | (u64::from(o) & 0xff8)
            }
            Va::Any(v) => v,
        }
    }
}

fn entry(flags: u8, target: u8) -> u64 {
    let f = if flags & 0xc0 != 0 {
        PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY
    } else {
        let bit = |b: u8, v: u64| if flags & (1 << b) != 0 { v } else { 0 };
        bit(0, PT_PRESENT)
            | bit(1, PT_WRITABLE)
            | bit(2, PT_USER)
            | bit(3, PT_ACCESSED)
            | bit(4, PT_DIRTY)
            | bit(5, PT64_NX)
    };
    let t = match target % 8 {
        0..=3 => (1 + u64::from(target) % TABLES) << 12,
        4 | 5 => (0x100 + u64::from(target) % 0x10) << 12,
        6 => ([0x20_0000u64, 0x40_0000, 0x60_0000][usize::from(target) % 3]) | PT_PAGE_SIZE,
        _ => 0,
    };
    f | t
}

fn access_of(a: u8) -> Access {
    let mut x = Access::empty();
    match a % 3 {
        1 => x |= Access::WRITE,
        2 => x |= Access::FETCH,
        _ => {}
    }
    if a % 6 >= 3 {
        x |= Access::USER;
    }
    x
}

fn range(gfn: u16, n: u16) -> (u64, u64) {
    let start = u64::from(gfn) % SLOT_PAGES;
    (start, (start + u64::from(n % 600) + 1).min(SLOT_PAGES))
}

/// Errors a hostile but legal guest may get: no free shadow page under a tight limit
/// (every paging mode is shadowed).
fn clean(e: &ShadowError) -> bool {
    matches!(e, ShadowError::NoSpace)
}

fn step(vm: &ShadowVm, cpus: [usize; 2], op: &Op) -> Result<(), String> {
    let cpu = |c: bool| cpus[usize::from(c)];
    match *op {
        Op::Store {
            table,
            idx,
            flags,
            target,
        } => {
            let gpa = ((1 + u64::from(table) % TABLES) << 12) + (u64::from(idx) % IDX) * 8;
            vm.guest_store(gpa, entry(flags, target))
                .map_err(|e| e.to_string())?;
        }
        Op::StoreAny { gpa, val } => {
            // Out of the slot or misaligned: an error, never a panic.
            let _ = vm.guest_store(u64::from(gpa) & !7, val);
        }
        Op::Access { cpu: c, va, acc } => {
            let (v, va, access) = (cpu(c), va.get(), access_of(acc));
            if let Err(e) = vm.with_mmu(|m| m.invlpg(v, va)) {
                return if clean(&e) {
                    Ok(())
                } else {
                    Err(format!("invlpg: {e}"))
                };
            }
            let (mode, mut refmem) = vm.with_mmu_read(|m| (m.vcpus()[v].mode, m.mem.clone()));
            let want = walk(
                &mut Limited(&mut refmem, SLOT_PAGES),
                &mode,
                Gva(va),
                access,
            );
            let got = vm.access(v, va, access);
            let got = match got {
                Ok(AccessOutcome::Hit(g) | AccessOutcome::Fixed(g) | AccessOutcome::Mmio(g)) => {
                    Ok(g)
                }
                Ok(AccessOutcome::WriteProtected(g)) => {
                    vm.with_mmu(|m| m.track_write(g.0 & !7, 8))
                        .map_err(|e| e.to_string())?;
                    Ok(g)
                }
                Ok(AccessOutcome::Fault(pf)) => Err(pf.error_code),
                Ok(AccessOutcome::Retry) => return Err("retry out of ShadowVm::access".into()),
                Err(e) if clean(&e) => return Ok(()),
                Err(e) => {
                    return match want {
                        // The walker could not read guest memory either.
                        Err(_) => Ok(()),
                        Ok(w) => Err(format!("access {va:#x}: {e}; walker {:x?}", w.outcome)),
                    };
                }
            };
            let Ok(want) = want else {
                return Ok(());
            };
            let want = want.outcome.map(|t| t.gpa).map_err(|pf| pf.error_code);
            if got != want {
                return Err(format!(
                    "access {va:#x} {access:?}: shadow {got:x?}, walker {want:x?}"
                ));
            }
            let mem = vm.with_mmu_read(|m| m.mem.clone());
            for t in 1..=TABLES {
                for i in 0..IDX {
                    let g = Gpa((t << 12) + i * 8);
                    let (a, b) = (
                        mem.read_u64(g).unwrap_or(0),
                        refmem.read_u64(g).unwrap_or(0),
                    );
                    if a != b {
                        return Err(format!("entry {:#x}: shadow {a:#x}, walker {b:#x}", g.0));
                    }
                }
            }
        }
        Op::Cr3 { cpu: c, table } => {
            let v = cpu(c);
            let cr3 = (1 + u64::from(table) % 4) << 12;
            vm.with_mmu(|m| -> Result<(), String> {
                match m.load_cr3(v, cr3) {
                    // Every shadow page pinned as a root under a tight limit.
                    Err(e) if clean(&e) => return Ok(()),
                    r => r.map_err(|e| e.to_string())?,
                }
                let (u, _) = m.unsync_reachable(v).map_err(|e| e.to_string())?;
                if u != 0 {
                    return Err(format!("after a CR3 load: {u} unsync reachable"));
                }
                Ok(())
            })?;
        }
        Op::Cr3Any { cpu: c, cr3 } => {
            let _ = vm.with_mmu(|m| m.load_cr3(cpu(c), cr3));
        }
        Op::Invlpg { cpu: c, va } => {
            if let Err(e) = vm.with_mmu(|m| m.invlpg(cpu(c), va.get())) {
                if !clean(&e) {
                    return Err(e.to_string());
                }
            }
        }
        Op::Flush { cpu: c } => {
            let v = cpu(c);
            vm.with_mmu(|m| -> Result<(), String> {
                match m.flush_tlb_guest(v) {
                    Err(e) if clean(&e) => return Ok(()),
                    r => r.map_err(|e| e.to_string())?,
                }
                let u = m.unsync_reachable(v).map_err(|e| e.to_string())?;
                if u != (0, 0) {
                    return Err(format!("after a guest TLB flush: {u:?} unsync"));
                }
                Ok(())
            })?;
        }
        Op::Mode { cpu: c, bits } => {
            let v = cpu(c);
            vm.with_mmu(|m| {
                let mut mode = m.vcpus()[v].mode;
                let set = |x: u64, on: bool, b: u64| if on { x | b } else { x & !b };
                mode.cr0 = set(mode.cr0, bits & 1 != 0, CR0_WP);
                mode.efer = set(mode.efer, bits & 2 != 0, EFER_NXE);
                mode.cr4 = set(mode.cr4, bits & 4 != 0, CR4_SMEP);
                mode.cr4 = set(mode.cr4, bits & 8 != 0, CR4_SMAP);
                mode.cr4 = set(mode.cr4, bits & 16 != 0, CR4_PSE);
                mode.cr4 = set(mode.cr4, bits & 32 != 0, CR4_PKE);
                mode.cr4 = set(mode.cr4, bits & 0xc0 == 0xc0, CR4_LA57);
                let _ = m.set_mode(v, mode);
            });
        }
        Op::Unmap { gfn, n } => {
            let (s, e) = range(gfn, n);
            let (a, b) = (Hva(HVA + (s << 12)), Hva(HVA + (e << 12)));
            vm.unmap_hva_range(a, b);
        }
        Op::PageIn { gfn, n } => {
            let (s, e) = range(gfn, n);
            vm.host_page_in(Hva(HVA + (s << 12)), Hva(HVA + (e << 12)));
        }
        Op::Age { gfn, n } => {
            let (s, e) = range(gfn, n);
            let young = vm.test_age_gfn(SlotId(0), Gfn(s), Gfn(e));
            if vm.age_gfn(SlotId(0), Gfn(s), Gfn(e)) != young {
                return Err("age_gfn disagrees with test_age_gfn".into());
            }
            if vm.test_age_gfn(SlotId(0), Gfn(s), Gfn(e)) {
                return Err("still young after aging".into());
            }
        }
        Op::DirtyLog { on, manual } => {
            let mut flags = MemslotFlags::empty();
            if on {
                flags |= MemslotFlags::LOG_DIRTY_PAGES;
                if manual {
                    flags |= MemslotFlags::DIRTY_LOG_MANUAL_PROTECT;
                }
            }
            vm.set_memslot_flags(SlotId(0), flags)
                .map_err(|e| e.to_string())?;
        }
        Op::GetDirty => {
            vm.get_dirty_log(SlotId(0)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fuzz_target!(|input: Input| {
    let backing = if input.huge_backing { 21 } else { 12 };
    let vm = ShadowVm::new();
    let slot = slot0(SLOT_PAGES, backing).expect("a valid memslot");
    vm.create_memslot(slot).expect("the first memslot");
    vm.with_mmu(|m| {
        m.set_max_mmu_pages(input.max_pages.map(|n| u64::from(n).max(4)));
        // A minimal valid path for va 0: 1 -> 2 -> 3 -> 4 -> data.
        let full = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
        for (t, v) in [(1u64, 0x2000u64), (2, 0x3000), (3, 0x4000), (4, 0x10_0000)] {
            m.mem
                .write_u64(Gpa(t << 12), v | full)
                .expect("slot memory");
        }
    });
    let cpus = [
        vm.add_vcpu(CpuMode::long4(0x1000)),
        vm.add_vcpu(CpuMode::long4(0x2000)),
    ];
    for (i, op) in input.ops.iter().take(MAX_STEPS).enumerate() {
        if let Err(e) = step(&vm, cpus, op) {
            panic!("step {i} {op:?}: {e}");
        }
        if let Err(v) = vm.check() {
            panic!("step {i} {op:?}: {v}");
        }
    }
});
