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
