//! Dense linear algebra on the host: the GPTQ-style start's factor in f64 and the GEMMs the CPU
//! path's products run on.
//!
//! The factor (a Cholesky factorisation and a triangular inverse of a layer's damped Gram, up to
//! `n = 12800` on the largest shapes) goes through faer's blocked, multi-threaded kernels: the
//! unblocked column loops it replaced took 20.7 s at `n = 4096` on two cores and did not scale
//! with threads. It must run in f64 — GPTQ's factor of `H⁻¹` loses digits quickly in f32 when the
//! Gram matrix is ill-conditioned.

use rayon::prelude::*;

/// The upper-triangular `U` with a positive diagonal and `A⁻¹ = Uᵀ·U` — the factor GPTQ
/// compensates with — or `None` when `A` is not positive definite in f64.
///
/// With `J` the reversal permutation and `J·A·J = M·Mᵀ`, `A = V·Vᵀ` for the upper-triangular
/// `V = J·M·J`, so `A⁻¹ = V⁻ᵀ·V⁻¹` and `U = V⁻¹ = J·M⁻¹·J`: one Cholesky and one triangular
/// inverse, instead of inverting `A` and factoring the inverse. Both are faer's blocked,
/// multi-threaded kernels from 1024 inputs on (`n³/3` flops each, mostly in GEMM-shaped
/// updates); `J·A·J` is one reversed copy, `J·M⁻¹·J` a tiled one.
pub fn inverse_upper_factor(a: &[f64], n: usize) -> Option<Vec<f64>> {
    use faer::Mat;
    assert_eq!(a.len(), n * n, "matrix must be n × n");
    if n == 0 {
        return Some(Vec::new());
    }
    let par = factor_par(n);
    // `J·A·J` row-major is `a` back to front; read column-major it is its own transpose, the
    // same symmetric matrix.
    let mut ja: Vec<f64> = a.iter().rev().copied().collect();
    let mut l = faer::MatMut::from_column_major_slice_mut(&mut ja, n, n);
    {
        use faer::dyn_stack::{MemBuffer, MemStack};
        use faer::linalg::cholesky::llt::factor;
        let mut mem = MemBuffer::new(factor::cholesky_in_place_scratch::<f64>(
            n,
            par,
            Default::default(),
        ));
        let stack = MemStack::new(&mut mem);
        factor::cholesky_in_place(
            l.as_mut(),
            Default::default(),
            par,
            stack,
            Default::default(),
        )
        .ok()?;
    }
    // The strict upper triangle still holds `J·A·J`: cleared, so only the factor is read.
    for j in 1..n {
        l.as_mut().col_mut(j).subrows_mut(0, j).fill(0.0);
    }
    let m = l.as_ref();
    if (0..n).any(|i| !(m[(i, i)] > 0.0 && m[(i, i)].is_finite())) {
        return None;
    }
    let mut mi = Mat::<f64>::zeros(n, n);
    faer::linalg::triangular_inverse::invert_lower_triangular(mi.as_mut(), m, par);
    // `U[i, j] = M⁻¹[n−1−i, n−1−j]` for `j ≥ i`, row-major; the lower triangle stays zero.
    // Column-major `M⁻¹` holds that at `(n−1−j)·n + (n−1−i)`: read in tiles, so that both the
    // reads (down a column) and the writes (across a tile's rows) stay in cache.
    let src = mi.as_ref();
    let mut u = vec![0.0f64; n * n];
    u.par_chunks_mut(FACTOR_TILE * n)
        .enumerate()
        .for_each(|(ti, rows)| {
            let i0 = ti * FACTOR_TILE;
            let nr = rows.len() / n;
            for j0 in (i0..n).step_by(FACTOR_TILE) {
                for j in j0..(j0 + FACTOR_TILE).min(n) {
                    let col = src.col(n - 1 - j);
                    for di in 0..nr.min(j + 1 - i0) {
                        rows[di * n + j] = col[n - 1 - (i0 + di)];
                    }
                }
            }
        });
    if u.iter().any(|v| !v.is_finite()) {
        return None;
    }
    Some(u)
}

thread_local! {
    static FACTORS_ON_THIS_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every factor it builds ([`inverse_upper_factor`]) computed on the calling
/// thread alone, none of it in rayon's pool: for factors built ahead on a thread of their own,
/// beside a quantization that keeps the pool busy. faer's threaded Cholesky and inverse are many
/// short joins; queued behind the quantization's tasks they waited (ViT-L/16's factors ahead took
/// 26 s of wall clock for about 6 s of work on two cores), and they took the cores in small
/// slices. The results are the same bits: faer splits the outputs among threads, not the sums.
pub fn factors_on_this_thread<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FACTORS_ON_THIS_THREAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FACTORS_ON_THIS_THREAD.with(|c| c.replace(true)));
    f()
}

