//! Endpoint selection: round robin, least outstanding requests by power of
//! two choices, peak-EWMA power of two choices, and the model-aware
//! balancer (server load, prefix and LoRA affinity; see [`model_aware`]),
//! which shares this module's endpoint statistics, back-off and penalties.
//!
//! What an attempt's outcome does to its endpoint (see [`Outcome`]):
//!
//! - A **served** response head is a latency sample for peak-EWMA and ends
//!   any failure back-off.
//! - A **failure** (no connection, an upstream error before the response
//!   head, a 5xx, a gRPC `UNAVAILABLE` head) is never a latency sample: a
//!   refused connection is fast, and counting it would make a dead endpoint
//!   look like the quickest. Its time may only raise the estimate. It puts
//!   the endpoint in a **failure back-off** of [`FAILURE_BACKOFF`], doubling
//!   with each consecutive failure up to [`MAX_FAILURE_BACKOFF`]: both
//!   power-of-two pickers take an endpoint that is not backing off over one
//!   that is, whatever their loads (as Finagle's fail-fast marks a host
//!   busy). When the back-off ends, the next attempt sent there is its probe,
//!   and the back-off is claimed again for its length meanwhile, so a dead
//!   endpoint draws one request per back-off period, and a recovered one is
//!   back at full share after its first success. This works without outlier
//!   detection or retries; outlier detection (see `outlier`) is the separate,
//!   configured mechanism that takes an endpoint out altogether.
//! - A **shed** response (429, `RESOURCE_EXHAUSTED`, `Retry-After`) is
//!   neither: the endpoint is penalised for a while, and both
//!   power-of-two pickers see its load multiplied by [`PENALTY_FACTOR`], so
//!   traffic shifts to the others unless they are far busier. (A 5xx with
//!   `Retry-After` is a failure and penalised too.)
//!
//! Round robin ignores load and outcomes alike: it is the even, oblivious
//! baseline, and needs outlier detection to avoid a failing endpoint.
//! Ejected endpoints (see `outlier`) are not offered to the picker at all;
//! the backend filters them out.
//!
//! The peak-EWMA estimate is the larger of two decaying values: an average
//! of the time to first byte (a sample pulls it in with a weight growing
//! with the time since the last one, over [`DECAY`]; a stall counts in it as
//! twice the estimate at most) and the last peak (a sample above it replaces
//! it), which fades within [`PEAK_DECAY`]. A slow endpoint is avoided at
//! once, a single stall is forgiven within a second rather than starving its
//! endpoint for tens of seconds, and an endpoint that gets no traffic fades
//! towards zero so that it is tried again. An endpoint with no sample yet
//! takes its rival's estimate, so the two compare by requests in flight.
//! The comparison is soft: each of the two gets a share in inverse
//! proportion to its squared load, so equal replicas split evenly despite
//! noisy estimates while a clearly slower or busier endpoint gets little
//! (see [`p2c`]).
//!
//! Every endpoint keeps its own statistics in atomics (and a small per-endpoint
//! lock for the EWMA), so picking never takes a lock shared by all requests.
//! Power of two choices samples two endpoints at random and compares them:
//! nearly as good as scanning them all, and no endpoint is stampeded
//! when every proxy sees the same minimum.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use infermesh_proto::policy::BalancerKind;
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;

use crate::outlier::Health;

pub mod model_aware;

use model_aware::{Affinity, Ring, ServerLoad, ServerState, View};

/// How quickly the peak-EWMA average follows new samples, and fades
/// towards zero without any.
pub const DECAY: Duration = Duration::from_secs(10);
/// How quickly a peak fades into the average: a single slow response is
/// forgiven within a second.
pub const PEAK_DECAY: Duration = Duration::from_millis(250);
/// Failure back-off after one failure; it doubles with each consecutive one.
pub const FAILURE_BACKOFF: Duration = Duration::from_millis(100);
/// Longest failure back-off: a dead endpoint draws one probe this often, and
/// a recovered one is found again within it.
pub const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(10);
/// Draws of two endpoints a power-of-two pick makes, among three or more,
/// before it settles for one in failure back-off.
const MAX_EFFORT: usize = 4;
/// How much heavier a penalised endpoint looks to the pickers: it still gets
/// traffic when every other endpoint is this many times as loaded.
pub const PENALTY_FACTOR: f64 = 16.0;
/// Penalty for a 429 without `Retry-After`.
pub const DEFAULT_PENALTY: Duration = Duration::from_secs(1);
/// Longest penalty, whatever `Retry-After` asks: a server that sheds for
/// longer is better caught by outlier ejection.
pub const MAX_PENALTY: Duration = Duration::from_secs(60);

/// One address of a backend, with its load statistics.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    /// `ip:port`, as put in upstream request URIs.
    authority: http::uri::Authority,
    in_flight: AtomicUsize,
    ewma: Mutex<PeakEwma>,
    /// End of the current 429 penalty, in nanoseconds since [`epoch`]; 0
    /// for none.
    penalty_until: AtomicU64,
    /// Failures in a row, ended by a served response.
    failures: AtomicU32,
    /// End of the current failure back-off (or of a probe's claim), in
    /// nanoseconds since [`epoch`]; 0 for none.
    backoff_until: AtomicU64,
    /// Mirrors `health.is_ejected()`, so that picking reads an atomic.
    ejected: AtomicBool,
    health: Mutex<Health>,
    /// The backend's ejected-endpoints gauge while this endpoint counts in
    /// it, so that an endpoint dropped while ejected leaves the gauge.
    ejected_gauge: Mutex<Option<Gauge>>,
    /// What the model server said of its load, for the model-aware balancer.
    server: Mutex<ServerState>,
}

/// The origin of the penalty clock.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_nanos() as u64
}

impl Endpoint {
    /// A fresh endpoint with no history.
    pub fn new(addr: SocketAddr) -> Self {
        let authority = addr
            .to_string()
            .parse()
            .expect("a socket address is a valid authority");
        let now = Instant::now();
        Self {
            addr,
            authority,
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new(PeakEwma::new(now)),
            penalty_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            backoff_until: AtomicU64::new(0),
            ejected: AtomicBool::new(false),
            health: Mutex::new(Health::new(now)),
            ejected_gauge: Mutex::new(None),
            server: Mutex::new(ServerState::default()),
        }
    }

