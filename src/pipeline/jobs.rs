//! The job list: one planned layer per weight to quantize, with its options after the
//! per-layer overrides and its calibration.

use super::encode::scale_dtype_for;
use super::options::{Decision, RunOptions};
use crate::error::{Error, Result};
use crate::io::calib::CalibKind;
use crate::io::{Calibration, Checkpoint, TensorMeta};
use crate::model::Role;
use crate::quant::QuantConfig;

/// A planned layer: what will be quantized, with which options and calibration.
#[derive(Debug, Clone)]
pub struct Job {
    /// The weight tensor.
    pub meta: TensorMeta,
    /// Its name without `.weight`.
    pub prefix: String,
    /// Output channels.
    pub rows: usize,
    /// Inputs.
    pub cols: usize,
    /// Options after per-layer overrides.
    pub config: QuantConfig,
    /// Its calibration (`None` = data-free).
    pub calib: Option<CalibKind>,
    /// Block and role inside a recognised ViT (images mode).
    pub block: Option<(usize, Role)>,
    /// The bit width comes from a per-layer override (`--target-bits` leaves it alone).
    pub bits_fixed: bool,
}

/// Plans the layers to quantize, checking everything that can be checked without compute.
pub fn job_list(
    model: &Checkpoint,
    opts: &RunOptions,
    calib: Option<&Calibration>,
) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for t in model.tensors() {
        if opts.selection.decide(model.path(), t)? != Decision::Quantize {
            continue;
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let mut config = opts.config.clone();
        config.scale_dtype = scale_dtype_for(t.dtype).0;
        let mut skip = false;
        let mut bits_fixed = false;
        for o in opts
            .overrides
            .iter()
            .filter(|o| o.pattern.is_match(&t.name))
        {
            if let Some(b) = o.bits {
                config.bits = b;
                bits_fixed = true;
            }
            if let Some(g) = o.group_size {
                config.group_size = g;
            }
            skip |= o.skip;
        }
        if skip {
            continue;
        }
        config.validate()?;
        config.validate_for(&t.name, rows, cols)?;
        let prefix = t.name.trim_end_matches(".weight").to_string();
        let calib_kind = match calib {
            _ if opts.images.is_some() => Some(CalibKind::Images),
            Some(c) if c.kind(&prefix).is_some() || !opts.data_free => {
                Some(c.check(&prefix, cols)?)
            }
            _ if opts.data_free => None,
            _ => {
                return Err(Error::MissingCalibration {
                    layer: t.name.clone(),
                    prefix,
                    cols,
                })
            }
        };
        jobs.push(Job {
            meta: t.clone(),
            prefix,
            rows,
            cols,
            config,
            calib: calib_kind,
            block: None,
            bits_fixed,
        });
    }
    for o in &opts.overrides {
        if !model.tensors().iter().any(|t| o.pattern.is_match(&t.name)) {
            log::warn!(
                "recipe [[layer]] match '{}' matches no tensor of {}: it changes nothing",
                o.pattern.as_str(),
                model.path().display()
            );
        }
    }
    // With --rotate and nothing selected, the run exports the rotated model as it is.
    if jobs.is_empty() && !opts.rotate {
        return Err(Error::InvalidOption(format!(
            "no tensor of {} is selected for quantization (2-D float '*.weight' tensors not matching the skip pattern){}",
            model.path().display(),
            if opts.selection.only.is_some() { "; check --only" } else { "" }
        )));
    }
    Ok(jobs)
}
