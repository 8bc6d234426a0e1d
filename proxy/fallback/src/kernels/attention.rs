//! Multi-head self-attention over a fused QKV buffer with a padding mask.

use crate::gpu::{Bind, Gpu, Kernel, PipelineKey, Recorder};
use crate::kernels::WORKGROUP;
use crate::EngineError;

/// The head width the kernel is written for.
pub const HEAD_DIM: usize = 32;

/// The kernel.
pub const KERNEL: Kernel = Kernel {
    key: PipelineKey {
        kernel: "attention",
        variant: "head32",
        workgroup_size: WORKGROUP,
    },
    source: include_str!("attention.wgsl"),
    constants: &[],
};

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    first: u32,
    seq: u32,
    heads: u32,
    hidden: u32,
    scale: f32,
    _pad: [u32; 2],
}

/// Query positions one invocation handles (`QUERIES` in the WGSL).
const QUERIES: u32 = 4;

/// Records attention for a padded `[batch, seq]` grid; `qkv` rows are
/// `[q | k | v]`, each `hidden` wide (a multiple of 64), and `lens` holds
/// each sequence's length. The rows are copied into a texture first, in
/// blocks of whole sequences as tall as the texture limit allows.
#[allow(clippy::too_many_arguments)]
pub fn record(
    gpu: &mut Gpu,
    recorder: &mut Recorder,
    qkv: &wgpu::Buffer,
    lens: &wgpu::Buffer,
    out: &wgpu::Buffer,
    batch: u32,
    seq: u32,
    heads: u32,
) -> Result<(), EngineError> {
    let hidden = heads * HEAD_DIM as u32;
    if seq == 0 {
        return Ok(());
    }
    // Blocks of whole sequences: a query reads every key of its own.
    let blocks = gpu.row_blocks(batch * seq, seq)?;
    let Some(&(_, tallest)) = blocks.first() else {
        return Ok(());
    };
    let (texture, view) = recorder.scratch_matrix(gpu, 0, 3 * hidden / 4, tallest);
    for (first_row, rows) in blocks {
        recorder.copy_to_matrix(qkv, first_row, &texture, rows)?;
        let count = rows / seq;
        let params = Params {
            batch: count,
            first: first_row / seq,
            seq,
            heads,
            hidden,
            scale: 1.0 / (HEAD_DIM as f32).sqrt(),
            _pad: [0; 2],
        };
        let invocations = count * heads * seq.div_ceil(QUERIES);
        let groups = invocations.div_ceil(KERNEL.key.workgroup_size);
        recorder.dispatch_bound(
            gpu,
            &KERNEL,
            vec![
                Bind::Matrix(view.clone()),
                Bind::Buffer(lens.clone()),
                Bind::Buffer(out.clone()),
            ],
            &params,
            groups,
        )?;
    }
    Ok(())
}

/// The CPU reference of [`record`]: a plain masked softmax.
pub fn reference(qkv: &[f32], lens: &[u32], seq: usize, heads: usize) -> Vec<f32> {
    let hidden = heads * HEAD_DIM;
    let batch = lens.len();
    let mut out = vec![0.0f32; batch * seq * hidden];
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    for b in 0..batch {
        let len = lens[b] as usize;
        for h in 0..heads {
            for i in 0..len {
                let q = &qkv[(b * seq + i) * 3 * hidden + h * HEAD_DIM..][..HEAD_DIM];
                let scores: Vec<f64> = (0..len)
                    .map(|j| {
                        let k =
                            &qkv[(b * seq + j) * 3 * hidden + hidden + h * HEAD_DIM..][..HEAD_DIM];
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..HEAD_DIM {
                    let v: f64 = (0..len)
                        .map(|j| {
                            weights[j]
                                * f64::from(
                                    qkv[(b * seq + j) * 3 * hidden + 2 * hidden + h * HEAD_DIM + d],
                                )
                        })
                        .sum();
                    out[(b * seq + i) * hidden + h * HEAD_DIM + d] = (v / total) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::tests::gpu;
    use crate::kernels::testing::{assert_close, values};

    #[test]
    fn the_wgsl_handles_as_many_queries_per_invocation_as_dispatched() {
        let line = format!("const QUERIES: u32 = {QUERIES}u;");
        assert!(KERNEL.source.contains(&line), "attention.wgsl lacks {line}");
    }

    #[test]
    fn attention_matches_the_reference_and_ignores_padding() {
        let mut gpu = gpu();
        let (heads, seq) = (12, 9);
        let lens = [9u32, 1, 5];
        attention_case(&mut gpu, heads, seq, &lens);
        // Blocks of 2 sequences (18 rows per texture): three dispatches.
        gpu.limit_block_rows(20);
        attention_case(&mut gpu, heads, seq, &[9, 1, 5, 7, 9]);
        // A block of one sequence whose length is not a multiple of the
        // queries per invocation.
        gpu.limit_block_rows(11);
        attention_case(&mut gpu, 2, 11, &[11, 6]);
    }

    fn attention_case(gpu: &mut Gpu, heads: usize, seq: usize, lens: &[u32]) {
        let hidden = heads * HEAD_DIM;
        let mut qkv = values(lens.len() * seq * 3 * hidden, 13, 2.0);
        let run = |gpu: &mut Gpu, qkv: &[f32]| {
            let (qb, lb) = (gpu.stage(qkv), gpu.stage(lens));
            let out = gpu.acquire((lens.len() * seq * hidden * 4) as u64);
            let mut rec = gpu.recorder(1);
            record(
                gpu,
                &mut rec,
                &qb,
                &lb,
                &out,
                lens.len() as u32,
                seq as u32,
                heads as u32,
            )
            .unwrap();
            gpu.finish(rec, &out, (lens.len() * seq * hidden * 4) as u64)
                .unwrap()
        };
        let got = run(gpu, &qkv);
        assert_close(&got, &reference(&qkv, lens, seq, heads), 1e-5);
        // Garbage in the padded rows of sequence 1 changes nothing.
        let padding = seq + lens[1] as usize..2 * seq;
        for v in &mut qkv[padding.start * 3 * hidden..padding.end * 3 * hidden] {
            *v = 1e3;
        }
        assert_close(&run(gpu, &qkv), &got, 0.0);
    }
}
