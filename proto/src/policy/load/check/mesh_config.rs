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