/// Rows and columns per tile of [`inverse_upper_factor`]'s reordering copy.
const FACTOR_TILE: usize = 64;

/// The factor's parallelism: below 1024 inputs faer's threaded kernels cost more in
/// synchronisation than they gain (n = 384: 2.7 ms threaded, 1.5 ms on one thread, on two cores);
/// inside [`factors_on_this_thread`], none.
fn factor_par(n: usize) -> faer::Par {
    if n < 1024 || FACTORS_ON_THIS_THREAD.with(|c| c.get()) {
        faer::Par::Seq
    } else {
        faer::Par::rayon(0)
    }
}

/// A seeded Haar-random orthogonal `n × n` matrix, row-major: the Q factor of a Gaussian
/// matrix with its columns' signs fixed by R's diagonal (faer's Householder QR).
pub fn random_orthogonal(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = crate::util::rng::SplitMix::new(seed);
    let a = faer::Mat::<f64>::from_fn(n, n, |_, _| f64::from(rng.normal()));
    let qr = a.qr();
    let q = qr.compute_Q();
    let r = qr.R();
    let mut out = vec![0.0f64; n * n];
    for j in 0..n {
        let s = if r[(j, j)] < 0.0 { -1.0 } else { 1.0 };
        for i in 0..n {
            out[i * n + j] = s * q[(i, j)];
        }
    }
    out
}

/// `c[m, n] += alpha · a[m, k] · b[k, n]`, every operand row-major with the given row stride.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_acc(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    rsa: usize,
    b: &[f32],
    rsb: usize,
    c: &mut [f32],
    rsc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // Every element the kernel touches must be inside the slices.
    assert!((m - 1) * rsa + k <= a.len(), "sgemm_acc: a out of bounds");
    assert!((k - 1) * rsb + n <= b.len(), "sgemm_acc: b out of bounds");
    assert!((m - 1) * rsc + n <= c.len(), "sgemm_acc: c out of bounds");
    // SAFETY: the asserts above bound every index the kernel reads or writes; `c` is exclusive.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            1,
            b.as_ptr(),
            rsb as isize,
            1,
            1.0,
            c.as_mut_ptr(),
            rsc as isize,
            1,
        );
    }
}

/// `c[m, n] = a[m, k] · b[k, n]` in f64, every operand row-major and contiguous
/// (`matrixmultiply`'s cache-blocked SIMD kernel).
pub fn dgemm(m: usize, k: usize, n: usize, a: &[f64], b: &[f64], c: &mut [f64]) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "dgemm: operand sizes"
    );
    // SAFETY: the assert above bounds every index the kernel reads or writes; `c` is exclusive.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `c[m, n] = a[m, k] · b[k, n]` in f64, every operand row-major and contiguous, on the calling
/// thread: faer's kernel (on AVX-512 machines 1.15–1.3× [`dgemm`]'s on the exact products'
/// shapes), for callers that run many of these in parallel themselves.
pub fn dgemm_seq(m: usize, k: usize, n: usize, a: &[f64], b: &[f64], c: &mut [f64]) {
    use faer::{Accum, MatMut, MatRef, Par};
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "dgemm_seq: operand sizes"
    );
    // Row-major `X` is column-major `Xᵀ`: `C = A·B` is computed as `Cᵀ = Bᵀ·Aᵀ`.
    let at = MatRef::from_column_major_slice(&a[..m * k], k, m);
    let bt = MatRef::from_column_major_slice(&b[..k * n], n, k);
    let ct = MatMut::from_column_major_slice_mut(&mut c[..m * n], n, m);
    faer::linalg::matmul::matmul(ct, Accum::Replace, bt, at, 1.0, Par::Seq);
}

