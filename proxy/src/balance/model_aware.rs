//! The model-aware balancer: endpoints scored by the proxy's own view and by
//! the model server's word on its load, requests sharing a prompt prefix
//! kept on one endpoint by consistent hashing with bounded loads, and LoRA
//! requests sent where their adapter is loaded.
//!
//! An endpoint's **load** is the larger of the requests this proxy has in
//! flight there and the server's own count (`queue × waiting + running ×
//! running`, from its metrics or a per-response ORCA report), times `1 +
//! kvCache × KV-cache usage`. The larger, because the server counts every
//! sidecar's requests, while this proxy's count is fresh: a stale or failed
//! poll leaves the proxy's own count, never an error. The *effective* load
//! adds one (the request being placed) and multiplies by the 429 penalty.
//!
//! A request with a prompt prefix hashes it onto a ring of virtual nodes
//! (the same ring on every sidecar, built from the endpoint addresses) and
//! walks clockwise to the first endpoint whose effective load is within
//! `loadFactor ×` the mean effective load ("consistent hashing with bounded
//! loads", Mirrokni, Thorup and Zadimoghaddam): every sidecar sends a
//! prefix to the same server without talking to the others, and a hot
//! prefix spills to the next endpoint on the ring. A request without a
//! prefix takes the better of two random endpoints by effective load times
//! the peak-EWMA time to first byte (to the power `latency`), with the soft
//! shares of peak-EWMA. A LoRA request considers only the endpoints that
//! report its adapter loaded while one of them is within twice the bound
//! (loading an adapter elsewhere costs more than a little queueing).
//! Endpoints in failure back-off are passed over while any other is not.
//!
//! Everything here is pure (the polling task lives with the backend): the caller reads each endpoint's
//! [`View`] and hands over the randomness.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use infermesh_proto::policy::{ModelAware, ResolvedNames, ScoreWeights};

/// Virtual nodes per endpoint on the hash ring: enough that eight
/// endpoints get shares within a few percent of each other.
pub const VIRTUAL_NODES: u32 = 160;

/// The model server's own word on its load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerLoad {
    /// Requests waiting in its queue.
    pub waiting: f64,
    /// Requests it is running.
    pub running: f64,
    /// KV-cache usage, 0 to 1.
    pub kv_cache: f64,
}

/// What the proxy believes of an endpoint's server, with when it learnt it.
#[derive(Debug, Clone, Default)]
pub struct ServerState {
    /// The latest load report (a poll or a response's ORCA header).
    pub load: Option<(ServerLoad, Instant)>,
    /// Adapters loaded (running or waiting), from the latest poll.
    pub adapters: Option<(Vec<String>, Instant)>,
}

impl ServerState {
    /// The load report, when younger than `stale_after` at `now`.
    pub fn fresh_load(&self, now: Instant, stale_after: Duration) -> Option<ServerLoad> {
        self.load
            .filter(|(_, at)| now.saturating_duration_since(*at) <= stale_after)
            .map(|(load, _)| load)
    }

    /// Whether a fresh poll lists `adapter` as loaded.
    pub fn has_adapter(&self, adapter: &str, now: Instant, stale_after: Duration) -> bool {
        self.adapters.as_ref().is_some_and(|(list, at)| {
            now.saturating_duration_since(*at) <= stale_after && list.iter().any(|a| a == adapter)
        })
    }
}

/// What the model-aware picker weighs of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    /// Requests this proxy has in flight there.
    pub in_flight: usize,
    /// Peak-EWMA time to first byte in nanoseconds; `None` before a sample.
    pub rtt: Option<f64>,
    /// 1, or the penalty factor while it sheds.
    pub penalty: f64,
    /// Nanoseconds of failure back-off left.
    pub backoff_left: u64,
    /// The server's fresh report, if any.
    pub server: Option<ServerLoad>,
    /// The request's adapter is loaded there.
    pub has_adapter: bool,
}

