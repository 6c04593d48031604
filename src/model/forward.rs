//! The ViT forward pass, written once over device primitives ([`Ops`]).
//!
//! The CPU ([`crate::device::cpu_ops::CpuOps`]) and the GPU (`device::wgpu::forward`) implement the same
//! primitives in f32; everything model-specific (token layout, LayerScale, heads, which
//! activations feed which Gram matrix) lives here. A batch is processed block by block: the
//! caller holds one `[images × tokens, dim]` hidden state and moves it through one block at a
//! time, so only one block's activations for the batch exist at once.

use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;

use super::{swin, BlockNames, Head, Pool, Role, Site, VitSpec};
use crate::device::ops::Activation;

pub use crate::device::ops::Ops;

/// Receives each linear layer's input during a block: (site, activations, rows).
pub type Observer<'a, T> = dyn FnMut(Site, &T, usize) -> Result<()> + 'a;

/// One block's weights on a device. `qkv` is always fused (rows q | k | v).
pub struct BlockWeights<T> {
    index: usize,
    /// Swin's patch merging: its LayerNorm and reduction.
    merge: Option<((T, T), (T, T))>,
    /// Swin's attention bias `[groups, heads, w², w²]` and `groups`.
    bias: Option<(T, usize)>,
    norm1: (T, T),
    qkv: (T, T),
    proj: (T, T),
    norm2: (T, T),
    fc1: (T, T),
    fc2: (T, T),
    ls: (T, T),
    qk_norm: Option<(T, T)>,
}

/// A weight and its bias (or a LayerNorm's gain and shift) on the host.
pub type HostPair = (Vec<f32>, Vec<f32>);

/// Host copy of one block's weights, so quantized layers can be swapped in.
#[derive(Debug, Clone)]
pub struct HostBlock {
    /// The block's index in the model.
    pub index: usize,
    /// Swin's patch merging before the block: LayerNorm (weight, bias) and reduction (weight
    /// `[dim, 4·previous width]`, bias: zeros where the checkpoint has none).
    pub merge: Option<(HostPair, HostPair)>,
    /// Swin's attention bias, expanded from the relative-position table for the block's windows
    /// and shift: `[groups, heads, w², w²]` and `groups`.
    pub bias: Option<(Vec<f32>, usize)>,
    /// LayerNorm 1 weight and bias.
    pub norm1: (Vec<f32>, Vec<f32>),
    /// Fused qkv weight `[3d, d]` and bias.
    pub qkv: (Vec<f32>, Vec<f32>),
    /// Projection.
    pub proj: (Vec<f32>, Vec<f32>),
    /// LayerNorm 2.
    pub norm2: (Vec<f32>, Vec<f32>),
    /// MLP fc1.
    pub fc1: (Vec<f32>, Vec<f32>),
    /// MLP fc2.
    pub fc2: (Vec<f32>, Vec<f32>),
    /// LayerScale gammas (ones when the family has none).
    pub ls: (Vec<f32>, Vec<f32>),
    /// timm's `qk_norm`: gains and biases `[q | k]` (`2·head_dim` each).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
}

fn read(model: &Checkpoint, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = model
        .get(name)
        .ok_or_else(|| Error::tensor(model.path(), name, "missing"))?;
    if t.numel() != len {
        return Err(Error::tensor(
            model.path(),
            name,
            format!("has {} elements, expected {len}", t.numel()),
        ));
    }
    let v = model.read_f32(t)?;
    // A NaN or Inf in a weight, bias, LayerNorm or embedding would surface as a bad Gram or
    // NaN features far from its cause: name the tensor here.
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::tensor(
            model.path(),
            name,
            format!("holds a non-finite value ({} at index {i})", v[i]),
        ));
    }
    Ok(v)
}

fn read_or_zero(model: &Checkpoint, name: &str, len: usize) -> Result<Vec<f32>> {
    if model.get(name).is_some() {
        read(model, name, len)
    } else {
        Ok(vec![0.0; len])
    }
}

