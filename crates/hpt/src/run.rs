//! The vCPU run handle: KVM's model of a vCPU that is "in the guest" for a whole run
//! and is kicked out when the hypervisor must stop the world.
//!
//! [`Vm::vcpu_run`] enters the vCPU gate (`resize::cell`) once and pins the current
//! table generation and the current memslot snapshot. Each
//! [`VcpuRun::hcall_regs`] then only compares one `Relaxed` load of the VM's state
//! word with the value pinned at entry; if it changed (a resize commit closed the gate
//! or pivoted, or a memslot publication kicked), the handle re-pins on a cold path:
//! leave the gate, wait until it is open, re-enter, reload table and snapshot.
//!
//! [`VcpuRuns`] is the same for several vCPUs driven by one thread (the replay): they
//! share one pin and re-pin together.
//!
//! # Invariants
//!
//! * While a handle is pinned its gate word reads "in": a resize commit waits for it
//!   (it re-pins at its next hypercall), so the pinned table is the current one for
//!   every hypercall made through the handle.
//! * The pinned memslot snapshot is a counted reference: a memslot publication kicks
//!   and then waits until it is dropped, which the handle does at its next hypercall
//!   (or when it is paused or dropped). After the publication returns no hypercall
//!   runs on the old snapshot.
//! * The resize hypercalls run with the handle out of the gate (paused), so a COMMIT
//!   through a handle never waits for that handle; it re-enters lazily.
//! * Liveness: a thread holding a pinned handle must keep making hypercalls through
//!   it, or [`pause`](VcpuRun::pause) / drop it, before blocking on anything a commit
//!   or a memslot update waits for (as a real vCPU thread must service its kick).
//!   A single thread driving several handles (the replay) pauses the others before a
//!   resize hypercall ([`VcpuRun::pause`]).
//! * One handle per vCPU id at a time, and no [`Vm::hcall`] for that id while it
//!   exists (they share the gate word).

use crate::error::PaprError;
use crate::resize::cell::{TableCell, OUT_OF_GATE};
use crate::table::Hpt;
use crate::vm::{is_resize_opcode, HcallResult, Vm};
use revmap_host::port::HypercallPort;
use revmap_host::Memslots;
use revmap_rmap::sync::Arc;
use revmap_rmap::VcpuId;

/// A set of vCPUs driven by one thread (the replay: one run per trace cpu id), each in
/// the guest for a run of hypercalls. They share one pinned table and memslot snapshot
/// (all re-pin together); a vCPU enters the gate lazily at its first hypercall.
#[must_use = "dropping the runs leaves the gate"]
#[derive(Debug)]
pub struct VcpuRuns<'vm> {
    vm: &'vm Vm,
    /// Bit `i`: the gate word of vCPU `i` reads "in" for us.
    entered: u64,
    /// The state word seen at the last (re)pin, or [`OUT_OF_GATE`] when none entered.
    pinned: u64,
    hpt: &'vm Hpt,
    slots: Arc<Memslots>,
}

/// One vCPU inside the guest for a run of hypercalls (module docs); leaves the gate
/// when dropped.
#[must_use = "dropping the run handle leaves the gate"]
#[derive(Debug)]
pub struct VcpuRun<'vm> {
    runs: VcpuRuns<'vm>,
    vcpu: VcpuId,
}

impl Vm {
    /// Enter the guest as vCPU `vcpu` for a run of hypercalls (module docs). Waits while
    /// a resize commit has the gate closed.
    pub fn vcpu_run(&self, vcpu: VcpuId) -> VcpuRun<'_> {
        let mut runs = self.vcpu_runs();
        runs.enter(vcpu);
        VcpuRun { runs, vcpu }
    }

    /// A set of run handles for vCPUs driven by the calling thread, entering lazily.
    pub fn vcpu_runs(&self) -> VcpuRuns<'_> {
        VcpuRuns {
            vm: self,
            entered: 0,
            pinned: OUT_OF_GATE,
            hpt: self.hpt(),
            slots: Arc::clone(self.empty_slots()),
        }
    }
}

