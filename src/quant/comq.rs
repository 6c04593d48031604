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

/// What every run on one layer with the same damping and order kind shares: the damped
/// diagonal in f32 (the only part of `G` a damping changes), the visiting order (the greedy order
/// ranks by the damped diagonal) and, for the GPTQ start, its factor.
///
/// A search builds one per damping it tries and hands it to each of its runs, so the per-row
/// sorts of the order and the `O(n³)` factor are made once per (layer, damping) instead of once
/// per candidate. The damped f64 Gram is only needed to build these and is not kept.
pub(crate) struct Prepared {
    pub(crate) damp: f32,
    order_kind: super::OrderKind,
    act_order: bool,
    pub(crate) order: Order,
    /// `diag(G) + λ'` in f32: exactly the diagonal of the damped Gram's f32 copy.
    pub(crate) diag32: Vec<f32>,
    pub(crate) factor: Option<std::sync::Arc<gptq::GptqFactor>>,
    /// For the GPTQ start on a device that builds its factor itself: what it builds it from.
    pub(crate) plan: Option<gptq::FactorPlan>,
}

/// Factors built ahead ([`super::prefactor`]) and the digest of the layer's Gram to find them by.
#[derive(Clone, Copy)]
pub(crate) struct Ready<'a> {
    pub(crate) cache: &'a super::prefactor::FactorCache,
    pub(crate) digest: [u64; 2],
}

impl Prepared {
    /// Prepares the runs of a layer at `cfg`'s damping and order kind; the GPTQ factor is built
    /// when `cfg` starts from it. The caller has checked the inputs ([`check_inputs`]) once for
    /// every damping it prepares. With `ranked` (the device ranks greedy orders itself,
    /// [`crate::device::Device::ranks_orders`]) a greedy order is left to the device; with
    /// `factored` ([`crate::device::Device::builds_factors`]) so is the GPTQ factor.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        w: &[f32],
        rows: usize,
        cols: usize,
        gram: &Gram,
        cfg: &QuantConfig,
        ready: Option<Ready<'_>>,
        ranked: bool,
        factored: bool,
    ) -> Result<Prepared> {
        // The damped diagonal, `G_jj + λ·mean(diag G)` as `Gram::damped` adds it; the damped
        // copy of the whole `G` only where the factor is built here from it.
        let add = (cfg.damp > 0.0).then(|| gram.damping(cfg.damp));
        let diag: Vec<f64> = match add {
            Some(a) => gram.diag().iter().map(|&d| d + a).collect(),
            None => gram.diag(),
        };
        // A device that ranks the greedy order itself gets the column norms only: `rows × cols`
        // indices neither built here nor sent.
        let order = match cfg.order {
            super::OrderKind::Greedy if ranked => Order::ranked(&diag),
            kind => {
                crate::profile::record("    order", || Order::build(kind, w, rows, cols, &diag))
            }
        };
        let gptq_start = cfg.gptq_start();
        // A device that builds the factor from its resident `G` gets the plan: the order and
        // the damped diagonal, `n` values each, instead of `n²/2`.
        let plan = (gptq_start && factored)
            .then(|| gptq::plan_from_diag(&diag, cfg.act_order, gram.dead_threshold() as f64));
        let factor = if gptq_start && plan.is_none() {
            let key = |r: Ready<'_>| {
                super::prefactor::FactorKey::new(r.digest, gram, cfg.damp, cfg.act_order)
            };
            match ready.and_then(|r| r.cache.get(&key(r))) {
                Some(f) => Some(f),
                // The same factor `prefactor::factor_of` builds ahead.
                None => {
                    let damped = crate::profile::record("    damped", || {
                        (cfg.damp > 0.0).then(|| gram.damped(cfg.damp))
                    });
                    let h = damped.as_ref().unwrap_or(gram);
                    Some(std::sync::Arc::new(crate::profile::record(
                        "    factor",
                        || gptq::factor(h, cfg.act_order, gram.dead_threshold() as f64),
                    )?))
                }
            }
        } else {
            None
        };
        Ok(Prepared {
            damp: cfg.damp,
            order_kind: cfg.order,
            act_order: cfg.act_order,
            order,
            diag32: diag.iter().map(|&v| v as f32).collect(),
            factor,
            plan,
        })
    }

    /// Whether a run of `cfg` can use this.
    pub(crate) fn fits(&self, cfg: &QuantConfig) -> bool {
        let factor_fits = self.factor.is_some() || self.plan.is_some() || !cfg.gptq_start();
        self.damp == cfg.damp
            && self.order_kind == cfg.order
            && self.act_order == cfg.act_order
            && factor_fits
    }

    /// The damped Gram in f32, as the devices are handed it.
    pub(crate) fn gram32(&self, gram: &Gram) -> Vec<f32> {
        let mut g = gram.to_f32();
        let n = gram.n;
        for (j, &d) in self.diag32.iter().enumerate() {
            g[j * n + j] = d;
        }
        g
    }
}

