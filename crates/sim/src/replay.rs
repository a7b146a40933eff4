//! Replay of real-guest HPT hypercall traces against a hypervisor implementation.
//!
//! A trace file starts with `HPT_ALLOC shift=S`; the engine then creates a fresh VM
//! (guest RAM of 2^(S + 7) bytes at gpa 0, HPT order S) and replays every hypercall
//! record in order, `cpu=` as the vCPU, comparing the return code and every recorded
//! output register with what the VM returned.
//!
//! Invariants:
//! * The return code is always compared bit-exactly. An output register is compared
//!   after ignoring exactly the bits of [`ReplayTarget::result_masks`] for that opcode and
//!   register (empty for a bit-exact flavour); every mask that hid a difference is
//!   counted by name.
//! * A call is *matched* iff its return code and every recorded output agree;
//!   `calls == matched + mismatched` always.
//! * Resize records are replayed: a PREPARE whose recorded result is a long-busy code
//!   is matched by long-busy or H_SUCCESS (how many 9902s appear depends on timing);
//!   before a PREPARE recorded as H_SUCCESS the replayer waits for the preparation to
//!   finish ([`ReplayTarget::wait_resize_prepared`]); `HPT_SHIFT` records are checked
//!   against the VM's order (streaming mode; a disagreement counts as a mismatched
//!   COMMIT).
//! * `HW_SET_R` / `HW_SET_C` records (the MMU set R or C) are replayed through
//!   [`ReplayTarget::hw_set_rc`] and judged like a call: the guest's view of dword 1
//!   afterwards must equal the recorded `pte1` with the bit set (`pte1` is the word the
//!   MMU read or wrote; either way that is the result), under H_READ's dword-1 masks.
//!   They count in `calls` (records replayed).
//! * With [`ReplayOptions::check_every`] = N the whole-VM checker runs after every N-th
//!   call and once at the end (or at the stop record); each failed check counts one
//!   violation.
//! * The pre-parsed hot loop ([`replay_preparsed`]) neither allocates nor formats
//!   except on a mismatch, a violation, or the first use of a mask name.

use core::fmt;
use revmap_hpt::hcall::{H_NOT_FOUND, H_READ, H_SUCCESS};
use revmap_hpt::hpte::HpteR;
use revmap_trace::{HcallKind, HwBit, Record, TraceError, TraceReader};
use std::io::BufRead;
use std::num::NonZeroU64;
use std::path::Path;
use std::time::Instant;
use thiserror::Error;

pub use self::vm::{
    new_vm, HcallResult, HypercallPort, ReplayTarget, ResultMask, VmSpec, REPLAY_BACKING_PAGE_SHIFT,
};
pub use revmap_hpt::{Flavour, HptError, Vm};
use revmap_hpt::{Ptex, VcpuId, VcpuIdError};

mod vm;

/// Options of one replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayOptions {
    /// Run the whole-VM checker after every N-th call and at the end.
    pub check_every: Option<NonZeroU64>,
}

/// A failure that prevents replaying a file at all (as opposed to a mismatch).
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The trace could not be read or parsed.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// A hypercall (or resize record) before the file's `HPT_ALLOC`.
    #[error("{file}:{line}: {record} before HPT_ALLOC")]
    NoAlloc {
        /// File name.
        file: String,
        /// 1-based line number.
        line: u64,
        /// Record name.
        record: &'static str,
    },
    /// A second `HPT_ALLOC` in one file.
    #[error("{file}:{line}: second HPT_ALLOC in one trace")]
    SecondAlloc {
        /// File name.
        file: String,
        /// 1-based line number.
        line: u64,
    },
    /// The file ended without any `HPT_ALLOC`.
    #[error("{file}: no HPT_ALLOC record")]
    Empty {
        /// File name.
        file: String,
    },
    /// The VM could not be created for the trace's `HPT_ALLOC`.
    #[error("{file}:{line}: cannot create a VM with HPT order {order}: {message}")]
    Vm {
        /// File name.
        file: String,
        /// 1-based line number of the `HPT_ALLOC`.
        line: u64,
        /// The requested HPT order.
        order: u32,
        /// The VM's error.
        message: String,
    },
    /// A call from a vCPU number the VM does not support (at or past
    /// [`revmap_hpt::MAX_VCPUS`]).
    #[error("{file}:{line}: {error}")]
    Vcpu {
        /// File name.
        file: String,
        /// 1-based line number.
        line: u64,
        /// The rejected id.
        error: VcpuIdError,
    },
    /// A record the pre-parsed form cannot hold (e.g. a vCPU number above 2^24).
    #[error("{file}:{line}: {what}")]
    Unrepresentable {
        /// File name.
        file: String,
        /// 1-based line number.
        line: u64,
        /// What is out of range.
        what: &'static str,
    },
    /// Memory for the pre-parsed trace could not be allocated.
    #[error("{file}: out of memory pre-parsing the trace")]
    OutOfMemory {
        /// File name.
        file: String,
    },
}

/// Which result field differed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The return code (r3).
    Ret,
    /// Output register `r(4 + i)`.
    Out(u8),
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Ret => f.write_str("ret"),
            Field::Out(i) => write!(f, "r{}", 4 + u32::from(*i)),
        }
    }
}

/// The first disagreement of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// 1-based line number of the call in the trace.
    pub line: u64,
    /// The hypercall's opcode.
    pub opcode: u64,
    /// Which field differed first (ret, then r4, r5, ...).
    pub field: Field,
    /// The recorded value (the return code as its two's-complement bits).
    pub expected: u64,
    /// What the VM returned.
    pub got: u64,
}

