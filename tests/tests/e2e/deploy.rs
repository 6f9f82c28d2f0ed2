//! The deployment artefacts: the Helm chart (`deploy/helm/nodeport-firewall`), the kustomize
//! base, overlays and components (`deploy/kustomize`), the cloud permission files
//! (`deploy/iam`), the ValidatingAdmissionPolicy, and the `Dockerfile`.
//!
//! No cluster is needed. `kubectl kustomize` renders the kustomize trees (kubectl is on every
//! machine of this project). `helm template` renders the chart when `helm` is on the PATH (or
//! `NPF_HELM` names it; `.ci/run` installs it with `deploy/hack/install-helm.sh`); without
//! it the chart tests say so and pass. Every rendered object is deserialized into its
//! `k8s-openapi` type and serialized back: a field the type does not know (a typo, a wrong
//! level) makes the round trip differ. The admission policy's CEL is evaluated with the `cel`
//! crate over a table of Services and checked against the planner's own verdict
//! (`nodeport_firewall_model::annotations::admit`). The image is built only with
//! `NPF_DOCKER_BUILD=1` and a working `docker info`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use nodeport_firewall_model::annotations::{Admission, admit};

/// The providers a deployed config may have sections for (the operator's registry).
const PROVIDERS: &[&str] = &["memory", "aws", "gcp", "azure"];
use nodeport_firewall_model::policy::floor_violations;
use nodeport_firewall_model::{Config, ServiceSpec};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::cli::{Scratch, binary, workspace};

mod monitoring;

fn deploy() -> PathBuf {
    workspace().join("deploy")
}

fn chart() -> PathBuf {
    deploy().join("helm/nodeport-firewall")
}

fn kustomize_dir(rel: &str) -> PathBuf {
    deploy().join("kustomize").join(rel)
}

// ---------------------------------------------------------------------------------------
// rendering

/// Splits a multi-document YAML stream into JSON objects, dropping empty documents.
fn documents(yaml: &str, source: &str) -> Vec<Value> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, doc) in yaml_serde::Deserializer::from_str(yaml).enumerate() {
        let value = Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{source}: document {}: not YAML: {e}", i + 1));
        if !value.is_null() {
            out.push(value);
        }
    }
    out
}

fn kubectl() -> PathBuf {
    let path = std::env::var_os("NPF_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("kubectl"));
    let ok = Command::new(&path)
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "kubectl is needed to render the kustomize trees (set NPF_KUBECTL to its path)"
    );
    path
}

/// `kubectl kustomize <dir>`, as JSON objects.
fn kustomize(dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    documents(
        &String::from_utf8_lossy(&out.stdout),
        &dir.display().to_string(),
    )
}

/// The helm binary. Without it the chart tests fail, as the moto tests do without
/// moto_server, unless `NPF_SKIP_HELM=1` says to skip them (then None).
fn helm() -> Option<PathBuf> {
    let path = std::env::var_os("NPF_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("helm"));
    let ok = Command::new(&path)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(path)
    } else if std::env::var("NPF_SKIP_HELM").as_deref() == Ok("1") {
        eprintln!("SKIPPED: helm is not installed; the chart was not rendered");
        None
    } else {
        panic!(
            "helm is not installed: run `bash deploy/hack/install-helm.sh`, set NPF_HELM to its path, or NPF_SKIP_HELM=1 to skip the chart tests"
        )
    }
}

/// `helm template <release> <chart> -n <namespace> <args>`: the output, or the error text.
fn helm_template(
    helm: &Path,
    release: &str,
    namespace: &str,
    args: &[&str],
) -> Result<String, String> {
    let out = Command::new(helm)
        .args(["template", release])
        .arg(chart())
        .args(["--namespace", namespace])
        .args(args)
        .output()
        .expect("run helm template");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn render_chart(helm: &Path, release: &str, namespace: &str, args: &[&str]) -> Vec<Value> {
    let text = helm_template(helm, release, namespace, args)
        .unwrap_or_else(|e| panic!("helm template {args:?}: {e}"));
    documents(&text, &format!("helm template {args:?}"))
}

fn full_values() -> String {
    chart().join("ci/full-values.yaml").display().to_string()
}

// ---------------------------------------------------------------------------------------
// validity of objects

/// Drops nulls and empty maps, which a typed round trip may add or drop.
fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalize(v)))
                .filter(|(_, v)| !matches!(v, Value::Object(m) if m.is_empty()))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        // A schema's `minimum: 1` is a float to the typed CRD: the same value.
        Value::Number(n) if n.is_f64() && n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
            n.as_f64().map(|f| json!(f as i64)).unwrap_or(Value::Null)
        }
        other => other.clone(),
    }
}

/// Deserializes `doc` into `T` and back: every field must be known to the type.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value, what: &str) {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: not a valid object of its kind: {e}\n{doc:#}"));
    let back = serde_json::to_value(&typed).expect("serialize");
    let (want, got) = (normalize(doc), normalize(&back));
    if want != got {
        panic!(
            "{what}: fields unknown to the Kubernetes type (typo or wrong level?)\nrendered: {want:#}\nas typed: {got:#}"
        );
    }
}

/// The prometheus-operator ServiceMonitor, as far as the chart uses it.
#[derive(Debug, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: ServiceMonitorSpec,
}

#[derive(Debug, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace_selector: Option<NamespaceSelector>,
    endpoints: Vec<ServiceMonitorEndpoint>,
}

#[derive(Debug, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(Debug, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorEndpoint {
    port: String,
    path: String,
    interval: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    scrape_timeout: Option<String>,
}

/// Checks every object and returns them by "Kind/name".
fn check_objects(objects: &[Value], source: &str) -> BTreeMap<String, Value> {
    let mut by_name = BTreeMap::new();
    for doc in objects {
        let api_version = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        assert!(
            !api_version.is_empty() && !kind.is_empty() && !name.is_empty(),
            "{source}: object without apiVersion, kind or metadata.name: {doc:#}"
        );
        let what = format!("{source}: {kind}/{name}");
        match (api_version, kind) {
            ("v1", "Namespace") => round_trip::<Namespace>(doc, &what),
            ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc, &what),
            ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc, &what),
            ("v1", "Service") => round_trip::<Service>(doc, &what),
            ("apps/v1", "Deployment") => round_trip::<Deployment>(doc, &what),
            ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(doc, &what),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                round_trip::<ClusterRole>(doc, &what)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                round_trip::<ClusterRoleBinding>(doc, &what)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(doc, &what),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                round_trip::<RoleBinding>(doc, &what)
            }
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
                round_trip::<ValidatingAdmissionPolicy>(doc, &what)
            }
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
                round_trip::<ValidatingAdmissionPolicyBinding>(doc, &what)
            }
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                round_trip::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(doc, &what)
            }
            ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                round_trip::<ServiceMonitor>(doc, &what)
            }
            ("monitoring.coreos.com/v1", "PrometheusRule") => {
                round_trip::<monitoring::PrometheusRule>(doc, &what)
            }
            _ => panic!("{what}: unexpected apiVersion/kind {api_version}/{kind}"),
        }
        let key = format!("{kind}/{name}");
        assert!(
            by_name.insert(key.clone(), doc.clone()).is_none(),
            "{source}: {key} twice"
        );
    }
    check_deployment(&by_name, source);
    check_rbac(&by_name, source);
    check_config(&by_name, source);
    by_name
}

fn one_of_kind<'a>(objects: &'a BTreeMap<String, Value>, kind: &str, source: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{kind}/")))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "{source}: one {kind}: {:?}", objects.keys());
    found[0]
}

