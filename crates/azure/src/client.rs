//! The ARM calls this provider makes, and nothing else: each goes through
//! [`AzureProvider::call`] (counted, retried with the shared policy honouring Retry-After,
//! errors mapped), lists are read to their last page, and a write waits for its
//! long-running operation by polling it. Only per-rule PUT and DELETE: a whole-NSG PUT
//! would replace everyone else's rules.

use std::future::Future;
use std::time::Duration;

use azure_core::headers::{AUTHORIZATION, AZURE_ASYNCOPERATION, LOCATION};
use azure_core::{Method, Request, Url};
use azure_mgmt_network::package_2024_03::models as arm;
use futures::StreamExt;
use nodeport_firewall_provider::{Error, ErrorKind, Result};

use crate::wire::plural;
use crate::{ATTEMPT_TIMEOUT, AzureProvider, NsgId, discovery, error, http, invalid, orphans};

impl AzureProvider {
    /// Runs one ARM operation: counted, retried when throttled or transient, errors mapped.
    pub(crate) async fn call<T, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = azure_core::Result<T>>,
    {
        self.retry
            .call(&self.stats, "ARM", op, f, |op, e| error::map(op, &e))
            .await
    }

    /// Lists every security rule of an NSG, all pages.
    pub(crate) async fn list_rules(&self, nsg: &NsgId) -> Result<Vec<arm::SecurityRule>> {
        self.call("ListSecurityRules", || {
            let stream = self
                .client
                .security_rules_client()
                .list(&nsg.resource_group, &nsg.name, &nsg.subscription)
                .into_stream();
            async move {
                let mut stream = stream;
                let mut all = Vec::new();
                while let Some(page) = stream.next().await {
                    all.extend(page?.value);
                }
                Ok(all)
            }
        })
        .await
    }

    /// Lists every NSG of a subscription or resource group, with its rules, all pages.
    pub(crate) async fn list_nsgs(
        &self,
        scope: &orphans::Scope,
    ) -> Result<Vec<arm::NetworkSecurityGroup>> {
        self.call("ListNetworkSecurityGroups", || {
            let nsgs = self.client.network_security_groups_client();
            let stream = match scope {
                orphans::Scope::Subscription(s) => nsgs.list_all(s).into_stream(),
                orphans::Scope::ResourceGroup { subscription, name } => {
                    nsgs.list(name, subscription).into_stream()
                }
            };
            async move {
                let mut stream = stream;
                let mut all = Vec::new();
                while let Some(page) = stream.next().await {
                    all.extend(page?.value);
                }
                Ok(all)
            }
        })
        .await
    }

