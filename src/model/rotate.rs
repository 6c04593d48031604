//! `--rotate`: an orthogonal change of basis of the residual stream (and of each attention head's
//! values), folded into the weights, so the network computes the same function with weights
//! that are easier to quantize, and ships as an ordinary checkpoint of the same architecture.
//!
//! Incoherence processing (QuIP, QuaRot) without their custom kernels. With `h' = Q·h`:
//!
//! - LayerNorm commutes with `Q` once its scale and shift are folded into the layers it feeds,
//!   provided `Q` maps the all-ones vector to itself: then `Qᵀ·1 = 1`, so `Q` keeps the mean and
//!   the variance of every token and `LN₀(Q·h) = Q·LN₀(h)` (`LN₀` without affine; epsilon
//!   included). Each LayerNorm is left as weight 1, bias 0.
//! - Layers that read a LayerNorm's output (qkv, fc1; the head or the pooling head's keys and
//!   values after the final norm) absorb `diag(γ)·Qᵀ` on their input side and `W·β` into their
//!   bias; layers that write the residual stream (the patch embedding, the prefix tokens, the
//!   position embedding, proj, fc2) absorb `Q` on their output side, with DINOv2's LayerScale
//!   folded in first (then left as ones).
//! - Attention is linear in the values, so each head's value rows absorb an orthogonal `R_h` and
//!   the matching columns of proj absorb `R_hᵀ`: proj's inputs are rotated too.
//!
//! fc2's inputs (after the GELU) keep their basis: rotating them would need a kernel at run
//! time. A bare backbone's features come out of the final LayerNorm in the rotated basis, so
//! such a model is refused: the rotation must end in a linear layer of the checkpoint (a
//! classifier head, HF ViT's pooler, an attention-pooling head). A LayerNorm that writes the residual stream itself
//! (CLIP's pre-LayerNorm) does not commute with the rotation and is refused too.
//!
//! `Q` is a seeded Haar-random orthogonal matrix times a Householder reflection that sends
//! `Q·1` back to `1`; each `R_h` is Haar-random. The rotation runs in f64; each rotated tensor is
//! written in its own dtype (f32, or a bf16/f16 model's half precision).

use std::collections::BTreeMap;
use std::path::Path;

use super::{Head, Pool, Role, VitSpec};
use crate::error::{Error, Result};
use crate::io::writer::{PlannedTensor, SafetensorsWriter};
use crate::io::Checkpoint;
use crate::numeric::linalg::{dgemm, random_orthogonal};

/// The metadata key of a rotated checkpoint (the outputs of `run --rotate`): the seed, from which
/// the rotation is rebuilt.
pub const SEED_KEY: &str = "comq.rotation_seed";

/// The seed `model` was rotated with, from its metadata (`None`: not rotated).
pub fn seed_of(model: &Checkpoint) -> Result<Option<u64>> {
    match model.metadata().get(SEED_KEY) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::BadSafetensors {
                path: model.path().into(),
                reason: format!("metadata '{SEED_KEY}' is '{v}', not a rotation seed"),
            }),
    }
}

