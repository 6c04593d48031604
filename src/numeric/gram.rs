//! The Gram matrix `G = XᵀX` of a layer's inputs, accumulated from streamed chunks.
//!
//! Calibration sets reach millions of rows (every token of every image), so `X` is never held:
//! chunks of rows are added as they arrive. Sums are kept in f64 — with 10⁶ terms an f32 running
//! sum would lose about three digits — while each chunk's products are formed from the f32 inputs
//! converted exactly to f64, so the only rounding is f64's (relative error ~1e-16·√N).

use crate::error::{Error, Result};
use rayon::prelude::*;

/// Rows of a chunk processed together: a transposed block of this many rows fits in L2 cache.
const BLOCK_ROWS: usize = 64;

/// Refuses an `n × n` matrix that cannot be the Gram `XᵀX` of finite activations: a
/// non-finite entry (an f32 overflow of huge activations included), a negative diagonal, an
/// asymmetry or an off-diagonal entry beyond `sqrt(G_ii·G_jj)` (both impossible for `XᵀX`,
/// beyond rounding), or an all-zero matrix (no signal: every quantization would score an error
/// of 0). `what` names the layer and file in the message.
pub fn check_gram_matrix(n: usize, data: &[f64], what: &str) -> Result<()> {
    let bad = |reason: String| {
        Err(Error::InvalidOption(format!(
            "{what}: not a valid Gram matrix: {reason}"
        )))
    };
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return bad(format!(
            "{} at ({}, {}) (activations too large for the accumulation?)",
            data[i],
            i / n,
            i % n
        ));
    }
    // The sweeps run on f32 copies of G and sum up to n products of its entries.
    let limit = f32::MAX as f64 / (16.0 * n.max(1) as f64);
    if let Some(i) = data.iter().position(|v| v.abs() > limit) {
        return bad(format!(
            "{:e} at ({}, {}) is beyond what the f32 sweeps can hold (|G| ≤ {limit:.1e}): \
             scale the activations down",
            data[i],
            i / n,
            i % n
        ));
    }
    let diag: Vec<f64> = (0..n).map(|i| data[i * n + i]).collect();
    if let Some(i) = diag.iter().position(|&d| d < 0.0) {
        return bad(format!("negative diagonal G[{i},{i}] = {}", diag[i]));
    }
    let scale = diag.iter().fold(0.0f64, |a, &d| a.max(d));
    if scale == 0.0 && data.iter().all(|&v| v == 0.0) {
        return bad("all zero (the activations carry no signal; use --data-free for G = I)".into());
    }
    // Relative to the largest diagonal: f32 accumulation and storage round at about 1e-7.
    let tol = 1e-4 * scale;
    for i in 0..n {
        for j in i + 1..n {
            let (a, b) = (data[i * n + j], data[j * n + i]);
            if (a - b).abs() > tol + 1e-5 * a.abs().max(b.abs()) {
                return bad(format!(
                    "not symmetric: G[{i},{j}] = {a} but G[{j},{i}] = {b}"
                ));
            }
            if a.abs() > (diag[i] * diag[j]).sqrt() + tol {
                return bad(format!(
                    "|G[{i},{j}]| = {} exceeds sqrt(G[{i},{i}]·G[{j},{j}]) = {}, so it is not \
                     positive semi-definite",
                    a.abs(),
                    (diag[i] * diag[j]).sqrt()
                ));
            }
        }
    }
    Ok(())
}

/// A finished, symmetric Gram matrix in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Gram {
    /// Width `n` (the layer's input features).
    pub n: usize,
    /// Row-major `n × n`, symmetric.
    pub data: Vec<f64>,
    /// Number of activation rows summed (0 for a Gram given directly or the identity).
    pub samples: u64,
}

impl Gram {
    /// `G = I`: the data-free objective `‖W − Q̂‖²_F`.
    pub fn identity(n: usize) -> Gram {
        let mut data = vec![0.0; n * n];
        for i in 0..n {
            data[i * n + i] = 1.0;
        }
        Gram {
            n,
            data,
            samples: 0,
        }
    }

