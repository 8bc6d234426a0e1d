//! `out = LayerNorm(x + residual)`: the residual add and norm after the
//! attention output and after the feed-forward.

use crate::gpu::{Bind, Gpu, Kernel, PipelineKey, Recorder};
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
    row_offset: u32,
}

/// A LayerNorm's `gamma` and `beta`, as the two rows of a texture.
#[derive(Debug)]
pub struct Affine {
    view: wgpu::TextureView,
    hidden: u32,
}

impl Affine {
    /// Uploads `gamma` and `beta` (each `hidden` long, a multiple of 64).
    pub fn upload(
        gpu: &Gpu,
        label: &str,
        gamma: &[f32],
        beta: &[f32],
    ) -> Result<Self, EngineError> {
        let hidden = gamma.len() as u32;
        if beta.len() != gamma.len() || !hidden.is_multiple_of(64) {
            return Err(EngineError::Gpu(format!(
                "{label}: gamma and beta must be the same length, a multiple of 64 (got {} and {})",
                gamma.len(),
                beta.len()
            )));
        }
        let rows: Vec<f32> = gamma.iter().chain(beta).copied().collect();
        let texture = gpu.upload_matrix(label, &rows, hidden / 4, 2)?;
        Ok(Self {
            view: texture.create_view(&wgpu::TextureViewDescriptor::default()),
            hidden,
        })
    }
}

/// Records the add-and-norm of `rows` rows of width `hidden` (the affine's):
/// `x` and `residual` are copied into textures first, in row blocks as tall
/// as the texture limit allows.
#[allow(clippy::too_many_arguments)]
pub fn record(
    gpu: &mut Gpu,
    recorder: &mut Recorder,
    x: &wgpu::Buffer,
    residual: &wgpu::Buffer,
    affine: &Affine,
    out: &wgpu::Buffer,
    rows: u32,
    eps: f32,
) -> Result<(), EngineError> {
    let hidden = affine.hidden;
    let blocks = gpu.row_blocks(rows, 1)?;
    let Some(&(_, tallest)) = blocks.first() else {
        return Ok(());
    };
    let (xt, xv) = recorder.scratch_matrix(gpu, 0, hidden / 4, tallest);
    let (rt, rv) = recorder.scratch_matrix(gpu, 1, hidden / 4, tallest);
    for (first, count) in blocks {
        recorder.copy_to_matrix(x, first, &xt, count)?;
        recorder.copy_to_matrix(residual, first, &rt, count)?;
        let params = Params {
            rows: count,
            hidden,
            eps,
            row_offset: first,
        };
        let bindings = vec![
            Bind::Matrix(xv.clone()),
            Bind::Matrix(rv.clone()),
            Bind::Matrix(affine.view.clone()),
            Bind::Buffer(out.clone()),
        ];
        recorder.dispatch_bound(gpu, &KERNEL, bindings, &params, count.div_ceil(WORKGROUP))?;
    }
    Ok(())
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

    fn case(gpu: &mut Gpu, rows: usize, hidden: usize) {
        let x = values(rows * hidden, 4, 3.0);
        let residual = values(rows * hidden, 5, 1.0);
        let gamma = values(hidden, 6, 1.0);
        let beta = values(hidden, 7, 0.1);
        let (xb, rb) = (gpu.stage(&x), gpu.stage(&residual));
        let affine = Affine::upload(gpu, "ln", &gamma, &beta).unwrap();
        let out = gpu.acquire((rows * hidden * 4) as u64);
        let mut rec = gpu.recorder(1);
        record(gpu, &mut rec, &xb, &rb, &affine, &out, rows as u32, 1e-12).unwrap();
        let got = gpu.finish(rec, &out, (rows * hidden * 4) as u64).unwrap();
        assert_close(
            &got,
            &reference(&x, &residual, &gamma, &beta, hidden, 1e-12),
            1e-5,
        );
    }

    #[test]
    fn add_and_norm_matches_the_cpu_reference() {
        let mut gpu = gpu();
        case(&mut gpu, 67, 384);
        case(&mut gpu, 3, 64);
        // Row blocks of 16: five dispatches, the last of 3 rows.
        gpu.limit_block_rows(16);
        case(&mut gpu, 67, 128);
    }

    #[test]
    fn an_affine_of_a_width_the_kernel_cannot_take_is_refused() {
        let gpu = gpu();
        let err = Affine::upload(&gpu, "ln", &[1.0; 48], &[0.0; 48]).unwrap_err();
        assert!(err.to_string().contains("multiple of 64"), "{err}");
        let err = Affine::upload(&gpu, "ln", &[1.0; 64], &[0.0; 60]).unwrap_err();
        assert!(err.to_string().contains("same length"), "{err}");
    }
}