/// The balancer's settings, taken from the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Weights of the load terms.
    pub weights: ScoreWeights,
    /// The load bound, as a multiple of the mean.
    pub load_factor: f64,
    /// Leading blocks hashed.
    pub blocks: usize,
    /// Bytes per block.
    pub block_size: usize,
    /// Age past which a server report is ignored.
    pub stale_after: Duration,
    /// Metrics page path; `None` when polling is off.
    pub path: Option<String>,
    /// Time between polls.
    pub interval: Duration,
    /// The metric names read.
    pub names: ResolvedNames,
}

impl From<&ModelAware> for Settings {
    fn from(policy: &ModelAware) -> Self {
        Self {
            weights: policy.weights.clone(),
            load_factor: policy.load_factor,
            blocks: policy.prefix.blocks as usize,
            block_size: policy.prefix.block_size as usize,
            stale_after: policy.metrics.stale_after(),
            path: (policy.metrics.path != "off").then(|| policy.metrics.path.clone()),
            interval: policy.metrics.interval,
            names: policy.metrics.resolved_names(),
        }
    }
}

/// How a request with a prefix was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// On the prefix's own endpoint (the first on the ring it may use).
    Hit,
    /// Further along the ring: its own endpoint was over the load bound.
    Spill,
}

impl Affinity {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::Hit => "hit",
            Affinity::Spill => "spill",
        }
    }
}

/// The endpoint's load in requests: the larger of the proxy's and the
/// server's count, grown by KV-cache usage.
pub fn load(view: &View, weights: &ScoreWeights) -> f64 {
    let own = view.in_flight as f64;
    match view.server {
        None => own,
        Some(server) => {
            let counted =
                weights.queue * server.waiting.max(0.0) + weights.running * server.running.max(0.0);
            own.max(counted) * (1.0 + weights.kv_cache * server.kv_cache.clamp(0.0, 1.0))
        }
    }
}

/// The load with this request counted, heavier while penalised.
pub fn effective(view: &View, weights: &ScoreWeights) -> f64 {
    (load(view, weights) + 1.0) * view.penalty
}

/// The most effective load an endpoint may have to take a request:
/// `factor` times the mean over `views`, rounded up (as the capacity of
/// consistent hashing with bounded loads), so that at low load a prefix's
/// own endpoint may hold a request or two more than the others.
pub fn bound(views: &[View], weights: &ScoreWeights, factor: f64) -> f64 {
    if views.is_empty() {
        return f64::INFINITY;
    }
    let total: f64 = views.iter().map(|v| effective(v, weights)).sum();
    (factor * total / views.len() as f64).ceil()
}

/// A hash ring of [`VIRTUAL_NODES`] points per endpoint, placed by the
/// endpoint's address alone, so every sidecar builds the same ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    addrs: Vec<SocketAddr>,
    /// Sorted points: (position, index into `addrs`).
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// The ring over `addrs` (index `i` of a point is `addrs[i]`).
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        let mut points = Vec::with_capacity(addrs.len() * VIRTUAL_NODES as usize);
        for (i, addr) in addrs.iter().enumerate() {
            let name = addr.to_string();
            for node in 0..VIRTUAL_NODES {
                let h = fnv1a(fnv1a(FNV_OFFSET, name.as_bytes()), &node.to_le_bytes());
                points.push((mix(h), i as u32));
            }
        }
        points.sort_unstable();
        Self { addrs, points }
    }

    /// The addresses the ring was built over.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Endpoint indices in the order met walking clockwise from `key`, each
    /// once.
    pub fn walk(&self, key: u64) -> Vec<usize> {
        let mut seen = vec![false; self.addrs.len()];
        let mut order = Vec::with_capacity(self.addrs.len());
        if self.points.is_empty() {
            return order;
        }
        let start = self.points.partition_point(|(p, _)| *p < key);
        for k in 0..self.points.len() {
            let (_, i) = self.points[(start + k) % self.points.len()];
            let i = i as usize;
            if !seen[i] {
                seen[i] = true;
                order.push(i);
                if order.len() == self.addrs.len() {
                    break;
                }
            }
        }
        order
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state = (state ^ u64::from(b)).wrapping_mul(FNV_PRIME);
    }
    state
}

