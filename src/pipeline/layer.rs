//! One layer of a run, as a function of its inputs: the saved result of an interrupted run, or
//! the Gram matrices, the RTN twin for `--eval`, the `--equalize` fold, the quantization (a
//! search when asked) with the GPU → CPU fallback of `--device auto`, and the `--verify-cpu`
//! re-run. The thread scope around it ([`super::stream`]) moves the weights in and the codes
//! out; this file decides what a layer's codes are.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use super::equalize::{fold, EqSite, Folded};
use super::jobs::Job;
use super::options::RunOptions;
use super::report::{peak_rss_bytes, LayerReport, VerifyReport};
use super::vision::job_grams;
use super::Progress;
use crate::calibrate::BlockGrams;
use crate::device::{AnyDevice, CpuDevice, DeviceKind};
use crate::error::{Error, Result};
use crate::eval::SwappedWeights;
use crate::io::calib::CalibKind;
use crate::io::{Calibration, Checkpoint};
use crate::profile::Profile;
use crate::quant::search::Choice;
use crate::quant::{Gram, LayerOutcome, Method, QuantConfig};
use crate::resume::WorkDir;

/// What every layer of a run reads and none changes.
pub(super) struct LayerEnv<'a> {
    pub(super) opts: &'a RunOptions,
    pub(super) model: &'a Checkpoint,
    pub(super) calib: Option<&'a Calibration>,
    pub(super) work: Option<&'a WorkDir>,
    /// `--equalize` sites by layer prefix.
    pub(super) eq_sites: &'a HashMap<String, EqSite>,
    /// Job indices re-run on the CPU (`--verify-cpu`).
    pub(super) verify_at: &'a BTreeSet<usize>,
    pub(super) profile: &'a Profile,
    /// Full-precision image calibration, one block ahead on its own thread.
    pub(super) fp_mode: bool,
    /// GPTQ factors built ahead on the calibration thread ([`crate::quant::prefactor`]).
    pub(super) factors: &'a crate::quant::prefactor::FactorCache,
    /// A calibration file's Grams (and their factors) built one layer ahead on their own thread.
    pub(super) grams_ahead: bool,
    /// The widest Gram whose GPTQ factors the device builds itself
    /// ([`crate::device::Device::builds_factors`]; 0: none): none are built ahead for those.
    pub(super) device_factors: usize,
}

/// What layers change as a run goes on.
pub(super) struct LayerState {
    /// The device in use: `--device auto` falls back to the CPU after a GPU error.
    pub(super) device: AnyDevice,
    /// Its description, for the report.
    pub(super) device_name: String,
    /// The scales of the `--equalize` sites met so far, by LayerNorm weight name.
    pub(super) eq_scales: HashMap<String, Vec<f32>>,
    /// Round-to-nearest of every layer as it is in the input, for `--eval`'s baseline row.
    pub(super) rtn_weights: SwappedWeights,
}

impl LayerState {
    /// The state of a run that starts on `device`.
    pub(super) fn new(device: AnyDevice) -> LayerState {
        LayerState {
            device_name: device.describe(),
            device,
            eq_scales: HashMap::new(),
            rtn_weights: SwappedWeights::new(),
        }
    }
}

/// The calibrators of an images run: calibration and held-out (each `None` without images).
pub(super) struct Calibrators<'c> {
    pub(super) grams: Option<Box<dyn BlockGrams + 'c>>,
    pub(super) holdout: Option<Box<dyn BlockGrams + 'c>>,
}

impl Calibrators<'_> {
    /// Hands the dequantized weights of a finished layer to the calibrators that feed them
    /// forward (the sequential mode's next blocks).
    pub(super) fn quantized(&mut self, job: &Job, deq: &[f32]) {
        if let Some((b, role)) = job.block {
            for g in [self.grams.as_mut(), self.holdout.as_mut()]
                .into_iter()
                .flatten()
            {
                g.quantized(b, role, deq);
            }
        }
    }
}

/// One layer's result.
pub(super) struct LayerDone {
    pub(super) outcome: LayerOutcome,
    /// Activation rows behind its Gram matrix.
    pub(super) samples: u64,
    /// Loaded from the work directory (`--resume`).
    pub(super) resumed: bool,
    pub(super) verify: Option<VerifyReport>,
    pub(super) choice: Option<Choice>,
    /// LayerNorm tensors this layer's `--equalize` site fixed, to be written now.
    pub(super) folded: Vec<Folded>,
    /// Bytes this layer moved to and from a GPU, `(up, down)` (`None` on the CPU).
    pub(super) device_bytes: Option<(u64, u64)>,
}

