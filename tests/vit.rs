//! The ViT forward pass: layout detection for every family, CPU vs GPU parity of the forward and
//! of the Gram matrices it feeds, and agreement with the reference implementations (PyTorch for
//! the bundled model, ONNX Runtime for DINOv2-S when it has been prepared).

mod common;
#[path = "common/gpu.rs"]
mod gpu;

use std::path::{Path, PathBuf};

use comq_gpu::calibrate::{Ahead, BlockGrams, CalibMode, Calibrator};
use comq_gpu::io::images::{ImageSet, View};
use comq_gpu::io::Checkpoint;
use comq_gpu::model::cpu::CpuOps;
use comq_gpu::model::forward::{run_model, HostBlock, HostStem, Ops, Output};
use comq_gpu::model::{Family, Role, VitSpec};
use comq_gpu::profile::Profile;

/// CPU and GPU forwards sum in different orders; features must agree to this relative error.
const FORWARD_REL_TOL: f64 = 2e-4;
/// Gram matrices from CPU (f64) and GPU (f32 partial sums) activations, relative Frobenius.
const GRAM_REL_TOL: f64 = 1e-4;
/// Our CPU forward vs PyTorch on the bundled model's logits (absolute; logits are O(10)).
const TORCH_ABS_TOL: f64 = 1e-3;
/// Our CPU forward vs ONNX Runtime on DINOv2-S, relative to the largest feature magnitude.
const ONNX_REL_TOL: f64 = 1e-4;

fn synthetic(dir: &Path, family: Family, classes: usize) -> PathBuf {
    common::small_vit(dir, family, classes, 4, 7, safetensors::Dtype::F32)
}

fn forward<O: Ops>(ops: &O, path: &Path, pixels: &[f32], n: usize) -> (VitSpec, Output) {
    let model = Checkpoint::open(path).unwrap();
    let spec = VitSpec::detect(&model).unwrap();
    let stem = HostStem::load(&model, &spec).unwrap();
    let out = run_model(
        ops,
        &spec,
        &stem,
        &mut |b| HostBlock::load(&model, &spec, &spec.blocks[b]),
        pixels,
        n,
    )
    .unwrap();
    (spec, out)
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn pixels(n: usize, c: usize, s: usize, seed: u64) -> Vec<f32> {
    let mut r = common::Rng::new(seed);
    r.normals(n * c * s * s)
}

#[test]
fn every_family_is_recognised_with_its_hyper_parameters() {
    for (family, classes) in [
        (Family::TimmVit, 5),
        (Family::TimmDeit, 5),
        (Family::HfVit, 5),
        (Family::HfDeit, 5),
        (Family::HfDinov2, 0),
        (Family::HfDinov2, 5),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = synthetic(dir.path(), family, classes);
        let m = Checkpoint::open(&path).unwrap();
        let s = VitSpec::detect(&m).unwrap();
        assert_eq!(s.family, family);
        assert_eq!((s.dim, s.depth, s.heads, s.mlp, s.patch), (32, 2, 4, 64, 4));
        assert_eq!(s.num_classes, classes, "{family}");
        assert_eq!(
            s.prefix_tokens,
            1 + matches!(family, Family::TimmDeit | Family::HfDeit) as usize
        );
        let linears: Vec<Role> = s.blocks[1].linears().into_iter().map(|(r, _)| r).collect();
        let want: &[Role] = if matches!(family, Family::TimmVit | Family::TimmDeit) {
            &[Role::Qkv, Role::Proj, Role::Fc1, Role::Fc2]
        } else {
            &[
                Role::Query,
                Role::Key,
                Role::Value,
                Role::Proj,
                Role::Fc1,
                Role::Fc2,
            ]
        };
        assert_eq!(linears, want);
        // Every linear is located in its block.
        for (role, prefix) in s.blocks[1].linears() {
            assert_eq!(s.locate(&prefix), Some((1, role)));
        }
    }
}

#[test]
fn an_unknown_layout_is_a_clear_error_suggesting_calib() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = common::tiny_vit(dir.path(), 8, 1);
    let m = Checkpoint::open(&model).unwrap();
    let e = VitSpec::detect(&m).unwrap_err().to_string();
    assert!(e.contains("--calib"), "{e}");
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn bicubic_resize_keeps_constants_and_identity() {
    use comq_gpu::model::forward::bicubic_resize;
    let g = 5;
    let d = 3;
    let src: Vec<f32> = (0..g * g * d).map(|i| (i % 7) as f32).collect();
    assert_eq!(
        bicubic_resize(&src, g, g, d),
        src,
        "same size is the identity"
    );
    let flat = vec![2.5f32; g * g * d];
    for h in [3, 8, 11] {
        for v in bicubic_resize(&flat, g, h, d) {
            assert!((v - 2.5).abs() < 1e-5);
        }
    }
}

#[test]
fn cpu_and_gpu_forward_agree_for_every_family() {
    let Some(dev) = gpu::device() else {
        return;
    };
    let gpu = comq_gpu::device::wgpu::forward::GpuOps::new(&dev);
    for (family, classes) in [
        (Family::TimmVit, 5),
        (Family::TimmDeit, 5),
        (Family::HfVit, 3),
        (Family::HfDinov2, 4),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = synthetic(dir.path(), family, classes);
        let px = pixels(3, 3, 16, 11);
        let (_, c) = forward(&CpuOps, &path, &px, 3);
        let (_, g) = forward(&gpu, &path, &px, 3);
        let (ec, el, et) = (
            rel(&g.cls, &c.cls),
            rel(&g.logits, &c.logits),
            rel(&g.tokens, &c.tokens),
        );
        eprintln!("{family}: CLS {ec:.2e} logits {el:.2e} tokens {et:.2e}");
        assert!(
            ec < FORWARD_REL_TOL && el < FORWARD_REL_TOL && et < FORWARD_REL_TOL,
            "{family}"
        );
        assert_eq!(c.logits.len(), 3 * classes);
    }
}

fn grams_of<O: Ops>(ops: &O, path: &Path, images: &Path, mode: CalibMode) -> Vec<comq_gpu::Gram> {
    let model = Checkpoint::open(path).unwrap();
    let spec = VitSpec::detect(&model).unwrap();
    let set = ImageSet::open(images).unwrap();
    let idx: Vec<View> = (0..set.len()).map(View::plain).collect();
    let profile = std::sync::Arc::new(Profile::new(false));
    let mut c = Calibrator::new(ops, &spec, &model, &set, &idx, mode, profile).unwrap();
    let mut out = Vec::new();
    for b in 0..spec.depth {
        for (role, _) in spec.blocks[b].linears() {
            out.push(c.gram(b, role).unwrap());
        }
    }
    out
}

#[test]
fn cpu_and_gpu_calibration_grams_agree() {
    let Some(dev) = gpu::device() else {
        return;
    };
    let gpu = comq_gpu::device::wgpu::forward::GpuOps::new(&dev);
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::TimmVit, 5);
    let imgs = dir.path().join("images");
    common::png_folder(&imgs, 5, 3);
    let c = grams_of(&CpuOps, &path, &imgs, CalibMode::Fp);
    let g = grams_of(&gpu, &path, &imgs, CalibMode::Fp);
    assert_eq!(c.len(), 8);
    for (a, b) in g.iter().zip(&c) {
        assert_eq!(a.samples, b.samples);
        assert_eq!(a.samples, 5 * 17, "5 images of 16 patches + CLS");
        let num: f64 = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).powi(2))
            .sum();
        let den: f64 = b.data.iter().map(|y| y * y).sum();
        let e = (num / den).sqrt();
        assert!(e < GRAM_REL_TOL, "Gram rel error {e:.2e}");
    }
}

