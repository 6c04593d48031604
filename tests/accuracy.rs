//! The accuracy options: GPTQ-style start, damping, the validation-guarded search, and their
//! GPU kernels against the CPU twins.

mod common;

use common::{correlated_x, gram_of, Rng};
use comq_gpu::device::{AnyDevice, CpuDevice};
use comq_gpu::quant::comq::quantize_layer_stages;
use comq_gpu::quant::gptq;
use comq_gpu::quant::search::{search, search_by, ChooseBy, SearchPlan, AUTO_SCALARS};
use comq_gpu::quant::{quantize_layer, Gram, Init, QuantConfig, QuantizedLayer};

#[path = "common/gpu.rs"]
mod gpu;

/// GPU vs CPU GPTQ pass: share of codes that may differ (f32 sums in another order flip codes
/// that sit on a rounding boundary).
const GPTQ_CODE_DISAGREEMENT_MAX: f64 = 5e-3;
/// GPU vs CPU: relative difference of the final calibration error.
const ERROR_REL_TOL: f64 = 2e-3;
/// The damping correction `eᵀHe − λ'‖e‖²` vs `eᵀGe` computed directly.
const UNDAMP_REL_TOL: f64 = 1e-6;

fn layer(seed: u64, rows: usize, cols: usize, samples: usize) -> (Vec<f32>, Gram) {
    let mut rng = Rng::new(seed);
    let w: Vec<f32> = rng.normals(rows * cols).iter().map(|v| v * 0.05).collect();
    let x = correlated_x(&mut rng, samples, cols);
    (w, gram_of(&x, samples, cols))
}

/// `Σ_i e_iᵀ G e_i / Σ_i w_iᵀ G w_i` in f64, straight from the definition.
fn rel_error(w: &[f32], q: &QuantizedLayer, g: &Gram) -> f64 {
    let (n, deq) = (g.n, q.dequantize());
    let quad = |v: &dyn Fn(usize) -> f64| -> f64 {
        let mut s = 0.0;
        for r in 0..q.rows {
            for a in 0..n {
                let va = v(r * n + a);
                if va == 0.0 {
                    continue;
                }
                for b in 0..n {
                    s += va * g.data[a * n + b] * v(r * n + b);
                }
            }
        }
        s
    };
    quad(&|t| w[t] as f64 - deq[t] as f64) / quad(&|t| w[t] as f64)
}

/// GPTQ as first written (OBQ): after each input is fixed, the remaining weights move by
/// `−e·H⁻¹[t, rest]/H⁻¹[t, t]` and `t` is eliminated from `H⁻¹` — in f64, with no Cholesky.
fn obq_codes(w: &[f32], rows: usize, n: usize, h: &Gram, grid: &comq_gpu::quant::Grid) -> Vec<i32> {
    // Invert H by Gauss-Jordan.
    let mut a = h.data.clone();
    let mut inv: Vec<f64> = (0..n * n)
        .map(|t| if t / n == t % n { 1.0 } else { 0.0 })
        .collect();
    for c in 0..n {
        let p = a[c * n + c];
        for k in 0..n {
            a[c * n + k] /= p;
            inv[c * n + k] /= p;
        }
        for r in 0..n {
            if r != c {
                let f = a[r * n + c];
                for k in 0..n {
                    a[r * n + k] -= f * a[c * n + k];
                    inv[r * n + k] -= f * inv[c * n + k];
                }
            }
        }
    }
    let mut codes = vec![0i32; rows * n];
    for r in 0..rows {
        let mut x: Vec<f64> = w[r * n..(r + 1) * n].iter().map(|&v| v as f64).collect();
        let mut hi = inv.clone();
        for t in 0..n {
            let slot = grid.slot(r, t);
            let k = grid.nearest(slot, x[t] as f32);
            codes[r * n + t] = k;
            let e = (x[t] - grid.value(slot, k) as f64) / hi[t * n + t];
            for s in t + 1..n {
                x[s] -= e * hi[t * n + s];
            }
            // Eliminate t: H⁻¹ ← H⁻¹ − H⁻¹[:, t]·H⁻¹[t, :] / H⁻¹[t, t].
            let d = hi[t * n + t];
            let col: Vec<f64> = (0..n).map(|i| hi[i * n + t]).collect();
            for i in 0..n {
                for j in 0..n {
                    hi[i * n + j] -= col[i] * col[j] / d;
                }
            }
        }
    }
    codes
}

#[test]
fn the_gptq_pass_matches_the_original_obq_updates() {
    for (seed, rows, cols, group) in [(1u64, 6usize, 40usize, None), (2, 5, 64, Some(16))] {
        let (w, g) = layer(seed, rows, cols, 4 * cols);
        let cfg = QuantConfig {
            bits: 3,
            group_size: group,
            init: Init::Gptq,
            sweeps: 0,
            damp: 0.01,
            act_order: false,
            ..QuantConfig::default()
        };
        let h = g.damped(cfg.damp);
        let grid = comq_gpu::quant::Grid::build(&w, rows, cols, &cfg);
        let want = obq_codes(&w, rows, cols, &h, &grid);
        let got = quantize_layer(&CpuDevice::new(), "t", &w, rows, cols, &g, &cfg).unwrap();
        let differ = want
            .iter()
            .zip(&got.layer.codes)
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            differ as f64 <= 0.01 * want.len() as f64,
            "{differ} of {} codes differ from the OBQ reference",
            want.len()
        );
    }
}

