//! The CPU Gram's f32 partials on AVX-512, summed into the f64 accumulator in the kernel.
//!
//! The Gram's numeric contract (see ARCHITECTURE.md) is: the activations are cut into chunks of
//! [`CHUNK`] rows, each element's partial over a chunk is an f32 sum, and the partials are added
//! in chunk order into an f64 sum. The portable path computes the partials with
//! `matrixmultiply`'s SGEMM, whose x86 kernels (AVX-512, and AVX2 with FMA) accumulate every
//! element as one fused multiply-add chain over the chunk's rows in order, from zero, and then
//! write it unchanged (`α = 1`, `β = 0`). This kernel computes the same chain, so its sums are
//! bit for bit those of the portable path (a test holds them equal), while it:
//!
//! - computes only the upper triangle, in tiles of the output that stay in L2 while a group of
//!   chunks is added into them (the f64 sum is read and written once per group, not per chunk);
//! - packs each chunk once into 16-column panels (the portable path re-packs the right-hand
//!   operand for every 64-row panel of the output);
//! - uses an 8 × 48 register tile (24 accumulators, one 512-bit load per 8 fused multiply-adds),
//!   where `matrixmultiply`'s 16 × 16 tile issues as many loads as multiply-adds;
//! - converts and adds the f32 partials into the f64 sum straight from the registers.
//!
//! The cross-Gram of `--calib-mode corrected` (`X̃ᵀ·X`, [`add_cross`]) runs the same kernel over
//! every tile, with the two activations packed side by side.
//!
//! No crate offers this: a BLAS `syrk` sums in another order (and would change the low bits
//! that the paper preset's pinned codes depend on) and has no f64 accumulation of f32 partials.

#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

/// Activation rows per f32 partial (the Gram's numeric contract; the portable path uses the same).
pub const CHUNK: usize = 256;

