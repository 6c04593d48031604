//! Activation-aware equalisation (`--equalize`, the SmoothQuant / AWQ line of work) for layers fed
//! by a LayerNorm.
//!
//! For a layer `y = W·x` whose input is a LayerNorm output `x = γ ⊙ n + β`, any positive
//! per-input scale `s` gives the same function with `W' = W·diag(s)` and `x' = x / s`, and the
//! division folds into the LayerNorm: `γ' = γ / s`, `β' = β / s`. The checkpoint stays a plain
//! model. What changes is the grid: per-row min/max grids spend their levels on the largest
//! weights of a row, and scaling up the columns of inputs with large activations gives those
//! (salient) weights finer relative steps. With `a_j = √(G_jj / N)` (the input's RMS) and `m_j`
//! the largest `|W_ij|` over every layer the LayerNorm feeds,
//!
//! ```text
//! s_j = a_j^α / m_j^(1−α),   normalised to geometric mean 1, clamped to [1e-2, 1e2]
//! ```
//!
//! The quantizer sees `W'` and the Gram of `x'`, `G' = D⁻¹·G·D⁻¹` (`D = diag(s)`), so every error it
//! reports is the error of the real (equivalent) model.

use super::Gram;

/// The migration strength `α` (SmoothQuant's default).
pub const ALPHA: f32 = 0.5;

/// Scales for the inputs of the layers `weights` (row-major, `cols` inputs each) that share the
/// Gram `g`. Dead inputs (no activation or no weight) get scale 1.
pub fn scales(g: &Gram, weights: &[&[f32]], alpha: f32) -> Vec<f32> {
    let n = g.n;
    let samples = g.samples.max(1) as f64;
    let mut m = vec![0.0f64; n];
    for w in weights {
        for row in w.chunks(n) {
            for (mj, &x) in m.iter_mut().zip(row) {
                *mj = mj.max((x as f64).abs());
            }
        }
    }
    let alpha = alpha as f64;
    let raw: Vec<f64> = (0..n)
        .map(|j| {
            let a = (g.data[j * n + j] / samples).max(0.0).sqrt();
            if a > 0.0 && m[j] > 0.0 {
                a.powf(alpha) / m[j].powf(1.0 - alpha)
            } else {
                0.0
            }
        })
        .collect();
    let live: Vec<f64> = raw.iter().copied().filter(|&v| v > 0.0).collect();
    let geo = if live.is_empty() {
        1.0
    } else {
        (live.iter().map(|v| v.ln()).sum::<f64>() / live.len() as f64).exp()
    };
    raw.iter()
        .map(|&v| {
            if v > 0.0 {
                (v / geo).clamp(1e-2, 1e2) as f32
            } else {
                1.0
            }
        })
        .collect()
}

/// `W·diag(s)` for a row-major weight with `s.len()` inputs.
pub fn scale_columns(w: &[f32], s: &[f32]) -> Vec<f32> {
    w.chunks(s.len())
        .flat_map(|row| row.iter().zip(s).map(|(&x, &k)| x * k))
        .collect()
}

/// `D⁻¹·G·D⁻¹`: the Gram of the inputs divided by `s`.
pub fn scale_gram(g: &Gram, s: &[f32]) -> Gram {
    let n = g.n;
    let mut out = g.clone();
    for i in 0..n {
        for j in 0..n {
            out.data[i * n + j] /= s[i] as f64 * s[j] as f64;
        }
    }
    out
}

/// `v / s` elementwise (the folded LayerNorm weight or bias).
pub fn divide(v: &[f32], s: &[f32]) -> Vec<f32> {
    v.iter().zip(s).map(|(&x, &k)| x / k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_equalised_problem_has_the_same_outputs_and_errors() {
        let n = 3;
        let g = Gram {
            n,
            data: vec![4.0, 1.0, 0.5, 1.0, 9.0, 0.2, 0.5, 0.2, 0.25],
            samples: 1,
        };
        let w = [0.5f32, -1.0, 2.0, 0.1, 0.3, -0.4];
        let s = scales(&g, &[&w], ALPHA);
        let geo: f64 = s.iter().map(|&v| (v as f64).ln()).sum::<f64>() / n as f64;
        assert!(geo.abs() < 1e-6);
        let w2 = scale_columns(&w, &s);
        let g2 = scale_gram(&g, &s);
        // wᵀGw is invariant.
        let quad = |w: &[f32], g: &Gram| -> f64 {
            let mut t = 0.0;
            for r in w.chunks(n) {
                for a in 0..n {
                    for b in 0..n {
                        t += r[a] as f64 * g.data[a * n + b] * r[b] as f64;
                    }
                }
            }
            t
        };
        assert!((quad(&w, &g) - quad(&w2, &g2)).abs() < 1e-5 * quad(&w, &g));
        // The input with the largest activation and the smallest weights is scaled up most.
        assert!(s[1] > s[2]);
    }
}