#[test]
fn without_correlations_gptq_is_round_to_nearest() {
    let (rows, cols) = (7, 33);
    let mut rng = Rng::new(5);
    let w: Vec<f32> = rng.normals(rows * cols);
    let diag: Vec<f64> = (0..cols).map(|j| 1.0 + j as f64).collect();
    let mut data = vec![0.0; cols * cols];
    for j in 0..cols {
        data[j * cols + j] = diag[j];
    }
    let g = Gram::from_matrix(cols, data);
    for act_order in [false, true] {
        let cfg = |init, method| QuantConfig {
            init,
            method,
            sweeps: 0,
            act_order,
            ..QuantConfig::default()
        };
        let dev = CpuDevice::new();
        let a = quantize_layer(
            &dev,
            "t",
            &w,
            rows,
            cols,
            &g,
            &cfg(Init::Gptq, comq_gpu::quant::Method::Comq),
        )
        .unwrap();
        let b = quantize_layer(
            &dev,
            "t",
            &w,
            rows,
            cols,
            &g,
            &cfg(Init::W, comq_gpu::quant::Method::Rtn),
        )
        .unwrap();
        assert_eq!(a.layer.codes, b.layer.codes);
    }
}

#[test]
fn starts_beat_rtn_and_sweeps_never_raise_the_damped_objective() {
    let (rows, cols) = (24, 96);
    let (w, g) = layer(11, rows, cols, 300);
    for init in [Init::Rtn, Init::Gptq] {
        for damp in [0.0f32, 0.01, 0.1] {
            let cfg = QuantConfig {
                bits: 3,
                init,
                damp,
                sweeps: 3,
                ..QuantConfig::default()
            };
            let (o, stages) =
                quantize_layer_stages(&CpuDevice::new(), "t", &w, rows, cols, &g, &cfg, true)
                    .unwrap();
            assert_eq!(stages.len(), 4, "start and three sweeps");
            let start = o.rel_error_start.expect("a start");
            assert_eq!(start, stages[0].rel_error);
            if init == Init::Gptq {
                assert!(
                    start < o.rel_error_rtn,
                    "GPTQ start {start} vs RTN {} (damp {damp})",
                    o.rel_error_rtn
                );
            }
            for pair in o.history.windows(2) {
                assert!(
                    pair[1] <= pair[0] * (1.0 + 1e-6),
                    "{init:?} d{damp}: {pair:?}"
                );
            }
            for st in &stages {
                assert!(st.layer.codes.iter().enumerate().all(|(t, &k)| {
                    let s = st.layer.grid.slot(t / cols, t % cols);
                    k >= st.layer.grid.lo[s] && k < st.layer.grid.lo[s] + st.layer.grid.levels()
                }));
            }
            // Every reported error is on the undamped Gram, whatever the damping.
            let direct = rel_error(&w, &o.layer, &g);
            assert!(
                (o.rel_error - direct).abs() <= UNDAMP_REL_TOL * direct,
                "{init:?} d{damp}: reported {} vs direct {direct}",
                o.rel_error
            );
            assert_eq!(stages.last().unwrap().layer.codes, o.layer.codes);
        }
    }
}

#[test]
fn damping_zero_reproduces_the_reference_recipe() {
    let (rows, cols) = (16, 48);
    let (w, g) = layer(3, rows, cols, 200);
    let dev = CpuDevice::new();
    let base = QuantConfig::default();
    let a = quantize_layer(&dev, "t", &w, rows, cols, &g, &base).unwrap();
    let b = quantize_layer(
        &dev,
        "t",
        &w,
        rows,
        cols,
        &g,
        &QuantConfig {
            act_order: false,
            init: Init::W,
            damp: 0.0,
            ..base.clone()
        },
    )
    .unwrap();
    assert_eq!(a.layer.codes, b.layer.codes);
    assert_eq!(a.rel_error, b.rel_error);
    assert_eq!(a.history, b.history);
}

/// A search handed the factors built ahead (`prefactor`) runs the very candidates a search
/// without them runs: the same scores to the last bit and the same shipped codes, every GPTQ
/// start finding its factor ready (both dampings), and no factor when the Gram differs.
#[test]
fn a_search_with_factors_built_ahead_equals_one_without() {
    use comq_gpu::quant::prefactor::FactorCache;
    use comq_gpu::quant::search::search_with;
    let (rows, cols) = (24, 48);
    let mut rng = Rng::new(23);
    let w: Vec<f32> = rng.normals(rows * cols).iter().map(|v| v * 0.05).collect();
    let x = correlated_x(&mut rng, 90, cols);
    let cal = gram_of(&x[..60 * cols], 60, cols);
    let held = gram_of(&x[60 * cols..], 30, cols);
    let cfg = QuantConfig {
        bits: 3,
        init: Init::Gptq,
        damp: 0.01,
        ..QuantConfig::default()
    };
    let plan = SearchPlan::quick(3, vec![0.1], 0.0);
    let dev = CpuDevice::new();
    let plain = search(&dev, "t", &w, rows, cols, &cal, Some(&held), &cfg, &plan).unwrap();
    let cache = FactorCache::default();
    cache.build(0, &cal, &[0.01, 0.1], true).unwrap();
    let ahead = search_with(
        &dev,
        "t",
        &w,
        rows,
        cols,
        &cal,
        Some(&held),
        &cfg,
        &plan,
        Some(&cache),
    )
    .unwrap();
    assert_eq!(plain.chosen, ahead.chosen);
    assert_eq!(plain.outcome.layer.codes, ahead.outcome.layer.codes);
    assert_eq!(plain.tried.len(), ahead.tried.len());
    for (a, b) in plain.tried.iter().zip(&ahead.tried) {
        assert_eq!(a.label, b.label);
        assert_eq!(a.rel_error.to_bits(), b.rel_error.to_bits(), "{}", a.label);
        assert_eq!(a.score.to_bits(), b.score.to_bits(), "{}", a.label);
    }
    // Both dampings' preparations found their factor (the first and the one built beside).
    assert_eq!(cache.counts(), (2, 2));
    // Another Gram of the same width finds nothing.
    let other = gram_of(&x[30 * cols..], 60, cols);
    search_with(
        &dev,
        "t",
        &w,
        rows,
        cols,
        &other,
        Some(&held),
        &cfg,
        &plan,
        Some(&cache),
    )
    .unwrap();
    assert_eq!(cache.counts(), (2, 2));
}

