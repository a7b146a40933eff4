//! The kvm-unit-tests `x86/access.c` conformance model, run against [`crate::paging::walk`].
//!
//! access.c describes one test case by 31 flag bits ([`AcFlags`]): the PTE and PDE bits,
//! the PDPTE's writability, the protection-key setup, the access (user, write, fetch,
//! twice) and the CPU state (EFER.NXE, CR0.WP, CR4.SMEP, CR4.PKE, forced emulation). It
//! enumerates every legal combination, builds the page tables, performs the access and
//! compares the fault, the exact error code, the PTE and the PDE with what its
//! expected-result rules ([`expected`]) predict. Six sub-tests ([`sub_tests`]) cover
//! historical KVM bugs.
//!
//! Invariants:
//! * [`AccessSpace`] yields exactly the flag values access.c's `ac_test_bump` visits: the
//!   invalid mask ([`AccessConfig::invalid_mask`]) is skipped by carrying over it, and
//!   [`is_legal`] is access.c's `ac_test_legal`.
//! * Page tables persist across cases (kvm-unit-tests 73695c95): only the PDE, PTE and
//!   PDPTE.W are rewritten; upper-level A bits set by earlier cases stay.
//! * The expected-result rules are independent of the walker: they are a transcription
//!   of access.c's rules, not a second call into it.

use crate::paging::{
    walk, Access, CpuMode, Gpa, GuestPhysMemory, Gva, PfErrorCode, SparseMemory, CR0_PE, CR0_PG,
    CR0_WP, CR4_LA57, CR4_PAE, CR4_PKE, CR4_SMEP, EFER_LMA, EFER_LME, EFER_NXE, PT64_NX,
    PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE, PT_PRESENT, PT_USER, PT_WRITABLE,
};
use core::fmt;

/// The 31 flag bits of one access.c test case (`AC_*_MASK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(transparent)]
pub struct AcFlags(pub u32);

