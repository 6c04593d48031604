//! The COMQ driver: sequences the device primitives for one layer.
//!
//! Per layer (spec a.3): build the grid and the visiting order on the host, upload, measure the
//! round-to-nearest baseline on the same grid, reset to `Q̂ = W, R = 0`, then run `K` sweeps.
//! After every sweep `R` is recomputed exactly (spec a.8): that removes the drift of the rank-1
//! updates before the next sweep and yields the loss after this one in the same pass. With
//! `--scale-update`, each code sweep is followed by the closed-form scale step (spec a.4/a.5).

use std::time::Instant;

use super::{Gram, Grid, Method, Order, QuantConfig, QuantizedLayer, ScaleDtype};
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
    /// The loss after each sweep (and after each scale update when enabled), in order.
    pub history: Vec<f64>,
    /// Wall-clock seconds spent on this layer's device work.
    pub seconds: f64,
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
    let start = Instant::now();
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

    let grid = Grid::build(w, rows, cols, cfg);
    let order = Order::build(cfg.order, w, rows, cols, &gram.diag());
    let g32 = gram.to_f32();
    let problem = LayerProblem {
        name,
        weights: w,
        gram: &g32,
        grid: &grid,
        order: &order,
        dead_threshold: gram.dead_threshold(),
        scale_dtype: cfg.scale_dtype,
    };
    let mut st = device.upload(&problem)?;
    let energy = device.energy(&mut st)?;
    device.round_to_nearest(&mut st)?;
    let loss_rtn = device.refresh(&mut st)?;

    let mut history = Vec::new();
    let loss = if cfg.method == Method::Rtn {
        loss_rtn
    } else {
        device.reset(&mut st)?;
        let mut loss = 0.0;
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
        }
        loss
    };
    let (codes, delta) = device.download(&mut st)?;
    let mut final_grid = grid;
    final_grid.delta = delta;
    let rel = |l: f64| if energy > 0.0 { l / energy } else { 0.0 };
    Ok(LayerOutcome {
        layer: QuantizedLayer {
            rows,
            cols,
            bits: cfg.bits,
            codes,
            grid: final_grid,
        },
        rel_error: rel(loss),
        rel_error_rtn: rel(loss_rtn),
        energy,
        history,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The closed-form scale step (spec a.4/a.5) shared by every device: with `num = k̃ᵀR` and
/// `den = k̃ᵀGk̃`, the new step is `Δ + num/den` rounded to the storage dtype. It is taken only if
/// it stays positive and finite and the exact change of the loss, `−2·s·num + s²·den` for
/// `s = Δ' − Δ`, is not positive (rounding to bf16 can move it off the optimum).
pub fn scale_step(old: f32, num: f64, den: f64, dtype: ScaleDtype) -> Option<f32> {
    if den.is_nan() || den <= 0.0 {
        return None;
    }
    let new = dtype.round((old as f64 + num / den) as f32);
    let s = new as f64 - old as f64;
    (new > 0.0 && new.is_finite() && s != 0.0 && -2.0 * s * num + s * s * den <= 0.0).then_some(new)
}
