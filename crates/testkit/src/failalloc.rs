//! Allocation-failure injection: a global allocator that fails the k-th allocation after
//! it is armed, and a sweep that runs a representative MMU run once for every k.
//!
//! A test binary installs the allocator and describes its run as a [`FaultRun`]: a set-up
//! (building the VM) and a list of steps, each a library call that returns a `Result`.
//! [`sweep`] first counts the allocations of a clean run, then for every k below that
//! count re-runs it with the k-th allocation failing and requires that
//!
//! * the failure surfaces as a clean error of the call that allocated (or is absorbed by
//!   it: a call may fall back, as a pre-copy resize falls back to a full rehash),
//! * the state then passes the MMU's checker,
//! * the run can continue: with the allocator disarmed the failed call succeeds when
//!   repeated, every later step succeeds, and the checker passes at the end.
//!
//! An allocation that cannot fail cleanly (an infallible `Box::new` or `Vec::push` on an
//! MMU path) aborts the process through `handle_alloc_error`. [`run_in_child`] runs the
//! sweep in a child process so that such an abort becomes a test failure naming the
//! step and k, instead of killing the test harness.
//!
//! ```no_run
//! use revmap_testkit::failalloc::{self, FailingAlloc, FaultRun};
//!
//! #[global_allocator]
//! static ALLOC: FailingAlloc = FailingAlloc;
//!
//! struct Boxes;
//! impl FaultRun for Boxes {
//!     type State = Vec<Vec<u8>>;
//!     fn setup(&self) -> Result<Self::State, String> {
//!         Ok(Vec::new())
//!     }
//!     fn steps(&self) -> &'static [&'static str] {
//!         &["push"]
//!     }
//!     fn step(&self, st: &mut Self::State, _i: usize) -> Result<(), String> {
//!         let mut v = Vec::new();
//!         v.try_reserve(64).map_err(|e| e.to_string())?;
//!         st.try_reserve(1).map_err(|e| e.to_string())?;
//!         st.push(v);
//!         Ok(())
//!     }
//!     fn check(&self, _st: &Self::State) -> Result<(), String> {
//!         Ok(())
//!     }
//! }
//!
//! let report = failalloc::sweep(&Boxes).unwrap();
//! assert_eq!(report.allocations, 2);
//! ```

use revmap_rmap::sync::native::{AtomicBool, AtomicU64, Ordering};
use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::io::Write;

/// The global allocator of an allocation-failure test binary: the system allocator,
/// except that once [`arm`]ed the k-th allocation (counting `alloc`, `alloc_zeroed` and
/// `realloc` calls of every thread) returns null.
pub struct FailingAlloc;

// Orderings: the counters are only ever touched by the allocator and by the test
// thread that arms and disarms it. SeqCst throughout: the cost does not matter in a test
// allocator, and it keeps "armed before the call, counted during it, read after it"
// true for allocations made by threads the call starts (a resize worker) without an
// argument per site.
static ARMED: AtomicBool = AtomicBool::new(false);
static COUNTING: AtomicBool = AtomicBool::new(false);
static SEEN: AtomicU64 = AtomicU64::new(0);
static TARGET: AtomicU64 = AtomicU64::new(0);
static INJECTED: AtomicBool = AtomicBool::new(false);
static TRACE: AtomicBool = AtomicBool::new(false);

