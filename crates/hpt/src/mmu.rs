//! The "hardware": a vCPU's MMU translating effective addresses through the HPT, with a
//! small direct-mapped TLB, setting R on every access and C on stores in the real
//! HPTE's dword 1 with an atomic `fetch_or`, as the processor does.
//!
//! # Protocol
//!
//! Every access runs inside an access epoch of the VM's [`TlbDomain`](crate::tlb):
//! TLB entries are tagged with the generation they were filled in and are used only in
//! that generation; every hypervisor change to a VALID entry (H_REMOVE, H_BULK_REMOVE,
//! H_PROTECT, H_CLEAR_REF, H_CLEAR_MOD) publishes the change and then calls `tlbie`,
//! which bumps the generation and waits for accesses of older generations to finish.
//! Hence hardware R/C updates through a stale translation always complete before the
//! hypervisor reads dword 1 (KVM's "Don't lose hardware R/C bit updates in
//! H_PROTECT"), and no access uses a translation from
//! before an invalidation once the invalidation has returned.
//!
//! # Invariants
//!
//! * Only VALID entries are used for translation and only they get R/C set.
//! * An entry matches if its B, AVPN (ignoring AVPN bits inside the page for pages
//!   larger than 8 MiB), H bit (= the group being searched) and base page size (= the
//!   segment's) match.
//! * A translation never returns an address outside the entry's page.
//!
//! # Faults
//!
//! [`VcpuMmu::access`] (and [`load`](VcpuMmu::load) / [`store`](VcpuMmu::store)) is
//! what a vCPU does: translate, and on a failed translation enter the hypervisor's fault
//! path ([`Vm::page_fault`], outside the access epoch) and retry until the access
//! succeeds or the fault is MMIO, the guest's, or the MMU is not ready.

use crate::fault::FaultOutcome;
use crate::hash::{hpt_hash, primary_pteg, secondary_pteg, Segment};
use crate::hpte::{kvm_page_shifts, HpteR, HpteV};
use crate::table::HpteSlot;
use crate::vm::Vm;
use crate::HptError;
use revmap_rmap::sync::spin_loop;
use revmap_rmap::{Gpa, Ptex};

/// How many times [`VcpuMmu::access`] re-enters the fault path before giving up.
pub const MAX_FAULT_RETRIES: u32 = 100_000;

/// Final outcome of a vCPU access through [`VcpuMmu::access`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessOutcome {
    /// The access completed through this translation (R, and C for a store, set).
    Done(Translation),
    /// Emulated MMIO at this guest physical address.
    Mmio {
        /// Guest physical address accessed.
        gpa: Gpa,
    },
    /// A fault the guest must handle (DSI/ISI): no HPTE, or its permissions deny it.
    GuestFault(Fault),
    /// `mmu_ready` is clear: the vCPU must leave the guest.
    NotReady,
    /// The fault path kept racing (e.g. constant invalidation) for
    /// [`MAX_FAULT_RETRIES`] rounds.
    GaveUp(Fault),
}

/// Kind of access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Load (sets R).
    Load,
    /// Store (sets R and C; needs a writable mapping).
    Store,
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Real (host physical) address.
    pub real_addr: u64,
    /// HPTE used.
    pub ptex: Ptex,
    /// Served from the TLB.
    pub tlb_hit: bool,
}

/// Why a translation failed (handled by [`Vm::page_fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No HPTE matches: a guest page fault (DSI/ISI reflected to the guest).
    NoHpte,
    /// An ABSENT entry matches: the host must fault the page in (`kvmppc_hpte_hv_fault`).
    Absent {
        /// The entry.
        ptex: Ptex,
        /// Key 31: emulated MMIO.
        mmio: bool,
    },
    /// A store to a read-only real mapping.
    Protection {
        /// The entry.
        ptex: Ptex,
    },
}

const TLB_SIZE: usize = 64;

#[derive(Debug, Clone, Copy, Default)]
struct TlbEntry {
    valid: bool,
    gen: u64,
    /// VA >> 12 (the 4 KiB virtual page).
    vpn: u128,
    ptex: u32,
    /// Real address of the 4 KiB page.
    ra_page: u64,
    writable: bool,
    /// C is known set in the HPTE (no fetch_or needed on store).
    c_set: bool,
}

