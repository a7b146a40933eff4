//! Newtypes for every address space and index used across revmap.
//!
//! A raw `u64` crossing a module boundary is a bug waiting to happen: a guest frame
//! number, a guest physical address, a host virtual address and an HPTE index are all
//! integers, and mixing them up compiles. Each gets its own `#[repr(transparent)]` type.

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident($inner:ty)) => {
        $(#[$m])*
        #[repr(transparent)]
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl $name {
            /// The raw value.
            #[inline(always)]
            pub const fn raw(self) -> $inner {
                self.0
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

/// Host page shift: revmap's rmap granule is a 4 KiB page, as KVM's `PAGE_SHIFT` on a
/// 4K host.
pub const PAGE_SHIFT: u32 = 12;
/// Host page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

newtype!(
    /// Guest frame number: a guest physical address shifted right by [`PAGE_SHIFT`].
    Gfn(u64)
);
newtype!(
    /// Guest physical address.
    Gpa(u64)
);
newtype!(
    /// Host virtual address (the userspace address backing guest memory).
    Hva(u64)
);
newtype!(
    /// Index of an HPTE in the hashed page table (PTEG index × 8 + slot).
    Ptex(u32)
);
newtype!(
    /// Index of a memslot.
    SlotId(u16)
);
newtype!(
    /// Logical partition id of a nested guest (12 bits used by the nested rmap).
    Lpid(u16)
);

impl Gpa {
    /// The frame containing this address.
    #[inline]
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
}

impl Gfn {
    /// The address of the frame's first byte.
    #[inline]
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
}

impl Ptex {
    /// The PTEG (group of 8 HPTEs) this index belongs to.
    #[inline]
    pub const fn pteg(self) -> u32 {
        self.0 >> 3
    }
    /// The slot (0..8) within the PTEG.
    #[inline]
    pub const fn slot(self) -> u32 {
        self.0 & 7
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn conversions() {
        assert_eq!(Gpa(0x12345).gfn(), Gfn(0x12));
        assert_eq!(Gfn(0x12).gpa(), Gpa(0x12000));
        assert_eq!(Ptex(0x1f).pteg(), 3);
        assert_eq!(Ptex(0x1f).slot(), 7);
        assert_eq!(format!("{:?}", Gfn(16)), "Gfn(0x10)");
        assert_eq!(core::mem::size_of::<Ptex>(), 4);
    }
}
