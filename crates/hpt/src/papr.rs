//! The typed hypercall API: one method per PAPR HPT hypercall on [`Vm`], taking
//! newtypes ([`VcpuId`], [`Ptex`], [`HpteV`], [`HpteR`], the flag sets below) and
//! returning `Result<_, PaprError>`.
//!
//! Each method packs its arguments into the r4..r11 block, runs the same internal
//! entry as the register-level [`Vm::hcall_regs`] (gate, memslot snapshot, pre-copy
//! tracking, the one implementation of each hypercall) and decodes the outputs, so the
//! two APIs cannot disagree. The register level stays the hot path of trace replay.
//!
//! # Example
//!
//! ```
//! use revmap_hpt::papr::{EnterFlags, ReadFlags, RemoveFlags};
//! use revmap_hpt::{HpteR, HpteV, PaprError, Ptex, VcpuId, Vm, VmConfig};
//!
//! let vm = Vm::new(VmConfig { ram_bytes: 64 << 20, hpt_order: 18, ..VmConfig::default() })?;
//! let cpu = VcpuId::new(1)?;
//! // A valid 4K entry for gpa 0x1000 (M bit, PP = 2) in the PTEG of index 0.
//! let (v, r) = (HpteV(0x4000_0000_0000_0001), HpteR(0x1000 | 0x12));
//! let at = vm.h_enter(cpu, EnterFlags::empty(), Ptex(0), v, r)?;
//! let read = vm.h_read(cpu, ReadFlags::empty(), at)?;
//! assert_eq!(read.as_slice()[0].0, v);
//! // EXACT on a taken slot: PTEG full.
//! assert_eq!(vm.h_enter(cpu, EnterFlags::EXACT, at, v, r), Err(PaprError::PtegFull));
//! let (old_v, _old_r) = vm.h_remove(cpu, RemoveFlags::empty(), at, 0)?;
//! assert_eq!(old_v, v);
//! assert_eq!(vm.h_remove(cpu, RemoveFlags::empty(), at, 0), Err(PaprError::NotFound));
//! assert_eq!(PaprError::NotFound.code(), -7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::error::PaprError;
use crate::hcall::{self, BulkTsh, H_BULK_REMOVE_MAX_BATCH};
use crate::hpte::{HpteR, HpteV};
use crate::vm::Vm;
use revmap_rmap::{Ptex, VcpuId};

bitflags::bitflags! {
    /// H_ENTER flags (PAPR "H_ENTER"; `H_EXACT` and the ignored hints).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct EnterFlags: u64 {
        /// Use exactly the given slot (`H_EXACT`), else the first free one of its PTEG.
        const EXACT = hcall::H_EXACT;
        /// Legacy large-page hint (`H_LARGE_PAGE`, ignored).
        const LARGE_PAGE = hcall::H_LARGE_PAGE;
        /// Real-address translation hint (`H_R_XLATE`, ignored).
        const R_XLATE = hcall::H_R_XLATE;
        /// Local-invalidation hint (`H_LOCAL`, ignored).
        const LOCAL = hcall::H_LOCAL;
        /// Coalescing hint (`H_COALESCE_CAND`, ignored).
        const COALESCE_CAND = hcall::H_COALESCE_CAND;
    }

    /// H_REMOVE match flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RemoveFlags: u64 {
        /// Remove only if `v & !0x7f == avpn` (`H_AVPN`).
        const AVPN = hcall::H_AVPN;
        /// Remove only if `v & avpn == 0` (`H_ANDCOND`).
        const ANDCOND = hcall::H_ANDCOND;
        /// Local-invalidation hint (`H_LOCAL`, ignored).
        const LOCAL = hcall::H_LOCAL;
    }

    /// H_READ flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ReadFlags: u64 {
        /// Read the four entries of the aligned group of `ptex` (`H_READ_4`).
        const READ_4 = hcall::H_READ_4;
        /// Real-address translation hint (`H_R_XLATE`, ignored).
        const R_XLATE = hcall::H_R_XLATE;
    }

    /// H_PROTECT flags: the match condition and the new protection bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ProtectFlags: u64 {
        /// Change only if `v & !0x7f == avpn` (`H_AVPN`).
        const AVPN = hcall::H_AVPN;
        /// Local-invalidation hint (`H_LOCAL`, ignored).
        const LOCAL = hcall::H_LOCAL;
        /// New PP0 (dword 1 bit 63).
        const PP0 = HpteR::PP0 >> 55;
        /// New storage key bits 4:3 (`HPTE_R_KEY_HI`).
        const KEY_HI = HpteR::KEY_HI >> 48;
        /// New storage key bits 2:0 (`HPTE_R_KEY_LO`).
        const KEY_LO = HpteR::KEY_LO;
        /// New no-execute bit (`H_N`).
        const N = hcall::H_N;
        /// New PP bit 1 (`H_PP1`).
        const PP1 = hcall::H_PP1;
        /// New PP bit 2 (`H_PP2`).
        const PP2 = hcall::H_PP2;
    }
}

