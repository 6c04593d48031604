//! The CPU forward's linear layers (`Y = X·Wᵀ`) on AVX-512, with `matrixmultiply`'s sums.
//!
//! `matrixmultiply`'s SGEMM on x86 with AVX2+FMA or AVX-512 cuts the inner dimension into blocks
//! of [`KC`] = 256 and computes each output element of a block as one fused multiply-add chain
//! over the block in order, from zero; the first block's chain is written as it is, each later
//! one added to the output with one rounding (`α = 1`, `β = 1`). This kernel computes the same
//! chains and additions, so the activations (and with them the Grams and the codes the paper
//! preset pins) do not depend on which of the two ran; a test holds them equal bit for bit. It
//! is 1.3–1.4× faster on ViT-B's shapes because it packs `W` once per call, a slab of about
//! 1 MiB of columns at a time that stays in L2 while every row panel passes over it (the
//! portable path packs all of it again for every 64-row panel), reads `X` in place, and keeps an 8 × 32 register tile
//! in 16 named accumulators (one 512-bit load per 8 multiply-adds, where `matrixmultiply`'s
//! 16 × 16 tile loads as often as it multiplies). An 8 × 48 tile and `X` packed in 8-row groups
//! measured the same.

#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

/// The inner-dimension block of `matrixmultiply`'s SGEMM (its `kc`), which fixes the sums.
pub const KC: usize = 256;

/// Whether this machine runs the AVX-512 kernel (otherwise the portable path is used).
pub fn available() -> bool {
    super::cpu_gram::available()
}

