//! The pure parts of `infermesh-sim-load`: workloads, SSE event splitting,
//! percentiles and the prefix-cache counters of a `/metrics` scrape.

use crate::tokenize::WORDS;

/// What prompts look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    /// Tenants, each with its own long system prompt, asking short questions.
    SharedPrefix,
    /// Every prompt random, as long as a shared-prefix one.
    NoSharedPrefix,
}

/// The prompt generator.
#[derive(Debug, Clone)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub tenants: usize,
    pub system_tokens: usize,
    pub question_tokens: usize,
}

/// One request's prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub tenant: usize,
    pub system: String,
    pub question: String,
}

fn words(rng: &mut fastrand::Rng, n: usize) -> String {
    let mut s = String::with_capacity(n * 6);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.usize(..WORDS.len())]);
    }
    s
}

impl Workload {
    /// Tenant `t`'s system prompt: the same text every time (seeded by `t`).
    pub fn system_prompt(&self, tenant: usize) -> String {
        let mut rng = fastrand::Rng::with_seed(0x5eed_0000 + tenant as u64);
        words(&mut rng, self.system_tokens)
    }

    /// The next request's prompt.
    pub fn next(&self, rng: &mut fastrand::Rng) -> Prompt {
        let tenant = rng.usize(..self.tenants.max(1));
        let system = match self.kind {
            WorkloadKind::SharedPrefix => self.system_prompt(tenant),
            WorkloadKind::NoSharedPrefix => words(rng, self.system_tokens),
        };
        Prompt {
            tenant,
            system,
            question: words(rng, self.question_tokens),
        }
    }
}

/// Splits an SSE byte stream into the payloads of its `data:` lines.
#[derive(Debug, Default)]
pub struct SseSplitter {
    buf: Vec<u8>,
}

impl SseSplitter {
    /// Feeds bytes; returns the `data:` payloads of the events completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// The `p` quantile (0–1) of sorted samples, nearest rank; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `(vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total)` summed
/// over the series of a scrape.
pub fn prefix_counters(text: &str) -> (f64, f64) {
    let mut queries = 0.0;
    let mut hits = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        match &line[..name_end] {
            "vllm:prefix_cache_queries_total" => queries += value,
            "vllm:prefix_cache_hits_total" => hits += value,
            _ => {}
        }
    }
    (queries, hits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::tokenize;

    fn workload(kind: WorkloadKind) -> Workload {
        Workload {
            kind,
            tenants: 4,
            system_tokens: 100,
            question_tokens: 10,
        }
    }

    #[test]
    fn a_tenant_keeps_its_system_prompt_and_random_prompts_share_nothing() {
        let w = workload(WorkloadKind::SharedPrefix);
        let mut rng = fastrand::Rng::with_seed(1);
        let a = w.next(&mut rng);
        let b = (0..50)
            .map(|_| w.next(&mut rng))
            .find(|p| p.tenant == a.tenant)
            .unwrap();
        assert_eq!(a.system, b.system);
        assert_ne!(a.question, b.question);
        assert_eq!(tokenize(&a.system).len(), 100);
        assert_eq!(tokenize(&a.question).len(), 10);
        let w = workload(WorkloadKind::NoSharedPrefix);
        let (c, d) = (w.next(&mut rng), w.next(&mut rng));
        assert_ne!(tokenize(&c.system)[..16], tokenize(&d.system)[..16]);
    }

    #[test]
    fn sse_events_are_split_across_reads() {
        let mut s = SseSplitter::default();
        assert!(s.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            s.push(b":1}\n\ndata: [DONE]\n\n"),
            vec!["{\"a\":1}", "[DONE]"]
        );
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.9), 90.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn prefix_counters_are_read_from_a_scrape() {
        let text = "# TYPE vllm:prefix_cache_queries counter\nvllm:prefix_cache_queries_total{model_name=\"m\"} 300\nvllm:prefix_cache_hits_total{model_name=\"m\"} 120\nvllm:prefix_cache_hits_created 5\n";
        assert_eq!(prefix_counters(text), (300.0, 120.0));
    }
}