fn args_of(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("container args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect()
}

/// Non-root, read-only root filesystem, no privilege escalation, no capabilities; the pod
/// runs as the ServiceAccount, mounts the ConfigMap that exists, and is probed on /healthz
/// and /readyz.
fn check_deployment(objects: &BTreeMap<String, Value>, source: &str) {
    let d = one_of_kind(objects, "Deployment", source);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{source}");
    assert!(
        pod["securityContext"]["runAsUser"].as_u64().unwrap_or(0) > 0,
        "{source}: runAsUser"
    );
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{source}"
    );
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{source}");
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{source}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{source}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{source}");
    assert!(sc.get("privileged").is_none_or(|p| p == false), "{source}");
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"], "/healthz",
        "{source}"
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"], "/readyz",
        "{source}"
    );
    let args = args_of(d);
    assert_eq!(args[0], "run", "{source}: {args:?}");
    assert!(
        args.contains(&"--config=/etc/nodeport-firewall/config.yaml".to_string()),
        "{source}: {args:?}"
    );
    let env: Vec<&str> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| e["name"].as_str().expect("env name"))
        .collect();
    assert!(
        env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"),
        "{source}: {env:?}"
    );
    // Leader election is on whenever more than one replica runs.
    let replicas = d["spec"]["replicas"].as_u64().unwrap_or(1);
    if replicas > 1 {
        assert!(
            args.contains(&"--leader-election".to_string()),
            "{source}: {args:?}"
        );
    }
    // The ServiceAccount and the ConfigMap it refers to are rendered.
    let sa = pod["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName");
    assert!(
        objects.contains_key(&format!("ServiceAccount/{sa}")),
        "{source}: {sa}"
    );
    let cm = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .expect("a ConfigMap volume");
    assert!(
        objects.contains_key(&format!("ConfigMap/{cm}")),
        "{source}: {cm}"
    );
    // The metrics Service selects the pods and targets the named port.
    for (key, svc) in objects.iter().filter(|(k, _)| k.starts_with("Service/")) {
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
            assert_eq!(&labels[k], v, "{source}: {key} selects the pods");
        }
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics", "{source}");
    }
}

/// The RBAC of issue 7, exactly: get/list/watch Services and Nodes, patch Service status,
/// create/patch Events, Leases in the operator's own namespace (when leader election is on);
/// nothing else, and no Secrets.
fn check_rbac(objects: &BTreeMap<String, Value>, source: &str) {
    type Rule = (String, String, Vec<String>, Vec<String>);
    fn rules(obj: &Value) -> BTreeSet<Rule> {
        let mut out = BTreeSet::new();
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| s.as_str().expect("string").to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        for r in obj["rules"].as_array().expect("rules") {
            let mut verbs = strings(&r["verbs"]);
            verbs.sort();
            let names = strings(&r["resourceNames"]);
            for g in strings(&r["apiGroups"]) {
                for res in strings(&r["resources"]) {
                    out.insert((g.clone(), res, verbs.clone(), names.clone()));
                }
            }
        }
        out
    }
    let rule = |g: &str, r: &str, verbs: &[&str], names: &[&str]| -> Rule {
        let mut verbs: Vec<String> = verbs.iter().map(|s| s.to_string()).collect();
        verbs.sort();
        (
            g.to_string(),
            r.to_string(),
            verbs,
            names.iter().map(|s| s.to_string()).collect(),
        )
    };
    let cluster_role = one_of_kind(objects, "ClusterRole", source);
    let want: BTreeSet<Rule> = [
        rule("", "services", &["get", "list", "watch"], &[]),
        rule("", "nodes", &["get", "list", "watch"], &[]),
        rule("", "services/status", &["patch"], &[]),
        rule("", "namespaces", &["get", "list", "watch"], &[]),
        rule(
            "nodeport-firewall.io",
            "nodeportfirewallpolicies",
            &["get", "list", "watch"],
            &[],
        ),
        rule(
            "nodeport-firewall.io",
            "nodeportfirewallpolicies/status",
            &["patch"],
            &[],
        ),
        rule("events.k8s.io", "events", &["create"], &[]),
    ]
    .into_iter()
    .collect();
    assert_eq!(rules(cluster_role), want, "{source}: ClusterRole rules");

    let deployment = one_of_kind(objects, "Deployment", source);
    let args = args_of(deployment);
    let lease = args
        .iter()
        .find_map(|a| a.strip_prefix("--lease-name="))
        .map(str::to_string);
    let roles: Vec<&Value> = objects
        .iter()
        .filter(|(k, _)| k.starts_with("Role/"))
        .map(|(_, v)| v)
        .collect();
    match &lease {
        Some(lease) => {
            assert_eq!(roles.len(), 1, "{source}: one Role for the Lease");
            let want: BTreeSet<Rule> = [
                rule("coordination.k8s.io", "leases", &["create"], &[]),
                rule(
                    "coordination.k8s.io",
                    "leases",
                    &["get", "update"],
                    &[lease],
                ),
            ]
            .into_iter()
            .collect();
            assert_eq!(rules(roles[0]), want, "{source}: Role rules");
            // In the operator's own namespace.
            assert_eq!(
                roles[0]["metadata"]["namespace"], deployment["metadata"]["namespace"],
                "{source}: the Role is in the operator's namespace"
            );
        }
        None => assert!(
            roles.is_empty(),
            "{source}: no Role without leader election"
        ),
    }
    // Every binding binds what exists to the operator's ServiceAccount.
    let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"].clone();
    for (key, b) in objects
        .iter()
        .filter(|(k, _)| k.starts_with("ClusterRoleBinding/") || k.starts_with("RoleBinding/"))
    {
        let role_key = format!(
            "{}/{}",
            b["roleRef"]["kind"].as_str().expect("roleRef.kind"),
            b["roleRef"]["name"].as_str().expect("roleRef.name")
        );
        assert!(
            objects.contains_key(&role_key),
            "{source}: {key} -> {role_key}"
        );
        assert_eq!(
            b["subjects"].as_array().expect("subjects").len(),
            1,
            "{source}: {key}"
        );
        assert_eq!(
            b["subjects"][0]["kind"], "ServiceAccount",
            "{source}: {key}"
        );
        assert_eq!(b["subjects"][0]["name"], sa, "{source}: {key}");
        assert_eq!(
            b["subjects"][0]["namespace"], deployment["metadata"]["namespace"],
            "{source}: {key}"
        );
    }
    // Nothing grants anything else: no wildcard, no Secrets, in any object.
    for (key, obj) in objects {
        let text = obj.to_string();
        if key.starts_with("ClusterRole/") || key.starts_with("Role/") {
            assert!(!text.contains("\"*\""), "{source}: {key} has a wildcard");
            assert!(
                !text.contains("secrets"),
                "{source}: {key} mentions Secrets"
            );
        }
    }
}

/// The one ConfigMap that holds the operator config (the dashboard's is another).
fn config_map<'a>(objects: &'a BTreeMap<String, Value>, source: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|(k, v)| k.starts_with("ConfigMap/") && v["data"]["config.yaml"].is_string())
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{source}: one config ConfigMap: {:?}",
        objects.keys()
    );
    found[0]
}

/// The ConfigMap's config.yaml is a valid operator config.
fn check_config(objects: &BTreeMap<String, Value>, source: &str) {
    let cm = config_map(objects, source);
    let text = cm["data"]["config.yaml"]
        .as_str()
        .expect("data.config.yaml");
    Config::from_yaml(text, PROVIDERS)
        .unwrap_or_else(|e| panic!("{source}: config.yaml: {e}\n{text}"));
}

fn kinds(objects: &BTreeMap<String, Value>) -> BTreeSet<String> {
    objects
        .keys()
        .map(|k| k.split('/').next().expect("kind").to_string())
        .collect()
}

fn sa_annotations(objects: &BTreeMap<String, Value>, source: &str) -> Value {
    one_of_kind(objects, "ServiceAccount", source)["metadata"]["annotations"].clone()
}

// ---------------------------------------------------------------------------------------
// kustomize

const CORE_KINDS: &[&str] = &[
    "ClusterRole",
    "ClusterRoleBinding",
    "ConfigMap",
    "Deployment",
    "PodDisruptionBudget",
    "Role",
    "RoleBinding",
    "Service",
    "ServiceAccount",
];

