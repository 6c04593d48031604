//! Quantization grids: where each weight may land.
//!
//! A grid gives every (row, group) of a weight matrix a step `Δ` and an integer code range
//! `[lo, lo + 2^b − 1]`; a weight on the grid is `Δ·k`. COMQ's reference grid (spec a.2) is
//! per row, asymmetric and min/max: `δ = (max − min)/(2^b − 1)`, `lo = round_half_even(min/δ)`,
//! `Δ = c·δ` with the user's `--scalar c` applied *after* `lo` is fixed. The symmetric grid is the
//! one compressed-tensors' min/max observer produces: `Δ = c·absmax / ((2^b − 1)/2)`,
//! codes `[−2^(b−1), 2^(b−1) − 1]`, so its files load in transformers.
//!
//! The one rounding rule used by every device: `k = clamp(ceil(t/Δ − ½), lo, hi)`. It is the
//! grid point nearest to `t`, with exact ties going to the lower code as the reference code's
//! `argmin` does.

use super::{Granularity, QuantConfig, ScaleDtype};

/// Per-(row, group) steps and code ranges of one weight matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Bit width `b`; every range holds `2^b` codes.
    pub bits: u32,
    /// Rows of the weight matrix (output channels).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Inputs per group; equals `cols` for one grid per row.
    pub group_size: usize,
    /// Step `Δ` per (row, group), row-major `[rows, groups]`.
    pub delta: Vec<f32>,
    /// Lowest code per (row, group), row-major `[rows, groups]`.
    pub lo: Vec<i32>,
}

impl Grid {
    /// Builds the grid for a row-major `rows × cols` weight matrix under `cfg`.
    ///
    /// The caller has validated `cfg` against the shape (the group size divides `cols`).
    pub fn build(w: &[f32], rows: usize, cols: usize, cfg: &QuantConfig) -> Grid {
        assert_eq!(w.len(), rows * cols, "weight length must be rows × cols");
        let group_size = cfg.group_size.unwrap_or(cols).min(cols).max(1);
        let groups = cols / group_size;
        let levels_m1 = ((1u32 << cfg.bits) - 1) as f32;
        let mut delta = Vec::with_capacity(rows * groups);
        let mut lo = Vec::with_capacity(rows * groups);
        let layer_range = (cfg.granularity == Granularity::Layer).then(|| min_max(w));
        for r in 0..rows {
            for g in 0..groups {
                let (mn, mx) = match layer_range {
                    Some(range) => range,
                    None => min_max(&w[r * cols + g * group_size..r * cols + (g + 1) * group_size]),
                };
                let (d, l) = if cfg.sym {
                    sym_range(mn, mx, cfg.bits, levels_m1, cfg.scalar)
                } else {
                    asym_range(mn, mx, levels_m1, cfg.scalar)
                };
                delta.push(cfg.scale_dtype.round(d));
                lo.push(l);
            }
        }
        Grid {
            bits: cfg.bits,
            rows,
            cols,
            group_size,
            delta,
            lo,
        }
    }

    /// Number of groups per row.
    pub fn groups(&self) -> usize {
        self.cols / self.group_size
    }

    /// Number of codes in every range, `2^b`.
    pub fn levels(&self) -> i32 {
        1 << self.bits
    }

    /// Index into `delta`/`lo` for weight `(row, col)`.
    #[inline]
    pub fn slot(&self, row: usize, col: usize) -> usize {
        row * self.groups() + col / self.group_size
    }

    /// The code nearest to `target` in slot `slot` (see the module doc for the rule).
    #[inline]
    pub fn nearest(&self, slot: usize, target: f32) -> i32 {
        nearest_code(target, self.delta[slot], self.lo[slot], self.levels())
    }

    /// The value of code `k` in slot `slot`.
    #[inline]
    pub fn value(&self, slot: usize, k: i32) -> f32 {
        self.delta[slot] * k as f32
    }
}

/// `clamp(ceil(t/Δ − ½), lo, lo + levels − 1)`, in f32 exactly as the GPU kernels compute it.
#[inline]
pub fn nearest_code(target: f32, delta: f32, lo: i32, levels: i32) -> i32 {
    let hi = lo + levels - 1;
    let k = (target / delta - 0.5).ceil();
    // Clamp in float first so a huge target cannot overflow the integer cast.
    let k = k.max(lo as f32).min(hi as f32);
    if k.is_nan() {
        lo
    } else {
        k as i32
    }
}