/// Pooled features `[n, d]` of a model rotated with `seed` mapped back to the basis of the
/// original (`original`, described by `spec`): `γ ⊙ Qᵀ·f + β` with the original's final norm (or
/// `fc_norm`). An attention-pooling head's output is not in the residual basis: unchanged.
pub fn unrotate_features(
    feats: &mut [f32],
    spec: &VitSpec,
    original: &Checkpoint,
    seed: u64,
) -> Result<()> {
    if matches!(spec.pool, Pool::Map(_)) {
        return Ok(());
    }
    let d = spec.dim;
    let (gamma, beta) = match spec.norm.as_ref().or(spec.fc_norm.as_ref()) {
        Some((w, b)) => {
            let read = |n: &str| -> Result<Vec<f32>> {
                Ok(read_f64(original, n)?
                    .into_iter()
                    .map(|v| v as f32)
                    .collect())
            };
            (read(w)?, read(b)?)
        }
        None => (vec![1.0; d], vec![0.0; d]),
    };
    if gamma.len() != d || beta.len() != d || !feats.len().is_multiple_of(d) {
        return Err(Error::Shape(format!(
            "features of width {d} cannot be mapped back through a norm of {} values",
            gamma.len()
        )));
    }
    let q = Rotation::new(d, spec.heads, seed).q;
    let f64s: Vec<f64> = feats.iter().map(|v| f64::from(*v)).collect();
    // f · Q = (Qᵀ·f)ᵀ, row by row.
    let back = product(&f64s, feats.len() / d, d, &q, d);
    for (row, out) in back.chunks(d).zip(feats.chunks_mut(d)) {
        for (k, (o, v)) in out.iter_mut().zip(row).enumerate() {
            *o = gamma[k] * v + beta[k];
        }
    }
    Ok(())
}

/// The residual stream's rotation `Q` (`d × d`, `Q·1 = 1`) and the heads' value rotations.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// Width.
    pub d: usize,
    /// Head width.
    pub hd: usize,
    /// `Q`, row-major.
    pub q: Vec<f64>,
    /// `R_h` per head, row-major `hd × hd`.
    pub heads: Vec<Vec<f64>>,
}

impl Rotation {
    /// The seeded rotation of a model of width `d` with `heads` heads.
    pub fn new(d: usize, heads: usize, seed: u64) -> Rotation {
        let h = random_orthogonal(d, seed ^ 0x726f_7461_7465);
        // v = H·u − u with u = 1/√d; P = I − 2·v·vᵀ/‖v‖² sends H·u to u, so Q = P·H keeps u.
        let u = 1.0 / (d as f64).sqrt();
        let hu: Vec<f64> = (0..d)
            .map(|i| h[i * d..(i + 1) * d].iter().sum::<f64>() * u)
            .collect();
        let v: Vec<f64> = hu.iter().map(|x| x - u).collect();
        let vv: f64 = v.iter().map(|x| x * x).sum();
        let mut q = h.clone();
        if vv > 1e-24 {
            // Q = H − v·(2·vᵀH/‖v‖²)
            let mut vt_h = vec![0.0f64; d];
            for (i, vi) in v.iter().enumerate() {
                for (a, x) in vt_h.iter_mut().zip(&h[i * d..(i + 1) * d]) {
                    *a += vi * x;
                }
            }
            for i in 0..d {
                let f = 2.0 * v[i] / vv;
                for (x, a) in q[i * d..(i + 1) * d].iter_mut().zip(&vt_h) {
                    *x -= f * a;
                }
            }
        }
        let hd = d / heads.max(1);
        let heads = (0..heads)
            .map(|k| random_orthogonal(hd, seed ^ (0x6865_6164 + k as u64)))
            .collect();
        Rotation { d, hd, q, heads }
    }

