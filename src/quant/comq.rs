//! The COMQ driver: sequences the device primitives for one layer.
//!
//! Per layer (spec a.3): build the grid and the visiting order on the host, upload, measure the
//! round-to-nearest baseline on the same grid, reset to `Q̂ = W, R = 0`, then run `K` sweeps.
//! After every sweep `R` is recomputed exactly (spec a.8): that removes the drift of the rank-1
//! updates before the next sweep and yields the loss after this one in the same pass. With
//! `--scale-update`, each code sweep is followed by the closed-form scale step (spec a.4/a.5).

use std::time::Instant;

use super::{gptq, Gram, Grid, Init, Method, Order, QuantConfig, QuantizedLayer};
use crate::device::{Device, LayerProblem};
use crate::error::{Error, Result};

/// What quantizing one layer produced.
#[derive(Debug, Clone)]
pub struct LayerOutcome {
    /// The codes and grid of the chosen method.
    pub layer: QuantizedLayer,
    /// `‖(W − Q̂)·Xᵀ‖² / ‖W·Xᵀ‖²` for the chosen method.
    pub rel_error: f64,
    /// The same for round-to-nearest on the same initial grid.
    pub rel_error_rtn: f64,
    /// `‖W·Xᵀ‖² = Σ w_iᵀ G w_i`.
    pub energy: f64,
    /// The objective the sweeps minimise (damped when `--damp` > 0) after each sweep (and after
    /// each scale update when enabled), in order.
    pub history: Vec<f64>,
    /// The relative error of the start (`--init rtn|gptq`) before any sweep.
    pub rel_error_start: Option<f64>,
    /// Wall-clock seconds spent on this layer's device work.
    pub seconds: f64,
}

/// What every run on one layer with the same damping and order kind shares: the damped Gram in
/// f32 (what the device is handed), the visiting order and, for the GPTQ start, its factor.
///
/// A search builds one for its configured damping and hands it to each of its 12–24 runs, so
/// the `n²` copies of `G`, the per-row sorts of the order and the `O(n³)` factor are made once
/// per layer instead of once per candidate. The damped f64 Gram is only needed to build these
/// and is not kept.
pub(crate) struct Prepared {
    damp: f32,
    order_kind: super::OrderKind,
    act_order: bool,
    order: Order,
    g32: Vec<f32>,
    factor: Option<gptq::GptqFactor>,
}

impl Prepared {
    /// Prepares the runs of layer `name` at `cfg`'s damping and order kind (after the same
    /// input checks as a run); the GPTQ factor is built when `cfg` starts from it.
    pub(crate) fn new(
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        gram: &Gram,
        cfg: &QuantConfig,
    ) -> Result<Prepared> {
        crate::profile::record("  prepare", || {
            check_inputs(name, w, rows, cols, gram, cfg)?;
            let damped = (cfg.damp > 0.0).then(|| gram.damped(cfg.damp));
            let h = damped.as_ref().unwrap_or(gram);
            let order = Order::build(cfg.order, w, rows, cols, &h.diag());
            let factor = if cfg.init == Init::Gptq && cfg.method == Method::Comq {
                Some(gptq::factor(
                    h,
                    cfg.act_order,
                    gram.dead_threshold() as f64,
                )?)
            } else {
                None
            };
            Ok(Prepared {
                damp: cfg.damp,
                order_kind: cfg.order,
                act_order: cfg.act_order,
                order,
                g32: h.to_f32(),
                factor,
            })
        })
    }

    /// Whether a run of `cfg` can use this.
    fn fits(&self, cfg: &QuantConfig) -> bool {
        self.damp == cfg.damp && self.order_kind == cfg.order && self.act_order == cfg.act_order
    }
}

/// Refuses a layer whose options, weight or Gram matrix cannot be quantized, naming it.
fn check_inputs(
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
    cfg: &QuantConfig,
) -> Result<()> {
    cfg.validate()?;
    cfg.validate_for(name, rows, cols)?;
    if w.len() != rows * cols {
        return Err(Error::Shape(format!(
            "layer '{name}': weight has {} values, expected {rows} × {cols}",
            w.len()
        )));
    }
    if gram.n != cols {
        return Err(Error::Shape(format!(
            "layer '{name}' has {cols} inputs but its Gram matrix is {0} × {0}",
            gram.n
        )));
    }
    crate::device::check_finite(&format!("weight '{name}'"), w)?;
    if let Some(index) = gram.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: format!("Gram matrix of '{name}'"),
            value: gram.data[index],
            index,
        });
    }
    Ok(())
}

