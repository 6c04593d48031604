//! The first stage of a run: open and check everything before any compute — the model, the
//! outputs against the inputs (and lock them), the calibration file, the job list, the image
//! sets, the device, and whether the largest layer and the calibration fit in memory.

use super::jobs::{job_list, Job};
use super::options::{search_state, RunOptions};
use super::preflight::{check_calibration, preflight, CalibMemory};
use super::vision::Vision;
use crate::device::AnyDevice;
use crate::error::{Error, Result};
use crate::io::guard::Lock;
use crate::io::{Calibration, Checkpoint};

/// A run's inputs, opened and checked.
pub(super) struct Inputs {
    pub(super) model: Checkpoint,
    /// The outputs' locks, held until the run ends.
    pub(super) _locks: Vec<Lock>,
    pub(super) calib: Option<Calibration>,
    pub(super) jobs: Vec<Job>,
    /// The ViT layout and image sets (`--images`, `--eval`).
    pub(super) vision: Option<Vision>,
    /// The planned memory of an images run's calibration.
    pub(super) calib_memory: Option<CalibMemory>,
    /// Host bytes the run may hold in GPTQ factors built ahead (within the memory budget).
    pub(super) factors_ahead: u64,
    /// A calibration file's Grams are built one layer ahead on a thread of their own
    /// ([`super::preflight::calib_ahead`]).
    pub(super) grams_ahead: bool,
}

impl Inputs {
    /// Opens and checks the inputs of `opts`, and the device they were checked against; a
    /// mistake fails here, in seconds.
    pub(super) fn open(opts: &RunOptions) -> Result<(Inputs, AnyDevice)> {
        opts.config.validate()?;
        if opts.augment != super::Augment::Off && opts.images.is_none() {
            return Err(Error::InvalidOption(
                "--augment adds views of calibration images: it needs --images (or no calibration \
                 at all, to use the bundled photos), not --calib or --data-free"
                    .into(),
            ));
        }
        let mut model = Checkpoint::open(&opts.model)?;
        let locks = super::outputs::claim_outputs(opts, &model)?;
        if opts.rotate {
            rotate(opts, &mut model)?;
        }
        let calib = opts.calib.as_deref().map(Calibration::open).transpose()?;
        let mut jobs = job_list(&model, opts, calib.as_ref())?;
        // Images: the model's own forward pass produces the Gram matrices, block by block; the
        // layers are visited in block order. Image sets are opened before any compute so a bad
        // folder fails fast.
        let vision = if opts.images.is_some() || opts.eval.is_some() {
            Some(Vision::prepare(&model, opts, &mut jobs)?)
        } else {
            None
        };
        if opts.search.is_some() && opts.holdout > 0.0 && opts.images.is_none() {
            log::info!(
                "--holdout: layers calibrated from activations ('P.input') hold out their last \
                 rows to choose on; layers given as Gram matrices choose on the calibration error"
            );
        }
        let device = AnyDevice::select(opts.device, opts.adapter.as_deref())?;
        // Refuse before any compute when a layer cannot fit.
        preflight(
            &jobs,
            calib.as_ref(),
            &device,
            opts.memory_limit,
            None,
            search_state(opts),
        )?
        .check()?;
        let (calib_memory, factors_ahead, grams_ahead) = match (&vision, &opts.images) {
            (Some(v), Some(_)) => {
                let (m, ahead) = check_calibration(opts, v, &jobs, &device)?;
                (Some(m), ahead, false)
            }
            _ => {
                let (on, ahead) =
                    super::preflight::calib_ahead(opts, calib.as_ref(), &jobs, &device);
                (None, ahead, on)
            }
        };
        let inputs = Inputs {
            model,
            _locks: locks,
            calib,
            jobs,
            vision,
            calib_memory,
            factors_ahead,
            grams_ahead,
        };
        Ok((inputs, device))
    }
}

/// `--rotate`: the rotated tensors are written (f32) to a temporary file of the tool's own and
/// read in place of the model's; everything after sees the rotated network.
fn rotate(opts: &RunOptions, model: &mut Checkpoint) -> Result<()> {
    if opts.calib.is_some() {
        return Err(Error::InvalidOption(
            "--rotate changes every layer's inputs, so Gram matrices or activations captured \
             from the model as it is (--calib) no longer fit; calibrate from --images"
                .into(),
        ));
    }
    if let Some(seed) = crate::model::rotate::seed_of(model)? {
        return Err(Error::InvalidOption(format!(
            "{} was already rotated (--rotate, seed {seed}); quantize it without --rotate",
            model.path().display()
        )));
    }
    let spec = crate::model::VitSpec::detect_allowing(model, opts.allow_unused_tensors)?;
    let temp = crate::io::writer::TempFile::in_temp_dir("rotated.safetensors");
    let t = std::time::Instant::now();
    crate::model::rotate::write_rotated(model, &spec, super::ROTATION_SEED, temp.path())?;
    model.overlay(temp)?;
    log::info!(
        "rotated the residual stream of {} ({} blocks, width {}) in {:.1} s",
        model.path().display(),
        spec.depth,
        spec.dim,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