macro_rules! ac_flags {
    ($($(#[$m:meta])* $name:ident = $bit:expr, $text:expr;)*) => {
        impl AcFlags {
            $($(#[$m])* pub const $name: u32 = 1 << $bit;)*
            /// Every flag with its access.c name, in bit order.
            pub const NAMES: [(u32, &'static str); 31] = [$((1 << $bit, $text)),*];
        }
    };
}

ac_flags! {
    /// `AC_PTE_WRITABLE`.
    PTE_WRITABLE = 0, "pte.rw";
    /// `AC_PTE_USER`.
    PTE_USER = 1, "pte.user";
    /// `AC_PTE_ACCESSED`.
    PTE_ACCESSED = 2, "pte.a";
    /// `AC_PTE_DIRTY`.
    PTE_DIRTY = 3, "pte.d";
    /// `AC_PTE_NX`.
    PTE_NX = 4, "pte.nx";
    /// `AC_PTE_PRESENT`.
    PTE_PRESENT = 5, "pte.p";
    /// `AC_PTE_BIT51`.
    PTE_BIT51 = 6, "pte.51";
    /// `AC_PTE_BIT36`.
    PTE_BIT36 = 7, "pte.36";
    /// `AC_PDE_WRITABLE`.
    PDE_WRITABLE = 8, "pde.rw";
    /// `AC_PDE_USER`.
    PDE_USER = 9, "pde.user";
    /// `AC_PDE_ACCESSED`.
    PDE_ACCESSED = 10, "pde.a";
    /// `AC_PDE_DIRTY`.
    PDE_DIRTY = 11, "pde.d";
    /// `AC_PDE_PSE`: the PDE is a 2 MiB leaf.
    PDE_PSE = 12, "pde.pse";
    /// `AC_PDE_NX`.
    PDE_NX = 13, "pde.nx";
    /// `AC_PDE_PRESENT`.
    PDE_PRESENT = 14, "pde.p";
    /// `AC_PDE_BIT51`.
    PDE_BIT51 = 15, "pde.51";
    /// `AC_PDE_BIT36`.
    PDE_BIT36 = 16, "pde.36";
    /// `AC_PDE_BIT13`: reserved in a 2 MiB leaf.
    PDE_BIT13 = 17, "pde.13";
    /// `AC_PDPTE_NO_WRITABLE`: PDPTE.W clear.
    PDPTE_NO_WRITABLE = 18, "pdpte.ro";
    /// `AC_PKU_AD`: PKRU.AD for key 1.
    PKU_AD = 19, "pkru.ad";
    /// `AC_PKU_WD`: PKRU.WD for key 1.
    PKU_WD = 20, "pkru.wd";
    /// `AC_PKU_PKEY`: the leaf's key is 1 (else 0).
    PKU_PKEY = 21, "pkey=1";
    /// `AC_ACCESS_USER`: CPL 3.
    ACCESS_USER = 22, "user";
    /// `AC_ACCESS_WRITE`.
    ACCESS_WRITE = 23, "write";
    /// `AC_ACCESS_FETCH`.
    ACCESS_FETCH = 24, "fetch";
    /// `AC_ACCESS_TWICE`: a supervisor read first.
    ACCESS_TWICE = 25, "twice";
    /// `AC_CPU_EFER_NX`.
    EFER_NX = 26, "efer.nx";
    /// `AC_CPU_CR0_WP`.
    CR0_WP = 27, "cr0.wp";
    /// `AC_CPU_CR4_SMEP`.
    CR4_SMEP = 28, "cr4.smep";
    /// `AC_CPU_CR4_PKE`.
    CR4_PKE = 29, "cr4.pke";
    /// `AC_FEP`: the access goes through the forced-emulation prefix.
    FEP = 30, "fep";
}

impl AcFlags {
    /// Whether flag `mask` is set.
    pub const fn has(self, mask: u32) -> bool {
        self.0 & mask != 0
    }
}

impl fmt::Display for AcFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (m, n) in AcFlags::NAMES {
            if self.0 & m != 0 {
                if !first {
                    f.write_str(" ")?;
                }
                f.write_str(n)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// What the CPU under test supports and how the run is set up (access.c's environment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AccessConfig {
    /// CPUID MAXPHYADDR.
    pub maxphyaddr: u8,
    /// The CPU has PKU.
    pub pku: bool,
    /// The CPU has SMEP.
    pub smep: bool,
    /// `force_emulation` (FEP cases enabled; the walker treats them like the others).
    pub fep: bool,
    /// Run with 5-level paging (else 4-level).
    pub la57: bool,
}

impl Default for AccessConfig {
    /// MAXPHYADDR 40 with PKU and SMEP, no FEP, 4-level: the 19 169 280-case space.
    fn default() -> Self {
        AccessConfig {
            maxphyaddr: 40,
            pku: true,
            smep: true,
            fep: false,
            la57: false,
        }
    }
}

impl AccessConfig {
    /// CR3 of the persistent test tables: [`PML5`] with 5-level paging, else [`PML4`].
    pub const fn cr3(&self) -> u64 {
        if self.la57 {
            PML5
        } else {
            PML4
        }
    }

    /// access.c's `invalid_mask`: flags this CPU cannot test, never set during enumeration.
    pub const fn invalid_mask(&self) -> u32 {
        let mut m = 0;
        if !self.pku {
            m |= AcFlags::PKU_AD | AcFlags::PKU_WD | AcFlags::PKU_PKEY | AcFlags::CR4_PKE;
        }
        if !self.smep {
            m |= AcFlags::CR4_SMEP;
        }
        if self.maxphyaddr >= 52 {
            m |= AcFlags::PDE_BIT51 | AcFlags::PTE_BIT51;
        }
        if self.maxphyaddr >= 37 {
            m |= AcFlags::PDE_BIT36 | AcFlags::PTE_BIT36;
        }
        if !self.fep {
            m |= AcFlags::FEP;
        }
        m
    }
}

/// access.c's `ac_test_legal`: the combinations the main loop runs.
pub const fn is_legal(f: AcFlags) -> bool {
    // The main loop never enables SMEP (it converts pages to kernel pages); the
    // dedicated sub-test covers it.
    if f.has(AcFlags::CR4_SMEP) {
        return false;
    }
    if f.has(AcFlags::ACCESS_FETCH) && f.has(AcFlags::ACCESS_WRITE) {
        return false;
    }
    if !f.has(AcFlags::CR4_PKE) && (f.has(AcFlags::PKU_AD) || f.has(AcFlags::PKU_WD)) {
        return false;
    }
    if !f.has(AcFlags::PDE_PSE) && f.has(AcFlags::PDE_BIT13) {
        return false;
    }
    let mut reserved = AcFlags::PDE_BIT51
        | AcFlags::PDE_BIT36
        | AcFlags::PDE_BIT13
        | AcFlags::PTE_BIT51
        | AcFlags::PTE_BIT36;
    if !f.has(AcFlags::EFER_NX) {
        reserved |= AcFlags::PDE_NX | AcFlags::PTE_NX;
    }
    let r = reserved & f.0;
    r & r.wrapping_sub(1) == 0
}

/// The legal flag values in access.c's order (`ac_test_bump`), starting from 0.
#[derive(Clone, Debug)]
pub struct AccessSpace {
    invalid: u32,
    next: Option<u32>,
}

impl AccessSpace {
    /// The whole space for `cfg`.
    pub const fn new(cfg: &AccessConfig) -> Self {
        Self::from(cfg, 0)
    }

    /// The space for `cfg` from flag value `start` on (`start` must have no
    /// invalid-mask flag set; it is cleared if it has).
    pub const fn from(cfg: &AccessConfig, start: u32) -> Self {
        AccessSpace {
            invalid: cfg.invalid_mask(),
            next: Some(start & !cfg.invalid_mask()),
        }
    }
}

impl Iterator for AccessSpace {
    type Item = AcFlags;

    fn next(&mut self) -> Option<AcFlags> {
        loop {
            let cur = self.next?;
            let bumped = ((cur | self.invalid) + 1) & !self.invalid;
            self.next = (bumped < 1 << 31 && bumped != 0).then_some(bumped);
            if is_legal(AcFlags(cur)) {
                return Some(AcFlags(cur));
            }
        }
    }
}

/// A small seeded generator (SplitMix64): reproducible samples without dependencies.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub const fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniformly random legal case of `cfg`'s space (rejection sampling).
    pub fn legal_case(&mut self, cfg: &AccessConfig) -> AcFlags {
        let valid = !cfg.invalid_mask() & 0x7fff_ffff;
        loop {
            let f = AcFlags((self.next_u64() as u32) & valid);
            if is_legal(f) {
                return f;
            }
        }
    }
}

/// What access.c expects of one case (`ac_emulate_access`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The access faults.
    pub fault: bool,
    /// The exact error code (meaningful if `fault`).
    pub error: u32,
    /// The PTE after the access, exactly.
    pub pte: u64,
    /// The PDE after the access.
    pub pde: u64,
    /// PDE bits not compared (A when the access faulted and PDE.A started clear).
    pub ignore_pde: u64,
}

/// The physical page every case maps (32 MiB; starts with `ret`).
pub const TARGET_PA: u64 = 32 << 20;

/// The PTE value the flags describe, pointing at `pa`.
pub const fn pte_value(f: AcFlags, pa: u64) -> u64 {
    let mut v = pa;
    if f.has(AcFlags::PTE_PRESENT) {
        v |= PT_PRESENT;
    }
    if f.has(AcFlags::PTE_WRITABLE) {
        v |= PT_WRITABLE;
    }
    if f.has(AcFlags::PTE_USER) {
        v |= PT_USER;
    }
    if f.has(AcFlags::PTE_ACCESSED) {
        v |= PT_ACCESSED;
    }
    if f.has(AcFlags::PTE_DIRTY) {
        v |= PT_DIRTY;
    }
    if f.has(AcFlags::PTE_NX) {
        v |= PT64_NX;
    }
    if f.has(AcFlags::PTE_BIT51) {
        v |= 1 << 51;
    }
    if f.has(AcFlags::PTE_BIT36) {
        v |= 1 << 36;
    }
    if f.has(AcFlags::PKU_PKEY) && !f.has(AcFlags::PDE_PSE) {
        v |= 1 << 59;
    }
    v
}

/// The PDE value the flags describe: a 2 MiB leaf at `leaf_pa` with PSE, else a table at
/// `pt` carrying protection key 2 (which a non-leaf entry must not apply).
pub const fn pde_value(f: AcFlags, pt: u64, leaf_pa: u64) -> u64 {
    let mut v = if f.has(AcFlags::PDE_PSE) {
        let mut l = leaf_pa | PT_PAGE_SIZE;
        if f.has(AcFlags::PKU_PKEY) {
            l |= 1 << 59;
        }
        l
    } else {
        pt | (2 << 59)
    };
    if f.has(AcFlags::PDE_PRESENT) {
        v |= PT_PRESENT;
    }
    if f.has(AcFlags::PDE_WRITABLE) {
        v |= PT_WRITABLE;
    }
    if f.has(AcFlags::PDE_USER) {
        v |= PT_USER;
    }
    if f.has(AcFlags::PDE_ACCESSED) {
        v |= PT_ACCESSED;
    }
    if f.has(AcFlags::PDE_DIRTY) {
        v |= PT_DIRTY;
    }
    if f.has(AcFlags::PDE_NX) {
        v |= PT64_NX;
    }
    if f.has(AcFlags::PDE_BIT51) {
        v |= 1 << 51;
    }
    if f.has(AcFlags::PDE_BIT36) {
        v |= 1 << 36;
    }
    if f.has(AcFlags::PDE_BIT13) {
        v |= 1 << 13;
    }
    v
}

/// access.c's expected-result rules for flags `f` on a PDE `pde` and PTE `pte` as set
/// up (the PTE is left alone when the PDE is a leaf or invalid).
pub fn expected(f: AcFlags, pde: u64, pte: u64) -> Expected {
    let mut e = Expected {
        fault: false,
        error: PfErrorCode::PRESENT.bits(),
        pte,
        pde,
        ignore_pde: 0,
    };
    emulate_access(f, &mut e);
    e
}

fn emulate_access(f: AcFlags, e: &mut Expected) {
    let p = PfErrorCode::PRESENT.bits();
    if f.has(AcFlags::ACCESS_USER) {
        e.error |= PfErrorCode::USER.bits();
    }
    if f.has(AcFlags::ACCESS_WRITE) {
        e.error |= PfErrorCode::WRITE.bits();
    }
    if f.has(AcFlags::ACCESS_FETCH) {
        e.error |= PfErrorCode::FETCH.bits();
    }
    let pde_valid = f.has(AcFlags::PDE_PRESENT)
        && !f.has(AcFlags::PDE_BIT51)
        && !f.has(AcFlags::PDE_BIT36)
        && !f.has(AcFlags::PDE_BIT13)
        && (!f.has(AcFlags::PDE_NX) || f.has(AcFlags::EFER_NX));
    'checks: {
        if !pde_valid {
            e.fault = true;
            if f.has(AcFlags::PDE_PRESENT) {
                e.error |= PfErrorCode::RSVD.bits();
            } else {
                e.error &= !p;
            }
            break 'checks;
        }
        let mut writable = !f.has(AcFlags::PDPTE_NO_WRITABLE) && f.has(AcFlags::PDE_WRITABLE);
        let mut user = f.has(AcFlags::PDE_USER);
        let mut exec = !f.has(AcFlags::PDE_NX);
        let leaf_is_pde = f.has(AcFlags::PDE_PSE);
        if !leaf_is_pde {
            e.pde |= PT_ACCESSED;
            let pte_valid = f.has(AcFlags::PTE_PRESENT)
                && !f.has(AcFlags::PTE_BIT51)
                && !f.has(AcFlags::PTE_BIT36)
                && (!f.has(AcFlags::PTE_NX) || f.has(AcFlags::EFER_NX));
            if !pte_valid {
                e.fault = true;
                if f.has(AcFlags::PTE_PRESENT) {
                    e.error |= PfErrorCode::RSVD.bits();
                } else {
                    e.error &= !p;
                }
                break 'checks;
            }
            writable &= f.has(AcFlags::PTE_WRITABLE);
            user &= f.has(AcFlags::PTE_USER);
            exec &= !f.has(AcFlags::PTE_NX);
        }
        let uacc = f.has(AcFlags::ACCESS_USER);
        let kwritable = !f.has(AcFlags::CR0_WP) && !uacc;
        if uacc && !user {
            e.fault = true;
        }
        if f.has(AcFlags::ACCESS_WRITE) && !writable && !kwritable {
            e.fault = true;
        }
        if f.has(AcFlags::ACCESS_FETCH) && !exec {
            e.fault = true;
        }
        // SMEP: a supervisor fetch from a user page.
        if f.has(AcFlags::ACCESS_FETCH) && !uacc && user && f.has(AcFlags::CR4_SMEP) {
            e.fault = true;
        }
        if user
            && !f.has(AcFlags::ACCESS_FETCH)
            && f.has(AcFlags::PKU_PKEY)
            && f.has(AcFlags::CR4_PKE)
        {
            // PKRU.AD stops every data access; PKRU.WD stops writes (not supervisor
            // writes with CR0.WP=0).
            let wd = f.has(AcFlags::ACCESS_WRITE) && f.has(AcFlags::PKU_WD) && !kwritable;
            if f.has(AcFlags::PKU_AD) || wd {
                e.fault = true;
                e.error |= PfErrorCode::PK.bits();
            }
        }
        if !e.fault {
            let bits = PT_ACCESSED
                | if f.has(AcFlags::ACCESS_WRITE) {
                    PT_DIRTY
                } else {
                    0
                };
            if leaf_is_pde {
                e.pde |= bits;
            } else {
                e.pte |= bits;
            }
        }
    }
    if e.fault && !f.has(AcFlags::PDE_ACCESSED) {
        e.ignore_pde = PT_ACCESSED;
    }
    if !f.has(AcFlags::EFER_NX) && !f.has(AcFlags::CR4_SMEP) {
        e.error &= !PfErrorCode::FETCH.bits();
    }
}

/// The `Access` a case performs.
pub const fn case_access(f: AcFlags) -> Access {
    let mut a = Access::empty();
    if f.has(AcFlags::ACCESS_USER) {
        a = a.union(Access::USER);
    }
    if f.has(AcFlags::ACCESS_WRITE) {
        a = a.union(Access::WRITE);
    }
    if f.has(AcFlags::ACCESS_FETCH) {
        a = a.union(Access::FETCH);
    }
    a
}

/// The CPU state a case runs under.
pub fn case_mode(cfg: &AccessConfig, f: AcFlags, cr3: u64) -> CpuMode {
    let mut cr4 = CR4_PAE;
    if cfg.la57 {
        cr4 |= CR4_LA57;
    }
    if f.has(AcFlags::CR4_SMEP) {
        cr4 |= CR4_SMEP;
    }
    if f.has(AcFlags::CR4_PKE) {
        cr4 |= CR4_PKE;
    }
    let mut cr0 = CR0_PG | CR0_PE;
    if f.has(AcFlags::CR0_WP) {
        cr0 |= CR0_WP;
    }
    let mut efer = EFER_LME | EFER_LMA;
    if f.has(AcFlags::EFER_NX) {
        efer |= EFER_NXE;
    }
    let mut mode = CpuMode::new(cr0, cr3, cr4, efer);
    mode.maxphyaddr = cfg.maxphyaddr;
    // Key 0 = 0, key 1 from the flags, key 2 AD|WD (on the non-leaf PDE: ignored).
    let mut pkru = 0b11 << 4;
    if f.has(AcFlags::PKU_AD) {
        pkru |= 1 << 2;
    }
    if f.has(AcFlags::PKU_WD) {
        pkru |= 1 << 3;
    }
    mode.pkru = pkru;
    mode
}

/// The outcome the walker gave one case, next to what access.c expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The case.
    pub flags: AcFlags,
    /// What the rules expect.
    pub expected: Expected,
    /// Whether the walker faulted.
    pub got_fault: bool,
    /// The walker's error code (0 without a fault).
    pub got_error: u32,
    /// The PTE after the walk.
    pub got_pte: u64,
    /// The PDE after the walk.
    pub got_pde: u64,
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fault={} ec={:#x} pte={:#x} pde={:#x}",
            self.fault, self.error, self.pte, self.pde
        )
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let got = Expected {
            fault: self.got_fault,
            error: self.got_error,
            pte: self.got_pte,
            pde: self.got_pde,
            ignore_pde: 0,
        };
        write!(
            f,
            "[{}] ({:#x}): expected {}; got {got}",
            self.flags, self.flags.0, self.expected
        )
    }
}

/// Counts from a run of cases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessReport {
    /// Cases run.
    pub checked: u64,
    /// Cases where the walker disagreed with the rules.
    pub mismatched: u64,
    /// Cases expected (and found) to fault.
    pub faults: u64,
    /// The first disagreement.
    pub first_mismatch: Option<Mismatch>,
}

impl AccessReport {
    fn record(&mut self, r: Result<bool, Mismatch>) {
        self.checked += 1;
        match r {
            Ok(fault) => self.faults += u64::from(fault),
            Err(m) => {
                self.mismatched += 1;
                self.first_mismatch.get_or_insert(m);
            }
        }
    }
}

/// Guest-physical layout of the persistent test page tables.
/// The level-5 table of the persistent test tables (CR3 with 5-level paging).
pub const PML5: u64 = 0x10_0000;
/// The level-4 table of the persistent test tables (CR3 with 4-level paging).
pub const PML4: u64 = 0x10_1000;
const PDPT: u64 = 0x10_2000;
const PD: u64 = 0x10_3000;
const PT: u64 = 0x10_4000;
/// The test VA (upper half, 2 MiB aligned so a PSE leaf maps the target page too).
pub const TEST_VA: u64 = 0xffff_ffff_c0a0_0000;

/// Where the PDPTE of [`TEST_VA`] lives.
pub const PDPTE_AT: u64 = PDPT + index(TEST_VA, 3) * 8;
/// Where the PDE of [`TEST_VA`] lives.
pub const PDE_AT: u64 = PD + index(TEST_VA, 2) * 8;
/// Where the PTE of [`TEST_VA`] lives.
pub const PTE_AT: u64 = PT + index(TEST_VA, 1) * 8;
/// The PDPT of the persistent test tables.
pub const PDPT_TABLE: u64 = PDPT;
/// The page directory of the persistent test tables.
pub const PD_TABLE: u64 = PD;
/// The page table of the persistent test tables.
pub const PT_TABLE: u64 = PT;

/// The PML5E and PML4E of the persistent tables: where and what (P|W|U).
pub const fn upper_entries() -> [(u64, u64); 2] {
    let upper = PT_PRESENT | PT_WRITABLE | PT_USER;
    [
        (PML5 + index(TEST_VA, 5) * 8, PML4 | upper),
        (PML4 + index(TEST_VA, 4) * 8, PDPT | upper),
    ]
}

/// The PDPTE, PDE and PTE case `f` writes, the PDPTE keeping the A/D bits of `old_pdpte`
/// (P|U, +W unless `pdpte.ro`).
pub const fn case_entries(f: AcFlags, old_pdpte: u64) -> (u64, u64, u64) {
    let mut pdpte = PD | PT_PRESENT | PT_USER | (old_pdpte & (PT_ACCESSED | PT_DIRTY));
    if !f.has(AcFlags::PDPTE_NO_WRITABLE) {
        pdpte |= PT_WRITABLE;
    }
    (pdpte, pde_value(f, PT, TARGET_PA), pte_value(f, TARGET_PA))
}

/// What the rules expect of case `f` on freshly written `pde` and `pte`, the
/// supervisor read of `twice` applied first.
pub fn case_expected(f: AcFlags, pde: u64, pte: u64) -> Expected {
    let mut exp = Expected {
        fault: false,
        error: PfErrorCode::PRESENT.bits(),
        pte,
        pde,
        ignore_pde: 0,
    };
    if f.has(AcFlags::ACCESS_TWICE) {
        let read =
            AcFlags(f.0 & !(AcFlags::ACCESS_WRITE | AcFlags::ACCESS_FETCH | AcFlags::ACCESS_USER));
        emulate_access(read, &mut exp);
        exp.fault = false;
        exp.error = PfErrorCode::PRESENT.bits();
        exp.ignore_pde = 0;
    }
    emulate_access(f, &mut exp);
    exp
}

/// What an implementation (the walker or the shadow MMU) did with one case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaseOutcome {
    /// The access faulted (or could not complete: then `error` is `u32::MAX`).
    pub fault: bool,
    /// The #PF error code (0 without a fault).
    pub error: u32,
    /// The PTE after the access.
    pub pte: u64,
    /// The PDE after the access.
    pub pde: u64,
    /// The guest-physical address reached, without a fault.
    pub gpa: Option<u64>,
}

