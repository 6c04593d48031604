//! Random ViTs in each family's real tensor layout, for tests and benchmarks (random weights
//! are fine for speed and for CPU/GPU parity; accuracy needs the trained models).

use std::collections::BTreeMap;
use std::path::Path;

use crate::bench::SplitMix;
use crate::error::{Error, Result};

use super::Family;

/// Shape of a synthetic ViT.
#[derive(Debug, Clone)]
pub struct SyntheticVit {
    /// Layout to write.
    pub family: Family,
    /// Width.
    pub dim: usize,
    /// Blocks.
    pub depth: usize,
    /// Heads.
    pub heads: usize,
    /// MLP width.
    pub mlp: usize,
    /// Patch size.
    pub patch: usize,
    /// Input side.
    pub img: usize,
    /// Input channels.
    pub channels: usize,
    /// Classes of the head (0 = backbone).
    pub classes: usize,
    /// Seed.
    pub seed: u64,
}

impl SyntheticVit {
    /// Writes `model.safetensors` and `config.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut rng = SplitMix::new(self.seed);
        let mut t: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
        let (d, m, p, c) = (self.dim, self.mlp, self.patch, self.channels);
        let g = self.img / p;
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n: usize = shape.iter().product();
            let v = (0..n).map(|_| offset + scale * rng.normal()).collect();
            t.insert(name, (shape, v));
        };
        let lin = |k: usize| 1.0 / (k as f32).sqrt();
        let timm = matches!(self.family, Family::TimmVit | Family::TimmDeit);
        let deit = matches!(self.family, Family::TimmDeit | Family::HfDeit);
        let dino = self.family == Family::HfDinov2;
        let prefix_tokens = 1 + deit as usize;
        let (pe, cls, dist, pos, norm, blk) = if timm {
            (
                "patch_embed.proj".to_string(),
                "cls_token".to_string(),
                "dist_token".to_string(),
                "pos_embed".to_string(),
                "norm".to_string(),
                "blocks".to_string(),
            )
        } else {
            let root = match self.family {
                Family::HfVit if self.classes > 0 => "vit.",
                Family::HfDeit if self.classes > 0 => "deit.",
                Family::HfDinov2 if self.classes > 0 => "dinov2.",
                _ => "",
            };
            (
                format!("{root}embeddings.patch_embeddings.projection"),
                format!("{root}embeddings.cls_token"),
                format!("{root}embeddings.distillation_token"),
                format!("{root}embeddings.position_embeddings"),
                format!("{root}layernorm"),
                format!("{root}encoder.layer"),
            )
        };
        put(
            format!("{pe}.weight"),
            vec![d, c, p, p],
            lin(c * p * p),
            0.0,
        );
        put(format!("{pe}.bias"), vec![d], 0.02, 0.0);
        put(cls, vec![1, 1, d], 0.5, 0.0);
        if deit {
            put(dist, vec![1, 1, d], 0.5, 0.0);
        }
        put(pos, vec![1, prefix_tokens + g * g, d], 0.1, 0.0);
        for b in 0..self.depth {
            let s = format!("{blk}.{b}.");
            let mut linear = |name: String, out: usize, inp: usize| {
                put(format!("{name}.weight"), vec![out, inp], lin(inp), 0.0);
                put(format!("{name}.bias"), vec![out], 0.02, 0.0);
            };
            if timm {
                linear(format!("{s}attn.qkv"), 3 * d, d);
                linear(format!("{s}attn.proj"), d, d);
                linear(format!("{s}mlp.fc1"), m, d);
                linear(format!("{s}mlp.fc2"), d, m);
            } else {
                for q in ["query", "key", "value"] {
                    linear(format!("{s}attention.attention.{q}"), d, d);
                }
                linear(format!("{s}attention.output.dense"), d, d);
                if dino {
                    linear(format!("{s}mlp.fc1"), m, d);
                    linear(format!("{s}mlp.fc2"), d, m);
                } else {
                    linear(format!("{s}intermediate.dense"), m, d);
                    linear(format!("{s}output.dense"), d, m);
                }
            }
            let (n1, n2) = if timm || dino {
                ("norm1", "norm2")
            } else {
                ("layernorm_before", "layernorm_after")
            };
            for n in [n1, n2] {
                put(format!("{s}{n}.weight"), vec![d], 0.1, 1.0);
                put(format!("{s}{n}.bias"), vec![d], 0.05, 0.0);
            }
            if dino {
                put(format!("{s}layer_scale1.lambda1"), vec![d], 0.05, 0.3);
                put(format!("{s}layer_scale2.lambda1"), vec![d], 0.05, 0.3);
            }
        }
        put(format!("{norm}.weight"), vec![d], 0.1, 1.0);
        put(format!("{norm}.bias"), vec![d], 0.05, 0.0);
        if self.classes > 0 {
            let k = self.classes;
            match self.family {
                Family::TimmVit => {
                    put("head.weight".into(), vec![k, d], lin(d), 0.0);
                    put("head.bias".into(), vec![k], 0.02, 0.0);
                }
                Family::TimmDeit => {
                    for h in ["head", "head_dist"] {
                        put(format!("{h}.weight"), vec![k, d], lin(d), 0.0);
                        put(format!("{h}.bias"), vec![k], 0.02, 0.0);
                    }
                }
                Family::HfDeit => {
                    for h in ["cls_classifier", "distillation_classifier"] {
                        put(format!("{h}.weight"), vec![k, d], lin(d), 0.0);
                        put(format!("{h}.bias"), vec![k], 0.02, 0.0);
                    }
                }
                Family::HfDinov2 => {
                    put("classifier.weight".into(), vec![k, 2 * d], lin(2 * d), 0.0);
                    put("classifier.bias".into(), vec![k], 0.02, 0.0);
                }
                Family::HfVit => {
                    put("classifier.weight".into(), vec![k, d], lin(d), 0.0);
                    put("classifier.bias".into(), vec![k], 0.02, 0.0);
                }
            }
        }
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = t
            .into_iter()
            .map(|(n, (s, v))| (n, s, bytemuck::cast_slice(&v).to_vec()))
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .expect("sizes match"),
                )
            })
            .collect();
        let data =
            safetensors::serialize(views, None).map_err(|e| Error::InvalidOption(e.to_string()))?;
        let file = dir.join("model.safetensors");
        crate::io::writer::write_atomic(&file, &data)?;
        let config = if timm {
            serde_json::json!({
                "architecture": "synthetic",
                "num_classes": self.classes,
                "model_args": {"img_size": self.img, "patch_size": p, "in_chans": c, "embed_dim": d,
                               "depth": self.depth, "num_heads": self.heads},
                "pretrained_cfg": {"input_size": [c, self.img, self.img], "crop_pct": 1.0,
                                   "interpolation": "bicubic", "mean": vec![0.5; c], "std": vec![0.5; c]}
            })
        } else {
            serde_json::json!({
                "model_type": match self.family { Family::HfDinov2 => "dinov2", Family::HfDeit => "deit", _ => "vit" },
                "hidden_size": d, "num_hidden_layers": self.depth, "num_attention_heads": self.heads,
                "intermediate_size": m, "patch_size": p, "image_size": self.img, "num_channels": c,
                "layer_norm_eps": 1e-6
            })
        };
        crate::io::writer::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&config)
                .expect("json")
                .as_bytes(),
        )?;
        Ok(())
    }
}
