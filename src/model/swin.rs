//! Swin Transformers: timm `SwinTransformer` and HF transformers `SwinModel` /
//! `SwinForImageClassification`.
//!
//! A Swin is a stack of stages. Each block is the ViT's pre-norm block with its attention
//! restricted to windows of `w × w` tokens, with a learned bias per head for each relative
//! position inside a window; every second block shifts the windows by half a window (a cyclic
//! roll of the grid, with the pairs the roll brought together from opposite borders masked out).
//! Between stages a patch merging concatenates each 2×2 group of tokens (`4C` wide), normalises it
//! and reduces it to `2C` with a linear layer, which COMQ quantizes like the others. The features
//! are the mean of the last stage's tokens after the final LayerNorm.
//!
//! Everything is recognised from the tensors: widths from the LayerNorms, heads and window from
//! the bias tables, the MLP from `fc1`. The forward pass ([`super::forward`]) expresses windows,
//! shifts and merging as row gathers ([`window_order`], [`merge_order`]) around the primitives a
//! ViT uses, plus an additive bias in the attention ([`attention_bias`]).

use serde_json::Value;

use super::{
    activation_of, check_present, label_names, num, preprocess, square_input, unknown, BlockGeom,
    BlockNames, Family, Head, Pool, Role, VitSpec,
};
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;

/// The value added to the attention logits of token pairs a shifted window brought together
/// from opposite borders (timm's and transformers' choice; `exp(-100)` is 0 in f32).
pub const SHIFT_MASK: f32 = -100.0;

/// The largest window side the forward pass takes (published Swins use 7 to 24).
pub const MAX_WINDOW: usize = 64;

/// The largest expanded attention bias of one block (`[groups, heads, w², w²]` f32).
pub const MAX_BIAS_BYTES: u64 = 1 << 30;

/// The Swin family of `model` and its tensors' prefix, when it is one.
pub(super) fn family_of(model: &Checkpoint) -> Option<(Family, String)> {
    let has = |n: &str| model.get(n).is_some();
    if has("layers.0.blocks.0.attn.qkv.weight") {
        return Some((Family::TimmSwin, String::new()));
    }
    ["swin.", ""]
        .into_iter()
        .find(|p| {
            has(&format!(
                "{p}encoder.layers.0.blocks.0.attention.self.query.weight"
            ))
        })
        .map(|p| (Family::HfSwin, p.to_string()))
}

/// The names of block `j` of stage `stage` (block `index` overall).
fn block(family: Family, p: &str, stage: usize, j: usize, index: usize) -> BlockNames {
    let ln = |n: String| (format!("{n}.weight"), format!("{n}.bias"));
    if family == Family::TimmSwin {
        let b = format!("layers.{stage}.blocks.{j}.");
        BlockNames {
            index,
            norm1: ln(format!("{b}norm1")),
            qkv: vec![(Role::Qkv, format!("{b}attn.qkv"))],
            proj: format!("{b}attn.proj"),
            norm2: ln(format!("{b}norm2")),
            fc1: format!("{b}mlp.fc1"),
            fc2: format!("{b}mlp.fc2"),
            ls: None,
            qk_norm: None,
            geom: BlockGeom::default(),
            rel_bias: Some(format!("{b}attn.relative_position_bias_table")),
            merge: None,
        }
    } else {
        let b = format!("{p}encoder.layers.{stage}.blocks.{j}.");
        let a = format!("{b}attention.self.");
        BlockNames {
            index,
            norm1: ln(format!("{b}layernorm_before")),
            qkv: vec![
                (Role::Query, format!("{a}query")),
                (Role::Key, format!("{a}key")),
                (Role::Value, format!("{a}value")),
            ],
            proj: format!("{b}attention.output.dense"),
            norm2: ln(format!("{b}layernorm_after")),
            fc1: format!("{b}intermediate.dense"),
            fc2: format!("{b}output.dense"),
            ls: None,
            qk_norm: None,
            geom: BlockGeom::default(),
            rel_bias: Some(format!("{a}relative_position_bias_table")),
            merge: None,
        }
    }
}

