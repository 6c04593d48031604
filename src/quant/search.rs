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
//! `--sweeps 1` scores both "GPTQ" and "GPTQ + one COMQ sweep". RTN at scale 1 is always the
//! first candidate. Then, per grid shrink of the plan, one such run (and, in the full plan, RTN
//! at that shrink, and the paper's one-sweep COMQ from the float weights). Two coordinate steps
//! follow: a line search over the shrink (while the smallest shrink tried scores best, the next
//! one down, to [`MIN_SCALAR`]; while the largest scores best, the next one up, to 1), then, at
//! the best shrink, the other dampings of the plan (one run each).
//!
//! The default plan ([`SearchPlan::quick`]) starts the line search at one shrink and tries
//! neither RTN below scale 1 nor the paper's candidate: on DINOv2-S (72 layers at W4, W3 and W2)
//! and the bundled model (16 layers at each), none of them was ever shipped by the full plan
//! ([`SearchPlan::full`], `--search full`), and the line search reaches a best shrink from one
//! start with about half the runs. The start is the layer's own ([`start_scalar`]): the shrink
//! whose round-to-nearest error, weighted by the Gram's diagonal, is lowest — `O(mn)` work per
//! shrink that lands within a step of where the held-out error bottoms out on most layers, so
//! the line search mostly confirms it (on DINOv2-S's MLP down-projections it walked six or seven
//! steps from a start per bit width). ARCHITECTURE.md has the figures.

use serde::Serialize;

use super::comq::{
    check_inputs, run_on, undamped, undamped_energy, LayerOutcome, Prepared, RunContext,
};
use super::{Gram, Grid, Init, Method, OrderKind, QuantConfig, QuantizedLayer};
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

/// The default `--score-damp`: without held-out images, candidates are compared on the
/// calibration error plus this damping's term `λ·mean(diag G)·‖W − Q̂‖²` (see [`SearchPlan`]).
/// On DINOv2-S calibrated on 17 photos with nothing held out, 0.1 raised the out-of-domain CLS
/// cosine from 0.9071 to 0.9277 at W3 and from 0.9797 to 0.9815 at W4 (0.01 changed nothing
/// measurable); the README has the table.
pub const DEFAULT_SCORE_DAMP: f32 = 0.1;

/// Grid shrinks the full plan (`--search full`) tries first, largest first.
pub const AUTO_SCALARS: [f32; 5] = [1.0, 0.95, 0.9, 0.85, 0.8];

/// The quick plan's shrink at `bits` (its [`SearchPlan::scalars`]), where a layer starts when
/// its weights point nowhere ([`SearchPlan::for_layer`]): near where the held-out error bottomed out on
/// DINOv2-S and the bundled model (the best shrinks fall with the width: around 0.9 at W4,
/// 0.7–0.85 at W3, 0.5–0.8 at W2).
pub fn first_scalar(bits: u32) -> f32 {
    match bits {
        0..=2 => 0.75,
        3 => 0.85,
        4 => 0.9,
        _ => 0.95,
    }
}

/// What the search may vary beyond the user's configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchPlan {
    /// Grid shrinks to try first with the configured method ([`SearchPlan::for_layer`] moves a
    /// line search's lone start to the layer's own).
    pub scalars: Vec<f32>,
    /// Go on from the best of `scalars` in [`SCALAR_STEP`]s, down to [`MIN_SCALAR`] and up to 1,
    /// while the shrink at the end tried scores best (a line search).
    pub line_search: bool,
    /// Also try the paper's recipe (one sweep from `W`, undamped, scalar 1).
    pub paper: bool,
    /// Also try round-to-nearest at every scalar (RTN at scalar 1 is always tried).
    pub rtn_scalars: bool,
    /// Other dampings to try with the configured method, at the grid shrink that scored best
    /// (a coordinate search: one more run per value, not one per scalar).
    pub damps: Vec<f32>,
    /// Without a held-out Gram, candidates are compared on `eᵀ(G + λ·mean(diag G)·I)e` with this
    /// `λ` instead of on the calibration error alone: the harder the descent fits the few
    /// calibration rows, the further it moves from `W`, and the term charges for that distance.
    /// 0 compares the calibration error itself. Unused with held-out images.
    pub score_damp: f32,
}

impl SearchPlan {
    /// Only the configured method at its own scalar (plus the RTN guard).
    pub fn single(cfg: &QuantConfig) -> SearchPlan {
        SearchPlan {
            scalars: vec![cfg.scalar],
            line_search: false,
            paper: false,
            rtn_scalars: false,
            damps: Vec::new(),
            score_damp: 0.0,
        }
    }

    /// The default recipe's search at `bits`: a line search over the grid shrink from
    /// [`first_scalar`] (from the layer's [`start_scalar`] through [`SearchPlan::for_layer`]),
    /// then the other `damps` at the best shrink; RTN at scale 1 as the guard.
    pub fn quick(bits: u32, damps: Vec<f32>, score_damp: f32) -> SearchPlan {
        SearchPlan {
            scalars: vec![first_scalar(bits)],
            line_search: true,
            paper: false,
            rtn_scalars: false,
            damps,
            score_damp,
        }
    }

