//! The moto test environment: moto_server on a free loopback port, a proxy in front of it
//! that counts EC2 calls per action and security group and injects faults, a VPC, and a raw
//! EC2 client that writes fixtures as another tool would.
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{IpPermission, IpRange, Ipv6Range, ResourceType, Tag, TagSpecification};
use nodeport_firewall_aws::{AwsProvider, StaticCredentials, marker};
use nodeport_firewall_provider::Rule;
use nodeport_firewall_provider::engine::{self, ApplyOutcome};
use nodeport_firewall_provider::model::{Config, NodeSpec, Plan, PoolName, ServiceSpec, desired};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub(crate) use crate::proxy::{Fault, Proxy};

pub(crate) const CLUSTER: &str = "moto-test";

/// An ingress rule as EC2 holds it: (id, protocol, from, to, cidr, tags).
pub(crate) type RawRule = (String, String, i32, i32, String, BTreeMap<String, String>);
pub(crate) const REGION: &str = "us-east-1";
pub(crate) const POOL_LABEL: &str = "nodeport-firewall.io/pool";

// ---------------------------------------------------------------------------------------
// moto_server

pub(crate) struct Moto {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub(crate) fn not_installed(why: &str) -> Option<Moto> {
    if std::env::var("NPF_SKIP_MOTO").as_deref() == Ok("1") {
        eprintln!("SKIPPED: moto_server is not available ({why}); NPF_SKIP_MOTO=1");
        return None;
    }
    panic!(
        "moto_server is not available ({why}). Install it with `pip install 'moto[server]'`, \
         or set NPF_SKIP_MOTO=1 to skip the AWS tests."
    );
}

pub(crate) async fn start_moto() -> Option<Moto> {
    let port = free_port();
    let child = match Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return not_installed(&e.to_string()),
    };
    let mut moto = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = moto.child.try_wait() {
            return not_installed(&format!("moto_server exited with {status}"));
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
            let req = "GET /moto-api/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
            if s.write_all(req.as_bytes()).await.is_ok() {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() && buf.starts_with(b"HTTP/1") {
                    return Some(moto);
                }
            }
        }
        if Instant::now() > deadline {
            moto.child.kill().ok();
            panic!("moto_server did not answer on port {port} within 60s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// A test environment: moto, the proxy, a VPC, a raw EC2 client for fixtures

pub(crate) struct Env {
    pub(crate) _moto: Moto,
    pub(crate) proxy: Proxy,
    pub(crate) ec2: aws_sdk_ec2::Client,
    pub(crate) vpc: String,
    pub(crate) subnet: String,
}

impl Env {
    pub(crate) async fn start() -> Option<Env> {
        let moto = start_moto().await?;
        let proxy = Proxy::start(moto.port).await;
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(REGION))
            .endpoint_url(format!("http://127.0.0.1:{}", moto.port))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .build();
        let ec2 = aws_sdk_ec2::Client::from_conf(conf);
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.10.0.0/16")
            .send()
            .await
            .unwrap()
            .vpc()
            .and_then(|v| v.vpc_id())
            .unwrap()
            .to_string();
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block("10.10.1.0/24")
            .send()
            .await
            .unwrap()
            .subnet()
            .and_then(|s| s.subnet_id())
            .unwrap()
            .to_string();
        Some(Env {
            _moto: moto,
            proxy,
            ec2,
            vpc,
            subnet,
        })
    }

    pub(crate) async fn provider_with(&self, extra: serde_json::Value) -> AwsProvider {
        let mut section = serde_json::json!({
            "region": REGION,
            "endpointUrl": format!("http://127.0.0.1:{}", self.proxy.port),
            "retry": {"maxAttempts": 6, "baseDelayMillis": 1, "maxDelayMillis": 20},
        });
        if let (Some(s), Some(e)) = (section.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        AwsProvider::from_config_with(
            CLUSTER,
            Some(&section),
            Some(StaticCredentials {
                access_key_id: "testing".into(),
                secret_access_key: "testing".into(),
            }),
        )
        .await
        .unwrap()
    }

    pub(crate) async fn provider(&self) -> AwsProvider {
        self.provider_with(serde_json::json!({})).await
    }

    pub(crate) async fn sg(&self, name: &str, cluster_tag: bool) -> String {
        let mut req = self
            .ec2
            .create_security_group()
            .group_name(name)
            .description(name)
            .vpc_id(&self.vpc);
        if cluster_tag {
            req = req.tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroup)
                    .tags(
                        Tag::builder()
                            .key(format!("kubernetes.io/cluster/{CLUSTER}"))
                            .value("owned")
                            .build(),
                    )
                    .build(),
            );
        }
        req.send().await.unwrap().group_id().unwrap().to_string()
    }

    pub(crate) async fn instance(&self, sgs: &[&str]) -> String {
        self.ec2
            .run_instances()
            .image_id("ami-12c6146b")
            .min_count(1)
            .max_count(1)
            .subnet_id(&self.subnet)
            .set_security_group_ids(Some(sgs.iter().map(|s| s.to_string()).collect()))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("Name").value("node").build())
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .instances()[0]
            .instance_id()
            .unwrap()
            .to_string()
    }

