//! Preflight: what a run will need, per layer, before it computes anything.
//!
//! Memory is counted from the device's own layout (ARCHITECTURE.md, memory plan): on the GPU
//! `W`, `Q̂`, `R`, codes and a scratch row block (f32/i32), the order table (greedy only), steps
//! and code ranges, `G` in f32 and the packed copy of a compact upload (at most one chunk); on
//! the host the f32 weights, the f64 Gram, its f32 copy and
//! the downloaded codes and dequantized values (on the CPU also the device state and `G` in f64
//! for the exact products). Time is estimated from a quick measured run of a
//! small synthetic layer on the same device, scaled by `rows·cols²` (the work of a sweep and of a
//! residual refresh), plus Gram accumulation scaled by `N·cols²`.
//!
//! A plan is refused when a layer cannot fit: its Gram matrix over the adapter's storage-binding
//! limit, or its memory over the budget. The refusal names the layer and the option that would
//! make it fit.

use std::time::Instant;

use serde::Serialize;

use super::jobs::Job;
use super::options::search_state;
use super::options::RunOptions;
use super::vision::Vision;
use crate::device::AnyDevice;
use crate::error::{Error, Result};
use crate::io::Calibration;
use crate::quant::{quantize_layer_any, OrderKind, QuantConfig};

/// One layer's needs.
#[derive(Debug, Clone, Serialize)]
pub struct LayerPlan {
    /// Weight name.
    pub name: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Bits.
    pub bits: u32,
    /// Bytes of `W` in f32.
    pub w_bytes: u64,
    /// Bytes of `G` in f32.
    pub g_bytes: u64,
    /// Bytes of the residual `R` in f32.
    pub residual_bytes: u64,
    /// Device memory the layer's state needs.
    pub device_bytes: u64,
    /// Host memory the layer needs while it is processed.
    pub host_bytes: u64,
    /// Activation rows to accumulate (0 for a given Gram or data-free).
    pub calib_rows: u64,
    /// Estimated seconds (when measured).
    pub est_seconds: Option<f64>,
}

/// The whole preflight plan.
#[derive(Debug, Clone, Serialize)]
pub struct Preflight {
    /// The device it was planned for.
    pub device: String,
    /// Per layer.
    pub layers: Vec<LayerPlan>,
    /// Largest device memory of one layer (layers are processed one at a time).
    pub peak_device_bytes: u64,
    /// Largest host memory of one layer.
    pub peak_host_bytes: u64,
    /// The device memory budget checked against, if any.
    pub device_budget: Option<u64>,
    /// The host memory available, if known.
    pub host_available: Option<u64>,
    /// The adapter's storage-binding limit (GPU only).
    pub binding_limit: Option<u64>,
    /// Estimated total seconds (when measured).
    pub est_seconds: Option<f64>,
    /// Why the plan cannot run, with the fix (empty when it can).
    pub problems: Vec<String>,
}

impl Preflight {
    /// An error listing the problems, if there are any.
    pub fn check(&self) -> Result<()> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidOption(format!(
                "this run cannot fit, nothing was computed:\n  {}",
                self.problems.join("\n  ")
            )))
        }
    }
}

/// Memory of the calibration of an images run, beside the layer being quantized.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CalibMemory {
    /// On the device that runs the forward pass (the GPU; 0 on the CPU).
    pub device_bytes: u64,
    /// On the host.
    pub host_bytes: u64,
}