impl HostBlock {
    /// Reads block `b` from the checkpoint.
    pub fn load(model: &Checkpoint, spec: &VitSpec, b: &BlockNames) -> Result<HostBlock> {
        let g = b.geom;
        let (d, m) = (g.dim, g.mlp);
        let lin = |prefix: &str, out: usize, inp: usize| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((
                read(model, &format!("{prefix}.weight"), out * inp)?,
                read_or_zero(model, &format!("{prefix}.bias"), out)?,
            ))
        };
        let mut qkv = (Vec::with_capacity(3 * d * d), Vec::with_capacity(3 * d));
        for (role, prefix) in &b.qkv {
            let rows = if *role == Role::Qkv { 3 * d } else { d };
            let (w, bias) = lin(prefix, rows, d)?;
            qkv.0.extend(w);
            qkv.1.extend(bias);
        }
        let ls = match &b.ls {
            Some((a, c)) => (read(model, a, d)?, read(model, c, d)?),
            None => (vec![1.0; d], vec![1.0; d]),
        };
        let hd = d / g.heads;
        let merge = match &b.merge {
            Some((nw, nb, red)) => Some((
                (read(model, nw, g.merge_in)?, read(model, nb, g.merge_in)?),
                lin(red, d, g.merge_in)?,
            )),
            None => None,
        };
        let bias = match &b.rel_bias {
            Some(t) => {
                let span = 2 * g.window - 1;
                let table = read(model, t, span * span * g.heads)?;
                Some(swin::attention_bias(
                    &table,
                    g.heads,
                    g.window,
                    spec.grid_side(b.index),
                    spec.block_shift(b.index),
                ))
            }
            None => None,
        };
        let qk_norm = match &b.qk_norm {
            Some([qw, qb, kw, kb]) => Some((
                [read(model, qw, hd)?, read(model, kw, hd)?].concat(),
                [read_or_zero(model, qb, hd)?, read_or_zero(model, kb, hd)?].concat(),
            )),
            None => None,
        };
        Ok(HostBlock {
            index: b.index,
            merge,
            bias,
            norm1: (read(model, &b.norm1.0, d)?, read(model, &b.norm1.1, d)?),
            qkv,
            proj: lin(&b.proj, d, d)?,
            norm2: (read(model, &b.norm2.0, d)?, read(model, &b.norm2.1, d)?),
            fc1: lin(&b.fc1, m, d)?,
            fc2: lin(&b.fc2, d, m)?,
            ls,
            qk_norm,
        })
    }

    /// Replaces the weight of the layer with `role` by `w` (a dequantized layer; HF's query,
    /// key and value are each a third of the fused `qkv`).
    pub fn set_weight(&mut self, role: Role, w: &[f32]) {
        let third = w.len();
        let (dst, off) = match role {
            Role::Reduction => match &mut self.merge {
                Some((_, r)) => (&mut r.0, 0),
                None => return,
            },
            Role::Qkv => (&mut self.qkv.0, 0),
            Role::Query => (&mut self.qkv.0, 0),
            Role::Key => (&mut self.qkv.0, third),
            Role::Value => (&mut self.qkv.0, 2 * third),
            Role::Proj => (&mut self.proj.0, 0),
            Role::Fc1 => (&mut self.fc1.0, 0),
            Role::Fc2 => (&mut self.fc2.0, 0),
        };
        dst[off..off + w.len()].copy_from_slice(w);
    }

    /// Uploads to a device.
    pub fn upload<O: Ops>(&self, ops: &O) -> Result<BlockWeights<O::T>> {
        let up = |p: &(Vec<f32>, Vec<f32>)| -> Result<(O::T, O::T)> {
            Ok((ops.upload(&p.0)?, ops.upload(&p.1)?))
        };
        Ok(BlockWeights {
            index: self.index,
            merge: match &self.merge {
                Some((n, r)) => Some((up(n)?, up(r)?)),
                None => None,
            },
            bias: match &self.bias {
                Some((b, groups)) => Some((ops.upload(b)?, *groups)),
                None => None,
            },
            norm1: up(&self.norm1)?,
            qkv: up(&self.qkv)?,
            proj: up(&self.proj)?,
            norm2: up(&self.norm2)?,
            fc1: up(&self.fc1)?,
            fc2: up(&self.fc2)?,
            ls: up(&self.ls)?,
            qk_norm: self.qk_norm.as_ref().map(up).transpose()?,
        })
    }
}