    /// This plan for one layer: a line search from one shrink starts at the layer's own
    /// ([`start_scalar`], with this plan's shrink where the layer gives none); any other plan as
    /// it is. The tool's runs search each layer with it; [`search`] takes a plan as given.
    pub fn for_layer(
        &self,
        w: &[f32],
        rows: usize,
        cols: usize,
        gram: &Gram,
        cfg: &QuantConfig,
    ) -> std::borrow::Cow<'_, SearchPlan> {
        match self.scalars[..] {
            // A shape or configuration the search will refuse keeps the plan (the search names
            // what is wrong); the values' checks are the search's own.
            [fallback]
                if self.line_search
                    && w.len() == rows * cols
                    && gram.n == cols
                    && cfg.validate().is_ok()
                    && cfg.validate_for("", rows, cols).is_ok() =>
            {
                let s = crate::profile::record("    start", || {
                    start_scalar(w, rows, cols, gram, cfg, fallback)
                });
                std::borrow::Cow::Owned(SearchPlan {
                    scalars: vec![s],
                    ..self.clone()
                })
            }
            _ => std::borrow::Cow::Borrowed(self),
        }
    }

    /// Every candidate the default recipe may try (`--search full`): every shrink of
    /// [`AUTO_SCALARS`] and on down while the smallest wins, RTN at each, the paper's recipe,
    /// then the other `damps` at the best shrink.
    pub fn full(damps: Vec<f32>, score_damp: f32) -> SearchPlan {
        SearchPlan {
            scalars: AUTO_SCALARS.to_vec(),
            line_search: true,
            paper: true,
            rtn_scalars: true,
            damps,
            score_damp,
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
    /// What the choice compared: the held-out error, else the calibration error plus the
    /// scoring damping's term.
    pub score: f64,
}

/// The shipped candidate and the scores of all of them.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The shipped quantization; its `rel_error_rtn` is RTN at scalar 1 on the calibration Gram.
    pub outcome: LayerOutcome,
    /// Its label.
    pub chosen: String,
    /// Every candidate, in the order tried; a row-by-row mix of them, when one ships, last.
    pub tried: Vec<Tried>,
    /// The shipped candidate's held-out error.
    pub rel_error_holdout: Option<f64>,
    /// RTN's (scalar 1) held-out error.
    pub rel_error_holdout_rtn: Option<f64>,
    /// With the choice made row by row: how many rows each candidate gave (label, rows), most
    /// first; empty when the layer ships one candidate whole.
    pub rows_from: Vec<(String, usize)>,
}

/// What the search picks among its candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChooseBy {
    /// The candidate with the lowest held-out error ships whole.
    Layer,
    /// Each output row ships from the candidate whose row has the lowest held-out error (rows
    /// are independent problems sharing `G`, each with its own grid). Without held-out images,
    /// the layer's choice.
    Row,
    /// By row where the held-out Gram sums at least [`ROW_CHOICE_SAMPLES`] rows per input, else
    /// by layer: each row's score is then a sum over enough held-out rows to pick on.
    #[default]
    Auto,
}

crate::util::value_enum!(ChooseBy {
    Layer = "layer",
    Row = "row",
    Auto = "auto",
});

/// [`ChooseBy::Auto`] chooses by row when the held-out Gram sums at least this many activation
/// rows per input of the layer.
pub const ROW_CHOICE_SAMPLES: f64 = 4.0;

impl ChooseBy {
    /// Whether a layer with `cols` inputs and this held-out Gram is chosen row by row.
    pub fn by_row(self, cols: usize, holdout: Option<&Gram>) -> bool {
        match (self, holdout) {
            (_, None) | (ChooseBy::Layer, _) => false,
            (ChooseBy::Row, Some(_)) => true,
            (ChooseBy::Auto, Some(h)) => h.samples as f64 >= ROW_CHOICE_SAMPLES * cols as f64,
        }
    }
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

/// One layer's search state on a device: `W`, `G` and the held-out Gram uploaded once (per
/// order kind), the damping, order and factor switched in place, every candidate run and scored
/// there, the best one kept there; only grids go up per candidate.
struct Resident<D: Device> {
    kind: OrderKind,
    st: D::Layer,
    /// The damping the resident `G` and order hold now.
    damp: f32,
    /// `‖X·Wᵀ‖²` per damping seen (equal up to rounding; each as a lone run measures it).
    energies: Vec<(f32, f64)>,
    /// `‖X_h·Wᵀ‖²` on the held-out Gram.
    holdout_energy: f64,
}

/// What is known of the best candidate so far; its codes are kept on the device.
struct Best {
    score: f64,
    index: usize,
    /// Which resident state keeps its codes.
    state: usize,
    grid: Grid,
    rel_error: f64,
    energy: f64,
    /// The run it came from (its history and start error are filled in when the run ends).
    run: usize,
    history: Vec<f64>,
    rel_error_start: Option<f64>,
}

/// The layer's inputs, shared by every candidate.
struct Layer<'a> {
    name: &'a str,
    w: &'a [f32],
    rows: usize,
    cols: usize,
    gram: &'a Gram,
    holdout: Option<&'a Gram>,
    /// Factors built ahead, when the caller has them.
    ready: Option<super::comq::Ready<'a>>,
    /// The device ranks greedy orders itself ([`Device::ranks_orders`]).
    ranked: bool,
    /// The device builds GPTQ factors itself ([`Device::builds_factors`]).
    factored: bool,
    /// The digests of the Gram and of the held-out Gram, where the device may hold them
    /// ([`Device::holds_grams`]).
    held: Option<([u64; 2], Option<[u64; 2]>)>,
}

