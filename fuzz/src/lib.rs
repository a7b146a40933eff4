//! Helpers shared by the fuzz targets.

/// The number of threads of this process (`/proc/self/task`), 0 if unknown.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Waits until this process has at most `n` threads again.
///
/// The resize extension prepares tables on detached worker threads (as KVM does), and
/// a VM may be dropped while one still runs: it frees its own table when done. A
/// thread alive at libFuzzer's per-input leak check shows its thread-local storage as
/// a leak, so targets that may leave such a worker wait for it here. Panics (a hung
/// worker is a finding) if the threads do not exit within a minute.
pub fn wait_threads_at_most(n: usize) {
    for _ in 0..60_000 {
        if thread_count() <= n {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!(
        "worker threads still running after a minute: {} > {n}",
        thread_count()
    );
}
