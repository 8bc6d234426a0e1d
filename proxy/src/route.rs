//! Route matching: which route of the snapshot a classified request takes.
//!
//! Matching is a pure function of a [`RouteInput`] and the compiled
//! conditions, so it is tested on its own; routes are tried in policy order
//! and the first whose conditions hold wins.

use std::net::SocketAddr;

use http::header::HeaderName;
use http::header::{self, HeaderValue};
use http::HeaderMap;
use infermesh_filters::ProxyError;
use infermesh_proto::policy::{DestinationPattern, RouteMatch, StringMatch};

/// What routing looks at, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// Host without port, lower case.
    pub host: Option<&'a str>,
    /// Request path without query.
    pub path: &'a str,
    /// gRPC service and method, for gRPC requests.
    pub grpc: Option<(&'a str, &'a str)>,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Model name, when classification found one.
    pub model: Option<&'a str>,
    /// The original destination of a connection the pod's redirect rules
    /// sent to the proxy; `None` for one that reached it directly.
    pub destination: Option<SocketAddr>,
}

/// A [`RouteMatch`] prepared for matching.
#[derive(Debug, Clone)]
pub struct Matcher {
    host: Option<HostMatch>,
    path: Option<StringMatch>,
    /// Only gRPC requests match (a `grpc` condition was given, even empty).
    grpc: bool,
    grpc_service: Option<String>,
    grpc_method: Option<String>,
    headers: Vec<(HeaderName, Option<String>)>,
    model: Option<StringMatch>,
    /// Original destinations, one of which must hold; `None` for no
    /// condition. Patterns were validated when the policy loaded; one that
    /// does not parse here is left out (and an entry left with none
    /// matches nothing).
    destination: Option<Vec<DestinationPattern>>,
}

#[derive(Debug, Clone)]
enum HostMatch {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
}

impl Matcher {
    /// Prepares a validated policy match. Header names were validated when
    /// the policy loaded; an invalid one here matches nothing.
    pub fn new(m: &RouteMatch) -> Self {
        let host = m.host.as_ref().map(|h| {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_string()),
                None => HostMatch::Exact(h),
            }
        });
        let headers = m
            .headers
            .iter()
            .map(|h| {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .unwrap_or_else(|_| HeaderName::from_static("x-infermesh-invalid-header-name"));
                (name, h.value.clone())
            })
            .collect();
        Self {
            host,
            path: m.path.clone(),
            grpc: m.grpc.is_some(),
            grpc_service: m.grpc.as_ref().and_then(|g| g.service.clone()),
            grpc_method: m.grpc.as_ref().and_then(|g| g.method.clone()),
            headers,
            model: m.model.clone(),
            destination: (!m.destination.is_empty()).then(|| {
                m.destination
                    .iter()
                    .filter_map(|d| d.parse().ok())
                    .collect()
            }),
        }
    }

    /// Whether the match has a host condition.
    pub fn has_host(&self) -> bool {
        self.host.is_some()
    }

    /// Whether every condition holds for `input`.
    pub fn matches(&self, input: &RouteInput<'_>) -> bool {
        if let Some(patterns) = &self.destination {
            let Some(destination) = input.destination else {
                return false;
            };
            if !patterns.iter().any(|p| p.matches(destination)) {
                return false;
            }
        }
        if let Some(host) = &self.host {
            let Some(actual) = input.host else {
                return false;
            };
            let ok = match host {
                HostMatch::Exact(h) => actual == h,
                HostMatch::Suffix(s) => actual.len() > s.len() && actual.ends_with(s.as_str()),
            };
            if !ok {
                return false;
            }
        }
        if let Some(path) = &self.path {
            if !string_matches(path, input.path) {
                return false;
            }
        }
        if self.grpc {
            let Some((service, method)) = input.grpc else {
                return false;
            };
            if self.grpc_service.as_deref().is_some_and(|s| s != service)
                || self.grpc_method.as_deref().is_some_and(|m| m != method)
            {
                return false;
            }
        }
        for (name, value) in &self.headers {
            let present = match value {
                None => input.headers.contains_key(name),
                Some(v) => input
                    .headers
                    .get_all(name)
                    .iter()
                    .any(|actual| actual.as_bytes() == v.as_bytes()),
            };
            if !present {
                return false;
            }
        }
        if let Some(model) = &self.model {
            let Some(actual) = input.model else {
                return false;
            };
            if !string_matches(model, actual) {
                return false;
            }
        }
        true
    }

    /// Whether this match selects `input` by its model name: it has a
    /// `model` condition and every condition holds.
    pub fn selects_model(&self, input: &RouteInput<'_>) -> bool {
        self.model.is_some() && self.matches(input)
    }
}