impl FailingAlloc {
    /// Whether this allocation is the one to fail (and counts it).
    fn fail_this(&self) -> bool {
        if !COUNTING.load(Ordering::SeqCst) {
            return false;
        }
        let n = SEEN.fetch_add(1, Ordering::SeqCst);
        if ARMED.load(Ordering::SeqCst) && n == TARGET.load(Ordering::SeqCst) {
            INJECTED.store(true, Ordering::SeqCst);
            if TRACE.load(Ordering::SeqCst) {
                // Diagnosis only (`REVMAP_FAILALLOC_TRACE=1`): where the failure lands.
                // The capture allocates; counting is off while it does.
                COUNTING.store(false, Ordering::SeqCst);
                let bt = std::backtrace::Backtrace::force_capture();
                let _ = writeln!(std::io::stderr(), "failalloc: injected here:\n{bt}");
                COUNTING.store(true, Ordering::SeqCst);
            }
            return true;
        }
        false
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, or
// returns null, which `GlobalAlloc` allows for `alloc`, `alloc_zeroed` and `realloc`
// (null means failure; for `realloc` the old block stays valid and owned by the caller,
// which is exactly what not calling `System.realloc` leaves).
unsafe impl GlobalAlloc for FailingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if self.fail_this() {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout, which meets `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if self.fail_this() {
            return std::ptr::null_mut();
        }
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` (this allocator never hands out anything
        // else) with `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if self.fail_this() {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged; `ptr` was allocated by `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Start counting allocations; the `k`-th one from now (0-based) fails, once.
pub fn arm(k: u64) {
    INJECTED.store(false, Ordering::SeqCst);
    SEEN.store(0, Ordering::SeqCst);
    TARGET.store(k, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
}

/// Start counting allocations without failing any.
pub fn count() {
    INJECTED.store(false, Ordering::SeqCst);
    SEEN.store(0, Ordering::SeqCst);
    ARMED.store(false, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
}

/// Stop counting and failing; returns the number of allocations counted since
/// [`arm`] or [`count`].
pub fn disarm() -> u64 {
    COUNTING.store(false, Ordering::SeqCst);
    ARMED.store(false, Ordering::SeqCst);
    SEEN.load(Ordering::SeqCst)
}

/// Whether the armed failure has been injected.
pub fn injected() -> bool {
    INJECTED.load(Ordering::SeqCst)
}

/// A representative run of an MMU, as library calls, for [`sweep`].
pub trait FaultRun {
    /// The VM and whatever the steps need.
    type State;
    /// Build the VM. A failed allocation here must be an `Err`.
    fn setup(&self) -> Result<Self::State, String>;
    /// The steps' names, in order (the length is the number of steps).
    fn steps(&self) -> &'static [&'static str];
    /// Run step `i`: `Err` is a clean error the library returned.
    fn step(&self, st: &mut Self::State, i: usize) -> Result<(), String>;
    /// The MMU's invariant checker over the whole state.
    fn check(&self, st: &Self::State) -> Result<(), String>;
}

/// What [`sweep`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Allocations of one clean run (set-up and every step): the k swept are
    /// `first..allocations`.
    pub allocations: u64,
    /// The first k swept: 0, or where [`run_in_child`] restarted the sweep after an
    /// abort ([`FROM_ENV`]).
    pub first: u64,
    /// Injected failures that the allocating call returned as an error.
    pub surfaced: u64,
    /// Injected failures that the call absorbed (it succeeded anyway).
    pub absorbed: u64,
    /// Of `surfaced`, those in the set-up (no VM to check; the set-up is repeated).
    pub in_setup: u64,
    /// k for which the run made fewer than k+1 allocations, so nothing failed (a
    /// background thread's allocations make the count vary by a few).
    pub not_reached: u64,
    /// Failures per step name: (step, surfaced, absorbed).
    pub per_step: Vec<(&'static str, u64, u64)>,
}

/// A line formatted on the stack: progress is written while the allocator is armed, so
/// it must not allocate (it would shift the count).
struct StackLine {
    buf: [u8; 160],
    len: usize,
}

impl std::fmt::Write for StackLine {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Outcome markers written after the progress prefix, read back by [`run_in_child`].
const OUTCOME_SURFACED: &str = "=> surfaced";
const OUTCOME_ABSORBED: &str = "=> absorbed";
const OUTCOME_NOT_REACHED: &str = "=> not reached";
const OUTCOME_COUNT: &str = "=> allocations of a clean run";

fn progress(k: u64, what: &str) {
    // Raw stderr (not captured by the test harness): the last line before an abort
    // names the allocation and the step that could not fail cleanly.
    let mut line = StackLine {
        buf: [0; 160],
        len: 0,
    };
    let _ = writeln!(line, "failalloc: k={k} {what}");
    let _ = std::io::stderr().write_all(line.buf.get(..line.len).unwrap_or_default());
}

/// Set-up and every step with nothing failing; returns the state and the number of
/// allocations they made (the checker's own allocations are not counted).
fn clean_run<R: FaultRun>(run: &R) -> Result<(R::State, u64), String> {
    count();
    let st = run.setup();
    let st = st.map_err(|e| format!("clean set-up failed: {e}"));
    let mut st = match st {
        Ok(st) => st,
        Err(e) => {
            disarm();
            return Err(e);
        }
    };
    for (i, name) in run.steps().iter().enumerate() {
        if let Err(e) = run.step(&mut st, i) {
            disarm();
            return Err(format!("clean step {i} ({name}) failed: {e}"));
        }
    }
    let n = disarm();
    run.check(&st)
        .map_err(|e| format!("checker after a clean run: {e}"))?;
    Ok((st, n))
}

/// Run `run` once for every k below its allocation count with the k-th allocation
/// failing (module docs); `Err` describes the first k that broke the contract.
pub fn sweep<R: FaultRun>(run: &R) -> Result<SweepReport, String> {
    TRACE.store(std::env::var_os(TRACE_ENV).is_some(), Ordering::SeqCst);
    // A first clean run initialises what the standard library and our dependencies
    // allocate lazily once per thread (arc-swap's debt lists, thread-local caches), so
    // that the counted run allocates what every later run does.
    drop(clean_run(run)?);
    let (st, allocations) = clean_run(run)?;
    drop(st);
    progress(allocations, OUTCOME_COUNT);
    let names = run.steps();
    let from = std::env::var(FROM_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let mut rep = SweepReport {
        allocations,
        first: from,
        per_step: names.iter().map(|n| (*n, 0, 0)).collect(),
        ..SweepReport::default()
    };
    for k in from..allocations {
        progress(k, "setup");
        arm(k);
        let setup = run.setup();
        if injected() {
            disarm();
            if setup.is_ok() {
                return Err(format!("k={k}: the set-up absorbed a failed allocation"));
            }
            rep.surfaced += 1;
            rep.in_setup += 1;
            progress(k, OUTCOME_SURFACED);
            drop(clean_run(run).map_err(|e| format!("k={k}: after a set-up failure: {e}"))?);
            continue;
        }
        let mut st = setup.map_err(|e| format!("k={k}: set-up failed without injection: {e}"))?;
        let mut failed_at = None;
        for (i, name) in names.iter().enumerate() {
            progress(k, name);
            let r = run.step(&mut st, i);
            if injected() {
                disarm();
                let surfaced = r.is_err();
                let row = &mut rep.per_step[i];
                if surfaced {
                    rep.surfaced += 1;
                    row.1 += 1;
                    progress(k, OUTCOME_SURFACED);
                } else {
                    rep.absorbed += 1;
                    row.2 += 1;
                    progress(k, OUTCOME_ABSORBED);
                }
                run.check(&st).map_err(|e| {
                    format!("k={k}: checker after a failed allocation in step {i} ({name}): {e}")
                })?;
                if surfaced {
                    run.step(&mut st, i).map_err(|e| {
                        format!("k={k}: step {i} ({name}) repeated after the failure: {e}")
                    })?;
                }
                failed_at = Some(i);
                break;
            }
            r.map_err(|e| format!("k={k}: step {i} ({name}) failed without injection: {e}"))?;
        }
        disarm();
        if failed_at.is_none() {
            rep.not_reached += 1;
            progress(k, OUTCOME_NOT_REACHED);
        }
        if let Some(i) = failed_at {
            for (j, name) in names.iter().enumerate().skip(i + 1) {
                run.step(&mut st, j)
                    .map_err(|e| format!("k={k}: step {j} ({name}) after recovery: {e}"))?;
            }
        }
        run.check(&st)
            .map_err(|e| format!("k={k}: checker at the end of the run: {e}"))?;
    }
    Ok(rep)
}

/// Environment variable that makes the allocator print a backtrace at every injected
/// failure (to find an allocation that cannot fail cleanly).
pub const TRACE_ENV: &str = "REVMAP_FAILALLOC_TRACE";

/// Environment variable giving the first k the sweep tries (the child of
/// [`run_in_child`] restarts after an abort from the next k).
pub const FROM_ENV: &str = "REVMAP_FAILALLOC_FROM";

/// Environment variable that marks the child process of [`run_in_child`].
pub const CHILD_ENV: &str = "REVMAP_FAILALLOC_CHILD";

/// The whole of a sweep test, both sides of [`run_in_child`]: in the child ([`CHILD_ENV`]
/// set) sweep `run` from where the parent says and return `None`; in the parent run the
/// child sweeps of the test named `test` and return their outcome, having checked that
/// the run allocates and that every k is accounted for. Panics (it is a test's body) on
/// a broken contract.
pub fn sweep_test<R: FaultRun>(test: &str, run: &R) -> Option<ChildSweep> {
    if std::env::var_os(CHILD_ENV).is_some() {
        if let Err(e) = sweep(run) {
            panic!("{e}");
        }
        return None;
    }
    let rep = run_in_child(test).unwrap_or_else(|e| panic!("{e}"));
    println!("{rep:#?}");
    assert!(rep.allocations > 0, "the run allocates nothing: {rep:#?}");
    assert_eq!(rep.accounted(), rep.allocations, "{rep:#?}");
    Some(rep)
}

/// Run the test named `test` (its path as libtest names it) of the current test binary
/// in a child process with [`CHILD_ENV`] set. An abort (a failed allocation that could
/// not fail cleanly) is recorded with its k, step and allocation site, and the sweep is
/// restarted in a new child from the next k, so one run lists every such allocation.
/// Aborts inside `Arc::new` or a thread's start-up are listed apart: stable Rust has no
/// fallible form of them (`Arc::new`, spawning a thread); every other abort fails.
/// Returns the outcome of every k, or `Err` listing every other abort, or the failure
/// of a child that ended otherwise (a panic, a broken contract). The test calls this when
/// [`CHILD_ENV`] is not set, and runs the sweep itself when it is.
pub fn run_in_child(test: &str) -> Result<ChildSweep, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut from = 0u64;
    let mut aborts = Vec::new();
    let mut sum = ChildSweep::default();
    loop {
        let out = std::process::Command::new(&exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .env(FROM_ENV, from.to_string())
            .env(TRACE_ENV, "1")
            .env("RUST_BACKTRACE", "0")
            .output()
            .map_err(|e| format!("spawning the child test: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        for line in stderr.lines() {
            let Some((k, what)) = line
                .strip_prefix("failalloc: k=")
                .and_then(|l| l.split_once(' '))
            else {
                continue;
            };
            match what {
                OUTCOME_SURFACED => sum.surfaced += 1,
                OUTCOME_ABSORBED => sum.absorbed += 1,
                OUTCOME_NOT_REACHED => sum.not_reached += 1,
                OUTCOME_COUNT => sum.allocations = k.parse().unwrap_or(0),
                _ => {}
            }
        }
        if out.status.success() && stdout.contains("1 passed") {
            if aborts.is_empty() {
                return Ok(sum);
            }
            return Err(format!(
                "{} allocation(s) could not fail cleanly (the process aborted):\n{}",
                aborts.len(),
                aborts.join("\n")
            ));
        }
        let last_k = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("failalloc: k="))
            .and_then(|l| l.split_once(' '))
            .and_then(|(k, step)| Some((k.parse::<u64>().ok()?, step.to_string())));
        let aborted = stderr.contains("memory allocation of");
        match last_k {
            Some((k, step)) if aborted && k >= from => {
                let (site, language) = site(&stderr);
                let line = format!("k={k} in {step}: {site}");
                if language {
                    sum.infallible.push(line);
                } else {
                    aborts.push(line);
                }
                from = k + 1;
            }
            _ => {
                let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!(
                    "child test {test} ended with {}:\n{}\n{}\n{}",
                    out.status,
                    aborts.join("\n"),
                    stdout.lines().rev().take(6).collect::<Vec<_>>().join("\n"),
                    tail.join("\n")
                ));
            }
        }
    }
}

/// What [`run_in_child`] saw over every child it ran: the outcome of each k.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildSweep {
    /// Allocations of one clean run: the k swept are `0..allocations`.
    pub allocations: u64,
    /// Failures returned as an error by the call that allocated.
    pub surfaced: u64,
    /// Failures the call absorbed (it succeeded anyway).
    pub absorbed: u64,
    /// k the run did not reach (it allocated less that time).
    pub not_reached: u64,
    /// Aborts in `Arc::new` or a thread's start-up (no fallible form in stable Rust):
    /// `k=.. in STEP: SITE`.
    pub infallible: Vec<String>,
}

impl ChildSweep {
    /// Every k accounted for once.
    pub fn accounted(&self) -> u64 {
        self.surfaced + self.absorbed + self.not_reached + self.infallible.len() as u64
    }
}

/// Whether a frame of the standard library allocates where stable Rust offers no
/// fallible form: `Arc::new` (there is no stable `Arc::try_new`) and spawning a thread
/// (its handle, name and start-up state).
fn language_infallible(frame: &str) -> bool {
    (frame.contains("alloc::sync::Arc") && frame.contains("::new"))
        || frame.starts_with("std::thread")
        || frame.starts_with("<std::thread")
        || frame.starts_with("std::sys::")
        || frame.starts_with("<std::sys::")
}

/// The allocation site of the last injected failure in `stderr`: its innermost revmap
/// frames, and whether the allocating standard-library call has no fallible form
/// ([`language_infallible`]).
fn site(stderr: &str) -> (String, bool) {
    let Some(at) = stderr.rfind("failalloc: injected here:") else {
        return ("(no backtrace)".into(), false);
    };
    let frames: Vec<&str> = stderr[at..]
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().split_once(": ").map(|(_, f)| f))
        .filter(|f| !f.contains("failalloc::FailingAlloc"))
        .collect();
    let first_revmap = frames
        .iter()
        .position(|f| f.starts_with("revmap_") || f.starts_with("<revmap_"));
    let inner = &frames[..first_revmap.unwrap_or(frames.len())];
    let language = inner.iter().any(|f| language_infallible(f));
    let Some(i) = first_revmap else {
        return ("a new thread's start-up (no revmap frame)".into(), language);
    };
    let named: Vec<&str> = frames[i..].iter().take(3).copied().collect();
    let via = inner
        .iter()
        .rev()
        .find(|f| !f.starts_with("<alloc::alloc") && !f.starts_with("alloc::alloc"))
        .copied()
        .unwrap_or("");
    (format!("{} (via {via})", named.join(" <- ")), language)
}
