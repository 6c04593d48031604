//! The CPU reference device.
//!
//! Plain loops, rows in parallel with rayon (rows are independent problems for a fixed grid).
//! The sweep keeps `G`, `Q̂` and `R` in f32 — the same arithmetic the GPU kernels do, so the two
//! agree to the last rounding decision in almost every step — while the exact residual refresh,
//! the losses and the scale steps accumulate in f64, which makes the reported errors the
//! reference the GPU is checked against.

use rayon::prelude::*;

use super::{Device, KeptRows, LayerProblem};
use crate::error::Result;
use crate::numeric::gptq::{self, GptqFactor, RowGrid};
use crate::numeric::grid::nearest_code;
use crate::numeric::grid::scale_step;
use crate::numeric::grid::{Granularity, ScaleDtype};
use crate::numeric::order::Order;
use crate::numeric::order::SHARED_BLOCK;

/// The CPU device.
#[derive(Debug, Default, Clone)]
pub struct CpuDevice;

impl CpuDevice {
    /// A CPU device using rayon's global pool.
    pub fn new() -> Self {
        CpuDevice
    }
}

/// A layer's state on the CPU.
#[derive(Debug, Clone)]
pub struct CpuLayer {
    cols: usize,
    group_size: usize,
    levels: i32,
    w: Vec<f32>,
    g: Vec<f32>,
    /// `G` widened to f64, for the exact products (energy, refresh).
    g64: Vec<f64>,
    q: Vec<f32>,
    r: Vec<f32>,
    codes: Vec<i32>,
    delta: Vec<f32>,
    delta0: Vec<f32>,
    lo: Vec<i32>,
    order: Order,
    dead: f32,
    scale_dtype: ScaleDtype,
    /// The held-out Gram in f64, when one is attached.
    gh64: Option<Vec<f64>>,
    /// The kept codes and steps.
    kept: Option<(Vec<i32>, Vec<f32>)>,
    /// The rows a row-by-row choice kept ([`Device::keep_rows`]).
    kept_rows: Option<KeptRows>,
    /// Orders stashed by key.
    stash: Vec<(u64, Order)>,
    /// The exact products kept between sweeps ([`Device::track_sweeps`]).
    tracked: Option<Tracked>,
}

/// What [`Device::track_sweeps`] keeps on the CPU: the f64 product `(W − Q̂)·G` and the rows'
/// held-out losses `e_iᵀ G_h e_i` with the state they are exact for, and `Q̂` where the last
/// sweep started.
///
/// States are numbered: every step that moves `Q̂` starts a new one. A product may be updated
/// instead of recomputed only when it is exact for the state the last sweep started from and the
/// sweep is the only step since; so the values follow from the run's own steps alone.
#[derive(Debug, Clone, Default)]
struct Tracked {
    /// The current state's number.
    state: u64,
    /// The state the last sweep started from, when a product was exact there (`q_from` holds
    /// its `Q̂`).
    swept_from: Option<u64>,
    q_from: Vec<f32>,
    /// `(W − Q̂)·G` in f64, and the state it is exact for.
    r64: Vec<f64>,
    r_at: Option<u64>,
    /// Each row's held-out loss `e_iᵀ G_h e_i` in f64, and the state they are exact for.
    h_rows: Vec<f64>,
    h_at: Option<u64>,
    /// Products updated rather than recomputed so far.
    updates: u64,
    /// `‖W − Q̂‖²`, summed by the last refresh, and the state it is exact for.
    sqnorm: Option<(u64, f64)>,
}

impl Tracked {
    /// Whether a sweep, and nothing else, led to the current state from the state a product
    /// is exact for (`at`); `q_from` is then that state's `Q̂`.
    fn swept_since(&self, at: Option<u64>) -> bool {
        matches!((self.swept_from, at), (Some(f), Some(a)) if f == a && self.state == f + 1)
    }
}

/// A sweep may leave at most this share of the codes changed for the products to be updated
/// rather than recomputed: an update reads one row of `G` per changed code, a recomputation
/// runs at matrix-product speed, and a sweep after a GPTQ or RTN start changes about 1%.
const SPARSE_SHARE: usize = 8;

impl CpuLayer {
    fn groups(&self) -> usize {
        self.cols / self.group_size
    }

    /// How many refreshes and held-out products after a sweep updated the kept products
    /// instead of computing whole ones ([`Device::track_sweeps`]); 0 when not tracked.
    pub fn sweep_updates(&self) -> u64 {
        self.tracked.as_ref().map_or(0, |t| t.updates)
    }
}

/// One row's view for the coordinate steps.
pub struct RowState<'a> {
    /// The row's float weights.
    pub w: &'a [f32],
    /// The row's current grid values `Q̂_i`.
    pub q: &'a mut [f32],
    /// The row's residual `R_i = (w_i − Q̂_i)·G`.
    pub r: &'a mut [f32],
    /// The row's codes.
    pub codes: &'a mut [i32],
    /// The row's steps, one per group.
    pub delta: &'a [f32],
    /// The row's lowest codes, one per group.
    pub lo: &'a [i32],
}

