//! GPTQ factors made ahead of the layers that use them.
//!
//! The factor of a damped Gram (a Cholesky factorisation and a triangular inverse, `O(n³)` on the
//! host) depends on the Gram, the damping and act-order only. A run calibrating from images knows
//! every Gram of a block one block before it quantizes it (the calibration runs ahead on its own
//! thread), so that thread also builds the block's factors — once per (input, damping), shared by
//! the layers that read the same input (`q`, `k` and `v` of HF layouts) — while the current block
//! quantizes. A GPU then never waits for the host's factor, and the search finds each factor
//! ready ([`FactorCache::get`]).
//!
//! Entries are found by content: a 128-bit digest of the Gram's f64 bits with its width, the
//! damping and act-order. A Gram changed on its way to the layer (folded scales, another
//! calibration mode) simply misses and is factored on the spot, so a hit is always the factor
//! the layer would have built itself, bit for bit (the same function on the same values; faer's
//! kernels split outputs, never sums, across threads). A digest collision could hand a layer the
//! factor of another Gram of the same width — a worse start for its search, never a wrong read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::gptq::{self, GptqFactor};
use super::Gram;
use crate::error::Result;

/// At most this many bytes of factors are held ahead (about two blocks of ViT-L, both
/// dampings); a factor that would go beyond is left to its layer.
pub const PREFACTOR_BYTES: u64 = 1 << 30;

/// What a factor is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactorKey {
    digest: [u64; 2],
    n: usize,
    damp: u32,
    act_order: bool,
}

impl FactorKey {
    /// The key of `gram`'s factor at `damp` (see [`digest`]).
    pub fn new(digest: [u64; 2], gram: &Gram, damp: f32, act_order: bool) -> FactorKey {
        FactorKey {
            digest,
            n: gram.n,
            damp: damp.to_bits(),
            act_order,
        }
    }
}

/// A 128-bit digest of a Gram's f64 bits ([`Gram::digest`]).
pub fn digest(gram: &Gram) -> [u64; 2] {
    gram.digest()
}

/// The factor a GPTQ start at `damp` uses: of `G + damp·mean(diag G)·I` (of `G` itself at 0),
/// its inputs visited by act-order when asked, dead inputs decoupled. What
/// [`super::comq`] builds per (layer, damping) and what runs ahead build per (input, damping).
pub fn factor_of(gram: &Gram, damp: f32, act_order: bool) -> Result<GptqFactor> {
    let damped = (damp > 0.0).then(|| gram.damped(damp));
    let h = damped.as_ref().unwrap_or(gram);
    gptq::factor(h, act_order, gram.dead_threshold() as f64)
}

struct Entry {
    key: FactorKey,
    block: usize,
    factor: Arc<GptqFactor>,
}

/// Factors built ahead, by content; shared between the thread that builds them and the one that
/// quantizes.
pub struct FactorCache {
    entries: Mutex<Vec<Entry>>,
    hits: AtomicU64,
    built: AtomicU64,
    /// The most bytes of factors held.
    cap: u64,
}

impl Default for FactorCache {
    /// A cache of at most [`PREFACTOR_BYTES`].
    fn default() -> FactorCache {
        FactorCache::with_cap(PREFACTOR_BYTES)
    }
}

impl FactorCache {
    /// A cache holding at most `cap` bytes of factors (the smaller of `cap` and
    /// [`PREFACTOR_BYTES`]; 0 builds nothing).
    pub fn with_cap(cap: u64) -> FactorCache {
        FactorCache {
            entries: Mutex::new(Vec::new()),
            hits: AtomicU64::new(0),
            built: AtomicU64::new(0),
            cap: cap.min(PREFACTOR_BYTES),
        }
    }

