//! PAPR hashed page table (work in progress).
