//! Seeded streams: every random number patchbay draws comes from here, so a seed means the
//! same thing everywhere.
//!
//! - [`splitmix64`]: a counter-based hash (Steele et al.). Bit-identical to `splitmix64` in
//!   kernels/common.cuh: the device kernels draw the same numbers as the CPU references.
//! - [`gaussian`]: a standard normal draw keyed by (seed, position, element): synthetic
//!   weights, `RandomEqualNorm` ablation, random control directions.
//! - [`SplitMix`]: the sequential splitmix64 chain (`state <- splitmix64(state)`), and on it
//!   [`random_pairs`], the one sampler of (source, target) prompt pairs.
//! - [`chacha`]: a ChaCha8 stream for shuffles and resampling (data splits, bootstrap, bench
//!   prompts).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// splitmix64: a counter-based hash, so every backend draws the same noise.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A standard normal draw keyed by (seed, position, element) (Box-Muller on two hashed uniforms).
pub fn gaussian(seed: u64, pos: u64, i: u64) -> f32 {
    let h = splitmix64(seed ^ splitmix64(pos.wrapping_mul(0x1000_0000_01B3) ^ splitmix64(i)));
    let u1 = ((h >> 40) as f64 + 0.5) / (1u64 << 24) as f64;
    let u2 = ((h & 0xFF_FFFF) as f64 + 0.5) / (1u64 << 24) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// The ChaCha8 stream of `seed`.
pub fn chacha(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// The splitmix64 chain from a seed: each draw is `state = splitmix64(state)`.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = splitmix64(self.0);
        self.0
    }

    /// A draw in `0..m` (m >= 1; the modulo bias is below 2^-40 for the sizes used here).
    pub fn below(&mut self, m: usize) -> usize {
        (self.next_u64() % m as u64) as usize
    }
}

/// Which (source, target) pairs [`random_pairs`] draws.
pub enum PairsOf<'a, K> {
    /// Any two distinct items of `0..n`: the source uniform, the target uniform over the others.
    Items(usize),
    /// Items of different keys (`None`: the item takes no part): the source uniform over the
    /// keyed items, the target uniform over those of another key.
    Keys(&'a [Option<K>]),
}

/// An endless seeded stream of (source, target) pairs (with repeats; a caller that wants
/// distinct pairs skips the ones it has seen). Err when fewer than 2 items (or keys) take part.
pub fn random_pairs<'a, K: Ord>(of: PairsOf<'a, K>, seed: u64) -> Result<Box<dyn Iterator<Item = (usize, usize)> + 'a>> {
    let mut rng = SplitMix::new(seed);
    match of {
        PairsOf::Items(n) => {
            if n < 2 {
                return Err(Error::input(format!("random pairs need at least 2 prompts, there are {n}")));
            }
            Ok(Box::new(std::iter::repeat_with(move || {
                let source = rng.below(n);
                (source, (source + 1 + rng.below(n - 1)) % n)
            })))
        }
        PairsOf::Keys(keys) => {
            // Keyed items sorted by key: one key's items are a contiguous run.
            let mut by_key: Vec<(&K, usize)> = keys.iter().enumerate().filter_map(|(i, k)| k.as_ref().map(|k| (k, i))).collect();
            by_key.sort_unstable();
            let n_keys = by_key.chunk_by(|a, b| a.0 == b.0).count();
            if n_keys < 2 {
                return Err(Error::input(format!("random pairs of different labels need prompts of at least 2 labels, there are {n_keys}")));
            }
            Ok(Box::new(std::iter::repeat_with(move || {
                let (key, source) = by_key[rng.below(by_key.len())];
                let lo = by_key.partition_point(|&(k, _)| k < key);
                let hi = by_key.partition_point(|&(k, _)| k <= key);
                let j = rng.below(by_key.len() - (hi - lo));
                (source, by_key[if j < lo { j } else { j + hi - lo }].1)
            })))
        }
    }
}

impl<K: Ord> PairsOf<'_, K> {
    /// How many distinct (source, target) pairs there are.
    pub fn count(&self) -> usize {
        match self {
            PairsOf::Items(n) => n * n.saturating_sub(1),
            PairsOf::Keys(keys) => {
                let mut by_key: Vec<&K> = keys.iter().flatten().collect();
                by_key.sort_unstable();
                let n = by_key.len();
                n * n - by_key.chunk_by(|a, b| a == b).map(|run| run.len() * run.len()).sum::<usize>()
            }
        }
    }
}