/// What the calibration of `images` images (calibration and held-out together) of a ViT of width
/// `dim`, MLP width `mlp` and `tokens` tokens per image holds at its peak, on a GPU (`gpu`) or the
/// CPU:
/// - the hidden state of every image (one block's input), resident where the forward runs;
/// - one batch's activations in flight (qkv, attention output, MLP hidden, LayerNorm output);
/// - one block's weights;
/// - the block's four Gram accumulators (f32, padded to 64, in as many slices as their split
///   over rows takes, on a GPU; plus the GPU's staging chunk), and on the host the f64 Grams of two blocks: the one being quantized and the one
///   calibrated ahead of it;
/// - on a GPU, the packed Gram triangles of those two blocks (with their held-out Grams) that
///   stay on the device for the layers, at most [`crate::device::wgpu::held::HELD_GRAM_BYTES`].
pub fn calibration_bytes(
    dim: usize,
    mlp: usize,
    tokens: usize,
    images: usize,
    gpu: bool,
) -> CalibMemory {
    let (d, m, t) = (dim as u64, mlp as u64, tokens as u64);
    let hidden = images as u64 * t * d * 4;
    let batch = crate::calibrate::batch_for(dim, mlp, tokens).min(images.max(1)) as u64
        * t
        * (6 * d + m)
        * 4;
    let weights = (4 * d * d + 2 * d * m + 10 * d) * 4;
    let pad = |n: u64| crate::device::wgpu::forward::gram_padded(n as usize) as u64;
    let gram = |n: u64| crate::device::wgpu::forward::gram_device_bytes(n as usize);
    let grams_f64 = (3 * d * d + m * m) * 8;
    if gpu {
        let chunk = 4096 * pad(m) * 4;
        // The Grams left on the device for the layers (`device::wgpu::held`): the block being
        // quantized and the one calibrated ahead, each with its held-out Grams, up to the cap.
        let held = {
            use crate::device::wgpu::held::{triangle_bytes, HeldGrams, HELD_GRAM_BYTES};
            let tri = |n: u64| {
                let n = n as usize;
                if HeldGrams::fits(n) {
                    triangle_bytes(n)
                } else {
                    0
                }
            };
            (4 * (3 * tri(d) + tri(m))).min(HELD_GRAM_BYTES)
        };
        CalibMemory {
            device_bytes: hidden + batch + weights + 3 * gram(d) + gram(m) + chunk + held,
            host_bytes: 2 * grams_f64,
        }
    } else {
        CalibMemory {
            device_bytes: 0,
            host_bytes: hidden + batch + weights + m * m * 4 + 2 * grams_f64,
        }
    }
}

/// [`calibration_bytes`] of a model: its most demanding block's, device and host each (a
/// Swin's blocks differ in width and tokens, a ViT's are all alike).
pub fn calibration_bytes_of(spec: &crate::model::VitSpec, images: usize, gpu: bool) -> CalibMemory {
    let each = spec.blocks.iter().map(|b| {
        let g = &b.geom;
        calibration_bytes(
            g.dim.max(g.merge_in),
            g.mlp,
            spec.block_tokens(b.index),
            images,
            gpu,
        )
    });
    each.fold(
        calibration_bytes(spec.dim, spec.mlp, spec.tokens_per_image(), images, gpu),
        |a, c| CalibMemory {
            device_bytes: a.device_bytes.max(c.device_bytes),
            host_bytes: a.host_bytes.max(c.host_bytes),
        },
    )
}

/// Whether a run calibrated from a file (`--calib`) builds each layer's Grams one layer ahead on
/// a thread of its own, and the host bytes it may hold in GPTQ factors built there with them.
/// Ahead, the host holds one more layer's Gram and held-out Gram in f64 (`16n²` bytes) and, when
/// the search starts from GPTQ, the factors of up to two layers at each damping (`4n² + 4n`
/// each). Off for a resumed run (most of its layers are read from the work directory, not
/// calibrated) and when the host has no room for the Grams beside the largest layer; the
/// factors get what is left, up to what they would hold.
pub fn calib_ahead(
    opts: &RunOptions,
    calib: Option<&Calibration>,
    jobs: &[Job],
    device: &AnyDevice,
) -> (bool, u64) {
    use crate::io::calib::CalibKind;
    if calib.is_none() || opts.resume {
        return (false, 0);
    }
    let from_file = |j: &&Job| matches!(j.calib, Some(CalibKind::Input | CalibKind::Gram));
    let Some(n) = jobs.iter().filter(from_file).map(|j| j.cols as u64).max() else {
        return (false, 0);
    };
    let cpu = matches!(device, AnyDevice::Cpu(_));
    let grams = 16 * n * n;
    let gptq = |j: &Job| j.config.gptq_start();
    let factors = match &opts.search {
        Some(plan) if jobs.iter().filter(from_file).any(gptq) => {
            (2 * (1 + plan.damps.len() as u64) * (4 * n * n + 4 * n))
                .min(crate::quant::prefactor::PREFACTOR_BYTES)
        }
        _ => 0,
    };
    let search = search_state(opts);
    let peak = jobs
        .iter()
        .map(|j| layer_bytes(j, device, search).1)
        .max()
        .unwrap_or(0);
    let budget = if cpu {
        opts.memory_limit.or(host_available_bytes())
    } else {
        host_available_bytes()
    };
    match budget {
        None => (true, factors),
        Some(b) if peak + grams > b => (false, 0),
        Some(b) => (true, factors.min(b - peak - grams)),
    }
}