#[test]
fn fp_calibration_grams_equal_the_gram_of_the_captured_activations() {
    // Block 0's AttnIn Gram is XᵀX of LayerNorm-1 of the embedded tokens; recompute it by hand.
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::HfDinov2, 0);
    let imgs = dir.path().join("images");
    common::png_folder(&imgs, 3, 3);
    let grams = grams_of(&CpuOps, &path, &imgs, CalibMode::Fp);
    let model = Checkpoint::open(&path).unwrap();
    let spec = VitSpec::detect(&model).unwrap();
    let set = ImageSet::open(&imgs).unwrap();
    let views: Vec<View> = (0..3).map(View::plain).collect();
    let px = comq_gpu::calibrate::load_pixels(&set, &views, &spec).unwrap();
    let stem = HostStem::load(&model, &spec)
        .unwrap()
        .upload(&CpuOps)
        .unwrap();
    let f = comq_gpu::model::forward::Forward::new(&CpuOps, &spec);
    let mut h = f.embed(&stem, &px, 3).unwrap();
    let w = HostBlock::load(&model, &spec, &spec.blocks[0])
        .unwrap()
        .upload(&CpuOps)
        .unwrap();
    let mut x0 = Vec::new();
    f.block(
        &w,
        &mut h,
        3,
        Some(comq_gpu::model::Site::AttnIn),
        &mut |_, x, _| {
            x0 = x.clone();
            Ok(())
        },
    )
    .unwrap();
    let want = common::gram_of(&x0, x0.len() / 32, 32);
    // query, key and value share one input; f32 partials over 256 rows, f64 across them.
    let scale = want.data.iter().map(|v| v.abs()).fold(0.0, f64::max);
    for g in &grams[..3] {
        assert_eq!(g.samples, want.samples);
        let e: f64 = g
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(e < 1e-6 * scale, "{e} (scale {scale})");
    }
}

#[test]
fn calibrating_one_block_ahead_on_a_thread_hands_over_the_same_grams() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::TimmVit, 0);
    let imgs = dir.path().join("images");
    common::png_folder(&imgs, 3, 3);
    let in_step = grams_of(&CpuOps, &path, &imgs, CalibMode::Fp);
    let model = Checkpoint::open(&path).unwrap();
    let spec = VitSpec::detect(&model).unwrap();
    let set = ImageSet::open(&imgs).unwrap();
    let idx: Vec<View> = (0..set.len()).map(View::plain).collect();
    let profile = std::sync::Arc::new(Profile::new(true));
    // The hook sees each block's Grams on the calibration thread, in order, before hand-over.
    let seen = std::sync::Mutex::new(Vec::new());
    let ahead = std::thread::scope(|sc| {
        let c = Calibrator::new(
            &CpuOps,
            &spec,
            &model,
            &set,
            &idx,
            CalibMode::Fp,
            profile.clone(),
        )
        .unwrap();
        let blocks: Vec<usize> = (0..spec.depth).collect();
        let seen = &seen;
        let hook = move |b: usize, g: &std::collections::HashMap<_, comq_gpu::Gram>| {
            seen.lock().unwrap().push((b, g.len()));
        };
        let mut a = Ahead::spawn_with(sc, Box::new(c), blocks, Some(Box::new(hook)));
        let mut out = Vec::new();
        for b in 0..spec.depth {
            for (role, _) in spec.blocks[b].linears() {
                out.push(a.gram(b, role).unwrap());
            }
        }
        // A block behind the one handed over is refused, not recomputed.
        assert!(a.gram(0, Role::Fc1).is_err());
        out
    });
    assert_eq!(ahead.len(), in_step.len());
    for (a, b) in ahead.iter().zip(&in_step) {
        assert_eq!(a.data, b.data);
        assert_eq!(a.samples, b.samples);
    }
    let seen = seen.into_inner().unwrap();
    assert_eq!(
        seen.iter().map(|(b, _)| *b).collect::<Vec<_>>(),
        (0..spec.depth).collect::<Vec<_>>()
    );
    assert!(seen.iter().all(|(_, sites)| *sites == 4), "{seen:?}");
    // The calibration thread recorded its stages.
    for stage in ["embed", "forward", "gram"] {
        assert!(profile.seconds(stage) > 0.0, "{stage}");
    }
}

#[test]
fn quantized_mode_without_quantized_layers_gives_the_fp_grams() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::TimmVit, 0);
    let imgs = dir.path().join("images");
    common::png_folder(&imgs, 3, 3);
    let fp = grams_of(&CpuOps, &path, &imgs, CalibMode::Fp);
    // With no layer reported as quantized, the sequential mode sees the FP weights everywhere.
    let q = grams_of(&CpuOps, &path, &imgs, CalibMode::Quantized);
    for (a, b) in fp.iter().zip(&q) {
        let e: f64 = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        let s: f64 = a.data.iter().map(|x| x.abs()).fold(0.0, f64::max);
        assert!(e <= 1e-9 * s.max(1.0), "{e} vs scale {s}");
    }
}

/// The corrected mode walks the full-precision model beside the quantized one: before any layer
/// is quantized the two walks are the same, so every shift cross-Gram `X̃ᵀ(X − X̃)` is exactly
/// zero, on the CPU and on a GPU; a layer reported as quantized moves the next site's inputs
/// and its shift cross-Gram is not zero.
#[test]
fn corrected_mode_shifts_are_zero_until_a_layer_is_quantized() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::TimmVit, 0);
    let imgs = dir.path().join("images");
    common::png_folder(&imgs, 3, 3);
    let model = Checkpoint::open(&path).unwrap();
    let spec = VitSpec::detect(&model).unwrap();
    let set = ImageSet::open(&imgs).unwrap();
    let idx: Vec<View> = (0..set.len()).map(View::plain).collect();
    fn check<O: Ops>(ops: &O, spec: &VitSpec, model: &Checkpoint, set: &ImageSet, idx: &[View]) {
        let profile = std::sync::Arc::new(Profile::new(false));
        let mut c =
            Calibrator::new(ops, spec, model, set, idx, CalibMode::Corrected, profile).unwrap();
        // The shift's size against the Gram's.
        let rel = |g: &comq_gpu::Gram, x: &comq_gpu::numeric::gram::CrossGram| {
            let num: f64 = x.data.iter().map(|b| b * b).sum();
            let den: f64 = g.data.iter().map(|a| a * a).sum();
            (num / den).sqrt()
        };
        for b in 0..spec.depth {
            for (role, _) in spec.blocks[b].linears() {
                let g = c.gram(b, role).unwrap();
                let x = c
                    .cross(b, role)
                    .unwrap()
                    .expect("corrected mode has cross-Grams");
                assert_eq!(x.samples, g.samples);
                assert_eq!(rel(&g, &x), 0.0, "block {b} {role:?}");
            }
        }
        // Quantizing block 0's first layer (here: zeroing half its weights) moves the inputs of
        // the sites after it in that block, not its own.
        let mut c = Calibrator::new(
            ops,
            spec,
            model,
            set,
            idx,
            CalibMode::Corrected,
            profile_of(),
        )
        .unwrap();
        let linears = spec.blocks[0].linears();
        let (first, t) = (linears[0].0, &linears[0].1);
        let w = model
            .read_f32(model.get(&format!("{t}.weight")).unwrap())
            .unwrap();
        let half: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| if i % 2 == 0 { v } else { 0.0 })
            .collect();
        let g0 = c.gram(0, first).unwrap();
        assert_eq!(rel(&g0, &c.cross(0, first).unwrap().unwrap()), 0.0);
        c.quantized(0, first, &half);
        let later = linears
            .iter()
            .map(|(r, _)| *r)
            .find(|r| r.site() != first.site())
            .expect("a later site");
        let g = c.gram(0, later).unwrap();
        let x = c.cross(0, later).unwrap().unwrap();
        assert!(rel(&g, &x) > 1e-3, "{}", rel(&g, &x));
    }
    fn profile_of() -> std::sync::Arc<Profile> {
        std::sync::Arc::new(Profile::new(false))
    }
    check(&CpuOps, &spec, &model, &set, &idx);
    if let Some(dev) = gpu::device() {
        let gpu = comq_gpu::device::wgpu::forward::GpuOps::new(&dev);
        check(&gpu, &spec, &model, &set, &idx);
    }
}