/// The share of a calibration file's activation rows a layer holds out to choose on: the
/// run's `--holdout` for a searched COMQ layer, else none.
pub(super) fn held_share(opts: &RunOptions, job: &Job) -> f32 {
    match (&opts.search, job.config.method) {
        (Some(_), Method::Comq) => opts.holdout,
        _ => 0.0,
    }
}

/// A layer's Grams built ahead of it (a calibration file's, on their own thread): `None` when
/// they were not, and the layer builds them itself.
pub(super) type GramsAhead = Option<Result<(Gram, Option<Gram>)>>;

/// Quantizes job `index` from its weights as read (`fetched`), or reuses the saved result of an
/// interrupted run with the same weights. `ahead` holds its Grams when they were built ahead.
#[allow(clippy::too_many_arguments)]
pub(super) fn quantize_job(
    env: &LayerEnv<'_>,
    state: &mut LayerState,
    cal: &mut Calibrators<'_>,
    index: usize,
    job: &Job,
    fetched: Result<Vec<f32>>,
    ahead: GramsAhead,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<LayerDone> {
    let name = job.meta.name.as_str();
    // What a saved layer was computed from: a resume reuses it only for the same weight bytes
    // (a same-size edit with the time stamp restored passes the file fingerprint, not this).
    let weights_sha = match (env.work, &fetched) {
        (Some(_), Ok(w)) => Some(crate::resume::weights_digest(w)),
        _ => None,
    };
    if let (Some(work), true, Some(h)) = (env.work, env.opts.resume, &weights_sha) {
        if let Some(s) = work.load(index, name, job.rows, job.cols, h)? {
            log::info!("{name}: resumed from the work directory");
            return Ok(LayerDone {
                outcome: s.outcome,
                samples: s.samples,
                resumed: true,
                verify: None,
                choice: None,
                folded: Vec::new(),
                device_bytes: None,
            });
        }
    }
    progress(Progress::Stage {
        name,
        stage: "read",
    });
    let w = fetched?;
    let traffic_before = state.device.traffic();
    progress(Progress::Stage {
        name,
        stage: "calibration",
    });
    let t = Instant::now();
    // A searched layer calibrated from activations holds some of their rows out to choose on.
    let held_share = held_share(env.opts, job);
    // Grams built ahead on a GPU that has failed since are built again here, on the device
    // the run went on with.
    let ahead = match ahead {
        Some(Err(Error::Gpu { .. })) if !matches!(state.device, AnyDevice::Wgpu(_)) => None,
        a => a,
    };
    let was_ahead = ahead.is_some();
    let (gram, held) = match ahead {
        Some(r) => r?,
        None => job_grams(
            job,
            env.calib,
            &state.device,
            &mut cal.grams,
            &mut cal.holdout,
            held_share,
        )?,
    };
    let cross = super::vision::job_cross(job, &mut cal.grams)?;
    let secs = t.elapsed().as_secs_f64();
    match job.calib {
        // In step, the calibrator's own forward and gram stages hold this time.
        Some(CalibKind::Images) if env.fp_mode => env.profile.add("calibration wait", secs),
        Some(CalibKind::Images) | None => {}
        // Built ahead: that thread holds their time, the stream its wait for them.
        Some(_) if was_ahead => {}
        Some(_) => env.profile.add("gram", secs),
    }
    let t_quantize = Instant::now();
    progress(Progress::Stage {
        name,
        stage: "quantize",
    });
    if env.opts.eval.is_some() {
        let rtn = rtn_twin(job, &w, &gram)?;
        state.rtn_weights.insert(job.meta.name.clone(), rtn);
    }
    let (w, gram, held, folded) = match env.eq_sites.get(&job.prefix) {
        Some(site) => fold(env.model, site, &mut state.eq_scales, name, w, gram, held)?,
        None => (w, gram, held, Vec::new()),
    };
    // The corrected target: what this layer must output from the inputs the quantized prefix
    // gives it (`quant::correct`).
    let w = match &cross {
        Some(c) => crate::quant::correct::corrected_target(
            &w,
            job.rows,
            job.cols,
            &gram,
            c,
            crate::quant::correct::correction_ridge(job.cols, gram.samples),
        )
        .map_err(|e| Error::Shape(format!("{name}: {e}")))?,
        None => w,
    };
    let problem = Problem {
        job,
        w: &w,
        gram: &gram,
        held: held.as_ref(),
        search: env.opts.search.as_ref(),
        choose: env.opts.choose,
        factors: env.factors,
    };
    let (outcome, choice) = match problem.quantize(&state.device) {
        Err(e @ Error::Gpu { .. }) if env.opts.device == DeviceKind::Auto => {
            log::warn!("{e}; --device auto continues on the CPU from this layer on");
            state.device = AnyDevice::Cpu(CpuDevice::new());
            state.device_name = state.device.describe();
            problem.quantize(&state.device)?
        }
        other => other?,
    };
    let verify = match env.verify_at.contains(&index) && matches!(state.device, AnyDevice::Wgpu(_))
    {
        true => Some(problem.verify(&outcome)?),
        false => None,
    };
    env.profile
        .add("quantize", t_quantize.elapsed().as_secs_f64());
    if let Some(work) = env.work {
        work.save(
            index,
            name,
            &outcome,
            gram.samples,
            weights_sha.as_deref().unwrap_or_default(),
        )?;
    }
    let device_bytes = match (traffic_before, state.device.traffic()) {
        (Some((u0, d0)), Some((u1, d1))) => Some((u1 - u0, d1 - d0)),
        _ => None,
    };
    Ok(LayerDone {
        outcome,
        samples: gram.samples,
        resumed: false,
        verify,
        choice,
        folded,
        device_bytes,
    })
}

/// Round-to-nearest of the layer as it is in the input, on the CPU (`--eval`'s RTN row).
fn rtn_twin(job: &Job, w: &[f32], gram: &Gram) -> Result<Vec<f32>> {
    let cfg = QuantConfig {
        method: Method::Rtn,
        ..job.config.clone()
    };
    let r = crate::quant::quantize_layer(
        &CpuDevice::new(),
        &job.meta.name,
        w,
        job.rows,
        job.cols,
        gram,
        &cfg,
    )?;
    Ok(r.layer.dequantize())
}

/// A layer's quantization problem, ready for any device.
struct Problem<'a> {
    job: &'a Job,
    w: &'a [f32],
    gram: &'a Gram,
    held: Option<&'a Gram>,
    search: Option<&'a crate::quant::search::SearchPlan>,
    choose: crate::quant::search::ChooseBy,
    factors: &'a crate::quant::prefactor::FactorCache,
}

