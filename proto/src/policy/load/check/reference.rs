//! References from one document to another by name: the backends and local
//! models that routes and the `MeshConfig` name.

use crate::policy::load::{did_you_mean, Kind, Loader};
use crate::policy::local_model_name;

/// The names `Backend` and `LocalModel` documents define, for checking
/// references.
pub(super) struct BackendNames<'a> {
    backends: Vec<&'a str>,
    local_models: Vec<&'a str>,
}

impl<'a> BackendNames<'a> {
    pub(super) fn of(loader: &'a Loader) -> Self {
        let names = |kind: Kind| {
            loader
                .documents
                .iter()
                .filter(|d| d.kind == kind)
                .filter_map(|d| d.name.as_ref().map(|(n, _)| n.as_str()))
                .collect()
        };
        Self {
            backends: names(Kind::Backend),
            local_models: names(Kind::LocalModel),
        }
    }

    /// The message for a reference to a backend (or, written `local:NAME`,
    /// a local model) that does not exist.
    pub(super) fn unknown(&self, name: &str) -> Option<String> {
        if let Some(local) = local_model_name(name) {
            if self.local_models.contains(&local) {
                return None;
            }
            let mut message = format!("unknown local model `{local}`: no LocalModel has this name");
            if let Some(close) = did_you_mean(local, self.local_models.iter().copied()) {
                message.push_str(&format!("; did you mean `local:{close}`?"));
            } else if self.backends.contains(&local) {
                message.push_str(&format!(
                    "; `{local}` is a Backend: name it without `local:`"
                ));
            }
            return Some(message);
        }
        if self.backends.contains(&name) {
            return None;
        }
        let mut message = format!("unknown backend `{name}`: no Backend has this name");
        if let Some(close) = did_you_mean(name, self.backends.iter().copied()) {
            message.push_str(&format!("; did you mean `{close}`?"));
        } else if self.local_models.contains(&name) {
            message.push_str(&format!("; `{name}` is a LocalModel: write `local:{name}`"));
        }
        Some(message)
    }
}