impl Mismatch {
    /// The hypercall's PAPR name.
    pub fn hcall_name(&self) -> &'static str {
        match self.opcode {
            HW_SET_R_OP => "HW_SET_R",
            HW_SET_C_OP => "HW_SET_C",
            op => HcallKind::from_opcode(op).map_or("H_UNKNOWN", HcallKind::name),
        }
    }

    /// The recorded value formatted as in the trace (decimal ret, hex registers).
    pub fn expected_str(&self) -> String {
        self.fmt_value(self.expected)
    }

    /// The VM's value formatted as in the trace.
    pub fn got_str(&self) -> String {
        self.fmt_value(self.got)
    }

    fn fmt_value(&self, v: u64) -> String {
        match self.field {
            // The return code is carried as the bits of an i64.
            Field::Ret => (v as i64).to_string(),
            Field::Out(_) => format!("{v:#x}"),
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {} {}: expected {}, got {}",
            self.line,
            self.hcall_name(),
            self.field,
            self.expected_str(),
            self.got_str()
        )
    }
}

/// Why a replay stopped before the end of its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An HPT resize record (`H_RESIZE_HPT_PREPARE/COMMIT`, `HPT_SHIFT`).
    Resize,
    /// A `HW_SET_R` / `HW_SET_C` record (no longer produced: they are replayed).
    HwSet,
}

/// Where and why a replay stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stop {
    /// 1-based line number of the record.
    pub line: u64,
    /// The record's name as in the trace.
    pub record: &'static str,
    /// Why.
    pub reason: StopReason,
}

impl Stop {
    /// Whether the stop is the expected one for this issue (a resize record), which
    /// does not fail a replay.
    pub fn is_resize(&self) -> bool {
        self.reason == StopReason::Resize
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.reason {
            StopReason::Resize => "HPT resizing lands with the resize issue",
            StopReason::HwSet => "MMU-side R/C updates are not modelled by the replay",
        };
        write!(
            f,
            "{} at line {}: not yet supported ({why})",
            self.record, self.line
        )
    }
}

/// Counts of mask applications, by mask name, in first-use order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MaskCounts(Vec<(&'static str, u64)>);

impl MaskCounts {
    #[inline]
    fn bump(&mut self, name: &'static str) {
        if let Some(e) = self.index_of(name).and_then(|i| self.0.get_mut(i)) {
            e.1 += 1;
        } else {
            // First use of this name; at most a handful per replay.
            self.0.push((name, 1));
        }
    }

    /// Where `name` is counted, if it was applied yet.
    #[inline]
    fn index_of(&self, name: &'static str) -> Option<usize> {
        // Names are 'static: pointer equality is the fast path, text equality the rule.
        self.0
            .iter()
            .position(|e| core::ptr::eq(e.0, name) || e.0 == name)
    }

    /// (name, count) pairs in first-use order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.0.iter().copied()
    }

    /// The count for `name` (0 if never applied).
    pub fn get(&self, name: &str) -> u64 {
        self.0.iter().find(|e| e.0 == name).map_or(0, |e| e.1)
    }

    /// Whether no mask was applied.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The outcome of replaying one file.
#[derive(Clone, Debug, PartialEq)]
pub struct FileReport {
    /// The file name.
    pub file: String,
    /// The HPT order of the file's `HPT_ALLOC`.
    pub hpt_order: u32,
    /// Hypercalls replayed.
    pub calls: u64,
    /// Calls whose results all agreed (after masks).
    pub matched: u64,
    /// Calls with at least one disagreeing field.
    pub mismatched: u64,
    /// The first disagreement.
    pub first_mismatch: Option<Mismatch>,
    /// Masks that hid a difference, with how many output registers each excused.
    pub masks_applied: MaskCounts,
    /// Checker runs.
    pub checks: u64,
    /// Checker runs that reported a violation.
    pub invariant_violations: u64,
    /// The first violation, formatted, with the call count at which it was seen.
    pub first_violation: Option<String>,
    /// Where the replay stopped early, if it did.
    pub stopped_at: Option<Stop>,
    /// Wall-clock seconds of the replay (including parsing in streaming mode).
    pub seconds: f64,
}

impl FileReport {
    fn new(file: &str, hpt_order: u32) -> Self {
        FileReport {
            file: file.to_owned(),
            hpt_order,
            calls: 0,
            matched: 0,
            mismatched: 0,
            first_mismatch: None,
            masks_applied: MaskCounts::default(),
            checks: 0,
            invariant_violations: 0,
            first_violation: None,
            stopped_at: None,
            seconds: 0.0,
        }
    }

    /// Every call matched, no violation, and the replay either finished or stopped at a
    /// resize record.
    pub fn passed(&self) -> bool {
        self.mismatched == 0
            && self.invariant_violations == 0
            && self.stopped_at.is_none_or(|s| s.is_resize())
    }