impl<D: Device> Resident<D> {
    /// Uploads the layer for `c` (its grid, the damped Gram and order of `prep`), with the
    /// held-out Gram.
    fn upload(
        device: &D,
        l: &Layer<'_>,
        c: &QuantConfig,
        grid: &Grid,
        prep: &Prepared,
    ) -> Result<Resident<D>> {
        let problem = LayerProblem {
            name: l.name,
            weights: l.w,
            gram: &[],
            grid,
            order: &prep.order,
            dead_threshold: l.gram.dead_threshold(),
            scale_dtype: c.scale_dtype,
        };
        // The Gram the calibration left on the device is copied there; else it goes up.
        let mut st = super::comq::upload(device, &problem, l.gram, l.held.map(|h| h.0), prep)?;
        // Every GPTQ run's sweep changes about 1% of the codes: its refresh and held-out score
        // update the start's products instead of computing whole ones again.
        device.track_sweeps(&mut st)?;
        let holdout_energy = match l.holdout {
            Some(h) => {
                let held = match l.held.and_then(|(_, k)| k) {
                    Some(key) => device.attach_held_holdout(&mut st, key)?,
                    None => false,
                };
                if !held {
                    device.attach_holdout(&mut st, &h.to_f32())?;
                }
                device.holdout_product(&mut st, true)?
            }
            None => 0.0,
        };
        Ok(Resident {
            kind: c.order,
            st,
            damp: prep.damp,
            energies: Vec::new(),
            holdout_energy,
        })
    }

    /// Switches the resident `G` and order to `prep`'s damping (a diagonal and an order go up)
    /// and returns the undamped energy.
    fn damp_to(&mut self, device: &D, l: &Layer<'_>, prep: &Prepared) -> Result<f64> {
        if self.damp != prep.damp {
            // The order of the damping left stays on the device: coming back to it (after the
            // paper candidate's undamped run) is a device copy, not an upload.
            let key = |d: f32| d.to_bits() as u64;
            device.stash_order(&mut self.st, key(self.damp))?;
            device.set_diagonal(&mut self.st, &prep.diag32)?;
            device.set_order(&mut self.st, &prep.order, Some(key(prep.damp)))?;
            self.damp = prep.damp;
        }
        if let Some(&(_, e)) = self.energies.iter().find(|(d, _)| *d == prep.damp) {
            return Ok(e);
        }
        let e = undamped_energy(device, &mut self.st, l.w, l.gram.damping(prep.damp))?;
        self.energies.push((prep.damp, e));
        Ok(e)
    }
}

/// The search's bookkeeping: every candidate's scores, the best so far, the per-shrink scores.
struct Ledger {
    tried: Vec<Tried>,
    best: Option<Best>,
    by_scalar: Vec<(f32, f64)>,
    /// The first RTN candidate's calibration and held-out errors (the report's RTN).
    rtn: Option<(f64, Option<f64>)>,
    /// `λ_s·mean(diag G)` of `--score-damp`.
    score_lam: f64,
    /// Keep the best rows as well ([`ChooseBy::Row`]).
    by_row: bool,
    /// The states whose rows were kept.
    row_states: Vec<usize>,
}

impl Ledger {
    /// Scores the stage in `st` (on the held-out Gram when there is one, else on the
    /// calibration error plus the scoring damping's term), books it, and keeps it on the device
    /// when it is the best so far (strictly: ties keep the first). Returns its held-out error.
    fn consider<D: Device>(
        &mut self,
        device: &D,
        st: &mut D::Layer,
        s: Stage<'_>,
    ) -> Result<Option<f64>> {
        let held = match s.holdout_energy {
            Some(e) => Some(held_out(device, st, e)?),
            None => None,
        };
        let score = score_of(device, st, held, s.rel_error, self.score_lam, s.energy)?;
        log::debug!(
            "{}: calibration {:.4e}, held-out {held:?}, score {score:.4e}",
            s.label,
            s.rel_error
        );
        self.tried.push(Tried {
            label: s.label,
            rel_error: s.rel_error,
            rel_error_holdout: held,
            score,
        });
        if let Some(sc) = s.scalar {
            match self.by_scalar.iter_mut().find(|(x, _)| *x == sc) {
                Some(e) => e.1 = e.1.min(score),
                None => self.by_scalar.push((sc, score)),
            }
        }
        if self.by_row && held.is_some() {
            device.keep_rows(st, (self.tried.len() - 1) as u32)?;
            if !self.row_states.contains(&s.state) {
                self.row_states.push(s.state);
            }
        }
        if self.best.as_ref().is_none_or(|b| score < b.score) {
            device.keep(st)?;
            self.best = Some(Best {
                score,
                index: self.tried.len() - 1,
                state: s.state,
                grid: s.grid.clone(),
                rel_error: s.rel_error,
                energy: s.energy,
                run: s.run,
                history: Vec::new(),
                rel_error_start: None,
            });
        }
        Ok(held)
    }