impl<'vm> VcpuRuns<'vm> {
    /// The VM.
    #[inline]
    pub fn vm(&self) -> &'vm Vm {
        self.vm
    }

    /// Whether vCPU `vcpu` is inside the gate (entered and not paused).
    #[inline]
    pub fn is_pinned(&self, vcpu: VcpuId) -> bool {
        self.entered & vcpu.bit() != 0
    }

    /// One hypercall of vCPU `vcpu`, as [`Vm::hcall_regs`] but on the pinned table
    /// and memslot snapshot: the per-call cost of the gate is a bit test and one
    /// `Relaxed` load compared with the pinned state. Always inlined: the gate check
    /// and the opcode dispatch then sit in the caller's loop, without a call of their
    /// own per hypercall.
    #[inline(always)]
    pub fn hcall_regs(&mut self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        PaprError::code_of(self.call(vcpu, opcode, regs))
    }

    /// [`hcall_regs`](Self::hcall_regs) with the result typed (the typed hypercalls).
    #[inline(always)]
    pub(crate) fn call(
        &mut self,
        vcpu: VcpuId,
        opcode: u64,
        regs: &mut [u64; 8],
    ) -> Result<(), PaprError> {
        if is_resize_opcode(opcode) {
            // Out of the guest for the resize calls: a COMMIT must not wait for us.
            self.pause();
            return self.vm.resize_hcall(opcode, regs[0], regs[1]);
        }
        if self.entered & vcpu.bit() == 0 || self.vm.tables().state_relaxed() != self.pinned {
            self.enter(vcpu);
        }
        self.vm.dispatch(self.hpt, &self.slots, opcode, regs)
    }

    /// One hypercall with arguments as a slice (as [`Vm::hcall`]).
    #[inline]
    pub fn hcall(&mut self, vcpu: VcpuId, opcode: u64, args: &[u64]) -> HcallResult {
        let mut out = [0u64; 8];
        let n = args.len().min(out.len());
        out[..n].copy_from_slice(&args[..n]);
        let ret = self.hcall_regs(vcpu, opcode, &mut out);
        HcallResult { ret, out }
    }

    /// Leave the gate with every vCPU until its next hypercall (they exit to the host:
    /// before the thread blocks, or around a resize call). The memslot snapshot is
    /// dropped too, so neither a commit nor a memslot update waits for these runs.
    pub fn pause(&mut self) {
        if self.entered == 0 {
            return;
        }
        let tables = self.vm.tables();
        let mut e = self.entered;
        while e != 0 {
            let i = e.trailing_zeros() as usize;
            e &= e - 1;
            // `entered` only holds bits of valid ids, so `new` always succeeds.
            if let Ok(v) = VcpuId::new(i) {
                TableCell::leave_gate(tables.vcpu_gate(v));
            }
        }
        self.entered = 0;
        self.pinned = OUT_OF_GATE;
        self.slots = Arc::clone(self.vm.empty_slots());
    }

    /// The cold path: (re)enter vCPU `vcpu`. If anything was kicked since the pin,
    /// every vCPU leaves first and the pin is rebuilt (table and memslot snapshot).
    #[cold]
    #[inline(never)]
    fn enter(&mut self, vcpu: VcpuId) {
        let tables = self.vm.tables();
        let gate = tables.vcpu_gate(vcpu);
        let bit = vcpu.bit();
        loop {
            if self.entered != 0 && tables.state_relaxed() != self.pinned {
                self.pause();
            }
            if self.entered & bit != 0 {
                return;
            }
            let s = tables.enter_gate(gate);
            if self.entered == 0 {
                self.entered = bit;
                self.pinned = s;
                self.hpt = tables.table_of(s);
                // Loaded after the SeqCst state load that saw any earlier kick: a
                // publication that kicked before it is visible here (`TableCell::kick`).
                self.slots = self.vm.slot_set().load_full();
                return;
            }
            if s == self.pinned {
                // Nothing changed since the pin (and our other vCPUs kept the gate
                // from pivoting): join it.
                self.entered |= bit;
                return;
            }
            TableCell::leave_gate(gate);
            self.pause();
        }
    }
}

impl Drop for VcpuRuns<'_> {
    fn drop(&mut self) {
        self.pause();
    }
}

