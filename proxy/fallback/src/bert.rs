//! The BERT encoder on the GPU: weights laid out once at load for the
//! kernels, and a forward pass recorded as one submission.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::gpu::Gpu;
use crate::kernels::{attention, embed, layernorm, matmul, pool};
use crate::EngineError;

/// The parts of `config.json` the encoder needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Width of every token vector.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward.
    pub intermediate_size: usize,
    /// Rows of the position table: the longest sequence.
    pub max_position_embeddings: usize,
    /// Rows of the word table.
    pub vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    /// Feed-forward activation; only `gelu` (exact erf) is implemented.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f32 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    /// Reads and checks `config.json` against what the kernels support.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let bad = |reason: String| EngineError::ModelFiles {
            dir: path.parent().unwrap_or(path).to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("config.json: {e}")))?;
        let config: Self =
            serde_json::from_str(&text).map_err(|e| bad(format!("config.json: {e}")))?;
        if config.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act {:?} is not supported (gelu only)",
                config.hidden_act
            )));
        }
        if config.num_attention_heads == 0
            || config.hidden_size != config.num_attention_heads * attention::HEAD_DIM
        {
            return Err(bad(format!(
                "head width must be {} (hidden_size {} over {} heads)",
                attention::HEAD_DIM,
                config.hidden_size,
                config.num_attention_heads
            )));
        }
        // The matmul kernel reads activations as textures whose rows are
        // whole 256-byte copy rows: 64 floats.
        if !config.hidden_size.is_multiple_of(64)
            || !config.intermediate_size.is_multiple_of(64)
            || config.hidden_size > pool::MAX_HIDDEN
        {
            return Err(bad(format!(
                "hidden_size and intermediate_size must be multiples of 64 and hidden_size at most {} (got {} and {})",
                pool::MAX_HIDDEN,
                config.hidden_size,
                config.intermediate_size
            )));
        }
        Ok(config)
    }
}

struct Layer {
    qkv_w: matmul::Weight,
    qkv_b: wgpu::Buffer,
    out_w: matmul::Weight,
    out_b: wgpu::Buffer,
    ln1: layernorm::Affine,
    up_w: matmul::Weight,
    up_b: wgpu::Buffer,
    down_w: matmul::Weight,
    down_b: wgpu::Buffer,
    ln2: layernorm::Affine,
}

/// A BERT encoder whose weights live on the device.
pub struct Bert {
    /// Its configuration.
    pub config: BertConfig,
    word: wgpu::Buffer,
    position: wgpu::Buffer,
    token_type: wgpu::Buffer,
    ln_g: wgpu::Buffer,
    ln_b: wgpu::Buffer,
    layers: Vec<Layer>,
}

impl std::fmt::Debug for Bert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bert")
            .field("config", &self.config)
            .finish()
    }
}

/// Reads f32 tensors by name, checking their shapes.
struct Reader<'a> {
    tensors: SafeTensors<'a>,
    dir: &'a Path,
    /// `bert.` in checkpoints saved from `BertForX`, empty from `BertModel`.
    prefix: &'static str,
}

impl Reader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EngineError> {
        let full = format!("{}{name}", self.prefix);
        let bad = |reason: String| EngineError::ModelFiles {
            dir: self.dir.to_path_buf(),
            reason: format!("model.safetensors: {full}: {reason}"),
        };
        let view = self.tensors.tensor(&full).map_err(|e| bad(e.to_string()))?;
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!("dtype {:?}, expected F32", view.dtype())));
        }
        if view.shape() != shape {
            return Err(bad(format!("shape {:?}, expected {shape:?}", view.shape())));
        }
        // Little-endian f32; the slice may be unaligned inside the file.
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A linear layer's `[out, in]` weight, transposed to the `[in, out]`
    /// row-major layout the matmul kernel reads as vec4 along `out`.
    fn linear_t(
        &self,
        name: &str,
        rows_out: usize,
        cols_in: usize,
    ) -> Result<Vec<f32>, EngineError> {
        let w = self.tensor(name, &[rows_out, cols_in])?;
        Ok(transpose(&w, rows_out, cols_in))
    }
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// Buffers of one forward pass, returned to the pool afterwards.
struct Activations {
    ids: wgpu::Buffer,
    lens: wgpu::Buffer,
    x: wgpu::Buffer,
    qkv: wgpu::Buffer,
    ctx: wgpu::Buffer,
    h: wgpu::Buffer,
    x1: wgpu::Buffer,
    ffn: wgpu::Buffer,
    out: wgpu::Buffer,
}