/// One layer's `(device, host)` bytes: its state and, when it runs a candidate search (`search`
/// is `Some(holdout)`), the search's; on the CPU the device is the host, which also keeps the
/// exact products.
fn layer_bytes(j: &Job, device: &AnyDevice, search: Option<bool>) -> (u64, u64) {
    let cpu = matches!(device, AnyDevice::Cpu(_));
    let (m, n, cfg) = (j.rows, j.cols, &j.config);
    let (search_dev, search_host) = search.map_or((0, 0), |held| search_bytes(m, n, held, cfg));
    let dev = device_bytes(m, n, cfg) + search_dev + factor_build_bytes(j, device, search);
    let host = host_bytes(m, n, cpu, cfg)
        + search_host
        + if cpu {
            search_dev + cpu_tracking_bytes(m, n, cfg, search)
        } else {
            0
        };
    (dev, host)
}

/// Host bytes of the GPTQ factors a run builds ahead ([`crate::quant::prefactor`]): one per
/// block input (`4n² + 4n` bytes each) and damping, for the block being quantized and the one
/// after it, at most [`crate::quant::prefactor::PREFACTOR_BYTES`].
pub fn prefactor_bytes(spec: &crate::model::VitSpec, damps: usize) -> u64 {
    let block = |g: &crate::model::BlockGeom| -> u64 {
        g.sites()
            .into_iter()
            .map(|s| g.site_width(s) as u64)
            .map(|n| 4 * n * n + 4 * n)
            .sum::<u64>()
            * damps as u64
    };
    let largest = spec
        .blocks
        .iter()
        .map(|b| block(&b.geom))
        .max()
        .unwrap_or(0);
    (2 * largest).min(crate::quant::prefactor::PREFACTOR_BYTES)
}

