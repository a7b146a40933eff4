//! The resize rehash of one bolted HPTE (H_RESIZE_HPT_COMMIT; KVM's
//! `resize_hpt_rehash_hpte` after "Fix handling of secondary HPTEG in HPT resizing
//! code"): the hash the guest used is reconstructed from the entry's AVPN and its old
//! PTEG index, and the entry moves to the same slot of its new PTEG.
//!
//! # Invariants
//!
//! * For an entry placed where its hash puts it (primary or secondary group), the
//!   reconstructed hash agrees with the forward hash (`hash::hpt_hash`) on the bits of
//!   the larger mask: the new index equals the index the guest would compute for the
//!   new order (the hash reconstructed from an entry, the old order and its index is
//!   the hash the guest used; property-tested below for growing and shrinking).
//! * The slot within the PTEG is kept; the result is always `< new.npte()`, whatever
//!   the entry holds (an entry bolted into an inconsistent group moves to the group its
//!   reconstructed hash names, as KVM does; QEMU aborts on it).
//! * The hash uses the *base* page shift (the segment's), as KVM does for mixed-size
//!   entries (QEMU's `rehash_hpte` hashes with the actual shift and misplaces them).

use revmap_hpt::hash::HptGeometry;
use revmap_hpt::hpte::HpteV;
use revmap_rmap::Ptex;

