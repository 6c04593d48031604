//! The `run` job: a safetensors model in, quantized checkpoints and a report out.
//!
//! Everything that can be checked before any compute is checked first — options, the layer
//! selection, every selected layer's shape and calibration, output paths — so a mistake costs
//! seconds, not an hour. Layers are then processed one at a time in file order: read (from the
//! map), Gram (from the calibration file), quantize (on the chosen device), write (at the planned
//! offsets). Peak memory is one layer's weights, Gram and outputs.

pub mod jobs;
pub mod preflight;

pub use jobs::Job;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use regex::Regex;
use safetensors::Dtype;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::calibrate::{Ahead, BlockGrams, CalibMode};
use crate::device::{AnyDevice, DeviceKind};
use crate::error::{Error, Result};
use crate::eval::{EvalReport, EvalRow, Overrides};
use crate::io::calib::CalibKind;
use crate::io::guard;
use crate::io::hfconfig::{self, ModuleScheme};
use crate::io::images::ImageSet;
use crate::io::writer::ShardedWriter;
use crate::io::{dtype, pack, Calibration, Checkpoint, PlannedTensor, TensorMeta};
use crate::model::{Engine, VitSpec};
use crate::profile::{Profile, ProfileReport};
use crate::quant::search::{Choice, SearchPlan, Tried};
use crate::quant::{Gram, LayerOutcome, Method, QuantConfig, QuantizedLayer, ScaleDtype};

/// Names skipped by default: the classifier head and the patch/token embeddings stay in full
/// precision, as in the reference (spec a.7).
pub const DEFAULT_SKIP: &str = r"(^|\.)(head|heads|head_dist|classifier|cls_classifier|distillation_classifier|fc_norm|patch_embed|patch_embeddings|embeddings|pooler|lm_head)(\.|$)";

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
    /// Mixed precision: choose 2–8 bits per layer for this average (per-layer overrides win).
    pub target_bits: Option<f32>,
    /// Fold activation-aware input scales of the layers fed by a LayerNorm into that LayerNorm.
    pub equalize: bool,
    /// Synchronise GPU stages at their boundaries so the profile attributes time exactly.
    pub profile: bool,
}

/// One layer's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Weight tensor name.
    pub name: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Bits.
    pub bits: u32,
    /// Group size (`null` for one grid per row).
    pub group_size: Option<usize>,
    /// Relative output error of the shipped codes.
    pub rel_error: f64,
    /// Relative output error of round-to-nearest on the same grid.
    pub rel_error_rtn: f64,
    /// Loss after each sweep (and scale update).
    pub loss_history: Vec<f64>,
    /// Seconds on this layer (Gram + quantization).
    pub seconds: f64,
    /// The device that ran it.
    pub device: String,
    /// `input`, `gram` or `identity` (data-free).
    pub calibration: &'static str,
    /// Activation rows behind the Gram matrix (0 for a given Gram or the identity).
    pub samples: u64,
    /// Peak resident memory of the process so far, in bytes (Linux; `null` elsewhere).
    pub peak_rss_bytes: Option<u64>,
    /// Whether the layer was loaded from a checkpoint of an interrupted run (`--resume`).
    pub resumed: bool,
    /// CPU re-run of this layer (`--verify-cpu`).
    pub verify_cpu: Option<VerifyReport>,
    /// The candidate shipped (with a search).
    pub chosen: Option<String>,
    /// Relative error of the shipped codes on the held-out images.
    pub rel_error_holdout: Option<f64>,
    /// Relative error of round-to-nearest on the held-out images.
    pub rel_error_holdout_rtn: Option<f64>,
    /// Every candidate tried, with its calibration and held-out errors.
    pub candidates: Vec<Tried>,
}

/// A GPU layer re-run on the CPU.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Share of codes that differ.
    pub code_disagreement: f64,
    /// Largest |k_gpu − k_cpu|.
    pub max_code_diff: i32,
    /// The CPU's relative error.
    pub rel_error_cpu: f64,
}

/// Totals over all layers.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    /// Layers quantized.
    pub layers: usize,
    /// Weights quantized.
    pub weights: usize,
    /// Mean relative error over layers.
    pub mean_rel_error: f64,
    /// Mean RTN relative error over layers.
    pub mean_rel_error_rtn: f64,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
}

/// The JSON report of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Tool name.
    pub tool: &'static str,
    /// Tool version.
    pub version: &'static str,
    /// Input model path.
    pub model: String,
    /// Device description.
    pub device: String,
    /// Quantization options.
    pub options: QuantConfig,
    /// Calibration file, or `data-free`.
    pub calibration: String,
    /// Whether `G = I` was used for any layer.
    pub data_free: bool,
    /// Per-layer results in file order.
    pub layers: Vec<LayerReport>,
    /// Totals.
    pub totals: Totals,
    /// SHA-256 over layer names and codes, also stored in the outputs' metadata.
    pub codes_sha256: String,
    /// Written files.
    pub outputs: BTreeMap<String, String>,
    /// SHA-256 of every input file (model shards, calibration).
    pub input_sha256: BTreeMap<String, String>,
    /// SHA-256 of every written tensor file.
    pub output_sha256: BTreeMap<String, String>,
    /// Peak resident memory of the whole run, in bytes (Linux; `null` elsewhere).
    pub peak_rss_bytes: Option<u64>,
    /// FP32 / RTN / COMQ on the evaluation images (`--eval`).
    pub eval: Option<EvalReport>,
    /// The per-layer widths `--target-bits` chose.
    pub mixed_precision: Option<MixedPrecision>,
    /// The candidates searched per layer (`null`: one run with `options`, the paper's way).
    pub search: Option<SearchPlan>,
    /// Share of the calibration images held out to choose among them.
    pub holdout: f32,
    /// Where the time went, per stage.
    pub profile: ProfileReport,
    /// The planned memory of the calibration (images runs).
    pub calibration_memory: Option<self::preflight::CalibMemory>,
}

/// Peak resident set size of this process (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Where a `--out`/`--dequantized` path puts its tensors: a path ending in `.safetensors` is the
/// file itself; anything else is a directory (created) holding `model.safetensors`.
pub fn resolve_output(path: &Path) -> Result<PathBuf> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Ok(path.to_path_buf());
    }
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
    Ok(path.join("model.safetensors"))
}

/// `g` on its own thread one block ahead when `fp` (see [`Ahead`]), else `g` itself.
fn ahead_of<'scope, 'env>(
    sc: &'scope std::thread::Scope<'scope, 'env>,
    g: Box<dyn BlockGrams + Send + 'env>,
    fp: bool,
    blocks: &[usize],
) -> Box<dyn BlockGrams + 'env> {
    if fp {
        Box::new(Ahead::spawn(sc, g, blocks.to_vec()))
    } else {
        g
    }
}

