//! The offset arithmetic of emulated guest page-table writes (`kvm_mmu_track_write`):
//! which shadow entries an emulated store hits, and when a store is too odd to patch.
//!
//! Invariants:
//! * [`written_sptes`] maps a byte offset in a guest table to the SPTE indices of one
//!   shadow page that derive from the written gpte, or `None` when the write falls in
//!   another quadrant's part of a 4-byte guest table; the range is always within 0..512.
//! * [`detect_write_misaligned`] is true exactly for writes that cross a gpte or are
//!   shorter than 4 bytes, except a 1-byte write at a gpte's first byte (Linux's
//!   `clear_bit` via `andb` updates status bits that way).
//! * [`FLOOD_THRESHOLD`] is KVM's write-flooding limit: a shadow page above level 1
//!   written this many times by emulation without being used is zapped.

use crate::role::SpRole;
use core::ops::Range;

/// Emulated writes to one shadow page (level > 1) since its last use, at which it is
/// zapped instead of patched (`detect_write_flooding`).
pub const FLOOD_THRESHOLD: u8 = 3;

/// The gpte size of a shadow page's guest table.
const fn gpte_size(role: SpRole) -> u64 {
    if role.has_4_byte_gpte() != 0 {
        4
    } else {
        8
    }
}

/// Whether an emulated write of `bytes` at `gpa` into a table shadowed with `role` is
/// misaligned (KVM's `detect_write_misaligned`): the shadow page is then zapped.
pub const fn detect_write_misaligned(role: SpRole, gpa: u64, bytes: u32) -> bool {
    let offset = gpa & 0xfff;
    let size = gpte_size(role);
    if offset & (size - 1) == 0 && bytes == 1 {
        return false;
    }
    if bytes == 0 {
        return false;
    }
    let last = offset + bytes as u64 - 1;
    (offset ^ last) & !(size - 1) != 0 || bytes < 4
}

/// The SPTE indices of a shadow page with `role` that derive from the gpte written at
/// `gpa` (KVM's `get_written_sptes`). With 8-byte gptes the index is the gpte's. With
/// 4-byte gptes the byte offset doubles (8-byte SPTEs), and once more at the PD level,
/// where one 4 MiB guest PDE is shadowed by two 2 MiB SPTEs; the part above the page
/// selects the quadrant, which must be this shadow page's.
pub const fn written_sptes(role: SpRole, gpa: u64) -> Option<Range<usize>> {
    let mut offset = gpa & 0xfff;
    let mut n = 1;
    if role.has_4_byte_gpte() != 0 {
        offset <<= 1;
        if role.level() == 2 {
            offset = (offset & !7) << 1;
            n = 2;
        }
        let quadrant = offset >> 12;
        offset &= 0xfff;
        if quadrant != role.quadrant() as u64 {
            return None;
        }
    }
    let first = (offset / 8) as usize;
    Some(first..first + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(level: u32, four: bool, quadrant: u32) -> SpRole {
        SpRole(0)
            .with_level(level)
            .with_has_4_byte_gpte(four as u32)
            .with_quadrant(quadrant)
    }

    #[test]
    fn eight_byte_gptes_map_one_to_one() {
        assert_eq!(written_sptes(role(1, false, 0), 0x5_0ff8), Some(511..512));
        assert_eq!(written_sptes(role(3, false, 0), 0x5_0010), Some(2..3));
        // A 4-byte store to the high half hits the same gpte.
        assert_eq!(written_sptes(role(1, false, 0), 0x5_0014), Some(2..3));
    }

    #[test]
    fn four_byte_gptes_use_quadrants() {
        // Guest PT (1024 gptes, 4 MiB): two PAE PTs; gpte 600 is in the second (quadrant 1).
        let pt = |q| role(1, true, q);
        assert_eq!(written_sptes(pt(1), 600 * 4), Some(88..89));
        assert_eq!(written_sptes(pt(0), 600 * 4), None);
        assert_eq!(written_sptes(pt(0), 5 * 4), Some(5..6));
        // Guest PD (4 GiB): four PAE PDs; a 4 MiB PDE becomes two 2 MiB SPTEs.
        let pd = |q| role(2, true, q);
        assert_eq!(written_sptes(pd(0), 3 * 4), Some(6..8));
        assert_eq!(written_sptes(pd(3), 1023 * 4), Some(510..512));
        assert_eq!(written_sptes(pd(2), 1023 * 4), None);
        // A write to the second half of a gpte hits the same SPTEs.
        assert_eq!(written_sptes(pd(0), 3 * 4 + 2), Some(6..8));
        // Every offset lands in range.
        for q in 0..4 {
            for off in 0..4096 {
                if let Some(r) = written_sptes(pd(q), off) {
                    assert!(r.end <= 512);
                }
            }
        }
    }

    #[test]
    fn misaligned_writes() {
        let r8 = role(1, false, 0);
        assert!(!detect_write_misaligned(r8, 0x1008, 8));
        assert!(!detect_write_misaligned(r8, 0x100c, 4));
        assert!(
            !detect_write_misaligned(r8, 0x1008, 1),
            "andb at the gpte's first byte"
        );
        assert!(detect_write_misaligned(r8, 0x1009, 1));
        assert!(detect_write_misaligned(r8, 0x1008, 2));
        assert!(
            detect_write_misaligned(r8, 0x100c, 8),
            "crosses into the next gpte"
        );
        let r4 = role(1, true, 0);
        assert!(!detect_write_misaligned(r4, 0x1004, 4));
        assert!(detect_write_misaligned(r4, 0x1004, 8));
    }
}