impl CaseOutcome {
    /// Whether this agrees with `exp` as access.c compares: fault, exact error code,
    /// exact PTE, the PDE outside `ignore_pde`, and the target page reached.
    pub fn matches(&self, exp: &Expected) -> bool {
        self.fault == exp.fault
            && (!exp.fault || self.error == exp.error)
            && self.pte == exp.pte
            && (self.pde & !exp.ignore_pde) == (exp.pde & !exp.ignore_pde)
            && (self.fault || self.gpa == Some(TARGET_PA))
    }
}

impl fmt::Display for CaseOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fault={} ec={:#x} pte={:#x} pde={:#x} gpa={:?}",
            self.fault, self.error, self.pte, self.pde, self.gpa
        )
    }
}

/// Runs access.c cases through the walker on page tables that persist between cases.
#[derive(Clone, Debug)]
pub struct AccessRunner {
    cfg: AccessConfig,
    mem: SparseMemory,
}

impl AccessRunner {
    /// A runner with fresh page tables for `cfg`.
    pub fn new(cfg: AccessConfig) -> Self {
        let mut mem = SparseMemory::new();
        // Writes into a fresh sparse memory below 2^52 cannot fail.
        for (at, v) in upper_entries() {
            let _ = mem.write_u64(Gpa(at), v);
        }
        let _ = mem.write_u64(Gpa(TARGET_PA), 0xc3);
        AccessRunner { cfg, mem }
    }

