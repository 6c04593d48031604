//! `--eval`: FP32, RTN and COMQ side by side on the evaluation images, with the fidelity of
//! each quantized model's features to the full-precision ones.

use super::options::EvalOptions;
use super::vision::Vision;
use crate::device::AnyOps;
use crate::error::Result;
use crate::eval::{accuracy, features, fidelity, label_map, EvalReport, EvalRow, SwappedWeights};
use crate::io::Checkpoint;

/// The model as the user gave it, before `--rotate`: its final norm maps the rotated features
/// back.
pub(super) struct Original {
    model: Checkpoint,
    spec: crate::model::VitSpec,
}

/// The evaluation rows: the model as given, then with the RTN and the COMQ weights (`bits` is
/// the width label of the rows).
#[allow(clippy::too_many_arguments)]
pub(super) fn evaluate(
    v: &Vision,
    e: &AnyOps,
    eo: &EvalOptions,
    model: &Checkpoint,
    bits: &str,
    rtn_weights: &SwappedWeights,
    comq_weights: &SwappedWeights,
    original: Option<&Original>,
) -> Result<EvalReport> {
    let set = v.eval.as_ref().expect("opened with --eval");
    // With --rotate the pooled features are mapped back to the original model's basis, so the
    // fidelity figures mean what they mean without it.
    let basis = |f: &mut crate::eval::Features| -> Result<()> {
        match original {
            Some(o) => crate::model::rotate::unrotate_features(
                &mut f.cls,
                &o.spec,
                &o.model,
                super::ROTATION_SEED,
            ),
            None => Ok(()),
        }
    };
    let idx = set.choose(eo.count.unwrap_or(usize::MAX), 0);
    let mut rows = Vec::new();
    let map = label_map(set, &v.spec)?;
    let mut fp = features(e, &v.spec, model, &SwappedWeights::new(), set, &idx)?;
    basis(&mut fp)?;
    rows.push(EvalRow {
        model: "FP32".into(),
        accuracy: accuracy(&fp, set, &idx, &map),
        fidelity: None,
    });
    // Layers resumed from a checkpoint have no RTN twin; their RTN row is then partial.
    for (label, weights) in [
        (format!("RTN W{bits}"), rtn_weights),
        (format!("COMQ W{bits}"), comq_weights),
    ] {
        let mut f = features(e, &v.spec, model, weights, set, &idx)?;
        basis(&mut f)?;
        rows.push(EvalRow {
            model: label,
            accuracy: accuracy(&f, set, &idx, &map),
            fidelity: Some(fidelity(&f, &fp)),
        });
    }
    Ok(EvalReport {
        images: set.path().display().to_string(),
        count: idx.len(),
        rows,
    })
}

/// The evaluation stage of a run: the rows of [`evaluate`] with `--eval`, else none.
#[allow(clippy::too_many_arguments)]
pub(super) fn evaluate_run(
    opts: &super::RunOptions,
    vision: Option<&Vision>,
    engine: Option<&AnyOps>,
    model: &Checkpoint,
    bits: String,
    rtn_weights: &SwappedWeights,
    comq_weights: &SwappedWeights,
    profile: &crate::profile::Profile,
    progress: &mut dyn FnMut(super::Progress<'_>),
) -> Result<Option<EvalReport>> {
    let (Some(v), Some(e), Some(eo)) = (vision, engine, &opts.eval) else {
        return Ok(None);
    };
    let t = std::time::Instant::now();
    progress(super::Progress::Stage {
        name: "evaluation images",
        stage: "evaluate",
    });
    let original = if opts.rotate {
        let model = Checkpoint::open(&opts.model)?;
        let spec = crate::model::VitSpec::detect_allowing(&model, opts.allow_unused_tensors)?;
        Some(Original { model, spec })
    } else {
        None
    };
    let report = evaluate(
        v,
        e,
        eo,
        model,
        &bits,
        rtn_weights,
        comq_weights,
        original.as_ref(),
    )?;
    profile.add("evaluate", t.elapsed().as_secs_f64());
    Ok(Some(report))
}

/// The width the evaluation rows name: one number when every layer has it, else the average
/// over the quantized weights with "mixed" (`--target-bits`, or recipe `[[layer]] bits`).
pub(super) fn bits_label(jobs: &[super::jobs::Job], fallback: u32) -> String {
    let Some(first) = jobs.first().map(|j| j.config.bits) else {
        return fallback.to_string();
    };
    if jobs.iter().all(|j| j.config.bits == first) {
        return first.to_string();
    }
    let (mut sum, mut n) = (0.0f64, 0.0f64);
    for j in jobs {
        let w = (j.rows * j.cols) as f64;
        sum += w * j.config.bits as f64;
        n += w;
    }
    format!("{:.2} mixed", sum / n)
}