    /// `Qᵀ`, row-major.
    fn qt(&self) -> Vec<f64> {
        transpose(&self.q, self.d, self.d)
    }
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; a.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// Why `--rotate` cannot keep this model's function, or `Ok`.
pub fn check(spec: &VitSpec, model: &Checkpoint) -> Result<()> {
    let refuse = |why: String| {
        Err(Error::InvalidOption(format!(
            "--rotate cannot be folded into {}: {why}",
            model.path().display()
        )))
    };
    if spec.family.is_swin() {
        return refuse(
            "a Swin's residual stream changes width at every patch merging, whose LayerNorm \
             over four concatenated tokens does not commute with a rotation of each"
                .into(),
        );
    }
    if spec.norm_pre.is_some() {
        return refuse(
            "its pre-LayerNorm writes the residual stream itself, and a LayerNorm's scale does \
             not commute with a rotation"
                .into(),
        );
    }
    if spec.norm.is_some() && spec.fc_norm.is_some() {
        return refuse("it has both a final norm and fc_norm".into());
    }
    if spec.heads == 0 || !spec.dim.is_multiple_of(spec.heads) {
        return refuse(format!(
            "width {} is not a multiple of {} heads",
            spec.dim, spec.heads
        ));
    }
    let absorbed = !matches!(spec.head, Head::None)
        || matches!(spec.pool, Pool::Map(_))
        || pooler(spec, model).is_some();
    if !absorbed {
        return refuse(
            "it is a bare backbone, so its features would come out rotated; the rotation needs a \
             linear layer after the final LayerNorm to end in (a classifier head, a pooler or an \
             attention-pooling head)"
                .into(),
        );
    }
    let used = spec.used_tensors();
    let unknown: Vec<&str> = model
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !used.contains(*n) && !extra_residual(spec, n) && !n.ends_with("position_ids"))
        .filter(|n| !pooler(spec, model).is_some_and(|p| n.starts_with(p.as_str())))
        .collect();
    if let Some(first) = unknown.first() {
        return refuse(format!(
            "tensor '{first}' is not read by the forward pass, so how to rotate it is unknown"
        ));
    }
    Ok(())
}

/// HF ViT's pooler (a linear layer and tanh over the final-normed class token), by prefix.
fn pooler(spec: &VitSpec, model: &Checkpoint) -> Option<String> {
    if spec.pool != Pool::Cls {
        return None;
    }
    model
        .tensors()
        .iter()
        .find(|t| t.name.ends_with("pooler.dense.weight"))
        .map(|t| t.name.trim_end_matches(".weight").to_string())
}

/// Tensors in the residual basis that the forward pass does not read: DINOv2's mask token and
/// position embeddings stored for other input sizes.
fn extra_residual(spec: &VitSpec, n: &str) -> bool {
    n.ends_with("mask_token")
        || n.strip_prefix(spec.pos_embed.as_str())
            .is_some_and(|rest| rest.starts_with('_'))
}

/// One rotated tensor: its shape and a way to compute it.
type Job<'a> = (Vec<usize>, Box<dyn Fn() -> Result<Vec<f32>> + 'a>);

/// A tensor of `model`, as f64.
fn read_f64(model: &Checkpoint, name: &str) -> Result<Vec<f64>> {
    let t = model
        .get(name)
        .ok_or_else(|| Error::Internal(format!("tensor '{name}' vanished")))?;
    Ok(model.read_f32(t)?.into_iter().map(f64::from).collect())
}

/// Writes every tensor the rotation changes, in its own dtype, to `dest` (a safetensors file to
/// overlay on `model`). Each tensor is computed when it is written, so one tensor's copy is held
/// at a time.
pub fn write_rotated(model: &Checkpoint, spec: &VitSpec, seed: u64, dest: &Path) -> Result<()> {
    check(spec, model)?;
    let rot = Rotation::new(spec.dim, spec.heads, seed);
    let qt = rot.qt();
    let mut plan = Plan {
        model,
        d: spec.dim,
        rot: &rot,
        qt: &qt,
        jobs: BTreeMap::new(),
    };
    plan.embeddings(spec)?;
    for b in &spec.blocks {
        plan.block(b)?;
    }
    plan.final_norm(spec)?;
    plan.write(dest, seed)
}

/// The rotated tensors of one model, by name, each computed when written.
struct Plan<'a> {
    model: &'a Checkpoint,
    d: usize,
    rot: &'a Rotation,
    qt: &'a [f64],
    jobs: BTreeMap<String, Job<'a>>,
}

impl<'a> Plan<'a> {
    fn add(&mut self, name: &str, shape: Vec<usize>, make: impl Fn() -> Result<Vec<f32>> + 'a) {
        self.jobs.insert(name.to_string(), (shape, Box::new(make)));
    }

