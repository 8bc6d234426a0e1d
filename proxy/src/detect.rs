//! Protocol detection from the first bytes a client sends.

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest HTTP/1.x method token we wait for before calling it something else.
const MAX_METHOD_LEN: usize = 16;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x request line.
    Http1,
    /// HTTP/2 prior knowledge.
    Http2,
    /// A TLS handshake (a ClientHello record).
    Tls,
    /// Neither: forwarded as bytes, or refused.
    Opaque,
}

/// Decides the protocol from a connection's first bytes, or `None` when more
/// bytes are needed to tell.
pub fn detect(prefix: &[u8]) -> Option<Protocol> {
    if prefix.is_empty() {
        return None;
    }
    // A TLS record of type handshake (22), protocol version 3.x.
    if prefix[0] == 0x16 {
        return match prefix.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // An HTTP/1.x request starts with a method token (RFC 9110 tchar; in
    // practice upper-case letters) followed by a space.
    for (i, &b) in prefix.iter().enumerate().take(MAX_METHOD_LEN + 1) {
        if b == b' ' {
            return Some(if i > 0 {
                Protocol::Http1
            } else {
                Protocol::Opaque
            });
        }
        if !(b.is_ascii_uppercase() || b == b'-' || b == b'_') {
            return Some(Protocol::Opaque);
        }
    }
    if prefix.len() > MAX_METHOD_LEN {
        Some(Protocol::Opaque)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_request_lines_are_detected() {
        for line in [
            "GET / HTTP/1.1\r\n",
            "POST /v1/chat/completions HTTP/1.1",
            "OPTIONS * HTTP/1.1",
        ] {
            assert_eq!(detect(line.as_bytes()), Some(Protocol::Http1), "{line}");
        }
    }

    #[test]
    fn the_http2_preface_is_detected_only_when_complete() {
        assert_eq!(detect(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(detect(&H2_PREFACE[..10]), None);
        assert_eq!(detect(b"PRI * HTTP/1.1"), Some(Protocol::Http1));
    }

    #[test]
    fn other_bytes_are_opaque() {
        assert_eq!(detect(&[0x16, 0x03, 0x01]), Some(Protocol::Tls), "TLS");
        assert_eq!(detect(&[0x16]), None, "one byte of a TLS record");
        assert_eq!(detect(&[0x16, 0x09]), Some(Protocol::Opaque));
        assert_eq!(detect(b"\x00\x00\x00\x08"), Some(Protocol::Opaque));
        assert_eq!(detect(b"get / HTTP/1.1"), Some(Protocol::Opaque));
        assert_eq!(detect(b" GET"), Some(Protocol::Opaque));
        assert_eq!(detect(b"AAAAAAAAAAAAAAAAAAAAAAAA"), Some(Protocol::Opaque));
    }

    #[test]
    fn partial_method_tokens_wait_for_more() {
        assert_eq!(detect(b""), None);
        assert_eq!(detect(b"GE"), None);
        assert_eq!(detect(b"P"), None);
    }
}
