//! The `nodeport-firewall` binary's library: the CLI, manifest loading, plan output and
//! provider selection.

pub mod cli;
pub mod cluster;
pub mod controller;
pub mod explain;
pub mod manifests;
pub mod output;
pub mod policy;
pub mod ports;
pub mod providers;
pub mod saved;

/// Errors the CLI reports before exiting with status 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Manifest { path: String, message: String },
    #[error("config {path}: {source}")]
    Config {
        path: String,
        source: nodeport_firewall_model::Error,
    },
    #[error("{0}")]
    Io(String),
    #[error("provider {provider}: {source}")]
    Provider {
        provider: String,
        source: nodeport_firewall_provider::Error,
    },
    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