    /// The embeddings write the residual stream: the prefix tokens and every stored position
    /// embedding (rows of `d`), the patch embedding (`W ↦ Q·W` as `[d, c·p·p]`, `b ↦ Q·b`).
    fn embeddings(&mut self, spec: &VitSpec) -> Result<()> {
        for t in &spec.tokens {
            self.residual_rows(t)?;
        }
        self.residual_rows(&spec.pos_embed)?;
        if let Some(r) = &spec.pos_embed_resized {
            self.residual_rows(r)?;
        }
        let model = self.model;
        for t in model.tensors() {
            if extra_residual(spec, &t.name) {
                self.residual_rows(&t.name)?;
            }
        }
        self.writer(&spec.patch_embed.0, Some(&spec.patch_embed.1), None, false)
    }

    /// One block: qkv and fc1 read the LayerNorms, proj and fc2 write the residual stream (with
    /// the LayerScale); the values take `R_h` and proj's matching columns `R_hᵀ`.
    fn block(&mut self, b: &super::BlockNames) -> Result<()> {
        let d = self.d;
        for (role, prefix) in &b.qkv {
            let values = match role {
                Role::Qkv => Some(2 * d),
                Role::Value => Some(0),
                _ => None,
            };
            self.reader(prefix, &b.norm1, 0, values)?;
        }
        self.unit_norm(&b.norm1)?;
        let (ls1, ls2) = match &b.ls {
            Some((a, c)) => (Some(a.as_str()), Some(c.as_str())),
            None => (None, None),
        };
        let bias = |l: &str| format!("{l}.bias");
        self.writer(
            &format!("{}.weight", b.proj),
            Some(&bias(&b.proj)),
            ls1,
            true,
        )?;
        self.reader(&b.fc1, &b.norm2, 0, None)?;
        self.unit_norm(&b.norm2)?;
        self.writer(
            &format!("{}.weight", b.fc2),
            Some(&bias(&b.fc2)),
            ls2,
            false,
        )?;
        if let Some((a, c)) = &b.ls {
            self.constant(a, 1.0)?;
            self.constant(c, 1.0)?;
        }
        Ok(())
    }

    /// The final norm (or `fc_norm`) folded into whatever reads it: the attention-pooling head's
    /// keys and values (HF packs them as rows `d..3d` of `in_proj`), or the classifier(s) and
    /// HF ViT's pooler.
    fn final_norm(&mut self, spec: &VitSpec) -> Result<()> {
        let mut readers: Vec<(String, usize)> = Vec::new();
        match &spec.pool {
            Pool::Map(h) if spec.family.is_timm() => readers.push((format!("{h}.kv"), 0)),
            Pool::Map(h) => readers.push((format!("{h}.attention.in_proj"), self.d)),
            _ => {
                match &spec.head {
                    Head::None => {}
                    Head::Cls(h) | Head::ClsMean(h) => readers.push((h.clone(), 0)),
                    Head::ClsDist(h, k) => {
                        readers.push((h.clone(), 0));
                        readers.push((k.clone(), 0));
                    }
                }
                readers.extend(pooler(spec, self.model).map(|p| (p, 0)));
            }
        }
        let last = spec.norm.as_ref().or(spec.fc_norm.as_ref());
        let identity = (String::new(), String::new());
        for (prefix, skip_rows) in readers {
            self.reader(&prefix, last.unwrap_or(&identity), skip_rows, None)?;
        }
        match last {
            Some(n) => self.unit_norm(n),
            None => Ok(()),
        }
    }

    fn shape(&self, n: &str) -> Result<Vec<usize>> {
        self.model
            .get(n)
            .map(|t| t.shape.clone())
            .ok_or_else(|| Error::Internal(format!("tensor '{n}' vanished")))
    }

    /// A tensor set to a constant (a folded LayerNorm or LayerScale).
    fn constant(&mut self, n: &str, v: f32) -> Result<()> {
        let s = self.shape(n)?;
        let len = s.iter().product();
        self.add(n, s, move || Ok(vec![v; len]));
        Ok(())
    }

