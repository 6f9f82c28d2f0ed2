//! The real binary with `--provider azure` against the ARM test server
//! (`nodeport_firewall_e2e::azure_arm`): `plan`, `apply`, `plan` again shows no changes,
//! AKS's and others' rules in the shared NSG are untouched, a node leaving updates the
//! rules in place, a full priority band is a plan error, and the workload identity token
//! file is what authenticates.

use std::path::PathBuf;

use nodeport_firewall_e2e::azure_arm::{ArmServer, aks_lb_rule};
use serde_json::json;

use crate::cli::{Cli, Scratch};

const SUB: &str = "00000000-0000-0000-0000-0000000000aa";
const RG: &str = "MC_demo_aks_westeurope";

fn node(name: &str, pool: &str, ip: &str) -> String {
    format!(
        "- apiVersion: v1\n  kind: Node\n  metadata:\n    name: {name}\n    labels: {{kubernetes.azure.com/agentpool: {pool}}}\n  spec: {{providerID: \"azure:///subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/aks-{pool}-1-vmss/virtualMachines/0\"}}\n  status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
    )
}

fn service(
    ns: &str,
    name: &str,
    ports: &[(&str, u16)],
    ranges: &str,
    pools: Option<&str>,
) -> String {
    let pools = pools
        .map(|p| format!("\n    nodeport-firewall.io/node-pools: {p}"))
        .unwrap_or_default();
    let ports: String = ports
        .iter()
        .enumerate()
        .map(|(i, (proto, p))| {
            format!(
                "\n  - {{name: p{i}, protocol: {proto}, port: {}, nodePort: {p}}}",
                80 + i
            )
        })
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations:\n    nodeport-firewall.io/enabled: \"true\"\n    nodeport-firewall.io/allowed-source-ranges: \"{ranges}\"{pools}\nspec:\n  type: NodePort\n  ports:{ports}\n"
    )
}

struct Setup {
    server: ArmServer,
    dir: Scratch,
    nsg: String,
    config: PathBuf,
}

impl Setup {
    fn new(extra_config: &str) -> Setup {
        let server = ArmServer::start();
        let nsg = server.create_nsg(SUB, RG, "aks-agentpool-31415926-nsg");
        let dir = Scratch::new();
        let token = dir.write("azure-identity-token", "federated-token-1\n");
        let config = dir.write(
            "config.yaml",
            &format!(
                "clusterName: demo\nazure:\n  networkSecurityGroup: {nsg}\n  endpoint: {url}\n  tokenScope: {url}/.default\n  authorityHost: {url}\n  credential: workloadIdentity\n  workloadIdentity: {{tenantId: tenant-1, clientId: client-1, tokenFile: {token}}}\n  pollIntervalMillis: 10\n  discoverDestination: false\n{extra_config}",
                url = server.url,
                token = token.display(),
            ),
        );
        Setup {
            server,
            dir,
            nsg,
            config,
        }
    }

    /// Writes the node and Service manifests; returns the `-f` arguments.
    fn manifests(&self, nodes: &[(&str, &str, &str)], services: &[String]) -> Vec<String> {
        let mut text = "apiVersion: v1\nkind: List\nitems:\n".to_string();
        for (n, p, ip) in nodes {
            text.push_str(&node(n, p, ip));
        }
        let nodes = self.dir.write("nodes.yaml", &text);
        let mut args = vec!["-f".to_string(), nodes.display().to_string()];
        if !services.is_empty() {
            let svcs = self.dir.write("services.yaml", &services.concat());
            args.extend(["-f".to_string(), svcs.display().to_string()]);
        }
        args
    }

