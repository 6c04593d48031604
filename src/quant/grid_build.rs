//! `Grid::build`: the grid of a layer under a configuration (the data type and its arithmetic
//! live in `crate::numeric::grid`).

use super::{Granularity, Grid, QuantConfig};

impl Grid {
    /// Builds the grid for a row-major `rows × cols` weight matrix under `cfg`.
    ///
    /// The caller has validated `cfg` against the shape (the group size divides `cols`).
    pub fn build(w: &[f32], rows: usize, cols: usize, cfg: &QuantConfig) -> Grid {
        Grid::build_shrinks(w, rows, cols, cfg, &[cfg.scalar])
            .pop()
            .expect("one grid per shrink")
    }

    /// [`Grid::build`] at each grid shrink of `scalars` (`cfg.scalar` ignored), each range
    /// found once: the grids are those `Grid::build` gives at each shrink, bit for bit.
    pub fn build_shrinks(
        w: &[f32],
        rows: usize,
        cols: usize,
        cfg: &QuantConfig,
        scalars: &[f32],
    ) -> Vec<Grid> {
        assert_eq!(w.len(), rows * cols, "weight length must be rows × cols");
        let group_size = cfg.group_size.unwrap_or(cols).min(cols).max(1);
        let groups = cols / group_size;
        let levels_m1 = ((1u32 << cfg.bits) - 1) as f32;
        let mut grids: Vec<Grid> = scalars
            .iter()
            .map(|_| Grid {
                bits: cfg.bits,
                rows,
                cols,
                group_size,
                delta: Vec::with_capacity(rows * groups),
                lo: Vec::with_capacity(rows * groups),
            })
            .collect();
        let layer_range = (cfg.granularity == Granularity::Layer).then(|| min_max(w));
        for r in 0..rows {
            for g in 0..groups {
                let (mn, mx) = match layer_range {
                    Some(range) => range,
                    None => min_max(&w[r * cols + g * group_size..r * cols + (g + 1) * group_size]),
                };
                for (grid, &scalar) in grids.iter_mut().zip(scalars) {
                    let (d, l) = if cfg.sym {
                        sym_range(mn, mx, cfg.bits, levels_m1, scalar)
                    } else {
                        asym_range(mn, mx, levels_m1, scalar)
                    };
                    grid.delta.push(cfg.scale_dtype.round(d));
                    grid.lo.push(l);
                }
            }
        }
        grids
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numeric::grid::*;

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

    /// The cast-based ceiling gives the code of the plain formula on every kind of value:
    /// integers and halves (ties), tiny and huge quotients, both signs, infinities and NaN.
    #[test]
    fn the_nearest_code_is_the_plain_ceiling_formula() {
        fn plain(target: f32, delta: f32, lo: i32, levels: i32) -> i32 {
            let k = (target / delta - 0.5).ceil();
            let k = k.max(lo as f32).min((lo + levels - 1) as f32);
            if k.is_nan() {
                lo
            } else {
                k as i32
            }
        }
        let mut targets = vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-45,
            8388608.0,
            -8388609.0,
            3e9,
            -3e9,
            f32::MAX,
            f32::MIN,
        ];
        let mut rng = crate::util::rng::SplitMix::new(3);
        for i in -600..=600 {
            targets.push(i as f32 * 0.25);
            targets.push(f32::from_bits((i as f32 * 0.25).to_bits().wrapping_add(1)));
            targets.push(f32::from_bits((i as f32 * 0.25).to_bits().wrapping_sub(1)));
        }
        for _ in 0..20000 {
            targets.push(f32::from_bits(rng.next_u64() as u32));
        }
        for &(delta, lo, levels) in &[
            (1.0f32, -8, 16),
            (0.37, -8, 16),
            (3.0e-3, 0, 16),
            (0.5, -2, 4),
            (1e-30, -128, 256),
            (7.5e20, 3, 8),
        ] {
            for &t in &targets {
                assert_eq!(
                    nearest_code(t, delta, lo, levels),
                    plain(t, delta, lo, levels),
                    "target {t:e} ({:#x}), delta {delta:e}, lo {lo}, levels {levels}",
                    t.to_bits()
                );
            }
        }
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

    /// One pass at several shrinks gives `Grid::build`'s grid at each, bit for bit: per row
    /// and per group, symmetric or not, f16 and bf16 scales, constant and all-zero rows.
    #[test]
    fn grids_at_several_shrinks_are_the_grids_built_one_by_one() {
        let (rows, cols) = (7, 24);
        let mut rng = crate::util::rng::SplitMix::new(5);
        let mut w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.uniform() as f32 - 0.4)
            .collect();
        w[..cols].iter_mut().for_each(|v| *v = 0.0);
        w[cols..2 * cols].iter_mut().for_each(|v| *v = -1.5);
        let scalars = [0.5f32, 0.55, 0.9, 1.0];
        for sym in [false, true] {
            for group_size in [None, Some(8)] {
                for scale_dtype in [ScaleDtype::F32, ScaleDtype::F16, ScaleDtype::Bf16] {
                    let c = QuantConfig {
                        group_size,
                        scale_dtype,
                        ..cfg(3, sym)
                    };
                    let all = Grid::build_shrinks(&w, rows, cols, &c, &scalars);
                    for (g, &scalar) in all.iter().zip(&scalars) {
                        let one = Grid::build(
                            &w,
                            rows,
                            cols,
                            &QuantConfig {
                                scalar,
                                ..c.clone()
                            },
                        );
                        assert_eq!(g, &one, "scalar {scalar}, sym {sym}, groups {group_size:?}");
                    }
                }
            }
        }
    }
}