    /// The configuration.
    pub fn config(&self) -> &AccessConfig {
        &self.cfg
    }

    fn cr3(&self) -> u64 {
        self.cfg.cr3()
    }

    /// Runs one case: `Ok(faulted)` if the walker agrees with the rules.
    pub fn run_case(&mut self, f: AcFlags) -> Result<bool, Mismatch> {
        let (exp, got) = self.observe(f);
        if got.matches(&exp) {
            Ok(exp.fault)
        } else {
            Err(Mismatch {
                flags: f,
                expected: exp,
                got_fault: got.fault,
                got_error: got.error,
                got_pte: got.pte,
                got_pde: got.pde,
            })
        }
    }

    /// Sets up case `f` on the persistent tables, runs it through the walker and returns
    /// what the rules expect next to what the walker did.
    pub fn observe(&mut self, f: AcFlags) -> (Expected, CaseOutcome) {
        let old = self.mem.read_u64(Gpa(PDPTE_AT)).unwrap_or(0);
        let (pdpte, pde, pte) = case_entries(f, old);
        let _ = self.mem.write_u64(Gpa(PDPTE_AT), pdpte);
        let _ = self.mem.write_u64(Gpa(PDE_AT), pde);
        let _ = self.mem.write_u64(Gpa(PTE_AT), pte);
        let mode = case_mode(&self.cfg, f, self.cr3());
        let exp = case_expected(f, pde, pte);
        if f.has(AcFlags::ACCESS_TWICE) {
            let _ = walk(&mut self.mem, &mode, Gva(TEST_VA), Access::empty());
        }
        let got = walk(&mut self.mem, &mode, Gva(TEST_VA), case_access(f));
        let (fault, error, gpa) = match &got {
            Ok(w) => match (w.fault(), w.translation()) {
                (Some(pf), _) => (true, pf.error_code.bits(), None),
                (None, t) => (false, 0, t.map(|t| t.gpa.0)),
            },
            Err(_) => (true, u32::MAX, None),
        };
        let out = CaseOutcome {
            fault,
            error,
            pte: self.mem.read_u64(Gpa(PTE_AT)).unwrap_or(0),
            pde: self.mem.read_u64(Gpa(PDE_AT)).unwrap_or(0),
            gpa,
        };
        (exp, out)
    }

