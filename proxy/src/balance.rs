//! Endpoint selection: round robin, least outstanding requests by power of
//! two choices, and peak-EWMA power of two choices.
//!
//! An endpoint that answered 429 (or sent `Retry-After`) is penalised for a
//! while: both power-of-two pickers see its load multiplied by
//! [`PENALTY_FACTOR`], so traffic shifts to the others unless they are far
//! busier. Ejected endpoints (see `outlier`) are not offered to the picker
//! at all; the backend filters them out.
//!
//! Every endpoint keeps its own statistics in atomics (and a small per-endpoint
//! lock for the EWMA), so picking never takes a lock shared by all requests.
//! Power of two choices samples two endpoints at random and takes the less
//! loaded: nearly as good as scanning them all, and no endpoint is stampeded
//! when every proxy sees the same minimum.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use infermesh_proto::policy::BalancerKind;
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;

use crate::outlier::Health;

/// How quickly the peak-EWMA estimate forgets a slow response.
const DECAY: Duration = Duration::from_secs(10);
/// Estimate for an endpoint that has not answered yet: optimistic enough that
/// new endpoints get traffic, pessimistic enough not to be flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
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
    /// Mirrors `health.is_ejected()`, so that picking reads an atomic.
    ejected: AtomicBool,
    health: Mutex<Health>,
    /// The backend's ejected-endpoints gauge while this endpoint counts in
    /// it, so that an endpoint dropped while ejected leaves the gauge.
    ejected_gauge: Mutex<Option<Gauge>>,
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
            ejected: AtomicBool::new(false),
            health: Mutex::new(Health::new(now)),
            ejected_gauge: Mutex::new(None),
        }
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
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records the time a response took to start.
    pub fn observe_first_byte(&self, rtt: Duration) {
        self.ewma.lock().observe(Instant::now(), rtt);
    }

    /// Peak-EWMA load: the decayed latency estimate times the requests in
    /// flight (plus one, so idle endpoints still compare by latency),
    /// heavier while penalised.
    pub fn peak_ewma_load(&self, now: Instant) -> f64 {
        let rtt = self.ewma.lock().estimate(now);
        rtt * (self.in_flight() + 1) as f64 * self.penalty_weight(now)
    }

    /// Least-request load: the requests in flight (plus one, so that the
    /// penalty weighs on idle endpoints too), heavier while penalised.
    pub fn least_request_load(&self, now: Instant) -> f64 {
        (self.in_flight() + 1) as f64 * self.penalty_weight(now)
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

/// Peak-sensitive exponentially weighted moving average of latency: a sample
/// above the estimate replaces it at once, samples below pull it down slowly,
/// and without samples it decays towards zero so that a once-slow endpoint is
/// tried again.
#[derive(Debug, Clone, Copy)]
struct PeakEwma {
    /// Estimate in nanoseconds.
    value: f64,
    stamp: Instant,
}

impl PeakEwma {
    fn new(now: Instant) -> Self {
        Self {
            value: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
        }
    }

    fn decayed(&self, now: Instant, toward: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        let weight = (-elapsed / DECAY.as_secs_f64()).exp();
        self.value * weight + toward * (1.0 - weight)
    }

    fn observe(&mut self, now: Instant, rtt: Duration) {
        let rtt = rtt.as_nanos() as f64;
        self.value = if rtt > self.value {
            rtt
        } else {
            self.decayed(now, rtt)
        };
        self.stamp = now;
    }

    fn estimate(&self, now: Instant) -> f64 {
        self.decayed(now, 0.0)
    }
}

/// Picks endpoints for one backend.
#[derive(Debug)]
pub struct Balancer {
    kind: BalancerKind,
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer of the given kind.
    pub fn new(kind: BalancerKind) -> Self {
        Self {
            kind,
            next: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    /// The strategy.
    pub fn kind(&self) -> BalancerKind {
        self.kind
    }

    /// Chooses one of `endpoints`, or none when the set is empty.
    pub fn pick(&self, endpoints: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        let index = match (self.kind, endpoints.len()) {
            (_, 0) => return None,
            (_, 1) => 0,
            (BalancerKind::RoundRobin, n) => self.next.fetch_add(1, Ordering::Relaxed) % n,
            (BalancerKind::LeastRequest, n) => {
                let (a, b) = two_distinct(n);
                let now = Instant::now();
                p2c(
                    (a, endpoints[a].least_request_load(now)),
                    (b, endpoints[b].least_request_load(now)),
                )
            }
            (BalancerKind::PeakEwma, n) => {
                let (a, b) = two_distinct(n);
                let now = Instant::now();
                p2c(
                    (a, endpoints[a].peak_ewma_load(now)),
                    (b, endpoints[b].peak_ewma_load(now)),
                )
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

/// The index with the lower load; ties go to the first.
fn p2c((a, load_a): (usize, f64), (b, load_b): (usize, f64)) -> usize {
    if load_b < load_a {
        b
    } else {
        a
    }
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
        let eps = endpoints(2);
        eps[0].observe_first_byte(Duration::from_millis(200));
        eps[1].observe_first_byte(Duration::from_millis(20));
        let balancer = Balancer::new(BalancerKind::PeakEwma);
        for _ in 0..50 {
            assert_eq!(balancer.pick(&eps).unwrap().addr().port(), 9001);
        }
    }

    #[test]
    fn a_penalised_endpoint_loses_to_an_idle_one_until_its_penalty_ends() {
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
    fn peak_ewma_jumps_to_a_peak_and_decays_slowly() {
        let t0 = Instant::now();
        let mut ewma = PeakEwma::new(t0);
        ewma.observe(t0, Duration::from_millis(500));
        assert_eq!(
            ewma.estimate(t0),
            Duration::from_millis(500).as_nanos() as f64
        );
        ewma.observe(t0 + Duration::from_millis(100), Duration::from_millis(10));
        let after_one_fast = ewma.estimate(t0 + Duration::from_millis(100));
        assert!(after_one_fast > Duration::from_millis(400).as_nanos() as f64);
        // Without samples the estimate fades, so the endpoint is tried again.
        let later = ewma.estimate(t0 + Duration::from_secs(60));
        assert!(later < Duration::from_millis(5).as_nanos() as f64);
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