/// Embedding weights on a device; the head, applied on the host to the downloaded features,
/// stays on the host.
pub struct Stem<T> {
    map: Option<MapHead>,
    /// The pooling head's key and value projections (rows `d..3d` of its `in_proj`), on the
    /// device: every token goes through them there, the single probe query on the host.
    map_kv: Option<(T, T)>,
    patch: (T, T),
    prefix: T,
    pos: T,
    norm_pre: Option<(T, T)>,
    norm: Option<(T, T)>,
    fc_norm: Option<(Vec<f32>, Vec<f32>)>,
    head: Vec<(Vec<f32>, Vec<f32>)>,
}

/// Host copy of the embedding and head weights.
#[derive(Debug, Clone)]
pub struct HostStem {
    /// SigLIP's attention-pooling head (host arithmetic at the end of the pass).
    map: Option<MapHead>,
    patch: (Vec<f32>, Vec<f32>),
    prefix: Vec<f32>,
    pos: Vec<f32>,
    norm_pre: Option<(Vec<f32>, Vec<f32>)>,
    norm: Option<(Vec<f32>, Vec<f32>)>,
    /// timm's LayerNorm of the pooled features (host arithmetic, like the head).
    fc_norm: Option<(Vec<f32>, Vec<f32>)>,
    head: Vec<(Vec<f32>, Vec<f32>)>,
}

impl HostStem {
    /// Reads the embeddings (position embedding resized to the input grid) and the head.
    pub fn load(model: &Checkpoint, spec: &VitSpec) -> Result<HostStem> {
        let d = spec.dim;
        let c = spec.preprocess.channels;
        let p = spec.patch;
        let mut prefix = Vec::new();
        for (i, t) in spec.tokens.iter().enumerate() {
            // The register tokens are one tensor of `registers` rows, last.
            let rows = if spec.registers > 0 && i + 1 == spec.tokens.len() {
                spec.registers
            } else {
                1
            };
            prefix.extend(read(model, t, rows * d)?);
        }
        let (gh, gw) = spec.input_grid();
        let stored_grid = (spec.pos_grid, spec.pos_grid_w);
        // The position embedding covers the first `pos_prefix` prefix tokens, then the patches.
        let pt = spec.pos_prefix;
        let pos = match &spec.pos_embed_resized {
            // No position embedding (a Swin): zeros.
            None if spec.pos_embed.is_empty() => vec![0.0; (pt + gh * gw) * d],
            Some(n) => read(model, n, (pt + gh * gw) * d)?,
            None => {
                let stored = read(
                    model,
                    &spec.pos_embed,
                    (pt + stored_grid.0 * stored_grid.1) * d,
                )?;
                if (gh, gw) == stored_grid {
                    stored
                } else {
                    let mut v = stored[..pt * d].to_vec();
                    v.extend(bicubic_resize_rect(
                        &stored[pt * d..],
                        stored_grid,
                        (gh, gw),
                        d,
                    ));
                    v
                }
            }
        };
        // The other prefix tokens (registers, timm's `no_embed_class`) are added after the
        // position embedding: zeros in their rows.
        let pos = if spec.prefix_tokens > pt {
            let mut v = pos[..pt * d].to_vec();
            v.resize(spec.prefix_tokens * d, 0.0);
            v.extend_from_slice(&pos[pt * d..]);
            v
        } else {
            pos
        };
        let lin = |h: &str, inp: usize| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((
                read(model, &format!("{h}.weight"), spec.num_classes * inp)?,
                read_or_zero(model, &format!("{h}.bias"), spec.num_classes)?,
            ))
        };
        // The final norm and the head see the last block's width (a Swin's grows).
        let out = spec.out_dim();
        let head = match &spec.head {
            Head::None => vec![],
            Head::Cls(h) => vec![lin(h, out)?],
            Head::ClsMean(h) => vec![lin(h, 2 * d)?],
            Head::ClsDist(h, k) => vec![lin(h, d)?, lin(k, d)?],
        };
        let map = match &spec.pool {
            Pool::Map(h) => Some(MapHead::load(model, spec, h)?),
            _ => None,
        };
        Ok(HostStem {
            map,
            patch: (
                read(model, &spec.patch_embed.0, d * c * p * p)?,
                read_or_zero(model, &spec.patch_embed.1, d)?,
            ),
            prefix,
            pos,
            norm_pre: match &spec.norm_pre {
                Some((w, b)) => Some((read(model, w, d)?, read(model, b, d)?)),
                None => None,
            },
            norm: match &spec.norm {
                Some((w, b)) => Some((read(model, w, out)?, read(model, b, out)?)),
                None => None,
            },
            fc_norm: match &spec.fc_norm {
                Some((w, b)) => Some((read(model, w, d)?, read(model, b, d)?)),
                None => None,
            },
            head,
        })
    }

    /// Uploads to a device.
    pub fn upload<O: Ops>(&self, ops: &O) -> Result<Stem<O::T>> {
        Ok(Stem {
            map: self.map.clone(),
            map_kv: match &self.map {
                Some(m) => {
                    let d = m.probe.len();
                    Some((ops.upload(&m.qkv.0[d * d..])?, ops.upload(&m.qkv.1[d..])?))
                }
                None => None,
            },
            patch: (ops.upload(&self.patch.0)?, ops.upload(&self.patch.1)?),
            prefix: ops.upload(&self.prefix)?,
            pos: ops.upload(&self.pos)?,
            norm_pre: match &self.norm_pre {
                Some((w, b)) => Some((ops.upload(w)?, ops.upload(b)?)),
                None => None,
            },
            norm: match &self.norm {
                Some((w, b)) => Some((ops.upload(w)?, ops.upload(b)?)),
                None => None,
            },
            fc_norm: self.fc_norm.clone(),
            head: self.head.clone(),
        })
    }
}