    /// Runs every case of `cases`.
    pub fn run(&mut self, cases: impl IntoIterator<Item = AcFlags>) -> AccessReport {
        let mut r = AccessReport::default();
        for f in cases {
            let res = self.run_case(f);
            r.record(res);
        }
        r
    }

    /// Runs `n` uniformly sampled legal cases from `seed`.
    pub fn run_sample(&mut self, seed: u64, n: u64) -> AccessReport {
        let cfg = self.cfg;
        let mut rng = SplitMix64::new(seed);
        let mut r = AccessReport::default();
        for _ in 0..n {
            let f = rng.legal_case(&cfg);
            let res = self.run_case(f);
            r.record(res);
        }
        r
    }

    /// Runs the whole space of the configuration.
    pub fn run_all(&mut self) -> AccessReport {
        let space = AccessSpace::new(&self.cfg);
        self.run(space)
    }
}

/// The table index of `va` at `level` (64-bit paging).
const fn index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * (level - 1))) & 511
}

/// A failed step of a sub-test.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("step `{step}`: expected {expected}, got {got}")]
pub struct SubTestFailure {
    /// Which access of the scenario.
    pub step: &'static str,
    /// What access.c expects.
    pub expected: String,
    /// What the walker did.
    pub got: String,
}

/// The guest memory and vCPU a sub-test runs on: the reference walker over plain guest
/// memory ([`WalkerTables`]), or the shadow MMU (`crate::access_shadow`). The sub-tests
/// build 4-level tables at fixed guest-physical addresses below 64 MiB and map
/// [`TARGET_PA`] (and 30 MiB).
pub trait SubTestTables {
    /// A guest store of `value` to the 8-byte entry at `gpa`, followed by INVLPG of `va`
    /// (the address the entry translates), as access.c does after building a mapping.
    fn store(&mut self, gpa: u64, va: u64, value: u64);

