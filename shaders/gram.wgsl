// Gram accumulation: G += XᵀX for one chunk of activation rows.
//
// @group(0) @binding(0) x      : array<vec4<f32>>, read        — chunk, row-major [rows_p, n_p]
// @group(0) @binding(1) g      : array<vec4<f32>>, read_write  — accumulator, row-major [n_p, n_p]
// @group(0) @binding(2) params : uniform GramParams
// Only the upper triangle is accumulated (tiles left of the diagonal return at once; the host
// reads j ≥ i). A chunk's sums are f32 in registers, added into the f32 accumulator, which is read
// back once at the end (ARCHITECTURE.md, numeric contract: within 2e-6 relative of f64 after 625
// chunks of a stream with mean 3, tests/parity.rs).
// Workgroup (16, 16); each invocation owns a 4×4 block of G held in four named vec4
// accumulators (private arrays spill to local memory on NVIDIA), a workgroup owns a 64×64 tile.
// The host pads n to a multiple of 64 (a copy made by `pad_rows`) unless it already is one, when
// the kernel reads the activations in place from row x0 on; rows past `valid` read as zero, so
// the chunk needs no padded rows.
// Split over the chunk's rows (split-K, so that a narrow Gram keeps more workgroups busy than
// its few upper-triangle tiles): workgroup z sums rows z·split .. (z + 1)·split (a multiple of
// 16, up to rows) into its own slice z of the accumulator ([slices, n_p, n_p]); the host adds the
// slices in f64 when it reads them back.
// Dispatch (n_p / 64, n_p / 64, slices). Wide Grams use `gram_wide` below.

struct GramParams {
    rows: u32,   // padded rows of the chunk (multiple of 16)
    n4: u32,     // padded width / 4
    split: u32,  // rows per slice (multiple of 16)
    valid: u32,  // rows that exist in x from x0 on (rows past them read as zero)
    x0: u32,     // the chunk's first vec4 in x
    y0: u32,     // the chunk's first vec4 in y (cross only)
    pad1: u32,
    pad2: u32,
}

// vec4 v of chunk row r: x itself when the host reads the activations in place (an aligned width),
// zero past the valid rows.
fn xrow(r: u32, v: u32) -> vec4<f32> {
    if (r < p.valid) {
        return x[p.x0 + r * p.n4 + v];
    }
    return vec4<f32>(0.0);
}

// The first and one-past-last row of slice z, and the offset of its accumulator slice.
fn slice_rows(z: u32) -> vec2<u32> {
    return vec2<u32>(min(z * p.split, p.rows), min((z + 1u) * p.split, p.rows));
}