/// A point the driver passed through: the start, or the state after a sweep.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Sweeps done when it was taken (0 for the start).
    pub sweeps: usize,
    /// The codes and grid at that point.
    pub layer: QuantizedLayer,
    /// Its relative error on the (undamped) calibration Gram.
    pub rel_error: f64,
}

/// Quantizes the row-major `rows × cols` weight `w` against `gram` on `device`.
pub fn quantize_layer<D: Device>(
    device: &D,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
    cfg: &QuantConfig,
) -> Result<LayerOutcome> {
    run(device, name, w, rows, cols, gram, cfg, None, true, None)
}

/// `‖W − Q̂‖²_F` for codes on `grid` (the term damping adds to the loss, divided by `λ`).
fn error_sqnorm(w: &[f32], codes: &[i32], grid: &Grid) -> f64 {
    let cols = grid.cols;
    w.iter()
        .zip(codes)
        .enumerate()
        .map(|(t, (&x, &k))| {
            let e = x as f64 - grid.value(grid.slot(t / cols, t % cols), k) as f64;
            e * e
        })
        .sum()
}

/// [`quantize_layer`], also returning the start and the state after every sweep when `stages`
/// (each is a candidate for the validation-guarded choice, at the price of one download).
///
/// With `--damp λ` the device minimises over `H = G + λ'·I` (`λ' = λ·mean diag G`); every
/// reported error is on the undamped `G`: `eᵀGe = eᵀHe − λ'·‖e‖²`, with `‖e‖²` from the codes.
#[allow(clippy::too_many_arguments)]
pub fn quantize_layer_stages<D: Device>(
    device: &D,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
    cfg: &QuantConfig,
    stages: bool,
) -> Result<(LayerOutcome, Vec<Stage>)> {
    let mut kept = Vec::new();
    let mut keep = |s: Stage| -> Result<()> {
        kept.push(s);
        Ok(())
    };
    let sink: Option<&mut dyn FnMut(Stage) -> Result<()>> =
        if stages { Some(&mut keep) } else { None };
    let o = run(device, name, w, rows, cols, gram, cfg, sink, true, None)?;
    Ok((o, kept))
}

