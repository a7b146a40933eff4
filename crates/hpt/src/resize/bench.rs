//! Commit-pause benchmark (placeholder, filled below).
