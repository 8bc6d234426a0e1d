// BERT embeddings: word + position + token type (always type 0: one
// sentence per input), then LayerNorm; one invocation per token row of the
// padded [batch, seq] grid.

struct Params {
    rows: u32,
    seq: u32,
    hidden: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> ids: array<u32>;
@group(0) @binding(1) var<storage, read> word: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> position: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> token_type: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> gamma: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> beta: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(7) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let row = gid.x + gid.y * groups.x * 64u;
    if (row >= p.rows) {
        return;
    }
    let h4 = p.hidden / 4u;
    let wb = ids[row] * h4;
    let pb = (row % p.seq) * h4;
    var sum = vec4<f32>(0.0);
    for (var d = 0u; d < h4; d = d + 1u) {
        sum = sum + word[wb + d] + position[pb + d] + token_type[d];
    }
    let mean = (sum.x + sum.y + sum.z + sum.w) / f32(p.hidden);
    var sq = vec4<f32>(0.0);
    for (var d = 0u; d < h4; d = d + 1u) {
        let v = word[wb + d] + position[pb + d] + token_type[d] - mean;
        sq = sq + v * v;
    }
    let inv = inverseSqrt((sq.x + sq.y + sq.z + sq.w) / f32(p.hidden) + p.eps);
    let base = row * h4;
    for (var d = 0u; d < h4; d = d + 1u) {
        let v = word[wb + d] + position[pb + d] + token_type[d] - mean;
        out[base + d] = v * inv * gamma[d] + beta[d];
    }
}
