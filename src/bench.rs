//! The benchmark drivers of `comq-gpu bench`: whole layers, kernels alone, the forward pass and
//! whole runs, on synthetic data (`quant::synth`, `model::synthetic`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::quant::Gram;

/// Shapes `[out, in]` of the four linear layers of a ViT-B/16 block (qkv, proj, fc1, fc2).
pub const VIT_B16_SHAPES: [(usize, usize); 4] = [(2304, 768), (768, 768), (3072, 768), (768, 3072)];

/// Shapes `[out, in]` of the four linear layers of a ViT-L/16 block.
pub const VIT_L16_SHAPES: [(usize, usize); 4] =
    [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)];

pub use crate::quant::synth::{correlated_gram, weights};
pub use crate::util::rng::SplitMix;

/// One line of `comq-gpu bench`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Seconds for the whole layer on the CPU (median), if run.
    pub cpu_seconds: Option<f64>,
    /// Seconds for the whole layer on the GPU (median, upload and download included), if run.
    pub gpu_seconds: Option<f64>,
    /// CPU time / GPU time.
    pub speedup: Option<f64>,
    /// Share of codes that differ between CPU and GPU.
    pub code_disagreement: Option<f64>,
    /// Largest |k_cpu − k_gpu|.
    pub max_code_diff: Option<i32>,
    /// Relative error on the GPU (CPU when no GPU ran).
    pub rel_error: f64,
    /// RTN's relative error.
    pub rel_error_rtn: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Quantizes synthetic layers of `shapes` on the CPU and/or the GPU in this process and
