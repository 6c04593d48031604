//! What a run is asked to do: the options, the layer selection and the per-layer overrides.

use crate::calibrate::CalibMode;
use crate::device::DeviceKind;
use crate::error::Error;
use crate::error::Result;
use crate::io::dtype;
use crate::io::TensorMeta;
use crate::quant::search::{ChooseBy, SearchPlan};
use crate::quant::QuantConfig;
use regex::Regex;
use serde::Serialize;
use std::path::Path;
use std::path::PathBuf;

/// Names skipped by default: the classifier head and the patch/token embeddings stay in full
/// precision, as in the reference (spec a.7); so does the text tower of a whole CLIP or SigLIP
/// model (`text_model`, `text_projection`), whose inputs are text, not images.
pub const DEFAULT_SKIP: &str = r"(^|\.)(head|heads|head_dist|classifier|cls_classifier|distillation_classifier|fc_norm|attn_pool|patch_embed|patch_embeddings|embeddings|pooler|lm_head|visual_projection|text_model|text_projection)(\.|$)";

/// Which tensors are quantized.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Only `.weight` tensors matching this are considered (all when `None`).
    pub only: Option<Regex>,
    /// Tensors matching this are skipped.
    pub skip: Option<Regex>,
}

impl Selection {
    /// `--skip` replaces the default skip pattern; `--only` alone disables it.
    pub fn new(only: Option<&str>, skip: Option<&str>) -> Result<Selection> {
        let re = |s: &str, flag: &str| {
            Regex::new(s).map_err(|e| {
                Error::InvalidOption(format!("{flag} '{s}' is not a valid regex: {e}"))
            })
        };
        let only = only.map(|s| re(s, "--only")).transpose()?;
        let skip = match (skip, &only) {
            (Some(s), _) => Some(re(s, "--skip")?),
            (None, None) => Some(Regex::new(DEFAULT_SKIP).expect("default skip pattern is valid")),
            (None, Some(_)) => None,
        };
        Ok(Selection { only, skip })
    }

    /// Whether `t` is quantized, or why not. A tensor named by `--only` that cannot be quantized
    /// is an error, not a silent skip.
    pub fn decide(&self, path: &Path, t: &TensorMeta) -> Result<Decision> {
        if !t.name.ends_with(".weight") {
            return Ok(Decision::Skip("not a .weight tensor"));
        }
        if let Some(only) = &self.only {
            if !only.is_match(&t.name) {
                return Ok(Decision::Skip("not matched by --only"));
            }
        }
        if self.skip.as_ref().is_some_and(|s| s.is_match(&t.name)) {
            return Ok(Decision::Skip("matched by the skip pattern"));
        }
        let explicit = self.only.is_some();
        if t.shape.len() != 2 {
            return if explicit {
                Err(Error::tensor(
                    path,
                    &t.name,
                    format!(
                        "is {}-D {:?}; only 2-D linear weights [out, in] can be quantized",
                        t.shape.len(),
                        t.shape
                    ),
                ))
            } else {
                Ok(Decision::Skip("not 2-D"))
            };
        }
        if !dtype::is_float(t.dtype) {
            // A 2-D weight in an F8/F6/F4 format is a weight this tool cannot read yet: say so
            // rather than pass it through as if it were not a weight.
            let low_float = ["F8", "F6", "F4"]
                .iter()
                .any(|p| dtype::name(t.dtype).starts_with(p));
            return if explicit || low_float {
                Err(Error::tensor(path, &t.name, dtype::unsupported(t.dtype)))
            } else {
                Ok(Decision::Skip("not a float tensor"))
            };
        }
        if t.numel() == 0 {
            return Err(Error::tensor(
                path,
                &t.name,
                format!("is empty {:?}", t.shape),
            ));
        }
        Ok(Decision::Quantize)
    }
}

/// Whether a tensor is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Quantized.
    Quantize,
    /// Passed through, with the reason.
    Skip(&'static str),
}

/// A per-layer override from a recipe: every layer whose weight name matches `pattern` gets
/// these settings (later overrides win over earlier ones).
#[derive(Debug, Clone)]
pub struct LayerOverride {
    /// Matched against the weight tensor's name.
    pub pattern: Regex,
    /// Bits for matching layers.
    pub bits: Option<u32>,
    /// Group size for matching layers (`Some(None)` = one grid per row).
    pub group_size: Option<Option<usize>>,
    /// Leave matching layers unquantized.
    pub skip: bool,
}

/// Default `--max-shard-size`: 5 GB, as transformers writes.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Calibration from images (`--images`).
#[derive(Debug, Clone, Serialize)]
pub struct ImageOptions {
    /// A folder of PNG/JPEG files or an image pack.
    pub path: PathBuf,
    /// How many images to use (a seeded choice when the set is larger).
    pub count: usize,
    /// Seed of the choice.
    pub seed: u64,
    /// Inputs from the full-precision model or from the quantized prefix.
    pub mode: CalibMode,
    /// Override of the resize (shorter side) of the model's preprocessing.
    pub resize: Option<usize>,
    /// Override of the centre crop (the model's input size).
    pub crop: Option<usize>,
    /// The generic photos bundled with the tool instead of `path` (no calibration was given).
    pub bundled: bool,
}