    fn args(&self, manifests: &[String], extra: &[&str]) -> Vec<String> {
        let mut a = manifests.to_vec();
        a.extend([
            "--config".to_string(),
            self.config.display().to_string(),
            "--provider".to_string(),
            "azure".to_string(),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn ours(&self) -> Vec<serde_json::Value> {
        self.server
            .rules(&self.nsg)
            .into_iter()
            .filter(|r| {
                r["properties"]["description"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("nodeport-firewall cluster=demo;"))
            })
            .collect()
    }
}

fn services() -> Vec<String> {
    vec![
        service(
            "shop",
            "web",
            &[("TCP", 30080), ("TCP", 30081)],
            "203.0.113.0/24",
            None,
        ),
        service(
            "shop",
            "checkout",
            &[("TCP", 30090)],
            "203.0.113.0/24",
            None,
        ),
        service(
            "infra",
            "dns",
            &[("UDP", 30053)],
            "198.51.100.0/24",
            Some("np2"),
        ),
        service(
            "infra",
            "metrics",
            &[("SCTP", 30099)],
            "198.51.100.0/24",
            Some("np2"),
        ),
    ]
}

#[test]
fn plan_apply_plan_against_the_arm_server_leaves_aks_and_foreign_rules_alone() {
    let s = Setup::new("");
    s.server.seed_rule(
        &s.nsg,
        "k8s-azure-lb_allow_IPv4_0123",
        aks_lb_rule(500, 443),
    );
    s.server.seed_rule(
        &s.nsg,
        "allow-vpn",
        json!({"protocol": "Tcp", "sourceAddressPrefix": "192.0.2.0/24", "destinationAddressPrefix": "*",
               "destinationPortRange": "30080", "priority": 3000}),
    );
    let before = s.server.rules(&s.nsg);
    let nodes = [
        ("aks-np1-0", "np1", "10.224.0.4"),
        ("aks-np1-1", "np1", "10.224.0.5"),
        ("aks-np2-0", "np2", "10.224.1.4"),
    ];
    let m = s.manifests(&nodes, &services());
    // Targets are the NSG's canonical id: values lower-cased, ARM's segment names kept.
    let nsg_text = format!(
        "azure:/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkSecurityGroups/aks-agentpool-31415926-nsg",
        SUB.to_ascii_lowercase(),
        RG.to_ascii_lowercase()
    );

    Cli::new()
        .plan(&s.args(&m, &[]))
        .expect_exit(2)
        .stdout_has(&[
            &format!("pool np1 (2 nodes) -> {nsg_text}"),
            "+ tcp 30080-30081,30090 from 203.0.113.0/24 to dst:10.224.0.4/32,10.224.0.5/32  [shop/checkout,shop/web]  (npf-demo-np1-",
            "Plan: 3 to add, 0 to remove, 0 unchanged.",
        ]);
    assert!(s.ours().is_empty(), "plan writes nothing");
    Cli::new()
        .apply(&s.args(&m, &["--yes"]))
        .expect_exit(0)
        .stdout_has(&["Apply complete: 3 added, 0 changed, 0 removed."]);
    Cli::new()
        .plan(&s.args(&m, &[]))
        .expect_exit(0)
        .stdout_has(&["Plan: 0 to add, 0 to remove, 3 unchanged."]);
    let mine = s.ours();
    assert_eq!(mine.len(), 3);
    for r in &mine {
        let p = r["properties"]["priority"].as_i64().unwrap();
        assert!(
            (3001..=3999).contains(&p),
            "in the band, not on the foreign 3000: {p}"
        );
    }
    let after = s.server.rules(&s.nsg);
    for r in &before {
        assert!(after.contains(r), "a foreign rule changed: {r:#}");
    }
    assert!(
        s.server
            .assertions()
            .iter()
            .all(|a| a == "federated-token-1")
            && !s.server.assertions().is_empty(),
        "authenticated with the federated token file: {:?}",
        s.server.assertions()
    );

    // A node leaves np1: its rule is updated in place, under the same name and priority.
    let m = s.manifests(&nodes[1..], &services());
    Cli::new()
        .plan(&s.args(&m, &[]))
        .expect_exit(2)
        .stdout_has(&["Plan: 0 to add, 1 to change, 0 to remove, 2 unchanged."]);
    s.server.clear_log();
    Cli::new()
        .apply(&s.args(&m, &["--yes"]))
        .expect_exit(0)
        .stdout_has(&["Apply complete: 0 added, 1 changed, 0 removed."]);
    assert_eq!(s.server.count("PUT", "/securityRules/"), 1);
    let np1 = s
        .ours()
        .into_iter()
        .find(|r| r["properties"]["destinationAddressPrefix"].as_str() == Some("10.224.0.5/32"))
        .expect("np1's rule now targets only the remaining node");
    let old = mine
        .iter()
        .find(|r| r["name"] == np1["name"])
        .expect("same name");
    assert_eq!(old["properties"]["priority"], np1["properties"]["priority"]);

    // Everything goes: only our rules are deleted.
    let m = s.manifests(&nodes[1..], &[]);
    Cli::new()
        .apply(&s.args(&m, &["--yes"]))
        .expect_exit(0)
        .stdout_has(&["0 added, 0 changed, 3 removed."]);
    assert_eq!(s.server.rules(&s.nsg), before);
}

#[test]
fn a_full_priority_band_is_a_plan_error_and_apply_writes_nothing() {
    let s = Setup::new("  priorityBand: {from: 3000, to: 3001}\n");
    s.server.seed_rule(&s.nsg, "manual", aks_lb_rule(3001, 22));
    let m = s.manifests(
        &[("aks-np1-0", "np1", "10.224.0.4")],
        &services()[..1]
            .iter()
            .chain(&[service("a", "b", &[("TCP", 31000)], "192.0.2.0/24", None)])
            .cloned()
            .collect::<Vec<_>>(),
    );
    Cli::new()
        .plan(&s.args(&m, &[]))
        .expect_exit(1)
        .stdout_has(&["rule quota exceeded: 2 rules of ours + 1 of others = 3 rules, limit 2"]);
    Cli::new().apply(&s.args(&m, &["--yes"])).expect_exit(1);
    assert_eq!(s.server.count("PUT", "/"), 0);
    assert!(s.ours().is_empty());
}

/// 95 Services on one allowlist: one rule whose marker holds only a hash. Every CLI run is
/// a new process that never wrote the rule; it must still plan nothing after the apply,
/// also with one of the Services broken (its port stays open).
#[test]
fn a_long_service_list_plans_nothing_after_apply_in_a_new_process() {
    let s = Setup::new("");
    let mut crowd: Vec<String> = (0..95)
        .map(|i| {
            service(
                "crowd",
                &format!("svc-{i:02}"),
                &[("TCP", 31000 + i)],
                "203.0.113.0/24",
                None,
            )
        })
        .collect();
    let m = s.manifests(&[("aks-np1-0", "np1", "10.224.0.4")], &crowd);
    Cli::new()
        .apply(&s.args(&m, &["--yes"]))
        .expect_exit(0)
        .stdout_has(&["Apply complete: 1 added, 0 changed, 0 removed."]);
    let ours = s.ours();
    assert_eq!(ours.len(), 1, "{ours:#?}");
    let description = ours[0]["properties"]["description"].as_str().unwrap_or("");
    assert!(description.contains("services#"), "{description}");
    Cli::new()
        .plan(&s.args(&m, &[]))
        .expect_exit(0)
        .stdout_has(&["Plan: 0 to add, 0 to remove, 1 unchanged."]);

    // One Service breaks its annotation: the rule is kept whole, in a new process too.
    crowd[7] = crowd[7].replace("203.0.113.0/24", "203.0.113.0/24, not-a-cidr");
    let m = s.manifests(&[("aks-np1-0", "np1", "10.224.0.4")], &crowd);
    Cli::new()
        .plan(&s.args(&m, &[]))
        .expect_exit(0)
        .stdout_has(&["crowd/svc-07 has invalid annotations"]);
}