/// Spreads a hash over the ring (splitmix64's finaliser): FNV's high bits
/// alone cluster for similar inputs.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The ring position of a prompt prefix hash for `model`.
pub fn ring_key(prefix: u64, model: Option<&str>) -> u64 {
    mix(fnv1a(prefix, model.unwrap_or_default().as_bytes()))
}

/// The picker's decision: an index into the views, and how a prefix placed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Index of the chosen endpoint.
    pub index: usize,
    /// For a request with a prefix: its own endpoint, or a spill.
    pub affinity: Option<Affinity>,
}

/// Chooses among `views` (at least one): by the ring from `key` when there
/// is a key, else the better of two random endpoints. Endpoints in failure
/// back-off only when all are; LoRA holders first when one is within the
/// load bound.
pub fn choose(
    views: &[View],
    ring: Option<&Ring>,
    key: Option<u64>,
    settings: &Settings,
    rng: &mut fastrand::Rng,
) -> Choice {
    choose_prefix(views, ring, key, true, settings, rng)
}

/// [`choose`], told whether the prefix was `seen` recently. A prefix seen
/// before is probably in its ring owner's cache: it follows the ring within
/// the load bound, where a hit saves a whole prefill. A new prefix is in no
/// cache yet: it goes to the better of its ring owner and one random
/// endpoint, by the same score as without a prefix, so that prompts that
/// share nothing are balanced as power of two choices balances them, while
/// a prefix that will repeat still tends to start where the ring (and so
/// every other sidecar) will look for it.
pub fn choose_prefix(
    views: &[View],
    ring: Option<&Ring>,
    key: Option<u64>,
    seen: bool,
    settings: &Settings,
    rng: &mut fastrand::Rng,
) -> Choice {
    let weights = &settings.weights;
    let usable: Vec<usize> = (0..views.len())
        .filter(|&i| views[i].backoff_left == 0)
        .collect();
    if usable.is_empty() {
        // All backing off: the one back first.
        let index = (0..views.len())
            .min_by_key(|&i| views[i].backoff_left)
            .unwrap_or(0);
        return Choice {
            index,
            affinity: None,
        };
    }
    let usable_views: Vec<View> = usable.iter().map(|&i| views[i]).collect();
    let limit = bound(&usable_views, weights, settings.load_factor);
    let holders: Vec<usize> = usable
        .iter()
        .copied()
        .filter(|&i| views[i].has_adapter)
        .collect();
    // Loading an adapter costs more than a little queueing: holders may
    // go to twice the bound before the others are considered.
    let holder_limit = bound(&usable_views, weights, 2.0 * settings.load_factor);
    let holders_fit = holders
        .iter()
        .any(|&i| effective(&views[i], weights) <= holder_limit);
    let candidates = if holders_fit { &holders } else { &usable };
    let limit = if holders_fit { holder_limit } else { limit };
    if let (Some(ring), Some(key), false) = (ring, key, seen) {
        let owner = ring
            .walk(key)
            .into_iter()
            .find(|&i| i < views.len() && candidates.contains(&i));
        if let Some(owner) = owner {
            // Not busier than the mean: the owner, as a seen prefix would
            // go (so the first requests of a prefix from every sidecar
            // meet there at low load).
            if candidates.len() == 1
                || effective(&views[owner], weights) <= bound(&usable_views, weights, 1.0)
            {
                return Choice {
                    index: owner,
                    affinity: Some(Affinity::Hit),
                };
            }
            let others: Vec<usize> = candidates.iter().copied().filter(|&i| i != owner).collect();
            let other = others[rng.usize(..others.len())];
            let index = p2c(
                (owner, &views[owner]),
                (other, &views[other]),
                weights,
                rng.f64(),
            );
            let affinity = if index == owner {
                Affinity::Hit
            } else {
                Affinity::Spill
            };
            return Choice {
                index,
                affinity: Some(affinity),
            };
        }
    }
    if let (Some(ring), Some(key)) = (ring, key) {
        let mut owner = None;
        for i in ring.walk(key) {
            if i >= views.len() || !candidates.contains(&i) {
                continue;
            }
            let first = *owner.get_or_insert(i);
            if effective(&views[i], weights) <= limit {
                let affinity = if i == first {
                    Affinity::Hit
                } else {
                    Affinity::Spill
                };
                return Choice {
                    index: i,
                    affinity: Some(affinity),
                };
            }
        }
        // Nothing within the bound (only when the bound is below every
        // load, as with penalties): the least loaded, as a spill.
        let index = least_loaded(candidates, views, weights);
        return Choice {
            index,
            affinity: Some(if Some(index) == owner {
                Affinity::Hit
            } else {
                Affinity::Spill
            }),
        };
    }
    let index = match candidates.len() {
        1 => candidates[0],
        n => {
            let a = rng.usize(..n);
            let mut b = rng.usize(..n - 1);
            if b >= a {
                b += 1;
            }
            p2c(
                (candidates[a], &views[candidates[a]]),
                (candidates[b], &views[candidates[b]]),
                weights,
                rng.f64(),
            )
        }
    };
    Choice {
        index,
        affinity: None,
    }
}

