//! What makes a request or response gRPC: its content type. One definition
//! for the filters (timeouts, error shapes) and the proxy (classification,
//! listener refusals), so that they never disagree about a request.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `grpc-status`, made once: a lookup by a string parses the name each time.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether a `content-type` is gRPC: `application/grpc`, alone or followed
/// by `+codec` or parameters, in any case. gRPC-Web (`application/grpc-web*`)
/// is not gRPC here: its text variant is base64 and its trailers travel in
/// the body, so the proxy forwards it as plain HTTP.
pub fn is_grpc_content_type(value: &HeaderValue) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    let bytes = value.as_bytes();
    bytes.len() >= GRPC.len()
        && bytes[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(bytes.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// Whether a request or response is gRPC, by its content type.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(is_grpc_content_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_and_only_they_are_grpc() {
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+json",
            "APPLICATION/GRPC",
            "application/grpc;charset=utf-8",
        ] {
            assert!(
                is_grpc_content_type(&HeaderValue::from_static(yes)),
                "{yes}"
            );
        }
        for no in [
            "application/grpc-web",
            "application/grpc-web-text+proto",
            "application/grpcx",
            "application/json",
            "",
        ] {
            assert!(!is_grpc_content_type(&HeaderValue::from_static(no)), "{no}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