fn string_matches(m: &StringMatch, actual: &str) -> bool {
    match m {
        StringMatch::Exact(e) => actual == e,
        StringMatch::Prefix(p) => actual.starts_with(p.as_str()),
    }
}

/// The host a request is addressed to: the URI authority (HTTP/2) or the
/// `Host` header (HTTP/1.1), without port, lower-cased only when needed.
pub fn request_host<'a>(
    uri: &'a http::Uri,
    headers: &'a HeaderMap,
) -> Option<std::borrow::Cow<'a, str>> {
    let raw = uri.authority().map(|a| a.host()).or_else(|| {
        headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(strip_port)
    })?;
    if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(std::borrow::Cow::Owned(raw.to_ascii_lowercase()))
    } else {
        Some(std::borrow::Cow::Borrowed(raw))
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Makes the request's authority one value that routing and forwarding both
/// see (RFC 9112 section 3.2, RFC 9113 section 8.3.1): a request with two
/// `Host` headers, an HTTP/1.1 request without one, a `Host` that is no
/// authority, and an HTTP/2 `host` that differs from `:authority` are
/// refused; an absolute-form target's authority replaces the `Host` header.
pub fn normalize_authority(parts: &mut http::request::Parts) -> Result<(), ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest(
            "the request has more than one Host header".into(),
        ));
    }
    // Checked in place: the common request (one valid Host, an origin-form
    // target) costs no allocation.
    if let Some(value) = host {
        if !is_host(value.as_bytes()) {
            return Err(ProxyError::BadRequest(format!(
                "the Host header {value:?} is not a host"
            )));
        }
    }
    match (parts.uri.authority(), host) {
        (None, None) if parts.version == http::Version::HTTP_11 => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs a Host header".into(),
        )),
        (Some(target), Some(host))
            if !target
                .as_str()
                .as_bytes()
                .eq_ignore_ascii_case(host.as_bytes()) =>
        {
            if parts.version == http::Version::HTTP_2 {
                Err(ProxyError::BadRequest(format!(
                    "the host header {} differs from :authority {target}",
                    String::from_utf8_lossy(host.as_bytes())
                )))
            } else {
                // The target's authority wins, and is what goes upstream.
                let value = HeaderValue::from_str(target.as_str()).map_err(|_| {
                    ProxyError::BadRequest(format!("the request target {target} is not a host"))
                })?;
                parts.headers.insert(header::HOST, value);
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// Whether `bytes` is a `Host` value (RFC 9110 section 7.2: `uri-host
/// [":" port]`): non-empty, of the characters a host name, an IP literal
/// and a port are written with; no user info, path, query or space.
fn is_host(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'['
                        | b']'
                        | b'%'
                )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::policy::{GrpcMatch, HeaderMatch};

    fn input<'a>(headers: &'a HeaderMap) -> RouteInput<'a> {
        RouteInput {
            host: Some("api.example.com"),
            path: "/v1/chat/completions",
            grpc: None,
            headers,
            model: Some("llama-3-8b"),
            destination: None,
        }
    }

    #[test]
    fn an_empty_match_matches_everything() {
        let headers = HeaderMap::new();
        assert!(Matcher::new(&RouteMatch::default()).matches(&input(&headers)));
    }

    #[test]
    fn only_a_match_with_a_model_condition_selects_by_model() {
        let headers = HeaderMap::new();
        let by_model = RouteMatch {
            model: Some(StringMatch::Prefix("llama-".into())),
            ..Default::default()
        };
        assert!(Matcher::new(&by_model).selects_model(&input(&headers)));
        let by_path = RouteMatch {
            path: Some(StringMatch::Prefix("/v2".into())),
            ..Default::default()
        };
        let v2 = RouteInput {
            path: "/v2/models/llama-3-8b/ready",
            ..input(&headers)
        };
        assert!(Matcher::new(&by_path).matches(&v2));
        assert!(!Matcher::new(&by_path).selects_model(&v2));
        assert!(!Matcher::new(&RouteMatch::default()).selects_model(&v2));
        let other = RouteMatch {
            model: Some(StringMatch::Exact("mistral".into())),
            ..Default::default()
        };
        assert!(!Matcher::new(&other).selects_model(&v2));
    }

    #[test]
    fn model_matches_exactly_or_by_prefix() {
        let headers = HeaderMap::new();
        let exact = |m: &str| RouteMatch {
            model: Some(StringMatch::Exact(m.into())),
            ..Default::default()
        };
        assert!(Matcher::new(&exact("llama-3-8b")).matches(&input(&headers)));
        assert!(!Matcher::new(&exact("llama-3")).matches(&input(&headers)));
        let prefix = RouteMatch {
            model: Some(StringMatch::Prefix("llama-".into())),
            ..Default::default()
        };
        assert!(Matcher::new(&prefix).matches(&input(&headers)));
        let mut no_model = input(&headers);
        no_model.model = None;
        assert!(!Matcher::new(&prefix).matches(&no_model));
    }

    #[test]
    fn host_matches_exactly_or_by_wildcard() {
        let headers = HeaderMap::new();
        let host = |h: &str| RouteMatch {
            host: Some(h.into()),
            ..Default::default()
        };
        assert!(Matcher::new(&host("API.example.com")).matches(&input(&headers)));
        assert!(Matcher::new(&host("*.example.com")).matches(&input(&headers)));
        assert!(!Matcher::new(&host("*.other.com")).matches(&input(&headers)));
        assert!(!Matcher::new(&host("example.com")).matches(&input(&headers)));
    }

    #[test]
    fn path_matches_exactly_or_by_prefix() {
        let headers = HeaderMap::new();
        let path = |p: StringMatch| RouteMatch {
            path: Some(p),
            ..Default::default()
        };
        assert!(Matcher::new(&path(StringMatch::Prefix("/v1/".into()))).matches(&input(&headers)));
        assert!(
            Matcher::new(&path(StringMatch::Exact("/v1/chat/completions".into())))
                .matches(&input(&headers))
        );
        assert!(
            !Matcher::new(&path(StringMatch::Exact("/v1/chat".into()))).matches(&input(&headers))
        );
    }

    #[test]
    fn grpc_service_and_method_must_both_hold() {
        let headers = HeaderMap::new();
        let m = Matcher::new(&RouteMatch {
            grpc: Some(GrpcMatch {
                service: Some("inference.GRPCInferenceService".into()),
                method: Some("ModelInfer".into()),
            }),
            ..Default::default()
        });
        let mut req = input(&headers);
        assert!(!m.matches(&req), "not gRPC at all");
        req.grpc = Some(("inference.GRPCInferenceService", "ModelInfer"));
        assert!(m.matches(&req));
        req.grpc = Some(("inference.GRPCInferenceService", "ModelReady"));
        assert!(!m.matches(&req));
        let any_method = Matcher::new(&RouteMatch {
            grpc: Some(GrpcMatch {
                service: Some("inference.GRPCInferenceService".into()),
                method: None,
            }),
            ..Default::default()
        });
        assert!(any_method.matches(&req));
        let any_grpc = Matcher::new(&RouteMatch {
            grpc: Some(GrpcMatch::default()),
            ..Default::default()
        });
        assert!(any_grpc.matches(&req));
        req.grpc = None;
        assert!(
            !any_grpc.matches(&req),
            "an empty grpc condition still requires gRPC"
        );
    }

    #[test]
    fn headers_must_be_present_and_equal_when_a_value_is_given() {
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", "blue".parse().unwrap());
        let m = |value: Option<&str>| {
            Matcher::new(&RouteMatch {
                headers: vec![HeaderMatch {
                    name: "X-Tenant".into(),
                    value: value.map(Into::into),
                }],
                ..Default::default()
            })
        };
        assert!(m(None).matches(&input(&headers)));
        assert!(m(Some("blue")).matches(&input(&headers)));
        assert!(!m(Some("green")).matches(&input(&headers)));
        let empty = HeaderMap::new();
        assert!(!m(None).matches(&input(&empty)));
    }

    #[test]
    fn request_host_strips_ports_and_lowercases() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, "API.Example.com:8080".parse().unwrap());
        let uri: http::Uri = "/v1/models".parse().unwrap();
        assert_eq!(request_host(&uri, &headers).unwrap(), "api.example.com");
        headers.insert(http::header::HOST, "[::1]:80".parse().unwrap());
        assert_eq!(request_host(&uri, &headers).unwrap(), "::1");
        let absolute: http::Uri = "http://models.local:4140/v1/models".parse().unwrap();
        assert_eq!(
            request_host(&absolute, &HeaderMap::new()).unwrap(),
            "models.local"
        );
    }
}