/// Bicubic resize (A = −0.75, half-pixel centres, clamped borders: PyTorch's
/// `interpolate(mode="bicubic", align_corners=False)`) of a `[g, g, d]` grid to `[h, h, d]`.
pub fn bicubic_resize(src: &[f32], g: usize, h: usize, d: usize) -> Vec<f32> {
    bicubic_resize_rect(src, (g, g), (h, h), d)
}

/// [`bicubic_resize`] of a `[gh, gw, d]` grid to `[h, w, d]` (each axis scaled on its own, as
/// `interpolate(size=(h, w))` does).
pub fn bicubic_resize_rect(
    src: &[f32],
    (gh, gw): (usize, usize),
    (h, w): (usize, usize),
    d: usize,
) -> Vec<f32> {
    fn weights(t: f64) -> [f64; 4] {
        let a = -0.75;
        let c1 = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
        let c2 = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
        [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
    }
    let taps = |from: usize, to: usize| -> Vec<(isize, [f64; 4])> {
        let scale = from as f64 / to as f64;
        (0..to)
            .map(|o| {
                let x = (o as f64 + 0.5) * scale - 0.5;
                let f = x.floor();
                (f as isize, weights(x - f))
            })
            .collect()
    };
    let (ty, tx) = (taps(gh, h), taps(gw, w));
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let mut out = vec![0.0f32; h * w * d];
    for (oy, (fy, wy)) in ty.iter().enumerate() {
        for (ox, (fx, wx)) in tx.iter().enumerate() {
            let dst = &mut out[(oy * w + ox) * d..(oy * w + ox + 1) * d];
            let mut acc = vec![0.0f64; d];
            for (i, wyi) in wy.iter().enumerate() {
                let sy = clamp(fy - 1 + i as isize, gh);
                for (j, wxj) in wx.iter().enumerate() {
                    let sx = clamp(fx - 1 + j as isize, gw);
                    let w = wyi * wxj;
                    let s = &src[(sy * gw + sx) * d..(sy * gw + sx + 1) * d];
                    for (a, &v) in acc.iter_mut().zip(s) {
                        *a += w * v as f64;
                    }
                }
            }
            for (o, a) in dst.iter_mut().zip(acc) {
                *o = a as f32;
            }
        }
    }
    out
}

/// The forward pass of one model on one device.
pub struct Forward<'a, O: Ops> {
    ops: &'a O,
    spec: &'a VitSpec,
}

impl<'a, O: Ops> Forward<'a, O> {
    /// Binds a model description to a device.
    pub fn new(ops: &'a O, spec: &'a VitSpec) -> Self {
        Forward { ops, spec }
    }