fn least_loaded(candidates: &[usize], views: &[View], weights: &ScoreWeights) -> usize {
    candidates
        .iter()
        .copied()
        .min_by(|&a, &b| effective(&views[a], weights).total_cmp(&effective(&views[b], weights)))
        .unwrap_or(0)
}

/// The better of two endpoints, softly: `a` when `draw` (uniform in `0..1`)
/// falls below its share `score_b² / (score_a² + score_b²)`, where a score
/// is the effective load times the TTFT estimate to the power `latency`
/// (an endpoint not yet sampled takes its rival's estimate).
pub fn p2c(
    (a, va): (usize, &View),
    (b, vb): (usize, &View),
    weights: &ScoreWeights,
    draw: f64,
) -> usize {
    let rtt_a = va.rtt.or(vb.rtt).unwrap_or(1.0);
    let rtt_b = vb.rtt.unwrap_or(rtt_a);
    let score = |v: &View, rtt: f64| effective(v, weights) * rtt.max(1.0).powf(weights.latency);
    let (sa, sb) = (score(va, rtt_a), score(vb, rtt_b));
    if sa == sb {
        return a;
    }
    let share_a = sb * sb / (sa * sa + sb * sb);
    if draw < share_a {
        a
    } else {
        b
    }
}

// === metrics parsing ===

/// What one metrics page says, in the names of `names`: `None` for a gauge
/// it does not hold. Samples of one gauge with several label sets (models)
/// add up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scraped {
    /// Requests waiting.
    pub waiting: Option<f64>,
    /// Requests running.
    pub running: Option<f64>,
    /// KV-cache usage, 0 to 1.
    pub kv_cache: Option<f64>,
    /// Adapters running or waiting, from the newest sample of the LoRA info.
    pub adapters: Option<Vec<String>>,
}

impl Scraped {
    /// The load it reports, when it holds a queue or running count.
    pub fn load(&self) -> Option<ServerLoad> {
        (self.waiting.is_some() || self.running.is_some()).then(|| ServerLoad {
            waiting: self.waiting.unwrap_or(0.0),
            running: self.running.unwrap_or(0.0),
            kv_cache: self.kv_cache.unwrap_or(0.0),
        })
    }
}

/// Reads the few gauges the balancer needs from Prometheus text
/// exposition; lines it does not understand are skipped.
pub fn parse_metrics(text: &str, names: &ResolvedNames) -> Scraped {
    let mut out = Scraped::default();
    let mut newest_lora = f64::NEG_INFINITY;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = split_sample(line) else {
            continue;
        };
        let add = |slot: &mut Option<f64>| *slot = Some(slot.unwrap_or(0.0) + value);
        if names.waiting.as_deref() == Some(name) {
            add(&mut out.waiting);
        } else if names.running.as_deref() == Some(name) {
            add(&mut out.running);
        } else if names.kv_cache_usage.as_deref() == Some(name) {
            add(&mut out.kv_cache);
        } else if names.lora_info.as_deref() == Some(name) && value >= newest_lora {
            newest_lora = value;
            let mut adapters = Vec::new();
            for (key, list) in parse_labels(labels) {
                if key == "running_lora_adapters" || key == "waiting_lora_adapters" {
                    adapters.extend(
                        list.split(',')
                            .map(str::trim)
                            .filter(|a| !a.is_empty())
                            .map(str::to_string),
                    );
                }
            }
            out.adapters = Some(adapters);
        }
    }
    out
}

