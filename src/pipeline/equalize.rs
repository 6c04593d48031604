//! `--equalize`: the LayerNorm-fed sites and the activation-aware input scales folded into them.

use super::jobs::Job;
use super::options::RunOptions;
use super::vision::Vision;
use crate::error::Error;
use crate::error::Result;
use crate::io::{dtype, Checkpoint};
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
            if io.mode.sequential() {
                return Err(Error::InvalidOption(
                    "--equalize works with --calib-mode fp only (the sequential modes would need the folded LayerNorms inside their forward pass)"
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

/// A LayerNorm tensor divided by its site's scales, for both outputs and the evaluation.
pub(super) struct Folded {
    /// The tensor's name.
    pub(super) name: String,
    /// Its bytes in the input's dtype.
    pub(super) bytes: Vec<u8>,
    /// Its values.
    pub(super) values: Vec<f32>,
}

/// The layer `current` of `site` with the site's scales applied: its weights' columns and its
/// Gram matrices scaled. The first layer of a site to arrive computes the scales (into
/// `scales`, by LayerNorm weight name) and returns the divided LayerNorm tensors to write;
/// later layers of the site reuse them and return none.
#[allow(clippy::type_complexity)]
pub(super) fn fold(
    model: &Checkpoint,
    site: &EqSite,
    scales: &mut HashMap<String, Vec<f32>>,
    current: &str,
    w: Vec<f32>,
    gram: Gram,
    held: Option<Gram>,
) -> Result<(Vec<f32>, Gram, Option<Gram>, Vec<Folded>)> {
    use crate::quant::equalize::{divide, scale_columns, scale_gram};
    let key = site.norm.0.clone();
    let mut folded = Vec::new();
    if !scales.contains_key(&key) {
        let s = site_scales(model, site, &gram, current, &w)?;
        for name in [&site.norm.0, &site.norm.1] {
            let Some(meta) = model.tensors().iter().find(|t| &t.name == name) else {
                continue;
            };
            let values = divide(&model.read_f32(meta)?, &s);
            let bytes = dtype::from_f32(meta.dtype, &values).ok_or_else(|| {
                Error::InvalidOption(format!(
                    "--equalize: LayerNorm tensor '{name}' is not a float tensor"
                ))
            })?;
            folded.push(Folded {
                name: name.clone(),
                bytes,
                values,
            });
        }
        scales.insert(key.clone(), s);
    }
    let s = &scales[&key];
    Ok((
        scale_columns(&w, s),
        scale_gram(&gram, s),
        held.map(|h| scale_gram(&h, s)),
        folded,
    ))
}

/// The LayerNorm tensors of `sites`, held back from the pass-through until their scales are
/// known.
pub(super) fn deferred_norms(
    sites: &HashMap<String, EqSite>,
) -> std::collections::BTreeSet<String> {
    sites
        .values()
        .flat_map(|site| [site.norm.0.clone(), site.norm.1.clone()])
        .collect()
}