/// The patch merging that starts stage `stage` (> 0): timm keeps it at the start of the stage,
/// transformers (and timm before 0.9, `end_merge`) at the end of the one before.
fn merge(family: Family, p: &str, stage: usize, end_merge: bool) -> (String, String, String) {
    let m = if family == Family::TimmSwin && !end_merge {
        format!("layers.{stage}.downsample")
    } else if family == Family::TimmSwin {
        format!("layers.{}.downsample", stage - 1)
    } else {
        format!("{p}encoder.layers.{}.downsample", stage - 1)
    };
    (
        format!("{m}.norm.weight"),
        format!("{m}.norm.bias"),
        format!("{m}.reduction"),
    )
}

/// The layout of a Swin checkpoint: its blocks and mergings by name, the stem's names, every
/// block's geometry from its tensors, the head, then the input and its preprocessing.
pub(super) fn recognise(
    model: &Checkpoint,
    family: Family,
    p: &str,
    config: Value,
    prep: Option<Value>,
) -> Result<VitSpec> {
    let path = model.path();
    // A whole vision-language model keeps the vision tower's config under `vision_config`.
    let config = match config.get("vision_config") {
        Some(v) => v.clone(),
        None => config,
    };
    let mut blocks = block_list(model, family, p);
    if blocks.is_empty() {
        return Err(unknown(path, "no Swin block found"));
    }
    let stem = stem_names(model, family, p);
    let mut named = vec![&stem.patch_embed.0, &stem.norm.0, &stem.norm.1];
    if let Some((w, b)) = &stem.patch_norm {
        named.extend([w, b]);
    }
    check_present(model, family, &named, &[], &blocks)?;
    let (dim0, channels, patch) = patch_geometry(model, &stem.patch_embed.0)?;
    let out = block_geometry(model, &mut blocks, dim0)?;
    stem.check_widths(model, dim0, out)?;
    let (head, num_classes) = head_of(model, family, &config, out)?;
    let act = activation_of(path, &config, family)?;
    let eps = num(&config, "layer_norm_eps").map_or(1e-5, |e| e as f32);
    if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
        return Err(Error::InvalidOption(format!(
            "{}: config.json 'layer_norm_eps' = {eps} is not in (0, 1)",
            path.display()
        )));
    }
    let preprocess = input_preprocess(path, family, channels, &config, prep.as_ref())?;
    let first = blocks[0].geom;
    let spec = VitSpec {
        family,
        dim: dim0,
        depth: blocks.len(),
        heads: first.heads,
        mlp: first.mlp,
        patch,
        eps,
        prefix_tokens: 0,
        registers: 0,
        pos_prefix: 0,
        pos_grid: preprocess.crop / patch,
        pos_grid_w: preprocess.crop / patch,
        patch_embed: stem.patch_embed,
        tokens: Vec::new(),
        pos_embed: String::new(),
        pos_embed_resized: None,
        blocks,
        norm_pre: stem.patch_norm,
        norm: Some(stem.norm),
        fc_norm: None,
        act,
        pool: Pool::Mean,
        head,
        num_classes,
        labels: label_names(&config, num_classes),
        preprocess,
    };
    check_grids(&spec).map_err(|e| unknown(path, e))?;
    log::info!("{}: {}", path.display(), summary(&spec));
    Ok(spec)
}

/// Every block's names, stage by stage until a stage has none, each stage's merging attached to
/// its first block, and every second block of a stage marked as shifting.
fn block_list(model: &Checkpoint, family: Family, p: &str) -> Vec<BlockNames> {
    let has = |n: &str| model.get(n).is_some();
    // timm before 0.9 saved each merging at the end of its stage, like transformers.
    let end_merge = family == Family::TimmSwin && has("layers.0.downsample.reduction.weight");
    let mut blocks: Vec<BlockNames> = Vec::new();
    for stage in 0.. {
        let first = blocks.len();
        for j in 0.. {
            let mut b = block(family, p, stage, j, blocks.len());
            if !has(&format!("{}.weight", b.proj)) {
                break;
            }
            b.geom.shifted = j % 2 == 1;
            blocks.push(b);
        }
        if blocks.len() == first {
            break;
        }
        if stage > 0 {
            let m = merge(family, p, stage, end_merge);
            if has(&format!("{}.weight", m.2)) {
                blocks[first].merge = Some(m);
            }
        }
    }
    blocks
}

/// The names around the blocks: the patch embedding (weight, bias), its LayerNorm when the
/// model has one, and the final LayerNorm.
struct StemNames {
    patch_embed: (String, String),
    patch_norm: Option<(String, String)>,
    norm: (String, String),
}