    /// The 8-byte guest entry at `gpa`.
    fn load(&self, gpa: u64) -> u64;

    /// Performs `access` at `va` under `mode`: `(fault, error code)`. An implementation
    /// that checks itself against another (the shadow MMU against the walker) reports a
    /// disagreement as the failure.
    fn access(&mut self, mode: &CpuMode, va: u64, access: Access) -> SubTestAccess;
}

/// What a sub-test access gave: `(fault, error code)`, or the disagreement an
/// implementation that checks itself found ([`SubTestTables::access`]).
pub type SubTestAccess = Result<(bool, u32), SubTestFailure>;

/// The sub-tests' 4-level tables in plain guest memory, accessed by the reference walker.
#[derive(Clone, Debug)]
pub struct WalkerTables {
    mem: SparseMemory,
}

impl Default for WalkerTables {
    fn default() -> Self {
        Self::new()
    }
}

impl WalkerTables {
    /// Empty tables; [`TARGET_PA`] holds `ret`.
    pub fn new() -> Self {
        let mut mem = SparseMemory::new();
        let _ = mem.write_u64(Gpa(TARGET_PA), 0xc3);
        WalkerTables { mem }
    }
}

impl SubTestTables for WalkerTables {
    fn store(&mut self, gpa: u64, _va: u64, value: u64) {
        let _ = self.mem.write_u64(Gpa(gpa), value);
    }

    fn load(&self, gpa: u64) -> u64 {
        self.mem.read_u64(Gpa(gpa)).unwrap_or(0)
    }

    fn access(&mut self, mode: &CpuMode, va: u64, access: Access) -> SubTestAccess {
        Ok(walk_outcome(&mut self.mem, mode, va, access))
    }
}

/// The reference walker's `(fault, error code)` for one access (`u32::MAX` if the walk
/// could not complete).
pub fn walk_outcome<M: GuestPhysMemory + ?Sized>(
    mem: &mut M,
    mode: &CpuMode,
    va: u64,
    access: Access,
) -> (bool, u32) {
    match walk(mem, mode, Gva(va), access) {
        Ok(w) => match w.fault() {
            Some(pf) => (true, pf.error_code.bits()),
            None => (false, 0),
        },
        Err(_) => (true, u32::MAX),
    }
}

const SUB_PML4: u64 = 0x20_0000;

/// Writes `value` into the level-`level` entry of `table` for `va`.
fn set<T: SubTestTables + ?Sized>(t: &mut T, table: u64, va: u64, level: u32, value: u64) {
    t.store(table + index(va, level) * 8, va, value);
}

fn get<T: SubTestTables + ?Sized>(t: &T, table: u64, va: u64, level: u32) -> u64 {
    t.load(table + index(va, level) * 8)
}

/// Runs one access and compares with `(fault, error code)`.
fn expect<T: SubTestTables + ?Sized>(
    t: &mut T,
    step: &'static str,
    mode: &CpuMode,
    va: u64,
    access: Access,
    want: (bool, u32),
) -> Result<(), SubTestFailure> {
    let got = t.access(mode, va, access)?;
    let norm = |(f, e): (bool, u32)| if f { (true, e) } else { (false, 0) };
    if norm(got) == norm(want) {
        Ok(())
    } else {
        Err(SubTestFailure {
            step,
            expected: format!("fault={} ec={:#x}", want.0, want.1),
            got: format!("fault={} ec={:#x}", got.0, got.1),
        })
    }
}

