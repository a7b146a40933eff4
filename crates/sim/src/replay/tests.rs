use super::*;
use revmap_testkit::port::{SharedHcalls, SharedRuns};
use revmap_trace::TraceReader;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::Cursor;

/// A fake VM that returns scripted results and records what it was asked.
struct ScriptVm {
    results: RefCell<VecDeque<HcallResult>>,
    seen: RefCell<Vec<(usize, u64, Vec<u64>)>>,
    masks: &'static [ResultMask],
    /// The outputs `masks` apply to (bit i: output i).
    mask_outs: u8,
    /// Checker fails once this many calls have been made.
    bad_after: Option<usize>,
    checks: Cell<u64>,
}

const DIRTY: ResultMask = ResultMask {
    name: "dword0-0x40-dirty-bit",
    mask: 0x40,
};

impl ScriptVm {
    fn new(results: Vec<HcallResult>) -> Self {
        ScriptVm {
            results: RefCell::new(results.into()),
            seen: RefCell::new(Vec::new()),
            masks: &[],
            mask_outs: 1,
            bad_after: None,
            checks: Cell::new(0),
        }
    }
}

/// Records the call and answers with the next scripted result (H_FUNCTION once the
/// script is exhausted).
impl SharedHcalls for ScriptVm {
    fn answer(&self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        self.seen
            .borrow_mut()
            .push((vcpu.index(), opcode, regs.to_vec()));
        let r = self
            .results
            .borrow_mut()
            .pop_front()
            .unwrap_or(HcallResult {
                ret: -2,
                out: [0; 8],
            });
        *regs = r.out;
        r.ret
    }
}

revmap_testkit::shared_hypercall_port!(ScriptVm);

impl ReplayTarget for ScriptVm {
    type Violation = String;

    fn check_invariants(&self) -> Result<(), String> {
        self.checks.set(self.checks.get() + 1);
        match self.bad_after {
            Some(n) if self.seen.borrow().len() >= n => Err("ring broken".into()),
            _ => Ok(()),
        }
    }

    fn result_masks(&self, _opcode: u64, out_index: usize) -> &'static [ResultMask] {
        if self.mask_outs & (1 << out_index) != 0 {
            self.masks
        } else {
            &[]
        }
    }
}

fn ok(out: &[u64]) -> HcallResult {
    let mut o = [0; 8];
    o[..out.len()].copy_from_slice(out);
    HcallResult { ret: 0, out: o }
}

const TRACE: &str = "\
# test
HPT_ALLOC shift=18
H_ENTER cpu=1 flags=0x0 ptex=0x8 pteh=0x4000000000000001 ptel=0x190 -> ret=0 idx=0x9
# console: hi
H_REMOVE cpu=0 flags=0x80000000 ptex=0x9 avpn=0x4000000000000000 -> ret=0 old_pteh=0x4000000000000041 old_ptel=0x190
H_PROTECT cpu=0 flags=0x4 ptex=0x9 avpn=0x0 -> ret=-7
";

fn stream(text: &str, vm: ScriptVm, opts: ReplayOptions) -> Result<FileReport, ReplayError> {
    let mut r = TraceReader::new(Cursor::new(text.to_owned()), "t.txt");
    let cell = RefCell::new(Some(vm));
    replay_reader(&mut r, &opts, |spec| {
        assert_eq!(spec.hpt_order, 18);
        assert_eq!(spec.ram_bytes, 1 << 25);
        cell.borrow_mut().take().ok_or("twice")
    })
}

fn preparsed(text: &str, vm: &ScriptVm, opts: ReplayOptions) -> FileReport {
    let mut r = TraceReader::new(Cursor::new(text.to_owned()), "t.txt");
    let t = PreparsedTrace::from_reader(&mut r).unwrap();
    replay_preparsed(&t, vm, &opts)
}

fn good_script() -> Vec<HcallResult> {
    vec![
        ok(&[0x9]),
        ok(&[0x4000000000000041, 0x190]),
        HcallResult {
            ret: -7,
            out: [0; 8],
        },
    ]
}

