// Expands compact uploads on the device, so the host moves only what a matrix holds: the upper
// triangle of a symmetric Gram matrix or of the GPTQ factor (half the bytes), and a visiting
// order as 16-bit indices (half the bytes). Every value is copied as its bits.
//
// @group(0) @binding(0) dst    : array<u32>, read_write — the full [n, n] matrix, or the order
// @group(0) @binding(1) src    : array<u32>, read       — this chunk of the compact upload
// @group(0) @binding(2) params : uniform UnpackParams
// Workgroup 256, one output element per invocation; index (wid.y · 65535 + wid.x) · 256 + lid.x.

struct UnpackParams {
    // unpack_upper: the matrix width; unpack_halves: values in this chunk.
    n: u32,
    // unpack_upper: the chunk's first row; unpack_halves: the chunk's first value in dst.
    first: u32,
    // unpack_upper: rows in the chunk.
    rows: u32,
    // unpack_upper: 1 writes zeros below the diagonal (a triangular factor), 0 leaves them for
    // mirror_lower (a symmetric matrix).
    zero_lower: u32,
}

@group(0) @binding(0) var<storage, read_write> dst: array<u32>;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<uniform> p: UnpackParams;

fn flat(lid: vec3<u32>, wid: vec3<u32>) -> u32 {
    return (wid.y * 65535u + wid.x) * 256u + lid.x;
}

// Where row i's upper part starts in the packed triangle: Σ_{r<i} (n − r).
fn row_start(i: u32) -> u32 {
    return i * p.n - (i * (i - 1u)) / 2u;
}

// Rows first..first+rows of the matrix from their packed upper parts (src holds exactly those,
// row after row, each from its diagonal on). Dispatch over rows · n elements.
@compute @workgroup_size(256, 1, 1)
fn unpack_upper(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let idx = flat(lid, wid);
    if (idx >= p.rows * p.n) {
        return;
    }
    let i = p.first + idx / p.n;
    let j = idx % p.n;
    if (j >= i) {
        dst[i * p.n + j] = src[row_start(i) - row_start(p.first) + (j - i)];
    } else if (p.zero_lower == 1u) {
        dst[i * p.n + j] = 0u;
    }
}

// The strict lower triangle of a symmetric matrix from its upper one, after every chunk of
// unpack_upper. Dispatch over n · n elements.
@compute @workgroup_size(256, 1, 1)
fn mirror_lower(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let idx = flat(lid, wid);
    if (idx >= p.n * p.n) {
        return;
    }
    let i = idx / p.n;
    let j = idx % p.n;
    if (j < i) {
        dst[idx] = dst[j * p.n + i];
    }
}

// 32-bit values from 16-bit halves, low half first: dst[first + k] for k < n. Dispatch over n.
@compute @workgroup_size(256, 1, 1)
fn unpack_halves(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let k = flat(lid, wid);
    if (k >= p.n) {
        return;
    }
    dst[p.first + k] = (src[k / 2u] >> ((k & 1u) * 16u)) & 0xffffu;
}
