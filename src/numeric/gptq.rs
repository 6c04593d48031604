//! The GPTQ-style start (`--init gptq`): sequential rounding with error compensation.
//!
//! GPTQ (Frantar et al., 2023) quantizes the inputs of a row one at a time, in a shared order,
//! and after each one moves the not-yet-quantized weights of the row to absorb its error
//! optimally for the quadratic loss `eᵀHe` (`H` the damped Gram). With `U` the upper Cholesky
//! factor of `H⁻¹` (in visiting order), the step for input `t` is
//!
//! ```text
//! q_t = nearest(x_t);   e = (x_t − q_t) / U_tt;   x_t' −= e · U_tt'   for every t' > t
//! ```
//!
//! on the same grid COMQ uses. The result is a point on the grid from which the COMQ sweeps can
//! only go down. `H = G + λ·mean(diag G)·I` is the damped Gram the caller hands in; inputs whose
//! `G_jj` is at the dead threshold are decoupled (`H_jj = 1`, no off-diagonal terms), so they are
//! rounded to nearest like everywhere else (spec a.8).
//!
//! The factor is computed on the host in f64 ([`super::linalg`]); the per-row pass is a device
//! primitive ([`crate::device::Device::gptq`]). Its CPU twin here processes the inputs in blocks
//! of [`BLOCK`]: inside a block every row is updated column by column, and the rest of the row
//! receives the block's errors at once as one GEMM (GPTQ's "lazy batch" update).

use rayon::prelude::*;

use super::gram::Gram;
use super::grid::nearest_code;
use super::linalg::{inverse_upper_factor, sgemm_acc};
use crate::error::{Error, Result};

/// Inputs per lazy block on the CPU.
pub const BLOCK: usize = 128;

/// Rows per parallel panel of the CPU pass.
const PANEL: usize = 64;

/// Extra relative damping tried, in order, when the damped Gram is still not positive definite
/// in f64 (an undamped, rank-deficient Gram).
const FALLBACK_DAMP: [f64; 4] = [1e-6, 1e-4, 1e-2, 1e-1];

/// The shared part of a GPTQ pass: visiting order and compensation factor.
#[derive(Debug, Clone)]
pub struct GptqFactor {
    /// Identifies this factor (unique per process): a device that keeps the last factor it was
    /// handed resident uploads it again only when the id changes.
    pub id: u64,
    /// Width `n`.
    pub n: usize,
    /// `perm[t]` is the input visited at step `t`.
    pub perm: Vec<u32>,
    /// Row-major `n × n` upper-triangular factor of `H⁻¹` in visiting order (`U[t, t']`).
    pub u: Vec<f32>,
}

impl PartialEq for GptqFactor {
    /// Equal content; the id is not compared.
    fn eq(&self, other: &GptqFactor) -> bool {
        self.n == other.n && self.perm == other.perm && self.u == other.u
    }
}

/// A fresh [`GptqFactor::id`].
pub fn next_factor_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Builds the factor from the (already damped) Gram `h`; `act_order` visits inputs by `H_jj`
/// descending, and `dead` is the dead-input threshold of the undamped Gram.
pub fn factor(h: &Gram, act_order: bool, dead: f64) -> Result<GptqFactor> {
    let n = h.n;
    let diag = h.diag();
    let mut perm: Vec<u32> = (0..n as u32).collect();
    if act_order {
        // Stable: equal diagonals keep ascending index order.
        perm.sort_by(|&a, &b| diag[b as usize].total_cmp(&diag[a as usize]));
    }
    let is_dead: Vec<bool> = diag.iter().map(|&d| d <= dead).collect();
    let mut hp = vec![0.0f64; n * n];
    hp.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(t, row)| {
            let j = perm[t] as usize;
            let src = &h.data[j * n..(j + 1) * n];
            for (s, (v, &k)) in row.iter_mut().zip(&perm).enumerate() {
                let k = k as usize;
                *v = if is_dead[j] || is_dead[k] {
                    if t == s {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    src[k]
                };
            }
        });
    let mean = diag.iter().sum::<f64>() / n.max(1) as f64;
    let mut extra = 0.0;
    let mut tries = FALLBACK_DAMP.iter();
    loop {
        if let Some(u) = inverse_upper_factor(&hp, n) {
            warn_extra_damping(extra);
            return Ok(GptqFactor {
                id: next_factor_id(),
                n,
                perm,
                u: u.par_iter().map(|&v| v as f32).collect(),
            });
        }
        let Some(&next) = tries.next() else {
            return Err(not_positive_definite(n, extra));
        };
        let add = (next - extra) * mean.max(f64::MIN_POSITIVE);
        for t in 0..n {
            hp[t * n + t] += add;
        }
        extra = next;
    }
}

/// Logs the fallback damping a factor needed (nothing when it needed none).
pub(crate) fn warn_extra_damping(extra: f64) {
    if extra > 0.0 {
        log::warn!(
            "GPTQ start: the Gram matrix is not positive definite; added {extra:.0e} of its \
             mean diagonal (use --damp to set the damping)"
        );
    }
}