/// Maps `va` through PDPT `pdpt` and PD `pd` (creating the PML4E and PDPTE with
/// `pdpte_w`), with `pde` (and `pte` in PT `pt` unless the PDE is a leaf).
#[allow(clippy::too_many_arguments)]
fn map<T: SubTestTables + ?Sized>(
    t: &mut T,
    va: u64,
    pdpt: u64,
    pd: u64,
    pdpte_w: bool,
    pde: u64,
    pt: u64,
    pte: u64,
) {
    let upper = PT_PRESENT | PT_USER | PT_ACCESSED;
    set(t, SUB_PML4, va, 4, pdpt | upper | PT_WRITABLE);
    set(
        t,
        pdpt,
        va,
        3,
        pd | upper | if pdpte_w { PT_WRITABLE } else { 0 },
    );
    set(t, pd, va, 2, pde);
    if pde & PT_PAGE_SIZE == 0 {
        set(t, pt, va, 1, pte);
    }
}

fn sub_mode(f: AcFlags) -> CpuMode {
    case_mode(&AccessConfig::default(), f, SUB_PML4)
}

fn want(f: AcFlags, pde: u64, pte: u64) -> (bool, u32) {
    let e = expected(f, pde, pte);
    (e.fault, e.error)
}

/// `corrupt_hugepage_trigger` (KVM e09e90a5): two read-only/writable 2 MiB PDEs of one
/// frame; after writing through the writable one, a write through the read-only one
/// still faults.
pub fn corrupt_hugepage_trigger<T: SubTestTables + ?Sized>(
    t: &mut T,
) -> Result<(), SubTestFailure> {
    let (va1, va2) = (0xffff_9234_0000_0000u64, 0xffff_9234_0020_0000u64);
    let ro = TARGET_PA | PT_PRESENT | PT_PAGE_SIZE | PT_ACCESSED;
    let rw = ro | PT_WRITABLE;
    map(t, va1, 0x30_0000, 0x30_1000, true, ro, 0, 0);
    map(t, va2, 0x30_0000, 0x30_1000, true, rw, 0, 0);
    let mode = sub_mode(AcFlags(AcFlags::CR0_WP | AcFlags::EFER_NX));
    expect(t, "read ro", &mode, va1, Access::empty(), (false, 0))?;
    expect(t, "read rw", &mode, va2, Access::empty(), (false, 0))?;
    expect(t, "write rw", &mode, va2, Access::WRITE, (false, 0))?;
    expect(t, "write ro", &mode, va1, Access::WRITE, (true, 0x3))
}

/// `check_pfec_on_prefetch_pte` (KVM 3ddf6c06e13e): two PTEs of one table, the second
/// with NX while EFER.NXE=0; reading the second must give the reserved-bit error code.
pub fn check_pfec_on_prefetch_pte<T: SubTestTables + ?Sized>(
    t: &mut T,
) -> Result<(), SubTestFailure> {
    let (va1, va2) = (0xffff_9234_0600_1000u64, 0xffff_9234_0600_3000u64);
    let f1 = AcFlags(AcFlags::PDE_PRESENT | AcFlags::PTE_PRESENT);
    let f2 = AcFlags(f1.0 | AcFlags::PTE_NX);
    let pt = 0x30_2000;
    let (pde, pte1, pte2) = (
        pde_value(f1, pt, 0),
        pte_value(f1, 30 << 20),
        pte_value(f2, 30 << 20),
    );
    map(t, va1, 0x30_0000, 0x30_1000, true, pde, pt, pte1);
    map(t, va2, 0x30_0000, 0x30_1000, true, pde, pt, pte2);
    let mode = sub_mode(f1);
    expect(
        t,
        "read first",
        &mode,
        va1,
        Access::empty(),
        want(f1, pde, pte1),
    )?;
    expect(
        t,
        "read second",
        &mode,
        va2,
        Access::empty(),
        want(f2, pde, pte2),
    )
}

/// `check_large_pte_dirty_for_nowp`: CR0.WP=0, two VAs on one read-only 2 MiB page: a
/// read via A, a supervisor write via B, then a write via A that must set A's PDE.D.
pub fn check_large_pte_dirty_for_nowp<T: SubTestTables + ?Sized>(
    t: &mut T,
) -> Result<(), SubTestFailure> {
    let (va_a, va_b) = (0xffff_9234_0300_0000u64, 0xffff_9234_0500_0000u64);
    let f = AcFlags(AcFlags::PDE_PRESENT | AcFlags::PDE_PSE);
    let pde = pde_value(f, 0, TARGET_PA);
    map(t, va_a, 0x30_0000, 0x30_1000, true, pde, 0, 0);
    map(t, va_b, 0x30_0000, 0x30_1000, true, pde, 0, 0);
    let mode = sub_mode(f);
    let fw = AcFlags(f.0 | AcFlags::ACCESS_WRITE);
    expect(t, "read A", &mode, va_a, Access::empty(), want(f, pde, 0))?;
    expect(t, "write B", &mode, va_b, Access::WRITE, want(fw, pde, 0))?;
    expect(t, "write A", &mode, va_a, Access::WRITE, want(fw, pde, 0))?;
    let got = get(t, 0x30_1000, va_a, 2);
    let wanted = expected(fw, pde, 0).pde;
    if got != wanted {
        return Err(SubTestFailure {
            step: "A's PDE after the write",
            expected: format!("{wanted:#x}"),
            got: format!("{got:#x}"),
        });
    }
    Ok(())
}

