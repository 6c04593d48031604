//! The work directory of a run (`--work-dir`, `--resume`): each finished layer is saved there,
//! under a fingerprint of the inputs and of every option that decides the codes.

use std::path::{Path, PathBuf};

use super::options::RunOptions;
use super::outputs::work_dir_of;
use crate::error::Result;
use crate::io::Checkpoint;
use crate::resume::{fingerprint, WorkDir};

/// Opens (or, with `--resume`, reopens) the run's work directory; `None` when it has none.
pub(super) fn open_work_dir(opts: &RunOptions, model: &Checkpoint) -> Result<Option<WorkDir>> {
    let Some(dir) = work_dir_of(opts) else {
        return Ok(None);
    };
    let mut files: Vec<&Path> = model.files();
    files.extend(opts.calib.as_deref());
    files.extend(
        opts.images
            .as_ref()
            .map(|i| i.path.as_path())
            .filter(|p| p.is_file()),
    );
    let fp = fingerprint(&files, &resume_identity(opts))?;
    Ok(Some(WorkDir::open(&dir, &fp, opts.resume)?))
}

/// The options that decide a layer's codes, as one string for the resume fingerprint: every
/// field of [`RunOptions`] except those that only say where files go or what is reported, so
/// an option added later is covered unless it is listed here as harmless.
pub(super) fn resume_identity(opts: &RunOptions) -> String {
    let mut o = opts.clone();
    // The inputs' paths and bytes are fingerprinted as files.
    o.model = PathBuf::new();
    o.calib = None;
    // Where outputs go, how they are split, what is reported and checked afterwards.
    o.out = None;
    o.dequantized = None;
    o.report = None;
    o.plot = None;
    o.recipe = None;
    o.max_shard_size = 0;
    o.resume = false;
    o.work_dir = None;
    o.verify_cpu = 0;
    o.eval = None;
    o.profile = false;
    // What the forward pass reads does not change with it: it only lets a run go on.
    o.allow_unused_tensors = false;
    // A smaller budget after an out-of-memory stop must still resume.
    o.memory_limit = None;
    format!("{o:?}")
}

#[cfg(test)]
mod tests {
    use super::super::tests::base;
    use super::*;
    use crate::calibrate::CalibMode;
    use crate::device::DeviceKind;
    use crate::pipeline::{EvalOptions, LayerOverride};
    use crate::quant::search::SearchPlan;
    use crate::quant::{Method, QuantConfig};
    use regex::Regex;

    #[test]
    fn every_option_that_changes_the_codes_changes_the_resume_identity() {
        let b = resume_identity(&base());
        type Change = fn(&mut RunOptions);
        let changes: Vec<(&str, Change)> = vec![
            ("data_free", |o| o.data_free = true),
            ("bits", |o| o.config.bits = 3),
            ("sym", |o| o.config.sym = true),
            ("group_size", |o| o.config.group_size = Some(32)),
            ("scalar", |o| o.config.scalar = 0.9),
            ("sweeps", |o| o.config.sweeps = 2),
            ("order", |o| {
                o.config.order = crate::quant::OrderKind::Natural
            }),
            ("scale_update", |o| o.config.scale_update = true),
            ("method", |o| o.config.method = Method::Rtn),
            ("damp", |o| o.config.damp = 0.5),
            ("act_order", |o| o.config.act_order = !o.config.act_order),
            ("only", |o| {
                o.selection.only = Some(Regex::new("qkv").unwrap())
            }),
            ("skip", |o| {
                o.selection.skip = Some(Regex::new("head").unwrap())
            }),
            ("device", |o| o.device = DeviceKind::Gpu),
            ("adapter", |o| o.adapter = Some("nvidia".into())),
            ("overrides", |o| {
                o.overrides.push(LayerOverride {
                    pattern: Regex::new("fc2").unwrap(),
                    bits: Some(8),
                    group_size: None,
                    skip: false,
                })
            }),
            ("images", |o| o.images = None),
            ("calib_count", |o| o.images.as_mut().unwrap().count = 8),
            ("seed", |o| o.images.as_mut().unwrap().seed = 1),
            ("calib_mode", |o| {
                o.images.as_mut().unwrap().mode = CalibMode::Quantized
            }),
            ("resize", |o| o.images.as_mut().unwrap().resize = Some(256)),
            ("crop", |o| o.images.as_mut().unwrap().crop = Some(224)),
            ("search", |o| {
                o.search = Some(SearchPlan::single(&QuantConfig::default()))
            }),
            ("holdout", |o| o.holdout = 0.15),
            ("choose", |o| {
                o.choose = crate::quant::search::ChooseBy::Layer
            }),
            ("target_bits", |o| o.target_bits = Some(3.0)),
            ("mixed_objective", |o| {
                o.mixed_objective = crate::pipeline::MixedObjective::Layer
            }),
            ("equalize", |o| o.equalize = true),
            ("rotate", |o| o.rotate = true),
            ("augment", |o| {
                o.augment = crate::pipeline::Augment::Views(2)
            }),
        ];
        for (name, change) in changes {
            let mut o = base();
            change(&mut o);
            assert_ne!(resume_identity(&o), b, "{name} must change the fingerprint");
        }
        let harmless: Vec<(&str, Change)> = vec![
            ("out", |o| o.out = Some("elsewhere".into())),
            ("report", |o| o.report = Some("r.json".into())),
            ("plot", |o| o.plot = Some("p.png".into())),
            ("max_shard_size", |o| o.max_shard_size = 1 << 20),
            ("resume", |o| o.resume = true),
            ("work_dir", |o| o.work_dir = Some("w".into())),
            ("verify_cpu", |o| o.verify_cpu = 2),
            ("memory_limit", |o| o.memory_limit = Some(1 << 30)),
            ("profile", |o| o.profile = true),
            ("allow_unused_tensors", |o| o.allow_unused_tensors = true),
            ("eval", |o| {
                o.eval = Some(EvalOptions {
                    path: "e".into(),
                    count: None,
                })
            }),
        ];
        for (name, change) in harmless {
            let mut o = base();
            change(&mut o);
            assert_eq!(
                resume_identity(&o),
                b,
                "{name} must not change the fingerprint"
            );
        }
    }
}