    /// Calls per second (0 if no time elapsed).
    pub fn calls_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.calls as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Judges one call's result. `outs` yields the recorded outputs in register order
    /// for each bit set in `present`. Returns the first differing field, if any.
    #[inline(always)]
    fn judge<H: ReplayTarget>(
        &mut self,
        vm: &H,
        opcode: u64,
        exp_ret: i64,
        present: u8,
        mut outs: impl FnMut(usize) -> u64,
        (got_ret, got_out): (i64, &[u64; 8]),
    ) -> Option<(Field, u64, u64)> {
        self.calls += 1;
        let mut first = None;
        if got_ret != exp_ret {
            // Return codes are compared as their two's-complement bits.
            first = Some((Field::Ret, exp_ret as u64, got_ret as u64));
        }
        let mut bits = present;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let e = outs(i);
            let g = got_out[i];
            if e != g && !self.excused(vm, opcode, i, e ^ g) && first.is_none() {
                first = Some((Field::Out(i as u8), e, g));
            }
        }
        if first.is_none() {
            self.matched += 1;
        } else {
            self.mismatched += 1;
        }
        first
    }

    /// Whether `diff` on output `i` lies entirely within the documented masks; if so,
    /// counts each mask that covers part of it. (Hot under KVM: QEMU's 0x40 bit differs
    /// on every H_REMOVE.)
    #[inline]
    fn excused<H: ReplayTarget>(&mut self, vm: &H, opcode: u64, i: usize, diff: u64) -> bool {
        let masks = vm.result_masks(opcode, i);
        let allowed = masks.iter().fold(0, |a, m| a | m.mask);
        if diff & !allowed != 0 {
            return false;
        }
        for m in masks {
            if diff & m.mask != 0 {
                self.masks_applied.bump(m.name);
            }
        }
        true
    }

    /// One more call judged a match (bit-exact, or every difference excused), counted
    /// as [`judge`](Self::judge) counts it.
    #[inline(always)]
    fn count_matched(&mut self) {
        self.calls += 1;
        self.matched += 1;
    }

    fn record_mismatch(&mut self, line: u64, opcode: u64, f: Option<(Field, u64, u64)>) {
        if let (None, Some((field, expected, got))) = (&self.first_mismatch, f) {
            self.first_mismatch = Some(Mismatch {
                line,
                opcode,
                field,
                expected,
                got,
            });
        }
    }

    #[inline]
    fn maybe_check<H: ReplayTarget>(&mut self, vm: &H, opts: &ReplayOptions) {
        if let Some(n) = opts.check_every {
            if self.calls % n.get() == 0 {
                self.check(vm);
            }
        }
    }

    #[cold]
    fn check<H: ReplayTarget>(&mut self, vm: &H) {
        self.checks += 1;
        if let Err(v) = vm.check_invariants() {
            self.invariant_violations += 1;
            if self.first_violation.is_none() {
                self.first_violation = Some(format!("after call {}: {v}", self.calls));
            }
        }
    }

    fn finish<H: ReplayTarget>(&mut self, vm: &H, opts: &ReplayOptions, start: Instant) {
        if opts.check_every.is_some() {
            self.check(vm);
        }
        self.seconds = start.elapsed().as_secs_f64();
    }
}

fn vm_spec(file: &str, line: u64, shift: u32) -> Result<VmSpec, ReplayError> {
    if !(1..=56).contains(&shift) {
        return Err(ReplayError::Vm {
            file: file.to_owned(),
            line,
            order: shift,
            message: "HPT order out of range".into(),
        });
    }
    Ok(VmSpec {
        ram_bytes: 1u64 << (shift + 7),
        hpt_order: shift,
    })
}

fn make<H, E: fmt::Display>(
    file: &str,
    line: u64,
    shift: u32,
    make_vm: impl FnOnce(VmSpec) -> Result<H, E>,
) -> Result<H, ReplayError> {
    let spec = vm_spec(file, line, shift)?;
    make_vm(spec).map_err(|e| ReplayError::Vm {
        file: file.to_owned(),
        line,
        order: shift,
        message: e.to_string(),
    })
}

fn no_alloc(file: &str, r: &Record) -> ReplayError {
    let record = match r {
        Record::Hcall(h) => h.kind.name(),
        Record::HptShift { .. } => "HPT_SHIFT",
        Record::HwSet(_) => "HW_SET",
        Record::HptAlloc { .. } => "HPT_ALLOC",
    };
    ReplayError::NoAlloc {
        file: file.to_owned(),
        line: r.line(),
        record,
    }
}

/// Replays a trace file, streaming (parse one record, replay it, repeat). `make_vm` is
/// called once, on the file's `HPT_ALLOC`.
pub fn replay_file<H, E>(
    path: impl AsRef<Path>,
    opts: &ReplayOptions,
    make_vm: impl FnOnce(VmSpec) -> Result<H, E>,
) -> Result<FileReport, ReplayError>
where
    H: ReplayTarget,
    E: fmt::Display,
{
    let mut reader = TraceReader::open(path)?;
    replay_reader(&mut reader, opts, make_vm)
}

/// Replays from an open reader, streaming. See [`replay_file`].
pub fn replay_reader<R, H, E>(
    reader: &mut TraceReader<R>,
    opts: &ReplayOptions,
    make_vm: impl FnOnce(VmSpec) -> Result<H, E>,
) -> Result<FileReport, ReplayError>
where
    R: BufRead,
    H: ReplayTarget,
    E: fmt::Display,
{
    let start = Instant::now();
    let file = reader.file().to_owned();
    // Everything before HPT_ALLOC: only comments are allowed.
    let (line, shift) = match reader.next_record()? {
        Some(Record::HptAlloc { line, shift }) => (line, shift),
        Some(r) => return Err(no_alloc(&file, &r)),
        None => return Err(ReplayError::Empty { file }),
    };
    let vm = make(&file, line, shift, make_vm)?;
    let rep = FileReport::new(&file, shift);
    // One run per cpu id for the whole file (KVM's vCPU runs,
    // `HypercallPort::vcpu_runs`), left before the final check.
    let mut runs = vm.vcpu_runs();
    let r = stream_loop(reader, rep, file, opts, &vm, &mut runs);
    drop(runs);
    let mut rep = r?;
    rep.finish(&vm, opts, start);
    Ok(rep)
}