#[test]
fn kustomize_renders_the_base_and_every_overlay_into_valid_objects() {
    let base = check_objects(&kustomize(&kustomize_dir("base")), "base");
    let mut want: BTreeSet<String> = CORE_KINDS.iter().map(|s| s.to_string()).collect();
    want.insert("Namespace".into());
    want.insert("CustomResourceDefinition".into());
    assert_eq!(kinds(&base), want);
    let d = one_of_kind(&base, "Deployment", "base");
    assert!(args_of(d).contains(&"--provider=memory".to_string()));
    assert_eq!(d["metadata"]["namespace"], "nodeport-firewall");

    // (overlay, provider, ServiceAccount annotation, pod label)
    let overlays = [
        ("aws", "eks.amazonaws.com/role-arn", None),
        ("gcp", "iam.gke.io/gcp-service-account", None),
        (
            "azure",
            "azure.workload.identity/client-id",
            Some("azure.workload.identity/use"),
        ),
    ];
    let listed: BTreeSet<String> = std::fs::read_dir(kustomize_dir("overlays"))
        .expect("deploy/kustomize/overlays")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        listed,
        overlays.iter().map(|o| o.0.to_string()).collect(),
        "every overlay is tested"
    );
    for (name, annotation, label) in overlays {
        let source = format!("overlays/{name}");
        let objects = check_objects(&kustomize(&kustomize_dir(&source)), &source);
        assert_eq!(kinds(&objects), want, "{source}");
        let d = one_of_kind(&objects, "Deployment", &source);
        let args = args_of(d);
        assert!(
            args.contains(&format!("--provider={name}")),
            "{source}: {args:?}"
        );
        assert!(!args.contains(&"--provider=memory".to_string()), "{source}");
        let annotations = sa_annotations(&objects, &source);
        assert!(
            annotations[annotation].is_string(),
            "{source}: {annotations}"
        );
        if let Some(label) = label {
            assert_eq!(
                d["spec"]["template"]["metadata"]["labels"][label], "true",
                "{source}"
            );
        }
        let cm = one_of_kind(&objects, "ConfigMap", &source);
        let config: yaml_serde::Value =
            yaml_serde::from_str(cm["data"]["config.yaml"].as_str().expect("config"))
                .expect("yaml");
        assert!(
            config.get(name).is_some(),
            "{source}: the config has an `{name}:` section"
        );
    }
}

#[test]
fn kustomize_components_add_dry_run_and_the_admission_policy() {
    // A user's overlay on top of ours. kustomize wants relative paths to other kustomizations.
    let dir = Scratch::new();
    let here = dir.path("").canonicalize().expect("the scratch directory");
    let relative = |to: PathBuf| -> String {
        let to = to.canonicalize().expect("a deploy/ directory");
        let up = "../".repeat(here.components().count() - 1);
        format!("{up}{}", to.strip_prefix("/").expect("absolute").display())
    };
    let components = kustomize_dir("components");
    dir.write(
        "kustomization.yaml",
        &format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n  - {}\n  - {}\n",
            relative(kustomize_dir("overlays/aws")),
            relative(components.join("dry-run")),
            relative(components.join("admission-policy"))
        ),
    );
    let objects = check_objects(&kustomize(&dir.path("")), "aws + components");
    let args = args_of(one_of_kind(&objects, "Deployment", "aws + components"));
    assert!(args.contains(&"--dry-run".to_string()), "{args:?}");
    assert!(args.contains(&"--provider=aws".to_string()), "{args:?}");
    let vap = one_of_kind(&objects, "ValidatingAdmissionPolicy", "components");
    let binding = one_of_kind(&objects, "ValidatingAdmissionPolicyBinding", "components");
    assert_eq!(binding["spec"]["policyName"], vap["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    // Cluster-scoped: no namespace even though the overlay sets one.
    assert!(vap["metadata"].get("namespace").is_none());
}

// ---------------------------------------------------------------------------------------
// Helm

#[test]
fn helm_chart_renders_with_default_values() {
    let Some(helm) = helm() else { return };
    let objects = check_objects(
        &render_chart(&helm, "nodeport-firewall", "nodeport-firewall", &[]),
        "chart defaults",
    );
    assert_eq!(
        kinds(&objects),
        CORE_KINDS.iter().map(|s| s.to_string()).collect(),
        "the chart's defaults render the same kinds as the kustomize base (bar the Namespace)"
    );
    let d = one_of_kind(&objects, "Deployment", "defaults");
    let args = args_of(d);
    for want in [
        "--provider=memory",
        "--leader-election",
        "--lease-name=nodeport-firewall",
    ] {
        assert!(args.contains(&want.to_string()), "{args:?}");
    }
    assert!(!args.contains(&"--dry-run".to_string()));
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/nodeport-firewall/nodeport-firewall:0.1.0"
    );
    assert!(sa_annotations(&objects, "defaults").is_null());
    let cm = config_map(&objects, "defaults");
    let config = Config::from_yaml(
        cm["data"]["config.yaml"].as_str().expect("config"),
        PROVIDERS,
    )
    .expect("config");
    assert_eq!(
        config.cluster_name, "nodeport-firewall",
        "memory: the release name"
    );

    // The chart's defaults and the kustomize base make the same pod, bar names and labels.
    let base = check_objects(&kustomize(&kustomize_dir("base")), "base");
    let pod = |objects: &BTreeMap<String, Value>, source: &str| {
        let mut c =
            one_of_kind(objects, "Deployment", source)["spec"]["template"]["spec"]["containers"][0]
                .clone();
        c["volumeMounts"] = Value::Null;
        c
    };
    assert_eq!(pod(&objects, "chart"), pod(&base, "base"));
    for kind in ["ClusterRole", "Role"] {
        assert_eq!(
            one_of_kind(&objects, kind, "chart")["rules"],
            one_of_kind(&base, kind, "base")["rules"],
            "{kind}"
        );
    }
}

