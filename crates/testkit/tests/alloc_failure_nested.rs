//! Allocation failure everywhere in a representative run of the nested-guest MMU
//! (`revmap_nested::NestedVm`): VM creation with its L1 memory and memslot; L1 writing
//! its partition table and two L2 radix trees (64 KiB leaves and a 2 MiB leaf);
//! H_ENTER_NESTED with nested faults at every level (64 KiB and 2 MiB shadow leaves, a
//! shared L1 page giving two-entry nested rmap lists), SET_RC and PROTFAULT exits;
//! H_TLB_INVALIDATE of a page, of an LPID and of everything; L2 destroy (directly and by
//! L1's PATE clear + RIC 2 flush) and re-creation; host reclaim (unmap) and aging; dirty
//! logging switched on, stores, the dirty log; memslot deletion.
//!
//! For every k the k-th allocation fails. The failure must surface as a clean error of
//! the call that allocated (`H_NO_MEM` from a hypercall, `NestedVmError::is_no_memory`
//! otherwise: any other outcome panics the step), `NestedVm::check` must pass after it,
//! and the run must continue (`revmap_testkit::failalloc` has the contract).

use revmap_host::{HostMmu, MemslotFlags};
use revmap_nested::hcall::{TlbieInstr, TlbieRb, H_NO_MEM, H_SUCCESS};
use revmap_nested::radix::{Access, Dsisr, PageSize, PateDw0, RadixPde, RadixPte};
use revmap_nested::vm::{L2Result, NestedVm, NestedVmConfig, NestedVmError, L1_RAM_HVA};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_testkit::failalloc::{self, FailingAlloc, FaultRun};

#[global_allocator]
static ALLOC: FailingAlloc = FailingAlloc;

/// L1 RAM: 64 MiB in 2 MiB host pages (so L0's leaves for L1 are 2 MiB until dirty
/// logging is switched on).
const L1_BYTES: u64 = 64 << 20;
/// L1's partition table at 64 KiB, PATS 4.
const PTCR: u64 = 0x1_0000 | 4;
const PATB: u64 = 0x1_0000;
/// The L1 pages the L2s' 64 KiB leaves map, and the 2 MiB one their 2 MiB leaf maps.
const DATA: u64 = 0x100_0000;
const DATA_2M: u64 = 0x200_0000;
const K64: u64 = 0x1_0000;
const M2: u64 = 0x20_0000;
/// 64 KiB L2 pages 0..PAGES map DATA + k * 64 KiB with every permission, R and C.
const PAGES: u64 = 6;
/// L2 page whose L1 leaf lacks C (a store exits to L1 with SET_RC).
const NO_C: u64 = PAGES;
/// L2 page whose L1 leaf is read-only (a store exits to L1 with PROTFAULT).
const READ_ONLY: u64 = PAGES + 1;
/// L2 addresses of the 2 MiB leaf (PMD entry 1).
const BIG: u64 = M2;
const FULL: u64 =
    RadixPte::R | RadixPte::C | RadixPte::EAA_READ | RadixPte::EAA_RW | RadixPte::EAA_X;
const LPIDS: [u64; 2] = [1, 2];

/// Root, PUD, PMD and PTE table of `lpid`'s tree in L1 memory (64K geometry).
fn tree(lpid: u64) -> [u64; 4] {
    let root = 0x10_0000 * (lpid + 1);
    [root, root + 0x2_0000, root + 0x3_0000, root + 0x4_0000]
}

fn no_mem(what: &str) -> Result<(), String> {
    Err(format!("{what}: H_NO_MEM"))
}

fn vm_err(what: &str, e: NestedVmError) -> Result<(), String> {
    if e.is_no_memory() {
        Err(format!("{what}: {e}"))
    } else {
        panic!("{what}: not a clean allocation failure: {e}")
    }
}

fn store(vm: &NestedVm, gpa: u64, val: u64) -> Result<(), String> {
    vm.l1_store(gpa, val).or_else(|e| vm_err("l1_store", e))
}

/// L1's partition-table entry for `lpid`.
fn pate(vm: &NestedVm, lpid: u64, on: bool) -> Result<(), String> {
    let dw0 = if on {
        PateDw0::radix52(tree(lpid)[0], 13).bits()
    } else {
        0
    };
    store(vm, PATB + 16 * lpid, dw0)
}