#[test]
fn the_search_ships_the_best_held_out_candidate_and_never_loses_to_rtn() {
    let (rows, cols) = (20, 64);
    let mut rng = Rng::new(21);
    let w: Vec<f32> = rng.normals(rows * cols).iter().map(|v| v * 0.05).collect();
    // Few calibration rows: the regime where undamped descent overfits.
    let x = correlated_x(&mut rng, 80, cols);
    let cal = gram_of(&x[..50 * cols], 50, cols);
    let held = gram_of(&x[50 * cols..], 30, cols);
    let cfg = QuantConfig {
        bits: 3,
        init: Init::Gptq,
        damp: 0.01,
        ..QuantConfig::default()
    };
    let plan = common::full_plan(0.0);
    let dev = CpuDevice::new();
    let c = search(&dev, "t", &w, rows, cols, &cal, Some(&held), &cfg, &plan).unwrap();
    // RTN at 1.0, paper, then per scalar: RTN (not at 1.0), GPTQ start, GPTQ + 1 sweep (more
    // scalars while the smallest is best); then the other damping's start and sweep at the best
    // scalar.
    let scalars = 1 + (c.tried.len() - 2 - 4 - 2 * AUTO_SCALARS.len() - 2) / 3;
    assert_eq!(
        c.tried.len(),
        2 + 4 + 2 * AUTO_SCALARS.len() + 3 * (scalars - 1) + 2
    );
    let gptq_best = |from: usize, to: usize| {
        c.tried[from..to]
            .iter()
            .filter(|t| t.label.starts_with("gptq"))
            .min_by(|a, b| {
                a.rel_error_holdout
                    .unwrap()
                    .total_cmp(&b.rel_error_holdout.unwrap())
            })
            .map(|t| t.label.split(' ').nth(1).unwrap().to_string())
            .unwrap()
    };
    if scalars > 1 {
        // The line search stopped at a shrink that is not the smallest tried, or at the floor.
        let lowest = c.tried[c.tried.len() - 5]
            .label
            .split(' ')
            .nth(1)
            .unwrap()
            .to_string();
        assert!(gptq_best(2, c.tried.len() - 2) != lowest || lowest == "s0.50");
    }
    let last = &c.tried[c.tried.len() - 1].label;
    assert!(last.ends_with("d0.1"), "{last}");
    let best_scalar = gptq_best(2, c.tried.len() - 2);
    assert!(last.contains(&best_scalar), "{last} vs {best_scalar}");
    let best = c
        .tried
        .iter()
        .map(|t| t.rel_error_holdout.unwrap())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(c.rel_error_holdout, Some(best));
    assert!(best <= c.rel_error_holdout_rtn.unwrap());
    // The shipped codes really have the held-out error reported for them.
    let direct = rel_error(&w, &c.outcome.layer, &held);
    assert!((direct - best).abs() <= 1e-4 * best, "{direct} vs {best}");
    let direct_cal = rel_error(&w, &c.outcome.layer, &cal);
    assert!((direct_cal - c.outcome.rel_error).abs() <= 1e-4 * direct_cal);
    // Without a held-out Gram the calibration error decides.
    let c2 = search(&dev, "t", &w, rows, cols, &cal, None, &cfg, &plan).unwrap();
    let best_cal = c2
        .tried
        .iter()
        .map(|t| t.rel_error)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(c2.outcome.rel_error, best_cal);
}

#[test]
fn a_singular_gram_still_gets_a_gptq_start() {
    // Rank-deficient: 10 samples for 32 inputs, and one dead input.
    let (rows, cols) = (4, 32);
    let mut rng = Rng::new(8);
    let w: Vec<f32> = rng.normals(rows * cols);
    let mut x = correlated_x(&mut rng, 10, cols);
    for r in 0..10 {
        x[r * cols + 5] = 0.0;
    }
    let g = gram_of(&x, 10, cols);
    let cfg = QuantConfig {
        init: Init::Gptq,
        damp: 0.0,
        sweeps: 1,
        ..QuantConfig::default()
    };
    let o = quantize_layer(&CpuDevice::new(), "t", &w, rows, cols, &g, &cfg).unwrap();
    assert!(o.rel_error.is_finite() && o.rel_error <= o.rel_error_rtn);
    let f = gptq::factor(&g, true, g.dead_threshold() as f64).unwrap();
    assert!(f.u.iter().all(|v| v.is_finite()));
}