    /// The choice: the kept best candidate downloaded (the layer's one readback of codes),
    /// with every candidate's scores.
    fn ship<D: Device>(
        self,
        device: &D,
        states: &mut [Resident<D>],
        l: &Layer<'_>,
        bits: u32,
        start: std::time::Instant,
    ) -> Result<Choice> {
        // Rows kept in one state only: with two order kinds (the paper candidate beside a
        // shared order) the layer's choice ships.
        if let [si] = self.row_states[..] {
            return self.ship_rows(device, &mut states[si], l, bits, start);
        }
        let best = self.best.expect("RTN is always a candidate");
        let (rtn_rel, rtn_held) = self.rtn.expect("RTN is always a candidate");
        let (codes, delta) = device.download_kept(&mut states[best.state].st)?;
        let grid = Grid { delta, ..best.grid };
        let outcome = LayerOutcome {
            layer: QuantizedLayer {
                rows: grid.rows,
                cols: grid.cols,
                bits,
                grid,
                codes,
            },
            rel_error: best.rel_error,
            rel_error_rtn: rtn_rel,
            energy: best.energy,
            history: best.history,
            rel_error_start: best.rel_error_start,
            seconds: start.elapsed().as_secs_f64(),
        };
        Ok(Choice {
            chosen: self.tried[best.index].label.clone(),
            rel_error_holdout: self.tried[best.index].rel_error_holdout,
            rel_error_holdout_rtn: rtn_held,
            outcome,
            tried: self.tried,
            rows_from: Vec::new(),
        })
    }

    /// The row-by-row choice: the kept rows downloaded; when they come from more than one
    /// candidate, their calibration error measured on the device (one product).
    fn ship_rows<D: Device>(
        self,
        device: &D,
        res: &mut Resident<D>,
        l: &Layer<'_>,
        bits: u32,
        start: std::time::Instant,
    ) -> Result<Choice> {
        let best = self.best.expect("RTN is always a candidate");
        let (rtn_rel, rtn_held) = self.rtn.expect("RTN is always a candidate");
        let k = device.download_kept_rows(&mut res.st)?;
        let mut counts = vec![0usize; self.tried.len()];
        for &t in &k.tags {
            let t = t as usize;
            if t >= counts.len() {
                return Err(crate::error::Error::Internal(format!(
                    "layer '{}': a kept row names candidate {t} of {}",
                    l.name,
                    counts.len()
                )));
            }
            counts[t] += 1;
        }
        let whole = counts.iter().filter(|&&c| c > 0).count() == 1;
        // The energy the figures divide by: the best candidate's when it gave every row (the
        // layer choice's figures to the bit), else the state's at its damping.
        let energy = match res.energies.iter().find(|(d, _)| *d == res.damp) {
            Some(e) if !(whole && k.tags[0] as usize == best.index) => e.1,
            _ => best.energy,
        };
        let (rel_error, history, rel_error_start) = if whole {
            let t = k.tags[0] as usize;
            let same = t == best.index;
            (
                self.tried[t].rel_error,
                if same { best.history } else { Vec::new() },
                if same { best.rel_error_start } else { None },
            )
        } else {
            device.restore_kept_rows(&mut res.st)?;
            let loss = crate::profile::record("    refresh", || device.refresh(&mut res.st))?;
            let loss = undamped(device, &mut res.st, l.gram.damping(res.damp), loss)?;
            (
                if energy > 0.0 { loss / energy } else { 0.0 },
                Vec::new(),
                None,
            )
        };
        let held = if whole {
            // One candidate gave every row: its own score, to the bit.
            self.tried[k.tags[0] as usize]
                .rel_error_holdout
                .unwrap_or(f64::NAN)
        } else if res.holdout_energy > 0.0 {
            k.losses.iter().sum::<f64>() / res.holdout_energy
        } else {
            0.0
        };
        let mut rows_from: Vec<(String, usize)> = counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (self.tried[i].label.clone(), c))
            .collect();
        rows_from.sort_by_key(|r| std::cmp::Reverse(r.1));
        let chosen = if whole {
            rows_from[0].0.clone()
        } else {
            format!("rows: {}", describe_rows(&rows_from))
        };
        let mut tried = self.tried;
        if !whole {
            // The mix is a candidate of its own, the last one tried: the report's list holds
            // every quantization the search could ship, and the shipped one has the lowest
            // held-out error in it.
            tried.push(Tried {
                label: chosen.clone(),
                rel_error,
                rel_error_holdout: Some(held),
                score: held,
            });
        }
        let grid = Grid {
            delta: k.delta,
            lo: k.lo,
            ..best.grid
        };
        let outcome = LayerOutcome {
            layer: QuantizedLayer {
                rows: grid.rows,
                cols: grid.cols,
                bits,
                grid,
                codes: k.codes,
            },
            rel_error,
            rel_error_rtn: rtn_rel,
            energy,
            history,
            rel_error_start,
            seconds: start.elapsed().as_secs_f64(),
        };
        Ok(Choice {
            chosen,
            rel_error_holdout: Some(held),
            rel_error_holdout_rtn: rtn_held,
            outcome,
            tried,
            rows_from: if whole { Vec::new() } else { rows_from },
        })
    }
}

