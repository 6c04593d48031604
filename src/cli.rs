//! Command-line interface: clap definitions and thin wrappers over the library.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use comq_gpu::calibrate::CalibMode;
use comq_gpu::device::DeviceKind;
use comq_gpu::io::Checkpoint;
use comq_gpu::pipeline::{self, Progress, RunOptions, Selection};
use comq_gpu::quant::search::{
    SearchPlan, AUTO_DAMPS, AUTO_SCALARS, DEFAULT_DAMP, DEFAULT_HOLDOUT,
};
use comq_gpu::quant::{Granularity, Init, Method, OrderKind, QuantConfig};
use comq_gpu::recipe::{parse_size, Recipe};
use indicatif::{ProgressBar, ProgressStyle};

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

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CalibModeArg {
    /// Inputs from the full-precision model (the paper's setting).
    Fp,
    /// Inputs from the already-quantized prefix (sequential).
    Quantized,
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
    pub device: Option<DeviceArg>,
    /// Pick a GPU adapter by (part of) its name.
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    #[command(flatten)]
    pub pre: PreprocessArgs,
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
    pub order: OrderArg,
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
    pub preset: PresetArg,
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

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OrderArg {
    Greedy,
    Natural,
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    Default,
    Paper,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum InitArg {
    W,
    Rtn,
    Gptq,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GranularityArg {
    Channel,
    Layer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    Comq,
    Rtn,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Gpu,
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
    pub preset: Option<PresetArg>,
    /// Grid shrink factor c (the reference uses 0.65 at 2 bits), or `auto` to choose it per
    /// layer by error from 1.0, 0.95, 0.9, 0.85, 0.8 — and lower in 0.05 steps, to 0.5, while
    /// the smallest wins [default: auto; paper: 1.0].
    #[arg(long, value_name = "C|auto")]
    pub scalar: Option<String>,
    /// Coordinate-descent sweeps; 0 ships the start itself (not with --init w) [default: 1].
    #[arg(long)]
    pub sweeps: Option<usize>,
    /// Where the sweeps start: the float weights, round-to-nearest, or a GPTQ-style start
    /// [default: gptq; paper: w].
    #[arg(long, value_enum)]
    pub init: Option<InitArg>,
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
    /// Visiting order [default: greedy]. `shared`: one order for all rows, swept in blocks of
    /// 64 columns whose residual updates are matrix products (faster, usually a little less
    /// accurate; see the README).
    #[arg(long, value_enum)]
    pub order: Option<OrderArg>,
    /// Closed-form scale update after each sweep.
    #[arg(long)]
    pub scale_update: bool,
    /// One scale per output channel or per layer [default: channel].
    #[arg(long, value_enum)]
    pub granularity: Option<GranularityArg>,
    /// COMQ, or round-to-nearest on the same grid [default: comq].
    #[arg(long, value_enum)]
    pub method: Option<MethodArg>,
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

fn parse_enum<T: ValueEnum>(key: &str, v: Option<&String>) -> Result<Option<T>> {
    v.map(|s| {
        T::from_str(s, true)
            .map_err(|_| anyhow::anyhow!("recipe key {key} = '{s}' is not a valid value"))
    })
    .transpose()
}

impl QuantArgs {
    fn recipe(&self) -> Result<Recipe> {
        Ok(match &self.config {
            Some(p) => Recipe::load(p)?,
            None => Recipe::default(),
        })
    }

    fn paper(&self) -> bool {
        self.preset == Some(PresetArg::Paper)
    }

    /// `Some(c)` for a fixed grid shrink, `None` for `auto`.
    fn scalar(&self) -> Result<Option<f32>> {
        match self.scalar.as_deref() {
            Some("auto") => Ok(None),
            Some(t) => Ok(Some(t.parse::<f32>().map_err(|_| {
                comq_gpu::Error::InvalidOption(format!(
                    "--scalar '{t}' is neither a number nor 'auto'"
                ))
            })?)),
            // A recipe's `scalar` arrives as the flag (`parse_with_recipe`).
            None => Ok(self.paper().then_some(1.0)),
        }
    }

    /// The search around the configuration and the held-out share (`None`: one plain run).
    fn search(&self, cfg: &QuantConfig) -> Result<(Option<SearchPlan>, f32)> {
        let holdout = self
            .holdout
            .unwrap_or(if self.paper() { 0.0 } else { DEFAULT_HOLDOUT });
        if !(0.0..0.9).contains(&holdout) {
            anyhow::bail!(comq_gpu::Error::InvalidOption(format!(
                "--holdout {holdout} must be in [0, 0.9)"
            )));
        }
        if cfg.method == Method::Rtn {
            return Ok((None, 0.0));
        }
        // Without an explicit --damp, the default recipe also tries the other dampings.
        let damps = if self.damp.is_none() && !self.paper() {
            AUTO_DAMPS.to_vec()
        } else {
            Vec::new()
        };
        let plan = match (self.scalar()?, self.paper()) {
            (None, _) => Some(SearchPlan {
                scalars: AUTO_SCALARS.to_vec(),
                paper: !self.paper(),
                rtn_scalars: true,
                damps,
            }),
            (Some(_), true) if holdout == 0.0 => None,
            (Some(_), paper) => Some(SearchPlan {
                paper: !paper,
                damps,
                ..SearchPlan::single(cfg)
            }),
        };
        Ok((plan, holdout))
    }

    fn config(&self, r: &Recipe) -> Result<QuantConfig> {
        let d = QuantConfig::default();
        let paper = self.paper();
        let order = self.order.or(parse_enum("order", r.order.as_ref())?);
        let granularity = self
            .granularity
            .or(parse_enum("granularity", r.granularity.as_ref())?);
        let method = self.method.or(parse_enum("method", r.method.as_ref())?);
        Ok(QuantConfig {
            bits: self.bits.or(r.bits).unwrap_or(d.bits),
            sym: self.sym || r.sym.unwrap_or(false),
            group_size: self.group_size.or(r.group_size).filter(|&g| g > 0),
            scalar: self.scalar()?.unwrap_or(1.0),
            init: match self.init {
                Some(InitArg::W) => Init::W,
                Some(InitArg::Rtn) => Init::Rtn,
                Some(InitArg::Gptq) => Init::Gptq,
                None if paper => Init::W,
                None => Init::Gptq,
            },
            damp: self.damp.unwrap_or(if paper { 0.0 } else { DEFAULT_DAMP }),
            act_order: !self.no_act_order,
            sweeps: self.sweeps.or(r.sweeps).unwrap_or(d.sweeps),
            order: match order {
                Some(OrderArg::Natural) => OrderKind::Natural,
                Some(OrderArg::Shared) => OrderKind::Shared,
                _ => OrderKind::Greedy,
            },
            scale_update: self.scale_update || r.scale_update.unwrap_or(false),
            granularity: match granularity {
                Some(GranularityArg::Layer) => Granularity::Layer,
                _ => Granularity::Channel,
            },
            method: match method {
                Some(MethodArg::Rtn) => Method::Rtn,
                _ => Method::Comq,
            },
            ..d
        })
    }

    fn selection(&self, r: &Recipe) -> Result<Selection> {
        let only = self.only.as_deref().or(r.only.as_deref());
        let skip = self.skip.as_deref().or(r.skip.as_deref());
        Ok(Selection::new(only, skip)?)
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
    pub calib_mode: CalibModeArg,
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
    pub device: Option<DeviceArg>,
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
    /// weight, minimising the summed per-layer (held-out) error; per-layer recipe bits win.
    #[arg(long, value_name = "BITS")]
    pub target_bits: Option<f32>,
    /// Activation-aware equalisation: per-input scales for the layers fed by a LayerNorm (qkv,
    /// fc1), folded into that LayerNorm so the output is still a plain model (needs --images).
    #[arg(long)]
    pub equalize: bool,
    /// Print where the time went per stage (read, embed, forward, gram, quantize, write, ...);
    /// GPU stages wait for the device at their ends so the split is exact (costs a little
    /// overlap). The report always holds the profile.
    #[arg(long)]
    pub profile: bool,
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
    pub device: Option<DeviceArg>,
    /// Pick a GPU adapter by (part of) its name.
    #[arg(long, value_name = "NAME")]
    pub adapter: Option<String>,
    /// Memory budget of the device, as for `run`.
    #[arg(long, value_name = "SIZE")]
    pub memory_limit: Option<String>,
}

/// Sets up `env_logger` from -v/-q (RUST_LOG still wins).
pub fn init_logging(cli: &Cli) {
    let level = if cli.quiet {
        "error"
    } else {
        match cli.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
}

/// Parses the command line, then fills in what a `--config` recipe gives: every top-level key
/// of the recipe is the long name of a flag of the subcommand (`_` or `-`), applied as if it
/// were given unless the command line gives that flag itself. A key that is no flag is an error
/// that names the key and its line. `[[layer]]` rules are read by the subcommand.
pub fn parse_with_recipe(argv: Vec<std::ffi::OsString>) -> Result<Cli> {
    use clap::{parser::ValueSource, CommandFactory, FromArgMatches};
    let cmd = Cli::command();
    let m = cmd.clone().get_matches_from(argv.clone());
    let cli = Cli::from_arg_matches(&m)?;
    let Some((sub, sm)) = m.subcommand() else {
        return Ok(cli);
    };
    let Some(path) = sm.try_get_one::<PathBuf>("config").ok().flatten().cloned() else {
        return Ok(cli);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| comq_gpu::Error::io(&path, e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        comq_gpu::Error::InvalidOption(format!("{}: not a valid recipe: {e}", path.display()))
    })?;
    let subcmd = cmd
        .find_subcommand(sub)
        .expect("the parsed subcommand exists");
    let mut extra: Vec<std::ffi::OsString> = Vec::new();
    for (key, value) in &table {
        if key == "layer" {
            continue;
        }
        let line = Recipe::line_of(&text, key);
        let long = key.replace('_', "-");
        let Some(arg) = subcmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
        else {
            anyhow::bail!(comq_gpu::Error::InvalidOption(format!(
                "{} line {line}: '{key}' is not a flag of `comq-gpu {sub}` (see --help; \
                 per-layer settings go in [[layer]] tables)",
                path.display()
            )));
        };
        if sm.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        let flag = format!("--{long}");
        let takes_value = arg.get_action().takes_values();
        match value {
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    extra.push(flag.into());
                }
            }
            toml::Value::String(t) => extra.extend([flag.into(), t.into()]),
            toml::Value::Integer(i) => extra.extend([flag.into(), i.to_string().into()]),
            toml::Value::Float(f) => extra.extend([flag.into(), f.to_string().into()]),
            toml::Value::Array(a) => {
                let parts: Vec<String> = a
                    .iter()
                    .map(|v| match v {
                        toml::Value::String(t) => t.clone(),
                        toml::Value::Integer(i) => i.to_string(),
                        toml::Value::Float(f) => f.to_string(),
                        toml::Value::Boolean(b) => b.to_string(),
                        other => format!("{other:?}"),
                    })
                    .collect();
                extra.extend([flag.into(), parts.join(",").into()]);
            }
            other => anyhow::bail!(comq_gpu::Error::InvalidOption(format!(
                "{} line {line}: '{key} = {other:?}' is not a value --{long} takes",
                path.display()
            ))),
        }
    }
    if extra.is_empty() {
        return Ok(cli);
    }
    let mut all = argv;
    all.extend(extra);
    let m = cmd.try_get_matches_from(all).map_err(|e| {
        comq_gpu::Error::InvalidOption(format!(
            "{}: {}",
            path.display(),
            e.to_string().trim_start_matches("error: ").trim_end()
        ))
    })?;
    Ok(Cli::from_arg_matches(&m)?)
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run_cmd(*a, cli.quiet),
        Command::Inspect(a) => inspect_cmd(a),
        Command::Devices { json } => devices_cmd(json),
        Command::Bench(a) => bench_cmd(a),
        Command::Eval(a) => eval_cmd(a),
    }
}

fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

/// The per-stage table of `--profile`.
fn print_profile(p: &comq_gpu::profile::ProfileReport) {
    println!(
        "{:<18} {:>10} {:>8} {:>7}",
        "stage", "seconds", "calls", "% wall"
    );
    for s in &p.stages {
        println!(
            "{:<18} {:>10.3} {:>8} {:>6.1}%",
            s.stage,
            s.seconds,
            s.calls,
            100.0 * s.seconds / p.wall_seconds.max(1e-9)
        );
    }
    println!(
        "wall {:.3} s, {:.3} s without I/O (the main thread's waits on reading and writing and the \
         output finish taken off); stages on other threads overlap, so they can sum to more{}",
        p.wall_seconds,
        p.wall_seconds_without_io,
        if p.exact { "" } else { " (GPU stages not synchronised)" }
    );
}

/// With no output named, the packed checkpoint goes to the working directory as
/// `<model stem>.<comq|rtn>-w<bits>.safetensors`.
fn default_out(model: &std::path::Path, config: &QuantConfig) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let suffix = if config.method == Method::Rtn {
        "rtn"
    } else {
        "comq"
    };
    PathBuf::from(format!("{stem}.{suffix}-w{}.safetensors", config.bits))
}

/// The per-layer table of a run (with a search, the held-out errors and the shipped candidate).
fn print_layer_table(report: &pipeline::RunReport) {
    // With a search, the held-out errors and the shipped candidate follow.
    let searched = report.layers.iter().any(|l| l.chosen.is_some());
    let held = report.layers.iter().any(|l| l.rel_error_holdout.is_some());
    let extra = match (searched, held) {
        (true, true) => format!(" {:>12} {:>12}  chosen", "held COMQ", "held RTN"),
        (true, false) => "  chosen".to_string(),
        _ => String::new(),
    };
    println!(
        "{:<48} {:>13} {:>12} {:>12} {:>8} {:>8}{extra}",
        "layer", "shape", "err COMQ", "err RTN", "RTN/COMQ", "seconds"
    );
    let sci = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4e}"));
    for l in &report.layers {
        let ratio = if l.rel_error > 0.0 {
            l.rel_error_rtn / l.rel_error
        } else {
            f64::INFINITY
        };
        let extra = match (searched, held) {
            (true, true) => format!(
                " {:>12} {:>12}  {}",
                sci(l.rel_error_holdout),
                sci(l.rel_error_holdout_rtn),
                l.chosen.as_deref().unwrap_or("-")
            ),
            (true, false) => format!("  {}", l.chosen.as_deref().unwrap_or("-")),
            _ => String::new(),
        };
        println!(
            "{:<48} {:>13} {:>12.4e} {:>12.4e} {:>8.2} {:>8.3}{extra}",
            l.name,
            format!("{}x{}", l.shape[0], l.shape[1]),
            l.rel_error,
            l.rel_error_rtn,
            ratio,
            l.seconds
        );
    }
}

fn run_cmd(a: RunArgs, quiet: bool) -> Result<()> {
    let recipe = a.quant.recipe()?;
    let config = a.quant.config(&recipe)?;
    let (search, holdout) = a.quant.search(&config)?;
    let a_plot = a.plot.clone();
    if let Some(p) = &a_plot {
        if p.extension().is_none_or(|e| e != "png") {
            anyhow::bail!(comq_gpu::Error::InvalidOption(format!(
                "--plot {} must end in .png",
                p.display()
            )));
        }
    }
    let out = match (&a.out, &a.dequantized) {
        (None, None) => Some(default_out(&a.model, &config)),
        _ => a.out.clone(),
    };
    let device = a.device.or(parse_enum("device", recipe.device.as_ref())?);
    let max_shard_size = match (&a.max_shard_size, &recipe.max_shard_size) {
        (Some(t), _) => parse_size(t)?,
        (None, Some(s)) => s.bytes()?,
        (None, None) => pipeline::DEFAULT_MAX_SHARD_BYTES,
    };
    let opts = RunOptions {
        model: a.model,
        calib: a.calib.or(recipe.calib.clone()),
        data_free: a.data_free || recipe.data_free.unwrap_or(false),
        selection: a.quant.selection(&recipe)?,
        config,
        out,
        dequantized: a.dequantized,
        report: a.report,
        plot: a.plot.clone(),
        recipe: a.quant.config.clone(),
        device: match device {
            Some(DeviceArg::Cpu) => DeviceKind::Cpu,
            Some(DeviceArg::Gpu) => DeviceKind::Gpu,
            _ => DeviceKind::Auto,
        },
        adapter: a.adapter.or(recipe.adapter.clone()),
        max_shard_size,
        overrides: recipe.overrides()?,
        memory_limit: a.memory_limit.as_deref().map(parse_size).transpose()?,
        resume: a.resume,
        work_dir: a.work_dir,
        verify_cpu: a.verify_cpu,
        images: a.images.map(|path| pipeline::ImageOptions {
            path,
            count: a.calib_count,
            seed: a.seed,
            mode: match a.calib_mode {
                CalibModeArg::Fp => CalibMode::Fp,
                CalibModeArg::Quantized => CalibMode::Quantized,
            },
            resize: a.pre.resize,
            crop: a.pre.crop,
        }),
        eval: a.eval.map(|path| pipeline::EvalOptions {
            path,
            count: a.eval_count,
        }),
        search,
        holdout,
        target_bits: a.target_bits,
        equalize: a.equalize,
        profile: a.profile,
    };
    let bar = ProgressBar::hidden();
    if !quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} layers (ETA {eta}) {msg}",
        )
        .expect("valid template"),
    );
    let report = pipeline::run(&opts, &mut |p| match p {
        Progress::Start { layers, device } => {
            bar.set_length(layers as u64);
            bar.println(format!("quantizing {layers} layers on {device}"));
        }
        Progress::LayerStart { name } => bar.set_message(name.to_string()),
        Progress::Stage { name, stage } => bar.set_message(format!("{stage}: {name}")),
        Progress::LayerDone(_) => bar.inc(1),
        Progress::Writing => bar.set_message("finishing outputs"),
    });
    bar.finish_and_clear();
    let report = report?;
    if let Some(p) = &a_plot {
        let title = format!(
            "{} — W{} {} on {}",
            report.model,
            report.options.bits,
            if report.options.sym { "sym" } else { "asym" },
            report.device.split(" (").next().unwrap_or("")
        );
        comq_gpu::plot::plot_errors(p, &title, &report.layers)?;
        if !quiet {
            println!("wrote plot: {}", p.display());
        }
    }
    if !quiet {
        print_layer_table(&report);
        let t = &report.totals;
        println!(
            "{} layers, {} weights, mean relative error {:.4e} (RTN {:.4e}) in {:.2} s on {}{}",
            t.layers,
            t.weights,
            t.mean_rel_error,
            t.mean_rel_error_rtn,
            t.seconds,
            report.device,
            if report.data_free {
                " [data-free: G = I for some layers]"
            } else {
                ""
            }
        );
        for l in report.layers.iter().filter(|l| l.verify_cpu.is_some()) {
            let v = l.verify_cpu.as_ref().expect("filtered");
            println!(
                "verify-cpu {}: {:.4}% of codes differ (max |dk| {}), CPU error {:.4e} vs {:.4e}",
                l.name,
                100.0 * v.code_disagreement,
                v.max_code_diff,
                v.rel_error_cpu,
                l.rel_error
            );
        }
        if a.profile {
            print_profile(&report.profile);
        }
        let resumed = report.layers.iter().filter(|l| l.resumed).count();
        if resumed > 0 {
            println!("{resumed} layers resumed from the work directory");
        }
        for (k, v) in &report.outputs {
            println!("wrote {k}: {v}");
        }
        if let Some(e) = &report.eval {
            print!("{}", e.table());
        }
    }
    Ok(())
}

