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
