//! Token embeddings: word + position + token type, then LayerNorm.

use crate::gpu::{Gpu, Kernel, PipelineKey, Recorder};
use crate::kernels::{layernorm, WORKGROUP};
use crate::EngineError;

/// The kernel.
pub const KERNEL: Kernel = Kernel {
    key: PipelineKey {
        kernel: "embed",
        variant: "bert",
        workgroup_size: WORKGROUP,
    },
    source: include_str!("embed.wgsl"),
    constants: &[],
};

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    seq: u32,
    hidden: u32,
    eps: f32,
}

/// The embedding tables and their norm, as uploaded.
#[derive(Debug)]
pub struct Tables<'a> {
    /// `[vocab, hidden]`.
    pub word: &'a wgpu::Buffer,
    /// `[max_positions, hidden]`.
    pub position: &'a wgpu::Buffer,
    /// `[types, hidden]`; row 0 is used.
    pub token_type: &'a wgpu::Buffer,
    /// LayerNorm weight.
    pub gamma: &'a wgpu::Buffer,
    /// LayerNorm bias.
    pub beta: &'a wgpu::Buffer,
}

/// Records the embeddings of a padded `[rows / seq, seq]` grid of token ids.
#[allow(clippy::too_many_arguments)]
pub fn record(
    gpu: &mut Gpu,
    recorder: &mut Recorder,
    ids: &wgpu::Buffer,
    tables: &Tables<'_>,
    out: &wgpu::Buffer,
    rows: u32,
    seq: u32,
    hidden: u32,
    eps: f32,
) -> Result<(), EngineError> {
    let params = Params {
        rows,
        seq,
        hidden,
        eps,
    };
    recorder.dispatch(
        gpu,
        &KERNEL,
        &[
            ids,
            tables.word,
            tables.position,
            tables.token_type,
            tables.gamma,
            tables.beta,
            out,
        ],
        &params,
        rows,
    )
}

/// The CPU reference of [`record`].
#[allow(clippy::too_many_arguments)]
pub fn reference(
    ids: &[u32],
    word: &[f32],
    position: &[f32],
    token_type: &[f32],
    gamma: &[f32],
    beta: &[f32],
    seq: usize,
    hidden: usize,
    eps: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for (row, &id) in ids.iter().enumerate() {
        let w = &word[id as usize * hidden..][..hidden];
        let p = &position[(row % seq) * hidden..][..hidden];
        let mut v: Vec<f32> = (0..hidden).map(|d| w[d] + p[d] + token_type[d]).collect();
        layernorm::normalize_reference(&mut v, gamma, beta, eps);
        out.extend(v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::tests::gpu;
    use crate::kernels::testing::{assert_close, values};

    #[test]
    fn embeddings_match_the_cpu_reference() {
        let mut gpu = gpu();
        let (vocab, positions, hidden, seq) = (50, 16, 384, 7);
        let ids: Vec<u32> = (0..3 * seq as u32)
            .map(|i| (i * 17) % vocab as u32)
            .collect();
        let word = values(vocab * hidden, 8, 1.0);
        let position = values(positions * hidden, 9, 0.5);
        let token_type = values(2 * hidden, 10, 0.1);
        let gamma = values(hidden, 11, 1.0);
        let beta = values(hidden, 12, 0.1);
        let b = [
            gpu.stage(&ids),
            gpu.stage(&word),
            gpu.stage(&position),
            gpu.stage(&token_type),
            gpu.stage(&gamma),
            gpu.stage(&beta),
        ];
        let out = gpu.acquire((ids.len() * hidden * 4) as u64);
        let tables = Tables {
            word: &b[1],
            position: &b[2],
            token_type: &b[3],
            gamma: &b[4],
            beta: &b[5],
        };
        let mut rec = gpu.recorder(1);
        record(
            &mut gpu,
            &mut rec,
            &b[0],
            &tables,
            &out,
            ids.len() as u32,
            seq as u32,
            hidden as u32,
            1e-12,
        )
        .unwrap();
        let got = gpu
            .finish(rec, &out, (ids.len() * hidden * 4) as u64)
            .unwrap();
        let want = reference(
            &ids,
            &word,
            &position,
            &token_type,
            &gamma,
            &beta,
            seq,
            hidden,
            1e-12,
        );
        assert_close(&got, &want, 1e-5);
    }
}
