//! The validation-guarded choice: several quantizations of one layer, the one with the lowest
//! held-out error shipped.
//!
//! Minimising the calibration loss harder (more sweeps, no damping, a finer scale search) keeps
//! lowering the calibration error but can raise the error on inputs the quantizer never saw —
//! coordinate descent overfits a Gram built from few images. So every candidate is scored on a
//! second Gram, built from held-out calibration images, and the best one there is shipped.
//! Round-to-nearest is always a candidate, so no layer ships with a held-out error above RTN's.
//!
//! The candidates are cheap to enumerate: the start of a run (`--init rtn|gptq`) and the state
//! after every sweep are candidates of their own ([`super::comq::Stage`]), so one run with
//! `--sweeps 1` scores both "GPTQ" and "GPTQ + one COMQ sweep". Per grid shrink (`--scalar
//! auto`), one such run and RTN; plus RTN at scale 1 and the paper's one-sweep COMQ from the
//! float weights. Two coordinate steps follow: while the smallest shrink scores best, the next
//! one down is tried (a line search, to [`MIN_SCALAR`]); then, at the best shrink, the other
//! dampings of the plan (one run each).

use serde::Serialize;

use super::comq::{run, LayerOutcome, Stage};
use super::{Gram, Init, Method, Order, OrderKind, QuantConfig, QuantizedLayer};
use crate::device::{Device, LayerProblem};
use crate::error::Result;

/// The default damping `λ` (a share of the mean of diag G) outside the paper preset.
pub const DEFAULT_DAMP: f32 = 0.01;

/// The default share of calibration images held out to score candidates.
pub const DEFAULT_HOLDOUT: f32 = 0.15;

/// Dampings the default search tries besides `--damp`, at the best grid shrink: strong damping
/// wins with few calibration images, light damping with many.
pub const AUTO_DAMPS: [f32; 1] = [0.1];

/// When the smallest shrink of `--scalar auto` scores best, the search goes on down in steps
/// of this much…
pub const SCALAR_STEP: f32 = 0.05;

/// …but not below this.
pub const MIN_SCALAR: f32 = 0.5;

/// Grid shrinks `--scalar auto` tries, largest first.
pub const AUTO_SCALARS: [f32; 5] = [1.0, 0.95, 0.9, 0.85, 0.8];

/// What the search may vary beyond the user's configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchPlan {
    /// Grid shrinks to try with the configured method (one value: no scale search).
    pub scalars: Vec<f32>,
    /// Also try the paper's recipe (one sweep from `W`, undamped, scalar 1).
    pub paper: bool,
    /// Also try round-to-nearest at every scalar (RTN at scalar 1 is always tried).
    pub rtn_scalars: bool,
    /// Other dampings to try with the configured method, at the grid shrink that scored best
    /// (a coordinate search: one more run per value, not one per scalar).
    pub damps: Vec<f32>,
}

impl SearchPlan {
    /// Only the configured method at its own scalar (plus the RTN guard).
    pub fn single(cfg: &QuantConfig) -> SearchPlan {
        SearchPlan {
            scalars: vec![cfg.scalar],
            paper: false,
            rtn_scalars: false,
            damps: Vec::new(),
        }
    }
}

/// One candidate's scores.
#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    /// What it was, e.g. `gptq+1 s0.90` (start, sweeps, grid shrink).
    pub label: String,
    /// Relative error on the calibration Gram.
    pub rel_error: f64,
    /// Relative error on the held-out Gram (`None` without one).
    pub rel_error_holdout: Option<f64>,
}

/// The shipped candidate and the scores of all of them.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The shipped quantization; its `rel_error_rtn` is RTN at scalar 1 on the calibration Gram.
    pub outcome: LayerOutcome,
    /// Its label.
    pub chosen: String,
    /// Every candidate, in the order tried.
    pub tried: Vec<Tried>,
    /// The shipped candidate's held-out error.
    pub rel_error_holdout: Option<f64>,
    /// RTN's (scalar 1) held-out error.
    pub rel_error_holdout_rtn: Option<f64>,
}

fn label(cfg: &QuantConfig, sweeps: usize) -> String {
    let start = match (cfg.method, cfg.init) {
        (Method::Rtn, _) => return format!("rtn s{:.2}", cfg.scalar),
        (_, Init::W) => "comq",
        (_, Init::Rtn) => "rtn",
        (_, Init::Gptq) => "gptq",
    };
    let damp = if cfg.damp > 0.0 {
        format!(" d{}", cfg.damp)
    } else {
        String::new()
    };
    if sweeps == 0 {
        format!("{start} s{:.2}{damp}", cfg.scalar)
    } else {
        format!("{start}+{sweeps} s{:.2}{damp}", cfg.scalar)
    }
}

