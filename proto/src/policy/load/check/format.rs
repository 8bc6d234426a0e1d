//! Value formats that serde's types cannot express: names, namespaces,
//! labels, endpoints, header names, percentages and the patterns of
//! authorization rules. Each check is a plain function returning the
//! message, tested here.

use std::net::Ipv6Addr;

/// Name patterns in authorization rules: a `*` only at the end.
pub(super) fn pattern_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("an empty pattern matches nothing; write `*` to match everything".into());
    }
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    body.contains('*')
        .then(|| format!("`{pattern}`: `*` is allowed only at the end, as a prefix match"))
}

/// gRPC method patterns: `/package.Service/Method`, `/package.Service/*`.
pub(super) fn method_problem(method: &str) -> Option<String> {
    if let Some(problem) = pattern_problem(method) {
        return Some(problem);
    }
    if method == "*" {
        return None;
    }
    let shape_ok = method
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(service, m)| !service.is_empty() && !m.is_empty() && !m.contains('/'));
    (!shape_ok).then(|| {
        format!(
            "`{method}` is not a gRPC method: write `/package.Service/Method` or `/package.Service/*`"
        )
    })
}

/// `metadata.name`: a DNS-1123 subdomain, as Kubernetes names are.
pub(super) fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("`name` must not be empty".to_owned());
    }
    if name.len() > 253 {
        return Some(format!(
            "`name` is {} characters long; at most 253 are allowed",
            name.len()
        ));
    }
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        match (bytes.first(), bytes.last()) {
            (Some(first), Some(last)) => {
                alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
            }
            _ => false,
        }
    };
    if name.split('.').all(label_ok) {
        return None;
    }
    let mut message = format!(
        "invalid name `{name}`: use lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit"
    );
    let fixed: String = name
        .to_lowercase()
        .chars()
        .map(|c| if c == '_' || c == ' ' { '-' } else { c })
        .collect();
    if fixed != name && fixed.split('.').all(label_ok) {
        message.push_str(&format!(" (e.g. `{fixed}`)"));
    }
    Some(message)
}

/// `metadata.namespace`: a DNS-1123 label, as Kubernetes namespaces are.
pub(super) fn namespace_problem(namespace: &str) -> Option<String> {
    let bytes = namespace.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok = match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= 63
                && alnum(first)
                && alnum(last)
                && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    };
    (!ok).then(|| {
        format!(
            "invalid namespace `{namespace}`: use at most 63 lowercase letters, digits and `-`, starting and ending with a letter or digit"
        )
    })
}

/// The name part of a label key, and a label value: at most 63 letters,
/// digits, `-`, `_` and `.`, starting and ending with a letter or digit.
fn label_word_ok(word: &str) -> bool {
    let bytes = word.as_bytes();
    let alnum = |b: &u8| b.is_ascii_alphanumeric();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= 63
                && alnum(first)
                && alnum(last)
                && bytes
                    .iter()
                    .all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// A label key: `name` or `prefix/name`, the prefix a DNS subdomain
/// (`app`, `app.kubernetes.io/name`), as in Kubernetes.
pub(super) fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if name_problem(prefix).is_some() {
            return Some(format!(
                "invalid label key `{key}`: the prefix before `/` must be a DNS subdomain (lowercase letters, digits, `-` and `.`), like `app.kubernetes.io`"
            ));
        }
    }
    (!label_word_ok(name)).then(|| {
        format!(
            "invalid label key `{key}`: the name{} must be 1 to 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit",
            if prefix.is_some() { " after `/`" } else { "" }
        )
    })
}

/// A label value: empty, or a word as in [`label_word_ok`].
pub(super) fn label_value_problem(value: &str) -> Option<String> {
    (!value.is_empty() && !label_word_ok(value)).then(|| {
        format!(
            "invalid label value `{value}`: use at most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit"
        )
    })
}