/// Host memory available to new allocations (`MemAvailable`), where the OS reports it.
pub fn host_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn human(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

/// Device bytes of one layer's state (see the module doc).
pub fn device_bytes(rows: usize, cols: usize, cfg: &QuantConfig) -> u64 {
    let (m, n) = (rows as u64, cols as u64);
    let groups = (cols / cfg.group_size.unwrap_or(cols)) as u64;
    let order = match cfg.order {
        OrderKind::Greedy => 4 * m * n,
        // The permutation and the block's changes D.
        OrderKind::Shared => 4 * n + 4 * m * crate::quant::order::SHARED_BLOCK as u64,
        OrderKind::Natural => 0,
    };
    // The packed copy a compact upload (the Gram's triangle, the order's 16-bit indices)
    // goes through, at most one chunk.
    let packed = 4
        * (n * (n + 1) / 2)
            .max((m * n).div_ceil(2))
            .min(crate::device::wgpu::PACK_CHUNK as u64);
    20 * m * n + order + 12 * m * groups + 4 * m + 4 * n * n + packed
}

/// Host bytes while one layer is processed.
pub fn host_bytes(rows: usize, cols: usize, cpu: bool, cfg: &QuantConfig) -> u64 {
    let (m, n) = (rows as u64, cols as u64);
    // f32 weights, codes and dequantized values out, f64 Gram + f32 copy.
    let base = 4 * m * n * 3 + 12 * n * n;
    if cpu {
        // The CPU state also keeps G widened to f64 for the exact products.
        base + device_bytes(rows, cols, cfg) + 8 * n * n
    } else {
        base + 4 * m * n // the greedy order is built on the host before upload
    }
}

/// What the CPU keeps to update its exact products after a sweep ([`Device::track_sweeps`]):
/// `(W − Q̂)·G` in f64 and the `Q̂` a sweep starts from, and with held-out images each row's
/// held-out loss (f64). A search always keeps them (`search` is `Some(holdout)`); a lone run does when its
/// sweeps follow a GPTQ or RTN start.
///
/// [`Device::track_sweeps`]: crate::device::Device::track_sweeps
pub fn cpu_tracking_bytes(
    rows: usize,
    cols: usize,
    cfg: &QuantConfig,
    search: Option<bool>,
) -> u64 {
    let mn = rows as u64 * cols as u64;
    match search {
        Some(holdout) => 12 * mn + if holdout { 8 * rows as u64 } else { 0 },
        None if crate::quant::comq::tracks_sweeps(cfg) => 12 * mn,
        None => 0,
    }
}

/// The work matrices a GPU that builds a search's GPTQ factors itself holds while it builds one
/// (two `n × n` f64, with the diagonal and a flag): nothing elsewhere.
fn factor_build_bytes(j: &Job, device: &AnyDevice, search: Option<bool>) -> u64 {
    let n = j.cols as u64;
    if search.is_some() && j.config.gptq_start() && device.builds_factors(j.cols) {
        16 * n * n + 8 * n + 16
    } else {
        0
    }
}

/// What a candidate search adds to one layer's state, `(device, host)` bytes. The search stays
/// resident ([`crate::quant::search`]): on the device the kept codes and steps of the best
/// candidate (and with held-out images its best rows), the GPTQ factor of the damping being run, the stashed orders of up to three
/// dampings and, with held-out images, the held-out Gram; on the host the shipped codes, the order (`u32` per weight for the per-row greedy
/// order) and factor of each of up to three dampings, and with held-out images that Gram in f64
/// and its f32 upload copy.
pub fn search_bytes(rows: usize, cols: usize, holdout: bool, cfg: &QuantConfig) -> (u64, u64) {
    let (m, n) = (rows as u64, cols as u64);
    let groups = cfg.group_size.map_or(1, |g| n / g.max(1) as u64);
    let order = match cfg.order {
        OrderKind::Greedy => 4 * m * n,
        _ => 4 * n,
    };
    let held = |bytes: u64| if holdout { bytes } else { 0 };
    // With held-out images the best rows are kept too (codes, steps, lowest codes), and each
    // row's tag and loss on the host.
    let device = 4 * m * n
        + 4 * m * groups
        + 4 * n * n
        + 4 * n
        + 3 * order
        + held(4 * n * n + 4 * m * n + 8 * m * groups);
    let host = 4 * m * n + 3 * (order + 4 * n * n) + held(12 * n * n + 16 * m + 8 * m * groups);
    (device, host)
}

/// Plans `jobs` for `device`. With `measure`, a small synthetic layer of that shape is run on the
/// device first to estimate times. `search` is `Some(holdout)` when each layer runs a candidate
/// search (with held-out images or not): its state counts too.
pub fn preflight(
    jobs: &[Job],
    calib: Option<&Calibration>,
    device: &AnyDevice,
    memory_limit: Option<u64>,
    measure: Option<(usize, usize)>,
    search: Option<bool>,
) -> Result<Preflight> {
    let cpu = matches!(device, AnyDevice::Cpu(_));
    let binding_limit = match device {
        AnyDevice::Wgpu(d) => Some(d.binding_limit()),
        AnyDevice::Cpu(_) => None,
    };
    let host_available = host_available_bytes();
    let device_budget = if cpu {
        memory_limit.or(host_available)
    } else {
        memory_limit
    };
    let (rate_sweep, rate_gram) = match measure {
        Some((m, n)) => {
            let (a, b) = measure_rates(device, m, n, jobs.first().map(|j| &j.config))?;
            (Some(a), Some(b))
        }
        None => (None, None),
    };
    let mut layers = Vec::new();
    let mut problems = Vec::new();
    for j in jobs {
        let (m, n) = (j.rows, j.cols);
        let cfg = &j.config;
        let (dev, host) = layer_bytes(j, device, search);
        let calib_rows = calib.map_or(0, |c| c.rows(&j.prefix, n));
        let g_bytes = (4 * n * n) as u64;
        let work = (m * n * n) as f64
            * (cfg.sweeps as f64 * if cfg.scale_update { 3.0 } else { 2.0 } + 3.0);
        let est = rate_sweep
            .map(|r| work / r + rate_gram.map_or(0.0, |g| calib_rows as f64 * (n * n) as f64 / g));
        if let Some(lim) = binding_limit {
            if g_bytes > lim {
                problems.push(format!(
                    "layer '{}' needs a {n}×{n} Gram matrix of {} but the adapter binds at most {}: use --device cpu, or --skip '{}'",
                    j.meta.name,
                    human(g_bytes),
                    human(lim),
                    regex::escape(&j.meta.name)
                ));
            }
        }
        if let Some(budget) = device_budget {
            let need = if cpu { host } else { dev };
            if need > budget {
                let natural = QuantConfig {
                    order: OrderKind::Natural,
                    ..cfg.clone()
                };
                let need_nat = if cpu {
                    host_bytes(m, n, true, &natural)
                } else {
                    device_bytes(m, n, &natural)
                };
                let fix = if need_nat <= budget {
                    "--order natural (no per-row order table)".to_string()
                } else if !cpu && host_available.is_some_and(|h| host_bytes(m, n, true, cfg) <= h) {
                    "--device cpu".to_string()
                } else {
                    format!("--skip '{}'", regex::escape(&j.meta.name))
                };
                problems.push(format!(
                    "layer '{}' [{m}, {n}] needs {} of {} memory but the budget is {}: use {fix}",
                    j.meta.name,
                    human(need),
                    if cpu { "host" } else { "device" },
                    human(budget)
                ));
            }
        }
        layers.push(LayerPlan {
            name: j.meta.name.clone(),
            shape: [m, n],
            bits: cfg.bits,
            w_bytes: (4 * m * n) as u64,
            g_bytes,
            residual_bytes: (4 * m * n) as u64,
            device_bytes: dev,
            host_bytes: host,
            calib_rows,
            est_seconds: est,
        });
    }
    Ok(Preflight {
        device: device.describe(),
        peak_device_bytes: layers.iter().map(|l| l.device_bytes).max().unwrap_or(0),
        peak_host_bytes: layers.iter().map(|l| l.host_bytes).max().unwrap_or(0),
        est_seconds: rate_sweep.map(|_| layers.iter().filter_map(|l| l.est_seconds).sum()),
        layers,
        device_budget,
        host_available,
        binding_limit,
        problems,
    })
}

/// Measures `rows·cols²` per second for a whole layer and `N·cols²` per second for Gram
/// accumulation on `device`, on a small synthetic problem (one warm-up, one timed run).
fn measure_rates(
    device: &AnyDevice,
    m: usize,
    n: usize,
    cfg: Option<&QuantConfig>,
) -> Result<(f64, f64)> {
    let cfg = QuantConfig {
        group_size: None,
        ..cfg.cloned().unwrap_or_default()
    };
    let w = crate::quant::synth::weights(m, n, 7);
    let g = crate::quant::synth::correlated_gram(n, 8);
    quantize_layer_any(device, "preflight", &w, m, n, &g, &cfg)?;
    let t = Instant::now();
    quantize_layer_any(device, "preflight", &w, m, n, &g, &cfg)?;
    let secs = t.elapsed().as_secs_f64().max(1e-6);
    let work =
        (m * n * n) as f64 * (cfg.sweeps as f64 * if cfg.scale_update { 3.0 } else { 2.0 } + 3.0);
    let rows = 1024;
    let x = crate::quant::synth::weights(rows, n, 9);
    let t = Instant::now();
    let chunks = std::iter::once(Ok(x));
    let _ = device.gram(n, chunks)?;
    let gsecs = t.elapsed().as_secs_f64().max(1e-6);
    Ok((work / secs, (rows * n * n) as f64 / gsecs))
}

/// Refuses, before any compute, an images run whose calibration (above all the hidden state of
/// every image, one block's input) cannot fit beside the largest layer; returns its plan.
pub(super) fn check_calibration(
    opts: &RunOptions,
    v: &Vision,
    jobs: &[Job],
    device: &AnyDevice,
) -> Result<(CalibMemory, u64)> {
    // The calibration (above all the hidden state of every image, one block's input) is
    // the big allocation of an images run; refuse before any compute when it cannot fit
    // beside the largest layer.
    // Every image walks through the model with its augmented views; with `--calib-mode
    // corrected` the calibration images walk twice (quantized and full-precision), so their
    // hidden state counts twice.
    let walks = match opts.images.as_ref().map(|i| i.mode) {
        Some(crate::calibrate::CalibMode::Corrected) => 2,
        _ => 1,
    };
    let images = (v.calib_idx.len() * walks + v.holdout_idx.len()) * (1 + v.extra_views as usize);
    let gpu = matches!(device, AnyDevice::Wgpu(_));
    let c = calibration_bytes_of(&v.spec, images, gpu);
    let largest = jobs
        .iter()
        .map(|j| {
            let search = search_state(opts);
            let (sd, sh) =
                search.map_or((0, 0), |held| search_bytes(j.rows, j.cols, held, &j.config));
            if gpu {
                device_bytes(j.rows, j.cols, &j.config) + sd + factor_build_bytes(j, device, search)
            } else {
                host_bytes(j.rows, j.cols, true, &j.config) + sd + sh
            }
        })
        .max()
        .unwrap_or(0);
    // On a GPU also the buffer pool's cap and the transfers' staging copies, which wgpu
    // allocates beside the state.
    let bytes = if gpu {
        c.device_bytes
            + largest
            + crate::device::wgpu::buffers::POOL_CAP_BYTES
            + crate::device::wgpu::buffers::STAGING_BYTES
    } else {
        c.host_bytes + largest
    };
    let budget = match &device {
        AnyDevice::Cpu(_) => opts.memory_limit.or_else(host_available_bytes),
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
    // The GPTQ factors built ahead (when the search starts from GPTQ) are a saving of time, not
    // a need: they get what the host has left beside the rest, up to what they would hold.
    let want = match (&opts.search, opts.config.init, opts.config.method) {
        (Some(plan), crate::quant::Init::Gptq, crate::quant::Method::Comq) => {
            prefactor_bytes(&v.spec, 1 + plan.damps.len())
        }
        _ => 0,
    };
    let host_used = if gpu { c.host_bytes } else { bytes };
    let host_budget = match &device {
        AnyDevice::Cpu(_) => budget,
        AnyDevice::Wgpu(_) => host_available_bytes(),
    };
    let ahead = host_budget.map_or(want, |b| want.min(b.saturating_sub(host_used)));
    Ok((c, ahead))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_6b_shape_calibrates_with_1024_images_in_8_gb_of_gpu_and_16_gb_of_host_memory() {
        // Width 3200, MLP 12800, 224 px at patch 14 (257 tokens); fc2 is the largest layer, and
        // the buffer pool may hold up to its cap and the transfers their staging beside it.
        let c = calibration_bytes(3200, 12800, 257, 1024, true);
        let cfg = QuantConfig::default();
        let layer = device_bytes(3200, 12800, &cfg);
        let total = c.device_bytes
            + layer
            + crate::device::wgpu::buffers::POOL_CAP_BYTES
            + crate::device::wgpu::buffers::STAGING_BYTES;
        assert!(total < 8_000_000_000, "{total} bytes");
        // The hidden state alone is 1024 × 257 × 3200 × 4 bytes.
        assert!(c.device_bytes > 1024 * 257 * 3200 * 4);
        // With the GPTQ factors built ahead at their cap.
        let host = c.host_bytes
            + host_bytes(3200, 12800, false, &cfg)
            + crate::quant::prefactor::PREFACTOR_BYTES;
        assert!(host < 16_000_000_000, "{host} bytes");
        // Batches shrink for the wide shape only.
        assert_eq!(crate::calibrate::batch_for(1024, 4096, 197), 32);
        assert_eq!(crate::calibrate::batch_for(3200, 12800, 257), 8);
        // On the CPU the hidden state moves to the host.
        let cpu = calibration_bytes(3200, 12800, 257, 1024, false);
        assert_eq!(cpu.device_bytes, 0);
        assert!(cpu.host_bytes > c.host_bytes + 1024 * 257 * 3200 * 4);
    }
}

#[cfg(test)]
mod search_tests {
    use super::*;

    #[test]
    fn a_search_holds_one_stage_whatever_the_sweeps() {
        let one = QuantConfig::default();
        let many = QuantConfig {
            sweeps: 50,
            ..QuantConfig::default()
        };
        assert_eq!(
            search_bytes(768, 3072, true, &one),
            search_bytes(768, 3072, true, &many)
        );
        // The held-out Gram adds to both sides; the kept candidate and the factor are on the
        // device either way.
        let (dev, host) = search_bytes(768, 3072, true, &one);
        let (dev0, host0) = search_bytes(768, 3072, false, &one);
        assert!(dev > dev0 && dev0 >= 4 * 768 * 3072 && host > host0);
    }
}