/// `gptq+1 s0.85 d0.1 ×612, gptq+1 s0.90 ×300, … (3 more)`: the candidates that gave most rows.
fn describe_rows(rows_from: &[(String, usize)]) -> String {
    const SHOWN: usize = 3;
    let mut s = rows_from
        .iter()
        .take(SHOWN)
        .map(|(l, c)| format!("{l} ×{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    if rows_from.len() > SHOWN {
        s.push_str(&format!(", … ({} more)", rows_from.len() - SHOWN));
    }
    s
}

/// Quantizes one layer with every candidate of `plan` around `cfg` and ships the one with the
/// lowest error on `holdout` (on `gram` when there is no held-out Gram).
///
/// The layer stays resident on the device for the whole search: `W`, `G` and the held-out Gram
/// go up once, a damping sets `G`'s diagonal (and the order it ranks), a candidate uploads its
/// grid only, every stage is scored on the held-out Gram on the device, the best is kept there,
/// and one download ships it.
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
    search_with(device, name, w, rows, cols, gram, holdout, cfg, plan, None)
}

/// [`search`], taking the GPTQ factors of `gram` from `factors` where they were built ahead
/// ([`super::prefactor`]; the same factors, so the same candidates and choice).
#[allow(clippy::too_many_arguments)]
pub fn search_with<D: Device>(
    device: &D,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
    holdout: Option<&Gram>,
    cfg: &QuantConfig,
    plan: &SearchPlan,
    factors: Option<&super::prefactor::FactorCache>,
) -> Result<Choice> {
    search_by(
        device,
        name,
        w,
        rows,
        cols,
        gram,
        holdout,
        cfg,
        plan,
        factors,
        ChooseBy::Layer,
    )
}