/// The driver. Without `measure_rtn` the RTN baseline is not computed (when the start does not
/// need it) and `rel_error_rtn` is NaN: a search scores RTN as a candidate of its own.
///
/// With `stages`, every stage (the start and the state after every sweep) is handed to it as it
/// is taken, so a caller that keeps only the best holds one stage at a time, not one per sweep.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<D: Device>(
    device: &D,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
    cfg: &QuantConfig,
    mut stages: Option<&mut dyn FnMut(Stage) -> Result<()>>,
    measure_rtn: bool,
    prepared: Option<&Prepared>,
) -> Result<LayerOutcome> {
    let start = Instant::now();
    check_inputs(name, w, rows, cols, gram, cfg)?;

    let grid = Grid::build(w, rows, cols, cfg);
    let lam = gram.damping(cfg.damp);
    let own;
    let prep = match prepared.filter(|p| p.fits(cfg)) {
        Some(p) => p,
        None => {
            own = Prepared::new(name, w, rows, cols, gram, cfg)?;
            &own
        }
    };
    let (order, g32) = (&prep.order, &prep.g32);
    let problem = LayerProblem {
        name,
        weights: w,
        gram: g32,
        grid: &grid,
        order,
        dead_threshold: gram.dead_threshold(),
        scale_dtype: cfg.scale_dtype,
    };
    let mut st = device.upload(&problem)?;
    // The undamped value of a damped quadratic form, for codes on `g` (`None`: the float W).
    let undamp = |loss: f64, codes: Option<(&[i32], &Grid)>| {
        if lam == 0.0 {
            return loss;
        }
        let sq = match codes {
            Some((c, g)) => error_sqnorm(w, c, g),
            None => w.iter().map(|&x| (x as f64) * (x as f64)).sum(),
        };
        (loss - lam * sq).max(0.0)
    };
    let energy = if lam == 0.0 {
        device.energy(&mut st)?
    } else {
        // ‖X·Wᵀ‖² is Σ wᵀGw, the damped energy less λ'‖W‖².
        let e = device.energy(&mut st)?;
        e - lam * w.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
    };
    let rel = |l: f64| if energy > 0.0 { l / energy } else { 0.0 };
    let need_rtn = measure_rtn || cfg.method == Method::Rtn || cfg.init == Init::Rtn;
    let loss_rtn = if need_rtn {
        device.round_to_nearest(&mut st)?;
        device.refresh(&mut st)?
    } else {
        f64::NAN
    };
    let loss_rtn = if lam == 0.0 || !need_rtn {
        loss_rtn
    } else {
        let codes: Vec<i32> = (0..rows * cols)
            .map(|t| grid.nearest(grid.slot(t / cols, t % cols), w[t]))
            .collect();
        undamp(loss_rtn, Some((&codes, &grid)))
    };

    let mut history = Vec::new();
    let mut rel_start = None;
    let staged = stages.is_some();
    let mut snapshot = |st: &mut D::Layer, sweeps: usize, loss: f64| -> Result<f64> {
        let (codes, delta) = device.download(st)?;
        let layer = QuantizedLayer {
            rows,
            cols,
            bits: cfg.bits,
            grid: Grid {
                delta,
                ..grid.clone()
            },
            codes,
        };
        let l = undamp(loss, Some((&layer.codes, &layer.grid)));
        if let Some(sink) = stages.as_mut() {
            sink(Stage {
                sweeps,
                layer,
                rel_error: rel(l),
            })?;
        }
        Ok(l)
    };
    let loss = if cfg.method == Method::Rtn {
        loss_rtn
    } else {
        match cfg.init {
            Init::W => device.reset(&mut st)?,
            // The RTN state is already there, and the refresh above made R exact.
            Init::Rtn => {}
            Init::Gptq => {
                // The factor depends on G, the damping and the order only: a search shares it.
                let own;
                let f = match &prep.factor {
                    Some(f) => f,
                    None => {
                        let h = gram.damped(cfg.damp);
                        own = gptq::factor(&h, cfg.act_order, gram.dead_threshold() as f64)?;
                        &own
                    }
                };
                device.gptq(&mut st, f)?;
            }
        }
        let mut loss = 0.0;
        if cfg.init != Init::W {
            let l = device.refresh(&mut st)?;
            rel_start = Some(rel(if staged || cfg.sweeps == 0 {
                snapshot(&mut st, 0, l)?
            } else if lam == 0.0 {
                l
            } else {
                // Without snapshots the start's undamped error needs its codes: download once.
                let (codes, delta) = device.download(&mut st)?;
                let g = Grid {
                    delta,
                    ..grid.clone()
                };
                undamp(l, Some((&codes, &g)))
            }));
            loss = l;
        }
        for sweep in 0..cfg.sweeps {
            // Each sweep ends with an exact refresh, so the next one starts from an exact R.
            device.sweep(&mut st)?;
            loss = device.refresh(&mut st)?;
            history.push(loss);
            if cfg.scale_update {
                device.update_scales(&mut st, cfg.granularity)?;
                loss = device.refresh(&mut st)?;
                history.push(loss);
            }
            log::debug!("{name}: sweep {} loss {loss:.6e}", sweep + 1);
            if staged && sweep + 1 < cfg.sweeps {
                snapshot(&mut st, sweep + 1, loss)?;
            }
        }
        loss
    };
    let (codes, delta) = device.download(&mut st)?;
    let mut final_grid = grid;
    final_grid.delta = delta;
    let loss = if cfg.method == Method::Rtn {
        loss
    } else {
        undamp(loss, Some((&codes, &final_grid)))
    };
    let layer = QuantizedLayer {
        rows,
        cols,
        bits: cfg.bits,
        codes,
        grid: final_grid,
    };
    if let (Some(sink), true) = (stages.as_mut(), cfg.method != Method::Rtn && cfg.sweeps > 0) {
        sink(Stage {
            sweeps: cfg.sweeps,
            layer: layer.clone(),
            rel_error: rel(loss),
        })?;
    }
    let outcome = LayerOutcome {
        layer,
        rel_error: rel(loss),
        rel_error_rtn: rel(loss_rtn),
        energy,
        history,
        rel_error_start: rel_start,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok(outcome)
}

pub use crate::numeric::grid::scale_step;