/// `name{labels} value [timestamp]` as (name, labels inside the braces, value).
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (name, labels, rest) = match line.find(['{', ' ', '\t']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let close = closing_brace(line, i)?;
            (&line[..i], &line[i + 1..close], &line[close + 1..])
        }
        Some(i) => (&line[..i], "", &line[i..]),
        None => return None,
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    value.is_finite().then_some((name, labels, value))
}

/// The `}` closing the label set opened at `open`, skipping quoted values.
fn closing_brace(line: &str, open: usize) -> Option<usize> {
    let bytes = line.as_bytes();
    let (mut i, mut quoted) = (open + 1, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'}' if !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// `key="value",...` as pairs, values unescaped.
fn parse_labels(labels: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = labels;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let Some(eq) = rest.find('=') else {
            return out;
        };
        let key = rest[..eq].trim().to_string();
        let after = rest[eq + 1..].trim_start();
        let Some(body) = after.strip_prefix('"') else {
            return out;
        };
        let mut value = String::new();
        let mut chars = body.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => {}
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let Some(end) = end else {
            return out;
        };
        out.push((key, value));
        rest = &body[end + 1..];
    }
}

/// Reads an ORCA load report (`endpoint-load-metrics`, its TEXT form:
/// `TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=3, ...`).
/// Unknown keys are ignored; `None` without a queue or running count.
pub fn parse_orca(value: &str) -> Option<ServerLoad> {
    let body = value.trim().strip_prefix("TEXT")?.trim();
    let (mut waiting, mut running, mut kv) = (None, None, None);
    for pair in body.split(',') {
        let Some((key, number)) = pair.trim().split_once('=') else {
            continue;
        };
        let Ok(number) = number.trim().parse::<f64>() else {
            continue;
        };
        if !number.is_finite() {
            continue;
        }
        let key = key.trim();
        let key = key.strip_prefix("named_metrics.").unwrap_or(key);
        match key {
            "num_requests_waiting" => waiting = Some(number),
            "num_requests_running" => running = Some(number),
            "kv_cache_usage_perc" | "kv_cache_utilization" => kv = Some(number),
            _ => {}
        }
    }
    (waiting.is_some() || running.is_some()).then(|| ServerLoad {
        waiting: waiting.unwrap_or(0.0),
        running: running.unwrap_or(0.0),
        kv_cache: kv.unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::policy::ServerMetrics;

    /// The mechanics under test, with round weights: a running request
    /// weighs one, and the bound is 1.25 × the mean.
    fn settings() -> Settings {
        let mut s = Settings::from(&ModelAware::default());
        s.weights.running = 1.0;
        s.load_factor = 1.25;
        s
    }

    fn idle() -> View {
        View {
            in_flight: 0,
            rtt: None,
            penalty: 1.0,
            backoff_left: 0,
            server: None,
            has_adapter: false,
        }
    }

    fn busy(in_flight: usize) -> View {
        View {
            in_flight,
            ..idle()
        }
    }

    fn reporting(waiting: f64, running: f64, kv_cache: f64) -> View {
        View {
            server: Some(ServerLoad {
                waiting,
                running,
                kv_cache,
            }),
            ..idle()
        }
    }

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i)))
            .collect()
    }

    #[test]
    fn load_takes_the_larger_of_own_and_server_counts_and_grows_with_the_kv_cache() {
        let w = settings().weights;
        assert_eq!(load(&busy(3), &w), 3.0);
        // Queue weighs twice a running request here: 2 × 4 + 1 × 2.
        assert_eq!(load(&reporting(4.0, 2.0, 0.0), &w), 10.0);
        // The server counts fewer than this proxy has sent: the proxy's.
        let v = View {
            in_flight: 12,
            ..reporting(1.0, 1.0, 0.0)
        };
        assert_eq!(load(&v, &w), 12.0);
        // A full KV cache doubles it.
        assert_eq!(load(&reporting(0.0, 5.0, 1.0), &w), 10.0);
        assert_eq!(
            load(&reporting(0.0, 5.0, 7.0), &w),
            10.0,
            "usage is clamped"
        );
        assert_eq!(effective(&busy(3), &w), 4.0);
        let shedding = View {
            penalty: 16.0,
            ..busy(0)
        };
        assert_eq!(effective(&shedding, &w), 16.0);
    }

    #[test]
    fn the_ring_is_the_same_for_the_same_addresses_whatever_their_order() {
        let a = Ring::new(addrs(8));
        let mut reversed = addrs(8);
        reversed.reverse();
        let b = Ring::new(reversed.clone());
        for key in [0u64, 1, u64::MAX, 0x1234_5678_9abc_def0] {
            let via_a: Vec<SocketAddr> = a.walk(key).iter().map(|&i| a.addrs()[i]).collect();
            let via_b: Vec<SocketAddr> = b.walk(key).iter().map(|&i| b.addrs()[i]).collect();
            assert_eq!(via_a, via_b);
            assert_eq!(via_a.len(), 8);
        }
    }

    #[test]
    fn the_ring_spreads_keys_evenly_and_moves_few_when_an_endpoint_leaves() {
        let ring = Ring::new(addrs(8));
        let mut counts = [0usize; 8];
        let owner = |ring: &Ring, k: u64| ring.addrs()[ring.walk(mix(k))[0]];
        for k in 0..8000u64 {
            counts[ring.walk(mix(k))[0]] += 1;
        }
        for c in counts {
            assert!((700..=1300).contains(&c), "{counts:?}");
        }
        let mut fewer = addrs(8);
        let gone = fewer.remove(3);
        let smaller = Ring::new(fewer);
        let moved = (0..8000u64)
            .filter(|&k| owner(&ring, k) != gone && owner(&ring, k) != owner(&smaller, k))
            .count();
        assert_eq!(moved, 0, "keys of the endpoints that stay stay");
    }

    #[test]
    fn a_prefix_goes_to_its_own_endpoint_while_within_the_bound_then_spills() {
        let s = settings();
        let ring = Ring::new(addrs(4));
        let key = ring_key(42, Some("m"));
        let order = ring.walk(key);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut views = vec![busy(2); 4];
        let choice = choose(&views, Some(&ring), Some(key), &s, &mut rng);
        assert_eq!(choice.index, order[0]);
        assert_eq!(choice.affinity, Some(Affinity::Hit));
        // Its owner at 5 in flight, the rest at 2: effective 6 against a
        // bound of ⌈1.25 × 3.75⌉ = 5.
        views[order[0]] = busy(5);
        let choice = choose(&views, Some(&ring), Some(key), &s, &mut rng);
        assert_eq!(choice.index, order[1]);
        assert_eq!(choice.affinity, Some(Affinity::Spill));
        // The owner's queue, as its server reports it, counts (twice).
        views[order[0]] = reporting(3.0, 0.0, 0.0);
        let choice = choose(&views, Some(&ring), Some(key), &s, &mut rng);
        assert_eq!(choice.index, order[1]);
        // A larger factor keeps the prefix home.
        let loose = Settings {
            load_factor: 2.0,
            ..s.clone()
        };
        let choice = choose(&views, Some(&ring), Some(key), &loose, &mut rng);
        assert_eq!(choice.index, order[0]);
    }

    #[test]
    fn a_new_prefix_starts_on_its_owner_unless_it_is_busier_than_the_mean() {
        let s = settings();
        let ring = Ring::new(addrs(4));
        let key = ring_key(7, Some("m"));
        let order = ring.walk(key);
        let mut rng = fastrand::Rng::with_seed(3);
        // Even load: the owner, as for a prefix seen before.
        let views = vec![busy(2); 4];
        let choice = choose_prefix(&views, Some(&ring), Some(key), false, &s, &mut rng);
        assert_eq!(choice.index, order[0]);
        // The owner far busier than the others: a new prefix (nothing to
        // lose in a cache) goes mostly to the random other of two choices,
        // while a seen one still stays within the loose bound of 2.
        let mut views = vec![busy(1); 4];
        views[order[0]] = busy(4);
        let owner_share = (0..1000)
            .filter(|_| {
                choose_prefix(&views, Some(&ring), Some(key), false, &s, &mut rng).index == order[0]
            })
            .count();
        // Soft shares: 2.5 times the load keeps about a seventh.
        assert!(
            owner_share < 250,
            "a new prefix kept its busy owner {owner_share}/1000"
        );
        let loose = Settings {
            load_factor: 2.0,
            ..s.clone()
        };
        let choice = choose_prefix(&views, Some(&ring), Some(key), true, &loose, &mut rng);
        assert_eq!(choice.index, order[0], "a seen prefix stays home");
    }

    #[test]
    fn endpoints_backing_off_are_passed_over_on_the_ring_and_in_p2c() {
        let s = settings();
        let ring = Ring::new(addrs(3));
        let key = ring_key(7, None);
        let order = ring.walk(key);
        let mut views = vec![idle(); 3];
        views[order[0]].backoff_left = 1_000;
        let mut rng = fastrand::Rng::with_seed(2);
        let choice = choose(&views, Some(&ring), Some(key), &s, &mut rng);
        assert_eq!(choice.index, order[1]);
        assert_eq!(choice.affinity, Some(Affinity::Hit), "the first usable one");
        for _ in 0..50 {
            assert_ne!(choose(&views, None, None, &s, &mut rng).index, order[0]);
        }
        // All backing off: the one back first.
        views[order[1]].backoff_left = 500;
        views[order[2]].backoff_left = 800;
        assert_eq!(choose(&views, None, None, &s, &mut rng).index, order[1]);
    }

    #[test]
    fn without_a_prefix_the_lighter_endpoint_gets_most_requests() {
        let s = settings();
        let mut rng = fastrand::Rng::with_seed(3);
        let views = [reporting(8.0, 4.0, 0.5), reporting(0.0, 2.0, 0.1)];
        let to_light = (0..1000)
            .filter(|_| choose(&views, None, None, &s, &mut rng).index == 1)
            .count();
        assert!(to_light > 950, "{to_light} of 1000");
        // Equal loads split evenly.
        let views = [busy(2), busy(2)];
        let to_second = (0..1000)
            .filter(|_| choose(&views, None, None, &s, &mut rng).index == 1)
            .count();
        assert!((400..=600).contains(&to_second), "{to_second}");
    }

    #[test]
    fn p2c_weighs_latency_by_its_exponent() {
        let mut w = ScoreWeights::default();
        let fast = View {
            rtt: Some(10.0),
            ..busy(1)
        };
        let slow = View {
            rtt: Some(20.0),
            ..busy(1)
        };
        // Twice the score keeps a fifth.
        assert_eq!(p2c((0, &slow), (1, &fast), &w, 0.19), 0);
        assert_eq!(p2c((0, &slow), (1, &fast), &w, 0.21), 1);
        w.latency = 0.0;
        // By load alone they are equal: the first.
        assert_eq!(p2c((0, &slow), (1, &fast), &w, 0.99), 0);
        // Not yet sampled: the rival's estimate.
        let fresh = busy(1);
        assert_eq!(
            p2c((0, &fresh), (1, &fast), &ScoreWeights::default(), 0.99),
            0
        );
    }

    #[test]
    fn lora_holders_come_first_within_the_bound() {
        let s = settings();
        let mut rng = fastrand::Rng::with_seed(4);
        let mut views = vec![idle(); 4];
        views[2].has_adapter = true;
        for _ in 0..50 {
            assert_eq!(choose(&views, None, None, &s, &mut rng).index, 2);
        }
        let ring = Ring::new(addrs(4));
        let key = ring_key(9, Some("adapter"));
        let choice = choose(&views, Some(&ring), Some(key), &s, &mut rng);
        assert_eq!(choice.index, 2);
        // The holder far over the bound: everyone is a candidate again.
        views[2] = View {
            has_adapter: true,
            ..busy(100)
        };
        for _ in 0..50 {
            assert_ne!(choose(&views, None, None, &s, &mut rng).index, 2);
        }
    }

    const VLLM_PAGE: &str = r#"# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3.0