/// L1 writes `lpid`'s tree: the PATE, the directory chain, 64 KiB leaves in PMD entry 0
/// and a 2 MiB leaf in PMD entry 1.
fn l1_tree(vm: &NestedVm, lpid: u64) -> Result<(), String> {
    let [root, pud, pmd, pte] = tree(lpid);
    pate(vm, lpid, true)?;
    store(vm, root, RadixPde::new(pud, 9).bits())?;
    store(vm, pud, RadixPde::new(pmd, 9).bits())?;
    store(vm, pmd, RadixPde::new(pte, 5).bits())?;
    store(vm, pmd + 8, RadixPte::new(DATA_2M, FULL).bits())?;
    for k in 0..PAGES {
        store(vm, pte + 8 * k, RadixPte::new(DATA + k * K64, FULL).bits())?;
    }
    let no_c = FULL & !RadixPte::C;
    store(
        vm,
        pte + 8 * NO_C,
        RadixPte::new(DATA + NO_C * K64, no_c).bits(),
    )?;
    let ro = RadixPte::R | RadixPte::C | RadixPte::EAA_READ;
    store(
        vm,
        pte + 8 * READ_ONLY,
        RadixPte::new(DATA + READ_ONLY * K64, ro).bits(),
    )
}

/// One L2 access that must complete at L1 address `l1gpa` (or fail with H_NO_MEM).
fn access(vm: &NestedVm, lpid: u64, n: u64, acc: Access, l1gpa: u64) -> Result<(), String> {
    match vm.enter_nested(lpid, n, acc) {
        L2Result::Ok { l1gpa: got, .. } if got == l1gpa => Ok(()),
        L2Result::Ret(H_NO_MEM) => no_mem("H_ENTER_NESTED"),
        r => panic!("L2 {lpid} {acc:?} at {n:#x}: {r:?}, want L1 {l1gpa:#x}"),
    }
}

/// One L2 store that must exit to L1 with HDSISR bit `cause` (or fail with H_NO_MEM).
fn store_exits(vm: &NestedVm, lpid: u64, n: u64, cause: u64) -> Result<(), String> {
    match vm.enter_nested(lpid, n, Access::Store) {
        L2Result::Hdsi { cause: c, .. } if c & cause != 0 => Ok(()),
        L2Result::Ret(H_NO_MEM) => no_mem("H_ENTER_NESTED"),
        r => panic!("L2 {lpid} store at {n:#x}: {r:?}, want an HDSI with {cause:#x}"),
    }
}

/// Every 64 KiB page and two addresses of the 2 MiB leaf of `lpid`.
fn touch(vm: &NestedVm, lpid: u64, acc: Access) -> Result<(), String> {
    for k in 0..PAGES {
        access(vm, lpid, k * K64 + 8, acc, DATA + k * K64 + 8)?;
    }
    access(vm, lpid, BIG + 0x1_2340, acc, DATA_2M + 0x1_2340)?;
    access(vm, lpid, BIG + M2 - 8, acc, DATA_2M + M2 - 8)
}

fn tlb(vm: &NestedVm, ric: u8, rs: u64, rb: u64) -> Result<(), String> {
    let instr = TlbieInstr::encode(ric, false, true).0;
    match vm.h_tlb_invalidate(instr, rs, rb) {
        H_SUCCESS => Ok(()),
        H_NO_MEM => no_mem("H_TLB_INVALIDATE"),
        r => panic!("H_TLB_INVALIDATE({ric}, {rs}, {rb:#x}) returned {r}"),
    }
}

/// The host reclaims L1 memory [`gpa`, `gpa + len`) and pages it back in.
fn reclaim(vm: &NestedVm, gpa: u64, len: u64) {
    let (a, b) = (Hva(L1_RAM_HVA + gpa), Hva(L1_RAM_HVA + gpa + len));
    vm.invalidate_range_start(a, b);
    vm.unmap_hva_range(a, b);
    vm.invalidate_range_end(a, b);
    vm.host_page_in(a, b);
}

struct NestedRun;

impl FaultRun for NestedRun {
    type State = NestedVm;

    fn setup(&self) -> Result<NestedVm, String> {
        let mut cfg = NestedVmConfig::new(L1_BYTES, 21);
        cfg.dirty_logging = false;
        NestedVm::new(cfg).map_err(|e| e.to_string())
    }