#[test]
fn gpu_gptq_and_search_match_the_cpu() {
    let Some(gpu) = gpu::device() else { return };
    let gpu = AnyDevice::Wgpu(Box::new(gpu));
    let cpu = AnyDevice::Cpu(CpuDevice::new());
    for (seed, rows, cols, group, act_order) in [
        (31u64, 17usize, 72usize, None, true),
        (32, 40, 128, Some(32), false),
        (33, 9, 300, None, true),
    ] {
        let (w, g) = layer(seed, rows, cols, 2 * cols);
        let cfg = QuantConfig {
            bits: 4,
            group_size: group,
            init: Init::Gptq,
            damp: 0.01,
            act_order,
            sweeps: 0,
            ..QuantConfig::default()
        };
        let a = cpu.quantize_layer("t", &w, rows, cols, &g, &cfg).unwrap();
        let b = gpu.quantize_layer("t", &w, rows, cols, &g, &cfg).unwrap();
        let differ = a
            .layer
            .codes
            .iter()
            .zip(&b.layer.codes)
            .filter(|(x, y)| x != y)
            .count();
        assert!(
            differ as f64 <= GPTQ_CODE_DISAGREEMENT_MAX * a.layer.codes.len() as f64,
            "{rows}x{cols}: {differ} codes differ"
        );
        assert!(
            (a.rel_error - b.rel_error).abs() <= ERROR_REL_TOL * a.rel_error,
            "{rows}x{cols}: CPU {} vs GPU {}",
            a.rel_error,
            b.rel_error
        );
        // The whole search, held-out scoring through load_codes included.
        let held = layer(seed + 100, rows, cols, cols).1;
        let plan = SearchPlan {
            scalars: vec![1.0, 0.9],
            line_search: true,
            paper: true,
            rtn_scalars: true,
            damps: vec![0.1],
            score_damp: 0.0,
        };
        let cfg = QuantConfig { sweeps: 1, ..cfg };
        let ca = cpu
            .search("t", &w, rows, cols, &g, Some(&held), &cfg, &plan)
            .unwrap();
        let cb = gpu
            .search("t", &w, rows, cols, &g, Some(&held), &cfg, &plan)
            .unwrap();
        assert_eq!(ca.tried.len(), cb.tried.len());
        for (x, y) in ca.tried.iter().zip(&cb.tried) {
            assert_eq!(x.label, y.label);
            let (hx, hy) = (x.rel_error_holdout.unwrap(), y.rel_error_holdout.unwrap());
            assert!(
                (hx - hy).abs() <= ERROR_REL_TOL * hx,
                "{}: held-out CPU {hx} vs GPU {hy}",
                x.label
            );
        }
    }
}

/// The row-by-row choice on the GPU against the CPU's: the same candidates, held-out and
/// calibration errors within the GPU tolerance, and the GPU's reported errors are its shipped
/// codes' own (the rows it copied and restored are the rows it scored).
#[test]
fn gpu_row_choice_matches_the_cpu() {
    let Some(gpu) = gpu::device() else { return };
    let cpu = CpuDevice::new();
    let mut mixed = false;
    for (seed, rows, cols, group) in [(41u64, 33usize, 96usize, None), (42, 20, 128, Some(32))] {
        let (w, g) = layer(seed, rows, cols, 2 * cols);
        let held = layer(seed + 100, rows, cols, cols).1;
        let cfg = QuantConfig {
            bits: 3,
            group_size: group,
            init: Init::Gptq,
            damp: 0.01,
            ..QuantConfig::default()
        };
        let plan = SearchPlan::quick(3, vec![0.1], 0.1);
        let row = ChooseBy::Row;
        let a = search_by(
            &cpu,
            "t",
            &w,
            rows,
            cols,
            &g,
            Some(&held),
            &cfg,
            &plan,
            None,
            row,
        )
        .unwrap();
        let b = search_by(
            &gpu,
            "t",
            &w,
            rows,
            cols,
            &g,
            Some(&held),
            &cfg,
            &plan,
            None,
            row,
        )
        .unwrap();
        // The candidates, without the mix (its label counts rows, which may differ).
        let labels = |c: &comq_gpu::quant::search::Choice| {
            c.tried
                .iter()
                .map(|t| t.label.clone())
                .filter(|l| !l.starts_with("rows: "))
                .collect::<Vec<_>>()
        };
        assert_eq!(labels(&a), labels(&b));
        let (ha, hb) = (a.rel_error_holdout.unwrap(), b.rel_error_holdout.unwrap());
        assert!(
            (ha - hb).abs() <= ERROR_REL_TOL * ha,
            "held-out CPU {ha} vs GPU {hb}"
        );
        let (ea, eb) = (a.outcome.rel_error, b.outcome.rel_error);
        assert!(
            (ea - eb).abs() <= 10.0 * ERROR_REL_TOL * ea,
            "calibration CPU {ea} vs GPU {eb}"
        );
        let direct = rel_error(&w, &b.outcome.layer, &held);
        assert!((direct - hb).abs() <= 1e-4 * direct, "{direct} vs {hb}");
        let direct = rel_error(&w, &b.outcome.layer, &g);
        assert!((direct - eb).abs() <= 1e-4 * direct, "{direct} vs {eb}");
        for c in [&a, &b] {
            if !c.rows_from.is_empty() {
                assert_eq!(c.rows_from.iter().map(|r| r.1).sum::<usize>(), rows);
            }
        }
        // At least one of these layers mixes candidates on the GPU, so the copies and the
        // restore are exercised.
        mixed |= !b.rows_from.is_empty();
    }
    assert!(mixed, "no layer mixed candidates on the GPU");
}

