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
// Workgroup (16, 16), one output per invocation, 16×16 tiles of A and G in workgroup memory.
// Dispatch (ceil(n / 16), ceil(rows / 16), 1).

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

var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tb: array<array<f32, 16>, 16>;

fn a_at(idx: u32) -> f32 {
    if (p.mode == 0u) {
        return w[idx] - q[idx];
    } else if (p.mode == 1u) {
        return w[idx];
    }
    return f32(codes[idx]);
}

@compute @workgroup_size(16, 16, 1)
fn residual(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = wid.y * 16u + lid.y;
    let c = wid.x * 16u + lid.x;
    var acc = 0.0;
    let tiles = (p.n + 15u) / 16u;
    for (var t = 0u; t < tiles; t++) {
        let ka = t * 16u + lid.x;
        var va = 0.0;
        if (i < p.rows && ka < p.n) {
            va = a_at(i * p.n + ka);
        }
        ta[lid.y][lid.x] = va;
        let kb = t * 16u + lid.y;
        var vb = 0.0;
        if (kb < p.n && c < p.n) {
            vb = g[kb * p.n + c];
        }
        tb[lid.y][lid.x] = vb;
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            acc = fma(ta[lid.y][kk], tb[kk][lid.x], acc);
        }
        workgroupBarrier();
    }
    if (i < p.rows && c < p.n) {
        out[i * p.n + c] = acc;
    }
}
