//! The command line as clap types. Every value flag parses straight into the library's own
//! types (each library enum implements `clap::ValueEnum`); what a flag left unset means is the
//! library's to decide ([`comq_gpu::quant::Preset`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use comq_gpu::calibrate::CalibMode;
use comq_gpu::device::DeviceKind;
use comq_gpu::pipeline::{self, Selection};
use comq_gpu::quant::search::ChooseBy;
use comq_gpu::quant::{
    Choices, Granularity, Init, Method, OrderKind, Preset, QuantConfig, Resolved, SearchMode,
};
use comq_gpu::recipe::Recipe;

/// COMQ post-training quantization of neural-network weights, on any GPU or the CPU.
#[derive(Debug, Parser)]
#[command(name = "comq-gpu", version, about)]
pub struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Quantize a safetensors model.
    Run(Box<RunArgs>),
    /// List a model's tensors, which would be quantized, and sizes before and after.
    Inspect(InspectArgs),
    /// List the GPU adapters wgpu finds (name, backend, type, driver, key limits and features).
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Time the same synthetic layers on the CPU and the GPU and compare their codes.
    Bench(BenchArgs),
    /// Accuracy (top-1/top-5) of a ViT on labelled images, and with --reference the fidelity of
    /// its features to another model's (CLS cosine, relative MSE, nearest-neighbour agreement).
    Eval(EvalArgs),
}

/// Image preprocessing overrides shared by `run` and `eval`.
#[derive(Debug, Args)]
pub struct PreprocessArgs {
    /// Resize the shorter side to this many pixels before the centre crop [default: the model's].
    #[arg(long, value_name = "PX")]
    pub resize: Option<usize>,
    /// Centre crop = model input size, a multiple of the patch [default: the model's].
    #[arg(long, value_name = "PX")]
    pub crop: Option<usize>,
}