fn stem_names(model: &Checkpoint, family: Family, p: &str) -> StemNames {
    let (embed, patch_norm, norm) = if family == Family::TimmSwin {
        (
            "patch_embed.proj",
            "patch_embed.norm".to_string(),
            "norm".to_string(),
        )
    } else {
        (
            "embeddings.patch_embeddings.projection",
            format!("{p}embeddings.norm"),
            format!("{p}layernorm"),
        )
    };
    let embed = if family == Family::TimmSwin {
        embed.to_string()
    } else {
        format!("{p}{embed}")
    };
    let pair = |n: &str| (format!("{n}.weight"), format!("{n}.bias"));
    StemNames {
        patch_embed: pair(&embed),
        patch_norm: model
            .get(&format!("{patch_norm}.weight"))
            .is_some()
            .then(|| pair(&patch_norm)),
        norm: pair(&norm),
    }
}

impl StemNames {
    /// The patch norm is as wide as the first stage, the final norm as the last.
    fn check_widths(&self, model: &Checkpoint, dim0: usize, out: usize) -> Result<()> {
        let shape = |n: &str| model.get(n).map(|t| t.shape.clone()).unwrap_or_default();
        let patch_norm = self
            .patch_norm
            .as_ref()
            .map(|(w, _)| (w, dim0, "patch norm"));
        for (name, want, what) in [(&self.norm.0, out, "final norm")]
            .into_iter()
            .chain(patch_norm)
        {
            if shape(name) != [want] {
                return Err(unknown(
                    model.path(),
                    format!(
                        "{what} '{name}' has shape {:?}, expected [{want}]",
                        shape(name)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Width, channels and patch size from the patch embedding `[dim, channels, p, p]`.
fn patch_geometry(model: &Checkpoint, name: &str) -> Result<(usize, usize, usize)> {
    let pe = model.get(name).map(|t| t.shape.clone()).unwrap_or_default();
    if pe.len() != 4 || pe[2] != pe[3] || pe[2] == 0 {
        return Err(unknown(
            model.path(),
            format!("patch embedding '{name}' has shape {pe:?}, expected [dim, channels, p, p]"),
        ));
    }
    Ok((pe[0], pe[1], pe[2]))
}

/// Each block's geometry from its tensors (width from its LayerNorm, heads and window from its
/// bias table, MLP from fc1, the merging's input as 4 × the width before it), every linear
/// checked against it; returns the last block's width.
fn block_geometry(model: &Checkpoint, blocks: &mut [BlockNames], dim0: usize) -> Result<usize> {
    let path = model.path();
    let shape = |n: &str| model.get(n).map(|t| t.shape.clone()).unwrap_or_default();
    let w = |l: &str| shape(&format!("{l}.weight"));
    let bad = |n: &str, s: &[usize], want: String| {
        unknown(path, format!("'{n}' has shape {s:?}, expected {want}"))
    };
    let mut prev = dim0;
    let mut stage = 0;
    for b in blocks.iter_mut() {
        let mut merge_in = 0;
        if let Some((nw, _, red)) = &b.merge {
            merge_in = 4 * prev;
            let s = shape(nw);
            if s != [merge_in] {
                return Err(bad(
                    nw,
                    &s,
                    format!("[{merge_in}] (4 × the width {prev} before it)"),
                ));
            }
            stage += 1;
            if w(red).len() != 2 {
                return Err(bad(red, &w(red), "[width, 4 × the width before]".into()));
            }
        }
        let d = shape(&b.norm1.0).first().copied().unwrap_or(0);
        if b.merge.is_none() && d != prev {
            return Err(bad(
                &b.norm1.0,
                &[d],
                format!("[{prev}]: no patch merging before it"),
            ));
        }
        let table_name = b.rel_bias.clone().unwrap_or_default();
        let table = shape(&table_name);
        let (window, heads) = match table.as_slice() {
            [rows, heads] if *heads > 0 => {
                let span = (*rows as f64).sqrt().round() as usize;
                if span * span != *rows || span.is_multiple_of(2) {
                    return Err(bad(&table_name, &table, "[(2·window − 1)², heads]".into()));
                }
                (span.div_ceil(2), *heads)
            }
            _ => return Err(bad(&table_name, &table, "[(2·window − 1)², heads]".into())),
        };
        if d == 0 || !d.is_multiple_of(heads) {
            return Err(unknown(
                path,
                format!("{heads} heads (from '{table_name}') do not divide width {d}"),
            ));
        }
        let m = w(&b.fc1).first().copied().unwrap_or(0);
        for (role, l) in b.linears() {
            let want = match role {
                Role::Reduction => vec![d, merge_in],
                Role::Qkv => vec![3 * d, d],
                Role::Query | Role::Key | Role::Value | Role::Proj => vec![d, d],
                Role::Fc1 => vec![m, d],
                Role::Fc2 => vec![d, m],
            };
            if w(&l) != want || m == 0 {
                return Err(bad(&format!("{l}.weight"), &w(&l), format!("{want:?}")));
            }
        }
        if shape(&b.norm2.0) != [d] {
            return Err(bad(&b.norm2.0, &shape(&b.norm2.0), format!("[{d}]")));
        }
        b.geom = BlockGeom {
            dim: d,
            heads,
            mlp: m,
            stage,
            window,
            shifted: b.geom.shifted,
            merge_in,
        };
        prev = d;
    }
    Ok(prev)
}

/// The classifier (timm's `head.fc`, older timm's `head`, transformers' `classifier`) on the
/// `out`-wide pooled features, and its class count; a pooling other than the mean is refused.
fn head_of(
    model: &Checkpoint,
    family: Family,
    config: &Value,
    out: usize,
) -> Result<(Head, usize)> {
    let path = model.path();
    let has = |n: &str| model.get(n).is_some();
    let pooled = config
        .get("global_pool")
        .or_else(|| config.get("model_args").and_then(|a| a.get("global_pool")))
        .and_then(Value::as_str);
    if let Some(other) = pooled.filter(|g| *g != "avg") {
        return Err(unknown(
            path,
            format!("config.json asks for global_pool '{other}'; a Swin is pooled by 'avg'"),
        ));
    }
    let head_name = if family == Family::TimmSwin {
        ["head.fc", "head"]
            .into_iter()
            .find(|h| has(&format!("{h}.weight")))
    } else {
        has("classifier.weight").then_some("classifier")
    };
    Ok(match head_name {
        Some(h) => {
            let s = model
                .get(&format!("{h}.weight"))
                .map(|t| t.shape.clone())
                .unwrap_or_default();
            if s.len() != 2 || s[1] != out || s[0] == 0 {
                return Err(unknown(
                    path,
                    format!("classifier '{h}.weight' has shape {s:?}, expected [classes, {out}]"),
                ));
            }
            (Head::Cls(h.to_string()), s[0])
        }
        None => (Head::None, 0),
    })
}

/// The input and its preprocessing: the native size from transformers' `image_size` or timm's
/// `img_size` (timm's `pretrained_cfg` and the image processor's config, read by `preprocess`,
/// come after), square only.
fn input_preprocess(
    path: &std::path::Path,
    family: Family,
    channels: usize,
    config: &Value,
    prep: Option<&Value>,
) -> Result<crate::io::images::Preprocess> {
    let native = num(config, "image_size")
        .or_else(|| config.get("image_size")?.as_array()?.first()?.as_f64())
        .or_else(|| {
            let a = config.get("model_args")?.get("img_size")?;
            a.as_f64().or_else(|| a.as_array()?.first()?.as_f64())
        })
        .map_or(224, |s| s as usize);
    square_input(config, prep)
        .and_then(|_| preprocess(family, channels, (native, native), config, prep))
        .and_then(|p| p.validate())
        .map_err(|reason| {
            Error::InvalidOption(format!(
                "{}: {reason} (from config.json / preprocessor_config.json beside the model)",
                path.display()
            ))
        })
}

/// Checks that the input grid tiles into each stage's windows: the crop a multiple of the patch,
/// each merged grid even, each stage's grid a multiple of its window and no smaller (a Swin
/// pads other grids, which this forward pass does not).
pub fn check_grids(spec: &VitSpec) -> std::result::Result<(), String> {
    let crop = spec.preprocess.crop;
    if !crop.is_multiple_of(spec.patch) {
        return Err(format!(
            "input size {crop} is not a multiple of the patch size {}",
            spec.patch
        ));
    }
    let side0 = crop / spec.patch;
    for b in &spec.blocks {
        let g = &b.geom;
        if g.window > MAX_WINDOW {
            return Err(format!(
                "block {} has windows of {} tokens a side (its bias table says so); at most \
                 {MAX_WINDOW} are supported",
                b.index, g.window
            ));
        }
        if !side0.is_multiple_of(1 << g.stage) {
            return Err(format!(
                "the {side0}x{side0} patch grid cannot be merged {} times (block {})",
                g.stage, b.index
            ));
        }
        let side = spec.grid_side(b.index);
        if side < g.window || !side.is_multiple_of(g.window) {
            return Err(format!(
                "block {} has a {side}x{side} grid that windows of {} do not tile (the model would \
                 pad it); choose an input size whose grids the windows tile",
                b.index, g.window
            ));
        }
        // The expanded bias: one [heads, w², w²] table per window position when shifted.
        let t = (g.window * g.window) as u64;
        let groups = if spec.block_shift(b.index) > 0 {
            ((side / g.window) * (side / g.window)) as u64
        } else {
            1
        };
        let bytes = groups * g.heads as u64 * t * t * 4;
        if bytes > MAX_BIAS_BYTES {
            return Err(format!(
                "block {}'s attention bias over {groups} windows of {t} tokens and {} heads would \
                 take {:.1} GB (at most {:.1} GB); choose a smaller input size",
                b.index,
                g.heads,
                bytes as f64 / 1e9,
                MAX_BIAS_BYTES as f64 / 1e9
            ));
        }
    }
    Ok(())
}

/// What `inspect` prints for a Swin.
pub fn summary(spec: &VitSpec) -> String {
    // Per stage: width, depth, heads, window.
    let mut stages: Vec<[usize; 4]> = Vec::new();
    for b in &spec.blocks {
        match stages.last_mut() {
            Some(s) if b.merge.is_none() && s[0] == b.geom.dim => s[1] += 1,
            _ => stages.push([b.geom.dim, 1, b.geom.heads, b.geom.window]),
        }
    }
    let list = |k: usize| {
        stages
            .iter()
            .map(|s| s[k].to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let act = spec.act.label();
    let head = match &spec.head {
        Head::Cls(h) => format!("head '{h}' ({} outputs)", spec.num_classes),
        _ => "no head".to_string(),
    };
    format!(
        "{}: stages of width {} (depths {}; heads {}; windows {}, shifted in every second \
         block where the grid is wider), MLP {}x ({act}), patch {}{}, input {} px; final norm; pooled by the mean of the \
         tokens; {head}",
        spec.family,
        list(0),
        list(1),
        list(2),
        list(3),
        spec.mlp / spec.dim.max(1),
        spec.patch,
        if spec.norm_pre.is_some() {
            " with a norm"
        } else {
            ""
        },
        spec.preprocess.crop,
    )
}

/// The additive attention bias of a block with `heads` heads and windows of `window` over a
/// `side × side` grid, shifted by `shift`: `[groups, heads, w², w²]` and `groups`. The bias of a
/// token pair is the table's entry (`[(2w − 1)², heads]`) for their relative position; with a
/// shift, each of the grid's windows gets its own copy with [`SHIFT_MASK`] added to the pairs
/// the roll brought from different regions (`groups` = windows per image), else `groups` = 1.
pub fn attention_bias(
    table: &[f32],
    heads: usize,
    window: usize,
    side: usize,
    shift: usize,
) -> (Vec<f32>, usize) {
    let t = window * window;
    let span = 2 * window - 1;
    let per_side = side / window;
    let groups = if shift > 0 { per_side * per_side } else { 1 };
    // Regions of the rolled grid along one axis: before the last window, the last window's part
    // that stayed, and the part that came around from the other border.
    let region = |c: usize| {
        if c < side - window {
            0
        } else if c < side - shift {
            1
        } else {
            2
        }
    };
    let mut out = vec![0.0f32; groups * heads * t * t];
    for g in 0..groups {
        let (wy, wx) = (g / per_side, g % per_side);
        let label =
            |i: usize| region(wy * window + i / window) * 3 + region(wx * window + i % window);
        for h in 0..heads {
            for i in 0..t {
                for j in 0..t {
                    let ry = i / window + window - 1 - j / window;
                    let rx = i % window + window - 1 - j % window;
                    let mut v = table[(ry * span + rx) * heads + h];
                    if shift > 0 && label(i) != label(j) {
                        v += SHIFT_MASK;
                    }
                    out[((g * heads + h) * t + i) * t + j] = v;
                }
            }
        }
    }
    (out, groups)
}

/// Rows of `n` images' `side × side` token grids in window order: row `r` of the windowed
/// layout (image, window row-major, token in the window row-major) is row `order[r]` of the grid
/// layout, the grid first rolled by `−shift` along both axes (as `torch.roll` does before
/// partitioning).
pub fn window_order(n: usize, side: usize, window: usize, shift: usize) -> Vec<u32> {
    let per_side = side / window;
    let mut order = Vec::with_capacity(n * side * side);
    for img in 0..n {
        for wy in 0..per_side {
            for wx in 0..per_side {
                for iy in 0..window {
                    for ix in 0..window {
                        let y = (wy * window + iy + shift) % side;
                        let x = (wx * window + ix + shift) % side;
                        order.push((img * side * side + y * side + x) as u32);
                    }
                }
            }
        }
    }
    order
}

/// The patch merging's gather over `n` images' `side × side` grids (`side` even): row `4r + q`
/// of the result is token `(2i + (q & 1), 2j + (q >> 1))` of merged token `r = (i, j)`, so each
/// run of four rows, read as one row 4 times as wide, is timm's and transformers' concatenation
/// `[x(0,0), x(1,0), x(0,1), x(1,1)]` (row, column offsets).
pub fn merge_order(n: usize, side: usize) -> Vec<u32> {
    let half = side / 2;
    let mut order = Vec::with_capacity(n * side * side);
    for img in 0..n {
        for i in 0..half {
            for j in 0..half {
                for q in 0..4 {
                    let (y, x) = (2 * i + (q & 1), 2 * j + (q >> 1));
                    order.push((img * side * side + y * side + x) as u32);
                }
            }
        }
    }
    order
}

/// The inverse of a permutation.
pub fn inverse(order: &[u32]) -> Vec<u32> {
    let mut inv = vec![0u32; order.len()];
    for (r, &o) in order.iter().enumerate() {
        inv[o as usize] = r as u32;
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_order_is_a_permutation_and_its_inverse_undoes_it() {
        for (side, window, shift) in [(8, 4, 0), (8, 4, 2), (6, 3, 1), (4, 4, 0)] {
            let o = window_order(2, side, window, shift);
            let mut seen = o.clone();
            seen.sort_unstable();
            assert_eq!(seen, (0..2 * side as u32 * side as u32).collect::<Vec<_>>());
            let inv = inverse(&o);
            for (r, &s) in o.iter().enumerate() {
                assert_eq!(inv[s as usize] as usize, r);
            }
        }
        // The first window of a shifted grid starts at (shift, shift).
        let o = window_order(1, 8, 4, 2);
        assert_eq!(o[0], 2 * 8 + 2);
        assert_eq!(o[1], 2 * 8 + 3);
    }

    #[test]
    fn the_shift_mask_separates_regions_only_in_border_windows() {
        let table = vec![0.0f32; 49];
        let (b, groups) = attention_bias(&table, 1, 4, 8, 2);
        assert_eq!(groups, 4);
        let t = 16;
        // Window 0 (top left) holds one region: no mask.
        assert!(b[..t * t].iter().all(|&v| v == 0.0));
        // Window 3 (bottom right) holds four regions: tokens 0 and 15 are in different ones.
        let w3 = &b[3 * t * t..];
        assert_eq!(w3[15], SHIFT_MASK);
        assert_eq!(w3[0], 0.0);
        // No shift: one group, the table's values only.
        let table: Vec<f32> = (0..49).map(|i| i as f32).collect();
        let (b, groups) = attention_bias(&table, 1, 4, 8, 0);
        assert_eq!(groups, 1);
        // Same token: relative position (0, 0), the table's centre entry (3·7 + 3).
        assert_eq!(b[0], 24.0);
    }

    #[test]
    fn merge_order_groups_two_by_two() {
        let o = merge_order(1, 4);
        assert_eq!(&o[..4], &[0, 4, 1, 5]);
        assert_eq!(&o[4..8], &[2, 6, 3, 7]);
    }
}
