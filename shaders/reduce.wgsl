// Per-row dot products, summed in f64 by sum.wgsl where the adapter has f64, else on the host:
//   mode 0: Σ_c (W − Q̂)_c · R_c   (the loss, with R exact)
//   mode 1: Σ_c W_c · S_c          (the energy, with S = W·G)
//   mode 2: Σ_c K_c · R_c          (numerator of the per-layer scale step)
//   mode 3: Σ_c K_c · S_c          (denominator, with S = K·G)
//   mode 4: Σ_c (W − Q̂)_c · S_c   (a held-out loss, with S = (W − Q̂)·G_h)
//   mode 5: Σ_c (W − Q̂)_c²        (the term a damping adds to the loss)
//
// @group(0) @binding(0) w      : array<f32>, read        — [rows, n]
// @group(0) @binding(1) q      : array<f32>, read        — [rows, n]
// @group(0) @binding(2) codes  : array<i32>, read        — [rows, n]
// @group(0) @binding(3) r      : array<f32>, read        — [rows, n]
// @group(0) @binding(4) s      : array<f32>, read        — [rows, n]
// @group(0) @binding(5) out    : array<f32>, read_write  — [rows]
// @group(0) @binding(6) params : uniform ReduceParams
// Workgroup 256, one workgroup per row (row = wid.y · 65535 + wid.x), tree reduction.
// Dispatch (min(rows, 65535), ceil(rows / 65535), 1).

struct ReduceParams {
    rows: u32,
    n: u32,
    mode: u32,
    pad0: u32,
}

@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> codes: array<i32>;
@group(0) @binding(3) var<storage, read> r: array<f32>;
@group(0) @binding(4) var<storage, read> s: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<uniform> p: ReduceParams;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256, 1, 1)
fn reduce(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.y * 65535u + wid.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var acc = 0.0;
    for (var c = lid.x; c < p.n; c += WG) {
        let idx = base + c;
        switch p.mode {
            case 0u: { acc = fma(w[idx] - q[idx], r[idx], acc); }
            case 1u: { acc = fma(w[idx], s[idx], acc); }
            case 2u: { acc = fma(f32(codes[idx]), r[idx], acc); }
            case 3u: { acc = fma(f32(codes[idx]), s[idx], acc); }
            case 4u: { acc = fma(w[idx] - q[idx], s[idx], acc); }
            default: {
                let e = w[idx] - q[idx];
                acc = fma(e, e, acc);
            }
        }
    }
    partial[lid.x] = acc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid.x < stride) {
            partial[lid.x] += partial[lid.x + stride];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        out[row] = partial[0];
    }
}
