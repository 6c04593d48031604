//! `--target-bits`: probe each layer's error per bit width and allocate widths for the average.

use super::jobs::Job;
use super::options::{MixedObjective, RunOptions};
use super::vision::job_grams;
use super::vision::Vision;
use crate::calibrate::BlockGrams;
use crate::calibrate::CalibMode;
use crate::device::AnyDevice;
use crate::device::AnyOps;
use crate::error::Error;
use crate::error::Result;
use crate::io::Calibration;
use crate::io::Checkpoint;
use crate::model::Role;
use crate::profile::Profile;
use crate::quant::search::SearchPlan;
use crate::quant::QuantConfig;
use serde::Serialize;
use std::sync::Arc;

/// The power of the sensitivity that weighs a layer's errors. A layer probed alone sits in the
/// linear regime, where its measured effect spreads over three orders of magnitude (DINOv2-S: a
/// query 5e-4, the last attention projection 1.4); at 2 bits, with every layer quantized, the
/// small ones compound (attention patterns break), so the full weight starves them. The square
/// root — halfway, in logarithms, between the layer errors and the measured effects — won on
/// DINOv2-S with a Fashion-MNIST head at 2.5 bits (top-1 44.5% summed, 47.0% full weight, 52.5%
/// square root) and held level at 3.0 (65.0%, 65.5%, 66.5%).
pub const SENSITIVITY_EXPONENT: f64 = 0.5;

/// Images (views) the feature probe runs at most: enough to rank layers, few enough that a
/// forward per layer stays a small part of the probe.
pub const FEATURE_PROBE_IMAGES: usize = 16;

/// The outcome of `--target-bits`: bits per job and the errors measured to choose them.
#[derive(Debug, Clone, Serialize)]
pub struct MixedPrecision {
    /// The requested average.
    pub target_bits: f32,
    /// What was minimised: `output` (layer errors weighted by their effect on the features) or
    /// `layer` (their plain sum; also when no images were there to measure the effect).
    pub objective: MixedObjective,
    /// The width whose probe was swapped into the model to measure each layer's effect.
    pub probe_bits: Option<u32>,
    /// Per layer, the features' relative change per unit of the layer's relative error (`None`
    /// where not measured: the `layer` objective, a width fixed by the recipe, a layer outside
    /// the blocks, which gets the mean of the others).
    pub sensitivity: Vec<Option<f64>>,
    /// Seconds the feature probe took (its forwards; part of the `probe` stage).
    pub feature_seconds: f64,
    /// The average reached (over the quantized layers' weights).
    pub average_bits: f64,
    /// Bits per layer, in job order.
    pub bits: Vec<u32>,
    /// Per layer, `(bits, relative error)` for every width probed (held-out when available), as
    /// measured, before any weighting.
    pub probed: Vec<Vec<(u32, f64)>>,
}