#[test]
fn all_matching_calls_pass_and_get_the_right_registers() {
    let vm = ScriptVm::new(good_script());
    let rep = preparsed(TRACE, &vm, ReplayOptions::default());
    assert_eq!((rep.calls, rep.matched, rep.mismatched), (3, 3, 0));
    assert!(rep.passed());
    assert_eq!(rep.first_mismatch, None);
    assert_eq!(rep.stopped_at, None);
    assert_eq!(rep.hpt_order, 18);
    let seen = vm.seen.borrow();
    // The pre-parsed engine passes the whole r4..r11 block (the in-place register
    // ABI): the recorded arguments first, every other register zero.
    let regs = |a: &[u64]| {
        let mut v = a.to_vec();
        v.resize(8, 0);
        v
    };
    assert_eq!(seen[0], (1, 0x08, regs(&[0, 8, 0x4000000000000001, 0x190])));
    assert_eq!(
        seen[1],
        (0, 0x04, regs(&[0x8000_0000, 9, 0x4000000000000000]))
    );
    assert_eq!(seen[2], (0, 0x18, regs(&[4, 9, 0])));
    let rep2 = stream(
        TRACE,
        ScriptVm::new(good_script()),
        ReplayOptions::default(),
    );
    let mut rep2 = rep2.unwrap();
    rep2.seconds = rep.seconds;
    assert_eq!(rep2, rep);
}

#[test]
fn ret_mismatch_is_reported_with_its_line() {
    let mut s = good_script();
    s[2].ret = 0;
    let vm = ScriptVm::new(s);
    let rep = preparsed(TRACE, &vm, ReplayOptions::default());
    assert_eq!((rep.calls, rep.matched, rep.mismatched), (3, 2, 1));
    assert!(!rep.passed());
    let m = rep.first_mismatch.unwrap();
    assert_eq!(m.line, 6);
    assert_eq!(m.hcall_name(), "H_PROTECT");
    assert_eq!(m.field, Field::Ret);
    assert_eq!((m.expected_str(), m.got_str()), ("-7".into(), "0".into()));
    assert_eq!(m.to_string(), "line 6: H_PROTECT ret: expected -7, got 0");
}

#[test]
fn output_mismatch_names_the_register_and_only_the_first_is_kept() {
    let mut s = good_script();
    s[0].out[0] = 0xa;
    s[1].out[1] = 0x191;
    let vm = ScriptVm::new(s);
    let rep = preparsed(TRACE, &vm, ReplayOptions::default());
    assert_eq!((rep.matched, rep.mismatched), (1, 2));
    let m = rep.first_mismatch.unwrap();
    assert_eq!(
        (m.line, m.field, m.expected, m.got),
        (3, Field::Out(0), 9, 0xa)
    );
    assert_eq!(m.to_string(), "line 3: H_ENTER r4: expected 0x9, got 0xa");
}

#[test]
fn masks_excuse_exactly_their_bits_and_are_counted() {
    let mut s = good_script();
    s[1].out[0] = 0x4000000000000001; // 0x40 missing: within the mask
    let mut vm = ScriptVm::new(s);
    vm.masks = &[DIRTY];
    let rep = preparsed(TRACE, &vm, ReplayOptions::default());
    assert!(rep.passed(), "{rep:?}");
    assert_eq!(rep.masks_applied.get(DIRTY.name), 1);
    assert_eq!(rep.masks_applied.iter().count(), 1);

    let mut s = good_script();
    s[1].out[0] = 0x4000000000000003; // 0x40 missing and 0x2 extra: not excused
    let mut vm = ScriptVm::new(s);
    vm.masks = &[DIRTY];
    let rep = preparsed(TRACE, &vm, ReplayOptions::default());
    assert_eq!(rep.mismatched, 1);
    assert!(rep.masks_applied.is_empty());

    // Without masks (bit-exact flavour) the same difference is a mismatch.
    let mut s = good_script();
    s[1].out[0] = 0x4000000000000001;
    let rep = preparsed(TRACE, &ScriptVm::new(s), ReplayOptions::default());
    assert_eq!(rep.mismatched, 1);
}

#[test]
fn a_recurring_excused_difference_is_judged_as_the_streaming_engine_does() {
    // Six H_REMOVEs of the same record: the pre-parsed loop remembers the excuse of the
    // first (0x40 missing in r4) and reuses it; each other kind of result must still be
    // judged in full. The streaming engine judges every call in full: both reports
    // must agree field for field.
    let remove = "H_REMOVE cpu=0 flags=0x80000000 ptex=0x9 avpn=0x4000000000000000 -> ret=0 old_pteh=0x4000000000000041 old_ptel=0x190\n";
    let text = format!("# t\nHPT_ALLOC shift=18\n{}", remove.repeat(6));
    let excused = ok(&[0x4000000000000001, 0x190]);
    let script = || {
        vec![
            excused,
            excused,
            // Same opcode and register, another difference outside the mask.
            ok(&[0x4000000000000003, 0x190]),
            // The cached difference plus one in r5: not a single difference.
            ok(&[0x4000000000000001, 0x191]),
            // The cached difference with a wrong return code.
            HcallResult {
                ret: -7,
                out: excused.out,
            },
            excused,
        ]
    };
    let mut vm = ScriptVm::new(script());
    vm.masks = &[DIRTY];
    let rep = preparsed(&text, &vm, ReplayOptions::default());
    assert_eq!((rep.calls, rep.matched, rep.mismatched), (6, 3, 3));
    // Judged in full, each of the three mismatches also had 0x40 excused on r4, except
    // the one whose r4 difference was outside the mask.
    assert_eq!(rep.masks_applied.get(DIRTY.name), 5);
    assert_eq!(rep.first_mismatch.map(|m| m.line), Some(5));
    let mut vm = ScriptVm::new(script());
    vm.masks = &[DIRTY];
    let mut streamed = stream(&text, vm, ReplayOptions::default()).unwrap();
    streamed.seconds = rep.seconds;
    assert_eq!(streamed, rep);
}

