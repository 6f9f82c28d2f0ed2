//! The registry of providers this binary knows, and building the one named on the command
//! line. A new cloud is one entry in [`CLOUDS`] (and its crate).

use std::path::Path;

use futures::future::BoxFuture;
use nodeport_firewall_model::Config;
use nodeport_firewall_provider::memory::MemoryState;
use nodeport_firewall_provider::{Error as ProviderError, MemoryProvider, Provider};

use crate::{Error, Result};

/// Builds a cloud's provider from the operator config.
type Build = for<'a> fn(&'a Config) -> BoxFuture<'a, Built>;
type Built = std::result::Result<Box<dyn Provider>, ProviderError>;

/// Every cloud this binary knows, by name, and how to build it: the one registry.
const CLOUDS: &[(&str, Build)] = &[("aws", aws), ("gcp", gcp), ("azure", azure)];

/// The in-memory provider, which needs no cloud.
pub const MEMORY: &str = "memory";

fn aws(config: &Config) -> BoxFuture<'_, Built> {
    Box::pin(async move {
        let p = nodeport_firewall_aws::AwsProvider::from_config(
            &config.cluster_name,
            config.provider_section("aws"),
        )
        .await?;
        Ok(Box::new(p) as Box<dyn Provider>)
    })
}

fn gcp(config: &Config) -> BoxFuture<'_, Built> {
    Box::pin(async move {
        let p = nodeport_firewall_gcp::GcpProvider::from_config(
            &config.cluster_name,
            config.provider_section("gcp"),
        )
        .await?;
        Ok(Box::new(p) as Box<dyn Provider>)
    })
}

fn azure(config: &Config) -> BoxFuture<'_, Built> {
    Box::pin(async move {
        let p = nodeport_firewall_azure::AzureProvider::from_config(
            &config.cluster_name,
            config.provider_section("azure"),
        )
        .await?;
        Ok(Box::new(p) as Box<dyn Provider>)
    })
}

/// The names of every provider: `--provider` takes one, and the config may have a
/// section for each.
pub fn names() -> Vec<&'static str> {
    std::iter::once(MEMORY)
        .chain(CLOUDS.iter().map(|(name, _)| *name))
        .collect()
}

/// A built provider, and, for the in-memory one, a handle on its state to save.
pub struct Backend {
    provider: Box<dyn Provider>,
    memory: Option<MemoryProvider>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("provider", &self.provider.name())
            .finish()
    }
}

impl Backend {
    pub fn provider(&self) -> &dyn Provider {
        self.provider.as_ref()
    }

    /// Saves the in-memory provider's state, when it has a state file.
    pub fn save_state(&self, path: Option<&Path>) -> Result<()> {
        match (&self.memory, path) {
            (Some(p), Some(path)) => {
                let state = p.snapshot().map_err(|e| provider_error(MEMORY, e))?;
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

/// Builds the provider `name`. `state` is the in-memory provider's state file: read if it
/// exists.
pub async fn build(name: &str, config: &Config, state: Option<&Path>) -> Result<Backend> {
    if name == MEMORY {
        let p = MemoryProvider::from_config(&config.cluster_name, config.provider_section(MEMORY))
            .map_err(|e| provider_error(MEMORY, e))?;
        if let Some(path) = state.filter(|p| p.exists()) {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
            let s: MemoryState = serde_json::from_str(&text).map_err(|e| {
                Error::Io(format!(
                    "{}: not a memory provider state: {e}",
                    path.display()
                ))
            })?;
            p.load(s).map_err(|e| provider_error(MEMORY, e))?;
        }
        // The handle shares the provider's state: what it saves is what was applied.
        let memory = Some(p.instance());
        return Ok(Backend {
            provider: Box::new(p),
            memory,
        });
    }
    let Some((_, build)) = CLOUDS.iter().find(|(n, _)| *n == name) else {
        return Err(Error::Usage(format!(
            "unknown provider {name:?}: one of {}",
            names().join(", ")
        )));
    };
    let provider = build(config).await.map_err(|e| provider_error(name, e))?;
    Ok(Backend {
        provider,
        memory: None,
    })
}
