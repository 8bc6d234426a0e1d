//! The WGSL kernels of the BERT encoder. Each is a pair, `NAME.rs` +
//! `NAME.wgsl`: the Rust side holds the parameters, how to record a dispatch,
//! and a plain-Rust reference that the tests compare the GPU against.

pub mod attention;
pub mod embed;
pub mod layernorm;
pub mod matmul;
pub mod pool;

/// Every kernel launches 64 invocations per workgroup.
pub const WORKGROUP: u32 = 64;

#[cfg(test)]
pub(crate) mod testing {
    /// Deterministic pseudo-random values in [-scale, scale).
    pub(crate) fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let unit = ((state >> 40) as f32) / ((1u64 << 24) as f32);
                (unit * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Largest absolute difference, with a message naming where.
    pub(crate) fn assert_close(got: &[f32], want: &[f32], tolerance: f32) {
        assert_eq!(got.len(), want.len(), "lengths differ");
        let (index, diff) = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .enumerate()
            .fold((0, 0.0f32), |acc, (i, d)| {
                if d > acc.1 || d.is_nan() {
                    (i, d)
                } else {
                    acc
                }
            });
        assert!(
            diff <= tolerance,
            "max abs diff {diff} at {index}: got {} want {}",
            got[index],
            want[index]
        );
    }
}