#[cfg(test)]
#[cfg(test)]
mod authority_tests {
    use super::*;
    use http::Request;

    fn parts(version: http::Version, uri: &str, hosts: &[&str]) -> http::request::Parts {
        let mut builder = Request::builder().version(version).uri(uri);
        for host in hosts {
            builder = builder.header(header::HOST, *host);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn normalized(version: http::Version, uri: &str, hosts: &[&str]) -> Result<String, String> {
        let mut parts = parts(version, uri, hosts);
        normalize_authority(&mut parts).map_err(|e| e.to_string())?;
        let host = request_host(&parts.uri, &parts.headers).map(|h| h.into_owned());
        let header = parts.headers.get(header::HOST).map(|h| h.to_str().unwrap());
        Ok(format!("{host:?} {header:?}"))
    }

    #[test]
    fn routing_and_forwarding_see_one_authority() {
        use http::Version;
        // Origin form: the Host header.
        assert_eq!(
            normalized(Version::HTTP_11, "/v1/x", &["a.example"]).unwrap(),
            r#"Some("a.example") Some("a.example")"#
        );
        // Absolute form: the target wins and replaces Host.
        assert_eq!(
            normalized(Version::HTTP_11, "http://a.example/x", &["b.example"]).unwrap(),
            r#"Some("a.example") Some("a.example")"#
        );
        assert_eq!(
            normalized(Version::HTTP_11, "http://a.example:8080/x", &[]).unwrap(),
            r#"Some("a.example") None"#
        );
        // HTTP/2: :authority and an equal host are fine.
        assert_eq!(
            normalized(Version::HTTP_2, "http://a.example/x", &["a.example"]).unwrap(),
            r#"Some("a.example") Some("a.example")"#
        );
        assert_eq!(
            normalized(Version::HTTP_2, "/x", &["a.example"]).unwrap(),
            r#"Some("a.example") Some("a.example")"#
        );
        // HTTP/1.0 may leave Host out.
        assert!(normalized(Version::HTTP_10, "/x", &[]).is_ok());
    }

    #[test]
    fn ambiguous_authorities_are_refused() {
        use http::Version;
        let refused = |version, uri, hosts: &[&str]| normalized(version, uri, hosts).unwrap_err();
        assert!(refused(Version::HTTP_11, "/x", &["a", "b"]).contains("more than one Host"));
        assert!(refused(Version::HTTP_11, "/x", &["a", "a"]).contains("more than one Host"));
        assert!(refused(Version::HTTP_11, "/x", &[]).contains("needs a Host"));
        assert!(refused(Version::HTTP_11, "/x", &["a b"]).contains("is not a host"));
        assert!(refused(Version::HTTP_11, "/x", &["user@a"]).contains("is not a host"));
        assert!(refused(Version::HTTP_11, "/x", &["a/b"]).contains("is not a host"));
        assert!(refused(Version::HTTP_11, "/x", &[""]).contains("is not a host"));
        // Hosts differ only in case: the same host.
        assert!(normalized(Version::HTTP_2, "http://A.example/x", &["a.EXAMPLE"]).is_ok());
        assert!(normalized(Version::HTTP_11, "/x", &["[::1]:8080"]).is_ok());
        assert!(refused(Version::HTTP_2, "http://a/x", &["b"]).contains("differs from :authority"));
    }
}