/// `c[m, n] = a[m, k] · b[k, n]` in f64 on the calling thread, as [`dgemm_seq`], with `a` and `b`
/// row-major blocks of larger matrices (row strides `lda ≥ k` and `ldb ≥ n`); `c` contiguous.
#[allow(clippy::too_many_arguments)]
pub fn dgemm_seq_strided(
    m: usize,
    k: usize,
    n: usize,
    a: &[f64],
    lda: usize,
    b: &[f64],
    ldb: usize,
    c: &mut [f64],
) {
    use faer::{Accum, MatMut, MatRef, Par};
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lda >= k
            && ldb >= n
            && a.len() >= (m - 1) * lda + k
            && (k == 0 || b.len() >= (k - 1) * ldb + n)
            && c.len() >= m * n,
        "dgemm_seq_strided: operand sizes"
    );
    let at = MatRef::from_column_major_slice_with_stride(&a[..(m - 1) * lda + k], k, m, lda);
    let bt = if k == 0 {
        MatRef::from_column_major_slice(&b[..0], n, 0)
    } else {
        MatRef::from_column_major_slice_with_stride(&b[..(k - 1) * ldb + n], n, k, ldb)
    };
    let ct = MatMut::from_column_major_slice_mut(&mut c[..m * n], n, m);
    faer::linalg::matmul::matmul(ct, Accum::Replace, bt, at, 1.0, Par::Seq);
}

