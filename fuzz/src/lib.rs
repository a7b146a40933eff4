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

/// Pulls records from a streaming trace reader until the end or the first error:
/// the records read, and that error. `next` is the reader's `next_record`.
pub fn drain<T, E>(mut next: impl FnMut() -> Result<Option<T>, E>) -> (Vec<T>, Option<E>) {
    let mut recs = Vec::new();
    loop {
        match next() {
            Ok(Some(rec)) => recs.push(rec),
            Ok(None) => return (recs, None),
            Err(e) => return (recs, Some(e)),
        }
    }
}

/// The `from_reader` contract shared by the trace readers: `opened` is what the
/// gzip-sniffing constructor gave (the records it streamed and its first error), and
/// on input that is not gzip it must agree with the plain reader (`streamed`, `err`);
/// a constructor error must name the file `file`.
pub fn check_from_reader<T, E>(
    data: &[u8],
    file: &str,
    opened: Result<(Vec<T>, Option<E>), E>,
    streamed: &[T],
    err: Option<&E>,
) where
    T: PartialEq + std::fmt::Debug,
    E: std::fmt::Display,
{
    match opened {
        Ok((recs, e)) => {
            if !data.starts_with(&[0x1f, 0x8b]) {
                assert_eq!(recs, streamed);
                assert_eq!(e.map(|e| e.to_string()), err.map(|e| e.to_string()));
            }
        }
        Err(e) => assert!(
            e.to_string().starts_with(file),
            "error without the file: {e}"
        ),
    }
}