/// One exact coordinate step on column `j` of a row (spec a.3, step 4).
///
/// The loss restricted to `Q̂_ij` is a 1-D quadratic with curvature `G_jj`, minimised over the
/// reals at `Q̂_ij + R_ij/G_jj`; the best grid value is the one nearest to it. A dead input
/// (`G_jj ≤ dead`) has no curvature, so the weight is rounded to nearest instead (spec a.8).
#[inline]
pub fn coordinate_step(
    row: &mut RowState<'_>,
    g: &[f32],
    n: usize,
    j: usize,
    group_size: usize,
    levels: i32,
    dead: f32,
) {
    let gjj = g[j * n + j];
    let slot = j / group_size;
    let target = if gjj > dead {
        row.q[j] + row.r[j] / gjj
    } else {
        row.w[j]
    };
    let k = nearest_code(target, row.delta[slot], row.lo[slot], levels);
    let qn = row.delta[slot] * k as f32;
    let d = qn - row.q[j];
    if d != 0.0 {
        let grow = &g[j * n..(j + 1) * n];
        for (r, &gv) in row.r.iter_mut().zip(grow) {
            *r -= d * gv;
        }
    }
    row.q[j] = qn;
    row.codes[j] = k;
}

/// `out = a·G` for one row, in f64 (G is symmetric, so rows of G serve as columns).
fn row_times_gram(a: &[f64], g: &[f32], n: usize, out: &mut [f64]) {
    out.iter_mut().for_each(|v| *v = 0.0);
    for (j, &aj) in a.iter().enumerate() {
        if aj != 0.0 {
            let grow = &g[j * n..(j + 1) * n];
            for (o, &gv) in out.iter_mut().zip(grow) {
                *o += aj * gv as f64;
            }
        }
    }
}

/// Rows per panel of [`rows_times_gram`]: one matrix product per panel (and rayon task).
const GRAM_PANEL: usize = 64;