/// Dot product with four independent partial sums (vectorises without reassociation flags).
#[inline]
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = a.len() / 4;
    for k in 0..chunks {
        for l in 0..4 {
            acc[l] += a[4 * k + l] * b[4 * k + l];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for k in chunks * 4..a.len() {
        s += a[k] * b[k];
    }
    s
}

/// The mean and `1 / √(var + eps)` of one LayerNorm row, in f64 (two passes: the mean, then the
/// variance of the centred values): the arithmetic of every LayerNorm on the CPU (the forward's
/// rows, timm's per-head query/key norms, the heads run on the host), so they agree bit for bit.
/// A value then normalises as `((v − mean) · inv) as f32 · gain + bias`.
pub fn layernorm_stats(x: &[f32], eps: f32) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random SPD matrix `BᵀB + I` from a fixed pseudo-random `B`.
    fn spd(n: usize) -> Vec<f64> {
        let b: Vec<f64> = (0..n * n)
            .map(|i| (((i * 7919 + 13) % 1009) as f64 / 1009.0) - 0.5)
            .collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| b[k * n + i] * b[k * n + j]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        a
    }

    fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut c = vec![0.0; n * n];
        for i in 0..n {
            for k in 0..n {
                for j in 0..n {
                    c[i * n + j] += a[i * n + k] * b[k * n + j];
                }
            }
        }
        c
    }

    fn transpose(a: &[f64], n: usize) -> Vec<f64> {
        (0..n * n).map(|t| a[(t % n) * n + t / n]).collect()
    }

    // The unblocked column-by-column factorisation the library used before faer: the reference
    // the blocked one is held to.
    /// Lower Cholesky factor `L` of a symmetric positive-definite row-major `n × n` matrix
    /// (`A = L·Lᵀ`), or `None` when a pivot is not positive (the matrix is not positive definite
    /// in f64).
    ///
    /// Column-by-column (Crout): for column `j`, `L_jj = √(A_jj − ‖L_j,<j‖²)` and every row below
    /// it, independently, `L_ij = (A_ij − L_i,<j · L_j,<j) / L_jj`.
    fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
        assert_eq!(a.len(), n * n, "matrix must be n × n");
        let mut l = vec![0.0f64; n * n];
        for j in 0..n {
            let (_, rest) = l.split_at_mut(j * n);
            let (row_j, below) = rest.split_at_mut(n);
            let d = a[j * n + j] - dot(&row_j[..j], &row_j[..j]);
            if !(d > 0.0 && d.is_finite()) {
                return None;
            }
            let ljj = d.sqrt();
            row_j[j] = ljj;
            let row_j = &row_j[..j];
            below.par_chunks_mut(n).enumerate().for_each(|(k, row_i)| {
                let i = j + 1 + k;
                row_i[j] = (a[i * n + j] - dot(&row_i[..j], row_j)) / ljj;
            });
        }
        Some(l)
    }

    /// The inverse of a lower-triangular row-major `n × n` matrix with a non-zero diagonal, itself
    /// lower triangular. Columns are independent forward substitutions.
    fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
        assert_eq!(l.len(), n * n, "matrix must be n × n");
        // Column c of the inverse solves L·x = e_c; x_i = 0 for i < c.
        let cols: Vec<Vec<f64>> = (0..n)
            .into_par_iter()
            .map(|c| {
                let mut x = vec![0.0f64; n - c];
                for i in c..n {
                    let row = &l[i * n + c..i * n + i];
                    let s = if i == c { 1.0 } else { 0.0 } - dot(row, &x[..i - c]);
                    x[i - c] = s / l[i * n + i];
                }
                x
            })
            .collect();
        let mut inv = vec![0.0f64; n * n];
        for (c, x) in cols.iter().enumerate() {
            for (k, &v) in x.iter().enumerate() {
                inv[(c + k) * n + c] = v;
            }
        }
        inv
    }

    /// The upper-triangular `U` with a positive diagonal and `A⁻¹ = Uᵀ·U` — the factor GPTQ
    /// compensates with — or `None` when `A` is not positive definite.
    ///
    /// With `J` the reversal permutation and `J·A·J = M·Mᵀ`, `A = V·Vᵀ` for the upper-triangular
    /// `V = J·M·J`, so `A⁻¹ = V⁻ᵀ·V⁻¹` and `U = V⁻¹ = J·M⁻¹·J`: one Cholesky and one triangular
    /// inverse, instead of inverting `A` and factoring the inverse.
    fn reference_inverse_upper_factor(a: &[f64], n: usize) -> Option<Vec<f64>> {
        let rev = |i: usize| n - 1 - i;
        let mut ja = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                ja[i * n + j] = a[rev(i) * n + rev(j)];
            }
        }
        let m = cholesky(&ja, n)?;
        let mi = invert_lower(&m, n);
        let mut u = vec![0.0f64; n * n];
        for i in 0..n {
            for j in i..n {
                u[i * n + j] = mi[rev(i) * n + rev(j)];
            }
        }
        Some(u)
    }

    #[test]
    fn the_blocked_factor_matches_the_unblocked_reference() {
        for n in [1, 2, 7, 64, 129, 300, 1100] {
            let a = spd(n);
            let u = inverse_upper_factor(&a, n).expect("SPD");
            let r = reference_inverse_upper_factor(&a, n).expect("SPD");
            let scale = r.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (x, y) in u.iter().zip(&r) {
                assert!((x - y).abs() <= 1e-10 * scale, "n = {n}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn the_blocked_factor_refuses_what_is_not_positive_definite() {
        let a = [1.0, 2.0, 2.0, 1.0];
        assert!(inverse_upper_factor(&a, 2).is_none());
        let mut a = spd(50);
        a[49 * 50 + 49] = -1.0;
        assert!(inverse_upper_factor(&a, 50).is_none());
        assert!(inverse_upper_factor(&[f64::NAN], 1).is_none());
    }

    /// A factor built on the calling thread alone is the threaded one bit for bit (above the
    /// 1024 inputs where the factor uses the pool), and the setting ends with the closure.
    #[test]
    fn a_factor_on_this_thread_is_the_threaded_factor() {
        let n = 1100;
        // Correlated inputs, `exp(−|i − j|/8)` with an uneven diagonal: symmetric positive
        // definite, and far from diagonal, so the blocked updates carry real sums.
        let mut g = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                g[i * n + j] = (-(i.abs_diff(j) as f64) / 8.0).exp();
            }
            g[i * n + i] += 0.1 + (i % 7) as f64 / 70.0;
        }
        assert!(matches!(factor_par(n), faer::Par::Rayon(_)));
        let pooled = inverse_upper_factor(&g, n).expect("SPD");
        let alone = factors_on_this_thread(|| {
            assert!(matches!(factor_par(n), faer::Par::Seq));
            inverse_upper_factor(&g, n).expect("SPD")
        });
        assert!(pooled
            .iter()
            .zip(&alone)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(!FACTORS_ON_THIS_THREAD.with(|c| c.get()));
        assert!(matches!(factor_par(n), faer::Par::Rayon(_)));
    }

    #[test]
    fn cholesky_reconstructs_the_matrix() {
        let n = 23;
        let a = spd(n);
        let l = cholesky(&a, n).expect("SPD");
        let back = matmul(&l, &transpose(&l, n), n);
        for (x, y) in a.iter().zip(&back) {
            assert!((x - y).abs() < 1e-10, "{x} vs {y}");
        }
        for i in 0..n {
            for j in i + 1..n {
                assert_eq!(l[i * n + j], 0.0);
            }
        }
    }

    #[test]
    fn a_matrix_that_is_not_positive_definite_is_refused() {
        let a = [1.0, 2.0, 2.0, 1.0];
        assert!(cholesky(&a, 2).is_none());
    }

    #[test]
    fn the_inverse_factor_satisfies_ut_u_times_a_is_identity() {
        let n = 17;
        let a = spd(n);
        let u = inverse_upper_factor(&a, n).expect("SPD");
        let inv = matmul(&transpose(&u, n), &u, n);
        let eye = matmul(&inv, &a, n);
        for i in 0..n {
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((eye[i * n + j] - want).abs() < 1e-9);
                if j < i {
                    assert_eq!(u[i * n + j], 0.0);
                }
            }
            assert!(u[i * n + i] > 0.0);
        }
    }
}
