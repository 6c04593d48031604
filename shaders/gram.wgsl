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
// The host pads n to a multiple of 64 and rows to a multiple of 16 with zeros.
// Dispatch (n_p / 64, n_p / 64, 1).

struct GramParams {
    rows: u32,   // padded rows of the chunk (multiple of 16)
    n4: u32,     // padded width / 4
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> g: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> p: GramParams;

var<workgroup> sa: array<vec4<f32>, 256>;
var<workgroup> sb: array<vec4<f32>, 256>;

@compute @workgroup_size(16, 16, 1)
fn gram(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    if (wid.x < wid.y) {
        return;
    }
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.rows; k0 += 16u) {
        let row = (k0 + lid.y) * p.n4;
        sa[lid.y * 16u + lid.x] = x[row + wid.y * 16u + lid.x];
        sb[lid.y * 16u + lid.x] = x[row + wid.x * 16u + lid.x];
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            let a = sa[kk * 16u + lid.y];
            let b = sb[kk * 16u + lid.x];
            c0 = fma(vec4<f32>(a.x), b, c0);
            c1 = fma(vec4<f32>(a.y), b, c1);
            c2 = fma(vec4<f32>(a.z), b, c2);
            c3 = fma(vec4<f32>(a.w), b, c3);
        }
        workgroupBarrier();
    }
    let i = (wid.y * 16u + lid.y) * 4u;
    let col = wid.x * 16u + lid.x;
    g[(i + 0u) * p.n4 + col] += c0;
    g[(i + 1u) * p.n4 + col] += c1;
    g[(i + 2u) * p.n4 + col] += c2;
    g[(i + 3u) * p.n4 + col] += c3;
}
