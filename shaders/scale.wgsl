// Closed-form scale steps per (row, group) with the codes fixed (spec a.4); one workgroup per
// row, the groups of a row in turn (each an exact block-coordinate step). For group γ with codes
// k̃ (zero outside γ):  S = k̃·G,  num = k̃ᵀR,  den = k̃ᵀS,  Δ' = round(Δ + num/den);  the step
// s = Δ' − Δ is taken only if Δ' > 0 and the exact loss change −2·s·num + s²·den is not positive;
// then R −= s·S and Q̂_γ = Δ'·k̃.
//
// @group(0) @binding(0) q      : array<f32>, read_write  — [rows, n]
// @group(0) @binding(1) r      : array<f32>, read_write  — [rows, n]
// @group(0) @binding(2) codes  : array<i32>, read        — [rows, n]
// @group(0) @binding(3) g      : array<f32>, read        — [n, n]
// @group(0) @binding(4) delta  : array<f32>, read_write  — [rows, groups]
// @group(0) @binding(5) s      : array<f32>, read_write  — [rows, n] scratch (k̃·G)
// @group(0) @binding(6) params : uniform ScaleParams
// Workgroup 256, one workgroup per row (row = wid.y · 65535 + wid.x).
// Dispatch (min(rows, 65535), ceil(rows / 65535), 1).

struct ScaleParams {
    rows: u32,
    n: u32,
    group_size: u32,
    dtype: u32,   // 0 f32, 1 f16, 2 bf16: the storage dtype Δ is rounded to
}

@group(0) @binding(0) var<storage, read_write> q: array<f32>;
@group(0) @binding(1) var<storage, read_write> r: array<f32>;
@group(0) @binding(2) var<storage, read> codes: array<i32>;
@group(0) @binding(3) var<storage, read> g: array<f32>;
@group(0) @binding(4) var<storage, read_write> delta: array<f32>;
@group(0) @binding(5) var<storage, read_write> s: array<f32>;
@group(0) @binding(6) var<uniform> p: ScaleParams;

const WG: u32 = 256u;
var<workgroup> red_num: array<f32, 256>;
var<workgroup> red_den: array<f32, 256>;

fn round_dtype(x: f32) -> f32 {
    if (p.dtype == 1u) {
        return quantizeToF16(x);
    } else if (p.dtype == 2u) {
        // bfloat16, round to nearest even (finite positive inputs).
        let b = bitcast<u32>(x);
        let rounded = (b + 0x7fffu + ((b >> 16u) & 1u)) & 0xffff0000u;
        return bitcast<f32>(rounded);
    }
    return x;
}

@compute @workgroup_size(256, 1, 1)
fn scale_channel(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.y * 65535u + wid.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    let groups = p.n / p.group_size;
    for (var grp = 0u; grp < groups; grp++) {
        let j0 = grp * p.group_size;
        let j1 = j0 + p.group_size;
        var num = 0.0;
        var den = 0.0;
        for (var c = lid.x; c < p.n; c += WG) {
            var acc = 0.0;
            for (var j = j0; j < j1; j++) {
                acc = fma(f32(codes[base + j]), g[j * p.n + c], acc);
            }
            s[base + c] = acc;
            if (c >= j0 && c < j1) {
                let k = f32(codes[base + c]);
                num = fma(k, r[base + c], num);
                den = fma(k, acc, den);
            }
        }
        red_num[lid.x] = num;
        red_den[lid.x] = den;
        workgroupBarrier();
        for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
            if (lid.x < stride) {
                red_num[lid.x] += red_num[lid.x + stride];
                red_den[lid.x] += red_den[lid.x + stride];
            }
            workgroupBarrier();
        }
        let tn = red_num[0];
        let td = red_den[0];
        let slot = row * groups + grp;
        let old = delta[slot];
        var take = false;
        var new_d = old;
        if (td > 0.0) {
            new_d = round_dtype(old + tn / td);
            let st = new_d - old;
            take = new_d > 0.0 && st != 0.0 && (-2.0 * st * tn + st * st * td) <= 0.0;
        }
        // Everyone has read delta[slot] and the reductions before they change.
        storageBarrier();
        workgroupBarrier();
        if (take) {
            let st = new_d - old;
            for (var c = lid.x; c < p.n; c += WG) {
                r[base + c] -= st * s[base + c];
                if (c >= j0 && c < j1) {
                    q[base + c] = new_d * f32(codes[base + c]);
                }
            }
            if (lid.x == 0u) {
                delta[slot] = new_d;
            }
        }
        storageBarrier();
        workgroupBarrier();
    }
}