impl<'vm> VcpuRun<'vm> {
    /// The VM.
    #[inline]
    pub fn vm(&self) -> &'vm Vm {
        self.runs.vm
    }

    /// The vCPU id.
    #[inline]
    pub fn vcpu(&self) -> VcpuId {
        self.vcpu
    }

    /// Whether the handle is inside the gate (not paused).
    #[inline]
    pub fn is_pinned(&self) -> bool {
        self.runs.is_pinned(self.vcpu)
    }

    /// One hypercall, as [`Vm::hcall_regs`] but on the pinned table and memslot
    /// snapshot (see [`VcpuRuns::hcall_regs`]).
    #[inline]
    pub fn hcall_regs(&mut self, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        self.runs.hcall_regs(self.vcpu, opcode, regs)
    }

    /// One hypercall with arguments as a slice (as [`Vm::hcall`]).
    #[inline]
    pub fn hcall(&mut self, opcode: u64, args: &[u64]) -> HcallResult {
        self.runs.hcall(self.vcpu, opcode, args)
    }

    /// Leave the gate until the next hypercall (see [`VcpuRuns::pause`]).
    pub fn pause(&mut self) {
        self.runs.pause();
    }
}

/// The VM as a hypercall port (the owner's view; the shared `&Vm` below is the same):
/// each call enters and leaves the guest on its own ([`Vm::hcall_regs`]);
/// [`vcpu_runs`](HypercallPort::vcpu_runs) starts a pinned run ([`VcpuRuns`]).
impl HypercallPort for Vm {
    type Runs<'a> = VcpuRuns<'a>;

    #[inline]
    fn vcpu_runs(&self) -> VcpuRuns<'_> {
        Vm::vcpu_runs(self)
    }

    #[inline(always)]
    fn hcall_regs(&mut self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        let mut shared: &Vm = self;
        HypercallPort::hcall_regs(&mut shared, vcpu, opcode, regs)
    }
}

/// A [`HypercallPort`] impl whose runs are [`VcpuRuns<'vm>`]: `vcpu_runs` is `$runs`
/// on `self`, `hcall_regs` is `$call` on `(self, vcpu, opcode, regs)` and `pause` (if
/// given) is `$pause` on `self`.
macro_rules! port_with_runs {
    (
        $(#[$doc:meta])* $ty:ty,
        runs: |$r:ident| $runs:expr,
        call: |$s:ident, $vcpu:pat_param, $op:ident, $regs:ident| $call:expr
        $(, pause: |$p:ident| $pause:expr)? $(,)?
    ) => {
        $(#[$doc])*
        impl<'vm> HypercallPort for $ty {
            type Runs<'a>
                = VcpuRuns<'vm>
            where
                Self: 'a;

            /// A new, separate set of runs on the same VM.
            #[inline]
            fn vcpu_runs(&self) -> VcpuRuns<'vm> {
                let $r = self;
                $runs
            }

            #[inline(always)]
            fn hcall_regs(&mut self, $vcpu: VcpuId, $op: u64, $regs: &mut [u64; 8]) -> i64 {
                let $s = self;
                $call
            }

            $(
                #[inline]
                fn pause(&mut self) {
                    let $p = self;
                    $pause
                }
            )?
        }
    };
}

port_with_runs!(
    /// The VM as a hypercall port: each call enters and leaves the guest on its own
    /// ([`Vm::hcall_regs`]); [`vcpu_runs`](HypercallPort::vcpu_runs) starts a pinned run
    /// ([`VcpuRuns`]).
    &'vm Vm,
    runs: |s| Vm::vcpu_runs(s),
    call: |s, vcpu, opcode, regs| PaprError::code_of(s.call(vcpu, opcode, regs)),
);

port_with_runs!(
    /// Several vCPUs of one thread in the guest ([`VcpuRuns::hcall_regs`]).
    VcpuRuns<'vm>,
    runs: |s| s.vm().vcpu_runs(),
    call: |s, vcpu, opcode, regs| VcpuRuns::hcall_regs(s, vcpu, opcode, regs),
    pause: |s| VcpuRuns::pause(s),
);

port_with_runs!(
    /// One vCPU in the guest: every call is made as the handle's vCPU, whatever `vcpu`
    /// says ([`VcpuRun::hcall_regs`]).
    VcpuRun<'vm>,
    runs: |s| s.vm().vcpu_runs(),
    call: |s, _, opcode, regs| VcpuRun::hcall_regs(s, opcode, regs),
    pause: |s| VcpuRun::pause(s),
);
