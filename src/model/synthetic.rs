//! Random ViTs in each family's real tensor layout, for tests and benchmarks (random weights
//! are fine for speed and for CPU/GPU parity; accuracy needs the trained models).

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::util::rng::SplitMix;

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
    /// Writes `model.safetensors` (f32) and `config.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        self.write_as(dir, safetensors::Dtype::F32)
    }

    /// Writes `model.safetensors` in `dtype` (F32 or BF16) and `config.json` into `dir`,
    /// streaming: one tensor is in memory at a time, so a model larger than the host's memory can
    /// be written (the 6-billion-parameter benchmark shape is 24 GB in f32).
    pub fn write_as(&self, dir: &Path, dtype: safetensors::Dtype) -> Result<()> {
        if matches!(
            self.family,
            Family::HfSiglip | Family::TimmSwin | Family::HfSwin
        ) {
            return Err(Error::InvalidOption(format!(
                "synthetic models are not written in the {} layout",
                self.family
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let elem = match dtype {
            safetensors::Dtype::F32 => 4,
            safetensors::Dtype::BF16 => 2,
            other => {
                return Err(Error::InvalidOption(format!(
                    "synthetic models are written in F32 or BF16, not {other:?}"
                )))
            }
        };
        let tensors = self.tensors();
        self.write_tensors(dir, dtype, elem, &tensors)?;
        crate::io::writer::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&self.config())
                .expect("json")
                .as_bytes(),
        )?;
        Ok(())
    }

    /// Every tensor in call order: (name, shape, scale, offset). Values are drawn in this order
    /// from one generator, so a model does not depend on how it is written.
    fn tensors(&self) -> Vec<(String, Vec<usize>, f32, f32)> {
        let mut t: Vec<(String, Vec<usize>, f32, f32)> = Vec::new();
        let (d, m, p, c) = (self.dim, self.mlp, self.patch, self.channels);
        let g = self.img / p;
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            t.push((name, shape, scale, offset));
        };
        let lin = |k: usize| 1.0 / (k as f32).sqrt();
        let timm = matches!(self.family, Family::TimmVit | Family::TimmDeit);
        let deit = matches!(self.family, Family::TimmDeit | Family::HfDeit);
        let dino = self.family == Family::HfDinov2;
        let clip = self.family == Family::HfClip;
        let prefix_tokens = 1 + deit as usize;
        let (pe, cls, dist, pos, norm, blk) = if clip {
            (
                "vision_model.embeddings.patch_embedding".to_string(),
                "vision_model.embeddings.class_embedding".to_string(),
                String::new(),
                "vision_model.embeddings.position_embedding.weight".to_string(),
                "vision_model.post_layernorm".to_string(),
                "vision_model.encoder.layers".to_string(),
            )
        } else if timm {
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
        if clip {
            // CLIP's patch embedding has no bias, its class embedding and position embedding
            // no batch axis; a LayerNorm follows them.
            put(cls, vec![d], 0.5, 0.0);
            put(pos, vec![prefix_tokens + g * g, d], 0.1, 0.0);
            put("vision_model.pre_layrnorm.weight".into(), vec![d], 0.1, 1.0);
            put("vision_model.pre_layrnorm.bias".into(), vec![d], 0.05, 0.0);
        } else {
            put(format!("{pe}.bias"), vec![d], 0.02, 0.0);
            put(cls, vec![1, 1, d], 0.5, 0.0);
            if deit {
                put(dist, vec![1, 1, d], 0.5, 0.0);
            }
            put(pos, vec![1, prefix_tokens + g * g, d], 0.1, 0.0);
        }
        for b in 0..self.depth {
            let s = format!("{blk}.{b}.");
            let mut linear = |name: String, out: usize, inp: usize| {
                put(format!("{name}.weight"), vec![out, inp], lin(inp), 0.0);
                put(format!("{name}.bias"), vec![out], 0.02, 0.0);
            };
            if clip {
                for q in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    linear(format!("{s}self_attn.{q}"), d, d);
                }
                linear(format!("{s}mlp.fc1"), m, d);
                linear(format!("{s}mlp.fc2"), d, m);
            } else if timm {
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
            let (n1, n2) = if clip {
                ("layer_norm1", "layer_norm2")
            } else if timm || dino {
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
                // The projection into the joint space, without a bias.
                Family::HfClip => put("visual_projection.weight".into(), vec![k, d], lin(d), 0.0),
                Family::HfSiglip | Family::TimmSwin | Family::HfSwin => {
                    unreachable!("refused above")
                }
            }
        }
        t
    }

    /// Streams `t` into `dir/model.safetensors` (through a temporary file renamed at the end),
    /// `elem` bytes per value.
    fn write_tensors(
        &self,
        dir: &Path,
        dtype: safetensors::Dtype,
        elem: usize,
        t: &[(String, Vec<usize>, f32, f32)],
    ) -> Result<()> {
        let mut header = serde_json::Map::new();
        let mut at = 0usize;
        for (name, shape, _, _) in t {
            let bytes = shape.iter().product::<usize>() * elem;
            header.insert(
                name.clone(),
                serde_json::json!({
                    "dtype": format!("{dtype:?}"),
                    "shape": shape,
                    "data_offsets": [at, at + bytes],
                }),
            );
            at += bytes;
        }
        let mut head = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
        head.resize(head.len().div_ceil(8) * 8, b' ');
        let file = dir.join("model.safetensors");
        let tmp = dir.join(".model.safetensors.tmp");
        let io = |e| Error::io(&tmp, e);
        let mut out =
            std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io)?);
        out.write_all(&(head.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&head).map_err(io)?;
        let mut rng = SplitMix::new(self.seed);
        let mut buf: Vec<u8> = Vec::new();
        for (_, shape, scale, offset) in t {
            let n: usize = shape.iter().product();
            buf.clear();
            for _ in 0..n {
                let v = offset + scale * rng.normal();
                match elem {
                    4 => buf.extend_from_slice(&v.to_le_bytes()),
                    _ => buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                }
            }
            out.write_all(&buf).map_err(io)?;
        }
        out.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&tmp, &file).map_err(|e| Error::io(&file, e))?;
        Ok(())
    }

    /// `config.json` in the family's own keys.
    fn config(&self) -> serde_json::Value {
        let (d, m, p, c) = (self.dim, self.mlp, self.patch, self.channels);
        let timm = matches!(self.family, Family::TimmVit | Family::TimmDeit);
        let clip = self.family == Family::HfClip;
        if timm {
            serde_json::json!({
                "architecture": "synthetic",
                "num_classes": self.classes,
                "model_args": {"img_size": self.img, "patch_size": p, "in_chans": c, "embed_dim": d,
                               "depth": self.depth, "num_heads": self.heads},
                "pretrained_cfg": {"input_size": [c, self.img, self.img], "crop_pct": 1.0,
                                   "interpolation": "bicubic", "mean": vec![0.5; c], "std": vec![0.5; c]}
            })
        } else if clip {
            serde_json::json!({
                "model_type": "clip_vision_model",
                "hidden_size": d, "num_hidden_layers": self.depth, "num_attention_heads": self.heads,
                "intermediate_size": m, "patch_size": p, "image_size": self.img, "num_channels": c,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": self.classes
            })
        } else {
            serde_json::json!({
                "model_type": match self.family { Family::HfDinov2 => "dinov2", Family::HfDeit => "deit", _ => "vit" },
                "hidden_size": d, "num_hidden_layers": self.depth, "num_attention_heads": self.heads,
                "intermediate_size": m, "patch_size": p, "image_size": self.img, "num_channels": c,
                "layer_norm_eps": 1e-6
            })
        }
    }
}
