// Scaled dot-product attention over a fused QKV buffer, one invocation per
// (sequence, head, query position). Keys past the sequence's length are
// padding and never looked at, which is what BERT's additive mask amounts to.
// Softmax is computed online (running max and sum), so scores are never
// stored. Query rows that are padding get zeros: pooling ignores them.

struct Params {
    batch: u32,
    seq: u32,
    heads: u32,
    hidden: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const HEAD4: u32 = 8u; // head dimension 32, as vec4

@group(0) @binding(0) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> lens: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let index = gid.x + gid.y * groups.x * 64u;
    if (index >= p.batch * p.heads * p.seq) {
        return;
    }
    let i = index % p.seq;
    let h = (index / p.seq) % p.heads;
    let b = index / (p.seq * p.heads);
    let hidden4 = p.hidden / 4u;
    let stride = 3u * hidden4;
    let row = b * p.seq + i;
    let len = lens[b];
    let o = row * hidden4 + h * HEAD4;
    if (i >= len) {
        for (var d = 0u; d < HEAD4; d = d + 1u) {
            out[o + d] = vec4<f32>(0.0);
        }
        return;
    }
    var q: array<vec4<f32>, 8>;
    var acc: array<vec4<f32>, 8>;
    let qb = row * stride + h * HEAD4;
    for (var d = 0u; d < HEAD4; d = d + 1u) {
        q[d] = qkv[qb + d] * p.scale;
        acc[d] = vec4<f32>(0.0);
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var j = 0u; j < len; j = j + 1u) {
        let kb = (b * p.seq + j) * stride + hidden4 + h * HEAD4;
        var s = 0.0;
        for (var d = 0u; d < HEAD4; d = d + 1u) {
            s = s + dot(q[d], qkv[kb + d]);
        }
        let m_new = max(m, s);
        let correction = exp(m - m_new);
        let weight = exp(s - m_new);
        l = l * correction + weight;
        let vb = kb + hidden4;
        for (var d = 0u; d < HEAD4; d = d + 1u) {
            acc[d] = acc[d] * correction + weight * qkv[vb + d];
        }
        m = m_new;
    }
    let inv = 1.0 / l;
    for (var d = 0u; d < HEAD4; d = d + 1u) {
        out[o + d] = acc[d] * inv;
    }
}
