// One COMQ sweep in a shared order, blocked (the CPU twin is `sweep_shared` in
// src/device/cpu.rs). Every row visits the columns in the same order `perm`; for a block
// J = perm[t0 .. t0 + b) (b ≤ 64):
//   block_steps : one invocation per row walks the block's columns with its own copy of R_i[J]
//                 in registers (sixteen named vec4s), updated by the block's corner G[J, J] only
//                 (staged in workgroup memory as vec4 rows); it sets
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
// G[J, J] row-major as vec4s: corner[t·16 + c/4][c % 4] = G[perm[t0 + t], perm[t0 + c]] (zero
// past b). Every invocation reads the same address (a broadcast).
var<workgroup> corner: array<vec4<f32>, 1024>;

// A row's residual over the block's 64 columns in sixteen named vec4s (registers; a private
// array would go to local memory on NVIDIA).
struct Row64 {
    a: vec4<f32>,
    b: vec4<f32>,
    c: vec4<f32>,
    d: vec4<f32>,
    e: vec4<f32>,
    f: vec4<f32>,
    g: vec4<f32>,
    h: vec4<f32>,
    i: vec4<f32>,
    j: vec4<f32>,
    k: vec4<f32>,
    l: vec4<f32>,
    m: vec4<f32>,
    n: vec4<f32>,
    o: vec4<f32>,
    p: vec4<f32>,
}

fn nearest(t: f32, dl: f32, l: i32, levels: i32) -> i32 {
    let k = clamp(ceil(t / dl - 0.5), f32(l), f32(l + levels - 1));
    return i32(k);
}

fn rj_get(r: Row64, t: u32) -> f32 {
    var v = r.p;
    switch (t / 4u) {
        case 0u: { v = r.a; }
        case 1u: { v = r.b; }
        case 2u: { v = r.c; }
        case 3u: { v = r.d; }
        case 4u: { v = r.e; }
        case 5u: { v = r.f; }
        case 6u: { v = r.g; }
        case 7u: { v = r.h; }
        case 8u: { v = r.i; }
        case 9u: { v = r.j; }
        case 10u: { v = r.k; }
        case 11u: { v = r.l; }
        case 12u: { v = r.m; }
        case 13u: { v = r.n; }
        case 14u: { v = r.o; }
        default: {}
    }
    return v[t % 4u];
}

// r − dv · corner row t. Columns up to t change too; they are never read again in the block.
fn rj_step(r: Row64, dv: f32, t: u32) -> Row64 {
    let o = t * 16u;
    let dvv = vec4<f32>(-dv);
    var x: Row64;
    x.a = fma(dvv, corner[o + 0u], r.a);
    x.b = fma(dvv, corner[o + 1u], r.b);
    x.c = fma(dvv, corner[o + 2u], r.c);
    x.d = fma(dvv, corner[o + 3u], r.d);
    x.e = fma(dvv, corner[o + 4u], r.e);
    x.f = fma(dvv, corner[o + 5u], r.f);
    x.g = fma(dvv, corner[o + 6u], r.g);
    x.h = fma(dvv, corner[o + 7u], r.h);
    x.i = fma(dvv, corner[o + 8u], r.i);
    x.j = fma(dvv, corner[o + 9u], r.j);
    x.k = fma(dvv, corner[o + 10u], r.k);
    x.l = fma(dvv, corner[o + 11u], r.l);
    x.m = fma(dvv, corner[o + 12u], r.m);
    x.n = fma(dvv, corner[o + 13u], r.n);
    x.o = fma(dvv, corner[o + 14u], r.o);
    x.p = fma(dvv, corner[o + 15u], r.p);
    return x;
}

fn rj_load4(base: u32, c: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if (c + e < p.b) {
            v[e] = r[base + perm[p.t0 + c + e]];
        }
    }
    return v;
}

@compute @workgroup_size(64, 1, 1)
fn block_steps(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = p.b;
    for (var e = li; e < B * B; e += 64u) {
        let t = e / B;
        let c = e % B;
        var v = 0.0;
        if (t < b && c < b) {
            v = g[perm[p.t0 + t] * p.n + perm[p.t0 + c]];
        }
        corner[t * 16u + c / 4u][c % 4u] = v;
    }
    workgroupBarrier();
    let row = wid.x * 64u + li;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var rj: Row64;
    rj.a = rj_load4(base, 0u * 4u);
    rj.b = rj_load4(base, 1u * 4u);
    rj.c = rj_load4(base, 2u * 4u);
    rj.d = rj_load4(base, 3u * 4u);
    rj.e = rj_load4(base, 4u * 4u);
    rj.f = rj_load4(base, 5u * 4u);
    rj.g = rj_load4(base, 6u * 4u);
    rj.h = rj_load4(base, 7u * 4u);
    rj.i = rj_load4(base, 8u * 4u);
    rj.j = rj_load4(base, 9u * 4u);
    rj.k = rj_load4(base, 10u * 4u);
    rj.l = rj_load4(base, 11u * 4u);
    rj.m = rj_load4(base, 12u * 4u);
    rj.n = rj_load4(base, 13u * 4u);
    rj.o = rj_load4(base, 14u * 4u);
    rj.p = rj_load4(base, 15u * 4u);
    for (var t = 0u; t < b; t++) {
        let j = perm[p.t0 + t];
        let gtt = corner[t * 16u + t / 4u][t % 4u];
        let slot = row * p.groups + j / p.group_size;
        let dl = delta[slot];
        let q_old = q[base + j];
        var tgt = w[base + j];
        if (gtt > p.dead) {
            tgt = q_old + rj_get(rj, t) / gtt;
        }
        let k = nearest(tgt, dl, lo[slot], p.levels);
        let q_new = dl * f32(k);
        let dv = q_new - q_old;
        if (dv != 0.0) {
            rj = rj_step(rj, dv, t);
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
