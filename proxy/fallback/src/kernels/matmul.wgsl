// C[row_offset + m, n] = A[m, k] * W[k, n] + bias[n], optionally followed by
// exact GELU.
//
// A and W are RGBA32F textures, one vec4 of a row per texel (A: k/4 wide,
// m tall; W: n/4 wide, k tall). On CPU-backed adapters (lavapipe) a
// storage-buffer load is a loop over the SIMD lanes with a bounds check per
// scalar, while a texel fetch is one 128-bit load per lane and a transpose:
// the texture path runs 2-3x faster there (docs/benchmarks.md), and GPUs
// serve it from their texture caches.
//
// Register-blocked: each invocation owns an 8-row x 8-column tile (16 vec4
// sums), so every vec4 it loads feeds 8 or 2 vec4 multiply-adds. No
// workgroup memory: on lavapipe a barrier-synchronised tile costs more than
// the cache it would save. A workgroup's 64 invocations form 8 column tiles
// by 8 row tiles (64 x 64 outputs); the 8 invocations that share rows are
// consecutive, so they fetch the same A texels and adjacent W texels.
// Requires n % 8 == 0; rows past m are clamped on read and skipped on write.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    row_offset: u32,
}

@group(0) @binding(0) var a: texture_2d<f32>;
@group(0) @binding(1) var w: texture_2d<f32>;
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

// Row r of the tile: sum + bias through the epilogue, when r is inside m.
fn store(row: u32, col: u32, n4: u32, s0: vec4<f32>, s1: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>) {
    if (row < p.m) {
        let o = (p.row_offset + row) * n4 + col;
        c[o] = epilogue(s0 + b0);
        c[o + 1u] = epilogue(s1 + b1);
    }
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n4 = p.n / 4u;
    let k4 = i32(p.k / 4u);
    let group = wid.x + wid.y * groups.x;
    let col_blocks = (n4 + 15u) / 16u;
    let col = ((group % col_blocks) * 8u + lid % 8u) * 2u;
    let row0 = ((group / col_blocks) * 8u + lid / 8u) * 8u;
    if (row0 >= p.m || col >= n4) {
        return;
    }
    let last = i32(p.m) - 1;
    let r0 = i32(row0);
    let r1 = min(r0 + 1, last);
    let r2 = min(r0 + 2, last);
    let r3 = min(r0 + 3, last);
    let r4 = min(r0 + 4, last);
    let r5 = min(r0 + 5, last);
    let r6 = min(r0 + 6, last);
    let r7 = min(r0 + 7, last);
    let c0 = i32(col);
    let c1 = c0 + 1;
    var s00 = vec4<f32>(0.0); var s01 = vec4<f32>(0.0);
    var s10 = vec4<f32>(0.0); var s11 = vec4<f32>(0.0);
    var s20 = vec4<f32>(0.0); var s21 = vec4<f32>(0.0);
    var s30 = vec4<f32>(0.0); var s31 = vec4<f32>(0.0);
    var s40 = vec4<f32>(0.0); var s41 = vec4<f32>(0.0);
    var s50 = vec4<f32>(0.0); var s51 = vec4<f32>(0.0);
    var s60 = vec4<f32>(0.0); var s61 = vec4<f32>(0.0);
    var s70 = vec4<f32>(0.0); var s71 = vec4<f32>(0.0);
    for (var kk = 0; kk < k4; kk = kk + 1) {
        let kr = kk * 4;
        let w00 = textureLoad(w, vec2<i32>(c0, kr), 0);
        let w01 = textureLoad(w, vec2<i32>(c0, kr + 1), 0);
        let w02 = textureLoad(w, vec2<i32>(c0, kr + 2), 0);
        let w03 = textureLoad(w, vec2<i32>(c0, kr + 3), 0);
        let w10 = textureLoad(w, vec2<i32>(c1, kr), 0);
        let w11 = textureLoad(w, vec2<i32>(c1, kr + 1), 0);
        let w12 = textureLoad(w, vec2<i32>(c1, kr + 2), 0);
        let w13 = textureLoad(w, vec2<i32>(c1, kr + 3), 0);
        let a0 = textureLoad(a, vec2<i32>(kk, r0), 0);
        s00 = s00 + a0.x * w00 + a0.y * w01 + a0.z * w02 + a0.w * w03;
        s01 = s01 + a0.x * w10 + a0.y * w11 + a0.z * w12 + a0.w * w13;
        let a1 = textureLoad(a, vec2<i32>(kk, r1), 0);
        s10 = s10 + a1.x * w00 + a1.y * w01 + a1.z * w02 + a1.w * w03;
        s11 = s11 + a1.x * w10 + a1.y * w11 + a1.z * w12 + a1.w * w13;
        let a2 = textureLoad(a, vec2<i32>(kk, r2), 0);
        s20 = s20 + a2.x * w00 + a2.y * w01 + a2.z * w02 + a2.w * w03;
        s21 = s21 + a2.x * w10 + a2.y * w11 + a2.z * w12 + a2.w * w13;
        let a3 = textureLoad(a, vec2<i32>(kk, r3), 0);
        s30 = s30 + a3.x * w00 + a3.y * w01 + a3.z * w02 + a3.w * w03;
        s31 = s31 + a3.x * w10 + a3.y * w11 + a3.z * w12 + a3.w * w13;
        let a4 = textureLoad(a, vec2<i32>(kk, r4), 0);
        s40 = s40 + a4.x * w00 + a4.y * w01 + a4.z * w02 + a4.w * w03;
        s41 = s41 + a4.x * w10 + a4.y * w11 + a4.z * w12 + a4.w * w13;
        let a5 = textureLoad(a, vec2<i32>(kk, r5), 0);
        s50 = s50 + a5.x * w00 + a5.y * w01 + a5.z * w02 + a5.w * w03;
        s51 = s51 + a5.x * w10 + a5.y * w11 + a5.z * w12 + a5.w * w13;
        let a6 = textureLoad(a, vec2<i32>(kk, r6), 0);
        s60 = s60 + a6.x * w00 + a6.y * w01 + a6.z * w02 + a6.w * w03;
        s61 = s61 + a6.x * w10 + a6.y * w11 + a6.z * w12 + a6.w * w13;
        let a7 = textureLoad(a, vec2<i32>(kk, r7), 0);
        s70 = s70 + a7.x * w00 + a7.y * w01 + a7.z * w02 + a7.w * w03;
        s71 = s71 + a7.x * w10 + a7.y * w11 + a7.z * w12 + a7.w * w13;
    }
    let b0 = bias[col];
    let b1 = bias[col + 1u];
    store(row0, col, n4, s00, s01, b0, b1);
    store(row0 + 1u, col, n4, s10, s11, b0, b1);
    store(row0 + 2u, col, n4, s20, s21, b0, b1);
    store(row0 + 3u, col, n4, s30, s31, b0, b1);
    store(row0 + 4u, col, n4, s40, s41, b0, b1);
    store(row0 + 5u, col, n4, s50, s51, b0, b1);
    store(row0 + 6u, col, n4, s60, s61, b0, b1);
    store(row0 + 7u, col, n4, s70, s71, b0, b1);
}
