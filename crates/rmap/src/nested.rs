//! Placeholder: implemented by the nested work item (issue 2).
