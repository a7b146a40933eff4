//! The commit-pause benchmark behind `revmap bench resize`: for each HPT order, a VM
//! populated to a given occupancy with random bolted and non-bolted entries (random
//! VSIDs and pages, 4K and 64K, primary and secondary groups, as a booted guest's
//! table looks) grows by one order while vCPU threads keep making hypercalls (H_ENTER,
//! H_READ, H_PROTECT, H_REMOVE of their own entries) through PREPARE and COMMIT. The
//! figure is [`ResizeCtl::last_pause_ns`](revmap_resize::ResizeCtl::last_pause_ns): gate
//! closed (vCPUs stopped) to gate reopened, measured inside the commit, for
//! stop-the-world and pre-copy on identically populated VMs in the same run.
//!
//! Invariants: the population is deterministic for a seed (both modes see the same
//! table); every step returns an error rather than panicking; the vCPU threads are
//! stopped and joined before a VM is dropped.

use crate::rng::Rng;
use revmap_hpt::hcall::*;
use revmap_hpt::vm::{Vm, VmConfig};
use revmap_hpt::Flavour;
use revmap_hpt::HptError;
use revmap_resize::{ResizeMode, ResizeVmExt};
use revmap_rmap::sync::{thread, Arc, AtomicBool, AtomicU64, Ordering};

/// The two resize hypercalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeCall {
    /// `H_RESIZE_HPT_PREPARE`.
    Prepare,
    /// `H_RESIZE_HPT_COMMIT`.
    Commit,
}

impl core::fmt::Display for ResizeCall {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Prepare => "H_RESIZE_HPT_PREPARE",
            Self::Commit => "H_RESIZE_HPT_COMMIT",
        })
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct ResizeBenchConfig {
    /// HPT orders to measure (each grows to order + 1).
    pub orders: core::ops::RangeInclusive<u32>,
    /// Fraction of HPTE slots to fill, in percent.
    pub occupancy_pct: u64,
    /// Fraction of the entries that are bolted, in percent.
    pub bolted_pct: u64,
    /// vCPU threads making hypercalls during PREPARE and COMMIT.
    pub vcpus: usize,
    /// Commits measured per (order, mode); the median is reported.
    pub repeats: usize,
    /// Population seed.
    pub seed: u64,
    /// Hypercall flavour.
    pub flavour: Flavour,
}

impl Default for ResizeBenchConfig {
    fn default() -> Self {
        Self {
            orders: 20..=26,
            occupancy_pct: 50,
            bolted_pct: 10,
            vcpus: 2,
            repeats: 1,
            seed: 0x5eed,
            flavour: Flavour::Kvm,
        }
    }
}