/// What `--target-bits` minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedObjective {
    /// Each layer's error weighted by how far it moves the model's pooled features: a layer's
    /// probe at the width nearest the target is swapped into the full-precision model alone and
    /// the features' relative change on the held-out images (the calibration images without
    /// them) is divided by the layer's own relative error. Needs images; without them the
    /// layer errors are summed as they are.
    #[default]
    Output,
    /// The plain sum of the layers' relative output errors.
    Layer,
}

crate::util::value_enum!(MixedObjective {
    Output = "output": "each layer's error weighted by its measured effect on the model's features (needs images)",
    Layer = "layer": "the plain sum of the layers' errors",
});

/// The seed of `--rotate`'s orthogonal matrices.
pub const ROTATION_SEED: u64 = 0;

/// How many seeded augmented views (random resized crops and flips) each calibration image adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Augment {
    /// None: the images as they are.
    #[default]
    Off,
    /// Enough views that the calibration and held-out images together reach
    /// [`AUGMENT_TARGET_VIEWS`], at most [`AUGMENT_MAX_VIEWS`] per image; none from that many
    /// images up.
    Auto,
    /// This many per image.
    Views(u32),
}

/// `--augment auto` fills the calibration (held-out share included) up to this many inputs.
pub const AUGMENT_TARGET_VIEWS: usize = 64;

/// The most views `--augment` adds per image.
pub const AUGMENT_MAX_VIEWS: u32 = 15;

impl Augment {
    /// Extra views per image for `images` source images.
    pub fn views(self, images: usize) -> u32 {
        match self {
            Augment::Off => 0,
            Augment::Views(k) => k,
            Augment::Auto if images == 0 => 0,
            Augment::Auto => (AUGMENT_TARGET_VIEWS.div_ceil(images) as u32)
                .saturating_sub(1)
                .min(AUGMENT_MAX_VIEWS),
        }
    }
}

impl std::str::FromStr for Augment {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Augment, String> {
        match s {
            "off" | "0" => Ok(Augment::Off),
            "auto" => Ok(Augment::Auto),
            n => match n.parse::<u32>() {
                Ok(k) if k <= AUGMENT_MAX_VIEWS => Ok(Augment::Views(k)),
                _ => Err(format!(
                    "'{n}' is not off, auto or a number of views per image from 0 to {AUGMENT_MAX_VIEWS}"
                )),
            },
        }
    }
}

impl ImageOptions {
    /// Calibration from the images at `path` with every other option at its default: up to
    /// [`DEFAULT_CALIB_COUNT`] of them (seed 0), inputs from the full-precision model, the
    /// model's own preprocessing.
    pub fn new(path: PathBuf) -> ImageOptions {
        ImageOptions {
            path,
            count: DEFAULT_CALIB_COUNT,
            seed: 0,
            mode: CalibMode::Fp,
            resize: None,
            crop: None,
            bundled: false,
        }
    }

    /// The bundled generic photos, all of them, in the model's own preprocessing.
    pub fn bundled() -> ImageOptions {
        ImageOptions {
            bundled: true,
            ..ImageOptions::new(PathBuf::from(crate::io::images::BUNDLED_PHOTOS))
        }
    }
}

/// Default `--calib-count`: 1024 images, as in the paper.
pub const DEFAULT_CALIB_COUNT: usize = 1024;