impl Problem<'_> {
    /// The layer's outcome on `device`, and the search's choice when there is a search. A
    /// search needs data: with `G = I` every candidate would be scored on the weights alone,
    /// so data-free layers and other methods are quantized once.
    fn quantize(&self, device: &AnyDevice) -> Result<(LayerOutcome, Option<Choice>)> {
        let job = self.job;
        let plan = self
            .search
            .filter(|_| job.calib.is_some() && job.config.method == Method::Comq);
        match plan {
            Some(p) => {
                let p = p.for_layer(self.w, job.rows, job.cols, self.gram, &job.config);
                let c = device.search_by(
                    &job.meta.name,
                    self.w,
                    job.rows,
                    job.cols,
                    self.gram,
                    self.held,
                    &job.config,
                    &p,
                    Some(self.factors),
                    self.choose,
                )?;
                Ok((c.outcome.clone(), Some(c)))
            }
            None => Ok((
                device.quantize_layer(
                    &job.meta.name,
                    self.w,
                    job.rows,
                    job.cols,
                    self.gram,
                    &job.config,
                )?,
                None,
            )),
        }
    }

    /// The same layer re-run on the CPU, compared with the device's `outcome`.
    fn verify(&self, outcome: &LayerOutcome) -> Result<VerifyReport> {
        let c = self.quantize(&AnyDevice::Cpu(CpuDevice::new()))?.0;
        Ok(compare_codes(&c, outcome))
    }
}

/// How far `device`'s codes are from the CPU's (`cpu`).
fn compare_codes(cpu: &LayerOutcome, device: &LayerOutcome) -> VerifyReport {
    let pairs = cpu.layer.codes.iter().zip(&device.layer.codes);
    let differ = pairs.clone().filter(|(a, b)| a != b).count();
    VerifyReport {
        code_disagreement: differ as f64 / cpu.layer.codes.len().max(1) as f64,
        max_code_diff: pairs.map(|(a, b)| (a - b).abs()).max().unwrap_or(0),
        rel_error_cpu: cpu.rel_error,
    }
}

