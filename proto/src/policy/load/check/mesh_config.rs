//! `MeshConfig` checks: the opaque backend and the classification bounds.

use super::path::{find, P};
use super::reference::BackendNames;
use crate::policy::load::{PolicyError, Typed};
use crate::policy::{local_model_name, MeshConfigSpec};
use P::K;

/// `classify.maxBodyPrefix` bounds: below 1 KiB no model name is found in
/// practice, above 16 MiB the proxy would hold whole uploads in memory.
const MIN_BODY_PREFIX: u32 = 1024;
const MAX_BODY_PREFIX: u32 = 16 * 1024 * 1024;

pub(super) fn mesh_spec(
    mesh: &Typed<MeshConfigSpec>,
    backends: &BackendNames<'_>,
    errors: &mut Vec<PolicyError>,
) {
    let (file, tree, spec) = (&mesh.file, &mesh.tree, &mesh.resource.spec);
    let opaque_problem = spec.opaque.backend.as_deref().and_then(|b| {
        if local_model_name(b).is_some() {
            Some(format!(
                "`{b}`: a local model cannot receive opaque TCP connections; name a Backend"
            ))
        } else {
            backends.unknown(b)
        }
    });
    if let Some(problem) = opaque_problem {
        let at = find(tree, &[K("spec"), K("opaque"), K("backend")]).at;
        errors.push(PolicyError::new(file, at, problem));
    }
    if let Some(tracing) = &spec.tracing {
        if !(0.0..=1.0).contains(&tracing.sampling) {
            let at = find(tree, &[K("spec"), K("tracing"), K("sampling")]).at;
            errors.push(PolicyError::new(
                file,
                at,
                format!(
                    "`sampling` is the share of traces sampled, from 0 to 1 (0.01 for 1%), found {}",
                    tracing.sampling
                ),
            ));
        }
        if let Some(problem) = endpoint_problem(&tracing.endpoint) {
            let at = find(tree, &[K("spec"), K("tracing"), K("endpoint")]).at;
            errors.push(PolicyError::new(file, at, problem));
        }
    }
    if let Some(otlp) = &spec.otlp_metrics {
        if let Some(problem) = endpoint_problem(&otlp.endpoint) {
            let at = find(tree, &[K("spec"), K("otlpMetrics"), K("endpoint")]).at;
            errors.push(PolicyError::new(file, at, problem));
        }
        if otlp.interval < std::time::Duration::from_secs(1) {
            let at = find(tree, &[K("spec"), K("otlpMetrics"), K("interval")]).at;
            errors.push(PolicyError::new(
                file,
                at,
                format!(
                    "`interval` must be at least 1s (metrics are pushed that often), found {}",
                    humantime::format_duration(otlp.interval)
                ),
            ));
        }
    }
    let prefix = spec.classify.max_body_prefix;
    if !(MIN_BODY_PREFIX..=MAX_BODY_PREFIX).contains(&prefix) {
        let at = find(tree, &[K("spec"), K("classify"), K("maxBodyPrefix")]).at;
        errors.push(PolicyError::new(
            file,
            at,
            format!(
                "`maxBodyPrefix` must be between {MIN_BODY_PREFIX} (1 KiB) and {MAX_BODY_PREFIX} (16 MiB) bytes, found {prefix}"
            ),
        ));
    }
}

/// Why a collector endpoint cannot be used, if it cannot.
fn endpoint_problem(endpoint: &str) -> Option<String> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"));
    let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
    match host {
        Some(host)
            if !host.is_empty()
                && !host.starts_with(':')
                && host.bytes().all(|b| b.is_ascii_graphic() && b != b'@') =>
        {
            None
        }
        _ => Some(format!(
            "`{endpoint}`: the collector endpoint is an http:// or https:// URL with a host, such as http://collector:4317"
        )),
    }
}
