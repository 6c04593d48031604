//! The forward primitives on the CPU: the reference the GPU kernels are tested against.
//!
//! GEMMs go through `matrixmultiply` (cache-blocked, SIMD) on row panels spread over rayon's
//! threads; attention runs image by image in parallel; Gram matrices are f32 GEMM partials over
//! 256 rows added into an f64 sum (the GPU's contract with a shorter f32 run).

use rayon::prelude::*;

use super::ops::{Activation, Ops};
use crate::error::Result;
use crate::numeric::gram::{CrossGram, Gram, GramAccumulator};
use crate::numeric::linalg::layernorm_stats;

/// CPU forward primitives; tensors are host vectors.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuOps;

/// Rows per parallel GEMM panel.
const PANEL: usize = 64;

/// Gram rows per parallel panel (each panel's f32 partial is added to the f64 sum while hot).
const GRAM_PANEL: usize = 64;

/// Activation rows per f32 Gram partial before it is added to the f64 sum.
const GRAM_ROWS: usize = super::cpu_gram::CHUNK;

/// `c[m, n] = a · b` with arbitrary strides (row stride, column stride) for each operand.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // Every element the kernel touches must be inside the slices.
    assert!(
        k == 0 || (m - 1) * rsa + (k - 1) * csa < a.len(),
        "sgemm: a out of bounds"
    );
    assert!(
        k == 0 || (k - 1) * rsb + (n - 1) * csb < b.len(),
        "sgemm: b out of bounds"
    );
    assert!(
        (m - 1) * rsc + (n - 1) * csc < c.len(),
        "sgemm: c out of bounds"
    );
    // SAFETY: the asserts above bound every index the kernel reads or writes; `c` is exclusive.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            0.0,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}

