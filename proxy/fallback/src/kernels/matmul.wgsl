// C[row_offset + m, n] = A[m, k] * W[k, n] + bias[n], optionally followed by
// exact GELU.
//
// A and W are RGBA32F textures read as read-only storage textures, one
// vec4 of a row per texel (A: k/4 wide, m tall; W: n/4 wide, k tall). On
// CPU-backed adapters (lavapipe) a storage-buffer load is a loop over the
// SIMD lanes with a bounds check per scalar, a sampled-texture fetch takes
// the sampler's texel-fetch path, and a storage-texture load is a 128-bit
// load per lane. In sweeps on a 2-core machine: storage buffers 4-6
// GFLOP/s, sampled textures 11-13, storage textures 20-28
// (docs/benchmarks.md). GPUs serve texture loads from their caches.
//
// Register-blocked: each invocation owns an 8-row x 16-column tile (32 vec4
// sums), so each W texel it loads feeds 8 vec4 multiply-adds and each A
// texel 16. No workgroup memory: on lavapipe a barrier-synchronised tile
// costs more than the cache it would save. A workgroup's 64 invocations form
// 8 column tiles by 8 row tiles (64 rows x 128 columns); the 8 invocations
// that share rows are consecutive, so they load the same A texels.
// Written out without loops over local arrays, which lavapipe appears to
// keep in memory rather than registers. Requires n % 16 == 0; rows past m are clamped on read
// and skipped on write.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    row_offset: u32,
}

@group(0) @binding(0) var a: texture_storage_2d<rgba32float, read>;
@group(0) @binding(1) var w: texture_storage_2d<rgba32float, read>;
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