/// The configuration and stage a search label names (`rtn s0.90`, `comq+1 s1.00`, `gptq s0.85
/// d0.01`, `gptq+1 s0.85 d0.1`), around the searched configuration `cfg`.
fn config_of(label: &str, cfg: &QuantConfig) -> (QuantConfig, usize) {
    let parts: Vec<&str> = label.split(' ').collect();
    let scalar: f32 = parts[1][1..].parse().unwrap();
    let damp: f32 = parts.get(2).map(|d| d[1..].parse().unwrap()).unwrap_or(0.0);
    let (start, sweeps) = match parts[0].split_once('+') {
        Some((s, k)) => (s, k.parse().unwrap()),
        None => (parts[0], 0),
    };
    let c = match start {
        "rtn" => QuantConfig {
            method: comq_gpu::quant::Method::Rtn,
            scalar,
            ..cfg.clone()
        },
        "comq" => QuantConfig {
            init: Init::W,
            damp: 0.0,
            scalar,
            sweeps: 1,
            order: comq_gpu::quant::OrderKind::Greedy,
            ..cfg.clone()
        },
        _ => QuantConfig {
            scalar,
            damp,
            ..cfg.clone()
        },
    };
    (c, sweeps)
}

/// The resident search (one upload per layer, grids and dampings switched in place, stages
/// scored and kept on the device) against lone runs of each candidate, each uploaded afresh:
/// every candidate's calibration error is the lone run's to the last bit, its held-out error is
/// the definition's, and the shipped codes are the lone run's codes of the chosen candidate.
#[test]
fn the_resident_search_equals_lone_runs_candidate_by_candidate() {
    let (rows, cols) = (24, 96);
    let mut rng = Rng::new(77);
    let w: Vec<f32> = rng.normals(rows * cols).iter().map(|v| v * 0.05).collect();
    let x = correlated_x(&mut rng, 200, cols);
    let cal = gram_of(&x[..150 * cols], 150, cols);
    let held = gram_of(&x[150 * cols..], 50, cols);
    for bits in [3, 4] {
        let cfg = QuantConfig {
            bits,
            init: Init::Gptq,
            damp: 0.01,
            ..QuantConfig::default()
        };
        let plan = common::full_plan(0.0);
        let dev = CpuDevice::new();
        let c = search(&dev, "t", &w, rows, cols, &cal, Some(&held), &cfg, &plan).unwrap();
        let mut shipped = None;
        for t in &c.tried {
            let (lc, sweeps) = config_of(&t.label, &cfg);
            let (o, stages) =
                quantize_layer_stages(&dev, "t", &w, rows, cols, &cal, &lc, true).unwrap();
            let layer = match stages.into_iter().find(|s| s.sweeps == sweeps) {
                Some(s) => {
                    assert_eq!(s.rel_error, t.rel_error, "{}", t.label);
                    s.layer
                }
                None => {
                    assert_eq!(o.rel_error, t.rel_error, "{}", t.label);
                    o.layer
                }
            };
            // The definition dequantizes in f64; the device scores `Q̂ = Δ·k` rounded to f32.
            let h = rel_error(&w, &layer, &held);
            let th = t.rel_error_holdout.unwrap();
            assert!((h - th).abs() <= 1e-6 * h, "{}: {h} vs {th}", t.label);
            if t.label == c.chosen {
                shipped = Some(layer);
            }
        }
        let shipped = shipped.expect("the chosen label was tried");
        assert_eq!(
            c.outcome.layer.codes, shipped.codes,
            "W{bits}: {}",
            c.chosen
        );
        assert_eq!(c.outcome.layer.grid.delta, shipped.grid.delta);
        assert!(c.tried.len() >= 12, "{}", c.tried.len());
    }
}

/// `Σ_a Σ_b e_a G_ab e_b` for one row `e = w − q̂`, in f64.
fn row_loss(w: &[f32], deq: &[f32], g: &Gram) -> f64 {
    let n = g.n;
    let e: Vec<f64> = w
        .iter()
        .zip(deq)
        .map(|(&a, &b)| a as f64 - b as f64)
        .collect();
    (0..n)
        .map(|a| e[a] * (0..n).map(|b| g.data[a * n + b] * e[b]).sum::<f64>())
        .sum()
}

