// Folds a Gram accumulator's slices before it is read back, so the readback moves one matrix
// without padding instead of `slices` padded ones: fold_sum adds every slice into slice 0 (in
// f32, slice after slice, as each slice already sums its rows), then fold_pack copies slice 0's
// upper triangle (a Gram matrix: row i from its diagonal on, row after row) or all of it (a
// cross-Gram) unpadded into slice 1's place, which the host reads.
//
// @group(0) @binding(0) g      : array<f32>, read_write — `slices` padded [np, np] slices
// @group(0) @binding(2) params : uniform FoldParams
// Workgroup 256, one element (i, j) of the n × n matrix per invocation; index
// (wid.y · 65535 + wid.x) · 256 + lid.x. Dispatch over n · n elements.

struct FoldParams {
    n: u32,
    np: u32,
    slices: u32,
    // 1: every element (a cross-Gram); 0: the upper triangle.
    full: u32,
}

@group(0) @binding(0) var<storage, read_write> g: array<f32>;
@group(0) @binding(2) var<uniform> p: FoldParams;

fn element(lid: vec3<u32>, wid: vec3<u32>) -> vec2<u32> {
    let idx = (wid.y * 65535u + wid.x) * 256u + lid.x;
    return vec2<u32>(idx / p.n, idx % p.n);
}

@compute @workgroup_size(256, 1, 1)
fn fold_sum(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let e = element(lid, wid);
    let i = e.x;
    let j = e.y;
    if (i >= p.n || (p.full == 0u && j < i)) {
        return;
    }
    let at = i * p.np + j;
    var s = g[at];
    for (var k = 1u; k < p.slices; k = k + 1u) {
        s = s + g[k * p.np * p.np + at];
    }
    g[at] = s;
}

@compute @workgroup_size(256, 1, 1)
fn fold_pack(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let e = element(lid, wid);
    let i = e.x;
    let j = e.y;
    if (i >= p.n || (p.full == 0u && j < i)) {
        return;
    }
    var out = i * p.n + j;
    if (p.full == 0u) {
        // Row i's upper part starts at Σ_{r<i} (n − r).
        out = i * p.n - (i * (i - 1u)) / 2u + (j - i);
    }
    g[p.np * p.np + out] = g[i * p.np + j];
}