    /// Pixels `[n, c, s, s]` → tokens `[n · t, d]`.
    pub fn embed(&self, stem: &Stem<O::T>, pixels: &[f32], n: usize) -> Result<O::T> {
        let s = self.spec;
        let (c, p, d) = (s.preprocess.channels, s.patch, s.dim);
        let (sh, sw) = (s.preprocess.crop, s.preprocess.crop_w);
        if pixels.len() != n * c * sh * sw {
            return Err(Error::Shape(format!(
                "{} pixel values for {n} images of {c}x{sh}x{sw}",
                pixels.len()
            )));
        }
        let px = self.ops.upload(pixels)?;
        let patches =
            self.ops
                .patch_embed(&px, n, c, (sh, sw), p, &stem.patch.0, &stem.patch.1, d)?;
        let g = (sh / p) * (sw / p);
        let h = self
            .ops
            .assemble(&patches, &stem.prefix, &stem.pos, n, s.prefix_tokens, g, d)?;
        match &stem.norm_pre {
            // CLIP's pre-LayerNorm over every token, before the first block.
            Some((w, b)) => self
                .ops
                .layernorm(&h, n * (s.prefix_tokens + g), d, w, b, s.eps),
            None => Ok(h),
        }
    }

    /// Moves `h` (`[n · t, d]`) through one block, handing each linear layer's input to
    /// `observe` (site, activations, rows). With `until`, stops right after observing that site
    /// (then `h` is left unchanged). A Swin block first merges `h`'s 2×2 token groups when it
    /// starts a stage (`h` then has 4× the tokens at the previous width).
    pub fn block(
        &self,
        w: &BlockWeights<O::T>,
        h: &mut O::T,
        n: usize,
        until: Option<Site>,
        observe: &mut Observer<'_, O::T>,
    ) -> Result<()> {
        let s = self.spec;
        let ops = self.ops;
        let g = s.blocks[w.index].geom;
        let Some(((nw, nb), (rw, rb))) = &w.merge else {
            return self.attend(w, h, n, until, observe);
        };
        // Each run of four gathered rows of the previous width is one merged row 4× as wide.
        let rows = n * s.block_tokens(w.index);
        let prev = g.merge_in / 4;
        let order = swin::merge_order(n, 2 * s.grid_side(w.index));
        let x = ops.gather_rows(h, &order, prev)?;
        let x = ops.layernorm(&x, rows, g.merge_in, nw, nb, s.eps)?;
        observe(Site::MergeIn, &x, rows)?;
        if until == Some(Site::MergeIn) {
            return Ok(());
        }
        let mut merged = ops.linear(&x, rows, g.merge_in, rw, rb, g.dim)?;
        drop(x);
        self.attend(w, &mut merged, n, until, observe)?;
        if until.is_none() {
            *h = merged;
        }
        Ok(())
    }

    /// The block after any patch merging: attention (over windows for a Swin), then the MLP.
    fn attend(
        &self,
        w: &BlockWeights<O::T>,
        h: &mut O::T,
        n: usize,
        until: Option<Site>,
        observe: &mut Observer<'_, O::T>,
    ) -> Result<()> {
        let s = self.spec;
        let g = s.blocks[w.index].geom;
        let (d, m, ops) = (g.dim, g.mlp, self.ops);
        let hd = d / g.heads;
        let t = s.block_tokens(w.index);
        let rows = n * t;
        let x = ops.layernorm(h, rows, d, &w.norm1.0, &w.norm1.1, s.eps)?;
        observe(Site::AttnIn, &x, rows)?;
        if until == Some(Site::AttnIn) {
            return Ok(());
        }
        let mut qkv = ops.linear(&x, rows, d, &w.qkv.0, &w.qkv.1, 3 * d)?;
        drop(x);
        if let Some((gain, b)) = &w.qk_norm {
            ops.qk_norm(&mut qkv, rows, g.heads, hd, gain, b, s.eps)?;
        }
        let a = if g.window > 0 {
            // Swin: the rows regrouped by (shifted) window, each window attended to on its
            // own with the block's bias, then put back in grid order.
            let side = s.grid_side(w.index);
            let order = swin::window_order(n, side, g.window, s.block_shift(w.index));
            let qkv = ops.gather_rows(&qkv, &order, 3 * d)?;
            let windows = n * (side / g.window) * (side / g.window);
            let bias = w.bias.as_ref().map(|(b, groups)| (b, *groups));
            let a = ops.attention(&qkv, windows, g.window * g.window, g.heads, hd, bias)?;
            ops.gather_rows(&a, &swin::inverse(&order), d)?
        } else {
            ops.attention(&qkv, n, t, g.heads, hd, None)?
        };
        drop(qkv);
        observe(Site::ProjIn, &a, rows)?;
        if until == Some(Site::ProjIn) {
            return Ok(());
        }
        let o = ops.linear(&a, rows, d, &w.proj.0, &w.proj.1, d)?;
        drop(a);
        if until == Some(Site::MlpIn) || until == Some(Site::Fc2In) {
            // Partial forwards work on a copy so `h` stays the block's input.
            let mut h2 = ops.duplicate(h)?;
            return self.mlp(w, &mut h2, &o, rows, d, m, until, observe);
        }
        self.mlp(w, h, &o, rows, d, m, until, observe)
    }

