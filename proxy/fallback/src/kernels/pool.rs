//! Mean pooling over the attention mask, then L2 normalisation.

use crate::gpu::{Gpu, Kernel, PipelineKey, Recorder};
use crate::kernels::WORKGROUP;
use crate::EngineError;

/// Widest hidden size the kernel handles (16 values per invocation).
pub const MAX_HIDDEN: usize = 16 * WORKGROUP as usize;

/// The kernel.
pub const KERNEL: Kernel = Kernel {
    key: PipelineKey {
        kernel: "pool",
        variant: "mean_l2",
        workgroup_size: WORKGROUP,
    },
    source: include_str!("pool.wgsl"),
    constants: &[],
};

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    seq: u32,
    hidden: u32,
    _pad: u32,
}

/// Records pooling of a padded `[batch, seq, hidden]` grid into `[batch, hidden]`.
#[allow(clippy::too_many_arguments)]
pub fn record(
    gpu: &mut Gpu,
    recorder: &mut Recorder,
    x: &wgpu::Buffer,
    lens: &wgpu::Buffer,
    out: &wgpu::Buffer,
    batch: u32,
    seq: u32,
    hidden: u32,
) -> Result<(), EngineError> {
    let params = Params {
        batch,
        seq,
        hidden,
        _pad: 0,
    };
    recorder.dispatch_groups(gpu, &KERNEL, &[x, lens, out], &params, batch)
}

/// The CPU reference of [`record`].
pub fn reference(x: &[f32], lens: &[u32], seq: usize, hidden: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(lens.len() * hidden);
    for (b, &len) in lens.iter().enumerate() {
        let len = (len as usize).max(1);
        let mean: Vec<f64> = (0..hidden)
            .map(|d| {
                (0..len)
                    .map(|j| f64::from(x[(b * seq + j) * hidden + d]))
                    .sum::<f64>()
                    / len as f64
            })
            .collect();
        let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        out.extend(mean.iter().map(|v| (v / norm) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::tests::gpu;
    use crate::kernels::testing::{assert_close, values};

    #[test]
    fn pooling_averages_real_tokens_and_normalises() {
        let mut gpu = gpu();
        let (seq, hidden) = (11, 384);
        let lens = [11u32, 3, 1];
        let x = values(lens.len() * seq * hidden, 14, 1.0);
        let (xb, lb) = (gpu.stage(&x), gpu.stage(&lens));
        let out = gpu.acquire((lens.len() * hidden * 4) as u64);
        let mut rec = gpu.recorder(1);
        record(
            &mut gpu,
            &mut rec,
            &xb,
            &lb,
            &out,
            lens.len() as u32,
            seq as u32,
            hidden as u32,
        )
        .unwrap();
        let got = gpu
            .finish(rec, &out, (lens.len() * hidden * 4) as u64)
            .unwrap();
        assert_close(&got, &reference(&x, &lens, seq, hidden), 1e-6);
        let norm: f32 = got[..hidden].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}