/// `out = A·G` for a panel of rows of `A` (row-major `p × n`), in f64: one cache-blocked SIMD
/// matrix product with `G` widened to f64 (exactly the f32 values the sweep uses).
fn rows_times_gram(a: &[f64], g64: &[f64], n: usize, out: &mut [f64]) {
    crate::numeric::linalg::dgemm_seq(a.len() / n.max(1), n, n, a, g64, out);
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Device for CpuDevice {
    type Layer = CpuLayer;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, p: &LayerProblem<'_>) -> Result<CpuLayer> {
        let (rows, cols) = (p.grid.rows, p.grid.cols); // state is rows × cols
        Ok(CpuLayer {
            cols,
            group_size: p.grid.group_size,
            levels: p.grid.levels(),
            w: p.weights.to_vec(),
            g: p.gram.to_vec(),
            g64: p.gram.iter().map(|&v| v as f64).collect(),
            q: p.weights.to_vec(),
            r: vec![0.0; rows * cols],
            codes: vec![0; rows * cols],
            delta: p.grid.delta.clone(),
            delta0: p.grid.delta.clone(),
            lo: p.grid.lo.clone(),
            order: resolve_order(p.order, p.weights, rows),
            dead: p.dead_threshold,
            scale_dtype: p.scale_dtype,
            gh64: None,
            kept: None,
            kept_rows: None,
            stash: Vec::new(),
            tracked: None,
        })
    }

    fn energy(&self, l: &mut CpuLayer) -> Result<f64> {
        Ok(weight_product(&l.w, &l.g64, l.cols))
    }

    fn reset(&self, l: &mut CpuLayer) -> Result<()> {
        moved(l);
        l.q.copy_from_slice(&l.w);
        l.r.iter_mut().for_each(|v| *v = 0.0);
        l.codes.iter_mut().for_each(|v| *v = 0);
        l.delta.copy_from_slice(&l.delta0);
        Ok(())
    }

    fn round_to_nearest(&self, l: &mut CpuLayer) -> Result<()> {
        moved(l);
        let (n, gs, ng, levels) = (l.cols, l.group_size, l.groups(), l.levels);
        let (delta, lo) = (&l.delta, &l.lo);
        l.q.par_chunks_mut(n)
            .zip(l.codes.par_chunks_mut(n))
            .zip(l.w.par_chunks(n))
            .enumerate()
            .for_each(|(i, ((q, codes), w))| {
                for j in 0..n {
                    let s = i * ng + j / gs;
                    let k = nearest_code(w[j], delta[s], lo[s], levels);
                    codes[j] = k;
                    q[j] = delta[s] * k as f32;
                }
            });
        Ok(())
    }

    fn sweep(&self, l: &mut CpuLayer) -> Result<()> {
        if let Some(t) = l.tracked.as_mut() {
            let exact_here = t.r_at == Some(t.state) || t.h_at == Some(t.state);
            t.swept_from = exact_here.then_some(t.state);
            if exact_here {
                t.q_from.clear();
                t.q_from.extend_from_slice(&l.q);
            }
            t.state += 1;
        }
        if let Order::Shared { perm, .. } = &l.order {
            let perm = perm.clone();
            sweep_shared(l, &perm);
            return Ok(());
        }
        let (n, gs, ng, levels, dead) = (l.cols, l.group_size, l.groups(), l.levels, l.dead);
        let (g, order, delta, lo) = (&l.g, &l.order, &l.delta, &l.lo);
        l.q.par_chunks_mut(n)
            .zip(l.r.par_chunks_mut(n))
            .zip(l.codes.par_chunks_mut(n))
            .zip(l.w.par_chunks(n))
            .enumerate()
            .for_each(|(i, (((q, r), codes), w))| {
                let mut row = RowState {
                    w,
                    q,
                    r,
                    codes,
                    delta: &delta[i * ng..(i + 1) * ng],
                    lo: &lo[i * ng..(i + 1) * ng],
                };
                for t in 0..n {
                    coordinate_step(&mut row, g, n, order.at(i, t), gs, levels, dead);
                }
            });
        Ok(())
    }

    fn refresh(&self, l: &mut CpuLayer) -> Result<f64> {
        let n = l.cols;
        let g = &l.g64;
        if let Some(t) = l.tracked.as_mut() {
            let base = t.swept_since(t.r_at).then_some(t.q_from.as_slice());
            let (loss, updated, sqnorm) =
                exact_product(&l.w, &l.q, g, n, base, &mut t.r64, &mut l.r);
            t.updates += updated as u64;
            t.sqnorm = Some((t.state, sqnorm));
            t.r_at = Some(t.state);
            return Ok(loss);
        }
        Ok(l.r
            .par_chunks_mut(GRAM_PANEL * n)
            .zip(l.w.par_chunks(GRAM_PANEL * n))
            .zip(l.q.par_chunks(GRAM_PANEL * n))
            .map(|((r, w), q)| {
                let a = error_rows(w, q);
                let mut out = vec![0.0; a.len()];
                let loss = quadratic_panel(&a, g, n, &mut out);
                for (rv, &o) in r.iter_mut().zip(&out) {
                    *rv = o as f32;
                }
                loss
            })
            .sum())
    }

    fn loss(&self, l: &mut CpuLayer) -> Result<f64> {
        let mut rows = Vec::new();
        let (loss, _) = row_losses(&l.w, &l.q, &l.g64, l.cols, None, &mut rows);
        if let Some(t) = l.tracked.as_mut() {
            // `R` is stale now: no product may be updated from this state.
            t.r_at = None;
        }
        Ok(loss)
    }

    fn update_scales(&self, l: &mut CpuLayer, granularity: Granularity) -> Result<()> {
        moved(l);
        match granularity {
            Granularity::Channel => update_scales_channel(l),
            Granularity::Layer => update_scale_layer(l),
        }
        Ok(())
    }

    fn download(&self, l: &mut CpuLayer) -> Result<(Vec<i32>, Vec<f32>)> {
        Ok((l.codes.clone(), l.delta.clone()))
    }

    fn load_codes(&self, l: &mut CpuLayer, codes: &[i32], delta: &[f32]) -> Result<()> {
        moved(l);
        l.codes.copy_from_slice(codes);
        l.delta.copy_from_slice(delta);
        let (n, gs, ng) = (l.cols, l.group_size, l.groups());
        let delta = &l.delta;
        l.q.par_chunks_mut(n)
            .zip(l.codes.par_chunks(n))
            .enumerate()
            .for_each(|(i, (q, k))| {
                for j in 0..n {
                    q[j] = delta[i * ng + j / gs] * k[j] as f32;
                }
            });
        Ok(())
    }

    fn gptq(&self, l: &mut CpuLayer, f: &GptqFactor) -> Result<()> {
        moved(l);
        let grid = RowGrid {
            delta: &l.delta,
            lo: &l.lo,
            group_size: l.group_size,
            levels: l.levels,
        };
        gptq::quantize_rows(&l.w, f, grid, &mut l.codes, &mut l.q);
        Ok(())
    }

    fn set_grid(&self, l: &mut CpuLayer, delta: &[f32], lo: &[i32]) -> Result<()> {
        check_len("grid steps", delta.len(), l.delta0.len())?;
        check_len("grid offsets", lo.len(), l.lo.len())?;
        l.delta0.copy_from_slice(delta);
        l.lo.copy_from_slice(lo);
        self.reset(l)
    }

    fn set_diagonal(&self, l: &mut CpuLayer, diag: &[f32]) -> Result<()> {
        let n = l.cols;
        check_len("Gram diagonal", diag.len(), n)?;
        for (j, &d) in diag.iter().enumerate() {
            l.g[j * n + j] = d;
            l.g64[j * n + j] = d as f64;
        }
        if let Some(t) = l.tracked.as_mut() {
            t.r_at = None;
        }
        Ok(())
    }

    fn set_order(&self, l: &mut CpuLayer, order: &Order, stashed: Option<u64>) -> Result<()> {
        if !order.same_layout(&l.order) {
            return Err(crate::error::Error::Internal(
                "set_order: the order kind differs from the upload's".into(),
            ));
        }
        l.order = match l.stash.iter().find(|(k, _)| Some(*k) == stashed) {
            Some((_, o)) => o.clone(),
            None => resolve_order(order, &l.w, l.w.len() / l.cols.max(1)),
        };
        Ok(())
    }

    fn stash_order(&self, l: &mut CpuLayer, key: u64) -> Result<()> {
        if !l.stash.iter().any(|(k, _)| *k == key) {
            l.stash.push((key, l.order.clone()));
        }
        Ok(())
    }

    fn error_sqnorm(&self, l: &mut CpuLayer) -> Result<f64> {
        // The refresh of this state summed it already (the same panels, the same sums).
        if let Some((_, v)) = l
            .tracked
            .as_ref()
            .and_then(|t| t.sqnorm.filter(|&(at, _)| at == t.state))
        {
            return Ok(v);
        }
        Ok(l.w
            .par_chunks(GRAM_PANEL * l.cols)
            .zip(l.q.par_chunks(GRAM_PANEL * l.cols))
            .map(|(w, q)| error_rows(w, q).iter().map(|e| e * e).sum::<f64>())
            .sum())
    }

    fn attach_holdout(&self, l: &mut CpuLayer, gram: &[f32]) -> Result<()> {
        check_len("held-out Gram", gram.len(), l.cols * l.cols)?;
        l.gh64 = Some(gram.iter().map(|&v| v as f64).collect());
        if let Some(t) = l.tracked.as_mut() {
            t.h_at = None;
        }
        Ok(())
    }

    fn holdout_product(&self, l: &mut CpuLayer, weights: bool) -> Result<f64> {
        let Some(gh) = &l.gh64 else {
            return Err(crate::error::Error::Internal(
                "holdout_product: no held-out Gram attached".into(),
            ));
        };
        if weights {
            return Ok(weight_product(&l.w, gh, l.cols));
        }
        let n = l.cols;
        if let Some(t) = l.tracked.as_mut() {
            let base = t.swept_since(t.h_at).then_some(t.q_from.as_slice());
            let (loss, updated) = row_losses(&l.w, &l.q, gh, n, base, &mut t.h_rows);
            t.updates += updated as u64;
            t.h_at = Some(t.state);
            return Ok(loss);
        }
        let mut rows = Vec::new();
        Ok(row_losses(&l.w, &l.q, gh, n, None, &mut rows).0)
    }

    fn keep(&self, l: &mut CpuLayer) -> Result<()> {
        match &mut l.kept {
            Some((c, d)) => {
                c.copy_from_slice(&l.codes);
                d.copy_from_slice(&l.delta);
            }
            None => l.kept = Some((l.codes.clone(), l.delta.clone())),
        }
        Ok(())
    }

    fn download_kept(&self, l: &mut CpuLayer) -> Result<(Vec<i32>, Vec<f32>)> {
        l.kept
            .clone()
            .ok_or_else(|| crate::error::Error::Internal("download_kept: nothing was kept".into()))
    }

    fn keep_rows(&self, l: &mut CpuLayer, tag: u32) -> Result<()> {
        let Some(gh) = &l.gh64 else {
            return Err(crate::error::Error::Internal(
                "keep_rows: no held-out Gram attached".into(),
            ));
        };
        let n = l.cols;
        // Each row's loss `e_iᵀ G_h e_i`: the held-out score's when they are exact for this
        // state, else computed here.
        let exact = l
            .tracked
            .as_ref()
            .filter(|t| t.h_at == Some(t.state) && t.h_rows.len() * n == l.q.len())
            .map(|t| t.h_rows.clone());
        let losses: Vec<f64> = match exact {
            Some(rows) => rows,
            None => {
                let mut rows = Vec::new();
                row_losses(&l.w, &l.q, gh, n, None, &mut rows);
                rows
            }
        };
        let ng = l.groups();
        match &mut l.kept_rows {
            None => {
                l.kept_rows = Some(KeptRows {
                    codes: l.codes.clone(),
                    delta: l.delta.clone(),
                    lo: l.lo.clone(),
                    tags: vec![tag; losses.len()],
                    losses,
                })
            }
            Some(k) => {
                for (i, &loss) in losses.iter().enumerate() {
                    if loss < k.losses[i] {
                        k.codes[i * n..(i + 1) * n].copy_from_slice(&l.codes[i * n..(i + 1) * n]);
                        let g = i * ng..(i + 1) * ng;
                        k.delta[g.clone()].copy_from_slice(&l.delta[g.clone()]);
                        k.lo[g.clone()].copy_from_slice(&l.lo[g]);
                        k.tags[i] = tag;
                        k.losses[i] = loss;
                    }
                }
            }
        }
        Ok(())
    }

    fn download_kept_rows(&self, l: &mut CpuLayer) -> Result<KeptRows> {
        l.kept_rows.clone().ok_or_else(|| {
            crate::error::Error::Internal("download_kept_rows: nothing was kept".into())
        })
    }

    fn restore_kept_rows(&self, l: &mut CpuLayer) -> Result<()> {
        let k = l.kept_rows.clone().ok_or_else(|| {
            crate::error::Error::Internal("restore_kept_rows: nothing was kept".into())
        })?;
        l.lo.copy_from_slice(&k.lo);
        self.load_codes(l, &k.codes, &k.delta)
    }

    fn track_sweeps(&self, l: &mut CpuLayer) -> Result<()> {
        l.tracked.get_or_insert_with(Tracked::default);
        Ok(())
    }
}