/// A backend endpoint: `host:port`, `ipv4:port` or `[ipv6]:port`.
pub(super) fn endpoint_problem(endpoint: &str) -> Option<String> {
    if let Some((scheme, _)) = endpoint.split_once("://") {
        return Some(format!(
            "endpoint `{endpoint}` must be `host:port` without a scheme: remove `{scheme}://`"
        ));
    }
    let port = if let Some(rest) = endpoint.strip_prefix('[') {
        let Some((address, after)) = rest.split_once(']') else {
            return Some(format!(
                "endpoint `{endpoint}` has no `]` after its IPv6 address"
            ));
        };
        if address.parse::<Ipv6Addr>().is_err() {
            return Some(format!(
                "`{address}` in endpoint `{endpoint}` is not an IPv6 address"
            ));
        }
        match after.strip_prefix(':') {
            Some(port) => port,
            None => {
                return Some(format!(
                    "endpoint `{endpoint}` has no port: write `[{address}]:PORT`"
                ))
            }
        }
    } else {
        let Some((host, port)) = endpoint.rsplit_once(':') else {
            return Some(format!(
                "endpoint `{endpoint}` has no port: write `{endpoint}:PORT`"
            ));
        };
        if host.contains(':') {
            return Some(format!(
                "endpoint `{endpoint}` looks like an IPv6 address: put the address in brackets, as in `[::1]:8000`"
            ));
        }
        if host.is_empty() {
            return Some(format!("endpoint `{endpoint}` has no host before the port"));
        }
        let host_ok = host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !host_ok {
            return Some(format!(
                "`{host}` in endpoint `{endpoint}` is not a valid host name or IPv4 address"
            ));
        }
        port
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Some(format!(
            "port `{port}` in endpoint `{endpoint}` must be a number from 1 to 65535"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => None,
        _ => Some(format!(
            "port {port} in endpoint `{endpoint}` is out of range: use 1 to 65535"
        )),
    }
}

/// An HTTP header field name: an RFC 9110 token.
pub(super) fn header_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("header `name` must not be empty".to_owned());
    }
    if name.starts_with(':') {
        return Some(format!(
            "`{name}` is a pseudo-header, not a header; match it with `host` or `path`"
        ));
    }
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let bad = name.chars().find(|c| !token(*c))?;
    Some(format!(
        "`{name}` is not a valid HTTP header name: {bad:?} is not allowed (use letters, digits, `-` and `_`)"
    ))
}

/// A share of requests, in percent.
pub(super) fn percent_problem(percent: f64) -> Option<String> {
    (!(0.0..=100.0).contains(&percent))
        .then(|| format!("`percent` must be between 0 and 100, found {percent}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_and_values() {
        for ok in [
            "app",
            "app.kubernetes.io/name",
            "a_b-c.d",
            "A1",
            &"k".repeat(63),
        ] {
            assert_eq!(label_key_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a b",
            "/a",
            "a/",
            "a/b/c",
            &"k".repeat(64),
            "A.B/c",
        ] {
            assert!(label_key_problem(bad).is_some(), "{bad}");
        }
        for ok in ["", "v1", "a.b_c-d", &"v".repeat(63)] {
            assert_eq!(label_value_problem(ok), None, "{ok}");
        }
        for bad in ["-", "a/b", "é", &"v".repeat(64)] {
            assert!(label_value_problem(bad).is_some(), "{bad}");
        }
        for ok in ["default", "team-a", "a1"] {
            assert_eq!(namespace_problem(ok), None, "{ok}");
        }
        for bad in ["", "Team", "a.b", "-a", &"n".repeat(64)] {
            assert!(namespace_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn endpoints_must_be_host_and_port() {
        for ok in [
            "a:1",
            "10.0.0.1:8000",
            "[::1]:80",
            "svc.ns.svc.cluster.local:65535",
        ] {
            assert_eq!(endpoint_problem(ok), None, "{ok}");
        }
        for (bad, expected) in [
            ("a", "endpoint `a` has no port: write `a:PORT`"),
            ("a:0", "port 0 in endpoint `a:0` is out of range: use 1 to 65535"),
            ("a:65536", "port 65536 in endpoint `a:65536` is out of range: use 1 to 65535"),
            ("a:http", "port `http` in endpoint `a:http` must be a number from 1 to 65535"),
            ("::1:80", "endpoint `::1:80` looks like an IPv6 address: put the address in brackets, as in `[::1]:8000`"),
            ("[::1]", "endpoint `[::1]` has no port: write `[::1]:PORT`"),
            ("[zz]:80", "`zz` in endpoint `[zz]:80` is not an IPv6 address"),
            ("http://a:80", "endpoint `http://a:80` must be `host:port` without a scheme: remove `http://`"),
            (":80", "endpoint `:80` has no host before the port"),
            ("a b:80", "`a b` in endpoint `a b:80` is not a valid host name or IPv4 address"),
        ] {
            assert_eq!(endpoint_problem(bad).as_deref(), Some(expected), "{bad}");
        }
    }

    #[test]
    fn names_follow_dns_1123() {
        for ok in ["a", "vllm-0", "a.b-c.d", "0"] {
            assert_eq!(name_problem(ok), None, "{ok}");
        }
        for bad in ["", "A", "-a", "a-", "a..b", "a_b", &"a".repeat(254)] {
            assert!(name_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn header_names_are_http_tokens() {
        assert_eq!(header_name_problem("x-tenant_id"), None);
        assert_eq!(
            header_name_problem("x tenant").as_deref(),
            Some("`x tenant` is not a valid HTTP header name: ' ' is not allowed (use letters, digits, `-` and `_`)")
        );
        assert!(header_name_problem(":authority").is_some());
        assert!(header_name_problem("").is_some());
    }
}
