//! The forward pass's device primitives: what a backend must do for the ViT forward pass
//! (`crate::model::forward`) to run on it. The CPU implements them in [`super::cpu_ops`], the
//! GPU in [`super::wgpu::forward`]; the pass itself is written once above them. [`AnyOps`] is
//! the one chosen at run time.

use crate::error::Result;
use crate::numeric::gram::Gram;

/// The primitives a device runs for the forward pass. All tensors are row-major f32.
pub trait Ops {
    /// A tensor resident on the device.
    type T;
    /// A Gram accumulator resident on the device.
    type G;
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
    /// Exact (erf) GELU in place over `len` elements.
    fn gelu(&self, x: &mut Self::T, len: usize) -> Result<()>;
    /// Softmax attention: `qkv[n·t, 3·heads·hd]` (q | k | v, heads inside each) → `[n·t, heads·hd]`.
    fn attention(
        &self,
        qkv: &Self::T,
        n: usize,
        t: usize,
        heads: usize,
        hd: usize,
    ) -> Result<Self::T>;
    /// `h[r, :] += gamma ⊙ o[r, :]` over `rows × d`.
    fn add_scaled(
        &self,
        h: &mut Self::T,
        o: &Self::T,
        gamma: &Self::T,
        rows: usize,
        d: usize,
    ) -> Result<()>;
    /// Non-overlapping `p × p` patch convolution of `px[n, c, s, s]` → `[n · (s/p)², d]`.
    fn patch_embed(
        &self,
        px: &Self::T,
        n: usize,
        c: usize,
        side: usize,
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
    /// Waits until the work recorded so far has run (for stage timings; a no-op on the CPU).
    fn sync(&self) -> Result<()> {
        Ok(())
    }
}
