//! `C = A·W + bias`, with an optional exact-GELU epilogue.

use crate::gpu::{Bind, Gpu, Kernel, PipelineKey, Recorder};
use crate::kernels::WORKGROUP;
use crate::EngineError;

const SOURCE: &str = include_str!("matmul.wgsl");

/// Plain product.
pub const PLAIN: Kernel = Kernel {
    key: PipelineKey {
        kernel: "matmul",
        variant: "plain",
        workgroup_size: WORKGROUP,
    },
    source: SOURCE,
    constants: &[],
};

/// Product followed by GELU (the feed-forward's first half).
pub const GELU: Kernel = Kernel {
    key: PipelineKey {
        kernel: "matmul",
        variant: "gelu",
        workgroup_size: WORKGROUP,
    },
    source: SOURCE,
    constants: &[("GELU", 1.0)],
};

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    row_offset: u32,
}

/// A weight matrix `w[k, n]` (row-major) laid out for the kernel: an RGBA32F
/// texture of `n / 4` × `k` texels.
#[derive(Debug)]
pub struct Weight {
    view: wgpu::TextureView,
    k: u32,
    n: u32,
}

impl Weight {
    /// Uploads `w[k, n]`; `n` must be a multiple of 16 and `k` of 64 (a row of
    /// the activation texture is then a whole number of 256-byte copy rows).
    pub fn upload(gpu: &Gpu, label: &str, w: &[f32], k: u32, n: u32) -> Result<Self, EngineError> {
        if k == 0 || !k.is_multiple_of(64) || n == 0 || !n.is_multiple_of(16) {
            return Err(EngineError::Gpu(format!(
                "matmul needs k % 64 == 0 and n % 16 == 0, got k {k}, n {n}"
            )));
        }
        let texture = gpu.upload_matrix(label, w, n / 4, k)?;
        Ok(Self {
            view: texture.create_view(&wgpu::TextureViewDescriptor::default()),
            k,
            n,
        })
    }
}

/// Records `c[m,n] = a[m,k] · w[k,n] + bias[n]` (row-major buffers). `a` is
/// copied into a texture first, in row blocks as tall as the adapter's
/// texture limit allows, each followed by its dispatch.
#[allow(clippy::too_many_arguments)]
pub fn record(
    gpu: &mut Gpu,
    recorder: &mut Recorder,
    kernel: &Kernel,
    a: &wgpu::Buffer,
    w: &Weight,
    bias: &wgpu::Buffer,
    c: &wgpu::Buffer,
    m: u32,
) -> Result<(), EngineError> {
    let (n, k) = (w.n, w.k);
    let blocks = gpu.row_blocks(m, 1)?;
    let Some(&(_, tallest)) = blocks.first() else {
        return Ok(());
    };
    let (texture, view) = recorder.scratch_matrix(gpu, 0, k / 4, tallest);
    for (first, rows) in blocks {
        recorder.copy_to_matrix(a, first, &texture, rows)?;
        // Workgroups of 8 x 8 tiles of 8 x 16: 64 rows by 128 columns each.
        let groups = rows.div_ceil(64) * n.div_ceil(128);
        let params = Params {
            m: rows,
            n,
            k,
            row_offset: first,
        };
        let bindings = vec![
            Bind::Matrix(view.clone()),
            Bind::Matrix(w.view.clone()),
            Bind::Buffer(bias.clone()),
            Bind::Buffer(c.clone()),
        ];
        recorder.dispatch_bound(gpu, kernel, bindings, &params, groups)?;
    }
    Ok(())
}

/// Floating-point operations of one product.
pub fn flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * (m * n * k) as f64
}

/// `erf` to about 1e-9, in f64: the reference the WGSL approximation is held to.
pub fn erf_reference(x: f64) -> f64 {
    if x.abs() > 5.0 {
        return x.signum();
    }
    // Maclaurin series; at |x| <= 5 the terms stay well inside f64's range.
    let mut term = x;
    let mut sum = x;
    let x2 = x * x;
    for n in 1..200 {
        term *= -x2 / n as f64;
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() < 1e-17 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

/// HF's `gelu`: `x/2 · (1 + erf(x/√2))`.
pub fn gelu_reference(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + erf_reference(x / std::f64::consts::SQRT_2))) as f32
}

