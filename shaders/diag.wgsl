// Sets the diagonal of a square matrix: g[j·n + j] = diag[j] — a damping G + λ'·I applied to a
// resident Gram matrix without uploading it again.
//
// @group(0) @binding(0) g      : array<f32>, read_write  — [n, n]
// @group(0) @binding(1) diag   : array<f32>, read        — [n]
// @group(0) @binding(2) params : uniform DiagParams
// Workgroup 256, one diagonal element per invocation. Dispatch (ceil(n / 256), 1, 1).

struct DiagParams {
    rows: u32,
    n: u32,
    mode: u32,
    pad0: u32,
}

@group(0) @binding(0) var<storage, read_write> g: array<f32>;
@group(0) @binding(1) var<storage, read> diag: array<f32>;
@group(0) @binding(2) var<uniform> p: DiagParams;

@compute @workgroup_size(256, 1, 1)
fn set_diagonal(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= p.n) {
        return;
    }
    g[j * p.n + j] = diag[j];
}