/// One vCPU's MMU: its TLB and its slot in the VM's TLB domain. Not `Sync`: owned by the
/// vCPU thread; many may run concurrently on one `&Vm`.
#[derive(Debug)]
pub struct VcpuMmu<'vm> {
    vm: &'vm Vm,
    slot: usize,
    tlb: [TlbEntry; TLB_SIZE],
}

impl Drop for VcpuMmu<'_> {
    fn drop(&mut self) {
        self.vm.tlb().unregister(self.slot);
    }
}

impl<'vm> VcpuMmu<'vm> {
    /// Attach a vCPU MMU to `vm` (at most [`MAX_VCPUS`](crate::tlb::MAX_VCPUS)).
    pub fn new(vm: &'vm Vm) -> Result<Self, HptError> {
        let slot = vm.tlb().register()?;
        Ok(Self {
            vm,
            slot,
            tlb: [TlbEntry::default(); TLB_SIZE],
        })
    }

    /// Translate `ea` in segment `seg` for `access`, updating R/C in the HPTE.
    pub fn translate(
        &mut self,
        seg: &Segment,
        ea: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let domain = self.vm.tlb();
        let gen = loop {
            let gen = domain.begin_access(self.slot);
            // A resize commit closes the gate (mmu_ready = 0) and waits for idle
            // epochs: back off so it can pivot (`resize::cell`).
            if self.vm.tables().mmu_ready() {
                break gen;
            }
            domain.end_access(self.slot);
            self.vm.wait_mmu_ready();
        };
        let r = self.translate_in(gen, seg, ea, access);
        domain.end_access(self.slot);
        r
    }

    fn translate_in(
        &mut self,
        gen: u64,
        seg: &Segment,
        ea: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let hpt = self.vm.hpt();
        let vpn = seg.va(ea) >> 12;
        let idx = ((vpn ^ (vpn >> 6)) as usize) % TLB_SIZE;
        let store = access == Access::Store;
        if let Some(e) = self.tlb.get_mut(idx) {
            if e.valid && e.gen == gen && e.vpn == vpn {
                if store {
                    if !e.writable {
                        return Err(Fault::Protection { ptex: Ptex(e.ptex) });
                    }
                    if !e.c_set {
                        if let Some(s) = hpt.slot(Ptex(e.ptex)) {
                            s.hw_set_rc(HpteR::R | HpteR::C);
                        }
                        e.c_set = true;
                    }
                }
                return Ok(Translation {
                    real_addr: e.ra_page | (ea & 0xfff),
                    ptex: Ptex(e.ptex),
                    tlb_hit: true,
                });
            }
        }
        // One pass over both groups, each entry's dword 0 read once: an entry that is
        // transiently ABSENT (H_PROTECT, H_CLEAR_MOD, a dirty scan or an unmap holding
        // it) is reported as Absent, never as "no HPTE" (the fault path then waits for
        // its lock and retries), as KVM's fault handler searches VALID|ABSENT.
        let Some((p, slot, v, r, shift)) = self.search(seg, ea, HpteV::VALID | HpteV::ABSENT)
        else {
            return Err(Fault::NoHpte);
        };
        if v & HpteV::VALID == 0 {
            return Err(Fault::Absent {
                ptex: p,
                mmio: HpteR(r).is_key31(),
            });
        }
        let writable = HpteR(r).is_writable();
        if store && !writable {
            return Err(Fault::Protection { ptex: p });
        }
        let want = if store { HpteR::R | HpteR::C } else { HpteR::R };
        let mut c_set = r & HpteR::C != 0;
        if r & want != want {
            let old = slot.hw_set_rc(want);
            c_set = store || old & HpteR::C != 0;
        }
        let page_off = ea & ((1u64 << shift) - 1);
        let ra = HpteR(r).page_addr(shift) | page_off;
        if let Some(e) = self.tlb.get_mut(idx) {
            *e = TlbEntry {
                valid: true,
                gen,
                vpn,
                ptex: p.0,
                ra_page: ra & !0xfff,
                writable,
                c_set,
            };
        }
        Ok(Translation {
            real_addr: ra,
            ptex: p,
            tlb_hit: false,
        })
    }

