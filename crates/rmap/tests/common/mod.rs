//! What the property tests of this crate share.

use proptest::test_runner::{Config, FileFailurePersistence};

/// A proptest configuration of `cases` cases that keeps failing inputs in
/// `proptest-regressions` files beside the test source (replayed first on the next run).
pub fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}