#[test]
fn a_recurring_difference_on_a_later_output_is_judged_as_the_streaming_engine_does() {
    // The excused difference is in the second output (r5), so the cached excuse must
    // compare each output with its own expected difference; calls of the same opcode
    // with another difference, or with the difference moved to r4, are judged in full.
    let remove = "H_REMOVE cpu=0 flags=0x80000000 ptex=0x9 avpn=0x4000000000000000 -> ret=0 old_pteh=0x4000000000000001 old_ptel=0x1d0\n";
    let text = format!("# t\nHPT_ALLOC shift=18\n{}", remove.repeat(6));
    let r5 = ok(&[0x4000000000000001, 0x190]);
    let script = || {
        vec![
            r5,
            r5,
            // The same difference, but in r4 (outside r4's mask: r4 has none here).
            ok(&[0x4000000000000041, 0x1d0]),
            r5,
            // Both r4 and r5 differ.
            ok(&[0x4000000000000041, 0x190]),
            r5,
        ]
    };
    let vm = || {
        let mut vm = ScriptVm::new(script());
        vm.masks = &[DIRTY];
        vm.mask_outs = 0b10;
        vm
    };
    let rep = preparsed(&text, &vm(), ReplayOptions::default());
    assert_eq!((rep.calls, rep.matched, rep.mismatched), (6, 4, 2));
    assert_eq!(rep.masks_applied.get(DIRTY.name), 5);
    assert_eq!(rep.first_mismatch.map(|m| m.line), Some(5));
    let mut streamed = stream(&text, vm(), ReplayOptions::default()).unwrap();
    streamed.seconds = rep.seconds;
    assert_eq!(streamed, rep);
}

#[test]
fn differences_on_several_outputs_are_judged_as_the_streaming_engine_does() {
    // Six H_REMOVEs whose two outputs may each differ by 0x40 (as KVM's H_BULK_REMOVE
    // outputs differ on R/C placement): the pre-parsed loop remembers the masks of the
    // opcode after the first such call and judges later ones by them; any other result
    // must still be judged in full. Both engines' reports must agree field for field.
    let remove = "H_REMOVE cpu=0 flags=0x80000000 ptex=0x9 avpn=0x4000000000000000 -> ret=0 old_pteh=0x4000000000000041 old_ptel=0x190\n";
    let text = format!("# t\nHPT_ALLOC shift=18\n{}", remove.repeat(6));
    let both = ok(&[0x4000000000000001, 0x1d0]);
    let script = || {
        vec![
            both,
            both,
            // r5 differs outside the mask.
            ok(&[0x4000000000000001, 0x110]),
            // Only r5 differs, within the mask.
            ok(&[0x4000000000000041, 0x1d0]),
            // Both within the masks, with a wrong return code.
            HcallResult {
                ret: -7,
                out: both.out,
            },
            both,
        ]
    };
    let vm = || {
        let mut vm = ScriptVm::new(script());
        vm.masks = &[DIRTY];
        vm.mask_outs = 0b11;
        vm
    };
    let rep = preparsed(&text, &vm(), ReplayOptions::default());
    assert_eq!((rep.calls, rep.matched, rep.mismatched), (6, 4, 2));
    // 2 + 2 + 1 (r4 of the third) + 1 + 2 (judged in full) + 2.
    assert_eq!(rep.masks_applied.get(DIRTY.name), 10);
    assert_eq!(rep.first_mismatch.map(|m| m.line), Some(5));
    let mut streamed = stream(&text, vm(), ReplayOptions::default()).unwrap();
    streamed.seconds = rep.seconds;
    assert_eq!(streamed, rep);
}