// One row of the tile: sums + bias through the epilogue, when the row is
// inside m.
fn store(row: u32, col: u32, n4: u32, s: array<vec4<f32>, 4>, b: array<vec4<f32>, 4>) {
    if (row < p.m) {
        let o = (p.row_offset + row) * n4 + col;
        c[o] = epilogue(s[0] + b[0]);
        c[o + 1u] = epilogue(s[1] + b[1]);
        c[o + 2u] = epilogue(s[2] + b[2]);
        c[o + 3u] = epilogue(s[3] + b[3]);
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
    let col_blocks = (n4 + 31u) / 32u;
    let col = ((group % col_blocks) * 8u + lid % 8u) * 4u;
    let row0 = ((group / col_blocks) * 8u + lid / 8u) * 8u;
    if (row0 >= p.m || col >= n4) {
        return;
    }
    let last = i32(p.m) - 1;
    let c0 = i32(col);
    let r0 = i32(row0);
    let r1 = min(i32(row0) + 1, last);
    let r2 = min(i32(row0) + 2, last);
    let r3 = min(i32(row0) + 3, last);
    let r4 = min(i32(row0) + 4, last);
    let r5 = min(i32(row0) + 5, last);
    let r6 = min(i32(row0) + 6, last);
    let r7 = min(i32(row0) + 7, last);
    // s{row}{column}: the sums of the tile.
    var s00 = vec4<f32>(0.0); var s01 = vec4<f32>(0.0); var s02 = vec4<f32>(0.0); var s03 = vec4<f32>(0.0);
    var s10 = vec4<f32>(0.0); var s11 = vec4<f32>(0.0); var s12 = vec4<f32>(0.0); var s13 = vec4<f32>(0.0);
    var s20 = vec4<f32>(0.0); var s21 = vec4<f32>(0.0); var s22 = vec4<f32>(0.0); var s23 = vec4<f32>(0.0);
    var s30 = vec4<f32>(0.0); var s31 = vec4<f32>(0.0); var s32 = vec4<f32>(0.0); var s33 = vec4<f32>(0.0);
    var s40 = vec4<f32>(0.0); var s41 = vec4<f32>(0.0); var s42 = vec4<f32>(0.0); var s43 = vec4<f32>(0.0);
    var s50 = vec4<f32>(0.0); var s51 = vec4<f32>(0.0); var s52 = vec4<f32>(0.0); var s53 = vec4<f32>(0.0);
    var s60 = vec4<f32>(0.0); var s61 = vec4<f32>(0.0); var s62 = vec4<f32>(0.0); var s63 = vec4<f32>(0.0);
    var s70 = vec4<f32>(0.0); var s71 = vec4<f32>(0.0); var s72 = vec4<f32>(0.0); var s73 = vec4<f32>(0.0);
    for (var kk = 0; kk < k4; kk = kk + 1) {
        let kr = kk * 4;
        // w{column}{j}: row kr + j of W at this column.
        let w00 = textureLoad(w, vec2<i32>(c0, kr));
        let w01 = textureLoad(w, vec2<i32>(c0, kr + 1));
        let w02 = textureLoad(w, vec2<i32>(c0, kr + 2));
        let w03 = textureLoad(w, vec2<i32>(c0, kr + 3));
        let w10 = textureLoad(w, vec2<i32>(c0 + 1, kr));
        let w11 = textureLoad(w, vec2<i32>(c0 + 1, kr + 1));
        let w12 = textureLoad(w, vec2<i32>(c0 + 1, kr + 2));
        let w13 = textureLoad(w, vec2<i32>(c0 + 1, kr + 3));
        let w20 = textureLoad(w, vec2<i32>(c0 + 2, kr));
        let w21 = textureLoad(w, vec2<i32>(c0 + 2, kr + 1));
        let w22 = textureLoad(w, vec2<i32>(c0 + 2, kr + 2));
        let w23 = textureLoad(w, vec2<i32>(c0 + 2, kr + 3));
        let w30 = textureLoad(w, vec2<i32>(c0 + 3, kr));
        let w31 = textureLoad(w, vec2<i32>(c0 + 3, kr + 1));
        let w32 = textureLoad(w, vec2<i32>(c0 + 3, kr + 2));
        let w33 = textureLoad(w, vec2<i32>(c0 + 3, kr + 3));
        let a0 = textureLoad(a, vec2<i32>(kk, r0));
        s00 = s00 + a0.x * w00 + a0.y * w01 + a0.z * w02 + a0.w * w03;
        s01 = s01 + a0.x * w10 + a0.y * w11 + a0.z * w12 + a0.w * w13;
        s02 = s02 + a0.x * w20 + a0.y * w21 + a0.z * w22 + a0.w * w23;
        s03 = s03 + a0.x * w30 + a0.y * w31 + a0.z * w32 + a0.w * w33;
        let a1 = textureLoad(a, vec2<i32>(kk, r1));
        s10 = s10 + a1.x * w00 + a1.y * w01 + a1.z * w02 + a1.w * w03;
        s11 = s11 + a1.x * w10 + a1.y * w11 + a1.z * w12 + a1.w * w13;
        s12 = s12 + a1.x * w20 + a1.y * w21 + a1.z * w22 + a1.w * w23;
        s13 = s13 + a1.x * w30 + a1.y * w31 + a1.z * w32 + a1.w * w33;
        let a2 = textureLoad(a, vec2<i32>(kk, r2));
        s20 = s20 + a2.x * w00 + a2.y * w01 + a2.z * w02 + a2.w * w03;
        s21 = s21 + a2.x * w10 + a2.y * w11 + a2.z * w12 + a2.w * w13;
        s22 = s22 + a2.x * w20 + a2.y * w21 + a2.z * w22 + a2.w * w23;
        s23 = s23 + a2.x * w30 + a2.y * w31 + a2.z * w32 + a2.w * w33;
        let a3 = textureLoad(a, vec2<i32>(kk, r3));
        s30 = s30 + a3.x * w00 + a3.y * w01 + a3.z * w02 + a3.w * w03;
        s31 = s31 + a3.x * w10 + a3.y * w11 + a3.z * w12 + a3.w * w13;
        s32 = s32 + a3.x * w20 + a3.y * w21 + a3.z * w22 + a3.w * w23;
        s33 = s33 + a3.x * w30 + a3.y * w31 + a3.z * w32 + a3.w * w33;
        let a4 = textureLoad(a, vec2<i32>(kk, r4));
        s40 = s40 + a4.x * w00 + a4.y * w01 + a4.z * w02 + a4.w * w03;
        s41 = s41 + a4.x * w10 + a4.y * w11 + a4.z * w12 + a4.w * w13;
        s42 = s42 + a4.x * w20 + a4.y * w21 + a4.z * w22 + a4.w * w23;
        s43 = s43 + a4.x * w30 + a4.y * w31 + a4.z * w32 + a4.w * w33;
        let a5 = textureLoad(a, vec2<i32>(kk, r5));
        s50 = s50 + a5.x * w00 + a5.y * w01 + a5.z * w02 + a5.w * w03;
        s51 = s51 + a5.x * w10 + a5.y * w11 + a5.z * w12 + a5.w * w13;
        s52 = s52 + a5.x * w20 + a5.y * w21 + a5.z * w22 + a5.w * w23;
        s53 = s53 + a5.x * w30 + a5.y * w31 + a5.z * w32 + a5.w * w33;
        let a6 = textureLoad(a, vec2<i32>(kk, r6));
        s60 = s60 + a6.x * w00 + a6.y * w01 + a6.z * w02 + a6.w * w03;
        s61 = s61 + a6.x * w10 + a6.y * w11 + a6.z * w12 + a6.w * w13;
        s62 = s62 + a6.x * w20 + a6.y * w21 + a6.z * w22 + a6.w * w23;
        s63 = s63 + a6.x * w30 + a6.y * w31 + a6.z * w32 + a6.w * w33;
        let a7 = textureLoad(a, vec2<i32>(kk, r7));
        s70 = s70 + a7.x * w00 + a7.y * w01 + a7.z * w02 + a7.w * w03;
        s71 = s71 + a7.x * w10 + a7.y * w11 + a7.z * w12 + a7.w * w13;
        s72 = s72 + a7.x * w20 + a7.y * w21 + a7.z * w22 + a7.w * w23;
        s73 = s73 + a7.x * w30 + a7.y * w31 + a7.z * w32 + a7.w * w33;
    }
    let b = array<vec4<f32>, 4>(bias[col], bias[col + 1u], bias[col + 2u], bias[col + 3u]);
    store(row0, col, n4, array<vec4<f32>, 4>(s00, s01, s02, s03), b);
    store(row0 + 1u, col, n4, array<vec4<f32>, 4>(s10, s11, s12, s13), b);
    store(row0 + 2u, col, n4, array<vec4<f32>, 4>(s20, s21, s22, s23), b);
    store(row0 + 3u, col, n4, array<vec4<f32>, 4>(s30, s31, s32, s33), b);
    store(row0 + 4u, col, n4, array<vec4<f32>, 4>(s40, s41, s42, s43), b);
    store(row0 + 5u, col, n4, array<vec4<f32>, 4>(s50, s51, s52, s53), b);
    store(row0 + 6u, col, n4, array<vec4<f32>, 4>(s60, s61, s62, s63), b);
    store(row0 + 7u, col, n4, array<vec4<f32>, 4>(s70, s71, s72, s73), b);
}
