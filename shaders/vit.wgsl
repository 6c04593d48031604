// The ViT forward pass: GEMM, LayerNorm, exact-erf GELU, softmax attention, LayerScale residual,
// patch extraction, token assembly, and the zero-padded copy that feeds gram.wgsl.
//
// @group(0) @binding(0) src0   : array<f32>, read        — first input
// @group(0) @binding(1) src1   : array<f32>, read        — weights / gains / prefix tokens
// @group(0) @binding(2) src2   : array<f32>, read        — bias / position embedding
// @group(0) @binding(3) dst    : array<f32>, read_write  — output (in place for gelu, add_scaled)
// @group(0) @binding(4) p      : uniform VitParams
// Every entry point reads `VitParams` (its fields' meaning is given per kernel) and binds only
// the buffers it uses. All tensors are row-major f32 with
// no padding. Elementwise kernels use workgroups of 256 on a 2-D grid (x fastest) so more than
// 65535 workgroups can be dispatched; the host passes the grid width in `VitParams.gx`.

struct VitParams {
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    e: u32,
    gx: u32,
    eps: f32,
    scale: f32,
    f: u32,
    h: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> src0: array<f32>;
@group(0) @binding(1) var<storage, read> src1: array<f32>;
@group(0) @binding(2) var<storage, read> src2: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;
@group(0) @binding(4) var<uniform> p: VitParams;

fn flat(wid: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * p.gx + wid.x) * 256u + lid.x;
}

// ---- linear: dst[m, n] = src0[m, k] · src1[n, k]ᵀ + src2[n]      (a = m, b = k, c = n)
// Register-blocked: workgroup (16, 16) owns a 128×128 output tile, each invocation an 8×8 block
// (rows ty·4 + 0..3 and 64 + ty·4 + 0..3, the same columns from tx) in sixteen named vec4
// accumulators (no private arrays: they go to local memory on NVIDIA). K advances 8 at a time
// through two workgroup tiles stored k-major with a row stride of 33 vec4 (132 floats): the
// staging reads 8 consecutive k of a row per 8 invocations (coalesced) and writes them to 8
// different banks; the inner loop reads whole vec4s. Each output sums k in ascending order with
// fma, as before. Dispatch (⌈n/128⌉, ⌈m/128⌉).
const LIN_STRIDE: u32 = 33u;
var<workgroup> ta: array<vec4<f32>, 264>;
var<workgroup> tb: array<vec4<f32>, 264>;