    /// A LayerNorm folded away: weight 1, bias 0.
    fn unit_norm(&mut self, norm: &(String, String)) -> Result<()> {
        self.constant(&norm.0, 1.0)?;
        self.constant(&norm.1, 0.0)
    }

    /// Rows of `d` values in the residual basis (tokens, position embeddings): `x ↦ Q·x`.
    fn residual_rows(&mut self, n: &str) -> Result<()> {
        let (model, qt, d) = (self.model, self.qt, self.d);
        let Some(t) = model.get(n) else {
            return Ok(());
        };
        if t.shape.last() != Some(&d) {
            return Err(Error::Shape(format!(
                "--rotate: tensor '{n}' has shape {:?}, not rows of width {d}",
                t.shape
            )));
        }
        let name = n.to_string();
        self.add(n, t.shape.clone(), move || {
            let x = read_f64(model, &name)?;
            Ok(product(&x, x.len() / d, d, qt, d))
        });
        Ok(())
    }

    /// A layer writing the residual stream: `W ↦ Q·diag(ls)·W`, `b ↦ Q·(ls ⊙ b)` (`W` read as
    /// `[d, rest]`); with `head_columns` (proj) the columns of head `h` then take `R_hᵀ`.
    fn writer(
        &mut self,
        weight: &str,
        bias: Option<&str>,
        ls: Option<&str>,
        head_columns: bool,
    ) -> Result<()> {
        let (model, d, q, rot) = (self.model, self.d, &self.rot.q, self.rot);
        for (name, is_weight) in [(Some(weight), true), (bias, false)] {
            let Some(name) = name else { continue };
            let Some(t) = model.get(name) else { continue };
            if t.shape.first() != Some(&d) {
                return Err(Error::Shape(format!(
                    "--rotate: tensor '{name}' has shape {:?}; its first dimension should be the width {d}",
                    t.shape
                )));
            }
            let (n, ls) = (name.to_string(), ls.map(str::to_string));
            self.add(name, t.shape.clone(), move || {
                let mut w = read_f64(model, &n)?;
                let cols = w.len() / d;
                if let Some(ls) = &ls {
                    let g = read_f64(model, ls)?;
                    for (r, row) in w.chunks_mut(cols).enumerate() {
                        row.iter_mut().for_each(|x| *x *= g[r]);
                    }
                }
                let w = product(q, d, d, &w, cols);
                Ok(if head_columns && is_weight {
                    rotate_head_columns(&w, d, rot)
                } else {
                    w
                })
            });
        }
        Ok(())
    }

    /// A layer reading a LayerNorm's output ([`FoldedReader`]) from row `skip_rows` on; rows
    /// from `values` on (the values) then take each head's `R_h`. A layer without a bias is
    /// refused here if the LayerNorm's shift would have to go into one.
    fn reader(
        &mut self,
        prefix: &str,
        norm: &(String, String),
        skip_rows: usize,
        values: Option<usize>,
    ) -> Result<()> {
        let (d, rot) = (self.d, self.rot);
        let fold = FoldedReader::plan(self.model, prefix, norm, self.qt, d, skip_rows)?;
        if !fold.has_bias {
            fold.bias()?;
        }
        let fold = std::rc::Rc::new(fold);
        let (f, f2) = (fold.clone(), fold.clone());
        self.add(&fold.weight, fold.shape.clone(), move || {
            let mut w = f.weight()?;
            if let Some(from) = values {
                rotate_head_rows(&mut w[from * d..], d, rot);
            }
            Ok(w.into_iter().map(|v| v as f32).collect())
        });
        if fold.has_bias {
            self.add(&fold.bias, fold.bias_shape.clone(), move || {
                let mut b = f2.bias()?;
                if let Some(from) = values {
                    rotate_head_rows(&mut b[from..], 1, rot);
                }
                Ok(b.into_iter().map(|v| v as f32).collect())
            });
        }
        Ok(())
    }