/// `y[rows × n] = x[rows × k] · wᵀ` (`w` is `n × k`, all row-major), without a bias, split into
/// row panels of `panel` rows over rayon's threads. Returns `false` (and does nothing) where the
/// machine has no AVX-512, so the caller runs the portable path.
pub fn linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    y: &mut [f32],
    panel: usize,
) -> bool {
    assert!(
        x.len() >= rows * k && w.len() >= n * k && y.len() >= rows * n,
        "linear: x {} for {rows} × {k}, w {} for {n} × {k}, y {}",
        x.len(),
        w.len(),
        y.len()
    );
    if !available() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if rows > 0 && n > 0 {
            avx512::linear(x, rows, k, w, n, &mut y[..rows * n], panel.max(1));
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = panel;
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// f32 lanes per vector and output columns per packed panel of `W`.
    const LANES: usize = 16;
    /// Rows of `X` per register tile (the broadcast side).
    const MR: usize = 8;
    /// Bytes of `W` packed at a time.
    const SLAB_BYTES: usize = 1 << 20;
    /// Panels per register tile (the vector side): 32 output columns, so that a block's
    /// slice of `W` (256 × 32 floats) and of `X` (8 × 256) fit L1 together (a 48-column tile
    /// measured the same).
    const NP: usize = 2;

    pub(super) fn linear(
        x: &[f32],
        rows: usize,
        k: usize,
        w: &[f32],
        n: usize,
        y: &mut [f32],
        panel: usize,
    ) {
        if k == 0 {
            y.fill(0.0);
            return;
        }
        // W packed a slab of columns at a time (about 1 MiB, so that it stays in L2 while
        // every row panel passes over it, and the copy never costs a second W): panel q of a
        // slab holds its columns 16q .. 16q + 16 as k rows of 16.
        let slab = ((SLAB_BYTES / (4 * k)) / (NP * LANES) * (NP * LANES)).max(NP * LANES);
        let mut wp = vec![0.0f32; slab.min(n.next_multiple_of(LANES)) * k];
        let x = &x[..rows * k];
        for c0 in (0..n).step_by(slab) {
            let c1 = (c0 + slab).min(n);
            let wp = &mut wp[..(c1 - c0).div_ceil(LANES) * LANES * k];
            pack_slab(w, k, c0, c1, wp);
            let wp = &*wp;
            y.par_chunks_mut(panel * n)
                .zip(x.par_chunks(panel * k))
                .for_each(|(yc, xc)| {
                    let r = yc.len() / n;
                    // SAFETY: the CPU has AVX-512 (checked by the caller); `xc` is r × k, `yc`
                    // r × n and `wp` holds the packed panels of columns c0 .. c1.
                    unsafe { panel_product(xc, r, k, wp, c0, c1, n, yc) };
                });
        }
    }

    /// Packs rows `c0 .. c1` of `w` (`k` wide) into `wp`: panel q holds columns
    /// `c0 + 16q ..` of the output as k rows of 16 (zeros past `c1`), the panels in parallel.
    fn pack_slab(w: &[f32], k: usize, c0: usize, c1: usize, wp: &mut [f32]) {
        wp.par_chunks_mut(k * LANES)
            .enumerate()
            .for_each(|(q, dst)| {
                let first = c0 + q * LANES;
                let cols = LANES.min(c1 - first);
                if cols < LANES {
                    dst.fill(0.0);
                }
                for t in 0..cols {
                    let row = &w[(first + t) * k..(first + t + 1) * k];
                    for (p, &v) in row.iter().enumerate() {
                        dst[p * LANES + t] = v;
                    }
                }
            });
    }

    /// One row panel against one slab of columns `c0 .. c1`: register tiles of 8 rows × 32
    /// columns, each over the blocks of `KC`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel_product(
        x: &[f32],
        r: usize,
        k: usize,
        wp: &[f32],
        c0: usize,
        c1: usize,
        n: usize,
        y: &mut [f32],
    ) {
        let panels = (c1 - c0).div_ceil(LANES);
        let mut c = 0;
        while c < panels * LANES {
            let np = ((panels * LANES - c) / LANES).min(NP);
            for i in (0..r).step_by(MR) {
                // Rows past r repeat the last row (their results are not stored).
                let mut a = [std::ptr::null(); MR];
                for (m, p) in a.iter_mut().enumerate() {
                    *p = x[(i + m).min(r - 1) * k..].as_ptr();
                }
                let b = wp[(c / LANES) * k * LANES..].as_ptr();
                for k0 in (0..k).step_by(KC) {
                    let kb = KC.min(k - k0);
                    let mut acc = [[_mm512_setzero_ps(); NP]; MR];
                    // SAFETY: rows a[m] have k values from k0; panels c/16 .. c/16 + np have
                    // k rows of 16 from k0, inside `wp`.
                    unsafe {
                        if np == NP {
                            chains(&a, k0, b.add(k0 * LANES), k * LANES, kb, &mut acc);
                        } else {
                            narrow(&a, k0, b.add(k0 * LANES), k * LANES, kb, np, &mut acc);
                        }
                    }
                    // The first block is written as it is, each later one added (one rounding).
                    for (m, row) in acc.iter().enumerate() {
                        if i + m >= r {
                            break;
                        }
                        for (q, v) in row.iter().enumerate().take(np) {
                            let col = c0 + c + q * LANES;
                            let lanes = LANES.min(c1.saturating_sub(col));
                            if lanes == 0 {
                                break;
                            }
                            let mask: u16 = if lanes == LANES {
                                u16::MAX
                            } else {
                                (1u16 << lanes) - 1
                            };
                            let dst = y[(i + m) * n + col..].as_mut_ptr();
                            // SAFETY: the masked lanes are inside row i + m of `y`.
                            unsafe {
                                let out = if k0 == 0 {
                                    *v
                                } else {
                                    _mm512_add_ps(
                                        _mm512_maskz_loadu_ps(mask, dst as *const f32),
                                        *v,
                                    )
                                };
                                _mm512_mask_storeu_ps(dst, mask, out);
                            }
                        }
                    }
                }
            }
            c += NP * LANES;
        }
    }

    /// The full-width tile's chains over `kb` values from `k0`, in 16 named accumulators (kept
    /// out of line so that they stay in registers).
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn chains(
        a: &[*const f32; MR],
        k0: usize,
        b: *const f32,
        stride: usize,
        kb: usize,
        out: &mut [[__m512; NP]; MR],
    ) {
        let z = _mm512_setzero_ps();
        let (mut c00, mut c01, mut c10, mut c11) = (z, z, z, z);
        let (mut c20, mut c21, mut c30, mut c31) = (z, z, z, z);
        let (mut c40, mut c41, mut c50, mut c51) = (z, z, z, z);
        let (mut c60, mut c61, mut c70, mut c71) = (z, z, z, z);
        // SAFETY: the caller's bounds: k0 + kb values per row, kb rows of two panels.
        unsafe {
            let (a0, a1, a2, a3) = (a[0].add(k0), a[1].add(k0), a[2].add(k0), a[3].add(k0));
            let (a4, a5, a6, a7) = (a[4].add(k0), a[5].add(k0), a[6].add(k0), a[7].add(k0));
            for p in 0..kb {
                let bp = b.add(p * LANES);
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(stride));
                macro_rules! row {
                    ($a:ident, $x0:ident, $x1:ident) => {
                        let av = _mm512_set1_ps(*$a.add(p));
                        $x0 = _mm512_fmadd_ps(av, b0, $x0);
                        $x1 = _mm512_fmadd_ps(av, b1, $x1);
                    };
                }
                row!(a0, c00, c01);
                row!(a1, c10, c11);
                row!(a2, c20, c21);
                row!(a3, c30, c31);
                row!(a4, c40, c41);
                row!(a5, c50, c51);
                row!(a6, c60, c61);
                row!(a7, c70, c71);
            }
        }
        *out = [
            [c00, c01],
            [c10, c11],
            [c20, c21],
            [c30, c31],
            [c40, c41],
            [c50, c51],
            [c60, c61],
            [c70, c71],
        ];
    }

    /// The right edge's tile of one panel (same chains, rarely run).
    #[target_feature(enable = "avx512f")]
    unsafe fn narrow(
        a: &[*const f32; MR],
        k0: usize,
        b: *const f32,
        stride: usize,
        kb: usize,
        np: usize,
        out: &mut [[__m512; NP]; MR],
    ) {
        for p in 0..kb {
            for (m, row) in out.iter_mut().enumerate() {
                // SAFETY: the caller's bounds, as for `chains`.
                let av = _mm512_set1_ps(unsafe { *a[m].add(k0 + p) });
                for (q, v) in row.iter_mut().enumerate().take(np) {
                    // SAFETY: row p of panel q < np, inside `wp`.
                    let bv = unsafe { _mm512_loadu_ps(b.add(q * stride + p * LANES)) };
                    *v = _mm512_fmadd_ps(av, bv, *v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable path: `matrixmultiply` on row panels, as `CpuOps::linear` calls it.
    fn portable(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; rows * n];
        for r0 in (0..rows).step_by(64) {
            let r = 64.min(rows - r0);
            let (yc, xc) = (&mut y[r0 * n..(r0 + r) * n], &x[r0 * k..]);
            // SAFETY: xc is r × k, w is n × k (read transposed), yc is r × n.
            unsafe {
                matrixmultiply::sgemm(
                    r,
                    k,
                    n,
                    1.0,
                    xc.as_ptr(),
                    k as isize,
                    1,
                    w.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    yc.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        }
        y
    }

    #[test]
    fn the_kernel_gives_the_portable_products_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512 on this machine: the portable path is the only one");
            return;
        }
        let mut rng = crate::util::rng::SplitMix::new(7);
        for &(rows, k, n) in &[
            (1, 1, 1),
            (3, 0, 5),
            (7, 100, 33),
            (64, 256, 48),
            (65, 257, 50),
            (9, 512, 16),
            (130, 700, 100),
            (70, 1536, 97),
            // Several slabs of packed columns, the last one short.
            (20, 1536, 400),
            (10, 4096, 100),
        ] {
            let x = rng.normals(rows * k);
            let w = rng.normals(n * k);
            let want = portable(&x, rows, k, &w, n);
            for panel in [64, 5] {
                let mut got = vec![f32::NAN; rows * n];
                assert!(linear(&x, rows, k, &w, n, &mut got, panel));
                for (e, (g, v)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        v.to_bits(),
                        "{rows} × {k} · ({n} × {k})ᵀ, panel {panel}: element {e}: {g} vs {v}"
                    );
                }
            }
        }
    }
}