fn device_kind(d: Option<DeviceArg>) -> DeviceKind {
    match d {
        Some(DeviceArg::Cpu) => DeviceKind::Cpu,
        Some(DeviceArg::Gpu) => DeviceKind::Gpu,
        _ => DeviceKind::Auto,
    }
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let report = comq_gpu::eval::evaluate(
        &a.model,
        a.reference.as_deref(),
        &a.images,
        a.count,
        (a.pre.resize, a.pre.crop),
        device_kind(a.device),
        a.adapter.as_deref(),
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn inspect_cmd(a: InspectArgs) -> Result<()> {
    let model = Checkpoint::open(&a.model)?;
    let recipe = a.quant.recipe()?;
    let cfg = a.quant.config(&recipe)?;
    cfg.validate()?;
    let sel = a.quant.selection(&recipe)?;
    if a.plan {
        return plan_cmd(&a, model, cfg, sel, &recipe);
    }
    let rows = pipeline::inspect(&model, &sel, &cfg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<56} {:>5} {:>16} {:>10} {:>10}  note",
        "tensor", "dtype", "shape", "before", "after"
    );
    for r in &rows {
        println!(
            "{:<56} {:>5} {:>16} {:>10} {:>10}  {}",
            r.name,
            r.dtype,
            format!("{:?}", r.shape),
            human_bytes(r.bytes),
            human_bytes(r.bytes_after),
            if r.quantize {
                format!("quantize to {} bits", cfg.bits)
            } else {
                r.reason.unwrap_or("").to_string()
            }
        );
    }
    let before: usize = rows.iter().map(|r| r.bytes).sum();
    let after: usize = rows.iter().map(|r| r.bytes_after).sum();
    println!(
        "{} tensors, {} to quantize; {} -> {} ({:.2}x smaller)",
        rows.len(),
        rows.iter().filter(|r| r.quantize).count(),
        human_bytes(before),
        human_bytes(after),
        before as f64 / after.max(1) as f64
    );
    Ok(())
}

fn devices_cmd(json: bool) -> Result<()> {
    let list = comq_gpu::device::wgpu::list_adapters();
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no Vulkan, Metal or DX12 adapter found; comq-gpu will run on the CPU");
        return Ok(());
    }
    for (i, a) in list.iter().enumerate() {
        println!(
            "[{i}] {} ({}, {}, driver {} {})",
            a.name, a.backend, a.device_type, a.driver, a.driver_info
        );
        println!(
            "    max storage binding {}, max buffer {}, workgroup memory {} B, {} invocations/workgroup, features: {}",
            human_bytes(a.max_storage_binding as usize),
            human_bytes(a.max_buffer as usize),
            a.max_workgroup_storage,
            a.max_invocations,
            if a.features.is_empty() { "none".to_string() } else { a.features.join(", ") }
        );
    }
    Ok(())
}

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| anyhow::anyhow!("shape '{s}' is not OUTxIN"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    if let Some(shape) = &a.forward {
        return forward_bench_cmd(&a, shape);
    }
    if let Some(shape) = &a.model {
        return e2e_bench_cmd(&a, shape);
    }
    if a.kernels {
        return kernel_bench_cmd(&a);
    }
    use comq_gpu::bench::{run_bench, VIT_B16_SHAPES, VIT_L16_SHAPES};
    let shapes = bench_shapes(
        &a,
        &[(64, 64), (96, 128), (128, 96)],
        &[&VIT_B16_SHAPES[..], &VIT_L16_SHAPES[..]].concat(),
    )?;
    let cfg = QuantConfig {
        bits: a.bits,
        sweeps: a.sweeps,
        order: match a.order {
            OrderArg::Greedy => OrderKind::Greedy,
            OrderArg::Natural => OrderKind::Natural,
            OrderArg::Shared => OrderKind::Shared,
        },
        ..QuantConfig::default()
    };
    cfg.validate()?;
    let gpu = bench_devices(&a)?;
    println!(
        "{:>11} {:>10} {:>10} {:>9} {:>12} {:>8} {:>11} {:>11}",
        "shape", "CPU s", "GPU s", "speed-up", "codes diff", "max |dk|", "err", "err RTN"
    );
    let fmt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    let rows = run_bench(&shapes, &cfg, gpu.as_ref(), !a.no_cpu, a.repeats, |r| {
        println!(
            "{:>11} {:>10} {:>10} {:>9} {:>12} {:>8} {:>11.4e} {:>11.4e}",
            format!("{}x{}", r.shape[0], r.shape[1]),
            fmt(r.cpu_seconds, 4),
            fmt(r.gpu_seconds, 4),
            r.speedup.map_or("-".into(), |s| format!("{s:.1}x")),
            r.code_disagreement
                .map_or("-".into(), |d| format!("{:.4}%", 100.0 * d)),
            r.max_code_diff.map_or("-".into(), |d| d.to_string()),
            r.rel_error,
            r.rel_error_rtn
        );
    })?;
    if let Some(path) = a.json {
        comq_gpu::io::writer::write_atomic(&path, &serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

/// The layer shapes of a benchmark: `--shapes`, else `quick` with `--quick`, else `full`.
fn bench_shapes(
    a: &BenchArgs,
    quick: &[(usize, usize)],
    full: &[(usize, usize)],
) -> Result<Vec<(usize, usize)>> {
    if !a.shapes.is_empty() {
        a.shapes.iter().map(|s| parse_shape(s)).collect()
    } else if a.quick {
        Ok(quick.to_vec())
    } else {
        Ok(full.to_vec())
    }
}

/// Opens the GPU of a benchmark (unless `--no-gpu`) and says which devices will run.
fn bench_devices(a: &BenchArgs) -> Result<Option<comq_gpu::device::WgpuDevice>> {
    let gpu = if a.no_gpu {
        None
    } else {
        Some(comq_gpu::device::WgpuDevice::open(
            a.adapter.as_deref(),
            true,
        )?)
    };
    match &gpu {
        Some(g) => {
            use comq_gpu::Device;
            println!("GPU: {}", g.describe());
            if g.is_software() {
                println!("note: this is a software adapter; its times are not GPU performance");
            }
        }
        None => println!("GPU: not run"),
    }
    println!(
        "CPU: {} threads{}",
        rayon::current_num_threads(),
        if a.no_cpu { " (not run)" } else { "" }
    );
    Ok(gpu)
}

fn kernel_bench_cmd(a: &BenchArgs) -> Result<()> {
    use comq_gpu::bench::{run_kernel_bench, VIT_L16_SHAPES};
    let shapes = bench_shapes(a, &[(64, 64), (96, 128)], &VIT_L16_SHAPES)?;
    let gpu = bench_devices(a)?;
    println!(
        "{:>4} {:>11} {:>10} {:>10} {:>12} {:>10} {:>10} {:>12} {:>10}",
        "dev", "shape", "Gram s", "GFLOP/s", "greedy s", "G GB", "GB/s", "shared s", "GFLOP/s"
    );
    let rows = run_kernel_bench(&shapes, a.gram_rows, gpu.as_ref(), !a.no_cpu, |r| {
        println!(
            "{:>4} {:>11} {:>10.4} {:>10.1} {:>12.4} {:>10.2} {:>10.1} {:>12.4} {:>10.1}",
            r.device,
            format!("{}x{}", r.shape[0], r.shape[1]),
            r.gram_seconds,
            r.gram_flops / r.gram_seconds.max(1e-12) / 1e9,
            r.sweep_greedy_seconds,
            r.sweep_greedy_bytes / 1e9,
            r.sweep_greedy_bytes / r.sweep_greedy_seconds.max(1e-12) / 1e9,
            r.sweep_shared_seconds,
            r.sweep_shared_flops / r.sweep_shared_seconds.max(1e-12) / 1e9
        );
    })?;
    println!(
        "floors: the Gram and the shared sweep at the card's FP32 peak FLOP rate, the greedy sweep's \
         G bytes at its memory bandwidth (compare the rates above with the card's datasheet)"
    );
    if let Some(path) = &a.json {
        comq_gpu::io::writer::write_atomic(path, &serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

fn e2e_bench_cmd(a: &BenchArgs, shape: &str) -> Result<()> {
    use comq_gpu::bench::{run_e2e, E2eOptions};
    let dtype = match a.dtype.to_ascii_lowercase().as_str() {
        "f32" => safetensors::Dtype::F32,
        "bf16" => safetensors::Dtype::BF16,
        other => {
            return Err(comq_gpu::Error::InvalidOption(format!(
                "--dtype {other}: one of f32, bf16"
            ))
            .into())
        }
    };
    let order = match a.order {
        OrderArg::Greedy => "greedy",
        OrderArg::Natural => "natural",
        OrderArg::Shared => "shared",
    };
    if let Some(m) = &a.memory_limit {
        parse_size(m)?; // refused here, before any model is written
    }
    let o = E2eOptions {
        shape: shape.to_string(),
        blocks: a.blocks,
        images: a.images,
        dtype,
        work_dir: a
            .work_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("comq-e2e-bench")),
        run_args: [
            "--preset",
            match a.preset {
                PresetArg::Paper => "paper",
                PresetArg::Default => "default",
            },
            "--bits",
            &a.bits.to_string(),
            "--sweeps",
            &a.sweeps.to_string(),
            "--order",
            order,
        ]
        .map(String::from)
        .into_iter()
        .chain(
            a.memory_limit
                .iter()
                .flat_map(|m| ["--memory-limit".to_string(), m.clone()]),
        )
        .collect(),
    };
    std::fs::create_dir_all(&o.work_dir).map_err(|e| comq_gpu::Error::io(&o.work_dir, e))?;
    let devices: Vec<&str> = [(!a.no_gpu).then_some("gpu"), (!a.no_cpu).then_some("cpu")]
        .into_iter()
        .flatten()
        .collect();
    let mut rows = Vec::new();
    for d in devices {
        let r = run_e2e(&o, d)?;
        println!(
            "{} ({} blocks, {:.1} M linear weights), {} images, W{} {} order, {} recipe, on {}:",
            r.model,
            r.blocks,
            r.linear_params as f64 / 1e6,
            r.images,
            a.bits,
            order,
            o.run_args[1],
            r.device_name
        );
        for s in &r.stages {
            println!(
                "  {:<18} {:>10.3} s {:>8} calls",
                s.stage, s.seconds, s.calls
            );
        }
        println!(
            "  wall {:.3} s, without I/O {:.3} s, peak memory {}, mean layer error {:.4e}",
            r.wall_seconds,
            r.wall_seconds_without_io,
            r.peak_rss_bytes
                .map_or("unknown".into(), |b| human_bytes(b as usize)),
            r.mean_rel_error
        );
        if let Some(c) = &r.calibration_memory {
            println!(
                "  planned calibration memory: {} on the device, {} on the host",
                human_bytes(c.device_bytes as usize),
                human_bytes(c.host_bytes as usize)
            );
        }
        rows.push(r);
    }
    if let [g, c] = &rows[..] {
        println!(
            "GPU vs CPU (I/O excluded): {:.1}x",
            c.wall_seconds_without_io / g.wall_seconds_without_io.max(1e-9)
        );
    }
    if let Some(path) = &a.json {
        comq_gpu::io::writer::write_atomic(path, &serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

fn plan_cmd(
    a: &InspectArgs,
    model: Checkpoint,
    cfg: QuantConfig,
    sel: Selection,
    recipe: &Recipe,
) -> Result<()> {
    let device = match a.device.or(parse_enum("device", recipe.device.as_ref())?) {
        Some(DeviceArg::Cpu) => DeviceKind::Cpu,
        Some(DeviceArg::Gpu) => DeviceKind::Gpu,
        _ => DeviceKind::Auto,
    };
    let calib_path = a.calib.clone().or(recipe.calib.clone());
    let opts = RunOptions {
        model: a.model.clone(),
        data_free: calib_path.is_none(),
        calib: calib_path,
        config: cfg,
        selection: sel,
        out: None,
        dequantized: None,
        report: None,
        plot: None,
        recipe: a.quant.config.clone(),
        device,
        adapter: a.adapter.clone().or(recipe.adapter.clone()),
        max_shard_size: pipeline::DEFAULT_MAX_SHARD_BYTES,
        overrides: recipe.overrides()?,
        memory_limit: a.memory_limit.as_deref().map(parse_size).transpose()?,
        resume: false,
        work_dir: None,
        verify_cpu: 0,
        images: None,
        eval: None,
        search: None,
        holdout: 0.0,
        target_bits: None,
        equalize: false,
        profile: false,
    };
    let calib = opts
        .calib
        .as_deref()
        .map(comq_gpu::io::Calibration::open)
        .transpose()?;
    let jobs = pipeline::plan(&model, &opts, calib.as_ref())?;
    let dev = comq_gpu::AnyDevice::select(opts.device, opts.adapter.as_deref())?;
    let plan = comq_gpu::plan::preflight(
        &jobs,
        calib.as_ref(),
        &dev,
        opts.memory_limit,
        Some((128, 256)),
        opts.search
            .as_ref()
            .map(|_| opts.holdout > 0.0 && opts.images.is_some()),
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        println!("plan for {} on {}", model.path().display(), plan.device);
        println!(
            "{:<44} {:>11} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "layer", "shape", "bits", "W", "G", "R", "device", "host", "calib N", "est s"
        );
        for l in &plan.layers {
            println!(
                "{:<44} {:>11} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
                l.name,
                format!("{}x{}", l.shape[0], l.shape[1]),
                l.bits,
                human_bytes(l.w_bytes as usize),
                human_bytes(l.g_bytes as usize),
                human_bytes(l.residual_bytes as usize),
                human_bytes(l.device_bytes as usize),
                human_bytes(l.host_bytes as usize),
                l.calib_rows,
                l.est_seconds.map_or("-".into(), |s| format!("{s:.3}"))
            );
        }
        let opt = |v: Option<u64>| v.map_or("unknown".to_string(), |b| human_bytes(b as usize));
        println!(
            "peak device memory {} (budget {}), peak host memory {} (available {}), binding limit {}",
            human_bytes(plan.peak_device_bytes as usize),
            opt(plan.device_budget),
            human_bytes(plan.peak_host_bytes as usize),
            opt(plan.host_available),
            opt(plan.binding_limit)
        );
        if let Some(s) = plan.est_seconds {
            println!("estimated time {s:.2} s (from a measured 128x256 layer on this device; I/O excluded)");
        }
    }
    plan.check()?;
    Ok(())
}

fn forward_bench_cmd(a: &BenchArgs, shape: &str) -> Result<()> {
    let gpu = bench_devices(a)?;
    let r = comq_gpu::bench::run_forward_bench(shape, a.images, gpu.as_ref(), !a.no_cpu)?;
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!(
        "{:<10} {:>7} {:>12} {:>12} {:>9} {:>12}",
        "model", "images", "CPU img/s", "GPU img/s", "speed-up", "CLS rel diff"
    );
    println!(
        "{:<10} {:>7} {:>12} {:>12} {:>9} {:>12}",
        r.model,
        r.images,
        f(r.cpu_images_per_s),
        f(r.gpu_images_per_s),
        r.speedup.map_or("-".into(), |s| format!("{s:.1}x")),
        r.cls_rel_diff.map_or("-".into(), |d| format!("{d:.2e}"))
    );
    if let Some(path) = &a.json {
        comq_gpu::io::writer::write_atomic(path, &serde_json::to_vec_pretty(&r)?)?;
    }
    Ok(())
}