/// The index in a table of geometry `new` of the bolted entry with dword 0 `v` and
/// base page shift `base_shift` found at `old_ptex` in a table of geometry `old`.
#[inline]
pub fn rehash_index(
    v: HpteV,
    base_shift: u32,
    old: HptGeometry,
    old_ptex: Ptex,
    new: HptGeometry,
) -> Ptex {
    let p = base_shift.min(63);
    let mut avpn = v.avpn_val();
    if p > 23 {
        // AVPN bits below the page size are page-offset bits, not address bits.
        avpn &= !((1u64 << (p - 23)) - 1);
    }
    let slot = u64::from(old_ptex.0) % 8;
    let mut pteg = u64::from(old_ptex.0) / 8;
    if v.is_secondary() {
        pteg = !pteg;
    }
    let hash = if v.is_1t() {
        let vsid = avpn >> 17;
        let mut off = (avpn & 0x1_FFFF) << 23;
        let vh = vsid ^ (vsid << 25);
        if p < 23 {
            off |= ((vh ^ pteg) & old.mask()) << p;
        }
        vh ^ (off >> p)
    } else {
        let vsid = avpn >> 5;
        let mut off = (avpn & 0x1F) << 23;
        if p < 23 {
            off |= ((vsid ^ pteg) & old.mask()) << p;
        }
        vsid ^ (off >> p)
    };
    let new_pteg = if v.is_secondary() {
        !hash & new.mask()
    } else {
        hash & new.mask()
    };
    // new_pteg <= mask, so the index is < npte <= 2^32.
    Ptex((new_pteg * 8 + slot) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use revmap_hpt::hash::{hpt_hash, primary_pteg, secondary_pteg, Segment, SegmentSize};
    use revmap_hpt::hpte::encode_avpn;

    /// (base, actual) page shifts the guest can use, per segment size.
    const SIZES: [(u32, u32); 6] = [(12, 12), (12, 16), (16, 16), (16, 24), (24, 24), (34, 34)];

    fn entry(seg: &Segment, ea: u64, actual: u32, secondary: bool) -> HpteV {
        let one_t = seg.ssize == SegmentSize::S1T;
        let mut v = encode_avpn(seg.va(ea), actual, one_t) | HpteV::BOLTED | HpteV::VALID;
        if actual != 12 {
            v |= HpteV::LARGE;
        }
        if secondary {
            v |= HpteV::SECONDARY;
        }
        HpteV(v)
    }

    fn forward(geo: HptGeometry, seg: &Segment, ea: u64, secondary: bool) -> u64 {
        let h = hpt_hash(seg, ea);
        if secondary {
            secondary_pteg(geo, h)
        } else {
            primary_pteg(geo, h)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The guest's hash is recovered (KVM's secondary-HPTEG fix): for random bolted
        /// entries (256M and 1T, every page size, primary and secondary) placed where the
        /// guest's hash puts them, the rehash lands where the forward hash for the new
        /// order puts them, same slot, for growing, shrinking and same-order resizes.
        #[test]
        fn rehash_agrees_with_forward_hash(
            vsid in any::<u64>(),
            ea in any::<u64>(),
            one_t in any::<bool>(),
            size in 0usize..SIZES.len(),
            secondary in any::<bool>(),
            slot in 0u32..8,
            old_order in 18u32..=26,
            new_order in 18u32..=26,
        ) {
            let (base, actual) = SIZES[size];
            prop_assume!(one_t || base < 34);
            let ssize = if one_t { SegmentSize::S1T } else { SegmentSize::S256M };
            // A 78-bit VA: 38-bit VSID for 1T, 50-bit for 256M.
            let vsid = if one_t { vsid & ((1 << 38) - 1) } else { vsid & ((1 << 50) - 1) };
            let seg = Segment { vsid, ssize, base_shift: base };
            // The guest hashes the page's own address.
            let ea = ea & ssize.offset_mask() & !((1u64 << actual) - 1);
            let v = entry(&seg, ea, actual, secondary);
            let old = HptGeometry::new(old_order).unwrap();
            let new = HptGeometry::new(new_order).unwrap();
            let old_ptex = Ptex((forward(old, &seg, ea, secondary) * 8) as u32 + slot);
            let got = rehash_index(v, base, old, old_ptex, new);
            let want = Ptex((forward(new, &seg, ea, secondary) * 8) as u32 + slot);
            prop_assert_eq!(got, want);
        }

        /// Whatever dword 0 and index hold, the result is in range and keeps the slot.
        #[test]
        fn rehash_is_total_and_in_range(
            v in any::<u64>(), base in 0u32..70, old_order in 18u32..=28,
            new_order in 18u32..=28, idx in any::<u32>(),
        ) {
            let old = HptGeometry::new(old_order).unwrap();
            let new = HptGeometry::new(new_order).unwrap();
            let p = Ptex((u64::from(idx) % old.npte()) as u32);
            let got = rehash_index(HpteV(v), base, old, p, new);
            prop_assert!(u64::from(got.0) < new.npte());
            prop_assert_eq!(got.0 % 8, p.0 % 8);
        }
    }

    /// Growing never collides: growing by one order is injective on (PTEG, slot) and
    /// sends group g to g or g + 2^(old order - 7).
    #[test]
    fn growing_is_injective() {
        let old = HptGeometry::new(18).unwrap();
        let new = HptGeometry::new(19).unwrap();
        let mut seen = std::collections::HashSet::new();
        for (vsid, ssize) in [
            (0x1234u64, SegmentSize::S256M),
            (0x3_0000_0042u64, SegmentSize::S1T),
        ] {
            let one_t = matches!(ssize, SegmentSize::S1T);
            let seg = Segment {
                vsid,
                ssize,
                base_shift: 16,
            };
            for g in 0..old.npteg() {
                for hi in 0..2u64 {
                    // An entry whose primary group is g: pick the page index.
                    let vh = if one_t { vsid ^ (vsid << 25) } else { vsid };
                    let page = ((g ^ vh) & old.mask()) | (hi << 11);
                    let ea = page << 16;
                    let v = entry(&seg, ea, 16, false);
                    let pg = forward(old, &seg, ea, false);
                    assert_eq!(pg, g);
                    let slot = (hi as u32) + if one_t { 2 } else { 0 };
                    let n = rehash_index(v, 16, old, Ptex((pg * 8) as u32 + slot), new);
                    let ng = u64::from(n.0) / 8;
                    assert!(ng == pg || ng == pg + old.npteg());
                    assert!(seen.insert(n), "collision while growing");
                }
            }
        }
    }
}
