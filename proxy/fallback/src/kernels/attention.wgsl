// Scaled dot-product attention over fused QKV rows, one invocation per
// (sequence, head, block of QUERIES query positions). Keys past the
// sequence's length are padding and never looked at, which is what BERT's
// additive mask amounts to. Softmax is computed online (running max and
// sum), so scores are never stored. Query rows that are padding get zeros:
// pooling ignores them.
//
// The QKV rows come as an RGBA32F read-only storage texture (one vec4 per
// texel, rows [q | k | v], 3 * hidden / 4 texels wide) holding the
// sequences of this block only: texture loads are far cheaper than
// storage-buffer loads on lavapipe (see matmul.wgsl). Each key and value row fetched serves all
// QUERIES queries of the invocation, and neighbouring invocations (the same
// sequence and head) fetch the same texels.
//
// Written out without loops over local arrays: on lavapipe the looped form
// of this kernel (arrays of queries and sums indexed in loops, apparently
// kept in memory rather than registers) was 5x slower (docs/benchmarks.md).

struct Params {
    // Sequences in this block, and the index of its first one.
    batch: u32,
    first: u32,
    seq: u32,
    heads: u32,
    hidden: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

const HEAD4: i32 = 8; // head dimension 32, as vec4
const QUERIES: u32 = 4u;

@group(0) @binding(0) var qkv: texture_storage_2d<rgba32float, read>;
@group(0) @binding(1) var<storage, read> lens: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let index = gid.x + gid.y * groups.x * 64u;
    let blocks = (p.seq + QUERIES - 1u) / QUERIES;
    if (index >= p.batch * p.heads * blocks) {
        return;
    }
    let i0 = (index % blocks) * QUERIES;
    let h = (index / blocks) % p.heads;
    let b = index / (blocks * p.heads);
    let hidden4 = i32(p.hidden / 4u);
    let len = lens[p.first + b];
    let base = i32(b * p.seq);
    let hq = i32(h) * HEAD4;
    let hk = hidden4 + hq;
    let hv = 2 * hidden4 + hq;
    let row0 = base + i32(select(0u, i0 + 0u, i0 + 0u < len));
    let q0_0 = textureLoad(qkv, vec2<i32>(hq + 0, row0)) * p.scale;
    var a0_0 = vec4<f32>(0.0);
    let q0_1 = textureLoad(qkv, vec2<i32>(hq + 1, row0)) * p.scale;
    var a0_1 = vec4<f32>(0.0);
    let q0_2 = textureLoad(qkv, vec2<i32>(hq + 2, row0)) * p.scale;
    var a0_2 = vec4<f32>(0.0);
    let q0_3 = textureLoad(qkv, vec2<i32>(hq + 3, row0)) * p.scale;
    var a0_3 = vec4<f32>(0.0);
    let q0_4 = textureLoad(qkv, vec2<i32>(hq + 4, row0)) * p.scale;
    var a0_4 = vec4<f32>(0.0);
    let q0_5 = textureLoad(qkv, vec2<i32>(hq + 5, row0)) * p.scale;
    var a0_5 = vec4<f32>(0.0);
    let q0_6 = textureLoad(qkv, vec2<i32>(hq + 6, row0)) * p.scale;
    var a0_6 = vec4<f32>(0.0);
    let q0_7 = textureLoad(qkv, vec2<i32>(hq + 7, row0)) * p.scale;
    var a0_7 = vec4<f32>(0.0);
    var m0 = -3.0e38;
    var l0 = 0.0;
    let row1 = base + i32(select(0u, i0 + 1u, i0 + 1u < len));
    let q1_0 = textureLoad(qkv, vec2<i32>(hq + 0, row1)) * p.scale;
    var a1_0 = vec4<f32>(0.0);
    let q1_1 = textureLoad(qkv, vec2<i32>(hq + 1, row1)) * p.scale;
    var a1_1 = vec4<f32>(0.0);
    let q1_2 = textureLoad(qkv, vec2<i32>(hq + 2, row1)) * p.scale;
    var a1_2 = vec4<f32>(0.0);
    let q1_3 = textureLoad(qkv, vec2<i32>(hq + 3, row1)) * p.scale;
    var a1_3 = vec4<f32>(0.0);
    let q1_4 = textureLoad(qkv, vec2<i32>(hq + 4, row1)) * p.scale;
    var a1_4 = vec4<f32>(0.0);
    let q1_5 = textureLoad(qkv, vec2<i32>(hq + 5, row1)) * p.scale;
    var a1_5 = vec4<f32>(0.0);
    let q1_6 = textureLoad(qkv, vec2<i32>(hq + 6, row1)) * p.scale;
    var a1_6 = vec4<f32>(0.0);
    let q1_7 = textureLoad(qkv, vec2<i32>(hq + 7, row1)) * p.scale;
    var a1_7 = vec4<f32>(0.0);
    var m1 = -3.0e38;
    var l1 = 0.0;
    let row2 = base + i32(select(0u, i0 + 2u, i0 + 2u < len));
    let q2_0 = textureLoad(qkv, vec2<i32>(hq + 0, row2)) * p.scale;
    var a2_0 = vec4<f32>(0.0);
    let q2_1 = textureLoad(qkv, vec2<i32>(hq + 1, row2)) * p.scale;
    var a2_1 = vec4<f32>(0.0);
    let q2_2 = textureLoad(qkv, vec2<i32>(hq + 2, row2)) * p.scale;
    var a2_2 = vec4<f32>(0.0);
    let q2_3 = textureLoad(qkv, vec2<i32>(hq + 3, row2)) * p.scale;
    var a2_3 = vec4<f32>(0.0);
    let q2_4 = textureLoad(qkv, vec2<i32>(hq + 4, row2)) * p.scale;
    var a2_4 = vec4<f32>(0.0);
    let q2_5 = textureLoad(qkv, vec2<i32>(hq + 5, row2)) * p.scale;
    var a2_5 = vec4<f32>(0.0);
    let q2_6 = textureLoad(qkv, vec2<i32>(hq + 6, row2)) * p.scale;
    var a2_6 = vec4<f32>(0.0);
    let q2_7 = textureLoad(qkv, vec2<i32>(hq + 7, row2)) * p.scale;
    var a2_7 = vec4<f32>(0.0);
    var m2 = -3.0e38;
    var l2 = 0.0;
    let row3 = base + i32(select(0u, i0 + 3u, i0 + 3u < len));
    let q3_0 = textureLoad(qkv, vec2<i32>(hq + 0, row3)) * p.scale;
    var a3_0 = vec4<f32>(0.0);
    let q3_1 = textureLoad(qkv, vec2<i32>(hq + 1, row3)) * p.scale;
    var a3_1 = vec4<f32>(0.0);
    let q3_2 = textureLoad(qkv, vec2<i32>(hq + 2, row3)) * p.scale;
    var a3_2 = vec4<f32>(0.0);
    let q3_3 = textureLoad(qkv, vec2<i32>(hq + 3, row3)) * p.scale;
    var a3_3 = vec4<f32>(0.0);
    let q3_4 = textureLoad(qkv, vec2<i32>(hq + 4, row3)) * p.scale;
    var a3_4 = vec4<f32>(0.0);
    let q3_5 = textureLoad(qkv, vec2<i32>(hq + 5, row3)) * p.scale;
    var a3_5 = vec4<f32>(0.0);
    let q3_6 = textureLoad(qkv, vec2<i32>(hq + 6, row3)) * p.scale;
    var a3_6 = vec4<f32>(0.0);
    let q3_7 = textureLoad(qkv, vec2<i32>(hq + 7, row3)) * p.scale;
    var a3_7 = vec4<f32>(0.0);
    var m3 = -3.0e38;
    var l3 = 0.0;
    // Query t: q{t}_{d} its scaled row, a{t}_{d} its weighted sum of values,
    // m{t} its running maximum score, l{t} its running softmax denominator.
    for (var j = 0u; j < len; j = j + 1u) {
        let row = base + i32(j);
        let k0 = textureLoad(qkv, vec2<i32>(hk + 0, row));
        let k1 = textureLoad(qkv, vec2<i32>(hk + 1, row));
        let k2 = textureLoad(qkv, vec2<i32>(hk + 2, row));
        let k3 = textureLoad(qkv, vec2<i32>(hk + 3, row));
        let k4 = textureLoad(qkv, vec2<i32>(hk + 4, row));
        let k5 = textureLoad(qkv, vec2<i32>(hk + 5, row));
        let k6 = textureLoad(qkv, vec2<i32>(hk + 6, row));
        let k7 = textureLoad(qkv, vec2<i32>(hk + 7, row));
        let v0 = textureLoad(qkv, vec2<i32>(hv + 0, row));
        let v1 = textureLoad(qkv, vec2<i32>(hv + 1, row));
        let v2 = textureLoad(qkv, vec2<i32>(hv + 2, row));
        let v3 = textureLoad(qkv, vec2<i32>(hv + 3, row));
        let v4 = textureLoad(qkv, vec2<i32>(hv + 4, row));
        let v5 = textureLoad(qkv, vec2<i32>(hv + 5, row));
        let v6 = textureLoad(qkv, vec2<i32>(hv + 6, row));
        let v7 = textureLoad(qkv, vec2<i32>(hv + 7, row));
        let s0 = dot(q0_0, k0) + dot(q0_1, k1) + dot(q0_2, k2) + dot(q0_3, k3) + dot(q0_4, k4) + dot(q0_5, k5) + dot(q0_6, k6) + dot(q0_7, k7);
        let n0 = max(m0, s0);
        let c0 = exp(m0 - n0);
        let e0 = exp(s0 - n0);
        l0 = l0 * c0 + e0;
        m0 = n0;
        a0_0 = a0_0 * c0 + e0 * v0;
        a0_1 = a0_1 * c0 + e0 * v1;
        a0_2 = a0_2 * c0 + e0 * v2;
        a0_3 = a0_3 * c0 + e0 * v3;
        a0_4 = a0_4 * c0 + e0 * v4;
        a0_5 = a0_5 * c0 + e0 * v5;
        a0_6 = a0_6 * c0 + e0 * v6;
        a0_7 = a0_7 * c0 + e0 * v7;
        let s1 = dot(q1_0, k0) + dot(q1_1, k1) + dot(q1_2, k2) + dot(q1_3, k3) + dot(q1_4, k4) + dot(q1_5, k5) + dot(q1_6, k6) + dot(q1_7, k7);
        let n1 = max(m1, s1);
        let c1 = exp(m1 - n1);
        let e1 = exp(s1 - n1);
        l1 = l1 * c1 + e1;
        m1 = n1;
        a1_0 = a1_0 * c1 + e1 * v0;
        a1_1 = a1_1 * c1 + e1 * v1;
        a1_2 = a1_2 * c1 + e1 * v2;
        a1_3 = a1_3 * c1 + e1 * v3;
        a1_4 = a1_4 * c1 + e1 * v4;
        a1_5 = a1_5 * c1 + e1 * v5;
        a1_6 = a1_6 * c1 + e1 * v6;
        a1_7 = a1_7 * c1 + e1 * v7;
        let s2 = dot(q2_0, k0) + dot(q2_1, k1) + dot(q2_2, k2) + dot(q2_3, k3) + dot(q2_4, k4) + dot(q2_5, k5) + dot(q2_6, k6) + dot(q2_7, k7);
        let n2 = max(m2, s2);
        let c2 = exp(m2 - n2);
        let e2 = exp(s2 - n2);
        l2 = l2 * c2 + e2;
        m2 = n2;
        a2_0 = a2_0 * c2 + e2 * v0;
        a2_1 = a2_1 * c2 + e2 * v1;
        a2_2 = a2_2 * c2 + e2 * v2;
        a2_3 = a2_3 * c2 + e2 * v3;
        a2_4 = a2_4 * c2 + e2 * v4;
        a2_5 = a2_5 * c2 + e2 * v5;
        a2_6 = a2_6 * c2 + e2 * v6;
        a2_7 = a2_7 * c2 + e2 * v7;
        let s3 = dot(q3_0, k0) + dot(q3_1, k1) + dot(q3_2, k2) + dot(q3_3, k3) + dot(q3_4, k4) + dot(q3_5, k5) + dot(q3_6, k6) + dot(q3_7, k7);
        let n3 = max(m3, s3);
        let c3 = exp(m3 - n3);
        let e3 = exp(s3 - n3);
        l3 = l3 * c3 + e3;
        m3 = n3;
        a3_0 = a3_0 * c3 + e3 * v0;
        a3_1 = a3_1 * c3 + e3 * v1;
        a3_2 = a3_2 * c3 + e3 * v2;
        a3_3 = a3_3 * c3 + e3 * v3;
        a3_4 = a3_4 * c3 + e3 * v4;
        a3_5 = a3_5 * c3 + e3 * v5;
        a3_6 = a3_6 * c3 + e3 * v6;
        a3_7 = a3_7 * c3 + e3 * v7;
    }
    let hidden4u = p.hidden / 4u;
    if (i0 + 0u < p.seq) {
        let o = ((p.first + b) * p.seq + i0 + 0u) * hidden4u + h * u32(HEAD4);
        let inv = select(0.0, 1.0 / l0, i0 + 0u < len);
        out[o + 0u] = a0_0 * inv;
        out[o + 1u] = a0_1 * inv;
        out[o + 2u] = a0_2 * inv;
        out[o + 3u] = a0_3 * inv;
        out[o + 4u] = a0_4 * inv;
        out[o + 5u] = a0_5 * inv;
        out[o + 6u] = a0_6 * inv;
        out[o + 7u] = a0_7 * inv;
    }
    if (i0 + 1u < p.seq) {
        let o = ((p.first + b) * p.seq + i0 + 1u) * hidden4u + h * u32(HEAD4);
        let inv = select(0.0, 1.0 / l1, i0 + 1u < len);
        out[o + 0u] = a1_0 * inv;
        out[o + 1u] = a1_1 * inv;
        out[o + 2u] = a1_2 * inv;
        out[o + 3u] = a1_3 * inv;
        out[o + 4u] = a1_4 * inv;
        out[o + 5u] = a1_5 * inv;
        out[o + 6u] = a1_6 * inv;
        out[o + 7u] = a1_7 * inv;
    }
    if (i0 + 2u < p.seq) {
        let o = ((p.first + b) * p.seq + i0 + 2u) * hidden4u + h * u32(HEAD4);
        let inv = select(0.0, 1.0 / l2, i0 + 2u < len);
        out[o + 0u] = a2_0 * inv;
        out[o + 1u] = a2_1 * inv;
        out[o + 2u] = a2_2 * inv;
        out[o + 3u] = a2_3 * inv;
        out[o + 4u] = a2_4 * inv;
        out[o + 5u] = a2_5 * inv;
        out[o + 6u] = a2_6 * inv;
        out[o + 7u] = a2_7 * inv;
    }
    if (i0 + 3u < p.seq) {
        let o = ((p.first + b) * p.seq + i0 + 3u) * hidden4u + h * u32(HEAD4);
        let inv = select(0.0, 1.0 / l3, i0 + 3u < len);
        out[o + 0u] = a3_0 * inv;
        out[o + 1u] = a3_1 * inv;
        out[o + 2u] = a3_2 * inv;
        out[o + 3u] = a3_3 * inv;
        out[o + 4u] = a3_4 * inv;
        out[o + 5u] = a3_5 * inv;
        out[o + 6u] = a3_6 * inv;
        out[o + 7u] = a3_7 * inv;
    }
}
