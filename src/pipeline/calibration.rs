//! The calibration of a run that names none: `comq-gpu run MODEL` on a ViT the forward pass
//! knows calibrates on the generic photos bundled with the tool (and says so, with the advice to
//! bring images of the model's own domain); any other model still needs `--images`, `--calib`
//! or `--data-free` (the job list's error names all three).

use std::borrow::Cow;

use super::options::{ImageOptions, RunOptions};
use crate::error::Result;
use crate::io::images::{ImageSet, BUNDLED_PHOTOS};
use crate::io::Checkpoint;
use crate::model::VitSpec;

/// `opts`, or, when it names no calibration and the model is a recognised ViT, `opts` with the
/// bundled photos as its images.
pub(super) fn with_default_calibration(opts: &RunOptions) -> Result<Cow<'_, RunOptions>> {
    if opts.calib.is_some() || opts.images.is_some() || opts.data_free {
        return Ok(Cow::Borrowed(opts));
    }
    let model = Checkpoint::open(&opts.model)?;
    // A model the forward pass cannot run as a whole goes on without images: the job list then
    // names every way to calibrate it.
    if VitSpec::detect_allowing(&model, opts.allow_unused_tensors).is_err() {
        return Ok(Cow::Borrowed(opts));
    }
    let n = ImageSet::bundled()?.len();
    log::warn!(
        "no calibration given: {} is calibrated on {BUNDLED_PHOTOS} ({n} images); pass \
         --images DIR with images of the model's own domain for a better result",
        opts.model.display()
    );
    let mut o = opts.clone();
    o.images = Some(ImageOptions {
        count: n,
        ..ImageOptions::bundled()
    });
    Ok(Cow::Owned(o))
}