/// The row-by-row choice against its definition: every candidate reproduced by a lone run,
/// each row's held-out loss computed from the codes, and each shipped row is the one of the
/// first candidate with the lowest loss for that row (codes, steps, lowest codes). So no row is
/// worse than RTN's on the held-out Gram, the layer's held-out error is at most the layer
/// choice's, and the reported errors are the shipped codes' own.
#[test]
fn the_row_choice_ships_each_row_from_its_best_held_out_candidate() {
    let (rows, cols) = (24, 96);
    let mut rng = Rng::new(78);
    let w: Vec<f32> = rng.normals(rows * cols).iter().map(|v| v * 0.05).collect();
    let x = correlated_x(&mut rng, 200, cols);
    let cal = gram_of(&x[..150 * cols], 150, cols);
    let held = gram_of(&x[150 * cols..], 50, cols);
    let dev = CpuDevice::new();
    for (bits, group) in [(3, None), (2, Some(32))] {
        let cfg = QuantConfig {
            bits,
            group_size: group,
            init: Init::Gptq,
            damp: 0.01,
            ..QuantConfig::default()
        };
        let plan = SearchPlan::quick(bits, vec![0.1], 0.1);
        let by_layer = search_by(
            &dev,
            "t",
            &w,
            rows,
            cols,
            &cal,
            Some(&held),
            &cfg,
            &plan,
            None,
            ChooseBy::Layer,
        )
        .unwrap();
        let c = search_by(
            &dev,
            "t",
            &w,
            rows,
            cols,
            &cal,
            Some(&held),
            &cfg,
            &plan,
            None,
            ChooseBy::Row,
        )
        .unwrap();
        // The same candidates are tried, and the mix is listed last as a candidate of its own:
        // the shipped quantization has the lowest held-out error of the list.
        let (mix, tried) = c.tried.split_last().unwrap();
        assert_eq!(
            tried.iter().map(|t| &t.label).collect::<Vec<_>>(),
            by_layer.tried.iter().map(|t| &t.label).collect::<Vec<_>>(),
        );
        assert_eq!(mix.label, c.chosen);
        assert_eq!(mix.rel_error_holdout, c.rel_error_holdout);
        assert_eq!(mix.rel_error, c.outcome.rel_error);
        let lowest = c.tried.iter().map(|t| t.rel_error_holdout.unwrap());
        assert_eq!(
            lowest.fold(f64::INFINITY, f64::min),
            mix.rel_error_holdout.unwrap()
        );
        let lone: Vec<QuantizedLayer> = tried
            .iter()
            .map(|t| {
                let (lc, sweeps) = config_of(&t.label, &cfg);
                let (o, stages) =
                    quantize_layer_stages(&dev, "t", &w, rows, cols, &cal, &lc, true).unwrap();
                match stages.into_iter().find(|s| s.sweeps == sweeps) {
                    Some(s) => s.layer,
                    None => o.layer,
                }
            })
            .collect();
        let deq: Vec<Vec<f32>> = lone.iter().map(|l| l.dequantize()).collect();
        let shipped = &c.outcome.layer;
        let ng = shipped.grid.groups();
        let mut from = std::collections::BTreeMap::new();
        for r in 0..rows {
            let row = r * cols..(r + 1) * cols;
            let losses: Vec<f64> = deq
                .iter()
                .map(|d| row_loss(&w[row.clone()], &d[row.clone()], &held))
                .collect();
            // Scores within f32 rounding of each other may go either way.
            let best = losses.iter().cloned().fold(f64::INFINITY, f64::min);
            let near: Vec<usize> = (0..losses.len())
                .filter(|&i| losses[i] <= best * (1.0 + 1e-6))
                .collect();
            let k = near
                .iter()
                .copied()
                .find(|&i| lone[i].codes[row.clone()] == shipped.codes[row.clone()])
                .unwrap_or_else(|| panic!("W{bits} row {r}: from none of {near:?}"));
            let slots = r * ng..(r + 1) * ng;
            assert_eq!(
                shipped.grid.delta[slots.clone()],
                lone[k].grid.delta[slots.clone()]
            );
            assert_eq!(shipped.grid.lo[slots.clone()], lone[k].grid.lo[slots]);
            assert!(
                losses[k] <= losses[0] * (1.0 + 1e-6),
                "row {r} worse than RTN"
            );
            *from.entry(tried[k].label.clone()).or_insert(0usize) += 1;
        }
        let held_err = rel_error(&w, shipped, &held);
        let reported = c.rel_error_holdout.unwrap();
        assert!(
            (held_err - reported).abs() <= 1e-6 * held_err,
            "{held_err} vs {reported}"
        );
        assert!(reported <= by_layer.rel_error_holdout.unwrap() * (1.0 + 1e-9));
        let cal_err = rel_error(&w, shipped, &cal);
        let r = c.outcome.rel_error;
        assert!((cal_err - r).abs() <= 1e-6 * cal_err, "{cal_err} vs {r}");
        // On this layer the rows do come from several candidates, and the report says which.
        assert!(from.len() > 1, "W{bits}: {from:?}");
        assert_eq!(c.rows_from.iter().map(|r| r.1).sum::<usize>(), rows);
        assert!(c.chosen.starts_with("rows: "), "{}", c.chosen);
        // Without held-out images there is nothing to choose rows on: the layer's choice.
        let a = search_by(
            &dev,
            "t",
            &w,
            rows,
            cols,
            &cal,
            None,
            &cfg,
            &plan,
            None,
            ChooseBy::Row,
        )
        .unwrap();
        let b = search(&dev, "t", &w, rows, cols, &cal, None, &cfg, &plan).unwrap();
        assert_eq!(a.outcome.layer.codes, b.outcome.layer.codes);
        assert!(a.rows_from.is_empty());
    }
    // One scale for the whole layer: rows from candidates with other scales would break it, so
    // the layer ships one candidate whole.
    let cfg = QuantConfig {
        bits: 3,
        init: Init::Gptq,
        damp: 0.01,
        granularity: comq_gpu::quant::Granularity::Layer,
        ..QuantConfig::default()
    };
    let plan = SearchPlan::quick(3, vec![0.1], 0.1);
    let c = search_by(
        &dev,
        "t",
        &w,
        rows,
        cols,
        &cal,
        Some(&held),
        &cfg,
        &plan,
        None,
        ChooseBy::Row,
    )
    .unwrap();
    assert!(c.rows_from.is_empty());
    let d = &c.outcome.layer.grid.delta;
    assert!(d.iter().all(|&x| x == d[0]), "one scale for the layer");
}