    /// Builds a Gram from a full row-major matrix, symmetrising it (`(G + Gᵀ)/2`).
    pub fn from_matrix(n: usize, mut data: Vec<f64>) -> Gram {
        assert_eq!(data.len(), n * n, "Gram data must be n × n");
        for i in 0..n {
            for j in i + 1..n {
                let v = 0.5 * (data[i * n + j] + data[j * n + i]);
                data[i * n + j] = v;
                data[j * n + i] = v;
            }
        }
        Gram {
            n,
            data,
            samples: 0,
        }
    }

    /// Refuses a Gram matrix that cannot be `XᵀX` of real activations ([`check_gram_matrix`]).
    pub fn check(&self, what: &str) -> Result<()> {
        check_gram_matrix(self.n, &self.data, what)
    }

    /// The diagonal `G_jj = ‖x_j‖²`.
    pub fn diag(&self) -> Vec<f64> {
        (0..self.n).map(|i| self.data[i * self.n + i]).collect()
    }

    /// An f32 copy for the devices' sweeps.
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }

    /// `λ·mean(diag G)`, the absolute damping `--damp λ` adds to the diagonal.
    pub fn damping(&self, lambda: f32) -> f64 {
        lambda as f64 * self.diag().iter().sum::<f64>() / self.n.max(1) as f64
    }

    /// `G + λ·mean(diag G)·I`.
    pub fn damped(&self, lambda: f32) -> Gram {
        let add = self.damping(lambda);
        let mut g = self.clone();
        for i in 0..self.n {
            g.data[i * self.n + i] += add;
        }
        g
    }

    /// A 128-bit digest of a Gram's f64 bits (not cryptographic: it tells apart Grams of one run).
    /// Rows in parallel panels, combined in order, so it does not depend on the threads.
    pub fn digest(&self) -> [u64; 2] {
        const PANEL: usize = 1 << 16;
        let parts: Vec<[u64; 2]> = self
            .data
            .par_chunks(PANEL)
            .map(|c| {
                let (mut a, mut b) = (0x9E37_79B9_7F4A_7C15u64, 0xC2B2_AE3D_27D4_EB4Fu64);
                for &v in c {
                    let x = v.to_bits();
                    a = (a ^ x).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(27);
                    b = (b ^ x.rotate_left(31)).wrapping_mul(0xFF51_AFD7_ED55_8CCD) ^ (b >> 29);
                }
                [a, b]
            })
            .collect();
        let mut h = [
            self.n as u64 ^ 0xA076_1D64_78BD_642F,
            self.data.len() as u64,
        ];
        for [a, b] in parts {
            h[0] = (h[0] ^ a)
                .wrapping_mul(0xE703_7ED1_A0B4_28DB)
                .rotate_left(23);
            h[1] = (h[1] ^ b)
                .wrapping_mul(0x8EBC_6AF0_9C88_C6E3)
                .rotate_left(41);
        }
        h
    }

    /// The dead-input threshold: `G_jj` at or below it counts as an input that is always 0
    /// (spec a.8). Relative to the mean diagonal so it is scale-free.
    pub fn dead_threshold(&self) -> f32 {
        let mean = self.diag().iter().sum::<f64>() / self.n.max(1) as f64;
        (mean * DEAD_INPUT_RELATIVE) as f32
    }
}

/// `G_jj ≤ DEAD_INPUT_RELATIVE · mean(diag G)` marks a dead input.
pub const DEAD_INPUT_RELATIVE: f64 = 1e-10;

/// Accumulates `G += X_bᵀ X_b` over chunks `X_b` of rows.
#[derive(Debug, Clone)]
pub struct GramAccumulator {
    n: usize,
    /// Upper triangle (row-major full storage; the lower half is filled by `finish`).
    sum: Vec<f64>,
    samples: u64,
}

impl GramAccumulator {
    /// An empty accumulator for `n` input features.
    pub fn new(n: usize) -> Self {
        let mut sum = vec![0.0; n * n];
        crate::platform::advise_huge_pages(&mut sum);
        GramAccumulator { n, sum, samples: 0 }
    }