/// The error of a Gram matrix that is not positive definite even with `extra` damping.
pub(crate) fn not_positive_definite(n: usize, extra: f64) -> Error {
    Error::InvalidOption(format!(
        "the GPTQ start needs a positive-definite Gram matrix ({n} × {n}); even with \
         {extra:.0e} extra damping it is not (try a larger --damp or --init w)"
    ))
}

/// What a device needs to build the factor itself from the Gram it holds
/// ([`crate::device::Device::build_factor`]): the visiting order and the damped diagonal in it.
/// The off-diagonal terms are the device's `G`; `U` never crosses the bus. A device builds in
/// f64 the same `U` as [`factor`] (the same matrix, factored in another summation order) where
/// its `G` holds the host's values, as a Gram accumulated on the device does.
#[derive(Debug, Clone)]
pub struct FactorPlan {
    /// The id the built factor is kept under ([`GptqFactor::id`]).
    pub id: u64,
    /// Width `n`.
    pub n: usize,
    /// `perm[t]` is the input visited at step `t` ([`factor`]'s).
    pub perm: Vec<u32>,
    /// The damped `H_jj` at each visiting step; a dead input (decoupled, diagonal 1) as `−1`.
    diag: Vec<f64>,
    /// `mean(diag H)`, the unit of the fallback damping.
    mean: f64,
}

/// The plan of [`factor`]`(h, act_order, dead)` for a device that builds it.
pub fn plan(h: &Gram, act_order: bool, dead: f64) -> FactorPlan {
    plan_from_diag(&h.diag(), act_order, dead)
}

/// [`plan`] from the damped Gram's diagonal alone (all a plan reads of it).
pub fn plan_from_diag(diag: &[f64], act_order: bool, dead: f64) -> FactorPlan {
    let n = diag.len();
    let mut perm: Vec<u32> = (0..n as u32).collect();
    if act_order {
        // Stable: equal diagonals keep ascending index order, as in `factor`.
        perm.sort_by(|&a, &b| diag[b as usize].total_cmp(&diag[a as usize]));
    }
    let visit: Vec<f64> = perm
        .iter()
        .map(|&j| {
            let d = diag[j as usize];
            if d <= dead {
                -1.0
            } else {
                d
            }
        })
        .collect();
    FactorPlan {
        id: next_factor_id(),
        n,
        perm,
        diag: visit,
        mean: diag.iter().sum::<f64>() / n.max(1) as f64,
    }
}

impl FactorPlan {
    /// The diagonal of the `attempt`-th try (`0`: as planned; then [`factor`]'s fallback
    /// dampings, added to the diagonal by the same additions in the same order), a dead input
    /// as the negative of its diagonal; `None` past the last fallback.
    pub fn diagonal(&self, attempt: usize) -> Option<Vec<f64>> {
        if attempt > FALLBACK_DAMP.len() {
            return None;
        }
        let mut d: Vec<f64> = self
            .diag
            .iter()
            .map(|&v| if v < 0.0 { 1.0 } else { v })
            .collect();
        let mut extra = 0.0;
        for &next in &FALLBACK_DAMP[..attempt] {
            let add = (next - extra) * self.mean.max(f64::MIN_POSITIVE);
            for v in d.iter_mut() {
                *v += add;
            }
            extra = next;
        }
        for (v, &p) in d.iter_mut().zip(&self.diag) {
            if p < 0.0 {
                *v = -*v;
            }
        }
        Some(d)
    }

    /// The extra damping of the `attempt`-th try, as a share of the mean diagonal.
    pub fn extra(attempt: usize) -> f64 {
        attempt
            .checked_sub(1)
            .map_or(0.0, |i| FALLBACK_DAMP[i.min(FALLBACK_DAMP.len() - 1)])
    }

    /// Tries `build` on each [`FactorPlan::diagonal`] in turn until it succeeds, as [`factor`]
    /// does on the host: the fallback damping it needed is logged, and a Gram that no fallback
    /// makes positive definite is the same error.
    pub fn build_with(&self, mut build: impl FnMut(&[f64]) -> Result<bool>) -> Result<()> {
        let mut attempt = 0;
        while let Some(diag) = self.diagonal(attempt) {
            if build(&diag)? {
                warn_extra_damping(Self::extra(attempt));
                return Ok(());
            }
            attempt += 1;
        }
        Err(not_positive_definite(self.n, Self::extra(attempt - 1)))
    }

    /// The factor as the device keeps it: its id and order, its `U` on the device only (an
    /// empty `u`, which [`crate::device::Device::gptq`] never reads while the id is resident).
    pub fn resident(&self) -> GptqFactor {
        GptqFactor {
            id: self.id,
            n: self.n,
            perm: self.perm.clone(),
            u: Vec::new(),
        }
    }
}

/// The grid of the rows being quantized, as the pass needs it.
#[derive(Debug, Clone, Copy)]
pub struct RowGrid<'a> {
    /// Steps, `[rows, groups]`.
    pub delta: &'a [f32],
    /// Lowest codes, `[rows, groups]`.
    pub lo: &'a [i32],
    /// Inputs per group.
    pub group_size: usize,
    /// Codes per range.
    pub levels: i32,
}

