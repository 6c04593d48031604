// The GPTQ factor built on the device, in f64, from the resident Gram: the upper-triangular U
// with H⁻¹ = Uᵀ·U for the damped Gram H in visiting order (numeric::gptq::factor on the host).
// With J the reversal, J·H·J = M·Mᵀ (M lower) and U = J·M⁻¹·J: one Cholesky and one triangular
// inverse, as numeric::linalg::inverse_upper_factor does with faer's blocked kernels; here
// unblocked, one dispatch per column (Cholesky) and per row (inverse). Needs SHADER_F64.
//
//   factor_fill:   a[t, s] = H[n−1−t, n−1−s] (lower triangle), H from g (f32, off-diagonal), the
//                  damped diagonal dg (f64, visiting order) and perm; an input with dg < 0 is
//                  dead: decoupled (diagonal −dg, no off-diagonal terms).
//   chol_step(k):  column k of M into m, and the trailing update of a (right-looking).
//   inv_row(k):    row k of X = M⁻¹ into a (a is free once M is built).
//   factor_pack:   u[t, s] = X[n−1−t, n−1−s] in f32 for s ≥ t, 0 below.
//
// @group(0) @binding(0) g      : array<f32>, read        — [n, n], the resident Gram
// @group(0) @binding(1) dg     : array<f64>, read        — [n], damped diagonal, visiting order
// @group(0) @binding(2) perm   : array<u32>, read        — [n], the input visited at step t
// @group(0) @binding(3) a      : array<f64>, read_write  — [n, n] work matrix
// @group(0) @binding(4) m      : array<f64>, read_write  — [n, n] the Cholesky factor M
// @group(0) @binding(5) u      : array<f32>, read_write  — [n, n] the factor U
// @group(0) @binding(6) flag   : array<atomic<u32>>, read_write — [1], set when H is not
//                                positive definite
// @group(0) @binding(7) params : uniform FactorParams
// Workgroup 16×16 (fill, chol_step, pack: (i, j) pairs) or 256 (inv_row: one column each).
// Dispatch (ceil(n / 16), ceil(n / 16)) over the square, or the trailing square from k on for
// chol_step; (ceil((k + 1) / 256), 1) for inv_row.

struct FactorParams {
    n: u32,
    k: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> g: array<f32>;
@group(0) @binding(1) var<storage, read> dg: array<f64>;
@group(0) @binding(2) var<storage, read> perm: array<u32>;
@group(0) @binding(3) var<storage, read_write> a: array<f64>;
@group(0) @binding(4) var<storage, read_write> m: array<f64>;
@group(0) @binding(5) var<storage, read_write> u: array<f32>;
@group(0) @binding(6) var<storage, read_write> flag: array<atomic<u32>>;
@group(0) @binding(7) var<uniform> p: FactorParams;

@compute @workgroup_size(16, 16, 1)
fn factor_fill(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = p.n;
    let i = gid.y;
    let j = gid.x;
    if (i >= n || j >= n) {
        return;
    }
    // Visiting steps of the reversed matrix's (i, j).
    let t = n - 1u - i;
    let s = n - 1u - j;
    var v = f64(0.0);
    if (t == s) {
        v = abs(dg[t]);
    } else if (dg[t] > f64(0.0) && dg[s] > f64(0.0)) {
        v = f64(g[perm[t] * n + perm[s]]);
    }
    a[i * n + j] = v;
    m[i * n + j] = f64(0.0);
}

@compute @workgroup_size(16, 16, 1)
fn chol_step(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = p.n;
    let k = p.k;
    let i = k + gid.y;
    let j = k + gid.x;
    if (i >= n || j > i) {
        return;
    }
    let pivot = a[k * n + k];
    if (j == k) {
        if (i == k && !(pivot > f64(0.0))) {
            atomicStore(&flag[0], 1u);
        }
        m[i * n + k] = a[i * n + k] / sqrt(pivot);
    } else {
        a[i * n + j] = a[i * n + j] - a[i * n + k] * a[j * n + k] / pivot;
    }
}

@compute @workgroup_size(256, 1, 1)
fn inv_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = p.n;
    let k = p.k;
    let j = gid.x;
    if (j > k) {
        return;
    }
    // X[k, j] = (δ_kj − Σ_{q=j}^{k−1} M[k, q]·X[q, j]) / M[k, k]; rows above k are final.
    var acc = select(f64(0.0), f64(1.0), j == k);
    for (var q = j; q < k; q++) {
        acc = acc - m[k * n + q] * a[q * n + j];
    }
    a[k * n + j] = acc / m[k * n + k];
}

@compute @workgroup_size(16, 16, 1)
fn factor_pack(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = p.n;
    let t = gid.y;
    let s = gid.x;
    if (t >= n || s >= n) {
        return;
    }
    var v = 0.0;
    if (s >= t) {
        v = f32(a[(n - 1u - t) * n + (n - 1u - s)]);
    }
    u[t * n + s] = v;
}
