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
// Workgroup 16×16 for fill and pack: (i, j) pairs, dispatch (ceil(n / 16), ceil(n / 16)).
// chol_step and inv_row take their step k from the dispatch's size, so every step shares one
// bind group: chol_step(k) runs 64 columns of one row per workgroup, dispatch
// (n − k, ceil((n − k) / 64)); inv_row(k) one column per workgroup, its sum split over 64
// invocations, dispatch (k + 1, 1).

struct FactorParams {
    n: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
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

@compute @workgroup_size(64, 1, 1)
fn chol_step(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let n = p.n;
    let k = n - nwg.x;
    let i = k + wid.x;
    let j = k + wid.y * 64u + lid.x;
    if (j > i) {
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

var<workgroup> partial: array<f64, 64>;

@compute @workgroup_size(64, 1, 1)
fn inv_row(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let n = p.n;
    let k = nwg.x - 1u;
    let j = wid.x;
    // X[k, j] = (δ_kj − Σ_{q=j}^{k−1} M[k, q]·X[q, j]) / M[k, k]; rows above k are final.
    var acc = f64(0.0);
    for (var q = j + lid.x; q < k; q += 64u) {
        acc = acc + m[k * n + q] * a[q * n + j];
    }
    partial[lid.x] = acc;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half = half / 2u) {
        if (lid.x < half) {
            partial[lid.x] = partial[lid.x] + partial[lid.x + half];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        let delta = select(f64(0.0), f64(1.0), j == k);
        a[k * n + j] = (delta - partial[0]) / m[k * n + k];
    }
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