/// Evaluation after quantization (`--eval`).
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// A folder of PNG/JPEG files (class sub-folders for labels) or an image pack.
    pub path: PathBuf,
    /// Use at most this many images (seeded choice).
    pub count: Option<usize>,
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The input safetensors model.
    pub model: PathBuf,
    /// The calibration file (`P.input` / `P.gram` per layer).
    pub calib: Option<PathBuf>,
    /// Use `G = I` for layers without calibration.
    pub data_free: bool,
    /// Quantization options.
    pub config: QuantConfig,
    /// Layer selection.
    pub selection: Selection,
    /// Packed compressed-tensors output.
    pub out: Option<PathBuf>,
    /// Dequantized output (same names, shapes, dtypes as the input).
    pub dequantized: Option<PathBuf>,
    /// JSON report.
    pub report: Option<PathBuf>,
    /// A plot the caller writes from the report after the run: checked against the inputs and
    /// locked with the other outputs before any compute.
    pub plot: Option<PathBuf>,
    /// The recipe file the options came from (an input: never written over).
    pub recipe: Option<PathBuf>,
    /// Device choice.
    pub device: DeviceKind,
    /// Adapter name filter for GPU devices.
    pub adapter: Option<String>,
    /// Outputs larger than this are split into shards with an index.
    pub max_shard_size: u64,
    /// Per-layer overrides (bits, group size, skip), applied in order.
    pub overrides: Vec<LayerOverride>,
    /// Continue from the per-layer checkpoints of an interrupted run with the same fingerprint.
    pub resume: bool,
    /// Where per-layer checkpoints go (default: `<first output>.work`).
    pub work_dir: Option<PathBuf>,
    /// Re-run this many layers (spread over the model) on the CPU when quantizing on a GPU, and
    /// report the code disagreement.
    pub verify_cpu: usize,
    /// Memory budget of the device in bytes (host memory for the CPU; default: the host's
    /// available memory for the CPU, none for a GPU, whose memory wgpu cannot query).
    pub memory_limit: Option<u64>,
    /// Calibrate from images through the built-in ViT forward pass.
    pub images: Option<ImageOptions>,
    /// Evaluate FP32 / RTN / COMQ on these images at the end.
    pub eval: Option<EvalOptions>,
    /// Quantize each layer with several candidates and ship the best (`None`: one run with
    /// `config`, the paper's way).
    pub search: Option<SearchPlan>,
    /// Share of the calibration images held out to score the candidates (images mode, with
    /// `search`); 0 scores them on the calibration Gram.
    pub holdout: f32,
    /// Whether the search ships whole candidates or each row from its best one (the default
    /// preset's [`ChooseBy::Auto`] unless set).
    pub choose: ChooseBy,
    /// Mixed precision: choose 2–8 bits per layer for this average (per-layer overrides win).
    pub target_bits: Option<f32>,
    /// What `--target-bits` minimises.
    pub mixed_objective: MixedObjective,
    /// Fold activation-aware input scales of the layers fed by a LayerNorm into that LayerNorm.
    pub equalize: bool,
    /// Seeded augmented views per calibration image (`--images` or the bundled photos).
    pub augment: Augment,
    /// Rotate the residual stream and the heads' values by seeded orthogonal matrices folded
    /// into the weights (`crate::model::rotate`) before calibrating: the same function, weights
    /// easier to quantize, an ordinary checkpoint out.
    pub rotate: bool,
    /// Synchronise GPU stages at their boundaries so the profile attributes time exactly.
    pub profile: bool,
    /// Go on (with a warning naming each) when the model holds tensors the forward pass does
    /// not read, instead of refusing it.
    pub allow_unused_tensors: bool,
}

impl Default for Selection {
    /// Every 2-D float `.weight` tensor but the default skip pattern's.
    fn default() -> Selection {
        Selection {
            only: None,
            skip: Some(Regex::new(DEFAULT_SKIP).expect("default skip pattern is valid")),
        }
    }
}

impl RunOptions {
    /// A run of `model` with a preset's resolved options and every other option at its
    /// default: no calibration file, the default selection, no outputs named, the device
    /// chosen automatically, nothing resumed, verified, evaluated or profiled.
    pub fn new(model: PathBuf, resolved: crate::quant::Resolved) -> RunOptions {
        RunOptions {
            model,
            calib: None,
            data_free: false,
            config: resolved.config,
            selection: Selection::default(),
            out: None,
            dequantized: None,
            report: None,
            plot: None,
            recipe: None,
            device: DeviceKind::Auto,
            adapter: None,
            max_shard_size: DEFAULT_MAX_SHARD_BYTES,
            overrides: Vec::new(),
            resume: false,
            work_dir: None,
            verify_cpu: 0,
            memory_limit: None,
            images: None,
            eval: None,
            search: resolved.search,
            holdout: resolved.holdout,
            choose: ChooseBy::default(),
            target_bits: None,
            mixed_objective: MixedObjective::Output,
            equalize: false,
            augment: Augment::Off,
            rotate: false,
            profile: false,
            allow_unused_tensors: false,
        }
    }
}

/// `Some(held-out images?)` when every layer runs a candidate search (for the memory plan).
pub(super) fn search_state(opts: &RunOptions) -> Option<bool> {
    opts.search
        .as_ref()
        .map(|_| opts.holdout > 0.0 && (opts.images.is_some() || opts.calib.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augment_parses_and_auto_fills_up_to_the_target() {
        assert_eq!("off".parse::<Augment>(), Ok(Augment::Off));
        assert_eq!("auto".parse::<Augment>(), Ok(Augment::Auto));
        assert_eq!("3".parse::<Augment>(), Ok(Augment::Views(3)));
        assert!("16".parse::<Augment>().is_err());
        assert!("-1".parse::<Augment>().is_err());
        // 17 photos: 3 views each, 68 inputs; 11: 5 each, 66; 64 or more: none.
        assert_eq!(Augment::Auto.views(17), 3);
        assert_eq!(Augment::Auto.views(11), 5);
        assert_eq!(Augment::Auto.views(64), 0);
        assert_eq!(Augment::Auto.views(500), 0);
        assert_eq!(Augment::Auto.views(1), AUGMENT_MAX_VIEWS);
        assert_eq!(Augment::Views(2).views(1000), 2);
        assert_eq!(Augment::Off.views(3), 0);
    }
}
