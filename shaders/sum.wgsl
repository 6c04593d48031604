// A reduction's per-row values summed on the device in f64, so a total comes back as 8 bytes
// instead of one f32 per row: the host used to add the rows in f64 itself. The sum is of the
// same f32 values in f64; only the order of the additions differs from the host's (strided per
// invocation, then a tree), a difference in the last bits of an f64. Needs SHADER_F64; without
// it the rows come back as before.
//
// @group(0) @binding(0) src    : array<f32>, read        — [rows], a reduction's output
// @group(0) @binding(1) dst    : array<f64>, read_write  — [1], the sum
// @group(0) @binding(2) params : uniform SumParams
// One workgroup of 256. Dispatch (1, 1, 1).

struct SumParams {
    rows: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f64>;
@group(0) @binding(2) var<uniform> p: SumParams;

const WG: u32 = 256u;
var<workgroup> part: array<f64, 256>;

@compute @workgroup_size(256, 1, 1)
fn sum_rows(@builtin(local_invocation_id) lid: vec3<u32>) {
    var s = f64(0.0);
    for (var i = lid.x; i < p.rows; i += WG) {
        s += f64(src[i]);
    }
    part[lid.x] = s;
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid.x < stride) {
            part[lid.x] = part[lid.x] + part[lid.x + stride];
        }
    }
    if (lid.x == 0u) {
        dst[0] = part[0];
    }
}