impl Bert {
    /// Loads `config.json` and `model.safetensors` and uploads the weights.
    pub fn load(gpu: &Gpu, config_path: &Path, weights_path: &Path) -> Result<Self, EngineError> {
        let config = BertConfig::load(config_path)?;
        let dir = weights_path.parent().unwrap_or(weights_path);
        let bytes = std::fs::read(weights_path).map_err(|e| EngineError::ModelFiles {
            dir: dir.to_path_buf(),
            reason: format!("model.safetensors: {e}"),
        })?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| EngineError::ModelFiles {
            dir: dir.to_path_buf(),
            reason: format!("model.safetensors: {e}"),
        })?;
        let prefix = if tensors.names().iter().any(|n| n.starts_with("bert.")) {
            "bert."
        } else {
            ""
        };
        let r = Reader {
            tensors,
            dir,
            prefix,
        };
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let word = r.tensor("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let position = r.tensor(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let token_type = r.tensor("embeddings.token_type_embeddings.weight", &[2, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            let q = r.linear_t(&format!("{p}attention.self.query.weight"), h, h)?;
            let k = r.linear_t(&format!("{p}attention.self.key.weight"), h, h)?;
            let v = r.linear_t(&format!("{p}attention.self.value.weight"), h, h)?;
            // Fused QKV: each input row is [q | k | v], so one matmul makes
            // the rows the attention kernel reads.
            let mut qkv_w = Vec::with_capacity(3 * h * h);
            for row in 0..h {
                qkv_w.extend_from_slice(&q[row * h..(row + 1) * h]);
                qkv_w.extend_from_slice(&k[row * h..(row + 1) * h]);
                qkv_w.extend_from_slice(&v[row * h..(row + 1) * h]);
            }
            let mut qkv_b = r.tensor(&format!("{p}attention.self.query.bias"), &[h])?;
            qkv_b.extend(r.tensor(&format!("{p}attention.self.key.bias"), &[h])?);
            qkv_b.extend(r.tensor(&format!("{p}attention.self.value.bias"), &[h])?);
            let (hu, iu) = (h as u32, i as u32);
            layers.push(Layer {
                qkv_w: matmul::Weight::upload(gpu, "qkv_w", &qkv_w, hu, 3 * hu)?,
                qkv_b: gpu.upload("qkv_b", &qkv_b),
                out_w: matmul::Weight::upload(
                    gpu,
                    "out_w",
                    &r.linear_t(&format!("{p}attention.output.dense.weight"), h, h)?,
                    hu,
                    hu,
                )?,
                out_b: gpu.upload(
                    "out_b",
                    &r.tensor(&format!("{p}attention.output.dense.bias"), &[h])?,
                ),
                ln1: layernorm::Affine::upload(
                    gpu,
                    "ln1",
                    &r.tensor(&format!("{p}attention.output.LayerNorm.weight"), &[h])?,
                    &r.tensor(&format!("{p}attention.output.LayerNorm.bias"), &[h])?,
                )?,
                up_w: matmul::Weight::upload(
                    gpu,
                    "up_w",
                    &r.linear_t(&format!("{p}intermediate.dense.weight"), i, h)?,
                    hu,
                    iu,
                )?,
                up_b: gpu.upload(
                    "up_b",
                    &r.tensor(&format!("{p}intermediate.dense.bias"), &[i])?,
                ),
                down_w: matmul::Weight::upload(
                    gpu,
                    "down_w",
                    &r.linear_t(&format!("{p}output.dense.weight"), h, i)?,
                    iu,
                    hu,
                )?,
                down_b: gpu.upload("down_b", &r.tensor(&format!("{p}output.dense.bias"), &[h])?),
                ln2: layernorm::Affine::upload(
                    gpu,
                    "ln2",
                    &r.tensor(&format!("{p}output.LayerNorm.weight"), &[h])?,
                    &r.tensor(&format!("{p}output.LayerNorm.bias"), &[h])?,
                )?,
            });
        }
        Ok(Self {
            word: gpu.upload("word", &word),
            position: gpu.upload("position", &position),
            token_type: gpu.upload("token_type", &token_type),
            ln_g: gpu.upload("ln_g", &r.tensor("embeddings.LayerNorm.weight", &[h])?),
            ln_b: gpu.upload("ln_b", &r.tensor("embeddings.LayerNorm.bias", &[h])?),
            layers,
            config,
        })
    }

    /// Embeds a batch of token-id sequences (each non-empty and at most
    /// `max_position_embeddings` long): one submission, one vector each.
    pub fn forward(&self, gpu: &mut Gpu, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let seq = batch.iter().map(Vec::len).max().unwrap_or(0);
        if batch.is_empty() || seq == 0 {
            return Ok(batch.iter().map(|_| Vec::new()).collect());
        }
        if seq > self.config.max_position_embeddings {
            return Err(EngineError::InvalidInput(format!(
                "sequence of {seq} tokens exceeds the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let c = &self.config;
        let (b, h, i) = (batch.len(), c.hidden_size, c.intermediate_size);
        let rows = b * seq;
        let mut ids = vec![0u32; rows];
        for (n, sequence) in batch.iter().enumerate() {
            ids[n * seq..n * seq + sequence.len()].copy_from_slice(sequence);
        }
        let lens: Vec<u32> = batch.iter().map(|s| s.len() as u32).collect();
        let f = 4u64;
        let act = Activations {
            ids: gpu.stage(&ids),
            lens: gpu.stage(&lens),
            x: gpu.acquire(f * (rows * h) as u64),
            qkv: gpu.acquire(f * (rows * 3 * h) as u64),
            ctx: gpu.acquire(f * (rows * h) as u64),
            h: gpu.acquire(f * (rows * h) as u64),
            x1: gpu.acquire(f * (rows * h) as u64),
            ffn: gpu.acquire(f * (rows * i) as u64),
            out: gpu.acquire(f * (b * h) as u64),
        };
        let result = self.record_and_run(gpu, &act, b, seq);
        for buffer in [
            act.ids, act.lens, act.x, act.qkv, act.ctx, act.h, act.x1, act.ffn, act.out,
        ] {
            gpu.release(buffer);
        }
        let flat = result?;
        Ok(flat.chunks(h).take(b).map(<[f32]>::to_vec).collect())
    }

    fn record_and_run(
        &self,
        gpu: &mut Gpu,
        a: &Activations,
        b: usize,
        seq: usize,
    ) -> Result<Vec<f32>, EngineError> {
        let c = &self.config;
        let (h, eps) = (c.hidden_size as u32, c.layer_norm_eps);
        let (rows, heads) = ((b * seq) as u32, c.num_attention_heads as u32);
        let mut rec = gpu.recorder(2 + 7 * self.layers.len());
        let tables = embed::Tables {
            word: &self.word,
            position: &self.position,
            token_type: &self.token_type,
            gamma: &self.ln_g,
            beta: &self.ln_b,
        };
        embed::record(
            gpu, &mut rec, &a.ids, &tables, &a.x, rows, seq as u32, h, eps,
        )?;
        for l in &self.layers {
            matmul::record(
                gpu,
                &mut rec,
                &matmul::PLAIN,
                &a.x,
                &l.qkv_w,
                &l.qkv_b,
                &a.qkv,
                rows,
            )?;
            attention::record(
                gpu, &mut rec, &a.qkv, &a.lens, &a.ctx, b as u32, seq as u32, heads,
            )?;
            matmul::record(
                gpu,
                &mut rec,
                &matmul::PLAIN,
                &a.ctx,
                &l.out_w,
                &l.out_b,
                &a.h,
                rows,
            )?;
            layernorm::record(gpu, &mut rec, &a.h, &a.x, &l.ln1, &a.x1, rows, eps)?;
            matmul::record(
                gpu,
                &mut rec,
                &matmul::GELU,
                &a.x1,
                &l.up_w,
                &l.up_b,
                &a.ffn,
                rows,
            )?;
            matmul::record(
                gpu,
                &mut rec,
                &matmul::PLAIN,
                &a.ffn,
                &l.down_w,
                &l.down_b,
                &a.h,
                rows,
            )?;
            layernorm::record(gpu, &mut rec, &a.h, &a.x1, &l.ln2, &a.x, rows, eps)?;
        }
        pool::record(
            gpu, &mut rec, &a.x, &a.lens, &a.out, b as u32, seq as u32, h,
        )?;
        gpu.finish(rec, &a.out, 4 * (b as u64) * u64::from(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps_rows_and_columns() {
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
            vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
    }

    #[test]
    fn a_config_with_unsupported_heads_is_refused() {
        let dir =
            std::env::temp_dir().join(format!("infermesh-bert-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(
            &path,
            r#"{"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
                "intermediate_size": 1536, "max_position_embeddings": 512, "vocab_size": 30522}"#,
        )
        .unwrap();
        let err = BertConfig::load(&path).unwrap_err();
        assert!(err.to_string().contains("head width must be 32"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