#[test]
fn bundled_model_matches_pytorch_logits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let reference = root.join("tests/data/fmnist-vit-reference.safetensors");
    let r = comq_gpu::io::safetensors::Model::open(&reference).unwrap();
    let px = r.read_f32(r.get("pixel_values").unwrap()).unwrap();
    let want = r.read_f32(r.get("logits").unwrap()).unwrap();
    let n = r.get("pixel_values").unwrap().shape[0];
    let (spec, out) = forward(
        &CpuOps,
        &root.join("assets/fmnist-vit/model.safetensors"),
        &px,
        n,
    );
    assert_eq!(spec.family, Family::TimmVit);
    let e = out
        .logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    eprintln!("max |logit - torch| = {e:.2e}");
    assert!(e < TORCH_ABS_TOL, "{e}");
    // And our preprocessing of the stored uint8 images reproduces PyTorch's pixel values.
    let imgs = r.get("images").unwrap();
    let (h, w) = (imgs.shape[1], imgs.shape[2]);
    let raw = r.bytes(imgs);
    for i in 0..n {
        let img = image::DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(
                w as u32,
                h as u32,
                raw[i * h * w..(i + 1) * h * w].to_vec(),
            )
            .unwrap(),
        );
        let ours = comq_gpu::io::images::preprocess(&img, &spec.preprocess);
        let e = rel(&ours, &px[i * h * w..(i + 1) * h * w]);
        assert!(e < 1e-6, "image {i}: {e}");
    }
}

/// The DINOv2-S directory prepared by `scripts/prepare-dinov2.sh`, if any.
pub fn dinov2_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("COMQ_DINOV2_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/comq-gpu/dinov2"))
        })?;
    if dir.join("dinov2-small/model.safetensors").is_file() {
        Some(dir)
    } else if std::env::var("COMQ_REQUIRE_DINOV2").is_ok_and(|v| v == "1") {
        panic!(
            "COMQ_REQUIRE_DINOV2=1 but {} has no prepared model",
            dir.display()
        );
    } else {
        eprintln!("SKIP: DINOv2-S not prepared (scripts/prepare-dinov2.sh)");
        None
    }
}

#[test]
fn dinov2_small_matches_onnx_runtime() {
    let Some(dir) = dinov2_dir() else {
        return;
    };
    let r = comq_gpu::io::safetensors::Model::open(&dir.join("reference.safetensors")).unwrap();
    let px = r.read_f32(r.get("pixel_values").unwrap()).unwrap();
    let want = r.read_f32(r.get("last_hidden_state").unwrap()).unwrap();
    let n = r.get("pixel_values").unwrap().shape[0];
    let path = dir.join("dinov2-small/model.safetensors");
    let (spec, out) = forward(&CpuOps, &path, &px, n);
    assert_eq!(spec.family, Family::HfDinov2);
    assert_eq!(
        (spec.dim, spec.depth, spec.heads, spec.patch),
        (384, 12, 6, 14)
    );
    let scale = want.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
    let e = out
        .tokens
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    eprintln!(
        "DINOv2-S vs ONNX Runtime: max abs {e:.3e}, relative to max |feature| {:.3e}",
        e / scale
    );
    assert!(e / scale < ONNX_REL_TOL);
    // Our bicubic resize of the 37x37 grid against the one the exported graph computed.
    let m = Checkpoint::open(&path).unwrap();
    let stored = m
        .read_f32(m.get("embeddings.position_embeddings").unwrap())
        .unwrap();
    let graph = m
        .read_f32(m.get("embeddings.position_embeddings_224").unwrap())
        .unwrap();
    let ours = comq_gpu::model::forward::bicubic_resize(&stored[384..], 37, 16, 384);
    let e = rel(&ours, &graph[384..]);
    eprintln!("bicubic 37->16 vs the exported graph: rel {e:.3e}");
    assert!(e < 1e-5, "{e}");
}

/// `path` rewritten with `extra` tensors (f32 zeros of the given shapes) beside its own.
fn with_extra_tensors(path: &Path, extra: &[(&str, Vec<usize>)]) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros: Vec<(String, Vec<usize>, Vec<u8>)> = extra
        .iter()
        .map(|(n, s)| {
            (
                n.to_string(),
                s.clone(),
                vec![0u8; 4 * s.iter().product::<usize>()],
            )
        })
        .collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    for (n, s, b) in &zeros {
        views.push((
            n.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
        ));
    }
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, out).unwrap();
}

/// A tensor the forward pass would not read (here the LayerNorm before the attention
/// projection of timm's `scale_norm=True`, which it does not implement) would silently change the network the Grams
/// come from: the model is refused with the tensor named, unless the user allows it; tensors
/// known to play no part are accepted.
#[test]
fn a_tensor_the_forward_pass_would_skip_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::TimmVit, 5);
    with_extra_tensors(
        &path,
        &[
            ("blocks.0.attn.norm.weight", vec![32]),
            ("blocks.0.attn.norm.bias", vec![32]),
        ],
    );
    let m = Checkpoint::open(&path).unwrap();
    let e = VitSpec::detect(&m).unwrap_err().to_string();
    assert!(
        e.contains("'blocks.0.attn.norm.bias'") && e.contains("(and 1 more)"),
        "{e}"
    );
    assert!(e.contains("--allow-unused-tensors"), "{e}");
    let s = VitSpec::detect_allowing(&m, true).unwrap();
    assert!(!s.used_tensors().contains("blocks.0.attn.norm.weight"));

    // DINOv2's mask token, HF ViT's pooler and a stored resize of the position embedding are
    // known to play no part in the features.
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::HfDinov2, 0);
    with_extra_tensors(
        &path,
        &[
            ("embeddings.mask_token", vec![1, 32]),
            ("pooler.dense.weight", vec![32, 32]),
            ("pooler.dense.bias", vec![32]),
            ("embeddings.position_embeddings_518", vec![1, 5, 32]),
        ],
    );
    let m = Checkpoint::open(&path).unwrap();
    VitSpec::detect(&m).unwrap();
    // Every tensor of a synthetic model of each family is read.
    for (family, classes) in [
        (Family::TimmDeit, 5),
        (Family::HfVit, 5),
        (Family::HfDeit, 5),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = synthetic(dir.path(), family, classes);
        let m = Checkpoint::open(&path).unwrap();
        let s = VitSpec::detect(&m).unwrap();
        for t in m.tensors() {
            assert!(s.used_tensors().contains(&t.name), "{family}: {}", t.name);
        }
    }
}

/// The Python in `COMQ_PYTHON` (transformers and torch), or a visible skip; a failure when
/// `COMQ_REQUIRE_PYTHON=1`.
fn reference_python() -> Option<String> {
    match std::env::var("COMQ_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ if std::env::var("COMQ_REQUIRE_PYTHON").is_ok_and(|v| v == "1") => {
            panic!("COMQ_REQUIRE_PYTHON=1 but COMQ_PYTHON is not set (run scripts/setup-python-env.sh)")
        }
        _ => {
            eprintln!("SKIP: COMQ_PYTHON is not set; run scripts/setup-python-env.sh");
            None
        }
    }
}

/// The small `arch` tower built by transformers with random weights
/// (`scripts/reference/hf_vision.py ARCH DIR [args]`) in a temporary folder, and its reference
/// outputs.
fn transformers_reference(
    python: &str,
    arch: &str,
    args: &[&str],
) -> (tempfile::TempDir, comq_gpu::io::safetensors::Model) {
    reference_model(python, "hf_vision.py", arch, args)
}

