// C[m, n] = A[m, k] * W[k, n] + bias[n], optionally followed by exact GELU.
//
// Register-blocked for CPU-backed adapters (lavapipe): each invocation owns a
// 4-row x 8-column tile, loads A and W as vec4 and keeps the 32 sums in
// registers. No workgroup memory: on lavapipe a barrier-synchronised tile
// costs more than the cache it would save. A workgroup's 64 invocations form
// an 8 x 8 grid of tiles (32 rows x 64 columns), so what it reads of A and W
// stays in cache; neighbouring invocations share rows (same A addresses)
// and read adjacent columns of W.
// Requires k % 4 == 0 and n % 8 == 0; rows past m are clamped on read and
// skipped on write.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    row_stride: u32,
}

@group(0) @binding(0) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bias: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(4) var<uniform> p: Params;

override GELU: bool = false;

// Abramowitz & Stegun 7.1.26: |error| <= 1.5e-7 over the whole line.
fn erf(x: f32) -> f32 {
    let s = sign(x);
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-z * z));
}

fn epilogue(v: vec4<f32>) -> vec4<f32> {
    if (GELU) {
        let e = vec4<f32>(erf(v.x * 0.70710678118654752), erf(v.y * 0.70710678118654752),
                          erf(v.z * 0.70710678118654752), erf(v.w * 0.70710678118654752));
        return 0.5 * v * (1.0 + e);
    }
    return v;
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n4 = p.n / 4u;
    let k4 = p.k / 4u;
    let group = wid.x + wid.y * groups.x;
    let col_blocks = (n4 + 15u) / 16u;
    let col = ((group % col_blocks) * 8u + lid % 8u) * 2u;
    let row0 = ((group / col_blocks) * 8u + lid / 8u) * 4u;
    if (row0 >= p.m || col >= n4) {
        return;
    }
    let last = p.m - 1u;
    let ra = row0 * k4;
    let rb = min(row0 + 1u, last) * k4;
    let rc = min(row0 + 2u, last) * k4;
    let rd = min(row0 + 3u, last) * k4;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var bcc0 = vec4<f32>(0.0);
    var bcc1 = vec4<f32>(0.0);
    var bcc2 = vec4<f32>(0.0);
    var bcc3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < k4; kk = kk + 1u) {
        let a0 = a[ra + kk];
        let a1 = a[rb + kk];
        let a2 = a[rc + kk];
        let a3 = a[rd + kk];
        let wb = kk * 4u * n4 + col;
        let w0 = w[wb];
        let w1 = w[wb + n4];
        let w2 = w[wb + 2u * n4];
        let w3 = w[wb + 3u * n4];
        acc0 = acc0 + a0.x * w0 + a0.y * w1 + a0.z * w2 + a0.w * w3;
        acc1 = acc1 + a1.x * w0 + a1.y * w1 + a1.z * w2 + a1.w * w3;
        acc2 = acc2 + a2.x * w0 + a2.y * w1 + a2.z * w2 + a2.w * w3;
        acc3 = acc3 + a3.x * w0 + a3.y * w1 + a3.z * w2 + a3.w * w3;
        let v0 = w[wb + 1u];
        let v1 = w[wb + n4 + 1u];
        let v2 = w[wb + 2u * n4 + 1u];
        let v3 = w[wb + 3u * n4 + 1u];
        bcc0 = bcc0 + a0.x * v0 + a0.y * v1 + a0.z * v2 + a0.w * v3;
        bcc1 = bcc1 + a1.x * v0 + a1.y * v1 + a1.z * v2 + a1.w * v3;
        bcc2 = bcc2 + a2.x * v0 + a2.y * v1 + a2.z * v2 + a2.w * v3;
        bcc3 = bcc3 + a3.x * v0 + a3.y * v1 + a3.z * v2 + a3.w * v3;
    }
    let b = bias[col];
    let bb = bias[col + 1u];
    c[row0 * n4 + col] = epilogue(acc0 + b);
    c[row0 * n4 + col + 1u] = epilogue(bcc0 + bb);
    if (row0 + 1u < p.m) {
        c[(row0 + 1u) * n4 + col] = epilogue(acc1 + b);
        c[(row0 + 1u) * n4 + col + 1u] = epilogue(bcc1 + bb);
    }
    if (row0 + 2u < p.m) {
        c[(row0 + 2u) * n4 + col] = epilogue(acc2 + b);
        c[(row0 + 2u) * n4 + col + 1u] = epilogue(bcc2 + bb);
    }
    if (row0 + 3u < p.m) {
        c[(row0 + 3u) * n4 + col] = epilogue(acc3 + b);
        c[(row0 + 3u) * n4 + col + 1u] = epilogue(bcc3 + bb);
    }
}
