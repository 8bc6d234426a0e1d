// Mean pooling over each sequence's real tokens, then L2 normalisation (as
// sentence-transformers' Pooling + Normalize, with torch's 1e-12 floor).
// One workgroup per sequence; the only shared memory is the 64-float
// reduction of the squared norm.

struct Params {
    batch: u32,
    seq: u32,
    hidden: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> lens: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const WG: u32 = 64u;
const MAX_PER_THREAD: u32 = 16u; // hidden <= 1024

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = wid.x;
    // Every invocation of the workgroup reaches the barriers below.
    let valid = b < p.batch;
    let bb = min(b, p.batch - 1u);
    let len = max(lens[bb], 1u);
    var means: array<f32, 16>;
    var sq = 0.0;
    for (var t = 0u; t < MAX_PER_THREAD; t = t + 1u) {
        let d = lid + t * WG;
        var s = 0.0;
        if (d < p.hidden) {
            for (var j = 0u; j < len; j = j + 1u) {
                s = s + x[(bb * p.seq + j) * p.hidden + d];
            }
        }
        let mean = s / f32(len);
        means[t] = mean;
        sq = sq + mean * mean;
    }
    partial[lid] = sq;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / max(sqrt(partial[0]), 1e-12);
    if (valid) {
        for (var t = 0u; t < MAX_PER_THREAD; t = t + 1u) {
            let d = lid + t * WG;
            if (d < p.hidden) {
                out[bb * p.hidden + d] = means[t] * inv;
            }
        }
    }
}
