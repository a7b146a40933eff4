//! Errors of the rmap structures.

/// Why an rmap operation could not be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RmapError {
    /// Memory for a structure or a node pool could not be reserved.
    #[error("allocation of {bytes} bytes failed")]
    Alloc {
        /// How many bytes were requested.
        bytes: usize,
    },
    /// The number of HPTE slots does not fit 32-bit ring links (HPT order above 36).
    #[error("{npte} HPTE slots do not fit 32-bit revmap links (HPT order above 36)")]
    TooManySlots {
        /// Requested number of slots.
        npte: u64,
    },
    /// A node pool ran out of the capacity reserved for it.
    #[error("node pool exhausted: reserve capacity before taking the lock")]
    PoolExhausted,
    /// An index lies outside the structure.
    #[error("index {index} out of range (len {len})")]
    OutOfRange {
        /// The offending index.
        index: u64,
        /// The structure's length.
        len: u64,
    },
}

/// Types whose all-zero bytes are a valid value, equal to [`Zeroable::zero`]: tables of
/// them are allocated already zeroed ([`try_zeroed_boxed_slice`]), which costs no
/// instructions per element (the allocator hands out fresh zero pages) where building
/// the elements one by one cost about 10 per element (a 2^23-byte HPT and its revmap:
/// ~10 M instructions per VM).
///
/// # Safety
///
/// With the std/core atomics (neither `cfg(loom)` nor `cfg(shuttle)`), the all-zero
/// bit pattern must be a valid value of the type, equal to what [`Zeroable::zero`]
/// returns. (Under loom and shuttle, whose atomics are not plain integers, the zeroed
/// allocation is not used and only `zero` is.)
pub unsafe trait Zeroable: Sized {
    /// The value whose bytes are all zero.
    fn zero() -> Self;
}

// SAFETY: `core::sync::atomic::AtomicU64` has the in-memory representation of `u64`.
unsafe impl Zeroable for crate::sync::AtomicU64 {
    fn zero() -> Self {
        crate::sync::AtomicU64::new(0)
    }
}

// SAFETY: `core::sync::atomic::AtomicU32` has the in-memory representation of `u32`.
unsafe impl Zeroable for crate::sync::AtomicU32 {
    fn zero() -> Self {
        crate::sync::AtomicU32::new(0)
    }
}

/// A boxed slice of `n` zero values, allocated zeroed (no per-element work; the pages
/// are touched by their first use), reporting failure as an [`RmapError::Alloc`].
pub fn try_zeroed_boxed_slice<T: Zeroable>(n: usize) -> Result<alloc::boxed::Box<[T]>, RmapError> {
    #[cfg(not(any(loom, shuttle)))]
    {
        let bytes = n.saturating_mul(core::mem::size_of::<T>());
        if bytes == 0 {
            return try_boxed_slice(n, |_| T::zero());
        }
        let layout = core::alloc::Layout::array::<T>(n).map_err(|_| RmapError::Alloc { bytes })?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) }.cast::<T>();
        if p.is_null() {
            return Err(RmapError::Alloc { bytes });
        }
        // SAFETY: `p` comes from the global allocator with `Layout::array::<T>(n)`, the
        // layout a `Box<[T]>` of `n` elements is freed with; its `n` elements are
        // all-zero bytes, a valid `T` by the `Zeroable` contract, so they are
        // initialised; the box takes sole ownership of the allocation.
        Ok(unsafe { alloc::boxed::Box::from_raw(core::ptr::slice_from_raw_parts_mut(p, n)) })
    }
    #[cfg(any(loom, shuttle))]
    {
        try_boxed_slice(n, |_| T::zero())
    }
}

/// Zero `words`, writing only the 256-byte blocks that hold a non-zero word: one read
/// pass (vectorised OR of each block) and few writes when most of the memory is already
/// zero, as in a reused table of which a guest used a small part. The memory stays
/// mapped and no page is faulted in anew.
///
/// On x86-64 with `std` the pass uses the widest vector unit the CPU has (AVX-512 or
/// AVX2, detected once at run time): a reused 2^23-byte HPT and its revmap are about
/// 2.1 M words, and the read pass is most of the cost of taking a pooled table (callgrind,
/// boot trace, per hypercall: 37.6 instructions with SSE2, 16.5 with AVX2).
pub fn zero_nonzero_blocks(words: &mut [u64]) {
    #[cfg(all(feature = "std", target_arch = "x86_64", not(any(loom, shuttle))))]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above), the one
            // requirement of calling a `#[target_feature(enable = "avx512f")]` function.
            unsafe { zero_nonzero_blocks_avx512(words) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the one requirement
            // of calling a `#[target_feature(enable = "avx2")]` function.
            unsafe { zero_nonzero_blocks_avx2(words) };
            return;
        }
    }
    zero_nonzero_blocks_body(words);
}