#[test]
fn helm_chart_renders_with_every_value_set() {
    let Some(helm) = helm() else { return };
    let source = "chart full values";
    let objects = check_objects(
        &render_chart(&helm, "x", "ops", &["-f", &full_values()]),
        source,
    );
    let mut want: BTreeSet<String> = CORE_KINDS.iter().map(|s| s.to_string()).collect();
    for k in [
        "PrometheusRule",
        "ServiceMonitor",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        want.insert(k.to_string());
    }
    assert_eq!(kinds(&objects), want);
    let d = one_of_kind(&objects, "Deployment", source);
    assert_eq!(d["metadata"]["name"], "edge-firewall");
    assert_eq!(d["metadata"]["namespace"], "ops");
    assert_eq!(d["spec"]["replicas"], 3);
    let args = args_of(d);
    for want in [
        "--provider=aws",
        "--dry-run",
        "--leader-election",
        "--lease-name=npf-leader",
        "--lease-duration=20s",
        "--debounce=2s",
        "--resync-interval=10m",
        "--metrics-addr=0.0.0.0:9090",
        "--log-format=text",
        "--log-level=nodeport_firewall=debug,info",
    ] {
        assert!(args.contains(&want.to_string()), "{want}: {args:?}");
    }
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"],
        "registry.example.com/platform/nodeport-firewall@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(c["resources"]["limits"]["memory"], "512Mi");
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    assert!(c["env"].to_string().contains("AWS_STS_REGIONAL_ENDPOINTS"));
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["tolerations"][0]["key"], "CriticalAddonsOnly");
    assert!(pod["affinity"]["podAntiAffinity"].is_object());
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(pod["imagePullSecrets"][0]["name"], "registry-credentials");
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert_eq!(pod["serviceAccountName"], "edge-firewall-sa");
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["azure.workload.identity/use"], "true");
    assert_eq!(labels["example.com/tier"], "infra");
    let pod_annotations = &d["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(pod_annotations["example.com/team"], "platform");
    assert!(pod_annotations["checksum/config"].is_string());

    assert_eq!(
        sa_annotations(&objects, source),
        json!({
            "example.com/owner": "platform",
            "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/nodeport-firewall",
            "iam.gke.io/gcp-service-account": "nodeport-firewall@my-project.iam.gserviceaccount.com",
            "azure.workload.identity/client-id": "00000000-0000-0000-0000-000000000001",
            "azure.workload.identity/tenant-id": "00000000-0000-0000-0000-000000000002",
        })
    );
    let cm = config_map(&objects, source);
    let config = Config::from_yaml(
        cm["data"]["config.yaml"].as_str().expect("config"),
        PROVIDERS,
    )
    .expect("config");
    assert_eq!(config.cluster_name, "prod-eu");
    assert!(config.manage_all_node_port_services);
    assert_eq!(config.policy.max_ranges_per_service, 16);

    let pdb = one_of_kind(&objects, "PodDisruptionBudget", source);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let monitor = one_of_kind(&objects, "ServiceMonitor", source);
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");
    let svc = one_of_kind(&objects, "Service", source);
    assert_eq!(svc["spec"]["ports"][0]["port"], 9090);
    assert_eq!(
        svc["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    let binding = one_of_kind(&objects, "ValidatingAdmissionPolicyBinding", source);
    assert_eq!(
        binding["spec"]["validationActions"],
        json!(["Warn", "Audit"])
    );
    // The policy follows the config: manageAllNodePortServices is true there.
    let vap = one_of_kind(&objects, "ValidatingAdmissionPolicy", source);
    let policy = Policy::from_object(vap);
    assert_eq!(policy.variable("manageAllNodePortServices").trim(), "true");
    assert_eq!(policy.variable("allowWorldOpen").trim(), "false");
}

#[test]
fn helm_chart_single_replica_has_no_pdb_and_no_lease_role_without_election() {
    let Some(helm) = helm() else { return };
    let objects = check_objects(
        &render_chart(
            &helm,
            "npf",
            "kube-system",
            &[
                "--set",
                "replicaCount=1,leaderElection.enabled=false,metrics.service.enabled=false",
            ],
        ),
        "single replica",
    );
    let mut want: BTreeSet<String> = CORE_KINDS.iter().map(|s| s.to_string()).collect();
    for k in ["PodDisruptionBudget", "Role", "RoleBinding", "Service"] {
        want.remove(k);
    }
    assert_eq!(kinds(&objects), want);
    let args = args_of(one_of_kind(&objects, "Deployment", "single"));
    assert!(!args.iter().any(|a| a.contains("lease")), "{args:?}");
}

#[test]
fn helm_values_schema_rejects_bad_values() {
    let Some(helm) = helm() else { return };
    // (values, what the error must say)
    let cases: &[(&[&str], &str)] = &[
        (&["--set", "provider=oracle"], "provider"),
        (&["--set", "replicaCount=0"], "replicaCount"),
        (&["--set", "replicaCount=two"], "replicaCount"),
        (&["--set", "dryRun=maybe"], "dryRun"),
        (&["--set", "provider=aws"], "allOf"),
        (
            &["--set", "replicaCount=2,leaderElection.enabled=false"],
            "allOf",
        ),
        (&["--set", "clusterName=has space"], "clusterName"),
        (&["--set", "config.policy.portMerge=wide"], "portMerge"),
        (
            &["--set", "config.policy.maxRangesPerService=0"],
            "maxRangesPerService",
        ),
        (&["--set", "config.clusterName=x"], "clusterName"),
        (
            &["--set", "config.manageAllNodePortServicez=true"],
            "manageAllNodePortServicez",
        ),
        (
            &["--set", "config.pools.bad_pool!.managed=false"],
            "bad_pool!",
        ),
        (&["--set", "logFormat=xml"], "logFormat"),
        (&["--set", "reconcile.debounce=soon"], "debounce"),
        (
            &["--set", "leaderElection.leaseDuration=15 s"],
            "leaseDuration",
        ),
        (&["--set", "image.digest=latest"], "digest"),
        (&["--set", "cloudIdentity.aws.roleArn=my-role"], "roleArn"),
        (
            &["--set", "cloudIdentity.azure.clientId=not-a-guid"],
            "clientId",
        ),
        (
            &["--set", "cloudIdentity.gcp.serviceAccount=me@gmail.com"],
            "serviceAccount",
        ),
        (&["--set", "metrics.port=80"], "port"),
        (
            &["--set", "admissionPolicy.validationActions={Block}"],
            "validationActions",
        ),
        (&["--set", "unknownTopLevel=1"], "unknownTopLevel"),
    ];
    for (args, needle) in cases {
        let err = helm_template(&helm, "t", "t", args)
            .map(|_| ())
            .expect_err(&format!("{args:?} must be refused"));
        assert!(
            err.contains("schema") && err.contains(needle),
            "{args:?}: want the schema to name {needle:?}: {err}"
        );
    }
    // The template's own guard, for values the schema lets through.
    let err = helm_template(
        &helm,
        "t",
        "t",
        &[
            "--set",
            "metrics.service.enabled=false,metrics.serviceMonitor.enabled=true",
        ],
    )
    .expect_err("a ServiceMonitor without the Service");
    assert!(
        err.contains("metrics.serviceMonitor.enabled needs metrics.service.enabled"),
        "{err}"
    );
    // The admission policy needs Kubernetes 1.30; the rest runs on 1.25.
    let err = helm_template(
        &helm,
        "t",
        "t",
        &[
            "--kube-version",
            "1.29.0",
            "--set",
            "admissionPolicy.enabled=true",
        ],
    )
    .expect_err("a ValidatingAdmissionPolicy on 1.29");
    assert!(
        err.contains("admissionPolicy.enabled needs Kubernetes 1.30"),
        "{err}"
    );
    helm_template(&helm, "t", "t", &["--kube-version", "1.25.0"]).expect("1.25 is enough");
    helm_template(&helm, "t", "t", &["--kube-version", "1.24.0"]).expect_err("1.24 is not");
    // And good values pass.
    for args in [
        &["--set", "provider=aws,clusterName=prod"][..],
        &[
            "--set",
            "provider=gcp,clusterName=prod,cloudIdentity.gcp.serviceAccount=nodeport-firewall@my-project.iam.gserviceaccount.com",
        ],
        &[
            "--set",
            "provider=azure,clusterName=prod,cloudIdentity.azure.clientId=00000000-0000-0000-0000-000000000000",
        ],
        &["--set", "replicaCount=1,leaderElection.enabled=false"],
    ] {
        let objects = documents(
            &helm_template(&helm, "t", "t", args).unwrap_or_else(|e| panic!("{args:?}: {e}")),
            "good values",
        );
        check_objects(&objects, &format!("{args:?}"));
    }
}

/// Every value of values.yaml is in the table of docs/install.md (as `a.b` or `.b` after
/// `a.…`), and every top-level value is in values.schema.json.
#[test]
fn every_chart_value_is_documented_and_in_the_schema() {
    fn leaves(v: &yaml_serde::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        // Free-form maps are documented as a whole.
        const WHOLE: &[&str] = &[
            "config",
            "resources",
            "podSecurityContext",
            "securityContext",
        ];
        match v.as_mapping() {
            Some(m)
                if !m.is_empty() && !path.last().is_some_and(|k| WHOLE.contains(&k.as_str())) =>
            {
                for (k, v) in m {
                    path.push(k.as_str().expect("a string key").to_string());
                    leaves(v, path, out);
                    path.pop();
                }
            }
            _ => out.push(path.clone()),
        }
    }
    let values: yaml_serde::Value = yaml_serde::from_str(
        &std::fs::read_to_string(chart().join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml is YAML");
    let mut all = Vec::new();
    leaves(&values, &mut Vec::new(), &mut all);
    assert!(all.len() > 30, "{all:?}");
    // The monitoring values are documented with the alerts they tune (operations.md).
    let install = ["docs/install.md", "docs/operations.md"]
        .map(|d| std::fs::read_to_string(workspace().join(d)).expect(d))
        .join("\n");
    for path in &all {
        let full = path.join(".");
        let last = path.last().expect("a key");
        let documented = install.contains(&format!("`{full}`"))
            || install.contains(&format!("`{full} "))
            || (path.len() > 1 && install.contains(&format!("`.{last}`")));
        assert!(
            documented,
            "docs/install.md (or operations.md) documents the value {full}"
        );
    }
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("values.schema.json")).expect("values.schema.json"),
    )
    .expect("the schema is JSON");
    let properties = schema["properties"].as_object().expect("properties");
    for key in values.as_mapping().expect("a map").keys() {
        let key = key.as_str().expect("a string key");
        assert!(
            properties.contains_key(key),
            "values.schema.json describes {key}"
        );
    }
}

#[test]
fn helm_and_kustomize_ship_the_same_admission_policy() {
    let Some(helm) = helm() else { return };
    let objects = check_objects(
        &render_chart(
            &helm,
            "nodeport-firewall",
            "nodeport-firewall",
            &["--set", "admissionPolicy.enabled=true"],
        ),
        "chart with the admission policy",
    );
    let component = kustomize_policy();
    let vap = one_of_kind(&objects, "ValidatingAdmissionPolicy", "chart");
    assert_eq!(vap["metadata"]["name"], component["metadata"]["name"]);
    assert_eq!(
        vap["spec"], component["spec"],
        "the chart's policy is the component's"
    );
}

/// Every Deployment we ship passes flags the binary accepts: `run <args> --help` parses
/// all of them (an unknown flag or a bad value fails before the help is printed).
#[test]
fn the_binary_accepts_the_rendered_arguments() {
    let mut renders: Vec<(String, Vec<Value>)> =
        vec![("base".into(), kustomize(&kustomize_dir("base")))];
    for overlay in ["aws", "gcp", "azure"] {
        let dir = kustomize_dir(&format!("overlays/{overlay}"));
        renders.push((format!("overlays/{overlay}"), kustomize(&dir)));
    }
    if let Some(helm) = helm() {
        renders.push((
            "chart defaults".into(),
            render_chart(&helm, "npf", "npf", &[]),
        ));
        renders.push((
            "chart full values".into(),
            render_chart(&helm, "npf", "npf", &["-f", &full_values()]),
        ));
    }
    // A flag the binary does not know fails: the check can fail.
    let run = Command::new(binary())
        .args(["run", "--no-such-flag", "--help"])
        .output()
        .expect("run the binary");
    assert!(!run.status.success(), "an unknown flag is refused");
    for (source, objects) in renders {
        let objects = check_objects(&objects, &source);
        let args = args_of(one_of_kind(&objects, "Deployment", &source));
        let run = Command::new(binary())
            .args(&args)
            .arg("--help")
            .env_remove("NPF_CONFIG")
            .env_remove("NPF_PROVIDER")
            .output()
            .expect("run the binary");
        assert!(
            run.status.success(),
            "{source}: the binary refuses {args:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
}

/// The `helm install` commands of README.md and docs/install.md, as `helm template`.
#[test]
fn the_documented_helm_commands_render() {
    let Some(helm) = helm() else { return };
    let mut commands = Vec::new();
    for doc in ["README.md", "docs/install.md"] {
        let text = std::fs::read_to_string(workspace().join(doc)).expect(doc);
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if !line.starts_with("helm install ") {
                continue;
            }
            let mut command = line.to_string();
            while command.ends_with('\\') {
                command.pop();
                command.push_str(lines.next().expect("a continued line"));
            }
            commands.push((doc, command));
        }
    }
    assert!(commands.len() >= 2, "{commands:?}");
    for (doc, command) in commands {
        let words: Vec<&str> = command.split_whitespace().collect();
        // helm install RELEASE CHART ... -> helm template RELEASE CHART ...
        let args: Vec<&str> = words[2..]
            .iter()
            .copied()
            .filter(|w| *w != "--create-namespace")
            .collect();
        let out = Command::new(&helm)
            .arg("template")
            .args(&args)
            .current_dir(workspace())
            .output()
            .expect("helm template");
        assert!(
            out.status.success(),
            "{doc}: {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let objects = check_objects(
            &documents(&String::from_utf8_lossy(&out.stdout), doc),
            &format!("{doc}: {command}"),
        );
        let args = args_of(one_of_kind(&objects, "Deployment", doc));
        assert!(
            args.contains(&"--provider=aws".to_string()),
            "{doc}: {args:?}"
        );
        assert!(
            args.contains(&"--dry-run".to_string()),
            "{doc}: first install in dry run"
        );
    }
}

/// The overlay of docs/install.md ("my-cluster"), built as a user would next to the repo.
#[test]
fn the_documented_kustomize_overlay_renders() {
    let text = std::fs::read_to_string(workspace().join("docs/install.md")).expect("install.md");
    let block = text
        .split("# my-cluster/kustomization.yaml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("the my-cluster overlay in docs/install.md");
    let dir = Scratch::new();
    // The doc's overlay sits next to the repository: ../deploy is our deploy/.
    std::fs::create_dir_all(dir.path("my-cluster")).expect("mkdir");
    let here = dir
        .path("my-cluster")
        .canonicalize()
        .expect("the scratch directory");
    let up = "../".repeat(here.components().count() - 1);
    let deploy_dir = deploy().canonicalize().expect("deploy/");
    let deploy_rel = format!(
        "{up}{}",
        deploy_dir.strip_prefix("/").expect("absolute").display()
    );
    dir.write(
        "my-cluster/kustomization.yaml",
        &block.replace("../deploy", &deploy_rel),
    );
    dir.write(
        "my-cluster/config.yaml",
        "clusterName: prod-eu\naws:\n  region: eu-west-1\n",
    );
    let objects = check_objects(&kustomize(&here), "docs/install.md my-cluster");
    let args = args_of(one_of_kind(&objects, "Deployment", "my-cluster"));
    assert!(args.contains(&"--provider=aws".to_string()), "{args:?}");
    assert!(args.contains(&"--dry-run".to_string()), "{args:?}");
    assert!(objects.contains_key("ValidatingAdmissionPolicy/nodeport-firewall-annotations"));
    assert_eq!(
        sa_annotations(&objects, "my-cluster")["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::444455556666:role/npf-prod"
    );
}

// ---------------------------------------------------------------------------------------
// cloud permissions

#[test]
fn iam_files_match_the_docs_and_parse() {
    let aws: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("iam/aws-policy.json"))
            .expect("deploy/iam/aws-policy.json"),
    )
    .expect("aws-policy.json is JSON");
    let doc = std::fs::read_to_string(workspace().join("docs/aws.md")).expect("docs/aws.md");
    let section = doc
        .split("### Least-privilege IAM policy")
        .nth(1)
        .expect("docs/aws.md has the IAM policy section");
    let block = section
        .split("```json\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a json block");
    let documented: Value = serde_json::from_str(block).expect("the documented policy is JSON");
    assert_eq!(
        aws, documented,
        "deploy/iam/aws-policy.json is the policy in docs/aws.md"
    );
    assert_eq!(aws["Version"], "2012-10-17");
    let actions: BTreeSet<String> = aws["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .flat_map(|s| match &s["Action"] {
            Value::String(a) => vec![a.clone()],
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().expect("action").to_string())
                .collect(),
            other => panic!("Action {other}"),
        })
        .collect();
    assert!(
        actions.iter().all(
            |a| (a.starts_with("ec2:") || a.starts_with("servicequotas:")) && !a.contains('*')
        ),
        "{actions:?}"
    );

    // Written alongside by the GCP and Azure providers' authors.
    let gcp = deploy().join("iam/gcp-custom-role.yaml");
    match std::fs::read_to_string(&gcp) {
        Ok(text) => {
            let role: yaml_serde::Value =
                yaml_serde::from_str(&text).expect("gcp-custom-role.yaml is YAML");
            let permissions = role
                .get("includedPermissions")
                .and_then(|p| p.as_sequence())
                .expect("includedPermissions");
            assert!(!permissions.is_empty());
            for p in permissions {
                let p = p.as_str().expect("a permission");
                assert!(p.starts_with("compute.") && !p.contains('*'), "{p}");
            }
        }
        Err(e) => panic!("{}: {e}", gcp.display()),
    }
    let azure = deploy().join("iam/azure-role.json");
    match std::fs::read_to_string(&azure) {
        Ok(text) => {
            let role: Value = serde_json::from_str(&text).expect("azure-role.json is JSON");
            if let Some(name) = role.get("Name").and_then(Value::as_str) {
                let install = std::fs::read_to_string(workspace().join("docs/install.md"))
                    .expect("docs/install.md");
                assert!(
                    install.contains(&format!("--role \"{name}\"")),
                    "docs/install.md assigns the role by its name {name:?}"
                );
            }
            let actions = role
                .get("Actions")
                .or_else(|| role.pointer("/properties/permissions/0/actions"))
                .or_else(|| role.pointer("/permissions/0/actions"))
                .and_then(Value::as_array)
                .expect("the role's actions");
            assert!(!actions.is_empty());
            for a in actions {
                let a = a.as_str().expect("an action");
                assert!(a.starts_with("Microsoft.") && !a.ends_with("/*"), "{a}");
            }
        }
        Err(e) => panic!("{}: {e}", azure.display()),
    }
}

// ---------------------------------------------------------------------------------------
// the admission policy against the planner's parser

/// The ValidatingAdmissionPolicy's expressions.
#[derive(Debug, Clone)]
struct Policy {
    match_conditions: Vec<String>,
    variables: Vec<(String, String)>,
    /// (expression, messageExpression)
    validations: Vec<(String, String)>,
}

impl Policy {
    fn from_object(vap: &Value) -> Self {
        let spec = &vap["spec"];
        let list = |key: &str| -> Vec<Value> { spec[key].as_array().cloned().unwrap_or_default() };
        let expr = |v: &Value| v["expression"].as_str().expect("expression").to_string();
        Policy {
            match_conditions: list("matchConditions").iter().map(expr).collect(),
            variables: list("variables")
                .iter()
                .map(|v| (v["name"].as_str().expect("name").to_string(), expr(v)))
                .collect(),
            validations: list("validations")
                .iter()
                .map(|v| {
                    let message = v["messageExpression"].as_str().expect("messageExpression");
                    (expr(v), message.to_string())
                })
                .collect(),
        }
    }

    fn variable(&self, name: &str) -> &str {
        &self
            .variables
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("variable {name}"))
            .1
    }

    /// The policy with the two config-dependent variables set.
    fn with_config(&self, manage_all: bool, allow_world_open: bool) -> Policy {
        let mut p = self.clone();
        for (name, expr) in &mut p.variables {
            match name.as_str() {
                "manageAllNodePortServices" => *expr = manage_all.to_string(),
                "allowWorldOpen" => *expr = allow_world_open.to_string(),
                _ => {}
            }
        }
        p
    }
}

