//! Error text for logs and error bodies, shared by every module that reports
//! a failure with its causes (a leaf: it imports nothing of the proxy).

use std::error::Error;

/// An error and its causes, `outer: inner: innermost`, each cause once.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    append_causes(&mut text, error.source());
    text
}

/// The causes of `error` without `error` itself, for a wrapper whose own
/// message says nothing to the user (hyper's "client error (Connect)");
/// `error` itself when it has no cause.
pub fn causes(error: &(dyn Error + 'static)) -> String {
    let Some(first) = error.source() else {
        return error.to_string();
    };
    let mut text = first.to_string();
    append_causes(&mut text, first.source());
    text
}

fn append_causes(text: &mut String, mut next: Option<&(dyn Error + 'static)>) {
    while let Some(cause) = next {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        next = cause.source();
    }
}

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
