//! Fallback-engine benchmark: matmul GFLOP/s per model shape next to CPU
//! sgemm (matrixmultiply) in the same run; the attention kernel's time per
//! pass; sequences/s and latency at batch
//! 1, 8 and 32 for 16- and 128-token inputs; and sentence-transformers
//! (PyTorch, CPU) on the same inputs when `.venv-golden` exists.
//!
//!     cargo bench -p infermesh-fallback --bench engine
//!
//! Prints markdown tables for docs/benchmarks.md.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use infermesh_fallback::gpu::{AdapterPreference, Gpu, Recorder};
use infermesh_fallback::kernels::{attention, matmul};
use infermesh_fallback::{EngineConfig, EngineError, LocalEmbedder};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

/// Seconds per product on the GPU: `reps` dispatches in one submission.
fn gpu_matmul(gpu: &mut Gpu, [m, n, k]: [usize; 3], reps: usize) -> f64 {
    let a = gpu.stage(&values(m * k));
    let w = matmul::Weight::upload(gpu, "w", &values(k * n), k as u32, n as u32).expect("weight");
    let bias = gpu.stage(&values(n));
    let c = gpu.acquire((m * n * 4) as u64);
    time_pass(gpu, &c, reps, |gpu, rec| {
        matmul::record(gpu, rec, &matmul::PLAIN, &a, &w, &bias, &c, m as u32)
    })
}

/// Seconds per `record` call: a warm-up pass (which compiles the pipeline),
/// then `reps` calls recorded into one submission.
fn time_pass(
    gpu: &mut Gpu,
    output: &wgpu::Buffer,
    reps: usize,
    record: impl Fn(&mut Gpu, &mut Recorder) -> Result<(), EngineError>,
) -> f64 {
    let run = |gpu: &mut Gpu, reps: usize| {
        let mut rec = gpu.recorder(reps);
        for _ in 0..reps {
            record(gpu, &mut rec).expect("record");
        }
        let start = Instant::now();
        gpu.finish(rec, output, 16).expect("run");
        start.elapsed().as_secs_f64() / reps as f64
    };
    run(gpu, 1);
    run(gpu, reps)
}

/// Seconds per attention layer (12 heads of 32) over `batch` sequences of
/// `tokens`, as the model runs it.
fn gpu_attention(gpu: &mut Gpu, tokens: usize, batch: usize) -> f64 {
    let heads = 12;
    let hidden = heads * attention::HEAD_DIM;
    let qkv = gpu.stage(&values(batch * tokens * 3 * hidden));
    let lens = gpu.stage(&vec![tokens as u32; batch]);
    let out = gpu.acquire((batch * tokens * hidden * 4) as u64);
    time_pass(gpu, &out, 6, |gpu, rec| {
        let (b, t, h) = (batch as u32, tokens as u32, heads as u32);
        attention::record(gpu, rec, &qkv, &lens, &out, b, t, h)
    })
}