/// The streaming replay loop over the records after `HPT_ALLOC`, issuing the calls
/// through `port`.
fn stream_loop<R: BufRead, H: ReplayTarget, P: HypercallPort>(
    reader: &mut TraceReader<R>,
    mut rep: FileReport,
    file: String,
    opts: &ReplayOptions,
    vm: &H,
    port: &mut P,
) -> Result<FileReport, ReplayError> {
    {
        while let Some(rec) = reader.next_record()? {
            match rec {
                Record::Hcall(h) => {
                    if resize_waits(h.opcode(), h.expected.ret) {
                        vm.wait_resize_prepared();
                    }
                    let vcpu = VcpuId::try_from(h.cpu).map_err(|error| ReplayError::Vcpu {
                        file: file.clone(),
                        line: h.line,
                        error,
                    })?;
                    let got = port.hcall(vcpu, h.opcode(), h.args());
                    let outs = &h.expected.outs;
                    let f = rep.judge(
                        vm,
                        h.opcode(),
                        resize_expected(h.opcode(), h.expected.ret, got.ret),
                        h.expected.present,
                        |i| outs.get(i).copied().unwrap_or(0),
                        (got.ret, &got.out),
                    );
                    if f.is_some() {
                        rep.record_mismatch(h.line, h.opcode(), f);
                    }
                    rep.maybe_check(vm, opts);
                }
                Record::HwSet(hw) => {
                    let op = hw_op(hw.bit);
                    let mut regs = [hw.ptex, 0, 0, 0, 0, 0, 0, 0];
                    let got = replay_hw_set(vm, op, hw.ptex, &mut regs);
                    let want = hw.pte1_after();
                    let f = rep.judge(vm, H_READ, H_SUCCESS, 0b10, |_| want, (got, &regs));
                    if f.is_some() {
                        rep.record_mismatch(hw.line, op, f);
                    }
                    rep.maybe_check(vm, opts);
                }
                Record::HptAlloc { line, .. } => {
                    return Err(ReplayError::SecondAlloc { file, line });
                }
                Record::HptShift { line, new, .. } => {
                    if let Some(got) = vm.hpt_order() {
                        if got != new {
                            rep.calls += 1;
                            rep.mismatched += 1;
                            rep.record_mismatch(
                                line,
                                H_RESIZE_HPT_COMMIT,
                                Some((Field::Ret, u64::from(new), u64::from(got))),
                            );
                        }
                    }
                }
            }
        }
        Ok(rep)
    }
}

/// The header word of one call in a [`PreparsedTrace`].
///
/// Layout (LSB 0): bits 0..16 opcode, bits 16..40 vCPU, bits 40..44 number of input
/// registers, bits 48..56 the present-output mask. It is followed in the word stream by
/// the return code (as i64 bits), `nargs` input words and one word per present output,
/// in register order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct PackedCall(pub u64);

impl PackedCall {
    /// Opcode field (16 bits).
    pub const OPCODE_MASK: u64 = 0xffff;
    /// vCPU field shift.
    pub const CPU_SHIFT: u32 = 16;
    /// vCPU field width mask (24 bits).
    pub const CPU_MASK: u64 = 0xff_ffff;
    /// nargs field shift.
    pub const NARGS_SHIFT: u32 = 40;
    /// present-mask field shift.
    pub const PRESENT_SHIFT: u32 = 48;

    /// Packs the fields; `None` if the opcode or vCPU does not fit or nargs > 8.
    pub fn new(opcode: u64, cpu: u32, nargs: u8, present: u8) -> Option<PackedCall> {
        if opcode > Self::OPCODE_MASK || u64::from(cpu) > Self::CPU_MASK || nargs > 8 {
            return None;
        }
        Some(PackedCall(
            opcode
                | (u64::from(cpu) << Self::CPU_SHIFT)
                | (u64::from(nargs) << Self::NARGS_SHIFT)
                | (u64::from(present) << Self::PRESENT_SHIFT),
        ))
    }

    /// The PAPR opcode.
    #[inline(always)]
    pub const fn opcode(self) -> u64 {
        self.0 & Self::OPCODE_MASK
    }

    /// The vCPU.
    #[inline(always)]
    pub const fn cpu(self) -> usize {
        ((self.0 >> Self::CPU_SHIFT) & Self::CPU_MASK) as usize
    }

    /// Number of input registers.
    #[inline(always)]
    pub const fn nargs(self) -> usize {
        ((self.0 >> Self::NARGS_SHIFT) & 0xf) as usize
    }

    /// Which outputs were recorded (bit i = r(4 + i)).
    #[inline(always)]
    pub const fn present(self) -> u8 {
        (self.0 >> Self::PRESENT_SHIFT) as u8
    }
}

/// A whole trace file parsed up front into a compact word stream, for benchmarks: the
/// replay loop then does no parsing, allocation or formatting.
#[derive(Clone, Debug)]
pub struct PreparsedTrace {
    file: String,
    alloc_line: u64,
    hpt_order: u32,
    words: Vec<u64>,
    /// Line number of each call, by call ordinal (read only on a mismatch).
    lines: Vec<u64>,
    stop: Option<Stop>,
}

