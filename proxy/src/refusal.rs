//! Refusals: connections and requests the proxy turns away before routing
//! (malformed HTTP, oversized heads, slow heads, HTTP/2 floods, failed mTLS
//! handshakes, plaintext on a strict port). Each is counted by reason in
//! `infermesh_refusals_total` and logged through one rate limiter, so a
//! client that sends a flood of bad connections gets counted in full but
//! cannot flood the log.
//!
//! The reasons are a small closed set, so the metric's cardinality is
//! bounded whatever a client sends. Deciding the reason is kept apart from
//! the I/O: [`http_reason`] reads a `hyper::Error`, and
//! `identity::handshake_refusal` reads a failed TLS handshake.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// Why a connection or a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// HTTP/1.x that does not parse: bad request line, header syntax,
    /// version (hyper answers 400 and closes).
    MalformedHttp,
    /// A request head over the size budget (hyper answers 431 on
    /// HTTP/1.1; the proxy answers 431 with a JSON body on both protocols
    /// between the budget and the hard limit).
    HeaderTooLarge,
    /// More header fields than the proxy accepts (431).
    TooManyHeaders,
    /// An HTTP/1.1 request head not complete within the header read timeout
    /// (a slowloris client).
    HeaderTimeout,
    /// An HTTP/2 connection closed for a protocol error (PROTOCOL_ERROR,
    /// COMPRESSION_ERROR, FRAME_SIZE_ERROR and the like).
    H2Protocol,
    /// An HTTP/2 connection closed with ENHANCE_YOUR_CALM: rapid reset,
    /// CONTINUATION flood, a header block far over the limit, too many
    /// locally reset streams, control-frame floods.
    H2Flood,
    /// A plaintext connection on an inbound listener whose mTLS is strict.
    PlaintextRefused,
    /// A connection that is not HTTP, with no opaque backend to forward it to.
    NotHttp,
    /// mTLS: the client presented no certificate.
    TlsNoCertificate,
    /// mTLS: the certificate does not chain to the mesh's roots.
    TlsUnknownIssuer,
    /// mTLS: the certificate has expired or is not valid yet.
    TlsExpired,
    /// mTLS: the client does not speak TLS 1.3.
    TlsVersion,
    /// mTLS: the certificate is valid but carries no SPIFFE ID of this
    /// mesh's trust domain.
    TlsIdentity,
    /// mTLS: the handshake did not finish within its time limit.
    TlsTimeout,
    /// mTLS: any other handshake failure (bad signature, revoked, broken
    /// record, a client that hung up).
    TlsOther,
    /// An intercepted connection whose original destination is this
    /// proxy's own listener: passing it through would loop.
    Loop,
}

impl Reason {
    /// Every reason, in the order of [`Reason::index`].
    pub const ALL: [Reason; 16] = [
        Reason::MalformedHttp,
        Reason::HeaderTooLarge,
        Reason::TooManyHeaders,
        Reason::HeaderTimeout,
        Reason::H2Protocol,
        Reason::H2Flood,
        Reason::PlaintextRefused,
        Reason::NotHttp,
        Reason::TlsNoCertificate,
        Reason::TlsUnknownIssuer,
        Reason::TlsExpired,
        Reason::TlsVersion,
        Reason::TlsIdentity,
        Reason::TlsTimeout,
        Reason::TlsOther,
        Reason::Loop,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedHttp => "malformed_http",
            Reason::HeaderTooLarge => "header_too_large",
            Reason::TooManyHeaders => "too_many_headers",
            Reason::HeaderTimeout => "header_timeout",
            Reason::H2Protocol => "h2_protocol",
            Reason::H2Flood => "h2_flood",
            Reason::PlaintextRefused => "plaintext_refused",
            Reason::NotHttp => "not_http",
            Reason::TlsNoCertificate => "tls_no_certificate",
            Reason::TlsUnknownIssuer => "tls_unknown_issuer",
            Reason::TlsExpired => "tls_expired",
            Reason::TlsVersion => "tls_version",
            Reason::TlsIdentity => "tls_identity",
            Reason::TlsTimeout => "tls_timeout",
            Reason::TlsOther => "tls_other",
            Reason::Loop => "loop",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(self.as_str())
    }
}

/// The refusal reason of an HTTP connection that ended with `error`, or
/// `None` when the error is no refusal (the client went away, the server
/// shut down, the client itself reported an error).
///
/// `head_started` says whether bytes of a request head had arrived since
/// the last response was written: a header timeout without them is an
/// idle keep-alive connection being closed, not a slow client.
pub fn http_reason(error: &hyper::Error, head_started: bool) -> Option<Reason> {
    if error.is_timeout() {
        return head_started.then_some(Reason::HeaderTimeout);
    }
    if error.is_parse_too_large() {
        return Some(Reason::HeaderTooLarge);
    }
    if error.is_parse() {
        return Some(Reason::MalformedHttp);
    }
    let h2 = std::error::Error::source(error).and_then(|e| e.downcast_ref::<h2::Error>())?;
    h2_reason(h2.is_library(), h2.is_go_away(), h2.reason())
}