    /// Perform an access as a vCPU does: translate; on a fault, run the hypervisor's
    /// fault path ([`Vm::page_fault`]) and retry, until it completes or the outcome is
    /// MMIO, a guest fault or "not ready".
    pub fn access(&mut self, seg: &Segment, ea: u64, access: Access) -> AccessOutcome {
        let mut last = Fault::NoHpte;
        for _ in 0..MAX_FAULT_RETRIES {
            let f = match self.translate(seg, ea, access) {
                Ok(t) => return AccessOutcome::Done(t),
                Err(f) => f,
            };
            last = f;
            match self.vm.page_fault(self.slot, &f, access) {
                // A retry may be waiting for a host invalidation to end: a spin (and a
                // yield to the model checkers' schedulers).
                FaultOutcome::Retry => spin_loop(),
                FaultOutcome::Mmio { gpa } => {
                    let off = match f {
                        Fault::Absent { ptex, .. } | Fault::Protection { ptex } => {
                            self.page_offset(ptex, ea)
                        }
                        Fault::NoHpte => 0,
                    };
                    return AccessOutcome::Mmio {
                        gpa: Gpa(gpa.0 | off),
                    };
                }
                FaultOutcome::NoMapping => return AccessOutcome::GuestFault(f),
                FaultOutcome::NotReady => return AccessOutcome::NotReady,
            }
        }
        AccessOutcome::GaveUp(last)
    }

    /// A load through [`access`](Self::access).
    pub fn load(&mut self, seg: &Segment, ea: u64) -> AccessOutcome {
        self.access(seg, ea, Access::Load)
    }

    /// A store through [`access`](Self::access).
    pub fn store(&mut self, seg: &Segment, ea: u64) -> AccessOutcome {
        self.access(seg, ea, Access::Store)
    }

    /// Offset of `ea` inside the page HPTE `ptex` maps (0 if it no longer decodes).
    fn page_offset(&self, ptex: Ptex, ea: u64) -> u64 {
        let hpt = self.vm.hpt();
        let Some(s) = hpt.slot(ptex) else { return 0 };
        let gr = hpt.revmap().guest_rpte(ptex.0);
        self.vm
            .entry_page(s.load_v(), gr)
            .map_or(0, |(_, shift)| ea & ((1u64 << shift) - 1))
    }

    /// Search the primary then the secondary PTEG for an entry with any bit of `state`
    /// (VALID and/or ABSENT) translating `ea`; a VALID match wins over an ABSENT one.
    fn search(
        &self,
        seg: &Segment,
        ea: u64,
        state: u64,
    ) -> Option<(Ptex, &'vm HpteSlot, u64, u64, u32)> {
        let hpt = self.vm.hpt();
        let geo = hpt.geometry();
        let hash = hpt_hash(seg, ea);
        let va = seg.va(ea);
        let want_b = seg.ssize.b_bits();
        let avpn = (((va >> 23) as u64) << HpteV::AVPN_SHIFT) & HpteV::AVPN;
        let mut absent = None;
        for (pteg, h) in [
            (primary_pteg(geo, hash), 0),
            (secondary_pteg(geo, hash), HpteV::SECONDARY),
        ] {
            let base = geo.group_base(pteg);
            for i in 0..8 {
                let p = Ptex(base.0 + i);
                let Some(slot) = hpt.slot(p) else { continue };
                let v = slot.hw_load_v();
                if v & state == 0 || v & HpteV::SECONDARY != h || v & HpteV::B != want_b {
                    continue;
                }
                let r = slot.load_r();
                let Some(sh) = kvm_page_shifts(HpteV(v), HpteR(r)) else {
                    continue;
                };
                if sh.base != seg.base_shift {
                    continue;
                }
                let ign = if sh.actual > 23 {
                    ((1u64 << (sh.actual - 23)) - 1) << HpteV::AVPN_SHIFT
                } else {
                    0
                };
                if (v & HpteV::AVPN) & !ign == avpn & !ign {
                    if v & HpteV::VALID != 0 {
                        return Some((p, slot, v, r, sh.actual));
                    }
                    absent.get_or_insert((p, slot, v, r, sh.actual));
                }
            }
        }
        absent
    }
}
