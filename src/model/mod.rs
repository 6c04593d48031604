//! Vision Transformers as real checkpoints name them.
//!
//! COMQ needs each linear layer's inputs; users have images. This module recognises the ViT
//! family of a checkpoint (timm ViT / DeiT, HF transformers ViT / DeiT, HF DINOv2) from its
//! tensor names and shapes and from a `config.json` beside it, and maps every family onto one
//! [`VitSpec`]: the same pre-norm block (LayerNorm → attention → optional LayerScale → residual,
//! LayerNorm → MLP with exact-erf GELU → optional LayerScale → residual) with the family's tensor
//! names. Separate HF `query` / `key` / `value` layers are fused into timm's `qkv` layout
//! (rows q | k | v) at load time, so the forward pass ([`forward`]) has one shape of block.

// The CPU forward primitives live with the devices; reachable here under their former path.
pub use crate::device::cpu_ops as cpu;
pub mod forward;
pub mod rotate;
pub mod swin;
pub mod synthetic;

use std::path::Path;

use serde_json::Value;

use crate::device::ops::Activation;
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;

/// The checkpoint families the forward pass understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// timm `VisionTransformer` (`blocks.N.attn.qkv`, `cls_token`, `pos_embed`).
    TimmVit,
    /// timm distilled DeiT (a `dist_token` and a `head_dist`).
    TimmDeit,
    /// HF transformers `ViTModel` / `ViTForImageClassification`.
    HfVit,
    /// HF transformers `DeiTModel` / `DeiTForImageClassification(WithTeacher)`.
    HfDeit,
    /// HF transformers `Dinov2Model` / `Dinov2ForImageClassification` (LayerScale, patch 14).
    HfDinov2,
    /// HF transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection` (pre-LayerNorm,
    /// QuickGELU unless `hidden_act` says otherwise, the projection as the head).
    HfClip,
    /// HF transformers `SiglipVisionModel` (SigLIP / SigLIP 2 towers: no class token,
    /// tanh-GELU, features pooled by the attention-pooling head).
    HfSiglip,
    /// timm `SwinTransformer` (`layers.N.blocks.M.attn.qkv`, `layers.N.downsample`).
    TimmSwin,
    /// HF transformers `SwinModel` / `SwinForImageClassification`.
    HfSwin,
}

impl Family {
    /// A timm layout (`blocks.N.attn.qkv`).
    pub fn is_timm(self) -> bool {
        matches!(self, Family::TimmVit | Family::TimmDeit)
    }

    /// A Swin Transformer: stages of windowed attention joined by patch merging.
    pub fn is_swin(self) -> bool {
        matches!(self, Family::TimmSwin | Family::HfSwin)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::TimmVit => "timm ViT",
            Family::TimmDeit => "timm DeiT (distilled)",
            Family::HfVit => "HF ViT",
            Family::HfDeit => "HF DeiT",
            Family::HfDinov2 => "HF DINOv2",
            Family::HfClip => "HF CLIP vision",
            Family::HfSiglip => "HF SigLIP vision",
            Family::TimmSwin => "timm Swin",
            Family::HfSwin => "HF Swin",
        })
    }
}

/// The role of a linear layer inside a block; also the order COMQ visits them in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Role {
    /// Swin's patch-merging reduction (`downsample.reduction`), before the stage's first block.
    Reduction,
    /// Fused timm `qkv`.
    Qkv,
    /// HF `query`.
    Query,
    /// HF `key`.
    Key,
    /// HF `value`.
    Value,
    /// Attention output projection.
    Proj,
    /// First MLP layer.
    Fc1,
    /// Second MLP layer.
    Fc2,
}

/// Where in a block a linear layer takes its input from; layers with the same site share one
/// Gram matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// Swin's merged and LayerNormed 2×2 patch groups (the reduction).
    MergeIn,
    /// Output of the first LayerNorm (qkv / query / key / value).
    AttnIn,
    /// Output of the attention (proj).
    ProjIn,
    /// Output of the second LayerNorm (fc1).
    MlpIn,
    /// Output of the GELU (fc2).
    Fc2In,
}

impl Role {
    /// The site this role reads.
    pub fn site(self) -> Site {
        match self {
            Role::Reduction => Site::MergeIn,
            Role::Qkv | Role::Query | Role::Key | Role::Value => Site::AttnIn,
            Role::Proj => Site::ProjIn,
            Role::Fc1 => Site::MlpIn,
            Role::Fc2 => Site::Fc2In,
        }
    }
}

// How pixels become the input tensor is image data: it lives with the images.
pub use crate::io::images::Preprocess;

/// Tensor names of one block.
#[derive(Debug, Clone)]
pub struct BlockNames {
    /// Block index.
    pub index: usize,
    /// LayerNorm 1 weight / bias.
    pub norm1: (String, String),
    /// Attention input layers with their roles (one fused `qkv`, or query, key, value).
    pub qkv: Vec<(Role, String)>,
    /// Attention output projection.
    pub proj: String,
    /// LayerNorm 2.
    pub norm2: (String, String),
    /// MLP layers.
    pub fc1: String,
    /// MLP layers.
    pub fc2: String,
    /// LayerScale after attention / MLP, when the family has it.
    pub ls: Option<(String, String)>,
    /// timm's `qk_norm`: the query and key LayerNorms (query weight, query bias, key weight,
    /// key bias), each over one head's values.
    pub qk_norm: Option<[String; 4]>,
    /// Widths and attention layout.
    pub geom: BlockGeom,
    /// Swin: the relative position bias table (`[(2·window − 1)², heads]`).
    pub rel_bias: Option<String>,
    /// Swin: the patch merging before the block (norm weight, norm bias, reduction prefix).
    pub merge: Option<(String, String, String)>,
}

/// A block's widths and attention layout. A ViT's blocks all have the model's; a Swin's change
/// from stage to stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockGeom {
    /// Width of the residual stream.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub mlp: usize,
    /// Patch merges before the block: its grid side is the input grid's over `2^stage`.
    pub stage: usize,
    /// Side of the attention windows (Swin); 0: every token attends to every token.
    pub window: usize,
    /// Whether the windows are shifted by half a window (every second Swin block, where the
    /// grid is larger than one window).
    pub shifted: bool,
    /// Swin: width of the patch merging's input (4 × the previous block's width); 0 without.
    pub merge_in: usize,
}

impl BlockGeom {
    /// Width of the layer inputs at `site`.
    pub fn site_width(&self, site: Site) -> usize {
        match site {
            Site::MergeIn => self.merge_in,
            Site::Fc2In => self.mlp,
            _ => self.dim,
        }
    }

    /// The sites whose Gram matrices the block's layers read, in visiting order.
    pub fn sites(&self) -> Vec<Site> {
        let mut v = Vec::new();
        if self.merge_in > 0 {
            v.push(Site::MergeIn);
        }
        v.extend([Site::AttnIn, Site::ProjIn, Site::MlpIn, Site::Fc2In]);
        v
    }
}

impl BlockNames {
    /// All linear layers of the block, as (role, weight-tensor prefix) in visiting order.
    pub fn linears(&self) -> Vec<(Role, String)> {
        let mut v: Vec<(Role, String)> = self
            .merge
            .iter()
            .map(|m| (Role::Reduction, m.2.clone()))
            .collect();
        v.extend(self.qkv.iter().cloned());
        v.push((Role::Proj, self.proj.clone()));
        v.push((Role::Fc1, self.fc1.clone()));
        v.push((Role::Fc2, self.fc2.clone()));
        v
    }
}

/// How the final features become logits.
#[derive(Debug, Clone)]
pub enum Head {
    /// A backbone: no classifier.
    None,
    /// `logits = W · cls + b`.
    Cls(String),
    /// DeiT with teacher: the mean of the CLS head and the distillation-token head.
    ClsDist(String, String),
    /// DINOv2 classifier: `W · [cls, mean(patch tokens)] + b`.
    ClsMean(String),
}