fn slice_base(z: u32) -> u32 {
    return z * p.n4 * 4u * p.n4;
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> g: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> p: GramParams;

var<workgroup> sa: array<vec4<f32>, 256>;
var<workgroup> sb: array<vec4<f32>, 256>;

// A 4×4 block of sums in four named vec4 accumulators (`gram` and `cross`).
struct Block4 {
    c0: vec4<f32>,
    c1: vec4<f32>,
    c2: vec4<f32>,
    c3: vec4<f32>,
}

// The 16 rows staged in sa and sb added into the invocation's block.
fn block_step(lid: vec3<u32>, acc: Block4) -> Block4 {
    var t = acc;
    for (var kk = 0u; kk < 16u; kk++) {
        let a = sa[kk * 16u + lid.y];
        let b = sb[kk * 16u + lid.x];
        t.c0 = fma(vec4<f32>(a.x), b, t.c0);
        t.c1 = fma(vec4<f32>(a.y), b, t.c1);
        t.c2 = fma(vec4<f32>(a.z), b, t.c2);
        t.c3 = fma(vec4<f32>(a.w), b, t.c3);
    }
    return t;
}

// The block added into slice z's accumulator.
fn block_store(lid: vec3<u32>, wid: vec3<u32>, t: Block4) {
    let gb = slice_base(wid.z);
    let i = (wid.y * 16u + lid.y) * 4u;
    let col = wid.x * 16u + lid.x;
    g[gb + (i + 0u) * p.n4 + col] += t.c0;
    g[gb + (i + 1u) * p.n4 + col] += t.c1;
    g[gb + (i + 2u) * p.n4 + col] += t.c2;
    g[gb + (i + 3u) * p.n4 + col] += t.c3;
}

@compute @workgroup_size(16, 16, 1)
fn gram(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    if (wid.x < wid.y) {
        return;
    }
    var t: Block4;
    let span = slice_rows(wid.z);
    for (var k0 = span.x; k0 < span.y; k0 += 16u) {
        sa[lid.y * 16u + lid.x] = xrow(k0 + lid.y, wid.y * 16u + lid.x);
        sb[lid.y * 16u + lid.x] = xrow(k0 + lid.y, wid.x * 16u + lid.x);
        workgroupBarrier();
        t = block_step(lid, t);
        workgroupBarrier();
    }
    block_store(lid, wid, t);
}

// ---- gram_wide: the same sums for wide Grams (the host pads n to a multiple of 128 here):
// workgroup (16, 16) owns a 128×128 tile, each invocation an 8×8 block (rows ty·4 + 0..3 and
// 64 + ty·4 + 0..3, the same columns from tx) in sixteen named vec4 accumulators; the chunk's
// rows advance 8 at a time. Each element sums the chunk's rows in ascending order with fma, as
// `gram` does, so the two give the same sums; split over rows the same way (the split a multiple
// of 16). Dispatch (n_p / 128, n_p / 128, slices).
var<workgroup> wa: array<vec4<f32>, 256>;
var<workgroup> wb: array<vec4<f32>, 256>;

fn gram_store(gb: u32, row: u32, col: u32, lo: vec4<f32>, hi: vec4<f32>) {
    g[gb + row * p.n4 + col] += lo;
    g[gb + row * p.n4 + col + 16u] += hi;
}

@compute @workgroup_size(16, 16, 1)
fn gram_wide(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    if (wid.x < wid.y) {
        return;
    }
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
    let span = slice_rows(wid.z);
    let gb = slice_base(wid.z);
    for (var k0 = span.x; k0 < span.y; k0 += 8u) {
        // 8 rows × 32 vec4 of each operand: one vec4 per invocation.
        let kk = tid / 32u;
        let v = tid % 32u;
        wa[tid] = xrow(k0 + kk, wid.y * 32u + v);
        wb[tid] = xrow(k0 + kk, wid.x * 32u + v);
        workgroupBarrier();
        for (var k = 0u; k < 8u; k++) {
            let a0 = wa[k * 32u + lid.y];
            let a1 = wa[k * 32u + 16u + lid.y];
            let b0 = wb[k * 32u + lid.x];
            let b1 = wb[k * 32u + 16u + lid.x];
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
    let col = wid.x * 32u + lid.x;
    gram_store(gb, wid.y * 128u + lid.y * 4u + 0u, col, c0, d0);
    gram_store(gb, wid.y * 128u + lid.y * 4u + 1u, col, c1, d1);
    gram_store(gb, wid.y * 128u + lid.y * 4u + 2u, col, c2, d2);
    gram_store(gb, wid.y * 128u + lid.y * 4u + 3u, col, c3, d3);
    gram_store(gb, wid.y * 128u + 64u + lid.y * 4u + 0u, col, c4, d4);
    gram_store(gb, wid.y * 128u + 64u + lid.y * 4u + 1u, col, c5, d5);
    gram_store(gb, wid.y * 128u + 64u + lid.y * 4u + 2u, col, c6, d6);
    gram_store(gb, wid.y * 128u + 64u + lid.y * 4u + 3u, col, c7, d7);
}

// ---- cross: C += xᵀ·y for two activations of the same rows (the quantized model's inputs x
// against the full-precision model's y; `--calib-mode corrected`). As `gram` (64×64 tiles, 4×4
// per invocation, the same split over rows into slices), but every tile: C is not symmetric.
// @group(0) @binding(3) y : array<vec4<f32>>, read — laid out as x (row stride n4, from y0).
// Dispatch (n_p / 64, n_p / 64, slices).
@group(0) @binding(3) var<storage, read> y: array<vec4<f32>>;

fn yrow(r: u32, v: u32) -> vec4<f32> {
    if (r < p.valid) {
        return y[p.y0 + r * p.n4 + v];
    }
    return vec4<f32>(0.0);
}

@compute @workgroup_size(16, 16, 1)
fn cross(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    var t: Block4;
    let span = slice_rows(wid.z);
    for (var k0 = span.x; k0 < span.y; k0 += 16u) {
        sa[lid.y * 16u + lid.x] = xrow(k0 + lid.y, wid.y * 16u + lid.x);
        sb[lid.y * 16u + lid.x] = yrow(k0 + lid.y, wid.x * 16u + lid.x);
        workgroupBarrier();
        t = block_step(lid, t);
        workgroupBarrier();
    }
    block_store(lid, wid, t);
}