/// A step that moves `Q̂` other than a sweep: a new state, from which no product is updated.
fn moved(l: &mut CpuLayer) {
    if let Some(t) = l.tracked.as_mut() {
        t.state += 1;
    }
}

/// `Σ_i a_iᵀ G a_i` with `a = W − Q̂`, writing `A·G` to `p64` (f64, row-major) and its f32
/// rounding to `r` (the sweep's residual): from scratch as [`quadratic_panel`] does (the same
/// sums, bit for bit), or, when `base` is the `Q̂` that `p64` is exact for and few codes changed
/// since, by subtracting `(Q̂ − base)_j · G[j, :]` for each changed input `j` of each row.
/// Returns the sum, whether it was an update, and `‖W − Q̂‖²` (summed by panels as
/// [`Device::error_sqnorm`] sums it).
///
/// Each panel of rows is one rayon task that computes its product, its sums and its f32 copy
/// while the panel is in cache: the product goes straight into `p64`, and no pass over the
/// whole layer follows.
fn exact_product(
    w: &[f32],
    q: &[f32],
    g64: &[f64],
    n: usize,
    base: Option<&[f32]>,
    p64: &mut Vec<f64>,
    r: &mut [f32],
) -> (f64, bool, f64) {
    let total = w.len();
    let base = base.filter(|b| p64.len() == total && few_changed(b, q));
    p64.resize(total, 0.0);
    let chunk = GRAM_PANEL * n.max(1);
    let sums = |a: &[f64], p: &[f64], r: &mut [f32]| {
        for (rv, &v) in r.iter_mut().zip(p) {
            *rv = v as f32;
        }
        let loss = a
            .chunks(n)
            .zip(p.chunks(n))
            .map(|(a, o)| dot64(a, o))
            .sum::<f64>();
        (loss, a.iter().map(|e| e * e).sum::<f64>())
    };
    let sum = match base {
        Some(b) => p64
            .par_chunks_mut(chunk)
            .zip(r.par_chunks_mut(chunk))
            .zip(w.par_chunks(chunk))
            .zip(q.par_chunks(chunk))
            .zip(b.par_chunks(chunk))
            .map(|((((p, r), w), q), b)| {
                for ((p, q), b) in p.chunks_mut(n).zip(q.chunks(n)).zip(b.chunks(n)) {
                    for (j, (&qj, &bj)) in q.iter().zip(b).enumerate() {
                        if qj != bj {
                            let d = qj as f64 - bj as f64;
                            for (pv, &gv) in p.iter_mut().zip(&g64[j * n..(j + 1) * n]) {
                                *pv -= d * gv;
                            }
                        }
                    }
                }
                sums(&error_rows(w, q), p, r)
            })
            .reduce(|| (0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1)),
        None => p64
            .par_chunks_mut(chunk)
            .zip(r.par_chunks_mut(chunk))
            .zip(w.par_chunks(chunk))
            .zip(q.par_chunks(chunk))
            .map(|(((p, r), w), q)| {
                let a = error_rows(w, q);
                rows_times_gram(&a, g64, n, p);
                sums(&a, p, r)
            })
            .reduce(|| (0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1)),
    };
    (sum.0, base.is_some(), sum.1)
}