/// The shipped policy (the kustomize component; the chart renders the same, see above).
fn kustomize_policy() -> Value {
    // A Component cannot be built alone: read its manifest.
    let text = std::fs::read_to_string(kustomize_dir(
        "components/admission-policy/admission-policy.yaml",
    ))
    .expect("the admission policy");
    documents(&text, "admission-policy.yaml")
        .into_iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .expect("a ValidatingAdmissionPolicy")
}

/// Kubernetes' CEL regex library: `'a b'.findAll('[a-z]')` lists the matches.
fn find_all(
    this: &cel::common::types::CelString<'_>,
    re: &cel::common::types::CelString<'_>,
) -> Result<cel::common::types::CelList<'static>, cel::ExecutionError> {
    let re = regex::Regex::new(re.inner())
        .map_err(|e| cel::ExecutionError::function_error("findAll", e.to_string()))?;
    Ok(re
        .find_iter(this.inner())
        .map(|m| {
            Box::new(cel::common::types::CelString::from(m.as_str().to_owned()))
                as Box<dyn cel::common::value::Val>
        })
        .collect::<Vec<_>>()
        .into())
}

/// The CEL environment of a ValidatingAdmissionPolicy, as far as the policy uses it: the
/// standard library, the strings extension and Kubernetes' `findAll`.
fn cel_env() -> Arc<cel::Env> {
    let mut env = cel::Env::stdlib();
    env.add_extension(cel::extensions::strings)
        .expect("strings extension");
    env.add_extension(|env: &mut cel::Env| {
        use cel::common::types::{CelList, CelString};
        cel::add_member_overload!(env, fn find_all: (CelString, CelString) -> Result<CelList>)?;
        Ok(())
    })
    .expect("findAll");
    Arc::new(env)
}