    /// Width `n`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Rows added so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Adds a row-major chunk of `rows × n` activations.
    pub fn add(&mut self, chunk: &[f32]) {
        let n = self.n;
        assert_eq!(
            chunk.len() % n.max(1),
            0,
            "chunk length must be a multiple of n"
        );
        let rows = chunk.len() / n.max(1);
        let mut block = vec![0.0f64; n * BLOCK_ROWS];
        for start in (0..rows).step_by(BLOCK_ROWS) {
            let b = BLOCK_ROWS.min(rows - start);
            // Column-major copy of the block: column j is block[j*b .. (j+1)*b].
            for t in 0..b {
                let row = &chunk[(start + t) * n..(start + t + 1) * n];
                for (j, &x) in row.iter().enumerate() {
                    block[j * b + t] = x as f64;
                }
            }
            let block = &block[..n * b];
            self.sum.par_chunks_mut(n).enumerate().for_each(|(i, out)| {
                let ci = &block[i * b..(i + 1) * b];
                for j in i..n {
                    let cj = &block[j * b..(j + 1) * b];
                    out[j] += super::linalg::dot(ci, cj);
                }
            });
        }
        self.samples += rows as u64;
    }

    /// Adds a partial Gram computed elsewhere (a GPU's f32 sums over `samples` rows), stored
    /// row-major with row stride `stride ≥ n`; only the upper triangle is read.
    pub fn add_partial(&mut self, part: &[f32], stride: usize, samples: u64) {
        let n = self.n;
        assert!(
            stride >= n && part.len() >= n * stride,
            "partial Gram must cover n × n"
        );
        add_rows(&mut self.sum, n, part, stride, true);
        self.samples += samples;
    }

    /// Adds f32 partial sums over `samples` rows computed panel by panel, in parallel: `panel(i0,
    /// out)` fills `out` (`rows × n`, row-major) with rows `i0 .. i0 + rows` of the partial Gram
    /// (columns from `i0` on are read: the upper triangle), and each panel is added into the f64
    /// sum while it is still in cache. The same single addition per element as
    /// [`GramAccumulator::add_partial`].
    pub fn add_panels<F>(&mut self, panel_rows: usize, samples: u64, panel: F)
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        let n = self.n;
        let pr = panel_rows.max(1);
        self.sum
            .par_chunks_mut(pr * n.max(1))
            .enumerate()
            .for_each_init(Vec::new, |buf: &mut Vec<f32>, (p, sum)| {
                let i0 = p * pr;
                let rows = sum.len() / n;
                buf.resize(rows * n, 0.0);
                panel(i0, &mut buf[..rows * n]);
                for r in 0..rows {
                    let i = i0 + r;
                    for (o, v) in sum[r * n + i..(r + 1) * n]
                        .iter_mut()
                        .zip(&buf[r * n + i..(r + 1) * n])
                    {
                        *o += *v as f64;
                    }
                }
            });
        self.samples += samples;
    }

    /// Lets a kernel add `samples` rows into the f64 sum's upper triangle itself (`n × n`,
    /// row-major; the lower triangle is filled by `finish`). `add` returns whether it did; the
    /// row count is kept only then.
    pub fn add_upper_with<F>(&mut self, samples: u64, add: F) -> bool
    where
        F: FnOnce(&mut [f64]) -> bool,
    {
        let done = add(&mut self.sum);
        if done {
            self.samples += samples;
        }
        done
    }

    /// Adds another accumulator's sums (for parallel or sharded accumulation).
    pub fn merge(&mut self, other: &GramAccumulator) {
        assert_eq!(
            self.n, other.n,
            "merged accumulators must have the same width"
        );
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        self.samples += other.samples;
    }

    /// The symmetric Gram matrix.
    pub fn finish(mut self) -> Gram {
        let n = self.n;
        mirror_upper(&mut self.sum, n);
        Gram {
            n,
            data: self.sum,
            samples: self.samples,
        }
    }
}