/// `--target-bits`: quantizes every free layer at each width 2..=8 (the configured candidates
/// at scalar `config.scalar`, RTN included), scores them on the held-out images (on the
/// calibration Gram without them), and allocates widths. The probe calibrates in fp mode, since
/// the quantized prefix depends on the widths being chosen.
///
/// With the `output` objective and images, each layer's errors are weighted by its sensitivity:
/// its probe at the width nearest the target is swapped alone into the full-precision model, and
/// the relative change of the pooled features on up to [`FEATURE_PROBE_IMAGES`] held-out views
/// (calibration views without them) is divided by that probe's relative error. A layer late in
/// the network or feeding a fragile path then counts for what it costs the features, not for
/// its own output error.
pub(super) fn allocate_bits(
    opts: &RunOptions,
    model: &Checkpoint,
    calib: Option<&Calibration>,
    vision: Option<&Vision>,
    device: &AnyDevice,
    jobs: &[Job],
    target: f32,
) -> Result<MixedPrecision> {
    use crate::quant::alloc::{allocate, average, LayerCost};
    if !(2.0..=8.0).contains(&target) {
        return Err(Error::InvalidOption(format!(
            "--target-bits {target} must be between 2 and 8"
        )));
    }
    let engine = match vision {
        Some(_) if opts.images.is_some() => Some(AnyOps::for_device(device)?),
        _ => None,
    };
    let open = |idx: &[usize]| -> Result<Option<Box<dyn BlockGrams + '_>>> {
        match (vision, &engine) {
            (Some(v), Some(e)) if !idx.is_empty() => Ok(Some(crate::calibrate::calibrator(
                e,
                &v.spec,
                model,
                v.calib.as_ref().expect("opened with --images"),
                &v.views(idx),
                CalibMode::Fp,
                Arc::new(Profile::new(false)),
            )?)),
            _ => Ok(None),
        }
    };
    let mut grams = open(vision.map_or(&[][..], |v| &v.calib_idx))?;
    let mut holdout = open(vision.map_or(&[][..], |v| &v.holdout_idx))?;
    let probe_bits = (target.round() as u32).clamp(2, 8);
    let mut feature_seconds = 0.0;
    let mut probe = match (opts.mixed_objective, vision, &engine) {
        (MixedObjective::Output, Some(v), Some(e)) => {
            // The held-out views first, then calibration views: the measure fits nothing to
            // them, and a few photos with 15% held out leave too few alone.
            let mut views = v.views(&v.holdout_idx);
            views.extend(v.views(&v.calib_idx));
            views.truncate(FEATURE_PROBE_IMAGES);
            let set = v.calib.as_ref().expect("opened with --images");
            let t = std::time::Instant::now();
            let p = crate::eval::FeatureProbe::new(e, &v.spec, model, set, &views)?;
            feature_seconds += t.elapsed().as_secs_f64();
            Some(p)
        }
        (MixedObjective::Output, ..) => {
            log::warn!(
                "--target-bits: no images to measure each layer's effect on the features; \
                 minimising the summed layer errors (--mixed-objective layer)"
            );
            None
        }
        (MixedObjective::Layer, ..) => None,
    };
    let mut sensitivity: Vec<Option<f64>> = vec![None; jobs.len()];
    // The probes of the current block's layers (job, role, weights, layer error), measured
    // together when the next block starts.
    let mut pending: Vec<(usize, Role, Vec<f32>, f64)> = Vec::new();
    let mut costs = Vec::with_capacity(jobs.len());
    for (j, job) in jobs.iter().enumerate() {
        if let (Some(p), Some(&(first, ..)), Some((b, _))) =
            (&mut probe, pending.first(), job.block)
        {
            if jobs[first].block.map(|(pb, _)| pb) != Some(b) {
                feature_seconds += measure(p, jobs, &mut pending, &mut sensitivity)?;
            }
        }
        if job.bits_fixed {
            costs.push(LayerCost {
                weights: job.rows * job.cols,
                errors: Vec::new(),
                fixed: Some(job.config.bits),
            });
            continue;
        }
        let w = model.read_f32(&job.meta)?;
        model.release(&job.meta);
        let (gram, held) = job_grams(job, calib, device, &mut grams, &mut holdout, 0.0)?;
        // Every width searches from the same factor: built once here, not once per width.
        let factors = crate::quant::prefactor::FactorCache::default();
        // (A GPU that builds factors from its resident Gram builds its own per width.)
        if job.config.gptq_start() && !device.builds_factors(gram.n) {
            factors.build(0, &gram, &[job.config.damp], job.config.act_order)?;
        }
        let mut errors = Vec::new();
        for bits in 2..=8u32 {
            let cfg = QuantConfig {
                bits,
                ..job.config.clone()
            };
            let plan = SearchPlan::single(&cfg);
            // Probed as the layer will ship: row by row where the run chooses so.
            let c = device.search_by(
                &job.meta.name,
                &w,
                job.rows,
                job.cols,
                &gram,
                held.as_ref(),
                &cfg,
                &plan,
                Some(&factors),
                opts.choose,
            )?;
            let err = c.rel_error_holdout.unwrap_or(c.outcome.rel_error);
            errors.push((bits, err));
            if let (true, Some(_), Some((_, role))) = (bits == probe_bits, &probe, job.block) {
                pending.push((j, role, c.outcome.layer.dequantize(), err));
            }
        }
        log::info!("{}: probed errors {errors:?}", job.meta.name);
        costs.push(LayerCost {
            weights: job.rows * job.cols,
            errors,
            fixed: None,
        });
    }
    if let Some(p) = &mut probe {
        feature_seconds += measure(p, jobs, &mut pending, &mut sensitivity)?;
    }
    let probed: Vec<Vec<(u32, f64)>> = costs.iter().map(|c| c.errors.clone()).collect();
    let objective = if probe.is_some() {
        MixedObjective::Output
    } else {
        MixedObjective::Layer
    };
    if probe.is_some() {
        weigh(&mut costs, &sensitivity);
    }
    let bits = allocate(&costs, target as f64)?;
    let average_bits = average(&costs, &bits);
    log::info!("--target-bits {target} ({objective:?}): average {average_bits:.3}, bits {bits:?}");
    Ok(MixedPrecision {
        target_bits: target,
        objective,
        probe_bits: probe.is_some().then_some(probe_bits),
        sensitivity,
        feature_seconds,
        average_bits,
        bits,
        probed,
    })
}