/// `n` distinct (source, target) pairs: the stream of [`random_pairs`] without its repeats, in
/// the order drawn. Err saying how many exist when there are fewer than `n`.
pub fn distinct_pairs<K: Ord>(of: PairsOf<'_, K>, n: usize, seed: u64) -> Result<Vec<(usize, usize)>> {
    let possible = of.count();
    let what = match of {
        PairsOf::Items(m) => format!("{m} prompts"),
        PairsOf::Keys(_) => "prompts of different labels".to_string(),
    };
    if n > possible {
        return Err(Error::input(format!("{n} distinct random pairs asked, but {what} make only {possible} (source, target) pairs")));
    }
    let mut seen = std::collections::HashSet::new();
    Ok(random_pairs(of, seed)?.filter(|&p| seen.insert(p)).take(n).collect())
}

/// The uniform stream in [0, 1) (53 bits) of a 64-bit LCG: the fixed data of the probes' unit tests.
#[cfg(test)]
pub(crate) fn lcg_uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed;
    move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_and_gaussian_are_pinned() {
        // The device's copy (kernels/common.cuh) is compared with this one through the CPU
        // references in tests/kernel_sample.rs and tests/kernel_site_ops.rs (RandomEqualNorm).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(1), 0x910A_2DEC_8902_5CC1);
        let g: Vec<f32> = (0..4000).map(|i| gaussian(7, 3, i)).collect();
        let mean = g.iter().sum::<f32>() / g.len() as f32;
        let var = g.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / g.len() as f32;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.08, "mean {mean} var {var}");
    }

    /// `patch --random-pairs` draws exactly the pairs it drew before the sampler moved here
    /// (values from the former `cli::patch::random_pairs`).
    #[test]
    fn random_pairs_are_those_patch_always_drew() {
        let items: Vec<(usize, usize)> = random_pairs(PairsOf::<String>::Items(9), 4).unwrap().take(12).collect();
        assert_eq!(items, [(4, 8), (5, 1), (5, 3), (6, 8), (7, 1), (0, 1), (3, 4), (6, 3), (2, 8), (3, 6), (3, 6), (3, 2)]);
        let labels = ["joy", "anger", "joy", "", "fear", "anger", "joy", "fear", "anger", "joy", "sadness"];
        let gold: Vec<Option<String>> = labels.iter().map(|l| (!l.is_empty()).then(|| l.to_string())).collect();
        let keyed: Vec<(usize, usize)> = random_pairs(PairsOf::Keys(&gold), 3).unwrap().take(12).collect();
        assert_eq!(keyed, [(4, 10), (6, 10), (4, 8), (7, 2), (7, 5), (10, 5), (7, 9), (4, 2), (0, 4), (2, 5), (6, 1), (0, 10)]);
        for (s, t) in &keyed {
            assert_ne!(gold[*s], gold[*t]);
            assert!(gold[*s].is_some() && gold[*t].is_some());
        }
        assert!(random_pairs(PairsOf::<String>::Items(1), 0).is_err());
        // Distinct pairs: the stream without its repeats, all of them when asked, never more.
        let distinct = distinct_pairs(PairsOf::<String>::Items(9), 12, 4).unwrap();
        assert_eq!(&distinct[..10], &items[..10]);
        assert_eq!(distinct[10], (3, 2));
        for (n, of) in [(9, PairsOf::<String>::Items(9)), (3, PairsOf::Items(3)), (2, PairsOf::Items(2))] {
            let all = distinct_pairs(of, n * (n - 1), 1).unwrap();
            assert_eq!(all.iter().collect::<std::collections::HashSet<_>>().len(), n * (n - 1));
            let err = distinct_pairs(PairsOf::<String>::Items(n), n * (n - 1) + 1, 1).unwrap_err().to_string();
            assert!(err.contains(&format!("{n} prompts make only {}", n * (n - 1))), "{err}");
        }
        let possible = PairsOf::Keys(&gold).count();
        let brute = (0..gold.len()).flat_map(|s| (0..gold.len()).map(move |t| (s, t))).filter(|&(s, t)| gold[s].is_some() && gold[t].is_some() && gold[s] != gold[t]).count();
        assert_eq!(possible, brute);
        let all = distinct_pairs(PairsOf::Keys(&gold), possible, 9).unwrap();
        assert!(all.iter().all(|&(s, t)| gold[s].is_some() && gold[s] != gold[t]));
        assert_eq!(all.iter().collect::<std::collections::HashSet<_>>().len(), possible);
        let err = distinct_pairs(PairsOf::Keys(&gold), possible + 1, 9).unwrap_err().to_string();
        assert!(err.contains(&format!("prompts of different labels make only {possible}")), "{err}");
        assert!(random_pairs(PairsOf::Keys(&[Some(1), None, Some(1)]), 0).is_err());
    }
}