/// Whether `base` is a state of the same size from which at most a [`SPARSE_SHARE`]th of the
/// values changed to `q`: a kept product is then updated rather than recomputed.
fn few_changed(base: &[f32], q: &[f32]) -> bool {
    base.len() == q.len()
        && base.par_iter().zip(q).filter(|(x, y)| x != y).count() * SPARSE_SHARE <= q.len()
}

/// `Σ_i w_iᵀ G w_i` in f64, panels of rows in parallel ([`quadratic_rows`]).
fn weight_product(w: &[f32], g64: &[f64], n: usize) -> f64 {
    w.par_chunks(GRAM_PANEL * n)
        .map(|w| {
            let a: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            let mut out = vec![0.0; a.len() / n.max(1)];
            quadratic_rows(&a, g64, n, &mut out);
            out.iter().sum::<f64>()
        })
        .sum()
}

/// Columns per block of [`quadratic_rows`]: one GEMM per block row of `G`'s upper triangle.
const QUAD_BLOCK: usize = 64;

/// Each row's `a_iᵀ G a_i` for a panel of rows `a` (row-major `p × n`, f64) into `out`, from `G`'s
/// upper block triangle only: `Σ_J [a_J·G_JJ·a_Jᵀ + 2·a_J·G_{J,>J}·a_{>J}ᵀ]` over blocks `J` of
/// [`QUAD_BLOCK`] columns, one GEMM per block row, about half the flops of the whole product
/// `A·G` (a loss alone does not need `A·G`).
fn quadratic_rows(a: &[f64], g64: &[f64], n: usize, out: &mut [f64]) {
    let p = out.len();
    out.iter_mut().for_each(|v| *v = 0.0);
    if n == 0 || p == 0 {
        return;
    }
    let mut t = vec![0.0; p * n];
    for j0 in (0..n).step_by(QUAD_BLOCK) {
        let b = QUAD_BLOCK.min(n - j0);
        let width = n - j0;
        let t = &mut t[..p * width];
        crate::numeric::linalg::dgemm_seq_strided(
            p,
            b,
            width,
            &a[j0..],
            n,
            &g64[j0 * n + j0..],
            n,
            t,
        );
        for (i, o) in out.iter_mut().enumerate() {
            let (ti, ai) = (&t[i * width..(i + 1) * width], &a[i * n + j0..(i + 1) * n]);
            let diag = crate::numeric::linalg::dot(&ti[..b], &ai[..b]);
            let off = crate::numeric::linalg::dot(&ti[b..], &ai[b..]);
            *o += diag + 2.0 * off;
        }
    }
}