/// Admission of `object`: Ok(None) admitted, Ok(Some(message)) refused.
fn admits(env: &Arc<cel::Env>, policy: &Policy, object: &Value) -> Result<Option<String>, String> {
    let object = cel::to_value(object).map_err(|e| e.to_string())?;
    let eval = |expr: &str, vars: &HashMap<String, cel::Value>| -> Result<cel::Value, String> {
        let program = env.compile(expr).map_err(|e| format!("{expr}: {e}"))?;
        let mut ctx = cel::Context::with_env(Arc::clone(env));
        ctx.add_variable_from_value("object", object.clone());
        ctx.add_variable_from_value("variables", vars.clone());
        program.execute(&ctx).map_err(|e| format!("{expr}: {e}"))
    };
    let mut vars: HashMap<String, cel::Value> = HashMap::new();
    for cond in &policy.match_conditions {
        if eval(cond, &vars)? != cel::Value::Bool(true) {
            return Ok(None);
        }
    }
    for (name, expr) in &policy.variables {
        let value = eval(expr, &vars)?;
        vars.insert(name.clone(), value);
    }
    for (v, message) in &policy.validations {
        match eval(v, &vars)? {
            cel::Value::Bool(true) => {}
            cel::Value::Bool(false) => {
                return match eval(message, &vars)? {
                    cel::Value::String(m) => Ok(Some(m.to_string())),
                    other => Err(format!("{message}: not a string: {other:?}")),
                };
            }
            other => return Err(format!("{v}: not a bool: {other:?}")),
        }
    }
    Ok(None)
}

fn service(ty: &str, annotations: &[(&str, &str)]) -> Value {
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s", "namespace": "ns", "annotations": annotations},
        "spec": {
            "type": ty,
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
                {"name": "dns-udp", "port": 53, "protocol": "UDP", "nodePort": 30053},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 30053},
            ],
        },
    })
}

/// The planner's verdict: the errors that make the Service invalid, if it is.
fn planner_refuses(
    object: &Value,
    manage_all: bool,
    allow_world_open: bool,
) -> Option<Vec<String>> {
    let svc: Service = serde_json::from_value(object.clone()).expect("a Service");
    let spec = ServiceSpec::from_k8s(&svc).expect("a ServiceSpec");
    let config = Config::from_yaml(&format!(
        "clusterName: t\nmanageAllNodePortServices: {manage_all}\npolicy:\n  allowWorldOpen: {allow_world_open}\n"
    ),
PROVIDERS)
    .expect("config");
    match admit(&spec, &config) {
        Admission::Invalid { errors, .. } => Some(errors),
        // The floor closes what the annotation asks for (the planner's other refusal).
        Admission::Managed(intent) => {
            let refused = floor_violations(&config.policy, &intent.sources);
            (!refused.is_empty()).then(|| {
                refused
                    .into_iter()
                    .map(|r| format!("{RANGES}: {r}"))
                    .collect()
            })
        }
        Admission::Unmanaged { .. } => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Both admit.
    Valid,
    /// Both refuse.
    Invalid,
    /// Only the operator can tell (merging, counts): the policy admits, the planner refuses.
    OperatorOnly,
}

/// (annotations, Service type, manageAllNodePortServices, allowWorldOpen, want)
type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, bool, bool, Want);

const ENABLED: &str = "nodeport-firewall.io/enabled";
const RANGES: &str = "nodeport-firewall.io/allowed-source-ranges";
const POOLS: &str = "nodeport-firewall.io/node-pools";
const PORTS: &str = "nodeport-firewall.io/ports";