/// One row of the result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResizeBenchRow {
    /// HPT order before the grow.
    pub order: u32,
    /// Entries in the table at PREPARE.
    pub entries: u64,
    /// Of which bolted.
    pub bolted: u64,
    /// Stop-the-world commit pause, microseconds (median).
    pub stop_the_world_pause_us: f64,
    /// Pre-copy commit pause, microseconds (median).
    pub precopy_pause_us: f64,
    /// `stop_the_world_pause_us / precopy_pause_us`.
    pub ratio: f64,
    /// Hypercalls the vCPU threads completed during the pre-copy commits.
    pub vcpu_hcalls_during_precopy: u64,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum ResizeBenchError {
    /// Building the VM failed.
    #[error("cannot build the VM: {0}")]
    Vm(#[from] HptError),
    /// Order out of the supported range (18..=35: the grow needs order + 1 <= 36).
    #[error("order {0} out of range 18..=35")]
    Order(u32),
    /// A resize hypercall failed.
    #[error("resize to order {order} failed: {what} returned {ret}")]
    Resize {
        /// Target order.
        order: u32,
        /// Which hypercall (`H_RESIZE_HPT_PREPARE` or `H_RESIZE_HPT_COMMIT`).
        what: ResizeCall,
        /// Its return code.
        ret: i64,
    },
    /// The VM has no resize controller installed.
    #[error("the VM has no resize controller")]
    NoResizer,
    /// Out of memory for the result rows.
    #[error("out of memory")]
    Alloc,
    /// A vCPU thread could not be spawned or panicked.
    #[error("vCPU thread failed")]
    Thread,
}

/// H_ENTER arguments for a random 4K or 64K entry in a 256M segment.
fn random_entry(rng: &mut Rng, mask: u64, frames: u64, bolted: bool) -> [u64; 4] {
    let vsid = 0x100 + rng.below(1 << 20);
    let big = rng.below(8) == 0;
    let (shift, lp, large) = if big { (16, 0x1000, 0x4) } else { (12, 0, 0) };
    let page = rng.below(1 << (28 - shift));
    let off = page << shift;
    let hash = vsid ^ page;
    let secondary = rng.below(8) == 0;
    let avpn = (((vsid << 28) | off) >> 23) << 7;
    let mut v = avpn | large | 1;
    if bolted {
        v |= 0x10;
    }
    let group = if secondary {
        v |= 0x2;
        !hash & mask
    } else {
        hash & mask
    };
    let frames_per = 1u64 << (shift - 12);
    let gfn = rng.below(frames / frames_per) * frames_per;
    [0, group * 8, v, (gfn << 12) | lp | 0x190]
}

/// A VM of `order` (RAM sized so that order + 1 is allowed), filled as configured.
fn populated(cfg: &ResizeBenchConfig, order: u32) -> Result<(Vm, u64, u64), ResizeBenchError> {
    let vm = revmap_resize::new_vm(VmConfig {
        ram_bytes: 1u64 << (order + 7),
        hpt_order: order,
        flavour: cfg.flavour,
        backing_page_shift: 24,
    })?;
    let mask = vm.hpt().geometry().mask();
    let target = vm.hpt().geometry().npte() * cfg.occupancy_pct.min(100) / 100;
    let frames = 1u64 << (order + 7 - 12);
    let mut rng = Rng::new(cfg.seed ^ u64::from(order) << 32 | 1);
    let (mut entries, mut bolted, mut tries) = (0u64, 0u64, 0u64);
    while entries < target && tries < target * 4 {
        tries += 1;
        let b = rng.below(100) < cfg.bolted_pct;
        let args = random_entry(&mut rng, mask, frames, b);
        if vm.hcall(0, H_ENTER, &args).ret == H_SUCCESS {
            entries += 1;
            bolted += u64::from(b);
        }
    }
    Ok((vm, entries, bolted))
}

/// A vCPU thread's loop: enter, read, protect and remove its own non-bolted entries
/// until `stop`; counts completed hypercalls. Each call enters and leaves the gate
/// (`Vm::hcall`), so a thread the host preempts between calls does not hold up a
/// commit (with run handles, which stay in the gate, the pause on an oversubscribed
/// host measures the scheduler's latency rather than the commit).
fn vcpu_loop(vm: &Vm, id: usize, stop: &AtomicBool, done: &AtomicU64, frames: u64) {
    let mut rng = Rng::new(0x1234_5678 + id as u64);
    let mut mine: Vec<u64> = Vec::new();
    let mut n = 0u64;
    // ORDERING: Relaxed: a stop request; the joins order everything else.
    while !stop.load(Ordering::Relaxed) {
        let mask = vm.hpt().geometry().mask();
        let args = random_entry(&mut rng, mask, frames, false);
        let r = vm.hcall(id, H_ENTER, &args);
        if r.ret == H_SUCCESS && mine.try_reserve(1).is_ok() {
            mine.push(r.out[0]);
        }
        if let Some(&p) = mine.last() {
            let _ = vm.hcall(id, H_READ, &[0, p]);
            let _ = vm.hcall(id, H_PROTECT, &[1, p, 0]);
        }
        if mine.len() > 64 {
            let p = mine.swap_remove(rng.below(mine.len() as u64) as usize);
            // H_NOT_FOUND after a commit dropped it: fine.
            let _ = vm.hcall(id, H_REMOVE, &[0, p, 0]);
        }
        n += 4;
    }
    // ORDERING: Relaxed: statistics, read after the join.
    done.fetch_add(n, Ordering::Relaxed);
}

/// Grow `vm` by one order with vCPU threads running; returns (pause ns, vCPU calls).
fn measure(
    cfg: &ResizeBenchConfig,
    vm: Vm,
    order: u32,
    mode: ResizeMode,
) -> Result<(u64, u64), ResizeBenchError> {
    let vm = Arc::new(vm);
    let ctl = vm.resize_ctl().ok_or(ResizeBenchError::NoResizer)?;
    ctl.set_mode(mode);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let frames = 1u64 << (order + 7 - 12);
    let mut threads = Vec::new();
    for id in 0..cfg.vcpus {
        let (vm, stop, done) = (vm.clone(), stop.clone(), done.clone());
        let h = thread::Builder::new()
            .name(format!("bench-vcpu-{id}"))
            .spawn(move || vcpu_loop(&vm, id + 1, &stop, &done, frames));
        match h {
            Ok(h) => threads.push(h),
            Err(_) => break,
        }
    }
    let new = u64::from(order + 1);
    let res = (|| {
        let r = vm.hcall(0, H_RESIZE_HPT_PREPARE, &[0, new]).ret;
        if r != H_SUCCESS && !is_long_busy(r) {
            return Err((ResizeCall::Prepare, r));
        }
        ctl.wait_prepared();
        let r = vm.hcall(0, H_RESIZE_HPT_PREPARE, &[0, new]).ret;
        if r != H_SUCCESS {
            return Err((ResizeCall::Prepare, r));
        }
        let r = vm.hcall(0, H_RESIZE_HPT_COMMIT, &[0, new]).ret;
        if r != H_SUCCESS {
            return Err((ResizeCall::Commit, r));
        }
        Ok(ctl.last_pause_ns())
    })();
    // ORDERING: Relaxed: see `vcpu_loop`.
    stop.store(true, Ordering::Relaxed);
    let spawned = threads.len();
    let mut joined = 0;
    for h in threads {
        joined += usize::from(h.join().is_ok());
    }
    if joined != cfg.vcpus || spawned != cfg.vcpus {
        return Err(ResizeBenchError::Thread);
    }
    let pause = res.map_err(|(what, ret)| ResizeBenchError::Resize {
        order: order + 1,
        what,
        ret,
    })?;
    // ORDERING: Relaxed: the threads were joined.
    Ok((pause, done.load(Ordering::Relaxed)))
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Measure every order of `cfg`, calling `row` as each row is ready.
pub fn run_resize_bench(
    cfg: &ResizeBenchConfig,
    mut row: impl FnMut(&ResizeBenchRow),
) -> Result<Vec<ResizeBenchRow>, ResizeBenchError> {
    let mut out = Vec::new();
    for order in cfg.orders.clone() {
        if !(18..=35).contains(&order) {
            return Err(ResizeBenchError::Order(order));
        }
        let mut stw = Vec::new();
        let mut pre = Vec::new();
        let (mut entries, mut bolted, mut calls) = (0, 0, 0);
        for _ in 0..cfg.repeats.max(1) {
            for mode in [ResizeMode::StopTheWorld, ResizeMode::PreCopy] {
                let (vm, e, b) = populated(cfg, order)?;
                (entries, bolted) = (e, b);
                let (ns, c) = measure(cfg, vm, order, mode)?;
                match mode {
                    ResizeMode::StopTheWorld => stw.push(ns),
                    ResizeMode::PreCopy => {
                        pre.push(ns);
                        calls += c;
                    }
                }
            }
        }
        let (s, p) = (median(&mut stw) as f64 / 1e3, median(&mut pre) as f64 / 1e3);
        let r = ResizeBenchRow {
            order,
            entries,
            bolted,
            stop_the_world_pause_us: s,
            precopy_pause_us: p,
            ratio: if p > 0.0 { s / p } else { f64::INFINITY },
            vcpu_hcalls_during_precopy: calls,
        };
        row(&r);
        out.try_reserve(1).map_err(|_| ResizeBenchError::Alloc)?;
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_orders_run_in_both_modes() {
        let cfg = ResizeBenchConfig {
            orders: 18..=19,
            repeats: 1,
            ..ResizeBenchConfig::default()
        };
        let rows = run_resize_bench(&cfg, |_| {}).unwrap();
        assert_eq!(rows.len(), 2);
        for r in rows {
            assert!(r.entries > 0 && r.bolted > 0 && r.bolted < r.entries);
            assert!(r.stop_the_world_pause_us > 0.0 && r.precopy_pause_us > 0.0);
        }
    }

    #[test]
    fn bad_order_is_an_error() {
        let cfg = ResizeBenchConfig {
            orders: 36..=36,
            ..ResizeBenchConfig::default()
        };
        assert!(matches!(
            run_resize_bench(&cfg, |_| {}),
            Err(ResizeBenchError::Order(36))
        ));
    }
}