/// [`zero_nonzero_blocks`] compiled for AVX-512F (the same code, vectorised wider).
#[cfg(all(feature = "std", target_arch = "x86_64", not(any(loom, shuttle))))]
#[target_feature(enable = "avx512f")]
fn zero_nonzero_blocks_avx512(words: &mut [u64]) {
    zero_nonzero_blocks_body(words);
}

/// [`zero_nonzero_blocks`] compiled for AVX2 (the same code, vectorised wider).
#[cfg(all(feature = "std", target_arch = "x86_64", not(any(loom, shuttle))))]
#[target_feature(enable = "avx2")]
fn zero_nonzero_blocks_avx2(words: &mut [u64]) {
    zero_nonzero_blocks_body(words);
}

/// The portable body of [`zero_nonzero_blocks`], inlined into each target-feature
/// variant so that the compiler vectorises it for that unit.
#[inline(always)]
fn zero_nonzero_blocks_body(words: &mut [u64]) {
    let mut blocks = words.chunks_exact_mut(32);
    for b in &mut blocks {
        if b.iter().fold(0, |a, &w| a | w) != 0 {
            b.fill(0);
        }
    }
    blocks.into_remainder().fill(0);
}

/// Try to allocate a boxed slice of `n` elements made by `f`, reporting failure as an
/// [`RmapError::Alloc`] instead of aborting.
pub fn try_boxed_slice<T>(
    n: usize,
    mut f: impl FnMut(usize) -> T,
) -> Result<alloc::boxed::Box<[T]>, RmapError> {
    let bytes = n.saturating_mul(core::mem::size_of::<T>());
    let mut v = alloc::vec::Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| RmapError::Alloc { bytes })?;
    for i in 0..n {
        v.push(f(i));
    }
    Ok(v.into_boxed_slice())
}

/// Try to box `value`, reporting failure as an [`RmapError::Alloc`] instead of aborting
/// (`Box::try_new` is not stable Rust). A `Box<T>` made here coerces to a
/// `Box<dyn Trait>` like any other.
pub fn try_box<T>(value: T) -> Result<alloc::boxed::Box<T>, RmapError> {
    let layout = core::alloc::Layout::new::<T>();
    if layout.size() == 0 {
        // A zero-sized value is never allocated.
        return Ok(alloc::boxed::Box::new(value));
    }
    // SAFETY: `layout` has a non-zero size, as `alloc` requires.
    let p = unsafe { alloc::alloc::alloc(layout) }.cast::<T>();
    if p.is_null() {
        return Err(RmapError::Alloc {
            bytes: layout.size(),
        });
    }
    // SAFETY: `p` is non-null, was returned by the global allocator for `T`'s layout (so
    // it is aligned and valid for a write of one `T`), and nothing else refers to it.
    // `Box::from_raw` may own a pointer the global allocator gave for `Layout::new::<T>()`
    // (the memory layout documented for `Box`), and the value is initialised first.
    unsafe {
        p.write(value);
        Ok(alloc::boxed::Box::from_raw(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_nonzero_blocks_zeroes_every_word() {
        for len in [0, 1, 31, 32, 33, 100, 1000] {
            let mut w: alloc::vec::Vec<u64> = (0..len as u64).map(|i| i % 7).collect();
            // Some all-zero blocks as well.
            for x in w.iter_mut().skip(32).take(64) {
                *x = 0;
            }
            zero_nonzero_blocks(&mut w);
            assert!(w.iter().all(|&x| x == 0), "len {len}");
            assert_eq!(w.len(), len);
        }
    }

    /// A zeroing variant under test, with its name.
    type Variant = (&'static str, fn(&mut [u64]));

    /// Every variant the CPU can run, as `zero_nonzero_blocks` would pick it.
    fn variants() -> alloc::vec::Vec<Variant> {
        let mut v: alloc::vec::Vec<Variant> = alloc::vec![
            ("portable", zero_nonzero_blocks_body),
            ("dispatch", zero_nonzero_blocks)
        ];
        #[cfg(all(feature = "std", target_arch = "x86_64", not(any(loom, shuttle))))]
        {
            if std::is_x86_feature_detected!("avx2") {
                v.push(("avx2", |w| {
                    // SAFETY: AVX2 is present (checked before this variant is listed).
                    unsafe { zero_nonzero_blocks_avx2(w) }
                }));
            }
            if std::is_x86_feature_detected!("avx512f") {
                v.push(("avx512f", |w| {
                    // SAFETY: AVX-512F is present (checked before this variant is listed).
                    unsafe { zero_nonzero_blocks_avx512(w) }
                }));
            }
        }
        v
    }

    #[test]
    fn every_variant_finds_a_lone_nonzero_bit_anywhere() {
        for (name, f) in variants() {
            for len in [1usize, 32, 33, 64, 95, 256] {
                for i in 0..len {
                    for bit in [0u32, 31, 63] {
                        let mut w = alloc::vec![0u64; len];
                        w[i] = 1 << bit;
                        f(&mut w);
                        assert!(
                            w.iter().all(|&x| x == 0),
                            "{name}: len {len} word {i} bit {bit}"
                        );
                    }
                }
            }
        }
    }
}
