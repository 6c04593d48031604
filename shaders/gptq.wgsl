// The GPTQ-style pass (`--init gptq`): output rows in parallel workgroups, every row visiting the
// inputs in the shared order perm. Per step t, with j = perm[t] and x the row's working copy in
// visiting order (x_t = W_i,perm[t] at the start):
//   k = nearest(x_t) on the grid of (i, j);   q = Δ·k;   e = (x_t − q) / U_tt
//   x_t' −= e · U_t,t'   for every t' > t
// U is the upper Cholesky factor of the damped H⁻¹ in visiting order, computed on the host.
// Every invocation computes the same e from the same x_t; one barrier per step orders the
// updates of x (kept in the scratch rows s) before the next step reads it.
//
// @group(0) @binding(0) w      : array<f32>, read        — [rows, n]
// @group(0) @binding(1) q      : array<f32>, read_write  — [rows, n]
// @group(0) @binding(2) codes  : array<i32>, read_write  — [rows, n]
// @group(0) @binding(3) u      : array<f32>, read        — [n, n] upper triangular
// @group(0) @binding(4) perm   : array<u32>, read        — [n]
// @group(0) @binding(5) delta  : array<f32>, read        — [rows, groups]
// @group(0) @binding(6) lo     : array<i32>, read        — [rows, groups]
// @group(0) @binding(7) s      : array<f32>, read_write  — [rows, n] scratch (the row's x)
// @group(0) @binding(8) params : uniform GptqParams
// Workgroup 256, one workgroup per row (row = row0 + wid.y · 65535 + wid.x; `rows` is the
// tile's end, so a long tile can go in several dispatches of consecutive rows).
//   gptq_shared:  the row's x lives in workgroup memory (n ≤ 4096, 16 KiB) and is written to s
//                 once at the end; only U is read from storage in the loop
//   gptq:         x stays in storage (any n)
// Dispatch (min(rows, 65535), ceil(rows / 65535), 1).

struct GptqParams {
    rows: u32,
    n: u32,
    group_size: u32,
    levels: i32,
    groups: u32,
    row0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> codes: array<i32>;
@group(0) @binding(3) var<storage, read> u: array<f32>;
@group(0) @binding(4) var<storage, read> perm: array<u32>;
@group(0) @binding(5) var<storage, read> delta: array<f32>;
@group(0) @binding(6) var<storage, read> lo: array<i32>;
@group(0) @binding(7) var<storage, read_write> s: array<f32>;
@group(0) @binding(8) var<uniform> p: GptqParams;

const WG: u32 = 256u;

fn nearest(t: f32, d: f32, l: i32, levels: i32) -> i32 {
    let k = clamp(ceil(t / d - 0.5), f32(l), f32(l + levels - 1));
    return i32(k);
}

@compute @workgroup_size(256, 1, 1)
fn gptq(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = p.row0 + wid.y * 65535u + wid.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    for (var c = lid.x; c < p.n; c += WG) {
        s[base + c] = w[base + perm[c]];
    }
    storageBarrier();
    workgroupBarrier();
    for (var t = 0u; t < p.n; t++) {
        let j = perm[t];
        let slot = row * p.groups + j / p.group_size;
        let x = s[base + t];
        let k = nearest(x, delta[slot], lo[slot], p.levels);
        let qv = delta[slot] * f32(k);
        let e = (x - qv) / u[t * p.n + t];
        if (e != 0.0) {
            for (var c = t + 1u + lid.x; c < p.n; c += WG) {
                s[base + c] -= e * u[t * p.n + c];
            }
        }
        if (lid.x == 0u) {
            q[base + j] = qv;
            codes[base + j] = k;
        }
        storageBarrier();
        workgroupBarrier();
    }
}

var<workgroup> x_sh: array<f32, 4096>;

@compute @workgroup_size(256, 1, 1)
fn gptq_shared(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = p.row0 + wid.y * 65535u + wid.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    for (var c = lid.x; c < p.n; c += WG) {
        x_sh[c] = w[base + perm[c]];
    }
    workgroupBarrier();
    for (var t = 0u; t < p.n; t++) {
        let j = perm[t];
        let slot = row * p.groups + j / p.group_size;
        // Every invocation reads x_t before any of this step's updates, which touch t' > t only.
        let x = x_sh[t];
        let k = nearest(x, delta[slot], lo[slot], p.levels);
        let qv = delta[slot] * f32(k);
        let e = (x - qv) / u[t * p.n + t];
        if (e != 0.0) {
            for (var c = t + 1u + lid.x; c < p.n; c += WG) {
                x_sh[c] -= e * u[t * p.n + c];
            }
        }
        if (lid.x == 0u) {
            q[base + j] = qv;
            codes[base + j] = k;
        }
        workgroupBarrier();
    }
    for (var c = lid.x; c < p.n; c += WG) {
        s[base + c] = x_sh[c];
    }
}