impl PreparsedTrace {
    /// Parses `path` up to its end or its first unsupported record.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReplayError> {
        let mut reader = TraceReader::open(path)?;
        Self::from_reader(&mut reader)
    }

    /// Parses from an open reader. See [`PreparsedTrace::open`].
    pub fn from_reader<R: BufRead>(reader: &mut TraceReader<R>) -> Result<Self, ReplayError> {
        let file = reader.file().to_owned();
        let (alloc_line, hpt_order) = match reader.next_record()? {
            Some(Record::HptAlloc { line, shift }) => (line, shift),
            Some(r) => return Err(no_alloc(&file, &r)),
            None => return Err(ReplayError::Empty { file }),
        };
        vm_spec(&file, alloc_line, hpt_order)?;
        let oom = |file: &str| ReplayError::OutOfMemory {
            file: file.to_owned(),
        };
        let mut words: Vec<u64> = Vec::new();
        let mut lines: Vec<u64> = Vec::new();
        // Every record type replays; `stop` is kept in the report for the record kinds a
        // later format version may add.
        let stop = None;
        while let Some(rec) = reader.next_record()? {
            match rec {
                Record::Hcall(h) => {
                    let e = &h.expected;
                    if let Err(error) = VcpuId::try_from(h.cpu) {
                        return Err(ReplayError::Vcpu {
                            file,
                            line: h.line,
                            error,
                        });
                    }
                    let Some(head) = PackedCall::new(h.opcode(), h.cpu, h.nargs, e.present) else {
                        return Err(ReplayError::Unrepresentable {
                            file,
                            line: h.line,
                            what: "vCPU number above 2^24",
                        });
                    };
                    words.try_reserve(2 + 8 + 8).map_err(|_| oom(&file))?;
                    lines.try_reserve(1).map_err(|_| oom(&file))?;
                    words.push(head.0);
                    // The return code is stored as its two's-complement bits.
                    words.push(e.ret as u64);
                    words.extend_from_slice(h.args());
                    words.extend(
                        (0..8)
                            .filter(|i| e.present & (1 << i) != 0)
                            .map(|i| e.outs[i]),
                    );
                    lines.push(h.line);
                }
                Record::HwSet(hw) => {
                    let Some(head) = PackedCall::new(hw_op(hw.bit), 0, 1, 0b10) else {
                        return Err(ReplayError::Unrepresentable {
                            file,
                            line: hw.line,
                            what: "hardware record",
                        });
                    };
                    words.try_reserve(4).map_err(|_| oom(&file))?;
                    lines.try_reserve(1).map_err(|_| oom(&file))?;
                    words.extend_from_slice(&[head.0, H_SUCCESS as u64, hw.ptex, hw.pte1_after()]);
                    lines.push(hw.line);
                }
                Record::HptAlloc { line, .. } => {
                    return Err(ReplayError::SecondAlloc { file, line });
                }
                // Checked in streaming mode only.
                Record::HptShift { .. } => {}
            }
        }
        words.shrink_to_fit();
        lines.shrink_to_fit();
        Ok(PreparsedTrace {
            file,
            alloc_line,
            hpt_order,
            words,
            lines,
            stop,
        })
    }

    /// The file name.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The HPT order of the file's `HPT_ALLOC`.
    pub fn hpt_order(&self) -> u32 {
        self.hpt_order
    }

    /// The VM this trace must be replayed on.
    pub fn vm_spec(&self) -> VmSpec {
        VmSpec {
            ram_bytes: 1u64 << (self.hpt_order + 7),
            hpt_order: self.hpt_order,
        }
    }

    /// Number of hypercalls that will be replayed.
    pub fn calls(&self) -> u64 {
        self.lines.len() as u64
    }

    /// Size of the word stream in bytes.
    pub fn bytes(&self) -> usize {
        self.words.len() * 8 + self.lines.len() * 8
    }

    /// Creates this trace's VM with `make_vm` (a failure names the `HPT_ALLOC` line).
    pub fn make_vm<H, E: fmt::Display>(
        &self,
        make_vm: impl FnOnce(VmSpec) -> Result<H, E>,
    ) -> Result<H, ReplayError> {
        make(&self.file, self.alloc_line, self.hpt_order, make_vm)
    }

    /// Creates the VM with `make_vm` and replays onto it.
    pub fn replay_with<H, E>(
        &self,
        opts: &ReplayOptions,
        make_vm: impl FnOnce(VmSpec) -> Result<H, E>,
    ) -> Result<FileReport, ReplayError>
    where
        H: ReplayTarget,
        E: fmt::Display,
    {
        let vm = make(&self.file, self.alloc_line, self.hpt_order, make_vm)?;
        Ok(replay_preparsed(self, &vm, opts))
    }
}

/// Replays a pre-parsed trace onto `vm`, which must be freshly created for
/// [`PreparsedTrace::vm_spec`]. The hot loop: no parsing, allocation or formatting.
pub fn replay_preparsed<H: ReplayTarget>(
    trace: &PreparsedTrace,
    vm: &H,
    opts: &ReplayOptions,
) -> FileReport {
    // One run per cpu id for the whole trace (`HypercallPort::vcpu_runs`).
    preparsed_loop(trace, vm, &mut vm.vcpu_runs(), opts)
}

#[inline(always)]
fn preparsed_loop<H: ReplayTarget, P: HypercallPort>(
    trace: &PreparsedTrace,
    vm: &H,
    port: &mut P,
    opts: &ReplayOptions,
) -> FileReport {
    let start = Instant::now();
    let mut rep = FileReport::new(&trace.file, trace.hpt_order);
    let mut rest: &[u64] = &trace.words;
    let mut excuse = Excuses::default();
    while let [head, ret, tail @ ..] = rest {
        let head = PackedCall(*head);
        let Some((args, tail)) = tail.split_at_checked(head.nargs()) else {
            break;
        };
        let present = head.present();
        let nouts = present.count_ones() as usize;
        let Some((outs, tail)) = tail.split_at_checked(nouts) else {
            break;
        };
        rest = tail;
        let mut regs = [0u64; 8];
        load_regs(&mut regs, args);
        // Stored as the i64's bits.
        let exp_ret = *ret as i64;
        let opcode = head.opcode();
        let (exp_ret, got_ret) = if is_plain_hcall(opcode) {
            let got = match VcpuId::new(head.cpu()) {
                Ok(vcpu) => port.hcall_regs(vcpu, opcode, &mut regs),
                // `from_reader` rejected such calls: unreachable.
                Err(_) => revmap_hpt::hcall::H_PARAMETER,
            };
            (exp_ret, got)
        } else {
            special_call(vm, port, head, exp_ret, &mut regs)
        };
        // The common case, every field bit-exact, judged inline; anything else (a
        // difference, excused by a documented mask or not) by `FileReport::judge`.
        if got_ret == exp_ret && outputs_equal(present, outs, &regs) {
            rep.count_matched();
        } else if excuse
            .last
            .apply(&mut rep, head, got_ret == exp_ret, outs, &regs)
        {
            // The same difference as the last excused call (KVM's 0x40 on H_REMOVE).
        } else {
            let call = Judged {
                head,
                exp_ret,
                outs,
                got: (got_ret, &regs),
            };
            judge_slow(&mut rep, &mut excuse, trace, vm, call);
        }
        rep.maybe_check(vm, opts);
    }
    rep.stopped_at = trace.stop;
    rep.finish(vm, opts, start);
    rep
}