/// The small model `scripts/reference/SCRIPT ARCH DIR [args]` builds with random weights in a
/// temporary folder, and its reference outputs.
fn reference_model(
    python: &str,
    script: &str,
    arch: &str,
    args: &[&str],
) -> (tempfile::TempDir, comq_gpu::io::safetensors::Model) {
    let dir = tempfile::tempdir().unwrap();
    let script = format!("{}/scripts/reference/{script}", env!("CARGO_MANIFEST_DIR"));
    let o = std::process::Command::new(python)
        .arg(script)
        .arg(arch)
        .arg(dir.path())
        .args(args)
        .output()
        .expect("python runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r =
        comq_gpu::io::safetensors::Model::open(&dir.path().join("reference.safetensors")).unwrap();
    (dir, r)
}

/// Relative error a family's CPU forward keeps against its reference implementation.
const REFERENCE_REL_TOL: f64 = 1e-4;

/// HF CLIP vision towers against transformers itself: a small random `CLIPVisionModelWithProjection`
/// (pre-LayerNorm, QuickGELU or tanh-GELU, class embedding, the projection) is recognised from
/// what `save_pretrained` writes, and our CPU forward gives transformers' pooled output, tokens
/// and image embeddings; the GPU forward gives the CPU's.
#[test]
fn clip_vision_matches_transformers() {
    let Some(python) = reference_python() else {
        return;
    };
    for act in ["quick_gelu", "gelu", "gelu_pytorch_tanh"] {
        let (dir, r) = transformers_reference(&python, "clip", &[act]);
        let get = |n: &str| r.read_f32(r.get(n).unwrap()).unwrap();
        let px = get("pixel_values");
        let path = dir.path().join("model.safetensors");
        let (spec, out) = forward(&CpuOps, &path, &px, 3);
        assert_eq!(spec.family, Family::HfClip);
        assert!(spec.norm_pre.is_some());
        assert_eq!(
            (spec.dim, spec.depth, spec.heads, spec.patch),
            (64, 2, 4, 8)
        );
        for (what, ours, want) in [
            ("pooled", &out.cls, get("pooler_output")),
            ("tokens", &out.tokens, get("tokens")),
            ("image embeds", &out.logits, get("image_embeds")),
        ] {
            let e = rel(ours, &want);
            eprintln!("CLIP ({act}) {what} vs transformers: rel {e:.3e}");
            assert!(e < REFERENCE_REL_TOL, "{act} {what}: {e}");
        }
        if let Some(g) = gpu::device() {
            let ops = comq_gpu::device::wgpu::forward::GpuOps::new(&g);
            let (_, gout) = forward(&ops, &path, &px, 3);
            let e = rel(&gout.tokens, &out.tokens);
            assert!(e < FORWARD_REL_TOL, "{act} GPU vs CPU tokens: {e}");
        }
    }
}

/// A whole CLIP or SigLIP model (the text tower beside the vision tower, as most checkpoints
/// ship) is recognised: the text tower plays no part in the image features, so it is neither an
/// error nor quantized; the image features are transformers' `get_image_features`; and a run with
/// no options quantizes the vision tower's 12 layers and copies every text-tower tensor as it is.
#[test]
fn a_whole_clip_or_siglip_model_quantizes_its_vision_tower() {
    let Some(python) = reference_python() else {
        return;
    };
    for (arch, family, features) in [
        ("clip_model", Family::HfClip, "image_embeds"),
        ("siglip_model", Family::HfSiglip, "pooler_output"),
    ] {
        let (dir, r) = transformers_reference(&python, arch, &[]);
        let get = |n: &str| r.read_f32(r.get(n).unwrap()).unwrap();
        let px = get("pixel_values");
        let path = dir.path().join("model.safetensors");
        let (spec, out) = forward(&CpuOps, &path, &px, 3);
        assert_eq!(spec.family, family);
        let ours = if family == Family::HfClip {
            &out.logits
        } else {
            &out.cls
        };
        let e = rel(ours, &get(features));
        eprintln!("whole {arch}: image features vs transformers: rel {e:.3e}");
        assert!(e < REFERENCE_REL_TOL, "{arch}: {e}");

        std::fs::remove_file(dir.path().join("reference.safetensors")).unwrap();
        let q = dir.path().join("q");
        let report = dir.path().join("r.json");
        let o = common::run(&[
            "run",
            common::s(dir.path()),
            "--out",
            common::s(&q),
            "--report",
            common::s(&report),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rep: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let layers = rep["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 12, "{arch}");
        assert!(layers.iter().all(|l| l["name"]
            .as_str()
            .unwrap()
            .starts_with("vision_model.encoder.")));
        let before = comq_gpu::io::safetensors::Model::open(&path).unwrap();
        let after = comq_gpu::io::safetensors::Model::open(&q.join("model.safetensors")).unwrap();
        let mut text = 0;
        for t in before
            .tensors()
            .iter()
            .filter(|t| t.name.starts_with("text_model."))
        {
            let a = after.get(&t.name).expect("the text tower is kept");
            assert_eq!(
                before.read_f32(t).unwrap(),
                after.read_f32(a).unwrap(),
                "{}",
                t.name
            );
            text += 1;
        }
        assert!(text > 10, "{arch}: {text} text tensors");
    }
}

/// The synthetic CLIP tower is recognised with its pre-LayerNorm, QuickGELU and projection,
/// reads every tensor it has, and its GPU forward matches the CPU's.
#[test]
fn a_synthetic_clip_tower_is_recognised_and_runs_on_both_devices() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::HfClip, 12);
    let m = Checkpoint::open(&path).unwrap();
    let s = VitSpec::detect(&m).unwrap();
    assert_eq!(s.family, Family::HfClip);
    assert_eq!(s.act, comq_gpu::device::ops::Activation::QuickGelu);
    assert_eq!(s.num_classes, 12);
    assert!(s.norm_pre.is_some());
    for t in m.tensors() {
        assert!(s.used_tensors().contains(&t.name), "{}", t.name);
    }
    let px = pixels(2, 3, 16, 3);
    let (_, c) = forward(&CpuOps, &path, &px, 2);
    if let Some(g) = gpu::device() {
        let ops = comq_gpu::device::wgpu::forward::GpuOps::new(&g);
        let (_, o) = forward(&ops, &path, &px, 2);
        assert!(rel(&o.tokens, &c.tokens) < FORWARD_REL_TOL);
        assert!(rel(&o.logits, &c.logits) < FORWARD_REL_TOL);
    }
}

/// A timm ViT's `norm_pre` (every timm CLIP model has one) is applied before the first block,
/// not skipped: the same model without it gives other features.
#[test]
fn a_timm_norm_pre_is_applied_before_the_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::TimmVit, 5);
    let px = pixels(2, 3, 16, 9);
    let (_, plain) = forward(&CpuOps, &path, &px, 2);
    let w: Vec<usize> = vec![32];
    with_extra_tensors(
        &path,
        &[("norm_pre.weight", w.clone()), ("norm_pre.bias", w)],
    );
    let m = Checkpoint::open(&path).unwrap();
    let s = VitSpec::detect(&m).unwrap();
    assert_eq!(
        s.norm_pre,
        Some(("norm_pre.weight".into(), "norm_pre.bias".into()))
    );
    // A zero-weight pre-norm sends zeros into the first block: the features must change.
    let (_, pre) = forward(&CpuOps, &path, &px, 2);
    assert!(rel(&pre.cls, &plain.cls) > 1e-2);
}

