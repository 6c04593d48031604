//! The last stage of a run: the codes digest into the outputs' metadata, both outputs finished
//! (metadata, sync, rename, side files), the work directory removed, every input and output
//! hashed, and the report assembled and written.

use std::collections::BTreeMap;
use std::time::Instant;

use super::outputs::finish_writers;
use super::report::{calib_label, peak_rss_bytes, sha256_file, RunReport, Totals};
use super::stream::Streamed;
use super::{Inputs, Progress, RunOptions};
use crate::error::Result;
use crate::eval::EvalReport;
use crate::profile::Profile;
use crate::resume::WorkDir;

/// What the earlier stages hand to the last one.
pub(super) struct Finished {
    pub(super) streamed: Streamed,
    /// The outputs' metadata, without the codes digest yet.
    pub(super) meta: BTreeMap<String, String>,
    pub(super) work: Option<WorkDir>,
    pub(super) eval: Option<EvalReport>,
    pub(super) mixed: Option<super::mixed::MixedPrecision>,
    /// The device that ran the last layer.
    pub(super) device: String,
    /// Bytes it uploaded and read back (a GPU; `None` on the CPU).
    pub(super) traffic: Option<(u64, u64)>,
    /// When the run started.
    pub(super) started: Instant,
}

/// Finishes the outputs and returns the run's report (also written to `--report`).
pub(super) fn finish(
    opts: &RunOptions,
    inputs: &Inputs,
    done: Finished,
    profile: &Profile,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<RunReport> {
    let Finished {
        streamed,
        mut meta,
        work,
        eval,
        mixed,
        device,
        traffic,
        started,
    } = done;
    let (model, jobs) = (&inputs.model, &inputs.jobs);
    meta.insert("comq.codes_sha256".into(), streamed.codes_sha256.clone());
    progress(Progress::Writing);
    let t_finish = Instant::now();
    let (packed, dequant) = streamed.writers;
    let (outputs, written) = finish_writers(opts, model, jobs, packed, dequant, &meta)?;
    if let Some(w) = work {
        w.remove()?;
    }
    let mut input_sha256 = BTreeMap::new();
    for f in model.files().into_iter().chain(opts.calib.as_deref()) {
        input_sha256.insert(f.display().to_string(), sha256_file(f)?);
    }
    let mut output_sha256 = BTreeMap::new();
    for f in &written {
        output_sha256.insert(f.display().to_string(), sha256_file(f)?);
    }
    profile.add("finish", t_finish.elapsed().as_secs_f64());
    let wall = started.elapsed().as_secs_f64();
    let layers = streamed.layers;
    // No layer (a --rotate export) averages to 0, not NaN.
    let n = (layers.len() as f64).max(1.0);
    // Held-out images, or held-out activation rows on any layer.
    let holdout = match &inputs.vision {
        Some(v) if !v.holdout_idx.is_empty() => opts.holdout,
        _ if layers.iter().any(|l| l.rel_error_holdout.is_some()) => opts.holdout,
        _ => 0.0,
    };
    let report = RunReport {
        tool: "comq-gpu",
        version: env!("CARGO_PKG_VERSION"),
        model: opts.model.display().to_string(),
        device,
        options: opts.config.clone(),
        calibration: calib_label(opts),
        data_free: layers.iter().any(|l| l.calibration == "identity"),
        totals: Totals {
            layers: layers.len(),
            weights: layers.iter().map(|l| l.shape[0] * l.shape[1]).sum(),
            mean_rel_error: layers.iter().map(|l| l.rel_error).sum::<f64>() / n,
            mean_rel_error_rtn: layers.iter().map(|l| l.rel_error_rtn).sum::<f64>() / n,
            seconds: wall,
        },
        layers,
        codes_sha256: streamed.codes_sha256,
        outputs,
        input_sha256,
        output_sha256,
        peak_rss_bytes: peak_rss_bytes(),
        eval,
        mixed_precision: mixed,
        search: opts.search.clone(),
        holdout,
        choose: opts.choose,
        profile: {
            let mut p = profile.report(wall);
            p.device_bytes_up = traffic.map(|t| t.0);
            p.device_bytes_down = traffic.map(|t| t.1);
            p
        },
        calibration_memory: inputs.calib_memory,
    };
    if let Some(path) = &opts.report {
        let json = serde_json::to_vec_pretty(&report).map_err(|e| {
            crate::error::Error::Internal(format!("the report does not serialise: {e}"))
        })?;
        crate::io::writer::write_atomic(path, &json)?;
    }
    Ok(report)
}
