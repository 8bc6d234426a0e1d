//! The trace of a request as it passes through the filters: the proxy puts
//! it in the request's extensions when the request is sampled, each
//! upstream attempt becomes a child span of it, and the copies the filters
//! make of a request (a mirror copy is a new request) carry it along.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use opentelemetry::trace::SpanContext;

/// A sampled request's server span, as the parent of its upstream attempts.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    /// The server span's context.
    pub parent: SpanContext,
    /// Attempts sent upstream so far (mirror copies excluded).
    attempts: Arc<AtomicU32>,
}

impl RequestTrace {
    /// The trace of a request whose server span is `parent`.
    pub fn new(parent: SpanContext) -> Self {
        Self {
            parent,
            attempts: Arc::default(),
        }
    }

    /// Counts an attempt; returns its number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Attempts sent upstream so far.
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }
}
