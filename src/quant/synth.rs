//! Synthetic layers: weights and a correlated Gram matrix of a given shape, for the preflight's
//! time estimate and the benchmarks.
//!
//! Real layer inputs are strongly correlated (a few directions carry most of the energy) with
//! uneven feature scales; a low-rank-plus-diagonal Gram reproduces that without the cost of
//! forming `XᵀX` from millions of rows, so set-up stays cheap at ViT-L sizes.

use super::Gram;
use crate::util::rng::SplitMix;

/// Gaussian weights with std `1/√in` for an `[out, in]` layer.
pub fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix::new(seed);
    let s = (1.0 / cols as f32).sqrt();
    (0..rows * cols).map(|_| s * r.normal()).collect()
}

/// A correlated Gram matrix `G = D·(AᵀA/k + 0.05·I)·D` with `k = 32` factors and feature scales
/// `D` spread over a decade.
pub fn correlated_gram(n: usize, seed: u64) -> Gram {
    let k = 32usize;
    let mut r = SplitMix::new(seed ^ 0xA5A5);
    let a: Vec<f64> = (0..k * n).map(|_| r.normal() as f64).collect();
    let d: Vec<f64> = (0..n).map(|_| 10f64.powf(r.uniform() - 0.5)).collect();
    let mut g = vec![0.0f64; n * n];
    for t in 0..k {
        let row = &a[t * n..(t + 1) * n];
        for i in 0..n {
            let ai = row[i] / k as f64;
            let gi = &mut g[i * n..(i + 1) * n];
            for (gv, &aj) in gi.iter_mut().zip(row) {
                *gv += ai * aj;
            }
        }
    }
    for i in 0..n {
        g[i * n + i] += 0.05;
        for j in 0..n {
            g[i * n + j] *= d[i] * d[j];
        }
    }
    Gram::from_matrix(n, g)
}