/// `check_smep_andnot_wp`: CR4.SMEP with CR0.WP=0: a supervisor write to a read-only
/// user page succeeds, a supervisor fetch from it then faults with P|I/D.
pub fn check_smep_andnot_wp<T: SubTestTables + ?Sized>(t: &mut T) -> Result<(), SubTestFailure> {
    let va = 0xffff_9234_0600_1000u64;
    let f = AcFlags(
        AcFlags::PDE_PRESENT
            | AcFlags::PTE_PRESENT
            | AcFlags::PDE_USER
            | AcFlags::PTE_USER
            | AcFlags::PDE_ACCESSED
            | AcFlags::PTE_ACCESSED
            | AcFlags::CR4_SMEP
            | AcFlags::ACCESS_WRITE,
    );
    let pt = 0x30_2000;
    let (pde, pte) = (pde_value(f, pt, 0), pte_value(f, TARGET_PA));
    map(t, va, 0x30_0000, 0x30_1000, true, pde, pt, pte);
    let mode = sub_mode(f);
    expect(
        t,
        "supervisor write",
        &mode,
        va,
        Access::WRITE,
        want(f, pde, pte),
    )?;
    let ff = AcFlags((f.0 & !AcFlags::ACCESS_WRITE) | AcFlags::ACCESS_FETCH);
    let w = want(ff, pde, pte);
    if w != (true, 0x11) {
        return Err(SubTestFailure {
            step: "rules for the fetch",
            expected: "fault ec=0x11".into(),
            got: format!("{w:?}"),
        });
    }
    expect(t, "supervisor fetch", &mode, va, Access::FETCH, w)
}

/// `check_toggle_cr0_wp`: a supervisor write to a read-only page succeeds with WP=0,
/// faults with WP=1, and succeeds again after WP is cleared (no stale context).
pub fn check_toggle_cr0_wp<T: SubTestTables + ?Sized>(t: &mut T) -> Result<(), SubTestFailure> {
    let va = 0xffff_9234_0600_1000u64;
    let f = AcFlags(
        AcFlags::PDE_PRESENT
            | AcFlags::PTE_PRESENT
            | AcFlags::PDE_ACCESSED
            | AcFlags::PTE_ACCESSED
            | AcFlags::ACCESS_WRITE,
    );
    let pt = 0x30_2000;
    let (pde, pte) = (pde_value(f, pt, 0), pte_value(f, TARGET_PA));
    map(t, va, 0x30_0000, 0x30_1000, true, pde, pt, pte);
    let fwp = AcFlags(f.0 | AcFlags::CR0_WP);
    expect(
        t,
        "WP=0 write",
        &sub_mode(f),
        va,
        Access::WRITE,
        want(f, pde, pte),
    )?;
    let w = want(fwp, pde, pte);
    if w != (true, 0x3) {
        return Err(SubTestFailure {
            step: "rules for WP=1",
            expected: "fault ec=0x3".into(),
            got: format!("{w:?}"),
        });
    }
    expect(t, "WP=1 write", &sub_mode(fwp), va, Access::WRITE, w)?;
    expect(t, "WP=0 again", &sub_mode(f), va, Access::WRITE, (false, 0))
}

/// `check_effective_sp_permissions` (CVE-2021-38198): PUD1 (writable) and PUD2 (read-only)
/// share one PMD page; a user write through PUD2 faults although PMD and PTE allow it.
pub fn check_effective_sp_permissions<T: SubTestTables + ?Sized>(
    t: &mut T,
) -> Result<(), SubTestFailure> {
    let ptr1 = 0xffff_9234_8000_0000u64;
    let ptr2 = ptr1 + (2 << 20);
    let ptr3 = ptr1 + (1 << 30);
    let ptr4 = ptr3 + (2 << 20);
    let (pdpt, pmd, pt) = (0x30_0000, 0x30_1000, 0x30_2000);
    let leaf = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED;
    for va in [ptr1, ptr2] {
        map(t, va, pdpt, pmd, true, pt | leaf, pt, TARGET_PA | leaf);
    }
    for va in [ptr3, ptr4] {
        map(t, va, pdpt, pmd, false, pt | leaf, pt, TARGET_PA | leaf);
    }
    let mode = sub_mode(AcFlags(AcFlags::CR0_WP | AcFlags::EFER_NX));
    let uw = Access::USER | Access::WRITE;
    expect(t, "read ptr1", &mode, ptr1, Access::USER, (false, 0))?;
    expect(t, "write ptr2", &mode, ptr2, uw, (false, 0))?;
    expect(t, "read ptr3", &mode, ptr3, Access::USER, (false, 0))?;
    expect(t, "write ptr4", &mode, ptr4, uw, (true, 0x7))
}

/// The six sub-tests' results, by name.
pub type SubTestResults = [(&'static str, Result<(), SubTestFailure>); 6];

/// The six sub-tests access.c runs after the main loop, by name, on the reference walker.
pub fn sub_tests() -> SubTestResults {
    sub_tests_on(core::array::from_fn(|_| WalkerTables::new()))
}

/// The six sub-tests, each on its own fresh tables.
pub fn sub_tests_on<T: SubTestTables>(tables: [T; 6]) -> SubTestResults {
    let [mut a, mut b, mut c, mut d, mut e, mut f] = tables;
    [
        ("corrupt_hugepage_trigger", corrupt_hugepage_trigger(&mut a)),
        (
            "check_pfec_on_prefetch_pte",
            check_pfec_on_prefetch_pte(&mut b),
        ),
        (
            "check_large_pte_dirty_for_nowp",
            check_large_pte_dirty_for_nowp(&mut c),
        ),
        ("check_smep_andnot_wp", check_smep_andnot_wp(&mut d)),
        ("check_toggle_cr0_wp", check_toggle_cr0_wp(&mut e)),
        (
            "check_effective_sp_permissions",
            check_effective_sp_permissions(&mut f),
        ),
    ]
}