    /// The factor of `key`, when it was built ahead.
    pub fn get(&self, key: &FactorKey) -> Option<Arc<GptqFactor>> {
        let found = self
            .entries
            .lock()
            .expect("factor cache lock")
            .iter()
            .find(|e| e.key == *key)
            .map(|e| e.factor.clone());
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// [`FactorCache::build`] for a thread that builds factors ahead, beside a quantization that
    /// keeps rayon's pool busy: each factor is computed on the calling thread alone
    /// ([`crate::numeric::linalg::factors_on_this_thread`]; the same bits).
    pub fn build_ahead(
        &self,
        block: usize,
        gram: &Gram,
        damps: &[f32],
        act_order: bool,
    ) -> Result<()> {
        crate::numeric::linalg::factors_on_this_thread(|| self.build(block, gram, damps, act_order))
    }

    /// Builds the factors of `gram` for block `block` at each of `damps` that is not held yet,
    /// first dropping those of blocks before `block − 1` (the block being quantized keeps its
    /// own). A factor that would take the cache beyond its cap is not built.
    pub fn build(&self, block: usize, gram: &Gram, damps: &[f32], act_order: bool) -> Result<()> {
        self.entries
            .lock()
            .expect("factor cache lock")
            .retain(|e| e.block + 1 >= block);
        let d = digest(gram);
        for &damp in damps {
            let key = FactorKey::new(d, gram, damp, act_order);
            let bytes = (4 * gram.n * gram.n + 4 * gram.n) as u64;
            {
                let entries = self.entries.lock().expect("factor cache lock");
                let held: u64 = entries
                    .iter()
                    .map(|e| (4 * e.factor.n * e.factor.n + 4 * e.factor.n) as u64)
                    .sum();
                if entries.iter().any(|e| e.key == key) || held + bytes > self.cap {
                    continue;
                }
            }
            let factor = Arc::new(factor_of(gram, damp, act_order)?);
            self.built.fetch_add(1, Ordering::Relaxed);
            self.entries
                .lock()
                .expect("factor cache lock")
                .push(Entry { key, block, factor });
        }
        Ok(())
    }

    /// Whether no factor is held (a layer then need not digest its Gram to look).
    pub fn is_empty(&self) -> bool {
        self.entries.lock().expect("factor cache lock").is_empty()
    }

    /// `(factors built ahead, factors a layer found ready)` so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.built.load(Ordering::Relaxed),
            self.hits.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A positive-definite Gram of `n` inputs with seeded, correlated entries.
    fn gram(n: usize, seed: u64) -> Gram {
        let mut data = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                let d = i.abs_diff(j) as f64;
                let wobble = ((i * 31 + j * 17 + seed as usize * 7) % 13) as f64 / 130.0;
                data[i * n + j] = (-d / 3.0).exp() * (1.0 + if i == j { wobble } else { 0.0 });
            }
        }
        for i in 0..n {
            data[i * n + i] += 0.5 + seed as f64 / 100.0;
        }
        Gram {
            n,
            data,
            samples: 1,
        }
    }

    #[test]
    fn the_digest_tells_grams_apart_and_repeats() {
        let (a, b) = (gram(40, 1), gram(40, 2));
        assert_eq!(digest(&a), digest(&a.clone()));
        assert_ne!(digest(&a), digest(&b));
        let mut c = a.clone();
        c.data[7] = f64::from_bits(c.data[7].to_bits() ^ 1);
        assert_ne!(digest(&a), digest(&c));
    }

    #[test]
    fn a_factor_built_ahead_is_the_one_a_layer_builds() {
        let g = gram(70, 3);
        let cache = FactorCache::default();
        cache.build(0, &g, &[0.01, 0.1], true).unwrap();
        for damp in [0.01f32, 0.1] {
            let key = FactorKey::new(digest(&g), &g, damp, true);
            let ahead = cache.get(&key).expect("built ahead");
            assert_eq!(*ahead, factor_of(&g, damp, true).unwrap());
        }
        // Another damping, act-order or Gram misses.
        assert!(cache
            .get(&FactorKey::new(digest(&g), &g, 0.05, true))
            .is_none());
        assert!(cache
            .get(&FactorKey::new(digest(&g), &g, 0.01, false))
            .is_none());
        let h = gram(70, 4);
        assert!(cache
            .get(&FactorKey::new(digest(&h), &h, 0.01, true))
            .is_none());
        assert_eq!(cache.counts(), (2, 2));
    }

    #[test]
    fn nothing_is_built_beyond_the_cap() {
        let g = gram(16, 8);
        let one = (4 * 16 * 16 + 4 * 16) as u64;
        let cache = FactorCache::with_cap(one);
        cache.build(0, &g, &[0.01, 0.1], true).unwrap();
        assert_eq!(cache.counts().0, 1);
        let none = FactorCache::with_cap(0);
        none.build(0, &g, &[0.01], true).unwrap();
        assert_eq!(none.counts().0, 0);
    }

    #[test]
    fn blocks_two_behind_are_dropped_and_nothing_is_built_twice() {
        let cache = FactorCache::default();
        let (g0, g1, g2) = (gram(16, 5), gram(16, 6), gram(16, 7));
        cache.build(0, &g0, &[0.1], true).unwrap();
        cache.build(0, &g0, &[0.1], true).unwrap();
        assert_eq!(cache.counts().0, 1);
        cache.build(1, &g1, &[0.1], true).unwrap();
        let k0 = FactorKey::new(digest(&g0), &g0, 0.1, true);
        assert!(cache.get(&k0).is_some(), "block 0 is still being quantized");
        cache.build(2, &g2, &[0.1], true).unwrap();
        assert!(cache.get(&k0).is_none(), "block 0 is done");
    }
}
