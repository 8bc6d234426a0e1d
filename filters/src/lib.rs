//! Request filters of the infermesh proxy, each a [`tower::Layer`].
//!
//! Filters know nothing of listeners or sockets: they take an
//! `http::Request` and give back an `http::Response<BoxBody>` or a typed
//! [`ProxyError`], which the proxy turns into the client's error response at
//! the edge of the stack.

pub mod backoff;
pub mod body;
pub mod error;
pub mod fault;
pub mod grpc;
pub mod hedge;
pub mod mirror;
pub mod rate_limit;
pub mod replay;
pub mod retry;
pub mod timeout;
pub mod trace;

pub use body::{BoxBody, BoxError};
pub use error::{Fault, ProxyError};

/// A request target's path without its query or fragment: what routes,
/// classifiers and error shapes look at. One pass over the bytes, as every
/// request pays for it.
pub fn path_only(path: &str) -> &str {
    match memchr::memchr2(b'?', b'#', path.as_bytes()) {
        // `?` and `#` are ASCII: the index is a character boundary.
        Some(end) => &path[..end],
        None => path,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_path_ends_at_a_query_or_fragment() {
        assert_eq!(super::path_only("/v1/models"), "/v1/models");
        assert_eq!(super::path_only("/v1/models?x=1#f"), "/v1/models");
        assert_eq!(super::path_only("/v2#f?x"), "/v2");
        assert_eq!(super::path_only("/é/ü?q"), "/é/ü");
        assert_eq!(super::path_only(""), "");
    }
}
