//! Helpers shared by the nested integration tests: L1's partition table and radix tree
//! for an L2, and a host reclaim of an L1 memory range. The `nested_ops` fuzz target
//! includes this file too (`#[path]`), so it uses only the fuzz crate's dependencies.
#![allow(dead_code)]

use revmap_host::HostMmu;
use revmap_nested::access::{l1_translate, L1Layout, L2Outcome};
use revmap_nested::hcall::check_enter_nested;
use revmap_nested::radix::{Access, Exit, PateDw0, Ptcr, RadixPde, RadixPte};
use revmap_nested::vm::{L2Result, NestedVm, L1_RAM_HVA};
use revmap_nested::{GuestId, NGpa, NestedGuests};
use revmap_rmap::Hva;
use revmap_trace::nested::AccessOutcome;
use std::path::PathBuf;

/// The leaf flags L1 maps L2 pages with in the state-machine tests and the fuzz target
/// (which includes this module): R/C set or not, read, read-write or execute.
pub const FLAGS: [u64; 5] = [
    RadixPte::R | RadixPte::C | RadixPte::EAA_READ | RadixPte::EAA_RW | RadixPte::EAA_X,
    RadixPte::R | RadixPte::EAA_READ,
    RadixPte::EAA_READ | RadixPte::EAA_RW,
    RadixPte::R | RadixPte::EAA_X,
    RadixPte::R | RadixPte::EAA_READ | RadixPte::EAA_RW,
];

/// The vendored nested trace `name` (under `traces/nested`).
pub fn trace(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces/nested")
        .join(name)
}

/// Results compared against a trace: how many, how many agreed, the first that did not.
#[derive(Default, Debug)]
pub struct Tally {
    /// Results compared.
    pub checked: u64,
    /// Results that agreed with the trace.
    pub matched: u64,
    /// `trace:line: what: detail` of the first disagreement.
    pub first_mismatch: Option<String>,
}

impl Tally {
    /// Counts one comparison of trace `name` at `line`; keeps the first failure.
    pub fn check(&mut self, name: &str, line: u64, what: &str, ok: bool, detail: String) {
        self.checked += 1;
        if ok {
            self.matched += 1;
        } else if self.first_mismatch.is_none() {
            self.first_mismatch = Some(format!("{name}:{line}: {what}: {detail}"));
        }
    }

    /// [`Tally::check`] of a hypercall's return code `got` against the trace's `want`.
    pub fn ret(&mut self, name: &str, line: u64, what: &str, got: i64, want: i64) {
        self.check(
            name,
            line,
            what,
            got == want,
            format!("ret {got}, want {want}"),
        );
    }
}

/// L1's partition-table register: table at 0x1_0000, size field 4.
pub const PTCR: u64 = 0x1_0000 | 4;
/// Base of L1's partition table (the address in [`PTCR`]).
pub const PATB: u64 = 0x1_0000;

/// What L1's tables say an access by L2 `lpid` (tree at [`root`]) at `n` gives, by
/// KVM L0's rules as the trace reference model computes them (`access::l1_translate`,
/// no shadow state), with `ram_bytes` of L1 RAM on 64 KiB L0 pages. A completed access
/// has `hpa` 0: the caller checks the host frame itself.
pub fn l1_expected(vm: &NestedVm, ram_bytes: u64, lpid: u64, n: NGpa, acc: Access) -> L2Result {
    let layout = L1Layout {
        ram_bytes,
        l0_page_shift: 16,
    };
    let root = PateDw0::radix52(root(lpid), 13);
    match vm.with_l1_memory(|m| l1_translate(&*m, root, n, acc, layout)) {
        L2Outcome::Complete(t) => L2Result::Ok {
            l1gpa: t.raddr.0,
            hpa: 0,
        },
        L2Outcome::Mmio(g) => L2Result::Mmio { l1gpa: g.0 },
        L2Outcome::Exit(e @ (Exit::Hdsi { .. } | Exit::Hisi { .. })) => e.into(),
    }
}

/// L1 addresses of one L2's radix tree: root, PUD, PMD and PTE tables.
#[derive(Clone, Copy, Debug)]
pub struct Tree {
    /// Root (PGD) table.
    pub root: u64,
    /// Upper directory.
    pub pud: u64,
    /// Middle directory.
    pub pmd: u64,
    /// PTE table (64 KiB pages, 5 index bits).
    pub pte: u64,
}

/// Root table of `lpid` in the spaced layout ([`Tree::spaced`]).
pub fn root(lpid: u64) -> u64 {
    0x10_0000 * (lpid + 1)
}

impl Tree {
    /// The spaced layout (1 GiB of L1 RAM): root at [`root`], PUD, PMD and PTE tables
    /// 0x2_0000, 0x3_0000 and 0x4_0000 above it.
    pub fn spaced(lpid: u64) -> Self {
        let root = root(lpid);
        Self {
            root,
            pud: root + 0x2_0000,
            pmd: root + 0x3_0000,
            pte: root + 0x4_0000,
        }
    }

    /// The compact layout (1 MiB of L1 RAM, lpids from 1): roots 64 KiB apart from
    /// 128 KiB, each lpid's three directories in 12 KiB from 320 KiB.
    pub fn compact(lpid: u64) -> Self {
        let dirs = 0x5_0000 + 0x3000 * (lpid - 1);
        Self {
            root: 0x2_0000 + 0x1_0000 * (lpid - 1),
            pud: dirs,
            pmd: dirs + 0x1000,
            pte: dirs + 0x2000,
        }
    }
}

/// Writes L1's partition-table entry for `lpid` and the directory chain of `t` down to
/// its PTE table (64K geometry: 13/9/9/5 index bits). The PTEs are left to the caller.
pub fn l1_tree(vm: &NestedVm, lpid: u64, t: Tree) {
    vm.l1_store(PATB + 16 * lpid, PateDw0::radix52(t.root, 13).bits())
        .unwrap();
    vm.l1_store(t.root, RadixPde::new(t.pud, 9).bits()).unwrap();
    vm.l1_store(t.pud, RadixPde::new(t.pmd, 9).bits()).unwrap();
    vm.l1_store(t.pmd, RadixPde::new(t.pte, 5).bits()).unwrap();
}

/// The host reclaims L1 memory [`gpa`, `gpa + len`) and pages it back in: the notifier
/// pair around the unmap, as the host's reclaim path runs it.
pub fn host_unmap(vm: &NestedVm, gpa: u64, len: u64) {
    host_reclaim(vm, Hva(L1_RAM_HVA + gpa), Hva(L1_RAM_HVA + gpa + len));
}

/// [`host_unmap`] of the host range [`a`, `b`).
pub fn host_reclaim(vm: &NestedVm, a: Hva, b: Hva) {
    vm.invalidate_range_start(a, b);
    vm.unmap_hva_range(a, b);
    vm.invalidate_range_end(a, b);
    vm.host_page_in(a, b);
}

/// H_ENTER_NESTED's checks, then the L2 guest's lookup (created if new): its id, or
/// the hypercall return that rejects the access.
pub fn enter_l2(
    guests: &mut NestedGuests,
    ptcr: Ptcr,
    lpid: u64,
) -> Result<GuestId, AccessOutcome> {
    match check_enter_nested(ptcr, lpid)
        .map_err(Into::into)
        .and_then(|_| guests.get(lpid, ptcr, true))
    {
        Ok(Some(id)) => Ok(id),
        Ok(None) => unreachable!("create = true"),
        Err(e) => Err(AccessOutcome::Ret(e.papr())),
    }
}
