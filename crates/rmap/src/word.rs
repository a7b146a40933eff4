//! What the tagged head-word snapshots of the list rmaps ([`crate::pte_list`]'s
//! `RmapHeadVal`, [`crate::nested`]'s `NestedRmapVal`) have in common: the raw value,
//! the empty word, the lock bit and a `Debug` that shows the decoded form.

/// Implements the shared accessors of a `#[repr(transparent)]` head-word snapshot type
/// `$ty(u64)` whose lock bit is `$lock` and which has a `decode(self)` method.
macro_rules! head_word_accessors {
    ($ty:ident, $lock:expr) => {
        impl $ty {
            /// The empty word.
            pub const EMPTY: Self = Self(0);

            /// Wrap a raw value (not validated; see [`Self::decode`]).
            #[inline(always)]
            pub const fn from_raw(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw 64-bit value.
            #[inline(always)]
            pub const fn bits(self) -> u64 {
                self.0
            }

            /// The lock bit.
            #[inline(always)]
            pub const fn is_locked(self) -> bool {
                self.0 & $lock != 0
            }
        }

        impl core::fmt::Debug for $ty {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(
                    f,
                    concat!(stringify!($ty), "({:#x}: {:?})"),
                    self.0,
                    self.decode()
                )
            }
        }
    };
}
pub(crate) use head_word_accessors;

/// Getter/setter pairs over atomic fields of a list node, every access `Relaxed`: the
/// nodes are read and written only under the owning head word's lock, whose
/// Acquire/Release orders them (or, for a vacant node, by the pool). Each item is
/// `getter / setter: field -> type`.
macro_rules! relaxed_fields {
    ($($get:ident / $set:ident : $field:ident -> $t:ty),* $(,)?) => {$(
        #[inline(always)]
        fn $get(&self) -> $t {
            // ORDERING: Relaxed under the head word's lock (see the macro's docs).
            self.$field.load(Ordering::Relaxed)
        }
        #[inline(always)]
        fn $set(&self, v: $t) {
            // ORDERING: Relaxed under the head word's lock (see the macro's docs).
            self.$field.store(v, Ordering::Relaxed)
        }
    )*};
}
pub(crate) use relaxed_fields;
