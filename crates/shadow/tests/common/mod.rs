//! Helpers shared by the shadow MMU's state-machine tests: the reference walker's view of
//! guest memory and the access check against it.

pub mod mem;

pub use mem::Limited;

use revmap_rmap::{Gfn, SlotId};
use revmap_shadow::mmu::{AccessOutcome, ShadowMmu};
use revmap_shadow::paging::{walk, Access, Gva, SparseMemory};

/// The access an op's `acc` byte names: read, write or fetch, user from 3 on.
pub fn access_of(a: u8) -> Access {
    let mut x = Access::empty();
    match a % 3 {
        1 => x |= Access::WRITE,
        2 => x |= Access::FETCH,
        _ => {}
    }
    if a >= 3 {
        x |= Access::USER;
    }
    x
}

/// An access by vCPU `v` re-validated as the replay rules do (INVLPG first), through
/// the shadow MMU and through the reference walker on a copy of guest memory limited to
/// `slot_pages` frames: the same address or the same #PF error code. Returns the
/// walker's memory, for comparing the A/D bits left in the guest tables.
pub fn check_access(
    m: &mut ShadowMmu,
    v: usize,
    va: u64,
    access: Access,
    slot_pages: u64,
) -> Result<SparseMemory, String> {
    m.invlpg(v, va).map_err(|e| e.to_string())?;
    let mode = m.vcpus()[v].mode;
    let mut refmem = m.mem.clone();
    let want = walk(
        &mut Limited(&mut refmem, slot_pages),
        &mode,
        Gva(va),
        access,
    )
    .map_err(|e| e.to_string())?;
    let got = match m.access(v, va, access).map_err(|e| e.to_string())? {
        AccessOutcome::Hit(g) | AccessOutcome::Fixed(g) | AccessOutcome::Mmio(g) => Ok(g),
        AccessOutcome::WriteProtected(g) => {
            m.track_write(g.0 & !7, 8).map_err(|e| e.to_string())?;
            Ok(g)
        }
        AccessOutcome::Fault(pf) => Err(pf.error_code),
        AccessOutcome::Retry => return Err("retry without an invalidation".into()),
    };
    let want = want.outcome.map(|t| t.gpa).map_err(|pf| pf.error_code);
    if got != want {
        return Err(format!(
            "{:?} access {va:#x} {access:?}: shadow {got:x?}, walker {want:x?}",
            mode.paging()
        ));
    }
    Ok(refmem)
}

/// Host reclaim of `[gfn, gfn + n)` of slot 0, rounded out to whole host pages of
/// `backing`, inside an MMU-notifier invalidation: the SPTEs go, then the pages.
pub fn host_unmap(
    m: &mut ShadowMmu,
    backing: u32,
    gfn: u64,
    n: u64,
    slot_pages: u64,
) -> Result<(), String> {
    let frames = 1u64 << (backing - 12);
    let gfn = gfn & !(frames - 1);
    let end = (gfn + n).next_multiple_of(frames).min(slot_pages);
    m.invalidate.begin();
    m.unmap_gfn_range(SlotId(0), gfn, end)
        .map_err(|e| e.to_string())?;
    let slot = m.memslots().next().cloned().ok_or("no slot")?;
    for g in gfn..end {
        slot.set_host_present(Gfn(g), false);
    }
    m.invalidate.end();
    Ok(())
}

/// Ages `[gfn, gfn + n)` of slot 0; `age_gfn` must report what `test_age_gfn` saw.
pub fn age(m: &mut ShadowMmu, gfn: u64, n: u64, slot_pages: u64) -> Result<u64, String> {
    let end = (gfn + n).min(slot_pages);
    let young = m.test_age_gfn(SlotId(0), gfn, end);
    if m.age_gfn(SlotId(0), gfn, end) != young {
        return Err("age_gfn disagrees with test_age_gfn".into());
    }
    Ok(end)
}

/// Load `cr3` on vCPU `v` and check that the new root was synced: a CR3 load without
/// PCID leaves nothing unsync reachable from it.
pub fn load_cr3_synced(m: &mut ShadowMmu, v: usize, cr3: u64) -> Result<(), String> {
    m.load_cr3(v, cr3).map_err(|e| e.to_string())?;
    let (u, _) = m.unsync_reachable(v).map_err(|e| e.to_string())?;
    if u != 0 {
        return Err(format!("after a CR3 load: {u} unsync reachable"));
    }
    Ok(())
}

/// A guest TLB flush on vCPU `v`, then invariant 20: nothing reachable is unsync and no
/// cached previous root is unsync.
pub fn flush_synced(m: &mut ShadowMmu, v: usize) -> Result<(), String> {
    m.flush_tlb_guest(v).map_err(|e| e.to_string())?;
    let u = m.unsync_reachable(v).map_err(|e| e.to_string())?;
    if u != (0, 0) {
        return Err(format!("after a guest TLB flush: {u:?} unsync"));
    }
    Ok(())
}

/// Random guest-entry flags: W, U, A, D, NX and P each on or off (drawn in that order,
/// as the state machines always drew them, so persisted failure seeds still replay).
pub fn random_gpte_flags() -> impl proptest::strategy::Strategy<Value = u64> {
    use proptest::prelude::*;
    use revmap_shadow::paging::{PT64_NX, PT_ACCESSED, PT_DIRTY, PT_PRESENT, PT_USER, PT_WRITABLE};
    any::<[bool; 6]>().prop_map(|bits| {
        [
            PT_PRESENT,
            PT_WRITABLE,
            PT_USER,
            PT_ACCESSED,
            PT_DIRTY,
            PT64_NX,
        ]
        .iter()
        .zip(bits)
        .filter(|(_, on)| *on)
        .fold(0, |f, (b, _)| f | b)
    })
}
