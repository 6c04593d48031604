//! The images of a run: the ViT layout, the calibration and held-out draw, the evaluation set,
//! and the Gram matrices a job gets from them or from the calibration file.

use super::jobs::Job;
use super::options::{RunOptions, DEFAULT_CALIB_COUNT};
use std::sync::Arc;

use crate::calibrate::{BlockGrams, CalibMode};
use crate::device::AnyDevice;
use crate::device::AnyOps;
use crate::error::{Error, Result};
use crate::io::calib::CalibKind;
use crate::io::images::{ImageSet, View};
use crate::io::{Calibration, Checkpoint};
use crate::model::VitSpec;
use crate::profile::Profile;
use crate::quant::Gram;

/// Mixed into `--seed` for the held-out draw, so it is independent of the calibration draw.
pub(super) const HOLDOUT_SEED: u64 = 0x0005_eed4_01d0_u64;

/// The ViT layout and image sets of a run with `--images` or `--eval`.
pub(super) struct Vision {
    pub(super) spec: VitSpec,
    pub(super) calib: Option<ImageSet>,
    pub(super) calib_idx: Vec<usize>,
    /// Calibration images held out to score candidates (empty: none).
    pub(super) holdout_idx: Vec<usize>,
    /// Seeded augmented views added per image (of both sets, so they stay disjoint by image).
    pub(super) extra_views: u32,
    /// The seed of the views.
    pub(super) seed: u64,
    pub(super) eval: Option<ImageSet>,
}

impl Vision {
    /// The calibrators of an images run: the calibration images and, when some are held out,
    /// the held-out ones, which walk through the model beside them.
    #[allow(clippy::type_complexity)]
    pub(super) fn calibrators<'a>(
        &'a self,
        e: &'a AnyOps,
        model: &'a Checkpoint,
        mode: CalibMode,
        profile: &Arc<Profile>,
    ) -> Result<(
        Box<dyn BlockGrams + Send + 'a>,
        Option<Box<dyn BlockGrams + Send + 'a>>,
    )> {
        let set = self.calib.as_ref().expect("opened with --images");
        let one = |idx: &[usize], mode| {
            let views = self.views(idx);
            crate::calibrate::calibrator(e, &self.spec, model, set, &views, mode, profile.clone())
        };
        let calib = one(&self.calib_idx, mode)?;
        // Candidates are scored around the corrected target on the held-out images' quantized
        // inputs: their full-precision walk would only feed a cross-Gram nobody reads.
        let held_mode = match mode {
            CalibMode::Corrected => CalibMode::Quantized,
            m => m,
        };
        let held = if self.holdout_idx.is_empty() {
            None
        } else {
            Some(one(&self.holdout_idx, held_mode)?)
        };
        Ok((calib, held))
    }

    /// The inputs images `idx` give: each image and its augmented views.
    pub(super) fn views(&self, idx: &[usize]) -> Vec<View> {
        idx.iter()
            .flat_map(|&i| View::with_views(i, self.extra_views, self.seed))
            .collect()
    }

    pub(super) fn prepare(
        model: &Checkpoint,
        opts: &RunOptions,
        jobs: &mut [Job],
    ) -> Result<Vision> {
        let mut spec = VitSpec::detect_allowing(model, opts.allow_unused_tensors)?;
        let (resize, crop) = opts
            .images
            .as_ref()
            .map_or((None, None), |i| (i.resize, i.crop));
        spec.set_input(resize, crop)?;
        let (calib, calib_idx) = match &opts.images {
            Some(io) => {
                if io.count == 0 {
                    return Err(Error::InvalidOption(
                        "--calib-count must be at least 1".into(),
                    ));
                }
                let set = if io.bundled {
                    ImageSet::bundled()?
                } else {
                    ImageSet::open(&io.path)?
                };
                let idx = set.choose(io.count, io.seed);
                if idx.len() < io.count && io.count != DEFAULT_CALIB_COUNT {
                    log::warn!(
                        "--calib-count {} but {} holds {} images; using all of them",
                        io.count,
                        io.path.display(),
                        idx.len()
                    );
                }
                for j in jobs.iter_mut() {
                    j.block = Some(spec.locate(&j.prefix).ok_or_else(|| {
                        Error::InvalidOption(format!(
                            "'{}' is not a linear layer of an encoder block, so --images cannot calibrate it; \
                             leave it out with --skip, or pass --calib with its activations",
                            j.meta.name
                        ))
                    })?);
                }
                jobs.sort_by_key(|j| j.block);
                (Some(set), idx)
            }
            None => (None, Vec::new()),
        };
        // The held-out share is a seeded random subset: the chosen indices are sorted, and a
        // folder with class sub-folders lists one class after another.
        let mut calib_idx = calib_idx;
        let holdout_idx = match (&opts.search, opts.holdout) {
            (Some(_), f) if f > 0.0 && calib_idx.len() >= 2 => {
                let k = ((calib_idx.len() as f64 * f as f64).round() as usize)
                    .clamp(1, calib_idx.len() - 1);
                let seed = opts.images.as_ref().map_or(0, |i| i.seed);
                let mut rng = crate::util::rng::SplitMix::new(seed ^ HOLDOUT_SEED);
                let n = calib_idx.len();
                for i in 0..k {
                    let j = i + (rng.next_u64() % (n - i) as u64) as usize;
                    calib_idx.swap(i, j);
                }
                let mut held = calib_idx.drain(..k).collect::<Vec<_>>();
                held.sort_unstable();
                calib_idx.sort_unstable();
                held
            }
            (Some(_), f) if f > 0.0 && !calib_idx.is_empty() => {
                log::warn!("one calibration image cannot be split; candidates are scored on it");
                Vec::new()
            }
            _ => Vec::new(),
        };
        let eval = opts
            .eval
            .as_ref()
            .map(|e| ImageSet::open(&e.path))
            .transpose()?;
        if let Some(set) = &eval {
            // Class folders that cannot be matched to the head fail now, not after the run.
            crate::eval::label_map(set, &spec)?;
        }
        let images = calib_idx.len() + holdout_idx.len();
        let extra_views = match &opts.images {
            Some(_) => opts.augment.views(images),
            None => 0,
        };
        if extra_views > 0 {
            log::info!(
                "calibration: {extra_views} augmented views per image added ({} inputs from {images} images)",
                images * (1 + extra_views as usize)
            );
        }
        Ok(Vision {
            spec,
            calib,
            calib_idx,
            holdout_idx,
            extra_views,
            seed: opts.images.as_ref().map_or(0, |i| i.seed),
            eval,
        })
    }
}