    /// Writes the planned tensors, each in its own dtype (a bf16 model stays bf16, so every
    /// output keeps the input's dtypes); the arithmetic is f64 and rounds once.
    fn write(self, dest: &Path, seed: u64) -> Result<()> {
        let model = self.model;
        let dtype_of = |name: &str| -> safetensors::Dtype {
            match model.get(name).map(|t| t.dtype) {
                Some(d @ (safetensors::Dtype::F16 | safetensors::Dtype::BF16)) => d,
                _ => safetensors::Dtype::F32,
            }
        };
        let planned: Vec<PlannedTensor> = self
            .jobs
            .iter()
            .map(|(name, (shape, _))| PlannedTensor {
                name: name.clone(),
                dtype: dtype_of(name),
                shape: shape.clone(),
            })
            .collect();
        let mut meta = BTreeMap::new();
        meta.insert(SEED_KEY.to_string(), seed.to_string());
        let mut w = SafetensorsWriter::create(dest, planned, &meta)?;
        for (name, (_, make)) in &self.jobs {
            let bytes = crate::io::dtype::from_f32(dtype_of(name), &make()?).ok_or_else(|| {
                Error::Internal(format!(
                    "--rotate: cannot write '{name}' as {:?}",
                    dtype_of(name)
                ))
            })?;
            w.write(name, &bytes)?;
        }
        w.finish(&meta)
    }
}

/// `x[rows, k] · b[k, n]` in f64, rounded to f32.
fn product(x: &[f64], rows: usize, k: usize, b: &[f64], n: usize) -> Vec<f32> {
    let mut c = vec![0.0f64; rows * n];
    dgemm(rows, k, n, x, b, &mut c);
    c.into_iter().map(|v| v as f32).collect()
}

/// `W ↦ W·diag(γ)·Qᵀ` and `b ↦ b + W·β` for one linear layer, over each `d`-wide block of its
/// input (a `[classes, 2d]` head has two) and the rows from `skip_rows` on.
struct FoldedReader<'a> {
    model: &'a Checkpoint,
    weight: String,
    bias: String,
    shape: Vec<usize>,
    bias_shape: Vec<usize>,
    has_bias: bool,
    norm: (String, String),
    qt: &'a [f64],
    d: usize,
    skip_rows: usize,
}