/// Copies the upper triangle of a row-major `n × n` matrix onto its lower triangle, in
/// 64 × 64 tiles (a row-by-row copy reads a column per row: 75 ms at n = 4096, a tenth of
/// the Gram itself), row panels in parallel.
fn mirror_upper(a: &mut [f64], n: usize) {
    const T: usize = 64;
    assert!(
        a.len() >= n * n,
        "mirror_upper: {} values for n = {n}",
        a.len()
    );
    /// The matrix shared by the row panels; see the SAFETY note below.
    #[derive(Clone, Copy)]
    struct Shared(*mut f64);
    // SAFETY: the panels write disjoint elements (each its own rows' strictly lower part) and
    // read only strictly upper elements, which no panel writes; `a` outlives the loop.
    unsafe impl Send for Shared {}
    unsafe impl Sync for Shared {}
    let p = Shared(a.as_mut_ptr());
    (0..n.div_ceil(T)).into_par_iter().for_each(move |b| {
        let p = p;
        let (i0, i1) = (b * T, ((b + 1) * T).min(n));
        for j0 in (0..i1).step_by(T) {
            for i in i0..i1 {
                for j in j0..(j0 + T).min(i) {
                    // SAFETY: j < i < n: (i, j) is strictly lower, in this panel's rows; (j, i)
                    // is strictly upper. Both inside the n × n matrix.
                    unsafe { *p.0.add(i * n + j) = *p.0.add(j * n + i) };
                }
            }
        }
    });
}

/// A cross-Gram `C = X̃ᵀ·X` of two activations of the same rows (`--calib-mode corrected`: the
/// quantized model's inputs `X̃` against the full-precision model's `X`), row-major `n × n`,
/// not symmetric: `C[i, j] = Σ_rows x̃_i · x_j`.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossGram {
    /// Width `n`.
    pub n: usize,
    /// Row-major `n × n`.
    pub data: Vec<f64>,
    /// Rows summed.
    pub samples: u64,
}

impl CrossGram {
    /// An empty cross-Gram of width `n`.
    pub fn zeros(n: usize) -> CrossGram {
        CrossGram {
            n,
            data: vec![0.0; n * n],
            samples: 0,
        }
    }

    /// Adds f32 partial sums over `samples` rows (row-major, row stride `stride ≥ n`; every
    /// entry is read), each once, in f64.
    pub fn add_partial(&mut self, part: &[f32], stride: usize, samples: u64) {
        let n = self.n;
        assert!(
            stride >= n && part.len() >= n * stride,
            "partial cross-Gram must cover n × n"
        );
        add_rows(&mut self.data, n, part, stride, false);
        self.samples += samples;
    }
}

/// Adds the f32 `part` (row-major, row stride `stride`) into the f64 `n × n` `sum`, each entry
/// once (`upper`: only the upper triangle). Rows in parallel: each element gets the same single
/// addition, so the sum does not depend on the threads.
fn add_rows(sum: &mut [f64], n: usize, part: &[f32], stride: usize, upper: bool) {
    sum.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(i, out)| {
            let from = if upper { i } else { 0 };
            for (o, p) in out[from..]
                .iter_mut()
                .zip(&part[i * stride + from..i * stride + n])
            {
                *o += *p as f64;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_accumulation_equals_direct_product() {
        let (rows, n) = (150, 7);
        let x: Vec<f32> = (0..rows * n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
            .collect();
        let mut acc = GramAccumulator::new(n);
        acc.add(&x[..40 * n]);
        acc.add(&x[40 * n..]);
        let g = acc.finish();
        assert_eq!(g.samples, rows as u64);
        for i in 0..n {
            for j in 0..n {
                let direct: f64 = (0..rows)
                    .map(|t| x[t * n + i] as f64 * x[t * n + j] as f64)
                    .sum();
                let got = g.data[i * n + j];
                assert!(
                    (got - direct).abs() <= 1e-12 * direct.abs().max(1.0),
                    "G[{i},{j}] = {got}, expected {direct}"
                );
            }
        }
    }

    /// The tiled mirror copies every upper element onto its lower twin and nothing else, at
    /// widths below, at and across the tile edge.
    #[test]
    fn the_mirror_copies_the_upper_triangle_exactly() {
        for n in [0usize, 1, 2, 63, 64, 65, 130, 257] {
            let upper = |i: usize, j: usize| (i * 1000 + j) as f64 + 0.5;
            let mut a = vec![f64::NAN; n * n];
            for i in 0..n {
                for j in i..n {
                    a[i * n + j] = upper(i, j);
                }
            }
            mirror_upper(&mut a, n);
            for i in 0..n {
                for j in 0..n {
                    let want = if j >= i { upper(i, j) } else { upper(j, i) };
                    assert_eq!(a[i * n + j], want, "n {n}: ({i}, {j})");
                }
            }
        }
    }
}