/// Scores a candidate on another Gram: an uploaded state whose codes are replaced.
struct Scorer<D: Device> {
    state: D::Layer,
    energy: f64,
}

impl<D: Device> Scorer<D> {
    fn new(
        device: &D,
        name: &str,
        w: &[f32],
        gram: &Gram,
        grid: &super::Grid,
    ) -> Result<Scorer<D>> {
        let g32 = gram.to_f32();
        let order = Order::Natural { cols: grid.cols };
        let problem = LayerProblem {
            name,
            weights: w,
            gram: &g32,
            grid,
            order: &order,
            dead_threshold: gram.dead_threshold(),
            scale_dtype: super::ScaleDtype::F32,
        };
        let mut state = device.upload(&problem)?;
        let energy = device.energy(&mut state)?;
        Ok(Scorer { state, energy })
    }

    fn rel(&mut self, device: &D, layer: &super::QuantizedLayer) -> Result<f64> {
        device.load_codes(&mut self.state, &layer.codes, &layer.grid.delta)?;
        let loss = device.refresh(&mut self.state)?;
        Ok(if self.energy > 0.0 {
            loss / self.energy
        } else {
            0.0
        })
    }
}

/// Quantizes one layer with every candidate of `plan` around `cfg` and ships the one with the
/// lowest error on `holdout` (on `gram` when there is no held-out Gram).
#[allow(clippy::too_many_arguments)]
pub fn search<D: Device>(
    device: &D,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
    holdout: Option<&Gram>,
    cfg: &QuantConfig,
    plan: &SearchPlan,
) -> Result<Choice> {
    let start = std::time::Instant::now();
    let configs = first_candidates(cfg, plan);
    let rtn = |scalar: f32| QuantConfig {
        method: Method::Rtn,
        scalar,
        ..cfg.clone()
    };
    // The damped Gram, the order and the GPTQ factor of the configured damping, made once for
    // every candidate that runs at it.
    let prepared = super::comq::Prepared::new(name, w, rows, cols, gram, cfg)?;
    let mut scorer: Option<Scorer<D>> = None;
    let mut tried = Vec::new();
    let mut best: Option<(f64, usize, LayerOutcome)> = None;
    // The first candidate, round-to-nearest at the full grid: its errors go in the report.
    let mut rtn_outcome: Option<(f64, Option<f64>)> = None;
    // The best score of the configured method per grid shrink, for the damping stage.
    let mut by_scalar: Vec<(f32, f64)> = Vec::new();
    let mut queue: std::collections::VecDeque<QuantConfig> = configs.into();
    let mut damps_done = plan.damps.is_empty() || cfg.method != Method::Comq;
    let mut extended: Vec<f32> = Vec::new();
    let mut damp_stage = false;
    loop {
        let Some(c) = queue.pop_front() else {
            // Line search downwards: while the smallest shrink tried is the best, try the next.
            if plan.scalars.len() > 1 && !damp_stage {
                let best_s = by_scalar
                    .iter()
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|e| e.0);
                let lowest = by_scalar.iter().map(|e| e.0).fold(f32::INFINITY, f32::min);
                if best_s == Some(lowest) && lowest - SCALAR_STEP >= MIN_SCALAR - 1e-6 {
                    let next = ((lowest - SCALAR_STEP) * 100.0).round() / 100.0;
                    if plan.rtn_scalars {
                        queue.push_back(rtn(next));
                    }
                    queue.push_back(QuantConfig {
                        scalar: next,
                        ..cfg.clone()
                    });
                    extended.push(next);
                    continue;
                }
            }
            if damps_done {
                break;
            }
            damps_done = true;
            damp_stage = true;
            if let Some(&(s, _)) = by_scalar.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
                for &d in plan.damps.iter().filter(|&&d| d != cfg.damp) {
                    queue.push_back(QuantConfig {
                        scalar: s,
                        damp: d,
                        ..cfg.clone()
                    });
                }
            }
            continue;
        };
        let configured = c.method == cfg.method
            && c.init == cfg.init
            && c.damp == cfg.damp
            && (plan.scalars.contains(&c.scalar) || extended.contains(&c.scalar));
        // Scores one candidate: on the held-out Gram when there is one, else on the
        // calibration error; books it in `tried` and the per-shrink scores.
        let book = |lbl: String,
                    layer: &QuantizedLayer,
                    rel_error: f64,
                    scorer: &mut Option<Scorer<D>>,
                    tried: &mut Vec<Tried>,
                    by_scalar: &mut Vec<(f32, f64)>|
         -> Result<(f64, Option<f64>)> {
            let held = match holdout {
                Some(h) => Some(crate::profile::record("  scoring", || -> Result<f64> {
                    if scorer.is_none() {
                        *scorer = Some(Scorer::new(device, name, w, h, &layer.grid)?);
                    }
                    scorer.as_mut().expect("set above").rel(device, layer)
                })?),
                None => None,
            };
            let score = held.unwrap_or(rel_error);
            log::debug!("{name}: {lbl}: calibration {rel_error:.4e}, held-out {held:?}");
            tried.push(Tried {
                label: lbl,
                rel_error,
                rel_error_holdout: held,
            });
            if configured {
                match by_scalar.iter_mut().find(|(s, _)| *s == c.scalar) {
                    Some(e) => e.1 = e.1.min(score),
                    None => by_scalar.push((c.scalar, score)),
                }
            }
            Ok((score, held))
        };
        // The stages of this run (its start and every sweep) are scored as they are taken, and
        // only the best of them is held: memory does not grow with --sweeps.
        let mut run_best: Option<(f64, usize, Stage)> = None;
        let mut staged = false;
        let outcome = {
            let mut sink = |st: Stage| -> Result<()> {
                staged = true;
                let (score, _) = book(
                    label(&c, st.sweeps),
                    &st.layer,
                    st.rel_error,
                    &mut scorer,
                    &mut tried,
                    &mut by_scalar,
                )?;
                if run_best.as_ref().is_none_or(|(b, _, _)| score < *b) {
                    run_best = Some((score, tried.len() - 1, st));
                }
                Ok(())
            };
            crate::profile::record("  candidates", || {
                run(
                    device,
                    name,
                    w,
                    rows,
                    cols,
                    gram,
                    &c,
                    Some(&mut sink),
                    false,
                    Some(&prepared),
                )
            })?
        };
        // A run without stages (RTN) is a candidate itself.
        let candidate = if staged {
            run_best.map(|(score, index, st)| {
                let mut o = outcome.clone();
                o.rel_error = st.rel_error;
                o.layer = st.layer;
                (score, index, o)
            })
        } else {
            let (score, held) = book(
                label(&c, c.sweeps),
                &outcome.layer,
                outcome.rel_error,
                &mut scorer,
                &mut tried,
                &mut by_scalar,
            )?;
            if rtn_outcome.is_none() {
                rtn_outcome = Some((outcome.rel_error, held));
            }
            Some((score, tried.len() - 1, outcome))
        };
        if let Some((score, index, o)) = candidate {
            if best.as_ref().is_none_or(|(b, _, _)| score < *b) {
                best = Some((score, index, o));
            }
        }
    }
    let (_, index, mut outcome) = best.expect("RTN is always a candidate");
    let (rtn_rel, rtn_held) = rtn_outcome.expect("RTN is always a candidate");
    outcome.rel_error_rtn = rtn_rel;
    outcome.seconds = start.elapsed().as_secs_f64();
    Ok(Choice {
        chosen: tried[index].label.clone(),
        rel_error_holdout: tried[index].rel_error_holdout,
        rel_error_holdout_rtn: rtn_held,
        outcome,
        tried,
    })
}

/// The candidates tried first, in order: round-to-nearest at the full grid (always first, its
/// errors go in the report), the paper's recipe when the plan asks for it, then per grid shrink
/// of the plan round-to-nearest (when asked) and the configured method.
fn first_candidates(cfg: &QuantConfig, plan: &SearchPlan) -> Vec<QuantConfig> {
    let mut configs: Vec<QuantConfig> = Vec::new();
    let rtn = |scalar: f32| QuantConfig {
        method: Method::Rtn,
        scalar,
        ..cfg.clone()
    };
    configs.push(rtn(1.0));
    if plan.paper {
        configs.push(QuantConfig {
            method: Method::Comq,
            init: Init::W,
            damp: 0.0,
            scalar: 1.0,
            sweeps: 1,
            order: OrderKind::Greedy,
            ..cfg.clone()
        });
    }
    for &s in &plan.scalars {
        if plan.rtn_scalars && s != 1.0 {
            configs.push(rtn(s));
        }
        if cfg.method == Method::Comq {
            configs.push(QuantConfig {
                scalar: s,
                ..cfg.clone()
            });
        }
    }
    configs
}
