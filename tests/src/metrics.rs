//! A reader for the Prometheus text the admin server's `/metrics` serves.

use std::collections::BTreeMap;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    /// Scrapes `proxy`'s admin `/metrics` (which must answer 200).
    pub async fn scrape(proxy: &crate::ProxyProcess) -> Self {
        let reply = crate::HttpClient::http1()
            .get(&format!("{}/metrics", proxy.admin_url()))
            .await;
        assert_eq!(reply.status, 200, "GET /metrics: {}", reply.text());
        Self::parse(&reply.text())
    }

    /// Parses Prometheus (or OpenMetrics) text; panics on a line it cannot read.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|line| {
                parse_line(line).unwrap_or_else(|| panic!("unreadable metrics line {line:?}"))
            })
            .collect();
        Self {
            samples,
            text: text.to_string(),
        }
    }

    /// Samples called `name` whose labels include every `(key, value)` of `filter`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the matching samples (0 when there are none).
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.find(name, filter).map(|s| s.value).sum()
    }

    /// Whether any sample is called `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let space = line.find(' ')?;
            (&line[..space], BTreeMap::new(), &line[space..])
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name: name.trim().to_string(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(',') | Some(' ')) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(labels);
        }
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_string(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_comments() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE infermesh_requests counter\ninfermesh_requests_total{route=\"a\",backend=\"b\",status=\"200\"} 3\ninfermesh_requests_in_flight 0\nh_bucket{le=\"+Inf\"} 4\nq{m=\"a\\\"b\"} 1.5 1700000000\n",
        );
        assert_eq!(
            m.sum(
                "infermesh_requests_total",
                &[("route", "a"), ("status", "200")]
            ),
            3.0
        );
        assert_eq!(m.sum("infermesh_requests_total", &[("route", "z")]), 0.0);
        assert_eq!(m.sum("infermesh_requests_in_flight", &[]), 0.0);
        assert!(m.has("infermesh_requests_in_flight"));
        assert_eq!(m.sum("h_bucket", &[("le", "+Inf")]), 4.0);
        assert_eq!(m.sum("q", &[("m", "a\"b")]), 1.5);
    }
}