/// Without held-out images, `--score-damp λ` compares candidates on the calibration error plus
/// `λ·mean(diag G)·‖W − Q̂‖² / ‖X·Wᵀ‖²`: the shipped candidate has the lowest such score, its
/// score is that sum for its codes, and charging more for the distance from `W` never ships
/// codes further from `W`.
#[test]
fn without_held_out_images_the_score_damping_charges_for_the_distance_from_w() {
    let (rows, cols) = (20, 64);
    let mut rng = Rng::new(23);
    let w: Vec<f32> = rng.normals(rows * cols).iter().map(|v| v * 0.05).collect();
    let x = correlated_x(&mut rng, 50, cols);
    let cal = gram_of(&x, 50, cols);
    let cfg = QuantConfig {
        bits: 3,
        init: Init::Gptq,
        damp: 0.01,
        ..QuantConfig::default()
    };
    let dev = CpuDevice::new();
    let energy: f64 = (0..rows)
        .map(|r| {
            let wr = &w[r * cols..(r + 1) * cols];
            (0..cols)
                .map(|a| {
                    (0..cols)
                        .map(|b| wr[a] as f64 * cal.data[a * cols + b] * wr[b] as f64)
                        .sum::<f64>()
                })
                .sum::<f64>()
        })
        .sum();
    let distance = |q: &QuantizedLayer| -> f64 {
        w.iter()
            .zip(q.dequantize())
            .map(|(a, b)| (*a as f64 - b as f64).powi(2))
            .sum()
    };
    let mut last = f64::INFINITY;
    for lambda in [0.0f32, 0.1, 1.0, 100.0] {
        let plan = common::full_plan(lambda);
        let c = search(&dev, "t", &w, rows, cols, &cal, None, &cfg, &plan).unwrap();
        let best = c
            .tried
            .iter()
            .map(|t| t.score)
            .fold(f64::INFINITY, f64::min);
        let chosen = c.tried.iter().find(|t| t.label == c.chosen).unwrap();
        assert_eq!(chosen.score, best, "λ = {lambda}");
        let d = distance(&c.outcome.layer);
        let want = c.outcome.rel_error + cal.damping(lambda) * d / energy;
        assert!(
            (chosen.score - want).abs() <= 1e-6 * want,
            "{} vs {want}",
            chosen.score
        );
        assert!(
            d <= last * (1.0 + 1e-9),
            "λ = {lambda}: ‖W − Q̂‖² {d} > {last}"
        );
        last = d;
    }
}

/// The sweep and the GPTQ pass keep a row's state in workgroup memory up to 4096 inputs and in
/// storage beyond: the storage variants (forced here on small layers) choose the very same codes
/// as the workgroup-memory ones, with sweeps after a GPTQ start, per channel and per group.
#[test]
fn the_storage_and_workgroup_memory_kernels_choose_the_same_codes() {
    let Some(shared) = gpu::device() else { return };
    let Some(mut storage) = gpu::device() else {
        return;
    };
    storage.cap_shared_cols(0);
    let (shared, storage) = (
        AnyDevice::Wgpu(Box::new(shared)),
        AnyDevice::Wgpu(Box::new(storage)),
    );
    for (seed, rows, cols, group) in [(41u64, 13usize, 96usize, None), (42, 7, 160, Some(32))] {
        let (w, g) = layer(seed, rows, cols, 2 * cols);
        let cfg = QuantConfig {
            bits: 3,
            group_size: group,
            init: Init::Gptq,
            damp: 0.01,
            sweeps: 2,
            ..QuantConfig::default()
        };
        let a = shared
            .quantize_layer("t", &w, rows, cols, &g, &cfg)
            .unwrap();
        let b = storage
            .quantize_layer("t", &w, rows, cols, &g, &cfg)
            .unwrap();
        assert_eq!(a.layer.codes, b.layer.codes, "{rows}x{cols}");
        assert_eq!(a.rel_error, b.rel_error, "{rows}x{cols}");
    }
}

/// The default (quick) search: RTN at scale 1 first, neither RTN at a shrink nor the paper's
/// candidate, a line search over the shrink from `first_scalar(bits)` that ends at a shrink
/// whose neighbours (within 0.5…1) were tried and score no better, then the other damping at
/// that shrink; the shipped candidate has the lowest held-out error of all tried.
/// Per shrink of the configured damping (`d0.01`), the best held-out error of its start and
/// its sweep, in the order the shrinks were first tried.
fn held_out_by_scalar(tried: &[comq_gpu::quant::search::Tried]) -> Vec<(f32, f64)> {
    let mut by_scalar: Vec<(f32, f64)> = Vec::new();
    for t in tried.iter().filter(|t| t.label.ends_with("d0.01")) {
        let s: f32 = t.label.split(' ').nth(1).unwrap()[1..].parse().unwrap();
        let h = t.rel_error_holdout.unwrap();
        match by_scalar.iter_mut().find(|e| e.0 == s) {
            Some(e) => e.1 = e.1.min(h),
            None => by_scalar.push((s, h)),
        }
    }
    by_scalar
}

/// The best shrink of `by_scalar`, checked to have no better neighbour one step either way
/// (within 0.5 … 1, where the line search goes).
fn best_with_no_better_neighbour(by_scalar: &[(f32, f64)], bits: u32) -> f32 {
    use comq_gpu::quant::search::SCALAR_STEP;
    let (best, score) = by_scalar
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    for side in [-SCALAR_STEP, SCALAR_STEP] {
        let s = ((best + side) * 100.0).round() / 100.0;
        if (0.5 - 1e-6..=1.0 + 1e-6).contains(&s) {
            let e = by_scalar.iter().find(|e| e.0 == s);
            assert!(
                e.is_some_and(|e| e.1 >= score),
                "W{bits}: best s{best:.2}, neighbour s{s:.2}: {e:?}"
            );
        }
    }
    best
}