/// The CPU reference of [`record`].
pub fn reference(
    a: &[f32],
    w: &[f32],
    bias: &[f32],
    [m, n, k]: [usize; 3],
    gelu: bool,
) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for kk in 0..k {
            let av = a[i * k + kk];
            let row = &w[kk * n..(kk + 1) * n];
            for (out, wv) in c[i * n..(i + 1) * n].iter_mut().zip(row) {
                *out += av * wv;
            }
        }
        for (j, out) in c[i * n..(i + 1) * n].iter_mut().enumerate() {
            *out += bias[j];
            if gelu {
                *out = gelu_reference(*out);
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::tests::gpu;
    use crate::kernels::testing::{assert_close, values};

    fn run(gpu: &mut Gpu, kernel: &Kernel, [m, n, k]: [usize; 3]) -> (Vec<f32>, Vec<f32>) {
        let a = values(m * k, 1, 1.0);
        let w = values(k * n, 2, 0.2);
        let bias = values(n, 3, 0.5);
        let (ab, bb) = (gpu.stage(&a), gpu.stage(&bias));
        let wt = Weight::upload(gpu, "w", &w, k as u32, n as u32).unwrap();
        let cb = gpu.acquire((m * n * 4) as u64);
        let mut rec = gpu.recorder(1);
        record(gpu, &mut rec, kernel, &ab, &wt, &bb, &cb, m as u32).unwrap();
        let got = gpu.finish(rec, &cb, (m * n * 4) as u64).unwrap();
        let want = reference(&a, &w, &bias, [m, n, k], kernel.key.variant == "gelu");
        (got, want)
    }

    #[test]
    fn matmul_matches_the_cpu_reference_on_ragged_row_counts() {
        let mut gpu = gpu();
        for shape in [
            [1, 16, 64],
            [5, 16, 128],
            [3, 80, 64],
            [37, 1152, 384],
            [130, 384, 1536],
            [64, 1536, 384],
        ] {
            let (got, want) = run(&mut gpu, &PLAIN, shape);
            assert_close(&got, &want, 1e-4);
        }
    }

    #[test]
    fn products_taller_than_the_texture_limit_run_in_row_blocks() {
        let mut gpu = gpu();
        gpu.limit_block_rows(16);
        // 3 blocks of 16, 16 and 5 rows, each written at its own offset.
        let (got, want) = run(&mut gpu, &PLAIN, [37, 80, 64]);
        assert_close(&got, &want, 1e-4);
        let (got, want) = run(&mut gpu, &GELU, [16, 16, 128]);
        assert_close(&got, &want, 1e-4);
    }

    #[test]
    fn shapes_the_kernel_cannot_take_are_refused_with_the_reason() {
        let gpu = gpu();
        let err = Weight::upload(&gpu, "w", &[0.0; 12 * 16], 12, 16).unwrap_err();
        assert!(err.to_string().contains("k % 64 == 0"), "{err}");
        let err = Weight::upload(&gpu, "w", &[0.0; 64 * 24], 64, 24).unwrap_err();
        assert!(err.to_string().contains("n % 16 == 0"), "{err}");
        let err = Weight::upload(&gpu, "w", &[0.0; 10], 64, 16).unwrap_err();
        assert!(err.to_string().contains("do not make"), "{err}");
    }

    #[test]
    fn gelu_epilogue_matches_exact_erf_gelu() {
        let mut gpu = gpu();
        let (got, want) = run(&mut gpu, &GELU, [9, 1536, 384]);
        assert_close(&got, &want, 1e-4);
    }

    #[test]
    fn wgsl_erf_approximation_is_within_1e6_of_erf() {
        // The same polynomial as matmul.wgsl, evaluated in f32.
        fn erf32(x: f32) -> f32 {
            let z = x.abs();
            let t = 1.0 / (1.0 + 0.327_591_1 * z);
            let poly = t
                * (0.254_829_6
                    + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
            x.signum() * (1.0 - poly * (-z * z).exp())
        }
        let worst = (-6000..=6000)
            .map(|i| i as f32 / 1000.0)
            .map(|x| (f64::from(erf32(x)) - erf_reference(f64::from(x))).abs())
            .fold(0.0f64, f64::max);
        assert!(worst <= 1e-6, "worst erf error {worst}");
        assert!((erf_reference(1.0) - 0.842_700_792_949_715).abs() < 1e-12);
    }
}
