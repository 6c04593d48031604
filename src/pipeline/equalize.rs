//! `--equalize`: the LayerNorm-fed sites and the activation-aware input scales folded into them.

use super::jobs::Job;
use super::options::RunOptions;
use super::vision::Vision;
use crate::calibrate::CalibMode;
use crate::error::Error;
use crate::error::Result;
use crate::io::Checkpoint;
use crate::quant::Gram;
use std::collections::HashMap;

/// A LayerNorm whose output layers `--equalize` rescales.
#[derive(Debug, Clone)]
pub(super) struct EqSite {
    /// LayerNorm weight and bias tensor names.
    pub(super) norm: (String, String),
    /// Weight tensor names of every layer it feeds.
    pub(super) layers: Vec<String>,
}

/// The equalised sites by layer prefix: LN 1 → qkv (fused or q, k, v) and LN 2 → fc1 of every
/// block whose fed layers are all being quantized.
pub(super) fn equalize_sites(
    opts: &RunOptions,
    vision: Option<&Vision>,
    jobs: &[Job],
) -> Result<HashMap<String, EqSite>> {
    let mut out = HashMap::new();
    if !opts.equalize {
        return Ok(out);
    }
    let v = match (vision, &opts.images) {
        (Some(v), Some(io)) => {
            if io.mode == CalibMode::Quantized {
                return Err(Error::InvalidOption(
                    "--equalize works with --calib-mode fp only (the sequential mode would need the folded LayerNorms inside its forward pass)"
                        .into(),
                ));
            }
            v
        }
        _ => return Err(Error::InvalidOption(
            "--equalize needs --images: it folds scales into the LayerNorms of a recognised ViT"
                .into(),
        )),
    };
    if opts.resume {
        return Err(Error::InvalidOption(
            "--equalize cannot be combined with --resume (resumed layers would miss their LayerNorm scales)"
                .into(),
        ));
    }
    for b in &v.spec.blocks {
        let qkv: Vec<String> = b.qkv.iter().map(|(_, p)| p.clone()).collect();
        for (norm, prefixes) in [(&b.norm1, qkv), (&b.norm2, vec![b.fc1.clone()])] {
            if !prefixes.iter().all(|p| jobs.iter().any(|j| &j.prefix == p)) {
                continue;
            }
            let site = EqSite {
                norm: norm.clone(),
                layers: prefixes.iter().map(|p| format!("{p}.weight")).collect(),
            };
            for p in prefixes {
                out.insert(p, site.clone());
            }
        }
    }
    Ok(out)
}

/// The scales of one site from its Gram and the weights of every layer it feeds.
pub(super) fn site_scales(
    model: &Checkpoint,
    site: &EqSite,
    gram: &Gram,
    current: &str,
    w: &[f32],
) -> Result<Vec<f32>> {
    let mut others = Vec::new();
    for name in site.layers.iter().filter(|n| n.as_str() != current) {
        let meta = model
            .tensors()
            .iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| Error::InvalidOption(format!("--equalize: '{name}' is missing")))?;
        others.push(model.read_f32(meta)?);
    }
    let mut all: Vec<&[f32]> = vec![w];
    all.extend(others.iter().map(|v| v.as_slice()));
    Ok(crate::quant::equalize::scales(
        gram,
        &all,
        crate::quant::equalize::ALPHA,
    ))
}