/// Measures the effects of the pending probes (layers of one block) in one pass, sets their
/// sensitivities (effect per unit of layer error) and empties `pending`; returns the seconds.
fn measure(
    probe: &mut crate::eval::FeatureProbe<'_>,
    jobs: &[Job],
    pending: &mut Vec<(usize, Role, Vec<f32>, f64)>,
    sensitivity: &mut [Option<f64>],
) -> Result<f64> {
    let Some(&(first, ..)) = pending.first() else {
        return Ok(0.0);
    };
    let (block, _) = jobs[first].block.expect("only located jobs are probed");
    let t = std::time::Instant::now();
    let swaps: Vec<(Role, &[f32])> = pending.iter().map(|(_, r, w, _)| (*r, &w[..])).collect();
    let effects = probe.effects(block, &swaps)?;
    for ((j, _, _, err), effect) in pending.iter().zip(effects) {
        sensitivity[*j] = Some(effect / err.max(f64::MIN_POSITIVE));
        log::info!(
            "{}: layer error {err:.3e}, feature error {effect:.3e}",
            jobs[*j].meta.name
        );
    }
    pending.clear();
    Ok(t.elapsed().as_secs_f64())
}

/// Scales each free layer's errors by its sensitivity to the power [`SENSITIVITY_EXPONENT`]; a
/// free layer without one (outside the blocks) gets the mean of the measured ones.
fn weigh(costs: &mut [crate::quant::alloc::LayerCost], sensitivity: &[Option<f64>]) {
    let measured: Vec<f64> = sensitivity.iter().flatten().copied().collect();
    let mean = if measured.is_empty() {
        1.0
    } else {
        measured.iter().sum::<f64>() / measured.len() as f64
    };
    for (c, s) in costs.iter_mut().zip(sensitivity) {
        let w = s.unwrap_or(mean).powf(SENSITIVITY_EXPONENT);
        for e in c.errors.iter_mut() {
            e.1 *= w;
        }
    }
}

/// `--target-bits`: probes every job and sets each one's width to the allocation's (none
/// without the option).
pub(super) fn probe(
    opts: &RunOptions,
    inputs: &mut super::inputs::Inputs,
    device: &AnyDevice,
    profile: &crate::profile::Profile,
    progress: &mut dyn FnMut(super::Progress<'_>),
) -> Result<Option<MixedPrecision>> {
    let Some(target) = opts.target_bits else {
        return Ok(None);
    };
    progress(super::Progress::Stage {
        name: "mixed precision",
        stage: "probe",
    });
    let t = std::time::Instant::now();
    let a = allocate_bits(
        opts,
        &inputs.model,
        inputs.calib.as_ref(),
        inputs.vision.as_ref(),
        device,
        &inputs.jobs,
        target,
    )?;
    for (j, &b) in inputs.jobs.iter_mut().zip(&a.bits) {
        j.config.bits = b;
    }
    profile.add("probe", t.elapsed().as_secs_f64());
    Ok(Some(a))
}

#[cfg(test)]
mod tests {
    use super::weigh;
    use crate::quant::alloc::LayerCost;

    #[test]
    fn errors_are_weighed_by_sensitivity_and_an_unmeasured_layer_gets_the_mean() {
        let layer = |e: f64| LayerCost {
            weights: 4,
            errors: vec![(2, e), (3, e / 4.0)],
            fixed: None,
        };
        let mut costs = vec![layer(1.0), layer(1.0), layer(2.0)];
        weigh(&mut costs, &[Some(16.0), Some(4.0), None]);
        assert_eq!(super::SENSITIVITY_EXPONENT, 0.5);
        assert_eq!(costs[0].errors, vec![(2, 4.0), (3, 1.0)]);
        assert_eq!(costs[1].errors, vec![(2, 2.0), (3, 0.5)]);
        // The mean sensitivity, 10, to the power ½.
        let w = 10f64.sqrt();
        assert_eq!(costs[2].errors, vec![(2, 2.0 * w), (3, 0.5 * w)]);
    }
}
