//! Writes the bundled example in `assets/`: a small ViT-shaped model in timm layout with
//! correlated synthetic weights, and a calibration file holding every linear layer's inputs.
//!
//! `cargo run --release --example make_assets` regenerates the files bit for bit.

use std::collections::HashMap;
use std::path::Path;

use comq_gpu::bench::SplitMix as Rng;
use safetensors::{Dtype, View};

struct T(Dtype, Vec<usize>, Vec<u8>);
impl View for &T {
    fn dtype(&self) -> Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.2[..]).into()
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}

fn f32t(shape: &[usize], v: &[f32]) -> T {
    T(
        Dtype::F32,
        shape.to_vec(),
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

fn f16t(shape: &[usize], v: &[f32]) -> T {
    T(
        Dtype::F16,
        shape.to_vec(),
        v.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
    )
}

/// Activations with a low-rank correlated structure and uneven feature scales, like real
/// transformer layer inputs (where COMQ's advantage over RTN comes from).
fn activations(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    let k = (cols / 4).max(1);
    let a = rng.normals(k * cols);
    let scale: Vec<f32> = (0..cols)
        .map(|i| 0.2 + 3.0 * ((i * 7919 % 97) as f32 / 97.0).powi(3))
        .collect();
    let mut x = vec![0.0f32; rows * cols];
    for r in 0..rows {
        let z = rng.normals(k);
        for c in 0..cols {
            let mut s = 0.0;
            for t in 0..k {
                s += z[t] * a[t * cols + c];
            }
            x[r * cols + c] = scale[c] * (s / (k as f32).sqrt() + 0.05 * rng.normal());
        }
    }
    x
}

fn main() {
    let (d, hidden, depth, classes, tokens) = (64usize, 256usize, 4usize, 10usize, 512usize);
    let mut rng = Rng::new(2024);
    let mut model: Vec<(String, T)> = Vec::new();
    let mut calib: Vec<(String, T)> = Vec::new();
    model.push(("cls_token".into(), f32t(&[1, 1, d], &rng.normals(d))));
    model.push(("pos_embed".into(), f32t(&[1, 17, d], &rng.normals(17 * d))));
    model.push((
        "patch_embed.proj.weight".into(),
        f32t(&[d, 1, 7, 7], &rng.normals(d * 49)),
    ));
    model.push(("patch_embed.proj.bias".into(), f32t(&[d], &vec![0.0; d])));
    for b in 0..depth {
        for n in ["norm1", "norm2"] {
            model.push((format!("blocks.{b}.{n}.weight"), f32t(&[d], &vec![1.0; d])));
            model.push((format!("blocks.{b}.{n}.bias"), f32t(&[d], &vec![0.0; d])));
        }
        for (name, out, inp) in [
            ("attn.qkv", 3 * d, d),
            ("attn.proj", d, d),
            ("mlp.fc1", hidden, d),
            ("mlp.fc2", d, hidden),
        ] {
            let std = (1.0 / inp as f32).sqrt();
            // Heavy-ish tails, as trained weights have.
            let w: Vec<f32> = rng
                .normals(out * inp)
                .iter()
                .map(|v| std * v * (1.0 + 0.5 * v.abs()))
                .collect();
            model.push((format!("blocks.{b}.{name}.weight"), f32t(&[out, inp], &w)));
            model.push((
                format!("blocks.{b}.{name}.bias"),
                f32t(&[out], &vec![0.0; out]),
            ));
            calib.push((
                format!("blocks.{b}.{name}.input"),
                f16t(&[tokens, inp], &activations(&mut rng, tokens, inp)),
            ));
        }
    }
    model.push(("norm.weight".into(), f32t(&[d], &vec![1.0; d])));
    model.push(("norm.bias".into(), f32t(&[d], &vec![0.0; d])));
    model.push((
        "head.weight".into(),
        f32t(&[classes, d], &rng.normals(classes * d)),
    ));
    model.push(("head.bias".into(), f32t(&[classes], &vec![0.0; classes])));

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    std::fs::create_dir_all(&dir).expect("assets/ can be created");
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    for (file, tensors) in [
        ("tiny-vit.safetensors", &model),
        ("tiny-vit.calib.safetensors", &calib),
    ] {
        let map: HashMap<String, &T> = tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
        safetensors::serialize_to_file(map, Some(meta.clone()), &dir.join(file))
            .expect("asset writes");
        println!("wrote assets/{file}");
    }
}