/// The last excused difference of the preparsed loop: an ordinary hypercall whose
/// return code matched and whose outputs were bit-exact but one, `out`, which differed
/// by exactly `diff`, excused by one documented mask counted at `counter` in
/// [`FileReport::masks_applied`]. (Under the KVM flavour QEMU's 0x40 bit differs on every
/// H_REMOVE: the same difference recurs.) The next call of the same opcode with the same
/// single difference is judged the same way without asking the target again: a
/// target's masks depend only on the opcode and output index
/// ([`ReplayTarget::result_masks`] returns `'static` tables).
#[derive(Default)]
struct ExcuseCache(Option<Excuse>);

#[derive(Clone, Copy)]
struct Excuse {
    opcode: u64,
    /// The call's recorded outputs (`PackedCall::present`): the difference is judged
    /// output by output, so a call of another shape never matches.
    present: u8,
    /// Per recorded output, in order: the exact difference (`want ^ got`) it showed, 0
    /// for all but the one excused output.
    expect: [u64; 8],
    counter: usize,
}

impl ExcuseCache {
    /// The single differing output of a call whose return code matched: `Some((i,
    /// diff))` if exactly one recorded output differs.
    #[inline(always)]
    fn single_diff(head: PackedCall, outs: &[u64], regs: &[u64; 8]) -> Option<(usize, u64)> {
        let mut bits = head.present();
        let mut found = None;
        for &want in outs {
            let i = bits.trailing_zeros() as usize & 7;
            bits &= bits.wrapping_sub(1);
            let diff = regs[i] ^ want;
            if diff != 0 {
                if found.is_some() {
                    return None;
                }
                found = Some((i, diff));
            }
        }
        found
    }

    /// Judge the call as the cached excuse if it is the same difference (counting it
    /// as [`FileReport::judge`] would); false if the cache does not apply. Called inline
    /// by the replay loop on every call that is not bit-exact, so the one- and
    /// two-output shapes (H_ENTER, H_REMOVE) are compared without a loop.
    #[inline(always)]
    fn apply(
        &self,
        rep: &mut FileReport,
        head: PackedCall,
        ret_matched: bool,
        outs: &[u64],
        regs: &[u64; 8],
    ) -> bool {
        let Some(e) = &self.0 else {
            return false;
        };
        let present = head.present();
        if !ret_matched || head.opcode() != e.opcode || present != e.present {
            return false;
        }
        let same = if present & present.wrapping_add(1) == 0 {
            // Outputs r4.. without a gap: output k is register k.
            match *outs {
                [a] => a ^ regs[0] == e.expect[0],
                [a, b] => a ^ regs[0] == e.expect[0] && b ^ regs[1] == e.expect[1],
                _ => outs
                    .iter()
                    .zip(regs)
                    .zip(&e.expect)
                    .all(|((&want, &got), &x)| want ^ got == x),
            }
        } else {
            let mut bits = present;
            outs.iter().zip(&e.expect).all(|(&want, &x)| {
                let i = bits.trailing_zeros() as usize & 7;
                bits &= bits.wrapping_sub(1);
                want ^ regs[i] == x
            })
        };
        if !same {
            return false;
        }
        let Some(c) = rep.masks_applied.0.get_mut(e.counter) else {
            return false;
        };
        c.1 += 1;
        rep.count_matched();
        true
    }

    /// After [`FileReport::judge`] judged the call: remember it if it was an ordinary
    /// hypercall excused by exactly one mask on exactly one output.
    #[cold]
    fn learn<H: ReplayTarget>(
        &mut self,
        rep: &FileReport,
        vm: &H,
        head: PackedCall,
        ret_matched: bool,
        outs: &[u64],
        regs: &[u64; 8],
    ) {
        let opcode = head.opcode();
        if !ret_matched || !is_plain_hcall(opcode) {
            return;
        }
        let Some((out, diff)) = Self::single_diff(head, outs, regs) else {
            return;
        };
        let masks = vm.result_masks(opcode, out);
        let allowed = masks.iter().fold(0, |a, m| a | m.mask);
        if diff & !allowed != 0 {
            return;
        }
        let mut hit = masks.iter().filter(|m| diff & m.mask != 0);
        let (Some(m), None) = (hit.next(), hit.next()) else {
            return;
        };
        if let Some(counter) = rep.masks_applied.index_of(m.name) {
            // The position of register `out` among the recorded outputs.
            let present = head.present();
            let k = (present & ((1u8 << out) - 1)).count_ones() as usize;
            let mut expect = [0u64; 8];
            if let Some(x) = expect.get_mut(k) {
                *x = diff;
            }
            self.0 = Some(Excuse {
                opcode,
                present,
                expect,
                counter,
            });
        }
    }
}