/// Exact GELU, `x · Φ(x)`.
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl Ops for CpuOps {
    type T = Vec<f32>;
    type G = GramAccumulator;
    type X = CrossGram;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn download(&self, t: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(t.clone())
    }

    fn duplicate(&self, t: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(t.clone())
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        rows: usize,
        k: usize,
        w: &Vec<f32>,
        b: &Vec<f32>,
        n: usize,
    ) -> Result<Vec<f32>> {
        if x.len() < rows * k || w.len() < n * k || b.len() < n {
            return Err(crate::error::Error::Internal(format!(
                "linear: x {} for {rows} × {k}, w {} and b {} for {n} outputs",
                x.len(),
                w.len(),
                b.len()
            )));
        }
        let mut y = vec![0.0f32; rows * n];
        let add_bias = |yc: &mut [f32]| {
            for row in yc.chunks_mut(n) {
                for (v, bias) in row.iter_mut().zip(b) {
                    *v += bias;
                }
            }
        };
        // The AVX-512 kernel computes the same sums bit for bit (see `cpu_linear`).
        if super::cpu_linear::linear(x, rows, k, w, n, &mut y, PANEL) {
            y.par_chunks_mut(PANEL * n).for_each(add_bias);
            return Ok(y);
        }
        y.par_chunks_mut(PANEL * n)
            .zip(x.par_chunks(PANEL * k))
            .for_each(|(yc, xc)| {
                let r = yc.len() / n;
                sgemm(r, k, n, xc, (k, 1), w, (1, k), yc, (n, 1));
                add_bias(yc);
            });
        Ok(y)
    }

    fn layernorm(
        &self,
        x: &Vec<f32>,
        rows: usize,
        d: usize,
        w: &Vec<f32>,
        b: &Vec<f32>,
        eps: f32,
    ) -> Result<Vec<f32>> {
        let mut y = vec![0.0f32; rows * d];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(yr, xr)| {
                let (mean, inv) = layernorm_stats(xr, eps);
                for j in 0..d {
                    yr[j] = ((xr[j] as f64 - mean) * inv) as f32 * w[j] + b[j];
                }
            });
        Ok(y)
    }

    fn activation(&self, x: &mut Vec<f32>, len: usize, act: Activation) -> Result<()> {
        x[..len].par_iter_mut().for_each(|v| *v = act.apply(*v));
        Ok(())
    }

    fn attention(
        &self,
        qkv: &Vec<f32>,
        n: usize,
        t: usize,
        heads: usize,
        hd: usize,
        bias: Option<(&Vec<f32>, usize)>,
    ) -> Result<Vec<f32>> {
        let d = heads * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        if let Some((b, groups)) = bias {
            if groups == 0 || b.len() != groups * heads * t * t {
                return Err(crate::error::Error::Shape(format!(
                    "attention bias of {} values for {groups} groups of {heads} heads over {t} tokens",
                    b.len()
                )));
            }
        }
        let mut out = vec![0.0f32; n * t * d];
        out.par_chunks_mut(t * d)
            .zip(qkv.par_chunks(t * 3 * d))
            .enumerate()
            .for_each(|(i, (o, x))| {
                let mut s = vec![0.0f32; t * t];
                for h in 0..heads {
                    let q = &x[h * hd..];
                    let k = &x[d + h * hd..];
                    let v = &x[2 * d + h * hd..];
                    sgemm(t, hd, t, q, (3 * d, 1), k, (1, 3 * d), &mut s, (t, 1));
                    match bias {
                        None => {
                            for row in s.chunks_mut(t) {
                                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                                let mut sum = 0.0f32;
                                for e in row.iter_mut() {
                                    *e = ((*e - mx) * scale).exp();
                                    sum += *e;
                                }
                                let inv = 1.0 / sum;
                                row.iter_mut().for_each(|e| *e *= inv);
                            }
                        }
                        Some((b, groups)) => {
                            let off = ((i % groups) * heads + h) * t * t;
                            for (row, brow) in s.chunks_mut(t).zip(b[off..off + t * t].chunks(t)) {
                                for (e, bv) in row.iter_mut().zip(brow) {
                                    *e = *e * scale + bv;
                                }
                                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                                let mut sum = 0.0f32;
                                for e in row.iter_mut() {
                                    *e = (*e - mx).exp();
                                    sum += *e;
                                }
                                let inv = 1.0 / sum;
                                row.iter_mut().for_each(|e| *e *= inv);
                            }
                        }
                    }
                    sgemm(
                        t,
                        t,
                        hd,
                        &s,
                        (t, 1),
                        v,
                        (3 * d, 1),
                        &mut o[h * hd..],
                        (d, 1),
                    );
                }
            });
        Ok(out)
    }

    fn gather_rows(&self, x: &Vec<f32>, order: &[u32], d: usize) -> Result<Vec<f32>> {
        let rows = x.len() / d.max(1);
        if let Some(bad) = order.iter().find(|&&r| r as usize >= rows) {
            return Err(crate::error::Error::Shape(format!(
                "row gather asks for row {bad} of {rows}"
            )));
        }
        let mut out = vec![0.0f32; order.len() * d];
        out.par_chunks_mut(d)
            .zip(order.par_iter())
            .for_each(|(o, &r)| o.copy_from_slice(&x[r as usize * d..(r as usize + 1) * d]));
        Ok(out)
    }

    fn qk_norm(
        &self,
        qkv: &mut Vec<f32>,
        rows: usize,
        heads: usize,
        hd: usize,
        gain: &Vec<f32>,
        bias: &Vec<f32>,
        eps: f32,
    ) -> Result<()> {
        let width = 3 * heads * hd;
        qkv[..rows * width].par_chunks_mut(width).for_each(|row| {
            // Segments 0..heads are the queries, heads..2·heads the keys.
            for (s, x) in row[..2 * heads * hd].chunks_mut(hd).enumerate() {
                let off = if s < heads { 0 } else { hd };
                let (mean, inv) = layernorm_stats(x, eps);
                for (j, v) in x.iter_mut().enumerate() {
                    *v = ((*v as f64 - mean) * inv) as f32 * gain[off + j] + bias[off + j];
                }
            }
        });
        Ok(())
    }

    fn add_scaled(
        &self,
        h: &mut Vec<f32>,
        o: &Vec<f32>,
        gamma: &Vec<f32>,
        _rows: usize,
        d: usize,
    ) -> Result<()> {
        h.par_chunks_mut(d)
            .zip(o.par_chunks(d))
            .for_each(|(hr, or)| {
                for j in 0..d {
                    hr[j] += gamma[j] * or[j];
                }
            });
        Ok(())
    }

    fn patch_embed(
        &self,
        px: &Vec<f32>,
        n: usize,
        c: usize,
        (sh, sw): (usize, usize),
        p: usize,
        w: &Vec<f32>,
        b: &Vec<f32>,
        d: usize,
    ) -> Result<Vec<f32>> {
        let (gh, gw) = (sh / p, sw / p);
        let k = c * p * p;
        let mut cols = vec![0.0f32; n * gh * gw * k];
        cols.par_chunks_mut(gh * gw * k)
            .enumerate()
            .for_each(|(i, img)| {
                for gy in 0..gh {
                    for gx in 0..gw {
                        let dst = &mut img[(gy * gw + gx) * k..(gy * gw + gx + 1) * k];
                        for ch in 0..c {
                            for ky in 0..p {
                                let src = ((i * c + ch) * sh + gy * p + ky) * sw + gx * p;
                                dst[(ch * p + ky) * p..(ch * p + ky + 1) * p]
                                    .copy_from_slice(&px[src..src + p]);
                            }
                        }
                    }
                }
            });
        self.linear(&cols, n * gh * gw, k, w, b, d)
    }

    fn assemble(
        &self,
        patches: &Vec<f32>,
        prefix: &Vec<f32>,
        pos: &Vec<f32>,
        n: usize,
        prefix_tokens: usize,
        g: usize,
        d: usize,
    ) -> Result<Vec<f32>> {
        let t = prefix_tokens + g;
        let mut h = vec![0.0f32; n * t * d];
        h.par_chunks_mut(t * d).enumerate().for_each(|(i, img)| {
            img[..prefix_tokens * d].copy_from_slice(&prefix[..prefix_tokens * d]);
            img[prefix_tokens * d..].copy_from_slice(&patches[i * g * d..(i + 1) * g * d]);
            for (v, p) in img.iter_mut().zip(pos) {
                *v += p;
            }
        });
        Ok(h)
    }

    fn gram_new(&self, n: usize) -> Result<GramAccumulator> {
        Ok(GramAccumulator::new(n))
    }

    fn gram_add(&self, g: &mut GramAccumulator, x: &Vec<f32>, rows: usize) -> Result<()> {
        // f32 GEMM partials over GRAM_ROWS rows, summed in f64: the GPU's contract, at GEMM speed.
        let n = g.n();
        if x.len() < rows * n {
            return Err(crate::error::Error::Internal(format!(
                "gram_add: {rows} rows of {n} from a tensor of {}",
                x.len()
            )));
        }
        // The AVX-512 kernel computes the same sums bit for bit (see `cpu_gram`).
        if g.add_upper_with(rows as u64, |sum| {
            super::cpu_gram::add_upper(sum, n, &x[..rows * n], rows)
        }) {
            return Ok(());
        }
        for chunk in x[..rows * n].chunks(GRAM_ROWS * n) {
            let r = chunk.len() / n;
            g.add_panels(GRAM_PANEL, r as u64, |i0, out| {
                let m = out.len() / n;
                // out[i, j] = Σ_k chunk[k, i0 + i] · chunk[k, j], for j ≥ i0 only: the
                // accumulator reads the upper triangle, so the panels left of the diagonal
                // block are never computed (half the multiply-adds).
                sgemm(
                    m,
                    r,
                    n - i0,
                    &chunk[i0..],
                    (1, n),
                    &chunk[i0..],
                    (n, 1),
                    &mut out[i0..],
                    (n, 1),
                );
            });
        }
        Ok(())
    }

    fn gram_finish(&self, g: GramAccumulator) -> Result<Gram> {
        Ok(g.finish())
    }

    fn cross_new(&self, n: usize) -> Result<CrossGram> {
        Ok(CrossGram::zeros(n))
    }

    fn cross_add(
        &self,
        c: &mut CrossGram,
        xq: &Vec<f32>,
        xf: &Vec<f32>,
        rows: usize,
    ) -> Result<()> {
        let n = c.n;
        if xq.len() < rows * n || xf.len() < rows * n {
            return Err(crate::error::Error::Internal(format!(
                "cross_add: {rows} rows of {n} from tensors of {} and {}",
                xq.len(),
                xf.len()
            )));
        }
        // f32 GEMM partials over GRAM_ROWS rows, summed in f64, as the Gram's; the AVX-512
        // kernel computes the same sums bit for bit (see `cpu_gram`).
        if super::cpu_gram::add_cross(&mut c.data, n, xq, xf, rows) {
            c.samples += rows as u64;
            return Ok(());
        }
        let mut out = vec![0.0f32; n * n];
        for r0 in (0..rows).step_by(GRAM_ROWS) {
            let r = GRAM_ROWS.min(rows - r0);
            let (q, f) = (&xq[r0 * n..(r0 + r) * n], &xf[r0 * n..(r0 + r) * n]);
            // out[i, j] = Σ_k q[k, i] · f[k, j]
            sgemm(n, r, n, q, (1, n), f, (n, 1), &mut out, (n, 1));
            c.add_partial(&out, n, r as u64);
        }
        Ok(())
    }

    fn cross_finish(&self, c: CrossGram) -> Result<CrossGram> {
        Ok(c)
    }
}