/// Each row's loss `e_iᵀ G e_i` with `e = W − Q̂` into `rows` (f64), and their sum: from scratch
/// ([`quadratic_rows`]), or, when `base` is the `Q̂` that `rows` are exact for and few codes
/// changed since, updated: with `δ = Q̂ − base` on a row's changed inputs `S`,
/// `e'ᵀGe' = eᵀGe − 2·Σ_{j∈S} δ_j·(G_j·e) + Σ_{j,k∈S} δ_j·G_jk·δ_k` (`e` the base's error), one row
/// of `G` per changed code. Returns the sum and whether it was an update.
fn row_losses(
    w: &[f32],
    q: &[f32],
    g64: &[f64],
    n: usize,
    base: Option<&[f32]>,
    rows: &mut Vec<f64>,
) -> (f64, bool) {
    let total = w.len();
    let m = total / n.max(1);
    let base = base.filter(|b| rows.len() == m && few_changed(b, q));
    rows.resize(m, 0.0);
    let chunk = GRAM_PANEL * n.max(1);
    let sum = match base {
        Some(b) => rows
            .par_chunks_mut(GRAM_PANEL)
            .zip(w.par_chunks(chunk))
            .zip(q.par_chunks(chunk))
            .zip(b.par_chunks(chunk))
            .map(|(((out, w), q), b)| {
                let mut changed: Vec<(usize, f64)> = Vec::new();
                for (((o, w), q), b) in out
                    .iter_mut()
                    .zip(w.chunks(n))
                    .zip(q.chunks(n))
                    .zip(b.chunks(n))
                {
                    changed.clear();
                    changed.extend(
                        q.iter()
                            .zip(b)
                            .enumerate()
                            .filter(|(_, (x, y))| x != y)
                            .map(|(j, (&x, &y))| (j, x as f64 - y as f64)),
                    );
                    if changed.is_empty() {
                        continue;
                    }
                    let e = error_rows(w, b);
                    let mut cross = 0.0;
                    let mut quad = 0.0;
                    for &(j, dj) in &changed {
                        let gj = &g64[j * n..(j + 1) * n];
                        cross += dj * crate::numeric::linalg::dot(gj, &e);
                        quad += dj * changed.iter().map(|&(k, dk)| gj[k] * dk).sum::<f64>();
                    }
                    *o += quad - 2.0 * cross;
                }
                out.iter().sum::<f64>()
            })
            .sum(),
        None => rows
            .par_chunks_mut(GRAM_PANEL)
            .zip(w.par_chunks(chunk))
            .zip(q.par_chunks(chunk))
            .map(|((out, w), q)| {
                quadratic_rows(&error_rows(w, q), g64, n, out);
                out.iter().sum::<f64>()
            })
            .sum(),
    };
    (sum, base.is_some())
}

/// `W − Q̂` for a panel of rows, widened to f64.
fn error_rows(w: &[f32], q: &[f32]) -> Vec<f64> {
    w.iter()
        .zip(q)
        .map(|(&a, &b)| a as f64 - b as f64)
        .collect()
}

/// `Σ_i a_iᵀ G a_i` over a panel of rows `a`, writing the product `A·G` it sums over to `out`,
/// in f64.
fn quadratic_panel(a: &[f64], g64: &[f64], n: usize, out: &mut [f64]) -> f64 {
    rows_times_gram(a, g64, n, out);
    a.chunks(n)
        .zip(out.chunks(n))
        .map(|(a, o)| dot64(a, o))
        .sum::<f64>()
}

/// An internal error when a resident-state input has the wrong length.
fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(crate::error::Error::Internal(format!(
            "{what}: {got} values, the resident layer has {want}"
        )))
    }
}

/// Rows per rayon task of the blocked sweep: one task's trailing update is one GEMM of this
/// many rows (and its `D` panel stays in L1).
const SWEEP_PANEL: usize = 32;

/// `order` as the sweeps walk it: a ranked greedy order built for the weights `w` here.
fn resolve_order(order: &Order, w: &[f32], rows: usize) -> Order {
    match order {
        Order::Ranked { .. } => {
            crate::profile::record("    order", || order.resolve(w, rows).into_owned())
        }
        other => other.clone(),
    }
}