/// The CPU pass: quantizes the row-major `rows × n` weights `w` with `f`, writing codes and grid
/// values (in input order, not visiting order) to `codes` and `q`.
pub fn quantize_rows(
    w: &[f32],
    f: &GptqFactor,
    grid: RowGrid<'_>,
    codes: &mut [i32],
    q: &mut [f32],
) {
    let n = f.n;
    let groups = n / grid.group_size;
    w.par_chunks(PANEL * n)
        .zip(codes.par_chunks_mut(PANEL * n))
        .zip(q.par_chunks_mut(PANEL * n))
        .enumerate()
        .for_each(|(p, ((wp, cp), qp))| {
            let rows = wp.len() / n;
            let row0 = p * PANEL;
            // x: the panel's weights in visiting order, updated as inputs are fixed.
            let mut x = vec![0.0f32; rows * n];
            for i in 0..rows {
                for (t, &j) in f.perm.iter().enumerate() {
                    x[i * n + t] = wp[i * n + j as usize];
                }
            }
            let mut err = vec![0.0f32; rows * BLOCK];
            let mut xt = vec![0.0f32; rows * BLOCK];
            let (mut kt, mut qt) = (vec![0i32; rows * BLOCK], vec![0.0f32; rows * BLOCK]);
            let (mut step, mut lo, mut e_t) =
                (vec![0.0f32; rows], vec![0i32; rows], vec![0.0f32; rows]);
            for b0 in (0..n).step_by(BLOCK) {
                let b1 = (b0 + BLOCK).min(n);
                let bw = b1 - b0;
                // The block's columns transposed (`xt[t][i]`), so each step works on the whole
                // panel at once: a row's steps are a chain (a step reads what the previous one
                // wrote) but the rows are independent, so the rounding, the errors and the
                // updates run across rows in SIMD lanes. Each value sees the same operations in
                // the same order as row by row (an error of 0 updates by ±0, which moves nothing
                // a code depends on).
                for i in 0..rows {
                    for t in b0..b1 {
                        xt[(t - b0) * rows + i] = x[i * n + t];
                    }
                }
                let mut group = usize::MAX;
                for t in b0..b1 {
                    let j = f.perm[t] as usize;
                    let g = j / grid.group_size;
                    if g != group {
                        group = g;
                        for i in 0..rows {
                            let slot = (row0 + i) * groups + g;
                            step[i] = grid.delta[slot];
                            lo[i] = grid.lo[slot];
                        }
                    }
                    let utt = f.u[t * n + t];
                    let (col, rest) = xt[(t - b0) * rows..bw * rows].split_at_mut(rows);
                    for i in 0..rows {
                        let k = nearest_code(col[i], step[i], lo[i], grid.levels);
                        let qv = step[i] * k as f32;
                        kt[(t - b0) * rows + i] = k;
                        qt[(t - b0) * rows + i] = qv;
                        let e = (col[i] - qv) / utt;
                        e_t[i] = e;
                        err[i * BLOCK + (t - b0)] = e;
                    }
                    let urow = &f.u[t * n + t + 1..t * n + b1];
                    for (xs, &uv) in rest.chunks_exact_mut(rows).zip(urow) {
                        for (xv, &e) in xs.iter_mut().zip(&e_t[..rows]) {
                            *xv -= e * uv;
                        }
                    }
                }
                // The block's codes and values go to their rows row by row (written per step,
                // 64 rows a row's length apart would share a few cache sets).
                for i in 0..rows {
                    for t in b0..b1 {
                        let j = f.perm[t] as usize;
                        cp[i * n + j] = kt[(t - b0) * rows + i];
                        qp[i * n + j] = qt[(t - b0) * rows + i];
                    }
                }
                // The rest of every row absorbs the block's errors at once.
                if b1 < n {
                    sgemm_acc(
                        rows,
                        bw,
                        n - b1,
                        -1.0,
                        &err,
                        BLOCK,
                        &f.u[b0 * n + b1..],
                        n,
                        &mut x[b1..],
                        n,
                    );
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_order_visits_the_largest_diagonal_first() {
        let g = Gram::from_matrix(3, vec![1.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 2.0]);
        let f = factor(&g, true, 0.0).unwrap();
        assert_eq!(f.perm, vec![1, 2, 0]);
        // Diagonal G: H⁻¹ is diagonal, U_tt = 1/√H_tt, no compensation.
        assert!((f.u[0] - 1.0 / 3f32.sqrt()).abs() < 1e-7);
        assert_eq!(f.u[1], 0.0);
    }

    #[test]
    fn a_singular_gram_falls_back_to_extra_damping() {
        // Rank one: x = (1, 1) always.
        let g = Gram::from_matrix(2, vec![1.0, 1.0, 1.0, 1.0]);
        let f = factor(&g, false, 0.0).unwrap();
        assert!(f.u.iter().all(|v| v.is_finite()));
    }
}