/// The refusal reason of an HTTP/2 connection error: only a GOAWAY the
/// proxy's own HTTP/2 library sent is one.
fn h2_reason(library: bool, go_away: bool, reason: Option<h2::Reason>) -> Option<Reason> {
    if !library || !go_away {
        return None;
    }
    match reason? {
        h2::Reason::NO_ERROR => None,
        h2::Reason::ENHANCE_YOUR_CALM => Some(Reason::H2Flood),
        _ => Some(Reason::H2Protocol),
    }
}

/// Lines per reason and window.
const BURST: u32 = 5;
/// The window of the log's rate limit.
const WINDOW: Duration = Duration::from_secs(10);

/// At most [`BURST`] log lines per reason in each [`WINDOW`]; the refusals
/// beyond are counted, and the next line that gets through says how many
/// were left out. Lock-free: one atomic word per reason holds the window
/// and the lines written in it.
#[derive(Debug)]
pub struct LogLimiter {
    /// Per reason: window number in the high 32 bits, lines in the low 32.
    windows: [AtomicU64; Reason::ALL.len()],
    /// Per reason: lines left out since the last line written.
    suppressed: [AtomicU64; Reason::ALL.len()],
    burst: u32,
    window_ms: u64,
}

impl LogLimiter {
    /// A limiter of `burst` lines per reason per `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            windows: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            suppressed: std::array::from_fn(|_| AtomicU64::new(0)),
            burst,
            window_ms: (window.as_millis() as u64).max(1),
        }
    }

    /// Whether a line for `reason` may be written at `now_ms` (milliseconds
    /// on any monotonic clock); when it may, how many lines were left out
    /// before it.
    pub fn admit(&self, reason: Reason, now_ms: u64) -> Option<u64> {
        let slot = &self.windows[reason.index()];
        let window = (now_ms / self.window_ms) & u64::from(u32::MAX);
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let lines = if current >> 32 == window {
                current & u64::from(u32::MAX)
            } else {
                0
            };
            if lines >= u64::from(self.burst) {
                self.suppressed[reason.index()].fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let next = (window << 32) | (lines + 1);
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(self.suppressed[reason.index()].swap(0, Ordering::Relaxed)),
                Err(seen) => current = seen,
            }
        }
    }
}

fn limiter() -> &'static (LogLimiter, Instant) {
    static LIMITER: OnceLock<(LogLimiter, Instant)> = OnceLock::new();
    LIMITER.get_or_init(|| (LogLimiter::new(BURST, WINDOW), Instant::now()))
}

/// Logs a refusal at WARN through the process's rate limiter: at most
/// [`BURST`] lines per reason every [`WINDOW`], each with the number of
/// refusals of that reason left out of the log before it. `detail` is the
/// message, and says what was refused and why.
pub fn log(
    listener: &'static str,
    reason: Reason,
    peer: std::net::SocketAddr,
    detail: &dyn std::fmt::Display,
) {
    let (limiter, start) = limiter();
    let now_ms = start.elapsed().as_millis() as u64;
    if let Some(suppressed) = limiter.admit(reason, now_ms) {
        tracing::warn!(
            listener,
            reason = reason.as_str(),
            %peer,
            suppressed,
            "{detail}"
        );
    } else {
        tracing::debug!(listener, reason = reason.as_str(), %peer, "{detail}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_follow_the_order_of_all() {
        let mut seen = std::collections::HashSet::new();
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
            assert!(seen.insert(reason.as_str()), "{reason:?}");
        }
    }

    #[test]
    fn a_flood_is_logged_a_burst_per_window_with_the_count_left_out() {
        let limiter = LogLimiter::new(3, Duration::from_secs(10));
        let admitted: Vec<_> = (0..200)
            .map(|i| limiter.admit(Reason::H2Flood, i))
            .collect();
        assert_eq!(admitted.iter().filter(|a| a.is_some()).count(), 3);
        assert_eq!(admitted[0], Some(0));
        // The next window's first line says how many were left out.
        assert_eq!(limiter.admit(Reason::H2Flood, 10_000), Some(197));
        assert_eq!(limiter.admit(Reason::H2Flood, 10_001), Some(0));
    }

    #[test]
    fn each_reason_has_its_own_budget() {
        let limiter = LogLimiter::new(1, Duration::from_secs(10));
        assert_eq!(limiter.admit(Reason::H2Flood, 0), Some(0));
        assert_eq!(limiter.admit(Reason::H2Flood, 1), None);
        assert_eq!(limiter.admit(Reason::TlsExpired, 2), Some(0));
        assert_eq!(limiter.admit(Reason::MalformedHttp, 3), Some(0));
    }

    #[test]
    fn only_goaways_the_proxy_sent_are_refusals() {
        let calm = Some(h2::Reason::ENHANCE_YOUR_CALM);
        assert_eq!(h2_reason(true, true, calm), Some(Reason::H2Flood));
        assert_eq!(
            h2_reason(true, true, Some(h2::Reason::PROTOCOL_ERROR)),
            Some(Reason::H2Protocol)
        );
        assert_eq!(
            h2_reason(true, true, Some(h2::Reason::FRAME_SIZE_ERROR)),
            Some(Reason::H2Protocol)
        );
        assert_eq!(h2_reason(true, true, Some(h2::Reason::NO_ERROR)), None);
        // The client's own GOAWAY, or a reset of one stream, is not.
        assert_eq!(h2_reason(false, true, calm), None);
        assert_eq!(h2_reason(true, false, calm), None);
    }
}
