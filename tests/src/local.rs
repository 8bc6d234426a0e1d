//! Support for tests of the proxy's own engine: where the model is, the
//! remote model's vectors (sentence-transformers' output, committed as
//! `proxy/fallback/tests/golden.json`), and waiting for a local model to load.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{HttpClient, ProxyProcess};

/// How long a local model may take to load on lavapipe with a busy CPU.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// The all-MiniLM-L6-v2 directory: `$INFERMESH_MODEL_DIR`, else
/// `<repo>/models/all-MiniLM-L6-v2` (fetched by `scripts/setup.sh`).
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("INFERMESH_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "no model at {}: run scripts/setup.sh (or set INFERMESH_MODEL_DIR)",
        dir.display()
    );
    dir
}

/// One input and the vector sentence-transformers computes for it.
#[derive(Debug, Clone)]
pub struct Golden {
    pub input: String,
    /// Tokens, `[CLS]` and `[SEP]` included.
    pub tokens: usize,
    pub vector: Vec<f32>,
}

/// Every case of `proxy/fallback/tests/golden.json`, in order.
pub fn golden() -> Vec<Golden> {
    let path = crate::repo_root().join("proxy/fallback/tests/golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("golden.json is JSON");
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Golden {
            input: c["input"].as_str().expect("input").to_owned(),
            tokens: c["tokens"].as_u64().expect("tokens") as usize,
            vector: c["vector"]
                .as_array()
                .expect("vector")
                .iter()
                .map(|v| v.as_f64().expect("number") as f32)
                .collect(),
        })
        .collect()
}

/// The golden case whose input is `input`.
pub fn golden_for(input: &str) -> Golden {
    golden()
        .into_iter()
        .find(|g| g.input == input)
        .unwrap_or_else(|| panic!("no golden case {input:?}"))
}

/// Cosine similarity, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "vector lengths differ");
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The numbers of a JSON array as f32.
pub fn floats(value: &serde_json::Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect()
}

/// Waits until `/ready` says local model `name` is ready; panics with the
/// reason when it is unavailable, or after [`LOAD_TIMEOUT`].
pub async fn wait_ready(proxy: &ProxyProcess, name: &str) {
    let started = Instant::now();
    let ready = format!("local model {name}: ready");
    let failed = format!("local model {name}: unavailable");
    loop {
        let body = HttpClient::http1()
            .get(&format!("{}/ready", proxy.admin_url()))
            .await
            .text();
        if body.contains(&ready) {
            return;
        }
        assert!(
            !body.contains(&failed),
            "{body}\n--- stderr\n{}",
            proxy.stderr()
        );
        assert!(
            started.elapsed() < LOAD_TIMEOUT,
            "local model {name} not ready after {LOAD_TIMEOUT:?}: {body}\n--- stderr\n{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