impl<'a> FoldedReader<'a> {
    fn plan(
        model: &'a Checkpoint,
        prefix: &str,
        norm: &(String, String),
        qt: &'a [f64],
        d: usize,
        skip_rows: usize,
    ) -> Result<FoldedReader<'a>> {
        // HF's packed attention names its tensors `in_proj_weight` / `in_proj_bias`.
        let (weight, bias) = if prefix.ends_with("in_proj") {
            (format!("{prefix}_weight"), format!("{prefix}_bias"))
        } else {
            (format!("{prefix}.weight"), format!("{prefix}.bias"))
        };
        let shape = model
            .get(&weight)
            .map(|t| t.shape.clone())
            .ok_or_else(|| Error::Internal(format!("tensor '{weight}' vanished")))?;
        let cols = shape.get(1).copied().unwrap_or(0);
        if shape.len() != 2 || cols == 0 || !cols.is_multiple_of(d) {
            return Err(Error::Shape(format!(
                "--rotate: tensor '{weight}' has shape {shape:?}; its inputs should be the width {d} (or a multiple)"
            )));
        }
        let has_bias = model.get(&bias).is_some();
        Ok(FoldedReader {
            model,
            bias_shape: vec![shape[0]],
            weight,
            bias,
            shape,
            has_bias,
            norm: norm.clone(),
            qt,
            d,
            skip_rows,
        })
    }

    fn read(&self, n: &str) -> Result<Vec<f64>> {
        read_f64(self.model, n)
    }

    /// γ and β of the norm read (identity when there is none).
    fn affine(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        if self.norm.0.is_empty() {
            return Ok((vec![1.0; self.d], vec![0.0; self.d]));
        }
        Ok((self.read(&self.norm.0)?, self.read(&self.norm.1)?))
    }

    fn weight(&self) -> Result<Vec<f64>> {
        let (gamma, _) = self.affine()?;
        let w = self.read(&self.weight)?;
        let (rows, cols, d) = (self.shape[0], self.shape[1], self.d);
        let mut out = w.clone();
        // One matrix product per `d`-wide block of the input (a `[classes, 2d]` head has two).
        let kept = rows - self.skip_rows.min(rows);
        let mut scaled = vec![0.0f64; kept * d];
        let mut res = vec![0.0f64; kept * d];
        for blk in 0..cols / d {
            for (i, r) in (self.skip_rows..rows).enumerate() {
                let src = &w[r * cols + blk * d..r * cols + (blk + 1) * d];
                for ((s, x), g) in scaled[i * d..(i + 1) * d].iter_mut().zip(src).zip(&gamma) {
                    *s = x * g;
                }
            }
            dgemm(kept, d, d, &scaled, self.qt, &mut res);
            for (i, r) in (self.skip_rows..rows).enumerate() {
                out[r * cols + blk * d..r * cols + (blk + 1) * d]
                    .copy_from_slice(&res[i * d..(i + 1) * d]);
            }
        }
        Ok(out)
    }

    fn bias(&self) -> Result<Vec<f64>> {
        let (_, beta) = self.affine()?;
        let w = self.read(&self.weight)?;
        let (rows, cols, d) = (self.shape[0], self.shape[1], self.d);
        let mut b = if self.has_bias {
            self.read(&self.bias)?
        } else {
            vec![0.0; rows]
        };
        for (r, br) in b.iter_mut().enumerate().skip(self.skip_rows) {
            for blk in 0..cols / d {
                let src = &w[r * cols + blk * d..r * cols + (blk + 1) * d];
                *br += src.iter().zip(&beta).map(|(x, y)| x * y).sum::<f64>();
            }
        }
        if !self.has_bias && b.iter().any(|v| *v != 0.0) {
            return Err(Error::InvalidOption(format!(
                "--rotate: '{}' has no bias to take its LayerNorm's shift '{}'",
                self.weight, self.norm.1
            )));
        }
        Ok(b)
    }
}

/// Rows `[heads·hd, width]` (values): the rows of head `h` take `R_h`.
fn rotate_head_rows(x: &mut [f64], width: usize, rot: &Rotation) {
    let hd = rot.hd;
    for (h, r) in rot.heads.iter().enumerate() {
        let block = &mut x[h * hd * width..(h + 1) * hd * width];
        let mut out = vec![0.0f64; hd * width];
        dgemm(hd, hd, width, r, block, &mut out);
        block.copy_from_slice(&out);
    }
}

/// proj's weight `[d, d]` (f32): the columns of head `h` take `R_hᵀ`.
fn rotate_head_columns(w: &[f32], d: usize, rot: &Rotation) -> Vec<f32> {
    let hd = rot.hd;
    let mut out = w.to_vec();
    let mut blk = vec![0.0f64; hd];
    let mut res = vec![0.0f64; hd];
    for row in 0..d {
        for (h, r) in rot.heads.iter().enumerate() {
            let cols = row * d + h * hd..row * d + (h + 1) * hd;
            for (b, x) in blk.iter_mut().zip(&w[cols.clone()]) {
                *b = f64::from(*x);
            }
            // row · R_hᵀ: res[i] = Σ_j blk[j] · R[i, j]
            for (i, o) in res.iter_mut().enumerate() {
                *o = r[i * hd..(i + 1) * hd]
                    .iter()
                    .zip(&blk)
                    .map(|(a, b)| a * b)
                    .sum();
            }
            for (o, v) in out[cols].iter_mut().zip(&res) {
                *o = *v as f32;
            }
        }
    }
    out
}
