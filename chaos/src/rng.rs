//! The harness's seeded random numbers: SplitMix64, whose sequence never changes with a crate
//! version, so one seed gives the same fault decisions in every build of `kiln-chaos`.
//!
//! Decisions are drawn from streams derived from the run's seed and the coordinates of the
//! decision ([`Rng::derive`]): the proxy of agent 3, connection 17, exchange 2, rule 0 always
//! draws the same number for a given seed, whatever happened on other connections first.

/// A SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A generator for one decision site: `seed` mixed with each of `parts` in turn.
    pub fn derive(seed: u64, parts: &[u64]) -> Rng {
        let mut r = Rng(seed);
        for p in parts {
            let mixed = r.next_u64() ^ p.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            r = Rng(mixed);
        }
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (clamped to `[0, 1]`).
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p.min(1.0)
    }

    /// A number in `lo..=hi` (`lo` when `hi <= lo`).
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        let span = hi - lo;
        if span == u64::MAX {
            return self.next_u64();
        }
        lo + self.next_u64() % (span + 1)
    }

    /// A float in `[lo, hi]`.
    pub fn between_f(&mut self, lo: f64, hi: f64) -> f64 {
        if hi <= lo {
            return lo;
        }
        lo + self.unit() * (hi - lo)
    }

    /// `n` distinct indexes of `0..len`, in increasing order (all of them when `n >= len`).
    pub fn choose(&mut self, len: usize, n: usize) -> Vec<usize> {
        let mut pool: Vec<usize> = (0..len).collect();
        let mut out = Vec::new();
        for _ in 0..n.min(len) {
            let k = self.between(0, pool.len() as u64 - 1) as usize;
            out.push(pool.swap_remove(k));
        }
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins down the sequence: a change here changes every recorded seed's faults.
    #[test]
    fn sequence_is_stable() {
        let mut r = Rng::new(1);
        assert_eq!(r.next_u64(), 0x910a_2dec_8902_5cc1);
        let a = Rng::derive(42, &[3, 17, 2]).next_u64();
        let b = Rng::derive(42, &[3, 17, 2]).next_u64();
        let c = Rng::derive(42, &[3, 17, 3]).next_u64();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn ranges_hold() {
        let mut r = Rng::new(7);
        for _ in 0..1000 {
            let v = r.between(5, 9);
            assert!((5..=9).contains(&v));
            let f = r.between_f(0.25, 0.5);
            assert!((0.25..=0.5).contains(&f));
        }
        assert_eq!(r.between(4, 4), 4);
        assert!(!r.chance(0.0));
        assert!(r.chance(1.0));
        let picked = r.choose(10, 4);
        assert_eq!(picked.len(), 4);
        assert!(picked.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(r.choose(3, 9), vec![0, 1, 2]);
    }
}