    /// Records the server's own load report (a poll, or a response's ORCA
    /// header) made at `at`; an older one than held is dropped.
    pub fn report_load(&self, load: ServerLoad, at: Instant) {
        let mut server = self.server.lock();
        if server.load.is_none_or(|(_, held)| held <= at) {
            server.load = Some((load, at));
        }
    }

    /// Records the adapters a poll at `at` found loaded.
    pub fn report_adapters(&self, adapters: Vec<String>, at: Instant) {
        self.server.lock().adapters = Some((adapters, at));
    }

    /// What the proxy believes of the endpoint's server.
    pub fn server_state(&self) -> ServerState {
        self.server.lock().clone()
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ip:port` as a URI authority.
    pub fn authority(&self) -> &http::uri::Authority {
        &self.authority
    }

    /// Requests sent to this endpoint whose response has not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks a request as started; the guard marks it finished when dropped.
    /// An attempt sent to an endpoint that has failed since its last
    /// success is its probe: the back-off is claimed again for its length,
    /// so that no other attempt follows before the probe's outcome.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.start_at(Instant::now())
    }

    /// [`Endpoint::start`] at `now`, a time the caller read anyway.
    pub fn start_at(self: &Arc<Self>, now: Instant) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let failures = self.failures.load(Ordering::Relaxed);
        if failures > 0 {
            let until = nanos_since_epoch(now + failure_backoff(failures)).max(1);
            self.backoff_until.fetch_max(until, Ordering::Relaxed);
        }
        InFlight(self.clone())
    }

    /// Records a served response head that took `rtt` to start.
    pub fn observe_first_byte(&self, rtt: Duration) {
        self.observe_at(Instant::now(), rtt, Outcome::Served);
    }

    /// Records how an attempt that took `rtt` ended at `now`; see [`Outcome`].
    pub fn observe_at(&self, now: Instant, rtt: Duration, outcome: Outcome) {
        match outcome {
            Outcome::Served => {
                self.ewma.lock().observe(now, rtt);
                if self.failures.swap(0, Ordering::Relaxed) > 0 {
                    self.backoff_until.store(0, Ordering::Relaxed);
                }
            }
            Outcome::Failed => {
                self.ewma.lock().observe_failure(now, rtt);
                let failures = self
                    .failures
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1);
                let until = nanos_since_epoch(now + failure_backoff(failures)).max(1);
                self.backoff_until.fetch_max(until, Ordering::Relaxed);
            }
            Outcome::Shed => {}
        }
    }

    /// Consecutive failures since the last served response.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether a failure back-off (or a probe's claim) runs at `now`.
    pub fn is_backing_off(&self, now: Instant) -> bool {
        self.backoff_until.load(Ordering::Relaxed) > nanos_since_epoch(now)
    }

    /// Peak-EWMA load on its own: the latency estimate (zero before the
    /// first sample) times the requests in flight plus one, heavier while
    /// penalised. The picker compares two endpoints with [`p2c`].
    pub fn peak_ewma_load(&self, now: Instant) -> f64 {
        let standing = self.standing(now, BalancerKind::PeakEwma);
        standing.peak_ewma_load(standing.rtt.unwrap_or(0.0))
    }

    /// What a picker of `kind` compares, read at `now` (the latency
    /// estimate, behind the endpoint's lock, only for peak-EWMA).
    fn standing(&self, now: Instant, kind: BalancerKind) -> Standing {
        let backoff_until = self.backoff_until.load(Ordering::Relaxed);
        let now_nanos = nanos_since_epoch(now);
        Standing {
            in_flight: self.in_flight(),
            rtt: match kind {
                BalancerKind::PeakEwma => self.ewma.lock().estimate(now),
                _ => None,
            },
            penalty: self.penalty_weight(now),
            backoff_left: backoff_until.saturating_sub(now_nanos),
        }
    }

    /// Penalises the endpoint until `now + length` (a 429, a `Retry-After`);
    /// a longer penalty already running stays.
    pub fn penalize(&self, now: Instant, length: Duration) {
        let until = nanos_since_epoch(now + length.min(MAX_PENALTY)).max(1);
        self.penalty_until.fetch_max(until, Ordering::Relaxed);
    }

    /// Whether a penalty runs at `now`.
    pub fn is_penalized(&self, now: Instant) -> bool {
        self.penalty_until.load(Ordering::Relaxed) > nanos_since_epoch(now)
    }

    fn penalty_weight(&self, now: Instant) -> f64 {
        if self.is_penalized(now) {
            PENALTY_FACTOR
        } else {
            1.0
        }
    }

    /// Whether the endpoint is ejected (or probing after an ejection).
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    /// The endpoint's breaker, locked.
    pub fn health(&self) -> parking_lot::MutexGuard<'_, Health> {
        self.health.lock()
    }

    /// Marks the endpoint ejected or back in, moving it in or out of
    /// `gauge`. Called with the breaker's new state.
    pub fn set_ejected(&self, ejected: bool, gauge: &Gauge) {
        self.ejected.store(ejected, Ordering::Relaxed);
        let mut counted = self.ejected_gauge.lock();
        match (ejected, counted.is_some()) {
            (true, false) => {
                gauge.inc();
                *counted = Some(gauge.clone());
            }
            (false, true) => {
                if let Some(gauge) = counted.take() {
                    gauge.dec();
                }
            }
            _ => {}
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(gauge) = self.ejected_gauge.get_mut().take() {
            gauge.dec();
        }
    }
}

/// Counts a request against an endpoint's in-flight total until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    /// The endpoint the request went to.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How an attempt ended, as the balancer weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head the endpoint served (2xx, 3xx, a 4xx that is the
    /// client's fault): a latency sample, and the end of any back-off.
    Served,
    /// The endpoint failed the attempt: no connection, an upstream error
    /// before the response head, a 5xx, a gRPC `UNAVAILABLE` head.
    Failed,
    /// The endpoint shed the request (429, `RESOURCE_EXHAUSTED`,
    /// `Retry-After`): penalised separately, neither sample nor failure.
    Shed,
}

/// The failure back-off after `failures` consecutive failures (at least one).
pub fn failure_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (FAILURE_BACKOFF * (1u32 << doublings)).min(MAX_FAILURE_BACKOFF)
}

/// What a power-of-two picker compares of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Standing {
    in_flight: usize,
    /// Peak-EWMA estimate in nanoseconds; `None` before the first sample.
    rtt: Option<f64>,
    /// 1, or [`PENALTY_FACTOR`] while shedding.
    penalty: f64,
    /// Nanoseconds of failure back-off left; 0 when none.
    backoff_left: u64,
}

impl Standing {
    fn backing_off(&self) -> bool {
        self.backoff_left > 0
    }

    /// Least-request load: the requests in flight (plus one, so that the
    /// penalty weighs on idle endpoints too), heavier while penalised.
    fn least_request_load(&self) -> f64 {
        (self.in_flight + 1) as f64 * self.penalty
    }

    /// Peak-EWMA load: the latency estimate (`rtt`, which may be the rival's
    /// for an endpoint not yet sampled) times the requests in flight plus
    /// one, heavier while penalised.
    fn peak_ewma_load(&self, rtt: f64) -> f64 {
        rtt * self.least_request_load()
    }
}

/// The better of two endpoints: one not in failure back-off over one that
/// is, whatever the loads; between two backing off, the one whose back-off
/// ends first; otherwise by load. Least-request, and any pair of which one
/// is penalised, takes the lower load (`a` on a tie). Otherwise peak-EWMA
/// chooses `a` when `draw` (uniform in `0..1`) falls below `a`'s share,
/// `load_b² / (load_a² + load_b²)`: latency estimates are noisy (a prompt's
/// length alone moves a model server's time to first byte), and always
/// taking the lower one turns a few percent of noise into all of the
/// traffic between two endpoints, while these shares move a few percent
/// (1.1 times the load keeps 45%, twice a fifth, ten times 1%). An endpoint
/// not yet sampled takes its rival's estimate, so that the two compare by
/// requests in flight.
fn p2c(
    kind: BalancerKind,
    (a, sa): (usize, Standing),
    (b, sb): (usize, Standing),
    draw: f64,
) -> usize {
    match (sa.backing_off(), sb.backing_off()) {
        (false, true) => return a,
        (true, false) => return b,
        (true, true) => {
            return if sb.backoff_left < sa.backoff_left {
                b
            } else {
                a
            }
        }
        (false, false) => {}
    }
    let (load_a, load_b) = match kind {
        BalancerKind::PeakEwma => {
            // Two endpoints without samples compare by load alone: any
            // common estimate does.
            let rtt_a = sa.rtt.or(sb.rtt).unwrap_or(1.0);
            let rtt_b = sb.rtt.unwrap_or(rtt_a);
            let (load_a, load_b) = (sa.peak_ewma_load(rtt_a), sb.peak_ewma_load(rtt_b));
            // A penalty is the server's own word, not noise: it decides
            // as a load, as under least-request.
            if load_a != load_b && sa.penalty == sb.penalty {
                let share_a = load_b * load_b / (load_a * load_a + load_b * load_b);
                return if draw < share_a { a } else { b };
            }
            (load_a, load_b)
        }
        _ => (sa.least_request_load(), sb.least_request_load()),
    };
    if load_b < load_a {
        b
    } else {
        a
    }
}

impl ModelAwareState {
    /// The ring over `endpoints`' addresses, built again only when they
    /// change.
    fn ring_for(&self, endpoints: &[Arc<Endpoint>]) -> Arc<Ring> {
        if let Some(ring) = self.ring.load_full() {
            let same = ring.addrs().len() == endpoints.len()
                && ring
                    .addrs()
                    .iter()
                    .zip(endpoints)
                    .all(|(a, e)| *a == e.addr());
            if same {
                return ring;
            }
        }
        let ring = Arc::new(Ring::new(endpoints.iter().map(|e| e.addr()).collect()));
        self.ring.store(Some(ring.clone()));
        ring
    }
}

impl Endpoint {
    /// What the model-aware picker weighs of this endpoint at `now`.
    fn model_aware_view(&self, now: Instant, stale_after: Duration, adapter: Option<&str>) -> View {
        let standing = self.standing(now, BalancerKind::PeakEwma);
        let server = self.server.lock();
        View {
            in_flight: standing.in_flight,
            rtt: standing.rtt,
            penalty: standing.penalty,
            backoff_left: standing.backoff_left,
            server: server.fresh_load(now, stale_after),
            has_adapter: adapter.is_some_and(|a| server.has_adapter(a, now, stale_after)),
        }
    }
}

/// Peak-sensitive exponentially weighted moving average of latency: the
/// larger of an average that samples pull in over [`DECAY`] and the last
/// peak, fading over [`PEAK_DECAY`]; without samples both fade towards zero,
/// so that an endpoint that gets no traffic is tried again.
#[derive(Debug, Clone, Copy)]
struct PeakEwma {
    /// Average in nanoseconds, as of `average_at`.
    average: f64,
    average_at: Instant,
    /// Last peak in nanoseconds, as of `peak_at`.
    peak: f64,
    peak_at: Instant,
    /// Samples so far (saturating); none means no estimate.
    samples: u32,
}

/// What is left at `now` of a value set at `at` that fades by `1/e` every `over`.
fn fade(now: Instant, at: Instant, over: Duration) -> f64 {
    (-now.saturating_duration_since(at).as_secs_f64() / over.as_secs_f64()).exp()
}

impl PeakEwma {
    fn new(now: Instant) -> Self {
        Self {
            average: 0.0,
            average_at: now,
            peak: 0.0,
            peak_at: now,
            samples: 0,
        }
    }

    /// The average and the peak, faded to `now`.
    fn faded(&self, now: Instant) -> (f64, f64) {
        (
            self.average * fade(now, self.average_at, DECAY),
            self.peak * fade(now, self.peak_at, PEAK_DECAY),
        )
    }

    fn observe(&mut self, now: Instant, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        // How much of the average the time since the last sample left.
        let kept_share = fade(now, self.average_at, DECAY);
        let average = self.average * kept_share;
        let peak = self.peak * fade(now, self.peak_at, PEAK_DECAY);
        // A sample weighs by the time since the last one, and at least as
        // one of the samples so far: the first ones are a plain mean, not
        // the first sample fading for ten seconds.
        let weight = (1.0 - kept_share).max(1.0 / self.samples.saturating_add(1) as f64);
        // A stall is the peak's to show: in the average it counts as twice
        // the estimate at most, so that one stall does not shift an
        // endpoint's share for the next ten seconds.
        let usual = if self.samples == 0 {
            rtt
        } else {
            rtt.min(2.0 * average.max(peak))
        };
        self.samples = self.samples.saturating_add(1);
        // `average` has faded by the weight's complement already.
        let kept = self.average * (1.0 - weight);
        self.average = kept.min(average) + usual * weight;
        self.average_at = now;
        self.peak = peak.max(rtt);
        self.peak_at = now;
    }

    /// A failed attempt's time: it may raise the estimate (a timeout is
    /// slow), never lower it.
    fn observe_failure(&mut self, now: Instant, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        if self.estimate(now).is_some_and(|estimate| rtt > estimate) {
            self.peak = rtt;
            self.peak_at = now;
        }
    }

    fn estimate(&self, now: Instant) -> Option<f64> {
        (self.samples > 0).then(|| {
            let (average, peak) = self.faded(now);
            average.max(peak)
        })
    }
}

/// Picks endpoints for one backend.
#[derive(Debug)]
pub struct Balancer {
    kind: BalancerKind,
    next: AtomicUsize,
    model_aware: Option<ModelAwareState>,
}

/// What the model-aware balancer keeps: its settings and the hash ring of
/// the endpoint set it last saw.
#[derive(Debug)]
struct ModelAwareState {
    settings: model_aware::Settings,
    ring: ArcSwapOption<Ring>,
    /// Prefix keys seen recently, one per slot (the slot is the key's low
    /// bits): a prefix whose slot still holds it was seen since the slot
    /// was last taken by another.
    recent: Box<[AtomicU64]>,
}

/// Slots of the recently seen prefixes: a workload with far more live
/// prefixes than this loses some affinity, never correctness.
const RECENT_PREFIXES: usize = 8192;

fn recent_slots() -> Box<[AtomicU64]> {
    (0..RECENT_PREFIXES).map(|_| AtomicU64::new(0)).collect()
}

impl ModelAwareState {
    /// Whether `key` was seen recently; records it.
    fn seen(&self, key: u64) -> bool {
        self.recent[(key as usize) % RECENT_PREFIXES].swap(key, Ordering::Relaxed) == key
    }
}

/// What a request offers the model-aware balancer: its prompt prefix hashes
/// and its model name.
#[derive(Debug, Clone, Default)]
pub struct Hint {
    /// Hashes of the prompt's leading bytes.
    pub prompt: Option<Arc<crate::classify::PromptPrefix>>,
    /// The model the request names (an adapter, for LoRA affinity).
    pub model: Option<Arc<str>>,
}

impl Balancer {
    /// A balancer of the given kind.
    pub fn new(kind: BalancerKind) -> Self {
        Self {
            kind,
            next: AtomicUsize::new(fastrand::usize(..1024)),
            model_aware: (kind == BalancerKind::ModelAware).then(|| ModelAwareState {
                settings: model_aware::Settings::from(
                    &infermesh_proto::policy::ModelAware::default(),
                ),
                ring: ArcSwapOption::empty(),
                recent: recent_slots(),
            }),
        }
    }

    /// A model-aware balancer with `settings`.
    pub fn model_aware(settings: model_aware::Settings) -> Self {
        Self {
            model_aware: Some(ModelAwareState {
                settings,
                ring: ArcSwapOption::empty(),
                recent: recent_slots(),
            }),
            ..Self::new(BalancerKind::ModelAware)
        }
    }

    /// The model-aware settings, for a model-aware balancer.
    pub fn model_aware_settings(&self) -> Option<&model_aware::Settings> {
        self.model_aware.as_ref().map(|m| &m.settings)
    }

    /// Chooses one of `endpoints` for a request offering `hint`, and how
    /// its prefix placed it (model-aware only).
    pub fn pick_hinted(
        &self,
        endpoints: &[Arc<Endpoint>],
        hint: &Hint,
    ) -> Option<(Arc<Endpoint>, Option<Affinity>)> {
        let Some(state) = &self.model_aware else {
            return self.pick(endpoints).map(|e| (e, None));
        };
        if endpoints.is_empty() {
            return None;
        }
        let now = Instant::now();
        let settings = &state.settings;
        let adapter = hint.model.as_deref();
        let views: Vec<View> = endpoints
            .iter()
            .map(|e| e.model_aware_view(now, settings.stale_after, adapter))
            .collect();
        let key = hint
            .prompt
            .as_ref()
            .and_then(|p| p.key(settings.blocks, settings.block_size))
            .map(|prefix| model_aware::ring_key(prefix, adapter));
        let ring = key.map(|_| state.ring_for(endpoints));
        let mut rng = fastrand::Rng::with_seed(fastrand::u64(..));
        let seen = key.is_some_and(|key| state.seen(key));
        let choice =
            model_aware::choose_prefix(&views, ring.as_deref(), key, seen, settings, &mut rng);
        Some((endpoints[choice.index].clone(), choice.affinity))
    }

    /// The strategy.
    pub fn kind(&self) -> BalancerKind {
        self.kind
    }

    /// Chooses one of `endpoints`, or none when the set is empty.
    pub fn pick(&self, endpoints: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        self.pick_with(endpoints, Instant::now)
    }

    /// [`Balancer::pick`] at a given time.
    #[cfg(test)]
    fn pick_at(&self, endpoints: &[Arc<Endpoint>], now: Instant) -> Option<Arc<Endpoint>> {
        self.pick_with(endpoints, || now)
    }

    /// [`Balancer::pick`], reading the clock (`now`) only where standings
    /// are compared: not for one endpoint, nor for round robin.
    fn pick_with(
        &self,
        endpoints: &[Arc<Endpoint>],
        now: impl FnOnce() -> Instant,
    ) -> Option<Arc<Endpoint>> {
        if self.model_aware.is_some() {
            return self
                .pick_hinted(endpoints, &Hint::default())
                .map(|(e, _)| e);
        }
        let index = match (self.kind, endpoints.len()) {
            (_, 0) => return None,
            (_, 1) => 0,
            (BalancerKind::RoundRobin, n) => self.next.fetch_add(1, Ordering::Relaxed) % n,
            (kind, n) => {
                let now = now();
                let standing = |i: usize| (i, endpoints[i].standing(now, kind));
                // Among three or more, two endpoints in back-off may be
                // drawn while others are fine: draw again a few times, and
                // keep the one whose back-off ends first.
                let mut best: Option<(usize, Standing)> = None;
                for _ in 0..if n == 2 { 1 } else { MAX_EFFORT } {
                    let (a, b) = two_distinct(n);
                    let (a, b) = (standing(a), standing(b));
                    let winner = if p2c(kind, a, b, fastrand::f64()) == a.0 {
                        a
                    } else {
                        b
                    };
                    if best.is_none_or(|best| winner.1.backoff_left < best.1.backoff_left) {
                        best = Some(winner);
                    }
                    if !winner.1.backing_off() {
                        break;
                    }
                }
                best.map_or(0, |(i, _)| i)
            }
        };
        Some(endpoints[index].clone())
    }
}

/// Two different indices below `n` (`n >= 2`), uniformly.
fn two_distinct(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// Chooses an index from cumulative weights (`cumulative[i]` is the sum of the
/// weights up to and including `i`) for a value drawn in `0..total`.
pub fn weighted_index(cumulative: &[u64], draw: u64) -> usize {
    cumulative.partition_point(|&upper| upper <= draw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| Arc::new(Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 9000 + i)))))
            .collect()
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let eps = endpoints(3);
        let balancer = Balancer::new(BalancerKind::RoundRobin);
        let mut counts = [0; 3];
        for _ in 0..300 {
            let ep = balancer.pick(&eps).unwrap();
            counts[(ep.addr().port() - 9000) as usize] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn an_empty_set_yields_no_endpoint() {
        for kind in [
            BalancerKind::RoundRobin,
            BalancerKind::LeastRequest,
            BalancerKind::PeakEwma,
        ] {
            assert!(Balancer::new(kind).pick(&[]).is_none());
        }
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let eps = endpoints(2);
        let _busy: Vec<_> = (0..5).map(|_| eps[0].start()).collect();
        let balancer = Balancer::new(BalancerKind::LeastRequest);
        for _ in 0..50 {
            assert_eq!(balancer.pick(&eps).unwrap().addr().port(), 9001);
        }
    }

    #[test]
    fn in_flight_guard_counts_until_dropped() {
        let eps = endpoints(1);
        let guard = eps[0].start();
        assert_eq!(eps[0].in_flight(), 1);
        drop(guard);
        assert_eq!(eps[0].in_flight(), 0);
    }

    #[test]
    fn peak_ewma_prefers_the_faster_endpoint() {
        fastrand::seed(1);
        let eps = endpoints(2);
        eps[0].observe_first_byte(Duration::from_millis(200));
        eps[1].observe_first_byte(Duration::from_millis(20));
        let balancer = Balancer::new(BalancerKind::PeakEwma);
        let to_slow = (0..1000)
            .filter(|_| balancer.pick(&eps).unwrap().addr().port() == 9000)
            .count();
        // Ten times the estimate: one pick in a hundred and one.
        assert!((2..=25).contains(&to_slow), "{to_slow} of 1000");
    }

    #[test]
    fn a_penalised_endpoint_loses_to_an_idle_one_until_its_penalty_ends() {
        fastrand::seed(1);
        let eps = endpoints(2);
        let now = Instant::now();
        eps[0].penalize(now, Duration::from_secs(5));
        assert!(eps[0].is_penalized(now));
        assert!(!eps[0].is_penalized(now + Duration::from_secs(6)));
        // A shorter penalty does not cut a longer one short.
        eps[0].penalize(now, Duration::from_millis(10));
        assert!(eps[0].is_penalized(now + Duration::from_secs(4)));
        for kind in [BalancerKind::LeastRequest, BalancerKind::PeakEwma] {
            let balancer = Balancer::new(kind);
            for _ in 0..50 {
                assert_eq!(balancer.pick(&eps).unwrap().addr().port(), 9001, "{kind:?}");
            }
        }
        // Still picked when the other endpoint is far busier.
        let _busy: Vec<_> = (0..20).map(|_| eps[1].start()).collect();
        let balancer = Balancer::new(BalancerKind::LeastRequest);
        assert_eq!(balancer.pick(&eps).unwrap().addr().port(), 9000);
    }

    #[test]
    fn an_endpoint_dropped_while_ejected_leaves_the_gauge() {
        let gauge = Gauge::default();
        let eps = endpoints(2);
        eps[0].set_ejected(true, &gauge);
        eps[0].set_ejected(true, &gauge);
        eps[1].set_ejected(true, &gauge);
        assert_eq!(gauge.get(), 2);
        eps[1].set_ejected(false, &gauge);
        assert_eq!(gauge.get(), 1);
        drop(eps);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn peak_ewma_jumps_to_a_peak_and_forgives_it_within_seconds() {
        let ms = |n: u64| Duration::from_millis(n).as_nanos() as f64;
        let t0 = Instant::now();
        let mut ewma = PeakEwma::new(t0);
        assert_eq!(ewma.estimate(t0), None, "no estimate before a sample");
        ewma.observe(t0, Duration::from_millis(10));
        assert_eq!(
            ewma.estimate(t0),
            Some(ms(10)),
            "the first sample is the estimate"
        );
        let mut t = t0;
        for _ in 0..100 {
            t += Duration::from_millis(10);
            ewma.observe(t, Duration::from_millis(10));
        }
        t += Duration::from_millis(10);
        ewma.observe(t, Duration::from_millis(400));
        assert_eq!(ewma.estimate(t), Some(ms(400)), "a peak counts at once");
        // Fast samples follow: the peak fades within a second or two, and
        // the stall counts as twice the estimate at most in the average.
        for _ in 0..25 {
            t += Duration::from_millis(10);
            ewma.observe(t, Duration::from_millis(10));
        }
        let after_250ms = ewma.estimate(t).unwrap();
        assert!(after_250ms > ms(100), "{after_250ms}");
        for _ in 0..125 {
            t += Duration::from_millis(10);
            ewma.observe(t, Duration::from_millis(10));
        }
        let after_1500ms = ewma.estimate(t).unwrap();
        assert!(after_1500ms < ms(11), "{after_1500ms}");
        // Without samples the estimate fades, so the endpoint is tried again.
        let later = ewma.estimate(t + Duration::from_secs(60)).unwrap();
        assert!(later < ms(1), "{later}");
    }

    #[test]
    fn a_failure_never_lowers_the_estimate_but_a_slow_one_raises_it() {
        let eps = endpoints(1);
        let t0 = Instant::now();
        eps[0].observe_at(t0, Duration::from_millis(20), Outcome::Served);
        let before = eps[0].standing(t0, BalancerKind::PeakEwma).rtt.unwrap();
        eps[0].observe_at(t0, Duration::from_micros(100), Outcome::Failed);
        assert_eq!(
            eps[0].standing(t0, BalancerKind::PeakEwma).rtt.unwrap(),
            before
        );
        eps[0].observe_at(t0, Duration::from_secs(2), Outcome::Failed);
        let after_timeout = eps[0].standing(t0, BalancerKind::PeakEwma).rtt.unwrap();
        assert_eq!(after_timeout, Duration::from_secs(2).as_nanos() as f64);
        // A fresh endpoint stays without an estimate: it has served nothing.
        let fresh = endpoints(1);
        fresh[0].observe_at(t0, Duration::from_micros(100), Outcome::Failed);
        assert_eq!(fresh[0].standing(t0, BalancerKind::PeakEwma).rtt, None);
    }

    #[test]
    fn shedding_is_neither_a_sample_nor_a_failure() {
        let eps = endpoints(1);
        let t0 = Instant::now();
        eps[0].observe_at(t0, Duration::from_millis(20), Outcome::Served);
        eps[0].observe_at(t0, Duration::from_micros(50), Outcome::Shed);
        assert_eq!(
            eps[0].standing(t0, BalancerKind::PeakEwma).rtt.unwrap(),
            Duration::from_millis(20).as_nanos() as f64
        );
        assert_eq!(eps[0].consecutive_failures(), 0);
        assert!(!eps[0].is_backing_off(t0));
    }

    #[test]
    fn failure_backoff_doubles_up_to_its_bound() {
        let ms = Duration::from_millis;
        let lengths: Vec<Duration> = (1..=9).map(failure_backoff).collect();
        assert_eq!(
            lengths,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(6400),
                MAX_FAILURE_BACKOFF,
                MAX_FAILURE_BACKOFF
            ]
        );
        assert_eq!(failure_backoff(u32::MAX), MAX_FAILURE_BACKOFF);
        assert_eq!(failure_backoff(0), FAILURE_BACKOFF);
    }

    #[test]
    fn consecutive_failures_back_off_longer_and_a_success_ends_it() {
        let eps = endpoints(1);
        let t0 = Instant::now();
        eps[0].observe_at(t0, Duration::ZERO, Outcome::Failed);
        assert!(eps[0].is_backing_off(t0 + Duration::from_millis(99)));
        assert!(!eps[0].is_backing_off(t0 + Duration::from_millis(101)));
        eps[0].observe_at(t0, Duration::ZERO, Outcome::Failed);
        assert!(eps[0].is_backing_off(t0 + Duration::from_millis(199)));
        assert_eq!(eps[0].consecutive_failures(), 2);
        eps[0].observe_at(t0, Duration::from_millis(1), Outcome::Served);
        assert_eq!(eps[0].consecutive_failures(), 0);
        assert!(!eps[0].is_backing_off(t0));
    }

    #[test]
    fn a_probe_claims_the_backoff_until_its_outcome() {
        let eps = endpoints(1);
        let t0 = Instant::now();
        eps[0].observe_at(t0, Duration::ZERO, Outcome::Failed);
        let t1 = t0 + Duration::from_millis(150);
        assert!(!eps[0].is_backing_off(t1), "the back-off is over");
        let probe = eps[0].start_at(t1);
        assert!(
            eps[0].is_backing_off(t1 + Duration::from_millis(50)),
            "no second attempt while the probe runs"
        );
        eps[0].observe_at(t1, Duration::ZERO, Outcome::Failed);
        drop(probe);
        assert!(eps[0].is_backing_off(t1 + Duration::from_millis(199)));
        assert!(!eps[0].is_backing_off(t1 + Duration::from_millis(201)));
        // A healthy endpoint's attempts claim nothing.
        let healthy = endpoints(1);
        let _attempt = healthy[0].start_at(t0);
        assert!(!healthy[0].is_backing_off(t0));
    }

    #[test]
    fn an_endpoint_in_failure_backoff_loses_to_any_other() {
        let eps = endpoints(2);
        let now = Instant::now();
        eps[0].observe_at(now, Duration::from_millis(1), Outcome::Served);
        eps[1].observe_at(now, Duration::from_millis(900), Outcome::Served);
        eps[0].observe_at(now, Duration::ZERO, Outcome::Failed);
        let _busy: Vec<_> = (0..50).map(|_| eps[1].start_at(now)).collect();
        for kind in [BalancerKind::LeastRequest, BalancerKind::PeakEwma] {
            let balancer = Balancer::new(kind);
            for _ in 0..50 {
                let picked = balancer.pick_at(&eps, now).unwrap();
                assert_eq!(picked.addr().port(), 9001, "{kind:?}");
            }
        }
    }

    #[test]
    fn between_two_endpoints_backing_off_the_one_back_first_wins() {
        let eps = endpoints(2);
        let now = Instant::now();
        for _ in 0..3 {
            eps[0].observe_at(now, Duration::ZERO, Outcome::Failed);
        }
        eps[1].observe_at(now, Duration::ZERO, Outcome::Failed);
        for kind in [BalancerKind::LeastRequest, BalancerKind::PeakEwma] {
            let balancer = Balancer::new(kind);
            for _ in 0..20 {
                assert_eq!(balancer.pick_at(&eps, now).unwrap().addr().port(), 9001);
            }
        }
    }

    #[test]
    fn among_many_endpoints_those_backing_off_are_drawn_around() {
        fastrand::seed(11);
        let eps = endpoints(4);
        let now = Instant::now();
        eps[0].observe_at(now, Duration::ZERO, Outcome::Failed);
        eps[1].observe_at(now, Duration::ZERO, Outcome::Failed);
        for kind in [BalancerKind::LeastRequest, BalancerKind::PeakEwma] {
            let balancer = Balancer::new(kind);
            let to_failing = (0..1000)
                .filter(|_| balancer.pick_at(&eps, now).unwrap().addr().port() < 9002)
                .count();
            // Both draws of all four tries land on the two: (1/6)^4.
            assert!(to_failing <= 5, "{kind:?}: {to_failing} of 1000");
        }
    }

    #[test]
    fn an_endpoint_without_samples_competes_by_requests_in_flight() {
        fastrand::seed(5);
        let eps = endpoints(2);
        let now = Instant::now();
        eps[0].observe_at(now, Duration::from_millis(40), Outcome::Served);
        let balancer = Balancer::new(BalancerKind::PeakEwma);
        let to_fresh = (0..1000)
            .filter(|_| balancer.pick_at(&eps, now).unwrap().addr().port() == 9001)
            .count();
        assert!((400..=600).contains(&to_fresh), "{to_fresh} of 1000");
        // One request in flight there doubles its load: a fifth of the picks.
        let _busy = eps[1].start_at(now);
        let to_fresh = (0..1000)
            .filter(|_| balancer.pick_at(&eps, now).unwrap().addr().port() == 9001)
            .count();
        assert!((140..=260).contains(&to_fresh), "{to_fresh} of 1000");
    }

    fn standing(in_flight: usize, rtt_ms: Option<u64>, backoff_ms: u64) -> Standing {
        Standing {
            in_flight,
            rtt: rtt_ms.map(|ms| Duration::from_millis(ms).as_nanos() as f64),
            penalty: 1.0,
            backoff_left: Duration::from_millis(backoff_ms).as_nanos() as u64,
        }
    }

    #[test]
    fn p2c_decides_backoff_first_then_load() {
        use BalancerKind::{LeastRequest, PeakEwma};
        let fine = standing(9, Some(900), 0);
        let off = standing(0, Some(1), 50);
        let off_longer = standing(0, Some(1), 80);
        for kind in [LeastRequest, PeakEwma] {
            for draw in [0.0, 0.5, 0.999] {
                assert_eq!(p2c(kind, (0, fine), (1, off), draw), 0, "{kind:?}");
                assert_eq!(p2c(kind, (0, off), (1, fine), draw), 1, "{kind:?}");
                assert_eq!(p2c(kind, (0, off_longer), (1, off), draw), 1, "{kind:?}");
            }
        }
        // Least-request: the fewer in flight, the first on a tie.
        let (idle, busy) = (standing(0, None, 0), standing(3, None, 0));
        assert_eq!(p2c(LeastRequest, (0, busy), (1, idle), 0.0), 1);
        assert_eq!(p2c(LeastRequest, (0, idle), (1, idle), 0.9), 0);
        // Peak-EWMA: twice the load keeps a fifth of the choices.
        let (fast, slow) = (standing(0, Some(10), 0), standing(0, Some(20), 0));
        assert_eq!(p2c(PeakEwma, (0, slow), (1, fast), 0.19), 0);
        assert_eq!(p2c(PeakEwma, (0, slow), (1, fast), 0.21), 1);
        assert_eq!(p2c(PeakEwma, (0, fast), (1, slow), 0.79), 0);
        assert_eq!(p2c(PeakEwma, (0, fast), (1, slow), 0.81), 1);
        // A penalty decides as a load: sixteen times loses every time.
        let shedding = Standing {
            penalty: PENALTY_FACTOR,
            ..fast
        };
        assert_eq!(p2c(PeakEwma, (0, shedding), (1, fast), 0.0), 1);
        assert_eq!(p2c(PeakEwma, (0, fast), (1, shedding), 0.999), 0);
        // Equal loads: the first (the draw of the two is random already).
        assert_eq!(p2c(PeakEwma, (0, fast), (1, fast), 0.99), 0);
        // Not yet sampled: the rival's estimate, so in flight decides.
        let fresh_busy = standing(1, None, 0);
        assert_eq!(p2c(PeakEwma, (0, fresh_busy), (1, fast), 0.19), 0);
        assert_eq!(p2c(PeakEwma, (0, fresh_busy), (1, fast), 0.21), 1);
        let fresh = standing(0, None, 0);
        assert_eq!(p2c(PeakEwma, (0, fresh), (1, fresh), 0.99), 0);
    }

    /// How one endpoint of a simulation answers an attempt sent at a time
    /// (since the start): its time to first byte and its outcome.
    type Server = Box<dyn FnMut(Duration) -> (Duration, Outcome)>;

    /// Sends `per_second` attempts a second for `length` through a balancer
    /// of `kind` to endpoints answering as `servers` say, on a simulated
    /// clock (an attempt is in flight until its answer), and returns the
    /// attempts each endpoint got in each second.
    fn simulate(
        kind: BalancerKind,
        mut servers: Vec<Server>,
        per_second: u32,
        length: Duration,
    ) -> Vec<Vec<usize>> {
        let eps = endpoints(servers.len() as u16);
        let balancer = Balancer::new(kind);
        let t0 = Instant::now();
        let gap = Duration::from_secs(1) / per_second;
        let mut pending: Vec<(Instant, InFlight, Duration, Outcome)> = Vec::new();
        let mut seconds = vec![vec![0; servers.len()]; length.as_secs() as usize];
        let mut elapsed = Duration::ZERO;
        while elapsed < length {
            let now = t0 + elapsed;
            pending.sort_by_key(|(done, ..)| std::cmp::Reverse(*done));
            while pending.last().is_some_and(|(done, ..)| *done <= now) {
                let (done, guard, rtt, outcome) = pending.pop().unwrap();
                guard.endpoint().observe_at(done, rtt, outcome);
            }
            let picked = balancer.pick_at(&eps, now).unwrap();
            let index = (picked.addr().port() - 9000) as usize;
            seconds[elapsed.as_secs() as usize][index] += 1;
            let (rtt, outcome) = servers[index](elapsed);
            pending.push((now + rtt, picked.start_at(now), rtt, outcome));
            elapsed += gap;
        }
        seconds
    }

    fn totals(seconds: &[Vec<usize>]) -> Vec<usize> {
        (0..seconds[0].len())
            .map(|i| seconds.iter().map(|s| s[i]).sum())
            .collect()
    }

    /// An endpoint answering in `typical` (±20%), with one answer in 50 a
    /// stall of 10 to 60 times that, as on a busy machine.
    fn noisy(typical: Duration) -> Server {
        Box::new(move |_| {
            let jitter = 0.8 + 0.4 * fastrand::f64();
            let stall = if fastrand::u32(..50) == 0 {
                10.0 + 50.0 * fastrand::f64()
            } else {
                1.0
            };
            (typical.mul_f64(jitter * stall), Outcome::Served)
        })
    }

    fn failing(rtt: Duration) -> Server {
        Box::new(move |_| (rtt, Outcome::Failed))
    }

    #[test]
    fn equal_replicas_split_evenly_under_peak_ewma() {
        for (seed, per_second) in [(1, 100), (2, 100), (3, 400), (4, 20)] {
            fastrand::seed(seed);
            let servers = vec![
                noisy(Duration::from_micros(500)),
                noisy(Duration::from_micros(500)),
            ];
            let seconds = simulate(
                BalancerKind::PeakEwma,
                servers,
                per_second,
                Duration::from_secs(60),
            );
            let total = totals(&seconds);
            let share = total[0] as f64 / (total[0] + total[1]) as f64;
            assert!(
                (0.4..=0.6).contains(&share),
                "seed {seed}, {per_second}/s: split {total:?}"
            );
            // No long starvation: every 10 s has both within 25/75.
            for (i, window) in seconds.chunks(10).enumerate() {
                let window = totals(window);
                let share = window[0] as f64 / (window[0] + window[1]) as f64;
                assert!(
                    (0.25..=0.75).contains(&share),
                    "seed {seed}, {per_second}/s: seconds {}..{} split {window:?}",
                    i * 10,
                    i * 10 + 10
                );
            }
        }
    }

    #[test]
    fn peak_ewma_still_avoids_a_replica_ten_times_slower() {
        fastrand::seed(9);
        let servers = vec![
            noisy(Duration::from_millis(10)),
            noisy(Duration::from_millis(100)),
        ];
        let total = totals(&simulate(
            BalancerKind::PeakEwma,
            servers,
            100,
            Duration::from_secs(30),
        ));
        assert!(total[1] * 5 < total[0], "{total:?}");
    }

    #[test]
    fn a_fast_failing_endpoint_gets_a_small_share() {
        for kind in [BalancerKind::PeakEwma, BalancerKind::LeastRequest] {
            fastrand::seed(3);
            let servers = vec![
                noisy(Duration::from_millis(5)),
                failing(Duration::from_micros(200)),
            ];
            let total = totals(&simulate(kind, servers, 100, Duration::from_secs(30)));
            assert!(total[1] * 100 < total[0], "{kind:?}: {total:?}");
        }
    }

    #[test]
    fn a_dead_endpoint_draws_one_probe_per_backoff_period() {
        for kind in [BalancerKind::PeakEwma, BalancerKind::LeastRequest] {
            fastrand::seed(4);
            let servers = vec![
                noisy(Duration::from_millis(1)),
                failing(Duration::from_micros(100)),
            ];
            let seconds = simulate(kind, servers, 100, Duration::from_secs(60));
            let probes = totals(&seconds)[1];
            // Back-offs of 0.1, 0.2, 0.4 ... 6.4 s, then 10 s: 12 periods
            // in the minute, and the first attempt.
            assert!((8..=14).contains(&probes), "{kind:?}: {probes} probes");
            assert!(
                seconds[50..].iter().map(|s| s[1]).sum::<usize>() >= 1,
                "{kind:?}: probing goes on"
            );
        }
    }

    #[test]
    fn a_recovered_endpoint_gets_its_share_back_within_the_longest_backoff() {
        for kind in [BalancerKind::PeakEwma, BalancerKind::LeastRequest] {
            fastrand::seed(6);
            let down_for = Duration::from_secs(30);
            let mut revived = noisy(Duration::from_millis(1));
            let flaky: Server = Box::new(move |at| {
                if at < down_for {
                    (Duration::from_micros(100), Outcome::Failed)
                } else {
                    revived(at)
                }
            });
            let servers = vec![noisy(Duration::from_millis(1)), flaky];
            let seconds = simulate(kind, servers, 100, Duration::from_secs(60));
            let back = 30 + MAX_FAILURE_BACKOFF.as_secs() as usize;
            let after = totals(&seconds[back..]);
            let share = after[1] as f64 / (after[0] + after[1]) as f64;
            assert!((0.3..=0.7).contains(&share), "{kind:?}: {after:?}");
        }
    }

    #[test]
    fn two_distinct_never_repeats() {
        for n in 2..6 {
            for _ in 0..200 {
                let (a, b) = two_distinct(n);
                assert_ne!(a, b);
                assert!(a < n && b < n);
            }
        }
    }

    #[test]
    fn weighted_index_follows_cumulative_weights() {
        let cumulative = [90, 100];
        assert_eq!(weighted_index(&cumulative, 0), 0);
        assert_eq!(weighted_index(&cumulative, 89), 0);
        assert_eq!(weighted_index(&cumulative, 90), 1);
        assert_eq!(weighted_index(&cumulative, 99), 1);
        let with_zero = [0, 5, 5, 10];
        assert_eq!(weighted_index(&with_zero, 0), 1);
        assert_eq!(weighted_index(&with_zero, 5), 3);
    }
}
