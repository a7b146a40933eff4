//! The nested hypercalls through one typed API ([`NestedHcall`], [`NestedVm::nested_hcall`])
//! and the register-level dispatch of the host layer's [`HypercallPort`] trait.
//!
//! # Register convention (r3 = opcode, r4.. = arguments; r3 = return, r4.. = outputs)
//!
//! | opcode | inputs | r3 | outputs |
//! |---|---|---|---|
//! | H_SET_PARTITION_TABLE (0xF800) | r4 = ptcr | 0, H_PARAMETER | - |
//! | H_TLB_INVALIDATE (0xF808) | r4 = tlbie image, r5 = RS, r6 = RB | 0, H_PARAMETER | - |
//! | H_ENTER_NESTED (0xF804) | r4 = l1_lpid, r5 = L2 address, r6 = access (0 load, 1 store, 2 fetch) | see below | see below |
//!
//! H_ENTER_NESTED's memory side: KVM's call takes the L2 register state by address;
//! this model passes the one access it runs. It returns:
//! * `H_SUCCESS` with r4 = L1 address, r5 = host address, r6 = 0: the access completed;
//! * `H_SUCCESS` with r4 = L1 address, r6 = 1: emulated MMIO for the L2;
//! * 0xE00 (HDSI) with r4 = HDSISR, r5 = ASDR; 0xE20 (HISI) with r4 = SRR1 cause bits,
//!   r5 = ASDR (the trap number in r3, as KVM's H_ENTER_NESTED returns it to L1);
//! * H_NOT_AVAILABLE / H_PARAMETER when the L2 cannot run; H_PARAMETER for a bad
//!   access code; H_TOO_HARD when the access livelocked; H_HARDWARE (-1) when it
//!   landed on a freed host frame (an MMU bug the checker also reports).
//!
//! Unknown opcodes return H_FUNCTION with the registers unchanged.

use crate::hcall::{
    H_ENTER_NESTED, H_FUNCTION, H_PARAMETER, H_SET_PARTITION_TABLE, H_SUCCESS, H_TLB_INVALIDATE,
    H_TOO_HARD,
};
use crate::radix::{Access, Exit};
use crate::vm::{L2Result, NestedVm};
use revmap_host::port::HypercallPort;
use revmap_rmap::VcpuId;

/// PAPR's H_HARDWARE.
pub const H_HARDWARE: i64 = -1;

/// One nested hypercall, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedHcall {
    /// H_SET_PARTITION_TABLE(ptcr).
    SetPartitionTable {
        /// L1's virtual PTCR.
        ptcr: u64,
    },
    /// H_TLB_INVALIDATE(instruction image, RS, RB).
    TlbInvalidate {
        /// The tlbie instruction image (RIC, PRS, R).
        instr: u64,
        /// RS (the LPID in its low 32 bits).
        rs: u64,
        /// RB (EPN, IS, AP).
        rb: u64,
    },
    /// H_ENTER_NESTED, memory side: one L2 access.
    EnterNested {
        /// The L2's LPID in L1's partition table.
        l1_lpid: u64,
        /// The L2 real address.
        n_gpa: u64,
        /// The access.
        access: Access,
    },
}

/// What a nested hypercall returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedHcallResult {
    /// A PAPR return code (H_SET_PARTITION_TABLE, H_TLB_INVALIDATE).
    Ret(i64),
    /// The outcome of H_ENTER_NESTED's access.
    Enter(L2Result),
}

impl NestedVm {
    /// The typed hypercall entry point.
    pub fn nested_hcall(&self, call: NestedHcall) -> NestedHcallResult {
        match call {
            NestedHcall::SetPartitionTable { ptcr } => {
                NestedHcallResult::Ret(self.h_set_partition_table(ptcr))
            }
            NestedHcall::TlbInvalidate { instr, rs, rb } => {
                NestedHcallResult::Ret(self.h_tlb_invalidate(instr, rs, rb))
            }
            NestedHcall::EnterNested {
                l1_lpid,
                n_gpa,
                access,
            } => NestedHcallResult::Enter(self.enter_nested(l1_lpid, n_gpa, access)),
        }
    }
}

/// Decodes registers r4.. of `opcode`; `Err` holds r3 for a call that is not a nested
/// hypercall (H_FUNCTION) or has a bad access code (H_PARAMETER).
pub fn decode(opcode: u64, regs: &[u64; 8]) -> Result<NestedHcall, i64> {
    Ok(match opcode {
        H_SET_PARTITION_TABLE => NestedHcall::SetPartitionTable { ptcr: regs[0] },
        H_TLB_INVALIDATE => NestedHcall::TlbInvalidate {
            instr: regs[0],
            rs: regs[1],
            rb: regs[2],
        },
        H_ENTER_NESTED => NestedHcall::EnterNested {
            l1_lpid: regs[0],
            n_gpa: regs[1],
            access: match regs[2] {
                0 => Access::Load,
                1 => Access::Store,
                2 => Access::Fetch,
                _ => return Err(H_PARAMETER),
            },
        },
        _ => return Err(H_FUNCTION),
    })
}

/// Writes `r` into the registers; returns r3.
pub fn encode(r: NestedHcallResult, regs: &mut [u64; 8]) -> i64 {
    match r {
        NestedHcallResult::Ret(r) => r,
        NestedHcallResult::Enter(e) => match e {
            L2Result::Ok { l1gpa, hpa } => {
                regs[0] = l1gpa;
                regs[1] = hpa;
                regs[2] = 0;
                H_SUCCESS
            }
            L2Result::Mmio { l1gpa } => {
                regs[0] = l1gpa;
                regs[2] = 1;
                H_SUCCESS
            }
            L2Result::Hdsi { cause, asdr } => {
                regs[0] = cause;
                regs[1] = asdr;
                Exit::HDSI_TRAP as i64
            }
            L2Result::Hisi { cause, asdr } => {
                regs[0] = cause;
                regs[1] = asdr;
                Exit::HISI_TRAP as i64
            }
            L2Result::Ret(r) => r,
            L2Result::Livelock => H_TOO_HARD,
            L2Result::StaleFrame { .. } => H_HARDWARE,
        },
    }
}

impl<'v> HypercallPort for &'v NestedVm {
    type Runs<'a>
        = &'v NestedVm
    where
        Self: 'a;

    fn vcpu_runs(&self) -> &'v NestedVm {
        self
    }

    fn hcall_regs(&mut self, _vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        match decode(opcode, regs) {
            Ok(call) => encode(self.nested_hcall(call), regs),
            Err(r) => r,
        }
    }
}