/// A CLIP tower quantizes end to end from images: every linear layer of every block is
/// calibrated through the forward pass, the projection is left in full precision.
#[test]
fn a_clip_tower_quantizes_from_images() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::HfClip, 12);
    let out = dir.path().join("q.safetensors");
    let report = dir.path().join("r.json");
    let o = common::run(&[
        "run",
        common::s(&path),
        "--out",
        common::s(&out),
        "--report",
        common::s(&report),
        "--preset",
        "paper",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let layers = r["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2 * 6);
    assert!(layers
        .iter()
        .all(|l| l["calibration"] == "images" && !l["name"].as_str().unwrap().contains("visual")));
}

/// Swin Transformers against timm and transformers themselves: a small random Swin (three
/// stages, windows of 4 over a 16x16 grid, shifted every second block, two patch mergings, a
/// last stage whose window covers the grid) is recognised from what each library saves, and our
/// CPU forward gives their tokens after the final norm, pooled features and logits; the GPU
/// forward gives the CPU's.
#[test]
fn swin_matches_timm_and_transformers() {
    let Some(python) = reference_python() else {
        return;
    };
    for (library, family) in [
        ("timm", Family::TimmSwin),
        ("hf", Family::HfSwin),
        ("hf_backbone", Family::HfSwin),
    ] {
        let (dir, r) = reference_model(&python, "swin.py", library, &[]);
        let get = |n: &str| r.read_f32(r.get(n).unwrap()).unwrap();
        let px = get("pixel_values");
        let path = dir.path().join("model.safetensors");
        let (spec, out) = forward(&CpuOps, &path, &px, 3);
        assert_eq!(spec.family, family);
        let widths: Vec<usize> = spec.blocks.iter().map(|b| b.geom.dim).collect();
        assert_eq!(widths, [16, 16, 32, 32, 64, 64]);
        let shifted: Vec<usize> = (0..6).map(|b| spec.block_shift(b)).collect();
        assert_eq!(shifted, [0, 2, 0, 2, 0, 0]);
        assert_eq!(spec.blocks.iter().filter(|b| b.merge.is_some()).count(), 2);
        let mut checks = vec![
            ("tokens", &out.tokens, get("tokens")),
            ("features", &out.cls, get("features")),
        ];
        if library != "hf_backbone" {
            checks.push(("logits", &out.logits, get("logits")));
        } else {
            assert!(out.logits.is_empty());
        }
        for (what, ours, want) in checks {
            let e = rel(ours, &want);
            eprintln!("Swin ({library}) {what} vs reference: rel {e:.3e}");
            assert!(e < REFERENCE_REL_TOL, "{library} {what}: {e}");
        }
        if let Some(g) = gpu::device() {
            let ops = comq_gpu::device::wgpu::forward::GpuOps::new(&g);
            let (_, gout) = forward(&ops, &path, &px, 3);
            let e = rel(&gout.tokens, &out.tokens);
            eprintln!("Swin ({library}) GPU vs CPU tokens: rel {e:.3e}");
            assert!(e < FORWARD_REL_TOL, "{library} GPU vs CPU tokens: {e}");
            assert!(rel(&gout.logits, &out.logits) < FORWARD_REL_TOL);
        }
    }
}

/// Rewrites the safetensors file at `path` with each tensor renamed by `rename`.
fn with_renamed_tensors(path: &Path, rename: impl Fn(&str) -> String) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (rename(&n), v))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, out).unwrap();
}

/// A timm Swin saved before timm 0.9 keeps each patch merging at the end of the stage before
/// (`layers.0.downsample`) and its head as `head`: the same network, recognised and computed as
/// the current layout is (the same reference outputs).
#[test]
fn a_swin_in_timm_s_older_layout_matches_timm() {
    let Some(python) = reference_python() else {
        return;
    };
    let (dir, r) = reference_model(&python, "swin.py", "timm", &[]);
    let path = dir.path().join("model.safetensors");
    with_renamed_tensors(&path, |n| {
        if let Some(rest) = n.strip_prefix("head.fc.") {
            return format!("head.{rest}");
        }
        for s in 1..3 {
            if let Some(rest) = n.strip_prefix(&format!("layers.{s}.downsample.")) {
                return format!("layers.{}.downsample.{rest}", s - 1);
            }
        }
        n.to_string()
    });
    let get = |n: &str| r.read_f32(r.get(n).unwrap()).unwrap();
    let (spec, out) = forward(&CpuOps, &path, &get("pixel_values"), 3);
    assert_eq!(spec.blocks.iter().filter(|b| b.merge.is_some()).count(), 2);
    assert_eq!(
        spec.locate("layers.0.downsample.reduction"),
        Some((2, Role::Reduction))
    );
    assert!(rel(&out.tokens, &get("tokens")) < REFERENCE_REL_TOL);
    assert!(rel(&out.logits, &get("logits")) < REFERENCE_REL_TOL);
}