#[test]
fn resize_records_are_replayed_not_stopped_at() {
    let text = format!(
        "{TRACE}H_RESIZE_HPT_PREPARE cpu=0 flags=0x0 shift=19 -> ret=9902\nH_ENTER cpu=0 flags=0x0 ptex=0x0 pteh=0x1 ptel=0x0 -> ret=0 idx=0x0\n"
    );
    let vm = ScriptVm::new(good_script());
    let rep = preparsed(&text, &vm, ReplayOptions::default());
    // The PREPARE and the call after it are sent to the VM like any call.
    assert_eq!(rep.calls, 5);
    assert_eq!(vm.seen.borrow().len(), 5);
    assert_eq!(rep.stopped_at, None);
}

#[test]
fn prepare_long_busy_is_matched_by_success_only_for_prepare() {
    assert_eq!(resize_expected(H_RESIZE_HPT_PREPARE, 9902, 0), 0);
    assert_eq!(resize_expected(H_RESIZE_HPT_PREPARE, 9902, 9902), 9902);
    assert_eq!(resize_expected(H_RESIZE_HPT_PREPARE, 0, 9902), 0);
    assert_eq!(resize_expected(H_RESIZE_HPT_COMMIT, 9902, 0), 9902);
    assert!(resize_waits(H_RESIZE_HPT_PREPARE, 0));
    assert!(!resize_waits(H_RESIZE_HPT_PREPARE, 9902));
    assert!(!resize_waits(H_RESIZE_HPT_COMMIT, 0));
}

#[test]
fn trace_hw_bits_are_the_hpte_r_and_c_bits() {
    use revmap_trace::HwBit;
    assert_eq!(HwBit::Reference.mask(), HpteR::R);
    assert_eq!(HwBit::Change.mask(), HpteR::C);
}

/// A fake VM for hardware records: entry 9 is guest-valid with dword 1 = 0x190.
struct HwVm(ScriptVm);

impl HypercallPort for HwVm {
    type Runs<'a> = SharedRuns<'a, ScriptVm>;
    fn vcpu_runs(&self) -> SharedRuns<'_, ScriptVm> {
        SharedRuns(&self.0)
    }
    fn hcall_regs(&mut self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        self.0.answer(vcpu, opcode, regs)
    }
}

impl ReplayTarget for HwVm {
    type Violation = String;
    fn check_invariants(&self) -> Result<(), String> {
        Ok(())
    }
    fn result_masks(&self, opcode: u64, out_index: usize) -> &'static [ResultMask] {
        self.0.result_masks(opcode, out_index)
    }
    fn hw_set_rc(&self, ptex: Ptex, bits: u64) -> Option<u64> {
        (ptex == Ptex(9)).then_some(0x190 | bits)
    }
}

#[test]
fn hw_set_records_replay_and_are_judged() {
    // R on an entry that has it, C added, then C recorded with the wrong word, then a
    // record on an entry that is not guest-valid.
    let text = format!(
        "{TRACE}HW_SET_R ptex=0x9 pte1=0x190\nHW_SET_C ptex=0x9 pte1=0x110\n\
         HW_SET_C ptex=0x9 pte1=0x10\nHW_SET_R ptex=0x8 pte1=0x190\n"
    );
    let mut r = TraceReader::new(Cursor::new(text.clone()), "t.txt");
    let t = PreparsedTrace::from_reader(&mut r).unwrap();
    let rep = replay_preparsed(
        &t,
        &HwVm(ScriptVm::new(good_script())),
        &ReplayOptions::default(),
    );
    assert_eq!((rep.calls, rep.matched, rep.mismatched), (7, 5, 2));
    let m = rep.first_mismatch.unwrap();
    assert_eq!((m.line, m.hcall_name()), (9, "HW_SET_C"));
    assert_eq!(rep.stopped_at, None);
    let mut r = TraceReader::new(Cursor::new(text.clone()), "t.txt");
    let streamed = replay_reader(&mut r, &ReplayOptions::default(), |_| {
        Ok::<_, &str>(HwVm(ScriptVm::new(good_script())))
    })
    .unwrap();
    assert_eq!(
        (streamed.calls, streamed.matched, streamed.mismatched),
        (7, 5, 2)
    );
    assert_eq!(streamed.first_mismatch.unwrap().line, 9);
}

