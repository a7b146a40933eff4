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

/// Largest number of vCPUs one VM supports (ids `0..MAX_VCPUS`): the width of the
/// per-VM vCPU bitmaps (gate words, TLB epochs, run-handle masks).
pub const MAX_VCPUS: usize = 64;

/// A vCPU id checked against [`MAX_VCPUS`] at construction, so that every per-vCPU
/// array and bitmask can index with it directly (no modulo, no bounds failure).
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VcpuId(u8);

/// A vCPU id at or past [`MAX_VCPUS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("vCPU id {id} out of range: at most {max} vCPUs (ids 0..{max})")]
pub struct VcpuIdError {
    /// The rejected id.
    pub id: u64,
    /// The supported count ([`MAX_VCPUS`]).
    pub max: usize,
}

impl VcpuId {
    /// vCPU 0.
    pub const ZERO: VcpuId = VcpuId(0);

    /// The id `n`, or an error if `n >= MAX_VCPUS`.
    #[inline]
    pub const fn new(n: usize) -> Result<VcpuId, VcpuIdError> {
        if n < MAX_VCPUS {
            Ok(VcpuId(n as u8))
        } else {
            Err(VcpuIdError {
                id: n as u64,
                max: MAX_VCPUS,
            })
        }
    }

    /// The id as an index (`< MAX_VCPUS`).
    #[inline(always)]
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// The single-bit mask of this vCPU in a `u64` vCPU set.
    #[inline(always)]
    pub const fn bit(self) -> u64 {
        1u64 << self.0
    }

    /// Every valid id, in order.
    pub fn all() -> impl Iterator<Item = VcpuId> {
        (0..MAX_VCPUS as u8).map(VcpuId)
    }
}

const _: () = assert!(MAX_VCPUS <= 64, "VcpuId::bit needs ids < 64");

impl TryFrom<usize> for VcpuId {
    type Error = VcpuIdError;
    #[inline]
    fn try_from(n: usize) -> Result<Self, Self::Error> {
        VcpuId::new(n)
    }
}

impl TryFrom<u32> for VcpuId {
    type Error = VcpuIdError;
    #[inline]
    fn try_from(n: u32) -> Result<Self, Self::Error> {
        match usize::try_from(n) {
            Ok(n) => VcpuId::new(n),
            Err(_) => Err(VcpuIdError {
                id: u64::from(n),
                max: MAX_VCPUS,
            }),
        }
    }
}

impl From<VcpuId> for usize {
    #[inline(always)]
    fn from(v: VcpuId) -> usize {
        v.index()
    }
}

impl core::fmt::Debug for VcpuId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "VcpuId({})", self.0)
    }
}

impl core::fmt::Display for VcpuId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
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

    #[test]
    fn vcpu_id_bounds() {
        assert_eq!(VcpuId::new(0), Ok(VcpuId::ZERO));
        let last = VcpuId::new(MAX_VCPUS - 1).unwrap();
        assert_eq!(last.index(), MAX_VCPUS - 1);
        assert_eq!(last.bit(), 1u64 << (MAX_VCPUS - 1));
        let err = VcpuId::new(MAX_VCPUS).unwrap_err();
        assert_eq!(
            err,
            VcpuIdError {
                id: MAX_VCPUS as u64,
                max: MAX_VCPUS
            }
        );
        assert!(VcpuId::new(usize::MAX).is_err());
        assert!(VcpuId::try_from(u32::MAX).is_err());
        assert_eq!(VcpuId::try_from(5u32).map(usize::from), Ok(5));
        // No wrap-around: 64 and 0 are different answers, not the same vCPU.
        assert_ne!(VcpuId::new(MAX_VCPUS).ok(), Some(VcpuId::ZERO));
        assert_eq!(VcpuId::all().count(), MAX_VCPUS);
        assert!(format!("{err}").contains("64"));
    }
}