/// A message to the output writer thread.
enum Out {
    /// A tensor for both outputs, already encoded.
    Both(String, Vec<u8>),
    /// A quantized layer, packed by the writer.
    Packed {
        prefix: String,
        layer: QuantizedLayer,
        scale: Dtype,
        sym: bool,
    },
    /// A dequantized layer, encoded by the writer.
    Dequant {
        name: String,
        dtype: Dtype,
        values: Vec<f32>,
    },
}

impl Out {
    fn write(
        self,
        packed: Option<&mut ShardedWriter>,
        dequant: Option<&mut ShardedWriter>,
    ) -> Result<()> {
        match self {
            Out::Both(name, bytes) => {
                for w in [packed, dequant].into_iter().flatten() {
                    w.write(&name, &bytes)?;
                }
            }
            Out::Packed {
                prefix,
                layer,
                scale,
                sym,
            } => {
                if let Some(w) = packed {
                    for (name, bytes) in packed_tensors(&prefix, &layer, scale, sym)? {
                        w.write(&name, &bytes)?;
                    }
                }
            }
            Out::Dequant {
                name,
                dtype,
                values,
            } => {
                if let Some(w) = dequant {
                    let bytes =
                        dtype::from_f32(dtype, &values).expect("selected weights are float");
                    w.write(&name, &bytes)?;
                }
            }
        }
        Ok(())
    }
}

/// Progress events for a front end.
#[derive(Debug)]
pub enum Progress<'a> {
    /// The run starts with this many layers.
    Start {
        /// Layers to quantize.
        layers: usize,
        /// The device in use.
        device: &'a str,
    },
    /// A layer is about to start.
    LayerStart {
        /// Its name.
        name: &'a str,
    },
    /// A step within a layer: `read`, `calibration`, `quantize` or `write`.
    Stage {
        /// The layer.
        name: &'a str,
        /// The step.
        stage: &'static str,
    },
    /// A layer finished.
    LayerDone(&'a LayerReport),
    /// Outputs are being finished (metadata, sync, rename, hashes).
    Writing,
}

/// Mixed into `--seed` for the held-out draw, so it is independent of the calibration draw.
const HOLDOUT_SEED: u64 = 0x0005_eed4_01d0_u64;

/// The ViT layout and image sets of a run with `--images` or `--eval`.
struct Vision {
    spec: VitSpec,
    calib: Option<ImageSet>,
    calib_idx: Vec<usize>,
    /// Calibration images held out to score candidates (empty: none).
    holdout_idx: Vec<usize>,
    eval: Option<ImageSet>,
}

impl Vision {
    fn prepare(model: &Checkpoint, opts: &RunOptions, jobs: &mut [Job]) -> Result<Vision> {
        let mut spec = VitSpec::detect(model)?;
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
                let set = ImageSet::open(&io.path)?;
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
        Ok(Vision {
            spec,
            calib,
            calib_idx,
            holdout_idx,
            eval,
        })
    }
}

/// The scale dtype that matches a weight's dtype (scales are stored in the model's dtype).
pub fn scale_dtype_for(d: Dtype) -> (ScaleDtype, Dtype) {
    match d {
        Dtype::F16 => (ScaleDtype::F16, Dtype::F16),
        Dtype::BF16 => (ScaleDtype::Bf16, Dtype::BF16),
        _ => (ScaleDtype::F32, Dtype::F32),
    }
}

/// The compressed-tensors tensors that replace `P.weight`.
pub fn packed_plan(
    prefix: &str,
    rows: usize,
    cols: usize,
    cfg: &QuantConfig,
    scale: Dtype,
) -> Vec<PlannedTensor> {
    let groups = cols / cfg.group_size.unwrap_or(cols);
    let mut v = vec![
        PlannedTensor {
            name: format!("{prefix}.weight_packed"),
            dtype: Dtype::I32,
            shape: vec![rows, pack::words_for(cols, cfg.bits)],
        },
        PlannedTensor {
            name: format!("{prefix}.weight_scale"),
            dtype: scale,
            shape: vec![rows, groups],
        },
        PlannedTensor {
            name: format!("{prefix}.weight_shape"),
            dtype: Dtype::I64,
            shape: vec![2],
        },
    ];
    if !cfg.sym {
        v.push(PlannedTensor {
            name: format!("{prefix}.weight_zero_point"),
            dtype: Dtype::I32,
            shape: vec![pack::words_for(rows, cfg.bits), groups],
        });
    }
    v
}

