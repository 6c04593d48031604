//! What a run reports: one line per layer, the totals, the whole report and its provenance
//! metadata, and the process's peak memory and file hashes.

use super::mixed::MixedPrecision;
use super::options::RunOptions;
use crate::calibrate::CalibMode;
use crate::error::Error;
use crate::error::Result;
use crate::eval::EvalReport;
use crate::io::Checkpoint;
use crate::profile::ProfileReport;
use crate::quant::search::SearchPlan;
use crate::quant::search::Tried;
use crate::quant::QuantConfig;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// The GPU bytes `(up, down)` of the layers that counted them (each given as its `[out, in]`
/// shape and its counters) and, beside them, the least those layers could move without keeping
/// anything on the device: one f32 upload of `W` and `G` and one download of 32-bit codes each.
/// `None` when no layer counted (a CPU run).
pub fn layers_traffic(
    layers: impl IntoIterator<Item = ([usize; 2], Option<u64>, Option<u64>)>,
) -> Option<((u64, u64), u64)> {
    let mut counted = false;
    let (mut up, mut down, mut floor) = (0u64, 0u64, 0u64);
    for ([m, n], u, d) in layers {
        let (Some(u), Some(d)) = (u, d) else { continue };
        let (m, n) = (m as u64, n as u64);
        counted = true;
        up += u;
        down += d;
        floor += 4 * (2 * m * n + n * n);
    }
    counted.then_some(((up, down), floor))
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
    /// With the choice made row by row (`--choose row|auto`): how many output rows each
    /// candidate gave, `[label, rows]`, most first; empty when one candidate ships whole.
    pub rows_from: Vec<(String, usize)>,
    /// Bytes uploaded to a GPU while this layer was quantized (its Gram matrices, runs and
    /// scoring; with calibration one block ahead on the same GPU, that thread's transfers in
    /// the meantime too). `null` on the CPU.
    pub device_bytes_up: Option<u64>,
    /// Bytes this layer read back from a GPU.
    pub device_bytes_down: Option<u64>,
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
    /// Whether the search shipped whole candidates or rows (`--choose`; each layer's
    /// `rows_from` says what it did).
    pub choose: crate::quant::search::ChooseBy,
    /// Where the time went, per stage.
    pub profile: ProfileReport,
    /// The planned memory of the calibration (images runs).
    pub calibration_memory: Option<super::preflight::CalibMemory>,
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
    Ok(crate::util::hex(&h.finalize()))
}

pub(super) fn provenance(
    opts: &RunOptions,
    model: &Checkpoint,
    device: &str,
) -> BTreeMap<String, String> {
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
    // A grid shrink chosen per layer (`--scalar auto`) is in each layer's report entry; the
    // configured value would read as the shrink every layer got.
    let searched = opts.search.as_ref().filter(|p| p.line_search);
    put(
        "scalar",
        searched.map_or(c.scalar.to_string(), |_| "auto".into()),
    );
    if let Some(plan) = &opts.search {
        put(
            "search",
            serde_json::to_string(plan).expect("a search plan serialises"),
        );
        put(
            "choose",
            serde_json::to_value(opts.choose)
                .expect("enum")
                .as_str()
                .unwrap_or("")
                .into(),
        );
    }
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
    if opts.rotate {
        put(
            "rotation",
            format!("residual stream and values, seed {}", super::ROTATION_SEED),
        );
        put("rotation_seed", super::ROTATION_SEED.to_string());
    }
    put("device", device.to_string());
    m
}

pub(super) fn calib_label(opts: &RunOptions) -> String {
    if let Some(i) = &opts.images {
        return format!(
            "{} images of {} (seed {}{}{}, inputs from the {} model)",
            i.count,
            i.path.display(),
            i.seed,
            match (&opts.search, opts.holdout) {
                (Some(_), h) if h > 0.0 =>
                    format!(", {:.0}% held out to choose per layer", h * 100.0),
                _ => String::new(),
            },
            match opts.augment {
                super::Augment::Off => String::new(),
                super::Augment::Views(k) => format!(", {k} augmented views per image"),
                super::Augment::Auto => format!(
                    ", augmented views up to {} inputs",
                    super::AUGMENT_TARGET_VIEWS
                ),
            },
            match i.mode {
                CalibMode::Fp => "full-precision",
                CalibMode::Quantized => "quantized",
                CalibMode::Corrected => "quantized, corrected to full-precision outputs",
            }
        );
    }
    match (&opts.calib, opts.data_free) {
        (Some(p), false) => p.display().to_string(),
        (Some(p), true) => format!("{} (data-free G = I where missing)", p.display()),
        (None, _) => "data-free (G = I)".into(),
    }
}