    fn steps(&self) -> &'static [&'static str] {
        &[
            "l1_tables",
            "enter_nested_l2a",
            "enter_nested_l2b",
            "set_rc_and_protfault",
            "tlb_invalidate_page",
            "tlb_invalidate_lpid",
            "tlb_invalidate_all",
            "refault",
            "destroy_l2",
            "recreate_l2",
            "l1_destroys_l2",
            "l1_recreates_l2",
            "age",
            "host_unmap",
            "dirty_logging_on",
            "store_logged",
            "get_dirty_log",
            "delete_memslot",
        ]
    }

    fn step(&self, vm: &mut NestedVm, i: usize) -> Result<(), String> {
        let [a, b] = LPIDS;
        let rb_page = |n: u64, size: PageSize| n | (u64::from(size.ap()) << 5);
        match i {
            0 => {
                if vm.h_set_partition_table(PTCR) != H_SUCCESS {
                    panic!("H_SET_PARTITION_TABLE refused");
                }
                LPIDS.iter().try_for_each(|&l| l1_tree(vm, l))
            }
            // L2 a: created on first entry; 64 KiB shadow leaves over 2 MiB L0 leaves,
            // a 2 MiB shadow leaf; loads then stores.
            1 => {
                touch(vm, a, Access::Load)?;
                touch(vm, a, Access::Store)
            }
            // L2 b maps the same L1 pages: two-entry nested rmap lists.
            2 => touch(vm, b, Access::Load),
            3 => {
                store_exits(vm, a, NO_C * K64, Dsisr::SET_RC)?;
                store_exits(vm, a, READ_ONLY * K64, Dsisr::PROTFAULT)
            }
            4 => {
                tlb(vm, 0, a, rb_page(K64, PageSize::P64K))?;
                tlb(vm, 0, a, rb_page(BIG, PageSize::P2M))
            }
            5 => tlb(vm, 0, b, TlbieRb::INVAL_SET_LPID),
            6 => tlb(vm, 0, 0, TlbieRb::IS),
            7 => {
                touch(vm, a, Access::Store)?;
                touch(vm, b, Access::Load)
            }
            8 => {
                vm.destroy_l2(a as u16);
                Ok(())
            }
            9 => touch(vm, a, Access::Load),
            10 => {
                pate(vm, b, false)?;
                tlb(vm, 2, b, TlbieRb::INVAL_SET_LPID)
            }
            11 => {
                pate(vm, b, true)?;
                touch(vm, b, Access::Load)
            }
            12 => {
                let (lo, hi) = (Gfn(DATA >> 12), Gfn((DATA_2M + M2) >> 12));
                vm.age_gfn(SlotId(0), lo, hi);
                if vm.test_age_gfn(SlotId(0), lo, hi) {
                    panic!("young after aging");
                }
                // The next accesses set R again (SET_RC handled by L0).
                touch(vm, a, Access::Load)
            }
            13 => {
                reclaim(vm, DATA, 2 * K64);
                reclaim(vm, DATA_2M, M2);
                touch(vm, b, Access::Load)
            }
            14 => vm
                .set_memslot_flags(SlotId(0), MemslotFlags::LOG_DIRTY_PAGES)
                .or_else(|e| vm_err("set_memslot_flags", e)),
            15 => touch(vm, a, Access::Store),
            16 => match vm.get_dirty_log(SlotId(0)) {
                Ok(bm) => {
                    if bm.iter().all(|&w| w == 0) {
                        panic!("no dirty page after stores");
                    }
                    Ok(())
                }
                Err(e) => vm_err("get_dirty_log", e),
            },
            17 => vm
                .delete_memslot(SlotId(0))
                .or_else(|e| vm_err("delete_memslot", e)),
            _ => Err(format!("no step {i}")),
        }
    }

    fn check(&self, vm: &NestedVm) -> Result<(), String> {
        vm.check().map(drop).map_err(|v| format!("{v:#?}"))
    }
}

#[test]
fn every_allocation_of_a_nested_run_can_fail() {
    let Some(rep) = failalloc::sweep_test("every_allocation_of_a_nested_run_can_fail", &NestedRun)
    else {
        return;
    };
    // Every failure is returned as an error by the call that allocated: nothing is
    // absorbed by a retry, nothing lost.
    assert_eq!(rep.absorbed, 0, "{rep:#?}");
    assert!(rep.surfaced > rep.infallible.len() as u64, "{rep:#?}");
    // The only allocations left that cannot fail are `Arc::new`s (no fallible form in
    // stable Rust) in building the VM: the slot set (its cell and its spare), the
    // fresh-frame source and the RAM memslot's data. The host layer publishes a new
    // memslot set into a recycled `Arc`, and nothing else allocates infallibly: none in
    // a nested fault, an invalidation, an L2's creation, a memslot change or a host
    // callback.
    assert!(rep.infallible.len() <= 4, "{rep:#?}");
    for site in &rep.infallible {
        assert!(
            site.contains(" in setup: "),
            "an allocation of a nested MMU path cannot fail cleanly: {site}"
        );
        assert!(site.contains("Arc"), "not an Arc::new: {site}");
    }
}
