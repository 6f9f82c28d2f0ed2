//! Credentials: workload identity (re-reading its token file), managed identity, an
//! environment client secret and the Azure CLI, in that order.
//!
//! `azure_identity` 0.21's `WorkloadIdentityCredential` reads the federated token file once,
//! when it is created. AKS rotates that file (hourly, the token being valid for a day), so a
//! long-running operator would eventually present an expired assertion. [`WorkloadIdentity`]
//! reads the file again every time it asks Entra ID for a new access token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::auth::{AccessToken, Secret, TokenCredential};
use azure_core::error::ErrorKind;
use azure_core::{HttpClient, Url};
use azure_identity::{
    AzureCliCredential, ClientSecretCredential, TokenCredentialOptions,
    VirtualMachineManagedIdentityCredential, federated_credentials_flow,
};
use time::OffsetDateTime;
use tracing::{debug, info};

use crate::config::{CredentialKind, WorkloadIdentityConfig};

/// A token is renewed when it has less than this left.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// How long one source of the chain may take before the next is tried.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(20);

fn cred_error(message: impl Into<String>) -> azure_core::Error {
    azure_core::Error::message(ErrorKind::Credential, message.into())
}

/// Workload identity that re-reads its federated token file for every new access token.
#[derive(Debug)]
pub struct WorkloadIdentity {
    http: Arc<dyn HttpClient>,
    authority_host: Url,
    tenant_id: String,
    client_id: String,
    token_file: PathBuf,
    cache: Mutex<HashMap<String, AccessToken>>,
}

impl WorkloadIdentity {
    pub fn new(
        http: Arc<dyn HttpClient>,
        authority_host: Url,
        tenant_id: String,
        client_id: String,
        token_file: PathBuf,
    ) -> Self {
        WorkloadIdentity {
            http,
            authority_host,
            tenant_id,
            client_id,
            token_file,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// From the config, else `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and
    /// `AZURE_FEDERATED_TOKEN_FILE` (set by the AKS workload identity webhook); `None` when
    /// one is missing.
    pub fn from_config(
        http: Arc<dyn HttpClient>,
        authority_host: Url,
        config: &WorkloadIdentityConfig,
    ) -> Option<Self> {
        let pick = |c: &Option<String>, k: &str| {
            c.clone()
                .or_else(|| std::env::var(k).ok())
                .filter(|v| !v.is_empty())
        };
        Some(WorkloadIdentity::new(
            http,
            authority_host,
            pick(&config.tenant_id, "AZURE_TENANT_ID")?,
            pick(&config.client_id, "AZURE_CLIENT_ID")?,
            PathBuf::from(pick(&config.token_file, "AZURE_FEDERATED_TOKEN_FILE")?),
        ))
    }

    fn cached(&self, key: &str) -> Option<AccessToken> {
        let cache = self.cache.lock().ok()?;
        let t = cache.get(key)?;
        let left = t.expires_on - OffsetDateTime::now_utc();
        (left > REFRESH_MARGIN).then(|| t.clone())
    }
}

#[async_trait]
impl TokenCredential for WorkloadIdentity {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let key = scopes.join(" ");
        if let Some(t) = self.cached(&key) {
            return Ok(t);
        }
        // Read the file now, not once at start: AKS rotates it.
        let assertion = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| {
                cred_error(format!(
                    "workload identity: cannot read the federated token file {}: {e}",
                    self.token_file.display()
                ))
            })?;
        let rsp = federated_credentials_flow::perform(
            self.http.clone(),
            &self.client_id,
            assertion.trim(),
            scopes,
            &self.tenant_id,
            &self.authority_host,
        )
        .await
        .map_err(|e| {
            cred_error(format!(
                "workload identity: token request failed: {}",
                crate::error::chain(&e)
            ))
        })?;
        // Entra ID tokens live about an hour; a day caps whatever the response says, so the
        // expiry below cannot overflow.
        let lifetime = i64::try_from(rsp.expires_in.min(86_400)).unwrap_or(0);
        let token = AccessToken::new(
            rsp.access_token().secret().to_string(),
            OffsetDateTime::now_utc() + time::Duration::seconds(lifetime),
        );
        if let Ok(mut c) = self.cache.lock() {
            c.insert(key, token.clone());
        }
        debug!(lifetime_s = lifetime, "workload identity token obtained");
        Ok(token)
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        if let Ok(mut c) = self.cache.lock() {
            c.clear();
        }
        Ok(())
    }
}

