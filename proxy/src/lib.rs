//! The infermesh sidecar proxy: listeners, protocol detection, request
//! classification, routing, balancing, connection pools and the admin server.

pub mod access;
pub mod admin;
pub mod authz;
pub mod backend;
pub mod balance;
pub mod body;
pub mod chain;
pub mod classify;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod error;
pub mod forward;
pub mod genai;
pub mod identity;
pub mod inputs;
pub mod listener;
pub mod local;
pub mod metrics;
pub mod name;
pub mod opaque;
pub mod otlp_metrics;
pub mod outlier;
pub mod passthrough;
pub mod pool;
pub mod prefix;
pub mod redirect;
pub mod refusal;
pub mod route;
pub mod service;
pub mod snapshot;
pub mod stack;
pub mod summary;
pub mod traces;