    fn mlp(
        &self,
        w: &BlockWeights<O::T>,
        h: &mut O::T,
        o: &O::T,
        rows: usize,
        d: usize,
        m: usize,
        until: Option<Site>,
        observe: &mut Observer<'_, O::T>,
    ) -> Result<()> {
        let ops = self.ops;
        ops.add_scaled(h, o, &w.ls.0, rows, d)?;
        let x = ops.layernorm(h, rows, d, &w.norm2.0, &w.norm2.1, self.spec.eps)?;
        observe(Site::MlpIn, &x, rows)?;
        if until == Some(Site::MlpIn) {
            return Ok(());
        }
        let mut f = ops.linear(&x, rows, d, &w.fc1.0, &w.fc1.1, m)?;
        drop(x);
        ops.activation(&mut f, rows * m, self.spec.act)?;
        observe(Site::Fc2In, &f, rows)?;
        if until == Some(Site::Fc2In) {
            return Ok(());
        }
        let o2 = ops.linear(&f, rows, m, &w.fc2.0, &w.fc2.1, d)?;
        ops.add_scaled(h, &o2, &w.ls.1, rows, d)
    }

    /// Final LayerNorm and pooling; returns the pooled features `[n, d]` (the class token, the
    /// mean of the patches or the attention-pooling head's output, after timm's `fc_norm`), the
    /// logits `[n, classes]` when the model has a head, and every token after the final norm.
    pub fn finish(&self, stem: &Stem<O::T>, h: &O::T, n: usize) -> Result<Output> {
        let s = self.spec;
        let (d, t) = (s.out_dim(), s.out_tokens());
        let normed = match &stem.norm {
            Some((w, b)) => Some(self.ops.layernorm(h, n * t, d, w, b, s.eps)?),
            None => None,
        };
        let normed = normed.as_ref().unwrap_or(h);
        let all = self.ops.download(normed)?;
        let token = |i: usize, k: usize| &all[(i * t + k) * d..(i * t + k + 1) * d];
        let mut pooled: Vec<f32> = match (&s.pool, &stem.map, &stem.map_kv) {
            (Pool::Map(_), Some(m), Some((w, b))) => {
                let kv = self.ops.linear(normed, n * t, d, w, b, 2 * d)?;
                let kv = self.ops.download(&kv)?;
                (0..n)
                    .flat_map(|i| {
                        let rows = &kv[i * t * 2 * d..(i + 1) * t * 2 * d];
                        m.pool(rows, s.heads, s.eps, s.act)
                    })
                    .collect()
            }
            (Pool::Mean, _, _) => (0..n)
                .flat_map(|i| {
                    let mut mean = vec![0.0f64; d];
                    for k in s.prefix_tokens..t {
                        for (m, v) in mean.iter_mut().zip(token(i, k)) {
                            *m += *v as f64;
                        }
                    }
                    let np = (t - s.prefix_tokens) as f64;
                    mean.into_iter().map(move |m| (m / np) as f32)
                })
                .collect(),
            _ => (0..n).flat_map(|i| token(i, 0).to_vec()).collect(),
        };
        if let Some((w, b)) = &stem.fc_norm {
            for f in pooled.chunks_mut(d) {
                let normed = layer_norm(f, w, b, s.eps);
                f.copy_from_slice(&normed);
            }
        }
        let classes = s.num_classes;
        let apply = |w: &[f32], b: &[f32], x: &[f32]| -> Vec<f32> {
            let k = x.len();
            (0..classes)
                .map(|c| {
                    b[c] + w[c * k..(c + 1) * k]
                        .iter()
                        .zip(x)
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                })
                .collect()
        };
        let mut logits = Vec::new();
        for i in 0..n {
            match (&s.head, stem.head.as_slice()) {
                (Head::Cls(_), [(w, b)]) => logits.extend(apply(w, b, &pooled[i * d..(i + 1) * d])),
                (Head::ClsDist(..), [(w, b), (w2, b2)]) => {
                    let a = apply(w, b, token(i, 0));
                    let c = apply(w2, b2, token(i, 1));
                    logits.extend(a.iter().zip(&c).map(|(x, y)| 0.5 * (x + y)));
                }
                (Head::ClsMean(_), [(w, b)]) => {
                    let mut x = token(i, 0).to_vec();
                    let mut mean = vec![0.0f32; d];
                    for k in s.prefix_tokens..t {
                        for (m, v) in mean.iter_mut().zip(token(i, k)) {
                            *m += v;
                        }
                    }
                    let np = (t - s.prefix_tokens) as f32;
                    x.extend(mean.iter().map(|m| m / np));
                    logits.extend(apply(w, b, &x));
                }
                _ => {}
            }
        }
        Ok(Output {
            cls: pooled,
            logits,
            tokens: all,
        })
    }
}

