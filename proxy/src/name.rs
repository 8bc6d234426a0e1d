//! Names shared by the metrics, the access log and the traces.

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// A shared name used as a label value without copying it per request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Name(pub Arc<str>);

impl Name {
    /// Wraps a name.
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}
