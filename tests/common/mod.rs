//! Shared test helpers: a seeded generator, correlated activations, fixture files.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, View};

/// The crate's seeded SplitMix64 generator, shared with the benchmarks.
pub use comq_gpu::bench::SplitMix as Rng;

/// `rows × cols` activations with strongly correlated features and uneven scales, like the
/// inputs of a transformer layer: X = Z·A with a random mixing matrix A and per-feature scales.
pub fn correlated_x(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    let k = cols.div_ceil(2).max(1);
    let z = rng.normals(rows * k);
    let a = rng.normals(k * cols);
    let scale: Vec<f32> = (0..cols)
        .map(|_| 0.3 + 2.0 * rng.uniform() as f32)
        .collect();
    let noise = rng.normals(rows * cols);
    let mut x = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let mut s = 0.0f32;
            for t in 0..k {
                s += z[r * k + t] * a[t * cols + c];
            }
            x[r * cols + c] = scale[c] * (s / (k as f32).sqrt() + 0.1 * noise[r * cols + c]);
        }
    }
    x
}

/// Gram matrix of row-major X in f64.
pub fn gram_of(x: &[f32], rows: usize, cols: usize) -> comq_gpu::Gram {
    let mut acc = comq_gpu::GramAccumulator::new(cols);
    acc.add(&x[..rows * cols]);
    acc.finish()
}

/// An owned tensor for writing fixtures.
pub struct Owned {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

pub fn f32_tensor(shape: &[usize], v: &[f32]) -> Owned {
    Owned {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

pub fn bf16_tensor(shape: &[usize], v: &[f32]) -> Owned {
    Owned {
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        data: v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

pub fn write_safetensors(path: &Path, tensors: &[(String, Owned)]) {
    let map: HashMap<String, &Owned> = tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
    safetensors::serialize_to_file(map, None, path).expect("fixture writes");
}

/// A tiny timm-layout ViT (2 blocks, width `d`, MLP 2d) with a calibration file holding
/// `.input` activations for some layers and `.gram` for the others. Returns (model, calib).
pub fn tiny_vit(dir: &Path, d: usize, seed: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut rng = Rng::new(seed);
    let mut model = Vec::new();
    let mut calib = Vec::new();
    let h = 2 * d;
    model.push((
        "cls_token".to_string(),
        f32_tensor(&[1, 1, d], &rng.normals(d)),
    ));
    model.push((
        "patch_embed.proj.weight".to_string(),
        f32_tensor(&[d, 3, 2, 2], &rng.normals(d * 12)),
    ));
    for b in 0..2 {
        for (name, out, inp) in [
            ("attn.qkv", 3 * d, d),
            ("attn.proj", d, d),
            ("mlp.fc1", h, d),
            ("mlp.fc2", d, h),
        ] {
            let p = format!("blocks.{b}.{name}");
            let w: Vec<f32> = rng.normals(out * inp).iter().map(|v| v * 0.05).collect();
            model.push((format!("{p}.weight"), f32_tensor(&[out, inp], &w)));
            model.push((format!("{p}.bias"), f32_tensor(&[out], &rng.normals(out))));
            let n = 96;
            let x = correlated_x(&mut rng, n, inp);
            if name == "attn.proj" {
                let g = gram_of(&x, n, inp);
                let g32: Vec<f32> = g.data.iter().map(|&v| v as f32).collect();
                calib.push((format!("{p}.gram"), f32_tensor(&[inp, inp], &g32)));
            } else {
                calib.push((format!("{p}.input"), f32_tensor(&[n, inp], &x)));
            }
        }
        model.push((
            format!("blocks.{b}.norm1.weight"),
            f32_tensor(&[d], &vec![1.0; d]),
        ));
    }
    model.push((
        "head.weight".to_string(),
        f32_tensor(&[10, d], &rng.normals(10 * d)),
    ));
    let mp = dir.join("model.safetensors");
    let cp = dir.join("calib.safetensors");
    write_safetensors(&mp, &model);
    write_safetensors(&cp, &calib);
    (mp, cp)
}

/// Runs the `comq-gpu` binary with warnings logged.
pub fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_comq-gpu"))
        .env("RUST_LOG", "warn")
        .args(args)
        .output()
        .expect("binary runs")
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

/// Asserts exit code 2 and a message that mentions `needle`.
pub fn assert_refused(o: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, stderr: {err}");
    assert!(
        err.contains(needle),
        "stderr should mention '{needle}': {err}"
    );
}

/// The default recipe's whole search (every grid shrink, the paper's candidate, RTN per shrink,
/// the other damping) with the given no-held-out score damping.
pub fn full_plan(score_damp: f32) -> comq_gpu::quant::search::SearchPlan {
    comq_gpu::quant::search::SearchPlan {
        scalars: comq_gpu::quant::search::AUTO_SCALARS.to_vec(),
        line_search: true,
        paper: true,
        rtn_scalars: true,
        damps: vec![0.1],
        score_damp,
    }
}

/// A small random ViT (width 32, 2 blocks, MLP 64, 16-px input in 4-px patches, 3 channels) in
/// `family`'s layout, written in `dtype` into `dir`; returns its `model.safetensors`.
pub fn small_vit(
    dir: &Path,
    family: comq_gpu::model::Family,
    classes: usize,
    heads: usize,
    seed: u64,
    dtype: Dtype,
) -> std::path::PathBuf {
    comq_gpu::model::synthetic::SyntheticVit {
        family,
        dim: 32,
        depth: 2,
        heads,
        mlp: 64,
        patch: 4,
        img: 16,
        channels: 3,
        classes,
        seed,
    }
    .write_as(dir, dtype)
    .unwrap();
    dir.join("model.safetensors")
}

/// Writes `n` seeded random 20x24 RGB PNGs into `dir/class<i % 2>/`.
pub fn png_folder(dir: &Path, n: usize, seed: u64) {
    let mut r = Rng::new(seed);
    for i in 0..n {
        let class = dir.join(format!("class{}", i % 2));
        std::fs::create_dir_all(&class).unwrap();
        let img = image::RgbImage::from_fn(20, 24, |_, _| {
            image::Rgb([
                (r.next_u64() % 256) as u8,
                (r.next_u64() % 256) as u8,
                (r.next_u64() % 256) as u8,
            ])
        });
        img.save(class.join(format!("{i}.png"))).unwrap();
    }
}
