//! Placeholder: implemented by the pte_list work item (issue 2).
