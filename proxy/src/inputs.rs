//! What every connection task shares: the policy in force and the metrics.
//!
//! A leaf of the request path, so that the listeners, the admin server and
//! the control-plane client can all hold it without importing each other.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::passthrough::Passthrough;
use crate::snapshot::Snapshot;

/// What every connection task shares.
#[derive(Debug)]
pub struct Inputs {
    /// The policy in force.
    pub snapshot: ArcSwap<Snapshot>,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// This proxy's mesh identity, when it was started with one: the inbound
    /// listener terminates mutual TLS with it, meshed backends present it.
    pub identity: Option<Arc<Identity>>,
    /// The pools of intercepted requests that no route claims.
    pub passthrough: Passthrough,
}