#[test]
fn checker_runs_every_n_calls_and_at_the_end() {
    let opts = ReplayOptions {
        check_every: NonZeroU64::new(2),
    };
    let vm = ScriptVm::new(good_script());
    let rep = preparsed(TRACE, &vm, opts);
    assert_eq!(rep.checks, 2); // after call 2, and at the end
    assert_eq!(vm.checks.get(), 2);
    assert_eq!(rep.invariant_violations, 0);
    assert!(rep.passed());

    let mut vm = ScriptVm::new(good_script());
    vm.bad_after = Some(3);
    let rep = preparsed(TRACE, &vm, opts);
    assert_eq!(rep.invariant_violations, 1);
    assert_eq!(
        rep.first_violation.as_deref(),
        Some("after call 3: ring broken")
    );
    assert!(!rep.passed());

    let opts = ReplayOptions {
        check_every: NonZeroU64::new(1),
    };
    let mut vm = ScriptVm::new(good_script());
    vm.bad_after = Some(2);
    let rep = preparsed(TRACE, &vm, opts);
    assert_eq!((rep.checks, rep.invariant_violations), (4, 3));
    // No checks at all without the option.
    let vm = ScriptVm::new(good_script());
    let rep = preparsed(TRACE, &vm, ReplayOptions::default());
    assert_eq!((rep.checks, vm.checks.get()), (0, 0));
}

#[test]
fn structural_errors() {
    let opts = ReplayOptions::default();
    let r = stream("# only a comment\n", ScriptVm::new(vec![]), opts);
    assert!(matches!(r, Err(ReplayError::Empty { .. })));
    let r = stream(
        "H_PROTECT cpu=0 flags=0x4 ptex=0x9 avpn=0x0 -> ret=-7\n",
        ScriptVm::new(vec![]),
        opts,
    );
    let e = r.unwrap_err();
    assert_eq!(e.to_string(), "t.txt:1: H_PROTECT before HPT_ALLOC");
    let r = stream(
        &format!("{TRACE}HPT_ALLOC shift=18\n"),
        ScriptVm::new(good_script()),
        opts,
    );
    assert!(matches!(r, Err(ReplayError::SecondAlloc { line: 7, .. })));
    let r = stream(
        &format!("{TRACE}H_ENTER cpu=0\n"),
        ScriptVm::new(good_script()),
        opts,
    );
    let e = r.unwrap_err();
    assert!(
        e.to_string().starts_with("t.txt:7: H_ENTER: missing key"),
        "{e}"
    );
    let mut rd = TraceReader::new(Cursor::new("HPT_ALLOC shift=60\n"), "t.txt");
    let e = PreparsedTrace::from_reader(&mut rd).unwrap_err();
    assert!(matches!(e, ReplayError::Vm { order: 60, .. }));
    let mut rd = TraceReader::new(Cursor::new("HPT_ALLOC shift=18\n"), "t.txt");
    let e = replay_reader(&mut rd, &opts, |_| Err::<ScriptVm, _>("no memory")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "t.txt:1: cannot create a VM with HPT order 18: no memory"
    );
}

#[test]
fn packed_call_layout_is_pinned() {
    let p = PackedCall::new(0x124, 0xab_cdef, 8, 0x55).unwrap();
    assert_eq!(p.0, 0x0055_08ab_cdef_0124);
    assert_eq!(
        (p.opcode(), p.cpu(), p.nargs(), p.present()),
        (0x124, 0xab_cdef, 8, 0x55)
    );
    assert!(PackedCall::new(0x1_0000, 0, 0, 0).is_none());
    assert!(PackedCall::new(0x8, 1 << 24, 0, 0).is_none());
    assert!(PackedCall::new(0x8, 0, 9, 0).is_none());
}

#[test]
fn a_vcpu_past_the_supported_count_is_an_error_not_an_alias() {
    // cpu=64 used to run as vCPU 0 (ids were taken modulo 64).
    let text = TRACE.replace("H_PROTECT cpu=0", "H_PROTECT cpu=64");
    let err = stream(
        &text,
        ScriptVm::new(good_script()),
        ReplayOptions::default(),
    );
    match err {
        Err(ReplayError::Vcpu { line, error, .. }) => {
            assert_eq!(line, 6);
            assert_eq!((error.id, error.max), (64, revmap_hpt::MAX_VCPUS));
        }
        other => panic!("expected a vCPU error, got {other:?}"),
    }
    let mut r = TraceReader::new(Cursor::new(text), "t.txt");
    assert!(matches!(
        PreparsedTrace::from_reader(&mut r),
        Err(ReplayError::Vcpu { line: 6, .. })
    ));
    // The last supported id replays.
    let text = TRACE.replace("H_PROTECT cpu=0", "H_PROTECT cpu=63");
    let rep = stream(
        &text,
        ScriptVm::new(good_script()),
        ReplayOptions::default(),
    )
    .unwrap();
    assert_eq!(rep.mismatched, 0);
}
