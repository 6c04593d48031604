//! `--calib-mode corrected`: each layer fits the full-precision layer's output from the inputs the
//! quantized model actually gives it.
//!
//! With the quantized prefix's inputs `X̃` (what `--calib-mode quantized` calibrates on) and the
//! full-precision model's inputs `X` of the same rows, the layer's real error is
//! `‖X·Wᵀ − X̃·Q̂ᵀ‖²`, not `‖X̃·(W − Q̂)ᵀ‖²`: the earlier layers' quantization moved the inputs,
//! and the layer can compensate for part of that move. In Gram form, with `G̃ = X̃ᵀX̃` and the
//! cross-Gram `C = X̃ᵀX`,
//!
//! `‖X·Wᵀ − X̃·Q̂ᵀ‖² = ‖X̃·(W* − Q̂)ᵀ‖² + const`, where `W* = W·Cᵀ·G̃⁻¹`,
//!
//! so quantizing the target `W*` on `G̃` with the unchanged algorithm minimises the real error
//! (the asymmetric calibration of GPTAQ, without changing the quantizer). `W*` is computed as a
//! ridge-damped correction of `W`, `W* = W + W·Dᵀ·(G̃ + λ·mean(diag G̃)·I)⁻¹` with
//! `D = C − G̃ = X̃ᵀ(X − X̃)`: exactly `W` when the inputs did not move, and shrunk towards `W`
//! where few calibration rows leave `G̃` poorly conditioned. `D` is accumulated as it is, from
//! the shift `X − X̃` taken elementwise: as `C − G̃` it would be the small difference of two
//! large sums, each rounded in f32 partials by another kernel.

use crate::error::{Error, Result};
use crate::numeric::gram::{CrossGram, Gram};

/// The least ridge of the correction (a share of `mean(diag G̃)`), for many calibration rows per
/// input.
pub const CORRECTION_RIDGE_MIN: f64 = 0.01;
/// The largest ridge, for few.
pub const CORRECTION_RIDGE_MAX: f64 = 0.1;

/// The ridge `λ` of the correction for an `n`-wide layer calibrated on `samples` rows:
/// `n / samples`, within [`CORRECTION_RIDGE_MIN`, `CORRECTION_RIDGE_MAX`]. The correction is a
/// least-squares fit with `n` unknowns per output, so its variance grows with `n / samples`,
/// and so must its damping. Measured (README, "Correcting for the quantized prefix"): on the
/// bundled model (435 images, 50 tokens, widths 64–256: `n / samples` ≤ 0.012) 0.01 beat 0.1
/// and 1.0; on DINOv2-S from 14 photos (257 tokens, widths 384–1536: 0.11–0.43) 0.01 lost to
/// the uncorrected quantized mode out of domain while 0.1 beat it, and 1.0 and `n / samples` up
/// to 0.43 won less than 0.1.
pub fn correction_ridge(n: usize, samples: u64) -> f64 {
    (n as f64 / samples.max(1) as f64).clamp(CORRECTION_RIDGE_MIN, CORRECTION_RIDGE_MAX)
}

