//! `/metrics` in vLLM's names, so balancers that read a vLLM fleet read the
//! simulated one the same way.
//!
//! Every series carries `model_name` (the base model). Gauges:
//! `vllm:num_requests_waiting`, `vllm:num_requests_running`,
//! `vllm:kv_cache_usage_perc` (0–1), `vllm:cache_config_info` (value 1,
//! labels `block_size`, `num_gpu_blocks`), `vllm:lora_requests_info` (labels
//! `running_lora_adapters`, `waiting_lora_adapters` — comma-separated —
//! and `max_lora`; the value is the Unix time of the last change, in wall
//! seconds, as vLLM sets it). Counters: `vllm:prefix_cache_queries_total`
//! and `vllm:prefix_cache_hits_total` (prompt tokens looked up / found).
//! Histogram: `vllm:time_to_first_token_seconds`, in simulated seconds.
//! Encoded by `prometheus-client` as OpenMetrics text.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
type FGauge = Gauge<f64, AtomicU64>;

/// vLLM's buckets for time to first token.
const TTFT_BUCKETS: [f64; 20] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0,
];

/// The series of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    model: String,
    max_loras: usize,
    pub waiting: FGauge,
    pub running: FGauge,
    pub kv_usage: FGauge,
    pub prefix_queries: Counter,
    pub prefix_hits: Counter,
    pub ttft: Histogram,
    lora_info: Family<Labels, FGauge>,
    /// The last LoRA label values written (only the scheduler writes them).
    lora_state: std::sync::Mutex<Option<(String, String)>>,
}

impl Metrics {
    pub fn new(model: &str, block_size: usize, num_gpu_blocks: usize, max_loras: usize) -> Self {
        let mut registry = Registry::default();
        let labels = || vec![("model_name".to_string(), model.to_string())];
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<Labels, FGauge>::default();
            let g = family.get_or_create(&labels()).clone();
            registry.register(name, help, family);
            g
        };
        let waiting = gauge(
            &mut registry,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed",
        );
        let running = gauge(
            &mut registry,
            "vllm:num_requests_running",
            "Number of requests in model execution batches",
        );
        let kv_usage = gauge(
            &mut registry,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage",
        );
        let config = Family::<Labels, FGauge>::default();
        let mut config_labels = labels();
        config_labels.push(("block_size".into(), block_size.to_string()));
        config_labels.push(("num_gpu_blocks".into(), num_gpu_blocks.to_string()));
        config.get_or_create(&config_labels).set(1.0);
        registry.register(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            config,
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<Labels, Counter>::default();
            let c = family.get_or_create(&labels()).clone();
            registry.register(name, help, family);
            c
        };
        let prefix_queries = counter(
            &mut registry,
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens",
        );
        let prefix_hits = counter(
            &mut registry,
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens",
        );
        let ttft_family = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(TTFT_BUCKETS)) as fn() -> Histogram,
        );
        let ttft = ttft_family.get_or_create(&labels()).clone();
        registry.register(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds (simulated time)",
            ttft_family,
        );
        let lora_info = Family::<Labels, FGauge>::default();
        registry.register(
            "vllm:lora_requests_info",
            "Running stats on lora requests",
            lora_info.clone(),
        );
        let metrics = Self {
            registry,
            model: model.to_string(),
            max_loras,
            waiting,
            running,
            kv_usage,
            prefix_queries,
            prefix_hits,
            ttft,
            lora_info,
            lora_state: Default::default(),
        };
        metrics.set_loras(&[], &[]);
        metrics
    }

    /// Writes `vllm:lora_requests_info` when the adapters in use changed.
    pub fn set_loras(&self, running: &[String], waiting: &[String]) {
        let now = (running.join(","), waiting.join(","));
        let mut last = self.lora_state.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref() == Some(&now) {
            return;
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.lora_info.clear();
        self.lora_info
            .get_or_create(&vec![
                ("model_name".to_string(), self.model.clone()),
                ("running_lora_adapters".to_string(), now.0.clone()),
                ("waiting_lora_adapters".to_string(), now.1.clone()),
                ("max_lora".to_string(), self.max_loras.to_string()),
            ])
            .set(stamp);
        *last = Some(now);
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
