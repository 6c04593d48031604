//! `--target-bits`: probe each layer's error per bit width and allocate widths for the average.

use super::jobs::Job;
use super::options::RunOptions;
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
use crate::profile::Profile;
use crate::quant::search::SearchPlan;
use crate::quant::QuantConfig;
use serde::Serialize;
use std::sync::Arc;

/// The outcome of `--target-bits`: bits per job and the errors measured to choose them.
#[derive(Debug, Clone, Serialize)]
pub struct MixedPrecision {
    /// The requested average.
    pub target_bits: f32,
    /// The average reached (over the quantized layers' weights).
    pub average_bits: f64,
    /// Bits per layer, in job order.
    pub bits: Vec<u32>,
    /// Per layer, `(bits, relative error)` for every width probed (held-out when available).
    pub probed: Vec<Vec<(u32, f64)>>,
}

/// `--target-bits`: quantizes every free layer at each width 2..=8 (the configured candidates
/// at scalar `config.scalar`, RTN included), scores them on the held-out images (on the
/// calibration Gram without them), and allocates widths. The probe calibrates in fp mode, since
/// the quantized prefix depends on the widths being chosen.
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
    let mut costs = Vec::with_capacity(jobs.len());
    for job in jobs {
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
        let mut errors = Vec::new();
        for bits in 2..=8u32 {
            let cfg = QuantConfig {
                bits,
                ..job.config.clone()
            };
            let plan = SearchPlan::single(&cfg);
            let c = device.search(
                &job.meta.name,
                &w,
                job.rows,
                job.cols,
                &gram,
                held.as_ref(),
                &cfg,
                &plan,
            )?;
            errors.push((bits, c.rel_error_holdout.unwrap_or(c.outcome.rel_error)));
        }
        log::info!("{}: probed errors {errors:?}", job.meta.name);
        costs.push(LayerCost {
            weights: job.rows * job.cols,
            errors,
            fixed: None,
        });
    }
    let bits = allocate(&costs, target as f64)?;
    let average_bits = average(&costs, &bits);
    log::info!("--target-bits {target}: average {average_bits:.3}, bits {bits:?}");
    Ok(MixedPrecision {
        target_bits: target,
        average_bits,
        bits,
        probed: costs.into_iter().map(|c| c.errors).collect(),
    })
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