fn store_row(row: u32, col0: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if (row >= p.a) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let c = col0 + j;
        if (c < p.c) {
            dst[row * p.c + c] = lo[j] + src2[c];
        }
        let c2 = col0 + 64u + j;
        if (c2 < p.c) {
            dst[row * p.c + c2] = hi[j] + src2[c2];
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn linear(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
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
    for (var k0 = 0u; k0 < p.b; k0 += 8u) {
        for (var e = 0u; e < 4u; e++) {
            let idx = tid + e * 256u;
            let r = idx / 8u;
            let kk = idx % 8u;
            let gk = k0 + kk;
            let slot = kk * LIN_STRIDE + r / 4u;
            var va = 0.0;
            if (m0 + r < p.a && gk < p.b) {
                va = src0[(m0 + r) * p.b + gk];
            }
            ta[slot][r % 4u] = va;
            var vb = 0.0;
            if (n0 + r < p.c && gk < p.b) {
                vb = src1[(n0 + r) * p.b + gk];
            }
            tb[slot][r % 4u] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 8u; kk++) {
            let a0 = ta[kk * LIN_STRIDE + lid.y];
            let a1 = ta[kk * LIN_STRIDE + 16u + lid.y];
            let b0 = tb[kk * LIN_STRIDE + lid.x];
            let b1 = tb[kk * LIN_STRIDE + 16u + lid.x];
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

// ---- layernorm: dst[r, :] = (src0[r, :] − μ) / √(σ² + eps) · src1 + src2     (a = rows, b = d)
// One workgroup of 256 per row; mean first, then the variance of the centred values (two
// passes, as the CPU does). Dispatch per row on a 2-D grid of width gx.
var<workgroup> red: array<f32, 256>;

fn reduce_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256, 1, 1)
fn layernorm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.y * p.gx + wid.x;
    if (row >= p.a) {
        return;
    }
    let d = p.b;
    let base = row * d;
    var s = 0.0;
    for (var j = lid.x; j < d; j += 256u) {
        s += src0[base + j];
    }
    let mean = reduce_sum(lid.x, s) / f32(d);
    var v = 0.0;
    for (var j = lid.x; j < d; j += 256u) {
        let c = src0[base + j] - mean;
        v += c * c;
    }
    let inv = inverseSqrt(reduce_sum(lid.x, v) / f32(d) + p.eps);
    for (var j = lid.x; j < d; j += 256u) {
        dst[base + j] = (src0[base + j] - mean) * inv * src1[j] + src2[j];
    }
}

// ---- qk_norm: timm's per-head LayerNorm of the queries and keys, in place in dst = qkv
// [rows, 3·heads·hd] (a = rows·2·heads segments, b = hd, c = heads). Segment s of a row is
// the query of head s (s < heads) or the key of head s − heads, at column s·hd either way; the
// queries take src1[0..hd] / src2[0..hd], the keys src1[hd..2hd] / src2[hd..2hd]. One workgroup
// of 256 per segment, two passes like layernorm. Dispatch per segment on a 2-D grid of width gx.
@compute @workgroup_size(256, 1, 1)
fn qk_norm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let seg = wid.y * p.gx + wid.x;
    if (seg >= p.a) {
        return;
    }
    let hd = p.b;
    let heads2 = 2u * p.c;
    let row = seg / heads2;
    let s = seg % heads2;
    let base = row * 3u * p.c * hd + s * hd;
    let off = select(hd, 0u, s < p.c);
    var t = 0.0;
    for (var j = lid.x; j < hd; j += 256u) {
        t += dst[base + j];
    }
    let mean = reduce_sum(lid.x, t) / f32(hd);
    var v = 0.0;
    for (var j = lid.x; j < hd; j += 256u) {
        let c = dst[base + j] - mean;
        v += c * c;
    }
    let inv = inverseSqrt(reduce_sum(lid.x, v) / f32(hd) + p.eps);
    for (var j = lid.x; j < hd; j += 256u) {
        dst[base + j] = (dst[base + j] - mean) * inv * src1[off + j] + src2[off + j];
    }
}

// ---- gelu: the MLP activation in place over a = count elements (src0 unused); b picks it:
// 0 exact GELU x Φ(x), 1 QuickGELU x σ(1.702 x) (CLIP), 2 tanh-approximated GELU (SigLIP).
// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), so GELU is exact to f32 rounding.
fn erf_approx(x: f32) -> f32 {
    let s = sign(x);
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-z * z);
    return s * y;
}

@compute @workgroup_size(256, 1, 1)
fn gelu(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = flat(wid, lid);
    if (i >= p.a) {
        return;
    }
    let x = dst[i];
    if (p.b == 1u) {
        dst[i] = x / (1.0 + exp(-1.702 * x));
    } else if (p.b == 2u) {
        // tanh(u) = 1 - 2 / (exp(2u) + 1), which saturates instead of overflowing.
        let u = 0.7978845608 * (x + 0.044715 * x * x * x);
        dst[i] = 0.5 * x * (2.0 - 2.0 / (exp(2.0 * u) + 1.0));
    } else {
        dst[i] = 0.5 * x * (1.0 + erf_approx(x * 0.70710678118654752));
    }
}

// ---- add_scaled: dst[r, j] += src1[j] · src0[r, j]          (a = rows·d, b = d)
@compute @workgroup_size(256, 1, 1)
fn add_scaled(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = flat(wid, lid);
    if (i >= p.a) {
        return;
    }
    dst[i] += src1[i % p.b] * src0[i];
}

// ---- attention: src0 = qkv [n·t, 3·D] (q | k | v, heads inside each) → dst [n·t, D]
// (a = t, b = head dim, c = D, scale = 1/√hd). Flash-style: one workgroup of 64 per (tile of 64
// queries, head, image), invocation i owning query 64·wid.x + i. Keys and values pass through
// workgroup memory in tiles of 16 keys × 64 head dims (vec4s, read by every invocation at the
// same address); each query keeps a running maximum m and sum l (online softmax) and its output
// in sixteen named vec4 accumulators (no private arrays: NVIDIA puts those in local memory).
// A head wider than 64 takes one pass per 64 output dims, its scores summed over all dims in
// each. No limit on t. Invocations past the last query compute on it and write nothing (every
// one of them reaches each barrier). Dispatch (⌈t/64⌉, heads, n).
//
// attention_bias: the same with an additive bias on the scaled logits: src1 = bias [groups,
// heads, t, t]; sequence z uses group z mod groups (d = groups, e = heads). Swin's relative
// position bias and shifted-window mask.
const FA_KEYS: u32 = 16u;
const FA_SC: u32 = 17u;
var<workgroup> kt: array<vec4<f32>, 256>;
var<workgroup> vt: array<vec4<f32>, 256>;
var<workgroup> fsc: array<f32, 1088>;

// 64 values of a head row (dims 64·chunk .. +64, zero past hd) as sixteen named vec4s.
struct Head64 {
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

fn fa_ld4(off: u32, x: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if (x + c < p.b) {
            v[c] = src0[off + x + c];
        }
    }
    return v;
}

// The query row starting at off, dims 64·ch ..
fn fa_query(off: u32, ch: u32) -> Head64 {
    let x = ch * 64u;
    var r: Head64;
    r.a = fa_ld4(off, x + 0u * 4u);
    r.b = fa_ld4(off, x + 1u * 4u);
    r.c = fa_ld4(off, x + 2u * 4u);
    r.d = fa_ld4(off, x + 3u * 4u);
    r.e = fa_ld4(off, x + 4u * 4u);
    r.f = fa_ld4(off, x + 5u * 4u);
    r.g = fa_ld4(off, x + 6u * 4u);
    r.h = fa_ld4(off, x + 7u * 4u);
    r.i = fa_ld4(off, x + 8u * 4u);
    r.j = fa_ld4(off, x + 9u * 4u);
    r.k = fa_ld4(off, x + 10u * 4u);
    r.l = fa_ld4(off, x + 11u * 4u);
    r.m = fa_ld4(off, x + 12u * 4u);
    r.n = fa_ld4(off, x + 13u * 4u);
    r.o = fa_ld4(off, x + 14u * 4u);
    r.p = fa_ld4(off, x + 15u * 4u);
    return r;
}

// q · kt[key j].
fn fa_dot(q: Head64, j: u32) -> f32 {
    let o = j * 16u;
    var s = 0.0;
    s += dot(q.a, kt[o + 0u]);
    s += dot(q.b, kt[o + 1u]);
    s += dot(q.c, kt[o + 2u]);
    s += dot(q.d, kt[o + 3u]);
    s += dot(q.e, kt[o + 4u]);
    s += dot(q.f, kt[o + 5u]);
    s += dot(q.g, kt[o + 6u]);
    s += dot(q.h, kt[o + 7u]);
    s += dot(q.i, kt[o + 8u]);
    s += dot(q.j, kt[o + 9u]);
    s += dot(q.k, kt[o + 10u]);
    s += dot(q.l, kt[o + 11u]);
    s += dot(q.m, kt[o + 12u]);
    s += dot(q.n, kt[o + 13u]);
    s += dot(q.o, kt[o + 14u]);
    s += dot(q.p, kt[o + 15u]);
    return s;
}

// acc + pj · vt[key j].
fn fa_axpy(acc: Head64, pj: f32, j: u32) -> Head64 {
    let o = j * 16u;
    let pv = vec4<f32>(pj);
    var r: Head64;
    r.a = fma(pv, vt[o + 0u], acc.a);
    r.b = fma(pv, vt[o + 1u], acc.b);
    r.c = fma(pv, vt[o + 2u], acc.c);
    r.d = fma(pv, vt[o + 3u], acc.d);
    r.e = fma(pv, vt[o + 4u], acc.e);
    r.f = fma(pv, vt[o + 5u], acc.f);
    r.g = fma(pv, vt[o + 6u], acc.g);
    r.h = fma(pv, vt[o + 7u], acc.h);
    r.i = fma(pv, vt[o + 8u], acc.i);
    r.j = fma(pv, vt[o + 9u], acc.j);
    r.k = fma(pv, vt[o + 10u], acc.k);
    r.l = fma(pv, vt[o + 11u], acc.l);
    r.m = fma(pv, vt[o + 12u], acc.m);
    r.n = fma(pv, vt[o + 13u], acc.n);
    r.o = fma(pv, vt[o + 14u], acc.o);
    r.p = fma(pv, vt[o + 15u], acc.p);
    return r;
}

fn fa_scale(acc: Head64, c: f32) -> Head64 {
    let cv = vec4<f32>(c);
    var r: Head64;
    r.a = acc.a * cv;
    r.b = acc.b * cv;
    r.c = acc.c * cv;
    r.d = acc.d * cv;
    r.e = acc.e * cv;
    r.f = acc.f * cv;
    r.g = acc.g * cv;
    r.h = acc.h * cv;
    r.i = acc.i * cv;
    r.j = acc.j * cv;
    r.k = acc.k * cv;
    r.l = acc.l * cv;
    r.m = acc.m * cv;
    r.n = acc.n * cv;
    r.o = acc.o * cv;
    r.p = acc.p * cv;
    return r;
}

fn fa_st4(off: u32, x: u32, lim: u32, v: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) {
        if (x + c < lim) {
            dst[off + x + c] = v[c];
        }
    }
}