#[test]
fn admission_policy_agrees_with_the_annotation_parser() {
    use Want::*;
    let env = cel_env();
    let shipped = Policy::from_object(&kustomize_policy());
    assert_eq!(
        shipped.variable("manageAllNodePortServices").trim(),
        "false"
    );
    assert_eq!(shipped.variable("allowWorldOpen").trim(), "false");

    let many_hosts: String = (0..33).map(|i| format!("10.0.{i}.1 ")).collect();
    let pool63 = "p".repeat(63);
    let pool64 = "p".repeat(64);
    // (allowed-source-ranges value, allowWorldOpen, want)
    let ranges: Vec<(&str, bool, Want)> = vec![
        ("10.0.0.0/8", false, Valid),
        ("10.0.0.0/8, 192.168.0.0/16", false, Valid),
        ("10.0.0.0/8 192.168.0.0/16", false, Valid),
        (" 10.0.0.0/8 ,, 2001:db8::/32 ", false, Valid),
        ("10.0.0.0/8\n192.168.1.0/24\n", false, Valid),
        ("10.0.0.0/8\u{a0}192.168.0.0/16", false, Valid),
        ("10.0.0.0/8\u{3000}10.1.0.0/16\u{2028}", false, Valid),
        ("203.0.113.7", false, Valid),
        ("2001:db8::1", false, Valid),
        ("10.20.30.40/24", false, Valid),
        ("010.0.0.0/8", false, Valid),
        ("10.0.0.0/08", false, Valid),
        ("2001:db8::/064", false, Valid),
        ("::ffff:1.2.3.4", false, Valid),
        ("::ffff:1.2.3.4/128", false, Valid),
        ("1:2:3:4:5:6:7::8/64", false, Valid),
        ("1:2:3:4:5:6:7:8", false, Valid),
        ("1:2:3:4:5:6:1.2.3.4", false, Valid),
        ("::1", false, Valid),
        ("FE80::1", false, Valid),
        ("fe80::/10", false, Valid),
        ("0.0.0.0/0", true, Valid),
        ("::/0, 10.0.0.0/8", true, Valid),
        ("10.0.0.0/33", false, Invalid),
        ("nope", false, Invalid),
        ("", false, Invalid),
        (" , \n", false, Invalid),
        ("10.0.0.0/8, nope", false, Invalid),
        ("010.0.0.1", false, Invalid),
        ("256.0.0.0/8", false, Invalid),
        ("10.0.0/8", false, Invalid),
        ("1.2.3.4.5", false, Invalid),
        ("2001:db8::/129", false, Invalid),
        ("2001:db8::/0128", false, Invalid),
        ("10.0.0.0/032", false, Invalid),
        ("1:2:3:4:5:6:7::8", false, Invalid),
        ("::ffff:01.2.3.4", false, Invalid),
        ("1::2::3", false, Invalid),
        ("12345::", false, Invalid),
        ("fe80::1%eth0", false, Invalid),
        ("10.0.0.0/8;10.1.0.0/16", false, Invalid),
        ("0.0.0.0/0", false, Invalid),
        ("::/0", false, Invalid),
        ("10.0.0.0/8 ::/0", false, Invalid),
        ("1.2.3.4/0", false, Invalid),
        ("0.0.0.0/00", false, Invalid),
        // The floor: world-open by coverage, and no range wider than minPrefixLength.
        ("0.0.0.0/1, 128.0.0.0/1", false, Invalid),
        ("0.0.0.0/1, 128.0.0.0/2, 192.0.0.0/3", false, Invalid),
        ("::/1", false, Invalid),
        ("2000::/3", false, Invalid),
        ("0.0.0.0/7", false, Invalid),
        ("10.0.0.0/8, 11.0.0.0/8", false, OperatorOnly), // merged: a /7
        ("fd00::/8", false, Valid),
        ("172.16.0.0/12, 192.168.0.0/16, fd00::/8", false, Valid),
        // With allowWorldOpen the policy leaves prefixes to the operator: half the Internet is
        // refused there, all of it is allowed.
        ("0.0.0.0/1", true, OperatorOnly),
        ("0.0.0.0/1, 128.0.0.0/1", true, Valid),
        (&many_hosts, false, OperatorOnly),
    ];
    // (annotations, type, manageAllNodePortServices, want)
    let mut cases: Vec<Case> = Vec::new();
    for (value, world, want) in &ranges {
        cases.push((
            vec![(ENABLED, "true"), (RANGES, value)],
            "NodePort",
            false,
            *world,
            *want,
        ));
    }
    let ok = (RANGES, "10.0.0.0/8");
    for (value, want) in [
        ("web", Valid),
        ("web edge", Valid),
        ("web,edge", Valid),
        ("a", Valid),
        ("a.b_c-d", Valid),
        (pool63.as_str(), Valid),
        ("", Invalid),
        ("  ", Invalid),
        ("bad_pool!", Invalid),
        ("-web", Invalid),
        ("web-", Invalid),
        (pool64.as_str(), Invalid),
        ("web, bad!", Invalid),
        ("wéb", Invalid),
    ] {
        cases.push((
            vec![(ENABLED, "true"), ok, (POOLS, value)],
            "NodePort",
            false,
            false,
            want,
        ));
    }
    for (value, want) in [
        ("http", Valid),
        ("80", Valid),
        ("53", Valid),
        ("http, 53", Valid),
        ("dns-udp dns-tcp", Valid),
        ("+80", Valid),
        ("0080", Valid),
        ("", Invalid),
        (",", Invalid),
        ("https", Invalid),
        ("81", Invalid),
        ("http,https", Invalid),
        ("HTTP", Invalid),
        ("80.0", Invalid),
        ("30080", Invalid),
        ("99999999999", Invalid),
    ] {
        cases.push((
            vec![(ENABLED, "true"), ok, (PORTS, value)],
            "LoadBalancer",
            false,
            false,
            want,
        ));
    }
    for (value, want) in [
        ("true", Valid),
        ("TRUE", Valid),
        (" True ", Valid),
        ("false", Valid),
        ("False\n", Valid),
        ("yes", Invalid),
        ("1", Invalid),
        ("", Invalid),
        ("truee", Invalid),
        ("t rue", Invalid),
        ("falſe", Invalid),
    ] {
        cases.push((vec![(ENABLED, value), ok], "NodePort", false, false, want));
    }
    let bad = (RANGES, "nope");
    let typo = ("nodeport-firewall.io/allowed-source-range", "10.0.0.0/8");
    let cases_managed: Vec<Case> = vec![
        // Which Services are checked at all: those the operator manages.
        (vec![bad], "NodePort", false, false, Valid),
        (vec![bad], "NodePort", true, false, Invalid),
        (
            vec![(ENABLED, "false"), bad],
            "NodePort",
            true,
            false,
            Valid,
        ),
        (vec![bad], "LoadBalancer", true, false, Valid),
        (
            vec![(ENABLED, "true"), bad],
            "LoadBalancer",
            false,
            false,
            Invalid,
        ),
        (
            vec![(ENABLED, "true"), bad],
            "ClusterIP",
            false,
            false,
            Valid,
        ),
        (vec![(ENABLED, "yes")], "ClusterIP", false, false, Valid),
        (
            vec![(ENABLED, "yes")],
            "LoadBalancer",
            false,
            false,
            Invalid,
        ),
        (vec![(ENABLED, "true")], "NodePort", false, false, Valid),
        (
            vec![("example.com/other", "x")],
            "NodePort",
            true,
            false,
            Valid,
        ),
        // Unknown annotations under the prefix.
        (
            vec![(ENABLED, "true"), typo],
            "NodePort",
            false,
            false,
            Invalid,
        ),
        (
            vec![
                (ENABLED, "true"),
                ok,
                ("nodeport-firewall.io/colour", "red"),
            ],
            "NodePort",
            false,
            false,
            Invalid,
        ),
        // A typo is an error on an unmanaged Service too: `enable: "true"` must not
        // silently leave it unmanaged.
        (vec![typo], "NodePort", false, false, Invalid),
        (
            vec![("nodeport-firewall.io/enable", "true")],
            "NodePort",
            false,
            false,
            Invalid,
        ),
        (
            vec![("nodeport-firewall.io/enable", "true")],
            "LoadBalancer",
            false,
            false,
            Invalid,
        ),
        (
            vec![("nodeport-firewall.io/enable", "true")],
            "ClusterIP",
            false,
            false,
            Valid,
        ),
        (
            vec![(ENABLED, "true"), ok, ("example.com/colour", "red")],
            "NodePort",
            false,
            false,
            Valid,
        ),
        // Everything at once.
        (
            vec![
                (ENABLED, " TRUE"),
                (RANGES, "10.20.30.40/24, 2001:db8:100::/48"),
                (POOLS, "web edge"),
                (PORTS, "http 53"),
            ],
            "NodePort",
            false,
            false,
            Valid,
        ),
    ];
    cases.extend(cases_managed);

    let mut checked = 0;
    for (annotations, ty, manage_all, world, want) in &cases {
        let object = service(ty, annotations);
        let policy = shipped.with_config(*manage_all, *world);
        let refused = admits(&env, &policy, &object)
            .unwrap_or_else(|e| panic!("{annotations:?}: CEL error: {e}"));
        let planner = planner_refuses(&object, *manage_all, *world);
        let what = format!("{ty} {annotations:?} (manageAll {manage_all}, allowWorldOpen {world})");
        match want {
            Valid => {
                assert_eq!(planner, None, "{what}: the planner refuses it");
                assert_eq!(refused, None, "{what}: the policy refuses it");
            }
            Invalid => {
                let errors = planner.unwrap_or_else(|| panic!("{what}: the planner accepts it"));
                let message = refused.unwrap_or_else(|| panic!("{what}: the policy admits it"));
                // The policy's message names what the planner names: the annotation, or the
                // unknown annotation.
                let subject = message.split([':', ';']).next().unwrap_or_default();
                assert!(
                    subject.starts_with("nodeport-firewall.io/")
                        || subject.starts_with("unknown annotation nodeport-firewall.io/"),
                    "{what}: {message}"
                );
                assert!(
                    errors.iter().any(|e| e.contains(subject)),
                    "{what}: the policy says {message:?}, the planner {errors:?}"
                );
            }
            OperatorOnly => {
                assert!(planner.is_some(), "{what}: the planner accepts it");
                assert_eq!(refused, None, "{what}: the policy refuses it");
            }
        }
        checked += 1;
    }
    assert!(checked > 100, "{checked} cases");
}

