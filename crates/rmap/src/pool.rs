//! Placeholder: implemented by the pool work item (issue 2).
