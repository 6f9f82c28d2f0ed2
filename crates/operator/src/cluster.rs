//! Live inputs: the Services, Nodes, Namespaces and NodePortFirewallPolicies of the cluster
//! in the kubeconfig (or the one the binary runs in), for `plan`, `apply` and `check`
//! without `-f`. Only reads: list, nothing else.

use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::de::DeserializeOwned;

use crate::manifests::Manifests;
use crate::policy::NodePortFirewallPolicy;
use crate::{Error, Result};

/// Objects asked for per list call.
const PAGE: u32 = 500;

/// A client for `context` of `kubeconfig` (default: `$KUBECONFIG` or `~/.kube/config`, then
/// the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<kube::Client> {
    crate::controller::install_crypto_provider();
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..KubeConfigOptions::default()
    };
    let config = match (kubeconfig, context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path).map_err(|e| {
                Error::Io(format!("cannot read kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| Error::Io(format!("kubeconfig {}: {e}", path.display())))?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| Error::Io(format!("kubeconfig: {e}")))?,
        (None, None) => kube::Config::infer().await.map_err(|e| {
            Error::Io(format!(
                "no Kubernetes cluster to read (give -f, --kubeconfig or --context): {e}"
            ))
        })?,
    };
    let url = config.cluster_url.to_string();
    kube::Client::try_from(config)
        .map_err(|e| Error::Io(format!("cannot build a Kubernetes client for {url}: {e}")))
}

/// Lists every object `plan` reads, as `-f` would have given them.
pub async fn load(client: &kube::Client) -> Result<Manifests> {
    let services: Vec<Service> = list(Api::all(client.clone()), "services", "").await?;
    let nodes: Vec<Node> = list(Api::all(client.clone()), "nodes", "").await?;
    let namespaces: Vec<Namespace> = list(Api::all(client.clone()), "namespaces", "").await?;
    let policies: Vec<NodePortFirewallPolicy> = match list(
        Api::all(client.clone()),
        "nodeportfirewallpolicies",
        "nodeport-firewall.io",
    )
    .await
    {
        Ok(p) => p,
        // The CRD is not installed: there are no policies.
        Err(ListError::NotFound) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut out = Manifests::default();
    out.services = services;
    out.nodes = nodes;
    out.namespaces = namespaces;
    out.policies = policies;
    Ok(out)
}

#[derive(Debug)]
enum ListError {
    NotFound,
    Other(Error),
}

impl From<ListError> for Error {
    fn from(e: ListError) -> Self {
        match e {
            ListError::NotFound => Error::Io("the resource is not served by this cluster".into()),
            ListError::Other(e) => e,
        }
    }
}

impl From<Error> for ListError {
    fn from(e: Error) -> Self {
        ListError::Other(e)
    }
}

/// Every object of `api`, page by page. A refusal names the permission that is missing.
async fn list<K>(api: Api<K>, resource: &str, group: &str) -> std::result::Result<Vec<K>, ListError>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut params = ListParams::default().limit(PAGE);
        if let Some(t) = &token {
            params = params.continue_token(t);
        }
        let page = api
            .list(&params)
            .await
            .map_err(|e| describe(e, resource, group))?;
        out.extend(page.items);
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            return Ok(out);
        }
    }
}

fn describe(e: kube::Error, resource: &str, group: &str) -> ListError {
    let api_group = if group.is_empty() {
        "core".to_string()
    } else {
        group.to_string()
    };
    match &e {
        kube::Error::Api(status) if status.code == 404 && !group.is_empty() => ListError::NotFound,
        kube::Error::Api(status) if status.code == 403 || status.code == 401 => {
            ListError::Other(Error::Io(format!(
                "cannot list {resource}: forbidden; the kubeconfig's identity needs the permission to list {resource} ({api_group} API group) in all namespaces: {}",
                status.message
            )))
        }
        _ => ListError::Other(Error::Io(format!(
            "cannot list {resource} from the cluster: {e}"
        ))),
    }
}