/// How the features of an image are pooled from its tokens after the final LayerNorm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pool {
    /// The class token.
    Cls,
    /// The mean of the patch tokens, the prefix tokens left out (a tower without class token or
    /// pooling head; timm's `global_pool='avg'`).
    Mean,
    /// SigLIP's multi-head attention pooling: a learned probe attends over every token, then
    /// a LayerNorm and an MLP with a residual. HF names it `<prefix>.probe`,
    /// `.attention.in_proj_*`, `.attention.out_proj`, `.layernorm`, `.mlp.fc1`, `.mlp.fc2`;
    /// timm `attn_pool.latent`, `.q`, `.kv`, `.proj`, `.norm`, `.mlp.fc1`, `.mlp.fc2`.
    Map(String),
}

/// Everything the forward pass needs to know about a checkpoint.
#[derive(Debug, Clone)]
pub struct VitSpec {
    /// The family recognised.
    pub family: Family,
    /// Width.
    pub dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub mlp: usize,
    /// Patch size.
    pub patch: usize,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Prefix tokens before the patches (CLS, DeiT's distillation token, the registers).
    pub prefix_tokens: usize,
    /// Register tokens (DINOv2 with registers, timm's `reg_token`): one tensor of this many
    /// rows, the last prefix tokens.
    pub registers: usize,
    /// The first this many prefix tokens have a position embedding; the others (registers, and
    /// every prefix token of a timm model with `no_embed_class`) have none.
    pub pos_prefix: usize,
    /// Side of the stored position-embedding grid.
    pub pos_grid: usize,
    /// Width of the stored position-embedding grid (`pos_grid`, its height, for a square one).
    pub pos_grid_w: usize,
    /// Patch-embedding conv weight / bias (`[dim, channels, patch, patch]`).
    pub patch_embed: (String, String),
    /// CLS token, then the distillation token or the register tokens (one tensor of
    /// `registers` rows) if any.
    pub tokens: Vec<String>,
    /// Position embedding (`[1, prefix + grid², dim]`).
    pub pos_embed: String,
    /// A position embedding already resized for the preprocess crop, when the file has one.
    pub pos_embed_resized: Option<String>,
    /// The blocks.
    pub blocks: Vec<BlockNames>,
    /// LayerNorm over the tokens before the first block (CLIP's `pre_layrnorm`, timm's
    /// `norm_pre`), when the model has one.
    pub norm_pre: Option<(String, String)>,
    /// Final LayerNorm over every token (`None` when the model normalises the pooled features
    /// instead: timm's `fc_norm`).
    pub norm: Option<(String, String)>,
    /// LayerNorm of the pooled features (timm's `fc_norm`, with average pooling).
    pub fc_norm: Option<(String, String)>,
    /// The MLP activation.
    pub act: crate::device::ops::Activation,
    /// How the features are pooled.
    pub pool: Pool,
    /// Classifier.
    pub head: Head,
    /// Number of classes of the head (0 for a backbone).
    pub num_classes: usize,
    /// Class names from `config.json`, when given.
    pub labels: Vec<String>,
    /// Image preprocessing.
    pub preprocess: Preprocess,
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

fn unknown(path: &Path, reason: impl Into<String>) -> Error {
    Error::UnknownModel {
        path: path.to_path_buf(),
        reason: format!(
            "{}; the forward pass knows timm ViT/DeiT (with or without class token, with registers, CLIP and SigLIP towers, token, average or attention pooling), HF ViT/DeiT, HF DINOv2 (with or without registers), HF CLIP and HF SigLIP vision layouts — for other models pass --calib with captured activations",
            reason.into()
        ),
    }
}

/// Largest side file (`config.json`, `preprocessor_config.json`) read: real ones are a few kB.
pub const MAX_SIDE_FILE_BYTES: u64 = 16 << 20;

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > MAX_SIDE_FILE_BYTES {
        return Err(Error::UnknownModel {
            path: path.to_path_buf(),
            reason: format!(
                "{len} bytes, over the {MAX_SIDE_FILE_BYTES}-byte limit of a side file"
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_side_file(path, &bytes).map(Some)
}

/// Parses a side file's bytes as JSON (an object or anything else; the reader checks keys).
pub fn parse_side_file(path: &Path, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::UnknownModel {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn floats(v: Option<&Value>) -> Option<Vec<f32>> {
    v?.as_array()?
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect()
}

impl VitSpec {
    /// Recognises the layout of `model`, reading `config.json` / `preprocessor_config.json`
    /// from its directory when present.
    /// A tensor the forward pass would not read is refused (see [`VitSpec::check_unused`]).
    pub fn detect(model: &Checkpoint) -> Result<VitSpec> {
        VitSpec::detect_allowing(model, false)
    }

    /// [`VitSpec::detect`]; with `allow_unused`, tensors the forward pass does not read are
    /// named in a warning instead of refusing the model.
    pub fn detect_allowing(model: &Checkpoint, allow_unused: bool) -> Result<VitSpec> {
        let config = read_json(&model.dir().join("config.json"))?.unwrap_or(Value::Null);
        let prep = read_json(&model.dir().join("preprocessor_config.json"))?;
        let spec = VitSpec::recognise(model, config, prep)?;
        spec.check_unused(model, allow_unused)?;
        Ok(spec)
    }

    /// [`VitSpec::detect`] with the side files' contents given (`Value::Null` / `None` for
    /// absent ones): every value read from them is checked here.
    pub fn detect_with(model: &Checkpoint, config: Value, prep: Option<Value>) -> Result<VitSpec> {
        let spec = VitSpec::recognise(model, config, prep)?;
        spec.check_unused(model, false)?;
        Ok(spec)
    }

    /// Every tensor the forward pass reads (biases it would read if present included).
    pub fn used_tensors(&self) -> std::collections::BTreeSet<String> {
        let mut u = std::collections::BTreeSet::new();
        let mut add = |n: &str| {
            u.insert(n.to_string());
        };
        let linear = |add: &mut dyn FnMut(&str), l: &str| {
            add(&format!("{l}.weight"));
            add(&format!("{l}.bias"));
        };
        add(&self.patch_embed.0);
        add(&self.patch_embed.1);
        self.tokens.iter().for_each(|t| add(t));
        if !self.pos_embed.is_empty() {
            add(&self.pos_embed);
        }
        if let Some(r) = &self.pos_embed_resized {
            add(r);
        }
        for (w, b) in [&self.norm, &self.fc_norm, &self.norm_pre]
            .into_iter()
            .flatten()
        {
            add(w);
            add(b);
        }
        for b in &self.blocks {
            for n in [&b.norm1.0, &b.norm1.1, &b.norm2.0, &b.norm2.1] {
                add(n);
            }
            for (_, l) in b.linears() {
                linear(&mut add, &l);
            }
            if let Some((a, c)) = &b.ls {
                add(a);
                add(c);
            }
            b.qk_norm.iter().flatten().for_each(|n| add(n));
            if let Some(t) = &b.rel_bias {
                add(t);
            }
            if let Some((w, c, _)) = &b.merge {
                add(w);
                add(c);
            }
        }
        if let Pool::Map(h) = &self.pool {
            if self.family.is_timm() {
                add(&format!("{h}.latent"));
                for l in ["q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2"] {
                    linear(&mut add, &format!("{h}.{l}"));
                }
            } else {
                add(&format!("{h}.probe"));
                add(&format!("{h}.attention.in_proj_weight"));
                add(&format!("{h}.attention.in_proj_bias"));
                for l in ["attention.out_proj", "layernorm", "mlp.fc1", "mlp.fc2"] {
                    linear(&mut add, &format!("{h}.{l}"));
                }
            }
        }
        match &self.head {
            Head::None => {}
            Head::Cls(h) | Head::ClsMean(h) => linear(&mut add, h),
            Head::ClsDist(h, d) => {
                linear(&mut add, h);
                linear(&mut add, d);
            }
        }
        u
    }

    /// Refuses a model holding a tensor the forward pass would not read, other than those known
    /// to play no part in the features: the calibration would come from another network than
    /// the one the user has (registers or an attention-pooling head silently skipped).
    /// Known to be unused: DINOv2's `mask_token` (masked-image pre-training only), HF ViT's
    /// `pooler` (a tanh layer over the CLS token, not part of the features), other stored
    /// sizes of the position embedding (`<pos_embed>_<px>`), Swin's stored index and mask
    /// buffers, and the text tower of a whole CLIP or SigLIP model (`text_model.*`,
    /// `text_projection`, `logit_scale`, `logit_bias`: a network of its own beside the vision
    /// tower). With `allow` each is a warning.
    pub fn check_unused(&self, model: &Checkpoint, allow: bool) -> Result<()> {
        let used = self.used_tensors();
        let known = |n: &str| {
            n.ends_with("mask_token")
                || n.ends_with("position_ids")
                // Swin's buffers, computed from the window size (older exports saved them).
                || (self.family.is_swin()
                    && (n.ends_with("relative_position_index") || n.ends_with("attn_mask")))
                // The text tower and the logit scale of a whole CLIP or SigLIP model.
                || (matches!(self.family, Family::HfClip | Family::HfSiglip)
                    && (n.starts_with("text_model.")
                        || n.starts_with("text_projection.")
                        || n == "logit_scale"
                        || n == "logit_bias"))
                || n.split('.').any(|part| part == "pooler")
                || n.strip_prefix(self.pos_embed.as_str())
                    .is_some_and(|rest| rest.starts_with('_'))
        };
        let unused: Vec<&str> = model
            .tensors()
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| !used.contains(*n) && !known(n))
            .collect();
        let text = model
            .tensors()
            .iter()
            .filter(|t| t.name.starts_with("text_model."))
            .count();
        if text > 0 && matches!(self.family, Family::HfClip | Family::HfSiglip) {
            log::info!(
                "{}: a whole {} model: its text tower ({text} tensors) plays no part in the image \
                 features and is left as it is (the default --skip leaves its layers out)",
                model.path().display(),
                if self.family == Family::HfClip {
                    "CLIP"
                } else {
                    "SigLIP"
                }
            );
        }
        let Some(first) = unused.first() else {
            return Ok(());
        };
        if allow {
            for n in &unused {
                log::warn!(
                    "{}: tensor '{n}' is not used by the {} forward pass; calibration and \
                     evaluation go on without it (--allow-unused-tensors)",
                    model.path().display(),
                    self.family
                );
            }
            return Ok(());
        }
        Err(unknown(
            model.path(),
            format!(
                "looks like {} but tensor '{first}'{} is not used by its forward pass, so the \
                 Gram matrices and features would come from another network than this one; \
                 pass --allow-unused-tensors to go on without {}",
                self.family,
                match unused.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                },
                if unused.len() == 1 { "it" } else { "them" }
            ),
        ))
    }

    /// The layout of `model` from its tensors and the side files' contents.
    fn recognise(model: &Checkpoint, config: Value, prep: Option<Value>) -> Result<VitSpec> {
        let path = model.path();
        let shape = |n: &str| model.get(n).map(|t| t.shape.clone()).unwrap_or_default();
        let (family, p) = family_of(model)?;
        if family.is_swin() {
            return swin::recognise(model, family, &p, config, prep);
        }
        // A whole CLIP model's config keeps the vision tower's under `vision_config`.
        let config = match (family, config.get("vision_config")) {
            (Family::HfClip | Family::HfSiglip, Some(v)) => v.clone(),
            _ => config,
        };
        let blocks = block_names(model, family, &p);
        let depth = blocks.len();
        let (patch_embed, mut tokens, pos_embed, norm) = embeddings(model, family, &p)?;
        // A non-square input the side files declare: its patch grid tells the position
        // embedding's shape, which its token count alone does not.
        let declared = declared_input(&config, prep.as_ref()).filter(|(_, h, w)| h != w);
        let declared_grid = match (declared, shape(&patch_embed.0).get(2).copied()) {
            (Some((_, h, w)), Some(p)) if p > 0 => Some((h / p, w / p)),
            _ => None,
        };
        let norm_pre = norm_pre_of(model, family, &p);
        let fc_norm = (family.is_timm() && model.get("fc_norm.weight").is_some())
            .then(|| ("fc_norm.weight".to_string(), "fc_norm.bias".to_string()));
        if norm.is_none() && fc_norm.is_none() {
            return Err(unknown(
                path,
                "no final LayerNorm ('norm.weight' or 'fc_norm.weight')",
            ));
        }
        let mut named = vec![&patch_embed.0, &pos_embed];
        for (w, b) in [&norm, &fc_norm, &norm_pre].into_iter().flatten() {
            named.extend([w, b]);
        }
        check_present(model, family, &named, &tokens, &blocks)?;
        let act = activation_of(path, &config, family)?;
        let registers = match family {
            Family::HfDinov2 | Family::TimmVit | Family::TimmDeit => {
                let name = if family == Family::HfDinov2 {
                    format!("{p}embeddings.register_tokens")
                } else {
                    "reg_token".to_string()
                };
                let s = shape(&name);
                match s.as_slice() {
                    [] => 0,
                    [1, r, _] if *r > 0 => {
                        tokens.push(name);
                        *r
                    }
                    other => {
                        return Err(unknown(
                            path,
                            format!("'{name}' has shape {other:?}, expected [1, registers, dim]"),
                        ))
                    }
                }
            }
            _ => 0,
        };
        // The tokens before the patches, and those of them with a position embedding: HF DINOv2
        // embeds all but the registers; timm embeds all of them, or none (`no_embed_class`).
        let prefix_tokens = tokens.len() - (registers > 0) as usize + registers;
        let no_embed_class = config
            .get("model_args")
            .and_then(|a| a.get("no_embed_class"))
            .and_then(Value::as_bool);
        let pos_prefix = if family.is_timm() {
            match no_embed_class {
                // timm says: trust it over the shape (a 4x6 grid plus a class token is 5x5).
                Some(true) => 0,
                Some(false) => prefix_tokens,
                None => timm_pos_prefix(
                    model,
                    &patch_embed.0,
                    &pos_embed,
                    prefix_tokens,
                    declared_grid,
                ),
            }
        } else {
            prefix_tokens - registers
        };
        let (dim, channels, patch, (pos_grid, pos_grid_w)) =
            geometry(model, &patch_embed.0, &pos_embed, pos_prefix, declared_grid)?;
        // A non-square input runs on the position grid it was trained with, never on a square
        // grid of as many positions (a 4x6 grid plus a class token is a 5x5 grid without one).
        if let (Some((key, h, w)), Some(grid)) = (declared, declared_grid) {
            if (pos_grid, pos_grid_w) != grid {
                return Err(Error::InvalidOption(format!(
                    "{}: '{key}' is {h}x{w}, a non-square input, but the position embedding \
                     '{pos_embed}' holds a {pos_grid}x{pos_grid_w} grid, not {}x{} (from \
                     config.json / preprocessor_config.json beside the model)",
                    path.display(),
                    grid.0,
                    grid.1
                )));
            }
        }
        let mlp = linear_widths(model, &blocks, dim)?;
        let (heads, eps) = hyper_params(path, &config, family, dim)?;
        let mut blocks = blocks;
        for b in &mut blocks {
            b.geom = BlockGeom {
                dim,
                heads,
                mlp,
                ..BlockGeom::default()
            };
        }
        let (head, num_classes) = head_of(model, family, dim)?;
        let labels = label_names(&config, num_classes);
        let pool = pool_of(model, family, &p, &config, prefix_tokens)?;

        let preprocess = preprocess(
            family,
            channels,
            (pos_grid * patch, pos_grid_w * patch),
            &config,
            prep.as_ref(),
        )
        .and_then(|p| p.validate())
        .map_err(|reason| {
            Error::InvalidOption(format!(
                "{}: {reason} (from config.json / preprocessor_config.json beside the model)",
                path.display()
            ))
        })?;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return Err(Error::InvalidOption(format!(
                "{}: config.json 'layer_norm_eps' = {eps} is not in (0, 1)",
                path.display()
            )));
        }
        let crop_cells = (preprocess.crop / patch) * (preprocess.crop_w / patch);
        let pos_embed_resized = [
            format!("{pos_embed}_{}", preprocess.crop),
            format!("{pos_embed}_resized"),
        ]
        .into_iter()
        .find(|n| shape(n).iter().product::<usize>() == (pos_prefix + crop_cells) * dim);
        // The patch convolution drops the pixels past the last whole patch, as PyTorch's does
        // (SigLIP So400m/14 runs at 384 px: 27 patches of 14, 6 pixels dropped).
        if preprocess.crop.min(preprocess.crop_w) < patch {
            return Err(Error::InvalidOption(format!(
                "input size {}x{} is smaller than the patch size {patch}",
                preprocess.crop, preprocess.crop_w
            )));
        }
        log::info!(
            "{}: {family}, width {dim}, depth {depth}, {heads} heads, MLP {mlp}, patch {patch}, {} classes, input {}x{}",
            path.display(),
            num_classes,
            preprocess.crop,
            preprocess.crop_w
        );
        Ok(VitSpec {
            family,
            dim,
            depth,
            heads,
            mlp,
            patch,
            eps,
            prefix_tokens,
            registers,
            pos_prefix,
            pos_grid,
            pos_grid_w,
            patch_embed,
            tokens,
            pos_embed,
            pos_embed_resized,
            blocks,
            norm_pre,
            norm,
            fc_norm,
            act,
            pool,
            head,
            num_classes,
            labels,
            preprocess,
        })
    }

    /// One line on what the forward pass will compute: family, sizes, input, prefix tokens,
    /// pooling, activation and head (what `inspect` prints).
    pub fn summary(&self) -> String {
        if self.family.is_swin() {
            return swin::summary(self);
        }
        let pool = match &self.pool {
            Pool::Cls => "the class token".to_string(),
            Pool::Mean => "the mean of the patch tokens".to_string(),
            Pool::Map(h) => format!("the attention-pooling head '{h}'"),
        };
        let norms = match (&self.norm_pre, &self.norm, &self.fc_norm) {
            (pre, Some(_), _) => format!(
                "{}final norm",
                if pre.is_some() { "pre-norm, " } else { "" }
            ),
            (pre, None, _) => format!(
                "{}norm after pooling (fc_norm)",
                if pre.is_some() { "pre-norm, " } else { "" }
            ),
        };
        let head = match &self.head {
            Head::None => "no head".to_string(),
            Head::Cls(h) => format!("head '{h}' ({} outputs)", self.num_classes),
            Head::ClsDist(h, d) => format!("heads '{h}' and '{d}' ({} classes)", self.num_classes),
            Head::ClsMean(h) => format!(
                "head '{h}' on class token and patch mean ({} classes)",
                self.num_classes
            ),
        };
        let act = self.act.label();
        let qk = match self.blocks.iter().filter(|b| b.qk_norm.is_some()).count() {
            0 => "",
            n if n == self.blocks.len() => " with query/key norms",
            _ => " with query/key norms in some blocks",
        };
        format!(
            "{}: width {}, depth {}, {} heads{qk}, MLP {} ({act}), patch {}, input {} px; prefix \
             tokens {} ({} registers, {} with a position embedding); {norms}; pooled by {pool}; \
             {head}",
            self.family,
            self.dim,
            self.depth,
            self.heads,
            self.mlp,
            self.patch,
            if self.preprocess.crop == self.preprocess.crop_w {
                self.preprocess.crop.to_string()
            } else {
                format!("{}x{}", self.preprocess.crop, self.preprocess.crop_w)
            },
            self.prefix_tokens,
            self.registers,
            self.pos_prefix,
        )
    }

    /// Tokens per image at the preprocess crop (the input of the first block).
    pub fn tokens_per_image(&self) -> usize {
        let (gh, gw) = self.input_grid();
        self.prefix_tokens + gh * gw
    }

    /// The patch grid `(rows, columns)` at the preprocess crop (pixels past the last whole
    /// patch dropped).
    pub fn input_grid(&self) -> (usize, usize) {
        (
            self.preprocess.crop / self.patch,
            self.preprocess.crop_w / self.patch,
        )
    }

    /// Side of block `b`'s token grid at the preprocess crop (a Swin's, always square).
    pub fn grid_side(&self, b: usize) -> usize {
        (self.preprocess.crop / self.patch) >> self.blocks[b].geom.stage
    }

    /// Tokens per image at block `b`'s input (after its patch merging, if any).
    pub fn block_tokens(&self, b: usize) -> usize {
        let (gh, gw) = self.input_grid();
        let s = self.blocks[b].geom.stage;
        self.prefix_tokens + (gh >> s) * (gw >> s)
    }

    /// How far block `b`'s windows are shifted (Swin: half a window in every second block, none
    /// where one window covers the grid).
    pub fn block_shift(&self, b: usize) -> usize {
        let geom = &self.blocks[b].geom;
        if geom.shifted && self.grid_side(b) > geom.window {
            geom.window / 2
        } else {
            0
        }
    }

    /// Width of the final features (the last block's; a Swin's grows stage by stage).
    pub fn out_dim(&self) -> usize {
        self.blocks.last().map_or(self.dim, |b| b.geom.dim)
    }

    /// Tokens per image after the last block.
    pub fn out_tokens(&self) -> usize {
        match self.blocks.last() {
            Some(b) => self.block_tokens(b.index),
            None => self.tokens_per_image(),
        }
    }

    /// Block index and role of the linear layer whose weight prefix is `prefix`.
    pub fn locate(&self, prefix: &str) -> Option<(usize, Role)> {
        self.blocks.iter().find_map(|b| {
            b.linears()
                .into_iter()
                .find(|(_, n)| n == prefix)
                .map(|(r, _)| (b.index, r))
        })
    }

    /// Changes the input size (a multiple of the patch); the position embedding is interpolated.
    pub fn set_input(&mut self, resize: Option<usize>, crop: Option<usize>) -> Result<()> {
        if let Some(c) = crop {
            if c == 0 || !c.is_multiple_of(self.patch) || c > MAX_INPUT_SIDE {
                return Err(Error::InvalidOption(format!(
                    "--crop {c} must be a positive multiple of the patch size {} and at most \
                     {MAX_INPUT_SIDE}",
                    self.patch
                )));
            }
            let ratio = self.preprocess.resize as f64 / self.preprocess.crop as f64;
            self.preprocess.crop = c;
            self.preprocess.crop_w = c;
            self.preprocess.resize = (c as f64 * ratio).round() as usize;
            self.pos_embed_resized = None;
            if self.family.is_swin() {
                swin::check_grids(self).map_err(|e| {
                    Error::InvalidOption(format!("--crop {c} does not fit this Swin model: {e}"))
                })?;
            }
        }
        if let Some(r) = resize {
            if r > MAX_INPUT_SIDE {
                return Err(Error::InvalidOption(format!(
                    "--resize {r} is over the limit of {MAX_INPUT_SIDE} pixels"
                )));
            }
            if r < self.preprocess.crop {
                return Err(Error::InvalidOption(format!(
                    "--resize {r} is smaller than the crop {}",
                    self.preprocess.crop
                )));
            }
            self.preprocess.resize = r;
        }
        Ok(())
    }
}

/// The family of `model` and the prefix its tensors carry (`vit.`, `dinov2.`…).
fn family_of(model: &Checkpoint) -> Result<(Family, String)> {
    let path = model.path();
    let has = |n: &str| model.get(n).is_some();
    if let Some(found) = swin::family_of(model) {
        return Ok(found);
    }
    let (family, p) = if has("blocks.0.attn.qkv.weight") || has("blocks.0.attn.proj.weight") {
        let deit = has("dist_token");
        (
            if deit {
                Family::TimmDeit
            } else {
                Family::TimmVit
            },
            String::new(),
        )
    } else if let Some(p) = ["vision_model.", ""]
        .into_iter()
        .find(|p| has(&format!("{p}encoder.layers.0.self_attn.q_proj.weight")))
    {
        if has(&format!("{p}embeddings.class_embedding")) {
            (Family::HfClip, p.to_string())
        } else {
            (Family::HfSiglip, p.to_string())
        }
    } else {
        let mut found = None;
        for p in ["", "vit.", "deit.", "dinov2.", "dinov2_with_registers."] {
            if has(&format!(
                "{p}encoder.layer.0.attention.attention.query.weight"
            )) {
                found = Some(p.to_string());
                break;
            }
        }
        let Some(p) = found else {
            return Err(unknown(
                path,
                "no ViT or Swin block found (looked for 'blocks.0.attn.qkv.weight', '[vit.|deit.|dinov2.|dinov2_with_registers.]encoder.layer.0.attention.attention.query.weight', '[vision_model.]encoder.layers.0.self_attn.q_proj.weight', 'layers.0.blocks.0.attn.qkv.weight' and '[swin.]encoder.layers.0.blocks.0.attention.self.query.weight')",
            ));
        };
        let family = if has(&format!("{p}encoder.layer.0.layer_scale1.lambda1"))
            || has(&format!("{p}encoder.layer.0.norm1.weight"))
        {
            Family::HfDinov2
        } else if has(&format!("{p}embeddings.distillation_token")) {
            Family::HfDeit
        } else {
            Family::HfVit
        };
        (family, p)
    };
    Ok((family, p))
}

/// The LayerNorm before the first block: CLIP's `pre_layrnorm`, timm's `norm_pre` (which every
/// timm CLIP model has).
fn norm_pre_of(model: &Checkpoint, family: Family, p: &str) -> Option<(String, String)> {
    let name = match family {
        Family::HfClip => format!("{p}pre_layrnorm"),
        Family::TimmVit | Family::TimmDeit => "norm_pre".to_string(),
        _ => return None,
    };
    (family == Family::HfClip || model.get(&format!("{name}.weight")).is_some())
        .then(|| (format!("{name}.weight"), format!("{name}.bias")))
}

/// The MLP activation: `hidden_act` (HF) or `model_args.act_layer` (timm) in `config.json`, else
/// the family's (QuickGELU for CLIP, exact GELU for the others); a name it does not know is an
/// error naming it.
fn activation_of(path: &Path, config: &Value, family: Family) -> Result<Activation> {
    let named = config
        .get("hidden_act")
        .or_else(|| config.get("model_args").and_then(|a| a.get("act_layer")));
    // timm's pretrained CLIP and SigLIP towers name their activation in the architecture only.
    let arch = config
        .get("architecture")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match named {
        None | Some(Value::Null) => Ok(match family {
            Family::HfClip => Activation::QuickGelu,
            Family::HfSiglip => Activation::GeluTanh,
            _ if arch.contains("quickgelu") => Activation::QuickGelu,
            _ if arch.contains("siglip") => Activation::GeluTanh,
            _ => Activation::Gelu,
        }),
        Some(Value::String(s)) => match s.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_tanh" => Ok(Activation::GeluTanh),
            other => Err(unknown(
                path,
                format!(
                    "config.json names the activation '{other}'; the forward pass knows gelu, \
                     quick_gelu and gelu_pytorch_tanh"
                ),
            )),
        },
        Some(other) => Err(unknown(
            path,
            format!("config.json's activation is {other}, not a name"),
        )),
    }
}

/// The tensor names of every block, from block 0 until one is missing.
fn block_names(model: &Checkpoint, family: Family, p: &str) -> Vec<BlockNames> {
    let has = |n: &str| model.get(n).is_some();
    let timm = matches!(family, Family::TimmVit | Family::TimmDeit);
    let mut blocks = Vec::new();
    loop {
        let i = blocks.len();
        let b = if matches!(family, Family::HfClip | Family::HfSiglip) {
            let b = format!("{p}encoder.layers.{i}.");
            if !has(&format!("{b}self_attn.out_proj.weight")) {
                break;
            }
            let a = format!("{b}self_attn.");
            BlockNames {
                index: i,
                norm1: (
                    format!("{b}layer_norm1.weight"),
                    format!("{b}layer_norm1.bias"),
                ),
                qkv: vec![
                    (Role::Query, format!("{a}q_proj")),
                    (Role::Key, format!("{a}k_proj")),
                    (Role::Value, format!("{a}v_proj")),
                ],
                proj: format!("{a}out_proj"),
                norm2: (
                    format!("{b}layer_norm2.weight"),
                    format!("{b}layer_norm2.bias"),
                ),
                fc1: format!("{b}mlp.fc1"),
                fc2: format!("{b}mlp.fc2"),
                ls: None,
                qk_norm: None,
                geom: BlockGeom::default(),
                rel_bias: None,
                merge: None,
            }
        } else if timm {
            let b = format!("blocks.{i}.");
            if !has(&format!("{b}attn.proj.weight")) {
                break;
            }
            BlockNames {
                index: i,
                norm1: (format!("{b}norm1.weight"), format!("{b}norm1.bias")),
                qkv: vec![(Role::Qkv, format!("{b}attn.qkv"))],
                proj: format!("{b}attn.proj"),
                norm2: (format!("{b}norm2.weight"), format!("{b}norm2.bias")),
                fc1: format!("{b}mlp.fc1"),
                fc2: format!("{b}mlp.fc2"),
                ls: has(&format!("{b}ls1.gamma"))
                    .then(|| (format!("{b}ls1.gamma"), format!("{b}ls2.gamma"))),
                // Both norms or neither: a lone one stays unused, and so refused.
                geom: BlockGeom::default(),
                rel_bias: None,
                merge: None,
                qk_norm: (has(&format!("{b}attn.q_norm.weight"))
                    && has(&format!("{b}attn.k_norm.weight")))
                .then(|| {
                    [
                        "q_norm.weight",
                        "q_norm.bias",
                        "k_norm.weight",
                        "k_norm.bias",
                    ]
                    .map(|n| format!("{b}attn.{n}"))
                }),
            }
        } else {
            let b = format!("{p}encoder.layer.{i}.");
            if !has(&format!("{b}attention.output.dense.weight")) {
                break;
            }
            let a = format!("{b}attention.attention.");
            let dino = family == Family::HfDinov2;
            BlockNames {
                index: i,
                norm1: if dino {
                    (format!("{b}norm1.weight"), format!("{b}norm1.bias"))
                } else {
                    (
                        format!("{b}layernorm_before.weight"),
                        format!("{b}layernorm_before.bias"),
                    )
                },
                qkv: vec![
                    (Role::Query, format!("{a}query")),
                    (Role::Key, format!("{a}key")),
                    (Role::Value, format!("{a}value")),
                ],
                proj: format!("{b}attention.output.dense"),
                norm2: if dino {
                    (format!("{b}norm2.weight"), format!("{b}norm2.bias"))
                } else {
                    (
                        format!("{b}layernorm_after.weight"),
                        format!("{b}layernorm_after.bias"),
                    )
                },
                fc1: if dino {
                    format!("{b}mlp.fc1")
                } else {
                    format!("{b}intermediate.dense")
                },
                fc2: if dino {
                    format!("{b}mlp.fc2")
                } else {
                    format!("{b}output.dense")
                },
                ls: (dino && has(&format!("{b}layer_scale1.lambda1"))).then(|| {
                    (
                        format!("{b}layer_scale1.lambda1"),
                        format!("{b}layer_scale2.lambda1"),
                    )
                }),
                qk_norm: None,
                geom: BlockGeom::default(),
                rel_bias: None,
                merge: None,
            }
        };
        blocks.push(b);
    }
    blocks
}

/// The patch embedding (weight, bias), the prefix tokens, the position embedding and the final
/// LayerNorm (weight, bias) of `family`.
#[allow(clippy::type_complexity)]
fn embeddings(
    model: &Checkpoint,
    family: Family,
    p: &str,
) -> Result<(
    (String, String),
    Vec<String>,
    String,
    Option<(String, String)>,
)> {
    let has = |n: &str| model.get(n).is_some();
    let timm = matches!(family, Family::TimmVit | Family::TimmDeit);
    Ok(if matches!(family, Family::HfClip | Family::HfSiglip) {
        let e = format!("{p}embeddings.");
        (
            (
                format!("{e}patch_embedding.weight"),
                format!("{e}patch_embedding.bias"),
            ),
            match family {
                Family::HfClip => vec![format!("{e}class_embedding")],
                _ => Vec::new(),
            },
            format!("{e}position_embedding.weight"),
            Some((
                format!("{p}post_layernorm.weight"),
                format!("{p}post_layernorm.bias"),
            )),
        )
    } else if timm {
        // timm: the class token unless `class_token=False`, DeiT's distillation token, then the
        // register tokens (added below); the final norm unless the pooled features get fc_norm.
        let mut tokens = Vec::new();
        if has("cls_token") {
            tokens.push("cls_token".to_string());
        }
        if family == Family::TimmDeit {
            tokens.push("dist_token".into());
        }
        let norm = has("norm.weight").then(|| ("norm.weight".to_string(), "norm.bias".to_string()));
        (
            (
                "patch_embed.proj.weight".to_string(),
                "patch_embed.proj.bias".to_string(),
            ),
            tokens,
            "pos_embed".to_string(),
            norm,
        )
    } else {
        let e = format!("{p}embeddings.");
        let mut tokens = vec![format!("{e}cls_token")];
        if family == Family::HfDeit {
            tokens.push(format!("{e}distillation_token"));
        }
        (
            (
                format!("{e}patch_embeddings.projection.weight"),
                format!("{e}patch_embeddings.projection.bias"),
            ),
            tokens,
            format!("{e}position_embeddings"),
            Some((format!("{p}layernorm.weight"), format!("{p}layernorm.bias"))),
        )
    })
}

/// How many of timm's `prefix` tokens the position embedding covers: all of them, or none
/// (`no_embed_class`), whichever leaves a square grid (all, when both do).
fn timm_pos_prefix(
    model: &Checkpoint,
    patch_embed: &str,
    pos_embed: &str,
    prefix: usize,
    declared: Option<(usize, usize)>,
) -> usize {
    let dim = model
        .get(patch_embed)
        .and_then(|t| t.shape.first().copied())
        .unwrap_or(1)
        .max(1);
    let rows = model
        .get(pos_embed)
        .map(|t| t.shape.iter().product::<usize>() / dim)
        .unwrap_or(0);
    // A grid of the declared non-square shape, else a square one.
    let square = |n: usize| {
        if let Some((gh, gw)) = declared {
            return n == gh * gw;
        }
        let g = (n as f64).sqrt().round() as usize;
        g > 0 && g * g == n
    };
    if rows >= prefix && square(rows - prefix) {
        prefix
    } else if square(rows) {
        0
    } else {
        prefix
    }
}

/// How the features are pooled: SigLIP's attention-pooling head where the model has one (HF
/// `head.probe`, timm `attn_pool.latent`); timm's `global_pool` from `config.json`, else the
/// mean of the patches for a timm model with `fc_norm` or without class token; the class token
/// otherwise (HF SigLIP without head: the mean).
fn pool_of(
    model: &Checkpoint,
    family: Family,
    p: &str,
    config: &Value,
    prefix_tokens: usize,
) -> Result<Pool> {
    let path = model.path();
    let has = |n: &str| model.get(n).is_some();
    if family == Family::HfSiglip {
        return Ok(if has(&format!("{p}head.probe")) {
            Pool::Map(format!("{p}head"))
        } else {
            Pool::Mean
        });
    }
    if !family.is_timm() {
        return Ok(Pool::Cls);
    }
    if let Some(s) = model.get("attn_pool.latent").map(|t| t.shape.clone()) {
        if s.len() != 3 || s[0] != 1 || s[1] != 1 {
            return Err(unknown(
                path,
                format!("'attn_pool.latent' has shape {s:?}; only one latent query ([1, 1, dim]) is supported"),
            ));
        }
        for part in ["q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2"] {
            let n = format!("attn_pool.{part}.weight");
            if !has(&n) {
                return Err(unknown(
                    path,
                    format!("an attention-pooling head ('attn_pool.latent') without '{n}'"),
                ));
            }
        }
        return Ok(Pool::Map("attn_pool".to_string()));
    }
    let named = config
        .get("global_pool")
        .or_else(|| config.get("model_args").and_then(|a| a.get("global_pool")))
        .and_then(Value::as_str);
    let pool = match named {
        Some("avg") => Pool::Mean,
        Some("token") => Pool::Cls,
        Some(other) => {
            return Err(unknown(
                path,
                format!("config.json asks for global_pool '{other}'; the forward pass knows 'token', 'avg' and 'map' (with attn_pool)"),
            ))
        }
        None if has("fc_norm.weight") || !has("cls_token") => Pool::Mean,
        None => Pool::Cls,
    };
    if pool == Pool::Cls && !has("cls_token") {
        return Err(unknown(path, "class-token pooling but no 'cls_token'"));
    }
    log::debug!(
        "{}: {prefix_tokens} prefix tokens, pooled by {pool:?}",
        path.display()
    );
    Ok(pool)
}

/// Refuses a model of `family` that lacks one of the tensors the forward pass reads.
fn check_present(
    model: &Checkpoint,
    family: Family,
    named: &[&String],
    tokens: &[String],
    blocks: &[BlockNames],
) -> Result<()> {
    let path = model.path();
    let has = |n: &str| model.get(n).is_some();
    let mut required: Vec<String> = named.iter().map(|n| n.to_string()).collect();
    required.extend(tokens.iter().cloned());
    for b in blocks {
        for n in [&b.norm1.0, &b.norm1.1, &b.norm2.0, &b.norm2.1] {
            required.push(n.clone());
        }
        for (_, l) in b.linears() {
            required.push(format!("{l}.weight"));
        }
        if let Some((a, c)) = &b.ls {
            required.push(a.clone());
            required.push(c.clone());
        }
        // Swin: the bias table and the merging's LayerNorm.
        required.extend(b.rel_bias.clone());
        if let Some((w, c, _)) = &b.merge {
            required.extend([w.clone(), c.clone()]);
        }
    }
    if let Some(m) = required.iter().find(|n| !has(n)) {
        return Err(unknown(
            path,
            format!("looks like {family} but has no tensor '{m}'"),
        ));
    }
    Ok(())
}

/// Width, channels and patch size from the patch embedding, and the side of the position
/// embedding's grid (with `prefix_tokens` tokens before it).
fn geometry(
    model: &Checkpoint,
    patch_embed: &str,
    pos_embed: &str,
    prefix_tokens: usize,
    declared: Option<(usize, usize)>,
) -> Result<(usize, usize, usize, (usize, usize))> {
    let path = model.path();
    let shape = |n: &str| model.get(n).map(|t| t.shape.clone()).unwrap_or_default();
    let pe = shape(patch_embed);
    if pe.len() != 4 || pe[2] != pe[3] {
        return Err(unknown(
            path,
            format!(
                "patch embedding '{}' has shape {pe:?}, expected [dim, channels, p, p]",
                patch_embed
            ),
        ));
    }
    let (dim, channels, patch) = (pe[0], pe[1], pe[2]);
    let pos = shape(pos_embed);
    let grid_tokens = pos.iter().product::<usize>() / dim.max(1);
    let grid_sq = grid_tokens.saturating_sub(prefix_tokens);
    // The grid the side files declare (a non-square input), else a square one.
    let (gh, gw) = match declared {
        Some((h, w)) if h * w == grid_sq => (h, w),
        _ => {
            let g = (grid_sq as f64).sqrt().round() as usize;
            (g, g)
        }
    };
    if pos.last() != Some(&dim) || gh * gw != grid_sq || gh == 0 || gw == 0 {
        return Err(unknown(
            path,
            format!(
                "position embedding '{pos_embed}' has shape {pos:?}; expected [1, {prefix_tokens} + g², {dim}]{}",
                match declared {
                    Some((h, w)) => format!(" or [1, {prefix_tokens} + {h}·{w}, {dim}] for the declared input"),
                    None => String::new(),
                }
            ),
        ));
    }
    Ok((dim, channels, patch, (gh, gw)))
}

/// Refuses a block linear whose shape does not fit width `dim`; returns the MLP width.
fn linear_widths(model: &Checkpoint, blocks: &[BlockNames], dim: usize) -> Result<usize> {
    let path = model.path();
    let w = |n: &str| {
        model
            .get(&format!("{n}.weight"))
            .map(|t| t.shape.clone())
            .unwrap_or_default()
    };
    let mlp = w(&blocks[0].fc1)[0];
    for b in blocks {
        for (role, l) in b.linears() {
            let s = w(&l);
            let want = match role {
                // A ViT has no patch merging.
                Role::Reduction => [0, 0],
                Role::Qkv => [3 * dim, dim],
                Role::Query | Role::Key | Role::Value | Role::Proj => [dim, dim],
                Role::Fc1 => [mlp, dim],
                Role::Fc2 => [dim, mlp],
            };
            if s != want {
                return Err(unknown(
                    path,
                    format!("'{l}.weight' has shape {s:?}, expected {want:?} for width {dim}"),
                ));
            }
        }
    }
    Ok(mlp)
}

/// The classifier head of `family` and its number of classes (0 without one).
fn head_of(model: &Checkpoint, family: Family, dim: usize) -> Result<(Head, usize)> {
    let path = model.path();
    let has = |n: &str| model.get(n).is_some();
    let w = |n: &str| {
        model
            .get(&format!("{n}.weight"))
            .map(|t| t.shape.clone())
            .unwrap_or_default()
    };
    let timm = matches!(family, Family::TimmVit | Family::TimmDeit);
    let head_name = |n: &str| has(&format!("{n}.weight")).then(|| n.to_string());
    let head = if family == Family::HfClip {
        // The projection into the joint image-text space: its output are the features.
        match head_name("visual_projection") {
            Some(h) => Head::Cls(h),
            None => Head::None,
        }
    } else if timm {
        match (head_name("head"), head_name("head_dist")) {
            (Some(h), Some(d)) => Head::ClsDist(h, d),
            (Some(h), None) => Head::Cls(h),
            _ => Head::None,
        }
    } else if family == Family::HfDeit {
        match (
            head_name("cls_classifier"),
            head_name("distillation_classifier"),
            head_name("classifier"),
        ) {
            (Some(h), Some(d), _) => Head::ClsDist(h, d),
            (_, _, Some(h)) => Head::Cls(h),
            _ => Head::None,
        }
    } else {
        match head_name("classifier") {
            Some(h) if w(&h).get(1) == Some(&(2 * dim)) => Head::ClsMean(h),
            Some(h) => Head::Cls(h),
            None => Head::None,
        }
    };
    let num_classes = match &head {
        Head::None => 0,
        Head::Cls(h) | Head::ClsDist(h, _) | Head::ClsMean(h) => w(h)[0],
    };
    let want_in = if matches!(head, Head::ClsMean(_)) {
        2 * dim
    } else {
        dim
    };
    if let Head::Cls(h) | Head::ClsDist(h, _) | Head::ClsMean(h) = &head {
        if w(h).get(1) != Some(&want_in) {
            return Err(unknown(
                path,
                format!("classifier '{h}.weight' has shape {:?}", w(h)),
            ));
        }
    }
    Ok((head, num_classes))
}

/// The head count and the LayerNorm epsilon, from `config.json` when present, else the family's
/// conventions; a head count that cannot be inferred safely is an error naming the key.
fn hyper_params(path: &Path, config: &Value, family: Family, dim: usize) -> Result<(usize, f32)> {
    // Hyper-parameters from config.json when present, else the family's conventions.
    let args = config.get("model_args").unwrap_or(config);
    let heads = num(args, "num_heads")
        .or_else(|| num(config, "num_heads"))
        .or_else(|| num(config, "num_attention_heads"))
        .map(|h| h as usize)
        .map(Ok)
        .unwrap_or_else(|| {
            // The widths of the published ViTs, else heads of 64 channels (the convention of
            // every ViT family); a width that is no multiple of 64 gives no safe guess.
            let h = match dim {
                192 => 3,
                384 => 6,
                768 => 12,
                1024 | 1280 | 1408 | 1664 => 16,
                1536 => 24,
                d if d.is_multiple_of(64) => d / 64,
                _ => {
                    return Err(unknown(
                        path,
                        format!(
                            "no config.json gives the number of attention heads \
                             ('num_heads' or 'num_attention_heads') and width {dim} is no \
                             multiple of 64: add the key to config.json beside the model"
                        ),
                    ))
                }
            };
            log::warn!(
                "{}: no config.json gives the number of attention heads; assuming {h} for width {dim}",
                path.display()
            );
            Ok(h)
        })?;
    if heads == 0 || !dim.is_multiple_of(heads) {
        return Err(unknown(
            path,
            format!("{heads} attention heads do not divide width {dim}"),
        ));
    }
    let eps = num(config, "layer_norm_eps").map(|e| e as f32).unwrap_or(
        if matches!(family, Family::HfVit | Family::HfDeit) {
            1e-12
        } else if matches!(family, Family::HfClip | Family::HfSiglip) {
            1e-5
        } else {
            1e-6
        },
    );
    Ok((heads, eps))
}

fn label_names(config: &Value, classes: usize) -> Vec<String> {
    if let Some(a) = config.get("label_names").and_then(Value::as_array) {
        let v: Vec<String> = a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect();
        if v.len() == classes {
            return v;
        }
    }
    if let Some(m) = config.get("id2label").and_then(Value::as_object) {
        let mut v = vec![String::new(); classes];
        for (k, name) in m {
            if let (Ok(i), Some(s)) = (k.parse::<usize>(), name.as_str()) {
                if i < classes {
                    v[i] = s.to_string();
                }
            }
        }
        if v.iter().all(|s| !s.is_empty()) {
            return v;
        }
    }
    Vec::new()
}

/// Largest input side a side file may ask for (a crop of 0 or a `crop_pct` of 0 would
/// otherwise ask for nothing or for an unbounded resize).
pub const MAX_INPUT_SIDE: usize = 4096;

impl Preprocess {
    /// Checks values read from side files: sides in `1..=MAX_INPUT_SIDE` with the resize at
    /// least the crop, one finite mean and one finite, positive std per channel.
    fn validate(self) -> std::result::Result<Preprocess, String> {
        for side in [self.crop, self.crop_w] {
            if side == 0 || side > MAX_INPUT_SIDE {
                return Err(format!(
                    "input size (crop) {}x{} is not in 1..={MAX_INPUT_SIDE} on each side",
                    self.crop, self.crop_w
                ));
            }
        }
        if self.resize < self.crop || self.resize > MAX_INPUT_SIDE {
            return Err(format!(
                "resize {} is not in {}..={MAX_INPUT_SIDE} (crop {}; check crop_pct or size)",
                self.resize, self.crop, self.crop
            ));
        }
        if self.mean.len() != self.channels || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(format!(
                "mean {:?} is not {} finite values",
                self.mean, self.channels
            ));
        }
        if self.std.len() != self.channels || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(format!(
                "std {:?} is not {} finite positive values",
                self.std, self.channels
            ));
        }
        Ok(self)
    }
}

/// The input size `(height, width)` the side files declare, the first found of timm's
/// `img_size` / `input_size`, HF's `image_size` and the image processor's `size` / `crop_size`
/// (a `[h, w]` list, timm's `[channels, h, w]`, or `{height, width}`; a plain number is square).
fn declared_input(config: &Value, prep: Option<&Value>) -> Option<(&'static str, usize, usize)> {
    let pair = |v: Option<&Value>| -> Option<(usize, usize)> {
        let v = v?;
        if let Some(a) = v.as_array() {
            let n: Vec<u64> = a.iter().filter_map(Value::as_u64).collect();
            return match n.as_slice() {
                [h, w] | [_, h, w] => Some((*h as usize, *w as usize)),
                _ => None,
            };
        }
        let h = v.get("height").and_then(Value::as_u64)?;
        let w = v.get("width").and_then(Value::as_u64)?;
        Some((h as usize, w as usize))
    };
    let cfg = |k: &str| config.get(k);
    [
        (
            "model_args.img_size",
            cfg("model_args").and_then(|a| a.get("img_size")),
        ),
        (
            "pretrained_cfg.input_size",
            cfg("pretrained_cfg").and_then(|a| a.get("input_size")),
        ),
        ("image_size", cfg("image_size")),
        ("crop_size", prep.and_then(|p| p.get("crop_size"))),
        ("size", prep.and_then(|p| p.get("size"))),
    ]
    .into_iter()
    .find_map(|(k, v)| pair(v).map(|(h, w)| (k, h, w)))
}

/// Refuses a non-square input (a Swin's windows are laid over a square grid here), naming the
/// side file's key.
fn square_input(config: &Value, prep: Option<&Value>) -> std::result::Result<(), String> {
    match declared_input(config, prep) {
        Some((key, h, w)) if h != w => Err(format!(
            "'{key}' is {h}x{w}: non-square inputs are supported for ViTs, not yet for Swin"
        )),
        _ => Ok(()),
    }
}

fn preprocess(
    family: Family,
    channels: usize,
    (native, native_w): (usize, usize),
    config: &Value,
    prep: Option<&Value>,
) -> std::result::Result<Preprocess, String> {
    // One value per channel, or one for all; an empty list or another length is an error.
    let fill = |key: &str, v: Vec<f32>| -> std::result::Result<Vec<f32>, String> {
        match v.len() {
            n if n == channels => Ok(v),
            1 => Ok(vec![v[0]; channels]),
            n => Err(format!("'{key}' has {n} values for {channels} channels")),
        }
    };
    let (def_mean, def_std): (Vec<f32>, Vec<f32>) = match family {
        Family::HfVit | Family::TimmVit => (vec![0.5; 3], vec![0.5; 3]),
        Family::HfClip => (CLIP_MEAN.to_vec(), CLIP_STD.to_vec()),
        Family::HfSiglip => (vec![0.5; 3], vec![0.5; 3]),
        _ => (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec()),
    };
    // DINOv2 checkpoints store the 518-px position grid but are run at 224.
    let (native, native_w) = if family == Family::HfDinov2 && (native, native_w) == (518, 518) {
        (224, 224)
    } else {
        (native, native_w)
    };
    let mut p = Preprocess {
        channels,
        resize: match family {
            Family::HfVit | Family::HfClip | Family::HfSiglip => native,
            Family::HfDinov2 => native * 8 / 7,
            _ => (native as f64 / 0.875).floor() as usize,
        },
        crop: native,
        crop_w: native_w,
        squash: false,
        bicubic: !matches!(family, Family::HfVit),
        mean: if def_mean.len() == channels {
            def_mean
        } else {
            vec![def_mean[0]; channels]
        },
        std: if def_std.len() == channels {
            def_std
        } else {
            vec![def_std[0]; channels]
        },
    };
    if let Some(cfg) = config.get("pretrained_cfg") {
        // timm hub config.
        if let Some(s) = cfg.get("input_size").and_then(Value::as_array) {
            if let Some(h) = s.get(1).and_then(Value::as_u64) {
                p.crop = h as usize;
                p.crop_w = s.get(2).and_then(Value::as_u64).unwrap_or(h) as usize;
            }
        }
        let pct = num(cfg, "crop_pct").unwrap_or(0.875);
        if !(pct > 0.05 && pct <= 2.0) {
            return Err(format!("'crop_pct' = {pct} is not in (0.05, 2]"));
        }
        p.resize = (p.crop as f64 / pct).floor() as usize;
        if let Some(i) = cfg.get("interpolation").and_then(Value::as_str) {
            p.bicubic = i == "bicubic";
        }
        if let Some(m) = floats(cfg.get("mean")) {
            p.mean = fill("mean", m)?;
        }
        if let Some(s) = floats(cfg.get("std")) {
            p.std = fill("std", s)?;
        }
    }
    if let Some(pc) = prep {
        // HF image-processor config.
        let crop = pc
            .get("crop_size")
            .and_then(|c| c.get("height").or(Some(c)))
            .and_then(Value::as_u64);
        let crop_w = pc
            .get("crop_size")
            .and_then(|c| c.get("width").or(Some(c)))
            .and_then(Value::as_u64);
        let size = pc.get("size");
        // An older config's plain number: the shortest edge for CLIP's and BiT's processors
        // (`default_to_square=False`), the whole square for the others (ViT's, which Swin and
        // DeiT use too).
        let processor = ["image_processor_type", "feature_extractor_type"]
            .iter()
            .find_map(|k| pc.get(*k).and_then(Value::as_str))
            .unwrap_or_default();
        let plain = size.and_then(Value::as_u64);
        let to_edge = processor.starts_with("CLIP") || processor.starts_with("Bit");
        let shortest = size
            .and_then(|s| s.get("shortest_edge"))
            .and_then(Value::as_u64)
            .or(plain.filter(|_| to_edge));
        let height = size
            .and_then(|s| s.get("height"))
            .and_then(Value::as_u64)
            .or(plain.filter(|_| !to_edge));
        let width = size
            .and_then(|s| s.get("width"))
            .and_then(Value::as_u64)
            .or(height);
        let do_crop = pc
            .get("do_center_crop")
            .and_then(Value::as_bool)
            .unwrap_or(crop.is_some());
        match (shortest.or(height), do_crop, crop) {
            (Some(r), true, Some(c)) => {
                p.resize = r as usize;
                p.crop = c as usize;
                p.crop_w = crop_w.unwrap_or(c) as usize;
            }
            (Some(r), _, _) => {
                p.resize = r as usize;
                p.crop = r as usize;
                // `{height, width}` without a crop: HF resizes to exactly that.
                p.squash = shortest.is_none();
                p.crop_w = if p.squash {
                    width.unwrap_or(r) as usize
                } else {
                    r as usize
                };
            }
            _ => {}
        }
        if let Some(r) = pc.get("resample").and_then(Value::as_u64) {
            p.bicubic = r == 3;
        }
        if let Some(m) = floats(pc.get("image_mean")) {
            p.mean = fill("image_mean", m)?;
        }
        if let Some(s) = floats(pc.get("image_std")) {
            p.std = fill("image_std", s)?;
        }
    }
    Ok(p)
}