/// Load a call's inputs `args` into the zeroed register block `regs` (r4.. in order;
/// missing inputs read as 0, as on a fresh call). The argument counts of the hot
/// hypercalls are copied without a loop.
#[inline(always)]
fn load_regs(regs: &mut [u64; 8], args: &[u64]) {
    match *args {
        [a, b, c, d] => {
            regs[0] = a;
            regs[1] = b;
            regs[2] = c;
            regs[3] = d;
        }
        [a, b, c] => {
            regs[0] = a;
            regs[1] = b;
            regs[2] = c;
        }
        _ => {
            for (r, a) in regs.iter_mut().zip(args) {
                *r = *a;
            }
        }
    }
}

/// Whether `opcode` is an ordinary hypercall of the hot loop: a multiple of 4 (not a
/// hardware R/C record) below the resize calls (which wait for the preparation and
/// accept another return code).
#[inline(always)]
const fn is_plain_hcall(opcode: u64) -> bool {
    opcode & 3 == 0 && opcode < H_RESIZE_HPT_PREPARE
}

/// Whether each recorded output (one per bit of `present`, in register order) equals
/// the register the call left.
#[inline(always)]
fn outputs_equal(present: u8, outs: &[u64], regs: &[u64; 8]) -> bool {
    // Outputs r4, r4..r5 (H_ENTER, H_REMOVE): compared without a loop.
    if present & present.wrapping_add(1) == 0 {
        match *outs {
            [a] => return regs[0] == a,
            [a, b] => return regs[0] == a && regs[1] == b,
            _ => {}
        }
    }
    let mut bits = present;
    let mut equal = true;
    for &want in outs {
        // `present` is 8 bits: the index is below 8.
        let i = bits.trailing_zeros() as usize & 7;
        bits &= bits.wrapping_sub(1);
        equal &= regs[i] == want;
    }
    equal
}

/// A record other than an ordinary hypercall (a hardware R/C record, a resize call or
/// an opcode past them): returns the return code to expect and the one got.
#[cold]
#[inline(never)]
fn special_call<H: ReplayTarget, P: HypercallPort>(
    vm: &H,
    port: &mut P,
    head: PackedCall,
    exp_ret: i64,
    regs: &mut [u64; 8],
) -> (i64, i64) {
    let opcode = head.opcode();
    if opcode & 3 != 0 {
        return (exp_ret, replay_hw_set(vm, opcode, regs[0], regs));
    }
    if resize_waits(opcode, exp_ret) {
        vm.wait_resize_prepared();
    }
    let got = match VcpuId::new(head.cpu()) {
        Ok(vcpu) => port.hcall_regs(vcpu, opcode, regs),
        // `from_reader` rejected such calls: unreachable.
        Err(_) => revmap_hpt::hcall::H_PARAMETER,
    };
    (resize_expected(opcode, exp_ret, got), got)
}

/// One call of the preparsed loop to judge: its header, the return code to expect, the
/// recorded outputs and what the call returned.
#[derive(Clone, Copy)]
struct Judged<'a> {
    head: PackedCall,
    exp_ret: i64,
    outs: &'a [u64],
    got: (i64, &'a [u64; 8]),
}

/// What the preparsed loop remembers of excused differences: the last single one
/// ([`ExcuseCache`]) and the masks of the last opcode excused on several outputs
/// ([`MaskCache`]).
#[derive(Default)]
struct Excuses {
    last: ExcuseCache,
    ops: MaskCache,
}

/// The judgement of a call whose result is not bit-exact: the difference excused last
/// time, or a difference within the remembered masks of its opcode (`excuse`), else
/// `FileReport::judge` (masks, counts, the first mismatch). Out of line, so that the
/// loop of a replay without differences stays small.
#[inline(never)]
fn judge_slow<H: ReplayTarget>(
    rep: &mut FileReport,
    excuse: &mut Excuses,
    trace: &PreparsedTrace,
    vm: &H,
    call: Judged<'_>,
) {
    let ret_matched = call.got.0 == call.exp_ret;
    let (regs, outs) = (call.got.1, call.outs);
    // `excuse.last` was tried inline by the loop.
    if excuse.ops.apply(rep, call.head, ret_matched, outs, regs) {
        return;
    }
    let mismatched = rep.mismatched;
    judge_uncached(rep, trace, vm, call);
    excuse
        .last
        .learn(rep, vm, call.head, ret_matched, outs, regs);
    if rep.mismatched == mismatched && ExcuseCache::single_diff(call.head, outs, regs).is_none() {
        excuse.ops.learn(rep, vm, call.head, ret_matched);
    }
}

/// The masks of the last ordinary hypercall excused on several outputs at once (KVM's
/// H_BULK_REMOVE places R/C bits in each of its four outputs differently from QEMU, a
/// different difference on almost every call, which [`ExcuseCache`] cannot hold): per
/// output, the one documented mask that may excuse a difference there and its counter
/// in [`FileReport::masks_applied`] (or no mask: the output must match). A later call of
/// that opcode whose return code matched and whose every difference lies within its
/// output's mask is judged as [`FileReport::judge`] would judge it (each differing
/// output counts its mask once) without asking the target again: a target's masks
/// depend only on the opcode and output index.
#[derive(Default)]
struct MaskCache(Option<OpMasks>);

struct OpMasks {
    opcode: u64,
    /// Per output register: the bits that may differ (0: none).
    mask: [u64; 8],
    /// Per output register: the mask's index in `masks_applied` (`usize::MAX`: not
    /// counted yet, so a difference there is left to the full judgement).
    counter: [usize; 8],
}