    /// The primary IP configurations of a VMSS's NICs.
    pub(crate) async fn vmss_nics(&self, vmss: &discovery::Vmss) -> Result<Vec<discovery::Nic>> {
        let all = self
            .call("ListVmssNetworkInterfaces", || {
                let stream = self
                    .client
                    .network_interfaces_client()
                    .list_virtual_machine_scale_set_network_interfaces(
                        &vmss.resource_group,
                        &vmss.name,
                        &vmss.subscription,
                    )
                    .into_stream();
                async move {
                    let mut stream = stream;
                    let mut all = Vec::new();
                    while let Some(page) = stream.next().await {
                        all.extend(page?.value);
                    }
                    Ok(all)
                }
            })
            .await?;
        Ok(all
            .into_iter()
            .filter_map(|nic| nic.properties)
            .map(|p| {
                let ip = p
                    .ip_configurations
                    .iter()
                    .find(|c| c.properties.as_ref().and_then(|p| p.primary) == Some(true))
                    .or(p.ip_configurations.first())
                    .and_then(|c| c.properties.as_ref());
                discovery::Nic {
                    nsg: p.network_security_group.and_then(|n| n.resource.id),
                    subnet: ip
                        .and_then(|c| c.subnet.as_ref())
                        .and_then(|s| s.sub_resource.id.clone()),
                    asgs: ip
                        .map(|c| {
                            c.application_security_groups
                                .iter()
                                .filter_map(|a| a.resource.id.clone())
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect())
    }

    pub(crate) async fn subnet(&self, id: &str) -> Result<discovery::SubnetInfo> {
        let (sub, rg, vnet, name) = discovery::subnet_parts(id)
            .ok_or_else(|| invalid(format!("{id:?} is not a subnet id")))?;
        let s = self
            .call("GetSubnet", || {
                let fut = self
                    .client
                    .subnets_client()
                    .get(&rg, &vnet, &name, &sub)
                    .send();
                async move { fut.await?.into_body().await }
            })
            .await?;
        let p = s.properties.unwrap_or_default();
        Ok(discovery::SubnetInfo {
            nsg: p.network_security_group.and_then(|n| n.resource.id),
            prefixes: plural(&p.address_prefix, &p.address_prefixes),
            ip_configurations: p
                .ip_configurations
                .iter()
                .filter_map(|c| c.sub_resource.id.clone())
                .collect(),
        })
    }

    async fn bearer(&self) -> Result<String> {
        self.credential
            .get_token(&[self.token_scope.as_str()])
            .await
            .map(|t| format!("Bearer {}", t.token.secret()))
            .map_err(|e| error::map("GetToken", &e))
    }

    /// Polls a long-running operation at `url` until it is done or `deadline` passes.
    /// `async_op`: an `Azure-AsyncOperation` URL, whose body says `status`; otherwise a
    /// `Location` URL, which answers 202 while running and 200/204 when done.
    async fn poll(
        &self,
        what: &str,
        url: &str,
        async_op: bool,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        let url = Url::parse(url)
            .map_err(|e| invalid(format!("{what}: bad polling URL {url:?}: {e}")))?;
        let too_late = || {
            Error::new(
                ErrorKind::Transient,
                format!(
                    "{what}: not finished within {}s (azure.operationTimeoutSeconds); the next reconcile re-reads the NSG",
                    self.config.operation_timeout_seconds
                ),
            )
        };
        let mut wait = Duration::ZERO;
        loop {
            // Compared, not added: a Retry-After from ARM can be any size.
            if deadline.saturating_duration_since(tokio::time::Instant::now()) < wait {
                return Err(too_late());
            }
            tokio::time::sleep(wait).await;
            let auth = self.bearer().await?;
            // The poll's own retries count against the same deadline.
            let polled = tokio::time::timeout_at(
                deadline,
                self.call("PollOperation", || {
                    let mut req = Request::new(url.clone(), Method::Get);
                    req.insert_header(AUTHORIZATION, auth.clone());
                    let http = self.http.clone();
                    async move {
                        let rsp = http::send(http.as_ref(), &req, ATTEMPT_TIMEOUT).await?;
                        let status = u16::from(rsp.status());
                        let after = http::retry_after(rsp.headers());
                        let body = rsp.into_body().collect().await?;
                        Ok((status, after, body))
                    }
                }),
            )
            .await;
            let (status, after, body) = polled.map_err(|_| too_late())??;
            wait = after
                .unwrap_or_else(|| self.config.poll_interval())
                .max(Duration::from_millis(10));
            if async_op {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                match v.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                    "Succeeded" => return Ok(()),
                    "Failed" | "Canceled" => {
                        let e = v.get("error").cloned().unwrap_or_default();
                        let code = e.get("code").and_then(|c| c.as_str()).map(str::to_string);
                        let message = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
                        let arm = error::ArmError {
                            status: 200,
                            code,
                            message: Some(format!("operation failed: {message}")),
                            retry_after: None,
                        };
                        return Err(error::from_arm(what, &arm));
                    }
                    _ => continue,
                }
            } else if status != 202 {
                return Ok(());
            }
        }
    }

    /// PUTs one rule's body under `name` and waits for it.
    pub(crate) async fn put_security_rule(
        &self,
        nsg: &NsgId,
        name: &str,
        body: arm::SecurityRule,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.config.operation_timeout();
        let op_url = self
            .call("PutSecurityRule", || {
                let fut = self
                    .client
                    .security_rules_client()
                    .create_or_update(
                        &nsg.resource_group,
                        &nsg.name,
                        name,
                        body.clone(),
                        &nsg.subscription,
                    )
                    .send();
                async move {
                    let rsp = fut.await?;
                    Ok(rsp
                        .as_raw_response()
                        .headers()
                        .get_optional_string(&AZURE_ASYNCOPERATION))
                }
            })
            .await?;
        if let Some(url) = op_url {
            self.poll(&format!("PUT rule {name}"), &url, true, deadline)
                .await?;
        }
        Ok(())
    }

    /// DELETEs one rule and waits for it. A rule already gone is not an error.
    pub(crate) async fn delete_rule(&self, nsg: &NsgId, name: &str) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + self.config.operation_timeout();
        let r = self
            .call("DeleteSecurityRule", || {
                let fut = self
                    .client
                    .security_rules_client()
                    .delete(&nsg.resource_group, &nsg.name, name, &nsg.subscription)
                    .send();
                async move {
                    let rsp = fut.await?;
                    let raw = rsp.as_raw_response();
                    Ok((
                        u16::from(raw.status()),
                        raw.headers().get_optional_string(&LOCATION),
                    ))
                }
            })
            .await;
        match r {
            Ok((204, _)) => Ok(false),
            Ok((_, Some(url))) => {
                self.poll(&format!("DELETE rule {name}"), &url, false, deadline)
                    .await?;
                Ok(true)
            }
            Ok(_) => Ok(true),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}