/// How an H_BULK_REMOVE request matches its entry (the TSH FLAGS field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BulkMatch {
    /// Remove whatever is there (`ABSOLUTE`).
    Absolute,
    /// Remove only if `v & avpn == 0` (`HBR_ANDCOND`).
    AndCond,
    /// Remove only if `v & !0x7f == avpn` (`HBR_AVPN`).
    Avpn,
}

/// One H_BULK_REMOVE request: the TSH/TSL word pair of a translation specifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BulkRemoveRequest {
    /// The entry.
    pub ptex: Ptex,
    /// The match condition.
    pub matching: BulkMatch,
    /// The AVPN or ANDCOND operand (TSL).
    pub avpn: u64,
}

impl BulkRemoveRequest {
    /// The request's TSH word.
    #[inline]
    pub const fn tsh(self) -> BulkTsh {
        let flags = match self.matching {
            BulkMatch::Absolute => BulkTsh::ABSOLUTE,
            BulkMatch::AndCond => BulkTsh::ANDCOND,
            BulkMatch::Avpn => BulkTsh::AVPN,
        };
        BulkTsh(BulkTsh::REQUEST | flags | self.ptex.0 as u64)
    }
}

/// The outcome of one H_BULK_REMOVE request (the CODE field of its response word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BulkCode {
    /// Removed.
    Success,
    /// No matching entry.
    NotFound,
    /// Bad request (index outside the table, invalid match flags).
    Parameter,
    /// Hardware error.
    Hardware,
}

/// The response words of an H_BULK_REMOVE that succeeded, one per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkRemoved {
    words: [BulkTsh; H_BULK_REMOVE_MAX_BATCH],
    len: usize,
}

impl BulkRemoved {
    /// The response word of each request, in request order ([`BulkTsh::code`],
    /// [`BulkTsh::rc`], [`BulkTsh::ptex`]).
    pub fn responses(&self) -> &[BulkTsh] {
        self.words.get(..self.len).unwrap_or(&[])
    }
}

/// The entries returned by H_READ: one, or four with [`ReadFlags::READ_4`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadEntries {
    entries: [(HpteV, HpteR); 4],
    len: usize,
}

impl ReadEntries {
    /// The (dword 0, dword 1) pairs, as the guest sees them.
    pub fn as_slice(&self) -> &[(HpteV, HpteR)] {
        self.entries.get(..self.len).unwrap_or(&[])
    }
}

/// An r4..r11 block with the first words set.
#[inline(always)]
fn regs<const N: usize>(args: [u64; N]) -> [u64; 8] {
    let mut r = [0u64; 8];
    for (d, s) in r.iter_mut().zip(args) {
        *d = s;
    }
    r
}

impl Vm {
    /// H_ENTER: insert the entry (`v`, `r`) at `ptex` ([`EnterFlags::EXACT`]) or in
    /// the first free slot of its PTEG; returns the index used (`kvmppc_do_h_enter`).
    pub fn h_enter(
        &self,
        vcpu: VcpuId,
        flags: EnterFlags,
        ptex: Ptex,
        v: HpteV,
        r: HpteR,
    ) -> Result<Ptex, PaprError> {
        let mut x = regs([flags.bits(), u64::from(ptex.0), v.0, r.0]);
        self.call(vcpu, hcall::H_ENTER, &mut x)?;
        // The index of a table entry fits 32 bits (orders up to 36).
        u32::try_from(x[0])
            .map(Ptex)
            .map_err(|_| PaprError::Hardware)
    }

    /// H_REMOVE: remove the entry at `ptex` if it matches; returns its old dword 0
    /// and guest-visible dword 1 with the final R/C (`kvmppc_do_h_remove`).
    pub fn h_remove(
        &self,
        vcpu: VcpuId,
        flags: RemoveFlags,
        ptex: Ptex,
        avpn: u64,
    ) -> Result<(HpteV, HpteR), PaprError> {
        let mut x = regs([flags.bits(), u64::from(ptex.0), avpn]);
        self.call(vcpu, hcall::H_REMOVE, &mut x)?;
        Ok((HpteV(x[0]), HpteR(x[1])))
    }

