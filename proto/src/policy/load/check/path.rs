//! Where a problem is: the node at a path of mapping keys and sequence
//! items in a document's tree.

use crate::policy::load::yaml::{Node, Value};
use P::{KeyOf, Only, I, K};

/// One step of a lookup path.
#[derive(Clone, Copy)]
pub(super) enum P<'a> {
    /// The value under a mapping key.
    K(&'a str),
    /// A mapping key itself (the last step).
    KeyOf(&'a str),
    /// A sequence item.
    I(usize),
    /// The value of a one-entry mapping (`{prefix: …}`).
    Only,
}

/// The node at `path`, or the deepest node on the way there (a defaulted
/// field has no node of its own).
pub(super) fn find<'n>(tree: &'n Node, path: &[P<'_>]) -> &'n Node {
    let mut node = tree;
    for step in path {
        let next = match (step, &node.value) {
            (K(key), _) => node.get(key),
            (KeyOf(key), Value::Map(entries)) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(k, _)| k),
            (I(i), Value::Seq(items)) => items.get(*i),
            (Only, Value::Map(entries)) => entries.first().map(|(_, v)| v),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => break,
        }
    }
    node
}