/// The corrected target `W*` of a layer `w[rows, cols]` from its Gram `G̃` and the shift's
/// cross-Gram `shift = X̃ᵀ(X − X̃)` (see the module docs), in f64 on the host (a Cholesky
/// factorisation of the damped `G̃` and one `n × n` solve, then one `rows × n × n` product).
pub fn corrected_target(
    w: &[f32],
    rows: usize,
    cols: usize,
    g: &Gram,
    shift: &CrossGram,
    ridge: f64,
) -> Result<Vec<f32>> {
    use faer::linalg::solvers::Solve;
    use faer::{Mat, MatRef, Side};
    let n = cols;
    if g.n != n || shift.n != n || w.len() != rows * n {
        return Err(Error::Shape(format!(
            "corrected target: weights {rows}×{cols}, Gram {0}×{0}, cross-Gram {1}×{1}",
            g.n, shift.n
        )));
    }
    if n == 0 || rows == 0 {
        return Ok(w.to_vec());
    }
    let mean = (0..n).map(|i| g.data[i * n + i]).sum::<f64>() / n as f64;
    let lambda = ridge * mean.max(f64::MIN_POSITIVE);
    let mut a = g.data.clone();
    for i in 0..n {
        a[i * n + i] += lambda;
    }
    // Row-major symmetric `a` read column-major is itself.
    let llt = MatRef::from_column_major_slice(&a, n, n)
        .llt(Side::Lower)
        .map_err(|_| {
            Error::Shape(format!(
                "corrected target: the damped {n}×{n} Gram is not positive definite"
            ))
        })?;
    let d = Mat::<f64>::from_fn(n, n, |i, j| shift.data[i * n + j]);
    let e = llt.solve(d.as_ref());
    // W* = W + W·Eᵀ: bt[k, j] = E[j, k], row-major.
    let mut bt = vec![0.0f64; n * n];
    for k in 0..n {
        for j in 0..n {
            bt[k * n + j] = e[(j, k)];
        }
    }
    let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let mut corr = vec![0.0f64; rows * n];
    crate::numeric::linalg::dgemm(rows, n, n, &w64, &bt, &mut corr);
    let out: Vec<f32> = w64.iter().zip(&corr).map(|(a, b)| (a + b) as f32).collect();
    if out.iter().any(|v| !v.is_finite()) {
        return Err(Error::Shape(
            "corrected target: not finite (the cross-Gram holds non-finite values)".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::gram::GramAccumulator;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    fn cross_of(xq: &[f32], xf: &[f32], rows: usize, n: usize) -> CrossGram {
        let mut c = CrossGram::zeros(n);
        for i in 0..n {
            for j in 0..n {
                c.data[i * n + j] = (0..rows)
                    .map(|r| xq[r * n + i] as f64 * xf[r * n + j] as f64)
                    .sum();
            }
        }
        c.samples = rows as u64;
        c
    }

    /// Without a ridge, `W*` is the least-squares fit of the full-precision outputs from the
    /// moved inputs: the residual `X·Wᵀ − X̃·W*ᵀ` is orthogonal to every column of `X̃`.
    #[test]
    fn the_target_is_the_least_squares_fit_of_the_full_precision_output() {
        let (rows, n, m) = (60, 6, 3);
        let mut s = 7u64;
        let xf: Vec<f32> = (0..rows * n).map(|_| lcg(&mut s)).collect();
        let xq: Vec<f32> = xf.iter().map(|&v| v + 0.1 * lcg(&mut s)).collect();
        let w: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
        let mut acc = GramAccumulator::new(n);
        acc.add(&xq);
        let g = acc.finish();
        let shift: Vec<f32> = xf.iter().zip(&xq).map(|(a, b)| a - b).collect();
        let c = cross_of(&xq, &shift, rows, n);
        let t = corrected_target(&w, m, n, &g, &c, 0.0).unwrap();
        for o in 0..m {
            let resid: Vec<f64> = (0..rows)
                .map(|r| {
                    (0..n)
                        .map(|k| {
                            xf[r * n + k] as f64 * w[o * n + k] as f64
                                - xq[r * n + k] as f64 * t[o * n + k] as f64
                        })
                        .sum()
                })
                .collect();
            for j in 0..n {
                let dotp: f64 = (0..rows).map(|r| resid[r] * xq[r * n + j] as f64).sum();
                assert!(dotp.abs() < 1e-4, "output {o}, input {j}: {dotp}");
            }
        }
        // Moving the target off the fit raises the real error.
        let err = |q: &[f32]| -> f64 {
            (0..rows)
                .flat_map(|r| (0..m).map(move |o| (r, o)))
                .map(|(r, o)| {
                    let v: f64 = (0..n)
                        .map(|k| {
                            xf[r * n + k] as f64 * w[o * n + k] as f64
                                - xq[r * n + k] as f64 * q[o * n + k] as f64
                        })
                        .sum();
                    v * v
                })
                .sum()
        };
        assert!(err(&t) < err(&w));
    }

    #[test]
    fn the_ridge_follows_inputs_per_row_within_its_bounds() {
        assert_eq!(correction_ridge(384, 7680), 384.0 / 7680.0);
        assert_eq!(correction_ridge(64, 21750), CORRECTION_RIDGE_MIN);
        assert_eq!(correction_ridge(1536, 771), CORRECTION_RIDGE_MAX);
        assert_eq!(correction_ridge(8, 0), CORRECTION_RIDGE_MAX);
    }

    /// Inputs that did not move leave the weights as they are, at any ridge.
    #[test]
    fn unmoved_inputs_keep_the_weights() {
        let (rows, n, m) = (40, 5, 2);
        let mut s = 3u64;
        let x: Vec<f32> = (0..rows * n).map(|_| lcg(&mut s)).collect();
        let w: Vec<f32> = (0..m * n).map(|_| lcg(&mut s)).collect();
        let mut acc = GramAccumulator::new(n);
        acc.add(&x);
        let g = acc.finish();
        let c = cross_of(&x, &vec![0.0; rows * n], rows, n);
        for ridge in [0.0, CORRECTION_RIDGE_MIN, 1.0] {
            let t = corrected_target(&w, m, n, &g, &c, ridge).unwrap();
            assert_eq!(t, w);
        }
        // Shapes that disagree are an error naming them.
        assert!(corrected_target(&w, m, n + 1, &g, &c, 0.0).is_err());
    }
}
