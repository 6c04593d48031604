//! The forward pass's device primitives: what a backend must do for the ViT forward pass
//! (`crate::model::forward`) to run on it. The CPU implements them in [`super::cpu_ops`], the
//! GPU in [`super::wgpu::forward`]; the pass itself is written once above them.
//! [`super::AnyOps`] is the one chosen at run time.

use crate::error::Result;
use crate::numeric::gram::Gram;

/// The MLP activation of a model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU, `x · Φ(x)` (erf): ViT, DeiT, DINOv2.
    #[default]
    Gelu,
    /// `x · σ(1.702 x)`: OpenAI CLIP (`quick_gelu`).
    QuickGelu,
    /// The tanh approximation of GELU (`gelu_pytorch_tanh`, `gelu_new`): SigLIP.
    GeluTanh,
}

impl Activation {
    /// The activation's value at `x` (the CPU's, and the reference of the WGSL kernel).
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Gelu => crate::device::cpu_ops::gelu(x),
            Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
            Activation::GeluTanh => {
                let k = 0.797_884_6_f32; // sqrt(2 / pi)
                0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
            }
        }
    }

    /// Its name as `inspect` prints it.
    pub fn label(self) -> &'static str {
        match self {
            Activation::Gelu => "GELU",
            Activation::QuickGelu => "QuickGELU",
            Activation::GeluTanh => "tanh-GELU",
        }
    }

    /// Its number in the WGSL kernel's parameters.
    pub fn code(self) -> u32 {
        match self {
            Activation::Gelu => 0,
            Activation::QuickGelu => 1,
            Activation::GeluTanh => 2,
        }
    }
}

/// The primitives a device runs for the forward pass. All tensors are row-major f32.
pub trait Ops {
    /// A tensor resident on the device.
    type T;
    /// A Gram accumulator resident on the device.
    type G;
    /// A cross-Gram accumulator resident on the device.
    type X;
    /// Short description of the device.
    fn describe(&self) -> String;
    /// Copies host data to the device.
    fn upload(&self, data: &[f32]) -> Result<Self::T>;
    /// Copies a tensor back to the host.
    fn download(&self, t: &Self::T) -> Result<Vec<f32>>;
    /// A copy of a tensor, on the device.
    fn duplicate(&self, t: &Self::T) -> Result<Self::T>;
    /// `y[rows, n] = x[rows, k] · wᵀ + b` with `w` `[n, k]`.
    fn linear(
        &self,
        x: &Self::T,
        rows: usize,
        k: usize,
        w: &Self::T,
        b: &Self::T,
        n: usize,
    ) -> Result<Self::T>;
    /// Row-wise LayerNorm of `x[rows, d]`.
    fn layernorm(
        &self,
        x: &Self::T,
        rows: usize,
        d: usize,
        w: &Self::T,
        b: &Self::T,
        eps: f32,
    ) -> Result<Self::T>;
    /// The MLP activation `act` in place over `len` elements.
    fn activation(&self, x: &mut Self::T, len: usize, act: Activation) -> Result<()>;
    /// Softmax attention: `qkv[n·t, 3·heads·hd]` (q | k | v, heads inside each) → `[n·t, heads·hd]`,
    /// over `n` independent sequences of `t` tokens. With `bias = (b, groups)`, sequence `i`'s
    /// scaled logits get `b[i mod groups, head, query, key]` added (`b` is
    /// `[groups, heads, t, t]`: Swin's relative position bias and shifted-window mask).
    fn attention(
        &self,
        qkv: &Self::T,
        n: usize,
        t: usize,
        heads: usize,
        hd: usize,
        bias: Option<(&Self::T, usize)>,
    ) -> Result<Self::T>;
    /// `y[r, :] = x[order[r], :]` for rows of width `d`: `order.len()` rows out (Swin's window
    /// partition, shift and patch merging).
    fn gather_rows(&self, x: &Self::T, order: &[u32], d: usize) -> Result<Self::T>;
    /// timm's `qk_norm`: in `qkv[rows, 3·heads·hd]`, each head's query and key (not the value)
    /// LayerNormed over its `hd` values in place, the queries with `gain[..hd]` and
    /// `bias[..hd]`, the keys with `gain[hd..]` and `bias[hd..]`.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm(
        &self,
        qkv: &mut Self::T,
        rows: usize,
        heads: usize,
        hd: usize,
        gain: &Self::T,
        bias: &Self::T,
        eps: f32,
    ) -> Result<()>;
    /// `h[r, :] += gamma ⊙ o[r, :]` over `rows × d`.
    fn add_scaled(
        &self,
        h: &mut Self::T,
        o: &Self::T,
        gamma: &Self::T,
        rows: usize,
        d: usize,
    ) -> Result<()>;
    /// Non-overlapping `p × p` patch convolution of `px[n, c, h, w]` (`side = (h, w)`) →
    /// `[n · (h/p) · (w/p), d]` (pixels past the last whole patch dropped).
    fn patch_embed(
        &self,
        px: &Self::T,
        n: usize,
        c: usize,
        side: (usize, usize),
        p: usize,
        w: &Self::T,
        b: &Self::T,
        d: usize,
    ) -> Result<Self::T>;
    /// Builds `[n, prefix + g, d]` tokens: the `prefix` learned tokens, then the patches, plus
    /// the position embedding `pos[prefix + g, d]`.
    fn assemble(
        &self,
        patches: &Self::T,
        prefix: &Self::T,
        pos: &Self::T,
        n: usize,
        prefix_tokens: usize,
        g: usize,
        d: usize,
    ) -> Result<Self::T>;
    /// A zeroed Gram accumulator of width `n`.
    fn gram_new(&self, n: usize) -> Result<Self::G>;
    /// `G += xᵀx` for `x[rows, n]`.
    fn gram_add(&self, g: &mut Self::G, x: &Self::T, rows: usize) -> Result<()>;
    /// The accumulated Gram (f64 on the host).
    fn gram_finish(&self, g: Self::G) -> Result<Gram>;
    /// A zeroed cross-Gram accumulator of width `n` (`--calib-mode corrected`).
    fn cross_new(&self, n: usize) -> Result<Self::X>;
    /// `C += xqᵀ·xf` for `xq, xf [rows, n]`: the quantized model's inputs of some rows against
    /// the full-precision model's inputs of the same rows. The same contract as the Gram: f32
    /// partials over row chunks, summed in f64.
    fn cross_add(&self, c: &mut Self::X, xq: &Self::T, xf: &Self::T, rows: usize) -> Result<()>;
    /// The accumulated cross-Gram (f64 on the host).
    fn cross_finish(&self, c: Self::X) -> Result<crate::numeric::gram::CrossGram>;
    /// Waits until the work recorded so far has run (for stage timings; a no-op on the CPU).
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// Called once per batch: waits until the work recorded before the previous call has run,
    /// so at most about two batches' work (and their temporary tensors) is in flight and the
    /// device holds to the memory plan. A no-op on the CPU.
    fn throttle(&self) -> Result<()> {
        Ok(())
    }
}
