//! Whether one route's conditions take every request another's would: the
//! decision behind "unreachable route" errors.
//!
//! The answer is conservative: `covers` is true only when every request
//! that can satisfy the later conditions provably satisfies the earlier
//! ones, under the proxy's matching rules (`host` wildcards match a
//! non-empty subdomain, header names ignore case, a `model` or `host`
//! condition needs a model or host to be known). A route it cannot prove
//! unreachable is left alone.

use crate::policy::{DestinationPattern, HeaderMatch, ModelRouteSpec, RouteMatch, StringMatch};

/// The match entries of a route, an empty list meaning one entry with no
/// conditions (the route matches everything).
fn entries(spec: &ModelRouteSpec) -> Vec<&RouteMatch> {
    static ALL: RouteMatch = RouteMatch {
        host: None,
        path: None,
        grpc: None,
        headers: Vec::new(),
        model: None,
        destination: Vec::new(),
    };
    if spec.matches.is_empty() {
        vec![&ALL]
    } else {
        spec.matches.iter().collect()
    }
}

/// For each match entry of `later` (or its single match-all entry), the
/// index of the first of `earlier` that takes every request the entry
/// matches; `None` when some entry escapes all of them. Routes of another
/// listener never take a request.
pub(super) fn shadowed_by(
    later: &ModelRouteSpec,
    earlier: &[&ModelRouteSpec],
) -> Option<Vec<usize>> {
    entries(later)
        .into_iter()
        .map(|entry| {
            earlier.iter().position(|route| {
                route.listener == later.listener
                    && entries(route).iter().any(|e| match_covers(e, entry))
            })
        })
        .collect()
}

/// Whether every request matching `b` also matches `a`.
pub(super) fn match_covers(a: &RouteMatch, b: &RouteMatch) -> bool {
    let host = match (&a.host, &b.host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => host_covers(&a.to_ascii_lowercase(), &b.to_ascii_lowercase()),
    };
    let grpc = {
        let service = a.grpc.as_ref().and_then(|g| g.service.as_ref());
        let method = a.grpc.as_ref().and_then(|g| g.method.as_ref());
        let b_service = b.grpc.as_ref().and_then(|g| g.service.as_ref());
        let b_method = b.grpc.as_ref().and_then(|g| g.method.as_ref());
        service.is_none_or(|s| b_service == Some(s)) && method.is_none_or(|m| b_method == Some(m))
    };
    host && grpc
        && string_covers(a.path.as_ref(), b.path.as_ref())
        && string_covers(a.model.as_ref(), b.model.as_ref())
        && a.headers.iter().all(|h| header_implied(h, &b.headers))
        && destination_covers(&a.destination, &b.destination)
}

/// Whether every original destination `b` takes, `a` takes too: `a` has no
/// condition, or each of `b`'s patterns lies inside one of `a`'s (a
/// pattern that does not parse is an error of its own and proves nothing).
fn destination_covers(a: &[String], b: &[String]) -> bool {
    if a.is_empty() {
        return true;
    }
    let parse = |p: &String| p.parse::<DestinationPattern>().ok();
    let a: Option<Vec<_>> = a.iter().map(parse).collect();
    let b: Option<Vec<_>> = b.iter().map(parse).collect();
    match (a, b) {
        (Some(a), Some(b)) if !b.is_empty() => b.iter().all(|b| a.iter().any(|a| a.covers(b))),
        _ => false,
    }
}

/// `*.example.com` takes any host ending in `.example.com` with something
/// before it, so it also takes narrower wildcards such as `*.a.example.com`.
fn host_covers(a: &str, b: &str) -> bool {
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (None, None) => a == b,
        (None, Some(_)) => false,
        (Some(suffix), None) => b.len() > suffix.len() && b.ends_with(suffix),
        (Some(suffix), Some(narrower)) => narrower.ends_with(suffix),
    }
}

fn string_covers(a: Option<&StringMatch>, b: Option<&StringMatch>) -> bool {
    match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(StringMatch::Exact(a)), Some(StringMatch::Exact(b))) => a == b,
        (Some(StringMatch::Exact(_)), Some(StringMatch::Prefix(_))) => false,
        (Some(StringMatch::Prefix(a)), Some(StringMatch::Exact(b) | StringMatch::Prefix(b))) => {
            b.starts_with(a.as_str())
        }
    }
}

