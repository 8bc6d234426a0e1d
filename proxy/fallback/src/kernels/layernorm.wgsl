// out = LayerNorm(x + residual) * gamma + beta, one invocation per row.
// The residual add is fused here because LayerNorm needs the whole row and
// the matmul that produced x does not have it.

struct Params {
    rows: u32,
    hidden: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> residual: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gamma: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> beta: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let row = gid.x + gid.y * groups.x * 64u;
    if (row >= p.rows) {
        return;
    }
    let h4 = p.hidden / 4u;
    let base = row * h4;
    var sum = vec4<f32>(0.0);
    for (var d = 0u; d < h4; d = d + 1u) {
        sum = sum + x[base + d] + residual[base + d];
    }
    let mean = (sum.x + sum.y + sum.z + sum.w) / f32(p.hidden);
    var sq = vec4<f32>(0.0);
    for (var d = 0u; d < h4; d = d + 1u) {
        let v = x[base + d] + residual[base + d] - mean;
        sq = sq + v * v;
    }
    let variance = (sq.x + sq.y + sq.z + sq.w) / f32(p.hidden);
    let inv = inverseSqrt(variance + p.eps);
    for (var d = 0u; d < h4; d = d + 1u) {
        let v = x[base + d] + residual[base + d] - mean;
        out[base + d] = v * inv * gamma[d] + beta[d];
    }
}
