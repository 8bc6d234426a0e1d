//! The infermesh sidecar proxy.