/// Whether this machine runs the AVX-512 kernel (otherwise the portable path is used).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Adds the Gram of `x` (`rows × n`, row-major) into `sum`'s upper triangle (`n × n`,
/// row-major; the lower triangle is not touched): chunks of [`CHUNK`] rows from row 0, each
/// chunk's f32 partial added in order. Returns `false` (and does nothing) where the machine has
/// no AVX-512, so the caller runs the portable path.
pub fn add_upper(sum: &mut [f64], n: usize, x: &[f32], rows: usize) -> bool {
    assert!(
        sum.len() >= n * n && x.len() >= rows * n,
        "add_upper: sum {} for n = {n}, x {} for {rows} rows",
        sum.len(),
        x.len()
    );
    if !available() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if n > 0 && rows > 0 {
            let x = &x[..rows * n];
            avx512::add::<true>(sum, n, x, x, rows, avx512::GROUP_BYTES);
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Adds the cross-Gram `Σ_rows a_i·b_j` of two activations of the same rows (`rows × n` each,
/// row-major) into all of `sum` (`n × n`, row-major), with the same chunks and chains as
/// [`add_upper`] (and as the portable path's `matrixmultiply` partials). Returns `false` (and
/// does nothing) where the machine has no AVX-512.
pub fn add_cross(sum: &mut [f64], n: usize, a: &[f32], b: &[f32], rows: usize) -> bool {
    assert!(
        sum.len() >= n * n && a.len() >= rows * n && b.len() >= rows * n,
        "add_cross: sum {} for n = {n}, a {} and b {} for {rows} rows",
        sum.len(),
        a.len(),
        b.len()
    );
    if !available() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if n > 0 && rows > 0 {
            let (a, b) = (&a[..rows * n], &b[..rows * n]);
            avx512::add::<false>(sum, n, a, b, rows, avx512::GROUP_BYTES);
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// f32 lanes per vector and columns per packed panel.
    const LANES: usize = 16;
    /// Output rows per register tile (the broadcast side).
    const MR: usize = 8;
    /// Panels per register tile (the vector side): 48 columns.
    const NP: usize = 3;
    /// Edge of an output tile (a multiple of `MR` and of `LANES · NP`): its f64 sums
    /// (288 KiB) and the two operand strips of a chunk (2 × 192 KiB) stay in L2.
    const TILE: usize = 192;
    /// Bytes of packed chunks per group (each tile is visited once per group).
    pub(super) const GROUP_BYTES: usize = 32 << 20;

    /// The f64 sum shared by the tile tasks; each task writes only its own tile.
    #[derive(Clone, Copy)]
    struct SumPtr(*mut f64);
    // SAFETY: tasks write disjoint tiles of the sum (see `add`), and the slice outlives the
    // parallel loop that uses the pointer.
    unsafe impl Send for SumPtr {}
    unsafe impl Sync for SumPtr {}

    /// Adds `Σ_rows a_i·b_j` into `sum`: the upper triangle only when `UPPER` (then `a` and
    /// `b` are the same activations and are packed once), else every element.
    pub(super) fn add<const UPPER: bool>(
        sum: &mut [f64],
        n: usize,
        a: &[f32],
        b: &[f32],
        rows: usize,
        group_bytes: usize,
    ) {
        let panels = n.div_ceil(LANES);
        // One packed chunk: `panels` panels of CHUNK rows × 16 columns (two with a cross-Gram).
        let chunk_len = panels * CHUNK * LANES;
        let operands = if UPPER { 1 } else { 2 };
        let chunks = rows.div_ceil(CHUNK);
        let group = (group_bytes / (operands * chunk_len * 4))
            .clamp(1, 16)
            .min(chunks);
        let mut pack = vec![0.0f32; group * operands * chunk_len];
        crate::platform::advise_huge_pages(&mut pack);
        let blocks = n.div_ceil(TILE);
        let tiles: Vec<(usize, usize)> = (0..blocks)
            .flat_map(|bi| ((if UPPER { bi } else { 0 })..blocks).map(move |bj| (bi, bj)))
            .collect();
        let out = SumPtr(sum.as_mut_ptr());
        for g0 in (0..chunks).step_by(group) {
            let g1 = (g0 + group).min(chunks);
            let used = &mut pack[..(g1 - g0) * operands * chunk_len];
            used.par_chunks_mut(chunk_len)
                .enumerate()
                .for_each(|(c, dst)| {
                    let r0 = (g0 + c / operands) * CHUNK;
                    let r = CHUNK.min(rows - r0);
                    let src = if c % operands == 0 { a } else { b };
                    pack_chunk(&src[r0 * n..(r0 + r) * n], n, r, dst);
                });
            let packed = &pack[..(g1 - g0) * operands * chunk_len];
            tiles.par_iter().for_each(|&(bi, bj)| {
                for c in 0..g1 - g0 {
                    let r = CHUNK.min(rows - (g0 + c) * CHUNK);
                    let at = c * operands * chunk_len;
                    let pa = &packed[at..at + chunk_len];
                    let pb = &packed[at + (operands - 1) * chunk_len..at + operands * chunk_len];
                    // SAFETY: the CPU has AVX-512 (checked by the caller); `pa` and `pb` hold
                    // `panels` packed panels; the tile writes only rows `bi·TILE ..` and
                    // columns `bj·TILE ..` of the sum (disjoint between tasks) inside `n × n`.
                    unsafe { tile::<UPPER>(out, n, pa, pb, r, bi * TILE, bj * TILE) };
                }
            });
        }
    }

    /// Packs `r` rows of `n` columns into 16-column panels of [`CHUNK`] rows each. The lanes
    /// past `n` in the last panel are never written, so they keep the zeros the buffer was
    /// allocated with; rows past `r` keep an earlier chunk's values and are never read.
    fn pack_chunk(x: &[f32], n: usize, r: usize, dst: &mut [f32]) {
        for p in 0..r {
            let row = &x[p * n..(p + 1) * n];
            for (q, cols) in row.chunks(LANES).enumerate() {
                let at = (q * CHUNK + p) * LANES;
                dst[at..at + cols.len()].copy_from_slice(cols);
            }
        }
    }

    /// Adds one chunk's partials to the output tile at `(i0, j0)` (`a` gives the rows, `b` the
    /// columns): with `UPPER`, register tiles at or right of the diagonal only.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const UPPER: bool>(
        out: SumPtr,
        n: usize,
        pa: &[f32],
        pb: &[f32],
        r: usize,
        i0: usize,
        j0: usize,
    ) {
        let panels = n.div_ceil(LANES);
        let i1 = (i0 + TILE).min(n);
        let j1 = (j0 + TILE).min(panels * LANES);
        for i in (i0..i1).step_by(MR) {
            // The panel holding rows i .. i + 8 (8 divides 16), at lane offset i % 16.
            let a = pa[(i / LANES) * CHUNK * LANES + i % LANES..].as_ptr();
            // Register tiles whose last column is left of `i` hold no upper element.
            let first = if !UPPER || j0 > i { j0 } else { i - i % LANES };
            let mut j = first;
            while j < j1 {
                let b = pb[(j / LANES) * CHUNK * LANES..].as_ptr();
                // SAFETY (all three): `a` reads 8 lanes of r rows of one panel, `b` reads
                // 1–3 whole panels that exist (j < j1 ≤ panels · 16), inside `chunk`.
                match (j1 - j) / LANES {
                    1 => unsafe { micro::<1, UPPER>(out, n, a, b, r, i, j) },
                    2 => unsafe { micro::<2, UPPER>(out, n, a, b, r, i, j) },
                    _ => unsafe { micro::<NP, UPPER>(out, n, a, b, r, i, j) },
                }
                j += LANES * NP;
            }
        }
    }

    /// The full-width register tile's multiply-add chains (rows `i .. i + 8` from `a`,
    /// three panels from `b`, `r` rows), kept out of line so that its 24 accumulators stay in
    /// registers (inlined next to the epilogue's array, the compiler spilled them).
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn chains(a: *const f32, b: *const f32, r: usize, out: &mut [[__m512; NP]; MR]) {
        let z = _mm512_setzero_ps();
        let (mut c00, mut c01, mut c02, mut c10, mut c11, mut c12) = (z, z, z, z, z, z);
        let (mut c20, mut c21, mut c22, mut c30, mut c31, mut c32) = (z, z, z, z, z, z);
        let (mut c40, mut c41, mut c42, mut c50, mut c51, mut c52) = (z, z, z, z, z, z);
        let (mut c60, mut c61, mut c62, mut c70, mut c71, mut c72) = (z, z, z, z, z, z);
        for p in 0..r {
            // SAFETY: row p < r ≤ CHUNK of panels 0..3 (B) and lanes i % 16 + 0..8 of row p
            // of the A panel, all inside the packed chunk.
            unsafe {
                let bp = b.add(p * LANES);
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(CHUNK * LANES));
                let b2 = _mm512_loadu_ps(bp.add(2 * CHUNK * LANES));
                let ap = a.add(p * LANES);
                macro_rules! row {
                    ($m:expr, $x0:ident, $x1:ident, $x2:ident) => {
                        let av = _mm512_set1_ps(*ap.add($m));
                        $x0 = _mm512_fmadd_ps(av, b0, $x0);
                        $x1 = _mm512_fmadd_ps(av, b1, $x1);
                        $x2 = _mm512_fmadd_ps(av, b2, $x2);
                    };
                }
                row!(0, c00, c01, c02);
                row!(1, c10, c11, c12);
                row!(2, c20, c21, c22);
                row!(3, c30, c31, c32);
                row!(4, c40, c41, c42);
                row!(5, c50, c51, c52);
                row!(6, c60, c61, c62);
                row!(7, c70, c71, c72);
            }
        }
        *out = [
            [c00, c01, c02],
            [c10, c11, c12],
            [c20, c21, c22],
            [c30, c31, c32],
            [c40, c41, c42],
            [c50, c51, c52],
            [c60, c61, c62],
            [c70, c71, c72],
        ];
    }

    /// One register tile: rows `i .. i + 8`, columns `j .. j + 16·P`, the fused multiply-add
    /// chain over the chunk's `r` rows in order, then added into the f64 sum where `col < n`
    /// (and `i ≤ col` with `UPPER`).
    /// The full-width tile (`P = 3`) keeps its 24 accumulators in named registers (an array of
    /// them is spilled to the stack by the compiler); the narrow ones at the right edge are rare.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const P: usize, const UPPER: bool>(
        out: SumPtr,
        n: usize,
        a: *const f32,
        b: *const f32,
        r: usize,
        i: usize,
        j: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); P]; MR];
        if P == NP {
            let mut full = [[_mm512_setzero_ps(); NP]; MR];
            // SAFETY: as for the narrow tiles below (three whole panels exist when P = 3).
            unsafe { chains(a, b, r, &mut full) };
            for (dst, src) in acc.iter_mut().zip(&full) {
                dst.copy_from_slice(&src[..P]);
            }
        } else {
            for p in 0..r {
                let mut bv = [_mm512_setzero_ps(); P];
                for (q, v) in bv.iter_mut().enumerate() {
                    // SAFETY: row p < r ≤ CHUNK of panel q, inside the packed chunk.
                    *v = unsafe { _mm512_loadu_ps(b.add((q * CHUNK + p) * LANES)) };
                }
                for (m, row) in acc.iter_mut().enumerate() {
                    // SAFETY: lane i % 16 + m < 16 of row p of the A panel.
                    let av = _mm512_set1_ps(unsafe { *a.add(p * LANES + m) });
                    for q in 0..P {
                        row[q] = _mm512_fmadd_ps(av, bv[q], row[q]);
                    }
                }
            }
        }
        let interior = (!UPPER || i + MR <= j + 1) && j + LANES * P <= n;
        for (m, row) in acc.iter().enumerate() {
            let gi = i + m;
            if gi >= n {
                break;
            }
            for q in 0..P {
                let col = j + q * LANES;
                let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(row[q]));
                let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(row[q]),
                )));
                let dst = out.0.wrapping_add(gi * n + col);
                if interior {
                    // SAFETY: gi < n and col + 16 ≤ n: inside the sum.
                    unsafe {
                        _mm512_storeu_pd(dst, _mm512_add_pd(_mm512_loadu_pd(dst), lo));
                        let d8 = dst.add(8);
                        _mm512_storeu_pd(d8, _mm512_add_pd(_mm512_loadu_pd(d8), hi));
                    }
                } else {
                    // Columns c < n only (inside the row), and gi ≤ c for the upper triangle.
                    let mut mask: u32 = 0;
                    for t in 0..LANES {
                        let c = col + t;
                        if (!UPPER || c >= gi) && c < n {
                            mask |= 1 << t;
                        }
                    }
                    let (mlo, mhi) = ((mask & 0xff) as u8, (mask >> 8) as u8);
                    // SAFETY: masked lanes are neither read nor written; the others are
                    // inside row gi of the sum.
                    unsafe {
                        let z = _mm512_setzero_pd();
                        let v = _mm512_add_pd(_mm512_mask_loadu_pd(z, mlo, dst), lo);
                        _mm512_mask_storeu_pd(dst, mlo, v);
                        let d8 = dst.wrapping_add(8);
                        let v = _mm512_add_pd(_mm512_mask_loadu_pd(z, mhi, d8), hi);
                        _mm512_mask_storeu_pd(d8, mhi, v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable path's sums: `matrixmultiply`'s full partials per chunk, added in order
    /// (for the Gram itself `a = b`, and the test reads the upper triangle).
    fn portable_cross(mut sum: Vec<f64>, n: usize, a: &[f32], b: &[f32], rows: usize) -> Vec<f64> {
        let mut part = vec![0.0f32; n * n];
        for r0 in (0..rows).step_by(CHUNK) {
            let r = CHUNK.min(rows - r0);
            let (ca, cb) = (&a[r0 * n..(r0 + r) * n], &b[r0 * n..(r0 + r) * n]);
            // SAFETY: ca and cb are r × n, part is n × n, strides in bounds.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    r,
                    n,
                    1.0,
                    ca.as_ptr(),
                    1,
                    n as isize,
                    cb.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    part.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            for (s, p) in sum.iter_mut().zip(&part) {
                *s += *p as f64;
            }
        }
        sum
    }

    #[test]
    fn the_cross_kernel_gives_the_portable_sums_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512 on this machine: the portable path is the only one");
            return;
        }
        let mut rng = crate::util::rng::SplitMix::new(5);
        for &(n, rows) in &[
            (1, 2),
            (7, 300),
            (17, 257),
            (50, 100),
            (200, 513),
            (385, 260),
        ] {
            let a = rng.normals(rows * n);
            let b = rng.normals(rows * n);
            let base: Vec<f64> = (0..n * n).map(|k| k as f64 * -0.125).collect();
            let want = portable_cross(base.clone(), n, &a, &b, rows);
            let mut got = base.clone();
            assert!(add_cross(&mut got, n, &a, &b, rows));
            let mut one = base.clone();
            #[cfg(target_arch = "x86_64")]
            avx512::add::<false>(&mut one, n, &a, &b, rows, 1);
            for (k, ((g, w), o)) in got.iter().zip(&want).zip(&one).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "n {n} rows {rows}: element {k}");
                assert_eq!(
                    o.to_bits(),
                    w.to_bits(),
                    "n {n} rows {rows}: one chunk per group"
                );
            }
        }
    }

    #[test]
    fn the_kernel_gives_the_portable_sums_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512 on this machine: the portable path is the only one");
            return;
        }
        let mut rng = crate::util::rng::SplitMix::new(6);
        for &(n, rows) in &[
            (1, 3),
            (7, 300),
            (16, 256),
            (17, 257),
            (48, 512),
            (50, 100),
            (100, 700),
            (200, 513),
            (385, 260),
            (33, 1000),
        ] {
            let x = rng.normals(rows * n);
            // Start from non-zero sums, as a second call into an accumulator does.
            let base: Vec<f64> = (0..n * n).map(|k| k as f64 * 0.25).collect();
            let want = portable_cross(base.clone(), n, &x, &x, rows);
            let mut got = base.clone();
            assert!(add_upper(&mut got, n, &x, rows));
            // One chunk per packed group: the buffer is reused, a shorter last chunk included.
            let mut one = base.clone();
            #[cfg(target_arch = "x86_64")]
            avx512::add::<true>(&mut one, n, &x, &x, rows, 1);
            assert!(
                one.iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "n {n} rows {rows}: one chunk per group differs"
            );
            for i in 0..n {
                for j in 0..n {
                    let k = i * n + j;
                    if j < i {
                        assert_eq!(
                            got[k], base[k],
                            "n {n} rows {rows}: lower ({i}, {j}) touched"
                        );
                    } else {
                        let w = want[k];
                        assert_eq!(
                            got[k].to_bits(),
                            w.to_bits(),
                            "n {n} rows {rows}: ({i}, {j}) {} vs {w}",
                            got[k]
                        );
                    }
                }
            }
        }
    }
}