/// [`search_with`], shipping by `choose`: the best candidate whole, or each row from the
/// candidate whose row scored best on the held-out Gram.
#[allow(clippy::too_many_arguments)]
pub fn search_by<D: Device>(
    device: &D,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
    holdout: Option<&Gram>,
    cfg: &QuantConfig,
    plan: &SearchPlan,
    factors: Option<&super::prefactor::FactorCache>,
    choose: ChooseBy,
) -> Result<Choice> {
    let start = std::time::Instant::now();
    check_inputs(name, w, rows, cols, gram, cfg)?;
    // A block's factors are built before its Grams are handed over, so an empty cache has
    // none for this layer, and a device that holds no Gram holds none of this layer's: no
    // digest then.
    let cache = factors.filter(|c| !c.is_empty());
    let holds = device.holds_grams();
    let digest = (cache.is_some() || holds).then(|| gram.digest());
    let layer = Layer {
        name,
        w,
        rows,
        cols,
        gram,
        holdout,
        ready: cache
            .zip(digest)
            .map(|(cache, digest)| super::comq::Ready { cache, digest }),
        ranked: device.ranks_orders(cols),
        factored: device.builds_factors(cols),
        held: digest
            .filter(|_| holds)
            .map(|d| (d, holdout.map(|h| h.digest()))),
    };
    // The damped diagonal, the order and the GPTQ factor per damping, made once each: the
    // configured damping's here, the others' on a helper thread while the first candidates run.
    std::thread::scope(|sc| {
        let mut preps = Preparations::start(sc, &layer, cfg, plan)?;
        let mut states: Vec<Resident<D>> = Vec::new();
        let mut ledger = Ledger {
            tried: Vec::new(),
            best: None,
            by_scalar: Vec::new(),
            rtn: None,
            score_lam: gram.damping(plan.score_damp),
            // One scale for the whole layer (`--granularity layer`) cannot take rows from
            // candidates with different scales.
            by_row: choose.by_row(cols, holdout) && cfg.granularity == super::Granularity::Channel,
            row_states: Vec::new(),
        };
        let mut queue = Queue::new(cfg, plan);
        while let Some(c) = queue.next(&ledger) {
            c.validate()?;
            c.validate_for(name, rows, cols)?;
            let prep = preps.get(&layer, &c)?;
            let grid = crate::profile::record("    grids", || Grid::build(w, rows, cols, &c));
            // A state uploaded for this candidate starts on its grid; one kept from an earlier
            // candidate takes the grid in place.
            let si = match states.iter().position(|r| r.kind == c.order) {
                Some(i) => {
                    device.set_grid(&mut states[i].st, &grid.delta, &grid.lo)?;
                    i
                }
                None => {
                    states.push(crate::profile::record("    upload", || {
                        Resident::upload(device, &layer, &c, &grid, prep)
                    })?);
                    states.len() - 1
                }
            };
            let res = &mut states[si];
            let energy = res.damp_to(device, &layer, prep)?;
            let ctx = RunContext {
                grid: &grid,
                energy,
                lam: gram.damping(c.damp),
                factor: prep.factor.as_deref(),
                plan: prep.plan.as_ref(),
            };
            let run = ledger.tried.len();
            let stage = |sweeps: usize, rel_error: f64| Stage {
                label: label(&c, sweeps),
                rel_error,
                scalar: queue.configured(&c),
                state: si,
                grid: &grid,
                energy,
                run,
                holdout_energy: holdout.map(|_| res.holdout_energy),
            };
            // Every stage of the run (its start and each sweep) is scored as it is taken; the
            // best so far is kept on the device, so memory does not grow with --sweeps.
            let mut staged = false;
            let stats = {
                let ledger = &mut ledger;
                let mut hook = |st: &mut D::Layer, sweeps: usize, rel_error: f64| -> Result<()> {
                    staged = true;
                    ledger.consider(device, st, stage(sweeps, rel_error))?;
                    Ok(())
                };
                crate::profile::record("  candidates", || {
                    run_on(device, &mut res.st, &c, &ctx, Some(&mut hook), false)
                })?
            };
            // A run without stages (RTN) is a candidate itself; the first is the report's RTN.
            if !staged {
                let held =
                    ledger.consider(device, &mut res.st, stage(c.sweeps, stats.rel_error))?;
                ledger.rtn.get_or_insert((stats.rel_error, held));
            }
            if let Some(b) = ledger.best.as_mut().filter(|b| b.run == run) {
                b.history = stats.history;
                b.rel_error_start = stats.rel_error_start;
            }
        }
        ledger.ship(device, &mut states, &layer, cfg.bits, start)
    })
}

/// A grid shrink as the line search spells it: rounded to hundredths, so steps taken from
/// different starts name the same shrink.
fn canonical_scalar(s: f32) -> f32 {
    (s * 100.0).round() / 100.0
}

/// The grid shrinks a line search may visit: [`MIN_SCALAR`] to 1 in [`SCALAR_STEP`]s.
fn line_scalars() -> Vec<f32> {
    let steps = ((1.0 - MIN_SCALAR) / SCALAR_STEP).round() as usize;
    (0..=steps)
        .map(|k| canonical_scalar(MIN_SCALAR + k as f32 * SCALAR_STEP))
        .collect()
}

/// Where the quick plan's line search starts on a layer: of the shrinks it may visit, the one
/// whose round-to-nearest error weighted by the Gram's diagonal, `Σ_ij G_jj·(W_ij − Q_ij)²`, is
/// lowest (ties go to the larger shrink); `fallback` when every shrink gives the same error (an
/// all-zero layer or Gram).
///
/// The weighted RTN error is what the candidates' errors reduce to when the inputs are
/// uncorrelated, and `O(mn)` per shrink: eleven of them cost less than one candidate's `O(mn²)`
/// product. The line search then moves from it while a neighbour scores better on the held-out
/// images, so the start decides how many runs a layer takes, and which of two minima the search
/// finds where the held-out error has more than one. The sums are per row, then over the rows in
/// order, so the start is the same on any number of threads and on every device.
pub fn start_scalar(
    w: &[f32],
    rows: usize,
    cols: usize,
    gram: &Gram,
    cfg: &QuantConfig,
    fallback: f32,
) -> f32 {
    use rayon::prelude::*;
    let scalars = line_scalars();
    let grids = Grid::build_shrinks(w, rows, cols, cfg, &scalars);
    let diag: Vec<f32> = gram.diag().iter().map(|&d| d.max(0.0) as f32).collect();
    let k = scalars.len();
    let mut per_row = vec![0.0f64; rows * k];
    per_row
        .par_chunks_mut(k)
        .zip(w.par_chunks(cols.max(1)))
        .enumerate()
        .for_each(|(i, (out, row))| {
            for (o, g) in out.iter_mut().zip(&grids) {
                let (gs, ng, levels) = (g.group_size, g.groups(), g.levels());
                *o = row
                    .chunks(gs)
                    .zip(diag.chunks(gs))
                    .enumerate()
                    .map(|(s, (xs, ds))| {
                        let (delta, lo) = (g.delta[i * ng + s], g.lo[i * ng + s]);
                        weighted_rtn_error(xs, ds, delta, lo, levels) as f64
                    })
                    .sum();
            }
        });
    let errors: Vec<f64> = (0..k)
        .map(|s| (0..rows).map(|i| per_row[i * k + s]).sum())
        .collect();
    let mut best = k - 1;
    for s in (0..k - 1).rev() {
        if errors[s] < errors[best] {
            best = s;
        }
    }
    if errors.iter().all(|&e| e == errors[0]) {
        return fallback;
    }
    scalars[best]
}