/// LayerNorm of one vector on the host, in f64 (the pooled features' `fc_norm`, the pooling
/// head's norm).
fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let (mean, inv) = crate::numeric::linalg::layernorm_stats(x, eps);
    x.iter()
        .zip(w.iter().zip(b))
        .map(|(v, (g, b))| ((*v as f64 - mean) * inv) as f32 * g + b)
        .collect()
}

/// SigLIP's multi-head attention-pooling head, on the host: `[t, d]` tokens in, `[d]` out.
#[derive(Debug, Clone)]
pub struct MapHead {
    probe: Vec<f32>,
    /// `in_proj`: q | k | v rows, `[3d, d]`, and its bias.
    qkv: (Vec<f32>, Vec<f32>),
    out: (Vec<f32>, Vec<f32>),
    norm: (Vec<f32>, Vec<f32>),
    fc1: (Vec<f32>, Vec<f32>),
    fc2: (Vec<f32>, Vec<f32>),
    /// The MLP's hidden width.
    mlp: usize,
}

/// `y = W x + b` for `W` `[rows, x.len()]`, summed in f64.
fn affine(w: &[f32], b: &[f32], x: &[f32]) -> Vec<f32> {
    let k = x.len();
    b.iter()
        .enumerate()
        .map(|(r, &bias)| {
            let dot: f64 = w[r * k..(r + 1) * k]
                .iter()
                .zip(x)
                .map(|(a, v)| *a as f64 * *v as f64)
                .sum();
            (dot + bias as f64) as f32
        })
        .collect()
}