/// A Swin quantizes end to end from images on the CPU and the GPU: every linear layer is
/// calibrated through the forward pass, the patch mergings' reductions included, and both
/// devices choose layers of the same error.
#[test]
fn a_swin_quantizes_from_images_on_both_devices() {
    let Some(python) = reference_python() else {
        return;
    };
    let (dir, _) = reference_model(&python, "swin.py", "hf", &[]);
    let path = dir.path().join("model.safetensors");
    std::fs::remove_file(dir.path().join("reference.safetensors")).unwrap();
    let mut devices = vec!["cpu"];
    if gpu::device().is_some() {
        devices.push("gpu");
    }
    let mut errors = Vec::new();
    for device in devices {
        let out = dir.path().join(format!("q-{device}.safetensors"));
        let report = dir.path().join(format!("r-{device}.json"));
        let o = common::run(&[
            "run",
            common::s(&path),
            "--images",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/assets/photos/generic.safetensors"
            ),
            "--out",
            common::s(&out),
            "--report",
            common::s(&report),
            "--device",
            device,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let layers = r["layers"].as_array().unwrap();
        // 6 blocks of 6 linears (query, key, value, output, intermediate, output) and 2 reductions.
        assert_eq!(layers.len(), 6 * 6 + 2, "{device}");
        assert!(layers.iter().all(|l| l["calibration"] == "images"));
        let names: Vec<&str> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
        let reduction = names
            .iter()
            .position(|n| n.contains("layers.0.downsample.reduction"))
            .expect("the first reduction is quantized");
        // It is visited before the next stage's first block.
        assert!(
            names[reduction + 1].contains("layers.1.blocks.0."),
            "{names:?}"
        );
        errors.push(r["totals"]["mean_rel_error"].as_f64().unwrap());
    }
    if let [cpu, gpu] = errors[..] {
        assert!((cpu - gpu).abs() <= 0.02 * cpu, "CPU {cpu} vs GPU {gpu}");
    }
}

/// A Swin whose checkpoint holds a tensor its forward pass does not read (an absolute position
/// embedding) is refused with the tensor named; one whose input grid the windows do not tile is
/// refused naming the block and window.
#[test]
fn a_swin_with_unread_tensors_or_untiled_grids_is_refused() {
    let Some(python) = reference_python() else {
        return;
    };
    let (dir, _) = reference_model(&python, "swin.py", "timm", &[]);
    let path = dir.path().join("model.safetensors");
    let m = Checkpoint::open(&path).unwrap();
    let mut spec = VitSpec::detect(&m).unwrap();
    let e = spec.set_input(None, Some(72)).unwrap_err().to_string();
    assert!(e.contains("windows of 4"), "{e}");
    drop(m);
    with_extra_tensors(&path, &[("absolute_pos_embed", vec![1, 256, 16])]);
    let m = Checkpoint::open(&path).unwrap();
    let e = VitSpec::detect(&m).unwrap_err().to_string();
    assert!(
        e.contains("absolute_pos_embed") && e.contains("timm Swin"),
        "{e}"
    );
    drop(m);
    // Stored index and mask buffers (older exports saved them, as int64 and f32) are known.
    {
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let index: Vec<u8> = (0..16 * 16i64).flat_map(|v| v.to_le_bytes()).collect();
        let mask = vec![0u8; 4 * 16 * 16 * 16];
        let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .filter(|(n, _)| n != "absolute_pos_embed")
            .collect();
        views.push((
            "layers.0.blocks.0.attn.relative_position_index".into(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![16, 16], &index)
                .unwrap(),
        ));
        views.push((
            "layers.0.blocks.1.attn_mask".into(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![16, 16, 16], &mask)
                .unwrap(),
        ));
        let out = safetensors::serialize(views, None).unwrap();
        std::fs::write(&path, out).unwrap();
    }
    VitSpec::detect(&Checkpoint::open(&path).unwrap()).unwrap();
    // A bias table claiming windows of 65 tokens a side: refused before any bias is expanded.
    let table = "layers.0.blocks.0.attn.relative_position_bias_table";
    with_renamed_tensors(&path, |n| {
        if n == table {
            "unused.table".to_string()
        } else {
            n.to_string()
        }
    });
    with_extra_tensors(&path, &[(table, vec![129 * 129, 1])]);
    let e = VitSpec::detect(&Checkpoint::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("windows of 65") && e.contains("at most 64"),
        "{e}"
    );
}

/// HF DINOv2 with registers against transformers itself: the register tokens sit between the
/// class token and the patches without a position embedding, and every token after the final
/// LayerNorm is transformers' (CPU within 1e-4 relative; GPU to CPU).
#[test]
fn dinov2_with_registers_matches_transformers() {
    let Some(python) = reference_python() else {
        return;
    };
    let (dir, r) = transformers_reference(&python, "dinov2_registers", &[]);
    let get = |n: &str| r.read_f32(r.get(n).unwrap()).unwrap();
    let px = get("pixel_values");
    let path = dir.path().join("model.safetensors");
    let (spec, out) = forward(&CpuOps, &path, &px, 3);
    assert_eq!(spec.family, Family::HfDinov2);
    assert_eq!((spec.registers, spec.prefix_tokens), (4, 5));
    let e = rel(&out.tokens, &get("last_hidden_state"));
    eprintln!("DINOv2 with registers vs transformers: rel {e:.3e}");
    assert!(e < REFERENCE_REL_TOL, "{e}");
    if let Some(g) = gpu::device() {
        let ops = comq_gpu::device::wgpu::forward::GpuOps::new(&g);
        let (_, gout) = forward(&ops, &path, &px, 3);
        let e = rel(&gout.tokens, &out.tokens);
        assert!(e < FORWARD_REL_TOL, "GPU vs CPU tokens: {e}");
    }
}

/// HF SigLIP vision towers against transformers itself: no class token, tanh-GELU, and the
/// features are the attention-pooling head's (CPU within 1e-4 relative of transformers' tokens
/// and pooled output; GPU to CPU).
#[test]
fn siglip_vision_matches_transformers() {
    let Some(python) = reference_python() else {
        return;
    };
    let (dir, r) = transformers_reference(&python, "siglip", &[]);
    let get = |n: &str| r.read_f32(r.get(n).unwrap()).unwrap();
    let px = get("pixel_values");
    let path = dir.path().join("model.safetensors");
    let (spec, out) = forward(&CpuOps, &path, &px, 3);
    assert_eq!(spec.family, Family::HfSiglip);
    assert_eq!(spec.prefix_tokens, 0);
    assert_eq!(spec.act, comq_gpu::device::ops::Activation::GeluTanh);
    for (what, ours, want) in [
        ("tokens", &out.tokens, get("last_hidden_state")),
        ("pooled", &out.cls, get("pooler_output")),
    ] {
        let e = rel(ours, &want);
        eprintln!("SigLIP {what} vs transformers: rel {e:.3e}");
        assert!(e < REFERENCE_REL_TOL, "{what}: {e}");
    }
    if let Some(g) = gpu::device() {
        let ops = comq_gpu::device::wgpu::forward::GpuOps::new(&g);
        let (_, gout) = forward(&ops, &path, &px, 3);
        assert!(rel(&gout.tokens, &out.tokens) < FORWARD_REL_TOL);
        assert!(rel(&gout.cls, &out.cls) < FORWARD_REL_TOL);
    }
}

/// Register tokens of an odd shape are refused with the tensor named, never a panic: a
/// 2-D tensor is not `[1, registers, dim]`, and an empty one is a tensor the pass cannot place.
#[test]
fn odd_register_tokens_are_refused_with_the_tensor_named() {
    for shape in [vec![4, 32], vec![1, 0, 32]] {
        let dir = tempfile::tempdir().unwrap();
        let path = synthetic(dir.path(), Family::HfDinov2, 0);
        with_extra_tensors(&path, &[("embeddings.register_tokens", shape.clone())]);
        let m = Checkpoint::open(&path).unwrap();
        let e = VitSpec::detect(&m).unwrap_err().to_string();
        assert!(e.contains("embeddings.register_tokens"), "{shape:?}: {e}");
    }
}

/// `inspect`'s line on the layout names the family, the sizes, the pooling and the head.
#[test]
fn the_layout_summary_names_family_sizes_pooling_and_head() {
    for (family, classes, want) in [
        (
            Family::TimmVit,
            5,
            "pooled by the class token; head 'head' (5 outputs)",
        ),
        (
            Family::HfDinov2,
            4,
            "head 'classifier' on class token and patch mean (4 classes)",
        ),
        (Family::HfClip, 12, "QuickGELU"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = synthetic(dir.path(), family, classes);
        let s = VitSpec::detect(&Checkpoint::open(&path).unwrap()).unwrap();
        let line = s.summary();
        assert!(
            line.starts_with(&format!("{family}: width 32, depth 2")),
            "{line}"
        );
        assert!(line.contains(want), "{line}");
    }
}

/// timm's ViT variants against timm itself: registers with and without a position embedding,
/// a CLIP tower (`norm_pre`, QuickGELU, no patch bias, projection head), a SigLIP tower (no class
/// token, tanh-GELU, the attention-pooling head), average pooling with and without `fc_norm`,
/// and `qk_norm` (a LayerNorm over each head's queries and keys).
/// Each is saved as timm saves for the hub (`scripts/reference/timm_vision.py`), recognised from
/// its tensors and `config.json`, and our CPU forward gives timm's tokens, pooled features and
/// logits; the GPU forward gives the CPU's.
#[test]
fn timm_variants_match_timm() {
    let Some(python) = reference_python() else {
        return;
    };
    use comq_gpu::model::Pool;
    for (variant, pool, prefix, pos_prefix) in [
        ("reg4", Pool::Cls, 5, 0),
        ("reg_embed", Pool::Cls, 3, 3),
        ("clip", Pool::Cls, 1, 1),
        ("siglip", Pool::Map("attn_pool".into()), 0, 0),
        ("avg_fc", Pool::Mean, 0, 0),
        ("avg", Pool::Mean, 1, 1),
        ("qk_norm", Pool::Cls, 1, 1),
        ("rect", Pool::Cls, 1, 1),
    ] {
        let (dir, r) = reference_model(&python, "timm_vision.py", variant, &[]);
        let get = |n: &str| r.read_f32(r.get(n).unwrap()).unwrap();
        let px = get("pixel_values");
        let path = dir.path().join("model.safetensors");
        let (spec, out) = forward(&CpuOps, &path, &px, 3);
        assert_eq!(spec.family, Family::TimmVit, "{variant}");
        assert_eq!(spec.pool, pool, "{variant}");
        assert_eq!(
            (spec.prefix_tokens, spec.pos_prefix),
            (prefix, pos_prefix),
            "{variant}"
        );
        assert_eq!(
            (spec.dim, spec.depth, spec.heads, spec.patch),
            (64, 2, 4, 8)
        );
        let mut checks = vec![
            ("tokens", &out.tokens, get("tokens")),
            ("features", &out.cls, get("features")),
        ];
        if r.get("logits").is_some() {
            checks.push(("logits", &out.logits, get("logits")));
        } else {
            assert!(out.logits.is_empty(), "{variant}");
        }
        for (what, ours, want) in checks {
            let e = rel(ours, &want);
            eprintln!("timm {variant} {what}: rel {e:.3e}");
            assert!(e < REFERENCE_REL_TOL, "{variant} {what}: {e}");
        }
        rotation_keeps_the_network(&path, &spec, &px, &out, variant);
        if variant == "siglip" {
            // It quantizes from the bundled photos with no data given: the blocks' linear
            // layers, not the pooling head's.
            let report = dir.path().join("r.json");
            let o = common::run(&[
                "run",
                common::s(dir.path()),
                "--out",
                common::s(&dir.path().join("q")),
                "--report",
                common::s(&report),
                "--preset",
                "paper",
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
            let names: Vec<&str> = r["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["name"].as_str().unwrap())
                .collect();
            assert_eq!(names.len(), 8, "{names:?}");
            assert!(names.iter().all(|n| n.starts_with("blocks.")), "{names:?}");
        }
        if let Some(g) = gpu::device() {
            let ops = comq_gpu::device::wgpu::forward::GpuOps::new(&g);
            let (_, gout) = forward(&ops, &path, &px, 3);
            for (what, a, b) in [
                ("tokens", &gout.tokens, &out.tokens),
                ("features", &gout.cls, &out.cls),
            ] {
                let e = rel(a, b);
                assert!(e < FORWARD_REL_TOL, "{variant} GPU vs CPU {what}: {e}");
            }
        }
    }
}

/// A timm attention-pooling head with a part missing is refused at detection, naming the tensor,
/// not when the pass first reads it.
#[test]
fn an_incomplete_timm_pooling_head_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::TimmVit, 5);
    with_extra_tensors(
        &path,
        &[
            ("attn_pool.latent", vec![1, 1, 32]),
            ("attn_pool.q.weight", vec![32, 32]),
        ],
    );
    let m = Checkpoint::open(&path).unwrap();
    let e = VitSpec::detect(&m).unwrap_err().to_string();
    assert!(e.contains("'attn_pool.kv.weight'"), "{e}");
    // Several latent queries (timm's `latent_len > 1`) are refused too.
    let dir2 = tempfile::tempdir().unwrap();
    let path2 = synthetic(dir2.path(), Family::TimmVit, 5);
    with_extra_tensors(&path2, &[("attn_pool.latent", vec![1, 2, 32])]);
    let e = VitSpec::detect(&Checkpoint::open(&path2).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("only one latent query"), "{e}");
}

/// `--rotate` on a timm variant: the rotated network gives the same logits (or, behind an
/// attention-pooling head, the same pooled features); a variant it cannot keep is refused —
/// CLIP's pre-LayerNorm, or a backbone whose features would come out rotated.
fn rotation_keeps_the_network(
    path: &Path,
    spec: &VitSpec,
    px: &[f32],
    out: &Output,
    variant: &str,
) {
    use comq_gpu::model::Pool;
    let model = Checkpoint::open(path).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let dest = scratch.path().join("rotated.safetensors");
    let absorbed = !out.logits.is_empty() || matches!(spec.pool, Pool::Map(_));
    match comq_gpu::model::rotate::write_rotated(&model, spec, 0, &dest) {
        Ok(()) => {
            assert!(
                spec.norm_pre.is_none() && absorbed,
                "{variant} should be refused"
            );
            let temp =
                comq_gpu::io::writer::TempFile::in_temp_dir(&format!("vit-{variant}.safetensors"));
            std::fs::rename(&dest, temp.path()).unwrap();
            let mut rotated = Checkpoint::open(path).unwrap();
            rotated.overlay(temp).unwrap();
            let stem = HostStem::load(&rotated, spec).unwrap();
            let r = run_model(
                &CpuOps,
                spec,
                &stem,
                &mut |b| HostBlock::load(&rotated, spec, &spec.blocks[b]),
                px,
                3,
            )
            .unwrap();
            let (what, a, b) = if out.logits.is_empty() {
                ("pooled features", &r.cls, &out.cls)
            } else {
                ("logits", &r.logits, &out.logits)
            };
            let e = rel(a, b);
            eprintln!("timm {variant} rotated {what}: rel {e:.3e}");
            assert!(
                e < 1e-5,
                "{variant}: the rotated network's {what} differ by {e}"
            );
        }
        Err(e) => {
            let e = e.to_string();
            assert!(spec.norm_pre.is_some() || !absorbed, "{variant}: {e}");
            assert!(e.contains("--rotate"), "{e}");
        }
    }
}

/// `--target-bits`'s feature probe: a layer's effect equals the mean relative change of the
/// pooled features and of the tokens that a whole-model forward with the layer swapped in gives,
/// for every layer of every block (blocks in order, the probe carrying its states forward); the
/// original weights have no effect; and the effect grows as the square of a small perturbation.
#[test]
fn the_feature_probe_matches_whole_model_features_layer_by_layer() {
    use comq_gpu::device::AnyOps;
    use comq_gpu::eval::FeatureProbe;
    let rel2 = |a: &[f32], b: &[f32]| -> f64 {
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum();
        num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()
    };
    for family in [Family::TimmVit, Family::HfVit] {
        let dir = tempfile::tempdir().unwrap();
        let path = synthetic(dir.path(), family, 3);
        let imgs = dir.path().join("images");
        common::png_folder(&imgs, 5, 11);
        let model = Checkpoint::open(&path).unwrap();
        let spec = VitSpec::detect(&model).unwrap();
        let set = ImageSet::open(&imgs).unwrap();
        let views: Vec<View> = (0..set.len()).map(View::plain).collect();
        let px = comq_gpu::calibrate::load_pixels(&set, &views, &spec).unwrap();
        let stem = HostStem::load(&model, &spec).unwrap();
        let whole = |swap: Option<(usize, Role, &[f32])>| -> Output {
            run_model(
                &CpuOps,
                &spec,
                &stem,
                &mut |b| {
                    let mut h = HostBlock::load(&model, &spec, &spec.blocks[b])?;
                    if let Some((sb, role, w)) = swap {
                        if sb == b {
                            h.set_weight(role, w);
                        }
                    }
                    Ok(h)
                },
                &px,
                views.len(),
            )
            .unwrap()
        };
        let reference = whole(None);
        let engine = AnyOps::Cpu(CpuOps);
        let mut probe = FeatureProbe::new(&engine, &spec, &model, &set, &views).unwrap();
        let mut rng = comq_gpu::util::rng::SplitMix::new(5);
        for b in 0..spec.depth {
            for (role, prefix) in spec.blocks[b].linears() {
                let name = format!("{prefix}.weight");
                let meta = model.get(&name).unwrap().clone();
                let w = model.read_f32(&meta).unwrap();
                assert_eq!(probe.effect(b, role, &w).unwrap(), 0.0, "{name} unchanged");
                let noise = rng.normals(w.len());
                let scale = 1e-3 * w.iter().map(|v| v.abs()).fold(0.0, f32::max);
                let at = |k: f32| -> Vec<f32> {
                    w.iter()
                        .zip(&noise)
                        .map(|(a, n)| a + k * scale * n)
                        .collect()
                };
                let e1 = probe.effect(b, role, &at(1.0)).unwrap();
                let e2 = probe.effect(b, role, &at(2.0)).unwrap();
                assert!(e1 > 0.0, "{name}: {e1}");
                assert!((e2 / e1 - 4.0).abs() < 0.2, "{name}: {e1} then {e2}");
                let o = whole(Some((b, role, &at(1.0))));
                let want =
                    0.5 * (rel2(&o.cls, &reference.cls) + rel2(&o.tokens, &reference.tokens));
                assert!(
                    (e1 - want).abs() <= 1e-3 * want,
                    "{name}: probe {e1:.6e}, whole model {want:.6e}"
                );
            }
        }
        // Blocks come in order: an earlier one is refused.
        assert!(probe.effect(0, Role::Fc1, &[]).is_err());
    }
}

/// Non-square inputs: a timm ViT made for 32 x 48 px (`img_size=(32, 48)`, a 4 x 6 patch grid)
/// and an HF ViT with `image_size` [32, 48] are recognised with their grids, computed as timm and
/// transformers compute them (CPU; GPU to CPU), resized from a square position grid when asked
/// for a square crop, quantized from the bundled photos (cropped to 32 x 48), and refused for a
/// Swin.
#[test]
fn non_square_inputs_match_timm_and_transformers() {
    let Some(python) = reference_python() else {
        return;
    };
    for (script, arch, want) in [
        ("timm_vision.py", "rect", "logits"),
        ("hf_vision.py", "vit_rect", "logits"),
    ] {
        let (dir, r) = reference_model(&python, script, arch, &[]);
        let get = |n: &str| r.read_f32(r.get(n).unwrap()).unwrap();
        let px = get("pixel_values");
        let path = dir.path().join("model.safetensors");
        let (spec, out) = forward(&CpuOps, &path, &px, 3);
        assert_eq!(
            (
                spec.preprocess.crop,
                spec.preprocess.crop_w,
                spec.tokens_per_image()
            ),
            (32, 48, 1 + 24),
            "{arch}"
        );
        assert!(
            spec.summary().contains("input 32x48 px"),
            "{}",
            spec.summary()
        );
        let e = rel(&out.logits, &get(want));
        eprintln!("{arch} logits vs reference: rel {e:.3e}");
        assert!(e < REFERENCE_REL_TOL, "{arch}: {e}");
        if let Some(g) = gpu::device() {
            let ops = comq_gpu::device::wgpu::forward::GpuOps::new(&g);
            let (_, gout) = forward(&ops, &path, &px, 3);
            let e = rel(&gout.tokens, &out.tokens);
            assert!(e < FORWARD_REL_TOL, "{arch} GPU vs CPU: {e}");
        }
        // A square crop resizes the 4 x 6 position grid to 4 x 4.
        let m = Checkpoint::open(&path).unwrap();
        let mut sq = VitSpec::detect(&m).unwrap();
        sq.set_input(None, Some(32)).unwrap();
        assert_eq!(sq.tokens_per_image(), 1 + 16);
        let stem = HostStem::load(&m, &sq).unwrap();
        let px32: Vec<f32> = (0..3 * 3 * 32 * 32)
            .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
            .collect();
        let o = run_model(
            &CpuOps,
            &sq,
            &stem,
            &mut |b| HostBlock::load(&m, &sq, &sq.blocks[b]),
            &px32,
            3,
        )
        .unwrap();
        assert!(o.logits.iter().all(|v| v.is_finite()));
        // From images: the bundled photos, each cropped to 32 x 48.
        std::fs::remove_file(dir.path().join("reference.safetensors")).unwrap();
        let report = dir.path().join("r.json");
        let o = common::run(&[
            "run",
            common::s(dir.path()),
            "--out",
            common::s(&dir.path().join("q")),
            "--report",
            common::s(&report),
            "--preset",
            "paper",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rep: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        assert!(rep["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["calibration"] == "images"));
    }
    // A Swin is refused a non-square input, naming the key.
    let (dir, _) = reference_model(&python, "swin.py", "hf", &[]);
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["image_size"] = serde_json::json!([64, 96]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = VitSpec::detect(&Checkpoint::open(&dir.path().join("model.safetensors")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'image_size' is 64x96") && e.contains("Swin"),
        "{e}"
    );
}

/// A non-square input in the side files (timm's `img_size` or `input_size`, HF's `image_size`,
/// the image processor's `crop_size`) whose grid the position embedding does not hold is refused
/// naming the key, never run as a square network (a 4x6 grid plus a class token has as many
/// positions as a 5x5 grid without one).
#[test]
fn a_non_square_input_is_refused_naming_the_key() {
    for (family, file, text, key) in [
        (
            Family::TimmVit,
            "config.json",
            r#"{"architecture": "vit_small_patch16_224", "model_args": {"img_size": [16, 24]}}"#,
            "'model_args.img_size' is 16x24",
        ),
        (
            Family::TimmVit,
            "config.json",
            r#"{"pretrained_cfg": {"input_size": [3, 24, 16]}}"#,
            "'pretrained_cfg.input_size' is 24x16",
        ),
        (
            Family::HfVit,
            "config.json",
            r#"{"model_type": "vit", "image_size": [16, 20], "num_attention_heads": 4}"#,
            "'image_size' is 16x20",
        ),
        (
            Family::HfVit,
            "preprocessor_config.json",
            r#"{"crop_size": {"height": 16, "width": 20}, "size": {"shortest_edge": 16}}"#,
            "'crop_size' is 16x20",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = synthetic(dir.path(), family, 5);
        // Merged into what the synthetic model wrote (its heads).
        let target = dir.path().join(file);
        let mut v: serde_json::Value = std::fs::read(&target)
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or_else(|_| serde_json::json!({}));
        let add: serde_json::Value = serde_json::from_str(text).unwrap();
        for (k, x) in add.as_object().unwrap() {
            match (v.get_mut(k), x) {
                (Some(serde_json::Value::Object(o)), serde_json::Value::Object(n)) => {
                    o.extend(n.clone())
                }
                _ => {
                    v[k] = x.clone();
                }
            }
        }
        std::fs::write(&target, v.to_string()).unwrap();
        let e = VitSpec::detect(&Checkpoint::open(&path).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains("non-square"), "{key}: {e}");
    }
}

/// An older image-processor config gives `size` as a plain number: ViT's processor (which HF
/// ViT, DeiT and Swin checkpoints name) resizes the whole image to that square, CLIP's resizes the
/// shortest edge to it, as transformers does.
#[test]
fn a_plain_number_size_follows_the_processor_class() {
    for (processor, squash, resize) in [
        ("ViTFeatureExtractor", true, 16),
        ("ViTImageProcessor", true, 16),
        ("CLIPImageProcessor", false, 16),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = synthetic(dir.path(), Family::HfVit, 5);
        let prep = serde_json::json!({
            "feature_extractor_type": processor,
            "size": 16,
            "do_resize": true,
            "resample": 3,
        });
        let m = Checkpoint::open(&path).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        let s = VitSpec::detect_with(&m, config, Some(prep)).unwrap();
        assert_eq!(
            (s.preprocess.squash, s.preprocess.resize, s.preprocess.crop),
            (squash, resize, 16),
            "{processor}"
        );
    }
}

/// An input size that is no multiple of the patch (SigLIP So400m/14 at 384 px) runs as PyTorch's
/// patch convolution does: the pixels past the last whole patch are dropped, so the features
/// equal those of the top-left crop at a multiple of the patch; on the GPU too.
#[test]
fn pixels_past_the_last_whole_patch_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), Family::TimmVit, 5);
    let model = Checkpoint::open(&path).unwrap();
    let square = VitSpec::detect(&model).unwrap();
    assert_eq!((square.preprocess.crop, square.patch), (16, 4));
    // The same model told to take 18 px: 4 patches a side, 2 pixels dropped.
    let cfg = dir.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["pretrained_cfg"] = serde_json::json!({"input_size": [3, 18, 18], "crop_pct": 1.0});
    std::fs::write(&cfg, v.to_string()).unwrap();
    let wide = VitSpec::detect(&Checkpoint::open(&path).unwrap()).unwrap();
    assert_eq!(wide.preprocess.crop, 18);
    assert_eq!(wide.tokens_per_image(), square.tokens_per_image());
    let n = 2;
    let mut rng = comq_gpu::util::rng::SplitMix::new(3);
    let px18 = rng.normals(n * 3 * 18 * 18);
    let px16: Vec<f32> = (0..n * 3)
        .flat_map(|plane| {
            let px = &px18;
            (0..16).flat_map(move |y| (0..16).map(move |x| px[(plane * 18 + y) * 18 + x]))
        })
        .collect();
    let stem = HostStem::load(&model, &square).unwrap();
    let run = |ops: &dyn Fn(&VitSpec, &[f32]) -> Output, spec: &VitSpec, px: &[f32]| ops(spec, px);
    let cpu = |spec: &VitSpec, px: &[f32]| {
        run_model(
            &CpuOps,
            spec,
            &stem,
            &mut |b| HostBlock::load(&model, spec, &spec.blocks[b]),
            px,
            n,
        )
        .unwrap()
    };
    let a = run(&cpu, &wide, &px18);
    let b = run(&cpu, &square, &px16);
    assert_eq!(a.tokens, b.tokens);
    if let Some(g) = gpu::device() {
        let ops = comq_gpu::device::wgpu::forward::GpuOps::new(&g);
        let out = run_model(
            &ops,
            &wide,
            &stem,
            &mut |b| HostBlock::load(&model, &wide, &wide.blocks[b]),
            &px18,
            n,
        )
        .unwrap();
        assert!(rel(&out.tokens, &b.tokens) < FORWARD_REL_TOL);
    }
}