/// compares time and codes. `repeats` timed runs per device (median); the GPU gets one
/// untimed warm-up run per shape first (clocks ramp up, pipelines and pools warm).
pub fn run_bench(
    shapes: &[(usize, usize)],
    cfg: &crate::quant::QuantConfig,
    gpu: Option<&crate::device::WgpuDevice>,
    cpu: bool,
    repeats: usize,
    mut on_row: impl FnMut(&BenchRow),
) -> crate::Result<Vec<BenchRow>> {
    use crate::quant::quantize_layer;
    let repeats = repeats.max(1);
    let mut rows = Vec::new();
    for (i, &(m, n)) in shapes.iter().enumerate() {
        let w = weights(m, n, 1 + i as u64);
        let g = correlated_gram(n, 100 + i as u64);
        let time = |f: &dyn Fn() -> crate::Result<crate::quant::LayerOutcome>| -> crate::Result<(f64, crate::quant::LayerOutcome)> {
            let mut times = Vec::new();
            let mut last = None;
            for _ in 0..repeats {
                let t = std::time::Instant::now();
                last = Some(f()?);
                times.push(t.elapsed().as_secs_f64());
            }
            Ok((median(times), last.expect("repeats ≥ 1")))
        };
        let c = if cpu {
            let dev = crate::device::CpuDevice::new();
            Some(time(&|| quantize_layer(&dev, "bench", &w, m, n, &g, cfg))?)
        } else {
            None
        };
        let gr = match gpu {
            Some(dev) => {
                quantize_layer(dev, "bench", &w, m, n, &g, cfg)?;
                Some(time(&|| quantize_layer(dev, "bench", &w, m, n, &g, cfg))?)
            }
            None => None,
        };
        let (disagree, maxdiff) = match (&c, &gr) {
            (Some((_, a)), Some((_, b))) => {
                let d = a
                    .layer
                    .codes
                    .iter()
                    .zip(&b.layer.codes)
                    .filter(|(x, y)| x != y)
                    .count();
                let md = a
                    .layer
                    .codes
                    .iter()
                    .zip(&b.layer.codes)
                    .map(|(x, y)| (x - y).abs())
                    .max()
                    .unwrap_or(0);
                (Some(d as f64 / a.layer.codes.len() as f64), Some(md))
            }
            _ => (None, None),
        };
        let best = gr
            .as_ref()
            .or(c.as_ref())
            .map(|(_, o)| o)
            .expect("at least one device runs");
        let row = BenchRow {
            shape: [m, n],
            cpu_seconds: c.as_ref().map(|x| x.0),
            gpu_seconds: gr.as_ref().map(|x| x.0),
            speedup: match (&c, &gr) {
                (Some(a), Some(b)) => Some(a.0 / b.0),
                _ => None,
            },
            code_disagreement: disagree,
            max_code_diff: maxdiff,
            rel_error: best.rel_error,
            rel_error_rtn: best.rel_error_rtn,
        };
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// One line of the forward-pass benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ForwardRow {
    /// Model shape name.
    pub model: String,
    /// Images per timed pass.
    pub images: usize,
    /// CPU images per second.
    pub cpu_images_per_s: Option<f64>,
    /// GPU images per second (end to end: upload, blocks, download of the final tokens).
    pub gpu_images_per_s: Option<f64>,
    /// GPU / CPU.
    pub speedup: Option<f64>,
    /// Relative difference of the CLS features, GPU vs CPU.
    pub cls_rel_diff: Option<f64>,
}

/// Named synthetic ViT shapes for the forward benchmark: (name, width, depth, heads, MLP, patch, input).
pub const FORWARD_SHAPES: [(&str, usize, usize, usize, usize, usize, usize); 6] = [
    ("tiny", 64, 2, 4, 256, 4, 32),
    ("vit-s14", 384, 12, 6, 1536, 14, 224),
    ("vit-b16", 768, 12, 12, 3072, 16, 224),
    ("vit-l16", 1024, 24, 16, 4096, 16, 224),
    ("vit-h14", 1280, 32, 16, 5120, 14, 224),
    // A 6-billion-parameter ViT shape (ViT-6B-like: 48 blocks of width 3200, head dim 128).
    ("vit-6b", 3200, 48, 25, 12800, 14, 224),
];

/// A random timm-layout backbone of a [`FORWARD_SHAPES`] row, cut to `depth` blocks.
fn synthetic_vit(
    (_, dim, _, heads, mlp, patch, img): (&str, usize, usize, usize, usize, usize, usize),
    depth: usize,
) -> crate::model::synthetic::SyntheticVit {
    crate::model::synthetic::SyntheticVit {
        family: crate::model::Family::TimmVit,
        dim,
        depth,
        heads,
        mlp,
        patch,
        img,
        channels: 3,
        classes: 0,
        seed: 1,
    }
}

/// The [`FORWARD_SHAPES`] row named `shape`.
fn shape_row(shape: &str) -> Result<(&'static str, usize, usize, usize, usize, usize, usize)> {
    FORWARD_SHAPES
        .iter()
        .find(|s| s.0 == shape)
        .copied()
        .ok_or_else(|| {
            Error::InvalidOption(format!(
                "unknown model shape '{shape}'; one of {}",
                FORWARD_SHAPES.map(|s| s.0).join(", ")
            ))
        })
}

fn time_forward<O: crate::model::forward::Ops>(
    ops: &O,
    spec: &crate::model::VitSpec,
    model: &crate::io::Checkpoint,
    pixels: &[f32],
    n: usize,
) -> Result<(f64, Vec<f32>)> {
    use crate::model::forward::{run_model, HostBlock, HostStem};
    let stem = HostStem::load(model, spec)?;
    let blocks: Vec<HostBlock> = spec
        .blocks
        .iter()
        .map(|b| HostBlock::load(model, spec, b))
        .collect::<Result<_>>()?;
    // One warm-up pass (pipeline caches, page faults), then the timed one.
    let go = || run_model(ops, spec, &stem, &mut |b| Ok(blocks[b].clone()), pixels, n);
    go()?;
    let t = Instant::now();
    let out = go()?;
    Ok((t.elapsed().as_secs_f64(), out.cls))
}

/// Times the forward pass of a random ViT of shape `shape` (a [`FORWARD_SHAPES`] name) over
/// `images` random images on the CPU and/or the GPU, in one process.
pub fn run_forward_bench(
    shape: &str,
    images: usize,
    gpu: Option<&crate::device::WgpuDevice>,
    cpu: bool,
) -> Result<ForwardRow> {
    let row = shape_row(shape)?;
    let (name, img) = (row.0, row.6);
    let dir = std::env::temp_dir().join(format!("comq-forward-bench-{}", std::process::id()));
    synthetic_vit(row, row.2).write(&dir)?;
    let result = (|| {
        let model = crate::io::Checkpoint::open(&dir.join("model.safetensors"))?;
        let spec = crate::model::VitSpec::detect(&model)?;
        let pixels = SplitMix::new(2).normals(images * 3 * img * img);
        let c = if cpu {
            Some(time_forward(
                &crate::device::cpu_ops::CpuOps,
                &spec,
                &model,
                &pixels,
                images,
            )?)
        } else {
            None
        };
        let g = match gpu {
            Some(d) => {
                let ops = crate::device::wgpu::forward::GpuOps::new(d);
                Some(time_forward(&ops, &spec, &model, &pixels, images)?)
            }
            None => None,
        };
        let ips = |r: &Option<(f64, Vec<f32>)>| r.as_ref().map(|(s, _)| images as f64 / s);
        let diff = match (&c, &g) {
            (Some((_, a)), Some((_, b))) => {
                let num: f64 = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                    .sum();
                let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
                Some((num / den.max(1e-30)).sqrt())
            }
            _ => None,
        };
        Ok(ForwardRow {
            model: name.to_string(),
            images,
            cpu_images_per_s: ips(&c),
            gpu_images_per_s: ips(&g),
            speedup: ips(&g).zip(ips(&c)).map(|(g, c)| g / c),
            cls_rel_diff: diff,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// One end-to-end run of `comq-gpu bench --model`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct E2eRow {
    /// Shape name.
    pub model: String,
    /// Blocks run (the shape's depth unless cut down).
    pub blocks: usize,
    /// Parameters of the linear layers quantized.
    pub linear_params: usize,
    /// Calibration images.
    pub images: usize,
    /// `cpu` or `gpu`.
    pub device: String,
    /// The device as the run described it.
    pub device_name: String,
    /// Seconds of the whole run.
    pub wall_seconds: f64,
    /// The run with I/O excluded (see [`crate::profile::ProfileReport`]).
    pub wall_seconds_without_io: f64,
    /// Peak resident memory of the run's process.
    pub peak_rss_bytes: Option<u64>,
    /// The calibration's planned memory on the device (GPU runs) and the host.
    pub calibration_memory: Option<crate::pipeline::preflight::CalibMemory>,
    /// Mean relative layer error.
    pub mean_rel_error: f64,
    /// Per stage.
    pub stages: Vec<crate::profile::StageTime>,
    /// Bytes uploaded to the GPU (GPU runs).
    pub device_bytes_up: Option<u64>,
    /// Bytes read back from the GPU (GPU runs).
    pub device_bytes_down: Option<u64>,
    /// Of those, the layers' own (the quantization's), uploaded and read back: the rest is the
    /// forward pass of the calibration.
    pub layers_bytes: Option<(u64, u64)>,
    /// One upload of each layer's `W` and `G` and one download of its codes, summed: the least
    /// the layers could move without keeping anything on the device.
    pub layers_floor_bytes: Option<u64>,
}

/// Options of an end-to-end benchmark run.
#[derive(Debug, Clone)]
pub struct E2eOptions {
    /// A [`FORWARD_SHAPES`] name.
    pub shape: String,
    /// Run only the first this many blocks (memory checks of a deep shape on a small machine).
    pub blocks: Option<usize>,
    /// Calibration images (224 px, random pixels).
    pub images: usize,
    /// Weight dtype of the synthetic model.
    pub dtype: safetensors::Dtype,
    /// Where the model, the image pack and the outputs go (kept between runs: the model and
    /// the pack are reused when present).
    pub work_dir: PathBuf,
    /// Extra `run` arguments (bits, order, sweeps, ...).
    pub run_args: Vec<String>,
}

/// Writes (or reuses) the synthetic model and the image pack of `o`; returns their paths and the
/// number of linear parameters.
pub fn e2e_inputs(o: &E2eOptions) -> Result<(PathBuf, PathBuf, usize, usize)> {
    let row = shape_row(&o.shape)?;
    let (name, dim, mlp, img) = (row.0, row.1, row.4, row.6);
    let depth = o.blocks.unwrap_or(row.2).clamp(1, row.2);
    let tag = format!("{name}-{depth}b-{:?}", o.dtype).to_lowercase();
    let dir = o.work_dir.join(&tag);
    if !dir.join("model.safetensors").exists() || !dir.join("config.json").exists() {
        log::info!("writing the synthetic {tag} model to {}", dir.display());
        synthetic_vit(row, depth).write_as(&dir, o.dtype)?;
    }
    let pack = o
        .work_dir
        .join(format!("images-{}-{img}px.safetensors", o.images));
    if !pack.exists() {
        write_image_pack(&pack, o.images, img, 3)?;
    }
    let linear = depth * (4 * dim * dim + 2 * dim * mlp);
    Ok((dir, pack, linear, depth))
}

/// An image pack of `n` smooth random `side × side` images (`u8 [n, side, side, c]`).
pub fn write_image_pack(path: &Path, n: usize, side: usize, c: usize) -> Result<()> {
    let mut rng = SplitMix::new(7);
    let mut px = Vec::with_capacity(n * side * side * c);
    for _ in 0..n {
        // A few random gradients and a little noise: not constant, not white noise.
        let coef: Vec<f64> = (0..3 * c).map(|_| rng.uniform()).collect();
        for y in 0..side {
            for x in 0..side {
                for ch in 0..c {
                    let (a, b, k) = (coef[3 * ch], coef[3 * ch + 1], coef[3 * ch + 2]);
                    let v = 128.0
                        + 100.0 * (a * x as f64 / side as f64 * 6.0 + b * y as f64 / 9.0).sin() * k
                        + 20.0 * (rng.uniform() - 0.5);
                    px.push(v.clamp(0.0, 255.0) as u8);
                }
            }
        }
    }
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![n, side, side, c], &px)
            .map_err(|e| Error::Internal(format!("synthetic image pack: {e}")))?;
    let data = safetensors::serialize([("images", view)], None)
        .map_err(|e| Error::Internal(format!("synthetic image pack: {e}")))?;
    crate::io::writer::write_atomic(path, &data)
}

/// Runs `comq-gpu run` (this executable, a child process so each run's peak memory is its own)
/// on the synthetic model of `o` with `device` (`cpu` or `gpu`), with `--profile`, and reads
/// its report.
pub fn run_e2e(o: &E2eOptions, device: &str) -> Result<E2eRow> {
    let (model, pack, linear, blocks) = e2e_inputs(o)?;
    // A folder of this process's own: only what the benchmark itself made is ever removed.
    let out = o
        .work_dir
        .join(format!("out-{device}-{}", std::process::id()));
    std::fs::create_dir(&out).map_err(|e| Error::io(&out, e))?;
    let report = out.join("report.json");
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--quiet")
        .arg("run")
        .arg(&model)
        .arg("--images")
        .arg(&pack)
        .args(["--calib-count", &o.images.to_string()])
        .args(["--device", device])
        .arg("--out")
        .arg(out.join("packed"))
        .arg("--report")
        .arg(&report)
        .arg("--profile")
        .args(&o.run_args);
    let status = cmd.status();
    let text = std::fs::read_to_string(&report);
    let _ = std::fs::remove_dir_all(&out);
    let status = status.map_err(|e| Error::io("comq-gpu run", e))?;
    if !status.success() {
        return Err(Error::Bench(format!(
            "the benchmark run on {device} failed ({status})"
        )));
    }
    let text = text.map_err(|e| Error::io(&report, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Bench(format!("report {}: {e}", report.display())))?;
    let profile: crate::profile::ProfileReport = serde_json::from_value(v["profile"].clone())
        .map_err(|e| Error::Bench(format!("report {}: profile: {e}", report.display())))?;
    let traffic = layers_traffic(&v);
    Ok(E2eRow {
        model: o.shape.clone(),
        blocks,
        linear_params: linear,
        images: o.images,
        device: device.to_string(),
        device_name: v["device"].as_str().unwrap_or("").to_string(),
        wall_seconds: profile.wall_seconds,
        wall_seconds_without_io: profile.wall_seconds_without_io,
        peak_rss_bytes: v["peak_rss_bytes"].as_u64(),
        calibration_memory: serde_json::from_value(v["calibration_memory"].clone()).ok(),
        mean_rel_error: v["totals"]["mean_rel_error"].as_f64().unwrap_or(f64::NAN),
        device_bytes_up: profile.device_bytes_up,
        device_bytes_down: profile.device_bytes_down,
        layers_bytes: traffic.map(|t| t.0),
        layers_floor_bytes: traffic.map(|t| t.1),
        stages: profile.stages,
    })
}

/// The layers' bytes up and down in a run's report and their floor
/// ([`crate::pipeline::layers_traffic`]).
fn layers_traffic(report: &serde_json::Value) -> Option<((u64, u64), u64)> {
    let layers = report["layers"].as_array()?.iter().map(|l| {
        let dim = |i: usize| l["shape"][i].as_u64().unwrap_or(0) as usize;
        (
            [dim(0), dim(1)],
            l["device_bytes_up"].as_u64(),
            l["device_bytes_down"].as_u64(),
        )
    });
    crate::pipeline::layers_traffic(layers)
}

/// One layer shape of `comq-gpu bench --kernels`: the Gram kernel and one sweep, alone, with the
/// work they must do (the floor is that work at the card's peak rate, which wgpu cannot report).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelRow {
    /// `cpu` or `gpu`.
    pub device: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// Activation rows of the Gram.
    pub gram_rows: usize,
    /// Seconds of the Gram accumulation (activations resident on the device, no readback).
    pub gram_seconds: f64,
    /// Multiply-adds × 2 actually executed by the Gram (upper-triangle tiles only).
    pub gram_flops: f64,
    /// Seconds of one per-row greedy sweep.
    pub sweep_greedy_seconds: f64,
    /// Bytes of `G` rows one greedy sweep must read (`4·m·n²`: one row of `G` per visited
    /// coordinate): its memory floor.
    pub sweep_greedy_bytes: f64,
    /// Seconds of one shared-order blocked sweep.
    pub sweep_shared_seconds: f64,
    /// FLOPs of the blocked sweep (`2·m·n²` in the trailing products, `m·n·64` in the blocks).
    pub sweep_shared_flops: f64,
    /// Seconds to make a per-row greedy order current on a resident layer: on the CPU the
    /// host's sort; on the GPU the ranking kernel where the adapter ranks orders, else the
    /// host's sort and the upload of its indices.
    pub order_seconds: f64,
    /// Whether the GPU ranked the order itself (`order.wgsl`); false on the CPU.
    pub order_on_device: bool,
}

/// Times the Gram accumulation and the two sweep forms for each shape on the CPU and/or the GPU.
pub fn run_kernel_bench(
    shapes: &[(usize, usize)],
    rows: usize,
    gpu: Option<&crate::device::WgpuDevice>,
    cpu: bool,
    mut on_row: impl FnMut(&KernelRow),
) -> Result<Vec<KernelRow>> {
    use crate::model::forward::Ops;
    fn gram_time<O: Ops>(ops: &O, x: &[f32], rows: usize, n: usize) -> Result<f64> {
        let t = ops.upload(x)?;
        let once = || -> Result<f64> {
            let mut g = ops.gram_new(n)?;
            ops.sync()?;
            let s = Instant::now();
            ops.gram_add(&mut g, &t, rows)?;
            ops.sync()?;
            let secs = s.elapsed().as_secs_f64();
            ops.gram_finish(g)?;
            Ok(secs)
        };
        once()?;
        once()
    }
    /// A layer uploaded with the default grid and an order of `order`'s kind.
    fn upload<D: crate::device::Device>(
        dev: &D,
        w: &[f32],
        m: usize,
        n: usize,
        g: &Gram,
        order: crate::quant::OrderKind,
    ) -> Result<D::Layer> {
        let cfg = crate::quant::QuantConfig {
            order,
            ..Default::default()
        };
        let grid = crate::quant::Grid::build(w, m, n, &cfg);
        let ord = crate::quant::Order::build(order, w, m, n, &g.diag());
        let g32 = g.to_f32();
        dev.upload(&crate::device::LayerProblem {
            name: "bench",
            weights: w,
            gram: &g32,
            grid: &grid,
            order: &ord,
            dead_threshold: g.dead_threshold(),
            scale_dtype: cfg.scale_dtype,
        })
    }
    fn sweep_time<D: crate::device::Device>(
        dev: &D,
        w: &[f32],
        m: usize,
        n: usize,
        g: &Gram,
        order: crate::quant::OrderKind,
    ) -> Result<f64> {
        let mut st = upload(dev, w, m, n, g, order)?;
        // (reset, sweep, refresh) less (reset, refresh): the refresh's readback waits for the
        // sweep, so the difference is the sweep.
        let mut run = |sweep: bool| -> Result<f64> {
            let s = Instant::now();
            dev.reset(&mut st)?;
            if sweep {
                dev.sweep(&mut st)?;
            }
            dev.refresh(&mut st)?;
            Ok(s.elapsed().as_secs_f64())
        };
        run(true)?;
        let with = run(true)?;
        let without = run(false)?;
        Ok((with - without).max(0.0))
    }
    /// Making the greedy order of another diagonal current (as a search's damping does), less
    /// the refresh that waits for it.
    fn order_time<D: crate::device::Device>(
        dev: &D,
        w: &[f32],
        m: usize,
        n: usize,
        g: &Gram,
    ) -> Result<(f64, bool)> {
        let mut st = upload(dev, w, m, n, g, crate::quant::OrderKind::Greedy)?;
        let diag = g.diag();
        let damped: Vec<f64> = diag.iter().map(|v| v * 1.1).collect();
        let ranked = dev.ranks_orders(n);
        let mut run = |order: bool| -> Result<f64> {
            let s = Instant::now();
            if order {
                let o = if ranked {
                    crate::quant::Order::ranked(&damped)
                } else {
                    crate::quant::Order::build(crate::quant::OrderKind::Greedy, w, m, n, &damped)
                };
                dev.set_order(&mut st, &o, None)?;
            }
            dev.refresh(&mut st)?;
            Ok(s.elapsed().as_secs_f64())
        };
        run(true)?;
        let with = run(true)?;
        let without = run(false)?;
        Ok(((with - without).max(0.0), ranked))
    }
    let mut out = Vec::new();
    let mut devices: Vec<&str> = Vec::new();
    if gpu.is_some() {
        devices.push("gpu");
    }
    if cpu {
        devices.push("cpu");
    }
    for (i, &(m, n)) in shapes.iter().enumerate() {
        let x = weights(rows, n, 50 + i as u64);
        let w = weights(m, n, 1 + i as u64);
        let g = correlated_gram(n, 100 + i as u64);
        let np = n.div_ceil(64) * 64;
        let tiles = (np / 64) * (np / 64 + 1) / 2;
        for &d in &devices {
            use crate::quant::OrderKind;
            let (gram_seconds, greedy, shared, order) = match (d, gpu) {
                ("gpu", Some(dev)) => {
                    let ops = crate::device::wgpu::forward::GpuOps::new(dev);
                    (
                        gram_time(&ops, &x, rows, n)?,
                        sweep_time(dev, &w, m, n, &g, OrderKind::Greedy)?,
                        sweep_time(dev, &w, m, n, &g, OrderKind::Shared)?,
                        order_time(dev, &w, m, n, &g)?,
                    )
                }
                _ => {
                    let dev = crate::device::CpuDevice::new();
                    (
                        gram_time(&crate::device::cpu_ops::CpuOps, &x, rows, n)?,
                        sweep_time(&dev, &w, m, n, &g, OrderKind::Greedy)?,
                        sweep_time(&dev, &w, m, n, &g, OrderKind::Shared)?,
                        order_time(&dev, &w, m, n, &g)?,
                    )
                }
            };
            let row = KernelRow {
                device: d.to_string(),
                shape: [m, n],
                gram_rows: rows,
                gram_seconds,
                gram_flops: 2.0 * (tiles * 64 * 64) as f64 * rows.div_ceil(16) as f64 * 16.0,
                sweep_greedy_seconds: greedy,
                sweep_greedy_bytes: 4.0 * (m * n) as f64 * n as f64,
                sweep_shared_seconds: shared,
                sweep_shared_flops: 2.0 * (m * n) as f64 * n as f64
                    + (m * n * crate::quant::order::SHARED_BLOCK) as f64,
                order_seconds: order.0,
                order_on_device: order.1,
            };
            on_row(&row);
            out.push(row);
        }
    }
    Ok(out)
}