/// One sweep in a shared order, blocked (see [`crate::numeric::order`]).
///
/// For each block `J` of [`SHARED_BLOCK`] consecutive steps, every row walks the block's columns
/// with a private copy of `R_i[J]`, updated by the block's `G[J, J]` corner only (the steps inside
/// the block need nothing else); the changes `D_i[J]` are kept. The whole residual then takes the
/// block's effect at once, `R −= D·G[J, :]`, one matrix product per panel of rows. The result is
/// the plain coordinate sweep in the same order; only the f32 rounding of `R` differs.
fn sweep_shared(l: &mut CpuLayer, perm: &[u32]) {
    let (n, gs, ng, levels, dead) = (l.cols, l.group_size, l.groups(), l.levels, l.dead);
    let (g, delta, lo) = (&l.g, &l.delta, &l.lo);
    let mut gj = Vec::new();
    let mut gjj = Vec::new();
    for block in perm.chunks(SHARED_BLOCK) {
        let b = block.len();
        // G[J, :] (rows of G, contiguous) and its corner G[J, J].
        gj.clear();
        for &j in block {
            gj.extend_from_slice(&g[j as usize * n..(j as usize + 1) * n]);
        }
        gjj.clear();
        for t in 0..b {
            gjj.extend(block.iter().map(|&c| gj[t * n + c as usize]));
        }
        let (gj, gjj) = (&gj, &gjj);
        l.q.par_chunks_mut(SWEEP_PANEL * n)
            .zip(l.r.par_chunks_mut(SWEEP_PANEL * n))
            .zip(l.codes.par_chunks_mut(SWEEP_PANEL * n))
            .zip(l.w.par_chunks(SWEEP_PANEL * n))
            .enumerate()
            .for_each(|(p, (((q, r), codes), w))| {
                let rows = w.len() / n;
                let mut d = vec![0.0f32; rows * b];
                let mut rj = vec![0.0f32; b];
                for i in 0..rows {
                    let row = p * SWEEP_PANEL + i;
                    let (q, codes, w) = (&mut q[i * n..], &mut codes[i * n..], &w[i * n..]);
                    for (v, &c) in rj.iter_mut().zip(block) {
                        *v = r[i * n + c as usize];
                    }
                    for t in 0..b {
                        let j = block[t] as usize;
                        let gjj_t = gjj[t * b + t];
                        let slot = row * ng + j / gs;
                        let target = if gjj_t > dead {
                            q[j] + rj[t] / gjj_t
                        } else {
                            w[j]
                        };
                        let k = nearest_code(target, delta[slot], lo[slot], levels);
                        let qn = delta[slot] * k as f32;
                        let dv = qn - q[j];
                        if dv != 0.0 {
                            for (v, &gv) in
                                rj[t + 1..].iter_mut().zip(&gjj[t * b + t + 1..(t + 1) * b])
                            {
                                *v -= dv * gv;
                            }
                        }
                        q[j] = qn;
                        codes[j] = k;
                        d[i * b + t] = dv;
                    }
                }
                crate::numeric::linalg::sgemm_acc(rows, b, n, -1.0, &d, b, gj, n, r, n);
            });
    }
}

/// Per (row, group): `Δ ← Δ + k̃ᵀR / k̃ᵀGk̃`, groups of a row one after the other (each is an
/// exact block-coordinate step, so the loss cannot rise).
fn update_scales_channel(l: &mut CpuLayer) {
    let (n, gs, ng) = (l.cols, l.group_size, l.groups());
    let (g, dtype) = (&l.g, l.scale_dtype);
    l.r.par_chunks_mut(n)
        .zip(l.q.par_chunks_mut(n))
        .zip(l.codes.par_chunks(n))
        .zip(l.delta.par_chunks_mut(ng))
        .for_each(|(((r, q), codes), delta)| {
            let mut kg = vec![0.0f64; n];
            let mut kt = vec![0.0f64; n];
            for grp in 0..ng {
                let cols = grp * gs..(grp + 1) * gs;
                kt.iter_mut().for_each(|v| *v = 0.0);
                for j in cols.clone() {
                    kt[j] = codes[j] as f64;
                }
                row_times_gram(&kt, g, n, &mut kg);
                let num: f64 = cols.clone().map(|j| kt[j] * r[j] as f64).sum();
                let den: f64 = cols.clone().map(|j| kt[j] * kg[j]).sum();
                if let Some(new) = scale_step(delta[grp], num, den, dtype) {
                    let s = new as f64 - delta[grp] as f64;
                    for (rv, &v) in r.iter_mut().zip(&kg) {
                        *rv = (*rv as f64 - s * v) as f32;
                    }
                    delta[grp] = new;
                    for j in cols {
                        q[j] = new * codes[j] as f32;
                    }
                }
            }
        });
}