#[test]
fn the_quick_search_walks_the_shrink_to_a_best_with_no_better_neighbour() {
    use comq_gpu::quant::search::first_scalar;
    let (rows, cols) = (24, 64);
    let mut rng = Rng::new(29);
    let w: Vec<f32> = rng.normals(rows * cols).iter().map(|v| v * 0.05).collect();
    let x = correlated_x(&mut rng, 120, cols);
    let cal = gram_of(&x[..80 * cols], 80, cols);
    let held = gram_of(&x[80 * cols..], 40, cols);
    let dev = CpuDevice::new();
    for bits in [2, 3, 4, 5] {
        let cfg = QuantConfig {
            bits,
            init: Init::Gptq,
            damp: 0.01,
            ..QuantConfig::default()
        };
        let plan = SearchPlan::quick(bits, vec![0.1], 0.0);
        let c = search(&dev, "t", &w, rows, cols, &cal, Some(&held), &cfg, &plan).unwrap();
        assert_eq!(c.tried[0].label, "rtn s1.00");
        assert!(c.tried[1..].iter().all(|t| t.label.starts_with("gptq")));
        let by_scalar = held_out_by_scalar(&c.tried);
        assert_eq!(by_scalar[0].0, first_scalar(bits), "W{bits}");
        let best = best_with_no_better_neighbour(&by_scalar, bits);
        let n = c.tried.len();
        let at_best = format!("s{best:.2} d0.1");
        assert!(
            c.tried[n - 2].label.ends_with(&at_best) && c.tried[n - 1].label.ends_with(&at_best)
        );
        let lowest = c
            .tried
            .iter()
            .map(|t| t.rel_error_holdout.unwrap())
            .fold(f64::INFINITY, f64::min);
        assert_eq!(c.rel_error_holdout, Some(lowest));
    }
}

/// The tool's runs start each layer's line search at the shrink whose round-to-nearest error,
/// weighted by the Gram's diagonal, is lowest (checked here by brute force on the same grids),
/// and walk from there to a best with no better neighbour; a plan without a line search, or a
/// layer that points nowhere, keeps its own start.
#[test]
fn a_layer_starts_its_line_search_at_its_weighted_rtn_optimum() {
    use comq_gpu::quant::search::{first_scalar, start_scalar};
    use comq_gpu::quant::Grid;
    let (rows, cols) = (24, 64);
    let mut rng = Rng::new(31);
    // Heavy tails (a few large weights per row) put the optimum well below 1 at every width.
    let w: Vec<f32> = rng
        .normals(rows * cols)
        .iter()
        .map(|v| 0.05 * v * if v.abs() > 2.0 { 3.0 } else { 1.0 })
        .collect();
    let x = correlated_x(&mut rng, 120, cols);
    let cal = gram_of(&x[..80 * cols], 80, cols);
    let held = gram_of(&x[80 * cols..], 40, cols);
    let diag = cal.diag();
    let dev = CpuDevice::new();
    let mut starts = Vec::new();
    for bits in [2, 3, 4] {
        let cfg = QuantConfig {
            bits,
            init: Init::Gptq,
            damp: 0.01,
            ..QuantConfig::default()
        };
        // Brute force: every shrink of the line search, its grid built alone, exact nearest codes.
        let mut best = (f64::INFINITY, 0.0f32);
        for k in (0..=10).rev() {
            let scalar = ((0.5 + 0.05 * k as f32) * 100.0).round() / 100.0;
            let g = Grid::build(
                &w,
                rows,
                cols,
                &QuantConfig {
                    scalar,
                    ..cfg.clone()
                },
            );
            let mut e = 0.0f64;
            for i in 0..rows {
                for j in 0..cols {
                    let v = g.value(i, g.nearest(i, w[i * cols + j]));
                    e += diag[j] * ((w[i * cols + j] - v) as f64).powi(2);
                }
            }
            if e < best.0 {
                best = (e, scalar);
            }
        }
        let start = start_scalar(&w, rows, cols, &cal, &cfg, first_scalar(bits));
        assert_eq!(start, best.1, "W{bits}");
        starts.push(start);
        let quick = SearchPlan::quick(bits, vec![0.1], 0.0);
        let plan = quick.for_layer(&w, rows, cols, &cal, &cfg);
        assert_eq!(plan.scalars, vec![start]);
        let c = search(&dev, "t", &w, rows, cols, &cal, Some(&held), &cfg, &plan).unwrap();
        assert_eq!(
            c.tried[1].label,
            format!("gptq s{start:.2} d0.01"),
            "W{bits}"
        );
        // It walks to a shrink no neighbour beats, as from any start.
        best_with_no_better_neighbour(&held_out_by_scalar(&c.tried), bits);
        // Plans without a line search from one shrink are kept as they are.
        let single = SearchPlan::single(&cfg);
        assert_eq!(*single.for_layer(&w, rows, cols, &cal, &cfg), single);
        let full = common::full_plan(0.0);
        assert_eq!(*full.for_layer(&w, rows, cols, &cal, &cfg), full);
        // A layer that points nowhere starts where the plan does.
        let zero = vec![0.0f32; rows * cols];
        assert_eq!(start_scalar(&zero, rows, cols, &cal, &cfg, 0.85), 0.85);
        // Inputs the search refuses keep the plan (the search names the problem).
        let short = &w[..rows * cols - 1];
        assert_eq!(
            quick.for_layer(short, rows, cols, &cal, &cfg).scalars,
            quick.scalars
        );
    }
    // The start falls with the width on these weights, and is not the fixed per-width start
    // everywhere (which is what it replaces).
    assert!(
        starts[0] <= starts[1] && starts[1] <= starts[2],
        "{starts:?}"
    );
    assert!(
        starts
            .iter()
            .zip([2, 3, 4])
            .any(|(&s, b)| s != first_scalar(b)),
        "{starts:?}"
    );
}