/// A fixed bearer token, for test servers.
#[derive(Clone)]
pub struct StaticToken(pub String);

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticToken(..)")
    }
}

#[async_trait]
impl TokenCredential for StaticToken {
    async fn get_token(&self, _scopes: &[&str]) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            Secret::new(self.0.clone()),
            OffsetDateTime::now_utc() + time::Duration::hours(1),
        ))
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        Ok(())
    }
}

/// Tries its sources in order; the first that gives a token is used from then on.
#[derive(Debug)]
pub struct Chain {
    sources: Vec<(&'static str, Arc<dyn TokenCredential>)>,
    chosen: Mutex<Option<usize>>,
}

impl Chain {
    pub fn new(sources: Vec<(&'static str, Arc<dyn TokenCredential>)>) -> Self {
        Chain {
            sources,
            chosen: Mutex::new(None),
        }
    }

    /// The sources, by name, in the order they are tried.
    pub fn source_names(&self) -> Vec<&'static str> {
        self.sources.iter().map(|(n, _)| *n).collect()
    }
}

#[async_trait]
impl TokenCredential for Chain {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let chosen = self.chosen.lock().ok().and_then(|c| *c);
        if let Some((_, source)) = chosen.and_then(|i| self.sources.get(i)) {
            return source.get_token(scopes).await;
        }
        let mut failures = Vec::new();
        for (i, (name, source)) in self.sources.iter().enumerate() {
            match tokio::time::timeout(SOURCE_TIMEOUT, source.get_token(scopes)).await {
                Ok(Ok(t)) => {
                    info!(credential = *name, "using Azure credential");
                    if let Ok(mut c) = self.chosen.lock() {
                        *c = Some(i);
                    }
                    return Ok(t);
                }
                Ok(Err(e)) => failures.push(format!("{name}: {}", crate::error::chain(&e))),
                Err(_) => failures.push(format!(
                    "{name}: no answer within {}s",
                    SOURCE_TIMEOUT.as_secs()
                )),
            }
        }
        Err(cred_error(format!(
            "no Azure credential worked: {}",
            if failures.is_empty() {
                "none configured".to_string()
            } else {
                failures.join("; ")
            }
        )))
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        for (_, s) in &self.sources {
            s.clear_cache().await?;
        }
        Ok(())
    }
}

/// Builds the credential `kind` from the environment.
pub fn build(
    kind: CredentialKind,
    workload: &WorkloadIdentityConfig,
    http: Arc<dyn HttpClient>,
    authority_host: Option<&str>,
) -> azure_core::Result<Arc<dyn TokenCredential>> {
    let mut options = TokenCredentialOptions::from(http.clone());
    if let Some(host) = authority_host {
        options.set_authority_host(host.to_string());
    }
    let authority = options.authority_host()?;
    let workload = || WorkloadIdentity::from_config(http.clone(), authority.clone(), workload);
    let secret_set = std::env::var("AZURE_CLIENT_SECRET").is_ok_and(|v| !v.is_empty());
    let one = |name: &'static str, c: Arc<dyn TokenCredential>| {
        Ok(Arc::new(Chain::new(vec![(name, c)])) as Arc<dyn TokenCredential>)
    };
    match kind {
        CredentialKind::WorkloadIdentity => match workload() {
            Some(w) => one("workloadIdentity", Arc::new(w)),
            None => Err(cred_error(
                "workload identity needs a tenant id, a client id and a token file (azure.workloadIdentity, or AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE)",
            )),
        },
        CredentialKind::ManagedIdentity => one(
            "managedIdentity",
            Arc::new(VirtualMachineManagedIdentityCredential::new(options)),
        ),
        CredentialKind::ClientSecret => one(
            "clientSecret",
            Arc::new(ClientSecretCredential::create(options)?),
        ),
        CredentialKind::AzureCli => one("azureCli", Arc::new(AzureCliCredential::new())),
        CredentialKind::Chain => {
            let mut sources: Vec<(&'static str, Arc<dyn TokenCredential>)> = Vec::new();
            if let Some(w) = workload() {
                sources.push(("workloadIdentity", Arc::new(w)));
            }
            sources.push((
                "managedIdentity",
                Arc::new(VirtualMachineManagedIdentityCredential::new(
                    options.clone(),
                )),
            ));
            if secret_set && let Ok(c) = ClientSecretCredential::create(options) {
                sources.push(("clientSecret", Arc::new(c)));
            }
            sources.push(("azureCli", Arc::new(AzureCliCredential::new())));
            Ok(Arc::new(Chain::new(sources)))
        }
    }
}