vllm:num_requests_running{model_name="m"} 7
vllm:kv_cache_usage_perc{model_name="m"} 0.42
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a1,a2",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters="w\"1"} 1.6e9
vllm:prefix_cache_hits_total{model_name="m"} 120
garbage line without value
vllm:num_requests_waiting_other 99
"#;

    #[test]
    fn a_vllm_page_gives_queue_running_cache_and_adapters() {
        let names = ServerMetrics::default().resolved_names();
        let scraped = parse_metrics(VLLM_PAGE, &names);
        assert_eq!(scraped.waiting, Some(3.0));
        assert_eq!(scraped.running, Some(7.0));
        assert_eq!(scraped.kv_cache, Some(0.42));
        assert_eq!(scraped.adapters, Some(vec!["a1".into(), "a2".into()]));
        assert_eq!(
            scraped.load(),
            Some(ServerLoad {
                waiting: 3.0,
                running: 7.0,
                kv_cache: 0.42
            })
        );
        // Nothing it knows: no load, no error.
        assert_eq!(
            parse_metrics("<html>nope</html>\n", &names),
            Scraped::default()
        );
        assert_eq!(parse_metrics("", &names).load(), None);
    }

    #[test]
    fn sglang_names_and_overrides_are_read() {
        let mut metrics = ServerMetrics {
            server_kind: infermesh_proto::policy::ServerKind::Sglang,
            ..ServerMetrics::default()
        };
        let page = "sglang:num_queue_reqs{model=\"a\"} 2\nsglang:num_queue_reqs{model=\"b\"} 3\nsglang:num_running_reqs 4\nsglang:token_usage 0.5\nmine 9\n";
        let scraped = parse_metrics(page, &metrics.resolved_names());
        assert_eq!(scraped.waiting, Some(5.0), "label sets add up");
        assert_eq!(scraped.running, Some(4.0));
        assert_eq!(scraped.kv_cache, Some(0.5));
        assert_eq!(scraped.adapters, None);
        metrics.names.waiting = Some("mine".into());
        assert_eq!(
            parse_metrics(page, &metrics.resolved_names()).waiting,
            Some(9.0)
        );
    }

    #[test]
    fn orca_text_reports_are_read_and_odd_ones_ignored() {
        assert_eq!(
            parse_orca("TEXT named_metrics.kv_cache_usage_perc=0.42, named_metrics.num_requests_waiting=3, named_metrics.num_requests_running=7"),
            Some(ServerLoad {
                waiting: 3.0,
                running: 7.0,
                kv_cache: 0.42
            })
        );
        assert_eq!(parse_orca("TEXT cpu_utilization=0.3"), None);
        assert_eq!(parse_orca("JSON {\"x\":1}"), None);
        assert_eq!(
            parse_orca(
                "TEXT named_metrics.num_requests_waiting=NaN, named_metrics.num_requests_running=2"
            ),
            Some(ServerLoad {
                waiting: 0.0,
                running: 2.0,
                kv_cache: 0.0
            })
        );
    }

    #[test]
    fn stale_reports_and_adapters_are_ignored() {
        let t0 = Instant::now();
        let state = ServerState {
            load: Some((ServerLoad::default(), t0)),
            adapters: Some((vec!["a".into()], t0)),
        };
        let stale = Duration::from_secs(3);
        assert!(state
            .fresh_load(t0 + Duration::from_secs(2), stale)
            .is_some());
        assert!(state
            .fresh_load(t0 + Duration::from_secs(4), stale)
            .is_none());
        assert!(state.has_adapter("a", t0 + Duration::from_secs(1), stale));
        assert!(!state.has_adapter("b", t0, stale));
        assert!(!state.has_adapter("a", t0 + Duration::from_secs(9), stale));
    }
}
