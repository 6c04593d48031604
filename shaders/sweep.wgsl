// One COMQ coordinate-descent sweep (spec a.3): output rows in parallel workgroups, each row
// walking its own greedy order. Per step t of row i, with j = order[i, t]:
//   target = Q̂_ij + R_ij / G_jj   (W_ij for a dead input, G_jj ≤ dead)
//   k      = clamp(ceil(target/Δ − ½), lo, lo + levels − 1);   q_new = Δ·k;   d = q_new − Q̂_ij
//   R_i,c −= d · G_j,c  for every c
// Every invocation computes the same d from the same values, so one barrier per step suffices:
// R_ij itself is read by all in step t, so its own update (c = j) is deferred to the end of the
// row (d is parked in the scratch row s); Q̂_ij and k_ij are written by invocation 0 one step
// later, when nobody reads them any more (each column is visited once per sweep).
//
// @group(0) @binding(0) w      : array<f32>, read        — [rows, n]
// @group(0) @binding(1) q      : array<f32>, read_write  — [rows, n]
// @group(0) @binding(2) r      : array<f32>, read_write  — [rows, n]
// @group(0) @binding(3) codes  : array<i32>, read_write  — [rows, n]
// @group(0) @binding(4) g      : array<f32>, read        — [n, n]
// @group(0) @binding(5) delta  : array<f32>, read        — [rows, groups]
// @group(0) @binding(6) lo     : array<i32>, read        — [rows, groups]
// @group(0) @binding(7) order  : array<u32>, read        — [rows, n] (unused when natural)
// @group(0) @binding(8) s      : array<f32>, read_write  — [rows, n] scratch (the d of each column)
// @group(0) @binding(9) params : uniform SweepParams
// Workgroup 256, one workgroup per row (row = row0 + wid.y · 65535 + wid.x; `rows` is the
// tile's end, so a long tile can go in several dispatches of consecutive rows).
//   sweep_shared:  the row's residual lives in workgroup memory (n ≤ 4096, 16 KiB)
//   sweep_storage: the residual stays in storage (any n)
// Dispatch (min(rows, 65535), ceil(rows / 65535), 1).

struct SweepParams {
    rows: u32,
    n: u32,
    group_size: u32,
    levels: i32,
    dead: f32,
    natural: u32,
    groups: u32,
    row0: u32,
}

@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read_write> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> r: array<f32>;
@group(0) @binding(3) var<storage, read_write> codes: array<i32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read> delta: array<f32>;
@group(0) @binding(6) var<storage, read> lo: array<i32>;
@group(0) @binding(7) var<storage, read> order: array<u32>;
@group(0) @binding(8) var<storage, read_write> s: array<f32>;
@group(0) @binding(9) var<uniform> p: SweepParams;

const WG: u32 = 256u;
const SHARED_CAP: u32 = 4096u;
var<workgroup> r_sh: array<f32, 4096>;

fn nearest(t: f32, d: f32, l: i32, levels: i32) -> i32 {
    let k = clamp(ceil(t / d - 0.5), f32(l), f32(l + levels - 1));
    return i32(k);
}

struct Step {
    j: u32,
    q_new: f32,
    k: i32,
    d: f32,
}

fn step_at(row: u32, t: u32, r_j: f32) -> Step {
    let base = row * p.n;
    var j = t;
    if (p.natural == 0u) {
        j = order[base + t];
    }
    let gjj = g[j * p.n + j];
    let slot = row * p.groups + j / p.group_size;
    let dl = delta[slot];
    let q_old = q[base + j];
    var tgt = w[base + j];
    if (gjj > p.dead) {
        tgt = q_old + r_j / gjj;
    }
    let k = nearest(tgt, dl, lo[slot], p.levels);
    let q_new = dl * f32(k);
    return Step(j, q_new, k, q_new - q_old);
}

fn order_at(row: u32, t: u32) -> u32 {
    if (p.natural == 0u) {
        return order[row * p.n + t];
    }
    return t;
}

@compute @workgroup_size(256, 1, 1)
fn sweep_shared(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = p.row0 + wid.y * 65535u + wid.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    for (var c = lid.x; c < p.n; c += WG) {
        r_sh[c] = r[base + c];
    }
    workgroupBarrier();
    var pending = Step(0xffffffffu, 0.0, 0, 0.0);
    for (var t = 0u; t < p.n; t++) {
        if (lid.x == 0u && pending.j != 0xffffffffu) {
            q[base + pending.j] = pending.q_new;
            codes[base + pending.j] = pending.k;
        }
        let st = step_at(row, t, r_sh[order_at(row, t)]);
        if (lid.x == 0u) {
            s[base + st.j] = st.d;
        }
        if (st.d != 0.0) {
            let grow = st.j * p.n;
            for (var c = lid.x; c < p.n; c += WG) {
                if (c != st.j) {
                    r_sh[c] -= st.d * g[grow + c];
                }
            }
        }
        pending = st;
        workgroupBarrier();
    }
    if (lid.x == 0u && pending.j != 0xffffffffu) {
        q[base + pending.j] = pending.q_new;
        codes[base + pending.j] = pending.k;
    }
    storageBarrier();
    workgroupBarrier();
    for (var c = lid.x; c < p.n; c += WG) {
        r[base + c] = r_sh[c] - s[base + c] * g[c * p.n + c];
    }
}

@compute @workgroup_size(256, 1, 1)
fn sweep_storage(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = p.row0 + wid.y * 65535u + wid.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.n;
    var pending = Step(0xffffffffu, 0.0, 0, 0.0);
    for (var t = 0u; t < p.n; t++) {
        if (lid.x == 0u && pending.j != 0xffffffffu) {
            q[base + pending.j] = pending.q_new;
            codes[base + pending.j] = pending.k;
        }
        let st = step_at(row, t, r[base + order_at(row, t)]);
        if (lid.x == 0u) {
            s[base + st.j] = st.d;
        }
        if (st.d != 0.0) {
            let grow = st.j * p.n;
            for (var c = lid.x; c < p.n; c += WG) {
                if (c != st.j) {
                    r[base + c] -= st.d * g[grow + c];
                }
            }
        }
        pending = st;
        storageBarrier();
        workgroupBarrier();
    }
    if (lid.x == 0u && pending.j != 0xffffffffu) {
        q[base + pending.j] = pending.q_new;
        codes[base + pending.j] = pending.k;
    }
    storageBarrier();
    workgroupBarrier();
    for (var c = lid.x; c < p.n; c += WG) {
        r[base + c] -= s[base + c] * g[c * p.n + c];
    }
}