/// Uploads `problem` (its `gram` not read) with `gram` damped as `prep` says: copied on the
/// device where the device holds it under `key` (its digest, [`Device::upload_held`]), else
/// sent from the host.
pub(crate) fn upload<D: Device>(
    device: &D,
    problem: &LayerProblem<'_>,
    gram: &Gram,
    key: Option<[u64; 2]>,
    prep: &Prepared,
) -> Result<D::Layer> {
    if let Some(key) = key {
        if let Some(st) = device.upload_held(problem, key, &prep.diag32)? {
            return Ok(st);
        }
    }
    let g32 = prep.gram32(gram);
    device.upload(&LayerProblem {
        gram: &g32,
        ..*problem
    })
}

/// Refuses a layer whose options, weight or Gram matrix cannot be quantized, naming it.
pub(crate) fn check_inputs(
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
    run(device, name, w, rows, cols, gram, cfg, None, true)
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
    let o = run(device, name, w, rows, cols, gram, cfg, sink, true)?;
    Ok((o, kept))
}

/// The driver on a freshly uploaded state. Without `measure_rtn` the RTN baseline is not
/// computed (when the start does not need it) and `rel_error_rtn` is NaN.
///
/// With `stages`, every stage (the start and the state after every sweep) is downloaded and
/// handed to it as it is taken, so a caller that keeps only the best holds one stage at a time.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<D: Device>(
    device: &D,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
    cfg: &QuantConfig,
    stages: Option<&mut dyn FnMut(Stage) -> Result<()>>,
    measure_rtn: bool,
) -> Result<LayerOutcome> {
    let start = Instant::now();
    check_inputs(name, w, rows, cols, gram, cfg)?;
    let grid = Grid::build(w, rows, cols, cfg);
    let prep = crate::profile::record("  prepare", || {
        Prepared::new(
            w,
            rows,
            cols,
            gram,
            cfg,
            None,
            device.ranks_orders(cols),
            device.builds_factors(cols),
        )
    })?;
    let problem = LayerProblem {
        name,
        weights: w,
        gram: &[],
        grid: &grid,
        order: &prep.order,
        dead_threshold: gram.dead_threshold(),
        scale_dtype: cfg.scale_dtype,
    };
    let key = device.holds_grams().then(|| gram.digest());
    let mut st = upload(device, &problem, gram, key, &prep)?;
    if tracks_sweeps(cfg) {
        device.track_sweeps(&mut st)?;
    }
    let lam = gram.damping(cfg.damp);
    let energy = undamped_energy(device, &mut st, w, lam)?;
    let ctx = RunContext {
        grid: &grid,
        energy,
        lam,
        factor: prep.factor.as_deref(),
        plan: prep.plan.as_ref(),
    };
    let stats = match stages {
        Some(sink) => {
            let mut hook = |st: &mut D::Layer, sweeps: usize, rel_error: f64| -> Result<()> {
                let (codes, delta) = device.download(st)?;
                sink(Stage {
                    sweeps,
                    layer: ctx.layer(cfg, codes, delta),
                    rel_error,
                })
            };
            run_on(device, &mut st, cfg, &ctx, Some(&mut hook), measure_rtn)?
        }
        None => run_on(device, &mut st, cfg, &ctx, None, measure_rtn)?,
    };
    let (codes, delta) = device.download(&mut st)?;
    Ok(LayerOutcome {
        layer: ctx.layer(cfg, codes, delta),
        rel_error: stats.rel_error,
        rel_error_rtn: stats.rel_error_rtn,
        energy,
        history: stats.history,
        rel_error_start: stats.rel_error_start,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Whether a lone run of `cfg` keeps the exact products between sweeps
/// ([`Device::track_sweeps`]): the sweeps after a GPTQ or RTN start change few codes. A search
/// keeps them for all its runs; a lone run of a search's candidate gives the same figures
/// either way (a sweep from the float weights changes too many codes to be updated).
pub(crate) fn tracks_sweeps(cfg: &QuantConfig) -> bool {
    cfg.method == Method::Comq && cfg.init != Init::W && cfg.sweeps > 0
}

/// `‖X·Wᵀ‖² = Σ wᵀGw` from a state that may hold the damped `G + λ'·I`: the damped energy less
/// `λ'·‖W‖²`.
pub(crate) fn undamped_energy<D: Device>(
    device: &D,
    st: &mut D::Layer,
    w: &[f32],
    lam: f64,
) -> Result<f64> {
    let e = crate::profile::record("    energy", || device.energy(st))?;
    Ok(if lam == 0.0 {
        e
    } else {
        e - lam * w.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
    })
}

/// What one run on a resident state needs besides its configuration.
pub(crate) struct RunContext<'a> {
    /// The run's initial grid (already on the device).
    pub(crate) grid: &'a Grid,
    /// `‖X·Wᵀ‖²` on the undamped Gram.
    pub(crate) energy: f64,
    /// The absolute damping `λ'` the state's `G` holds.
    pub(crate) lam: f64,
    /// The GPTQ factor at that damping, for the GPTQ start.
    pub(crate) factor: Option<&'a gptq::GptqFactor>,
    /// Or its plan, where the device builds it.
    pub(crate) plan: Option<&'a gptq::FactorPlan>,
}

impl RunContext<'_> {
    /// A downloaded state as a quantized layer on this run's grid.
    pub(crate) fn layer(
        &self,
        cfg: &QuantConfig,
        codes: Vec<i32>,
        delta: Vec<f32>,
    ) -> QuantizedLayer {
        QuantizedLayer {
            rows: self.grid.rows,
            cols: self.grid.cols,
            bits: cfg.bits,
            grid: Grid {
                delta,
                ..self.grid.clone()
            },
            codes,
        }
    }
}

/// What a run on a resident state reports; its codes stay on the device.
#[derive(Debug, Clone)]
pub(crate) struct RunStats {
    /// Relative error of the final state on the undamped Gram.
    pub(crate) rel_error: f64,
    /// The same for round-to-nearest (NaN when not measured).
    pub(crate) rel_error_rtn: f64,
    /// The (damped) objective after each sweep and scale step.
    pub(crate) history: Vec<f64>,
    /// The start's relative error.
    pub(crate) rel_error_start: Option<f64>,
}

/// A stage hook: the state on the device, the sweeps done and its relative error.
pub(crate) type StageHook<'h, L> = &'h mut dyn FnMut(&mut L, usize, f64) -> Result<()>;

/// The undamped value of a damped quadratic form for the state's codes:
/// `eᵀGe = eᵀHe − λ'·‖e‖²`, with `‖e‖²` reduced on the device.
pub(crate) fn undamped<D: Device>(
    device: &D,
    st: &mut D::Layer,
    lam: f64,
    loss: f64,
) -> Result<f64> {
    if lam == 0.0 {
        return Ok(loss);
    }
    Ok((loss - lam * crate::profile::record("    sqnorm", || device.error_sqnorm(st))?).max(0.0))
}

/// Builds `plan`'s factor on the device (nothing when it is kept there already), with the host's
/// fallback dampings where the damped Gram is not positive definite.
fn factor_on_device<D: Device>(
    device: &D,
    st: &mut D::Layer,
    plan: &gptq::FactorPlan,
) -> Result<()> {
    plan.build_with(|diag| device.build_factor(st, plan, diag))
}

/// The driver on a state that holds the run's grid, (damped) Gram and order, at the starting
/// point: RTN when needed, the start, the sweeps. `stages` sees the start and the state after
/// every sweep on the device, as they are taken.
///
/// With `--damp λ` the device minimises over `H = G + λ'·I`; every reported error is on the
/// undamped `G`.
pub(crate) fn run_on<D: Device>(
    device: &D,
    st: &mut D::Layer,
    cfg: &QuantConfig,
    ctx: &RunContext<'_>,
    mut stages: Option<StageHook<'_, D::Layer>>,
    measure_rtn: bool,
) -> Result<RunStats> {
    let (energy, lam) = (ctx.energy, ctx.lam);
    let rel = |l: f64| if energy > 0.0 { l / energy } else { 0.0 };
    let need_rtn = measure_rtn || cfg.method == Method::Rtn || cfg.init == Init::Rtn;
    let loss_rtn = if need_rtn {
        crate::profile::record("    rtn", || device.round_to_nearest(st))?;
        // Only an RTN start sweeps from here; every other run resets or refreshes `R` first.
        let l = if cfg.method != Method::Rtn && cfg.init == Init::Rtn {
            crate::profile::record("    refresh", || device.refresh(st))?
        } else {
            crate::profile::record("    loss", || device.loss(st))?
        };
        undamped(device, st, lam, l)?
    } else {
        f64::NAN
    };
    let mut history = Vec::new();
    let mut rel_start = None;
    let loss = if cfg.method == Method::Rtn {
        loss_rtn
    } else {
        match cfg.init {
            Init::W => device.reset(st)?,
            // The RTN state is already there, and the refresh above made R exact.
            Init::Rtn => {}
            Init::Gptq => match ctx.plan {
                Some(plan) => {
                    crate::profile::record("    factor on device", || {
                        factor_on_device(device, st, plan)
                    })?;
                    crate::profile::record("    gptq", || device.gptq(st, &plan.resident()))?;
                }
                None => {
                    let f = ctx.factor.ok_or_else(|| {
                        Error::Internal("the GPTQ start was run without its factor".into())
                    })?;
                    crate::profile::record("    gptq", || device.gptq(st, f))?;
                }
            },
        }
        let mut loss = 0.0;
        if cfg.init != Init::W {
            let l = crate::profile::record("    refresh", || device.refresh(st))?;
            let r = rel(undamped(device, st, lam, l)?);
            rel_start = Some(r);
            if let Some(hook) = stages.as_mut() {
                hook(st, 0, r)?;
            }
            loss = l;
        }
        for sweep in 0..cfg.sweeps {
            // Each sweep ends with an exact refresh, so the next one starts from an exact R.
            crate::profile::record("    sweep", || device.sweep(st))?;
            loss = crate::profile::record("    refresh", || device.refresh(st))?;
            history.push(loss);
            if cfg.scale_update {
                device.update_scales(st, cfg.granularity)?;
                loss = device.refresh(st)?;
                history.push(loss);
            }
            log::debug!("sweep {} loss {loss:.6e}", sweep + 1);
            if sweep + 1 < cfg.sweeps {
                if let Some(hook) = stages.as_mut() {
                    let r = rel(undamped(device, st, lam, loss)?);
                    hook(st, sweep + 1, r)?;
                }
            }
        }
        loss
    };
    let loss = if cfg.method == Method::Rtn {
        loss
    } else {
        undamped(device, st, lam, loss)?
    };
    if let (Some(hook), true) = (stages.as_mut(), cfg.method != Method::Rtn && cfg.sweeps > 0) {
        hook(st, cfg.sweeps, rel(loss))?;
    }
    Ok(RunStats {
        rel_error: rel(loss),
        rel_error_rtn: rel(loss_rtn),
        history,
        rel_error_start: rel_start,
    })
}

pub use crate::numeric::grid::scale_step;