// dims off .. off + min(64, lim) of dst.
fn fa_store(off: u32, lim: u32, o: Head64) {
    fa_st4(off, 0u * 4u, lim, o.a);
    fa_st4(off, 1u * 4u, lim, o.b);
    fa_st4(off, 2u * 4u, lim, o.c);
    fa_st4(off, 3u * 4u, lim, o.d);
    fa_st4(off, 4u * 4u, lim, o.e);
    fa_st4(off, 5u * 4u, lim, o.f);
    fa_st4(off, 6u * 4u, lim, o.g);
    fa_st4(off, 7u * 4u, lim, o.h);
    fa_st4(off, 8u * 4u, lim, o.i);
    fa_st4(off, 9u * 4u, lim, o.j);
    fa_st4(off, 10u * 4u, lim, o.k);
    fa_st4(off, 11u * 4u, lim, o.l);
    fa_st4(off, 12u * 4u, lim, o.m);
    fa_st4(off, 13u * 4u, lim, o.n);
    fa_st4(off, 14u * 4u, lim, o.o);
    fa_st4(off, 15u * 4u, lim, o.p);
}

// Key rows k0 .. k0 + 16 of one head: dims 64·kc .. of k (column D) into kt and, with_v, dims
// 64·vc .. of v (column 2·D) into vt; zero past t and hd.
fn fa_load_tile(lid: u32, base: u32, h: u32, k0: u32, kc: u32, vc: u32, with_v: bool) {
    let t = p.a;
    let d3 = 3u * p.c;
    for (var e = lid; e < 1024u; e += 64u) {
        let j = e / 64u;
        let x = e % 64u;
        let row = base + (k0 + j) * d3 + h * p.b;
        let kd = kc * 64u + x;
        let vd = vc * 64u + x;
        var kv = 0.0;
        var vv = 0.0;
        if (k0 + j < t && kd < p.b) {
            kv = src0[row + p.c + kd];
        }
        if (with_v && k0 + j < t && vd < p.b) {
            vv = src0[row + 2u * p.c + vd];
        }
        kt[j * 16u + x / 4u][x % 4u] = kv;
        if (with_v) {
            vt[j * 16u + x / 4u][x % 4u] = vv;
        }
    }
}

