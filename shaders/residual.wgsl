// Row-by-Gram products: out = A·G for a tile of rows, A chosen by mode.
//   mode 0: A = W − Q̂   (the residual R = (W − Q̂)·G)
//   mode 1: A = W       (for the energy Σ wᵀGw)
//   mode 2: A = codes   (K·G, for the per-layer scale step)
//
// @group(0) @binding(0) w      : array<f32>, read        — [rows, n]
// @group(0) @binding(1) q      : array<f32>, read        — [rows, n]
// @group(0) @binding(2) codes  : array<i32>, read        — [rows, n]
// @group(0) @binding(3) g      : array<f32>, read        — [n, n], symmetric
// @group(0) @binding(4) out    : array<f32>, read_write  — [rows, n]
// @group(0) @binding(5) params : uniform ResidualParams
// Workgroup (16, 16) owns a 128×128 tile of `out`, each invocation an 8×8 block (rows ty·4 + 0..3
// and 64 + ty·4 + 0..3, the same columns from tx) in sixteen named vec4 accumulators (no private
// arrays: they go to local memory on NVIDIA). k advances 8 at a time through two workgroup tiles
// stored k-major: A's rows are staged 8 consecutive k per 8 invocations into a row stride of 33
// vec4 (32 different banks), G's rows are read along c and stored as they are. Each output sums
// k in ascending order with fma, as the one-output kernel before it did.
// Dispatch (ceil(n / 128), ceil(rows / 128), 1).

struct ResidualParams {
    rows: u32,
    n: u32,
    mode: u32,
    pad0: u32,
}

@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> codes: array<i32>;
@group(0) @binding(3) var<storage, read> g: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<uniform> p: ResidualParams;

const STRIDE: u32 = 33u;
var<workgroup> ta: array<vec4<f32>, 264>;
var<workgroup> tb: array<vec4<f32>, 264>;

fn a_at(idx: u32) -> f32 {
    if (p.mode == 0u) {
        return w[idx] - q[idx];
    } else if (p.mode == 1u) {
        return w[idx];
    }
    return f32(codes[idx]);
}

fn store_row(row: u32, col0: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if (row >= p.rows) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let c = col0 + j;
        if (c < p.n) {
            out[row * p.n + c] = lo[j];
        }
        let c2 = col0 + 64u + j;
        if (c2 < p.n) {
            out[row * p.n + c2] = hi[j];
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn residual(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let m0 = wid.y * 128u;
    let n0 = wid.x * 128u;
    let tid = lid.y * 16u + lid.x;
    var c0 = vec4<f32>(0.0);
    var d0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var d1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var d2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var d3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0);
    var d4 = vec4<f32>(0.0);
    var c5 = vec4<f32>(0.0);
    var d5 = vec4<f32>(0.0);
    var c6 = vec4<f32>(0.0);
    var d6 = vec4<f32>(0.0);
    var c7 = vec4<f32>(0.0);
    var d7 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.n; k0 += 8u) {
        for (var e = 0u; e < 4u; e++) {
            let idx = tid + e * 256u;
            // A: row r, k = k0 + kk (8 consecutive k per 8 invocations).
            let r = idx / 8u;
            let kk = idx % 8u;
            var va = 0.0;
            if (m0 + r < p.rows && k0 + kk < p.n) {
                va = a_at((m0 + r) * p.n + k0 + kk);
            }
            ta[kk * STRIDE + r / 4u][r % 4u] = va;
            // G: row k0 + gk, columns n0 + c (consecutive c per invocation).
            let gk = idx / 128u;
            let c = idx % 128u;
            var vb = 0.0;
            if (k0 + gk < p.n && n0 + c < p.n) {
                vb = g[(k0 + gk) * p.n + n0 + c];
            }
            tb[gk * STRIDE + c / 4u][c % 4u] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 8u; kk++) {
            let a0 = ta[kk * STRIDE + lid.y];
            let a1 = ta[kk * STRIDE + 16u + lid.y];
            let b0 = tb[kk * STRIDE + lid.x];
            let b1 = tb[kk * STRIDE + 16u + lid.x];
            c0 = fma(vec4<f32>(a0.x), b0, c0);
            d0 = fma(vec4<f32>(a0.x), b1, d0);
            c1 = fma(vec4<f32>(a0.y), b0, c1);
            d1 = fma(vec4<f32>(a0.y), b1, d1);
            c2 = fma(vec4<f32>(a0.z), b0, c2);
            d2 = fma(vec4<f32>(a0.z), b1, d2);
            c3 = fma(vec4<f32>(a0.w), b0, c3);
            d3 = fma(vec4<f32>(a0.w), b1, d3);
            c4 = fma(vec4<f32>(a1.x), b0, c4);
            d4 = fma(vec4<f32>(a1.x), b1, d4);
            c5 = fma(vec4<f32>(a1.y), b0, c5);
            d5 = fma(vec4<f32>(a1.y), b1, d5);
            c6 = fma(vec4<f32>(a1.z), b0, c6);
            d6 = fma(vec4<f32>(a1.z), b1, d6);
            c7 = fma(vec4<f32>(a1.w), b0, c7);
            d7 = fma(vec4<f32>(a1.w), b1, d7);
        }
        workgroupBarrier();
    }
    store_row(m0 + lid.y * 4u + 0u, n0 + lid.x * 4u, c0, d0);
    store_row(m0 + lid.y * 4u + 1u, n0 + lid.x * 4u, c1, d1);
    store_row(m0 + lid.y * 4u + 2u, n0 + lid.x * 4u, c2, d2);
    store_row(m0 + lid.y * 4u + 3u, n0 + lid.x * 4u, c3, d3);
    store_row(m0 + 64u + lid.y * 4u + 0u, n0 + lid.x * 4u, c4, d4);
    store_row(m0 + 64u + lid.y * 4u + 1u, n0 + lid.x * 4u, c5, d5);
    store_row(m0 + 64u + lid.y * 4u + 2u, n0 + lid.x * 4u, c6, d6);
    store_row(m0 + 64u + lid.y * 4u + 3u, n0 + lid.x * 4u, c7, d7);
}
