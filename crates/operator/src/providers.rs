//! Chooses and builds the provider named on the command line.

use std::path::Path;

use nodeport_firewall_model::Config;
use nodeport_firewall_provider::memory::MemoryState;
use nodeport_firewall_provider::{Error as ProviderError, MemoryProvider, Provider};

use crate::{Error, Result};

/// The providers this binary knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderName {
    Memory,
    Aws,
    Gcp,
    Azure,
}

impl ProviderName {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderName::Memory => "memory",
            ProviderName::Aws => "aws",
            ProviderName::Gcp => "gcp",
            ProviderName::Azure => "azure",
        }
    }
}

/// A built provider.
#[derive(Debug)]
pub enum Backend {
    Memory(MemoryProvider),
    Aws(Box<nodeport_firewall_aws::AwsProvider>),
    Azure(Box<nodeport_firewall_azure::AzureProvider>),
    Gcp(Box<nodeport_firewall_gcp::GcpProvider>),
}

impl Backend {
    pub fn provider(&self) -> &dyn Provider {
        match self {
            Backend::Memory(p) => p,
            Backend::Aws(p) => p.as_ref(),
            Backend::Azure(p) => p.as_ref(),
            Backend::Gcp(p) => p.as_ref(),
        }
    }

    /// Saves the in-memory provider's state, when it has a state file.
    pub fn save_state(&self, path: Option<&Path>) -> Result<()> {
        match (self, path) {
            (Backend::Memory(p), Some(path)) => {
                let state = p.snapshot().map_err(|e| provider_error("memory", e))?;
                let text =
                    serde_json::to_string_pretty(&state).map_err(|e| Error::Io(e.to_string()))?;
                // Written aside, then renamed: a crash mid-write leaves the old state whole.
                let mut aside = path.as_os_str().to_owned();
                aside.push(".tmp");
                let aside = std::path::PathBuf::from(aside);
                std::fs::write(&aside, text + "\n")
                    .and_then(|()| std::fs::rename(&aside, path))
                    .map_err(|e| Error::Io(format!("cannot write {}: {e}", path.display())))
            }
            _ => Ok(()),
        }
    }
}

fn provider_error(provider: &str, source: ProviderError) -> Error {
    Error::Provider {
        provider: provider.to_string(),
        source,
    }
}

/// Builds the provider. `state` is the in-memory provider's state file: read if it exists.
pub async fn build(name: ProviderName, config: &Config, state: Option<&Path>) -> Result<Backend> {
    match name {
        ProviderName::Memory => {
            let p = MemoryProvider::from_config(
                &config.cluster_name,
                config.provider_section("memory"),
            )
            .map_err(|e| provider_error("memory", e))?;
            if let Some(path) = state.filter(|p| p.exists()) {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
                let s: MemoryState = serde_json::from_str(&text).map_err(|e| {
                    Error::Io(format!(
                        "{}: not a memory provider state: {e}",
                        path.display()
                    ))
                })?;
                p.load(s).map_err(|e| provider_error("memory", e))?;
            }
            Ok(Backend::Memory(p))
        }
        ProviderName::Aws => {
            let p = nodeport_firewall_aws::AwsProvider::from_config(
                &config.cluster_name,
                config.provider_section("aws"),
            )
            .await
            .map_err(|e| provider_error("aws", e))?;
            Ok(Backend::Aws(Box::new(p)))
        }
        ProviderName::Azure => {
            let p = nodeport_firewall_azure::AzureProvider::from_config(
                &config.cluster_name,
                config.provider_section("azure"),
            )
            .await
            .map_err(|e| provider_error("azure", e))?;
            Ok(Backend::Azure(Box::new(p)))
        }
        ProviderName::Gcp => {
            let p = nodeport_firewall_gcp::GcpProvider::from_config(
                &config.cluster_name,
                config.provider_section("gcp"),
            )
            .await
            .map_err(|e| provider_error("gcp", e))?;
            Ok(Backend::Gcp(Box::new(p)))
        }
    }
}