/// One step for the whole tensor: `δ ← δ + Σ_i k_iᵀR_i / Σ_i k_iᵀGk_i` (spec a.5).
fn update_scale_layer(l: &mut CpuLayer) {
    let n = l.cols;
    let g = &l.g;
    let (num, den) = l
        .codes
        .par_chunks(n)
        .zip(l.r.par_chunks(n))
        .map(|(codes, r)| {
            let k: Vec<f64> = codes.iter().map(|&c| c as f64).collect();
            let mut kg = vec![0.0; n];
            row_times_gram(&k, g, n, &mut kg);
            let num: f64 = k.iter().zip(r).map(|(a, &b)| a * b as f64).sum();
            (num, dot64(&k, &kg))
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let old = l.delta[0];
    if let Some(new) = scale_step(old, num, den, l.scale_dtype) {
        l.delta.iter_mut().for_each(|d| *d = new);
        for (q, &k) in l.q.iter_mut().zip(&l.codes) {
            *q = new * k as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SplitMix;

    /// A symmetric `n × n` matrix `XᵀX` of `k` random rows, in f64.
    fn gram(n: usize, k: usize, rng: &mut SplitMix) -> Vec<f64> {
        let x = rng.normals(k * n);
        let mut g = vec![0.0; n * n];
        for r in x.chunks(n) {
            for i in 0..n {
                for j in 0..n {
                    g[i * n + j] += r[i] as f64 * r[j] as f64;
                }
            }
        }
        g
    }

    /// `a_iᵀ G a_i` the plain way.
    fn naive(a: &[f64], g: &[f64], n: usize) -> Vec<f64> {
        a.chunks(n)
            .map(|r| {
                (0..n)
                    .map(|i| (0..n).map(|j| r[i] * g[i * n + j] * r[j]).sum::<f64>())
                    .sum()
            })
            .collect()
    }

    /// The half-product row losses equal the plain quadratic forms up to f64 rounding, on widths
    /// around the block (one column, less than a block, a block, a block and one, several).
    #[test]
    fn row_losses_from_the_upper_block_triangle_match_the_quadratic_form() {
        let mut rng = SplitMix::new(11);
        for n in [1, 7, 63, 64, 65, 130, 200] {
            let p = 5;
            let g = gram(n, n + 3, &mut rng);
            let a: Vec<f64> = rng.normals(p * n).iter().map(|&v| v as f64).collect();
            let mut out = vec![0.0; p];
            quadratic_rows(&a, &g, n, &mut out);
            for (got, want) in out.iter().zip(naive(&a, &g, n)) {
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "n {n}: {got} vs {want}"
                );
            }
        }
    }

    /// After a few codes change, the updated row losses equal losses computed from scratch up to
    /// f64 rounding; with too many changes they are computed from scratch (no update).
    /// The exact product writes the sweep's f32 residual from its own panels: from scratch the
    /// kept product, the loss and `‖W − Q̂‖²` are the panel sums bit for bit, and after an update
    /// (few codes changed) the residual is still the kept product rounded, close to a fresh one.
    #[test]
    fn the_exact_product_writes_the_residual_it_keeps() {
        let mut rng = SplitMix::new(21);
        let (m, n) = (150, 70);
        let g = gram(n, 110, &mut rng);
        let w = rng.normals(m * n);
        let base: Vec<f32> = w.iter().map(|&v| (v * 4.0).round() / 4.0).collect();
        let (mut p, mut r) = (Vec::new(), vec![f32::NAN; m * n]);
        let (loss, updated, sq) = exact_product(&w, &base, &g, n, None, &mut p, &mut r);
        assert!(!updated);
        let a = error_rows(&w, &base);
        let mut want = 0.0;
        let mut want_sq = 0.0;
        for (k, panel) in a.chunks(GRAM_PANEL * n).enumerate() {
            let mut out = vec![0.0; panel.len()];
            want += quadratic_panel(panel, &g, n, &mut out);
            want_sq += panel.iter().map(|e| e * e).sum::<f64>();
            let at = k * GRAM_PANEL * n;
            assert_eq!(&p[at..at + panel.len()], &out[..], "panel {k}");
        }
        assert!((loss - want).abs() <= 1e-12 * want, "{loss} vs {want}");
        assert!((sq - want_sq).abs() <= 1e-12 * want_sq, "{sq} vs {want_sq}");
        assert!(r.iter().zip(&p).all(|(&rv, &pv)| rv == pv as f32));
        // A few codes move: the kept product is updated, and the residual follows it.
        let mut q = base.clone();
        for k in (0..m * n).step_by(41) {
            q[k] -= 0.25;
        }
        let (loss, updated, _) = exact_product(&w, &q, &g, n, Some(&base), &mut p, &mut r);
        assert!(updated);
        assert!(r.iter().zip(&p).all(|(&rv, &pv)| rv == pv as f32));
        let (mut fresh, mut rf) = (Vec::new(), vec![0.0f32; m * n]);
        let (want, _, _) = exact_product(&w, &q, &g, n, None, &mut fresh, &mut rf);
        assert!((loss - want).abs() <= 1e-12 * want, "{loss} vs {want}");
        let scale = fresh.iter().fold(0.0f64, |acc, v| acc.max(v.abs()));
        for (x, y) in p.iter().zip(&fresh) {
            assert!((x - y).abs() <= 1e-12 * scale, "{x} vs {y}");
        }
    }

    #[test]
    fn row_losses_update_after_few_changes() {
        let mut rng = SplitMix::new(12);
        let (m, n) = (70, 90);
        let g = gram(n, 120, &mut rng);
        let w = rng.normals(m * n);
        let base: Vec<f32> = w.iter().map(|&v| (v * 4.0).round() / 4.0).collect();
        let mut q = base.clone();
        for k in (0..m * n).step_by(37) {
            q[k] += 0.25;
        }
        let mut rows = Vec::new();
        let (_, updated) = row_losses(&w, &base, &g, n, None, &mut rows);
        assert!(!updated);
        let (sum, updated) = row_losses(&w, &q, &g, n, Some(&base), &mut rows);
        assert!(updated);
        let mut fresh = Vec::new();
        let (want, _) = row_losses(&w, &q, &g, n, None, &mut fresh);
        assert!((sum - want).abs() <= 1e-12 * want, "{sum} vs {want}");
        for (a, b) in rows.iter().zip(&fresh) {
            assert!((a - b).abs() <= 1e-11 * b.abs().max(1e-300), "{a} vs {b}");
        }
        // Every code moved: from scratch, bit for bit.
        let far: Vec<f32> = base.iter().map(|v| v + 0.5).collect();
        let (s1, updated) = row_losses(&w, &far, &g, n, Some(&base), &mut rows);
        assert!(!updated);
        assert_eq!(s1, row_losses(&w, &far, &g, n, None, &mut fresh).0);
    }
}