fn min_max(v: &[f32]) -> (f32, f32) {
    v.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        })
}

/// Asymmetric min/max range (spec a.2) with the constant-row guard.
fn asym_range(mn: f32, mx: f32, levels_m1: f32, scalar: f32) -> (f32, i32) {
    let d = (mx - mn) / levels_m1;
    if d > 0.0 && d.is_finite() {
        let lo = (mn / d).round_ties_even() as i32;
        (scalar * d, lo)
    } else {
        // Constant row: the reference code divides by zero here and turns the row into NaN.
        // Choose the step so the constant itself is a grid value (code ±1, or 0 for an all-zero
        // row) and ignore the scalar so the row stays exact.
        let d = if mn != 0.0 { mn.abs() } else { 1.0 };
        (d, (mn / d).round_ties_even() as i32)
    }
}

/// Symmetric range: zero point fixed at 0, codes `[−2^(b−1), 2^(b−1) − 1]`.
fn sym_range(mn: f32, mx: f32, bits: u32, levels_m1: f32, scalar: f32) -> (f32, i32) {
    let absmax = mn.abs().max(mx.abs());
    let d = absmax / (levels_m1 / 2.0);
    let lo = -(1i32 << (bits - 1));
    if d > 0.0 && d.is_finite() {
        (scalar * d, lo)
    } else {
        (1.0, lo)
    }
}

impl ScaleDtype {
    /// Rounds a step to what the output file can store, so codes are optimised against the
    /// scale a runtime will actually multiply by.
    pub fn round(self, x: f32) -> f32 {
        match self {
            ScaleDtype::F32 => x,
            ScaleDtype::F16 => half::f16::from_f32(x).to_f32(),
            ScaleDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bits: u32, sym: bool) -> QuantConfig {
        QuantConfig {
            bits,
            sym,
            ..QuantConfig::default()
        }
    }

    #[test]
    fn asymmetric_grid_spans_min_to_max() {
        let w = [-1.0f32, 0.5, 2.0, 0.0];
        let g = Grid::build(&w, 1, 4, &cfg(2, false));
        assert_eq!(g.delta[0], 1.0);
        assert_eq!(g.lo[0], -1);
        assert_eq!(g.value(0, g.lo[0]), -1.0);
        assert_eq!(g.value(0, g.lo[0] + 3), 2.0);
    }

    #[test]
    fn ties_round_to_the_lower_code() {
        assert_eq!(nearest_code(0.5, 1.0, -8, 16), 0);
        assert_eq!(nearest_code(-0.5, 1.0, -8, 16), -1);
        assert_eq!(nearest_code(1e30, 1.0, -8, 16), 7);
        assert_eq!(nearest_code(-1e30, 1.0, -8, 16), -8);
    }

    #[test]
    fn constant_rows_stay_exact() {
        for c in [3.5f32, -2.0, 0.0] {
            let w = [c; 5];
            let g = Grid::build(&w, 1, 5, &cfg(4, false));
            let k = g.nearest(0, c);
            assert_eq!(g.value(0, k), c, "constant {c} must be representable");
        }
    }

    #[test]
    fn symmetric_grid_has_zero_point_zero() {
        let w = [-3.0f32, 1.0, 2.0, 0.25];
        let g = Grid::build(&w, 1, 4, &cfg(4, true));
        assert_eq!(g.lo[0], -8);
        assert!((g.delta[0] - 3.0 / 7.5).abs() < 1e-7);
        assert_eq!(g.nearest(0, 0.0), 0);
    }

    #[test]
    fn layer_granularity_shares_one_range() {
        let w = [-1.0f32, 1.0, 0.0, 3.0];
        let c = QuantConfig {
            granularity: Granularity::Layer,
            ..cfg(2, false)
        };
        let g = Grid::build(&w, 2, 2, &c);
        assert_eq!(g.delta[0], g.delta[1]);
        assert_eq!(g.lo[0], g.lo[1]);
    }
}