/// The job indices `--verify-cpu k` re-runs on the CPU: `k` of `n`, spread evenly from the
/// first to the last (none when the run is on the CPU already).
pub(super) fn verify_indices(opts: &RunOptions, device: &AnyDevice, n: usize) -> BTreeSet<usize> {
    if opts.verify_cpu == 0 {
        return BTreeSet::new();
    }
    if !matches!(device, AnyDevice::Wgpu(_)) {
        log::info!("--verify-cpu: the run is on the CPU already, nothing to verify");
        return BTreeSet::new();
    }
    spread(opts.verify_cpu.min(n), n)
}

/// `k` indices of `0..n` spread evenly, the first and the last included when `k ≥ 2`.
fn spread(k: usize, n: usize) -> BTreeSet<usize> {
    (0..k)
        .map(|i| if k == 1 { 0 } else { i * (n - 1) / (k - 1) })
        .collect()
}

/// The report line of a finished layer; `seconds` is its wall time, read plus quantize.
pub(super) fn layer_report(job: &Job, done: &LayerDone, seconds: f64, device: &str) -> LayerReport {
    let outcome = &done.outcome;
    let choice = done.choice.as_ref();
    LayerReport {
        name: job.meta.name.clone(),
        shape: [job.rows, job.cols],
        bits: job.config.bits,
        group_size: job.config.group_size,
        rel_error: outcome.rel_error,
        rel_error_rtn: outcome.rel_error_rtn,
        loss_history: outcome.history.clone(),
        seconds,
        device: device.to_string(),
        calibration: match job.calib {
            Some(CalibKind::Input) => "input",
            Some(CalibKind::Gram) => "gram",
            Some(CalibKind::Images) => "images",
            None => "identity",
        },
        samples: done.samples,
        peak_rss_bytes: peak_rss_bytes(),
        resumed: done.resumed,
        verify_cpu: done.verify.clone(),
        chosen: choice.map(|c| c.chosen.clone()),
        rel_error_holdout: choice.and_then(|c| c.rel_error_holdout),
        rel_error_holdout_rtn: choice.and_then(|c| c.rel_error_holdout_rtn),
        candidates: choice.map(|c| c.tried.clone()).unwrap_or_default(),
        rows_from: choice.map(|c| c.rows_from.clone()).unwrap_or_default(),
        device_bytes_up: done.device_bytes.map(|b| b.0),
        device_bytes_down: done.device_bytes.map(|b| b.1),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{base, tiny_model};
    use super::*;

    fn job_of(model: &Checkpoint, name: &str, config: QuantConfig) -> Job {
        let meta = model
            .tensors()
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .clone();
        Job {
            prefix: name.trim_end_matches(".weight").into(),
            rows: meta.shape[0],
            cols: meta.shape[1],
            meta,
            config,
            calib: None,
            block: None,
            bits_fixed: false,
        }
    }

    /// The job's layer quantized straight by the algorithm, data-free, on the CPU.
    fn data_free(job: &Job, w: &[f32]) -> LayerOutcome {
        let g = Gram::identity(job.cols);
        let cpu = CpuDevice::new();
        crate::quant::quantize_layer(&cpu, &job.meta.name, w, job.rows, job.cols, &g, &job.config)
            .unwrap()
    }

    fn env<'a>(
        opts: &'a RunOptions,
        model: &'a Checkpoint,
        sites: &'a HashMap<String, EqSite>,
        verify: &'a BTreeSet<usize>,
        profile: &'a Profile,
    ) -> LayerEnv<'a> {
        LayerEnv {
            opts,
            model,
            calib: None,
            work: None,
            eq_sites: sites,
            verify_at: verify,
            profile,
            fp_mode: false,
            factors: Box::leak(Box::default()),
            grams_ahead: false,
            device_factors: 0,
        }
    }

    #[test]
    fn a_layer_step_gives_the_codes_of_the_algorithm_and_reports_its_stages() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let mut opts = base();
        opts.eval = Some(super::super::EvalOptions {
            path: "e".into(),
            count: None,
        });
        let (sites, verify, profile) = (HashMap::new(), BTreeSet::new(), Profile::new(true));
        let env = env(&opts, &model, &sites, &verify, &profile);
        let job = job_of(&model, "fc.weight", opts.config.clone());
        let w = model.read_f32(&job.meta).unwrap();
        let mut state = LayerState::new(AnyDevice::Cpu(CpuDevice::new()));
        let mut cal = Calibrators {
            grams: None,
            holdout: None,
        };
        let mut stages = Vec::new();
        let done = quantize_job(
            &env,
            &mut state,
            &mut cal,
            0,
            &job,
            Ok(w.clone()),
            None,
            &mut |p| {
                if let Progress::Stage { stage, .. } = p {
                    stages.push(stage)
                }
            },
        )
        .unwrap();
        assert_eq!(stages, ["read", "calibration", "quantize"]);
        let direct = data_free(&job, &w);
        assert_eq!(done.outcome.layer.codes, direct.layer.codes);
        assert!(!done.resumed && done.choice.is_none() && done.folded.is_empty());
        // --eval keeps the RTN twin of the input layer.
        let rtn = rtn_twin(&job, &w, &Gram::identity(job.cols)).unwrap();
        assert_eq!(state.rtn_weights["fc.weight"], rtn);
        let r = layer_report(&job, &done, 1.5, &state.device_name);
        assert_eq!(r.calibration, "identity");
        assert_eq!((r.shape, r.seconds), ([job.rows, job.cols], 1.5));
        assert_eq!(r.rel_error, direct.rel_error);
    }

    #[test]
    fn a_read_error_fails_the_layer_and_a_saved_layer_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let mut opts = base();
        let (sites, verify, profile) = (HashMap::new(), BTreeSet::new(), Profile::new(false));
        let job = job_of(&model, "fc.weight", opts.config.clone());
        let w = model.read_f32(&job.meta).unwrap();
        let mut state = LayerState::new(AnyDevice::Cpu(CpuDevice::new()));
        let mut cal = Calibrators {
            grams: None,
            holdout: None,
        };
        let e = env(&opts, &model, &sites, &verify, &profile);
        let err = quantize_job(
            &e,
            &mut state,
            &mut cal,
            0,
            &job,
            Err(Error::Shape("unreadable".into())),
            None,
            &mut |_| {},
        );
        assert!(matches!(err, Err(Error::Shape(_))));

        // A layer saved by an earlier run with the same weights comes back as saved.
        let work_dir = dir.path().join("work");
        let work = WorkDir::open(&work_dir, "fp", false).unwrap();
        let first = {
            let mut e = env(&opts, &model, &sites, &verify, &profile);
            e.work = Some(&work);
            quantize_job(
                &e,
                &mut state,
                &mut cal,
                0,
                &job,
                Ok(w.clone()),
                None,
                &mut |_| {},
            )
            .unwrap()
        };
        drop(work);
        opts.resume = true;
        let work = WorkDir::open(&work_dir, "fp", true).unwrap();
        let mut e = env(&opts, &model, &sites, &verify, &profile);
        e.work = Some(&work);
        let mut stages = 0;
        let again = quantize_job(&e, &mut state, &mut cal, 0, &job, Ok(w), None, &mut |_| {
            stages += 1
        })
        .unwrap();
        assert!(again.resumed && !first.resumed);
        assert_eq!(stages, 0, "a resumed layer reports no stages");
        assert_eq!(again.outcome.layer.codes, first.outcome.layer.codes);
    }

    #[test]
    fn verify_indices_spread_from_first_to_last() {
        assert_eq!(spread(1, 10), BTreeSet::from([0]));
        assert_eq!(spread(2, 10), BTreeSet::from([0, 9]));
        assert_eq!(spread(3, 10), BTreeSet::from([0, 4, 9]));
        assert_eq!(spread(5, 5), (0..5).collect());
        let mut opts = base();
        opts.verify_cpu = 3;
        let cpu = AnyDevice::Cpu(CpuDevice::new());
        assert!(verify_indices(&opts, &cpu, 10).is_empty());
    }

    #[test]
    fn compared_codes_count_disagreements() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let job = job_of(&model, "fc.weight", base().config);
        let w = model.read_f32(&job.meta).unwrap();
        let a = data_free(&job, &w);
        let mut b = a.clone();
        b.layer.codes[0] += 2;
        let v = compare_codes(&a, &b);
        assert_eq!(v.max_code_diff, 2);
        assert_eq!(v.code_disagreement, 1.0 / a.layer.codes.len() as f64);
        assert_eq!(compare_codes(&a, &a).code_disagreement, 0.0);
    }
}
