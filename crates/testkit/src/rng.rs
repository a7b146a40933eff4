//! A small deterministic random stream for fixtures and randomised tests.

/// xorshift64* (Marsaglia's xorshift with Vigna's multiplier): a fixed seed gives the
/// same stream on every machine and run.
///
/// ```
/// use revmap_testkit::rng::Rng;
///
/// let (mut a, mut b) = (Rng::new(7), Rng::new(7));
/// assert_eq!(a.next(), b.next(), "the stream depends on the seed only");
/// assert!((0..100).all(|_| a.below(10) < 10));
/// ```
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The stream of `seed` (a zero seed is replaced, xorshift's one fixed point).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (0 for `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