    /// H_BULK_REMOVE: up to four removals (`kvmppc_h_bulk_remove`). More than four
    /// requests is [`PaprError::Parameter`] (nothing is removed). On an error the
    /// requests before the failing one have been carried out.
    pub fn h_bulk_remove(
        &self,
        vcpu: VcpuId,
        requests: &[BulkRemoveRequest],
    ) -> Result<BulkRemoved, PaprError> {
        if requests.len() > H_BULK_REMOVE_MAX_BATCH {
            return Err(PaprError::Parameter);
        }
        let mut x = [0u64; 8];
        if let Some(end) = x.get_mut(2 * requests.len()) {
            *end = BulkTsh::END;
        }
        for (pair, q) in x.chunks_exact_mut(2).zip(requests) {
            pair[0] = q.tsh().0;
            pair[1] = q.avpn;
        }
        self.call(vcpu, hcall::H_BULK_REMOVE, &mut x)?;
        let mut words = [BulkTsh(0); H_BULK_REMOVE_MAX_BATCH];
        for (w, pair) in words.iter_mut().zip(x.chunks_exact(2)) {
            *w = BulkTsh(pair[0]);
        }
        Ok(BulkRemoved {
            words,
            len: requests.len(),
        })
    }

    /// H_PROTECT: change the protection bits of the entry at `ptex` if it matches
    /// (`kvmppc_h_protect`).
    pub fn h_protect(
        &self,
        vcpu: VcpuId,
        flags: ProtectFlags,
        ptex: Ptex,
        avpn: u64,
    ) -> Result<(), PaprError> {
        let mut x = regs([flags.bits(), u64::from(ptex.0), avpn]);
        self.call(vcpu, hcall::H_PROTECT, &mut x)
    }

    /// H_READ: the entry at `ptex`, or with [`ReadFlags::READ_4`] the four entries of
    /// its aligned group, as the guest sees them (`kvmppc_h_read`).
    pub fn h_read(
        &self,
        vcpu: VcpuId,
        flags: ReadFlags,
        ptex: Ptex,
    ) -> Result<ReadEntries, PaprError> {
        let mut x = regs([flags.bits(), u64::from(ptex.0)]);
        self.call(vcpu, hcall::H_READ, &mut x)?;
        let mut entries = [(HpteV(0), HpteR(0)); 4];
        for (e, pair) in entries.iter_mut().zip(x.chunks_exact(2)) {
            *e = (HpteV(pair[0]), HpteR(pair[1]));
        }
        let len = if flags.contains(ReadFlags::READ_4) {
            4
        } else {
            1
        };
        Ok(ReadEntries { entries, len })
    }

    /// H_CLEAR_REF: clear R of the entry at `ptex`; returns its guest-visible dword 1
    /// from before (`kvmppc_h_clear_ref`; [`PaprError::Function`] in the QEMU
    /// flavour).
    pub fn h_clear_ref(&self, vcpu: VcpuId, ptex: Ptex) -> Result<HpteR, PaprError> {
        let mut x = regs([0, u64::from(ptex.0)]);
        self.call(vcpu, hcall::H_CLEAR_REF, &mut x)?;
        Ok(HpteR(x[0]))
    }

    /// H_CLEAR_MOD: clear C of the entry at `ptex`; returns its guest-visible dword 1
    /// from before (`kvmppc_h_clear_mod`; [`PaprError::Function`] in the QEMU
    /// flavour).
    pub fn h_clear_mod(&self, vcpu: VcpuId, ptex: Ptex) -> Result<HpteR, PaprError> {
        let mut x = regs([0, u64::from(ptex.0)]);
        self.call(vcpu, hcall::H_CLEAR_MOD, &mut x)?;
        Ok(HpteR(x[0]))
    }

    /// H_RESIZE_HPT_PREPARE (PAPR's HPT resizing): start preparing a table of
    /// 2^`shift` bytes (0 cancels a pending one). `Ok` once it is ready; a
    /// `LongBusy*` error while it is being prepared (call again).
    pub fn h_resize_hpt_prepare(&self, shift: u32) -> Result<(), PaprError> {
        self.resize_hcall(hcall::H_RESIZE_HPT_PREPARE, 0, u64::from(shift))
    }

    /// H_RESIZE_HPT_COMMIT: switch to the prepared table of 2^`shift` bytes,
    /// rehashing every bolted entry into it.
    pub fn h_resize_hpt_commit(&self, shift: u32) -> Result<(), PaprError> {
        self.resize_hcall(hcall::H_RESIZE_HPT_COMMIT, 0, u64::from(shift))
    }
}