/// `Σ_j d_j·(x_j − Δ·k_j)²` in f32 for one range, `k_j` the code nearest to `x_j` on it, in
/// eight lanes that the compiler vectorises. Ties round to even here (adding and subtracting
/// 1.5·2²³), not down as [`crate::numeric::grid::nearest_code`] has them: a start needs no
/// exact ties, and the baseline x86-64 has no rounding instruction to vectorise.
fn weighted_rtn_error(xs: &[f32], ds: &[f32], delta: f32, lo: i32, levels: i32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let inv = 1.0 / delta;
    let (lo_f, hi_f) = (lo as f32, (lo + levels - 1) as f32);
    let err = |x: f32, d: f32| {
        let k = (x * inv + ROUND) - ROUND;
        let k = if k < lo_f { lo_f } else { k };
        let k = if k > hi_f { hi_f } else { k };
        let r = x - delta * k;
        d * r * r
    };
    let mut acc = [0.0f32; 8];
    let (xc, dc) = (xs.chunks_exact(8), ds.chunks_exact(8));
    let (xr, dr) = (xc.remainder(), dc.remainder());
    for (x, d) in xc.zip(dc) {
        for l in 0..8 {
            acc[l] += err(x[l], d[l]);
        }
    }
    let tail: f32 = xr.iter().zip(dr).map(|(&x, &d)| err(x, d)).sum();
    acc.iter().sum::<f32>() + tail
}

/// The order candidates are tried in: [`first_candidates`], then the line search down the grid
/// shrinks while the smallest one tried scores best, then the other dampings at the best shrink.
struct Queue<'a> {
    cfg: &'a QuantConfig,
    plan: &'a SearchPlan,
    queue: std::collections::VecDeque<QuantConfig>,
    /// Shrinks the line search added.
    extended: Vec<f32>,
    damps_done: bool,
    damp_stage: bool,
}

impl<'a> Queue<'a> {
    fn new(cfg: &'a QuantConfig, plan: &'a SearchPlan) -> Queue<'a> {
        Queue {
            cfg,
            plan,
            queue: first_candidates(cfg, plan).into(),
            extended: Vec::new(),
            damps_done: plan.damps.is_empty() || cfg.method != Method::Comq,
            damp_stage: false,
        }
    }

    /// The next candidate, given the scores so far; `None` when the search is over.
    fn next(&mut self, ledger: &Ledger) -> Option<QuantConfig> {
        let (cfg, plan) = (self.cfg, self.plan);
        loop {
            if let Some(c) = self.queue.pop_front() {
                return Some(c);
            }
            let best = ledger.by_scalar.iter().min_by(|a, b| a.1.total_cmp(&b.1));
            // The line search: while the smallest shrink tried is the best, try the next one
            // down; else while the largest is, the next one up.
            if plan.line_search && !self.damp_stage {
                let tried = ledger.by_scalar.iter().map(|e| e.0);
                let lowest = tried.clone().fold(f32::INFINITY, f32::min);
                let highest = tried.fold(f32::NEG_INFINITY, f32::max);
                let b = best.map(|e| e.0);
                let next = if b == Some(lowest) && lowest - SCALAR_STEP >= MIN_SCALAR - 1e-6 {
                    Some(lowest - SCALAR_STEP)
                } else if b == Some(highest) && highest + SCALAR_STEP <= 1.0 + 1e-6 {
                    Some(highest + SCALAR_STEP)
                } else {
                    None
                };
                if let Some(next) = next {
                    let next = canonical_scalar(next);
                    if plan.rtn_scalars {
                        self.queue.push_back(QuantConfig {
                            method: Method::Rtn,
                            scalar: next,
                            ..cfg.clone()
                        });
                    }
                    self.queue.push_back(QuantConfig {
                        scalar: next,
                        ..cfg.clone()
                    });
                    self.extended.push(next);
                    continue;
                }
            }
            if self.damps_done {
                return None;
            }
            self.damps_done = true;
            self.damp_stage = true;
            if let Some(&(s, _)) = best {
                for &d in plan.damps.iter().filter(|&&d| d != cfg.damp) {
                    self.queue.push_back(QuantConfig {
                        scalar: s,
                        damp: d,
                        ..cfg.clone()
                    });
                }
            }
        }
    }

    /// The shrink `c` counts for in the line search: the configured method at a shrink of the
    /// plan or of the line search (`None` for every other candidate).
    fn configured(&self, c: &QuantConfig) -> Option<f32> {
        let cfg = self.cfg;
        (c.method == cfg.method
            && c.init == cfg.init
            && c.damp == cfg.damp
            && (self.plan.scalars.contains(&c.scalar) || self.extended.contains(&c.scalar)))
        .then_some(c.scalar)
    }
}