impl MapHead {
    fn load(model: &Checkpoint, spec: &VitSpec, h: &str) -> Result<MapHead> {
        let d = spec.dim;
        let mlp = model
            .get(&format!("{h}.mlp.fc1.weight"))
            .and_then(|t| t.shape.first().copied())
            .unwrap_or(0);
        let lin = |n: &str, out: usize, inp: usize| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((
                read(model, &format!("{h}.{n}.weight"), out * inp)?,
                read_or_zero(model, &format!("{h}.{n}.bias"), out)?,
            ))
        };
        if spec.family.is_timm() {
            // timm's AttentionPoolLatent: the latent query, `q` and `kv` (keys, then values).
            let (q, kv) = (lin("q", d, d)?, lin("kv", 2 * d, d)?);
            return Ok(MapHead {
                probe: read(model, &format!("{h}.latent"), d)?,
                qkv: ([q.0, kv.0].concat(), [q.1, kv.1].concat()),
                out: lin("proj", d, d)?,
                norm: (
                    read(model, &format!("{h}.norm.weight"), d)?,
                    read(model, &format!("{h}.norm.bias"), d)?,
                ),
                fc1: lin("mlp.fc1", mlp, d)?,
                fc2: lin("mlp.fc2", d, mlp)?,
                mlp,
            });
        }
        Ok(MapHead {
            probe: read(model, &format!("{h}.probe"), d)?,
            qkv: (
                read(model, &format!("{h}.attention.in_proj_weight"), 3 * d * d)?,
                read(model, &format!("{h}.attention.in_proj_bias"), 3 * d)?,
            ),
            out: lin("attention.out_proj", d, d)?,
            norm: (
                read(model, &format!("{h}.layernorm.weight"), d)?,
                read(model, &format!("{h}.layernorm.bias"), d)?,
            ),
            fc1: lin("mlp.fc1", mlp, d)?,
            fc2: lin("mlp.fc2", d, mlp)?,
            mlp,
        })
    }

    /// The pooled features of one image from its tokens' keys and values (`kv`, `[t, 2d]`:
    /// each row a token's key, then its value).
    fn pool(&self, kv: &[f32], heads: usize, eps: f32, act: Activation) -> Vec<f32> {
        let d = self.probe.len();
        let hd = d / heads;
        let q = affine(&self.qkv.0[..d * d], &self.qkv.1[..d], &self.probe);
        let kv: Vec<(&[f32], &[f32])> = kv.chunks_exact(2 * d).map(|r| r.split_at(d)).collect();
        let scale = 1.0 / (hd as f64).sqrt();
        let mut attn = vec![0.0f32; d];
        for h in 0..heads {
            let r = h * hd..(h + 1) * hd;
            let logits: Vec<f64> = kv
                .iter()
                .map(|(k, _)| {
                    q[r.clone()]
                        .iter()
                        .zip(&k[r.clone()])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
            let z: f64 = e.iter().sum();
            for (j, o) in attn[r.clone()].iter_mut().enumerate() {
                *o = (kv
                    .iter()
                    .zip(&e)
                    .map(|((_, v), p)| p * v[h * hd + j] as f64)
                    .sum::<f64>()
                    / z) as f32;
            }
        }
        let hidden = affine(&self.out.0, &self.out.1, &attn);
        let normed = layer_norm(&hidden, &self.norm.0, &self.norm.1, eps);
        let f: Vec<f32> = affine(&self.fc1.0, &self.fc1.1, &normed)
            .into_iter()
            .map(|v| act.apply(v))
            .collect();
        debug_assert_eq!(f.len(), self.mlp);
        let m = affine(&self.fc2.0, &self.fc2.1, &f);
        hidden.iter().zip(&m).map(|(a, b)| a + b).collect()
    }
}

/// What the forward pass returns for a batch.
#[derive(Debug, Clone)]
pub struct Output {
    /// The pooled features after the final LayerNorm, `[n, d]`: the class token's, or the
    /// model's pooling head's (SigLIP), or the mean of the tokens.
    pub cls: Vec<f32>,
    /// Logits `[n, classes]` (empty for a backbone).
    pub logits: Vec<f32>,
    /// All tokens after the final LayerNorm, `[n, t, d]`.
    pub tokens: Vec<f32>,
}

/// A whole-model forward for evaluation: the stem and every block resident at once is not
/// needed — blocks are uploaded one at a time while the batch's hidden state stays on the device.
pub fn run_model<O: Ops>(
    ops: &O,
    spec: &VitSpec,
    stem: &HostStem,
    blocks: &mut dyn FnMut(usize) -> Result<HostBlock>,
    pixels: &[f32],
    n: usize,
) -> Result<Output> {
    let f = Forward::new(ops, spec);
    let stem = stem.upload(ops)?;
    let mut h = f.embed(&stem, pixels, n)?;
    for b in 0..spec.depth {
        let w = blocks(b)?.upload(ops)?;
        f.block(&w, &mut h, n, None, &mut |_, _, _| Ok(()))?;
    }
    f.finish(&stem, &h, n)
}
