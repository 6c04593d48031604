// One COMQ sweep in a shared order, blocked (the CPU twin is `sweep_shared` in
// src/device/cpu.rs). Every row visits the columns in the same order `perm`; for a block
// J = perm[t0 .. t0 + b) (b ≤ 64):
//   block_steps : one invocation per row walks the block's columns with a private copy of R_i[J],
//                 updated by the block's corner G[J, J] only (staged in workgroup memory); it sets
//                 Q̂ and the codes as the plain sweep does and writes the changes D_i[t] into d.
//   block_update: R −= D·G[J, :] for the whole tile, a tiled matrix product: 64 × 64 outputs per
//                 workgroup of 16 × 16 invocations, a 4 × 4 block per invocation in named vec4
//                 accumulators, k in steps of 16.
// The two together equal b steps of the plain sweep (sweep.wgsl) in this order; only the f32
// rounding of R differs.
//
// @group(0) @binding(0) w      : array<f32>, read        — [rows, n]
// @group(0) @binding(1) q      : array<f32>, read_write  — [rows, n]
// @group(0) @binding(2) r      : array<f32>, read_write  — [rows, n]
// @group(0) @binding(3) codes  : array<i32>, read_write  — [rows, n]
// @group(0) @binding(4) g      : array<f32>, read        — [n, n]
// @group(0) @binding(5) delta  : array<f32>, read        — [rows, groups]
// @group(0) @binding(6) lo     : array<i32>, read        — [rows, groups]
// @group(0) @binding(7) perm   : array<u32>, read        — [n]
// @group(0) @binding(8) d      : array<f32>, read_write  — [rows, 64]
// @group(0) @binding(9) params : uniform BlockParams
// block_steps uses every binding; block_update uses r, g, perm, d and params.
// block_steps:  workgroup 64, one invocation per row; dispatch (ceil(rows / 64), 1, 1).
// block_update: workgroup (16, 16); dispatch (ceil(n / 64), ceil(rows / 64), 1).

struct BlockParams {
    rows: u32,
    n: u32,
    group_size: u32,
    levels: i32,
    dead: f32,
    groups: u32,
    t0: u32,
    b: u32,
}

@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> r: array<f32>;
@group(0) @binding(3) var<storage, read_write> codes: array<i32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read> delta: array<f32>;
@group(0) @binding(6) var<storage, read> lo: array<i32>;
@group(0) @binding(7) var<storage, read> perm: array<u32>;
@group(0) @binding(8) var<storage, read_write> d: array<f32>;
@group(0) @binding(9) var<uniform> p: BlockParams;

const B: u32 = 64u;
var<workgroup> corner: array<f32, 4096>;

fn nearest(t: f32, dl: f32, l: i32, levels: i32) -> i32 {
    let k = clamp(ceil(t / dl - 0.5), f32(l), f32(l + levels - 1));
    return i32(k);
}

@compute @workgroup_size(64, 1, 1)
fn block_steps(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = p.b;
    for (var e = li; e < b * b; e += 64u) {
        let t = e / b;
        let c = e % b;
        corner[t * B + c] = g[perm[p.t0 + t] * p.n + perm[p.t0 + c]];
    }
    workgroupBarrier();
    let row = wid.x * 64u + li;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var rj: array<f32, 64>;
    for (var c = 0u; c < b; c++) {
        rj[c] = r[base + perm[p.t0 + c]];
    }
    for (var t = 0u; t < b; t++) {
        let j = perm[p.t0 + t];
        let gtt = corner[t * B + t];
        let slot = row * p.groups + j / p.group_size;
        let dl = delta[slot];
        let q_old = q[base + j];
        var tgt = w[base + j];
        if (gtt > p.dead) {
            tgt = q_old + rj[t] / gtt;
        }
        let k = nearest(tgt, dl, lo[slot], p.levels);
        let q_new = dl * f32(k);
        let dv = q_new - q_old;
        if (dv != 0.0) {
            for (var c = t + 1u; c < b; c++) {
                rj[c] -= dv * corner[t * B + c];
            }
        }
        q[base + j] = q_new;
        codes[base + j] = k;
        d[row * B + t] = dv;
    }
}

// Staged k-major as vec4s: ta[kk·16 + i/4] holds rows 4·(i/4) .. +4 of D at k = k0 + kk, tb[kk·16 +
// c/4] columns 4·(c/4) .. +4 of G[J, :]; each invocation owns a 4 × 4 block (rows ty·4 + 0..3,
// columns tx·4 + 0..3) in four named vec4 accumulators (no private arrays, which NVIDIA puts in
// local memory), each output summing k in ascending order.
var<workgroup> ta: array<vec4<f32>, 256>;
var<workgroup> tb: array<vec4<f32>, 256>;

@compute @workgroup_size(16, 16, 1)
fn block_update(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let col0 = wid.x * 64u;
    let row0 = wid.y * 64u;
    let li = lid.y * 16u + lid.x;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.b; k0 += 16u) {
        for (var e = li; e < 1024u; e += 256u) {
            // 64 rows × 16 k of D, and 16 k × 64 columns of G[J, :].
            let ar = e / 16u;
            let ak = e % 16u;
            var av = 0.0;
            if (row0 + ar < p.rows && k0 + ak < p.b) {
                av = d[(row0 + ar) * B + k0 + ak];
            }
            ta[ak * 16u + ar / 4u][ar % 4u] = av;
            let bk = e / 64u;
            let bc = e % 64u;
            var bv = 0.0;
            if (k0 + bk < p.b && col0 + bc < p.n) {
                bv = g[perm[p.t0 + k0 + bk] * p.n + col0 + bc];
            }
            tb[bk * 16u + bc / 4u][bc % 4u] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            let a = ta[kk * 16u + lid.y];
            let b = tb[kk * 16u + lid.x];
            c0 = c0 + vec4<f32>(a.x) * b;
            c1 = c1 + vec4<f32>(a.y) * b;
            c2 = c2 + vec4<f32>(a.z) * b;
            c3 = c3 + vec4<f32>(a.w) * b;
        }
        workgroupBarrier();
    }
    let col = col0 + lid.x * 4u;
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + lid.y * 4u + i;
        if (row >= p.rows) {
            break;
        }
        var v = c0;
        if (i == 1u) { v = c1; }
        if (i == 2u) { v = c2; }
        if (i == 3u) { v = c3; }
        for (var j = 0u; j < 4u; j++) {
            if (col + j < p.n) {
                r[row * p.n + col + j] -= v[j];
            }
        }
    }
}