/// Encodes a quantized layer as its compressed-tensors tensors (name, bytes), in `packed_plan` order.
pub fn packed_tensors(
    prefix: &str,
    q: &QuantizedLayer,
    scale: Dtype,
    sym: bool,
) -> Result<Vec<(String, Vec<u8>)>> {
    let codes = q.unsigned_codes();
    let packed = pack::pack_rows(&codes, q.rows, q.cols, q.bits);
    let groups = q.grid.groups();
    let mut out = vec![
        (
            format!("{prefix}.weight_packed"),
            bytemuck::cast_slice(&packed).to_vec(),
        ),
        (
            format!("{prefix}.weight_scale"),
            dtype::from_f32(scale, &q.grid.delta).expect("scale dtype is a float type"),
        ),
        (
            format!("{prefix}.weight_shape"),
            [q.rows as i64, q.cols as i64]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    ];
    if !sym {
        // Stored zero point = signed zp + 2^(b−1) = −lo; it must fit in b bits.
        let max = (1i64 << q.bits) - 1;
        let mut zp = Vec::with_capacity(q.grid.lo.len());
        for (i, &lo) in q.grid.lo.iter().enumerate() {
            let z = -(lo as i64);
            if !(0..=max).contains(&z) {
                return Err(Error::InvalidOption(format!(
                    "layer '{prefix}.weight' row {} has all weights of one sign, so its zero point ({z}) \
                     does not fit in {} bits of the compressed-tensors format; use --sym, or write only --dequantized",
                    i / groups,
                    q.bits
                )));
            }
            zp.push(z as u32);
        }
        let packed_zp = pack::pack_columns(&zp, q.rows, groups, q.bits);
        out.push((
            format!("{prefix}.weight_zero_point"),
            bytemuck::cast_slice(&packed_zp).to_vec(),
        ));
    }
    Ok(out)
}

/// Plans the layers to quantize, checking everything that can be checked without compute.
pub fn plan(
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
    if jobs.is_empty() {
        return Err(Error::InvalidOption(format!(
            "no tensor of {} is selected for quantization (2-D float '*.weight' tensors not matching the skip pattern){}",
            model.path().display(),
            if opts.selection.only.is_some() { "; check --only" } else { "" }
        )));
    }
    Ok(jobs)
}

/// A job's calibration Gram (from images, the calibration file, or `G = I`) and, with held-out
/// images, its held-out Gram.
fn job_grams(
    job: &Job,
    calib: Option<&Calibration>,
    device: &AnyDevice,
    grams: &mut Option<Box<dyn BlockGrams + '_>>,
    holdout: &mut Option<Box<dyn BlockGrams + '_>>,
) -> Result<(Gram, Option<Gram>)> {
    let gram = match (calib, job.calib) {
        (_, Some(CalibKind::Images)) => {
            let (b, role) = job.block.expect("image jobs are located");
            grams.as_mut().expect("calibrator exists").gram(b, role)?
        }
        (Some(c), Some(_)) => c.gram(&job.prefix, job.cols, device)?,
        _ => Gram::identity(job.cols),
    };
    let held = match (holdout, job.block) {
        (Some(h), Some((b, role))) => Some(h.gram(b, role)?),
        _ => None,
    };
    Ok((gram, held))
}

/// A LayerNorm whose output layers `--equalize` rescales.
#[derive(Debug, Clone)]
struct EqSite {
    /// LayerNorm weight and bias tensor names.
    norm: (String, String),
    /// Weight tensor names of every layer it feeds.
    layers: Vec<String>,
}

/// The equalised sites by layer prefix: LN 1 → qkv (fused or q, k, v) and LN 2 → fc1 of every
/// block whose fed layers are all being quantized.
fn equalize_sites(
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
                    "--equalize works with --calib-mode fp only (the sequential mode would need the                      folded LayerNorms inside its forward pass)"
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
            "--equalize cannot be combined with --resume (resumed layers would miss their              LayerNorm scales)"
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
fn site_scales(
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
fn allocate_bits(
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
        Some(_) if opts.images.is_some() => Some(Engine::for_device(device)?),
        _ => None,
    };
    let open = |idx: &[usize]| -> Result<Option<Box<dyn BlockGrams + '_>>> {
        match (vision, &engine) {
            (Some(v), Some(e)) if !idx.is_empty() => Ok(Some(crate::calibrate::calibrator(
                e,
                &v.spec,
                model,
                v.calib.as_ref().expect("opened with --images"),
                idx,
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
        let (gram, held) = job_grams(job, calib, device, &mut grams, &mut holdout)?;
        let mut errors = Vec::new();
        for bits in 2..=8u32 {
            let cfg = QuantConfig {
                bits,
                ..job.config.clone()
            };
            let plan = SearchPlan::single(&cfg);
            let c = crate::quant::search::search_any(
                device,
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

fn output_file(p: &Path) -> PathBuf {
    if p.extension().is_some_and(|e| e == "safetensors") {
        p.to_path_buf()
    } else {
        p.join("model.safetensors")
    }
}

/// The options that decide a layer's codes, as one string for the resume fingerprint: every
/// field of [`RunOptions`] except those that only say where files go or what is reported, so
/// an option added later is covered unless it is listed here as harmless.
fn resume_identity(opts: &RunOptions) -> String {
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
    // A smaller budget after an out-of-memory stop must still resume.
    o.memory_limit = None;
    format!("{o:?}")
}

/// `Some(held-out images?)` when every layer runs a candidate search (for the memory plan).
fn search_state(opts: &RunOptions) -> Option<bool> {
    opts.search
        .as_ref()
        .map(|_| opts.holdout > 0.0 && opts.images.is_some())
}

/// The work directory of a run with outputs: `--work-dir`, or `<first output>.work`.
fn work_dir_of(opts: &RunOptions) -> Option<PathBuf> {
    let first = opts.out.as_ref().or(opts.dequantized.as_ref())?;
    Some(opts.work_dir.clone().unwrap_or_else(|| {
        let mut d = first.as_os_str().to_owned();
        d.push(".work");
        PathBuf::from(d)
    }))
}

/// Every input of the run, for [`guard::check`]: the model's files and side files, the
/// calibration, the image sets, the recipe.
fn run_inputs(opts: &RunOptions, model: &Checkpoint) -> Vec<guard::Input> {
    let mut v: Vec<guard::Input> = model
        .files()
        .into_iter()
        .map(|f| guard::Input::new("the model file", f))
        .collect();
    if opts.model.is_file() {
        v.push(guard::Input::new("the model", &opts.model));
    }
    for side in [
        "model.safetensors.index.json",
        "config.json",
        "preprocessor_config.json",
    ] {
        let p = model.dir().join(side);
        if p.is_file() {
            v.push(guard::Input::new("the model's", &p));
        }
    }
    let named = [
        ("--calib", opts.calib.as_deref()),
        ("--images", opts.images.as_ref().map(|i| i.path.as_path())),
        ("--eval", opts.eval.as_ref().map(|e| e.path.as_path())),
        ("--config", opts.recipe.as_deref()),
    ];
    for (flag, p) in named {
        if let Some(p) = p {
            v.push(guard::Input::new(flag, p));
        }
    }
    v
}

/// Every output of the run, work directory included.
fn run_outputs(opts: &RunOptions) -> Vec<guard::Output> {
    use guard::{Output, OutputKind};
    let mut v = Vec::new();
    if let Some(p) = &opts.out {
        v.push(Output::new("--out", p, OutputKind::Checkpoint));
    }
    if let Some(p) = &opts.dequantized {
        v.push(Output::new("--dequantized", p, OutputKind::Checkpoint));
    }
    if let Some(p) = &opts.report {
        v.push(Output::new("--report", p, OutputKind::File));
    }
    if let Some(p) = &opts.plot {
        v.push(Output::new("--plot", p, OutputKind::File));
    }
    if let Some(w) = work_dir_of(opts) {
        v.push(Output::new("--work-dir", &w, OutputKind::WorkDir));
    }
    v
}

/// Checks every output against every input, the work directory against its contract, and
/// locks every output for the run — all before any compute.
fn claim_outputs(opts: &RunOptions, model: &Checkpoint) -> Result<Vec<guard::Lock>> {
    let inputs = run_inputs(opts, model);
    let outputs = run_outputs(opts);
    guard::check(&inputs, &outputs)?;
    if let Some(w) = work_dir_of(opts) {
        crate::resume::check_work_dir(&w)?;
    }
    outputs.iter().map(guard::Lock::acquire).collect()
}

fn provenance(opts: &RunOptions, model: &Checkpoint, device: &str) -> BTreeMap<String, String> {
    let c = &opts.config;
    let mut m: BTreeMap<String, String> = model
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    m.entry("format".into()).or_insert_with(|| "pt".into());
    let mut put = |k: &str, v: String| {
        m.insert(format!("comq.{k}"), v);
    };
    put("tool", format!("comq-gpu {}", env!("CARGO_PKG_VERSION")));
    put(
        "method",
        serde_json::to_value(c.method)
            .expect("enum")
            .as_str()
            .unwrap_or("")
            .into(),
    );
    put("bits", c.bits.to_string());
    put(
        "group_size",
        c.group_size.map_or("row".into(), |g| g.to_string()),
    );
    put("symmetric", c.sym.to_string());
    put("scalar", c.scalar.to_string());
    put("sweeps", c.sweeps.to_string());
    put(
        "order",
        serde_json::to_value(c.order)
            .expect("enum")
            .as_str()
            .unwrap_or("")
            .into(),
    );
    put("scale_update", c.scale_update.to_string());
    put(
        "granularity",
        serde_json::to_value(c.granularity)
            .expect("enum")
            .as_str()
            .unwrap_or("")
            .into(),
    );
    put("calibration", calib_label(opts));
    put("device", device.to_string());
    m
}

fn calib_label(opts: &RunOptions) -> String {
    if let Some(i) = &opts.images {
        return format!(
            "{} images of {} (seed {}{}, inputs from the {} model)",
            i.count,
            i.path.display(),
            i.seed,
            match (&opts.search, opts.holdout) {
                (Some(_), h) if h > 0.0 =>
                    format!(", {:.0}% held out to choose per layer", h * 100.0),
                _ => String::new(),
            },
            match i.mode {
                CalibMode::Fp => "full-precision",
                CalibMode::Quantized => "quantized",
            }
        );
    }
    match (&opts.calib, opts.data_free) {
        (Some(p), false) => p.display().to_string(),
        (Some(p), true) => format!("{} (data-free G = I where missing)", p.display()),
        (None, _) => "data-free (G = I)".into(),
    }
}

/// Runs the whole job; `progress` receives events for a front end.
pub fn run(opts: &RunOptions, progress: &mut dyn FnMut(Progress<'_>)) -> Result<RunReport> {
    let started = Instant::now();
    let profile = Arc::new(Profile::new(opts.profile));
    opts.config.validate()?;
    let model = Checkpoint::open(&opts.model)?;
    let _locks = claim_outputs(opts, &model)?;
    let calib = opts.calib.as_deref().map(Calibration::open).transpose()?;
    let mut jobs = plan(&model, opts, calib.as_ref())?;
    // Images: the model's own forward pass produces the Gram matrices, block by block; the
    // layers are visited in block order. Image sets are opened before any compute so a bad
    // folder fails fast.
    let vision = if opts.images.is_some() || opts.eval.is_some() {
        Some(Vision::prepare(&model, opts, &mut jobs)?)
    } else {
        None
    };
    if opts.search.is_some() && opts.holdout > 0.0 && opts.images.is_none() {
        log::info!("--holdout needs --images; candidates are chosen on the calibration error");
    }
    let mut device = AnyDevice::select(opts.device, opts.adapter.as_deref())?;
    let mut device_name = device.describe();
    // Refuse before any compute when a layer cannot fit.
    self::preflight::preflight(
        &jobs,
        calib.as_ref(),
        &device,
        opts.memory_limit,
        None,
        search_state(opts),
    )?
    .check()?;
    let mut calib_memory = None;
    if let (Some(v), Some(_)) = (&vision, &opts.images) {
        // The calibration (above all the hidden state of every image, one block's input) is
        // the big allocation of an images run; refuse before any compute when it cannot fit
        // beside the largest layer.
        let images = v.calib_idx.len() + v.holdout_idx.len();
        let gpu = matches!(device, AnyDevice::Wgpu(_));
        let c = self::preflight::calibration_bytes(
            v.spec.dim,
            v.spec.mlp,
            v.spec.tokens_per_image(),
            images,
            gpu,
        );
        let largest = jobs
            .iter()
            .map(|j| {
                let (sd, sh) = search_state(opts).map_or((0, 0), |held| {
                    self::preflight::search_bytes(j.rows, j.cols, held, &j.config)
                });
                if gpu {
                    self::preflight::device_bytes(j.rows, j.cols, &j.config) + sd
                } else {
                    self::preflight::host_bytes(j.rows, j.cols, true, &j.config) + sd + sh
                }
            })
            .max()
            .unwrap_or(0);
        let bytes = if gpu { c.device_bytes } else { c.host_bytes } + largest;
        let budget = match &device {
            AnyDevice::Cpu(_) => opts
                .memory_limit
                .or_else(self::preflight::host_available_bytes),
            AnyDevice::Wgpu(_) => opts.memory_limit,
        };
        log::info!(
            "calibration of {images} images x {} tokens x {}: {:.1} MB on the device, {:.1} MB on the host; with the largest layer {:.1} MB on the {}",
            v.spec.tokens_per_image(),
            v.spec.dim,
            c.device_bytes as f64 / 1e6,
            c.host_bytes as f64 / 1e6,
            bytes as f64 / 1e6,
            if gpu { "device" } else { "host" }
        );
        if let Some(b) = budget.filter(|&b| bytes > b) {
            return Err(Error::InvalidOption(format!(
                "the calibration of {images} images and the largest layer need {bytes} bytes but the memory budget is {b}; \
                 lower --calib-count"
            )));
        }
        calib_memory = Some(c);
    }
    let mut mixed = None;
    if let Some(target) = opts.target_bits {
        progress(Progress::Stage {
            name: "mixed precision",
            stage: "probe",
        });
        let t_probe = Instant::now();
        let a = allocate_bits(
            opts,
            &model,
            calib.as_ref(),
            vision.as_ref(),
            &device,
            &jobs,
            target,
        )?;
        for (j, &b) in jobs.iter_mut().zip(&a.bits) {
            j.config.bits = b;
        }
        profile.add("probe", t_probe.elapsed().as_secs_f64());
        mixed = Some(a);
    }
    log::info!(
        "quantizing {} layers of {} on {device_name}",
        jobs.len(),
        model.path().display()
    );

    let mut meta = provenance(opts, &model, &device_name);
    meta.insert("comq.codes_sha256".into(), "0".repeat(64));
    let mut packed = match &opts.out {
        Some(path) => {
            let mut planned = Vec::new();
            for t in model.tensors() {
                match jobs.iter().find(|j| j.meta.name == t.name) {
                    Some(j) => planned.extend(packed_plan(
                        &j.prefix,
                        j.rows,
                        j.cols,
                        &j.config,
                        scale_dtype_for(t.dtype).1,
                    )),
                    None => planned.push(PlannedTensor {
                        name: t.name.clone(),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                    }),
                }
            }
            let file = resolve_output(path)?;
            Some(ShardedWriter::create(
                &file,
                planned,
                opts.max_shard_size,
                &meta,
            )?)
        }
        None => None,
    };
    let mut dequant = match &opts.dequantized {
        Some(path) => {
            let planned = model
                .tensors()
                .iter()
                .map(|t| PlannedTensor {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                })
                .collect();
            let file = resolve_output(path)?;
            Some(ShardedWriter::create(
                &file,
                planned,
                opts.max_shard_size,
                &meta,
            )?)
        }
        None => None,
    };
    // --equalize: the LayerNorms feeding fully selected qkv / fc1 layers are written once their
    // scales are known, not passed through.
    let eq_sites = equalize_sites(opts, vision.as_ref(), &jobs)?;
    let deferred: BTreeSet<String> = eq_sites
        .values()
        .flat_map(|site| [site.norm.0.clone(), site.norm.1.clone()])
        .collect();
    let mut eq_scales: HashMap<String, Vec<f32>> = HashMap::new();
    // Pass-through tensors go straight from the input map to the outputs.
    let t_pass = Instant::now();
    for t in model.tensors() {
        if jobs.iter().any(|j| j.meta.name == t.name) || deferred.contains(&t.name) {
            continue;
        }
        for w in [packed.as_mut(), dequant.as_mut()].into_iter().flatten() {
            w.write(&t.name, model.bytes(t))?;
        }
        model.release(t);
    }
    let pass = t_pass.elapsed().as_secs_f64();
    profile.add("write", pass);
    profile.add("write wait", pass);

    let work = match work_dir_of(opts) {
        Some(dir) => {
            let mut files: Vec<&Path> = model.files();
            files.extend(opts.calib.as_deref());
            files.extend(
                opts.images
                    .as_ref()
                    .map(|i| i.path.as_path())
                    .filter(|p| p.is_file()),
            );
            let fp = crate::resume::fingerprint(&files, &resume_identity(opts))?;
            Some(crate::resume::WorkDir::open(&dir, &fp, opts.resume)?)
        }
        None => None,
    };
    let verify_at: BTreeSet<usize> = if opts.verify_cpu > 0 && matches!(device, AnyDevice::Wgpu(_))
    {
        let k = opts.verify_cpu.min(jobs.len());
        (0..k)
            .map(|i| {
                if k == 1 {
                    0
                } else {
                    i * (jobs.len() - 1) / (k - 1)
                }
            })
            .collect()
    } else {
        if opts.verify_cpu > 0 {
            log::info!("--verify-cpu: the run is on the CPU already, nothing to verify");
        }
        BTreeSet::new()
    };
    progress(Progress::Start {
        layers: jobs.len(),
        device: &device_name,
    });
    let engine = match &vision {
        Some(_) => Some(Engine::for_device(&device)?),
        None => None,
    };
    let grams_raw = match (&vision, &engine, &opts.images) {
        (Some(v), Some(e), Some(io)) => {
            progress(Progress::Stage {
                name: "calibration images",
                stage: "embed",
            });
            let set = v.calib.as_ref().expect("opened with --images");
            Some(crate::calibrate::calibrator(
                e,
                &v.spec,
                &model,
                set,
                &v.calib_idx,
                io.mode,
                profile.clone(),
            )?)
        }
        _ => None,
    };
    // The held-out images walk through the model beside the calibration images.
    let holdout_raw = match (&vision, &engine, &opts.images) {
        (Some(v), Some(e), Some(io)) if !v.holdout_idx.is_empty() => {
            let set = v.calib.as_ref().expect("opened with --images");
            Some(crate::calibrate::calibrator(
                e,
                &v.spec,
                &model,
                set,
                &v.holdout_idx,
                io.mode,
                profile.clone(),
            )?)
        }
        _ => None,
    };
    let mut comq_weights = Overrides::new();
    let mut rtn_weights = Overrides::new();
    let mut hasher = Sha256::new();
    let mut layers = Vec::with_capacity(jobs.len());
    // Full-precision calibration runs one block ahead on its own thread; the quantized mode
    // needs each block's quantized weights first, so it stays in step.
    let fp_mode = opts
        .images
        .as_ref()
        .is_some_and(|io| io.mode == CalibMode::Fp);
    let blocks_needed: Vec<usize> = jobs
        .iter()
        .filter_map(|j| j.block.map(|(b, _)| b))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let (has_packed, has_dequant) = (packed.is_some(), dequant.is_some());
    let (packed, dequant) = std::thread::scope(
        |sc| -> Result<(Option<ShardedWriter>, Option<ShardedWriter>)> {
            let mut grams = grams_raw.map(|g| ahead_of(sc, g, fp_mode, &blocks_needed));
            let mut holdout = holdout_raw.map(|g| ahead_of(sc, g, fp_mode, &blocks_needed));
            // The reader decodes the next layer's weights while this one is quantized (one ahead).
            let (read_tx, read_rx) = std::sync::mpsc::sync_channel::<Result<Vec<f32>>>(1);
            {
                let (jobs, model, profile) = (&jobs, &model, profile.clone());
                sc.spawn(move || {
                    for job in jobs {
                        let w = profile.time("read", || {
                            let w = model.read_f32(&job.meta);
                            model.release(&job.meta);
                            w
                        });
                        if read_tx.send(w).is_err() {
                            break;
                        }
                    }
                });
            }
            // The writer encodes and writes behind the quantization (two messages of slack).
            let (out_tx, out_rx) = std::sync::mpsc::sync_channel::<Out>(2);
            let writer = {
                let profile = profile.clone();
                let (mut packed, mut dequant) = (packed, dequant);
                sc.spawn(
                    move || -> Result<(Option<ShardedWriter>, Option<ShardedWriter>)> {
                        for msg in out_rx {
                            let t = Instant::now();
                            msg.write(packed.as_mut(), dequant.as_mut())?;
                            profile.add("write", t.elapsed().as_secs_f64());
                        }
                        Ok((packed, dequant))
                    },
                )
            };
            let send = |o: Out| -> Result<()> {
                let t = Instant::now();
                let sent = out_tx.send(o);
                profile.add("write wait", t.elapsed().as_secs_f64());
                sent.map_err(|_| Error::InvalidOption("the output writer stopped".into()))
            };
            let looped = (|| -> Result<()> {
                for (index, job) in jobs.iter().enumerate() {
                    progress(Progress::LayerStart {
                        name: &job.meta.name,
                    });
                    let fetched = {
                        let t = Instant::now();
                        let r = read_rx.recv();
                        profile.add("read wait", t.elapsed().as_secs_f64());
                        r.map_err(|_| Error::InvalidOption("the weight reader stopped".into()))?
                    };
                    let t0 = Instant::now();
                    // What a saved layer was computed from: a resume reuses it only for the
                    // same weight bytes (a same-size edit with the time stamp restored passes
                    // the file fingerprint, not this).
                    let weights_sha = match (&work, &fetched) {
                        (Some(_), Ok(w)) => Some(crate::resume::weights_digest(w)),
                        _ => None,
                    };
                    let saved = match (&work, opts.resume, &weights_sha) {
                        (Some(w), true, Some(h)) => {
                            w.load(index, &job.meta.name, job.rows, job.cols, h)?
                        }
                        _ => None,
                    };
                    let resumed = saved.is_some();
                    let mut verify = None;
                    let mut choice: Option<Choice> = None;
                    let (outcome, samples) = match saved {
                        Some(s) => {
                            log::info!("{}: resumed from the work directory", job.meta.name);
                            (s.outcome, s.samples)
                        }
                        None => {
                            progress(Progress::Stage {
                                name: &job.meta.name,
                                stage: "read",
                            });
                            let w = fetched?;
                            progress(Progress::Stage {
                                name: &job.meta.name,
                                stage: "calibration",
                            });
                            let t = Instant::now();
                            let (gram, held) =
                                job_grams(job, calib.as_ref(), &device, &mut grams, &mut holdout)?;
                            let secs = t.elapsed().as_secs_f64();
                            match job.calib {
                                // In step, the calibrator's own forward and gram stages hold this time.
                                Some(CalibKind::Images) if fp_mode => {
                                    profile.add("calibration wait", secs)
                                }
                                Some(CalibKind::Images) | None => {}
                                Some(_) => profile.add("gram", secs),
                            }
                            let t_quantize = Instant::now();
                            progress(Progress::Stage {
                                name: &job.meta.name,
                                stage: "quantize",
                            });
                            // RTN of the layer as it is in the input, for --eval's baseline row.
                            if opts.eval.is_some() {
                                let r = crate::quant::quantize_layer(
                                    &crate::device::CpuDevice::new(),
                                    &job.meta.name,
                                    &w,
                                    job.rows,
                                    job.cols,
                                    &gram,
                                    &QuantConfig {
                                        method: Method::Rtn,
                                        ..job.config.clone()
                                    },
                                )?;
                                rtn_weights.insert(job.meta.name.clone(), r.layer.dequantize());
                            }
                            let (w, gram, held) = match eq_sites.get(&job.prefix) {
                                Some(site) => {
                                    let key = site.norm.0.clone();
                                    if !eq_scales.contains_key(&key) {
                                        let s =
                                            site_scales(&model, site, &gram, &job.meta.name, &w)?;
                                        for (name, meta) in [&site.norm.0, &site.norm.1]
                                            .into_iter()
                                            .filter_map(|n| {
                                                model
                                                    .tensors()
                                                    .iter()
                                                    .find(|t| &t.name == n)
                                                    .map(|t| (n, t))
                                            })
                                        {
                                            let v = crate::quant::equalize::divide(
                                                &model.read_f32(meta)?,
                                                &s,
                                            );
                                            let bytes = dtype::from_f32(meta.dtype, &v).ok_or_else(|| {
                                    Error::InvalidOption(format!(
                                        "--equalize: LayerNorm tensor '{name}' is not a float tensor"
                                    ))
                                })?;
                                            send(Out::Both(name.clone(), bytes))?;
                                            comq_weights.insert(name.clone(), v);
                                        }
                                        eq_scales.insert(key.clone(), s);
                                    }
                                    let s = &eq_scales[&key];
                                    (
                                        crate::quant::equalize::scale_columns(&w, s),
                                        crate::quant::equalize::scale_gram(&gram, s),
                                        held.map(|h| crate::quant::equalize::scale_gram(&h, s)),
                                    )
                                }
                                None => (w, gram, held),
                            };
                            // A search needs data: with G = I every candidate is scored on the weights alone.
                            let plan = opts.search.as_ref().filter(|_| {
                                job.calib.is_some() && job.config.method == Method::Comq
                            });
                            let quantize =
                                |device: &AnyDevice| -> Result<(LayerOutcome, Option<Choice>)> {
                                    match plan {
                                        Some(p) => {
                                            let c = crate::quant::search::search_any(
                                                device,
                                                &job.meta.name,
                                                &w,
                                                job.rows,
                                                job.cols,
                                                &gram,
                                                held.as_ref(),
                                                &job.config,
                                                p,
                                            )?;
                                            Ok((c.outcome.clone(), Some(c)))
                                        }
                                        None => Ok((
                                            crate::quant::quantize_layer_any(
                                                device,
                                                &job.meta.name,
                                                &w,
                                                job.rows,
                                                job.cols,
                                                &gram,
                                                &job.config,
                                            )?,
                                            None,
                                        )),
                                    }
                                };
                            let (outcome, c) = match quantize(&device) {
                                Err(e @ Error::Gpu { .. }) if opts.device == DeviceKind::Auto => {
                                    log::warn!("{e}; --device auto continues on the CPU from this layer on");
                                    device = AnyDevice::Cpu(crate::device::CpuDevice::new());
                                    device_name = device.describe();
                                    quantize(&device)?
                                }
                                other => other?,
                            };
                            choice = c;
                            if verify_at.contains(&index) && matches!(device, AnyDevice::Wgpu(_)) {
                                let c =
                                    quantize(&AnyDevice::Cpu(crate::device::CpuDevice::new()))?.0;
                                let pairs = c.layer.codes.iter().zip(&outcome.layer.codes);
                                let differ = pairs.clone().filter(|(a, b)| a != b).count();
                                verify = Some(VerifyReport {
                                    code_disagreement: differ as f64
                                        / c.layer.codes.len().max(1) as f64,
                                    max_code_diff: pairs
                                        .map(|(a, b)| (a - b).abs())
                                        .max()
                                        .unwrap_or(0),
                                    rel_error_cpu: c.rel_error,
                                });
                            }
                            profile.add("quantize", t_quantize.elapsed().as_secs_f64());
                            if let Some(w) = &work {
                                w.save(
                                    index,
                                    &job.meta.name,
                                    &outcome,
                                    gram.samples,
                                    weights_sha.as_deref().unwrap_or_default(),
                                )?;
                            }
                            (outcome, gram.samples)
                        }
                    };
                    let q = &outcome.layer;
                    // The dequantized weights, computed once for whoever needs them.
                    let mut deq =
                        ((grams.is_some() && !fp_mode) || opts.eval.is_some() || has_dequant)
                            .then(|| q.dequantize());
                    if let (Some(g), Some((b, role)), Some(d)) = (grams.as_mut(), job.block, &deq) {
                        g.quantized(b, role, d);
                    }
                    if let (Some(g), Some((b, role)), Some(d)) = (holdout.as_mut(), job.block, &deq)
                    {
                        g.quantized(b, role, d);
                    }
                    if let (true, Some(d)) = (opts.eval.is_some(), &deq) {
                        comq_weights.insert(job.meta.name.clone(), d.clone());
                    }
                    progress(Progress::Stage {
                        name: &job.meta.name,
                        stage: "write",
                    });
                    hasher.update(job.meta.name.as_bytes());
                    hasher.update(
                        q.unsigned_codes()
                            .iter()
                            .map(|&c| c as u8)
                            .collect::<Vec<u8>>(),
                    );
                    if has_packed {
                        send(Out::Packed {
                            prefix: job.prefix.clone(),
                            // The report needs only the errors: the codes move.
                            layer: outcome.layer,
                            scale: scale_dtype_for(job.meta.dtype).1,
                            sym: job.config.sym,
                        })?;
                    }
                    if has_dequant {
                        send(Out::Dequant {
                            name: job.meta.name.clone(),
                            dtype: job.meta.dtype,
                            values: deq.take().expect("computed above"),
                        })?;
                    }
                    let report = LayerReport {
                        name: job.meta.name.clone(),
                        shape: [job.rows, job.cols],
                        bits: job.config.bits,
                        group_size: job.config.group_size,
                        rel_error: outcome.rel_error,
                        rel_error_rtn: outcome.rel_error_rtn,
                        loss_history: outcome.history.clone(),
                        seconds: t0.elapsed().as_secs_f64(),
                        device: device_name.clone(),
                        calibration: match job.calib {
                            Some(CalibKind::Input) => "input",
                            Some(CalibKind::Gram) => "gram",
                            Some(CalibKind::Images) => "images",
                            None => "identity",
                        },
                        samples,
                        peak_rss_bytes: peak_rss_bytes(),
                        resumed,
                        verify_cpu: verify,
                        chosen: choice.as_ref().map(|c| c.chosen.clone()),
                        rel_error_holdout: choice.as_ref().and_then(|c| c.rel_error_holdout),
                        rel_error_holdout_rtn: choice
                            .as_ref()
                            .and_then(|c| c.rel_error_holdout_rtn),
                        candidates: choice.map(|c| c.tried).unwrap_or_default(),
                    };
                    progress(Progress::LayerDone(&report));
                    layers.push(report);
                }
                Ok(())
            })();
            // Close the queues (the reader and the calibration threads stop at their next send), then
            // let the writer drain; its own error, if any, is the cause of a failed send.
            drop(out_tx);
            drop(read_rx);
            drop(grams);
            drop(holdout);
            let written = writer
                .join()
                .map_err(|_| Error::InvalidOption("the output writer panicked".into()))??;
            looped?;
            Ok(written)
        },
    )?;
    let t_eval = Instant::now();
    let eval = match (&vision, &engine, &opts.eval) {
        (Some(v), Some(e), Some(eo)) => {
            progress(Progress::Stage {
                name: "evaluation images",
                stage: "evaluate",
            });
            let set = v.eval.as_ref().expect("opened with --eval");
            let idx = set.choose(eo.count.unwrap_or(usize::MAX), 0);
            let bits = match &mixed {
                Some(m) => format!("{:.2} mixed", m.average_bits),
                None => opts.config.bits.to_string(),
            };
            let mut rows = Vec::new();
            let map = crate::eval::label_map(set, &v.spec)?;
            let fp = crate::eval::features(e, &v.spec, &model, &Overrides::new(), set, &idx)?;
            rows.push(EvalRow {
                model: "FP32".into(),
                accuracy: crate::eval::accuracy(&fp, set, &idx, &map),
                fidelity: None,
            });
            // Layers resumed from a checkpoint have no RTN twin; their RTN row is then partial.
            for (label, weights) in [
                (format!("RTN W{bits}"), &rtn_weights),
                (format!("COMQ W{bits}"), &comq_weights),
            ] {
                let f = crate::eval::features(e, &v.spec, &model, weights, set, &idx)?;
                rows.push(EvalRow {
                    model: label,
                    accuracy: crate::eval::accuracy(&f, set, &idx, &map),
                    fidelity: Some(crate::eval::fidelity(&f, &fp)),
                });
            }
            Some(EvalReport {
                images: set.path().display().to_string(),
                count: idx.len(),
                rows,
            })
        }
        _ => None,
    };
    if eval.is_some() {
        profile.add("evaluate", t_eval.elapsed().as_secs_f64());
    }
    let codes_sha256: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    meta.insert("comq.codes_sha256".into(), codes_sha256.clone());
    progress(Progress::Writing);
    let t_finish = Instant::now();
    let mut outputs = BTreeMap::new();
    let mut written: Vec<PathBuf> = Vec::new();
    let input_config = model.dir().join("config.json");
    if let Some(w) = packed {
        let dest = w.dest().to_path_buf();
        let shards = w.shards();
        w.finish(&meta)?;
        outputs.insert("packed".into(), dest.display().to_string());
        written.extend(shard_files(&dest, shards));
        let modules: BTreeMap<String, ModuleScheme> = jobs
            .iter()
            .map(|j| {
                let s = ModuleScheme {
                    bits: j.config.bits,
                    group_size: j.config.group_size,
                    sym: j.config.sym,
                };
                (j.prefix.clone(), s)
            })
            .collect();
        let quantized: BTreeSet<&str> = jobs.iter().map(|j| j.meta.name.as_str()).collect();
        let ignore: Vec<String> = model
            .tensors()
            .iter()
            .filter(|t| {
                t.name.ends_with(".weight")
                    && t.shape.len() == 2
                    && !quantized.contains(t.name.as_str())
            })
            .map(|t| t.name.trim_end_matches(".weight").to_string())
            .collect();
        let qc = hfconfig::quantization_config(&modules, &ignore);
        let dir_mode = opts.out.as_deref().is_some_and(|p| output_file(p) != p);
        write_side_files(
            dir_mode,
            &dest,
            model.dir(),
            &input_config,
            Some(qc),
            &mut outputs,
        )?;
        if !opts.config.sym && dir_mode {
            log::warn!(
                "asymmetric pack-quantized output loads in vLLM and llm-compressor, but transformers' \
                 from_pretrained does not load it yet; pass --sym for a transformers-loadable checkpoint"
            );
        }
    }
    if let Some(w) = dequant {
        let dest = w.dest().to_path_buf();
        let shards = w.shards();
        w.finish(&meta)?;
        outputs.insert("dequantized".into(), dest.display().to_string());
        written.extend(shard_files(&dest, shards));
        let dir_mode = opts
            .dequantized
            .as_deref()
            .is_some_and(|p| output_file(p) != p);
        write_side_files(
            dir_mode,
            &dest,
            model.dir(),
            &input_config,
            None,
            &mut outputs,
        )?;
    }
    if let Some(w) = work {
        w.remove()?;
    }
    let mut input_sha256 = BTreeMap::new();
    for f in model.files().into_iter().chain(opts.calib.as_deref()) {
        input_sha256.insert(f.display().to_string(), sha256_file(f)?);
    }
    let mut output_sha256 = BTreeMap::new();
    for f in &written {
        output_sha256.insert(f.display().to_string(), sha256_file(f)?);
    }
    profile.add("finish", t_finish.elapsed().as_secs_f64());
    let wall = started.elapsed().as_secs_f64();
    let n = layers.len() as f64;
    let report = RunReport {
        tool: "comq-gpu",
        version: env!("CARGO_PKG_VERSION"),
        model: opts.model.display().to_string(),
        device: device_name,
        options: opts.config.clone(),
        calibration: calib_label(opts),
        data_free: layers.iter().any(|l| l.calibration == "identity"),
        totals: Totals {
            layers: layers.len(),
            weights: layers.iter().map(|l| l.shape[0] * l.shape[1]).sum(),
            mean_rel_error: layers.iter().map(|l| l.rel_error).sum::<f64>() / n,
            mean_rel_error_rtn: layers.iter().map(|l| l.rel_error_rtn).sum::<f64>() / n,
            seconds: wall,
        },
        layers,
        codes_sha256,
        outputs,
        input_sha256,
        output_sha256,
        peak_rss_bytes: peak_rss_bytes(),
        eval,
        mixed_precision: mixed,
        search: opts.search.clone(),
        holdout: if vision.as_ref().is_some_and(|v| !v.holdout_idx.is_empty()) {
            opts.holdout
        } else {
            0.0
        },
        profile: profile.report(wall),
        calibration_memory: calib_memory,
    };
    if let Some(path) = &opts.report {
        let json = serde_json::to_vec_pretty(&report).expect("report serialises");
        crate::io::writer::write_atomic(path, &json)?;
    }
    Ok(report)
}

/// The tensor files behind an output's destination (the file itself, or the shards of an index).
fn shard_files(dest: &Path, shards: usize) -> Vec<PathBuf> {
    if shards <= 1 || !dest.to_string_lossy().ends_with(".index.json") {
        return vec![dest.to_path_buf()];
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    let stem = dest
        .file_name()
        .map(|f| {
            f.to_string_lossy()
                .trim_end_matches(".safetensors.index.json")
                .to_string()
        })
        .unwrap_or_default();
    (1..=shards)
        .map(|i| dir.join(format!("{stem}-{i:05}-of-{shards:05}.safetensors")))
        .collect()
}

/// Writes `config.json` (with `quantization_config` when given) and copies the input's
/// `preprocessor_config.json` beside an output — unless the output sits in the input's own
/// directory, whose files are never touched.
fn write_side_files(
    dir_mode: bool,
    dest: &Path,
    input_dir: &Path,
    input_config: &Path,
    qc: Option<serde_json::Value>,
    outputs: &mut BTreeMap<String, String>,
) -> Result<()> {
    let out_dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir_mode {
        log::info!(
            "{} is a single file, so no config.json is written beside it; pass a directory \
             (--out DIR) for a checkpoint transformers can load",
            dest.display()
        );
        return Ok(());
    }
    if guard::same_file(out_dir, input_dir) {
        log::warn!(
            "{} is in the input's directory, so no config.json is written beside it; \
             pass an output directory (--out DIR) for a checkpoint transformers can load",
            dest.display()
        );
        return Ok(());
    }
    let has_input_config = input_config.is_file();
    match qc {
        Some(qc) => hfconfig::write_config(out_dir, Some(input_config), qc)?,
        None if has_input_config => {
            let bytes = std::fs::read(input_config).map_err(|e| Error::io(input_config, e))?;
            crate::io::writer::write_atomic(&out_dir.join("config.json"), &bytes)?;
        }
        None => return Ok(()),
    }
    outputs.insert(
        format!("config:{}", dest.display()),
        out_dir.join("config.json").display().to_string(),
    );
    let pre = input_dir.join("preprocessor_config.json");
    if pre.is_file() {
        let bytes = std::fs::read(&pre).map_err(|e| Error::io(&pre, e))?;
        crate::io::writer::write_atomic(&out_dir.join("preprocessor_config.json"), &bytes)?;
    }
    Ok(())
}

/// One tensor's line in `inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct InspectRow {
    /// Name.
    pub name: String,
    /// Dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Whether it would be quantized.
    pub quantize: bool,
    /// Why not, when not.
    pub reason: Option<&'static str>,
    /// Bytes in the input.
    pub bytes: usize,
    /// Bytes in the packed output.
    pub bytes_after: usize,
}

/// Lists the tensors of `model`, which would be quantized under `selection` and `cfg`, and sizes.
pub fn inspect(
    model: &Checkpoint,
    selection: &Selection,
    cfg: &QuantConfig,
) -> Result<Vec<InspectRow>> {
    let mut rows = Vec::new();
    for t in model.tensors() {
        let d = selection.decide(model.path(), t)?;
        let bytes = t.range.len();
        let (quantize, reason, after) = match d {
            Decision::Quantize => {
                let (r, c) = (t.shape[0], t.shape[1]);
                let mut lc = cfg.clone();
                if lc.group_size.is_some_and(|g| c % g != 0) {
                    lc.group_size = None;
                }
                let after = packed_plan("x", r, c, &lc, scale_dtype_for(t.dtype).1)
                    .iter()
                    .map(|p| p.nbytes())
                    .sum();
                (true, None, after)
            }
            Decision::Skip(why) => (false, Some(why), bytes),
        };
        rows.push(InspectRow {
            name: t.name.clone(),
            dtype: dtype::name(t.dtype),
            shape: t.shape.clone(),
            quantize,
            reason,
            bytes,
            bytes_after: after,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RunOptions {
        RunOptions {
            model: "m.safetensors".into(),
            calib: None,
            data_free: false,
            config: QuantConfig::default(),
            selection: Selection {
                only: None,
                skip: None,
            },
            out: Some("q.safetensors".into()),
            dequantized: None,
            report: None,
            plot: None,
            recipe: None,
            device: DeviceKind::Cpu,
            adapter: None,
            max_shard_size: DEFAULT_MAX_SHARD_BYTES,
            overrides: Vec::new(),
            resume: false,
            work_dir: None,
            verify_cpu: 0,
            memory_limit: None,
            images: Some(ImageOptions {
                path: "imgs".into(),
                count: 16,
                seed: 0,
                mode: CalibMode::Fp,
                resize: None,
                crop: None,
            }),
            eval: None,
            search: None,
            holdout: 0.0,
            target_bits: None,
            equalize: false,
            profile: false,
        }
    }

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
            ("target_bits", |o| o.target_bits = Some(3.0)),
            ("equalize", |o| o.equalize = true),
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