/// One stage of a run, as the ledger books it (its codes are in the device state).
struct Stage<'g> {
    label: String,
    rel_error: f64,
    /// The shrink it counts for in the line search.
    scalar: Option<f32>,
    /// Which resident state holds it.
    state: usize,
    grid: &'g Grid,
    energy: f64,
    /// The run it belongs to.
    run: usize,
    /// The held-out energy, when there is a held-out Gram.
    holdout_energy: Option<f64>,
}

/// The search's preparations (`Prepared`) per damping: the configured one built first on the
/// calling thread; the paper candidate's and the other dampings' built beside it on a helper
/// thread (the GPTQ factor of a 4096-wide layer takes about a second on the host, and a GPU
/// would wait for it), joined when a candidate first needs one of them.
struct Preparations<'s> {
    ready: Vec<Prepared>,
    beside: Option<std::thread::ScopedJoinHandle<'s, Result<Vec<Prepared>>>>,
}

impl<'s> Preparations<'s> {
    fn start<'e: 's>(
        sc: &'s std::thread::Scope<'s, 'e>,
        l: &'e Layer<'e>,
        cfg: &QuantConfig,
        plan: &SearchPlan,
    ) -> Result<Preparations<'s>> {
        let mut others: Vec<QuantConfig> = Vec::new();
        if plan.paper {
            others.push(paper_config(cfg));
        }
        if cfg.method == Method::Comq {
            others.extend(plan.damps.iter().map(|&damp| QuantConfig {
                damp,
                ..cfg.clone()
            }));
        }
        others.retain(|c| c.damp != cfg.damp || c.order != cfg.order);
        let beside = (!others.is_empty()).then(|| {
            let profile = crate::profile::current();
            sc.spawn(move || {
                let build = || {
                    crate::profile::record("  prepare beside", || {
                        others
                            .iter()
                            .map(|c| {
                                Prepared::new(
                                    l.w, l.rows, l.cols, l.gram, c, l.ready, l.ranked, l.factored,
                                )
                            })
                            .collect::<Result<Vec<_>>>()
                    })
                };
                match &profile {
                    Some(p) => crate::profile::with_current(p, build),
                    None => build(),
                }
            })
        });
        let first = crate::profile::record("  prepare", || {
            Prepared::new(
                l.w, l.rows, l.cols, l.gram, cfg, l.ready, l.ranked, l.factored,
            )
        })?;
        Ok(Preparations {
            ready: vec![first],
            beside,
        })
    }

    /// The preparation a run of `c` uses: a ready one, the helper's once it is joined, else one
    /// built now.
    fn get(&mut self, l: &Layer<'_>, c: &QuantConfig) -> Result<&Prepared> {
        if !self.ready.iter().any(|p| p.fits(c)) {
            if let Some(h) = self.beside.take() {
                let built = h
                    .join()
                    .map_err(|_| crate::error::Error::WorkerPanicked("search preparation"))??;
                self.ready.extend(built);
            }
        }
        if !self.ready.iter().any(|p| p.fits(c)) {
            let p = crate::profile::record("  prepare", || {
                Prepared::new(
                    l.w, l.rows, l.cols, l.gram, c, l.ready, l.ranked, l.factored,
                )
            })?;
            self.ready.push(p);
        }
        Ok(self.ready.iter().find(|p| p.fits(c)).expect("pushed above"))
    }
}

/// The paper's recipe as a candidate: one greedy sweep from `W`, undamped, full grid.
fn paper_config(cfg: &QuantConfig) -> QuantConfig {
    QuantConfig {
        method: Method::Comq,
        init: Init::W,
        damp: 0.0,
        scalar: 1.0,
        sweeps: 1,
        order: OrderKind::Greedy,
        ..cfg.clone()
    }
}

/// What a stage is compared on: its held-out error, else its calibration error plus the
/// scoring damping's term `λ_s·‖W − Q̂‖² / ‖X·Wᵀ‖²` (`score_lam` is `λ_s·mean(diag G)`).
fn score_of<D: Device>(
    device: &D,
    st: &mut D::Layer,
    held: Option<f64>,
    rel_error: f64,
    score_lam: f64,
    energy: f64,
) -> Result<f64> {
    Ok(match held {
        Some(h) => h,
        None if score_lam > 0.0 && energy > 0.0 => {
            rel_error + score_lam * device.error_sqnorm(st)? / energy
        }
        None => rel_error,
    })
}

/// A candidate's held-out relative error, on the device.
fn held_out<D: Device>(device: &D, st: &mut D::Layer, energy: f64) -> Result<f64> {
    crate::profile::record("  scoring", || {
        let loss = device.holdout_product(st, false)?;
        Ok(if energy > 0.0 { loss / energy } else { 0.0 })
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
        configs.push(paper_config(cfg));
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