/// Generates tokens from pieces of addresses, so that near misses are common.
fn random_tokens(n: usize) -> Vec<String> {
    const PIECES: &[&str] = &[
        "0", "1", "00", "01", "10", "255", "256", "999", "0000", "ffff", "FFFF", "abcd", "12345",
        "g", ":", "::", ".", "/", "/0", "/8", "/32", "/33", "/64", "/128", "/129", "/08", "/064",
        "1.2.3.4", "01.2.3.4", "%", "x", "-",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // Shapes: an IPv4 or IPv6 skeleton with a mutation, or random pieces.
        let shape = next() % 4;
        let mut t = String::new();
        match shape {
            0 => {
                for i in 0..4 {
                    if i > 0 {
                        t.push('.');
                    }
                    t.push_str(PIECES[(next() % 10) as usize]);
                }
            }
            1 => {
                let groups = 1 + next() % 9;
                for i in 0..groups {
                    if i > 0 {
                        t.push_str(if next() % 5 == 0 { "::" } else { ":" });
                    }
                    t.push_str(PIECES[(next() % 14) as usize]);
                }
            }
            _ => {
                for _ in 0..(1 + next() % 6) {
                    t.push_str(PIECES[(next() as usize) % PIECES.len()]);
                }
            }
        }
        if next() % 2 == 0 {
            t.push_str(PIECES[15 + (next() % 12) as usize]);
        }
        if !t.is_empty() && !t.contains([',', ' ']) {
            out.push(t);
        }
    }
    out
}

#[test]
fn admission_policy_address_pattern_agrees_with_the_parser_on_generated_tokens() {
    // The pattern of `badSources`, compiled once, as the API server does with a constant.
    let policy = Policy::from_object(&kustomize_policy());
    let expr = policy.variable("badSources");
    let pattern = expr
        .split("r'")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .expect("badSources has a raw-string pattern");
    let re = regex::Regex::new(pattern).expect("the address pattern compiles");
    let mut valid = 0;
    let tokens = random_tokens(20_000);
    for t in &tokens {
        let parser = nodeport_firewall_model::net::parse_ranges(t).is_ok();
        assert_eq!(
            re.is_match(t),
            parser,
            "token {t:?}: pattern {} but the parser {}",
            re.is_match(t),
            parser
        );
        valid += usize::from(parser);
    }
    // The generator makes both kinds.
    assert!(
        valid > 500 && valid < tokens.len() - 500,
        "{valid} valid of {}",
        tokens.len()
    );
}

// ---------------------------------------------------------------------------------------
// the image

#[test]
fn dockerfile_is_multi_stage_distroless_and_non_root() {
    let text = std::fs::read_to_string(workspace().join("Dockerfile")).expect("Dockerfile");
    let from: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(from.len() >= 2, "multi-stage: {from:?}");
    let last = from.last().expect("a final stage");
    assert!(
        last.contains("distroless") && last.contains(":nonroot"),
        "the final stage is distroless, non-root: {last}"
    );
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    let uid: u32 = user
        .split(':')
        .next()
        .expect("uid")
        .trim()
        .parse()
        .expect("a numeric uid");
    assert_ne!(uid, 0, "non-root");
    assert!(
        text.contains("cargo build --release --locked"),
        "pinned dependencies"
    );
    let entry = text
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("an ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry).expect("exec form (there is no shell)");
    assert_eq!(entry, ["/usr/local/bin/nodeport-firewall"]);
    // The build context leaves out build output.
    let ignore = std::fs::read_to_string(workspace().join(".dockerignore")).expect(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"), "{ignore}");
}

#[test]
fn docker_image_builds_and_runs_without_a_shell() {
    if std::env::var_os("NPF_DOCKER_BUILD").is_none() {
        eprintln!(
            "SKIPPED: set NPF_DOCKER_BUILD=1 to build the image (needs docker and its registries)"
        );
        return;
    }
    let docker_ok = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !docker_ok {
        eprintln!("SKIPPED: NPF_DOCKER_BUILD is set but `docker info` fails: no docker daemon");
        return;
    }
    let tag = "nodeport-firewall:e2e";
    let status = Command::new("docker")
        .args(["build", "-t", tag])
        .arg(workspace())
        .status()
        .expect("docker build");
    assert!(status.success(), "docker build");
    let run = Command::new("docker")
        .args(["run", "--rm", "--read-only", tag, "--version"])
        .output()
        .expect("docker run");
    assert!(run.status.success(), "{run:?}");
    assert!(String::from_utf8_lossy(&run.stdout).contains("nodeport-firewall"));
    let user = Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Config.User}}", tag])
        .output()
        .expect("docker inspect");
    let user = String::from_utf8_lossy(&user.stdout).trim().to_string();
    assert!(
        !user.is_empty() && !user.starts_with("0") && user != "root",
        "{user}"
    );
    let shell = Command::new("docker")
        .args(["run", "--rm", "--entrypoint", "/bin/sh", tag, "-c", "true"])
        .output()
        .expect("docker run");
    assert!(!shell.status.success(), "the image has no shell");
}

// ---------------------------------------------------------------------------------------
// docs

#[test]
fn the_docs_cover_installation_and_troubleshooting() {
    let read =
        |p: &str| std::fs::read_to_string(workspace().join(p)).unwrap_or_else(|_| panic!("{p}"));
    let readme = read("README.md");
    for link in ["docs/install.md", "docs/troubleshooting.md"] {
        assert!(
            readme.contains(&format!("]({link})")),
            "README links {link}"
        );
    }
    let install = read("docs/install.md");
    for needle in [
        "helm install",
        "kubectl apply -k",
        "deploy/kustomize/overlays/aws",
        "deploy/kustomize/overlays/gcp",
        "deploy/kustomize/overlays/azure",
        "eks.amazonaws.com/role-arn",
        "iam.gke.io/gcp-service-account",
        "azure.workload.identity/client-id",
        "(aws.md)",
        "(gcp.md)",
        "(azure.md)",
        "deploy/iam/aws-policy.json",
        "deploy/iam/gcp-custom-role.yaml",
        "deploy/iam/azure-role.json",
        "docker build",
        "admissionPolicy.enabled",
    ] {
        assert!(
            install.contains(needle),
            "docs/install.md mentions {needle}"
        );
    }
    let troubleshooting = read("docs/troubleshooting.md").to_lowercase();
    for needle in [
        "port conflict",
        "no target",
        "ambiguous",
        "quota",
        "permission",
        "shared vpc",
        "priority band",
        "no allowlist",
        "invalid annotation",
        "nodeportfirewallsynced",
        "kubectl get events",
        "nodeport-firewall plan",
        "nodeport_firewall_reconcile_errors_total",
        "logs deploy/nodeport-firewall",
    ] {
        assert!(
            troubleshooting.contains(needle),
            "docs/troubleshooting.md covers {needle:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// the NodePortFirewallPolicy CRD

/// What `nodeport-firewall crd` prints: the CRD generated from the Rust type.
fn generated_crd() -> Value {
    let out = Command::new(binary())
        .arg("crd")
        .output()
        .expect("run nodeport-firewall crd");
    assert!(out.status.success(), "nodeport-firewall crd failed");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let docs = documents(&text, "nodeport-firewall crd");
    assert_eq!(docs.len(), 1, "one CRD");
    docs.into_iter().next().expect("the CRD")
}

#[test]
fn the_shipped_crd_is_the_one_generated_from_the_rust_type() {
    let want = generated_crd();
    assert_eq!(want["spec"]["names"]["plural"], "nodeportfirewallpolicies");
    assert_eq!(want["spec"]["scope"], "Cluster");
    for file in [
        chart().join("crds/nodeportfirewallpolicies.yaml"),
        kustomize_dir("base/crd.yaml"),
    ] {
        let text = std::fs::read_to_string(&file).expect("the shipped CRD");
        let docs = documents(&text, &file.display().to_string());
        assert_eq!(
            docs,
            vec![want.clone()],
            "{} is stale: regenerate it with `nodeport-firewall crd`",
            file.display()
        );
    }
}

#[test]
fn helm_and_kustomize_render_the_crd() {
    let want = generated_crd();
    let base = check_objects(&kustomize(&kustomize_dir("base")), "kustomize base");
    let crd = one_of_kind(&base, "CustomResourceDefinition", "kustomize base");
    assert!(crd["metadata"].get("namespace").is_none(), "cluster-scoped");
    assert_eq!(normalize(&crd["spec"]), normalize(&want["spec"]));
    let Some(helm) = helm() else { return };
    let objects = check_objects(
        &render_chart(&helm, "npf", "npf", &["--include-crds"]),
        "chart with CRDs",
    );
    let crd = one_of_kind(&objects, "CustomResourceDefinition", "chart");
    assert_eq!(normalize(&crd["spec"]), normalize(&want["spec"]));
}