/// Whether the header conditions `given` guarantee the condition `wanted`.
fn header_implied(wanted: &HeaderMatch, given: &[HeaderMatch]) -> bool {
    given.iter().any(|g| {
        g.name.eq_ignore_ascii_case(&wanted.name)
            && wanted
                .value
                .as_ref()
                .is_none_or(|v| g.value.as_ref() == Some(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{GrpcMatch, ListenerKind, RouteTimeouts, WeightedBackend};

    fn exact(s: &str) -> Option<StringMatch> {
        Some(StringMatch::Exact(s.into()))
    }

    fn prefix(s: &str) -> Option<StringMatch> {
        Some(StringMatch::Prefix(s.into()))
    }

    fn header(name: &str, value: Option<&str>) -> HeaderMatch {
        HeaderMatch {
            name: name.into(),
            value: value.map(str::to_owned),
        }
    }

    fn host(h: &str) -> RouteMatch {
        RouteMatch {
            host: Some(h.into()),
            ..RouteMatch::default()
        }
    }

    fn route(matches: Vec<RouteMatch>) -> ModelRouteSpec {
        ModelRouteSpec {
            listener: ListenerKind::Outbound,
            matches,
            backends: vec![WeightedBackend {
                backend: "b".into(),
                weight: 1,
                model: None,
            }],
            timeouts: RouteTimeouts::default(),
            retries: None,
            fallback: Vec::new(),
            rate_limits: Vec::new(),
            faults: None,
            mirror: None,
            workload_selector: None,
            hedging: None,
            access_log: None,
        }
    }

    #[test]
    fn no_conditions_cover_everything_and_anything_covers_itself() {
        let all = RouteMatch::default();
        let specific = RouteMatch {
            host: Some("a.example.com".into()),
            path: prefix("/v1/"),
            grpc: Some(GrpcMatch {
                service: Some("s".into()),
                method: Some("m".into()),
            }),
            headers: vec![header("x-tenant", Some("a"))],
            model: exact("llama"),
            destination: vec!["10.96.0.10:8000".into()],
        };
        assert!(match_covers(&all, &specific));
        assert!(match_covers(&specific, &specific));
        assert!(!match_covers(&specific, &all));
    }

    #[test]
    fn destinations_cover_the_addresses_inside_them() {
        let to = |d: &[&str]| RouteMatch {
            destination: d.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        };
        assert!(match_covers(
            &to(&["10.0.0.0/8"]),
            &to(&["10.1.2.3:80", "10.9.0.0/16"])
        ));
        assert!(!match_covers(
            &to(&["10.0.0.0/8"]),
            &to(&["10.1.2.3:80", "11.0.0.1"])
        ));
        assert!(!match_covers(&to(&["10.1.2.3:80"]), &RouteMatch::default()));
        assert!(match_covers(&RouteMatch::default(), &to(&["10.1.2.3:80"])));
        // A pattern that does not parse proves nothing.
        assert!(!match_covers(&to(&["nonsense"]), &to(&["nonsense"])));
    }

    #[test]
    fn path_and_model_prefixes_cover_longer_prefixes_and_exact_values() {
        for field in [
            |m: Option<StringMatch>| RouteMatch {
                path: m,
                ..RouteMatch::default()
            },
            |m: Option<StringMatch>| RouteMatch {
                model: m,
                ..RouteMatch::default()
            },
        ] {
            assert!(match_covers(
                &field(prefix("/v1")),
                &field(prefix("/v1/chat"))
            ));
            assert!(match_covers(&field(prefix("/v1")), &field(exact("/v1/x"))));
            assert!(match_covers(&field(prefix("")), &field(exact("/"))));
            assert!(!match_covers(
                &field(prefix("/v1/chat")),
                &field(prefix("/v1"))
            ));
            assert!(!match_covers(&field(exact("/v1")), &field(prefix("/v1"))));
            assert!(match_covers(&field(exact("/v1")), &field(exact("/v1"))));
            assert!(!match_covers(&field(exact("/v1")), &field(exact("/v2"))));
            assert!(!match_covers(&field(exact("/v1")), &field(None)));
        }
    }

    #[test]
    fn hosts_compare_without_case_and_wildcards_need_a_subdomain() {
        assert!(match_covers(
            &host("API.example.com"),
            &host("api.EXAMPLE.com")
        ));
        assert!(match_covers(&host("*.example.com"), &host("a.example.com")));
        assert!(match_covers(
            &host("*.example.com"),
            &host("*.a.example.com")
        ));
        assert!(match_covers(&host("*.example.com"), &host("*.example.com")));
        assert!(!match_covers(&host("*.example.com"), &host("example.com")));
        assert!(!match_covers(
            &host("*.a.example.com"),
            &host("*.example.com")
        ));
        assert!(!match_covers(
            &host("a.example.com"),
            &host("*.example.com")
        ));
        assert!(!match_covers(
            &host("a.example.com"),
            &RouteMatch::default()
        ));
    }

    #[test]
    fn grpc_conditions_cover_when_the_later_one_is_at_least_as_narrow() {
        let grpc = |service: Option<&str>, method: Option<&str>| RouteMatch {
            grpc: Some(GrpcMatch {
                service: service.map(str::to_owned),
                method: method.map(str::to_owned),
            }),
            ..RouteMatch::default()
        };
        assert!(match_covers(
            &grpc(Some("s"), None),
            &grpc(Some("s"), Some("m"))
        ));
        assert!(match_covers(
            &grpc(None, Some("m")),
            &grpc(Some("s"), Some("m"))
        ));
        assert!(!match_covers(
            &grpc(Some("s"), Some("m")),
            &grpc(Some("s"), None)
        ));
        assert!(!match_covers(
            &grpc(Some("s"), None),
            &grpc(Some("t"), None)
        ));
        assert!(!match_covers(
            &grpc(Some("s"), None),
            &RouteMatch::default()
        ));
        // `grpc: {}` has no condition, as the proxy reads it.
        assert!(match_covers(&grpc(None, None), &RouteMatch::default()));
    }

    #[test]
    fn header_conditions_are_implied_by_the_same_or_a_stricter_one() {
        let headers = |h: Vec<HeaderMatch>| RouteMatch {
            headers: h,
            ..RouteMatch::default()
        };
        let present = headers(vec![header("X-Tenant", None)]);
        let blue = headers(vec![header("x-tenant", Some("blue"))]);
        let blue_and_more = headers(vec![header("x-a", None), header("x-tenant", Some("blue"))]);
        assert!(match_covers(&present, &blue));
        assert!(match_covers(&blue, &blue_and_more));
        assert!(!match_covers(&blue, &present));
        assert!(!match_covers(&blue_and_more, &blue));
        assert!(!match_covers(
            &blue,
            &headers(vec![header("x-tenant", Some("Blue"))])
        ));
    }

    #[test]
    fn a_route_is_shadowed_only_when_every_entry_is_taken_earlier() {
        let all = route(vec![]);
        let v1 = route(vec![RouteMatch {
            path: prefix("/v1/"),
            ..RouteMatch::default()
        }]);
        let v2 = route(vec![RouteMatch {
            path: prefix("/v2/"),
            ..RouteMatch::default()
        }]);
        let both = route(vec![
            RouteMatch {
                path: exact("/v1/models"),
                ..RouteMatch::default()
            },
            RouteMatch {
                path: prefix("/v2/x"),
                ..RouteMatch::default()
            },
        ]);
        assert_eq!(shadowed_by(&v1, &[&all]), Some(vec![0]));
        assert_eq!(shadowed_by(&all, &[&all]), Some(vec![0]));
        assert_eq!(shadowed_by(&all, &[&v1]), None);
        assert_eq!(shadowed_by(&both, &[&v1]), None);
        assert_eq!(shadowed_by(&both, &[&v1, &v2]), Some(vec![0, 1]));
        assert_eq!(shadowed_by(&both, &[]), None);
    }

    #[test]
    fn routes_of_the_other_listener_take_nothing() {
        let mut inbound = route(vec![]);
        inbound.listener = ListenerKind::Inbound;
        assert_eq!(shadowed_by(&route(vec![]), &[&inbound]), None);
        assert_eq!(shadowed_by(&inbound, &[&inbound]), Some(vec![0]));
    }
}