/// `comq-gpu eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model (a dense .safetensors file, shard index or directory; for a quantized model
    /// evaluate its --dequantized output).
    pub model: PathBuf,
    /// Images: a folder of PNG/JPEG files (class sub-folders give labels) or an image pack.
    #[arg(long, value_name = "DIR|PACK")]
    pub images: PathBuf,
    /// Compare features with this model (usually the full-precision original).
    #[arg(long, value_name = "MODEL")]
    pub reference: Option<PathBuf>,
    /// Use at most this many images.
    #[arg(long, value_name = "N", value_parser = at_least_one())]
    pub count: Option<usize>,
    /// Where to run [default: auto].
    #[arg(long, value_enum)]
    pub device: Option<DeviceKind>,
    /// Pick a GPU adapter by (part of) its name.
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    #[command(flatten)]
    pub pre: PreprocessArgs,
    /// Go on when the model holds tensors the forward pass does not read (a warning names each)
    /// instead of refusing it.
    #[arg(long)]
    pub allow_unused_tensors: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `comq-gpu bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Small shapes that finish in seconds even on a software GPU (for CI).
    #[arg(long)]
    pub quick: bool,
    /// Layer shapes as OUTxIN, comma-separated (default: ViT-B/16 and ViT-L/16 layers).
    #[arg(long, value_delimiter = ',')]
    pub shapes: Vec<String>,
    /// Bits.
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// Sweeps.
    #[arg(long, default_value_t = 1)]
    pub sweeps: usize,
    /// Timed runs per device (median).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Visiting order (`shared` runs the blocked sweep).
    #[arg(long, value_enum, default_value = "greedy")]
    pub order: OrderKind,
    /// Skip the CPU (GPU times only).
    #[arg(long)]
    pub no_cpu: bool,
    /// Skip the GPU (CPU times only).
    #[arg(long)]
    pub no_gpu: bool,
    /// Pick a GPU adapter by (part of) its name.
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    /// Also write the table as JSON.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Time the ViT forward pass instead, in images per second on the CPU and the GPU, on a
    /// random model of this shape: tiny, vit-s14, vit-b16 or vit-l16.
    #[arg(long, value_name = "SHAPE")]
    pub forward: Option<String>,
    /// Images per timed forward pass (with --model: calibration images).
    #[arg(long, default_value_t = 32)]
    pub images: usize,
    /// Time a whole `run` instead (calibration forward, Grams, quantization, writing), on a
    /// random model of this shape (tiny, vit-s14, vit-b16, vit-l16, vit-h14, vit-6b) and random
    /// 224-px images, on the GPU and the CPU (each in its own process), with the per-stage
    /// profile and peak memory.
    #[arg(long, value_name = "SHAPE")]
    pub model: Option<String>,
    /// Time the kernels alone instead, per layer shape: the Gram accumulation over --gram-rows
    /// resident activation rows, one per-row greedy sweep and one shared-order blocked sweep,
    /// with the work each must do (bytes or FLOPs) and the rate reached.
    #[arg(long)]
    pub kernels: bool,
    /// With --kernels: activation rows of the Gram.
    #[arg(long, default_value_t = 16384)]
    pub gram_rows: usize,
    /// With --model: only the first this many blocks.
    #[arg(long, value_name = "K")]
    pub blocks: Option<usize>,
    /// With --model: the recipe of the timed run (`paper`: one sweep from the float weights;
    /// `default`: GPTQ start, damping, grid-shrink search, held-out choice).
    #[arg(long, value_enum, default_value = "paper")]
    pub preset: Preset,
    /// With --model: weight dtype of the synthetic model (f32 or bf16).
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    pub dtype: String,
    /// With --model: where the synthetic model and images are written and kept for the next run
    /// [default: the system's temporary folder].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// With --model: the timed run's device memory budget (`run --memory-limit`), e.g. 8GB.
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
}

/// Options that shape the quantization grid and the algorithm. Every one may also come from
/// a `--config` recipe; a flag given here wins.
#[derive(Debug, Args)]
pub struct QuantArgs {
    /// Bits per weight (2..=8) [default: 4].
    #[arg(long)]
    pub bits: Option<u32>,
    /// Inputs per quantization group (default: one grid per output row; 0 = per row).
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Symmetric grid (zero point 0); needed for transformers-loadable output.
    #[arg(long)]
    pub sym: bool,
    /// The recipe the other options start from: `default` (GPTQ start, damping, grid-shrink
    /// search, candidates chosen on held-out images) or `paper` (the official COMQ recipe: one
    /// sweep from the float weights, fixed min/max grid, no damping, no held-out images).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Grid shrink factor c (the reference uses 0.65 at 2 bits), or `auto` to choose it per
    /// layer by held-out error: a line search in 0.05 steps between 0.5 and 1.0, from 0.9 at
    /// 4 bits (0.95 above, 0.85 at 3, 0.75 at 2) [default: auto; paper: 1.0].
    #[arg(long, value_name = "C|auto")]
    pub scalar: Option<String>,
    /// Candidates per layer with `--scalar auto`: `quick` (the line search, then the other
    /// damping; RTN at scale 1 as the guard) or `full` (also every shrink from 1.0 to 0.8, RTN
    /// at each and the paper's recipe: about twice the time) [default: quick].
    #[arg(long, value_enum)]
    pub search: Option<SearchMode>,
    /// What the search ships: the candidate with the lowest held-out error whole (`layer`),
    /// each output row from the candidate whose row scored best on the held-out images (`row`),
    /// or `row` where the held-out images give at least 4 activation rows per input of the
    /// layer and `layer` elsewhere (`auto`) [default: auto; paper: layer].
    #[arg(long, value_enum)]
    pub choose: Option<ChooseBy>,
    /// Coordinate-descent sweeps; 0 ships the start itself (not with --init w) [default: 1].
    #[arg(long)]
    pub sweeps: Option<usize>,
    /// Where the sweeps start: the float weights, round-to-nearest, or a GPTQ-style start
    /// [default: gptq; paper: w].
    #[arg(long, value_enum)]
    pub init: Option<Init>,
    /// Damping λ: every method minimises over G + λ·mean(diag G)·I
    /// [default: 0.01; paper: 0].
    #[arg(long, value_name = "λ")]
    pub damp: Option<f32>,
    /// GPTQ visits inputs in index order instead of by G_jj descending (act-order).
    #[arg(long)]
    pub no_act_order: bool,
    /// Share of the calibration images held out to choose, per layer, among the candidates
    /// (never worse than RTN on them); 0 chooses on the calibration error [default: 0.15].
    #[arg(long, value_name = "SHARE")]
    pub holdout: Option<f32>,
    /// Without held-out images (`--holdout 0`, or a `--calib` file of Gram matrices), compare
    /// candidates on the calibration error plus λ·mean(diag G)·‖W − Q‖², which charges for
    /// moving away from the weights; 0 compares the calibration error alone [default: 0.1].
    #[arg(long, value_name = "λ")]
    pub score_damp: Option<f32>,
    /// Visiting order [default: greedy]. `shared`: one order for all rows, swept in blocks of
    /// 64 columns whose residual updates are matrix products (faster, usually a little less
    /// accurate; see the README).
    #[arg(long, value_enum)]
    pub order: Option<OrderKind>,
    /// Closed-form scale update after each sweep.
    #[arg(long)]
    pub scale_update: bool,
    /// One scale per output channel or per layer [default: channel].
    #[arg(long, value_enum)]
    pub granularity: Option<Granularity>,
    /// COMQ, or round-to-nearest on the same grid [default: comq].
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Skip tensors matching this regex (replaces the default head/embedding pattern).
    #[arg(long, value_name = "RE")]
    pub skip: Option<String>,
    /// Quantize only `.weight` tensors matching this regex.
    #[arg(long, value_name = "RE")]
    pub only: Option<String>,
    /// A TOML recipe with the same keys as these flags and per-layer [[layer]] overrides.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// A count that must be at least 1 (zero images would score or calibrate nothing).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

impl QuantArgs {
    /// The recipe file (`--config`): its top-level keys arrived as flags
    /// ([`super::parse_with_recipe`]); its `[[layer]]` rules are read from here.
    pub fn recipe(&self) -> Result<Recipe> {
        Ok(match &self.config {
            Some(p) => Recipe::load(p)?,
            None => Recipe::default(),
        })
    }

    /// The preset (`--preset`, else the tool's default recipe).
    pub fn preset(&self) -> Preset {
        self.preset.unwrap_or_default()
    }

    /// The flags as the library's choices.
    pub fn choices(&self) -> Result<Choices> {
        Ok(Choices {
            bits: self.bits,
            sym: self.sym,
            group_size: self.group_size,
            scalar: self.scalar.as_deref().map(str::parse).transpose()?,
            sweeps: self.sweeps,
            init: self.init,
            damp: self.damp,
            no_act_order: self.no_act_order,
            holdout: self.holdout,
            score_damp: self.score_damp,
            search: self.search,
            choose: self.choose,
            order: self.order,
            scale_update: self.scale_update,
            granularity: self.granularity,
            method: self.method,
        })
    }

    /// The quantization options alone (what `inspect` needs).
    pub fn config(&self) -> Result<QuantConfig> {
        Ok(self.preset().config(&self.choices()?))
    }

    /// The options, the search and the held-out share of a run.
    pub fn resolve(&self) -> Result<Resolved> {
        Ok(self.preset().resolve(&self.choices()?)?)
    }

    /// The layer selection of `--only` and `--skip`.
    pub fn selection(&self) -> Result<Selection> {
        Ok(Selection::new(self.only.as_deref(), self.skip.as_deref())?)
    }
}

/// `comq-gpu run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The model (.safetensors).
    pub model: PathBuf,
    /// Calibration file holding `P.input` or `P.gram` for each layer `P.weight`.
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Use G = I (minimise ‖W − Q‖²) for layers without calibration.
    #[arg(long)]
    pub data_free: bool,
    /// Calibration images (a folder of PNG/JPEG files, searched recursively, or an image pack):
    /// the model's own ViT forward pass captures every block's layer inputs.
    #[arg(long, value_name = "DIR|PACK", conflicts_with = "calib")]
    pub images: Option<PathBuf>,
    /// Calibration images to use (a seeded choice from --images).
    #[arg(long, value_name = "N", value_parser = at_least_one(), default_value_t = pipeline::DEFAULT_CALIB_COUNT)]
    pub calib_count: usize,
    /// Seed of the calibration-image choice.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Layer inputs from the full-precision model, or from the already-quantized prefix.
    #[arg(long, value_enum, default_value = "fp")]
    pub calib_mode: CalibMode,
    /// Seeded augmented views (random resized crops of 35–100% of the area, flips) added per
    /// calibration image: a number, `auto` (up to 64 inputs in all, none from 64 images up) or
    /// `off`. The held-out images get views of their own, so the two sets stay disjoint by image.
    #[arg(long, value_name = "N|auto|off", default_value = "off")]
    pub augment: pipeline::Augment,
    #[command(flatten)]
    pub pre: PreprocessArgs,
    /// After quantizing, evaluate FP32 / RTN / COMQ on these images (folder or image pack).
    #[arg(long, value_name = "DIR|PACK")]
    pub eval: Option<PathBuf>,
    /// Use at most this many evaluation images.
    #[arg(long, value_name = "N", value_parser = at_least_one())]
    pub eval_count: Option<usize>,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Where to run [default: auto].
    #[arg(long, value_enum)]
    pub device: Option<DeviceKind>,
    /// Pick a GPU adapter by (part of) its name.
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    /// Packed compressed-tensors output (.safetensors); default `<model>.comq-w<bits>.safetensors`
    /// in the working directory when neither --out nor --dequantized is given.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Dequantized output with the input's names, shapes and dtypes.
    #[arg(long, value_name = "PATH")]
    pub dequantized: Option<PathBuf>,
    /// JSON report.
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
    /// Split outputs larger than this into shards with an index (e.g. 5GB, 500MB) [default: 5GB].
    #[arg(long, value_name = "SIZE")]
    pub max_shard_size: Option<String>,
    /// Continue an interrupted run from its per-layer checkpoints (same model, calibration and
    /// options; anything else is refused).
    #[arg(long)]
    pub resume: bool,
    /// Where per-layer checkpoints go [default: <first output>.work].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// On a GPU, re-run N layers (spread over the model) on the CPU and report code disagreement.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub verify_cpu: usize,
    /// Mixed precision: choose 2..=8 bits per layer so the average is at most this many bits per
    /// weight, minimising the summed per-layer (held-out) error, each weighted by its effect on
    /// the model's features (see --mixed-objective); per-layer recipe bits win.
    #[arg(long, value_name = "BITS")]
    pub target_bits: Option<f32>,
    /// What --target-bits minimises [default: output with images, layer without].
    #[arg(long, value_enum)]
    pub mixed_objective: Option<pipeline::MixedObjective>,
    /// Activation-aware equalisation: per-input scales for the layers fed by a LayerNorm (qkv,
    /// fc1), folded into that LayerNorm so the output is still a plain model (needs --images).
    #[arg(long)]
    pub equalize: bool,
    /// Rotate the residual stream (and each head's values) by seeded orthogonal matrices folded
    /// into the weights: the same network, weights easier to quantize, an ordinary checkpoint
    /// of the same architecture out. Needs a recognised ViT whose final LayerNorm feeds a linear
    /// layer of the checkpoint (a head, a pooler, an attention-pooling head).
    #[arg(long)]
    pub rotate: bool,
    /// Print where the time went per stage (read, embed, forward, gram, quantize, write, ...);
    /// GPU stages wait for the device at their ends so the split is exact (costs a little
    /// overlap). The report always holds the profile.
    #[arg(long)]
    pub profile: bool,
    /// Go on when the model holds tensors the forward pass does not read (a warning names each)
    /// instead of refusing it.
    #[arg(long)]
    pub allow_unused_tensors: bool,
    /// Draw the per-layer relative error, COMQ vs RTN, to this PNG.
    #[arg(long, value_name = "PATH.png")]
    pub plot: Option<PathBuf>,
    /// Memory budget of the device (host memory for --device cpu; default: the host's available
    /// memory on the CPU, none on a GPU); a layer that cannot fit is refused before any compute.
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
}

/// `comq-gpu inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The model (.safetensors).
    pub model: PathBuf,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Preflight plan: per layer the bytes of W, G and the residual, peak device and host
    /// memory, an estimated time from a quick measured run on the device; refuse a plan that
    /// cannot fit.
    #[arg(long)]
    pub plan: bool,
    /// Calibration file (for the plan's Gram-accumulation estimate and checks).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Device to plan for [default: auto].
    #[arg(long, value_enum)]
    pub device: Option<DeviceKind>,
    /// Pick a GPU adapter by (part of) its name.
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    /// Memory budget of the device, as for `run`.
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
}