fn cpu_sgemm([m, n, k]: [usize; 3], reps: usize) -> f64 {
    let a = values(m * k);
    let w = values(k * n);
    let mut c = vec![0.0f32; m * n];
    let once = |c: &mut [f32]| unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    };
    once(&mut c);
    let start = Instant::now();
    for _ in 0..reps {
        once(&mut c);
    }
    start.elapsed().as_secs_f64() / reps as f64
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    let model = std::env::var_os("INFERMESH_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/all-MiniLM-L6-v2"));
    assert!(
        model.join("model.safetensors").is_file(),
        "no model at {}: run scripts/setup.sh",
        model.display()
    );

    let mut gpu = Gpu::new(&AdapterPreference::from_env()).expect("adapter");
    println!(
        "adapter: {} ({:?}); cores: {}",
        gpu.info.name,
        gpu.info.device_type,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!();
    println!("| shape (M×N×K) | role | wgpu GFLOP/s | CPU sgemm GFLOP/s |");
    println!("| --- | --- | --- | --- |");
    for m in [128usize, 4096] {
        for (role, n, k) in [
            ("QKV", 1152, 384),
            ("attn out", 384, 384),
            ("FFN up", 1536, 384),
            ("FFN down", 384, 1536),
        ] {
            let flops = matmul::flops(m, n, k);
            let reps = ((2e10 / flops) as usize).clamp(2, 200);
            let g = flops / gpu_matmul(&mut gpu, [m, n, k], reps) / 1e9;
            let c = flops / cpu_sgemm([m, n, k], reps) / 1e9;
            println!("| {m}×{n}×{k} | {role} | {g:.1} | {c:.1} |");
        }
    }
    println!();
    println!("| attention (6 layers of 12 heads) | per pass | per sequence |");
    println!("| --- | --- | --- |");
    for (tokens, batch) in [(16usize, 32usize), (128, 1), (128, 32)] {
        let t = gpu_attention(&mut gpu, tokens, batch) * 6.0;
        println!(
            "| {tokens} tokens × {batch} | {:.1} ms | {:.2} ms |",
            t * 1e3,
            t * 1e3 / batch as f64
        );
    }
    drop(gpu);

    let engine =
        LocalEmbedder::start(EngineConfig::new("all-MiniLM-L6-v2", &model)).expect("engine");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!();
    println!(
        "| tokens | batch | median latency | sequences/s | sentence-transformers seq/s | ratio |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let st = sentence_transformers();
    for tokens in [16usize, 128] {
        for batch in [1usize, 8, 32] {
            // [CLS] word … [SEP]: ids in the ordinary vocabulary range.
            let sequence: Vec<u32> = std::iter::once(101)
                .chain((0..tokens - 2).map(|i| 2000 + (i as u32 * 37) % 5000))
                .chain(std::iter::once(102))
                .collect();
            let sequences = vec![sequence; batch];
            // Large passes take seconds on lavapipe: fewer samples there.
            let iterations = if tokens * batch >= 1024 { 2 } else { 5 };
            if batch == 1 {
                // Compiles the pipelines and fills the buffer pool.
                rt.block_on(engine.embed_tokens(sequences.clone()))
                    .expect("warm-up");
            }
            let mut times = Vec::new();
            for _ in 0..iterations {
                let start = Instant::now();
                rt.block_on(engine.embed_tokens(sequences.clone()))
                    .expect("embed");
                times.push(start.elapsed());
            }
            let latency = median(times);
            let rate = batch as f64 / latency.as_secs_f64();
            let (st_rate, ratio) = match st.iter().find(|r| r.0 == tokens && r.1 == batch) {
                Some(&(_, _, s)) => (format!("{s:.1}"), format!("{:.2}×", rate / s)),
                None => ("–".into(), "–".into()),
            };
            println!(
                "| {tokens} | {batch} | {:.1} ms | {rate:.1} | {st_rate} | {ratio} |",
                latency.as_secs_f64() * 1e3
            );
        }
    }
}

/// (tokens, batch, sequences/s) from scripts/bench_st.py, when its venv exists.
fn sentence_transformers() -> Vec<(usize, usize, f64)> {
    let python = root().join(".venv-golden/bin/python");
    if !python.is_file() {
        eprintln!(
            "no .venv-golden: skipping the sentence-transformers column (see scripts/golden.py)"
        );
        return Vec::new();
    }
    let output = Command::new(python)
        .arg(root().join("scripts/bench_st.py"))
        .output();
    match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                Some((
                    parts.next()?.parse().ok()?,
                    parts.next()?.parse().ok()?,
                    parts.next()?.parse().ok()?,
                ))
            })
            .collect(),
        Ok(out) => {
            eprintln!(
                "bench_st.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Vec::new()
        }
        Err(e) => {
            eprintln!("bench_st.py: {e}");
            Vec::new()
        }
    }
}
