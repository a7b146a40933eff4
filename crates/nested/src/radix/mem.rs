//! [`SparseMemory`]: a simple guest-physical memory for tests and trace replay.
//!
//! Guest RAM is `[0, ram_bytes)`; it reads as zero until written. Only written
//! doublewords are stored (a hash map keyed by the doubleword index), so a 48 GiB L1
//! costs nothing until its tables are built. Addresses at or beyond `ram_bytes` are not
//! RAM: reading them fails, as KVM's `kvm_read_guest` outside every memslot does.

use super::walk::GuestMemory;
use revmap_rmap::Gpa;
use std::collections::HashMap;

/// Why a store to [`SparseMemory`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The address is not 8-byte aligned.
    #[error("store at {0} is not 8-byte aligned")]
    Misaligned(Gpa),
    /// The doubleword is not entirely inside guest RAM.
    #[error("store at {0} is outside guest RAM")]
    NotRam(Gpa),
    /// Memory to hold the doubleword could not be allocated (nothing changed).
    #[error("no memory to store at {0}")]
    NoMemory(Gpa),
}

/// Sparse guest-physical memory of `ram_bytes` bytes, zero-initialised.
#[derive(Clone, Debug, Default)]
pub struct SparseMemory {
    ram_bytes: u64,
    words: HashMap<u64, u64>,
}

impl SparseMemory {
    /// Zeroed memory covering guest physical `[0, ram_bytes)`.
    pub fn new(ram_bytes: u64) -> Self {
        SparseMemory {
            ram_bytes,
            words: HashMap::new(),
        }
    }
    /// The RAM size in bytes.
    #[inline]
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }
    /// Whether `[gpa, gpa + len)` lies entirely in RAM.
    #[inline]
    pub fn is_ram(&self, gpa: Gpa, len: u64) -> bool {
        gpa.0
            .checked_add(len)
            .is_some_and(|end| end <= self.ram_bytes)
    }
    /// Stores the architectural value `val` as the big-endian doubleword at `gpa`.
    pub fn write_be_u64(&mut self, gpa: Gpa, val: u64) -> Result<(), MemError> {
        if gpa.0 & 7 != 0 {
            return Err(MemError::Misaligned(gpa));
        }
        if !self.is_ram(gpa, 8) {
            return Err(MemError::NotRam(gpa));
        }
        if val == 0 {
            self.words.remove(&(gpa.0 >> 3));
        } else {
            self.words
                .try_reserve(1)
                .map_err(|_| MemError::NoMemory(gpa))?;
            self.words.insert(gpa.0 >> 3, val);
        }
        Ok(())
    }
    /// Number of non-zero doublewords stored.
    pub fn populated_words(&self) -> usize {
        self.words.len()
    }
    #[inline]
    fn word(&self, index: u64) -> u64 {
        self.words.get(&index).copied().unwrap_or(0)
    }
}

impl GuestMemory for SparseMemory {
    #[inline]
    fn read_be_u64(&self, gpa: Gpa) -> Option<u64> {
        if !self.is_ram(gpa, 8) {
            return None;
        }
        let off = gpa.0 & 7;
        let w = gpa.0 >> 3;
        if off == 0 {
            return Some(self.word(w));
        }
        // Unaligned: the tail of one doubleword and the head of the next, in memory order.
        let hi = self.word(w) << (8 * off);
        let lo = self.word(w + 1) >> (8 * (8 - off));
        Some(hi | lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zero_until_written_and_fails_outside_ram() {
        let mut m = SparseMemory::new(0x1_0000);
        assert_eq!(m.read_be_u64(Gpa(0x8)), Some(0));
        assert_eq!(m.read_be_u64(Gpa(0xfff8)), Some(0));
        assert_eq!(m.read_be_u64(Gpa(0xfffc)), None);
        assert_eq!(m.read_be_u64(Gpa(u64::MAX - 3)), None);
        m.write_be_u64(Gpa(0x10), 0x0102_0304_0506_0708).unwrap();
        m.write_be_u64(Gpa(0x18), 0x1112_1314_1516_1718).unwrap();
        assert_eq!(m.read_be_u64(Gpa(0x10)), Some(0x0102_0304_0506_0708));
        assert_eq!(m.read_be_u64(Gpa(0x14)), Some(0x0506_0708_1112_1314));
        assert_eq!(
            m.write_be_u64(Gpa(0x11), 1),
            Err(MemError::Misaligned(Gpa(0x11)))
        );
        assert_eq!(
            m.write_be_u64(Gpa(0x1_0000), 1),
            Err(MemError::NotRam(Gpa(0x1_0000)))
        );
        assert_eq!(m.populated_words(), 2);
        m.write_be_u64(Gpa(0x10), 0).unwrap();
        assert_eq!(m.populated_words(), 1);
        assert_eq!(m.read_be_u64(Gpa(0x10)), Some(0));
    }
}
