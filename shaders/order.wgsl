// The greedy visiting order of resident weights, ranked on the device: row i visits its inputs
// by key_ij = |W_ij|·norms[j] descending, ties by index. Each invocation counts the keys that go
// before its own (larger, or equal with a smaller index) and writes its column at that rank, so
// every row's permutation is exactly the host's stable sort of the same f64 keys: f32 → f64 is
// exact, one f64 product is correctly rounded, comparisons are exact. Needs SHADER_F64; the
// host rounds and sends the orders on adapters without it. O(n) comparisons per weight, with
// a tile of 256 keys in workgroup memory.
//
// @group(0) @binding(0) w      : array<f32>, read        — [rows, n] (a tile's rows)
// @group(0) @binding(1) norms  : array<f64>, read        — [n], sqrt(max(G_jj, 0))
// @group(0) @binding(2) order  : array<u32>, read_write  — [rows, n], row-major permutations
// @group(0) @binding(3) params : uniform RankParams
// Workgroup 256: 256 columns of one row. Dispatch (ceil(n / 256), min(end − first, 65535), 1)
// for the rows first..end; rows past the grid's height are taken in strides of it.

struct RankParams {
    end: u32,
    n: u32,
    first: u32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read> norms: array<f64>;
@group(0) @binding(2) var<storage, read_write> order: array<u32>;
@group(0) @binding(3) var<uniform> p: RankParams;

const TILE: u32 = 256u;

var<workgroup> keys: array<f64, 256>;

fn key(base: u32, k: u32) -> f64 {
    return f64(abs(w[base + k])) * norms[k];
}

@compute @workgroup_size(256, 1, 1)
fn greedy_rank(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let j = wid.x * TILE + lid.x;
    for (var row = p.first + wid.y; row < p.end; row += nwg.y) {
        let base = row * p.n;
        var mine = f64(0.0);
        if (j < p.n) {
            mine = key(base, j);
        }
        var rank = 0u;
        for (var k0 = 0u; k0 < p.n; k0 += TILE) {
            workgroupBarrier();
            if (k0 + lid.x < p.n) {
                keys[lid.x] = key(base, k0 + lid.x);
            }
            workgroupBarrier();
            let count = min(TILE, p.n - k0);
            for (var t = 0u; t < count; t++) {
                let other = keys[t];
                if (other > mine || (other == mine && k0 + t < j)) {
                    rank += 1u;
                }
            }
        }
        if (j < p.n) {
            order[base + rank] = j;
        }
    }
}
