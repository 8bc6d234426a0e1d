// out = LayerNorm(x + residual) * gamma + beta, one invocation per row.
// The residual add is fused here because LayerNorm needs the whole row and
// the matmul that produced x does not have it.
//
// x and residual come as RGBA32F read-only storage textures holding the
// rows of this block (one vec4 per texel), gamma and beta as the two rows
// of a third: texture loads are far cheaper than storage-buffer loads on
// lavapipe (see matmul.wgsl).

struct Params {
    rows: u32,
    hidden: u32,
    eps: f32,
    // Row of `out` that row 0 of this block goes to.
    row_offset: u32,
}

@group(0) @binding(0) var x: texture_storage_2d<rgba32float, read>;
@group(0) @binding(1) var residual: texture_storage_2d<rgba32float, read>;
@group(0) @binding(2) var affine: texture_storage_2d<rgba32float, read>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let row = gid.x + gid.y * groups.x * 64u;
    if (row >= p.rows) {
        return;
    }
    let h4 = i32(p.hidden / 4u);
    let r = i32(row);
    var sum = vec4<f32>(0.0);
    for (var d = 0; d < h4; d = d + 1) {
        sum = sum + textureLoad(x, vec2<i32>(d, r)) + textureLoad(residual, vec2<i32>(d, r));
    }
    let mean = (sum.x + sum.y + sum.z + sum.w) / f32(p.hidden);
    var sq = vec4<f32>(0.0);
    for (var d = 0; d < h4; d = d + 1) {
        let v = textureLoad(x, vec2<i32>(d, r)) + textureLoad(residual, vec2<i32>(d, r)) - mean;
        sq = sq + v * v;
    }
    let variance = (sq.x + sq.y + sq.z + sq.w) / f32(p.hidden);
    let inv = inverseSqrt(variance + p.eps);
    let base = (p.row_offset + row) * u32(h4);
    for (var d = 0; d < h4; d = d + 1) {
        let v = textureLoad(x, vec2<i32>(d, r)) + textureLoad(residual, vec2<i32>(d, r)) - mean;
        out[base + u32(d)] = v * inv * textureLoad(affine, vec2<i32>(d, 0)) + textureLoad(affine, vec2<i32>(d, 1));
    }
}