/// A job's calibration Gram (from images, the calibration file, or `G = I`) and its held-out
/// Gram: from the held-out images, or, with `held_share > 0`, from that share of the rows of
/// the job's activations in the calibration file (which its calibration Gram then leaves out).
pub(super) fn job_grams(
    job: &Job,
    calib: Option<&Calibration>,
    device: &AnyDevice,
    grams: &mut Option<Box<dyn BlockGrams + '_>>,
    holdout: &mut Option<Box<dyn BlockGrams + '_>>,
    held_share: f32,
) -> Result<(Gram, Option<Gram>)> {
    let gram = match (calib, job.calib) {
        (_, Some(CalibKind::Images)) => {
            let (b, role) = job.block.expect("image jobs are located");
            grams.as_mut().expect("calibrator exists").gram(b, role)?
        }
        (Some(c), Some(_)) => {
            let (g, held) = c.gram_with_holdout(&job.prefix, job.cols, device, held_share)?;
            if held.is_some() {
                return Ok((g, held));
            }
            g
        }
        _ => Gram::identity(job.cols),
    };
    let held = match (holdout, job.block) {
        (Some(h), Some((b, role))) => Some(h.gram(b, role)?),
        _ => None,
    };
    Ok((gram, held))
}

/// The cross-Gram of an image job's input (`--calib-mode corrected`; `None` otherwise), after
/// [`job_grams`] for it.
pub(super) fn job_cross(
    job: &Job,
    grams: &mut Option<Box<dyn BlockGrams + '_>>,
) -> Result<Option<crate::numeric::gram::CrossGram>> {
    match (job.calib, job.block, grams.as_mut()) {
        (Some(CalibKind::Images), Some((b, role)), Some(g)) => g.cross(b, role),
        _ => Ok(None),
    }
}

/// The calibrators of an images run before they start: calibration and held-out.
pub(super) type RawCalibrators<'c> = (
    Option<Box<dyn BlockGrams + Send + 'c>>,
    Option<Box<dyn BlockGrams + Send + 'c>>,
);

/// The calibrators of an images run, started (none without `--images`).
pub(super) fn open_calibrators<'a>(
    opts: &RunOptions,
    vision: Option<&'a Vision>,
    engine: Option<&'a AnyOps>,
    model: &'a Checkpoint,
    profile: &Arc<Profile>,
    progress: &mut dyn FnMut(super::Progress<'_>),
) -> Result<RawCalibrators<'a>> {
    let (Some(v), Some(e), Some(io)) = (vision, engine, &opts.images) else {
        return Ok((None, None));
    };
    progress(super::Progress::Stage {
        name: "calibration images",
        stage: "embed",
    });
    let (g, h) = v.calibrators(e, model, io.mode, profile)?;
    Ok((Some(g), h))
}
