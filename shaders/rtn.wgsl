// Element-wise grid operations.
//   rtn:         codes = nearest(W), Q̂ = Δ·codes   (round to nearest on the same grid)
//   apply_scale: Q̂ = Δ·codes                       (after the steps Δ changed)
//
// @group(0) @binding(0) w      : array<f32>, read        — [rows, n]
// @group(0) @binding(1) q      : array<f32>, read_write  — [rows, n]
// @group(0) @binding(2) codes  : array<i32>, read_write  — [rows, n]
// @group(0) @binding(3) delta  : array<f32>, read        — [rows, groups]
// @group(0) @binding(4) lo     : array<i32>, read        — [rows, groups]
// @group(0) @binding(5) params : uniform GridParams
// Workgroup 256, one element per invocation, index = (wid.y · 65535 + wid.x) · 256 + lid.
// Dispatch (min(blocks, 65535), ceil(blocks / 65535), 1) with blocks = ceil(rows · n / 256).

struct GridParams {
    rows: u32,
    n: u32,
    group_size: u32,
    levels: i32,
}

@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> codes: array<i32>;
@group(0) @binding(3) var<storage, read> delta: array<f32>;
@group(0) @binding(4) var<storage, read> lo: array<i32>;
@group(0) @binding(5) var<uniform> p: GridParams;

// The one rounding rule: clamp(ceil(t/Δ − ½), lo, lo + levels − 1), ties to the lower code.
fn nearest(t: f32, d: f32, l: i32, levels: i32) -> i32 {
    let k = clamp(ceil(t / d - 0.5), f32(l), f32(l + levels - 1));
    return i32(k);
}

fn slot_of(idx: u32) -> u32 {
    let row = idx / p.n;
    let col = idx % p.n;
    return row * (p.n / p.group_size) + col / p.group_size;
}

@compute @workgroup_size(256, 1, 1)
fn rtn(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let idx = (wid.y * 65535u + wid.x) * 256u + lid.x;
    if (idx >= p.rows * p.n) {
        return;
    }
    let s = slot_of(idx);
    let k = nearest(w[idx], delta[s], lo[s], p.levels);
    codes[idx] = k;
    q[idx] = delta[s] * f32(k);
}

@compute @workgroup_size(256, 1, 1)
fn apply_scale(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let idx = (wid.y * 65535u + wid.x) * 256u + lid.x;
    if (idx >= p.rows * p.n) {
        return;
    }
    q[idx] = delta[slot_of(idx)] * f32(codes[idx]);
}