    /// A pool with one node whose only security group is new and tagged.
    pub(crate) async fn pool(&self, name: &str) -> (PoolName, String, Vec<NodeSpec>) {
        let sg = self.sg(&format!("sg-{name}"), true).await;
        let inst = self.instance(&[&sg]).await;
        (
            PoolName::new(name),
            sg,
            vec![node(&format!("node-{name}"), name, &inst)],
        )
    }

    /// Ingress rules on `sg` as EC2 holds them: (id, protocol, from, to, cidr, tags).
    pub(crate) async fn raw_rules(&self, sg: &str) -> Vec<RawRule> {
        let out = self
            .ec2
            .describe_security_group_rules()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("group-id")
                    .values(sg)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.security_group_rules()
            .iter()
            .filter(|r| r.is_egress() == Some(false))
            .map(|r| {
                (
                    r.security_group_rule_id().unwrap_or_default().to_string(),
                    r.ip_protocol().unwrap_or_default().to_string(),
                    r.from_port().unwrap_or(-1),
                    r.to_port().unwrap_or(-1),
                    r.cidr_ipv4()
                        .or(r.cidr_ipv6())
                        .unwrap_or_default()
                        .to_string(),
                    r.tags()
                        .iter()
                        .map(|t| {
                            (
                                t.key().unwrap_or_default().to_string(),
                                t.value().unwrap_or_default().to_string(),
                            )
                        })
                        .collect(),
                )
            })
            .collect()
    }

    /// Writes a rule directly, as another tool would: tagged as `owner`'s (our two
    /// ownership tags with that cluster name) when given.
    pub(crate) async fn seed(&self, sg: &str, owner: Option<&str>, rule: &Rule) {
        self.seed_with(sg, owner, rule, None).await;
    }

    /// As [`Env::seed`], with a description on the rule.
    pub(crate) async fn seed_with(
        &self,
        sg: &str,
        owner: Option<&str>,
        rule: &Rule,
        description: Option<&str>,
    ) {
        let c = &rule.content;
        let proto = match c.protocol {
            nodeport_firewall_provider::model::Protocol::Tcp => "tcp",
            nodeport_firewall_provider::model::Protocol::Udp => "udp",
            nodeport_firewall_provider::model::Protocol::Sctp => "132",
        };
        let mut perm = IpPermission::builder()
            .ip_protocol(proto)
            .from_port(i32::from(c.ports[0].from))
            .to_port(i32::from(c.ports[0].to));
        for s in &c.sources {
            perm = match s {
                ipnet::IpNet::V4(_) => perm.ip_ranges(
                    IpRange::builder()
                        .cidr_ip(s.to_string())
                        .set_description(description.map(str::to_string))
                        .build(),
                ),
                ipnet::IpNet::V6(_) => perm.ipv6_ranges(
                    Ipv6Range::builder()
                        .cidr_ipv6(s.to_string())
                        .set_description(description.map(str::to_string))
                        .build(),
                ),
            };
        }
        let mut req = self
            .ec2
            .authorize_security_group_ingress()
            .group_id(sg)
            .ip_permissions(perm.build());
        if let Some(owner) = owner {
            req = req.tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroupRule)
                    .tags(
                        Tag::builder()
                            .key(marker::TAG_MANAGED_BY)
                            .value(marker::MANAGED_BY)
                            .build(),
                    )
                    .tags(Tag::builder().key(marker::TAG_CLUSTER).value(owner).build())
                    .build(),
            );
        }
        req.send().await.unwrap();
    }
}

pub(crate) fn node(name: &str, pool: &str, instance: &str) -> NodeSpec {
    NodeSpec::new(name)
        .with_label(POOL_LABEL, pool)
        .with_provider_id(&format!("aws:///{REGION}a/{instance}"))
}

pub(crate) fn config_for(pools: &[&PoolName]) -> Config {
    let mut config = Config::new(CLUSTER);
    for p in pools {
        config.pools.insert((*p).clone(), Default::default());
    }
    config
}

pub(crate) async fn plan(
    p: &AwsProvider,
    config: &Config,
    svcs: &[ServiceSpec],
    nodes: &[NodeSpec],
) -> Plan {
    engine::plan(p, config, &desired(config, svcs, nodes)).await
}

pub(crate) async fn apply_ok(p: &AwsProvider, plan: &Plan) -> Vec<String> {
    let mut notes = Vec::new();
    for (target, outcome) in engine::apply(p, plan).await {
        match outcome {
            ApplyOutcome::NoChanges => {}
            ApplyOutcome::Applied { report } => notes.extend(report.notes),
            other => panic!("apply on {target} failed: {other:?}"),
        }
    }
    notes
}

pub(crate) fn writes(plan: &Plan) -> usize {
    plan.summary.add + plan.summary.remove + plan.summary.update
}

pub(crate) fn svc(name: &str, port: i32, ranges: &str) -> ServiceSpec {
    ServiceSpec::nodeport("apps", name)
        .with_port("p", "TCP", 80, port)
        .enabled()
        .with_ranges(ranges)
}
