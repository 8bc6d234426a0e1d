//! `out = LayerNorm(x + residual)`: the residual add and norm after the
//! attention output and after the feed-forward.

use crate::gpu::{Gpu, Kernel, PipelineKey, Recorder};
use crate::kernels::WORKGROUP;
use crate::EngineError;

/// The kernel.
pub const KERNEL: Kernel = Kernel {
    key: PipelineKey {
        kernel: "layernorm",
        variant: "residual",
        workgroup_size: WORKGROUP,
    },
    source: include_str!("layernorm.wgsl"),
    constants: &[],
};

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    hidden: u32,
    eps: f32,
    _pad: u32,
}

/// Records the add-and-norm of `rows` rows of width `hidden`.
#[allow(clippy::too_many_arguments)]
pub fn record(
    gpu: &mut Gpu,
    recorder: &mut Recorder,
    x: &wgpu::Buffer,
    residual: &wgpu::Buffer,
    gamma: &wgpu::Buffer,
    beta: &wgpu::Buffer,
    out: &wgpu::Buffer,
    rows: u32,
    hidden: u32,
    eps: f32,
) -> Result<(), EngineError> {
    let params = Params {
        rows,
        hidden,
        eps,
        _pad: 0,
    };
    recorder.dispatch(
        gpu,
        &KERNEL,
        &[x, residual, gamma, beta, out],
        &params,
        rows,
    )
}

/// LayerNorm of one row, in place, in f64 for a reference that rounds once.
pub fn normalize_reference(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let variance = row
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let inv = 1.0 / (variance + f64::from(eps)).sqrt();
    for (i, v) in row.iter_mut().enumerate() {
        *v = ((f64::from(*v) - mean) * inv * f64::from(gamma[i]) + f64::from(beta[i])) as f32;
    }
}

/// The CPU reference of [`record`].
pub fn reference(
    x: &[f32],
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
    hidden: usize,
    eps: f32,
) -> Vec<f32> {
    let mut out: Vec<f32> = x.iter().zip(residual).map(|(a, b)| a + b).collect();
    for row in out.chunks_mut(hidden) {
        normalize_reference(row, gamma, beta, eps);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::tests::gpu;
    use crate::kernels::testing::{assert_close, values};

    #[test]
    fn add_and_norm_matches_the_cpu_reference() {
        let mut gpu = gpu();
        let (rows, hidden) = (67, 384);
        let x = values(rows * hidden, 4, 3.0);
        let residual = values(rows * hidden, 5, 1.0);
        let gamma = values(hidden, 6, 1.0);
        let beta = values(hidden, 7, 0.1);
        let bufs = [
            gpu.stage(&x),
            gpu.stage(&residual),
            gpu.stage(&gamma),
            gpu.stage(&beta),
        ];
        let out = gpu.acquire((rows * hidden * 4) as u64);
        let mut rec = gpu.recorder(1);
        record(
            &mut gpu,
            &mut rec,
            &bufs[0],
            &bufs[1],
            &bufs[2],
            &bufs[3],
            &out,
            rows as u32,
            hidden as u32,
            1e-12,
        )
        .unwrap();
        let got = gpu.finish(rec, &out, (rows * hidden * 4) as u64).unwrap();
        assert_close(
            &got,
            &reference(&x, &residual, &gamma, &beta, hidden, 1e-12),
            1e-5,
        );
    }
}
