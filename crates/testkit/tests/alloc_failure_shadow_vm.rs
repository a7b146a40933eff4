//! Allocation failure through the memslot lifecycle of a [`ShadowVm`] (the host layer's
//! `kvm_set_memory_region` with the x86 hooks): creating a slot, faulting pages in
//! through it, turning dirty logging on, moving the slot to another base (x86 keeps
//! per-slot arrays sized and aligned by the base frame, so a move allocates them anew),
//! faulting at the new base, and deleting the slot. For every k the k-th allocation
//! fails; the failure must surface as a clean error with nothing changed, the MMU must
//! pass its checker, and the run must continue (`revmap_testkit::failalloc`).
//!
//! The x86 arrays of a created or moved slot are allocated by the prepare hook
//! (`MemslotArch::prepare_memory_region`, KVM's `kvm_arch_prepare_memory_region`) before
//! anything is published, so the commit hook allocates nothing. What stays infallible
//! is the `Arc::new` of a new slot's shared data (`Memslot::new`), which stable Rust
//! cannot make fallible.

use revmap_host::{Memslot, MemslotFlags};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_shadow::mmu::AccessOutcome;
use revmap_shadow::paging::{Access, CpuMode, CR0_PE};
use revmap_shadow::vm::ShadowVm;
use revmap_testkit::failalloc::{self, FailingAlloc, FaultRun};

#[global_allocator]
static ALLOC: FailingAlloc = FailingAlloc;

const SLOT: SlotId = SlotId(1);
const PAGES: u64 = 1024;
/// Where the slot moves (2 MiB aligned, as the first base; below 4 GiB, which a vCPU
/// with paging off reaches).
const MOVED: u64 = 0x8_0000;

struct VmRun;

struct State {
    vm: ShadowVm,
    cpu: usize,
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// Faults in eight pages of the slot at `base` with paging off (guest-physical =
/// guest-virtual): each must map the address itself.
fn touch(st: &State, base: u64) -> Result<(), String> {
    for i in 0..8u64 {
        let gpa = (base + i * 64) << 12;
        let acc = if i % 2 == 0 {
            Access::WRITE
        } else {
            Access::empty()
        };
        match st.vm.access(st.cpu, gpa, acc).map_err(e)? {
            AccessOutcome::Fixed(g) | AccessOutcome::Hit(g) if g.0 == gpa => {}
            other => return Err(format!("access {gpa:#x}: {other:?}")),
        }
    }
    Ok(())
}

impl FaultRun for VmRun {
    type State = State;

    fn setup(&self) -> Result<State, String> {
        let vm = ShadowVm::try_new().map_err(e)?;
        let cpu = vm.try_add_vcpu(CpuMode::new(CR0_PE, 0, 0, 0)).map_err(e)?;
        Ok(State { vm, cpu })
    }

    fn steps(&self) -> &'static [&'static str] {
        &[
            "create_memslot",
            "faults",
            "dirty_logging_on",
            "move_memslot",
            "faults_at_new_base",
            "delete_memslot",
        ]
    }

    fn step(&self, st: &mut State, i: usize) -> Result<(), String> {
        match i {
            0 => {
                let hva = Hva(0x7f00_0000_0000);
                let s =
                    Memslot::new(SLOT, Gfn(0), PAGES, 12, MemslotFlags::empty(), hva).map_err(e)?;
                st.vm.create_memslot(s).map_err(e)
            }
            1 => touch(st, 0),
            2 => st
                .vm
                .set_memslot_flags(SLOT, MemslotFlags::LOG_DIRTY_PAGES)
                .map_err(e),
            3 => st.vm.move_memslot(SLOT, Gfn(MOVED)).map_err(e),
            4 => touch(st, MOVED),
            5 => st.vm.delete_memslot(SLOT).map_err(e),
            _ => Err(format!("no step {i}")),
        }
    }

    fn check(&self, st: &State) -> Result<(), String> {
        st.vm.check().map(drop).map_err(e)
    }
}

#[test]
fn every_allocation_of_a_shadow_vm_memslot_lifecycle_can_fail() {
    let Some(rep) = failalloc::sweep_test(
        "every_allocation_of_a_shadow_vm_memslot_lifecycle_can_fail",
        &VmRun,
    ) else {
        return;
    };
    // The move allocates its arrays in the prepare hook: a failure there is an error
    // of `move_memslot` with the slot where it was, and the faults at the new base that
    // follow find the slot's arrays (were they allocated in the commit hook, whose
    // errors nobody can see, the failure would leave the MMU without the slot and those
    // faults would come back as MMIO).
    assert!(rep.surfaced > 2 * rep.infallible.len() as u64, "{rep:#?}");
    for site in &rep.infallible {
        assert!(
            site.contains(" in setup: ") || site.contains(" in create_memslot: "),
            "an infallible allocation on a memslot-change or fault path: {site}"
        );
        assert!(site.contains("Arc"), "not an Arc::new: {site}");
    }
}
