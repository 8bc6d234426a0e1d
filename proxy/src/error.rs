//! Error text for logs and error bodies, shared by every module that reports
//! a failure with its causes (a leaf: it imports nothing of the proxy).

// The chain is written where `ProxyError` renders its upstream causes; the
// proxy's modules read it from here.
pub use infermesh_filters::error::{causes, error_chain};

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layers(texts: &[&'static str]) -> Layer {
        texts
            .iter()
            .rev()
            .fold(None, |source, text| {
                Some(Layer {
                    text,
                    source: source.map(Box::new),
                })
            })
            .unwrap()
    }

    #[test]
    fn chains_name_each_cause_once() {
        let error = layers(&[
            "client error (Connect)",
            "tcp connect error",
            "connection refused",
        ]);
        assert_eq!(
            error_chain(&error),
            "client error (Connect): tcp connect error: connection refused"
        );
        assert_eq!(causes(&error), "tcp connect error: connection refused");
        // A cause already quoted by its wrapper is not repeated.
        let error = layers(&["read failed: reset", "reset"]);
        assert_eq!(error_chain(&error), "read failed: reset");
        assert_eq!(causes(&layers(&["alone"])), "alone");
    }
}