impl MaskCache {
    /// Judge the call by the remembered masks (counting it as [`FileReport::judge`]
    /// would); false, with nothing counted, if the cache does not apply.
    #[inline]
    fn apply(
        &self,
        rep: &mut FileReport,
        head: PackedCall,
        ret_matched: bool,
        outs: &[u64],
        regs: &[u64; 8],
    ) -> bool {
        let Some(m) = &self.0 else {
            return false;
        };
        if !ret_matched || head.opcode() != m.opcode {
            return false;
        }
        let counters = rep.masks_applied.0.len();
        let mut diffs = [0u64; 8];
        let mut bits = head.present();
        for &want in outs {
            let i = bits.trailing_zeros() as usize & 7;
            bits &= bits.wrapping_sub(1);
            let d = regs[i] ^ want;
            if d & !m.mask[i] != 0 || (d != 0 && m.counter[i] >= counters) {
                return false;
            }
            diffs[i] = d;
        }
        for (&d, &c) in diffs.iter().zip(&m.counter) {
            if d != 0 {
                if let Some(e) = rep.masks_applied.0.get_mut(c) {
                    e.1 += 1;
                }
            }
        }
        rep.count_matched();
        true
    }

    /// After [`FileReport::judge`] excused a call with differences on several outputs:
    /// remember the masks of its opcode (outputs with more than one mask are left to the
    /// full judgement).
    #[cold]
    fn learn<H: ReplayTarget>(
        &mut self,
        rep: &FileReport,
        vm: &H,
        head: PackedCall,
        ret_matched: bool,
    ) {
        let opcode = head.opcode();
        if !ret_matched || !is_plain_hcall(opcode) {
            return;
        }
        let mut m = OpMasks {
            opcode,
            mask: [0; 8],
            counter: [usize::MAX; 8],
        };
        for i in 0..8 {
            if let [one] = vm.result_masks(opcode, i) {
                m.mask[i] = one.mask;
                m.counter[i] = rep.masks_applied.index_of(one.name).unwrap_or(usize::MAX);
            }
        }
        if m.mask.iter().any(|&x| x != 0) {
            self.0 = Some(m);
        }
    }
}

/// [`FileReport::judge`] on a call of the preparsed loop, recording a mismatch.
#[cold]
fn judge_uncached<H: ReplayTarget>(
    rep: &mut FileReport,
    trace: &PreparsedTrace,
    vm: &H,
    call: Judged<'_>,
) {
    let Judged {
        head,
        exp_ret,
        outs,
        got,
    } = call;
    let opcode = head.opcode();
    let mut it = outs.iter();
    let f = rep.judge(
        vm,
        if opcode & 3 != 0 { H_READ } else { opcode },
        exp_ret,
        head.present(),
        |_| it.next().copied().unwrap_or(0),
        got,
    );
    if f.is_some() {
        mismatch_slow(rep, trace, head, f);
    }
}

/// H_RESIZE_HPT_PREPARE.
const H_RESIZE_HPT_PREPARE: u64 = 0x36c;
/// H_RESIZE_HPT_COMMIT.
const H_RESIZE_HPT_COMMIT: u64 = 0x370;

/// Whether the replayer must wait for the preparation before this call: a PREPARE
/// recorded as H_SUCCESS.
#[inline(always)]
fn resize_waits(opcode: u64, exp_ret: i64) -> bool {
    opcode == H_RESIZE_HPT_PREPARE && exp_ret == 0
}

/// The return code a call must match: a PREPARE recorded as long-busy also accepts
/// H_SUCCESS (the preparation may finish sooner here than it did when recorded).
#[inline(always)]
fn resize_expected(opcode: u64, exp_ret: i64, got_ret: i64) -> i64 {
    if opcode == H_RESIZE_HPT_PREPARE && (9900..=9905).contains(&exp_ret) && got_ret == 0 {
        got_ret
    } else {
        exp_ret
    }
}

/// Pseudo-opcode of a `HW_SET_R` record in the replay's call stream (not a multiple of
/// 4, so never a hypercall).
pub const HW_SET_R_OP: u64 = 0x1;
/// Pseudo-opcode of a `HW_SET_C` record in the replay's call stream.
pub const HW_SET_C_OP: u64 = 0x2;

/// The pseudo-opcode of a hardware R/C record.
fn hw_op(bit: HwBit) -> u64 {
    match bit {
        HwBit::Reference => HW_SET_R_OP,
        HwBit::Change => HW_SET_C_OP,
    }
}

/// Replays a hardware R/C record (`op` a pseudo-opcode) on `ptex` into `regs[1]`
/// (dword 1 as the guest then sees it) and returns H_SUCCESS, or H_NOT_FOUND if the
/// entry was not guest-valid. The recorded `pte1` with the bit set must equal it
/// (`pte1` is the word the MMU read or wrote: either way `pte1 | bit` is the result);
/// it is judged with H_READ's dword-1 masks.
#[cold]
fn replay_hw_set<H: ReplayTarget>(vm: &H, op: u64, ptex: u64, regs: &mut [u64; 8]) -> i64 {
    let bit = if op == HW_SET_R_OP {
        HpteR::R
    } else {
        HpteR::C
    };
    let got = u32::try_from(ptex)
        .ok()
        .and_then(|p| vm.hw_set_rc(Ptex(p), bit));
    match got {
        Some(r) => {
            regs[1] = r;
            H_SUCCESS
        }
        None => H_NOT_FOUND,
    }
}

#[cold]
#[inline(never)]
fn mismatch_slow(
    rep: &mut FileReport,
    trace: &PreparsedTrace,
    head: PackedCall,
    f: Option<(Field, u64, u64)>,
) {
    let idx = usize::try_from(rep.calls.saturating_sub(1)).unwrap_or(usize::MAX);
    let line = trace.lines.get(idx).copied().unwrap_or(0);
    rep.record_mismatch(line, head.opcode(), f);
}

#[cfg(test)]
mod tests;