fn flash(lid: u32, wid: vec3<u32>, biased: bool) {
    let t = p.a;
    let d3 = 3u * p.c;
    let h = wid.y;
    let z = wid.z;
    let base = z * t * d3;
    let qi = wid.x * 64u + lid;
    let qrow = min(qi, t - 1u);
    let qoff = base + qrow * d3 + h * p.b;
    var boff = 0u;
    if (biased) {
        boff = (((z % p.d) * p.e + h) * t + qrow) * t;
    }
    let chunks = (p.b + 63u) / 64u;
    for (var oc = 0u; oc < chunks; oc++) {
        var q = fa_query(qoff, 0u);
        var o: Head64;
        var m = -3.4e38;
        var l = 0.0;
        for (var k0 = 0u; k0 < t; k0 += FA_KEYS) {
            for (var dc = 0u; dc < chunks; dc++) {
                workgroupBarrier();
                fa_load_tile(lid, base, h, k0, dc, oc, dc == 0u);
                workgroupBarrier();
                if (chunks > 1u) {
                    q = fa_query(qoff, dc);
                }
                for (var j = 0u; j < FA_KEYS; j++) {
                    var s = fa_dot(q, j);
                    if (dc > 0u) {
                        s += fsc[lid * FA_SC + j];
                    }
                    fsc[lid * FA_SC + j] = s;
                }
            }
            // Scaled (and biased) logits of this tile; keys past t never count.
            var mt = -3.4e38;
            for (var j = 0u; j < FA_KEYS; j++) {
                var s = -3.4e38;
                if (k0 + j < t) {
                    s = fsc[lid * FA_SC + j] * p.scale;
                    if (biased) {
                        s += src1[boff + k0 + j];
                    }
                    mt = max(mt, s);
                }
                fsc[lid * FA_SC + j] = s;
            }
            let mn = max(m, mt);
            let corr = exp(m - mn);
            l *= corr;
            o = fa_scale(o, corr);
            for (var j = 0u; j < FA_KEYS; j++) {
                if (k0 + j < t) {
                    let pj = exp(fsc[lid * FA_SC + j] - mn);
                    l += pj;
                    o = fa_axpy(o, pj, j);
                }
            }
            m = mn;
        }
        if (qi < t) {
            fa_store((z * t + qi) * p.c + h * p.b + oc * 64u, p.b - oc * 64u, fa_scale(o, 1.0 / l));
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn attention(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    flash(li, wid, false);
}

@compute @workgroup_size(64, 1, 1)
fn attention_bias(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    flash(li, wid, true);
}

// ---- gather_rows: dst[r, j] = src0[src1[r], j]; the row indices are stored as f32 (exact below
// 2^24, which the host checks). (a = total elements, b = d)
@compute @workgroup_size(256, 1, 1)
fn gather_rows(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = flat(wid, lid);
    if (i >= p.a) {
        return;
    }
    let r = i / p.b;
    dst[i] = src0[u32(src1[r]) * p.b + i % p.b];
}

// ---- im2col: src0 = pixels [n, ch, side_h, side_w] → dst [n·gh·gw, ch·pz²]
// (a = total elements, b = ch, c = side_w, d = pz (patch size), e = gw, f = side_h, h = gh;
// pixels past the last whole patch are never read)
@compute @workgroup_size(256, 1, 1)
fn im2col(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = flat(wid, lid);
    if (i >= p.a) {
        return;
    }
    let pz = p.d;
    let gw = p.e;
    let cells = p.h * gw;
    let k = p.b * pz * pz;
    let row = i / k;
    let col = i % k;
    let img = row / cells;
    let cell = row % cells;
    let gy = cell / gw;
    let gx = cell % gw;
    let ch = col / (pz * pz);
    let ky = (col / pz) % pz;
    let kx = col % pz;
    dst[i] = src0[((img * p.b + ch) * p.f + gy * pz + ky) * p.c + gx * pz + kx];
}

// ---- assemble: tokens [n, pre + g, D] = (prefix tokens src1 | patches src0) + pos src2
// (a = total elements, b = pre, c = g (patch tokens), d = D)
@compute @workgroup_size(256, 1, 1)
fn assemble(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = flat(wid, lid);
    if (i >= p.a) {
        return;
    }
    let t = p.b + p.c;
    let j = i % p.d;
    let tok = (i / p.d) % t;
    let img = i / (p.d * t);
    var v = 0.0;
    if (tok < p.b) {
        v = src1[tok * p.d + j];
    } else {
        v = src0[(img * p.c + tok - p.b) * p.d + j];
    }
    dst[i] = v + src2[tok * p.d + j];
}

// ---- pad_rows: dst [rp, np] = rows r0 .. r0 + rows of src0 [*, n], zero-padded
// (a = rp·np total, b = n, c = np, d = r0, e = rows) — the layout gram.wgsl reads.
@compute @workgroup_size(256, 1, 1)
fn pad_rows(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let i = flat(wid, lid);
    if (i >= p.a) {
        return;
    }
    let r = i / p.c;
    let j = i % p.c;
    var v = 0.0;
    if (r < p.e && j < p.b) {
        v = src0[(p.d + r) * p.b + j];
    }
    dst[i] = v;
}
